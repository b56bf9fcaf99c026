"""KDS failures that asking again cannot fix fail at once; transient ones are retried.

Real sockets throughout: a loopback port nothing listens on (refused), a name under
the reserved ``.invalid`` TLD (RFC 6761: never resolves), loopback TLS servers with a
self-signed certificate, and raw loopback servers that reset connections. Attempts
are counted (requests sent through ``requests.Session.send``, connections accepted by
the servers), never timed.
"""

from __future__ import annotations

import datetime
import io
import json
import socket
import ssl
import struct
import threading
from pathlib import Path
from typing import Any, Callable, Iterator, List, Optional, Tuple

import pytest
import requests
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from emuplatform import NOW, TCBS, Platform, chip_id_for  # type: ignore[import-not-found]

from snpd.abi.product import Endorser, Product
from snpd.cli import snpctl
from snpd.emulator.kds_server import KdsServer
from snpd.errors import EXIT_UNAVAILABLE, KdsError
from snpd.kds import urls
from snpd.kds.cache import CertificateCache
from snpd.kds.client import KdsClient

CHAIN = b"-----BEGIN CERTIFICATE-----\nASK\n-----END CERTIFICATE-----\n" * 2
CHAIN_PATH = urls.cert_chain_path(Product.MILAN)
MAX_RETRIES = 3
UNRESOLVABLE = "kds.snpd-test.invalid"
PROXY_VARIABLES = ("http_proxy", "https_proxy", "all_proxy", "no_proxy",
                   "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY")


class Sends:
    """Counts the requests every requests.Session sends (each one is one attempt)."""

    def __init__(self) -> None:
        self.urls: List[str] = []


@pytest.fixture
def sends(monkeypatch: pytest.MonkeyPatch) -> Sends:
    """Count attempts at the one place every request passes, whichever session makes
    it (the client's own, the daemon's lazy one). Proxies are switched off so that a
    machine's proxy settings cannot turn "refused" into a proxy's answer."""
    for name in PROXY_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    seen = Sends()
    original = requests.Session.send

    def send(self: requests.Session, request: requests.PreparedRequest,
             **kw: Any) -> requests.Response:
        seen.urls.append(str(request.url))
        return original(self, request, **kw)

    monkeypatch.setattr(requests.Session, "send", send)
    return seen


class SleepLog:
    """An injected sleep that records the delays the client asked for (and returns at
    once: nothing here depends on time passing)."""

    def __init__(self) -> None:
        self.delays: List[float] = []

    def __call__(self, seconds: float) -> None:
        self.delays.append(seconds)


@pytest.fixture
def make_client() -> Iterator[Callable[..., Tuple[KdsClient, SleepLog]]]:
    clients: List[KdsClient] = []

    def make(base: str, **overrides: Any) -> Tuple[KdsClient, SleepLog]:
        sleeps = SleepLog()
        options: dict = dict(connect_timeout=2.0, read_timeout=2.0, deadline=30.0,
                             backoff_base=0.01, backoff_max=0.01, max_retries=MAX_RETRIES,
                             sleep=sleeps)
        options.update(overrides)
        client = KdsClient(base, **options)
        clients.append(client)
        return client, sleeps

    yield make
    for client in clients:
        client.close()


def _closed_port() -> int:
    """A loopback port with nothing listening (connection refused)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def unresolvable() -> str:
    """A host name that does not resolve, without depending on the network.

    glibc does not special-case ``.invalid``: the query goes to the configured
    resolver. A resolver answers NXDOMAIN for it (RFC 6761), an unreachable or absent
    one makes getaddrinfo fail with EAI_AGAIN: a socket.gaierror either way, which is
    all the client sees. Only a resolver that invents addresses (NXDOMAIN hijacking)
    would break that, and then the test must not connect to what it invented.
    """
    try:
        found = socket.getaddrinfo(UNRESOLVABLE, 443, proto=socket.IPPROTO_TCP)
    except socket.gaierror:
        return UNRESOLVABLE
    pytest.fail(f"this machine's resolver answers for {UNRESOLVABLE} (RFC 6761 says it "
                f"must not): {found[0][4]}")


def _assert_one_line(error: KdsError, *parts: str) -> None:
    message = str(error)
    assert "\n" not in message, message
    for part in parts:
        assert part in message, message
    assert "not retried" in message, message
    assert error.exit_code == EXIT_UNAVAILABLE


# ------------------------------------------------------------- permanent ---


def test_connection_refused_is_asked_once(sends, make_client):
    port = _closed_port()
    client, sleeps = make_client(f"http://127.0.0.1:{port}")
    with pytest.raises(KdsError) as info:
        client.get(CHAIN_PATH)
    assert len(sends.urls) == 1 and sleeps.delays == []
    _assert_one_line(info.value, f"127.0.0.1:{port}", "refused the connection")
    assert info.value.status is None


def test_unresolvable_host_is_asked_once(sends, make_client, unresolvable):
    client, sleeps = make_client(f"https://{unresolvable}")
    with pytest.raises(KdsError) as info:
        client.get(CHAIN_PATH)
    assert len(sends.urls) == 1 and sleeps.delays == []
    _assert_one_line(info.value, f"cannot resolve the KDS host {unresolvable}", "DNS")


def test_refused_base_moves_on_to_the_mirror_without_retries(sends, make_client):
    with KdsServer({CHAIN_PATH: ("application/x-pem-file", CHAIN)}) as mirror:
        client, sleeps = make_client(f"http://127.0.0.1:{_closed_port()}",
                                     mirrors=[mirror.url])
        assert client.get(CHAIN_PATH) == CHAIN
        assert len(sends.urls) == 2 and mirror.requests == [CHAIN_PATH]
        assert sleeps.delays == []


def _self_signed(tmp_path: Path) -> Tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "snpd test KDS")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]),
                           critical=False)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


class LoopbackServer:
    """A TCP server on 127.0.0.1 that hands each connection to ``handle`` and counts
    the connections it accepted."""

    def __init__(self, handle: Callable[[socket.socket, int], None]) -> None:
        self._handle = handle
        self._listener = socket.socket()
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(16)
        self._listener.settimeout(0.05)
        self.port = int(self._listener.getsockname()[1])
        self.connections = 0
        self.errors: List[BaseException] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._listener.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            self.connections += 1
            conn.settimeout(5.0)
            try:
                self._handle(conn, self.connections)
            except OSError as exc:  # ssl.SSLError included: the client gave up
                self.errors.append(exc)
            finally:
                conn.close()

    def __enter__(self) -> LoopbackServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._listener.close()


def _tls_server(tmp_path: Path, configure: Optional[Callable[[ssl.SSLContext], None]] = None
                ) -> LoopbackServer:
    cert, key = _self_signed(tmp_path)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    if configure is not None:
        configure(context)

    def handle(conn: socket.socket, _n: int) -> None:
        with context.wrap_socket(conn, server_side=True) as tls:
            tls.recv(4096)
            tls.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok")

    return LoopbackServer(handle)


def test_untrusted_certificate_is_asked_once(sends, make_client, tmp_path):
    with _tls_server(tmp_path) as server:
        client, sleeps = make_client(f"https://127.0.0.1:{server.port}")
        with pytest.raises(KdsError) as info:
            client.get(CHAIN_PATH)
    assert server.connections == 1 and len(sends.urls) == 1 and sleeps.delays == []
    _assert_one_line(info.value, f"TLS with the KDS host 127.0.0.1:{server.port} failed",
                     "certificate verify failed")


def test_tls_handshake_failure_is_asked_once(sends, make_client, tmp_path):
    def no_shared_cipher(context: ssl.SSLContext) -> None:
        # An ECDSA certificate but only RSA-authenticated suites, in TLS 1.2 (whose
        # suites, unlike 1.3's, can be restricted): the server can offer nothing the
        # client accepts and aborts the handshake with a handshake_failure alert.
        context.maximum_version = ssl.TLSVersion.TLSv1_2
        context.set_ciphers("ECDHE-RSA-AES128-GCM-SHA256")

    with _tls_server(tmp_path, no_shared_cipher) as server:
        client, sleeps = make_client(f"https://127.0.0.1:{server.port}")
        with pytest.raises(KdsError) as info:
            client.get(CHAIN_PATH)
    assert server.connections == 1 and len(sends.urls) == 1 and sleeps.delays == []
    _assert_one_line(info.value, f"TLS with the KDS host 127.0.0.1:{server.port} failed")
    assert "handshake" in str(info.value).lower(), str(info.value)


def test_snpctl_fetch_fails_at_once_with_exit_3(sends, tmp_path):
    port = _closed_port()
    out, err = io.StringIO(), io.StringIO()
    code = snpctl.main(["fetch", "ca", "pem", str(tmp_path / "certs"), "Milan",
                        "--kds-url", f"http://127.0.0.1:{port}"], stdout=out, stderr=err)
    assert code == EXIT_UNAVAILABLE
    assert len(sends.urls) == 1
    lines = err.getvalue().splitlines()
    assert len(lines) == 1 and f"127.0.0.1:{port} refused the connection" in lines[0], lines
    out, err = io.StringIO(), io.StringIO()
    code = snpctl.main(["fetch", "ca", "pem", str(tmp_path / "certs"), "Milan", "--json",
                        "--kds-url", f"http://127.0.0.1:{port}"], stdout=out, stderr=err)
    assert code == EXIT_UNAVAILABLE and len(sends.urls) == 2
    assert json.loads(out.getvalue())["kind"] == "CertificatesUnavailable"


def test_daemon_asks_once_then_answers_from_its_negative_cache(sends, tmp_path,
                                                               milan: Platform):
    """The daemon's own client (snpd.daemon.LazyKdsClient) gives up at once too; a
    repeat is answered from the negative cache, so nothing spins and nothing floods."""
    from snpd.daemon import LazyKdsClient

    chip, tcb = chip_id_for(Product.MILAN), TCBS[Product.MILAN]
    with KdsServer() as server:
        chain = (milan.chain.ask.to_pem() + milan.chain.ark.to_pem()).encode()
        server.put(urls.cert_chain_path(Product.MILAN, Endorser.VCEK),
                   "application/x-pem-file", chain)
        client = LazyKdsClient(server.url, (), 30.0)
        cache = CertificateCache(tmp_path / "cache", client, roots=milan.roots,
                                 clock=lambda: NOW)
        cache.chain(Product.MILAN, Endorser.VCEK)
    # The server is gone: its port now refuses.
    try:
        before = len(sends.urls)
        with pytest.raises(KdsError, match="refused the connection") as info:
            cache.vcek(Product.MILAN, chip, tcb)
        assert len(sends.urls) == before + 1
        assert "\n" not in str(info.value)
        with pytest.raises(KdsError, match="not asked again"):
            cache.vcek(Product.MILAN, chip, tcb)
        assert len(sends.urls) == before + 1 and cache.stats.negative_hits == 1
    finally:
        client.close()


# ------------------------------------------------------------- transient ---


def _read_request(conn: socket.socket) -> None:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = conn.recv(4096)
        if not chunk:
            return
        data += chunk


def _reset(conn: socket.socket) -> None:
    """Close with a TCP RST instead of a FIN (SO_LINGER on, timeout 0)."""
    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    conn.close()


def _resetting_server(resets: int, *, mid_body: bool) -> LoopbackServer:
    """Resets the first ``resets`` connections (after the request, or after part of
    the body), then answers 200 with CHAIN."""

    def handle(conn: socket.socket, n: int) -> None:
        _read_request(conn)
        if n <= resets:
            if mid_body:
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(CHAIN)
                             + CHAIN[:10])
            _reset(conn)
            return
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: close\r\n\r\n"
                     % len(CHAIN) + CHAIN)

    return LoopbackServer(handle)


@pytest.mark.parametrize("mid_body", [False, True], ids=["before-answer", "mid-body"])
def test_connection_reset_is_retried(sends, make_client, mid_body):
    with _resetting_server(2, mid_body=mid_body) as server:
        client, sleeps = make_client(f"http://127.0.0.1:{server.port}")
        assert client.get(CHAIN_PATH) == CHAIN
    assert server.connections == 3 and len(sends.urls) == 3
    assert len(sleeps.delays) == 2


@pytest.mark.parametrize("mid_body", [False, True], ids=["before-answer", "mid-body"])
def test_persistent_resets_exhaust_the_bounded_retries(sends, make_client, mid_body):
    with _resetting_server(1000, mid_body=mid_body) as server:
        client, sleeps = make_client(f"http://127.0.0.1:{server.port}")
        with pytest.raises(KdsError) as info:
            client.get(CHAIN_PATH)
    assert server.connections == MAX_RETRIES + 1 and len(sends.urls) == MAX_RETRIES + 1
    assert len(sleeps.delays) == MAX_RETRIES
    assert f"after {MAX_RETRIES + 1} attempts" in str(info.value)
    assert "not retried" not in str(info.value)
