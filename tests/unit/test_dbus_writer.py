"""The D-Bus transport's guard for dbus-fast's writer: a full socket buffer is a short
write, not a broken connection (tests/integration/test_load.py shows it end to end
with a stopped dbus-daemon)."""

from __future__ import annotations

import socket
import types

from snpd.dbus.service import _PatientSocket, _tolerate_a_full_socket


def _full_pair() -> tuple[socket.socket, socket.socket]:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    ours.setblocking(False)
    try:
        while True:
            ours.send(b"x" * 65536)
    except BlockingIOError:
        pass
    return ours, theirs


def test_a_full_buffer_is_zero_bytes_sent_not_an_error() -> None:
    ours, theirs = _full_pair()
    try:
        patient = _PatientSocket(ours)
        assert patient.send(b"reply") == 0
        assert patient.fileno() == ours.fileno()  # everything else is the socket's own
        theirs.setblocking(False)
        while True:  # the peer reads: the same send goes through again
            try:
                theirs.recv(1 << 20)
            except BlockingIOError:
                break
        assert patient.send(memoryview(b"reply")[1:]) == 4
    finally:
        ours.close()
        theirs.close()


def test_other_errors_still_end_the_connection() -> None:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    theirs.close()
    try:
        patient = _PatientSocket(ours)
        try:
            patient.send(b"reply")
        except (BrokenPipeError, ConnectionResetError):
            pass
        else:
            raise AssertionError("a closed peer must still be an error")
    finally:
        ours.close()


def test_the_writer_socket_is_wrapped_once() -> None:
    sock = object()
    bus = types.SimpleNamespace(_writer=types.SimpleNamespace(sock=sock))
    _tolerate_a_full_socket(bus)
    wrapped = bus._writer.sock
    assert isinstance(wrapped, _PatientSocket) and wrapped._sock is sock
    _tolerate_a_full_socket(bus)
    assert bus._writer.sock is wrapped
