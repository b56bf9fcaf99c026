"""Trustee KBS protocol messages ("Request-Challenge-Attestation-Response", version
0.4.0; trustee ``kbs/docs/kbs_attestation_protocol.md``), sans I/O.

The one subtle part is the binding. The KBS does not hash the runtime data as sent; it
hashes ``{"additional-evidence", "nonce", "tee-pubkey"}`` with SHA-384 over RFC 8785
canonical JSON (trustee ``kbs/src/attestation/backend.rs``, ``parse_runtime_data`` in
``attestation-service/src/lib.rs``), and expects that digest, zero-padded to 64 bytes,
as the report's REPORT_DATA (on Azure, the TPM quote's extraData). :func:`binding` and
:func:`report_data` compute exactly that.

Everything the KBS sends is bounded and parsed strictly; a malformed message is a
:class:`~snpd.errors.KbsProtocolError` that names the field and never quotes a token.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import hashlib
import json
import math
import re
from typing import Any, Dict, List, Mapping, Optional

from snpd.abi import strictjson
from snpd.errors import EvidenceFormatError, InvalidArgument, KbsProtocolError
from snpd.kbs import jcs

PROTOCOL_VERSION = "0.4.0"
ERROR_TYPE_PREFIX = "https://github.com/confidential-containers/kbs/errors/"
RESOURCE_PREFIX = "kbs/v0/resource/"

MAX_CHALLENGE = 16 << 10
MAX_NONCE = 1024  # Trustee's is 44 characters: 32 random bytes in standard base64
MAX_TOKEN_BODY = 1 << 20  # an EAR token carries the verifier's claims: tens of KiB
MAX_ERROR_BODY = 64 << 10
MAX_DETAIL = 1024
MAX_RESOURCE_PATH = 256
REPORT_DATA_SIZE = 64

_NONCE = re.compile(r"[A-Za-z0-9+/=_-]+")  # base64 either alphabet, or hex
_TEE = re.compile(r"[a-z0-9][a-z0-9-]{0,31}")
# Trustee's ResourceDesc rule (kbs/src/plugins/implementations/resource/backend.rs),
# bounded: no segment starts with '.', so none is '.' or '..'.
_SEGMENT = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,79}")
_PROBLEM = re.compile(r"[A-Za-z][A-Za-z0-9]{0,63}")
_B64URL = re.compile(r"[A-Za-z0-9_-]*")


@dataclasses.dataclass(frozen=True)
class Challenge:
    """The KBS's answer to the Request: the nonce the evidence must bind, and
    ``extra-params`` as sent (unused for SNP; ``""`` when absent)."""

    nonce: str
    extra_params: object = ""


@dataclasses.dataclass(frozen=True)
class ErrorInformation:
    """Trustee's RFC 7807 error body. ``type`` is the full URI as sent; ``detail`` is
    bounded and stripped of control characters, so it may go into a message."""

    type: str
    detail: str

    @property
    def name(self) -> str:
        """The problem type's name, e.g. ``AttestationError``."""
        return self.type[len(ERROR_TYPE_PREFIX):]


def _dumps(value: object) -> bytes:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False,
                      allow_nan=False).encode("utf-8")


def loads(body: bytes, what: str, limit: int) -> Any:
    """``body`` (at most ``limit`` bytes) as strict JSON (no duplicate keys, no NaN), or
    a :class:`KbsProtocolError` whose message starts with ``what``."""
    try:
        return strictjson.loads(body, what=what, limit=limit)
    except EvidenceFormatError as exc:
        raise KbsProtocolError(str(exc)) from None


def request_body(tee: str) -> bytes:
    """The Request (``POST /kbs/v0/auth``) for TEE type ``tee`` ("snp", "az-snp-vtpm")."""
    if not isinstance(tee, str) or not _TEE.fullmatch(tee):
        raise InvalidArgument("the KBS tee type must be a short lowercase name like 'snp'")
    return _dumps({"version": PROTOCOL_VERSION, "tee": tee, "extra-params": ""})


def _check_nonce(nonce: object, what: str) -> str:
    if not isinstance(nonce, str):
        raise KbsProtocolError(f"{what}: the nonce is {type(nonce).__name__}, not a string")
    if not 0 < len(nonce) <= MAX_NONCE or not _NONCE.fullmatch(nonce):
        raise KbsProtocolError(f"{what}: the nonce must be 1-{MAX_NONCE} base64 or hex "
                               "characters")
    return nonce


def parse_challenge(body: bytes) -> Challenge:
    """The Challenge the KBS answers to the Request."""
    value = loads(body, "KBS challenge", MAX_CHALLENGE)
    if not isinstance(value, dict):
        raise KbsProtocolError("KBS challenge: not a JSON object")
    if "nonce" not in value:
        raise KbsProtocolError("KBS challenge: no nonce")
    return Challenge(nonce=_check_nonce(value["nonce"], "KBS challenge"),
                     extra_params=value.get("extra-params", ""))


def runtime_data(nonce: str, tee_pubkey: Mapping[str, str]) -> Dict[str, Any]:
    """The Attestation's ``runtime-data`` object."""
    return {"nonce": _check_nonce(nonce, "runtime data"), "tee-pubkey": dict(tee_pubkey)}


def binding(nonce: str, tee_pubkey: Mapping[str, str], additional_evidence: str = "") -> bytes:
    """The 48-byte SHA-384 the KBS expects the evidence to carry: over the JCS form of
    ``{"additional-evidence", "nonce", "tee-pubkey"}``, not over ``runtime-data``."""
    material = {"additional-evidence": additional_evidence,
                "nonce": _check_nonce(nonce, "binding"), "tee-pubkey": dict(tee_pubkey)}
    return hashlib.sha384(jcs.canonicalize(material)).digest()


def report_data(digest: bytes) -> bytes:
    """``digest`` zero-padded to the report's 64-byte REPORT_DATA."""
    if len(digest) > REPORT_DATA_SIZE:
        raise InvalidArgument(f"report data is at most {REPORT_DATA_SIZE} bytes")
    return bytes(digest).ljust(REPORT_DATA_SIZE, b"\0")


def attestation_body(nonce: str, tee_pubkey: Mapping[str, str], primary_evidence: object,
                     additional_evidence: str = "",
                     init_data: Optional[Mapping[str, Any]] = None) -> bytes:
    """The Attestation (``POST /kbs/v0/attest``). ``primary_evidence`` is the TEE's
    evidence object (snpd's Trustee ``snp`` or ``az-snp-vtpm`` document); ``init-data``
    is sent only when given."""
    if not isinstance(additional_evidence, str):
        raise InvalidArgument("additional evidence is a JSON string (\"\" when none)")
    body: Dict[str, Any] = {
        "runtime-data": runtime_data(nonce, tee_pubkey),
        "tee-evidence": {"primary_evidence": primary_evidence,
                         "additional_evidence": additional_evidence},
    }
    if init_data is not None:
        body["init-data"] = dict(init_data)
    try:
        return _dumps(body)
    except (TypeError, ValueError) as exc:
        raise InvalidArgument(f"the attestation does not serialize as JSON: {exc}") from None


def parse_token(body: bytes) -> str:
    """The attestation token (a JWT) from the KBS's ``{"token": …}`` answer."""
    value = loads(body, "KBS attestation response", MAX_TOKEN_BODY)
    if not isinstance(value, dict) or not isinstance(value.get("token"), str):
        raise KbsProtocolError("KBS attestation response: no token string")
    token: str = value["token"]
    _jwt_parts(token)
    return token


def _jwt_parts(token: str) -> List[str]:
    parts = token.split(".")
    if len(parts) != 3 or not all(parts[:2]) or not all(_B64URL.fullmatch(p) for p in parts):
        raise KbsProtocolError("KBS token: not a compact JWT (three base64url parts)")
    return parts


def b64url_decode(text: object, what: str) -> bytes:
    """Unpadded base64url (RFC 7515 §2), strictly: other characters, padding or a
    non-canonical last character are a :class:`KbsProtocolError`."""
    if not isinstance(text, str) or not _B64URL.fullmatch(text) or len(text) % 4 == 1:
        raise KbsProtocolError(f"{what}: not unpadded base64url")
    try:
        data = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError):  # pragma: no cover - the pattern excludes it
        raise KbsProtocolError(f"{what}: not unpadded base64url") from None
    if b64url_encode(data) != text:
        raise KbsProtocolError(f"{what}: not canonical base64url")
    return data


def is_b64url(text: object) -> bool:
    """Whether ``text`` is a string of base64url characters (no padding)."""
    return isinstance(text, str) and _B64URL.fullmatch(text) is not None


def b64url_encode(data: bytes) -> str:
    """Unpadded base64url."""
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def token_expiry(token: str) -> Optional[int]:
    """The JWT payload's ``exp`` (seconds since the epoch), None when absent. Decodes
    only: the KBS, not the client, relies on the token's signature."""
    payload = b64url_decode(_jwt_parts(token)[1], "KBS token payload")
    claims = loads(payload, "KBS token payload", MAX_TOKEN_BODY)
    if not isinstance(claims, dict):
        raise KbsProtocolError("KBS token payload: not a JSON object")
    exp = claims.get("exp")
    if exp is None:
        return None
    if isinstance(exp, bool) or not isinstance(exp, (int, float)) or not math.isfinite(exp) \
            or not 0 <= exp < 2**63:
        raise KbsProtocolError("KBS token payload: exp is not a NumericDate")
    return int(exp)


def parse_error(body: bytes) -> Optional[ErrorInformation]:
    """Trustee's ErrorInformation from an error response's body; None for anything else
    (another server's page, an empty body, too long)."""
    if len(body) > MAX_ERROR_BODY:
        return None
    try:
        value = strictjson.loads(body, what="KBS error", limit=MAX_ERROR_BODY)
    except EvidenceFormatError:
        return None
    if not isinstance(value, dict):
        return None
    kind, detail = value.get("type"), value.get("detail")
    if not isinstance(kind, str) or not isinstance(detail, str) \
            or not kind.startswith(ERROR_TYPE_PREFIX) \
            or not _PROBLEM.fullmatch(kind[len(ERROR_TYPE_PREFIX):]):
        return None
    clean = "".join(c if c.isprintable() else " " for c in detail[:MAX_DETAIL])
    if len(detail) > MAX_DETAIL:
        clean += "..."
    return ErrorInformation(type=kind, detail=clean)


def resource_path(path: str) -> str:
    """The URL path (no leading slash) of resource ``REPOSITORY/TYPE/TAG``: exactly three
    non-empty segments of letters, digits, ``.``, ``_`` and ``-``, none starting with
    ``.`` (so never ``.`` or ``..``), as Trustee accepts them."""
    if not isinstance(path, str) or len(path) > MAX_RESOURCE_PATH:
        raise InvalidArgument(f"a KBS resource path is at most {MAX_RESOURCE_PATH} characters")
    segments = path.split("/")
    if len(segments) != 3 or not all(_SEGMENT.fullmatch(s) for s in segments):
        raise InvalidArgument(
            "a KBS resource path is REPOSITORY/TYPE/TAG: three segments of letters, digits, "
            "'.', '_' and '-', none starting with '.'")
    return RESOURCE_PREFIX + path
