"""Token buckets on an injected monotonic clock.

One shape of limit serves every place snpd meters something a caller can repeat
(outbound KDS fetches per uid, repeated journal records per key): a burst allowed
at once, then one more per interval. The clock is injected so tests step time
instead of sleeping, and nothing here is global: each owner keeps its buckets.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Dict, Optional, Tuple

#: Seconds on a monotonic clock (time.monotonic, or a test's stepped clock).
Clock = Callable[[], float]


@dataclasses.dataclass(frozen=True)
class Rate:
    """``burst`` events at once, then one more every ``interval`` seconds."""

    burst: int
    interval: float

    def __post_init__(self) -> None:
        if isinstance(self.burst, bool) or not isinstance(self.burst, int) or self.burst < 1:
            raise ValueError(f"burst must be an integer >= 1, got {self.burst!r}")
        if not self.interval > 0:
            raise ValueError(f"interval must be positive, got {self.interval!r}")

    def describe(self) -> str:
        return f"{self.burst} at once, then one every {self.interval:g} s"


class TokenBucket:
    """Starts full; :meth:`take` spends a token if there is one. Not locked: its owner
    holds its own lock around every call (each owner already needs one for its map)."""

    def __init__(self, rate: Rate, clock: Clock) -> None:
        self.rate = rate
        self._clock = clock
        self._tokens = float(rate.burst)
        self._stamp = clock()

    def _refill(self) -> float:
        now = self._clock()
        elapsed = max(0.0, now - self._stamp)  # a clock that steps back refills nothing
        self._tokens = min(float(self.rate.burst), self._tokens + elapsed / self.rate.interval)
        self._stamp = now
        return self._tokens

    def take(self) -> bool:
        """Spend one token: True if there was one."""
        if self._refill() >= 1.0:
            self._tokens -= 1.0
            return True
        return False

    def available(self) -> float:
        return self._refill()

    def full(self) -> bool:
        """True when the bucket is as good as new (its owner may forget it)."""
        return self._refill() >= self.rate.burst

    def wait(self) -> float:
        """Seconds until the next token (0 if one is there)."""
        return max(0.0, (1.0 - self._refill()) * self.rate.interval)


class LogLimiter:
    """At most one log line per ``interval`` seconds for each (event, uid); the
    next line that passes says how many were left out. One user refused
    thousands of times a second must not flood the journal, whose own rate
    limit would then drop everyone else's lines too. (For journal records with
    fields, :class:`snpd.events.Repeats` does the same with a burst.)"""

    MAX_KEYS = 1024  # beyond it, expired keys are dropped, then everyone shares one

    def __init__(self, interval: float, clock: Callable[[], float]) -> None:
        self.interval = interval
        self.clock = clock
        self._last: Dict[Tuple[str, int], float] = {}
        self._suppressed: Dict[Tuple[str, int], int] = {}

    def admit(self, event: str, uid: int) -> Optional[int]:
        """None to leave this line out; else the number left out since the last one."""
        now = self.clock()
        key = (event, uid)
        if key not in self._last and len(self._last) >= self.MAX_KEYS:
            self._prune(now)
            if len(self._last) >= self.MAX_KEYS:
                key = (event, -1)
        last = self._last.get(key)
        if last is not None and now - last < self.interval:
            self._suppressed[key] = self._suppressed.get(key, 0) + 1
            return None
        self._last[key] = now
        return self._suppressed.pop(key, 0)

    def _prune(self, now: float) -> None:
        for key in [k for k, t in self._last.items() if now - t >= self.interval]:
            del self._last[key]
            self._suppressed.pop(key, None)
