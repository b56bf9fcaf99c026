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
- ``Type=notify`` and journald: the harness's :class:`DaemonProcess`
  (tests/harness/daemon.py, shared with the unit tests and bench/) binds a
  ``NOTIFY_SOCKET`` and a journal socket; :meth:`SnpdDaemon.start` waits
  (bounded) for ``READY=1``.
- the system bus: a :class:`PrivateBus` (tests/harness/bus.py) loading the shipped policy,
  given as ``DBUS_SYSTEM_BUS_ADDRESS``.
- AMD's KDS: ``snpd-emu kds`` serving the template emulator's chain, VCEK and
  CRL on 127.0.0.1 (:class:`EmulatedKds`).

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
import re
import select
import shutil
import socket
import subprocess
import sys
import tempfile
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
)

from dbusbus import (  # type: ignore[import-not-found]
    DEADLINE,
    REPO_ROOT,
    PrivateBus,
    drop_privileges,
    run_json,
    stop_process,
)

# dbusbus put the repository root on sys.path. The notify and journal capture is the
# harness's; its names are re-exported here for the tests that import them from here.
from tests.harness.daemon import EXIT_BARRIER as EXIT_BARRIER
from tests.harness.daemon import Capture as Capture
from tests.harness.daemon import DaemonProcess
from tests.harness.daemon import parse_journal as parse_journal
from tests.harness.daemon import parse_notify as parse_notify

DAEMON_USER = "snpd"
VARLINK_SOCKET_NAME = "snpd.varlink"


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


class SnpdDaemon(DaemonProcess):
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
        self.bus_address = bus_address
        directory = Path(tempfile.mkdtemp(prefix="snpd-daemon-"))
        try:
            directory.chmod(0o755)  # test users reach the socket through it
            super().__init__(directory / "snpd.toml", directory, user=DAEMON_USER,
                             journal=True, cwd=Path("/"),
                             env={"DBUS_SYSTEM_BUS_ADDRESS": bus_address,
                                  "PYTHONDONTWRITEBYTECODE": "1", **(env or {})})
        except BaseException:
            shutil.rmtree(directory, ignore_errors=True)
            raise
        self.runtime_dir = directory / "run"
        self.state_dir = directory / "lib"
        self.cache_dir = directory / "cache"
        self.emulator_dir = self.state_dir / "emulator"
        self.socket_path = self.runtime_dir / VARLINK_SOCKET_NAME
        self.socket_mode = socket_mode
        self.socket_stat: Optional[os.stat_result] = None
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
        return self.log()

    # -- life cycle -------------------------------------------------------------------------

    def start(self, timeout: float = DEADLINE) -> SnpdDaemon:
        """Start the daemon and wait (bounded) for READY=1."""
        super().start(timeout)
        self.socket_stat = os.stat(self.socket_path)
        if self.socket_mode is not None:
            # The daemon binds its socket 0660 snpd:snpd; in production the socket unit
            # (SocketGroup=, SocketMode=) decides who may connect. Opening it lets
            # every test user connect, so that the daemon's own check is what is tested.
            os.chmod(self.socket_path, self.socket_mode)
        return self

    def stop(self, expect_status: Optional[int] = 0) -> int:
        """SIGTERM; wait (bounded) for the exit; check that STOPPING=1 came and (unless
        ``expect_status`` is None) the exit status. Returns the exit status."""
        assert self._proc is not None
        start = len(self.capture.notify)
        status = self.terminate(DEADLINE)
        if self.killed:
            raise AssertionError(f"snpd did not exit on SIGTERM\n{self.diagnostics()}")
        capture = self.capture
        capture.wait(lambda: capture.exited["notify"], "the exit barrier on NOTIFY_SOCKET")
        if capture.notify_index("STOPPING", "1", start) is None:
            raise AssertionError(f"no STOPPING=1 after SIGTERM\n{self.diagnostics()}")
        if expect_status is not None and status != expect_status:
            raise AssertionError(f"snpd exited with {status}, not {expect_status}\n"
                                 f"{self.diagnostics()}")
        return status

    def close(self) -> None:
        """Kill the daemon if it still runs; close sockets and files; remove the files."""
        super().close()
        shutil.rmtree(self.directory, ignore_errors=True)

    # -- secrets -----------------------------------------------------------------------------

    def find_leaks(self, secrets: Mapping[str, bytes]) -> List[str]:
        """Where any secret (name -> bytes) appears, as hex (either case) or base64
        (with or without padding), in the journal records or the daemon's stderr."""
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
              env: Optional[Mapping[str, str]] = None,
              before: Optional[Callable[[SnpdDaemon], None]] = None) -> SnpdDaemon:
        """``before(daemon)`` runs once its directories exist, before it starts (to
        start what it connects to: the emulated Azure paravisor, say)."""
        bus = PrivateBus.shipped()
        try:
            daemon = SnpdDaemon(bus.address, self.template, self.kds.url, config=config,
                                env=env)
        except BaseException:
            bus.close()
            raise
        self.started.append((daemon, bus))
        if before is not None:
            before(daemon)
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
