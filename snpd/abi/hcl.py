"""Azure's HCL report: the SNP report the paravisor (HCL) obtained, and its runtime data.

The vTPM holds it at NV index 0x01400001. Layout (little-endian; azure-cvm-tooling
``az-cvm-vtpm/src/hcl/mod.rs``, ``AttestationReport``)::

    0x000  header (32): signature "HCLA", version, report_size, request_type, status,
           3 reserved u32
    0x020  hardware report area (1184): the SNP report, exactly as the firmware signed it
    0x4c0  IGVM request data (20): data_size, version, report_type (2 SNP, 4 TDX),
           report_data_hash_type (1 SHA-256), variable_data_size
    0x4d4  runtime data (variable_data_size bytes): a JSON document whose SHA-256 is
           REPORT_DATA[0:32]; the NV index pads what follows with zeros

The runtime JSON holds ``keys`` (JWKs; ``HCLAkPub`` is the vTPM attestation key that
signs quotes), ``vm-configuration`` and ``user-data``. Pure layout: the AK stays as
its RSA numbers; nothing here verifies anything.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import re
import struct
from typing import Any, Dict, Mapping, Optional

from snpd.abi import strictjson
from snpd.errors import EvidenceFormatError

HCL_SIGNATURE = b"HCLA"
HEADER_SIZE = 32
SNP_REPORT_OFFSET = HEADER_SIZE
SNP_REPORT_SIZE = 1184
HW_REPORT_AREA = 1184  # max(SNP report 1184, TDX TDREPORT 1024)
REQUEST_DATA_OFFSET = HEADER_SIZE + HW_REPORT_AREA  # 0x4c0
REQUEST_DATA_SIZE = 20
RUNTIME_DATA_OFFSET = REQUEST_DATA_OFFSET + REQUEST_DATA_SIZE  # 0x4d4 = 1236
REPORT_TYPE_SNP = 2
REPORT_TYPE_TDX = 4
HASH_TYPE_SHA256 = 1
AK_KID = "HCLAkPub"

MAX_HCL_REPORT = 64 * 1024  # the NV index is a few KiB (2600 bytes on Azure today)
MAX_RUNTIME_DATA = 32 * 1024
MAX_RSA_BITS = 16384
MIN_RSA_BITS = 2048

_B64URL = re.compile(r"\A[A-Za-z0-9_-]*\Z")


def _b64url_int(value: object, field: str) -> int:
    """A JWK integer: unpadded base64url of its big-endian bytes (RFC 7518 §6.3.1)."""
    if not isinstance(value, str) or not value or not _B64URL.match(value):
        raise EvidenceFormatError(f"HCL runtime data: {field} is not a base64url string")
    try:
        raw = base64.urlsafe_b64decode(value + "=" * (-len(value) % 4))
    except (binascii.Error, ValueError) as exc:
        raise EvidenceFormatError(f"HCL runtime data: {field} is not base64url: {exc}") from exc
    return int.from_bytes(raw, "big")


@dataclasses.dataclass(frozen=True)
class RsaJwk:
    """An RSA public key from a JWK: its ``kid`` and the numbers n and e."""

    kid: str
    n: int
    e: int

    @property
    def bits(self) -> int:
        return self.n.bit_length()


def parse_runtime_json(data: bytes) -> Dict[str, Any]:
    """The runtime data as a JSON object: UTF-8, bounded, no duplicate keys, no NaN."""
    value = strictjson.loads(data, what="HCL runtime data", limit=MAX_RUNTIME_DATA)
    if not isinstance(value, dict):
        raise EvidenceFormatError(f"HCL runtime data is a JSON {type(value).__name__}, "
                                  "not an object")
    return value


def find_ak(runtime: Mapping[str, Any]) -> RsaJwk:
    """The ``HCLAkPub`` RSA key from the runtime JSON's ``keys`` (exactly one)."""
    keys = runtime.get("keys")
    if not isinstance(keys, list):
        raise EvidenceFormatError("HCL runtime data: 'keys' is missing or not a list")
    found = [k for k in keys if isinstance(k, dict) and k.get("kid") == AK_KID]
    if not found:
        raise EvidenceFormatError(f"HCL runtime data: no key with kid {AK_KID!r}")
    if len(found) > 1:
        raise EvidenceFormatError(f"HCL runtime data: {len(found)} keys with kid {AK_KID!r}")
    jwk = found[0]
    if jwk.get("kty") != "RSA":
        raise EvidenceFormatError(f"HCL runtime data: {AK_KID} kty is {jwk.get('kty')!r}, "
                                  "not 'RSA'")
    n = _b64url_int(jwk.get("n"), f"{AK_KID}.n")
    e = _b64url_int(jwk.get("e"), f"{AK_KID}.e")
    if not MIN_RSA_BITS <= n.bit_length() <= MAX_RSA_BITS:
        raise EvidenceFormatError(f"HCL runtime data: {AK_KID} modulus is {n.bit_length()} "
                                  f"bits, not {MIN_RSA_BITS}..{MAX_RSA_BITS}")
    if e < 3 or e % 2 == 0 or e >= n:
        raise EvidenceFormatError(f"HCL runtime data: {AK_KID} exponent {e} is not a valid "
                                  "RSA public exponent")
    return RsaJwk(AK_KID, n, e)


@dataclasses.dataclass(frozen=True)
class HclReport:
    """A parsed HCL report. ``snp_report`` and ``runtime_data`` are the raw bytes
    (as signed and as hashed); ``runtime`` is the runtime JSON, parsed."""

    version: int
    report_size: int
    request_type: int
    status: int
    data_size: int
    request_version: int
    report_type: int
    hash_type: int
    snp_report: bytes = dataclasses.field(repr=False)
    runtime_data: bytes = dataclasses.field(repr=False)
    runtime: Dict[str, Any] = dataclasses.field(repr=False, compare=False, hash=False)
    ak: RsaJwk

    @property
    def vm_configuration(self) -> Dict[str, Any]:
        """The ``vm-configuration`` object (``secure-boot``, ``tpm-enabled``,
        ``console-enabled``...); empty when absent."""
        value = self.runtime.get("vm-configuration")
        return dict(value) if isinstance(value, dict) else {}

    @property
    def user_data(self) -> Optional[bytes]:
        """``user-data`` (hex in the JSON: the 64 bytes last written to NV 0x01400002),
        or None when absent."""
        value = self.runtime.get("user-data")
        if value is None:
            return None
        if not isinstance(value, str):
            raise EvidenceFormatError("HCL runtime data: 'user-data' is not a string")
        try:
            return bytes.fromhex(value)
        except ValueError as exc:
            raise EvidenceFormatError(f"HCL runtime data: 'user-data' is not hex: {exc}") from exc

    @classmethod
    def from_bytes(cls, data: bytes) -> HclReport:
        data = bytes(data)
        if len(data) > MAX_HCL_REPORT:
            raise EvidenceFormatError(f"HCL report: {len(data)} bytes, at most {MAX_HCL_REPORT} "
                                      "allowed")
        if len(data) < RUNTIME_DATA_OFFSET:
            raise EvidenceFormatError(f"HCL report: {len(data)} bytes, shorter than its "
                                      f"{RUNTIME_DATA_OFFSET}-byte fixed part")
        if data[:4] != HCL_SIGNATURE:
            raise EvidenceFormatError(f"HCL report: signature is {data[:4]!r}, not "
                                      f"{HCL_SIGNATURE!r}")
        version, report_size, request_type, status = struct.unpack_from("<4I", data, 4)
        (data_size, request_version, report_type, hash_type,
         var_size) = struct.unpack_from("<5I", data, REQUEST_DATA_OFFSET)
        if report_type != REPORT_TYPE_SNP:
            what = "a TDX report" if report_type == REPORT_TYPE_TDX else "unknown"
            raise EvidenceFormatError(f"HCL report: report_type is {report_type} ({what}), "
                                      f"not {REPORT_TYPE_SNP} (SEV-SNP)")
        if hash_type != HASH_TYPE_SHA256:
            raise EvidenceFormatError(f"HCL report: report_data_hash_type is {hash_type}, not "
                                      f"{HASH_TYPE_SHA256} (SHA-256)")
        if var_size > MAX_RUNTIME_DATA:
            raise EvidenceFormatError(f"HCL report: variable_data_size is {var_size}, at most "
                                      f"{MAX_RUNTIME_DATA} allowed")
        end = RUNTIME_DATA_OFFSET + var_size
        if end > len(data):
            raise EvidenceFormatError(f"HCL report: variable_data_size {var_size} runs past the "
                                      f"end ({len(data) - RUNTIME_DATA_OFFSET} bytes follow "
                                      f"offset {RUNTIME_DATA_OFFSET})")
        runtime_data = data[RUNTIME_DATA_OFFSET:end]
        runtime = parse_runtime_json(runtime_data)
        ak = find_ak(runtime)
        return cls(version, report_size, request_type, status, data_size, request_version,
                   report_type, hash_type,
                   data[SNP_REPORT_OFFSET:SNP_REPORT_OFFSET + SNP_REPORT_SIZE],
                   runtime_data, runtime, ak)
