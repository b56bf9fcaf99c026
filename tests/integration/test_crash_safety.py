"""Crash safety: the daemon is SIGKILLed at pseudo-random points while clients make it
fetch and store certificates (the KDS answers late, so fetches are in flight). After
every kill the cache holds only complete entries that verify under the emulator's
root; leftover temporaries are never entries and are gone after the next start; the
restarted daemon serves.

Rounds: ``SNPD_CRASH_ROUNDS`` (default 12; the on-demand long run uses 100), RNG seed
``SNPD_CRASH_SEED`` (default 6)::

    SNPD_CRASH_ROUNDS=100 python -m pytest -m integration -s \\
        tests/integration/test_crash_safety.py
"""

from __future__ import annotations

import os
import random
import shutil
import threading
from typing import List

import pytest
from daemonproc import EmulatorTemplate  # type: ignore[import-not-found]
from reliability import (  # type: ignore[import-not-found]
    A,
    M,
    b64,
    call,
    emulator_kds,
    new_daemon,
    outcome,
    scan_cache,
    shared_cache_dir,
)

from snpd.emulator.kds_server import Fault

pytestmark = pytest.mark.integration

ROUNDS = int(os.environ.get("SNPD_CRASH_ROUNDS", "12"))
SEED = int(os.environ.get("SNPD_CRASH_SEED", "6"))
KDS_LATENCY = 0.05


class Hammer:
    """Client threads calling methods that make the daemon fetch and store
    certificates, until stopped; failures while the daemon dies are expected."""

    METHODS = ("GetCertificates", "GetCertificatesCrl", "GetExtendedReport",
               "RefreshCertificates")

    def __init__(self, daemon: object, rng: random.Random, threads: int = 3) -> None:
        self.daemon = daemon
        self.stop = threading.Event()
        self.calls = 0
        self.ok = 0
        self._seeds = [rng.randrange(1 << 30) for _ in range(threads)]
        self._threads = [threading.Thread(target=self._run, args=(s,), daemon=True)
                         for s in self._seeds]
        for thread in self._threads:
            thread.start()

    def _run(self, seed: int) -> None:
        rng = random.Random(seed)
        while not self.stop.is_set():
            method = rng.choice(self.METHODS)
            try:
                if method == "GetCertificates":
                    result = call(self.daemon, A + "GetCertificates", options={})
                elif method == "GetCertificatesCrl":
                    result = call(self.daemon, A + "GetCertificates", options={"crl": True})
                elif method == "GetExtendedReport":
                    result = call(self.daemon, A + "GetExtendedReport",
                                  report_data=b64(os.urandom(32)))
                else:
                    result = call(self.daemon, M + "RefreshCertificates")
                self.calls += 1
                self.ok += outcome(result) == "ok"
            except Exception:  # the daemon was killed under the call
                self.calls += 1
                if self.stop.is_set():
                    return
                self.stop.wait(0.01)

    def join(self) -> None:
        self.stop.set()
        for thread in self._threads:
            thread.join(60)


def test_sigkill_while_fetching_leaves_only_verified_entries(template: EmulatorTemplate
                                                             ) -> None:
    rng = random.Random(SEED)
    kds = emulator_kds(template)
    # Every answer late: fetches are in flight when the kill comes.
    kds.faults.push(Fault.latency(KDS_LATENCY), count=None)
    cache_dir = shared_cache_dir()
    # No host certificate table: GetExtendedReport takes the chain and VCEK from the
    # cache / KDS, so it fetches and stores too.
    config = {"emulator": {"host_certs": "empty"}}
    kills = 0
    temporaries_seen = 0
    entries_seen = 0
    daemons: List[object] = []
    try:
        daemon = new_daemon(template, kds.url, cache_dir, config)
        daemons.append(daemon)
        daemon.start()
        for round_no in range(ROUNDS):
            hammer = Hammer(daemon, rng)
            try:
                # A pseudo-random point: early (start of the first fetches) to late.
                hammer.stop.wait(rng.uniform(0.0, 0.6))
                assert daemon.running(), f"round {round_no}: snpd exited on its own\n" \
                                         f"{daemon.diagnostics()}"
                daemon.send_signal(9)
                daemon._proc.wait(60)
                kills += 1
            finally:
                hammer.join()
            scan = scan_cache(cache_dir, template)
            assert not scan.problems, f"round {round_no} (seed {SEED}): {scan.problems}"
            temporaries_seen += len(scan.temporaries)
            entries_seen += len(scan.entries)
            daemon.close()
            # A half-written temporary as a kill inside atomic_write leaves it: never an
            # entry (the scan above skips it), and gone after the next start.
            planted = cache_dir / f".ask.pem.{rng.randrange(2, 1 << 22)}.tmp"
            planted.write_bytes(b"-----BEGIN CERTIFICATE-----\nMIIB")
            os.chown(planted, cache_dir.stat().st_uid, cache_dir.stat().st_gid)
            assert not scan_cache(cache_dir, template).problems
            leftovers = [*scan.temporaries, planted]
            # Sometimes wipe part of the cache so that fetches recur.
            files = [p for p in cache_dir.rglob("*") if p.is_file() and p not in leftovers]
            if files and rng.random() < 0.6:
                for path in rng.sample(files, rng.randint(1, len(files))):
                    path.unlink()
            daemon = new_daemon(template, kds.url, cache_dir, config)
            daemons.append(daemon)
            daemon.start()
            # The next start removes what a crash left behind.
            still = [p for p in leftovers if p.exists()]
            assert not still, f"round {round_no}: temporaries survive a restart: {still}"
            report = call(daemon, A + "GetReport", report_data=b64(os.urandom(32)))
            assert report["ok"], f"round {round_no}: GetReport after restart: {report}"
            certs = call(daemon, A + "GetCertificates", options={})
            assert certs["ok"], f"round {round_no}: GetCertificates after restart: {certs}"
            kinds = sorted(c["kind"] for c in certs["parameters"]["certificates"])
            assert "ark" in kinds and "ask" in kinds, kinds
            scan = scan_cache(cache_dir, template)
            assert not scan.problems and not scan.temporaries, (round_no, scan)
        print(f"\ncrash safety: {ROUNDS} rounds, {kills} SIGKILLs (seed {SEED}); "
              f"{entries_seen} entries checked after kills, {temporaries_seen} "
              f"temporaries left by kills (all removed by the next start); "
              f"{len(kds.requests)} KDS requests")
        assert kills == ROUNDS
    finally:
        for made in daemons:
            made.close()  # type: ignore[attr-defined]
        kds.stop()
        shutil.rmtree(cache_dir.parent, ignore_errors=True)
