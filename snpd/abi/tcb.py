"""TCB_VERSION: a u64 whose byte layout depends on the product (docs/reference/abi.md §4.6).

Milan and Genoa ("legacy"): byte 0 bootloader, 1 TEE, 6 SNP, 7 microcode.
Turin: byte 0 FMC, 1 bootloader, 2 TEE, 3 SNP, 7 microcode. Comparisons are
component-wise, never on the packed integer.
"""

from __future__ import annotations

import dataclasses
from typing import Dict, Optional

from snpd.abi.product import Product


@dataclasses.dataclass(frozen=True)
class TcbVersion:
    """A decoded TCB version. ``raw`` is the exact u64 it came from."""

    raw: int
    turin_layout: bool
    bootloader: int
    tee: int
    snp: int
    microcode: int
    fmc: Optional[int] = None

    @classmethod
    def decode(cls, raw: int, product: Product) -> TcbVersion:
        return cls.decode_layout(raw, turin_layout=product.turin_layout)

    @classmethod
    def decode_layout(cls, raw: int, *, turin_layout: bool) -> TcbVersion:
        if not 0 <= raw < 1 << 64:
            raise ValueError(f"TCB version {raw!r} is not a u64")
        b = raw.to_bytes(8, "little")
        if turin_layout:
            return cls(raw, True, bootloader=b[1], tee=b[2], snp=b[3], microcode=b[7], fmc=b[0])
        return cls(raw, False, bootloader=b[0], tee=b[1], snp=b[6], microcode=b[7])

    @classmethod
    def from_parts(
        cls,
        product: Product,
        *,
        bootloader: int,
        tee: int,
        snp: int,
        microcode: int,
        fmc: Optional[int] = None,
    ) -> TcbVersion:
        for name, value in (("bootloader", bootloader), ("tee", tee), ("snp", snp),
                            ("microcode", microcode), ("fmc", fmc or 0)):
            if not 0 <= value <= 255:
                raise ValueError(f"TCB component {name}={value} is not a byte")
        b = bytearray(8)
        if product.turin_layout:
            b[0], b[1], b[2], b[3], b[7] = fmc or 0, bootloader, tee, snp, microcode
        else:
            if fmc:
                raise ValueError(f"{product} has no FMC TCB component")
            b[0], b[1], b[6], b[7] = bootloader, tee, snp, microcode
        return cls.decode(int.from_bytes(bytes(b), "little"), product)

    def components(self) -> Dict[str, int]:
        """Named components in KDS order; ``fmc`` only for the Turin layout."""
        out: Dict[str, int] = {}
        if self.fmc is not None:
            out["fmc"] = self.fmc
        out.update(bootloader=self.bootloader, tee=self.tee, snp=self.snp,
                   microcode=self.microcode)
        return out

    def __le__(self, other: object) -> bool:
        """Component-wise ≤ (a partial order: both may be false)."""
        if not isinstance(other, TcbVersion):
            return NotImplemented
        mine, theirs = self.components(), other.components()
        return all(mine[k] <= theirs.get(k, 0) for k in mine)

    def __ge__(self, other: object) -> bool:
        if not isinstance(other, TcbVersion):
            return NotImplemented
        return other.__le__(self)

    def __str__(self) -> str:
        parts = " ".join(f"{k}={v}" for k, v in self.components().items())
        return f"0x{self.raw:016x} ({parts})"

    def to_json(self) -> Dict[str, object]:
        return {"raw": f"0x{self.raw:016x}", **self.components()}
