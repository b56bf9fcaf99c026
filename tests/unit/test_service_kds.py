"""The service's KDS work: apart from cache answers and verification, within each uid's
budget. A KDS in the test blocks on an event, so nothing here depends on timing."""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from pathlib import Path
from typing import Any, Awaitable, Dict, List, Mapping, TypeVar

import pytest
from emuplatform import NOW, TCBS, Platform, chip_id_for  # type: ignore[import-not-found]

from snpd.abi.product import Endorser, Product
from snpd.abi.tcb import TcbVersion
from snpd.access import Access, Caller
from snpd.device.base import ReportRequest
from snpd.errors import KdsBudgetExceeded, KdsError
from snpd.events import Events
from snpd.kds.budget import BudgetLimits, KdsBudget
from snpd.kds.cache import CertificateCache, NotCached, cache_only
from snpd.ratelimit import Rate
from snpd.service import CertificateOptions, Service, VerifyOptions
from snpd.trust.verify import Verifier

REPORT_GID = 4242
AT_NOW = VerifyOptions(at=NOW)
HANG_GUARD = 60.0  # only so that a broken test fails instead of hanging
T = TypeVar("T")


class Fetcher:
    """The platform's chain and VCEK; any other chip is unknown (404). With ``gate``
    cleared, a VCEK fetch signals ``entered`` and waits for ``gate``."""

    def __init__(self, platform: Platform) -> None:
        self.platform = platform
        self.vcek_calls: List[bytes] = []
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Event()

    def fetch_cert_chain(self, product: Product, endorser: Endorser) -> bytes:
        chain = self.platform.chain
        return (chain.ask.to_pem() + chain.ark.to_pem()).encode()

    def fetch_vcek(self, product: Product, chip_id: bytes, tcb: TcbVersion) -> bytes:
        self.vcek_calls.append(chip_id)
        self.entered.set()
        assert self.gate.wait(HANG_GUARD)
        if chip_id == chip_id_for(product):
            return self.platform.vcek.der
        raise KdsError("KDS answered HTTP 404 Not Found", status=404)

    def fetch_crl(self, product: Product, endorser: Endorser) -> bytes:
        raise KdsError("KDS answered HTTP 404 Not Found", status=404)


class Firmware:
    """Stands in for the broker: every report is the platform's genuine one."""

    def __init__(self, report: bytes) -> None:
        self.report = report

    async def submit(self, request: Any, **kw: Any) -> Any:
        assert type(request) is ReportRequest
        return self.report


class ListSink:
    def __init__(self) -> None:
        self.records: List[Dict[str, str]] = []

    def send(self, fields: Mapping[str, str]) -> None:
        self.records.append(dict(fields))


def member(uid: int) -> Caller:
    return Caller(uid=uid, gids=frozenset({REPORT_GID}), transport="varlink")


def make_service(tmp_path: Path, platform: Platform, fetcher: Fetcher, sink: ListSink, *,
                 calls: int, burst: int, workers: int) -> Service:
    cache = CertificateCache(tmp_path / "cache", fetcher, roots=platform.roots)
    return Service(broker=Firmware(platform.report()),  # type: ignore[arg-type]
                   access=Access(report_gids=frozenset({REPORT_GID})), events=Events(sink),
                   cache=cache, verifier=Verifier(platform.roots), kds_workers=workers,
                   kds_budget=KdsBudget(BudgetLimits(calls=calls, fetches=Rate(burst, 60.0)),
                                        clock=lambda: 0.0))


def run(coro: Awaitable[T]) -> T:
    async def guarded() -> T:
        return await asyncio.wait_for(coro, HANG_GUARD)

    return asyncio.run(guarded())


def forged(platform: Platform, seed: int) -> bytes:
    report: bytes = platform.report(chip_id=chip_id_for(platform.product, seed=seed))
    return report


def test_cache_answers_while_the_kds_pool_is_blocked(tmp_path: Path, genoa: Platform) -> None:
    fetcher, sink = Fetcher(genoa), ListSink()
    service = make_service(tmp_path, genoa, fetcher, sink, calls=1, burst=10, workers=1)
    attacker, victim = member(1000), member(1001)

    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        # fetched once, then cached
        warm = await service.get_certificates(victim, CertificateOptions())
        assert {kind for kind, _ in warm.items()} == {"ark", "ask", "vcek"}
        fetcher.gate.clear()
        fetcher.entered.clear()
        stuck = asyncio.ensure_future(service.verify_report(attacker, forged(genoa, 7),
                                                            AT_NOW))
        assert await loop.run_in_executor(None, fetcher.entered.wait, HANG_GUARD)
        # The KDS pool's only thread is taken; cache answers and verification go on.
        assert await service.get_certificates(victim, CertificateOptions()) == warm
        verdict = await service.verify_report(victim, genoa.report(), AT_NOW)
        assert verdict.valid is True, verdict
        # The attacker's next KDS-bound call is refused at once: its share is taken.
        with pytest.raises(KdsBudgetExceeded) as info:
            await service.verify_report(attacker, forged(genoa, 8), AT_NOW)
        assert info.value.limit == "calls"
        assert not stuck.done()
        fetcher.gate.set()
        verdict = await stuck
        assert verdict.valid is False and "chain.certificates" in [
            c.name for c in verdict.failures]

    try:
        run(scenario())
    finally:
        service.close()
    assert len(fetcher.vcek_calls) == 2  # the victim's once, the first forged chip once
    throttled = [r for r in sink.records if r.get("SNPD_EVENT") == "CLIENT_THROTTLED"]
    assert [(r["SNPD_CALLER_UID"], r["SNPD_LIMIT"]) for r in throttled] == [("1000", "calls")]


def test_forged_chip_ids_cost_at_most_the_budget(tmp_path: Path, milan: Platform) -> None:
    fetcher, sink = Fetcher(milan), ListSink()
    service = make_service(tmp_path, milan, fetcher, sink, calls=2, burst=3, workers=2)
    attacker = member(1000)

    async def scenario() -> List[str]:
        # the chain, cached by root
        await service.get_certificates(Caller(uid=0), CertificateOptions())
        outcomes = []
        for seed in range(10, 30):
            try:
                verdict = await service.verify_report(attacker, forged(milan, seed),
                                                      AT_NOW)
                outcomes.append("invalid" if not verdict.valid else "valid")
            except KdsBudgetExceeded as exc:
                outcomes.append(exc.limit)
        # Repeats of a forged chip that failed are answered from memory, budget or not.
        verdict = await service.verify_report(attacker, forged(milan, 10), AT_NOW)
        outcomes.append("invalid" if not verdict.valid else "valid")
        # Root is exempt, and other uids have their own budget.
        for caller in (Caller(uid=0), member(1001)):
            verdict = await service.verify_report(caller, forged(milan, 50 + caller.uid),
                                                  AT_NOW)
            outcomes.append("invalid" if not verdict.valid else "valid")
        return outcomes

    try:
        outcomes = run(scenario())
    finally:
        service.close()
    assert outcomes == ["invalid"] * 3 + ["fetches"] * 17 + ["invalid"] * 3
    # root's genuine VCEK, the budget's three, root's and the other member's forged ones
    assert len(fetcher.vcek_calls) == 6
    assert service.cache is not None and service.cache.stats.negative_hits == 1
    limits = {r.get("SNPD_LIMIT") for r in sink.records
              if r.get("SNPD_EVENT") == "CLIENT_THROTTLED"}
    assert limits == {"fetches"}
    assert chip_id_for(Product.MILAN, seed=10).hex() not in repr(sink.records)


def test_a_cache_only_lookup_never_waits_for_a_fetch_in_flight(tmp_path: Path,
                                                                turin: Platform) -> None:
    fetcher = Fetcher(turin)
    cache = CertificateCache(tmp_path / "cache", fetcher, roots=turin.roots)
    cache.chain(Product.TURIN, Endorser.VCEK)
    chip, tcb = chip_id_for(Product.TURIN), TCBS[Product.TURIN]
    fetcher.gate.clear()
    fetcher.entered.clear()
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        fetching = pool.submit(cache.vcek, Product.TURIN, chip, tcb)
        assert fetcher.entered.wait(HANG_GUARD)
        with pytest.raises(NotCached):  # at once: it does not join the fetch
            cache.vcek(Product.TURIN, chip, tcb, gate=cache_only)
        fetcher.gate.set()
        assert fetching.result(HANG_GUARD).der == turin.vcek.der
    assert cache.vcek(Product.TURIN, chip, tcb, gate=cache_only).der == turin.vcek.der
    assert len(fetcher.vcek_calls) == 1
