"""Remembered KDS failures, so that asking again for what just failed costs nothing.

A VCEK lookup is keyed by (product, chip ID, TCB), and every one of those is chosen
by whoever submits a report: without memory, each forged CHIP_ID a local user sends
costs one outbound request against the machine's KDS rate limit, and each repeat
costs another. A failure (404, any other 4xx, 429, 5xx, a timeout, an answer that
does not verify) is therefore remembered for a while and a repeat fails at once with
the remembered reason. A 429 or 503 with Retry-After is remembered exactly that long
(capped); anything else for ``ttl`` seconds.

Memory only, bounded in entries, on an injected monotonic clock. Keys are whatever
the cache passes: it passes a SHA-256 of the chip ID, never the ID itself, and the
remembered reason is the KDS client's message, whose URLs have the chip ID redacted.
"""

from __future__ import annotations

import collections
import dataclasses
import threading
import time
from typing import Hashable, Optional

from snpd.errors import CertificatesUnavailable, KdsError
from snpd.ratelimit import Clock

#: Statuses whose Retry-After says how long the failure lasts.
RETRY_AFTER_STATUSES = frozenset({429, 503})
#: The longest Retry-After honoured: a broken or hostile server must not switch
#: VCEK lookups off for days.
MAX_RETRY_AFTER = 3600.0


@dataclasses.dataclass(frozen=True)
class Remembered:
    """One failed lookup: why, with which HTTP status, and until when (clock time)."""

    reason: str
    status: Optional[int]
    failed_at: float
    until: float


class NegativeCache:
    """Failed lookups by key, each until it expires; the oldest go first when full."""

    def __init__(self, ttl: float = 600.0, max_entries: int = 4096, *,
                 clock: Clock = time.monotonic) -> None:
        if not ttl > 0:
            raise ValueError(f"ttl must be positive, got {ttl!r}")
        if max_entries < 1:
            raise ValueError(f"max_entries must be at least 1, got {max_entries!r}")
        self.ttl = ttl
        self.max_entries = max_entries
        self._clock = clock
        self._lock = threading.Lock()
        self._entries: collections.OrderedDict[Hashable, Remembered] = collections.OrderedDict()

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    def lifetime(self, exc: CertificatesUnavailable) -> float:
        """How long to remember ``exc``: its Retry-After for 429/503, else ``ttl``."""
        if isinstance(exc, KdsError) and exc.status in RETRY_AFTER_STATUSES \
                and exc.retry_after is not None:
            return min(max(0.0, exc.retry_after), MAX_RETRY_AFTER)
        return self.ttl

    def remember(self, key: Hashable, exc: CertificatesUnavailable) -> None:
        lifetime = self.lifetime(exc)
        if lifetime <= 0:
            return  # "Retry-After: 0": ask again at once
        now = self._clock()
        entry = Remembered(str(exc), getattr(exc, "status", None), now, now + lifetime)
        with self._lock:
            self._entries.pop(key, None)
            self._entries[key] = entry
            if len(self._entries) > self.max_entries:
                self._purge(now)
            while len(self._entries) > self.max_entries:
                self._entries.popitem(last=False)

    def check(self, key: Hashable, what: str) -> None:
        """Raise the remembered failure for ``key`` (a KdsError) if it has not expired."""
        now = self._clock()
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None and now >= entry.until:
                del self._entries[key]
                entry = None
        if entry is None:
            return
        left = entry.until - now
        raise KdsError(f"{what}: not asked again for {left:.0f} s; it failed "
                       f"{now - entry.failed_at:.0f} s ago: {entry.reason}",
                       status=entry.status, retry_after=left)

    def _purge(self, now: float) -> None:
        for key in [k for k, e in self._entries.items() if now >= e.until]:
            del self._entries[key]
