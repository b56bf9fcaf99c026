"""The GHCB certificate table the host hands back with an extended report (docs/reference/abi.md
§1.5).

The table comes from the untrusted host, so parsing is defensive: every entry is
read only inside the buffer, every region is bounds-checked, and any defect
raises :class:`~snpd.errors.CertTableError` naming the entry, its offset and
length, and the buffer size. Nothing else (IndexError, struct.error …) escapes.

Decisions where the GHCB spec leaves room:

- **Overlapping data regions are accepted.** They are odd but harmless for
  parsing (each entry just gets its own slice); the certificates are verified
  later like any other. A region that overlaps the table itself (offset below
  the table size including its terminator) is rejected: it would make table
  bytes parse as a certificate.
- **Zero-length entries are bounds-checked like any other, then dropped.** They
  carry no certificate, so a host that advertises an empty slot degrades to "no
  certificate of that kind" (cache or KDS fallback) instead of failing the table.
- **A null GUID with a non-zero offset or length is rejected.** Parsers differ on
  whether a null GUID alone terminates the table; refusing the ambiguous entry
  keeps snpd from ever seeing a different table than another parser would.
- **Caps:** at most :data:`MAX_ENTRIES` entries before the terminator and a
  buffer of at most :data:`MAX_BUFFER_SIZE` bytes (the ioctl buffer is at most
  16 KiB, a configfs auxblob up to 32 KiB).
- Bytes after the last certificate (the kernel zero-fills whole pages) are ignored.
- Unknown GUIDs are kept (``kind`` None), duplicates too; deciding what to do
  with them is the caller's business.
"""

from __future__ import annotations

import dataclasses
import struct
import uuid
from typing import List, Optional, Sequence, Tuple, Union

from snpd.abi.product import Product, product_from_cpuid_eax
from snpd.errors import CertTableError, InvalidArgument

ARK_GUID = uuid.UUID("c0b406a4-a803-4952-9743-3fb6014cd0ae")
ASK_GUID = uuid.UUID("4ab7b379-bbac-4fe4-a02f-05aef327c782")  # the host uses it for the ASVK too
VCEK_GUID = uuid.UUID("63da758d-e664-4564-adc5-f4b93be8accd")
VLEK_GUID = uuid.UUID("a8074bc2-a25a-483e-aae6-39c045a0b8a1")
CRL_GUID = uuid.UUID("92f81bc3-5811-4d3d-97ff-d19f88dc67ea")
# go-sev-guest's non-standard entry carrying CPUID(1).EAX, so a v2 report's product is known.
EXTRA_PLATFORM_INFO_GUID = uuid.UUID("ecae0c0f-9502-43b1-afa2-0ae2e0d565b6")
NULL_GUID = uuid.UUID(int=0)

GUID_KINDS = {
    ARK_GUID: "ark",
    ASK_GUID: "ask",
    VCEK_GUID: "vcek",
    VLEK_GUID: "vlek",
    CRL_GUID: "crl",
    EXTRA_PLATFORM_INFO_GUID: "extra_platform_info",
}
KIND_GUIDS = {kind: guid for guid, kind in GUID_KINDS.items()}

ENTRY = struct.Struct("<16sII")  # guid (RFC-4122 byte order), offset, length
ENTRY_SIZE = ENTRY.size  # 24
_TERMINATOR = bytes(ENTRY_SIZE)
MAX_ENTRIES = 64
MAX_BUFFER_SIZE = 64 * 1024


@dataclasses.dataclass(frozen=True)
class CertTableEntry:
    """One certificate-table entry: its GUID and the bytes it points at."""

    guid: uuid.UUID
    data: bytes

    @property
    def kind(self) -> Optional[str]:
        """ark, ask, vcek, vlek, crl, extra_platform_info, or None for an unknown GUID.

        "ask" may hold an ASVK: the host uses the ASK GUID for both."""
        return GUID_KINDS.get(self.guid)


def parse_cert_table(buf: bytes) -> Tuple[CertTableEntry, ...]:
    """The entries of a host certificate buffer (table, terminator, then the blobs).

    An empty buffer or one that starts with the all-zero terminator (what
    upstream KVM writes) means "no certificates" and gives ()."""
    data = bytes(buf)
    size = len(data)
    if size == 0:
        return ()
    if size > MAX_BUFFER_SIZE:
        raise CertTableError(f"certificate buffer of {size} bytes exceeds the "
                             f"{MAX_BUFFER_SIZE}-byte limit")
    raw: List[Tuple[int, uuid.UUID, int, int]] = []
    index = 0
    while True:
        start = index * ENTRY_SIZE
        if start + ENTRY_SIZE > size:
            left = size - start
            where = (f"the buffer ends mid-entry ({left} of {ENTRY_SIZE} bytes left)" if left
                     else "the buffer ends")
            raise CertTableError(f"certificate table has no terminator: {where} at entry "
                                 f"{index} in a buffer of {size} bytes")
        chunk = data[start:start + ENTRY_SIZE]
        if chunk == _TERMINATOR:
            break
        if index >= MAX_ENTRIES:
            raise CertTableError(f"certificate table has more than {MAX_ENTRIES} entries "
                                 f"(no terminator among the first {MAX_ENTRIES})")
        guid_bytes, offset, length = ENTRY.unpack(chunk)
        guid = uuid.UUID(bytes=guid_bytes)
        if guid == NULL_GUID:
            raise CertTableError(f"certificate table entry {index} has a null GUID but "
                                 f"offset {offset}, length {length}: neither a certificate "
                                 f"nor a terminator")
        raw.append((index, guid, offset, length))
        index += 1

    table_size = (len(raw) + 1) * ENTRY_SIZE
    entries: List[CertTableEntry] = []
    for index, guid, offset, length in raw:
        where = (f"certificate table entry {index} ({GUID_KINDS.get(guid, guid)}): "
                 f"offset {offset}, length {length}")
        if offset < table_size:
            raise CertTableError(f"{where} points into the table itself ({table_size} "
                                 f"bytes with its terminator) in a {size}-byte buffer")
        if offset > size:
            raise CertTableError(f"{where}: offset is past the end of the {size}-byte buffer")
        if offset + length > size:
            raise CertTableError(f"{where}: offset + length = {offset + length} runs past "
                                 f"the end of the {size}-byte buffer")
        if length:
            entries.append(CertTableEntry(guid, data[offset:offset + length]))
    return tuple(entries)


def build_cert_table(
    entries: Sequence[Tuple[Union[uuid.UUID, str], bytes]],
    *,
    pad_to: Optional[int] = None,
) -> bytes:
    """The buffer a host builds: entries, the all-zero terminator, then the blobs in
    order. ``pad_to`` zero-pads the result to a multiple (4096 for the ioctl's pages).
    For the emulator and tests; it refuses only what could not be parsed back."""
    guids = [g if isinstance(g, uuid.UUID) else uuid.UUID(g) for g, _ in entries]
    if any(g == NULL_GUID for g in guids):
        raise InvalidArgument("a certificate table entry cannot have the null GUID")
    if pad_to is not None and pad_to <= 0:
        raise InvalidArgument(f"pad_to must be positive, not {pad_to}")
    offset = (len(entries) + 1) * ENTRY_SIZE
    table = bytearray()
    blobs = bytearray()
    for guid, (_, blob) in zip(guids, entries):
        table += ENTRY.pack(guid.bytes, offset, len(blob))
        blobs += blob
        offset += len(blob)
    out = bytes(table) + _TERMINATOR + bytes(blobs)
    if pad_to is not None and len(out) % pad_to:
        out += bytes(pad_to - len(out) % pad_to)
    return out


# -- ExtraPlatformInfo (go-sev-guest ExtendedPlatformCertTable) ------------------

EXTRA_PLATFORM_INFO = struct.Struct("<II")  # size (8), CPUID(1).EAX & 0x0fff0fff
CPUID_EAX_MASK = 0x0FFF0FFF


@dataclasses.dataclass(frozen=True)
class ExtraPlatformInfo:
    """The CPUID signature go-sev-guest adds to an auxblob without a VCEK, so a
    verifier of a v2 report (no CPUID fields) can still tell the product."""

    cpuid_eax: int

    @classmethod
    def from_cpuid_eax(cls, eax: int) -> ExtraPlatformInfo:
        """From a raw CPUID(1).EAX; the stepping-free mask is applied as go-sev-guest does."""
        return cls(eax & CPUID_EAX_MASK)

    @property
    def product(self) -> Optional[Product]:
        return product_from_cpuid_eax(self.cpuid_eax)

    def to_bytes(self) -> bytes:
        return EXTRA_PLATFORM_INFO.pack(EXTRA_PLATFORM_INFO.size, self.cpuid_eax)

    @classmethod
    def from_bytes(cls, data: bytes) -> ExtraPlatformInfo:
        """Parse the payload; a larger declared size (a later version) is accepted."""
        if len(data) < EXTRA_PLATFORM_INFO.size:
            raise CertTableError(f"extra_platform_info entry has {len(data)} bytes, "
                                 f"expected at least {EXTRA_PLATFORM_INFO.size}")
        declared, eax = EXTRA_PLATFORM_INFO.unpack_from(data)
        if not EXTRA_PLATFORM_INFO.size <= declared <= len(data):
            raise CertTableError(f"extra_platform_info declares size {declared} in an "
                                 f"entry of {len(data)} bytes")
        return cls(eax)
