"""The verified certificate cache against a real loopback KDS with injected faults."""

from __future__ import annotations

import datetime
import threading
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional

import pytest
from emuplatform import NOW, TCBS, Platform, chip_id_for  # type: ignore[import-not-found]

from snpd.abi.product import Endorser, Product
from snpd.emulator.kds_server import Fault, KdsServer
from snpd.emulator.pki import make_chain, make_crl, make_vcek
from snpd.errors import (
    CertificatesUnavailable,
    KdsBudgetExceeded,
    KdsError,
    UntrustedCertificate,
)
from snpd.kds import urls
from snpd.kds.cache import CertificateCache, NotCached, cache_only
from snpd.kds.client import KdsClient
from snpd.kds.negative import NegativeCache
from snpd.trust.roots import AMD_ROOTS
from snpd.trust.x509 import Crl

PEM = "application/x-pem-file"
DER = "application/pkix-cert"


class Clock:
    def __init__(self, now: datetime.datetime) -> None:
        self.now = now

    def __call__(self) -> datetime.datetime:
        return self.now


class Ticks:
    """A monotonic clock the test steps."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def chain_pem(p: Platform, endorser: Endorser = Endorser.VCEK) -> bytes:
    inter = p.chain.ask if endorser is Endorser.VCEK else p.chain.asvk
    return (inter.to_pem() + p.chain.ark.to_pem()).encode()


def serve_platform(server: KdsServer, p: Platform, crl: Optional[Crl] = None) -> None:
    server.put(urls.cert_chain_path(p.product, Endorser.VCEK), PEM, chain_pem(p))
    server.put(urls.cert_chain_path(p.product, Endorser.VLEK), PEM, chain_pem(p, Endorser.VLEK))
    server.put(urls.vcek_path(p.product, chip_id_for(p.product), TCBS[p.product]), DER,
               p.vcek.der)
    if crl is not None:
        server.put(urls.crl_path(p.product, Endorser.VCEK), "application/pkix-crl", crl.der)


_CLIENTS: List[KdsClient] = []


@pytest.fixture
def kds() -> Iterator[KdsServer]:
    with KdsServer() as server:
        yield server
        while _CLIENTS:
            _CLIENTS.pop().close()


def client(url: str, **kw: Any) -> KdsClient:
    """A client with test-sized timings, closed when the test's server stops."""
    options: Dict[str, Any] = dict(backoff_base=0.01, deadline=5, read_timeout=0.5,
                                   connect_timeout=0.5)
    options.update(kw)
    made = KdsClient(url, **options)
    _CLIENTS.append(made)
    return made


def make_cache(tmp_path: Path, server: Optional[KdsServer], p: Platform,
               clock: Optional[Clock] = None, **kw: object) -> CertificateCache:
    return CertificateCache(tmp_path / "cache", client(server.url) if server else None,
                            roots=p.roots,
                            clock=clock or Clock(NOW), **kw)  # type: ignore[arg-type]


def vcek_requests(server: KdsServer) -> List[str]:
    return [r for r in server.requests if "SPL" in r]


def test_miss_fetches_verifies_stores_then_hits(tmp_path: Path, kds: KdsServer,
                                                platform: Platform) -> None:
    serve_platform(kds, platform)
    p = platform.product
    cache = make_cache(tmp_path, kds, platform)
    certs = cache.certificates(p, Endorser.VCEK, chip_id=chip_id_for(p), tcb=TCBS[p])
    assert certs.vcek is not None and certs.vcek.der == platform.vcek.der
    assert certs.ark is not None and certs.ark.der == platform.chain.ark.der
    assert len(kds.requests) == 2
    assert (cache.chain_dir(p, Endorser.VCEK) / "ark.pem").is_file()
    assert cache.vcek_path(p, chip_id_for(p), TCBS[p]).read_bytes() == platform.vcek.der
    # Same process, and a restarted one: no further fetch.
    cache.vcek(p, chip_id_for(p), TCBS[p])
    make_cache(tmp_path, kds, platform).vcek(p, chip_id_for(p), TCBS[p])
    assert len(kds.requests) == 2
    assert cache.stats.fetches == 2 and cache.stats.hits >= 2


def test_concurrent_misses_are_coalesced(tmp_path: Path, kds: KdsServer,
                                         milan: Platform) -> None:
    serve_platform(kds, milan)
    kds.faults.push(Fault.latency(0.3), count=None)
    cache = make_cache(tmp_path, kds, milan)
    results: List[bytes] = []
    errors: List[BaseException] = []

    def worker() -> None:
        try:
            results.append(cache.vcek(Product.MILAN, chip_id_for(Product.MILAN),
                                      TCBS[Product.MILAN]).der)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(results) == 12 and set(results) == {milan.vcek.der}
    assert len(vcek_requests(kds)) == 1
    assert len([r for r in kds.requests if r.endswith("cert_chain")]) == 1


def test_vcek_for_another_chip_is_rejected_and_not_stored(tmp_path: Path, kds: KdsServer,
                                                          milan: Platform) -> None:
    serve_platform(kds, milan)
    _, other = make_vcek(milan.chain, chip_id_for(Product.MILAN, seed=5), TCBS[Product.MILAN],
                         now=NOW)
    kds.put(urls.vcek_path(Product.MILAN, chip_id_for(Product.MILAN), TCBS[Product.MILAN]), DER,
            other.der)
    cache = make_cache(tmp_path, kds, milan)
    with pytest.raises(UntrustedCertificate, match="hwID"):
        cache.vcek(Product.MILAN, chip_id_for(Product.MILAN), TCBS[Product.MILAN])
    assert not cache.vcek_path(Product.MILAN, chip_id_for(Product.MILAN),
                               TCBS[Product.MILAN]).exists()
    assert cache.stats.rejected == 1


def test_vcek_not_signed_by_the_ask_is_rejected(tmp_path: Path, kds: KdsServer,
                                                milan: Platform) -> None:
    serve_platform(kds, milan)
    impostor = make_chain(Product.MILAN, now=NOW, rsa_bits=2048)
    _, forged = make_vcek(impostor, chip_id_for(Product.MILAN), TCBS[Product.MILAN], now=NOW)
    ticks = Ticks()
    cache = make_cache(tmp_path, kds, milan, negative=NegativeCache(ttl=600, clock=ticks))
    cache.chain(Product.MILAN, Endorser.VCEK)  # fetch the chain first; the fault hits the VCEK
    kds.faults.push(Fault.wrong_body(forged.der), count=1)
    with pytest.raises(UntrustedCertificate, match="signature"):
        cache.vcek(Product.MILAN, chip_id_for(Product.MILAN), TCBS[Product.MILAN])
    assert not cache.vcek_path(Product.MILAN, chip_id_for(Product.MILAN),
                               TCBS[Product.MILAN]).exists()
    # The rejection is remembered (a repeat costs no request), not stored ...
    asked = len(kds.requests)
    with pytest.raises(CertificatesUnavailable, match="signature"):
        cache.vcek(Product.MILAN, chip_id_for(Product.MILAN), TCBS[Product.MILAN])
    assert len(kds.requests) == asked
    # ... and once it has expired, the next, honest answer is accepted.
    ticks.now += 601
    cert = cache.vcek(Product.MILAN, chip_id_for(Product.MILAN), TCBS[Product.MILAN])
    assert cert.der == milan.vcek.der


def test_wrong_product_chain_is_rejected(tmp_path: Path, kds: KdsServer, milan: Platform,
                                         genoa: Platform) -> None:
    kds.put(urls.cert_chain_path(Product.MILAN), PEM, chain_pem(genoa))
    cache = CertificateCache(tmp_path / "c", client(kds.url),
                             roots=milan.roots.with_explicit(genoa.chain.ark), clock=Clock(NOW))
    with pytest.raises(UntrustedCertificate, match="CN"):
        cache.chain(Product.MILAN, Endorser.VCEK)
    assert not (cache.chain_dir(Product.MILAN, Endorser.VCEK) / "ark.pem").exists()


def test_unpinned_chain_is_rejected_under_amd_roots(tmp_path: Path, kds: KdsServer,
                                                    milan: Platform) -> None:
    serve_platform(kds, milan)
    cache = CertificateCache(tmp_path / "c", client(kds.url),
                             roots=AMD_ROOTS)
    with pytest.raises(UntrustedCertificate, match="not a pinned AMD root"):
        cache.chain(Product.MILAN, Endorser.VCEK)
    assert not list((tmp_path / "c").rglob("*.pem"))


def test_real_amd_chain_from_a_loopback_kds(tmp_path: Path, kds: KdsServer,
                                            vectors_dir: Path) -> None:
    for product in Product:
        body = (vectors_dir / "roots" / f"{product.value.lower()}_vcek_chain.pem").read_bytes()
        kds.put(urls.cert_chain_path(product), PEM, body)
    cache = CertificateCache(tmp_path / "c", client(kds.url))
    for product in Product:
        ark, _ask = cache.chain(product, Endorser.VCEK)
        assert ark.subject.common_name == f"ARK-{product}"
    # Asking for Genoa but being served Milan's chain: rejected.
    kds.put(urls.cert_chain_path(Product.GENOA, Endorser.VLEK), PEM,
            (vectors_dir / "roots" / "milan_vlek_chain.pem").read_bytes())
    with pytest.raises(UntrustedCertificate):
        cache.chain(Product.GENOA, Endorser.VLEK)


def test_offline_mode_never_fetches(tmp_path: Path, kds: KdsServer, milan: Platform) -> None:
    serve_platform(kds, milan)
    cache = make_cache(tmp_path, kds, milan, offline=True)
    with pytest.raises(CertificatesUnavailable, match="offline"):
        cache.chain(Product.MILAN, Endorser.VCEK)
    assert kds.requests == []


def test_offline_dirs_are_consulted_first(tmp_path: Path, kds: KdsServer,
                                          milan: Platform) -> None:
    from snpd.certsdir import write_certs_dir

    certs_dir = tmp_path / "certs"
    write_certs_dir(certs_dir, milan.certs(), "der")
    cache = make_cache(tmp_path, kds, milan, offline_dirs=[certs_dir])
    cert = cache.vcek(Product.MILAN, chip_id_for(Product.MILAN), TCBS[Product.MILAN])
    assert cert.der == milan.vcek.der and kds.requests == []
    assert cache.stats.offline_hits == 2


def test_corrupt_cache_entries_are_evicted_and_refetched(tmp_path: Path, kds: KdsServer,
                                                         milan: Platform) -> None:
    serve_platform(kds, milan)
    chip, tcb = chip_id_for(Product.MILAN), TCBS[Product.MILAN]
    cache = make_cache(tmp_path, kds, milan)
    cache.vcek(Product.MILAN, chip, tcb)
    path = cache.vcek_path(Product.MILAN, chip, tcb)
    path.write_bytes(path.read_bytes()[:100])  # as if half-written by something else
    (cache.chain_dir(Product.MILAN, Endorser.VCEK) / "ark.pem").write_text("garbage")
    again = make_cache(tmp_path, kds, milan)
    assert again.vcek(Product.MILAN, chip, tcb).der == milan.vcek.der
    assert path.read_bytes() == milan.vcek.der
    assert again.stats.evicted == 3  # ark, ask (evicted together) and the VCEK
    assert len(kds.requests) == 4


def test_stale_temporaries_are_removed(tmp_path: Path, milan: Platform) -> None:
    leftover = tmp_path / "cache" / "Milan" / "vcek" / ".ark.pem.1234.tmp"
    leftover.parent.mkdir(parents=True)
    leftover.write_bytes(b"half")
    make_cache(tmp_path, None, milan)
    assert not leftover.exists()


def test_faults_are_absorbed_then_the_answer_is_stored(tmp_path: Path, kds: KdsServer,
                                                       milan: Platform) -> None:
    serve_platform(kds, milan)
    kds.faults.push(Fault.status(429, retry_after=0), count=1)
    kds.faults.push(Fault.status(500), count=1)
    kds.faults.push(Fault.truncate(), count=1)
    cache = make_cache(tmp_path, kds, milan)
    cert = cache.vcek(Product.MILAN, chip_id_for(Product.MILAN), TCBS[Product.MILAN])
    assert cert.der == milan.vcek.der
    assert len(kds.requests) == 5


def test_kds_down_is_certificates_unavailable(tmp_path: Path, kds: KdsServer,
                                              milan: Platform) -> None:
    serve_platform(kds, milan)
    kds.faults.push(Fault.status(503), count=None)
    cache = CertificateCache(tmp_path / "c", client(kds.url, deadline=0.5,
                                                    max_retries=2), roots=milan.roots)
    with pytest.raises(CertificatesUnavailable):
        cache.chain(Product.MILAN, Endorser.VCEK)
    assert cache.stats.fetch_failures == 1
    assert not list((tmp_path / "c").rglob("*.pem"))


def test_crl_refresh_by_next_update_keeps_last_good(tmp_path: Path, kds: KdsServer,
                                                    milan: Platform) -> None:
    first = make_crl(milan.chain, now=NOW, next_update=NOW + datetime.timedelta(days=1))
    serve_platform(kds, milan, crl=first)
    clock = Clock(NOW)
    cache = make_cache(tmp_path, kds, milan, clock=clock)
    got = cache.crl(Product.MILAN, Endorser.VCEK)
    assert got is not None and got.der == first.der
    assert cache.crl(Product.MILAN, Endorser.VCEK).der == first.der  # type: ignore[union-attr]
    crl_fetches = lambda: len([r for r in kds.requests if r.endswith("/crl")])  # noqa: E731
    assert crl_fetches() == 1
    # Past nextUpdate: refreshed.
    clock.now = NOW + datetime.timedelta(days=2)
    second = make_crl(milan.chain, now=clock.now, revoked=[5])
    kds.put(urls.crl_path(Product.MILAN), "application/pkix-crl", second.der)
    assert cache.crl(Product.MILAN, Endorser.VCEK).der == second.der  # type: ignore[union-attr]
    assert crl_fetches() == 2
    # Past its nextUpdate with the KDS failing: the last good CRL is kept, and the
    # failing endpoint is not asked again within the retry window.
    clock.now = NOW + datetime.timedelta(days=30)
    kds.faults.push(Fault.status(404), count=None)
    assert cache.crl(Product.MILAN, Endorser.VCEK).der == second.der  # type: ignore[union-attr]
    assert cache.crl(Product.MILAN, Endorser.VCEK).der == second.der  # type: ignore[union-attr]
    assert crl_fetches() == 3


def test_crl_not_signed_by_the_ark_is_not_stored(tmp_path: Path, kds: KdsServer,
                                                 milan: Platform, genoa: Platform) -> None:
    serve_platform(kds, milan, crl=make_crl(genoa.chain, now=NOW))
    cache = make_cache(tmp_path, kds, milan)
    assert cache.crl(Product.MILAN, Endorser.VCEK) is None
    assert not (cache.chain_dir(Product.MILAN, Endorser.VCEK) / "crl.der").exists()


# -- negative caching, the cache-only gate ------------------------------------------------


def test_a_failed_vcek_lookup_is_remembered_then_asked_again(tmp_path: Path, kds: KdsServer,
                                                             milan: Platform) -> None:
    serve_platform(kds, milan)
    ticks = Ticks()
    cache = make_cache(tmp_path, kds, milan, negative=NegativeCache(ttl=600, clock=ticks))
    forged = chip_id_for(Product.MILAN, seed=9)
    with pytest.raises(KdsError, match="404") as first:
        cache.vcek(Product.MILAN, forged, TCBS[Product.MILAN])
    assert first.value.status == 404
    for _ in range(5):
        with pytest.raises(KdsError, match="not asked again .* 404") as again:
            cache.vcek(Product.MILAN, forged, TCBS[Product.MILAN])
        assert again.value.status == 404
    assert len(vcek_requests(kds)) == 1 and cache.stats.negative_hits == 5
    # Another TCB of the same chip, and the genuine chip, are other lookups.
    cache.vcek(Product.MILAN, chip_id_for(Product.MILAN), TCBS[Product.MILAN])
    assert len(vcek_requests(kds)) == 2
    ticks.now += 599
    with pytest.raises(KdsError, match="not asked again"):
        cache.vcek(Product.MILAN, forged, TCBS[Product.MILAN])
    ticks.now += 1
    with pytest.raises(KdsError, match="404"):
        cache.vcek(Product.MILAN, forged, TCBS[Product.MILAN])
    assert len(vcek_requests(kds)) == 3
    # The memory holds no chip ID, in any spelling.
    held = repr(list(cache.negative._entries.items()))
    for chip in (forged, chip_id_for(Product.MILAN)):
        assert chip.hex() not in held and repr(chip)[2:-1] not in held


def test_a_429_retry_after_is_remembered_that_long_and_pauses_the_kds(
        tmp_path: Path, kds: KdsServer, milan: Platform) -> None:
    serve_platform(kds, milan)
    ticks = Ticks()
    kds_client = client(kds.url, clock=ticks, max_retry_wait=2.0)
    cache = CertificateCache(tmp_path / "c", kds_client, roots=milan.roots,
                             negative=NegativeCache(ttl=600, clock=ticks))
    cache.chain(Product.MILAN, Endorser.VCEK)
    kds.faults.push(Fault.status(429, retry_after=10), count=None)
    asked = len(kds.requests)
    forged = [chip_id_for(Product.MILAN, seed=s) for s in range(20, 30)]
    for chip in forged:  # many chips, one request: the rest meet the pause
        with pytest.raises(KdsError) as info:
            cache.vcek(Product.MILAN, chip, TCBS[Product.MILAN])
        assert info.value.status == 429
    assert len(kds.requests) == asked + 1
    ticks.now += 9
    with pytest.raises(KdsError, match="not asked again"):
        cache.vcek(Product.MILAN, forged[0], TCBS[Product.MILAN])
    kds.faults.clear()
    ticks.now += 1  # Retry-After has passed: remembered no longer, and not paused
    cache.vcek(Product.MILAN, chip_id_for(Product.MILAN), TCBS[Product.MILAN])
    with pytest.raises(KdsError, match="404"):
        cache.vcek(Product.MILAN, forged[0], TCBS[Product.MILAN])
    assert len(kds.requests) == asked + 3


def test_negative_cache_is_bounded_and_honours_retry_after() -> None:
    ticks = Ticks()
    negative = NegativeCache(ttl=600, max_entries=3, clock=ticks)
    for key in range(5):
        negative.remember(key, KdsError("KDS answered HTTP 404", status=404))
    assert len(negative) == 3
    negative.check(0, "x")  # the oldest were forgotten
    with pytest.raises(KdsError, match="x: not asked again for 600 s"):
        negative.check(4, "x")
    throttled = KdsError("KDS rate limit (HTTP 429)", status=429, retry_after=7.0)
    assert negative.lifetime(throttled) == 7.0
    assert negative.lifetime(KdsError("HTTP 503", status=503, retry_after=1e9)) == 3600.0
    assert negative.lifetime(KdsError("HTTP 500", status=500, retry_after=7.0)) == 600
    negative.remember("now", KdsError("HTTP 429", status=429, retry_after=0.0))
    negative.check("now", "x")  # Retry-After: 0 means ask again at once
    ticks.now += 601
    negative.check(4, "x")


def test_cache_only_lookups_never_fetch(tmp_path: Path, kds: KdsServer,
                                        milan: Platform) -> None:
    serve_platform(kds, milan, crl=make_crl(milan.chain, now=NOW))
    cache = make_cache(tmp_path, kds, milan)
    chip, tcb = chip_id_for(Product.MILAN), TCBS[Product.MILAN]
    with pytest.raises(NotCached):
        cache.certificates(Product.MILAN, Endorser.VCEK, chip_id=chip, tcb=tcb,
                           gate=cache_only)
    assert kds.requests == []
    fetched = cache.certificates(Product.MILAN, Endorser.VCEK, chip_id=chip, tcb=tcb,
                                 with_crl=True)
    local = cache.certificates(Product.MILAN, Endorser.VCEK, chip_id=chip, tcb=tcb,
                               with_crl=True, gate=cache_only)
    assert dict(local.items()).keys() == dict(fetched.items()).keys()
    assert len(kds.requests) == 3
    # A remembered failure is a cache-only answer too.
    forged = chip_id_for(Product.MILAN, seed=3)
    with pytest.raises(KdsError):
        cache.vcek(Product.MILAN, forged, tcb)
    with pytest.raises(KdsError, match="not asked again"):
        cache.vcek(Product.MILAN, forged, tcb, gate=cache_only)


def test_a_refused_fetch_is_not_remembered(tmp_path: Path, kds: KdsServer,
                                           milan: Platform) -> None:
    serve_platform(kds, milan)
    cache = make_cache(tmp_path, kds, milan)
    chip, tcb = chip_id_for(Product.MILAN), TCBS[Product.MILAN]
    cache.chain(Product.MILAN, Endorser.VCEK)
    refused: List[str] = []

    def refuse(what: str) -> None:
        refused.append(what)
        raise KdsBudgetExceeded("no budget left", limit="fetches")

    with pytest.raises(KdsBudgetExceeded):
        cache.vcek(Product.MILAN, chip, tcb, gate=refuse)
    assert refused == [f"the {Product.MILAN} VCEK for TCB {tcb}"]
    assert vcek_requests(kds) == [] and len(cache.negative) == 0
    assert cache.vcek(Product.MILAN, chip, tcb).der == milan.vcek.der
