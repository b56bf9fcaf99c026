"""HTTP client for AMD's Key Distribution Service: bytes in, bytes out, bounded in time.

The KDS throttles with HTTP 429, has transient 5xx outages and sometimes hangs
(docs/reference/abi.md §5.2). This client turns all of that into either the body of a 200
answer or one :class:`~snpd.errors.KdsError` whose message tells an operator which
URL failed, how, after how many attempts, and what to do. It does not parse or
verify what it fetched: the trust layer does that before anything is cached, so a
hostile server can at worst cause a rejection — provided it cannot exhaust memory or
time, which is why every answer is bounded in size and every call by a deadline.

Retry policy, per call of :meth:`KdsClient.get`:

- retried with exponential backoff and jitter: HTTP 429, 500, 502, 503, 504,
  timeouts, connections reset or closed early, and bodies cut short;
- asked once, never again in this call: a host name that does not resolve, a
  refused connection and a TLS failure (certificate or handshake). Those describe the
  URL, not the moment: asking again seconds later gets the same answer, so a user's
  ``snpctl fetch`` fails at once with the host and the cause instead of spinning
  through the whole deadline. The daemon asks again later, through its negative
  cache and its per-user KDS budget, not by looping here;
- ``Retry-After`` (seconds or HTTP date) is honoured instead of the backoff; one that
  would end past the deadline, or that is longer than ``max_retry_wait``, gives up on
  that URL at once rather than sleeping;
- a 429 or 503 with ``Retry-After`` also pauses that base URL for every call through
  this client until then (capped at an hour): a call that finds it paused does not
  send a request there, and waits out the pause only if the pause is short enough
  for it to have waited for a Retry-After itself;
- any other 4xx (404 above all) is the KDS's answer and fails at once;
- after ``max_retries`` retries, or a failure that retrying the same server cannot
  fix (one of the above, an oversized body, an unexpected status), the next mirror is
  tried; everything shares one overall deadline.

Why this is a loop here and not urllib3's ``Retry`` on an ``HTTPAdapter``: the
deadline is per call, but an adapter's ``Retry`` is shared by every call through
the session, so it would need per-thread state to know whose deadline applies;
urllib3 reuses the first attempt's timeout for all its internal retries, so the last
attempt could overrun the deadline by a whole read timeout; and truncated bodies and
mirrors need a loop out here anyway. One loop gives one deadline, one attempt count
and one error message. urllib3's ``Retry`` semantics are kept (status list,
Retry-After in both forms, backoff capped at ``backoff_max``).

``requests`` is imported only by this module, never by ``snpd.kds`` itself, so that
commands that do not fetch start fast.
"""

from __future__ import annotations

import dataclasses
import email.utils
import errno
import logging
import random
import re
import socket
import ssl
import threading
import time
from datetime import timezone
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union
from urllib.parse import urlsplit

import requests

from snpd import __version__ as snpd_version
from snpd.abi.product import Endorser, Product
from snpd.abi.tcb import TcbVersion
from snpd.errors import KdsError
from snpd.kds.urls import (
    DEFAULT_KDS_URL,
    cert_chain_path,
    crl_path,
    join_url,
    redact_url,
    vcek_path,
)

__all__ = [
    "DEFAULT_MAX_BODY",
    "RETRY_STATUSES",
    "KdsClient",
    "backoff_delay",
    "parse_retry_after",
]

log = logging.getLogger(__name__)

#: Statuses worth asking the same server again: throttling and transient outages.
RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})
#: A VCEK is ~1.3 KiB, a cert chain ~4.5 KiB, a CRL a few KiB: 1 MiB is generous and
#: still keeps a broken or hostile server from filling memory.
DEFAULT_MAX_BODY = 1 << 20
_CHUNK = 64 * 1024
_DIGITS = re.compile(r"[0-9]+")
#: Statuses whose Retry-After pauses the whole base URL.
PAUSE_STATUSES = frozenset({429, 503})
#: The longest pause a Retry-After can impose: a broken or hostile server must not
#: switch the KDS off until the daemon restarts.
MAX_PAUSE = 3600.0
# An attempt with less time than this left would only time out: after a backoff
# that leaves less, the call gives up with the failure it has (KdsClient.get).
MIN_ATTEMPT_S = 0.25


def parse_retry_after(value: str, now: float) -> Optional[float]:
    """Seconds to wait from a ``Retry-After`` header, or None if it is malformed.

    RFC 9110 allows delay-seconds or an HTTP date; ``now`` is the wall-clock time
    (time.time()) the date is measured from. A date in the past means "now" (0).
    """
    value = value.strip()
    if _DIGITS.fullmatch(value):
        return float(int(value))
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    return max(0.0, when.timestamp() - now)


def backoff_delay(retry: int, base: float, cap: float, unit: float) -> float:
    """Delay before retry number ``retry`` (1 for the first), with "equal jitter".

    The exponential delay ``base * 2**(retry-1)`` is capped at ``cap``, then drawn
    uniformly from its upper half (``unit`` in [0, 1) picks where). Unlike urllib3's
    Retry, the first retry waits too: answering a 429 by asking again at once is the
    one thing a rate limiter is sure to punish. Jitter keeps many VMs that hit the same
    outage from retrying in lockstep, and the half that is kept guarantees a minimum.
    """
    if retry < 1:
        raise ValueError(f"retry numbers start at 1, got {retry}")
    delay = min(cap, base * 2.0 ** min(retry - 1, 62))
    return delay / 2 + unit * delay / 2


@dataclasses.dataclass(frozen=True)
class _Failure:
    """Why one attempt did not yield a body.

    ``retry``: asking the same URL again may help. ``final``: the KDS has answered
    and no server will say otherwise (a 4xx), so stop without trying mirrors.
    ``permanent``: the host could not be resolved, refused, or failed TLS; ``what``
    then names the host, the cause and what to check.
    """

    what: str
    retry: bool
    final: bool = False
    permanent: bool = False
    status: Optional[int] = None
    retry_after: Optional[float] = None


@dataclasses.dataclass(frozen=True)
class _UrlOutcome:
    """How the attempts at one URL ended, for the final error message."""

    url: str
    attempts: int
    failure: _Failure
    ending: str


class KdsClient:
    """Fetches KDS resources with retries, mirrors, an overall deadline and a size cap.

    Everything with state or time is injected (docs/architecture.md, "Seams for
    tests"): the HTTP ``session``, the monotonic ``clock`` the deadline is measured on
    and the ``sleep`` used between attempts. A session passed in stays the caller's
    to close; its adapters should not retry on their own (requests' default adapter
    does not). Safe to share between threads: a call keeps its state in local
    variables.

    ``deadline`` bounds a whole :meth:`get` (all attempts, backoffs and mirrors); each
    attempt's timeouts are clipped to what remains of it. ``max_retry_wait`` (None: up
    to the deadline) is the longest Retry-After or pause a call sleeps through; a
    daemon sets it low, so that its threads do not sleep while the KDS throttles.
    ``headers`` go with every request (Azure's THIM endpoint wants ``Metadata: true``);
    they cannot ask for a compressed body.
    """

    def __init__(
        self,
        base_url: str = DEFAULT_KDS_URL,
        mirrors: Sequence[str] = (),
        session: Optional[requests.Session] = None,
        *,
        connect_timeout: float = 5.0,
        read_timeout: float = 10.0,
        deadline: float = 60.0,
        backoff_base: float = 1.0,
        backoff_max: float = 30.0,
        max_retries: int = 5,
        max_body: int = DEFAULT_MAX_BODY,
        max_retry_wait: Optional[float] = None,
        headers: Optional[Mapping[str, str]] = None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
        rng: Optional[random.Random] = None,
    ) -> None:
        if isinstance(mirrors, str):
            raise TypeError("mirrors must be a sequence of URLs, not one string")
        for url in (base_url, *mirrors):
            parts = urlsplit(url)
            if parts.scheme not in ("http", "https") or not parts.netloc:
                raise ValueError(f"KDS URL must be http(s)://host[:port][/prefix], got {url!r}")
            if parts.query or parts.fragment:
                raise ValueError(f"KDS URL must not carry a query or fragment: {url!r}")
        for name, value in (("connect_timeout", connect_timeout),
                            ("read_timeout", read_timeout), ("deadline", deadline)):
            if not value > 0:
                raise ValueError(f"{name} must be positive, got {value!r}")
        if backoff_base < 0 or backoff_max < 0:
            raise ValueError("backoff_base and backoff_max must not be negative")
        if max_retries < 0:
            raise ValueError(f"max_retries must not be negative, got {max_retries}")
        if max_body < 1:
            raise ValueError(f"max_body must be positive, got {max_body}")
        if max_retry_wait is not None and not max_retry_wait >= 0:
            raise ValueError(f"max_retry_wait must not be negative, got {max_retry_wait!r}")
        self.base_url = base_url
        self.mirrors: Tuple[str, ...] = tuple(mirrors)
        self._owns_session = session is None
        if session is None:
            session = requests.Session()
            # Tell AMD who is asking (an injected session keeps its own User-Agent).
            session.headers["User-Agent"] = f"snpd/{snpd_version}"
        self._session = session
        self._connect_timeout = connect_timeout
        self._read_timeout = read_timeout
        self._deadline = deadline
        # The least time worth an attempt after a backoff (see get()).
        self._min_attempt = min(MIN_ATTEMPT_S, connect_timeout, read_timeout)
        self._backoff_base = backoff_base
        self._backoff_max = backoff_max
        self._max_retries = max_retries
        self._max_body = max_body
        self._max_retry_wait = max_retry_wait
        headers = dict(headers or {})
        if any(name.lower() == "accept-encoding" for name in headers):
            raise ValueError("headers must not set Accept-Encoding (the size cap needs "
                             "identity bodies)")
        self._headers = {**headers, "Accept-Encoding": "identity"}
        # base URL -> (end of its pause on the clock, the status that asked for it)
        self._paused: Dict[str, Tuple[float, int]] = {}
        self._pause_lock = threading.Lock()
        self._clock = clock
        self._sleep = sleep
        self._rng = rng if rng is not None else random.Random()

    # ------------------------------------------------------------ lifecycle ---

    def close(self) -> None:
        """Close the session if this client created it (an injected one is the caller's)."""
        if self._owns_session:
            self._session.close()

    def __enter__(self) -> KdsClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # ---------------------------------------------------------- convenience ---

    def fetch_cert_chain(self, product: Product, endorser: Endorser = Endorser.VCEK) -> bytes:
        """The PEM ``cert_chain`` (ASK or ASVK first, then ARK), unverified."""
        return self.get(cert_chain_path(product, endorser))

    def fetch_vcek(self, product: Product, chip_id: bytes, tcb: TcbVersion) -> bytes:
        """The DER VCEK for ``chip_id`` at ``tcb`` (the report's REPORTED_TCB), unverified."""
        return self.get(vcek_path(product, chip_id, tcb))

    def fetch_crl(self, product: Product, endorser: Endorser = Endorser.VCEK) -> bytes:
        """The DER CRL signed by the ARK, unverified (and possibly stale: check nextUpdate)."""
        return self.get(crl_path(product, endorser))

    # ----------------------------------------------------------------- core ---

    def get(self, path: str) -> bytes:
        """Body of a 200 answer for ``path`` from the base URL or a mirror.

        Raises KdsError when every URL failed or the deadline passed, with ``url`` the
        last URL tried (hwid redacted) and ``status`` its last HTTP status, if any.
        """
        bases = [self.base_url, *self.mirrors]
        urls = [join_url(base, path) for base in bases]
        deadline_at = self._clock() + self._deadline
        total = 0
        outcomes: List[_UrlOutcome] = []
        for index, (base, url) in enumerate(zip(bases, urls)):
            tries = 0
            failure: Optional[_Failure] = self._wait_for_pause(base, deadline_at)
            if failure is not None:
                outcomes.append(_UrlOutcome(url, 0, failure, "paused"))
                continue
            while True:
                remaining = deadline_at - self._clock()
                if remaining <= 0:
                    if failure is None:  # no time left for this URL at all
                        raise self._error(outcomes, total, skipped=urls[index:])
                    # a sleep overran the deadline
                    outcomes.append(_UrlOutcome(url, tries, failure, "deadline"))
                    raise self._error(outcomes, total, skipped=urls[index + 1:])
                tries += 1
                total += 1
                result = self._attempt(url, remaining, deadline_at)
                if isinstance(result, bytes):
                    if total > 1:
                        log.info("KDS %s answered after %d attempts", redact_url(url), total)
                    return result
                failure = result
                if failure.status in PAUSE_STATUSES and failure.retry_after:
                    self._pause(base, failure.retry_after, failure.status)
                if failure.final:
                    outcomes.append(_UrlOutcome(url, tries, failure, "final"))
                    raise self._error(outcomes, total)
                if not failure.retry:
                    ending = "permanent" if failure.permanent else "not-retryable"
                    outcomes.append(_UrlOutcome(url, tries, failure, ending))
                    break
                if tries > self._max_retries:
                    outcomes.append(_UrlOutcome(url, tries, failure, "retries"))
                    break
                if failure.retry_after is not None:
                    delay = failure.retry_after
                    if self._max_retry_wait is not None and delay > self._max_retry_wait:
                        outcomes.append(_UrlOutcome(url, tries, failure, "retry-after-limit"))
                        break
                else:
                    delay = backoff_delay(tries, self._backoff_base, self._backoff_max,
                                          self._rng.random())
                if delay + self._min_attempt >= deadline_at - self._clock():
                    # Sleeping would leave no time (or only a sliver) to ask again:
                    # give up on this URL now rather than after a pointless wait, and
                    # with this failure as the cause (an attempt squeezed into a few
                    # milliseconds would only time out and hide it). A mirror, if any,
                    # gets what time is left.
                    ending = "retry-after" if failure.retry_after is not None else "deadline"
                    outcomes.append(_UrlOutcome(url, tries, failure, ending))
                    break
                log.info("KDS %s: %s; retry %d in %.2f s", redact_url(url), failure.what,
                         tries, delay)
                if delay > 0:
                    self._sleep(delay)
        raise self._error(outcomes, total)

    def _pause(self, base: str, seconds: float, status: int) -> None:
        until = self._clock() + min(seconds, MAX_PAUSE)
        with self._pause_lock:
            if until > self._paused.get(base, (0.0, 0))[0]:
                self._paused[base] = (until, status)

    def _wait_for_pause(self, base: str, deadline_at: float) -> Optional[_Failure]:
        """None when ``base`` may be asked now (after sleeping out a short pause), else
        why not: it is paused for longer than this call may wait."""
        with self._pause_lock:
            until, status = self._paused.get(base, (0.0, 0))
        now = self._clock()
        left = until - now
        if left <= 0:
            return None
        limit = self._max_retry_wait
        if left >= deadline_at - now or (limit is not None and left > limit):
            label = f"HTTP {status} with Retry-After"
            return _Failure(f"paused after {label}", retry=False, status=status,
                            retry_after=left)
        log.info("KDS %s paused; waiting %.2f s", redact_url(base), left)
        self._sleep(left)
        return None

    def _attempt(self, url: str, remaining: float, deadline_at: float) -> Union[bytes, _Failure]:
        """One GET: the body, or why not. Never raises for network or HTTP trouble."""
        connect = min(self._connect_timeout, remaining)
        read = min(self._read_timeout, remaining)
        try:
            response = self._session.get(
                url,
                stream=True,
                timeout=(connect, read),
                # Redirects are not followed: requests would read a redirect's body
                # without a size limit, and the KDS does not redirect.
                allow_redirects=False,
                # No compression: a compressed body could expand past the size cap
                # in a single read before the cap is checked.
                headers=self._headers,
            )
        except requests.exceptions.ConnectTimeout:
            return _Failure(f"no connection within {connect:.3g} s (connect timeout)", retry=True)
        except requests.exceptions.ReadTimeout:
            return _Failure(f"no answer within {read:.3g} s (read timeout)", retry=True)
        except requests.exceptions.ConnectionError as exc:  # SSLError and ProxyError too
            permanent = _permanent_failure(exc, url)
            if permanent is not None:
                return _Failure(permanent, retry=False, permanent=True)
            # A reset, a connection closed before the answer, no route right now.
            return _Failure(f"connection failed ({error_reason(exc)})", retry=True)
        except requests.exceptions.RequestException as exc:
            return _Failure(f"request failed ({type(exc).__name__}: {exc})", retry=False)
        with response:
            return self._read_response(response, deadline_at)

    def _read_response(
        self, response: requests.Response, deadline_at: float
    ) -> Union[bytes, _Failure]:
        status = response.status_code
        if status != 200:
            return self._status_failure(response)
        encoding = response.headers.get("Content-Encoding", "identity").strip().lower()
        if encoding not in ("", "identity"):
            return _Failure(f"HTTP 200 with Content-Encoding {encoding!r} although "
                            "identity was asked for", retry=False)
        expected: Optional[int] = None
        declared = response.headers.get("Content-Length")
        if declared is not None:
            if not _DIGITS.fullmatch(declared.strip()):
                return _Failure(f"HTTP 200 with a malformed Content-Length {declared!r}",
                                retry=False)
            expected = int(declared)
            if expected > self._max_body:
                return _Failure(f"response of {expected} bytes exceeds the "
                                f"{self._max_body}-byte limit", retry=False)
        chunks: List[bytes] = []
        size = 0
        try:
            for chunk in response.iter_content(chunk_size=_CHUNK):
                size += len(chunk)
                if size > self._max_body:
                    return _Failure(f"response exceeds the {self._max_body}-byte limit",
                                    retry=False)
                chunks.append(chunk)
                if self._clock() > deadline_at:
                    # A server dripping bytes evades the per-read timeout; the
                    # deadline still holds.
                    return _Failure(f"body still arriving at the deadline ({size} bytes "
                                    "so far)", retry=True)
        except (requests.exceptions.ChunkedEncodingError,
                requests.exceptions.ConnectionError) as exc:
            # urllib3 2.x raises here when the server closes before Content-Length
            # bytes arrived. urllib3's Retry never sees this (the status line has
            # already been answered), so the loop in get() retries it.
            return _Failure(f"response body cut short ({error_reason(exc)})", retry=True)
        except requests.exceptions.RequestException as exc:
            return _Failure(f"reading the body failed ({error_reason(exc)})", retry=True)
        if expected is not None and size != expected:
            # urllib3 1.26 (Debian bookworm) does not enforce Content-Length and just
            # returns the short body: count the bytes here on every version.
            return _Failure(f"response body cut short (got {size} of {expected} bytes)",
                            retry=True)
        return b"".join(chunks)

    def _status_failure(self, response: requests.Response) -> _Failure:
        status = response.status_code
        label = f"HTTP {status}" + (f" {response.reason}" if response.reason else "")
        if status in RETRY_STATUSES:
            retry_after: Optional[float] = None
            header = response.headers.get("Retry-After")
            if header is not None:
                retry_after = parse_retry_after(header, time.time())
                if retry_after is None:
                    log.info("ignoring malformed Retry-After %r", header)
            what = f"KDS rate limit ({label})" if status == 429 else f"KDS server error ({label})"
            return _Failure(what, retry=True, status=status, retry_after=retry_after)
        if 400 <= status < 500:
            return _Failure(f"KDS answered {label}", retry=False, final=True, status=status)
        if 300 <= status < 400:
            where = response.headers.get("Location", "?")
            return _Failure(f"unexpected redirect ({label} to {where}; redirects are not "
                            "followed)", retry=False, status=status)
        return _Failure(f"unexpected {label}", retry=False, status=status)

    def _error(
        self, outcomes: List[_UrlOutcome], total: int, skipped: Sequence[str] = ()
    ) -> KdsError:
        """One KdsError that names every URL tried, how it failed and why we stopped."""
        parts = [self._describe(o) for o in outcomes]
        if skipped:
            parts.append(f"the {self._deadline:g} s deadline passed before "
                         + ", ".join(redact_url(u) for u in skipped) + " could be tried")
        message = "; then ".join(parts)
        if len(outcomes) > 1 or skipped:
            message = f"all KDS URLs failed ({total} attempts): {message}"
        last = outcomes[-1] if outcomes else None
        return KdsError(
            message,
            url=redact_url(last.url) if last else "",
            status=last.failure.status if last else None,
            retry_after=last.failure.retry_after if last else None,
        )

    def _describe(self, outcome: _UrlOutcome) -> str:
        url = redact_url(outcome.url)
        f = outcome.failure
        n = f"{outcome.attempts} attempt" + ("" if outcome.attempts == 1 else "s")
        if outcome.ending == "final":
            hint = " (the KDS has no such certificate: check the product, chip id and TCB)" \
                if f.status == 404 else ""
            return f"{f.what} for {url}; not retried{hint}"
        if outcome.ending == "permanent":
            return f"{f.what}; asked once for {url}, not retried"
        if outcome.ending == "not-retryable":
            return f"{f.what} for {url} ({n}); not retried against this server"
        if outcome.ending == "paused":
            return (f"{url} not asked: the KDS is {f.what} for {f.retry_after:.0f} s more; "
                    "retry later")
        if outcome.ending == "retry-after-limit":
            return (f"{f.what} for {url}: the server asks to wait {f.retry_after:g} s "
                    f"(Retry-After), longer than snpd waits ({self._max_retry_wait:g} s); "
                    f"gave up after {n}; the KDS is not asked again until then")
        if outcome.ending == "retry-after":
            return (f"{f.what} for {url}: the server asks to wait {f.retry_after:g} s "
                    f"(Retry-After), past the {self._deadline:g} s deadline; gave up after "
                    f"{n}; retry later")
        if outcome.ending == "deadline":
            return (f"{f.what} persisted past the {self._deadline:g} s deadline for {url} "
                    f"({n}); retry later")
        return f"{f.what} persisted for {url} after {n}; retry later"


def _chain(exc: BaseException) -> List[BaseException]:
    """``exc`` and every exception it wraps, outermost first.

    requests wraps urllib3's MaxRetryError (in ``args``), which holds the real failure
    in ``reason``; urllib3 2.x chains the socket error as ``__cause__``, 1.26 only as
    ``__context__`` (raised while handling it), and 1.26's SSLError holds the ssl
    module's error in ``args``. Walking all four finds the cause on both.
    """
    found: List[BaseException] = []
    todo: List[BaseException] = [exc]
    while todo and len(found) < 32:
        current = todo.pop(0)
        if any(current is seen for seen in found):
            continue
        found.append(current)
        linked = [*current.args, getattr(current, "reason", None), current.__cause__,
                  current.__context__]
        todo.extend(e for e in linked if isinstance(e, BaseException))
    return found


_SSL_SOURCE = re.compile(r"\s*\(_ssl\.c:\d+\)$")


def _permanent_failure(exc: requests.exceptions.ConnectionError, url: str) -> Optional[str]:
    """What to tell the operator when ``exc`` is a failure that asking again cannot fix
    (the name does not resolve, the port refuses, TLS fails), else None.

    Classified by the socket and ssl errors underneath, not by urllib3's wrappers,
    whose classes differ between urllib3 1.26 (Debian bookworm) and 2.x.
    """
    parts = urlsplit(url)
    host = parts.netloc.rpartition("@")[2]
    subject = f"the KDS host {host}"
    if isinstance(exc, requests.exceptions.ProxyError):
        subject = f"the proxy for the KDS host {host}"
    chain = _chain(exc)
    for inner in chain:
        if isinstance(inner, socket.gaierror):
            # Also EAI_AGAIN ("temporary failure"): in practice no DNS server answers,
            # which does not change within one call either.
            cause = inner.strerror or str(inner)
            return (f"cannot resolve {subject} ({cause}): check the URL and this "
                    "machine's DNS")
    for inner in chain:
        if isinstance(inner, ConnectionRefusedError) or (
                isinstance(inner, OSError) and inner.errno == errno.ECONNREFUSED):
            return (f"{subject} refused the connection (nothing listens on that port): "
                    "check the URL")
    if not isinstance(exc, requests.exceptions.SSLError):
        return None
    cause = error_reason(exc)
    for inner in chain:
        if isinstance(inner, ssl.SSLCertVerificationError):
            detail = inner.verify_message or _SSL_SOURCE.sub("", str(inner))
            cause = f"certificate verify failed: {detail}"
            break
        if type(inner).__name__ == "CertificateError":  # urllib3 1.26's hostname check
            cause = f"certificate does not match: {inner}"
            break
        if isinstance(inner, ssl.SSLError):
            cause = _SSL_SOURCE.sub("", str(inner.args[1] if len(inner.args) > 1
                                            else inner))
            break
    return (f"TLS with {subject} failed ({cause}): check the URL, the machine's CA "
            "certificates and clock")


def error_reason(exc: BaseException) -> str:
    """The innermost useful text of a requests/urllib3 exception chain.

    requests wraps urllib3's exception, which wraps the socket error; their str() is a
    tuple repr with object addresses. Keep the message an operator can act on.
    """
    inner: object = exc.args[0] if exc.args else exc
    reason = getattr(inner, "reason", None)  # urllib3 MaxRetryError
    if isinstance(reason, BaseException):
        inner = reason
    if isinstance(inner, BaseException) and inner.args and isinstance(inner.args[0], str):
        text = inner.args[0]
    else:
        text = str(inner)
    # "<urllib3.connection.HTTPConnection object at 0x...>: Failed to establish a new
    # connection: [Errno 111] Connection refused": keep the tail.
    if ">: " in text:
        text = text.split(">: ", 1)[1]
    return text
