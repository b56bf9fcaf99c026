"""Trustee's SNP evidence JSON back to the 1184 raw report bytes. Pure.

Trustee's verifier receives the report as the serde JSON of the Rust ``sev`` crate's
AttestationReport (:func:`snpd.evidence.trustee_report` writes it): byte fields as
integer arrays, TCB versions as component objects, firmware versions as
``{major, minor, build}``. A verifier of that evidence must re-encode it to check the
signature, which covers the raw bytes. This is that re-encoding: every field goes back
to its offset, and the regions the JSON does not carry (reserved bytes, the TCB
bytes no component names, the signature's reserved tail) are zero, as a genuine
report has them. A report whose reserved bytes were not zero cannot be rebuilt from
its JSON, and its signature then fails, as in Trustee.
"""

from __future__ import annotations

import struct
from typing import Any, Mapping, Optional, Union

from snpd.abi.report import REPORT_SIZE
from snpd.errors import EvidenceFormatError

_WHAT = "Trustee SNP report"

# (name, offset, size) of the byte-array fields.
_ARRAYS = (
    ("family_id", 0x10, 16), ("image_id", 0x20, 16), ("report_data", 0x50, 64),
    ("measurement", 0x90, 48), ("host_data", 0xC0, 32), ("id_key_digest", 0xE0, 48),
    ("author_key_digest", 0x110, 48), ("report_id", 0x140, 32),
    ("report_id_ma", 0x160, 32), ("chip_id", 0x1A0, 64),
)
# (name, offset, struct format) of the integer fields.
_INTEGERS = (
    ("version", 0x00, "<I"), ("guest_svn", 0x04, "<I"), ("policy", 0x08, "<Q"),
    ("vmpl", 0x30, "<I"), ("sig_algo", 0x34, "<I"), ("plat_info", 0x40, "<Q"),
    ("key_info", 0x48, "<I"),
)
_TCBS = (("current_tcb", 0x38), ("reported_tcb", 0x180), ("committed_tcb", 0x1E0),
         ("launch_tcb", 0x1F0))
_CPUID = (("cpuid_fam_id", 0x188), ("cpuid_mod_id", 0x189), ("cpuid_step", 0x18A))
# Each version's build, minor, major bytes (AMD's order in the report).
_VERSIONS = (("current", 0x1E8), ("committed", 0x1EC))
_MIT_VECTORS = (("launch_mit_vector", 0x1F8), ("current_mit_vector", 0x200))
_SIGNATURE_R, _SIGNATURE_S, _SIGNATURE_PART = 0x2A0, 0x2E8, 72


def _member(doc: Mapping[str, Any], name: str, where: str = "") -> Any:
    if name not in doc:
        raise EvidenceFormatError(f"{_WHAT}: {where}{name} is missing")
    return doc[name]


def _int(value: Any, name: str, bits: int) -> int:
    if type(value) is not int or not 0 <= value < 1 << bits:
        raise EvidenceFormatError(f"{_WHAT}: {name} is not a u{bits}")
    return value


def _bytes(value: Any, name: str, size: int) -> bytes:
    if not isinstance(value, list) or len(value) != size:
        raise EvidenceFormatError(f"{_WHAT}: {name} is not an array of {size} bytes")
    return bytes(_int(b, name, 8) for b in value)


def _tcb(value: Any, name: str) -> int:
    """The packed u64: Turin's layout when the object names an ``fmc``, as the sev
    crate serializes it for Turin only."""
    if not isinstance(value, Mapping):
        raise EvidenceFormatError(f"{_WHAT}: {name} is not a TCB object")
    parts = {key: _int(_member(value, key, f"{name}."), f"{name}.{key}", 8)
             for key in ("bootloader", "tee", "snp", "microcode")}
    fmc: Optional[Any] = value.get("fmc")
    b = bytearray(8)
    if fmc is None:
        b[0], b[1], b[6], b[7] = parts["bootloader"], parts["tee"], parts["snp"], parts[
            "microcode"]
    else:
        b[0] = _int(fmc, f"{name}.fmc", 8)
        b[1], b[2], b[3], b[7] = parts["bootloader"], parts["tee"], parts["snp"], parts[
            "microcode"]
    return int.from_bytes(bytes(b), "little")


def report_from_trustee_json(doc: Union[Mapping[str, Any], Any]) -> bytes:
    """The raw report that ``doc`` (the ``attestation_report`` object) serializes.

    Raises :class:`EvidenceFormatError` naming the first field that is missing or out
    of range; unknown members are ignored, as serde ignores them."""
    if not isinstance(doc, Mapping):
        raise EvidenceFormatError(f"{_WHAT}: not a JSON object")
    raw = bytearray(REPORT_SIZE)
    for name, offset, fmt in _INTEGERS:
        struct.pack_into(fmt, raw, offset,
                         _int(_member(doc, name), name, struct.calcsize(fmt) * 8))
    for name, offset, size in _ARRAYS:
        raw[offset:offset + size] = _bytes(_member(doc, name), name, size)
    for name, offset in _TCBS:
        struct.pack_into("<Q", raw, offset, _tcb(_member(doc, name), name))
    for name, offset in _CPUID:
        value = doc.get(name)
        raw[offset] = 0 if value is None else _int(value, name, 8)
    for name, offset in _VERSIONS:
        version = _member(doc, name)
        if not isinstance(version, Mapping):
            raise EvidenceFormatError(f"{_WHAT}: {name} is not a version object")
        raw[offset:offset + 3] = bytes(
            _int(_member(version, part, f"{name}."), f"{name}.{part}", 8)
            for part in ("build", "minor", "major"))
    for name, offset in _MIT_VECTORS:
        value = doc.get(name)
        struct.pack_into("<Q", raw, offset, 0 if value is None else _int(value, name, 64))
    signature = _member(doc, "signature")
    if not isinstance(signature, Mapping):
        raise EvidenceFormatError(f"{_WHAT}: signature is not an object")
    raw[_SIGNATURE_R:_SIGNATURE_R + _SIGNATURE_PART] = _bytes(
        _member(signature, "r", "signature."), "signature.r", _SIGNATURE_PART)
    raw[_SIGNATURE_S:_SIGNATURE_S + _SIGNATURE_PART] = _bytes(
        _member(signature, "s", "signature."), "signature.s", _SIGNATURE_PART)
    return bytes(raw)
