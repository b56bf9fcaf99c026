"""Each caller's share of KDS work, per uid.

The KDS is a shared, rate-limited resource of the whole machine, and the VCEK a
VerifyReport needs is named by bytes the caller chose. So every non-root uid gets
two bounds: how many of its calls may wait on the KDS at once (they hold threads of
the small KDS pool), and how many outbound fetches it may cause, as a token bucket.
Beyond either the call fails at once with :class:`~snpd.errors.KdsBudgetExceeded`
(a ``Busy``) naming the bound, and the KDS is not contacted. Root is exempt: it is
the administrator, and RefreshCertificates is root's.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from typing import Callable, Dict, FrozenSet, Optional

from snpd.errors import KdsBudgetExceeded
from snpd.ratelimit import Clock, Rate, TokenBucket

#: Forget a uid's idle bookkeeping beyond this many uids (it is as good as new anyway).
MAX_TRACKED_UIDS = 1024
#: Per uid: 10 outbound fetches at once, then one a minute ([kds] per_uid_fetch_*).
DEFAULT_FETCH_RATE = Rate(burst=10, interval=60.0)


@dataclasses.dataclass(frozen=True)
class BudgetLimits:
    """``calls``: KDS-bound calls one uid may have in flight; ``fetches``: outbound
    fetches one uid may cause; ``exempt``: uids without limits."""

    calls: int = 2
    fetches: Rate = DEFAULT_FETCH_RATE
    exempt: FrozenSet[int] = frozenset({0})

    def __post_init__(self) -> None:
        if self.calls < 1:
            raise ValueError(f"calls must be at least 1, got {self.calls!r}")


@dataclasses.dataclass
class _Share:
    bucket: TokenBucket
    calls: int = 0


class KdsBudget:
    """Admission (:meth:`admit`) and the per-fetch gate (:meth:`gate`) for each uid.
    Thread-safe: admission runs on the event loop, the gate in KDS pool threads."""

    def __init__(self, limits: Optional[BudgetLimits] = None, *,
                 clock: Clock = time.monotonic) -> None:
        self.limits = limits or BudgetLimits()
        self._clock = clock
        self._lock = threading.Lock()
        self._shares: Dict[int, _Share] = {}

    def _share(self, uid: int) -> _Share:
        share = self._shares.get(uid)
        if share is None:
            if len(self._shares) >= MAX_TRACKED_UIDS:
                for idle in [u for u, s in self._shares.items()
                             if s.calls == 0 and s.bucket.full()]:
                    del self._shares[idle]
            share = self._shares[uid] = _Share(TokenBucket(self.limits.fetches, self._clock))
        return share

    def admit(self, uid: int) -> Callable[[], None]:
        """Count one KDS-bound call of ``uid``; returns its release (call it exactly
        once, when the call's KDS work has ended). Raises KdsBudgetExceeded when the
        uid already has its limit of calls in flight, or no fetch left to make."""
        if uid in self.limits.exempt:
            return _nothing
        with self._lock:
            share = self._share(uid)
            if share.calls >= self.limits.calls:
                raise KdsBudgetExceeded(
                    f"uid {uid} already has {share.calls} calls waiting on the KDS (limit: "
                    f"[kds] per_uid_calls = {self.limits.calls}); retry when they end",
                    limit="calls")
            if share.bucket.available() < 1.0:
                raise self._spent(uid, share)
            share.calls += 1
        released = threading.Event()

        def release() -> None:
            if released.is_set():
                return
            released.set()
            with self._lock:
                share.calls -= 1

        return release

    def gate(self, uid: int) -> Callable[[str], None]:
        """What the cache calls before each outbound fetch on ``uid``'s behalf: spends
        one token, or raises KdsBudgetExceeded before anything is sent."""
        if uid in self.limits.exempt:
            return _allow

        def spend(what: str) -> None:
            with self._lock:
                share = self._share(uid)
                if not share.bucket.take():
                    raise self._spent(uid, share, what)

        return spend

    def _spent(self, uid: int, share: _Share, what: str = "") -> KdsBudgetExceeded:
        rate = self.limits.fetches
        need = f" (needed for {what})" if what else ""
        return KdsBudgetExceeded(
            f"uid {uid} has used its KDS fetch budget{need} ([kds] per_uid_fetch_burst = "
            f"{rate.burst}, per_uid_fetch_interval_s = {rate.interval:g}); the next fetch "
            f"is allowed in {share.bucket.wait():.0f} s; the KDS was not contacted",
            limit="fetches")


def _nothing() -> None:
    """The release of an exempt caller's admission."""


def _allow(what: str) -> None:
    """The gate of an exempt caller: every fetch may go out."""
