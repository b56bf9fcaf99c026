"""KdsClient against a real KdsServer on 127.0.0.1, with injected faults.

Timeouts, deadlines and backoffs are tiny so the file runs in seconds. Nothing here
asserts on elapsed time (docs/contracts.md, "Performance budget"): outcomes, request counts and the
delays the client *asked* to sleep are what is checked.
"""

from __future__ import annotations

import random
import socket
import threading
import time
from email.utils import formatdate
from typing import Any, Iterator, List

import pytest
import requests

from snpd.abi import Endorser, Product, TcbVersion, parse_report
from snpd.emulator.kds_server import Fault, KdsServer
from snpd.errors import CertificatesUnavailable, KdsError
from snpd.kds.client import KdsClient, backoff_delay, parse_retry_after
from snpd.kds.urls import cert_chain_path, chip_digest, crl_path, vcek_path

CHAIN = b"-----BEGIN CERTIFICATE-----\nASK\n-----END CERTIFICATE-----\n" * 2
CRL = b"\x30\x82\x01\x00" + b"crl" * 80
VCEK = b"\x30\x82\x05\x00" + b"vcek" * 300
TURIN_VCEK = b"\x30\x82\x05\x00" + b"turin" * 300
CHIP = bytes(range(0x40, 0x80))
MILAN_TCB = TcbVersion.decode(0x4405000000000002, Product.MILAN)
TURIN_CHIP = bytes.fromhex("3b42092f69c656d3") + bytes(56)
TURIN_TCB = TcbVersion.decode(0x4700000002000100, Product.TURIN)

CHAIN_PATH = cert_chain_path(Product.MILAN)
MISSING_PATH = crl_path(Product.GENOA)
MAX_RETRIES = 3


def _store() -> dict:
    return {
        CHAIN_PATH: ("application/x-pem-file", CHAIN),
        crl_path(Product.MILAN): ("application/pkix-crl", CRL),
        vcek_path(Product.MILAN, CHIP, MILAN_TCB): ("application/pkix-cert", VCEK),
        # stored under Oak's parameter order: the server must not care
        "/vcek/v1/Turin/3b42092f69c656d3?ucodeSPL=71&snpSPL=2&teeSPL=0&blSPL=1&fmcSPL=0":
            ("application/pkix-cert", TURIN_VCEK),
    }


class SleepLog:
    """An injected sleep that records what the client asked for, then really sleeps."""

    def __init__(self) -> None:
        self.delays: List[float] = []

    def __call__(self, seconds: float) -> None:
        self.delays.append(seconds)
        time.sleep(seconds)


@pytest.fixture
def srv() -> Iterator[KdsServer]:
    with KdsServer(_store()) as server:
        yield server


@pytest.fixture
def sleeps() -> SleepLog:
    return SleepLog()


@pytest.fixture
def make_client(sleeps: SleepLog) -> Iterator[Any]:
    clients: List[KdsClient] = []

    def make(base: str, **overrides: Any) -> KdsClient:
        options: dict = dict(connect_timeout=0.5, read_timeout=0.3, deadline=2.0,
                             backoff_base=0.01, backoff_max=0.05, max_retries=MAX_RETRIES,
                             sleep=sleeps, rng=random.Random(1))
        options.update(overrides)
        client = KdsClient(base, **options)
        clients.append(client)
        return client

    yield make
    for client in clients:
        client.close()


def _closed_port() -> int:
    """A loopback port with nothing listening (connection refused)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# ------------------------------------------------------------------ success ---


def test_fetches_chain_crl_and_vcek(srv, make_client, sleeps):
    client = make_client(srv.url)
    assert client.fetch_cert_chain(Product.MILAN) == CHAIN
    assert client.fetch_crl(Product.MILAN, Endorser.VCEK) == CRL
    assert client.fetch_vcek(Product.MILAN, CHIP, MILAN_TCB) == VCEK
    assert client.fetch_vcek(Product.TURIN, TURIN_CHIP, TURIN_TCB) == TURIN_VCEK
    assert srv.requests == [
        CHAIN_PATH,
        "/vcek/v1/Milan/crl",
        f"/vcek/v1/Milan/{CHIP.hex()}?blSPL=2&teeSPL=0&snpSPL=5&ucodeSPL=68",
        "/vcek/v1/Turin/3b42092f69c656d3?fmcSPL=0&blSPL=1&teeSPL=0&snpSPL=2&ucodeSPL=71",
    ]
    assert sleeps.delays == []


def test_server_ignores_parameter_order_and_padding(srv, make_client):
    client = make_client(srv.url)
    padded = f"/vcek/v1/Milan/{CHIP.hex()}?ucodeSPL=68&snpSPL=05&teeSPL=00&blSPL=02"
    assert client.get(padded) == VCEK
    assert srv.requests == [padded]  # recorded as received


def test_real_vcek_served_and_fetched_by_report(cases, case_dir, make_client):
    # Real data first: the URL built from a real report finds the real VCEK.
    fetched = 0
    for case in cases:
        if case.get("signer") != "VCEK" or case.get("expect") != "valid":
            continue
        report = parse_report((case_dir(case) / "report.bin").read_bytes())
        product = Product(case["product"])
        tcb = report.tcb("reported", product)
        der = (case_dir(case) / "vcek.der").read_bytes()
        with KdsServer({vcek_path(product, report.chip_id, tcb): ("application/pkix-cert",
                                                                   der)}) as server:
            assert make_client(server.url).fetch_vcek(product, report.chip_id, tcb) == der
        fetched += 1
    assert fetched >= 3


def test_latency_is_only_slower(srv, make_client):
    srv.faults.push(Fault.latency(0.05), count=2)
    client = make_client(srv.url)
    assert client.get(CHAIN_PATH) == CHAIN
    assert client.get(CHAIN_PATH) == CHAIN
    assert len(srv.requests) == 2


def test_wrong_body_is_returned_unverified(srv, make_client):
    # Verification is the trust layer's job: the client hands over what it got.
    srv.faults.push(Fault.wrong_body(b"not signed by the ASK"))
    assert make_client(srv.url).get(CHAIN_PATH) == b"not signed by the ASK"


def test_body_without_content_length_is_read_to_the_end(srv, make_client):
    srv.faults.push(Fault.unsized(VCEK))
    assert make_client(srv.url).get(CHAIN_PATH) == VCEK


# -------------------------------------------------------------------- 429 ---


def test_429_with_retry_after_then_success(srv, make_client, sleeps):
    srv.faults.push(Fault.status(429, retry_after=1))
    assert make_client(srv.url).get(CHAIN_PATH) == CHAIN
    assert len(srv.requests) == 2
    assert sleeps.delays == [1.0]  # the server's figure, not the tiny backoff


def test_429_with_http_date_retry_after_in_the_past_retries_at_once(srv, make_client, sleeps):
    srv.faults.push(Fault.status(429, retry_after=formatdate(time.time() - 60, usegmt=True)))
    assert make_client(srv.url).get(CHAIN_PATH) == CHAIN
    assert len(srv.requests) == 2
    assert sleeps.delays == []


def test_429_without_retry_after_backs_off_then_success(srv, make_client, sleeps):
    srv.faults.push(Fault.status(429))
    assert make_client(srv.url).get(CHAIN_PATH) == CHAIN
    assert len(srv.requests) == 2
    assert len(sleeps.delays) == 1
    assert 0.005 <= sleeps.delays[0] <= 0.01  # first retry: upper half of backoff_base


def test_malformed_retry_after_falls_back_to_backoff(srv, make_client, sleeps):
    srv.faults.push(Fault.status(503, retry_after="soon"))
    assert make_client(srv.url).get(CHAIN_PATH) == CHAIN
    assert len(sleeps.delays) == 1 and sleeps.delays[0] <= 0.01


def test_persistent_429_with_large_retry_after_fails_at_once(srv, make_client, sleeps):
    srv.faults.push(Fault.status(429, retry_after=3600), count=None)
    with pytest.raises(KdsError) as info:
        make_client(srv.url).get(CHAIN_PATH)
    assert len(srv.requests) == 1
    assert sleeps.delays == []  # did not sleep towards a deadline it cannot meet
    err = info.value
    assert err.status == 429
    assert err.url == srv.url + CHAIN_PATH
    assert "HTTP 429" in str(err) and "Retry-After" in str(err) and "3600" in str(err)
    assert "retry later" in str(err)


def test_persistent_429_exhausts_retries(srv, make_client, sleeps):
    srv.faults.push(Fault.status(429), count=None)
    with pytest.raises(KdsError) as info:
        make_client(srv.url).get(CHAIN_PATH)
    assert len(srv.requests) == MAX_RETRIES + 1
    assert len(sleeps.delays) == MAX_RETRIES
    assert info.value.status == 429
    assert f"after {MAX_RETRIES + 1} attempts" in str(info.value)
    assert str(info.value).startswith("KDS rate limit (HTTP 429")


def test_persistent_429_until_the_deadline(srv, make_client):
    """The deadline is on a clock only the backoff sleeps move, so a loaded machine
    (a slow loopback answer) cannot turn the 429 into a read timeout."""
    ticks = Ticks()
    delays: List[float] = []

    def sleep(seconds: float) -> None:
        delays.append(seconds)
        ticks.now += seconds

    srv.faults.push(Fault.status(429), count=None)
    client = make_client(srv.url, deadline=5.0, read_timeout=5.0, backoff_base=1.0,
                         backoff_max=10, max_retries=50, clock=ticks, sleep=sleep)
    with pytest.raises(KdsError) as info:
        client.get(CHAIN_PATH)
    message = str(info.value)
    assert "KDS rate limit (HTTP 429" in message
    assert "persisted past the 5 s deadline" in message and "retry later" in message
    assert 1 <= len(srv.requests) < 50
    assert sum(delays) < 5.0  # never slept past the deadline


def test_backoff_grows_and_is_capped(srv, make_client, sleeps):
    srv.faults.push(Fault.status(503), count=None)
    client = make_client(srv.url, backoff_base=0.01, backoff_max=0.03, max_retries=5)
    with pytest.raises(KdsError):
        client.get(CHAIN_PATH)
    assert len(sleeps.delays) == 5
    first, second, *rest = sleeps.delays
    assert 0.005 <= first <= 0.01 and 0.01 <= second <= 0.02
    assert all(0.015 <= d <= 0.03 for d in rest)


# -------------------------------------------------------------------- 5xx ---


def test_500_twice_then_success(srv, make_client, sleeps):
    srv.faults.push(Fault.status(500), count=2)
    assert make_client(srv.url).get(CHAIN_PATH) == CHAIN
    assert len(srv.requests) == 3
    assert len(sleeps.delays) == 2


@pytest.mark.parametrize("status", [502, 503, 504])
def test_other_transient_statuses_are_retried(srv, make_client, status):
    srv.faults.push(Fault.status(status))
    assert make_client(srv.url).get(CHAIN_PATH) == CHAIN
    assert len(srv.requests) == 2


def test_unexpected_5xx_is_not_retried(srv, make_client):
    srv.faults.push(Fault.status(501), count=None)
    with pytest.raises(KdsError) as info:
        make_client(srv.url).get(CHAIN_PATH)
    assert len(srv.requests) == 1
    assert info.value.status == 501


# -------------------------------------------------------------------- 4xx ---


def test_404_is_not_retried(srv, make_client, sleeps):
    with pytest.raises(KdsError) as info:
        make_client(srv.url).get(MISSING_PATH)
    assert len(srv.requests) == 1
    assert sleeps.delays == []
    assert info.value.status == 404
    assert info.value.url == srv.url + MISSING_PATH
    assert "HTTP 404" in str(info.value) and "not retried" in str(info.value)
    assert isinstance(info.value, CertificatesUnavailable)


def test_403_is_not_retried(srv, make_client):
    srv.faults.push(Fault.status(403), count=None)
    with pytest.raises(KdsError) as info:
        make_client(srv.url).get(CHAIN_PATH)
    assert len(srv.requests) == 1
    assert info.value.status == 403


def test_404_for_a_vcek_does_not_leak_the_chip_id(srv, make_client):
    other_chip = bytes(range(1, 65))
    with pytest.raises(KdsError) as info:
        make_client(srv.url).fetch_vcek(Product.MILAN, other_chip, MILAN_TCB)
    assert info.value.status == 404
    for text in (str(info.value), info.value.url):
        assert other_chip.hex() not in text
        assert chip_digest(other_chip) in text
        assert "blSPL=2&teeSPL=0&snpSPL=5&ucodeSPL=68" in text
    assert len(srv.requests) == 1


def test_redirect_is_not_followed(srv, make_client):
    srv.faults.push(Fault.status(302), count=None)
    with pytest.raises(KdsError) as info:
        make_client(srv.url).get(CHAIN_PATH)
    assert len(srv.requests) == 1
    assert info.value.status == 302 and "redirect" in str(info.value)


# ------------------------------------------------------------ hangs, timeouts ---


def test_hang_then_read_timeout_then_success(srv, make_client):
    srv.faults.push(Fault.hang())  # until the server stops
    assert make_client(srv.url).get(CHAIN_PATH) == CHAIN
    assert len(srv.requests) == 2


def test_hang_forever_fails_by_the_deadline(srv, make_client):
    srv.faults.push(Fault.hang(), count=None)
    client = make_client(srv.url, read_timeout=0.3, deadline=1.0, max_retries=50)
    with pytest.raises(KdsError) as info:
        client.get(CHAIN_PATH)
    message = str(info.value)
    assert "read timeout" in message and "deadline" in message
    assert info.value.status is None
    assert 2 <= len(srv.requests) < 50


def test_connection_refused_fails_at_once(make_client, sleeps):
    # Permanent failures (refused, DNS, TLS): test_kds_permanent_errors.py.
    port = _closed_port()
    with pytest.raises(KdsError) as info:
        make_client(f"http://127.0.0.1:{port}").get(CHAIN_PATH)
    assert f"127.0.0.1:{port} refused the connection" in str(info.value)
    assert "not retried" in str(info.value)
    assert sleeps.delays == []


# ------------------------------------------------------------ broken bodies ---


def test_truncated_body_then_success(srv, make_client):
    srv.faults.push(Fault.truncate())
    assert make_client(srv.url).get(CHAIN_PATH) == CHAIN
    assert len(srv.requests) == 2


def test_truncated_forever_fails(srv, make_client):
    srv.faults.push(Fault.truncate(), count=None)
    with pytest.raises(KdsError) as info:
        make_client(srv.url).get(CHAIN_PATH)
    assert "cut short" in str(info.value)
    assert len(srv.requests) == MAX_RETRIES + 1


def test_empty_truncated_body_is_caught(srv, make_client):
    srv.faults.push(Fault.truncate(keep=0), count=None)
    with pytest.raises(KdsError, match="cut short"):
        make_client(srv.url).get(CHAIN_PATH)


def test_oversized_body_is_refused(srv, make_client):
    srv.faults.push(Fault.wrong_body(b"x" * 4096), count=None)
    with pytest.raises(KdsError) as info:
        make_client(srv.url, max_body=1024).get(CHAIN_PATH)
    assert "1024-byte limit" in str(info.value)
    assert len(srv.requests) == 1  # a server that sends too much is not asked again


def test_oversized_body_without_content_length_is_refused(srv, make_client):
    srv.faults.push(Fault.unsized(b"x" * (3 << 20)), count=None)  # 3 MiB, default 1 MiB cap
    with pytest.raises(KdsError, match="1048576-byte limit"):
        make_client(srv.url).get(CHAIN_PATH)
    assert len(srv.requests) == 1


# ----------------------------------------------------------------- mirrors ---


def test_mirror_serves_when_base_keeps_failing(srv, make_client):
    with KdsServer(_store()) as base:
        base.faults.push(Fault.status(503), count=None)
        client = make_client(base.url, mirrors=[srv.url + "/"])
        assert client.get(CHAIN_PATH) == CHAIN
        assert len(base.requests) == MAX_RETRIES + 1
        assert srv.requests == [CHAIN_PATH]


def test_mirror_with_path_prefix_after_connection_refused(make_client):
    with KdsServer({"/kds" + CHAIN_PATH: ("application/x-pem-file", CHAIN)}) as mirror:
        client = make_client(f"http://127.0.0.1:{_closed_port()}", mirrors=[mirror.url + "/kds"])
        assert client.get(CHAIN_PATH) == CHAIN
        assert mirror.requests == ["/kds" + CHAIN_PATH]


def test_large_retry_after_moves_on_to_the_mirror(srv, make_client, sleeps):
    with KdsServer(_store()) as base:
        base.faults.push(Fault.status(429, retry_after=3600), count=None)
        assert make_client(base.url, mirrors=[srv.url]).get(CHAIN_PATH) == CHAIN
        assert len(base.requests) == 1 and len(srv.requests) == 1
        assert sleeps.delays == []


class Ticks:
    """A monotonic clock the test steps (the deadline then never passes by itself)."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_retry_after_beyond_max_retry_wait_pauses_the_url(srv, make_client, sleeps):
    ticks = Ticks()
    srv.faults.push(Fault.status(429, retry_after=10), count=1)
    client = make_client(srv.url, max_retry_wait=2.0, clock=ticks)
    with pytest.raises(KdsError) as info:
        client.get(CHAIN_PATH)
    assert sleeps.delays == [] and len(srv.requests) == 1
    assert info.value.status == 429 and info.value.retry_after == 10.0
    assert "longer than snpd waits" in str(info.value)
    # Every call through the client now fails at once, without a request, while more
    # than max_retry_wait of the pause is left: a VCEK for any chip too.
    ticks.now += 7
    with pytest.raises(KdsError, match="not asked") as info:
        client.fetch_vcek(Product.MILAN, CHIP, MILAN_TCB)
    assert len(srv.requests) == 1 and sleeps.delays == []
    assert info.value.status == 429 and info.value.retry_after == pytest.approx(3.0)
    ticks.now += 3
    assert client.fetch_vcek(Product.MILAN, CHIP, MILAN_TCB) == VCEK
    assert len(srv.requests) == 2


def test_a_short_pause_is_waited_out_and_a_paused_base_leaves_the_mirror(srv, make_client,
                                                                          sleeps):
    with KdsServer(_store()) as base:
        base.faults.push(Fault.status(503, retry_after=3600), count=1)
        client = make_client(base.url, mirrors=[srv.url], max_retry_wait=1.0)
        assert client.get(CHAIN_PATH) == CHAIN  # from the mirror
        assert client.get(CHAIN_PATH) == CHAIN  # the base is paused: not asked again
        assert len(base.requests) == 1 and len(srv.requests) == 2
    srv.faults.push(Fault.status(429, retry_after=1), count=1)
    client = make_client(srv.url, max_retry_wait=1.0)
    assert client.get(CHAIN_PATH) == CHAIN  # slept through the second it asked for
    assert sleeps.delays == [1.0]


def test_404_from_base_is_final_mirrors_not_asked(srv, make_client):
    with KdsServer(_store()) as base:
        with pytest.raises(KdsError) as info:
            make_client(base.url, mirrors=[srv.url]).get(MISSING_PATH)
        assert info.value.status == 404
        assert srv.requests == []


def test_every_url_failing_is_reported(srv, make_client):
    with KdsServer(_store()) as base:
        base.faults.push(Fault.status(503), count=None)
        srv.faults.push(Fault.truncate(), count=None)
        with pytest.raises(KdsError) as info:
            make_client(base.url, mirrors=[srv.url]).get(CHAIN_PATH)
        message = str(info.value)
        assert message.startswith(f"all KDS URLs failed ({2 * (MAX_RETRIES + 1)} attempts)")
        assert base.url in message and "HTTP 503" in message
        assert srv.url in message and "cut short" in message
        assert info.value.url == srv.url + CHAIN_PATH
        assert info.value.status is None


def test_deadline_spans_mirrors(srv, make_client):
    with KdsServer(_store()) as base:
        base.faults.push(Fault.hang(), count=None)
        client = make_client(base.url, mirrors=[srv.url], read_timeout=5, deadline=0.4)
        with pytest.raises(KdsError) as info:
            client.get(CHAIN_PATH)
        assert "deadline" in str(info.value)
        assert srv.requests == []  # no time was left for the mirror
        assert srv.url in str(info.value)  # but the message says it was not tried


# ----------------------------------------------------------- client basics ---


def test_concurrent_calls_share_one_client(srv, make_client):
    client = make_client(srv.url)
    srv.faults.push(Fault.status(503), count=3)  # even all on one thread leaves it a try
    results: List[bytes] = []
    errors: List[BaseException] = []

    def fetch() -> None:
        try:
            results.append(client.get(CHAIN_PATH))
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=fetch) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and results == [CHAIN] * 4
    assert len(srv.requests) == 7


def test_injected_session_is_used_and_left_open(srv):
    class CountingSession(requests.Session):
        def __init__(self) -> None:
            super().__init__()
            self.calls = 0
            self.closed = False

        def request(self, *args: Any, **kwargs: Any) -> requests.Response:
            self.calls += 1
            return super().request(*args, **kwargs)

        def close(self) -> None:
            self.closed = True
            super().close()

    session = CountingSession()
    try:
        with KdsClient(srv.url, session=session) as client:
            assert client.get(CHAIN_PATH) == CHAIN
        assert session.calls == 1 and not session.closed
    finally:
        session.close()


@pytest.mark.parametrize("kwargs", [
    {"base_url": "kdsintf.amd.com"},
    {"base_url": "ftp://kdsintf.amd.com"},
    {"base_url": "https://kdsintf.amd.com/?x=1"},
    {"mirrors": ["http://"]},
    {"deadline": 0},
    {"read_timeout": -1},
    {"max_retries": -1},
    {"max_body": 0},
    {"backoff_base": -1.0},
])
def test_constructor_rejects_bad_settings(kwargs):
    with pytest.raises(ValueError):
        KdsClient(**kwargs)


def test_mirrors_must_not_be_a_string():
    with pytest.raises(TypeError):
        KdsClient(mirrors="http://127.0.0.1:1")


# ----------------------------------------------------------- pure helpers ---


def test_parse_retry_after():
    now = 1_700_000_000.0
    assert parse_retry_after("120", now) == 120.0
    assert parse_retry_after(" 0 ", now) == 0.0
    assert parse_retry_after(formatdate(now + 30, usegmt=True), now) == pytest.approx(30.0)
    assert parse_retry_after(formatdate(now - 30, usegmt=True), now) == 0.0
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00", 0) == pytest.approx(1445412480.0)
    for bad in ("", "-5", "1.5", "soon", "Wed, 99 Foo 2015"):
        assert parse_retry_after(bad, now) is None, bad


def test_backoff_delay():
    assert backoff_delay(1, 1.0, 30.0, 0.0) == 0.5
    assert backoff_delay(1, 1.0, 30.0, 1.0) == 1.0
    assert backoff_delay(3, 1.0, 30.0, 0.5) == 3.0
    assert backoff_delay(10, 1.0, 30.0, 0.0) == 15.0  # capped at 30, lower half cut
    assert backoff_delay(10_000, 1.0, 30.0, 0.99) <= 30.0  # no overflow
    assert backoff_delay(2, 0.0, 30.0, 0.7) == 0.0
    with pytest.raises(ValueError):
        backoff_delay(0, 1.0, 30.0, 0.5)


# ------------------------------------------------------------------ server ---


def test_server_stops_while_requests_hang(make_client):
    with KdsServer(_store()) as server:
        server.faults.push(Fault.hang(), count=None)
        with pytest.raises(KdsError):
            make_client(server.url, deadline=0.5).get(CHAIN_PATH)
        # leaving the block must end the hanging handler threads (else the test hangs)
    assert server.faults.pending is None


def test_fault_queue_counts():
    server = KdsServer()
    server.faults.push(Fault.status(500), count=2)
    server.faults.push(Fault.hang(0.1))
    assert server.faults.pending == 3
    assert [server.faults.take() for _ in range(4)] == [
        Fault.status(500), Fault.status(500), Fault.hang(0.1), None]
    with pytest.raises(ValueError):
        server.faults.push(Fault.status(500), count=0)
    with pytest.raises(RuntimeError):
        _ = server.url
