"""snpd as a child process: ``python -m snpd.cli.daemon --config FILE`` started with
NOTIFY_SOCKET, as systemd starts a ``Type=notify`` unit, and waited for until it
sends READY=1.

What the harness stands in for, since there is no systemd as PID 1 here:

- ``Type=notify``: a ``SOCK_DGRAM`` socket the harness binds, passed as
  ``NOTIFY_SOCKET``; :meth:`DaemonProcess.start` waits (bounded) for ``READY=1``.
- journald (``journal=True``): another ``SOCK_DGRAM`` socket, passed with
  ``--log-target journal`` and ``SNPD_JOURNAL_SOCKET`` (snpd/events.py); records
  are parsed from the journal's native protocol (memfd-passed entries included).
  Without it the daemon logs to stderr, which goes to :attr:`log_path` either way.
- ``User=`` (``user=``): the daemon is started through ``setpriv`` as that user
  with its login groups. (``setpriv`` keeps root's capabilities until ``execve``,
  so the interpreter is found even when it lives under a directory the user
  cannot search; the process then runs without capabilities.)

A background thread (:class:`Capture`) drains both datagram sockets all the time: a
Unix datagram receiver that stops reading makes the daemon's sends block once a few
messages are queued (net.unix.max_dgram_qlen), which would wedge its event loop.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import re
import select
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable, Dict, List, Literal, Mapping, Optional, TypeVar

from .proc import DEADLINE, spawn

# Sent by the harness to both sockets once the daemon has exited.
EXIT_BARRIER = b"X_SNPD_TEST_DAEMON_EXITED=1\n"
# Environment a test runner or a benchmark's caller may carry that must not reach
# the daemon: it would change which bus, which sockets or which log sink it uses,
# or start a watchdog meant for some other process.
SCRUBBED_ENV = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "LISTEN_FDS", "LISTEN_PID",
                "LISTEN_FDNAMES", "JOURNAL_STREAM", "INVOCATION_ID", "DBUS_SYSTEM_BUS_ADDRESS",
                "DBUS_SESSION_BUS_ADDRESS", "SNPD_JOURNAL_SOCKET", "SNPD_SOCKET")

Stream = Literal["notify", "journal"]
_T = TypeVar("_T")


# -- notify and journal messages -----------------------------------------------------------------


def parse_notify(data: bytes) -> Dict[str, str]:
    """An sd_notify datagram: ``KEY=value`` lines."""
    fields: Dict[str, str] = {}
    for line in data.decode("utf-8", "replace").split("\n"):
        if line:
            key, _, value = line.partition("=")
            fields[key] = value
    return fields


def parse_journal(data: bytes) -> Dict[str, str]:
    """One entry in journald's native protocol: ``KEY=value\\n``, or ``KEY\\n`` + a
    little-endian u64 length + the value + ``\\n`` for values that hold newlines.
    Raises ValueError on anything else (a malformed entry is a finding)."""
    fields: Dict[str, str] = {}
    pos = 0
    while pos < len(data):
        end = data.find(b"\n", pos)
        if end < 0:
            raise ValueError(f"journal entry truncated at byte {pos}")
        line = data[pos:end]
        if b"=" in line:
            key, _, value = line.partition(b"=")
            pos = end + 1
        else:
            key = line
            if end + 9 > len(data):
                raise ValueError(f"journal field {key!r}: length missing")
            (size,) = struct.unpack_from("<Q", data, end + 1)
            start = end + 9
            value = data[start:start + size]
            if len(value) != size or data[start + size:start + size + 1] != b"\n":
                raise ValueError(f"journal field {key!r}: value truncated")
            pos = start + size + 1
        name = key.decode("ascii", "replace")
        if not re.fullmatch(r"[A-Z0-9][A-Z0-9_]*", name):
            raise ValueError(f"invalid journal field name {name!r}")
        fields[name] = value.decode("utf-8", "replace")
    return fields


def _receive(sock: socket.socket) -> bytes:
    """One datagram; an entry passed as a memfd (SCM_RIGHTS, as libsystemd does for
    large ones) is read from the descriptor."""
    data, ancillary, _flags, _addr = sock.recvmsg(1 << 20, socket.CMSG_SPACE(16))
    for level, kind, payload in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds = struct.unpack(f"{len(payload) // 4}i", payload[:len(payload) // 4 * 4])
            for fd in fds:
                try:
                    if not data:
                        os.lseek(fd, 0, os.SEEK_SET)
                        chunks = []
                        while True:
                            chunk = os.read(fd, 1 << 20)
                            if not chunk:
                                break
                            chunks.append(chunk)
                        data = b"".join(chunks)
                finally:
                    os.close(fd)
    return data


class Capture:
    """Binds the notify socket (and the journal socket, if ``journal_path`` is given)
    owned by ``uid``:``gid`` (default: this process's), mode 0600, so that only the
    daemon's user may send, and collects what arrives in a background thread. Wait
    for something with :meth:`wait`. ``notify_times`` holds each notify message's
    arrival (``time.perf_counter()``)."""

    def __init__(self, notify_path: Path, journal_path: Optional[Path] = None,
                 uid: int = -1, gid: int = -1) -> None:
        self.notify_path = notify_path
        self.journal_path = journal_path
        self.notify: List[Dict[str, str]] = []
        self.notify_times: List[float] = []
        self.journal: List[Dict[str, str]] = []
        self.journal_raw: List[bytes] = []
        self.errors: List[str] = []
        # A stream nobody listens to has nothing more to say.
        self.exited: Dict[str, bool] = {"notify": False, "journal": journal_path is None}
        self.cond = threading.Condition()
        self._paths = [p for p in (notify_path, journal_path) if p is not None]
        self._sockets: List[socket.socket] = []
        try:
            for path in self._paths:
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                self._sockets.append(sock)
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
                sock.bind(str(path))
                os.chown(path, uid, gid)
                os.chmod(path, 0o600)
            self._notify_sock = self._sockets[0]
            self._wake_r, self._wake_w = socket.socketpair()
        except BaseException:
            self._close_sockets()
            raise
        self._thread = threading.Thread(target=self._run, name="snpd-capture", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        watched = [*self._sockets, self._wake_r]
        while True:
            ready, _, _ = select.select(watched, [], [])
            if self._wake_r in ready:
                return
            for sock in ready:
                which = "notify" if sock is self._notify_sock else "journal"
                try:
                    data = _receive(sock)
                    if data == EXIT_BARRIER:
                        with self.cond:
                            self.exited[which] = True
                            self.cond.notify_all()
                    elif which == "notify":
                        arrived = time.perf_counter()
                        item = parse_notify(data)
                        with self.cond:
                            self.notify.append(item)
                            self.notify_times.append(arrived)
                            self.cond.notify_all()
                    else:
                        record = parse_journal(data)
                        with self.cond:
                            self.journal_raw.append(data)
                            self.journal.append(record)
                            self.cond.notify_all()
                except (OSError, ValueError) as exc:
                    with self.cond:
                        self.errors.append(f"{which}: {type(exc).__name__}: {exc}")
                        self.cond.notify_all()

    def mark_exit(self) -> None:
        """Called once the daemon has exited: a barrier datagram behind everything it
        sent, so that a waiter can tell "not sent" from "not read yet"."""
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            for path in self._paths:
                with contextlib.suppress(OSError):
                    sock.sendto(EXIT_BARRIER, str(path))

    def wait(self, predicate: Callable[[], Optional[_T]], what: str, *,
             until_exit: Optional[Stream] = None, timeout: float = DEADLINE) -> _T:
        """The first truthy value of ``predicate()`` (called with the lock held).
        AssertionError naming ``what`` if it does not come within ``timeout``, or (with
        ``until_exit`` "notify" or "journal") once everything the daemon sent on that
        socket before it exited has been read without it."""
        gone: List[bool] = []

        def check() -> Optional[_T]:
            value = predicate()
            if not value and until_exit is not None and self.exited[until_exit]:
                gone.append(True)
                return True  # type: ignore[return-value]
            return value

        with self.cond:
            value = self.cond.wait_for(check, timeout)
        if gone:
            raise AssertionError(f"the daemon exited without sending {what}")
        if not value:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        return value

    def notify_index(self, key: str, value: Optional[str] = None, start: int = 0
                     ) -> Optional[int]:
        """Index (>= ``start``) of the first notify message with ``key`` (=``value``)."""
        for i in range(start, len(self.notify)):
            if key in self.notify[i] and (value is None or self.notify[i][key] == value):
                return i
        return None

    def close(self) -> None:
        """Stop the thread; close and remove the sockets."""
        with contextlib.suppress(OSError):
            self._wake_w.send(b"x")
        self._thread.join(DEADLINE)
        self._close_sockets()
        self._wake_r.close()
        self._wake_w.close()

    def _close_sockets(self) -> None:
        for sock in self._sockets:
            sock.close()
        for path in self._paths:
            with contextlib.suppress(OSError):
                path.unlink()


def _plus_one(index: Optional[int]) -> Optional[int]:
    return None if index is None else index + 1


class DaemonProcess:
    """``python -m snpd.cli.daemon --config CONFIG`` with NOTIFY_SOCKET, its stderr
    (and stdout) in ``directory/NAME.log``; the sockets are ``directory/NAME.notify``
    and ``directory/NAME.journal``. Nothing runs until :meth:`start`.

    - ``user``: run as that user (setpriv; needs root). The sockets are its own.
    - ``journal``: log to a captured journal socket, not to stderr.
    - ``python``: the interpreter (default: this one); ``profile``: run under
      cProfile, writing the statistics there.
    - ``environ``: the environment to start from (default: this process's), less
      :data:`SCRUBBED_ENV`; ``env`` is added last and may override anything.
    - ``cwd``: the daemon's working directory (default: the repository root, whose
      snpd then comes first on the daemon's sys.path).
    - ``die_with_parent``: see :func:`tests.harness.proc.spawn`.

    Attributes once started: ``capture`` (notify messages, journal records),
    ``ready`` (the READY=1 message), ``ready_ms`` (from just before the fork to the
    READY=1 datagram, which is what systemd waits for before starting dependants).
    """

    def __init__(self, config: Path, directory: Path, *, name: str = "snpd",
                 user: Optional[str] = None, journal: bool = False,
                 python: Optional[str] = None, profile: Optional[Path] = None,
                 environ: Optional[Mapping[str, str]] = None,
                 env: Optional[Mapping[str, str]] = None, cwd: Optional[Path] = None,
                 die_with_parent: bool = False) -> None:
        self.config_path = config
        self.directory = directory
        self.log_path = directory / f"{name}.log"
        self.user = user
        if user is not None:
            pw = pwd.getpwnam(user)
            self.uid, self.gid = pw.pw_uid, pw.pw_gid
        else:
            self.uid, self.gid = os.getuid(), os.getgid()
        self.journal = journal
        self.python = python or sys.executable
        self.profile = profile
        self.environ = dict(environ) if environ is not None else None  # None: at start
        self.extra_env = dict(env or {})
        self.cwd = cwd
        self.die_with_parent = die_with_parent
        self.ready: Dict[str, str] = {}
        self.ready_ms = 0.0
        self.killed = False  # whether terminate() had to SIGKILL it
        self._proc: Optional[subprocess.Popen[bytes]] = None
        self._log: Optional[int] = None
        self._waiter: Optional[threading.Thread] = None
        self.capture = Capture(directory / f"{name}.notify",
                               directory / f"{name}.journal" if journal else None,
                               self.uid if user is not None else -1,
                               self.gid if user is not None else -1)

    # -- life cycle ---------------------------------------------------------------------------

    def argv(self) -> List[str]:
        """The command line, setpriv included."""
        profiler = ["-m", "cProfile", "-o", str(self.profile)] if self.profile else []
        argv = [self.python, *profiler, "-m", "snpd.cli.daemon", "--config",
                str(self.config_path), "--log-target", "journal" if self.journal else "stderr"]
        if self.user is not None:
            argv = ["setpriv", f"--reuid={self.uid}", f"--regid={self.gid}", "--init-groups",
                    *argv]
        return argv

    def environment(self) -> Dict[str, str]:
        """The daemon's environment: nothing meant for another process, the capture's
        sockets, then ``env``."""
        base = os.environ if self.environ is None else self.environ
        env = {k: v for k, v in base.items() if k not in SCRUBBED_ENV}
        env["NOTIFY_SOCKET"] = str(self.capture.notify_path)
        if self.capture.journal_path is not None:
            env["SNPD_JOURNAL_SOCKET"] = str(self.capture.journal_path)
        env.update(self.extra_env)
        return env

    def start(self, timeout: float = DEADLINE) -> DaemonProcess:
        """Start the daemon and wait (bounded) for READY=1. A daemon that exits first,
        or is not ready in time, is an AssertionError (the daemon is left as it is:
        :meth:`close` stops it)."""
        assert self._proc is None, "a DaemonProcess starts once"
        self._log = os.open(self.log_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC,
                            0o644)
        start = time.perf_counter()
        proc = self._proc = spawn(self.argv(), env=self.environment(), stdout=self._log,
                                  stderr=self._log, cwd=self.cwd,
                                  die_with_parent=self.die_with_parent)
        capture = self.capture

        def reap() -> None:
            proc.wait()
            capture.mark_exit()

        self._waiter = threading.Thread(target=reap, name="snpd-reaper", daemon=True)
        self._waiter.start()
        try:
            index = self.wait_notify("READY", "1", timeout=timeout)
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n{self.diagnostics()}") from None
        with capture.cond:
            self.ready = dict(capture.notify[index])
            self.ready_ms = (capture.notify_times[index] - start) * 1e3
        return self

    @property
    def pid(self) -> int:
        assert self._proc is not None
        return self._proc.pid

    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def send_signal(self, sig: int) -> None:
        assert self._proc is not None
        self._proc.send_signal(sig)

    def wait_notify(self, key: str, value: Optional[str] = None, start: int = 0, *,
                    timeout: float = DEADLINE) -> int:
        """Index of the first notify message (from ``start``) carrying ``key`` (=``value``)."""
        capture = self.capture
        return capture.wait(lambda: _plus_one(capture.notify_index(key, value, start)),
                            f"{key}={value or '*'} on NOTIFY_SOCKET (from #{start})",
                            until_exit="notify", timeout=timeout) - 1

    def wait_journal(self, predicate: Callable[[Dict[str, str]], bool], what: str
                     ) -> Dict[str, str]:
        """The first journal record ``predicate`` accepts."""
        capture = self.capture

        def find() -> Optional[Dict[str, str]]:
            return next((r for r in capture.journal if predicate(r)), None)

        return capture.wait(find, f"a journal record: {what}", until_exit="journal")

    def terminate(self, timeout: float = DEADLINE) -> int:
        """SIGTERM (if it still runs), wait (bounded), SIGKILL if it must (``killed``
        says so); the exit status. The capture stays open for what the daemon said
        last: :meth:`close` closes it."""
        assert self._proc is not None
        if self._proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self._proc.send_signal(signal.SIGTERM)
            try:
                return self._proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.killed = True
                self._proc.kill()
        return self._proc.wait()

    def wait_exit(self, timeout: float = DEADLINE) -> int:
        """Wait (bounded) for a daemon that stops by itself; its exit status."""
        assert self._proc is not None
        try:
            return self._proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"snpd did not exit\n{self.diagnostics()}") from None

    def close(self) -> None:
        """Kill the daemon if it still runs; stop the capture; close the log. Files in
        ``directory`` other than the sockets stay."""
        if self._proc is not None:
            if self._proc.poll() is None:
                self._proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._proc.wait(timeout=DEADLINE)
        if self._waiter is not None:
            self._waiter.join(DEADLINE)
            self._waiter = None
        self.capture.close()
        if self._log is not None:
            os.close(self._log)
            self._log = None

    # -- what it said -----------------------------------------------------------------------

    def log(self, tail: Optional[int] = None) -> str:
        """Its stderr and stdout (the last ``tail`` characters)."""
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return text if tail is None else text[-tail:]

    def diagnostics(self) -> str:
        """What to print when something failed."""
        capture = self.capture
        journal = [r.get("MESSAGE", "") for r in capture.journal]
        return (f"notify: {capture.notify}\njournal: {journal}\n"
                f"capture errors: {capture.errors}\nstderr:\n{self.log()}")

