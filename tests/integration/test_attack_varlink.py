"""Local users attacking the varlink server of the real daemon (issue 10).

The daemon runs as in test_daemon.py (user snpd, emulator backend, private bus;
daemonproc.Launcher). The attackers are child processes of this file run as a
script, each of which becomes a member of snpd-users before it connects: a uid
of its own that no account uses (``os.setuid`` needs no passwd entry, and the
daemon learns the uid and groups from the kernel, SO_PEERCRED and
SO_PEERGROUPS), so that any number of distinct members can attack at once. The
victims are root and the member ``snpd-test-user``, calling GetReport with a
client-side timeout of a few seconds while the attack holds.

The attacks, as issue 10 found them:

- memory: members holding 64 connections each, every one with 1 MiB of a
  message never terminated (it took the daemon to 318 MiB, over the unit's
  MemoryMax=256M);
- connections: members holding 64 idle connections each, beyond the per-uid
  cap; then enough members to fill ``max_connections``, which root must still
  get past (its reserve);
- slowloris: one byte at a time, each well within the idle timeout, so only
  the message deadline can close the connection.

After each: the daemon is alive, the victims were answered, and the daemon's
peak RSS (VmHWM) is under 256 MiB. The figures are printed (``pytest -s``);
no duration is asserted. ``message_timeout_s`` is set to 2 s so the slowloris
attack ends soon; everything else is the default configuration.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import dataclasses
import json
import os
import pwd
import select
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence

import pytest
from daemonproc import (  # type: ignore[import-not-found]
    EmulatedKds,
    EmulatorTemplate,
    Launcher,
    SnpdDaemon,
)
from dbusbus import (  # type: ignore[import-not-found]
    DEADLINE,
    REPO_ROOT,
    Accounts,
    drop_privileges,
    run_json,
    stop_process,
)

pytestmark = pytest.mark.integration

MEMORY_MAX = 256 << 20  # the unit's MemoryMax=
MIB = 1 << 20
CONNECTIONS = 64  # per attacking uid, as in issue 10
PER_UID = 32  # varlink.max_connections_per_uid's default
MAX_CONNECTIONS = 256  # varlink.max_connections's default
MESSAGE_TIMEOUT = 2.0  # varlink.message_timeout_s for these daemons
VICTIM_TIMEOUT = 5.0  # the victims' client-side timeout
VICTIM_CALLS = 3  # per victim and attack
FIRST_FREE_UID = 62000  # attackers' uids are the first ones from here no account has
PREFIX = b'{"method":"org.snpd.Attestation.GetReport","parameters":{"report_data":"'
SCRIPT = Path(__file__).resolve()


# -- figures ------------------------------------------------------------------------------------


def peak_rss(pid: int) -> int:
    """The process's peak resident set (VmHWM), in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmHWM in /proc/{pid}/status")


@dataclasses.dataclass(frozen=True)
class Outcome:
    """What one victim call got: answered (with its own nonce), or why not."""

    who: str
    ok: bool
    latency: float
    error: str = ""


@dataclasses.dataclass(frozen=True)
class Held:
    """One attacker's tally once its attack is in place: connections opened; still
    open (the daemon holds them); closed unanswered (refused at accept, or past the
    message deadline); answered Busy and closed (over a buffer budget); bytes sent;
    and how long the connection the daemon closed last had lasted."""

    uid: int
    opened: int
    open: int
    dropped: int
    busy: int
    sent: int
    lasted: float


def free_uids(count: int, taken: Sequence[int] = ()) -> List[int]:
    """``count`` uids that no account and no earlier attacker uses."""
    out: List[int] = []
    uid = FIRST_FREE_UID
    while len(out) < count:
        try:
            pwd.getpwuid(uid)
        except KeyError:
            if uid not in taken:
                out.append(uid)
        uid += 1
    return out


# -- attackers and victims as child processes ----------------------------------------------------


class Attackers:
    """Attacker processes (this file as a script, ``hold`` mode), one per uid, each a
    member of snpd-users. ``held``: each one's tally once its attack is in place;
    the attack goes on until :meth:`close`, which leaves ``final``, the tallies at
    the end (a slowloris attacker runs on until the daemon has closed all its
    connections)."""

    def __init__(self, daemon: SnpdDaemon, report_gid: int, uids: Sequence[int],
                 *args: str) -> None:
        self.procs: List[subprocess.Popen[bytes]] = []
        self.held: List[Held] = []
        self.final: List[Held] = []
        try:
            for uid in uids:
                self.procs.append(subprocess.Popen(
                    [sys.executable, str(SCRIPT), "hold", "--socket", str(daemon.socket_path),
                     "--uid", str(uid), "--gid", str(report_gid), *args],
                    stdin=subprocess.PIPE, stdout=subprocess.PIPE, cwd=str(REPO_ROOT)))
            self.held = [Held(**_read_json(proc)) for proc in self.procs]
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        for proc in self.procs:
            if proc.stdin is not None:
                with contextlib.suppress(OSError):
                    proc.stdin.close()
        try:
            if len(self.held) == len(self.procs):
                self.final = [Held(**_read_json(proc)) for proc in self.procs]
        finally:
            for proc in self.procs:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(DEADLINE)
                stop_process(proc)


def _read_json(proc: subprocess.Popen[bytes]) -> Dict[str, Any]:
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], DEADLINE)
    line = proc.stdout.readline() if ready else b""
    if not line:
        raise AssertionError(f"attacker pid {proc.pid} reported nothing "
                             f"(exit status {proc.poll()})")
    result: Dict[str, Any] = json.loads(line)
    return result


def victim_call(daemon: SnpdDaemon, user: Optional[str]) -> Outcome:
    """One GetReport as ``user`` (None: root) in a child process, with a client-side
    timeout of VICTIM_TIMEOUT seconds; the report must carry the caller's nonce."""
    argv = [sys.executable, str(SCRIPT), "victim", "--socket", str(daemon.socket_path)]
    if user is not None:
        argv += ["--as-user", user]
    out = run_json(argv, None, "victim")
    return Outcome(user or "root", out["ok"], out["latency"], out.get("error", ""))


def victims(daemon: SnpdDaemon, accounts: Accounts) -> List[Outcome]:
    return [victim_call(daemon, user) for _ in range(VICTIM_CALLS)
            for user in (None, accounts.user.name)]


# -- the tests ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def daemon(template: EmulatorTemplate, kds: EmulatedKds) -> Iterator[SnpdDaemon]:
    """One daemon for every attack, so its peak RSS covers them all; at teardown it
    must still run and stop cleanly (Launcher.close)."""
    launcher = Launcher(template, kds)
    try:
        yield launcher.start({"varlink": {"message_timeout_s": MESSAGE_TIMEOUT}})
    finally:
        launcher.close(expect_running=True)


@pytest.fixture(scope="module")
def used_uids() -> List[int]:
    """Attacker uids already used against the module's daemon: each attack takes new
    ones, so no attack meets connections of an earlier one that closes late."""
    return []


def attack(daemon: SnpdDaemon, accounts: Accounts, used_uids: List[int], title: str,
           count: int, *args: str) -> List[Held]:
    """Run ``count`` attackers; while they hold, call as the victims; check and print
    what issue 10 asks of every attack. The attackers' tallies."""
    uids = free_uids(count, used_uids)
    used_uids.extend(uids)
    attackers = Attackers(daemon, accounts.report_gid, uids, *args)
    try:
        outcomes = victims(daemon, accounts)
        alive = daemon.running()
        rss = peak_rss(daemon.pid)
    finally:
        attackers.close()
    held = attackers.final
    worst = max(o.latency for o in outcomes)
    print(f"\nattack: {title}\n"
          f"  attackers: {count} member uids; opened {sum(h.opened for h in held)}, "
          f"held {sum(h.open for h in held)}, closed unanswered "
          f"{sum(h.dropped for h in held)}, "
          f"answered Busy {sum(h.busy for h in held)}, sent {sum(h.sent for h in held) / MIB:.1f}"
          f" MiB, last connection lasted {max(h.lasted for h in held):.2f} s\n"
          f"  daemon: {'alive' if alive else 'DEAD'}, peak RSS {rss / MIB:.1f} MiB "
          f"(MemoryMax {MEMORY_MAX / MIB:.0f} MiB)\n"
          f"  victims: {sum(o.ok for o in outcomes)}/{len(outcomes)} answered, "
          f"worst latency {worst * 1e3:.0f} ms")
    assert alive, daemon.diagnostics()
    assert [o for o in outcomes if not o.ok] == []
    assert rss < MEMORY_MAX
    return held


def test_unterminated_megabytes_on_64_connections_per_member(
        daemon: SnpdDaemon, accounts: Accounts, used_uids: List[int]) -> None:
    held = attack(daemon, accounts, used_uids,
                  f"4 members x {CONNECTIONS} connections x 1 MiB never terminated", 4,
                  "--connections", str(CONNECTIONS), "--bytes", str(MIB))
    for tally in held:
        assert tally.open + tally.dropped + tally.busy == CONNECTIONS
        assert tally.busy > 0  # the uid's buffer budget, not the daemon's memory, gave out


def test_64_idle_connections_per_member_and_a_full_server(
        daemon: SnpdDaemon, accounts: Accounts, used_uids: List[int]) -> None:
    held = attack(daemon, accounts, used_uids,
                  f"4 members x {CONNECTIONS} idle connections", 4,
                  "--connections", str(CONNECTIONS))
    assert [(h.open, h.dropped) for h in held] == [(PER_UID, CONNECTIONS - PER_UID)] * 4
    # More members than it takes to fill max_connections: root gets in on its reserve.
    # (A member now waits for a slot: the total is what bounds the daemon.)
    uids = free_uids(MAX_CONNECTIONS // PER_UID + 2, used_uids)
    used_uids.extend(uids)
    gid = accounts.report_gid
    full = Attackers(daemon, gid, uids[:-1], "--connections", str(CONNECTIONS))
    try:
        probe = Attackers(daemon, gid, uids[-1:], "--connections", "1")
        probe.close()
        root = [victim_call(daemon, None) for _ in range(VICTIM_CALLS)]
        member = victim_call(daemon, accounts.user.name)
        alive = daemon.running()
        rss = peak_rss(daemon.pid)
    finally:
        full.close()
    print(f"attack: {len(uids) - 1} members x {CONNECTIONS} idle connections fill "
          f"max_connections ({sum(h.open for h in full.held)} held)\n"
          f"  daemon: {'alive' if alive else 'DEAD'}, peak RSS {rss / MIB:.1f} MiB\n"
          f"  root: {sum(o.ok for o in root)}/{len(root)} answered from its reserve, worst "
          f"latency {max(o.latency for o in root) * 1e3:.0f} ms; a member: "
          f"{'answered' if member.ok else 'refused until a slot frees'}")
    assert sum(h.open for h in full.held) <= MAX_CONNECTIONS
    assert probe.held[0].dropped == 1, "the server was full"
    assert alive and [o for o in root if not o.ok] == [] and rss < MEMORY_MAX


def test_slowloris_one_byte_at_a_time(daemon: SnpdDaemon, accounts: Accounts,
                                      used_uids: List[int]) -> None:
    held = attack(daemon, accounts, used_uids,
                  f"slowloris: 4 members x 8 connections, a byte every "
                  f"{MESSAGE_TIMEOUT / 4:g} s (idle timeout 60 s, message deadline "
                  f"{MESSAGE_TIMEOUT:g} s)", 4,
                  "--connections", "8", "--trickle", str(MESSAGE_TIMEOUT / 4))
    for tally in held:
        assert tally.open == 0 and tally.busy == 0  # every one closed, past its deadline


def test_every_attack_at_once(daemon: SnpdDaemon, accounts: Accounts,
                              used_uids: List[int]) -> None:
    uids = free_uids(8, used_uids)
    used_uids.extend(uids)
    gid = accounts.report_gid
    groups = [
        Attackers(daemon, gid, uids[:4], "--connections", str(CONNECTIONS), "--bytes", str(MIB)),
        Attackers(daemon, gid, uids[4:6], "--connections", str(CONNECTIONS)),
    ]
    try:
        attack(daemon, accounts, used_uids,
               "all at once: memory (4 members), connections (2), slowloris (2)", 2,
               "--connections", "8", "--trickle", str(MESSAGE_TIMEOUT / 4))
    finally:
        for group in groups:
            group.close()


# -- the script: one attacker, or one victim call ------------------------------------------------


def _become(uid: int, gid: int) -> None:
    """A uid no account has, in group ``gid`` (snpd-users): a member, as far as the
    kernel tells the daemon."""
    os.chdir("/")
    os.setgroups([gid])
    os.setgid(gid)
    os.setuid(uid)
    if os.geteuid() != uid:
        raise SystemExit(f"could not become uid {uid}")


def _hold(args: argparse.Namespace) -> int:
    """Open the connections; send each ``--bytes`` of a message never terminated, or
    with ``--trickle`` one byte per interval until the daemon closes it. Report the
    tally once the attack is in place (after a second without news; a slowloris
    once every connection has sent its first byte), go on until stdin closes (a
    slowloris until the daemon has closed every connection), report again."""
    _become(args.uid, args.gid)
    socks: List[socket.socket] = []
    for _ in range(args.connections):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(args.socket)  # blocking: waits while the daemon's backlog is full
        sock.setblocking(False)
        socks.append(sock)
    start = quiet_since = next_byte = time.monotonic()
    size = args.bytes or (MIB if args.trickle else 0)
    payload = memoryview((PREFIX + b"A" * max(0, size - len(PREFIX)))[:size])
    sent = [0] * len(socks)
    replies = [b""] * len(socks)
    closed_at: List[Optional[float]] = [None] * len(socks)

    def report() -> None:
        closed = [i for i, c in enumerate(closed_at) if c is not None]
        print(json.dumps(dataclasses.asdict(Held(
            uid=args.uid, opened=len(socks), open=len(socks) - len(closed),
            dropped=sum(1 for i in closed if not replies[i]),
            busy=sum(1 for i in closed if b"Busy" in replies[i]), sent=sum(sent),
            lasted=max([c - start for c in closed_at if c is not None] or [0.0])))),
            flush=True)

    reported = stdin_closed = False
    while time.monotonic() - start < 2 * DEADLINE:
        now = time.monotonic()
        news = False
        for i, sock in enumerate(socks):
            if closed_at[i] is not None:
                continue
            try:
                data: Optional[bytes] = sock.recv(1 << 16)
            except BlockingIOError:
                data = None
            except ConnectionResetError:
                data = b""
            if data is not None:
                news = True
                replies[i] += data
                if not data:
                    closed_at[i] = now
                    continue
            want = (1 if now >= next_byte else 0) if args.trickle else len(payload) - sent[i]
            if want and sent[i] < len(payload):
                try:
                    sent[i] += sock.send(payload[sent[i]:sent[i] + min(want, 1 << 16)])
                    news = True
                except BlockingIOError:
                    pass
                except (BrokenPipeError, ConnectionResetError):
                    closed_at[i] = now
        if args.trickle and now >= next_byte:
            next_byte += args.trickle
        if news:
            quiet_since = now
        live = [i for i, c in enumerate(closed_at) if c is None]
        in_place = (all(sent[i] for i in live) if args.trickle
                    else now - quiet_since >= 1.0) or not live
        if in_place and not reported:
            report()
            reported = True
        if reported and stdin_closed and (not live or not args.trickle):
            break
        readers: List[Any] = [socks[i] for i in live] + ([] if stdin_closed else [sys.stdin])
        writers = [] if args.trickle else [socks[i] for i in live if sent[i] < len(payload)]
        ready, _, _ = select.select(readers, writers, [], 0.05)
        if sys.stdin in ready:
            stdin_closed = not os.read(sys.stdin.fileno(), 1024)
    report()
    for sock in socks:
        sock.close()
    return 0


def _victim(args: argparse.Namespace) -> int:
    from snpd.errors import SnpdError
    from snpd.varlink.client import VarlinkClient

    if args.as_user:
        drop_privileges(args.as_user)
    nonce = os.urandom(64)
    start = time.monotonic()
    try:
        with VarlinkClient(args.socket, timeout=VICTIM_TIMEOUT) as client:
            reply = client.call("org.snpd.Attestation.GetReport",
                                {"report_data": base64.b64encode(nonce).decode()})
        report = base64.b64decode(reply["report"])
        ok, error = report[0x50:0x90] == nonce, "" if report[0x50:0x90] == nonce else "nonce"
    except (OSError, SnpdError) as exc:
        ok, error = False, f"{type(exc).__name__}: {exc}"
    print(json.dumps({"ok": ok, "latency": time.monotonic() - start, "error": error}))
    return 0


def main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=["hold", "victim"])
    parser.add_argument("--socket", required=True)
    parser.add_argument("--uid", type=int)
    parser.add_argument("--gid", type=int)
    parser.add_argument("--connections", type=int, default=1)
    parser.add_argument("--bytes", type=int, default=0)
    parser.add_argument("--trickle", type=float, default=0.0)
    parser.add_argument("--as-user")
    args = parser.parse_args(argv)
    return _hold(args) if args.mode == "hold" else _victim(args)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
