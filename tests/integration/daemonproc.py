"""The real snpd daemon as a subprocess, for integration tests.

What the test harness stands in for, since there is no systemd as PID 1 here
(docs/reference/stack.md §4.3-4.4, §5.4; docs/reference/system.md §11):

- the unit's ``User=snpd``: the daemon is ``python -m snpd.cli.daemon`` started
  through ``setpriv`` as uid ``snpd`` with its login groups. (``setpriv`` keeps
  root's capabilities until ``execve``, so the interpreter is found even when it
  lives under a directory the snpd user cannot search; the process then runs
  without capabilities.)
- ``RuntimeDirectory=``, ``StateDirectory=``, ``CacheDirectory=``: fresh
  directories under one temporary directory, owned by ``snpd``; the emulator's
  state is a copy of a template made once per session (its RSA keys take
  seconds to generate).
- ``Type=notify``: a ``SOCK_DGRAM`` socket the test binds, passed as
  ``NOTIFY_SOCKET``; :meth:`SnpdDaemon.start` waits (bounded) for ``READY=1``.
- journald: another ``SOCK_DGRAM`` socket the test binds, passed to the daemon
  with ``--log-target journal`` and ``SNPD_JOURNAL_SOCKET`` (snpd/events.py);
  records are parsed from the journal's native protocol (memfd-passed entries
  included).
- the system bus: a :class:`dbusbus.PrivateBus` loading the shipped policy,
  given as ``DBUS_SYSTEM_BUS_ADDRESS``.
- AMD's KDS: ``snpd-emu kds`` serving the template emulator's chain, VCEK and
  CRL on 127.0.0.1 (:class:`EmulatedKds`).

A background thread drains both datagram sockets all the time: a Unix datagram
receiver that stops reading makes the daemon's sends block once a few messages
are queued (net.unix.max_dgram_qlen), which would wedge its event loop.

Run as a script, this module is a client in its own process:
``daemonproc.py varlink-call --socket PATH [--as-user USER]`` reads a JSON list
of ``{"method", "parameters"}`` from stdin, makes the calls with the independent
PyPI ``varlink`` package (after dropping to USER) and prints the outcomes as JSON
(:func:`varlink_calls_as`); ``daemonproc.py snpd-client --op NAME (--socket PATH
| --bus ADDRESS)`` calls one :class:`snpd.client.SnpdClient` method, as an
application would (:func:`snpd_client_call`). Both import everything before
they drop privileges.
"""

from __future__ import annotations

import base64
import contextlib
import datetime
import json
import os
import pwd
import re
import select
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from typing import (
    Any,
    Callable,
    Dict,
    Iterable,
    List,
    Mapping,
    Optional,
    Sequence,
    Tuple,
    TypeVar,
)

from dbusbus import (  # type: ignore[import-not-found]
    DEADLINE,
    REPO_ROOT,
    PrivateBus,
    drop_privileges,
    run_json,
    stop_process,
)

DAEMON_USER = "snpd"
VARLINK_SOCKET_NAME = "snpd.varlink"
# Sent by the harness (as root) to both sockets once the daemon has exited.
EXIT_BARRIER = b"X_SNPD_TEST_DAEMON_EXITED=1\n"

_T = TypeVar("_T")


# -- configuration -----------------------------------------------------------------------------


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (str, Path)):
        return json.dumps(str(value))  # JSON's escapes are valid in TOML basic strings
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, Mapping):
        return "{" + ", ".join(f"{k} = {_toml_value(v)}" for k, v in value.items()) + "}"
    raise TypeError(f"no TOML form for {type(value).__name__}")


def toml_text(doc: Mapping[str, Mapping[str, Any]]) -> str:
    """``{"section": {"key": value}}`` as TOML; a section name may be dotted
    (``policy.strict``); lists of tables are written inline."""
    out = []
    for section, table in doc.items():
        out.append(f"[{section}]")
        out += [f"{key} = {_toml_value(value)}" for key, value in table.items()]
        out.append("")
    return "\n".join(out)


def merge(*docs: Mapping[str, Mapping[str, Any]]) -> Dict[str, Dict[str, Any]]:
    """Section-wise merge; later documents win key by key."""
    out: Dict[str, Dict[str, Any]] = {}
    for doc in docs:
        for section, table in doc.items():
            out.setdefault(section, {}).update(table)
    return out


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
    """Binds the notify and journal sockets in ``directory`` (owned by ``uid``, mode
    0600, so only the daemon's user may send) and collects what arrives, in a
    background thread. Wait for something with :meth:`wait`."""

    def __init__(self, directory: Path, uid: int, gid: int) -> None:
        self.notify_path = directory / "notify.socket"
        self.journal_path = directory / "journal.socket"
        self.notify: List[Dict[str, str]] = []
        self.journal: List[Dict[str, str]] = []
        self.journal_raw: List[bytes] = []
        self.errors: List[str] = []
        self.exited = {"notify": False, "journal": False}
        self.cond = threading.Condition()
        self._sockets: List[socket.socket] = []
        try:
            for path in (self.notify_path, self.journal_path):
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                self._sockets.append(sock)
                sock.bind(str(path))
                os.chown(path, uid, gid)
                os.chmod(path, 0o600)
            self._notify_sock, self._journal_sock = self._sockets
            self._wake_r, self._wake_w = socket.socketpair()
        except BaseException:
            for sock in self._sockets:
                sock.close()
            raise
        self._thread = threading.Thread(target=self._run, name="snpd-capture", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        watched = [self._notify_sock, self._journal_sock, self._wake_r]
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
                        item = parse_notify(data)
                        with self.cond:
                            self.notify.append(item)
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
            for path in (self.notify_path, self.journal_path):
                with contextlib.suppress(OSError):
                    sock.sendto(EXIT_BARRIER, str(path))

    def wait(self, predicate: Callable[[], Optional[_T]], what: str, *,
             until_exit: Optional[str] = None, timeout: float = DEADLINE) -> _T:
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
        with contextlib.suppress(OSError):
            self._wake_w.send(b"x")
        self._thread.join(DEADLINE)
        for sock in (*self._sockets, self._wake_r, self._wake_w):
            sock.close()


# -- the emulator's platform and its KDS ----------------------------------------------------------


class EmulatorTemplate:
    """An emulator state directory made once (default EmulatorConfig: Genoa, report
    v5, VMPL 0, host certificate table), copied for every daemon."""

    def __init__(self, config: Any = None) -> None:
        from snpd.emulator.launch import EmulatorConfig
        from snpd.emulator.state import EmulatorState

        self.directory = Path(tempfile.mkdtemp(prefix="snpd-emulator-template-"))
        try:
            self.state = EmulatorState.load_or_create(
                self.directory, config or EmulatorConfig(),
                now=lambda: datetime.datetime.now(datetime.timezone.utc))
        except BaseException:
            shutil.rmtree(self.directory, ignore_errors=True)
            raise
        self.ark_pem = (self.directory / "certs" / "ark.pem").read_bytes()
        self.chip_id: bytes = self.state.chip_id

    def copy_to(self, target: Path, uid: int, gid: int) -> None:
        shutil.copytree(self.directory, target, symlinks=True)
        chown_tree(target, uid, gid)

    def close(self) -> None:
        shutil.rmtree(self.directory, ignore_errors=True)


def chown_tree(path: Path, uid: int, gid: int) -> None:
    os.chown(path, uid, gid, follow_symlinks=False)
    for root, dirs, files in os.walk(path):
        for name in dirs + files:
            os.chown(os.path.join(root, name), uid, gid, follow_symlinks=False)


class EmulatedKds:
    """``snpd-emu kds`` on 127.0.0.1 serving an emulator directory's chain, VCEK and CRL."""

    def __init__(self, emulator_dir: Path) -> None:
        self.log_path = Path(tempfile.mkstemp(prefix="snpd-kds-", suffix=".log")[1])
        self._log = open(self.log_path, "wb")  # noqa: SIM115
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "snpd.cli.emu", "--emulator-dir", str(emulator_dir), "kds"],
            stdout=subprocess.PIPE, stderr=self._log, stdin=subprocess.DEVNULL,
            cwd=str(REPO_ROOT))
        assert self._proc.stdout is not None
        ready, _, _ = select.select([self._proc.stdout], [], [], DEADLINE)
        line = self._proc.stdout.readline().decode() if ready else ""
        match = re.search(r" at (http://\S+)", line)
        if match is None:
            self.close()
            raise RuntimeError(f"snpd-emu kds did not start: {line!r} {self.log()}")
        self.url = match.group(1)

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")

    def close(self) -> None:
        stop_process(self._proc)
        self._log.close()
        self.log_path.unlink(missing_ok=True)


# -- the daemon --------------------------------------------------------------------------------

# Environment a test runner may carry that must not reach the daemon: it would
# change which bus, which sockets or which log sink it uses.
_SCRUBBED = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "LISTEN_FDS", "LISTEN_PID",
             "LISTEN_FDNAMES", "JOURNAL_STREAM", "INVOCATION_ID", "DBUS_SYSTEM_BUS_ADDRESS",
             "DBUS_SESSION_BUS_ADDRESS", "SNPD_JOURNAL_SOCKET", "SNPD_SOCKET")


class SnpdDaemon:
    """``python -m snpd.cli.daemon --config FILE --log-target journal`` as user snpd.

    ``config`` adds to (or overrides) the base configuration: the emulator backend
    on a copy of ``template``, the KDS at ``kds_url``, the varlink socket and the
    KDS cache in this daemon's own directory, log level debug (the most output, for
    the secrets checks). ``socket_mode`` is applied to the varlink socket once the
    daemon is ready (None: leave the daemon's own 0660 snpd:snpd). ``env`` adds
    environment variables (WATCHDOG_USEC, say).

    Attributes once started: ``socket_path``, ``bus_address``, ``capture`` (notify
    messages and journal records), ``ready`` (the READY=1 message), ``socket_stat``
    (the socket as the daemon made it), ``pid``.
    """

    def __init__(self, bus_address: str, template: EmulatorTemplate, kds_url: str, *,
                 config: Optional[Mapping[str, Mapping[str, Any]]] = None,
                 env: Optional[Mapping[str, str]] = None,
                 socket_mode: Optional[int] = 0o666) -> None:
        pw = pwd.getpwnam(DAEMON_USER)
        self.uid, self.gid = pw.pw_uid, pw.pw_gid
        self.bus_address = bus_address
        self.directory = Path(tempfile.mkdtemp(prefix="snpd-daemon-"))
        self.directory.chmod(0o755)  # test users reach the socket through it
        self.runtime_dir = self.directory / "run"
        self.state_dir = self.directory / "lib"
        self.cache_dir = self.directory / "cache"
        self.emulator_dir = self.state_dir / "emulator"
        self.socket_path = self.runtime_dir / VARLINK_SOCKET_NAME
        self.config_path = self.directory / "snpd.toml"
        self.stderr_path = self.directory / "stderr.log"
        self.socket_mode = socket_mode
        self.capture: Optional[Capture] = None
        self.ready: Dict[str, str] = {}
        self.socket_stat: Optional[os.stat_result] = None
        self._proc: Optional[subprocess.Popen[bytes]] = None
        self._stderr: Any = None
        self._waiter: Optional[threading.Thread] = None
        self._extra_env = dict(env or {})
        try:
            for path, mode in ((self.runtime_dir, 0o755), (self.state_dir, 0o700),
                               (self.cache_dir, 0o700)):
                path.mkdir(mode=mode)
                os.chown(path, self.uid, self.gid)
                path.chmod(mode)
            template.copy_to(self.emulator_dir, self.uid, self.gid)
            self.config: Dict[str, Dict[str, Any]] = merge({
                "device": {"backend": "emulator"},
                "emulator": {"state_dir": str(self.emulator_dir)},
                "kds": {"url": kds_url, "cache_dir": str(self.cache_dir)},
                "varlink": {"socket": str(self.socket_path)},
                "log": {"level": "debug"},
            }, config or {})
            self.write_config(self.config)
            self.capture = Capture(self.directory, self.uid, self.gid)
        except BaseException:
            self.close()
            raise

    # -- files ----------------------------------------------------------------------------

    def write_config(self, doc: Mapping[str, Mapping[str, Any]], text: Optional[str] = None
                     ) -> None:
        """(Re)write the configuration file (``text`` verbatim, if given)."""
        self.config_path.write_text(text if text is not None else toml_text(doc),
                                    encoding="utf-8")
        self.config_path.chmod(0o644)

    def stderr(self) -> str:
        if self._stderr is not None:
            self._stderr.flush()
        try:
            return self.stderr_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def diagnostics(self) -> str:
        """What to print when something failed."""
        capture = self.capture
        notify = capture.notify if capture else []
        journal = [r.get("MESSAGE", "") for r in capture.journal] if capture else []
        return (f"notify: {notify}\njournal: {journal}\n"
                f"capture errors: {capture.errors if capture else []}\n"
                f"stderr:\n{self.stderr()}")

    # -- life cycle -------------------------------------------------------------------------

    @property
    def pid(self) -> int:
        assert self._proc is not None
        return self._proc.pid

    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self) -> SnpdDaemon:
        """Start the daemon and wait (bounded) for READY=1."""
        assert self.capture is not None and self._proc is None
        env = {k: v for k, v in os.environ.items() if k not in _SCRUBBED}
        env.update({
            "DBUS_SYSTEM_BUS_ADDRESS": self.bus_address,
            "NOTIFY_SOCKET": str(self.capture.notify_path),
            "SNPD_JOURNAL_SOCKET": str(self.capture.journal_path),
            "PYTHONDONTWRITEBYTECODE": "1",
        })
        env.update(self._extra_env)
        self._stderr = open(self.stderr_path, "wb")  # noqa: SIM115
        self._proc = subprocess.Popen(
            ["setpriv", f"--reuid={self.uid}", f"--regid={self.gid}", "--init-groups",
             sys.executable, "-m", "snpd.cli.daemon", "--config", str(self.config_path),
             "--log-target", "journal"],
            stdin=subprocess.DEVNULL, stdout=self._stderr, stderr=self._stderr, env=env,
            cwd="/")
        capture = self.capture
        proc = self._proc

        def reap() -> None:
            proc.wait()
            capture.mark_exit()

        self._waiter = threading.Thread(target=reap, name="snpd-reaper", daemon=True)
        self._waiter.start()
        try:
            index = self.wait_notify("READY", "1")
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n{self.diagnostics()}") from None
        self.ready = dict(self.capture.notify[index])
        self.socket_stat = os.stat(self.socket_path)
        if self.socket_mode is not None:
            # The daemon binds its socket 0660 snpd:snpd; in production the socket unit
            # (SocketGroup=, SocketMode=) decides who may connect. Opening it lets
            # every test user connect, so that the daemon's own check is what is tested.
            os.chmod(self.socket_path, self.socket_mode)
        return self

    def wait_notify(self, key: str, value: Optional[str] = None, start: int = 0) -> int:
        """Index of the first notify message (from ``start``) carrying ``key`` (=``value``)."""
        assert self.capture is not None
        capture = self.capture
        return capture.wait(lambda: _plus_one(capture.notify_index(key, value, start)),
                            f"{key}={value or '*'} on NOTIFY_SOCKET (from #{start})",
                            until_exit="notify") - 1

    def wait_journal(self, predicate: Callable[[Dict[str, str]], bool], what: str
                     ) -> Dict[str, str]:
        """The first journal record ``predicate`` accepts."""
        assert self.capture is not None
        capture = self.capture

        def find() -> Optional[Dict[str, str]]:
            return next((r for r in capture.journal if predicate(r)), None)

        return capture.wait(find, f"a journal record: {what}", until_exit="journal")

    def send_signal(self, sig: int) -> None:
        assert self._proc is not None
        self._proc.send_signal(sig)

    def stop(self, expect_status: Optional[int] = 0) -> int:
        """SIGTERM; wait (bounded) for the exit; check that STOPPING=1 came and (unless
        ``expect_status`` is None) the exit status. Returns the exit status."""
        assert self._proc is not None and self.capture is not None
        start = len(self.capture.notify)
        if self._proc.poll() is None:
            self._proc.send_signal(signal.SIGTERM)
        try:
            status = self._proc.wait(timeout=DEADLINE)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"snpd did not exit on SIGTERM\n{self.diagnostics()}"
                                 ) from None
        capture = self.capture
        capture.wait(lambda: capture.exited["notify"], "the exit barrier on NOTIFY_SOCKET")
        if capture.notify_index("STOPPING", "1", start) is None:
            raise AssertionError(f"no STOPPING=1 after SIGTERM\n{self.diagnostics()}")
        if expect_status is not None and status != expect_status:
            raise AssertionError(f"snpd exited with {status}, not {expect_status}\n"
                                 f"{self.diagnostics()}")
        return status

    def wait_exit(self) -> int:
        """Wait (bounded) for a daemon that stops by itself; its exit status."""
        assert self._proc is not None
        try:
            return self._proc.wait(timeout=DEADLINE)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"snpd did not exit\n{self.diagnostics()}") from None

    def close(self) -> None:
        """Kill the daemon if it still runs; close sockets and files; remove the files."""
        if self._proc is not None:
            if self._proc.poll() is None:
                self._proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._proc.wait(timeout=DEADLINE)
        if self._waiter is not None:
            self._waiter.join(DEADLINE)
        if self.capture is not None:
            self.capture.close()
        if self._stderr is not None:
            self._stderr.close()
            self._stderr = None
        shutil.rmtree(self.directory, ignore_errors=True)

    # -- secrets -----------------------------------------------------------------------------

    def find_leaks(self, secrets: Mapping[str, bytes]) -> List[str]:
        """Where any secret (name -> bytes) appears, as hex (either case) or base64
        (with or without padding), in the journal records or the daemon's stderr."""
        assert self.capture is not None
        with self.capture.cond:
            sources = [(f"journal record #{i}", raw.decode("utf-8", "replace"))
                       for i, raw in enumerate(self.capture.journal_raw)]
        sources.append(("stderr", self.stderr()))
        everything = "\n".join(text for _, text in sources)  # one search per needle
        found = []
        for name, secret in secrets.items():
            for form, needle in secret_forms(secret).items():
                if needle in everything:
                    found += [f"{name} ({form}) in {where}" for where, text in sources
                              if needle in text]
        return found


class Launcher:
    """Starts daemons, each on its own private bus with the shipped policy (only one
    connection may own org.snpd.Snpd1 per bus); stops them at teardown (SIGTERM:
    STOPPING=1, exit 0), searches their complete logs for secrets, and removes
    everything."""

    def __init__(self, template: EmulatorTemplate, kds: EmulatedKds) -> None:
        self.template = template
        self.kds = kds
        self.started: List[Tuple[SnpdDaemon, PrivateBus]] = []

    def start(self, config: Optional[Mapping[str, Mapping[str, Any]]] = None,
              env: Optional[Mapping[str, str]] = None) -> SnpdDaemon:
        bus = PrivateBus.shipped()
        try:
            daemon = SnpdDaemon(bus.address, self.template, self.kds.url, config=config,
                                env=env)
        except BaseException:
            bus.close()
            raise
        self.started.append((daemon, bus))
        return daemon.start()

    def close(self, secrets_of: Optional[Callable[[SnpdDaemon], Mapping[str, bytes]]] = None,
              *, expect_running: bool = False) -> None:
        """``secrets_of(daemon)``: what must not be in that daemon's logs (the chip ID is
        always added). ``expect_running``: a daemon that has exited is a failure."""
        problems = []
        for daemon, bus in reversed(self.started):
            try:
                if daemon.running():
                    daemon.stop()
                elif expect_running:
                    problems.append(f"snpd had exited:\n{daemon.diagnostics()}")
                if secrets_of is not None:
                    problems += daemon.find_leaks({**secrets_of(daemon),
                                                   "chip ID": self.template.chip_id})
            except AssertionError as exc:
                problems.append(str(exc))
            finally:
                daemon.close()
                bus.close()
        self.started.clear()
        assert not problems, "\n".join(problems)


def _plus_one(index: Optional[int]) -> Optional[int]:
    return None if index is None else index + 1


def secret_forms(secret: bytes) -> Dict[str, str]:
    """The spellings under which a secret could leak into a text log."""
    b64 = base64.b64encode(secret).decode()
    return {"hex": secret.hex(), "HEX": secret.hex().upper(), "base64": b64.rstrip("="),
            "urlsafe base64": base64.urlsafe_b64encode(secret).decode().rstrip("="),
            "python repr": repr(secret)[2:-1]}


# -- varlink clients ----------------------------------------------------------------------------


def varlink_calls(socket_path: str, calls: Sequence[Mapping[str, Any]]) -> List[Dict[str, Any]]:
    """Make ``calls`` (``{"method": "iface.Member", "parameters": {...}}``) with the
    independent ``varlink`` package, one connection per interface, from this process.
    Each outcome: ``{"ok": True, "parameters": ...}`` or ``{"ok": False, "error":
    name, "parameters": ...}``."""
    import varlink

    out: List[Dict[str, Any]] = []
    with varlink.Client(address=f"unix:{socket_path}") as client:
        handles: Dict[str, Any] = {}
        try:
            for call in calls:
                interface, _, member = str(call["method"]).rpartition(".")
                if interface not in handles:
                    handles[interface] = client.open(interface)
                try:
                    reply = getattr(handles[interface], member)(**call.get("parameters", {}))
                    out.append({"ok": True, "parameters": reply})
                except varlink.VarlinkError as exc:
                    out.append({"ok": False, "error": exc.error(),
                                "parameters": exc.parameters()})
        finally:
            for handle in handles.values():
                handle.close()
    return out


def varlink_calls_as(user: str, socket_path: str, calls: Sequence[Mapping[str, Any]]
                     ) -> List[Dict[str, Any]]:
    """:func:`varlink_calls` in a child process that becomes ``user`` (uid, gid and
    login groups) after importing and before connecting."""
    result: List[Dict[str, Any]] = run_json(
        [sys.executable, str(Path(__file__).resolve()), "varlink-call", "--socket",
         socket_path, "--as-user", user], list(calls), f"varlink-call as {user}")
    return result


def raw_varlink(socket_path: str, payload: bytes, *, replies: int = 1) -> List[Dict[str, Any]]:
    """Send ``payload`` as is; read up to ``replies`` NUL-terminated replies, or until
    the daemon closes the connection. A send the daemon cut short (it may close
    once it has seen enough) is not an error: its reply is still read."""
    out: List[Dict[str, Any]] = []
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(DEADLINE)
        sock.connect(socket_path)
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            sock.sendall(payload)
        buffer = b""
        while len(out) < replies:
            try:
                chunk = sock.recv(1 << 16)
            except ConnectionResetError:
                chunk = b""
            if not chunk:
                break
            buffer += chunk
            while b"\0" in buffer and len(out) < replies:
                message, _, buffer = buffer.partition(b"\0")
                out.append(json.loads(message))
    return out


def connection_closed(socket_path: str, payload: bytes) -> bool:
    """True if the daemon closes the connection after answering ``payload``."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(DEADLINE)
        sock.connect(socket_path)
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            sock.sendall(payload)
        data = b""
        while True:
            try:
                chunk = sock.recv(1 << 16)
            except ConnectionResetError:
                return True
            if not chunk:
                return True
            data += chunk
            if data.count(b"\0") > 1:
                return False  # a second reply: the connection is still served


# -- the script: varlink calls as another user ------------------------------------------------


def _to_json(value: Any) -> Any:
    if isinstance(value, (bytes, bytearray)):
        return {"$bytes": bytes(value).hex()}
    if isinstance(value, (list, tuple)):
        return [_to_json(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _to_json(v) for k, v in value.items()}
    return value


def _from_json(value: Any) -> Any:
    if isinstance(value, list):
        return [_from_json(v) for v in value]
    if isinstance(value, dict):
        if set(value) == {"$bytes"}:
            return bytes.fromhex(value["$bytes"])
        return {k: _from_json(v) for k, v in value.items()}
    return value


def snpd_client_call(op: str, *args: Any, socket_path: Optional[str] = None,
                     bus: Optional[str] = None, user: Optional[str] = None) -> Any:
    """``SnpdClient(socket=..., bus=...).<op>(*args)`` in a child process (as ``user``, or
    root), as an application would use it. Returns the result (bytes and tuples as
    bytes and lists), or raises AssertionError with the error the client raised."""
    argv = [sys.executable, str(Path(__file__).resolve()), "snpd-client", "--op", op]
    if socket_path is not None:
        argv += ["--socket", socket_path]
    if bus is not None:
        argv += ["--bus", bus]
    if user is not None:
        argv += ["--as-user", user]
    out = run_json(argv, _to_json(list(args)), f"SnpdClient.{op}")
    if "error" in out:
        raise AssertionError(f"SnpdClient.{op}: {out['error']}")
    return _from_json(out["result"])


def _snpd_client(args: Any) -> int:
    from snpd.client import SnpdClient

    params = _from_json(json.load(sys.stdin))
    if args.as_user:
        drop_privileges(args.as_user)
    try:
        with SnpdClient(socket=args.socket, bus=args.bus, timeout=DEADLINE) as client:
            transport = "varlink" if args.socket else "dbus"
            if client.transport != transport:
                raise AssertionError(f"SnpdClient chose {client.transport}, not {transport}")
            result = getattr(client, args.op)(*params)
    except Exception as exc:  # reported to the test, which decides
        print(json.dumps({"error": f"{type(exc).__name__}: {exc}"}))
        return 0
    print(json.dumps({"result": _to_json(result)}))
    return 0


def main(argv: Iterable[str]) -> int:
    import argparse

    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=["varlink-call", "snpd-client"])
    parser.add_argument("--socket")
    parser.add_argument("--bus")
    parser.add_argument("--op")
    parser.add_argument("--as-user")
    args = parser.parse_args(list(argv))
    if args.mode == "snpd-client":
        return _snpd_client(args)
    calls = json.load(sys.stdin)
    import varlink  # noqa: F401  # import before dropping privileges

    if args.as_user:
        drop_privileges(args.as_user)
    print(json.dumps(varlink_calls(args.socket, calls)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
