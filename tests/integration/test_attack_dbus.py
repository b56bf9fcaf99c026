"""Attacks on the D-Bus side by local users (issue 10), against the real daemon on a
private bus with the shipped policy, from real unprivileged uids.

Each attack is followed by the same health check: the daemon runs, owns
org.snpd.Snpd1, answers a member's GetReport within the client's timeout, and its
peak RSS (VmHWM) is under the unit's MemoryMax. Figures are printed (``-s``); no
test asserts a duration.

- every header-flag combination, to every interface, from an outsider, a member,
  a keys member and root, written byte by byte (rawbus.py) and sent by busctl:
  dbus-fast 1.84 (Debian 12) tore its connection down on flags 3, 5, 6 and 7;
- oversized messages: dbus-fast alone reads and unpacks up to the bus's 32 MiB;
- a flood of cheap calls and a flood of service calls by one user while others
  are served;
- a keys member reproducing other users' sealing keys from DeriveKey.
"""

from __future__ import annotations

import json
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import pytest
from daemonproc import EmulatedKds, EmulatorTemplate, Launcher, SnpdDaemon
from dbusbus import busctl, run_json

pytestmark = pytest.mark.integration

RAWBUS = Path(__file__).with_name("rawbus.py")
BUS_NAME = "org.snpd.Snpd1"
PATH = "/org/snpd/Snpd1"
ATT = "org.snpd.Snpd1.Attestation"
KEYS = "org.snpd.Snpd1.Keys"
MANAGER = "org.snpd.Snpd1.Manager"
MEMORY_MAX = 256 << 20  # systemd/snpd.service MemoryMax=256M
OWN_VMPL = 0xFFFFFFFF
ACCESS_DENIED = "org.freedesktop.DBus.Error.AccessDenied"
LIMITS_EXCEEDED = "org.freedesktop.DBus.Error.LimitsExceeded"
BUSY = "org.snpd.Snpd1.Error.Busy"
MEMBER, KEYS_MEMBER, OUTSIDER, ROOT = ("snpd-test-user", "snpd-test-keys",
                                       "snpd-test-outsider", None)

# (interface, member, signature, args)
CALLS: List[Tuple[str, str, str, List[Any]]] = [
    ("org.freedesktop.DBus.Peer", "Ping", "", []),
    ("org.freedesktop.DBus.Peer", "GetMachineId", "", []),
    ("org.freedesktop.DBus.Introspectable", "Introspect", "", []),
    ("org.freedesktop.DBus.Properties", "Get", "ss", [ATT, "State"]),
    ("org.freedesktop.DBus.Properties", "GetAll", "s", [ATT]),
    (ATT, "GetReport", "ayua{sv}", ["00" * 16, OWN_VMPL]),
    (KEYS, "DeriveSealingKey", "sasa{sv}", ["attack", []]),
    (KEYS, "DeriveKey", "sasuuta{sv}", ["vcek", ["measurement"], OWN_VMPL, 0, 0]),
    (MANAGER, "RefreshCertificates", "", []),
]
_CHEAP = {"Ping", "GetMachineId", "Introspect", "Get", "GetAll"}
PERMISSION_DENIED = "org.snpd.Snpd1.Error.PermissionDenied"


def expected(user: Optional[str], member: str) -> str:
    """What each caller gets (the access table of README/DESIGN, outsiders shut out
    entirely by the bus policy): "return" or an error name."""
    if user is ROOT:
        return "return"
    if user == OUTSIDER:
        return ACCESS_DENIED
    if member in _CHEAP:
        return "return"
    if user == MEMBER:
        return {"GetReport": "return", "DeriveSealingKey": "return"}.get(member, ACCESS_DENIED)
    # keys member: the whole Keys interface passes the bus; the daemon refuses sealing
    # keys to anyone outside the report groups.
    return {"DeriveKey": "return", "DeriveSealingKey": PERMISSION_DENIED}.get(member,
                                                                            ACCESS_DENIED)


def raw(daemon: SnpdDaemon, user: Optional[str], calls: Sequence[Dict[str, Any]], *,
        connections: int = 1) -> List[Dict[str, Any]]:
    argv = [sys.executable, str(RAWBUS), "--address", daemon.bus_address,
            "--connections", str(connections)]
    if user is not None:
        argv += ["--as-user", user]
    replies: List[Dict[str, Any]] = run_json(argv, list(calls), "rawbus.py", timeout=120)
    return replies


def call(interface: str, member: str, signature: str = "", args: Sequence[Any] = (),
         flags: int = 0, pad: int = 0) -> Dict[str, Any]:
    return {"destination": BUS_NAME, "path": PATH, "interface": interface, "member": member,
            "signature": signature, "args": list(args), "flags": flags, "pad": pad}


def background(argv: Sequence[str], calls: Sequence[Dict[str, Any]]
               ) -> subprocess.Popen[str]:
    """rawbus.py running on its own while the test goes on (its calls from a file)."""
    with tempfile.TemporaryFile("w+") as stdin:
        json.dump(list(calls), stdin)
        stdin.seek(0)
        return subprocess.Popen(argv, stdin=stdin, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)


def peak_rss(daemon: SnpdDaemon) -> int:
    status = Path(f"/proc/{daemon.pid}/status").read_text()
    for line in status.splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM")


def member_report_seconds(daemon: SnpdDaemon, user: Optional[str] = MEMBER) -> float:
    """A member's (or root's) GetReport through busctl with a 10 s client timeout."""
    start = time.monotonic()
    result = busctl(daemon.bus_address, "--timeout=10", "call", BUS_NAME, PATH, ATT,
                    "GetReport", "ayua{sv}", "4", "1", "2", "3", "4", str(OWN_VMPL), "0",
                    user=user)
    assert result.returncode == 0, f"GetReport as {user}: {result.stderr}"
    return time.monotonic() - start


def assert_healthy(daemon: SnpdDaemon, what: str) -> Dict[str, Any]:
    assert daemon.running(), f"snpd died after {what}:\n{daemon.diagnostics()}"
    owner = busctl(daemon.bus_address, "call", "org.freedesktop.DBus", "/org/freedesktop/DBus",
                   "org.freedesktop.DBus", "GetNameOwner", "s", BUS_NAME)
    assert owner.returncode == 0, f"{BUS_NAME} has no owner after {what}: {owner.stderr}"
    latency = member_report_seconds(daemon)
    rss = peak_rss(daemon)
    assert rss < MEMORY_MAX, f"peak RSS {rss >> 20} MiB after {what}"
    assert "D-Bus connection ended" not in daemon.stderr()
    return {"attack": what, "peak_rss_mib": round(rss / (1 << 20), 1),
            "victim_s": round(latency, 3)}


@pytest.fixture(scope="module")
def launcher(template: EmulatorTemplate, kds: EmulatedKds) -> Iterator[Launcher]:
    made = Launcher(template, kds)
    try:
        yield made
    finally:
        made.close(expect_running=True)


@pytest.fixture(scope="module")
def daemon(launcher: Launcher) -> SnpdDaemon:
    return launcher.start({"emulator": {"latency": 0.002}})


@pytest.fixture(scope="module")
def figures() -> Iterator[List[Dict[str, Any]]]:
    rows: List[Dict[str, Any]] = []
    yield rows
    print("\nD-Bus attacks:")
    for row in rows:
        print(f"  {row}")


# -- header flags ------------------------------------------------------------------------


@pytest.mark.parametrize("user", [OUTSIDER, MEMBER, KEYS_MEMBER, ROOT],
                         ids=["outsider", "member", "keys-member", "root"])
def test_every_flag_combination_to_every_interface(daemon: SnpdDaemon, user: Optional[str],
                                                   figures: List[Dict[str, Any]]) -> None:
    """NO_REPLY_EXPECTED (1), NO_AUTO_START (2), ALLOW_INTERACTIVE_AUTHORIZATION (4):
    all 8 combinations of each call, written byte by byte; every call that expects a
    reply gets the reply its caller is entitled to."""
    sent = [(flags, iface, member, call(iface, member, sig, args, flags))
            for flags in range(8) for iface, member, sig, args in CALLS]
    # Eight connections keep each one within the per-connection bound.
    replies = raw(daemon, user, [c for *_, c in sent], connections=8)
    wrong = []
    for (flags, iface, member, _), reply in zip(sent, replies):
        want = "none" if flags & 1 else expected(user, member)
        got = reply["type"] if reply["type"] != "error" else reply["error"]
        if got != want:
            wrong.append(f"flags {flags} {iface}.{member}: {got} ({reply.get('text')}), "
                         f"expected {want}")
    assert wrong == []
    figures.append(assert_healthy(daemon, f"72 raw calls, flags 0-7, as {user or 'root'}"))


@pytest.mark.parametrize("user", [OUTSIDER, MEMBER, ROOT], ids=["outsider", "member", "root"])
def test_busctl_with_every_flag_option(daemon: SnpdDaemon, user: Optional[str],
                                       figures: List[Dict[str, Any]]) -> None:
    """What the shipped snpd-kds-refresh.service does (--auto-start=no), and every
    other combination busctl can send."""
    for expect_reply in ("yes", "no"):
        for auto_start in ("yes", "no"):
            for interactive in ("yes", "no"):
                for iface, member, sig, args in (CALLS[0], CALLS[3]):
                    result = busctl(daemon.bus_address, f"--expect-reply={expect_reply}",
                                    f"--auto-start={auto_start}",
                                    f"--allow-interactive-authorization={interactive}",
                                    "call", BUS_NAME, PATH, iface, member, sig,
                                    *[str(a) for a in args], user=user)
                    if expect_reply == "no" or user != OUTSIDER:
                        assert result.returncode == 0, result.stderr
                    else:
                        assert "Access denied" in result.stderr or "AccessDenied" in \
                            result.stderr, result.stderr
    figures.append(assert_healthy(daemon, f"busctl flag options as {user or 'root'}"))


def test_non_ascii_echoed_in_an_error_does_not_cost_the_connection(
        daemon: SnpdDaemon, figures: List[Dict[str, Any]]) -> None:
    """The daemon's error texts quote what the caller sent (an unknown option's name).
    dbus-fast 1.84.2 writes a string's length in characters, not bytes: a non-ASCII
    name made the reply invalid and the bus dropped snpd's connection."""
    for name in ("\u00e9t\u00e9", "\u2026", "\U0001f512key"):
        result = busctl(daemon.bus_address, "call", BUS_NAME, PATH, ATT, "GetReport",
                        "ayua{sv}", "0", str(OWN_VMPL), "1", name, "s", "x", user=MEMBER)
        assert result.returncode != 0 and "unknown option" in result.stderr, result.stderr
    figures.append(assert_healthy(daemon, "non-ASCII option names echoed in errors"))


# -- oversized messages ------------------------------------------------------------------


def test_oversized_messages_are_skipped_unread(daemon: SnpdDaemon,
                                               figures: List[Dict[str, Any]]) -> None:
    """A member sends 15 MiB GetReport calls and 15 MiB Properties.Get calls on three
    connections: each is answered InvalidArgument, the connection is kept, and the
    daemon never holds one."""
    before = peak_rss(daemon)
    big = 15 << 20
    calls = [call(ATT, "GetReport", "ayua{sv}", ["00", OWN_VMPL], pad=big) for _ in range(3)]
    calls += [call("org.freedesktop.DBus.Properties", "Get", "ay", [""], pad=big)
              for _ in range(3)]
    calls += [call(ATT, "GetReport", "ayua{sv}", ["01", OWN_VMPL])]  # still served after
    replies = raw(daemon, MEMBER, calls, connections=3)
    assert [r["error"] for r in replies[:6]] == ["org.snpd.Snpd1.Error.InvalidArgument"] * 6
    assert "at most 65536" in replies[0]["text"]
    assert replies[6]["type"] == "return"
    after = peak_rss(daemon)
    assert after - before < 32 << 20, f"peak RSS grew {(after - before) >> 20} MiB"
    figures.append(assert_healthy(daemon, "6 x 15 MiB messages from a member"))


# -- floods --------------------------------------------------------------------------------


def test_a_flood_of_cheap_calls_is_metered(daemon: SnpdDaemon,
                                           figures: List[Dict[str, Any]]) -> None:
    """A member keeps 400 Properties.GetAll calls in flight on 4 connections while root
    and the keys member are served; beyond its rate the flood is answered
    LimitsExceeded."""
    flood = [call("org.freedesktop.DBus.Properties", "GetAll", "s", [ATT])] * 400
    argv = [sys.executable, str(RAWBUS), "--address", daemon.bus_address, "--connections",
            "4", "--as-user", MEMBER]
    proc = background(argv, flood)
    victim = member_report_seconds(daemon, ROOT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    replies = json.loads(out)
    refused = sum(1 for r in replies if r.get("error") == LIMITS_EXCEEDED)
    served = sum(1 for r in replies if r["type"] == "return")
    assert refused > 0 and served > 0 and refused + served == len(flood)
    row = assert_healthy(daemon, f"400 GetAll in flight ({refused} refused)")
    row["root_s"] = round(victim, 3)
    figures.append(row)


def test_one_user_cannot_take_the_queue(launcher: Launcher,
                                        figures: List[Dict[str, Any]]) -> None:
    """A member pipelines 64 GetReport calls over 8 connections at 20 ms of firmware
    each: beyond its share (queue.per_uid) it gets Busy, while root and the keys
    member are answered."""
    daemon = launcher.start({"emulator": {"latency": 0.02},
                             "queue": {"max_pending": 64, "per_client": 8, "per_uid": 16}})
    flood = [call(ATT, "GetReport", "ayua{sv}", ["02", OWN_VMPL])] * 64
    argv = [sys.executable, str(RAWBUS), "--address", daemon.bus_address, "--connections",
            "8", "--as-user", MEMBER]
    proc = background(argv, flood)
    root_s = member_report_seconds(daemon, ROOT)
    keys = busctl(daemon.bus_address, "--timeout=10", "call", BUS_NAME, PATH, KEYS,
                  "DeriveKey", "sasuuta{sv}", "vcek", "1", "measurement", str(OWN_VMPL), "0",
                  "0", "0", user=KEYS_MEMBER)
    assert keys.returncode == 0, keys.stderr
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    replies = json.loads(out)
    busy = sum(1 for r in replies if r.get("error") == BUSY)
    ok = sum(1 for r in replies if r["type"] == "return")
    assert busy > 0 and ok >= 16 and busy + ok == len(flood), replies
    row = assert_healthy(daemon, f"64 pipelined GetReport by one member ({busy} Busy)")
    row["root_s"] = round(root_s, 3)
    figures.append(row)


# -- sealing keys ----------------------------------------------------------------------------


def _hkdf(root_key: bytes, uid: int, label: str) -> List[bytes]:
    """Every sealing key snpd has derived from ``root_key`` for (uid, label), in any
    version of the construction (v1 and v2)."""
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.kdf.hkdf import HKDF

    out = []
    for version in (1, 2):
        info = f"snpd/v{version}/sealing".encode() + b"\0" + struct.pack("<I", uid) + \
            label.encode()
        salt = f"snpd sealing key v{version}".encode()
        out.append(HKDF(algorithm=hashes.SHA256(), length=32, salt=salt,
                        info=info).derive(root_key))
    return out


def _busctl_bytes(result: subprocess.CompletedProcess[str]) -> bytes:
    (line,) = [ln for ln in result.stdout.splitlines() if ln.strip()]
    return bytes(json.loads(line)["data"][0])


def test_a_keys_member_cannot_compute_sealing_keys(daemon: SnpdDaemon,
                                                   figures: List[Dict[str, Any]]) -> None:
    import pwd

    label = "disk"
    victims = {}
    for user in (MEMBER, ROOT):
        result = busctl(daemon.bus_address, "--json=short", "call", BUS_NAME, PATH, KEYS,
                        "DeriveSealingKey", "sasa{sv}", label, "0", "0", user=user)
        assert result.returncode == 0, result.stderr
        uid = pwd.getpwnam(user).pw_uid if user else 0
        victims[uid] = _busctl_bytes(result)
    assert len(set(victims.values())) == 2
    tried = refused = 0
    field_sets = (["measurement", "policy"], ["measurement"], ["policy"], [])
    for vmpl in range(4):
        for fields in field_sets:
            result = busctl(daemon.bus_address, "--json=short", "call", BUS_NAME, PATH, KEYS,
                            "DeriveKey", "sasuuta{sv}", "vcek", str(len(fields)), *fields,
                            str(vmpl), "0", "0", "0", user=KEYS_MEMBER)
            tried += 1
            if result.returncode != 0:
                assert vmpl == 3 and "reserved for sealing keys" in result.stderr, \
                    result.stderr
                refused += 1
                continue
            raw_key = _busctl_bytes(result)
            for uid, key in victims.items():
                assert key not in _hkdf(raw_key, uid, label), \
                    f"DeriveKey(vmpl {vmpl}, {fields}) reproduces uid {uid}'s sealing key"
    assert refused == len(field_sets)
    row = assert_healthy(daemon, f"{tried} DeriveKey tries at other users' sealing keys")
    row["refused"] = refused
    figures.append(row)
