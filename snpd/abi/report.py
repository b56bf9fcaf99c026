"""The 1184-byte SEV-SNP ATTESTATION_REPORT (docs/reference/abi.md §4), parsed as a view.

The raw bytes are the truth: the signature is verified over them, never over a
re-encoding, and every field here is read from them. Versions 2 to 5 parse (4
with the v3 layout); anything else is a :class:`ReportFormatError` that says
what was wrong.
"""

from __future__ import annotations

import dataclasses
import struct
from typing import Dict, Optional, Tuple

from snpd.abi.bits import GuestPolicy, KeyInfo, PlatformInfo, SigningKey
from snpd.abi.product import Product, product_from_cpuid
from snpd.abi.tcb import TcbVersion
from snpd.errors import ReportFormatError

REPORT_SIZE = 0x4A0
SIGNED_SIZE = 0x2A0
REPORT_DATA_SIZE = 64
MIN_VERSION = 2
MAX_VERSION = 5
SIGNATURE_ALGO_ECDSA_P384_SHA384 = 1

_FORMAT = struct.Struct(
    "<IIQ16s16sIIQQI4s64s48s32s48s48s32s32sQBBB21s64sQBBBBBBBBQQQ152s72s72s368s")
assert _FORMAT.size == REPORT_SIZE

# Regions that must be zero: (name, start, end). Checked, reported, not fatal.
_MBZ_COMMON = (("reserved_0x04c", 0x04C, 0x050), ("reserved_0x1eb", 0x1EB, 0x1EC),
               ("reserved_0x1ef", 0x1EF, 0x1F0))
_MBZ_V2 = (("reserved_0x188", 0x188, 0x1A0), ("reserved_0x1f8", 0x1F8, 0x2A0))
_MBZ_V3 = (("reserved_0x18b", 0x18B, 0x1A0), ("reserved_0x1f8", 0x1F8, 0x2A0))
_MBZ_V5 = (("reserved_0x18b", 0x18B, 0x1A0), ("reserved_0x208", 0x208, 0x2A0))


@dataclasses.dataclass(frozen=True)
class FirmwareVersion:
    major: int
    minor: int
    build: int

    def __str__(self) -> str:
        return f"{self.major}.{self.minor} build {self.build}"

    def to_json(self) -> Dict[str, int]:
        return {"major": self.major, "minor": self.minor, "build": self.build}


@dataclasses.dataclass(frozen=True)
class AttestationReport:
    """A parsed report. ``raw`` holds the exact 1184 bytes it was parsed from."""

    raw: bytes
    version: int
    guest_svn: int
    policy: GuestPolicy
    family_id: bytes
    image_id: bytes
    vmpl: int
    signature_algo: int
    current_tcb: int
    platform_info: PlatformInfo
    key_info: KeyInfo
    report_data: bytes
    measurement: bytes
    host_data: bytes
    id_key_digest: bytes
    author_key_digest: bytes
    report_id: bytes
    report_id_ma: bytes
    reported_tcb: int
    cpuid_fam_id: Optional[int]
    cpuid_mod_id: Optional[int]
    cpuid_step: Optional[int]
    chip_id: bytes
    committed_tcb: int
    current: FirmwareVersion
    committed: FirmwareVersion
    launch_tcb: int
    launch_mit_vector: Optional[int]
    current_mit_vector: Optional[int]
    signature_r: bytes
    signature_s: bytes

    @classmethod
    def from_bytes(cls, data: bytes) -> AttestationReport:
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise ReportFormatError(f"a report is bytes, not {type(data).__name__}")
        raw = bytes(data)
        if len(raw) != REPORT_SIZE:
            raise ReportFormatError(
                f"a report is exactly {REPORT_SIZE} bytes; got {len(raw)}")
        f = _FORMAT.unpack(raw)
        version = f[0]
        if not MIN_VERSION <= version <= MAX_VERSION:
            raise ReportFormatError(
                f"report version {version} is not supported (SEV-SNP reports are "
                f"versions {MIN_VERSION} to {MAX_VERSION})")
        has_cpuid = version >= 3
        has_mit = version >= 5
        return cls(
            raw=raw,
            version=version,
            guest_svn=f[1],
            policy=GuestPolicy(f[2]),
            family_id=f[3],
            image_id=f[4],
            vmpl=f[5],
            signature_algo=f[6],
            current_tcb=f[7],
            platform_info=PlatformInfo(f[8]),
            key_info=KeyInfo(f[9]),
            report_data=f[11],
            measurement=f[12],
            host_data=f[13],
            id_key_digest=f[14],
            author_key_digest=f[15],
            report_id=f[16],
            report_id_ma=f[17],
            reported_tcb=f[18],
            cpuid_fam_id=f[19] if has_cpuid else None,
            cpuid_mod_id=f[20] if has_cpuid else None,
            cpuid_step=f[21] if has_cpuid else None,
            chip_id=f[23],
            committed_tcb=f[24],
            current=FirmwareVersion(major=f[27], minor=f[26], build=f[25]),
            committed=FirmwareVersion(major=f[31], minor=f[30], build=f[29]),
            launch_tcb=f[33],
            launch_mit_vector=f[34] if has_mit else None,
            current_mit_vector=f[35] if has_mit else None,
            signature_r=f[37],
            signature_s=f[38],
        )

    # -- derived views -------------------------------------------------------

    @property
    def signed_bytes(self) -> bytes:
        """The bytes the signature covers: [0x000, 0x2A0)."""
        return self.raw[:SIGNED_SIZE]

    @property
    def r(self) -> int:
        return int.from_bytes(self.signature_r, "little")

    @property
    def s(self) -> int:
        return int.from_bytes(self.signature_s, "little")

    @property
    def signing_key(self) -> int:
        return self.key_info.signing_key

    @property
    def is_signed(self) -> bool:
        """False when MASK_CHIP_KEY is set or the signing key is NONE (SIGNATURE is zero)."""
        return not self.key_info.mask_chip_key and self.signing_key != SigningKey.NONE

    @property
    def chip_id_masked(self) -> bool:
        return not any(self.chip_id)

    @property
    def cpuid_product(self) -> Optional[Product]:
        """The product from the report's CPUID bytes (v3+), or None."""
        if self.cpuid_fam_id is None or self.cpuid_mod_id is None:
            return None
        return product_from_cpuid(self.cpuid_fam_id, self.cpuid_mod_id)

    def tcb(self, name: str, product: Product) -> TcbVersion:
        """Decode one of ``current``, ``reported``, ``committed``, ``launch``."""
        raw = {"current": self.current_tcb, "reported": self.reported_tcb,
               "committed": self.committed_tcb, "launch": self.launch_tcb}[name]
        return TcbVersion.decode(raw, product)

    def nonzero_reserved(self) -> Tuple[str, ...]:
        """Names of must-be-zero regions that are not zero (kept, not fatal)."""
        regions = _MBZ_COMMON + (_MBZ_V2 if self.version == 2 else
                                 _MBZ_V5 if self.version >= 5 else _MBZ_V3)
        return tuple(name for name, lo, hi in regions if any(self.raw[lo:hi]))

    def signature_reserved_nonzero(self) -> Tuple[str, ...]:
        """Signature bytes that must be zero for ECDSA P-384: the high 24 bytes of
        R and S, and the 368 reserved bytes after them."""
        bad = []
        if any(self.signature_r[48:]):
            bad.append("signature.r[48:72]")
        if any(self.signature_s[48:]):
            bad.append("signature.s[48:72]")
        if any(self.raw[0x330:REPORT_SIZE]):
            bad.append("signature.reserved[0x330:0x4a0]")
        return tuple(bad)

    def to_json(self, product: Optional[Product] = None) -> Dict[str, object]:
        """A JSON-ready view: byte fields as lowercase hex, TCBs decoded when the
        product is known (pass it for v2 reports, whose CPUID bytes are reserved)."""
        product = product or self.cpuid_product

        def tcb(raw: int) -> object:
            if product is None:
                return {"raw": f"0x{raw:016x}"}
            return TcbVersion.decode(raw, product).to_json()

        out: Dict[str, object] = {
            "version": self.version,
            "guest_svn": self.guest_svn,
            "policy": self.policy.to_json(),
            "family_id": self.family_id.hex(),
            "image_id": self.image_id.hex(),
            "vmpl": self.vmpl,
            "signature_algo": self.signature_algo,
            "current_tcb": tcb(self.current_tcb),
            "platform_info": self.platform_info.to_json(),
            "key_info": self.key_info.to_json(),
            "report_data": self.report_data.hex(),
            "measurement": self.measurement.hex(),
            "host_data": self.host_data.hex(),
            "id_key_digest": self.id_key_digest.hex(),
            "author_key_digest": self.author_key_digest.hex(),
            "report_id": self.report_id.hex(),
            "report_id_ma": self.report_id_ma.hex(),
            "reported_tcb": tcb(self.reported_tcb),
            "cpuid_fam_id": self.cpuid_fam_id,
            "cpuid_mod_id": self.cpuid_mod_id,
            "cpuid_step": self.cpuid_step,
            "product": product.value if product else None,
            "chip_id": self.chip_id.hex(),
            "committed_tcb": tcb(self.committed_tcb),
            "current": self.current.to_json(),
            "committed": self.committed.to_json(),
            "launch_tcb": tcb(self.launch_tcb),
            "launch_mit_vector": self.launch_mit_vector,
            "current_mit_vector": self.current_mit_vector,
            "signature": {"r": self.signature_r.hex(), "s": self.signature_s.hex()},
            "nonzero_reserved": list(self.nonzero_reserved()),
        }
        return out


def parse_report(data: bytes) -> AttestationReport:
    """Parse exactly 1184 bytes; raise ReportFormatError otherwise."""
    return AttestationReport.from_bytes(data)
