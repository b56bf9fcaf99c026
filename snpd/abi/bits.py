"""Bit fields of the report: guest POLICY, PLATFORM_INFO and KEY_INFO (docs/reference/abi.md
§4.3-4.5).

Unknown and reserved bits are kept and reported, never fatal: real Turin
firmware sets PLATFORM_INFO bit 6, which older ABI revisions call reserved.
"""

from __future__ import annotations

import dataclasses
import enum
from typing import Dict, Tuple

# name -> bit, in ABI order.
POLICY_BITS: Dict[str, int] = {
    "smt": 16,
    "reserved_must_be_one": 17,
    "migrate_ma": 18,
    "debug": 19,
    "single_socket": 20,
    "cxl_allow": 21,
    "mem_aes_256_xts": 22,
    "rapl_dis": 23,
    "ciphertext_hiding": 24,
    "page_swap_disable": 25,
}
POLICY_KNOWN_MASK = 0xFFFF | sum(1 << b for b in POLICY_BITS.values())

PLATFORM_INFO_BITS: Dict[str, int] = {
    "smt_en": 0,
    "tsme_en": 1,
    "ecc_en": 2,
    "rapl_dis": 3,
    "ciphertext_hiding_en": 4,
    "alias_check_complete": 5,
    "tio_en": 7,
}
PLATFORM_INFO_KNOWN_MASK = sum(1 << b for b in PLATFORM_INFO_BITS.values())


def _set_bits(value: int, names: Dict[str, int]) -> Tuple[str, ...]:
    return tuple(name for name, bit in names.items() if value >> bit & 1)


def _unknown_bits(value: int, known_mask: int) -> Tuple[int, ...]:
    rest = value & ~known_mask
    return tuple(bit for bit in range(64) if rest >> bit & 1)


@dataclasses.dataclass(frozen=True)
class GuestPolicy:
    raw: int

    @property
    def abi_minor(self) -> int:
        return self.raw & 0xFF

    @property
    def abi_major(self) -> int:
        return self.raw >> 8 & 0xFF

    def flag(self, name: str) -> bool:
        return bool(self.raw >> POLICY_BITS[name] & 1)

    @property
    def flags(self) -> Tuple[str, ...]:
        return _set_bits(self.raw, POLICY_BITS)

    @property
    def unknown_bits(self) -> Tuple[int, ...]:
        """Set bits that this ABI revision does not define (26-63)."""
        return _unknown_bits(self.raw, POLICY_KNOWN_MASK)

    def to_json(self) -> Dict[str, object]:
        return {
            "raw": f"0x{self.raw:x}",
            "abi_major": self.abi_major,
            "abi_minor": self.abi_minor,
            **{name: self.flag(name) for name in POLICY_BITS},
            "unknown_bits": list(self.unknown_bits),
        }


@dataclasses.dataclass(frozen=True)
class PlatformInfo:
    raw: int

    def flag(self, name: str) -> bool:
        return bool(self.raw >> PLATFORM_INFO_BITS[name] & 1)

    @property
    def flags(self) -> Tuple[str, ...]:
        return _set_bits(self.raw, PLATFORM_INFO_BITS)

    @property
    def unknown_bits(self) -> Tuple[int, ...]:
        return _unknown_bits(self.raw, PLATFORM_INFO_KNOWN_MASK)

    def to_json(self) -> Dict[str, object]:
        return {
            "raw": f"0x{self.raw:x}",
            **{name: self.flag(name) for name in PLATFORM_INFO_BITS},
            "unknown_bits": list(self.unknown_bits),
        }


class SigningKey(enum.IntEnum):
    VCEK = 0
    VLEK = 1
    NONE = 7

    @classmethod
    def describe(cls, value: int) -> str:
        try:
            return cls(value).name
        except ValueError:
            return f"reserved({value})"


@dataclasses.dataclass(frozen=True)
class KeyInfo:
    raw: int

    @property
    def author_key_en(self) -> bool:
        return bool(self.raw & 1)

    @property
    def mask_chip_key(self) -> bool:
        """Bit 1: the firmware did not sign; SIGNATURE is zero."""
        return bool(self.raw >> 1 & 1)

    @property
    def signing_key(self) -> int:
        return self.raw >> 2 & 0x7

    @property
    def unknown_bits(self) -> Tuple[int, ...]:
        return _unknown_bits(self.raw, 0x1F)

    def to_json(self) -> Dict[str, object]:
        return {
            "raw": f"0x{self.raw:x}",
            "author_key_en": self.author_key_en,
            "mask_chip_key": self.mask_chip_key,
            "signing_key": SigningKey.describe(self.signing_key),
            "unknown_bits": list(self.unknown_bits),
        }
