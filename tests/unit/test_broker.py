"""The broker: one worker thread, bounded fair queueing, deadlines, cancellation,
busy retries, pacing and VMPCK health, against a fake device that blocks until
the test releases it. No assertion depends on wall-clock time: the tests assert
order, counts and outcomes, and the clock and sleep are injected."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import threading
import time
from collections import deque
from typing import (
    Any,
    AsyncIterator,
    Callable,
    Coroutine,
    Deque,
    Dict,
    List,
    Optional,
    Set,
    Tuple,
)

import pytest

from snpd.abi.uapi import DerivedKeyRequest
from snpd.broker import Broker, BrokerState
from snpd.device.base import ExtendedReport, ExtendedReportRequest, ReportRequest
from snpd.errors import (
    Busy,
    DeviceError,
    DeviceUnavailable,
    Internal,
    InvalidArgument,
    ShuttingDown,
    SnpdError,
    Timeout,
    VmpckBadMessage,
    VmpckDisabled,
    VmpckTimedOut,
)

# -- fakes -----------------------------------------------------------------------------


class FakeClock:
    """A monotonic clock the test (and the fake device and sleep) moves by hand."""

    def __init__(self, start: float = 1000.0) -> None:
        self.now = start
        self._lock = threading.Lock()

    def __call__(self) -> float:
        with self._lock:
            return self.now

    def advance(self, seconds: float) -> None:
        with self._lock:
            self.now += seconds


class FakeSleep:
    """Records what the worker asked to sleep and moves the fake clock instead."""

    def __init__(self, clock: FakeClock) -> None:
        self.clock = clock
        self.slept: List[float] = []

    def __call__(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.clock.advance(seconds)


class FakeDevice:
    """Records calls, their threads and overlap; blocks while ``gate`` is clear;
    raises the scripted errors in order (``None`` in the script means succeed)."""

    name = "fake"

    def __init__(self, clock: Optional[FakeClock] = None, latency: float = 0.0) -> None:
        self.clock = clock
        self.latency = latency
        self.gate = threading.Event()
        self.gate.set()
        self.script: Deque[Optional[BaseException]] = deque()
        self.calls: List[Tuple[str, Tuple[Any, ...]]] = []
        self.call_times: List[float] = []
        self.threads: Set[str] = set()
        self.active = 0
        self.max_active = 0
        self.closed_by: List[str] = []
        self._lock = threading.Lock()

    def _call(self, op: str, args: Tuple[Any, ...]) -> None:
        with self._lock:
            self.active += 1
            self.max_active = max(self.max_active, self.active)
            self.calls.append((op, args))
            self.threads.add(threading.current_thread().name)
            if self.clock is not None:
                self.call_times.append(self.clock())
            outcome = self.script.popleft() if self.script else None
        try:
            assert self.gate.wait(30), "the test never released the fake device"
            if self.clock is not None and self.latency:
                self.clock.advance(self.latency)
            if outcome is not None:
                raise outcome
        finally:
            with self._lock:
                self.active -= 1

    def report(self, request: ReportRequest) -> bytes:
        self._call("report", (request.report_data, request.vmpl))
        return b"R" + request.report_data + bytes([request.vmpl])

    def extended_report(self, request: ReportRequest) -> ExtendedReport:
        self._call("extended_report", (request.report_data, request.vmpl))
        return ExtendedReport(b"X" + request.report_data + bytes([request.vmpl]))

    def derived_key(self, request: DerivedKeyRequest) -> bytes:
        self._call("derived_key", (request,))
        return request.guest_svn.to_bytes(32, "big")

    def describe(self) -> Dict[str, object]:
        return {"backend": self.name}

    def close(self) -> None:
        self.closed_by.append(threading.current_thread().name)

    def report_datas(self) -> List[bytes]:
        with self._lock:
            return [args[0] for _, args in self.calls]


def data(n: int) -> bytes:
    return n.to_bytes(64, "big")


def rep(n: int, vmpl: int = 0) -> ReportRequest:
    return ReportRequest(data(n), vmpl)


def ext(n: int, vmpl: int = 0) -> ExtendedReportRequest:
    return ExtendedReportRequest(data(n), vmpl)


def run(test: Callable[[], Coroutine[Any, Any, None]]) -> None:
    asyncio.run(test())


async def eventually(check: Callable[[], bool], what: str) -> None:
    """Let the loop and the worker run until ``check`` holds (a hang guard, not timing)."""
    for _ in range(20000):
        if check():
            return
        await asyncio.sleep(0.0005)
    raise AssertionError(f"never happened: {what}")


@contextlib.asynccontextmanager
async def running(device: FakeDevice, **options: Any) -> AsyncIterator[Broker]:
    broker = Broker(device, **options)
    broker.start()
    try:
        yield broker
    finally:
        device.gate.set()
        await broker.stop(drain=False)


async def blocked(broker: Broker, device: FakeDevice, client: str = "blocker"
                  ) -> asyncio.Task[bytes]:
    """Close the gate and put one request in flight, stuck inside the device."""
    device.gate.clear()
    calls = len(device.calls)
    task = asyncio.ensure_future(broker.submit(rep(0), client=client))
    await eventually(lambda: len(device.calls) > calls, "the blocker reached the device")
    return task


# -- results and errors ----------------------------------------------------------------


def test_results_are_delivered_for_every_operation() -> None:
    async def main() -> None:
        device = FakeDevice()
        async with running(device) as broker:
            assert await broker.submit(rep(1, 2), client="a") == b"R" + data(1) + b"\x02"
            extended = await broker.submit(ext(3), client="a")
            assert extended == ExtendedReport(b"X" + data(3) + b"\x00")
            key = await broker.submit(DerivedKeyRequest(guest_svn=7), client="b")
            assert key == (7).to_bytes(32, "big")
            stats = broker.stats()
            assert (stats["report.ok"], stats["extended_report.ok"], stats["derived_key.ok"]) \
                == (1, 1, 1)
            assert stats["firmware_requests"] == 3
            assert broker.state == BrokerState("ready", "")
            assert broker.pending() == 0

    run(main)


def test_caller_errors_pass_through_typed_and_keep_the_broker_ready() -> None:
    async def main() -> None:
        device = FakeDevice()
        rejected = InvalidArgument("the firmware rejected the report request: INVALID_PARAM")
        device.script.append(rejected)
        changes: List[BrokerState] = []
        async with running(device, on_state_change=changes.append) as broker:
            with pytest.raises(InvalidArgument) as caught:
                await broker.submit(rep(1), client="a")
            assert caught.value is rejected
            assert await broker.submit(rep(2), client="a") == b"R" + data(2) + b"\x00"
            assert broker.state.state == "ready" and changes == []
            assert broker.stats()["report.InvalidArgument"] == 1

    run(main)


def test_only_firmware_requests_reach_the_device() -> None:
    """The request types validate themselves; what is not one never takes a slot."""
    async def main() -> None:
        device = FakeDevice()
        async with running(device) as broker:
            with pytest.raises(InvalidArgument):
                ReportRequest(bytes(65), 0)
            with pytest.raises(InvalidArgument):
                ExtendedReportRequest(data(1), 4)
            for nonsense in (b"not a request", "format_disk", None):
                with pytest.raises(Internal, match="not a firmware request"):
                    await broker.submit(nonsense, client="a")  # type: ignore[call-overload]
            assert device.calls == [] and broker.pending() == 0
            assert broker.stats()["queue.high_water"] == 0

    run(main)


def test_short_report_data_is_padded_before_the_device_sees_it() -> None:
    async def main() -> None:
        device = FakeDevice()
        async with running(device) as broker:
            assert await broker.submit(ReportRequest(b"abc", 1), client="a") == \
                b"R" + b"abc".ljust(64, b"\0") + b"\x01"
        assert device.calls == [("report", (b"abc".ljust(64, b"\0"), 1))]

    run(main)


def test_a_backend_bug_becomes_internal_and_keeps_the_broker_ready() -> None:
    async def main() -> None:
        device = FakeDevice()
        device.script.append(ZeroDivisionError("oops"))
        async with running(device) as broker:
            with pytest.raises(Internal, match="ZeroDivisionError"):
                await broker.submit(rep(1), client="a")
            assert broker.state.state == "ready"
            assert await broker.submit(rep(2), client="a") == b"R" + data(2) + b"\x00"

    run(main)


# -- one worker, many callers -------------------------------------------------------------


def test_one_worker_thread_serves_200_concurrent_tasks_without_overlap() -> None:
    async def main() -> None:
        device = FakeDevice()
        before = threading.active_count()
        broker = Broker(device, max_pending=200, per_client=8)
        broker.start()
        assert threading.active_count() == before + 1
        assert "snpd-device" in {t.name for t in threading.enumerate()}
        try:
            jobs = [broker.submit(rep(i, i % 4), client=f"client-{i % 25}")
                    for i in range(200)]
            results = await asyncio.gather(*jobs)
        finally:
            await broker.stop()
        assert results == [b"R" + data(i) + bytes([i % 4]) for i in range(200)]
        assert device.threads == {"snpd-device"}
        assert device.max_active == 1
        assert len(device.calls) == 200
        assert threading.active_count() == before
        assert broker.stats()["report.ok"] == 200

    run(main)


def test_full_queue_answers_busy_at_once_while_the_device_is_blocked() -> None:
    async def main() -> None:
        device = FakeDevice()
        async with running(device, max_pending=3, per_client=8) as broker:
            first = await blocked(broker, device)
            queued = [asyncio.ensure_future(broker.submit(rep(i), client=f"c{i}"))
                      for i in range(1, 4)]
            await eventually(lambda: broker.pending() == 4, "three requests queued")
            with pytest.raises(Busy, match="queue is full"):
                await broker.submit(rep(9), client="late")  # gate still closed
            assert not device.gate.is_set() and len(device.calls) == 1
            device.gate.set()
            assert await first == b"R" + data(0) + b"\x00"
            assert [await q for q in queued] == [b"R" + data(i) + b"\x00" for i in range(1, 4)]
            stats = broker.stats()
            assert stats["queue.rejected_busy"] == 1 and stats["report.Busy"] == 1
            assert stats["queue.high_water"] == 3
            assert data(9) not in device.report_datas()

    run(main)


def test_per_client_cap_rejects_only_that_client() -> None:
    async def main() -> None:
        device = FakeDevice()
        async with running(device, max_pending=10, per_client=2) as broker:
            first = await blocked(broker, device, client="a")
            mine = [asyncio.ensure_future(broker.submit(rep(i), client="a"))
                    for i in (1, 2)]
            await eventually(lambda: broker.pending() == 3, "a's two requests queued")
            with pytest.raises(Busy, match="this client"):
                await broker.submit(rep(3), client="a")
            other = asyncio.ensure_future(broker.submit(rep(4), client="b"))
            await eventually(lambda: broker.pending() == 4, "b's request queued")
            device.gate.set()
            await first
            await asyncio.gather(*mine, other)
            assert data(3) not in device.report_datas()
            assert broker.stats()["queue.rejected_busy"] == 1

    run(main)


def test_round_robin_across_clients_and_fifo_within_one() -> None:
    async def main() -> None:
        device = FakeDevice()
        async with running(device, max_pending=64, per_client=16) as broker:
            first = await blocked(broker, device, client="c")
            a = [asyncio.ensure_future(broker.submit(rep(100 + i), client="A"))
                 for i in range(10)]
            b = [asyncio.ensure_future(broker.submit(rep(200 + i), client="B"))
                 for i in range(2)]
            await eventually(lambda: broker.pending() == 13, "all twelve queued")
            device.gate.set()
            await asyncio.gather(first, *a, *b)
        order = device.report_datas()[1:]  # after the blocker
        assert set(order[:4]) >= {data(200), data(201)}
        assert [d for d in order if d in {data(100 + i) for i in range(10)}] == \
            [data(100 + i) for i in range(10)]
        assert order[:4] == [data(100), data(200), data(101), data(201)]

    run(main)


def test_a_user_with_many_clients_gets_one_share() -> None:
    """Round-robin goes across users first: user U's four connections together get
    the firmware as often as user V's one."""
    async def main() -> None:
        device = FakeDevice()
        async with running(device, max_pending=64, per_client=16) as broker:
            first = await blocked(broker, device, client="blocker")
            u = [asyncio.ensure_future(broker.submit(rep(100 + 10 * c + i), client=f"u{c}",
                                                     user="U"))
                 for c in range(4) for i in range(2)]
            v = [asyncio.ensure_future(broker.submit(rep(200 + i), client="v", user="V"))
                 for i in range(4)]
            await eventually(lambda: broker.pending() == 13, "all twelve queued")
            device.gate.set()
            await asyncio.gather(first, *u, *v)
        order = device.report_datas()[1:]
        users = ["U" if d in {data(100 + 10 * c + i) for c in range(4) for i in range(2)}
                 else "V" for d in order]
        assert users[:8] == ["U", "V"] * 4
        # and U's connections take turns among themselves
        assert order[0:8:2] == [data(100), data(110), data(120), data(130)]

    run(main)


def test_per_user_share_counts_every_connection_of_that_user() -> None:
    async def main() -> None:
        device = FakeDevice()
        async with running(device, max_pending=64, per_client=8, per_user=3) as broker:
            first = await blocked(broker, device, client="blocker")
            mine = [asyncio.ensure_future(broker.submit(rep(i), client=f"u{i}", user=1000))
                    for i in range(3)]
            await eventually(lambda: broker.pending() == 4, "three queued")
            with pytest.raises(Busy, match="this user"):
                await broker.submit(rep(9), client="u9", user=1000)
            other = asyncio.ensure_future(broker.submit(rep(4), client="w", user=1001))
            await eventually(lambda: broker.pending() == 5, "another user still queues")
            device.gate.set()
            await asyncio.gather(first, *mine, other)
            assert data(9) not in device.report_datas()

    run(main)


def test_root_keeps_a_reserve_beyond_a_full_queue() -> None:
    async def main() -> None:
        device = FakeDevice()
        async with running(device, max_pending=4, per_client=8, per_user=4,
                           reserve=2) as broker:
            first = await blocked(broker, device, client="blocker")
            others = [asyncio.ensure_future(broker.submit(rep(i), client=f"x{i}", user=1000 + i))
                      for i in range(4)]
            await eventually(lambda: broker.pending() == 5, "the queue is full")
            with pytest.raises(Busy, match="queue is full"):
                await broker.submit(rep(8), client="y", user=2000)
            root = [asyncio.ensure_future(broker.submit(rep(50 + i), client="r", user=0,
                                                        reserved=True))
                    for i in range(2)]
            await eventually(lambda: broker.pending() == 7, "root queued in its reserve")
            with pytest.raises(Busy, match="queue is full"):
                await broker.submit(rep(9), client="r", user=0, reserved=True)
            device.gate.set()
            await asyncio.gather(first, *others, *root)
            assert data(50) in device.report_datas() and data(51) in device.report_datas()

    run(main)


# -- deadlines and cancellation -------------------------------------------------------------


def test_request_whose_deadline_passed_in_the_queue_is_not_sent() -> None:
    async def main() -> None:
        clock = FakeClock()
        device = FakeDevice()
        async with running(device, clock=clock) as broker:
            first = await blocked(broker, device)
            late = asyncio.ensure_future(
                broker.submit(rep(1), client="b", deadline=clock() + 5))
            await eventually(lambda: broker.pending() == 2, "queued")
            clock.advance(10)  # the fake clock: the loop's own timer is far off
            device.gate.set()
            await first
            with pytest.raises(Timeout, match="not sent"):
                await late
            assert device.report_datas() == [data(0)]
            stats = broker.stats()
            assert stats["dropped.deadline"] == 1 and stats["report.Timeout"] == 1

    run(main)


def test_deadline_answers_the_caller_while_the_device_is_still_blocked() -> None:
    async def main() -> None:
        device = FakeDevice()
        async with running(device) as broker:  # real monotonic clock
            first = await blocked(broker, device)
            with pytest.raises(Timeout, match="not sent"):
                await broker.submit(rep(1), client="b", deadline=time.monotonic() + 0.01)
            assert not device.gate.is_set()  # answered without waiting for the device
            assert broker.pending() == 1  # its queue slot is free again
            device.gate.set()
            await first
            assert device.report_datas() == [data(0)]
            assert broker.stats()["dropped.deadline"] == 1

    run(main)


def test_deadline_already_past_at_submit() -> None:
    async def main() -> None:
        clock = FakeClock()
        device = FakeDevice()
        async with running(device, clock=clock) as broker:
            with pytest.raises(Timeout):
                await broker.submit(rep(1), client="a", deadline=clock() - 1)
            assert device.calls == []

    run(main)


def test_cancelled_caller_is_not_sent() -> None:
    async def main() -> None:
        device = FakeDevice()
        async with running(device) as broker:
            first = await blocked(broker, device)
            gone = asyncio.ensure_future(broker.submit(rep(1), client="b"))
            stays = asyncio.ensure_future(broker.submit(rep(2), client="c"))
            await eventually(lambda: broker.pending() == 3, "queued")
            gone.cancel()
            with pytest.raises(asyncio.CancelledError):
                await gone
            assert broker.pending() == 2
            device.gate.set()
            await first
            await stays
            assert device.report_datas() == [data(0), data(2)]
            assert broker.stats()["dropped.cancelled"] == 1

    run(main)


def test_wait_for_timeout_withdraws_the_request() -> None:
    async def main() -> None:
        device = FakeDevice()
        async with running(device) as broker:
            first = await blocked(broker, device)
            with pytest.raises(asyncio.TimeoutError):
                await asyncio.wait_for(broker.submit(rep(1), client="b"), 0.01)
            device.gate.set()
            await first
            assert device.report_datas() == [data(0)]
            assert broker.stats()["dropped.cancelled"] == 1

    run(main)


# -- host busy -------------------------------------------------------------------------------


def test_busy_burst_is_absorbed_by_retries_with_backoff() -> None:
    async def main() -> None:
        clock = FakeClock()
        sleep = FakeSleep(clock)
        device = FakeDevice()
        device.script.extend([Busy("host busy"), Busy("host busy"), None])
        async with running(device, clock=clock, sleep=sleep, busy_backoff=0.5) as broker:
            assert await broker.submit(rep(1), client="a") == b"R" + data(1) + b"\x00"
            stats = broker.stats()
        assert sleep.slept == [0.5, 1.0]
        assert len(device.calls) == 3
        assert stats["retries.busy"] == 2 and stats["firmware_requests"] == 3
        assert stats["report.ok"] == 1 and "report.Busy" not in stats
        assert broker.state.state == "ready"

    run(main)


def test_busy_beyond_the_retries_reaches_the_caller() -> None:
    async def main() -> None:
        clock = FakeClock()
        device = FakeDevice()
        last = Busy("host busy 4")
        device.script.extend([Busy("1"), Busy("2"), Busy("3"), last, None])
        async with running(device, clock=clock, sleep=FakeSleep(clock), busy_retries=3
                           ) as broker:
            with pytest.raises(Busy) as caught:
                await broker.submit(rep(1), client="a")
            assert caught.value is last
            stats = broker.stats()
        assert len(device.calls) == 4
        assert stats["retries.busy"] == 3 and stats["report.Busy"] == 1
        assert broker.state.state == "ready"

    run(main)


def test_busy_retries_stay_within_the_deadline() -> None:
    async def main() -> None:
        clock = FakeClock()
        sleep = FakeSleep(clock)
        device = FakeDevice()
        device.script.extend([Busy("1"), Busy("2"), Busy("3")])
        async with running(device, clock=clock, sleep=sleep, busy_backoff=0.5) as broker:
            with pytest.raises(Busy):
                # retry 1 starts at +0.5 (< 1.2); retry 2 would start at +1.5: given up
                await broker.submit(rep(1), client="a", deadline=clock() + 1.2)
            assert broker.stats()["retries.busy"] == 1
        assert len(device.calls) == 2 and sleep.slept == [0.5]

    run(main)


def test_caller_gone_during_backoff_stops_the_retries() -> None:
    async def main() -> None:
        clock = FakeClock()
        in_backoff = threading.Event()
        resume = threading.Event()

        def sleep(seconds: float) -> None:
            in_backoff.set()
            assert resume.wait(30)
            clock.advance(seconds)

        device = FakeDevice()
        device.script.append(Busy("1"))
        async with running(device, clock=clock, sleep=sleep) as broker:
            task = asyncio.ensure_future(broker.submit(rep(1), client="a"))
            await eventually(in_backoff.is_set, "the worker backs off")
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            resume.set()
            assert await broker.submit(rep(2), client="b") == b"R" + data(2) + b"\x00"
        assert device.report_datas() == [data(1), data(2)]

    run(main)


# -- VMPCK health ------------------------------------------------------------------------------


DEGRADING: List[Callable[[], SnpdError]] = [
    lambda: VmpckDisabled("ENOTTY"),
    lambda: VmpckTimedOut("ETIMEDOUT"),
    lambda: VmpckBadMessage("bad message", errno=errno.EBADMSG),
]


@pytest.mark.parametrize("make_error", DEGRADING, ids=["ENOTTY", "ETIMEDOUT", "EBADMSG"])
def test_key_losing_errors_degrade_and_later_requests_fail_fast(
        make_error: Callable[[], SnpdError]) -> None:
    async def main() -> None:
        device = FakeDevice()
        error = make_error()
        device.script.append(error)
        changes: List[Tuple[BrokerState, str]] = []

        def on_change(state: BrokerState) -> None:
            changes.append((state, threading.current_thread().name))

        async with running(device, on_state_change=on_change, vmpck_id=0) as broker:
            device.gate.clear()
            failing = asyncio.ensure_future(broker.submit(rep(1), client="a"))
            await eventually(lambda: len(device.calls) == 1, "in flight")
            queued = asyncio.ensure_future(broker.submit(rep(2), client="b"))
            await eventually(lambda: broker.pending() == 2, "queued")
            device.gate.set()
            with pytest.raises(type(error)) as caught:
                await failing
            assert caught.value is error
            with pytest.raises(VmpckDisabled):
                await queued  # queued before the transition: answered, never sent
            with pytest.raises(VmpckDisabled) as fast:
                await broker.submit(DerivedKeyRequest(), client="c")
            assert broker.pending() == 0
            stats = broker.stats()
        assert len(device.calls) == 1
        assert len(changes) == 1
        state, thread = changes[0]
        assert thread == "snpd-device"
        assert state.state == "degraded" and broker.state == state
        reason = state.reason.lower()
        assert "reboot" in reason and "vmpck_id" in reason and "vmpck0" in reason
        assert state.reason in str(fast.value)
        assert stats["derived_key.VmpckDisabled"] == 1
        assert stats["report.VmpckDisabled"] == 1 + isinstance(error, VmpckDisabled)

    run(main)


def test_eio_is_confirmed_by_the_next_enotty_and_named_in_the_reason() -> None:
    """5.19-6.0 kernels returned EIO without wiping: only ENOTTY proves the key is gone."""
    async def main() -> None:
        device = FakeDevice()
        device.script.append(DeviceError("failed", errno=errno.EIO, fw_error=0x27))
        device.script.append(VmpckDisabled("VMPCK disabled"))
        async with running(device) as broker:
            with pytest.raises(DeviceError):
                await broker.submit(rep(1), client="a")
            assert broker.state.state == "ready"
            with pytest.raises(VmpckDisabled):
                await broker.submit(rep(2), client="a")
            assert broker.state.state == "degraded"
            assert "EIO" in broker.state.reason and "fw_error 0x27" in broker.state.reason

    run(main)


def test_eio_on_a_kernel_that_kept_the_key_stays_ready() -> None:
    async def main() -> None:
        device = FakeDevice()
        device.script.append(DeviceError("failed", errno=errno.EIO, vmm_error=2))
        async with running(device) as broker:
            with pytest.raises(DeviceError):
                await broker.submit(rep(1), client="a")
            await broker.submit(rep(2), client="a")
            assert broker.state.state == "ready"

    run(main)


def test_certificate_length_answer_does_not_degrade() -> None:
    async def main() -> None:
        device = FakeDevice()
        device.script.append(DeviceError("certs", errno=errno.EIO, vmm_error=1))
        changes: List[BrokerState] = []
        async with running(device, on_state_change=changes.append) as broker:
            with pytest.raises(DeviceError):
                await broker.submit(ext(1), client="a")
            assert broker.state.state == "ready" and changes == []
            await broker.submit(ext(2), client="a")
        assert len(device.calls) == 2

    run(main)


def test_unavailable_device_fails_the_broker() -> None:
    async def main() -> None:
        device = FakeDevice()
        device.script.append(DeviceUnavailable("cannot open /dev/sev-guest: EACCES"))
        changes: List[BrokerState] = []
        async with running(device, on_state_change=changes.append) as broker:
            with pytest.raises(DeviceUnavailable):
                await broker.submit(rep(1), client="a")
            with pytest.raises(DeviceUnavailable, match="EACCES"):
                await broker.submit(rep(2), client="a")
        assert len(device.calls) == 1
        assert [s.state for s in changes] == ["failed"]

    run(main)


def test_a_plain_timeout_from_the_device_is_no_lost_key() -> None:
    """Only VmpckLost says the kernel wiped the key; a Timeout is just a deadline."""
    async def main() -> None:
        device = FakeDevice()
        device.script.append(Timeout("the backend's own deadline"))
        changes: List[BrokerState] = []
        async with running(device, on_state_change=changes.append) as broker:
            with pytest.raises(Timeout):
                await broker.submit(rep(1), client="a")
            assert await broker.submit(rep(2), client="a") == b"R" + data(2) + b"\x00"
            assert broker.state.state == "ready" and changes == []

    run(main)


def test_a_failing_state_callback_does_not_break_the_worker() -> None:
    async def main() -> None:
        device = FakeDevice()
        device.script.append(VmpckTimedOut("ETIMEDOUT"))

        def explode(state: BrokerState) -> None:
            raise RuntimeError("listener bug")

        async with running(device, on_state_change=explode) as broker:
            with pytest.raises(Timeout):
                await broker.submit(rep(1), client="a")
            with pytest.raises(VmpckDisabled):
                await broker.submit(rep(2), client="a")
            assert broker.state.state == "degraded"

    run(main)


# -- pacing ----------------------------------------------------------------------------------------


def test_min_interval_spaces_firmware_requests() -> None:
    async def main() -> None:
        clock = FakeClock()
        sleep = FakeSleep(clock)
        device = FakeDevice(clock=clock, latency=0.25)
        broker = Broker(device, min_interval=2.0, clock=clock, sleep=sleep)
        jobs = [asyncio.ensure_future(broker.submit(rep(i), client=f"c{i}"))
                for i in range(3)]
        await eventually(lambda: broker.pending() == 3, "queued before start")
        broker.start()
        try:
            await asyncio.gather(*jobs)
        finally:
            await broker.stop()
        start = device.call_times[0]
        assert [t - start for t in device.call_times] == [0.0, 2.0, 4.0]
        assert sleep.slept == [1.75, 1.75]

    run(main)


def test_stop_interrupts_the_min_interval_sleep() -> None:
    async def main() -> None:
        clock = FakeClock()  # frozen: only an interrupted sleep lets the worker go on
        device = FakeDevice()
        broker = Broker(device, min_interval=3600.0, clock=clock)  # the real, event sleep
        broker.start()
        try:
            await broker.submit(rep(1), client="a")
            waiting = asyncio.ensure_future(broker.submit(rep(2), client="a"))
            await eventually(lambda: broker.pending() == 1, "queued behind the interval")
        finally:
            await broker.stop(drain=False)
        with pytest.raises(ShuttingDown):
            await waiting
        assert device.report_datas() == [data(1)]

    run(main)


# -- stopping and closing --------------------------------------------------------------------------


def test_stop_with_drain_completes_queued_requests() -> None:
    async def main() -> None:
        device = FakeDevice()
        broker = Broker(device)
        broker.start()
        first = await blocked(broker, device)
        queued = [asyncio.ensure_future(broker.submit(rep(i), client=f"c{i}"))
                  for i in range(1, 4)]
        await eventually(lambda: broker.pending() == 4, "queued")
        stopping = asyncio.ensure_future(broker.stop(drain=True))
        await asyncio.sleep(0)  # let stop() run up to its wait for the worker
        with pytest.raises(ShuttingDown):
            await broker.submit(rep(9), client="late")
        device.gate.set()
        await stopping
        assert await first == b"R" + data(0) + b"\x00"
        assert [await q for q in queued] == [b"R" + data(i) + b"\x00" for i in range(1, 4)]
        assert "snpd-device" not in {t.name for t in threading.enumerate()}
        assert broker.stats()["report.ShuttingDown"] == 1

    run(main)


def test_stop_without_drain_fails_queued_requests_and_finishes_the_one_in_flight() -> None:
    async def main() -> None:
        device = FakeDevice()
        broker = Broker(device)
        broker.start()
        first = await blocked(broker, device)
        queued = [asyncio.ensure_future(broker.submit(rep(i), client=f"c{i}"))
                  for i in range(1, 4)]
        await eventually(lambda: broker.pending() == 4, "queued")
        stopping = asyncio.ensure_future(broker.stop(drain=False))
        for job in queued:  # answered while the device is still blocked
            with pytest.raises(ShuttingDown, match="stopping"):
                await job
        assert not device.gate.is_set()
        device.gate.set()
        await stopping
        assert await first == b"R" + data(0) + b"\x00"
        assert device.report_datas() == [data(0)]
        assert isinstance(ShuttingDown("x"), Busy)

    run(main)


def test_stop_before_start_answers_queued_requests() -> None:
    async def main() -> None:
        device = FakeDevice()
        broker = Broker(device)
        job = asyncio.ensure_future(broker.submit(rep(1), client="a"))
        await eventually(lambda: broker.pending() == 1, "queued")
        await broker.close()
        with pytest.raises(ShuttingDown):
            await job
        assert device.calls == [] and device.closed_by == ["MainThread"]
        with pytest.raises(RuntimeError):
            broker.start()

    run(main)


def test_close_closes_the_device_once_on_the_worker() -> None:
    async def main() -> None:
        device = FakeDevice()
        broker = Broker(device)
        broker.start()
        await broker.submit(rep(1), client="a")
        await broker.close()
        await broker.close()
        assert device.closed_by == ["snpd-device"]

    run(main)


def test_statistics_are_plain_ints_with_stable_keys() -> None:
    async def main() -> None:
        device = FakeDevice()
        async with running(device) as broker:
            await broker.submit(rep(1), client="a")
            stats = broker.stats()
        for key in ("report.ok", "extended_report.ok", "derived_key.ok", "queue.high_water",
                    "queue.rejected_busy", "dropped.deadline", "dropped.cancelled",
                    "retries.busy", "firmware_requests"):
            assert key in stats
        assert all(type(v) is int for v in stats.values())
        assert stats["report.ok"] == 1 and stats["firmware_requests"] == 1

    run(main)


def test_constructor_rejects_nonsense_limits() -> None:
    with pytest.raises(ValueError):
        Broker(FakeDevice(), max_pending=0)
    with pytest.raises(ValueError):
        Broker(FakeDevice(), min_interval=-1)
    with pytest.raises(ValueError):
        Broker(FakeDevice(), request_timeout=0)
