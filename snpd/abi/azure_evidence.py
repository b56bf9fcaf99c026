"""Trustee's ``az-snp-vtpm`` evidence document, every version, as one value.

Trustee (deps/verifier/src/az_snp_vtpm/compat.rs) accepts, untagged, in this order:

- v2 and v1: ``{"version": 2|1, "tpm_quote": {"signature": hex, "message": hex,
  "pcrs": [hex, ...]}, "hcl_report": base64url, "vcek": base64url DER}`` (v2 also
  binds the nonce into the runtime JSON's ``user-data``);
- v0: ``{"quote": {"signature": [int], "message": [int], "pcrs": [[int x 32], ...]},
  "report": [int], "vcek": PEM}`` (no ``version``).

The quote's ``signature`` is the bare RSA signature value (azure-cvm-tooling's
``get_quote`` keeps ``rsa_sig.signature()``), ``message`` the marshalled TPMS_ATTEST.
Other members are ignored, as Trustee's serde ignores them. Trustee requires
``vcek``; here a document without one parses (``vcek`` None) and the verifier takes
the VCEK from the caller's certificates. Pure: no I/O here.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import re
from typing import Any, Mapping, Optional, Tuple, Union

from snpd.abi import strictjson
from snpd.errors import EvidenceFormatError

MAX_EVIDENCE = 256 * 1024  # the real v1 document is 7 KiB; as v0 (integer arrays) about 15 KiB
MAX_FIELD = 64 * 1024  # any one decoded field
MAX_PCRS = 64
PCR_SIZE = 32

_B64URL = re.compile(r"\A[A-Za-z0-9_-]*={0,2}\Z")
_HEX = re.compile(r"\A(?:[0-9a-fA-F]{2})*\Z")
_PEM_BEGIN = "-----BEGIN CERTIFICATE-----"
_PEM_END = "-----END CERTIFICATE-----"
# One quantifier over the body: linear time. (A pattern with \s* on both sides of a
# body that may itself hold whitespace backtracks cubically on a long run of spaces.)
_PEM_BODY = re.compile(r"\A[A-Za-z0-9+/=\s]+\Z")


@dataclasses.dataclass(frozen=True)
class AzureEvidence:
    """One ``az-snp-vtpm`` evidence document: the HCL report, the TPM quote (its
    TPMS_ATTEST message, signature and the SHA-256 PCR values it lists), the VCEK as
    DER (None when the document has none) and the format version (0, 1 or 2)."""

    version: int
    hcl_report: bytes = dataclasses.field(repr=False)
    quote_message: bytes = dataclasses.field(repr=False)
    quote_signature: bytes = dataclasses.field(repr=False)
    pcrs: Tuple[bytes, ...] = dataclasses.field(repr=False)
    vcek: Optional[bytes] = dataclasses.field(default=None, repr=False)


def _fail(field: str, why: str) -> EvidenceFormatError:
    return EvidenceFormatError(f"az-snp-vtpm evidence: {field} {why}")


def _b64url(value: object, field: str) -> bytes:
    if not isinstance(value, str) or not _B64URL.match(value):
        raise _fail(field, "is not a base64url string")
    if len(value) > MAX_FIELD * 4 // 3 + 4:
        raise _fail(field, f"is longer than {MAX_FIELD} bytes")
    body = value.rstrip("=")
    try:
        return base64.urlsafe_b64decode(body + "=" * (-len(body) % 4))
    except (binascii.Error, ValueError) as exc:
        raise _fail(field, f"is not base64url: {exc}") from exc


def _hex(value: object, field: str) -> bytes:
    if not isinstance(value, str) or not _HEX.match(value):
        raise _fail(field, "is not a hex string of whole bytes")
    if len(value) > MAX_FIELD * 2:
        raise _fail(field, f"is longer than {MAX_FIELD} bytes")
    return bytes.fromhex(value)


def _ints(value: object, field: str) -> bytes:
    if not isinstance(value, list):
        raise _fail(field, "is not an array of byte values")
    if len(value) > MAX_FIELD:
        raise _fail(field, f"is longer than {MAX_FIELD} bytes")
    if not all(type(v) is int and 0 <= v <= 255 for v in value):
        raise _fail(field, "holds something other than integers 0..255")
    return bytes(value)


def _pem(value: object, field: str) -> bytes:
    if not isinstance(value, str) or len(value) > MAX_FIELD * 2:
        raise _fail(field, "is not a PEM string")
    text = value.strip()
    body = text[len(_PEM_BEGIN):len(text) - len(_PEM_END)]
    if (len(text) <= len(_PEM_BEGIN) + len(_PEM_END) or not text.startswith(_PEM_BEGIN)
            or not text.endswith(_PEM_END) or not _PEM_BODY.match(body)):
        raise _fail(field, "is not one PEM CERTIFICATE block")
    try:
        return base64.b64decode("".join(body.split()), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise _fail(field, f"holds bad base64: {exc}") from exc


def _object(value: object, field: str) -> Mapping[str, Any]:
    if not isinstance(value, dict):
        raise _fail(field, "is missing or not an object")
    return value


def _pcrs(value: object, field: str, decode: Any) -> Tuple[bytes, ...]:
    if not isinstance(value, list):
        raise _fail(field, "is missing or not an array")
    if len(value) > MAX_PCRS:
        raise _fail(field, f"lists {len(value)} PCRs, at most {MAX_PCRS} allowed")
    pcrs = []
    for index, item in enumerate(value):
        pcr = decode(item, f"{field}[{index}]")
        if len(pcr) != PCR_SIZE:
            raise _fail(f"{field}[{index}]", f"is {len(pcr)} bytes, not {PCR_SIZE} (SHA-256)")
        pcrs.append(pcr)
    return tuple(pcrs)


def parse_azure_evidence(document: Union[bytes, str, Mapping[str, Any]]) -> AzureEvidence:
    """Parse an ``az-snp-vtpm`` evidence document (JSON text or already decoded)."""
    if isinstance(document, (bytes, bytearray, str)):
        decoded = strictjson.loads(document, what="az-snp-vtpm evidence", limit=MAX_EVIDENCE)
    else:
        decoded = document
    top = _object(decoded, "the document")
    if "version" not in top:
        if "quote" not in top and "tpm_quote" in top:
            raise _fail("'version'", "is missing (a document with 'tpm_quote' is v1 or v2)")
        quote = _object(top.get("quote"), "'quote'")
        return AzureEvidence(
            version=0,
            hcl_report=_ints(top.get("report"), "'report'"),
            quote_message=_ints(quote.get("message"), "'quote.message'"),
            quote_signature=_ints(quote.get("signature"), "'quote.signature'"),
            pcrs=_pcrs(quote.get("pcrs"), "'quote.pcrs'", _ints),
            vcek=None if top.get("vcek") is None else _pem(top["vcek"], "'vcek'"))
    version = top["version"]
    if type(version) is not int or version not in (1, 2):
        raise _fail("'version'", f"is {version!r}, not 1 or 2 (v0 has no version)")
    quote = _object(top.get("tpm_quote"), "'tpm_quote'")
    return AzureEvidence(
        version=version,
        hcl_report=_b64url(top.get("hcl_report"), "'hcl_report'"),
        quote_message=_hex(quote.get("message"), "'tpm_quote.message'"),
        quote_signature=_hex(quote.get("signature"), "'tpm_quote.signature'"),
        pcrs=_pcrs(quote.get("pcrs"), "'tpm_quote.pcrs'", _hex),
        vcek=None if top.get("vcek") is None else _b64url(top["vcek"], "'vcek'"))
