"""Azure's THIM endpoint as a VCEK mirror (issue 14): the parser, the HTTP source
against a real loopback server that, like IMDS, insists on ``Metadata: true``, and
the cache that asks THIM first and falls through to the KDS for anything THIM cannot
vouch for, never storing what does not verify."""

from __future__ import annotations

import dataclasses
import json
import socket
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional

import pytest
from emuplatform import NOW, TCBS, Platform, chip_id_for  # type: ignore[import-not-found]
from test_kds_cache import Clock, client, serve_platform  # type: ignore[import-not-found]

from snpd.abi.product import Endorser, Product
from snpd.abi.tcb import TcbVersion
from snpd.config import parse_config
from snpd.emulator import pki
from snpd.emulator.kds import JSON, thim_json
from snpd.emulator.kds_server import Fault, KdsServer
from snpd.errors import (
    CertificateFormatError,
    CertificatesUnavailable,
    ConfigError,
    KdsBudgetExceeded,
    KdsError,
)
from snpd.kds.cache import CertificateCache, NotCached, cache_only
from snpd.kds.thim import MAX_THIM_BODY, THIM_PATH, ThimSource, parse_thim, tcbm_text
from snpd.trust.admission import check_ca_chain, check_vcek_binding
from snpd.trust.x509 import load_certificate

P = Product.MILAN
CHIP = chip_id_for(P)
TCB = TCBS[P]


def good_json(p: Platform, **replace: Any) -> bytes:
    fields: Dict[str, Any] = {"vcek": p.vcek, "tcbm": TCB.raw,
                              "chain": (p.chain.ask, p.chain.ark)}
    fields.update(replace)
    return thim_json(**fields)


@pytest.fixture
def thim() -> Iterator[KdsServer]:
    """THIM on loopback: like IMDS, a request without ``Metadata: true`` gets 400."""
    with KdsServer(required_headers={"Metadata": "true"}) as server:
        yield server


@pytest.fixture
def kds() -> Iterator[KdsServer]:
    with KdsServer() as server:
        yield server


_SOURCES: List[ThimSource] = []


@pytest.fixture(autouse=True)
def _close_sources() -> Iterator[None]:
    yield
    while _SOURCES:
        _SOURCES.pop().close()


def source(server: KdsServer, **kw: Any) -> ThimSource:
    options: Dict[str, Any] = dict(deadline=5, connect_timeout=0.5, read_timeout=0.5)
    options.update(kw)
    made = ThimSource(server.url + THIM_PATH, **options)
    _SOURCES.append(made)
    return made


def dead_url() -> str:
    """An http URL whose port refuses connections (bound, never listening)."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    return f"http://127.0.0.1:{port}"


def make_cache(tmp_path: Path, p: Platform, kds_url: str, thim_server: Optional[KdsServer],
               **kw: Any) -> CertificateCache:
    return CertificateCache(tmp_path / "cache", client(kds_url), roots=p.roots,
                            clock=Clock(NOW),
                            thim=source(thim_server) if thim_server is not None else None,
                            **kw)


def stored(cache: CertificateCache) -> Dict[str, bytes]:
    return {str(f.relative_to(cache.root)): f.read_bytes()
            for f in sorted(cache.root.rglob("*")) if f.is_file()}


def assert_genuine_only(cache: CertificateCache, p: Platform) -> None:
    """Everything in the cache verifies, and the VCEK is the genuine one."""
    files = stored(cache)
    assert set(files) <= {"Milan/vcek/ark.pem", "Milan/vcek/ask.pem",
                          f"Milan/vcek/chips/{CHIP.hex()}/{TCB.raw:016x}.der"}, files
    ark, ask = check_ca_chain([load_certificate(files["Milan/vcek/ark.pem"]),
                               load_certificate(files["Milan/vcek/ask.pem"])],
                              P, Endorser.VCEK, roots=p.roots)
    vcek = files.get(f"Milan/vcek/chips/{CHIP.hex()}/{TCB.raw:016x}.der")
    if vcek is not None:
        assert vcek == p.vcek.der
        check_vcek_binding(load_certificate(vcek), P, CHIP, TCB, intermediate=ask)


# -- the answer ---------------------------------------------------------------------------


def test_a_thim_answer_parses(milan: Platform) -> None:
    answer = parse_thim(good_json(milan))
    assert answer.vcek.der == milan.vcek.der
    assert [c.der for c in answer.chain] == [milan.chain.ask.der, milan.chain.ark.der]
    assert answer.tcbm == TCB.raw
    assert repr(answer) == f"ThimAnswer(tcbm={TCB.raw})"  # no certificate bytes


def test_tcbm_is_the_reported_tcb_bytes_reversed() -> None:
    """Azure spells Milan's bootloader 4, TEE 0, SNP 24, microcode 219 "DB18000000000004"
    (microsoft/CCF src/node/node_state.h: "reverse the bytes")."""
    tcb = TcbVersion.from_parts(Product.MILAN, bootloader=4, tee=0, snp=24, microcode=0xDB)
    assert tcbm_text(tcb.raw) == "DB18000000000004"
    assert int("DB18000000000004", 16) == tcb.raw


BAD = {
    "not JSON": b"\xff\xfe<html>",
    "a list": b"[]",
    "duplicate key": b'{"tcbm": "0000000000000000", "tcbm": "0000000000000001"}',
    "nesting bomb": b"[" * 5000,
    "no vcekCert": None,
    "tcbm not hex": None,
    "tcbm short": None,
    "vcek not PEM": None,
    "chain not PEM": None,
    "oversize": b" " * (MAX_THIM_BODY + 1),
}


def bad_body(name: str, p: Platform) -> bytes:
    body = BAD[name]
    if body is not None:
        return body
    doc = json.loads(good_json(p))
    if name == "no vcekCert":
        del doc["vcekCert"]
    elif name == "tcbm not hex":
        doc["tcbm"] = "DB1800000000000G"
    elif name == "tcbm short":
        doc["tcbm"] = "DB18"
    elif name == "vcek not PEM":
        doc["vcekCert"] = "-----BEGIN CERTIFICATE-----\nnot base64!\n-----END CERTIFICATE-----\n"
    elif name == "chain not PEM":
        doc["certificateChain"] = "ASK and ARK"
    return json.dumps(doc).encode()


@pytest.mark.parametrize("name", sorted(BAD))
def test_a_malformed_answer_is_a_format_error(name: str, milan: Platform) -> None:
    with pytest.raises(CertificateFormatError, match="THIM answer"):
        parse_thim(bad_body(name, milan))


# -- the HTTP source ----------------------------------------------------------------------


def test_the_source_sends_metadata_true(thim: KdsServer, milan: Platform) -> None:
    thim.put(THIM_PATH, JSON, good_json(milan))
    answer = source(thim).fetch()
    assert answer.vcek.der == milan.vcek.der
    assert thim.requests == [THIM_PATH]
    assert thim.request_headers[0].get("Metadata") == "true"


def test_without_the_header_imds_refuses(thim: KdsServer, milan: Platform) -> None:
    """The loopback THIM does what IMDS does, so the test above can fail."""
    thim.put(THIM_PATH, JSON, good_json(milan))
    with pytest.raises(KdsError, match="400"):
        client(thim.url).get(THIM_PATH)


def test_the_source_ignores_proxy_settings(thim: KdsServer, milan: Platform,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """IMDS is asked directly: a proxy in the environment (here a dead one) is not used."""
    thim.put(THIM_PATH, JSON, good_json(milan))
    for name in ("HTTP_PROXY", "http_proxy", "ALL_PROXY"):
        monkeypatch.setenv(name, dead_url())
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    assert source(thim).fetch().tcbm == TCB.raw


def test_the_body_is_bounded(thim: KdsServer) -> None:
    thim.faults.push(Fault.unsized(b"{" + b" " * (2 * MAX_THIM_BODY)), count=None)
    with pytest.raises(KdsError, match=f"{MAX_THIM_BODY}-byte limit"):
        source(thim).fetch()


def test_the_source_rejects_a_bad_url() -> None:
    for url in ("ftp://169.254.169.254/x", "http:///x", "http://h/x?a=b"):
        with pytest.raises(ValueError):
            ThimSource(url)


def test_the_thim_key_is_an_optional_url() -> None:
    assert parse_config("").kds.thim == ""
    url = "http://169.254.169.254/metadata/THIM/amd/certification"
    assert parse_config(f'[kds]\nthim = "{url}"\n').kds.thim == url
    for bad in ('"169.254.169.254"', '"http://h/x?y=1"', "1"):
        with pytest.raises(ConfigError, match="kds.thim"):
            parse_config(f"[kds]\nthim = {bad}\n")


# -- the cache: THIM first, the KDS for the rest --------------------------------------------


def test_the_vcek_and_its_chain_come_from_thim_with_the_kds_unreachable(
        tmp_path: Path, thim: KdsServer, milan: Platform) -> None:
    thim.put(THIM_PATH, JSON, good_json(milan))
    events: List[str] = []
    cache = make_cache(tmp_path, milan, dead_url(), thim,
                       observer=lambda what, outcome: events.append(f"{what}: {outcome}"))
    certs = cache.certificates(P, Endorser.VCEK, chip_id=CHIP, tcb=TCB)
    assert certs.vcek is not None and certs.vcek.der == milan.vcek.der
    assert certs.ask is not None and certs.ask.der == milan.chain.ask.der
    assert certs.ark is not None and certs.ark.der == milan.chain.ark.der
    assert cache.stats.thim_hits == 1 and cache.stats.fetch_failures == 0
    assert events == ["the Milan VCEK for TCB " + str(TCB) + " from THIM: admitted"]
    assert_genuine_only(cache, milan)
    assert len(stored(cache)) == 3
    # Cached now: no further request to THIM, and a cache-only lookup answers.
    cache.certificates(P, Endorser.VCEK, chip_id=CHIP, tcb=TCB, gate=cache_only)
    cache.vcek(P, CHIP, TCB)
    assert thim.requests == [THIM_PATH]


def test_a_cached_chain_is_kept_and_thims_vcek_checked_against_it(
        tmp_path: Path, thim: KdsServer, kds: KdsServer, milan: Platform) -> None:
    """With the chain already cached, THIM's VCEK is verified against the cached ASK,
    and THIM's own chain is not needed (nor stored over it)."""
    serve_platform(kds, milan)
    other = pki.make_chain(P, now=NOW, rsa_bits=2048)  # THIM's chain is not even looked at
    thim.put(THIM_PATH, JSON, good_json(milan, chain=(other.ask, other.ark)))
    cache = make_cache(tmp_path, milan, kds.url, thim)
    cache.chain(P, Endorser.VCEK)
    assert cache.vcek(P, CHIP, TCB).der == milan.vcek.der
    assert cache.stats.thim_hits == 1
    assert [r for r in kds.requests if "SPL" in r] == []
    assert_genuine_only(cache, milan)


def _wrong(name: str, p: Platform) -> Dict[str, Any]:
    """A THIM answer THIM cannot vouch for: (body or fault) for the loopback THIM."""
    if name == "another TCB":
        newer = TcbVersion.from_parts(P, bootloader=4, tee=0, snp=25, microcode=217)
        _key, vcek = pki.make_vcek(p.chain, CHIP, newer, now=NOW)
        return {"body": good_json(p, vcek=vcek, tcbm=newer.raw)}
    if name == "tcbm lies":  # the certificate is for another TCB; tcbm says ours
        newer = TcbVersion.from_parts(P, bootloader=4, tee=0, snp=25, microcode=217)
        _key, vcek = pki.make_vcek(p.chain, CHIP, newer, now=NOW)
        return {"body": good_json(p, vcek=vcek)}
    if name == "another chip":
        _key, vcek = pki.make_vcek(p.chain, chip_id_for(P, seed=2), TCB, now=NOW)
        return {"body": good_json(p, vcek=vcek)}
    if name == "not signed by the ASK":
        forged = dataclasses.replace(p.chain, ask_key=pki.new_rsa_key(2048))
        _key, vcek = pki.make_vcek(forged, CHIP, TCB, now=NOW)
        return {"body": good_json(p, vcek=vcek)}
    if name == "another root":
        other = pki.make_chain(P, now=NOW, rsa_bits=2048)
        _key, vcek = pki.make_vcek(other, CHIP, TCB, now=NOW)
        return {"body": good_json(p, vcek=vcek, chain=(other.ask, other.ark))}
    if name == "garbage":
        return {"body": b"\x00garbage{"}
    if name == "HTTP 500":
        return {"fault": Fault.status(500)}
    if name == "oversize":
        return {"fault": Fault.unsized(b" " * (MAX_THIM_BODY + 10))}
    raise AssertionError(name)


WRONG = ("another TCB", "tcbm lies", "another chip", "not signed by the ASK", "another root",
         "garbage", "HTTP 500", "oversize")


@pytest.mark.parametrize("name", WRONG)
def test_what_thim_cannot_vouch_for_falls_through_to_the_kds(
        name: str, tmp_path: Path, thim: KdsServer, kds: KdsServer, milan: Platform) -> None:
    serve_platform(kds, milan)
    wrong = _wrong(name, milan)
    if "body" in wrong:
        thim.put(THIM_PATH, JSON, wrong["body"])
    else:
        thim.put(THIM_PATH, JSON, good_json(milan))
        thim.faults.push(wrong["fault"], count=None)
    events: List[str] = []
    cache = make_cache(tmp_path, milan, kds.url, thim,
                       observer=lambda what, outcome: events.append(f"{what}: {outcome}"))
    certs = cache.certificates(P, Endorser.VCEK, chip_id=CHIP, tcb=TCB)
    assert certs.vcek is not None and certs.vcek.der == milan.vcek.der
    assert THIM_PATH in thim.requests
    assert len([r for r in kds.requests if "SPL" in r]) == 1  # the KDS gave the VCEK
    assert cache.stats.thim_hits == 0 and cache.stats.thim_fallbacks == 1
    assert any("from THIM: failed, so the KDS is asked" in e for e in events), events
    assert_genuine_only(cache, milan)


@pytest.mark.parametrize("name", ("another chip", "not signed by the ASK", "another root",
                                  "garbage"))
def test_nothing_is_cached_when_thim_is_wrong_and_the_kds_is_down(
        name: str, tmp_path: Path, thim: KdsServer, milan: Platform) -> None:
    thim.put(THIM_PATH, JSON, _wrong(name, milan)["body"])
    cache = make_cache(tmp_path, milan, dead_url(), thim)
    with pytest.raises(KdsError):
        cache.certificates(P, Endorser.VCEK, chip_id=CHIP, tcb=TCB)
    assert stored(cache) == {}
    # THIM's refusal is remembered: the next lookup goes straight to the KDS.
    with pytest.raises(KdsError):
        cache.vcek(P, CHIP, TCB)
    assert thim.requests == [THIM_PATH]
    assert cache.stats.thim_fallbacks == 1
    assert stored(cache) == {}


def test_thim_is_not_asked_cache_only_offline_or_past_the_budget(
        tmp_path: Path, thim: KdsServer, milan: Platform) -> None:
    thim.put(THIM_PATH, JSON, good_json(milan))
    cache = make_cache(tmp_path, milan, dead_url(), thim)
    with pytest.raises(NotCached):
        cache.vcek(P, CHIP, TCB, gate=cache_only)

    def refuse(what: str) -> None:
        raise KdsBudgetExceeded(f"no budget for {what}", limit="fetches")

    with pytest.raises(KdsBudgetExceeded, match="from THIM"):
        cache.vcek(P, CHIP, TCB, gate=refuse)
    offline = CertificateCache(tmp_path / "offline", client(dead_url()), offline=True,
                               roots=milan.roots, thim=source(thim))
    with pytest.raises(CertificatesUnavailable, match="offline"):
        offline.vcek(P, CHIP, TCB)
    assert thim.requests == []
    assert stored(cache) == {}


def test_a_vlek_chain_never_asks_thim(tmp_path: Path, thim: KdsServer, kds: KdsServer,
                                      milan: Platform) -> None:
    serve_platform(kds, milan)
    thim.put(THIM_PATH, JSON, good_json(milan))
    cache = make_cache(tmp_path, milan, kds.url, thim)
    certs = cache.certificates(P, Endorser.VLEK)
    assert certs.asvk is not None and certs.asvk.der == milan.chain.asvk.der
    assert thim.requests == []
