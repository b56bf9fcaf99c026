"""Attack: a member floods VerifyReport with forged CHIP_IDs while the KDS throttles.

Before the fix (issue 10, item 5), every forged CHIP_ID cost one outbound KDS fetch,
failures were not remembered, the fetches (sleeping on ``Retry-After: 10``) held the
shared thread pool so that another member's cache-answerable GetCertificates took
47 s, and each refusal was one journal record. Now: the real daemon (user snpd,
varlink), real unprivileged callers, a KDS in this process answering every request
with 429 ``Retry-After: 10``. The victim is still answered, the KDS hears at most the
attacker's fetch budget, the daemon lives, and the journal holds a handful of
records that count the rest ("suppressed N similar").

Figures are printed (``pytest -s``); nothing asserts on durations.
"""

from __future__ import annotations

import base64
import collections
import concurrent.futures
import os
import pwd
import time
from typing import Any, Dict, Iterator, List, Mapping, Tuple

import pytest
from daemonproc import (  # type: ignore[import-not-found]
    DEADLINE,
    EmulatorTemplate,
    Launcher,
    SnpdDaemon,
    varlink_calls_as,
)
from reliability import A, M, b64, call, emulator_kds  # type: ignore[import-not-found]

from snpd.emulator.kds_server import Fault, KdsServer

pytestmark = pytest.mark.integration

ATTACKER, VICTIM = "snpd-test-user", "snpd-test-keys"
CLIENTS, CALLS_EACH = 8, 25  # concurrent attacker processes, forged reports each
FETCH_BURST = 4
CONFIG = {
    # snpd-test-keys becomes a member too: the victim is another member, not root.
    "access": {"report_groups": ["snpd-users", "snpd-keys"]},
    "kds": {"per_uid_calls": 2, "per_uid_fetch_burst": FETCH_BURST,
            "per_uid_fetch_interval_s": 600},
    "log": {"repeat_burst": 3, "repeat_interval_s": 4},
}


@pytest.fixture(scope="module")
def kds(template: EmulatorTemplate) -> Iterator[KdsServer]:
    """A KDS in this process, so that the test can throttle it and count requests."""
    server = emulator_kds(template)
    yield server
    server.stop()


def _forged(genuine: bytes) -> Tuple[bytes, bytes]:
    """(report, chip ID): the genuine report with a random CHIP_ID."""
    chip = os.urandom(64)
    report = bytearray(genuine)
    report[0x1A0:0x1E0] = chip
    return bytes(report), chip


def _flood(daemon: SnpdDaemon, reports: List[bytes]) -> List[Dict[str, Any]]:
    return list(varlink_calls_as(ATTACKER, str(daemon.socket_path), [
        {"method": A + "VerifyReport", "parameters": {"report": b64(r)}} for r in reports]))


def _victim(daemon: SnpdDaemon, calls: int) -> Tuple[List[Dict[str, Any]], float]:
    started = time.monotonic()
    out = varlink_calls_as(VICTIM, str(daemon.socket_path),
                           [{"method": A + "GetCertificates", "parameters": {}}] * calls)
    return list(out), time.monotonic() - started


def _kind(outcome: Mapping[str, Any]) -> str:
    if outcome["ok"]:
        return "invalid" if outcome["parameters"]["valid"] is False else "VALID"
    return str(outcome["error"]).rpartition(".")[2]


def test_forged_chip_ids_against_a_throttling_kds(template: EmulatorTemplate,
                                                  kds: KdsServer) -> None:
    launcher = Launcher(template, kds)
    secrets: Dict[str, bytes] = {}
    try:
        daemon = launcher.start(CONFIG)
        attacker_uid = str(pwd.getpwnam(ATTACKER).pw_uid)
        # The victim's certificates are fetched once and cached while the KDS is well.
        (warm,), _ = _victim(daemon, 1)
        assert warm["ok"] and {c["kind"] for c in warm["parameters"]["certificates"]} >= {
            "ark", "ask", "vcek"}, warm
        genuine = base64.b64decode(call(daemon, A + "GetReport", report_data=b64(b"x" * 64))
                                   ["parameters"]["report"])
        batches = []
        for client in range(CLIENTS):
            batch = []
            for i in range(CALLS_EACH):
                report, chip = _forged(genuine)
                secrets[f"forged chip ID {client}.{i}"] = chip
                batch.append(report)
            batches.append(batch)

        kds.faults.push(Fault.status(429, retry_after=10), count=None)
        asked_before = len(kds.requests)
        with concurrent.futures.ThreadPoolExecutor(CLIENTS + 1) as pool:
            floods = [pool.submit(_flood, daemon, batch) for batch in batches]
            victim = pool.submit(_victim, daemon, 10)
            outcomes = [o for f in floods for o in f.result(timeout=DEADLINE)]
            victim_outcomes, victim_seconds = victim.result(timeout=DEADLINE)
        kds_requests = len(kds.requests) - asked_before
        kinds = collections.Counter(_kind(o) for o in outcomes)

        # Every forged report got a verdict (no VCEK: invalid) or Busy, and nothing else.
        assert set(kinds) <= {"invalid", "Busy"}, kinds
        assert len(outcomes) == CLIENTS * CALLS_EACH
        # The victim, a member answered from the cache, was served throughout.
        assert all(o["ok"] for o in victim_outcomes), victim_outcomes
        assert [o["parameters"] for o in victim_outcomes] == [warm["parameters"]] * 10
        # The KDS heard at most the attacker's fetch budget, not one request per chip.
        assert kds_requests <= FETCH_BURST, kds.requests[asked_before:]
        assert daemon.running(), daemon.diagnostics()
        stats = call(daemon, M + "GetProperties")["parameters"]["properties"][
            "org.snpd.Snpd1.Manager"]["Statistics"]

        # The journal: a few records for the attacker, and counts for the rest. Wait
        # (bounded) for the periodic summary that accounts for every call.
        capture = daemon.capture
        assert capture is not None
        expected = {"CLIENT_THROTTLED": kinds["Busy"], "VERIFY_FAILED": kinds["invalid"]}

        def accounted() -> Dict[str, Tuple[int, int]]:
            seen: Dict[str, Tuple[int, int]] = {}
            for r in capture.journal:
                if r.get("SNPD_CALLER_UID") == attacker_uid and r.get("SNPD_EVENT") in expected:
                    held = int(r.get("SNPD_SUPPRESSED", "0"))
                    shown, total = seen.get(r["SNPD_EVENT"], (0, 0))
                    # A summary stands for the held-back records, itself one of them.
                    summary = r["MESSAGE"].startswith("suppressed ")
                    seen[r["SNPD_EVENT"]] = (shown + 1, total + held + (0 if summary else 1))
            return seen

        def complete() -> bool:
            seen = accounted()
            return all(seen.get(e, (0, 0))[1] == n for e, n in expected.items())

        with capture.cond:
            capture.cond.wait_for(complete, DEADLINE)
            seen = accounted()
            suppressed = [r for r in capture.journal if "SNPD_SUPPRESSED" in r]
        records = sum(shown for shown, _ in seen.values())
        print(f"\nforged VerifyReport calls: {len(outcomes)} from {CLIENTS} processes: "
              f"{dict(kinds)}")
        print(f"KDS requests while throttled (429, Retry-After 10): {kds_requests} "
              f"(fetch budget {FETCH_BURST})")
        print(f"victim: 10 GetCertificates in {victim_seconds:.2f} s, all answered")
        print(f"journal records for the attacker: {records} "
              f"(shown, accounted by type: {seen}); 'suppressed' records: {len(suppressed)}")
        print(f"statistics: { {k: v for k, v in stats.items() if k.startswith('kds.')} }")
        assert complete(), (expected, seen)
        assert suppressed and any("suppressed" in r["MESSAGE"] for r in suppressed)
        assert records * 4 <= len(outcomes), seen
        assert daemon.running(), daemon.diagnostics()
    finally:
        kds.faults.clear()
        launcher.close(lambda _daemon: secrets, expect_running=True)
