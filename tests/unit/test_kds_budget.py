"""Token buckets and each uid's share of KDS work, on a clock the tests step."""

from __future__ import annotations

import pytest

from snpd.errors import Busy, KdsBudgetExceeded
from snpd.kds.budget import BudgetLimits, KdsBudget
from snpd.ratelimit import Rate, TokenBucket


class Ticks:
    """A monotonic clock the test steps."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_bucket_gives_a_burst_then_one_per_interval() -> None:
    ticks = Ticks()
    bucket = TokenBucket(Rate(burst=3, interval=10.0), ticks)
    assert [bucket.take() for _ in range(4)] == [True, True, True, False]
    assert bucket.wait() == pytest.approx(10.0)
    ticks.now += 9.9
    assert not bucket.take()
    ticks.now += 0.1
    assert bucket.take() and not bucket.take()
    ticks.now += 1000  # refills up to the burst, not beyond
    assert bucket.full() and bucket.available() == 3.0


def test_bucket_ignores_a_clock_that_steps_back() -> None:
    ticks = Ticks()
    bucket = TokenBucket(Rate(burst=1, interval=5.0), ticks)
    assert bucket.take()
    ticks.now -= 100
    assert not bucket.take()
    ticks.now += 5
    assert bucket.take()


@pytest.mark.parametrize("burst, interval", [(0, 1.0), (True, 1.0), (1, 0.0), (1, -1.0)])
def test_rate_rejects_nonsense(burst: int, interval: float) -> None:
    with pytest.raises(ValueError):
        Rate(burst, interval)


def budget(ticks: Ticks, calls: int = 2, burst: int = 3, interval: float = 60.0) -> KdsBudget:
    return KdsBudget(BudgetLimits(calls=calls, fetches=Rate(burst, interval)), clock=ticks)


def test_calls_in_flight_are_bounded_per_uid() -> None:
    b = budget(Ticks(), calls=2)
    first, second = b.admit(1000), b.admit(1000)
    with pytest.raises(KdsBudgetExceeded) as info:
        b.admit(1000)
    assert info.value.limit == "calls" and isinstance(info.value, Busy)
    assert "uid 1000" in str(info.value) and "per_uid_calls = 2" in str(info.value)
    b.admit(1001)()  # another uid has its own share
    first()
    first()  # a second release changes nothing
    b.admit(1000)
    with pytest.raises(KdsBudgetExceeded):
        b.admit(1000)
    second()


def test_fetches_are_a_token_bucket_per_uid() -> None:
    ticks = Ticks()
    b = budget(ticks, burst=3, interval=60.0)
    gate = b.gate(1000)
    for _ in range(3):
        gate("the Genoa VCEK for TCB x")
    with pytest.raises(KdsBudgetExceeded) as info:
        gate("the Genoa VCEK for TCB x")
    message = str(info.value)
    assert info.value.limit == "fetches"
    assert "per_uid_fetch_burst = 3" in message and "per_uid_fetch_interval_s = 60" in message
    assert "not contacted" in message and "the Genoa VCEK" in message
    # An empty bucket refuses at admission already: the call fails before it queues.
    with pytest.raises(KdsBudgetExceeded, match="fetch budget"):
        b.admit(1000)
    b.gate(1001)("x")  # another uid is not affected
    ticks.now += 60
    b.admit(1000)()
    gate("x")
    with pytest.raises(KdsBudgetExceeded):
        gate("x")


def test_root_is_exempt() -> None:
    b = budget(Ticks(), calls=1, burst=1)
    releases = [b.admit(0) for _ in range(100)]
    gate = b.gate(0)
    for _ in range(100):
        gate("x")
    for release in releases:
        release()
