"""A D-Bus client that writes its own bytes, for the attack tests.

Neither dbus-fast nor busctl will send every header flag combination or a message
of any size on request, so this one marshals the few signatures the attacks need
by hand and talks to the bus socket directly (SASL EXTERNAL, Hello, then whatever
it is told). It parses replies with :mod:`snpd.dbus.wire`, which the unit tests
check independently.

Run as a script it is a client in its own process, so that it connects as another
uid: ``rawbus.py --address A --as-user U`` reads a JSON list of calls on stdin
(``{"destination", "path", "interface", "member", "signature", "args", "flags",
"pad"}``; ``pad`` appends that many bytes of zeros to an ``ay`` argument), sends
them all on ``--connections`` connections (pipelined), waits for the replies of
those that expect one and prints, as JSON, one ``{"type", "error", "text"}`` per
call (``"none"`` when no reply was expected).
"""

from __future__ import annotations

import argparse
import json
import os
import select
import socket
import struct
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from snpd.dbus import wire

DEADLINE = 30.0


def _pad(buf: bytearray, align: int) -> None:
    buf += b"\0" * (-len(buf) & (align - 1))


def _string(buf: bytearray, text: str) -> None:
    _pad(buf, 4)
    data = text.encode()
    buf += struct.pack("<I", len(data)) + data + b"\0"


def marshal_body(signature: str, args: Sequence[Any], pad: int = 0) -> bytes:
    """Little-endian body for the signatures the attacks use: s, u, t, ay (bytes
    given as hex), as (list of str), a{sv} (always empty)."""
    buf = bytearray()
    it = iter(args)
    i = 0
    while i < len(signature):
        sig = signature[i]
        if signature.startswith("a{sv}", i):
            _pad(buf, 4)
            buf += struct.pack("<I", 0)
            _pad(buf, 8)
            i += 5
            continue
        if signature.startswith("ay", i):
            data = bytes.fromhex(next(it)) + b"\0" * pad
            _pad(buf, 4)
            buf += struct.pack("<I", len(data)) + data
            i += 2
            continue
        if signature.startswith("as", i):
            items = next(it)
            _pad(buf, 4)
            at = len(buf)
            buf += b"\0\0\0\0"
            start = len(buf)
            for item in items:
                _string(buf, item)
            struct.pack_into("<I", buf, at, len(buf) - start)
            i += 2
            continue
        if sig == "s":
            _string(buf, next(it))
        elif sig == "u":
            _pad(buf, 4)
            buf += struct.pack("<I", next(it))
        elif sig == "t":
            _pad(buf, 8)
            buf += struct.pack("<Q", next(it))
        else:
            raise ValueError(f"rawbus cannot marshal {sig!r}")
        i += 1
    return bytes(buf)


def _field(buf: bytearray, code: int, sig: str, value: Any) -> None:
    _pad(buf, 8)
    buf += bytes([code, 1]) + sig.encode() + b"\0"
    if sig in ("s", "o"):
        _string(buf, value)
    elif sig == "g":
        data = value.encode()
        buf += bytes([len(data)]) + data + b"\0"
    elif sig == "u":
        _pad(buf, 4)
        buf += struct.pack("<I", value)


def method_call(serial: int, *, destination: str, path: str, interface: Optional[str],
                member: str, signature: str = "", body: bytes = b"", flags: int = 0
                ) -> bytes:
    fields = bytearray()
    _field(fields, 1, "o", path)
    if interface:
        _field(fields, 2, "s", interface)
    _field(fields, 3, "s", member)
    _field(fields, 6, "s", destination)
    if signature:
        _field(fields, 8, "g", signature)
    head = bytearray(b"l" + bytes([wire.METHOD_CALL, flags, 1]))
    head += struct.pack("<III", len(body), serial, len(fields))
    head += fields
    _pad(head, 8)
    return bytes(head) + body


class RawBus:
    """One authenticated connection to a bus socket."""

    def __init__(self, address: str) -> None:
        path = dict(part.split("=", 1) for part in address.split(":", 1)[1].split(","))
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(DEADLINE)
        self.sock.connect(path["path"])
        self.sock.sendall(b"\0AUTH EXTERNAL " + str(os.getuid()).encode().hex().encode()
                          + b"\r\n")
        line = self._line()
        if not line.startswith(b"OK"):
            raise RuntimeError(f"bus refused authentication: {line!r}")
        self.sock.sendall(b"BEGIN\r\n")
        self.framer = wire.Framer(1 << 27)
        self.pending: List[wire.Frame] = []
        self.serial = 0
        hello = self.send(destination="org.freedesktop.DBus", path="/org/freedesktop/DBus",
                          interface="org.freedesktop.DBus", member="Hello")
        self.reply(hello)

    def _line(self) -> bytes:
        data = b""
        while not data.endswith(b"\r\n"):
            chunk = self.sock.recv(1)
            if not chunk:
                raise RuntimeError("bus closed during authentication")
            data += chunk
        return data

    def send(self, **kwargs: Any) -> int:
        self.serial += 1
        self.sock.sendall(method_call(self.serial, **kwargs))
        return self.serial

    def reply(self, serial: int, timeout: float = DEADLINE) -> wire.Frame:
        end = time.monotonic() + timeout
        while True:
            for frame in self.pending:
                if frame.fields.reply_serial == serial:
                    self.pending.remove(frame)
                    return frame
            left = end - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no reply to serial {serial}")
            ready, _, _ = select.select([self.sock], [], [], left)
            if ready:
                data = self.sock.recv(1 << 16)
                if not data:
                    raise RuntimeError("the bus closed the connection")
                self.pending += [e for e in self.framer.feed(data)
                                 if isinstance(e, wire.Frame)
                                 and e.header.type in (wire.METHOD_RETURN, wire.ERROR)]

    def close(self) -> None:
        self.sock.close()


def error_text(frame: wire.Frame) -> str:
    """The string argument of an error reply (its first ``s``)."""
    if frame.fields.signature[:1] != "s":
        return ""
    at = frame.header.body_offset
    (length,) = struct.unpack_from("<I" if frame.header.little_endian else ">I",
                                   frame.data, at)
    return frame.data[at + 4:at + 4 + length].decode(errors="replace")


def run(address: str, calls: Sequence[Dict[str, Any]], connections: int = 1
        ) -> List[Dict[str, Any]]:
    buses = [RawBus(address) for _ in range(connections)]
    sent: List[Tuple[RawBus, Optional[int]]] = []
    try:
        for i, call in enumerate(calls):
            bus = buses[i % len(buses)]
            flags = int(call.get("flags", 0))
            body = marshal_body(call.get("signature", ""), call.get("args", []),
                                int(call.get("pad", 0)))
            serial = bus.send(destination=call["destination"], path=call["path"],
                              interface=call.get("interface"), member=call["member"],
                              signature=call.get("signature", ""), body=body, flags=flags)
            sent.append((bus, None if flags & wire.NO_REPLY_EXPECTED else serial))
        out: List[Dict[str, Any]] = []
        for bus, serial in sent:
            if serial is None:
                out.append({"type": "none"})
                continue
            frame = bus.reply(serial)
            out.append({"type": "error" if frame.header.type == wire.ERROR else "return",
                        "error": frame.fields.error_name, "text": error_text(frame)})
        return out
    finally:
        for bus in buses:
            bus.close()


def main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--address", required=True)
    parser.add_argument("--as-user")
    parser.add_argument("--connections", type=int, default=1)
    args = parser.parse_args(argv)
    calls = json.load(sys.stdin)
    if args.as_user:
        import dbusbus

        dbusbus.drop_privileges(args.as_user)
    json.dump(run(args.address, calls, args.connections), sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
