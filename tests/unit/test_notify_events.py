"""sd_notify datagrams and journal native-protocol records, captured on real sockets."""

from __future__ import annotations

import socket
import struct
from pathlib import Path
from typing import Dict, Iterator

import pytest

from snpd.events import MESSAGE_IDS, Events, JournalSink, StderrSink, encode_native
from snpd.notify import Notifier
from snpd.service import Caller


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
