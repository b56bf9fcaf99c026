"""A loopback stand-in for AMD's KDS, with fault injection.

Part of the product (it backs ``snpd-emu kds``, so clients can be developed without
AMD's service) and what the tests fetch from: the real KDS is rate-limited,
sometimes down, and never reachable from CI.

It serves bytes the caller supplies, keyed by KDS path. VCEK paths match the way the
real KDS matches them — parameter order and zero padding do not matter — because
both the stored keys and the requested paths are normalized with
:func:`snpd.kds.urls.parse_path`. Unknown paths get 404.

It also stands in for Azure's THIM endpoint (snpd/kds/thim.py): store the THIM
document at its path and pass ``required_headers={"Metadata": "true"}``, and a
request without that header gets 400, as from Azure's IMDS. Every request's headers
are recorded in :attr:`KdsServer.request_headers`.

Faults make it misbehave the ways the KDS and the networks in front of it do:
``srv.faults.push(Fault.status(429, retry_after=1), count=2)`` makes the next two
requests answer 429. Every request is recorded in :attr:`KdsServer.requests`.

Only the standard library is used, and no state is global: each server owns its
socket, threads, store, fault queue and request log.
"""

from __future__ import annotations

import contextlib
import dataclasses
import http.server
import logging
import socket
import socketserver
import sys
import threading
from typing import Dict, List, Mapping, Optional, Set, Tuple, Union

from snpd.kds.urls import parse_path, redact_url

__all__ = ["Fault", "FaultQueue", "KdsServer", "Resource"]

log = logging.getLogger(__name__)

#: (content type, body) of one stored resource.
Resource = Tuple[str, bytes]

_REASONS = {code.value: code.phrase for code in http.HTTPStatus}


@dataclasses.dataclass(frozen=True)
class Fault:
    """One way to answer a request wrongly. Build it with the class methods.

    ``kind`` is one of:

    - ``status``: answer ``status_code`` (with ``Retry-After`` if ``retry_after`` is set);
    - ``hang``: accept, read the request, never answer; close after ``seconds``, or
      when the server stops if ``seconds`` is None;
    - ``truncate``: answer 200 with the real Content-Length but send only ``keep``
      bytes of the body (half if None), then close the connection;
    - ``body``: answer 200 with ``body`` instead of the stored resource;
    - ``unsized``: answer 200 with ``body`` and no Content-Length, ending it by
      closing the connection (legal HTTP; a client learns the size only by reading);
    - ``latency``: wait ``seconds``, then answer normally.
    """

    kind: str
    status_code: int = 200
    retry_after: Optional[str] = None
    body: bytes = b""
    content_type: str = "application/octet-stream"
    seconds: Optional[float] = None
    keep: Optional[int] = None

    @classmethod
    def status(
        cls, code: int, *, retry_after: Optional[Union[int, float, str]] = None, body: bytes = b""
    ) -> Fault:
        """Answer HTTP ``code``; ``retry_after`` is sent verbatim (seconds or HTTP date)."""
        if not 100 <= code <= 599:
            raise ValueError(f"HTTP status {code} out of range")
        ra = None
        if retry_after is not None:
            ra = retry_after if isinstance(retry_after, str) else f"{retry_after:g}"
        text = body or f"{code} {_REASONS.get(code, 'Error')}\n".encode()
        return cls("status", status_code=code, retry_after=ra, body=text,
                   content_type="text/plain")

    @classmethod
    def hang(cls, seconds: Optional[float] = None) -> Fault:
        """Never answer; give up after ``seconds`` (None: when the server stops)."""
        return cls("hang", seconds=seconds)

    @classmethod
    def truncate(cls, keep: Optional[int] = None) -> Fault:
        """Promise the whole body in Content-Length, send ``keep`` bytes, close."""
        if keep is not None and keep < 0:
            raise ValueError("keep must not be negative")
        return cls("truncate", keep=keep)

    @classmethod
    def wrong_body(cls, body: bytes, content_type: str = "application/octet-stream") -> Fault:
        """Answer 200 with ``body`` (e.g. a certificate not signed by the ASK)."""
        return cls("body", body=body, content_type=content_type)

    @classmethod
    def unsized(cls, body: bytes, content_type: str = "application/octet-stream") -> Fault:
        """Answer 200 with ``body`` and no Content-Length; close to end it."""
        return cls("unsized", body=body, content_type=content_type)

    @classmethod
    def latency(cls, seconds: float) -> Fault:
        """Answer normally, ``seconds`` late."""
        if seconds < 0:
            raise ValueError("latency must not be negative")
        return cls("latency", seconds=seconds)


@dataclasses.dataclass
class _Queued:
    fault: Fault
    count: Optional[int]  # requests left to fault; None: every request


class FaultQueue:
    """Faults to apply to the next requests, in order. Thread-safe.

    ``push(fault, count=N)`` queues the fault for the next N requests (after what is
    already queued); ``count=None`` applies it to every request from then on, until
    :meth:`clear`. Requests with no fault queued are answered normally.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._queue: List[_Queued] = []

    def push(self, fault: Fault, count: Optional[int] = 1) -> None:
        if count is not None and count < 1:
            raise ValueError(f"count must be at least 1 (or None for always), got {count}")
        with self._lock:
            self._queue.append(_Queued(fault, count))

    def clear(self) -> None:
        with self._lock:
            self._queue.clear()

    @property
    def pending(self) -> Optional[int]:
        """Requests still to be faulted; None while a count=None fault is queued."""
        with self._lock:
            total = 0
            for entry in self._queue:
                if entry.count is None:
                    return None
                total += entry.count
            return total

    def take(self) -> Optional[Fault]:
        """The fault for the request now arriving, or None."""
        with self._lock:
            if not self._queue:
                return None
            entry = self._queue[0]
            if entry.count is not None:
                entry.count -= 1
                if entry.count == 0:
                    self._queue.pop(0)
            return entry.fault


class _HttpServer(http.server.ThreadingHTTPServer):
    """ThreadingHTTPServer that knows its KdsServer and skips the reverse DNS lookup."""

    daemon_threads = True
    block_on_close = True  # server_close() joins the handler threads

    def __init__(self, address: Tuple[str, int], kds: KdsServer) -> None:
        self.kds = kds
        super().__init__(address, _Handler)

    def handle_error(self, request: object, client_address: object) -> None:
        """Log a handler's exception instead of printing it to stderr.

        A client that closes a connection without reading the whole answer (as a client
        giving up on a 429 does) resets it: that is routine for a KDS, not an error.
        """
        exc = sys.exc_info()[1]
        if isinstance(exc, (ConnectionError, TimeoutError)):
            log.debug("kds-emulator: client %s went away: %s", client_address, exc)
        else:
            log.error("kds-emulator: request from %s failed", client_address, exc_info=True)

    def server_bind(self) -> None:
        # HTTPServer.server_bind calls socket.getfqdn(), a DNS lookup we do not need.
        socketserver.TCPServer.server_bind(self)
        host, port = self.server_address[:2]
        self.server_name = str(host)
        self.server_port = int(port)


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, like the real KDS
    server_version = "snpd-kds-emulator"
    sys_version = ""
    # Idle keep-alive connections are dropped after this long; stop() does not wait.
    timeout = 60.0
    server: _HttpServer

    def setup(self) -> None:
        super().setup()
        self.server.kds._track(self.connection, add=True)

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            self.server.kds._track(self.connection, add=False)

    def log_message(self, format: str, *args: object) -> None:
        log.debug("kds-emulator %s: %s", self.address_string(),
                  redact_url(format % args))

    def do_GET(self) -> None:
        kds = self.server.kds
        kds._record(self.path, {k: v for k, v in self.headers.items()})
        missing = [name for name, value in kds.required_headers.items()
                   if self.headers.get(name) != value]
        if missing:
            self._send(400, "application/json", b'{"error": "Bad request. Required '
                       b'metadata header not specified"}\n', {})
            return
        fault = kds.faults.take()
        if fault is None:
            self._serve(kds.lookup(self.path))
            return
        if fault.kind == "latency":
            kds._wait(fault.seconds)
            self._serve(kds.lookup(self.path))
        elif fault.kind == "status":
            headers = {"Retry-After": fault.retry_after} if fault.retry_after else {}
            self._send(fault.status_code, fault.content_type, fault.body, headers)
        elif fault.kind == "hang":
            kds._wait(fault.seconds)
            self.close_connection = True  # never answered: drop the connection
        elif fault.kind == "truncate":
            resource = kds.lookup(self.path) or ("application/octet-stream", b"\x30" * 512)
            content_type, body = resource
            keep = len(body) // 2 if fault.keep is None else min(fault.keep, len(body))
            if keep >= len(body):  # always promise more than is sent
                body = body + b"\0"
            self._send(200, content_type, body[:keep], {}, length=len(body))
            self.close_connection = True
        elif fault.kind == "body":
            self._serve((fault.content_type, fault.body))
        elif fault.kind == "unsized":
            self._send(200, fault.content_type, fault.body, {}, length=-1)
            self.close_connection = True
        else:  # pragma: no cover - Fault's constructors cannot make another kind
            self._send(500, "text/plain", f"unknown fault {fault.kind}\n".encode(), {})

    def _serve(self, resource: Optional[Resource]) -> None:
        if resource is None:
            self._send(404, "text/plain", b"404 Not Found\n", {})
        else:
            self._send(200, resource[0], resource[1], {})

    def _send(self, status: int, content_type: str, body: bytes, headers: Mapping[str, str],
              length: Optional[int] = None) -> None:
        """Send one answer; ``length`` overrides Content-Length (-1: send none)."""
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        if length is None or length >= 0:
            self.send_header("Content-Length", str(len(body) if length is None else length))
        else:
            self.send_header("Connection", "close")
        for name, value in headers.items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body)
        self.wfile.flush()


class KdsServer:
    """A KDS on 127.0.0.1 serving ``store``: {path: (content_type, body)}.
    ``required_headers``: a request lacking one of them (name and exact value) is
    answered 400 (THIM's ``Metadata: true``).

    Use as a context manager (``with KdsServer(store) as srv: ... srv.url``) or call
    :meth:`start` and :meth:`stop`. Port 0 picks a free port. Stopping ends hanging
    and slow requests at once and joins every thread.
    """

    def __init__(
        self,
        store: Optional[Mapping[str, Resource]] = None,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        required_headers: Optional[Mapping[str, str]] = None,
    ) -> None:
        self.required_headers: Dict[str, str] = dict(required_headers or {})
        self._host = host
        self._port = port
        self._lock = threading.Lock()
        self._store: Dict[str, Resource] = {}
        self._requests: List[str] = []
        self._headers: List[Dict[str, str]] = []
        self._connections: Set[socket.socket] = set()
        self._stopping = threading.Event()
        self._httpd: Optional[_HttpServer] = None
        self._thread: Optional[threading.Thread] = None
        self.faults = FaultQueue()
        for path, resource in (store or {}).items():
            self.put(path, *resource)

    # ---------------------------------------------------------------- store ---

    @staticmethod
    def _key(path: str) -> str:
        """Canonical spelling of a KDS path; other paths are matched verbatim."""
        try:
            return parse_path(path).path
        except ValueError:
            return path

    def put(self, path: str, content_type: str, body: bytes) -> None:
        """Serve ``body`` at ``path`` (and every equivalent spelling of it) from now on."""
        with self._lock:
            self._store[self._key(path)] = (content_type, bytes(body))

    def lookup(self, path: str) -> Optional[Resource]:
        """What a request for ``path`` is answered with when no fault applies."""
        with self._lock:
            return self._store.get(self._key(path))

    # ------------------------------------------------------------ requests ---

    @property
    def requests(self) -> List[str]:
        """Every request path (with query) received so far, in order; a copy."""
        with self._lock:
            return list(self._requests)

    @property
    def request_headers(self) -> List[Dict[str, str]]:
        """Every request's headers so far, in the order of :attr:`requests`; a copy."""
        with self._lock:
            return [dict(h) for h in self._headers]

    def _record(self, path: str, headers: Mapping[str, str]) -> None:
        with self._lock:
            self._requests.append(path)
            self._headers.append(dict(headers))

    def _track(self, conn: socket.socket, *, add: bool) -> None:
        with self._lock:
            if not add:
                self._connections.discard(conn)
                return
            self._connections.add(conn)
            stopping = self._stopping.is_set()
        if stopping:  # accepted just before stop() looked: end it like the others
            _shutdown(conn)

    def _wait(self, seconds: Optional[float]) -> None:
        """Sleep ``seconds`` (None: forever), but wake as soon as the server stops."""
        self._stopping.wait(seconds)

    # ----------------------------------------------------------- lifecycle ---

    @property
    def url(self) -> str:
        """Base URL, e.g. ``http://127.0.0.1:40123`` (the server must be started)."""
        if self._httpd is None:
            raise RuntimeError("KdsServer is not started")
        host, port = self._httpd.server_address[:2]
        return f"http://{host!s}:{port}"

    def start(self) -> KdsServer:
        if self._httpd is not None:
            raise RuntimeError("KdsServer is already started")
        self._stopping.clear()
        httpd = _HttpServer((self._host, self._port), self)
        thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                  name=f"kds-emulator:{httpd.server_address[1]}", daemon=True)
        self._httpd, self._thread = httpd, thread
        thread.start()
        return self

    def stop(self) -> None:
        """Stop serving, end hanging requests, close every socket, join every thread."""
        httpd, thread = self._httpd, self._thread
        if httpd is None or thread is None:
            return
        self._stopping.set()  # wakes hang and latency faults
        httpd.shutdown()  # the accept loop
        thread.join()
        with self._lock:
            connections = list(self._connections)
        for conn in connections:
            # Handlers blocked reading an idle keep-alive connection wake up with EOF.
            _shutdown(conn)
        httpd.server_close()  # closes the listener and joins the handler threads
        self._httpd = self._thread = None

    def __enter__(self) -> KdsServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def _shutdown(conn: socket.socket) -> None:
    with contextlib.suppress(OSError):  # already closed by the peer or by its handler
        conn.shutdown(socket.SHUT_RDWR)
