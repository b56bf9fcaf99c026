"""A real private system-like dbus-daemon for integration tests, and what goes with it.

- :func:`ensure_test_accounts` creates (idempotently, as root) the daemon user
  ``snpd``, the groups ``snpd-users`` and ``snpd-keys``, and three test users: one
  in each group and one in neither. scripts/test does the same before its
  integration stage.
- :class:`PrivateBus` (tests/harness/bus.py) runs ``dbus-daemon`` from the
  configuration template of docs/reference/stack.md §5.1 (the stock system-bus default
  policy) with a ``system.d/`` holding a copy of the shipped
  ``conf/dbus/org.snpd.Snpd1.conf``, so the policy under test is the file that
  ships (``PrivateBus.shipped()``, ``shipped(permissive=True)``).
- :class:`PeerProcess` runs ``dbus_peer.py serve`` (a fake Service behind the real
  transport, :mod:`snpd.dbus.service`) as user ``snpd``; :func:`calls_as` runs
  ``dbus_peer.py call`` as any test user. Both start as root, import everything,
  then drop privileges before they connect (the interpreter may live where other
  users cannot read it).
- :func:`dbus_calls` is the in-process dbus-fast client; :func:`busctl` the
  independent one.
- :func:`introspection_diff` compares two introspection XML documents by meaning.

Values cross process boundaries as JSON with ``{"$bytes": hex}`` and
``{"$v": [signature, value]}`` for bytes and Variants (:func:`to_json`,
:func:`from_json`).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import grp
import json
import os
import pwd
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any, Dict, FrozenSet, List, Mapping, Optional, Sequence, Tuple

REPO_ROOT = Path(__file__).resolve().parents[2]
if str(REPO_ROOT) not in sys.path:  # run as a script (dbus_peer.py, daemonproc.py)
    sys.path.append(str(REPO_ROOT))

# The bus itself and the process rules are the harness's, shared with the unit tests
# and bench/; they are re-exported here for the tests that import them from dbusbus.
from tests.harness.bus import BUS_CONF_TEMPLATE as BUS_CONF_TEMPLATE  # noqa: E402
from tests.harness.bus import PERMISSIVE_POLICY as PERMISSIVE_POLICY  # noqa: E402
from tests.harness.bus import SHIPPED_POLICY as SHIPPED_POLICY  # noqa: E402
from tests.harness.bus import PrivateBus as PrivateBus  # noqa: E402
from tests.harness.proc import DEADLINE as DEADLINE  # noqa: E402
from tests.harness.proc import readline  # noqa: E402
from tests.harness.proc import stop_process as stop_process  # noqa: E402

PEER_SCRIPT = Path(__file__).resolve().parent / "dbus_peer.py"
BUS_NAME = "org.snpd.Snpd1"
OBJECT_PATH = "/org/snpd/Snpd1"
ATTESTATION = "org.snpd.Snpd1.Attestation"
KEYS = "org.snpd.Snpd1.Keys"
MANAGER = "org.snpd.Snpd1.Manager"
ACCESS_DENIED = "org.freedesktop.DBus.Error.AccessDenied"

DAEMON_USER = "snpd"
REPORT_GROUP = "snpd-users"
KEY_GROUP = "snpd-keys"
# test user -> the one snpd group it is in (None: neither)
TEST_USERS: Mapping[str, Optional[str]] = {
    "snpd-test-user": REPORT_GROUP,
    "snpd-test-keys": KEY_GROUP,
    "snpd-test-outsider": None,
}

# -- accounts --------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Account:
    name: str
    uid: int
    gid: int
    groups: FrozenSet[int]  # as a login would have them (initgroups)


@dataclasses.dataclass(frozen=True)
class Accounts:
    daemon: Account
    user: Account
    keys: Account
    outsider: Account
    report_gid: int
    key_gid: int


def _run(*argv: str) -> None:
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def _ensure_group(name: str) -> None:
    try:
        grp.getgrnam(name)
    except KeyError:
        _run("groupadd", "--system", name)


def _ensure_user(name: str, home: str) -> None:
    try:
        pwd.getpwnam(name)
    except KeyError:
        _run("useradd", "--system", "--user-group", "--no-create-home", "--home-dir", home,
             "--shell", "/usr/sbin/nologin", name)


def _set_member(user: str, group: str, member: bool) -> None:
    if (user in grp.getgrnam(group).gr_mem) == member:
        return
    _run("gpasswd", "--add" if member else "--delete", user, group)


def _account(name: str) -> Account:
    pw = pwd.getpwnam(name)
    return Account(name, pw.pw_uid, pw.pw_gid, frozenset(os.getgrouplist(name, pw.pw_gid)))


def ensure_test_accounts() -> Accounts:
    """Create the daemon user, the snpd groups and the test users, and put each test
    user in exactly its group. Idempotent; needs root. Mirrors scripts/test's
    ensure_test_accounts (keep the two in step)."""
    if os.geteuid() != 0:
        raise PermissionError("creating the test accounts needs root")
    for name in (REPORT_GROUP, KEY_GROUP):
        _ensure_group(name)
    _ensure_user(DAEMON_USER, "/var/lib/snpd")
    for user, member_of in TEST_USERS.items():
        _ensure_user(user, "/nonexistent")
        for candidate in (REPORT_GROUP, KEY_GROUP):
            _set_member(user, candidate, candidate == member_of)
    return Accounts(
        daemon=_account(DAEMON_USER),
        user=_account("snpd-test-user"),
        keys=_account("snpd-test-keys"),
        outsider=_account("snpd-test-outsider"),
        report_gid=grp.getgrnam(REPORT_GROUP).gr_gid,
        key_gid=grp.getgrnam(KEY_GROUP).gr_gid,
    )


# -- processes -------------------------------------------------------------------------------


def drop_privileges(user: str) -> None:
    """Become ``user`` (uid, gid and its groups) for good, or exit."""
    pw = pwd.getpwnam(user)
    os.chdir("/")
    os.initgroups(user, pw.pw_gid)
    os.setgid(pw.pw_gid)
    os.setuid(pw.pw_uid)
    if os.getuid() != pw.pw_uid or os.geteuid() != pw.pw_uid:
        raise SystemExit(f"could not become {user}")


# -- peers: the daemon side and clients as other users ----------------------------------------


class PeerProcess:
    """``dbus_peer.py serve``: the real transport around a fake Service, as ``user``.
    ``ready`` holds the server's unique name, or None when it failed to start, with
    the reason in ``failure``."""

    def __init__(self, address: str, user: str, accounts: Accounts, *,
                 address_from_env: bool = False) -> None:
        self.stderr_path = Path(tempfile.mkstemp(prefix="snpd-peer-", suffix=".log")[1])
        self._stderr = open(self.stderr_path, "wb")  # noqa: SIM115
        env = dict(os.environ)
        env.pop("DBUS_SYSTEM_BUS_ADDRESS", None)
        if address_from_env:  # serve(service, None) must find the bus through the environment
            env["DBUS_SYSTEM_BUS_ADDRESS"] = address
        self._proc = subprocess.Popen(
            [sys.executable, str(PEER_SCRIPT), "serve", "--as-user", user,
             "--address", "" if address_from_env else address,
             "--report-gid", str(accounts.report_gid), "--key-gid", str(accounts.key_gid)],
            stdout=subprocess.PIPE, stderr=self._stderr, stdin=subprocess.DEVNULL,
            cwd=str(REPO_ROOT), env=env)
        assert self._proc.stdout is not None
        line = readline(self._proc.stdout, DEADLINE)
        self.ready: Optional[str] = line.split()[1] if line.startswith("READY ") else None
        self.failure = "" if self.ready else line or "no output"

    def stderr(self) -> str:
        self._stderr.flush()
        return self.stderr_path.read_text(errors="replace")

    def close(self) -> int:
        """SIGTERM (unless it failed to start and is exiting by itself), wait; the exit
        status (0 after a clean shutdown)."""
        if self.ready is None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._proc.wait(timeout=DEADLINE)
        status = stop_process(self._proc)
        self._stderr.close()
        self.stderr_path.unlink(missing_ok=True)
        return status


@dataclasses.dataclass(frozen=True)
class Reply:
    """A method return (``error`` empty) or a D-Bus error."""

    body: List[Any]
    error: str = ""
    text: str = ""

    @property
    def ok(self) -> bool:
        return not self.error

    @property
    def value(self) -> Any:
        assert self.ok, f"expected a return, got {self.error}: {self.text}"
        return self.body[0] if len(self.body) == 1 else self.body


# A call: (interface, member, signature, body[, destination]).
Call = Tuple[Any, ...]


def run_json(argv: Sequence[str], payload: Any, what: str, timeout: float = DEADLINE) -> Any:
    """Run a child client of these tests (``payload`` as JSON on its stdin) and return
    the JSON it prints; a child that fails or prints no JSON is a test failure."""
    proc = subprocess.run(list(argv), input=json.dumps(payload).encode(), capture_output=True,
                          cwd=str(REPO_ROOT), timeout=timeout, check=False)
    try:
        if proc.returncode == 0:
            return json.loads(proc.stdout)
    except ValueError:
        pass
    raise AssertionError(f"{what} failed ({proc.returncode}): "
                         f"{proc.stderr.decode(errors='replace')[-2000:]}")


def calls_as(user: str, address: str, calls: Sequence[Call]) -> List[Reply]:
    """Make ``calls`` on one connection opened as ``user`` (uid, primary gid and
    supplementary groups set before connecting), in a child process."""
    out = run_json([sys.executable, str(PEER_SCRIPT), "call", "--address", address,
                    "--as-user", user], [to_json(list(c)) for c in calls],
                   f"dbus_peer call as {user}")
    return [Reply(**from_json(r)) for r in out]


async def call_on(bus: Any, calls: Sequence[Call]) -> List[Reply]:
    """Make ``calls`` one after another on a connected dbus-fast bus."""
    from dbus_fast import Message, MessageType

    replies = []
    for interface, member, signature, body, *rest in calls:
        destination = rest[0] if rest else BUS_NAME
        msg = await asyncio.wait_for(bus.call(Message(
            destination=destination, path=OBJECT_PATH, interface=interface or None,
            member=member, signature=signature, body=list(body))), DEADLINE)
        if msg.message_type is MessageType.ERROR:
            replies.append(Reply(list(msg.body), msg.error_name or "?",
                                 str(msg.body[0]) if msg.body else ""))
        else:
            replies.append(Reply(list(msg.body)))
    return replies


async def connect(address: str) -> Any:
    from dbus_fast.aio import MessageBus

    return await asyncio.wait_for(MessageBus(bus_address=address).connect(), DEADLINE)


async def disconnect(bus: Any) -> None:
    from snpd.client import _release_transport

    bus.disconnect()
    await bus.wait_for_disconnect()
    # dbus-fast 2.x (Debian 13's 2.44) closes the socket but not the file object
    # it made from it; snpd's client closes both, and so must this one.
    _release_transport(bus)


def dbus_calls(address: str, calls: Sequence[Call]) -> List[Reply]:
    """``calls`` from this (root) process with dbus-fast, on one connection."""

    async def run() -> List[Reply]:
        bus = await connect(address)
        try:
            return await call_on(bus, calls)
        finally:
            await disconnect(bus)

    return asyncio.run(run())


def busctl(address: str, *args: str, user: Optional[str] = None
           ) -> subprocess.CompletedProcess[str]:
    """``busctl --address=ADDRESS ARGS`` (systemd's client), as root or as ``user``."""
    extra: Dict[str, Any] = {}
    if user is not None:
        pw = pwd.getpwnam(user)
        extra = {"user": pw.pw_uid, "group": pw.pw_gid,
                 "extra_groups": os.getgrouplist(user, pw.pw_gid)}
    return subprocess.run(["busctl", f"--address={address}", *args], capture_output=True,
                          text=True, timeout=DEADLINE, check=False, cwd="/", **extra)


# -- JSON across processes -------------------------------------------------------------------


def to_json(value: Any) -> Any:
    from dbus_fast import Variant

    if isinstance(value, Variant):
        return {"$v": [value.signature, to_json(value.value)]}
    if isinstance(value, (bytes, bytearray)):
        return {"$bytes": bytes(value).hex()}
    if isinstance(value, (list, tuple)):
        return [to_json(v) for v in value]
    if isinstance(value, dict):
        return {"$dict": [[to_json(k), to_json(v)] for k, v in value.items()]}
    return value


def from_json(value: Any) -> Any:
    from dbus_fast import Variant

    if isinstance(value, list):
        return [from_json(v) for v in value]
    if isinstance(value, dict):
        if "$v" in value:
            sig, inner = value["$v"]
            return Variant(sig, from_json(inner))
        if "$bytes" in value:
            return bytes.fromhex(value["$bytes"])
        if "$dict" in value:
            return {from_json(k): from_json(v) for k, v in value["$dict"]}
        return {k: from_json(v) for k, v in value.items()}
    return value


# -- introspection, compared by meaning ------------------------------------------------------


def _annotations(element: ET.Element) -> Tuple[Tuple[str, str], ...]:
    return tuple(sorted((a.get("name", ""), a.get("value", ""))
                        for a in element.findall("annotation")))


def introspection_model(xml_text: str, prefix: str = "org.snpd.") -> Dict[str, Any]:
    """Interfaces under ``prefix`` as comparable data: per member its kind, ordered
    arguments (name, type, direction), property type and access, and annotations.
    Comments, doc elements, whitespace and order of members do not count."""
    root = ET.fromstring(xml_text)
    model: Dict[str, Any] = {}
    for iface in root.findall("interface"):
        name = iface.get("name", "")
        if not name.startswith(prefix):
            continue
        members: Dict[Tuple[str, str], Any] = {}
        for m in iface.findall("method"):
            members[("method", m.get("name", ""))] = (
                tuple((a.get("name"), a.get("type"), a.get("direction", "in"))
                      for a in m.findall("arg")), _annotations(m))
        for s in iface.findall("signal"):
            members[("signal", s.get("name", ""))] = (
                tuple((a.get("name"), a.get("type")) for a in s.findall("arg")),
                _annotations(s))
        for p in iface.findall("property"):
            members[("property", p.get("name", ""))] = (
                p.get("type"), p.get("access"), _annotations(p))
        model[name] = {"annotations": _annotations(iface), "members": members}
    return model


def introspection_diff(expected_xml: str, live_xml: str, prefix: str = "org.snpd.") -> List[str]:
    """Every difference between two introspection documents, one line each (empty:
    they describe the same API)."""
    expected = introspection_model(expected_xml, prefix)
    live = introspection_model(live_xml, prefix)
    out = [f"interface {n}: missing from the live object"
           for n in sorted(set(expected) - set(live))]
    out += [f"interface {n}: live only" for n in sorted(set(live) - set(expected))]
    for name in sorted(set(expected) & set(live)):
        want, have = expected[name], live[name]
        if want["annotations"] != have["annotations"]:
            out.append(f"{name}: annotations {want['annotations']} != {have['annotations']}")
        for key in sorted(set(want["members"]) | set(have["members"])):
            w, h = want["members"].get(key), have["members"].get(key)
            if w != h:
                out.append(f"{name} {key[0]} {key[1]}: checked-in {w} != live {h}")
    return out
