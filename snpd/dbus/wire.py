"""D-Bus message framing as pure functions over bytes (sans-IO).

snpd reads its bus socket itself rather than letting dbus-fast do it, for two
reasons dbus-fast cannot be configured around:

- dbus-fast reads and unpacks every whole message, up to the bus's maximum
  (32 MiB on the system bus), before anything of snpd's runs: three connections
  of 30 MiB calls took the daemon past its MemoryMax. :class:`Framer` learns a
  message's length from its first 16 bytes and skips one over ``max_message``
  as it arrives, keeping only its header fields (bounded too), so snpd can
  answer the sender without ever holding the body.
- dbus-fast up to at least 1.84.2 (Debian 12's python3-dbus-fast) looks the
  header's flag byte up in a table that knows only 0, 1, 2 and 4; any other
  combination (``busctl`` sends NO_AUTO_START|ALLOW_INTERACTIVE_AUTHORIZATION,
  6) raised KeyError in its reader and tore the bus connection down, so any
  local user could stop snpd. :func:`for_dbus_fast` keeps only the one flag a
  receiver acts on, NO_REPLY_EXPECTED.

The layout (D-Bus specification, "Message Format"): byte endianness (``l`` or
``B``), byte type, byte flags, byte protocol version (1), uint32 body length,
uint32 serial, then the header fields as ``a(yv)`` whose uint32 length is at
offset 12 and whose first element starts at 16; the body starts at the next
multiple of 8 after the fields.
"""

from __future__ import annotations

import dataclasses
import struct
from typing import Dict, List, Optional, Tuple, Union

FIXED_SIZE = 16
"""The fixed part of a header, up to and including the fields array's length."""
MAX_DBUS_MESSAGE = 1 << 27
"""The specification's limit on a whole message (128 MiB)."""
MAX_FIELDS = 1 << 16
"""Header fields longer than this are not parsed: the message is dropped unanswered."""

METHOD_CALL, METHOD_RETURN, ERROR, SIGNAL = 1, 2, 3, 4
NO_REPLY_EXPECTED = 0x1

_FIELD_NAMES = {1: "path", 2: "interface", 3: "member", 4: "error_name", 5: "reply_serial",
                6: "destination", 7: "sender", 8: "signature", 9: "unix_fds"}
# The basic types a header field's variant may hold, with (alignment, size); None:
# string-like (s, o: uint32 length; g: byte length), each NUL-terminated.
_BASIC: Dict[str, Optional[Tuple[int, int]]] = {
    "y": (1, 1), "b": (4, 4), "n": (2, 2), "q": (2, 2), "i": (4, 4), "u": (4, 4),
    "x": (8, 8), "t": (8, 8), "d": (8, 8), "h": (4, 4), "s": None, "o": None, "g": None,
}


class WireError(ValueError):
    """The stream is not D-Bus: the connection cannot be resynchronised."""


@dataclasses.dataclass(frozen=True)
class Header:
    """The fixed 16 bytes of a message."""

    little_endian: bool
    type: int
    flags: int
    body_length: int
    serial: int
    fields_length: int

    @property
    def body_offset(self) -> int:
        return FIXED_SIZE + self.fields_length + (-self.fields_length & 7)

    @property
    def total_length(self) -> int:
        return self.body_offset + self.body_length

    @property
    def expects_reply(self) -> bool:
        return self.type == METHOD_CALL and not self.flags & NO_REPLY_EXPECTED


@dataclasses.dataclass(frozen=True)
class Fields:
    """The header fields snpd routes and answers by; absent ones are None."""

    path: Optional[str] = None
    interface: Optional[str] = None
    member: Optional[str] = None
    error_name: Optional[str] = None
    reply_serial: Optional[int] = None
    destination: Optional[str] = None
    sender: Optional[str] = None
    signature: str = ""


@dataclasses.dataclass(frozen=True)
class Frame:
    """One whole message of at most ``max_message`` bytes."""

    header: Header
    fields: Fields
    data: bytes


@dataclasses.dataclass(frozen=True)
class Oversized:
    """A message over ``max_message``: its body was (or is being) skipped unread.
    ``fields`` is None when even its header fields were too long to keep."""

    header: Header
    fields: Optional[Fields]


Event = Union[Frame, Oversized]


def parse_header(data: bytes) -> Header:
    """The fixed header from the first 16 bytes of ``data``."""
    if len(data) < FIXED_SIZE:
        raise WireError(f"a D-Bus header has {FIXED_SIZE} bytes, got {len(data)}")
    endian = data[0:1]
    if endian == b"l":
        fmt = "<III"
    elif endian == b"B":
        fmt = ">III"
    else:
        raise WireError(f"bad endianness mark {endian!r}")
    if data[3] != 1:
        raise WireError(f"unknown D-Bus protocol version {data[3]}")
    body_length, serial, fields_length = struct.unpack_from(fmt, data, 4)
    return Header(little_endian=endian == b"l", type=data[1], flags=data[2],
                  body_length=body_length, serial=serial, fields_length=fields_length)


def parse_fields(header: Header, data: bytes) -> Fields:
    """The header fields from ``data``, which holds the message from its first byte
    through at least the end of the fields array. Parsing stops, keeping what it
    found, at a field whose value is not of a basic type (the specification lets
    unknown fields hold anything; the ones snpd reads are all basic)."""
    end = FIXED_SIZE + header.fields_length
    if len(data) < end:
        raise WireError("the header fields are incomplete")
    order = "<" if header.little_endian else ">"
    found: Dict[str, object] = {}
    pos = FIXED_SIZE
    try:
        while pos < end:
            pos += -pos & 7
            if pos >= end:
                break
            code = data[pos]
            sig_len = data[pos + 1]
            signature = data[pos + 2:pos + 2 + sig_len].decode("ascii")
            pos += 3 + sig_len  # code, length byte, signature, NUL
            if len(signature) != 1 or signature not in _BASIC:
                break
            value, pos = _basic(data, pos, end, signature, order)
            name = _FIELD_NAMES.get(code)
            if name is not None:
                found[name] = value
    except (IndexError, struct.error, UnicodeDecodeError):
        raise WireError("malformed header fields") from None
    return Fields(
        path=_str(found.get("path")), interface=_str(found.get("interface")),
        member=_str(found.get("member")), error_name=_str(found.get("error_name")),
        reply_serial=_int(found.get("reply_serial")),
        destination=_str(found.get("destination")), sender=_str(found.get("sender")),
        signature=_str(found.get("signature")) or "")


def _basic(data: bytes, pos: int, end: int, sig: str, order: str) -> Tuple[object, int]:
    spec = _BASIC[sig]
    if spec is not None:
        align, size = spec
        pos += -pos & (align - 1)
        if pos + size > end:
            raise WireError("a header field runs past the fields array")
        chunk = data[pos:pos + size]
        code = {"y": "B", "b": "I", "n": "h", "q": "H", "i": "i", "u": "I", "x": "q",
                "t": "Q", "d": "d", "h": "I"}[sig]
        return struct.unpack(order + code, chunk)[0], pos + size
    if sig == "g":
        length = data[pos]
        pos += 1
    else:
        pos += -pos & 3
        (length,) = struct.unpack_from(order + "I", data, pos)
        pos += 4
    if pos + length + 1 > end:
        raise WireError("a header field runs past the fields array")
    return data[pos:pos + length].decode("utf-8"), pos + length + 1


def _str(value: object) -> Optional[str]:
    return value if isinstance(value, str) else None


def _int(value: object) -> Optional[int]:
    return value if isinstance(value, int) else None


def for_dbus_fast(data: bytes) -> bytes:
    """The message with its flags reduced to NO_REPLY_EXPECTED, the only flag a
    receiving connection acts on (NO_AUTO_START and ALLOW_INTERACTIVE_AUTHORIZATION
    are for the bus and for polkit). Every dbus-fast version maps that value."""
    flags = data[2]
    if flags & ~NO_REPLY_EXPECTED == 0:
        return data
    fixed = bytearray(data[:FIXED_SIZE])
    fixed[2] = flags & NO_REPLY_EXPECTED
    return bytes(fixed) + data[FIXED_SIZE:]


class Framer:
    """Splits a D-Bus byte stream into :class:`Frame` and :class:`Oversized` events.

    Memory is bounded whatever the peer sends: the buffer never holds more than one
    message of at most ``max_message`` bytes (or, for an oversized one, its header
    fields up to :data:`MAX_FIELDS`) plus what the caller fed at once. Read at most
    :meth:`wanted` bytes per feed to keep it so."""

    def __init__(self, max_message: int, *, read_size: int = 1 << 16) -> None:
        if max_message < FIXED_SIZE:
            raise ValueError("max_message is smaller than a D-Bus header")
        self.max_message = max_message
        self.read_size = read_size
        self._buf = bytearray()
        self._skip = 0  # bytes of an oversized message still to discard
        self.skipped_messages = 0
        self.skipped_bytes = 0

    @property
    def buffered(self) -> int:
        return len(self._buf)

    def wanted(self) -> int:
        """How many bytes to read next (at least 1)."""
        if self._skip:
            return max(1, min(self._skip, self.read_size))
        return self.read_size

    def feed(self, data: bytes) -> List[Event]:
        """Take ``data`` (the next bytes of the stream); return the events it completes."""
        events: List[Event] = []
        view = memoryview(data)
        if self._skip:
            dropped = min(self._skip, len(view))
            self._skip -= dropped
            self.skipped_bytes += dropped
            view = view[dropped:]
        self._buf += view
        while not self._skip and len(self._buf) >= FIXED_SIZE:
            header = parse_header(bytes(self._buf[:FIXED_SIZE]))
            total = header.total_length
            if total <= self.max_message and total <= MAX_DBUS_MESSAGE:
                if len(self._buf) < total:
                    break
                data_ = bytes(self._buf[:total])
                del self._buf[:total]
                events.append(Frame(header, parse_fields(header, data_), data_))
                continue
            # Oversized: keep its fields if they are small, then skip the rest.
            fields_end = FIXED_SIZE + header.fields_length
            fields: Optional[Fields] = None
            if header.fields_length <= MAX_FIELDS:
                if len(self._buf) < fields_end:
                    break
                fields = parse_fields(header, bytes(self._buf[:fields_end]))
            have = min(len(self._buf), total)
            del self._buf[:have]
            self._skip = total - have
            self.skipped_messages += 1
            self.skipped_bytes += have
            events.append(Oversized(header, fields))
        return events
