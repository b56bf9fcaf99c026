"""CPU product lines and their detection (docs/reference/abi.md §4.8).

Parsing a report never depends on recognizing the CPU: detection is a separate
step that may answer ``None``.
"""

from __future__ import annotations

import enum
from typing import Optional


class Product(str, enum.Enum):
    """A product line, valued by its exact KDS name (case-sensitive)."""

    MILAN = "Milan"
    GENOA = "Genoa"
    TURIN = "Turin"

    def __str__(self) -> str:
        return self.value

    @property
    def turin_layout(self) -> bool:
        """Turin and later use the FMC-first TCB layout and an 8-byte hwID."""
        return self is Product.TURIN

    @property
    def hwid_length(self) -> int:
        return 8 if self.turin_layout else 64

    @classmethod
    def parse(cls, name: str) -> Product:
        """Accept a KDS name or a VCEK productName such as ``Milan-B0`` (stepping cut off)."""
        base = name.split("-", 1)[0].strip()
        for product in cls:
            if product.value.lower() == base.lower():
                return product
        raise ValueError(f"unknown product {name!r} (expected Milan, Genoa or Turin)")


# (family, first model, last model inclusive) -> product. Zen4c (0xA0-0xAF) is
# filed by the KDS under Genoa; snpguest's range stops at 0xAE, ours does not.
_CPUID_RANGES = (
    (0x19, 0x00, 0x0F, Product.MILAN),
    (0x19, 0x10, 0x1F, Product.GENOA),
    (0x19, 0xA0, 0xAF, Product.GENOA),
    (0x1A, 0x00, 0x11, Product.TURIN),
)


def product_from_cpuid(family: int, model: int) -> Optional[Product]:
    """Product from the combined CPUID family and model, or None if unknown."""
    for fam, lo, hi, product in _CPUID_RANGES:
        if family == fam and lo <= model <= hi:
            return product
    return None


def product_from_cpuid_eax(eax: int) -> Optional[Product]:
    """Product from CPUID(1).EAX: family = base + extended, model = ext << 4 | base."""
    base_family = (eax >> 8) & 0xF
    ext_family = (eax >> 20) & 0xFF
    family = base_family + ext_family if base_family == 0xF else base_family
    model = ((eax >> 16) & 0xF) << 4 | ((eax >> 4) & 0xF)
    return product_from_cpuid(family, model)


class Endorser(str, enum.Enum):
    """Which endorsement key signs reports: the chip's VCEK or a CSP's VLEK."""

    VCEK = "vcek"
    VLEK = "vlek"

    def __str__(self) -> str:
        return self.value

    @property
    def intermediate(self) -> str:
        """snpguest's file name for the key that signs this endorser: ask or asvk."""
        return "ask" if self is Endorser.VCEK else "asvk"
