"""A small, strict DER reader and writer: exactly what X.509 for AMD's chain needs.

Why not leave all of X.509 to ``cryptography``? Every real VCEK and VLEK has
serial number 0, which RFC 5280 forbids; ``cryptography`` warns today and has
announced it will refuse such certificates. Parsing the certificate structure
here keeps snpd independent of that decision; ``cryptography`` is still used
for every public-key operation.

Every length is bounds-checked; any malformed input raises :class:`DerError`
with the offset and what was expected.
"""

from __future__ import annotations

import dataclasses
import datetime
from typing import Iterator, List, Sequence, Tuple

from snpd.errors import CertificateFormatError

# Universal tags (class/constructed bits included).
INTEGER = 0x02
BIT_STRING = 0x03
OCTET_STRING = 0x04
NULL = 0x05
OID = 0x06
UTF8_STRING = 0x0C
PRINTABLE_STRING = 0x13
IA5_STRING = 0x16
UTC_TIME = 0x17
GENERALIZED_TIME = 0x18
BOOLEAN = 0x01
ENUMERATED = 0x0A
SEQUENCE = 0x30
SET = 0x31

STRING_TAGS = frozenset({UTF8_STRING, PRINTABLE_STRING, IA5_STRING, 0x14, 0x1E, 0x1C})


class DerError(CertificateFormatError):
    """Malformed DER."""


def context(n: int, constructed: bool = True) -> int:
    """Tag of a context-specific [n] field."""
    return 0x80 | (0x20 if constructed else 0) | n


@dataclasses.dataclass(frozen=True)
class Tlv:
    """One element: its tag, its contents and the exact bytes it spans."""

    tag: int
    value: bytes
    raw: bytes
    offset: int

    def children(self) -> List[Tlv]:
        if not self.tag & 0x20:
            raise DerError(f"element at offset {self.offset} (tag 0x{self.tag:02x}) is primitive")
        return list(iter_tlvs(self.value, base=self.offset + len(self.raw) - len(self.value)))

    def expect(self, tag: int, what: str) -> Tlv:
        if self.tag != tag:
            raise DerError(f"{what}: expected tag 0x{tag:02x}, got 0x{self.tag:02x} "
                           f"at offset {self.offset}")
        return self


def read_tlv(data: bytes, pos: int = 0, *, base: int = 0) -> Tuple[Tlv, int]:
    """Read one element at ``pos``; return it and the position after it."""
    n = len(data)
    if pos + 2 > n:
        raise DerError(f"truncated element header at offset {base + pos}")
    tag = data[pos]
    if tag & 0x1F == 0x1F:
        raise DerError(f"multi-byte tags are not supported (offset {base + pos})")
    first = data[pos + 1]
    hdr = 2
    if first < 0x80:
        length = first
    else:
        count = first & 0x7F
        if count == 0:
            raise DerError(f"indefinite length is not DER (offset {base + pos})")
        if count > 4:
            raise DerError(f"length of {count} bytes is too large (offset {base + pos})")
        if pos + 2 + count > n:
            raise DerError(f"truncated length at offset {base + pos}")
        length = int.from_bytes(data[pos + 2:pos + 2 + count], "big")
        if length < 0x80 or data[pos + 2] == 0:
            raise DerError(f"non-minimal length encoding at offset {base + pos}")
        hdr += count
    end = pos + hdr + length
    if end > n:
        raise DerError(f"element at offset {base + pos} claims {length} bytes; "
                       f"only {n - pos - hdr} remain")
    return Tlv(tag, data[pos + hdr:end], data[pos:end], base + pos), end


def iter_tlvs(data: bytes, *, base: int = 0) -> Iterator[Tlv]:
    pos = 0
    while pos < len(data):
        tlv, pos = read_tlv(data, pos, base=base)
        yield tlv


def parse_single(data: bytes, what: str) -> Tlv:
    """Parse exactly one element spanning all of ``data``."""
    tlv, end = read_tlv(data)
    if end != len(data):
        raise DerError(f"{what}: {len(data) - end} trailing bytes after the element")
    return tlv


def decode_integer(tlv: Tlv, what: str = "INTEGER") -> int:
    tlv.expect(INTEGER, what)
    v = tlv.value
    if not v:
        raise DerError(f"{what}: empty INTEGER at offset {tlv.offset}")
    if len(v) > 1 and ((v[0] == 0 and v[1] < 0x80) or (v[0] == 0xFF and v[1] >= 0x80)):
        raise DerError(f"{what}: non-minimal INTEGER at offset {tlv.offset}")
    return int.from_bytes(v, "big", signed=True)


def decode_oid(tlv: Tlv, what: str = "OID") -> str:
    tlv.expect(OID, what)
    v = tlv.value
    if not v or v[-1] & 0x80:
        raise DerError(f"{what}: malformed OBJECT IDENTIFIER at offset {tlv.offset}")
    arcs: List[int] = []
    acc = 0
    for i, b in enumerate(v):
        if acc == 0 and b == 0x80 and (i == 0 or not v[i - 1] & 0x80):
            raise DerError(f"{what}: non-minimal OID arc at offset {tlv.offset}")
        acc = acc << 7 | (b & 0x7F)
        if not b & 0x80:
            arcs.append(acc)
            acc = 0
    first = arcs[0]
    head = [0, first] if first < 40 else [1, first - 40] if first < 80 else [2, first - 80]
    return ".".join(str(a) for a in head + arcs[1:])


def decode_bit_string(tlv: Tlv, what: str = "BIT STRING") -> bytes:
    tlv.expect(BIT_STRING, what)
    if not tlv.value or tlv.value[0] > 7:
        raise DerError(f"{what}: malformed BIT STRING at offset {tlv.offset}")
    return tlv.value[1:]


def decode_bool(tlv: Tlv, what: str = "BOOLEAN") -> bool:
    tlv.expect(BOOLEAN, what)
    if tlv.value not in (b"\x00", b"\xff"):
        raise DerError(f"{what}: BOOLEAN must be 0x00 or 0xff in DER")
    return tlv.value == b"\xff"


def decode_string(tlv: Tlv, what: str = "string") -> str:
    if tlv.tag not in STRING_TAGS:
        raise DerError(f"{what}: expected a string, got tag 0x{tlv.tag:02x}")
    codec = "utf-16-be" if tlv.tag == 0x1E else "utf-32-be" if tlv.tag == 0x1C else "utf-8"
    try:
        return tlv.value.decode(codec)
    except UnicodeDecodeError as exc:
        raise DerError(f"{what}: undecodable string at offset {tlv.offset}") from exc


def decode_time(tlv: Tlv, what: str = "time") -> datetime.datetime:
    try:
        text = tlv.value.decode("ascii")
    except UnicodeDecodeError as exc:
        raise DerError(f"{what}: non-ASCII time") from exc
    try:
        if tlv.tag == UTC_TIME:
            if len(text) != 13 or not text.endswith("Z"):
                raise ValueError(text)
            parsed = datetime.datetime.strptime(text, "%y%m%d%H%M%SZ")
            # RFC 5280: YY >= 50 is 19YY.
            if parsed.year >= 2050:
                parsed = parsed.replace(year=parsed.year - 100)
        elif tlv.tag == GENERALIZED_TIME:
            if len(text) != 15 or not text.endswith("Z"):
                raise ValueError(text)
            parsed = datetime.datetime.strptime(text, "%Y%m%d%H%M%SZ")
        else:
            raise DerError(f"{what}: expected UTCTime or GeneralizedTime, got tag 0x{tlv.tag:02x}")
    except ValueError as exc:
        raise DerError(f"{what}: malformed time {text!r}") from exc
    return parsed.replace(tzinfo=datetime.timezone.utc)


# -- encoding --------------------------------------------------------------


def encode(tag: int, value: bytes) -> bytes:
    n = len(value)
    if n < 0x80:
        return bytes([tag, n]) + value
    size = (n.bit_length() + 7) // 8
    return bytes([tag, 0x80 | size]) + n.to_bytes(size, "big") + value


def seq(*items: bytes) -> bytes:
    return encode(SEQUENCE, b"".join(items))


def set_of(*items: bytes) -> bytes:
    return encode(SET, b"".join(sorted(items)))


def integer(value: int) -> bytes:
    size = max(1, (value + (value < 0)).bit_length() // 8 + 1)
    return encode(INTEGER, value.to_bytes(size, "big", signed=True))


def oid(dotted: str) -> bytes:
    arcs = [int(a) for a in dotted.split(".")]
    body = bytearray()
    for arc in [arcs[0] * 40 + arcs[1], *arcs[2:]]:
        chunk = [arc & 0x7F]
        arc >>= 7
        while arc:
            chunk.append(0x80 | (arc & 0x7F))
            arc >>= 7
        body.extend(reversed(chunk))
    return encode(OID, bytes(body))


def octet_string(value: bytes) -> bytes:
    return encode(OCTET_STRING, value)


def bit_string(value: bytes) -> bytes:
    return encode(BIT_STRING, b"\x00" + value)


def boolean(value: bool) -> bytes:
    return encode(BOOLEAN, b"\xff" if value else b"\x00")


def ia5(text: str) -> bytes:
    return encode(IA5_STRING, text.encode("ascii"))


def utf8(text: str) -> bytes:
    return encode(UTF8_STRING, text.encode("utf-8"))


def time(value: datetime.datetime) -> bytes:
    value = value.astimezone(datetime.timezone.utc)
    if 1950 <= value.year < 2050:
        return encode(UTC_TIME, value.strftime("%y%m%d%H%M%SZ").encode())
    return encode(GENERALIZED_TIME, value.strftime("%Y%m%d%H%M%SZ").encode())


def explicit(n: int, inner: bytes) -> bytes:
    return encode(context(n), inner)


def concat(parts: Sequence[bytes]) -> bytes:
    return b"".join(parts)
