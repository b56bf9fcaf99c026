"""The daemon's Secrets: resources and tokens from the configured Trustee KBSes.

Callers name a KBS from ``[kbs.NAME]`` and a resource; they never pass a URL. The
``allow`` rules decide who gets what (:mod:`snpd.kbs.access`); nothing is allowed by
default. The protocol runs in a small thread pool (:class:`snpd.kbs.client.KbsClient`
blocks on HTTP), one client per KBS, so concurrent fetches from one KBS share one
attestation. The evidence comes from the service's broker, on the caller's account,
like any report. Secrets and tokens are returned and forgotten: never logged, never
written to disk.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import threading
import time
from collections import Counter
from typing import TYPE_CHECKING, Awaitable, Callable, Dict, Mapping, Optional, TypeVar

from snpd.access import Caller
from snpd.errors import Busy, InvalidArgument, KbsError, PermissionDenied, SnpdError
from snpd.events import Events
from snpd.kbs.access import SecretsAccess, split_resource_path
from snpd.kbs.client import KbsClient

if TYPE_CHECKING:
    from snpd.config import KbsEndpoint

_T = TypeVar("_T")
EvidenceSource = Callable[[Caller, bytes], Awaitable[bytes]]
"""``evidence(caller, binding)``: the primary evidence JSON (UTF-8 bytes) binding
``binding``, for the caller's account at the broker."""
GidLookup = Callable[[str], Optional[int]]
MAX_WAITING = 32
"""Calls waiting for one KBS at once; beyond, Busy. A KBS that hangs holds its
callers until its timeout, and no more of them than this."""
PER_UID_WAITING = 4
"""Of those, one uid's (root's are not counted): one user's flood of calls leaves the
others their share."""
EVIDENCE_TIMEOUT = 120.0
_POLL = 0.25


class _BrokerAttester:
    """Evidence for one call's attestation, from the event loop's broker; runs on a
    KBS worker thread and waits for the loop, but not past ``closing``: a stopping
    daemon's loop no longer runs the request, and its worker must not wait for it."""

    def __init__(self, tee: str, loop: asyncio.AbstractEventLoop,
                 make: Callable[[bytes], Awaitable[bytes]], closing: threading.Event) -> None:
        self.tee = tee
        self._loop = loop
        self._make = make
        self._closing = closing

    def evidence(self, binding: bytes) -> object:
        future = asyncio.run_coroutine_threadsafe(_awaited(self._make(binding)), self._loop)
        deadline = time.monotonic() + EVIDENCE_TIMEOUT
        while True:
            try:
                data = future.result(_POLL)
                break
            except concurrent.futures.TimeoutError:
                if self._closing.is_set() or time.monotonic() > deadline:
                    future.cancel()
                    raise KbsError("no evidence for the KBS: snpd is stopping, or the "
                                   "firmware did not answer in time") from None
        try:
            return json.loads(data)
        except ValueError:
            raise KbsError("the evidence for the KBS is not JSON") from None


async def _awaited(value: Awaitable[bytes]) -> bytes:
    return await value


class _Kbs:
    def __init__(self, endpoint: KbsEndpoint, client: KbsClient, access: SecretsAccess) -> None:
        self.endpoint = endpoint
        self.client = client
        self.access = access
        self.waiting_by_uid: Counter[int] = Counter()  # calls waiting here, by uid

    def admit(self, caller: Caller) -> Optional[Busy]:
        """Count one more waiting call of ``caller``, or the Busy that refuses it."""
        name, mine = self.endpoint.name, self.waiting_by_uid[caller.uid]
        if sum(self.waiting_by_uid.values()) >= MAX_WAITING:
            return Busy(f"{MAX_WAITING} calls are already waiting for KBS {name}")
        if caller.uid != 0 and mine >= PER_UID_WAITING:
            return Busy(f"{caller.describe()} already has {mine} calls waiting for KBS {name}")
        self.waiting_by_uid[caller.uid] += 1
        return None

    def release(self, caller: Caller) -> None:
        self.waiting_by_uid[caller.uid] -= 1
        if not self.waiting_by_uid[caller.uid]:
            del self.waiting_by_uid[caller.uid]


class Secrets:
    """GetResource and GetToken over the configured KBSes."""

    def __init__(self, endpoints: Mapping[str, KbsEndpoint], *, tee: str,
                 evidence: EvidenceSource, events: Events, gid_lookup: GidLookup,
                 workers: int = 4,
                 client_factory: Callable[[KbsEndpoint], KbsClient] = (
                     lambda e: KbsClient(e.name, e.url, ca_cert=e.ca_cert, tee_key=e.tee_key,
                                         timeout=e.timeout_s))) -> None:
        self.tee = tee
        self._evidence = evidence
        self._events = events
        self._gid_lookup = gid_lookup
        self._client_factory = client_factory
        self._kbs: Dict[str, _Kbs] = {}
        self._closing = threading.Event()
        self._pool = concurrent.futures.ThreadPoolExecutor(
            max_workers=workers, thread_name_prefix="snpd-kbs")
        self.configure(endpoints)

    def configure(self, endpoints: Mapping[str, KbsEndpoint]) -> None:
        """Apply a (re)loaded configuration: rules always; a KBS whose endpoint changed
        gets a new client (and so a new session)."""
        current: Dict[str, _Kbs] = {}
        for name, endpoint in endpoints.items():
            access = SecretsAccess.resolve(endpoint.allow, self._gid_lookup)
            for group in sorted(access.unknown_groups):
                self._events.log("warning", f"kbs.{name}: group {group!r} does not exist; "
                                            "its rule names no group member")
            old = self._kbs.get(name)
            if old is not None and _same_server(old.endpoint, endpoint):
                old.endpoint, old.access = endpoint, access
                current[name] = old
            else:
                if old is not None:
                    self._retire(old)
                current[name] = _Kbs(endpoint, self._client_factory(endpoint), access)
        for name, gone in self._kbs.items():
            if name not in current:
                self._retire(gone)
        self._kbs = current

    def _retire(self, kbs: _Kbs) -> None:
        """A replaced client: its call in progress (if any) ends the session after."""
        kbs.client.close()

    def _find(self, name: object) -> _Kbs:
        if not isinstance(name, str):
            raise InvalidArgument("the KBS name must be a string")
        kbs = self._kbs.get(name)
        if kbs is None:
            known = ", ".join(sorted(self._kbs)) or "none"
            raise InvalidArgument(f"no KBS named {name[:64]!r} is configured (configured: "
                                  f"{known})")
        return kbs

    async def get_resource(self, caller: Caller, name: str, path: str) -> bytes:
        kbs = self._find(name)
        if split_resource_path(path) is None:
            raise InvalidArgument("the resource path must be REPOSITORY/TYPE/TAG, each 1-128 "
                                  "letters, digits, '_', '-' or '.' and not starting with '.'"
                                  " or '-'")
        if not kbs.access.may_fetch(caller.uid, caller.gids, path):
            raise PermissionDenied(f"GetResource {path} from kbs.{name}: "
                                   f"{caller.describe()} is not allowed (no allow rule "
                                   "names it for that resource)")
        what = f"resource {path}"
        attester = self._attester(caller)
        return await self._run(caller, kbs, what, lambda: kbs.client.resource(path, attester))

    async def get_token(self, caller: Caller, name: str) -> str:
        kbs = self._find(name)
        if not kbs.access.may_have_token(caller.uid, caller.gids):
            raise PermissionDenied(f"GetToken from kbs.{name}: {caller.describe()} is "
                                   "not allowed (no allow rule with token = true names it)")
        attester = self._attester(caller)
        return await self._run(caller, kbs, "token", lambda: kbs.client.token(attester))

    def _attester(self, caller: Caller) -> _BrokerAttester:
        return _BrokerAttester(self.tee, asyncio.get_running_loop(),
                               lambda binding: self._evidence(caller, binding), self._closing)

    async def _run(self, caller: Caller, kbs: _Kbs, what: str, work: Callable[[], _T]) -> _T:
        name = kbs.endpoint.name
        busy = kbs.admit(caller)
        if busy is not None:
            self._events.secret_failed(caller, name, what, busy)
            raise busy
        try:
            result = await asyncio.wrap_future(self._pool.submit(work))
        except SnpdError as exc:
            self._events.secret_failed(caller, name, what, exc)
            raise
        except Exception as exc:  # a bug below: typed, logged without secrets
            self._events.secret_failed(caller, name, what, exc)
            raise KbsError(f"KBS {name}: {what} failed ({type(exc).__name__})"
                                    ) from None
        finally:
            kbs.release(caller)
        self._events.secret_released(caller, name, what)
        return result

    def close(self) -> None:
        """Stop: queued calls are cancelled; one in progress ends by its KBS timeout
        without being waited for (one waiting for evidence gives up at once), and its
        session dies with the process."""
        self._closing.set()
        self._pool.shutdown(wait=False, cancel_futures=True)
        for kbs in self._kbs.values():
            kbs.client.close()


def _same_server(a: KbsEndpoint, b: KbsEndpoint) -> bool:
    return (a.url, a.ca_cert, a.tee_key, a.timeout_s) == (b.url, b.ca_cert, b.tee_key,
                                                          b.timeout_s)
