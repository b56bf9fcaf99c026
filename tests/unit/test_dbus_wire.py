"""snpd.dbus.wire (framing, header fields, flag reduction) and snpd.dbus.gate (who may
put how much in flight), pure and without a bus. Messages are marshalled by
dbus-fast itself, the library snpd's reader feeds, so the framing is checked
against what a real peer sends, and the unmarshalled result against dbus-fast."""

from __future__ import annotations

import struct
from typing import List, Optional

import pytest
from dbus_fast import Message, MessageFlag, MessageType

from snpd.dbus import wire
from snpd.dbus.gate import BUSY, LIMITS_EXCEEDED, Gate, Kind, Limits
from snpd.dbus.service import unmarshal

ATT = "org.snpd.Snpd1.Attestation"
PATH = "/org/snpd/Snpd1"
METHODS = {(ATT, "GetReport"): "ayua{sv}", ("org.snpd.Snpd1.Keys", "DeriveKey"): "sasuuta{sv}"}


def marshal(flags: int = 0, *, body: bytes = b"", member: str = "GetReport",
            serial: int = 7) -> bytes:
    msg = Message(destination="org.snpd.Snpd1", path=PATH, interface=ATT, member=member,
                  signature="ayua{sv}", body=[body, 0, {}], serial=serial)
    data = bytearray(msg._marshall(False))
    data[2] = flags  # dbus-fast 1.84 cannot even build every combination
    # A sender field, as the bus adds it: re-marshal with it.
    return bytes(data)


def with_sender(data: bytes, sender: str = ":1.42") -> bytes:
    header = wire.parse_header(data)
    fields = bytearray(data[wire.FIXED_SIZE:wire.FIXED_SIZE + header.fields_length])
    fields += b"\0" * (-len(fields) & 7)
    enc = sender.encode()
    fields += bytes([7, 1]) + b"s\0" + struct.pack("<I", len(enc)) + enc + b"\0"
    head = bytearray(data[:12]) + struct.pack("<I", len(fields)) + fields
    head += b"\0" * (-len(head) & 7)
    return bytes(head) + data[header.body_offset:]


def test_header_and_fields_of_a_real_message() -> None:
    data = with_sender(marshal(body=b"\x01" * 40))
    frame = wire.Framer(1 << 16).feed(data)
    assert len(frame) == 1 and isinstance(frame[0], wire.Frame)
    f = frame[0]
    assert f.header.type == wire.METHOD_CALL and f.header.serial == 7
    assert f.header.total_length == len(data)
    assert (f.fields.path, f.fields.interface, f.fields.member, f.fields.sender,
            f.fields.signature) == (PATH, ATT, "GetReport", ":1.42", "ayua{sv}")


def test_byte_by_byte_and_many_at_once_give_the_same_frames() -> None:
    stream = b"".join(with_sender(marshal(serial=i, body=bytes(i))) for i in range(1, 6))
    one = wire.Framer(1 << 16)
    slow: List[wire.Event] = []
    for i in range(len(stream)):
        slow += one.feed(stream[i:i + 1])
    fast = wire.Framer(1 << 16).feed(stream)
    assert [e.header.serial for e in slow] == [e.header.serial for e in fast] == [1, 2, 3, 4, 5]
    assert one.buffered == 0


def test_an_oversized_message_is_reported_and_skipped_without_being_held() -> None:
    big = with_sender(marshal(body=bytes(200_000), serial=9))
    small = with_sender(marshal(body=b"ok", serial=10))
    framer = wire.Framer(4096, read_size=1024)
    events: List[wire.Event] = []
    stream = big + small
    pos = 0
    peak = 0
    while pos < len(stream):
        n = framer.wanted()
        events += framer.feed(stream[pos:pos + n])
        pos += n
        peak = max(peak, framer.buffered)
    assert isinstance(events[0], wire.Oversized)
    assert events[0].fields is not None and events[0].fields.sender == ":1.42"
    assert events[0].header.serial == 9 and events[0].header.expects_reply
    assert isinstance(events[1], wire.Frame) and events[1].header.serial == 10
    assert peak <= 4096 + 1024
    assert framer.skipped_messages == 1 and framer.skipped_bytes == len(big)


def test_oversized_header_fields_are_not_kept_either() -> None:
    header = b"l\x01\x00\x01" + struct.pack("<III", 0, 3, wire.MAX_FIELDS + 8)
    framer = wire.Framer(1 << 16)
    events = framer.feed(header)
    assert len(events) == 1 and isinstance(events[0], wire.Oversized)
    assert events[0].fields is None


@pytest.mark.parametrize("flags", range(256))
def test_every_flag_byte_reaches_dbus_fast_as_a_flag_it_knows(flags: int) -> None:
    data = wire.for_dbus_fast(with_sender(marshal(flags, body=b"x")))
    msg = unmarshal(data)
    assert msg.message_type is MessageType.METHOD_CALL and msg.member == "GetReport"
    want = MessageFlag.NO_REPLY_EXPECTED if flags & 1 else MessageFlag.NONE
    assert msg.flags == want
    assert bytes(msg.body[0]) == b"x"


def test_a_stream_that_is_not_dbus_is_an_error() -> None:
    with pytest.raises(wire.WireError):
        wire.Framer(1 << 16).feed(b"GET / HTTP/1.1\r\n\r\n")
    with pytest.raises(wire.WireError):
        wire.parse_header(b"l\x01\x00\x02" + bytes(12))


def test_big_endian_headers_are_read() -> None:
    fields = bytes([3, 1]) + b"s\0" + struct.pack(">I", 4) + b"Ping\0"
    head = b"B\x01\x04\x01" + struct.pack(">III", 0, 5, len(fields)) + fields
    head += b"\0" * (-len(head) & 7)
    (frame,) = wire.Framer(1 << 16).feed(head)
    assert isinstance(frame, wire.Frame)
    assert frame.fields.member == "Ping" and frame.header.serial == 5
    assert not frame.header.little_endian


# -- the gate -----------------------------------------------------------------------------


class Clock:
    now = 0.0

    def __call__(self) -> float:
        return self.now


def gate(clock: Optional[Clock] = None, **limits: int) -> Gate:
    return Gate(Limits(**limits), METHODS, PATH, clock or Clock())  # type: ignore[arg-type]


def test_classification_follows_what_dbus_fast_dispatches() -> None:
    g = gate()
    assert g.classify(PATH, ATT, "GetReport", "ayua{sv}") is Kind.SERVICE
    assert g.classify(PATH, "org.snpd.Snpd1.Keys", "GetReport", "ayua{sv}") is Kind.CHEAP
    assert g.classify(PATH, ATT, "GetReport", "ay") is Kind.CHEAP  # dbus-fast: UnknownMethod
    assert g.classify("/other", ATT, "GetReport", "ayua{sv}") is Kind.CHEAP
    assert g.classify(PATH, "org.freedesktop.DBus.Peer", "Ping", "") is Kind.CHEAP


def test_per_connection_per_uid_and_total_bounds() -> None:
    g = gate(per_connection=2, per_uid=3, total=4)
    tickets = [g.admit(":1.1", 1000)[0], g.admit(":1.1", 1000)[0]]
    ticket, refusal = g.admit(":1.1", 1000)
    assert ticket is None and refusal is not None and refusal.error_name == BUSY
    assert "this connection" in refusal.text
    tickets.append(g.admit(":1.2", 1000)[0])
    _, refusal = g.admit(":1.3", 1000)
    assert refusal is not None and "uid 1000" in refusal.text
    tickets.append(g.admit(":1.4", 1001)[0])
    _, refusal = g.admit(":1.5", 1002)
    assert refusal is not None and "as many calls" in refusal.text
    # root is counted apart: the others' total does not shut it out
    root = g.admit(":1.9", 0)[0]
    assert root is not None
    for t in tickets:
        assert t is not None
        g.release(t)
    g.release(root)
    assert g.in_flight()["dbus.in_flight"] == 0
    assert g.admit(":1.1", 1000)[0] is not None


def test_an_unidentified_call_moves_to_its_user_or_is_refused() -> None:
    g = gate(per_uid=1, unidentified=1)
    held = g.admit(":1.1", 1000)[0]
    first, refusal = g.admit(":1.2", None)
    assert first is not None and refusal is None
    _, refusal = g.admit(":1.3", None)
    assert refusal is not None and "identifying" in refusal.text
    moved, refusal = g.identified(first, 1000)
    assert moved is None and refusal is not None and "uid 1000" in refusal.text
    assert g.admit(":1.3", None)[0] is not None  # the pool slot came back
    assert held is not None
    g.release(held)


def test_cheap_calls_are_metered_per_user_and_root_is_not() -> None:
    clock = Clock()
    g = gate(clock, cheap_rate=10, cheap_burst=5)
    results = [g.cheap(":1.1", 1000) for _ in range(7)]
    assert [r is None for r in results] == [True] * 5 + [False] * 2
    assert results[-1] is not None and results[-1].error_name == LIMITS_EXCEEDED
    clock.now = 0.2
    assert g.cheap(":1.2", 1000) is None  # two calls refilled after 0.2 s at 10/s
    assert all(g.cheap(":1.3", 0) is None for _ in range(100))
    # a fresh connection not yet identified gets only a small burst of its own
    unknown = [g.cheap(":1.7", None) for _ in range(20)]
    assert 0 < sum(r is None for r in unknown) < 20
