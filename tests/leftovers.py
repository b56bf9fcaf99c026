"""Processes a test session started and left running: found, stopped, and a failure.

A server a test forgets to stop outlives the session: it keeps ports, sockets and
files in /tmp, may run as user ``snpd``, and the next run or the demo trips over it.
The conftests of tests/unit and tests/integration use :func:`no_leftover_processes`
(an autouse session fixture); after every other fixture is torn down it fails the
session, naming each process, if one is still alive, and kills it.

A process counts as the session's if it is

1. a descendant of the pytest process;
2. carrying this session's marker ``SNPD_TEST_SESSION=<token>`` in its environment,
   which every process the tests start inherits, also one that double-forked, started
   a new session or changed uid with setpriv (root reads any process's environment);
3. owned by a test-only account (snpd-test-user, snpd-test-keys, snpd-test-outsider),
   new since the session started, and carrying no other session's marker: nothing but
   the tests runs as those accounts, and a test that cleared the environment leaves
   no marker. Those are reported, not killed: whose they are is an inference.

User ``snpd`` also runs the demo's daemon and a real one, so its processes count only
by (1) or (2): a daemon the demo or another engineer's session runs is not flagged.
Zombies are not alive and do not count.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import pwd
import signal
import time
import uuid
from typing import FrozenSet, Iterator, List, Optional, Set, Tuple

import pytest

MARKER = "SNPD_TEST_SESSION"
TEST_ONLY_USERS = ("snpd-test-user", "snpd-test-keys", "snpd-test-outsider")
#: A process told to stop may take a moment to go: how long to let it before failing
#: (a bound on waiting, not a measurement; $SNPD_LEFTOVER_GRACE overrides it).
GRACE = float(os.environ.get("SNPD_LEFTOVER_GRACE", "5"))


@dataclasses.dataclass(frozen=True)
class Proc:
    pid: int
    ppid: int
    state: str
    start: int  # clock ticks after boot: with the pid, names a process uniquely
    uid: int
    marker: Optional[str]  # its SNPD_TEST_SESSION, None if absent or unreadable
    cmdline: str

    @property
    def user(self) -> str:
        try:
            return pwd.getpwuid(self.uid).pw_name
        except KeyError:
            return str(self.uid)


def _read(pid: int) -> Optional[Proc]:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read().decode("utf-8", "replace")
        uid = os.stat(f"/proc/{pid}").st_uid
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmdline = f.read().replace(b"\0", b" ").decode("utf-8", "replace").strip()
    except OSError:  # gone meanwhile
        return None
    fields = stat[stat.rindex(")") + 2:].split()  # after "pid (comm) ": state, ppid, ...
    marker: Optional[str] = None
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            for entry in f.read().split(b"\0"):
                if entry.startswith(MARKER.encode() + b"="):
                    marker = entry.split(b"=", 1)[1].decode("utf-8", "replace")
    except OSError:  # another user's, and we are not root; or gone
        pass
    return Proc(pid, int(fields[1]), fields[0], int(fields[19]), uid, marker,
                cmdline or stat[stat.index("(") : stat.rindex(")") + 1])


def processes() -> List[Proc]:
    found = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            proc = _read(int(name))
            if proc is not None:
                found.append(proc)
    return found


def snapshot() -> FrozenSet[Tuple[int, int]]:
    """(pid, start) of every process now: what existed before the session."""
    return frozenset((p.pid, p.start) for p in processes())


def _test_only_uids() -> Set[int]:
    uids = set()
    for name in TEST_ONLY_USERS:
        with contextlib.suppress(KeyError):  # not created: scripts/test makes them
            uids.add(pwd.getpwnam(name).pw_uid)
    return uids


def leftovers(token: str, before: FrozenSet[Tuple[int, int]], root: int
              ) -> Tuple[List[Proc], List[Proc]]:
    """(certainly the session's: rules 1 and 2, probably: rule 3) among the live
    processes other than ``root`` (the pytest process) and its ancestors."""
    table = {p.pid: p for p in processes()}
    test_only = _test_only_uids()
    ancestors = set()
    pid = root
    while pid in table and pid not in ancestors:
        ancestors.add(pid)
        pid = table[pid].ppid

    def descends(proc: Proc) -> bool:
        seen = set()
        while proc.ppid in table and proc.pid not in seen:
            seen.add(proc.pid)
            if proc.ppid == root:
                return True
            proc = table[proc.ppid]
        return False

    ours, probably = [], []
    for proc in table.values():
        if proc.pid in ancestors or proc.state in ("Z", "X"):
            continue
        if descends(proc) or proc.marker == token:
            ours.append(proc)
        elif (proc.uid in test_only and (proc.pid, proc.start) not in before
              and proc.marker is None):
            probably.append(proc)
    return ours, probably


def check(token: str, before: FrozenSet[Tuple[int, int]], root: int,
          grace: float = GRACE) -> str:
    """"" when nothing is left; else what is, after killing what is certainly ours.
    Waits up to ``grace`` seconds for processes that are on their way out."""
    end = time.monotonic() + grace
    while True:
        ours, probably = leftovers(token, before, root)
        if not ours and not probably:
            return ""
        if time.monotonic() >= end:
            break
        time.sleep(0.1)
    lines = [f"{len(ours) + len(probably)} process(es) the tests started outlived the "
             "session (a fixture or test did not stop them):"]
    for proc in ours:
        lines.append(f"  pid {proc.pid} ppid {proc.ppid} user {proc.user}: {proc.cmdline}"
                     "  [killed]")
        with contextlib.suppress(OSError):
            os.kill(proc.pid, signal.SIGKILL)
    for proc in probably:
        lines.append(f"  pid {proc.pid} ppid {proc.ppid} user {proc.user}: {proc.cmdline}"
                     "  [a test-only account's, started during the session without a "
                     "session marker; not killed]")
    return "\n".join(lines)


_ACTIVE: List[str] = []  # one check per session, however many conftests import it


@pytest.fixture(scope="session", autouse=True)
def no_leftover_processes() -> Iterator[None]:
    """Fail the session if a process it started is alive after every fixture is torn
    down (set up before any other, so torn down after all of them)."""
    if _ACTIVE:
        yield
        return
    token = f"{os.getpid()}-{uuid.uuid4().hex}"
    before = snapshot()
    previous = os.environ.get(MARKER)
    os.environ[MARKER] = token
    _ACTIVE.append(token)
    try:
        yield
    finally:
        _ACTIVE.clear()
        if previous is None:
            os.environ.pop(MARKER, None)
        else:
            os.environ[MARKER] = previous
    report = check(token, before, os.getpid())
    if report:
        pytest.fail(report, pytrace=False)
