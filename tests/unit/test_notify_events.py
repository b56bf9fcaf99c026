"""sd_notify datagrams and journal native-protocol records, captured on real sockets."""

from __future__ import annotations

import socket
import struct
from pathlib import Path
from typing import Dict, Iterator, List, Mapping

import pytest

from snpd.access import Caller
from snpd.errors import Busy
from snpd.events import (
    MESSAGE_IDS,
    Events,
    JournalSink,
    Repeats,
    StderrSink,
    encode_native,
)
from snpd.notify import Notifier
from snpd.ratelimit import Rate


@pytest.fixture
def dgram(tmp_path: Path) -> Iterator[socket.socket]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(tmp_path / "sock"))
    sock.settimeout(5)
    yield sock
    sock.close()


def decode_native(data: bytes) -> Dict[str, str]:
    fields: Dict[str, str] = {}
    while data:
        line, _, rest = data.partition(b"\n")
        if b"=" in line:
            key, _, value = line.partition(b"=")
            fields[key.decode()] = value.decode()
            data = rest
        else:
            (size,) = struct.unpack("<Q", rest[:8])
            fields[line.decode()] = rest[8:8 + size].decode()
            data = rest[8 + size + 1:]
    return fields


def test_notify_messages(dgram: socket.socket, tmp_path: Path) -> None:
    notifier = Notifier({"NOTIFY_SOCKET": str(tmp_path / "sock"), "WATCHDOG_USEC": "2000000"})
    assert notifier.enabled and notifier.watchdog_usec == 2000000
    assert notifier.ready("serving")
    assert dgram.recv(4096) == b"READY=1\nSTATUS=serving"
    assert notifier.watchdog() and dgram.recv(4096) == b"WATCHDOG=1"
    assert notifier.stopping("draining") and dgram.recv(4096) == b"STOPPING=1\nSTATUS=draining"
    notifier.close()


def test_notify_without_socket_is_a_no_op() -> None:
    notifier = Notifier({})
    assert not notifier.enabled and not notifier.ready("x")


def test_journal_records(dgram: socket.socket, tmp_path: Path) -> None:
    sink = JournalSink(str(tmp_path / "sock"))
    events = Events(sink)
    caller = Caller(uid=1000, pid=42, transport="varlink")
    events.key_derived(caller, "sealing", ["measurement"])
    fields = decode_native(dgram.recv(65536))
    assert fields["MESSAGE_ID"] == MESSAGE_IDS["KEY_DERIVED"]
    assert fields["SNPD_CALLER_UID"] == "1000" and fields["PRIORITY"] == "6"
    assert fields["SYSLOG_IDENTIFIER"] == "snpd"
    events.log("err", "two\nlines")
    assert decode_native(dgram.recv(65536))["MESSAGE"] == "two\nlines"
    sink.close()


def test_native_encoding_round_trip() -> None:
    record = {"MESSAGE": "a=b\nc", "X": "plain"}
    assert decode_native(encode_native(record)) == record


def test_message_ids_are_distinct_128_bit_hex() -> None:
    ids = list(MESSAGE_IDS.values())
    assert len(set(ids)) == len(ids)
    assert all(len(i) == 32 and int(i, 16) >= 0 for i in ids)


def test_level_filter_and_stderr(capsys: pytest.CaptureFixture[str]) -> None:
    events = Events(StderrSink(), level="warning")
    events.log("info", "hidden")
    events.log("err", "shown")
    assert capsys.readouterr().err == "<3>shown\n"


def test_catalog_documents_every_message_id() -> None:
    catalog = (Path(__file__).resolve().parents[2] / "conf" / "snpd.catalog").read_text()
    for mid in MESSAGE_IDS.values():
        assert f"-- {mid}\nSubject: " in catalog


class ListSink:
    def __init__(self) -> None:
        self.records: List[Dict[str, str]] = []

    def send(self, fields: Mapping[str, str]) -> None:
        self.records.append(dict(fields))


class Ticks:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_repeated_events_are_coalesced_per_type_and_key() -> None:
    ticks = Ticks()
    sink = ListSink()
    events = Events(sink, repeats=Repeats(Rate(burst=3, interval=10.0), clock=ticks))
    flooder = Caller(uid=1000, pid=42, transport="varlink")
    other = Caller(uid=1001, pid=43, transport="dbus")
    busy = Busy("the queue is full")
    for _ in range(1000):
        events.request_failed(flooder, "GetReport", busy)
    events.request_failed(other, "GetReport", busy)  # another uid: its own budget
    events.verification_failed(flooder, ["report.signature"])  # another type: its own
    events.log("notice", "plain records are never held back")
    assert [(r["SNPD_EVENT"], r["SNPD_CALLER_UID"]) for r in sink.records[:5]] == [
        ("CLIENT_THROTTLED", "1000")] * 3 + [("CLIENT_THROTTLED", "1001"),
                                             ("VERIFY_FAILED", "1000")]
    assert len(sink.records) == 6 and "SNPD_SUPPRESSED" not in str(sink.records)
    # The next record of the key after a quiet spell says how many were held back.
    ticks.now += 10
    events.request_failed(flooder, "GetReport", busy)
    last = sink.records[-1]
    assert last["SNPD_SUPPRESSED"] == "997" and "suppressed 997 similar" in last["MESSAGE"]
    assert last["MESSAGE_ID"] == MESSAGE_IDS["CLIENT_THROTTLED"]
    # A flush reports a key still holding records back, once.
    for _ in range(5):
        events.request_failed(flooder, "GetReport", busy)
    ticks.now += 3
    events.flush()
    events.flush()
    summary = sink.records[-1]
    assert len(sink.records) == 8
    assert summary["SNPD_SUPPRESSED"] == "5" and summary["SNPD_CALLER_UID"] == "1000"
    assert summary["MESSAGE"].startswith("suppressed 5 similar in 3 s, the last: GetReport")
    assert summary["MESSAGE_ID"] == MESSAGE_IDS["CLIENT_THROTTLED"]


def test_repeats_forget_idle_keys_beyond_their_bound() -> None:
    ticks = Ticks()
    repeats = Repeats(Rate(burst=1, interval=1.0), clock=ticks, max_keys=4)
    for uid in range(100):
        assert repeats.admit(uid, {"MESSAGE": "m"}) == 0
        ticks.now += 1
    assert len(repeats._keys) <= 4
    assert repeats.admit(99, {"MESSAGE": "m"}) == 0


def test_events_without_repeats_send_everything() -> None:
    sink = ListSink()
    events = Events(sink)
    for _ in range(50):
        events.request_failed(Caller(uid=1000), "GetReport", Busy("full"))
    events.flush()
    assert len(sink.records) == 50
