"""The single owner of the firmware channel: queue, fairness, deadlines, VMPCK health.

Why a broker (docs/reference/abi.md §2.7): the kernel serializes guest requests behind an
uninterruptible mutex, so a caller stuck behind a throttled request can sit in
D-state for about 60 s per request ahead of it, and a handful of failures wipe
the VMPCK for good. The broker is the only code that calls a :class:`Device`,
from exactly one worker thread, and adds what the kernel cannot:

- bounded admission: a full queue answers :class:`Busy` at once instead of
  growing without limit or making the asyncio front wait;
- fairness: round-robin across users (uids), then across one user's clients
  (connections), FIFO within one client, so neither a chatty client nor a user
  with many connections can starve the others; each user's share of the queue is
  bounded, and root keeps a reserve beyond the queue's size that no other user
  can take;
- deadlines and cancellation: a request whose deadline passed or whose caller
  went away is never sent to the firmware (each firmware call consumes a
  sequence number and, on a bad day, the key);
- pacing: an optional minimum interval between firmware requests, and bounded
  retries with exponential backoff when the host answers busy;
- VMPCK health: after an error that made the kernel wipe the key (VmpckLost:
  ETIMEDOUT, EBADMSG) or that shows it is gone (ENOTTY, which also confirms an
  earlier EIO), every later request fails fast with an explanation of what the
  operator must do, instead of queueing for a device that can no longer answer.

This module is the thin shell: the policy lives in pure parts, each tested with
plain calls: :mod:`snpd.scheduler` (admission, fairness, deadlines in the queue)
and :mod:`snpd.vmpck` (the health machine). Requests are typed values
(:data:`~snpd.device.base.FirmwareRequest`), validated where they are made, and
dispatched to the :class:`Device` method their type names.

Threading contract: the asyncio side (``submit``, ``stop``, ``close``) runs on
one event loop; the worker thread touches the loop only through
``loop.call_soon_threadsafe``. Shared state lives behind one
:class:`threading.Condition`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import threading
import time
from typing import (
    Any,
    Callable,
    Dict,
    Hashable,
    List,
    Optional,
    Tuple,
    Union,
    overload,
)

from snpd.abi.uapi import DerivedKeyRequest
from snpd.device.base import (
    Device,
    ExtendedReport,
    ExtendedReportRequest,
    FirmwareRequest,
    QuoteRequest,
    ReportRequest,
    VtpmQuote,
)
from snpd.errors import (
    Busy,
    DeviceUnavailable,
    Internal,
    ShuttingDown,
    SnpdError,
    Timeout,
    VmpckDisabled,
)
from snpd.scheduler import Scheduler, Ticket
from snpd.vmpck import BrokerState, StateName, VmpckHealth

__all__ = ["OPS", "Broker", "BrokerState", "StateName", "operation"]

log = logging.getLogger(__name__)

OPS: Tuple[str, ...] = ("report", "extended_report", "derived_key", "quote")
"""The operation names, one per request type (the :class:`Device` method each runs);
they name the ``<op>.<outcome>`` statistics."""

_FIXED_STATS = ("firmware_requests", "retries.busy")


def operation(request: FirmwareRequest) -> str:
    """The operation name of ``request``: which :class:`Device` method runs it."""
    if isinstance(request, ExtendedReportRequest):  # before its base, ReportRequest
        return "extended_report"
    if isinstance(request, ReportRequest):
        return "report"
    if isinstance(request, DerivedKeyRequest):
        return "derived_key"
    if isinstance(request, QuoteRequest):
        return "quote"
    raise Internal(f"broker: not a firmware request: {type(request).__name__}")


def _perform(device: Device, request: FirmwareRequest) -> object:
    """Run ``request`` on ``device`` (worker thread only)."""
    if isinstance(request, ExtendedReportRequest):
        return device.extended_report(request)
    if isinstance(request, ReportRequest):
        return device.report(request)
    if isinstance(request, QuoteRequest):
        return device.quote(request)
    return device.derived_key(request)


_QUEUED, _RUNNING, _DONE = 0, 1, 2


class _Request:
    """One submitted call; mutable bookkeeping private to the broker (not a value)."""

    __slots__ = ("abandoned", "future", "loop", "op", "request", "status", "ticket")

    def __init__(self, request: FirmwareRequest, op: str, loop: asyncio.AbstractEventLoop,
                 future: asyncio.Future[Any]) -> None:
        self.request = request
        self.op = op
        self.loop = loop
        self.future = future
        self.status = _QUEUED
        self.ticket: Optional[Ticket[_Request]] = None  # set once admitted
        # Set (under the lock) when the caller stopped waiting while the request
        # was running: the worker then stops retrying on its behalf.
        self.abandoned = False

    @property
    def deadline(self) -> float:
        assert self.ticket is not None
        return self.ticket.deadline


class Broker:
    """Serializes every firmware request through one worker thread named ``snpd-device``.

    ``deadline`` values (per request, absolute) are on the injected ``clock``
    (``time.monotonic`` by default, the same clock asyncio's loop uses); a request
    without one gets ``clock() + request_timeout``. ``sleep(seconds)`` is what the
    worker calls to pace and back off; the default sleeps on an event that a
    non-draining :meth:`stop` sets, so shutdown never waits out an interval.

    ``vmpck_id``, when known (from the kernel log), only makes the degraded reason
    name the key.

    ``on_state_change(state)`` is called exactly once per transition, from the
    worker thread and outside the broker's lock: it must be thread-safe and quick
    (hand over to the loop with ``call_soon_threadsafe`` to emit D-Bus signals).
    """

    def __init__(
        self,
        device: Device,
        *,
        max_pending: int = 64,
        per_client: int = 8,
        per_user: Optional[int] = None,
        reserve: int = 0,
        min_interval: float = 0.0,
        request_timeout: float = 30.0,
        busy_retries: int = 3,
        busy_backoff: float = 0.5,
        clock: Callable[[], float] = time.monotonic,
        sleep: Optional[Callable[[float], None]] = None,
        vmpck_id: Optional[int] = None,
        on_state_change: Optional[Callable[[BrokerState], None]] = None,
    ) -> None:
        if min_interval < 0 or busy_backoff < 0 or busy_retries < 0:
            raise ValueError("min_interval, busy_backoff and busy_retries must not be negative")
        if not request_timeout > 0:
            raise ValueError("request_timeout must be positive (math.inf for none)")
        self._device = device
        self._min_interval = min_interval
        self._request_timeout = request_timeout
        self._busy_retries = busy_retries
        self._busy_backoff = busy_backoff
        self._clock = clock
        self._abort = threading.Event()  # set by a non-draining stop: cut sleeps short
        self._sleep: Callable[[float], None] = sleep or self._interruptible_sleep
        self._on_state_change = on_state_change

        self._cond = threading.Condition(threading.Lock())
        # Everything below is guarded by self._cond.
        self._queue: Scheduler[_Request] = Scheduler(
            max_pending=max_pending, per_client=per_client, per_user=per_user,
            reserve=reserve)
        self._health = VmpckHealth(vmpck_id)
        self._running: Optional[_Request] = None
        self._stats: Dict[str, int] = dict.fromkeys(_FIXED_STATS, 0)
        self._stats.update({f"{op}.ok": 0 for op in OPS})
        self._thread: Optional[threading.Thread] = None
        self._accepting = True
        self._stopping = False
        self._drain = True
        self._exited = False
        self._exit_waiters: List[Tuple[asyncio.AbstractEventLoop, asyncio.Future[None]]] = []
        self._close_device = False
        self._device_closed = False
        self._last_start: Optional[float] = None  # worker-only: start of the last firmware call

    # -- public API ------------------------------------------------------------------

    @property
    def state(self) -> BrokerState:
        with self._cond:
            return self._health.state

    def pending(self) -> int:
        """Requests accepted and not yet answered: queued plus the one in flight."""
        with self._cond:
            return len(self._queue) + (self._running is not None)

    def stats(self) -> Dict[str, int]:
        """A snapshot of the counters (the D-Bus ``Statistics a{st}`` property).

        ``<op>.<outcome>`` counts answers given to callers (``ok`` or the error
        class name, including fast refusals); ``firmware_requests`` counts device
        calls, retries included; ``dropped.*`` counts requests never sent because
        their deadline passed or their caller went away; ``queue.*`` is the
        scheduler's (:data:`snpd.scheduler.STAT_KEYS`).
        """
        with self._cond:
            return {**self._queue.stats(), **self._stats}

    def start(self) -> None:
        """Start the one worker thread. Requests submitted earlier wait in the queue."""
        with self._cond:
            if self._thread is not None or self._stopping:
                raise RuntimeError("the broker was already started or stopped")
            self._thread = threading.Thread(target=self._run, name="snpd-device", daemon=True)
            thread = self._thread
        thread.start()

    @overload  # the subclass first: an extended request answers an ExtendedReport
    async def submit(  # type: ignore[overload-overlap]
            self, request: ExtendedReportRequest, *, client: Hashable,
                     deadline: Optional[float] = None, user: Hashable = None,
                     reserved: bool = False) -> ExtendedReport: ...

    @overload
    async def submit(self, request: Union[ReportRequest, DerivedKeyRequest], *,
                     client: Hashable, deadline: Optional[float] = None,
                     user: Hashable = None, reserved: bool = False) -> bytes: ...

    @overload
    async def submit(self, request: QuoteRequest, *, client: Hashable,
                     deadline: Optional[float] = None, user: Hashable = None,
                     reserved: bool = False) -> VtpmQuote: ...

    async def submit(self, request: FirmwareRequest, *, client: Hashable,
                     deadline: Optional[float] = None, user: Hashable = None,
                     reserved: bool = False) -> Any:
        """Run ``request`` on the worker and return the device's answer.

        ``client`` is one connection, ``user`` the account behind it (default: the
        client itself); ``reserved`` requests (root's) may use the reserve beyond
        ``max_pending`` and are not bounded per user. The request's type says what
        the firmware is asked; it was validated when it was made.

        Raises the device's typed error; :class:`Busy` at once when the queue or
        this client's or user's share of it is full; :class:`Timeout` when ``deadline``
        passes first (a request still queued then is never sent);
        :class:`VmpckDisabled` / :class:`DeviceUnavailable` at once when the
        broker is degraded / failed; :class:`ShuttingDown` once stopping.
        Cancelling the awaiting task withdraws a queued request.
        """
        loop = asyncio.get_running_loop()
        op = operation(request)
        now = self._clock()
        if deadline is None:
            deadline = now + self._request_timeout
        req = _Request(request, op, loop, loop.create_future())
        with self._cond:
            refusal = self._admit(req, client, user, reserved, deadline, now)
        if refusal is not None:
            raise refusal
        timer = (loop.call_later(max(0.0, deadline - now), self._expire, req)
                 if math.isfinite(deadline) else None)
        try:
            return await req.future
        except asyncio.CancelledError:
            self._withdraw(req)
            raise
        finally:
            if timer is not None:
                timer.cancel()

    async def stop(self, drain: bool = True) -> None:
        """Stop accepting requests and join the worker.

        The request in flight always finishes (the kernel call cannot be
        interrupted). With ``drain`` the queued requests still run (their
        deadlines and ``min_interval`` still apply: pacing protects the VMPCK);
        without it they fail at once with :class:`ShuttingDown`, and pacing and
        backoff sleeps are cut short. A second call may escalate a draining stop
        to a non-draining one. Before :meth:`start` there is no worker to drain:
        queued requests fail with :class:`ShuttingDown`.
        """
        loop = asyncio.get_running_loop()
        waiter: Optional[asyncio.Future[None]] = None
        with self._cond:
            self._accepting = False
            self._stopping = True
            leftovers: List[_Request] = []
            if not drain or self._thread is None:
                self._drain = False
                self._abort.set()
                leftovers = self._take_all_queued()
            if self._thread is not None and not self._exited:
                waiter = loop.create_future()
                self._exit_waiters.append((loop, waiter))
            thread = self._thread
            self._cond.notify_all()
        for req in leftovers:
            self._post(req, None, ShuttingDown(
                "snpd is stopping: the request was not sent to the firmware"))
        if waiter is not None:
            await waiter
        if thread is not None:
            thread.join()  # the worker signalled its very last step: returns at once

    async def close(self, drain: bool = True) -> None:
        """:meth:`stop`, then close the device (on the worker thread when it runs)."""
        with self._cond:
            self._close_device = True
        await self.stop(drain)
        with self._cond:
            closing = not self._device_closed
            self._device_closed = True
        if closing:  # never started, or the worker exited before close() was asked
            self._close_device_now()

    # -- asyncio side ----------------------------------------------------------------

    def _admit(self, req: _Request, client: Hashable, user: Hashable, reserved: bool,
               deadline: float, now: float) -> Optional[SnpdError]:
        """Queue ``req`` or say why not. Caller holds the lock."""
        refusal: Optional[SnpdError] = None
        if not self._accepting:
            refusal = ShuttingDown("snpd is stopping: the request was not queued")
        elif self._health.state.state != "ready":
            refusal = self._refusal()
        else:
            try:
                req.ticket = self._queue.admit(req, client=client, user=user,
                                               reserved=reserved, deadline=deadline, now=now)
            except (Busy, Timeout) as exc:
                refusal = exc
        if refusal is not None:
            self._count(req.op, refusal)
            return refusal
        self._cond.notify()
        return None

    def _withdraw(self, req: _Request) -> None:
        """The caller went away: drop a queued request, or stop retrying a running one."""
        with self._cond:
            if req.status == _QUEUED:
                assert req.ticket is not None
                self._queue.withdraw(req.ticket)
                req.status = _DONE
            elif req.status == _RUNNING:
                req.abandoned = True

    def _expire(self, req: _Request) -> None:
        """Deadline timer (loop thread): answer Timeout now, even while the worker is
        stuck in a long kernel call; a queued request also frees its slot."""
        with self._cond:
            if req.status == _QUEUED:
                assert req.ticket is not None
                self._queue.expire(req.ticket)
                req.status = _DONE
                error = Timeout("the request's deadline passed while it waited for the "
                                "firmware; it was not sent")
            elif req.status == _RUNNING:
                req.abandoned = True
                error = Timeout("the firmware did not answer before the request's deadline")
            else:
                return  # answered already; the answer is on its way to the loop
        self._settle(req, None, error)

    def _settle(self, req: _Request, result: Any, error: Optional[BaseException]) -> None:
        """Deliver an answer (loop thread), once; later answers are discarded."""
        if req.future.done():
            return
        with self._cond:
            self._count(req.op, error)
        if error is not None:
            req.future.set_exception(error)
        else:
            req.future.set_result(result)

    # -- shared helpers (caller holds the lock unless noted) ----------------------

    def _count(self, op: str, error: Optional[BaseException]) -> None:
        key = f"{op}.{'ok' if error is None else type(error).__name__}"
        self._stats[key] = self._stats.get(key, 0) + 1

    def _refusal(self) -> SnpdError:
        state = self._health.state
        if state.state == "degraded":
            return VmpckDisabled(state.reason)
        return DeviceUnavailable(state.reason)

    def _take_all_queued(self) -> List[_Request]:
        taken = [ticket.item for ticket in self._queue.take_all()]
        for req in taken:
            req.status = _DONE
        return taken

    def _pop_next(self) -> Optional[_Request]:
        """The next live request in round-robin order; expired ones are answered."""
        ticket, expired = self._queue.pop(self._clock())
        for dropped in expired:
            dropped.item.status = _DONE
            self._post(dropped.item, None, Timeout(
                "the request's deadline passed while it waited for the firmware; "
                "it was not sent"))
        if ticket is None:
            return None
        req = ticket.item
        req.status = _RUNNING
        self._running = req
        return req

    def _post(self, req: _Request, result: Any, error: Optional[BaseException]) -> None:
        """Hand an answer to the request's loop; safe from any thread, under the lock."""
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody is waiting
            req.loop.call_soon_threadsafe(self._settle, req, result, error)

    # -- worker thread ------------------------------------------------------------------

    def _run(self) -> None:
        try:
            while True:
                req = self._next()
                if req is None:
                    break
                self._execute(req)
        except BaseException as exc:  # a bug here must not leave callers hanging
            self._crash(exc)
        finally:
            self._finish()

    def _next(self) -> Optional[_Request]:
        """Wait for work, pace, then take the next request; None when it is time to exit."""
        while True:
            with self._cond:
                while not len(self._queue):
                    if self._stopping:
                        return None
                    self._cond.wait()
                if self._stopping and not self._drain:
                    return None  # stop() has already answered the queued requests
            if (self._last_start is not None and self._min_interval > 0
                    and not self._pace_until(self._last_start + self._min_interval)):
                continue  # a non-draining stop cut the interval short
            with self._cond:
                if self._stopping and not self._drain:
                    continue
                req = self._pop_next()
            if req is not None:
                return req

    def _interruptible_sleep(self, seconds: float) -> None:
        self._abort.wait(seconds)

    def _pace_until(self, not_before: float) -> bool:
        """Sleep until the clock reaches ``not_before``; False if a non-draining stop
        interrupted."""
        while True:
            remaining = not_before - self._clock()
            if remaining <= 0:
                return True
            if self._abort.is_set():
                return False
            self._sleep(remaining)

    def _execute(self, req: _Request) -> None:
        retries = 0
        while True:
            with self._cond:
                self._stats["firmware_requests"] += 1
            self._last_start = self._clock()
            result: Any = None
            error: Optional[SnpdError] = None
            try:
                result = _perform(self._device, req.request)
            except SnpdError as exc:
                error = exc
            except Exception as exc:
                error = Internal(f"{req.op}: the device backend raised "
                                 f"{type(exc).__name__}: {exc}")
                error.__cause__ = exc
            if isinstance(error, Busy) and retries < self._busy_retries \
                    and self._retry_after_busy(req, retries):
                retries += 1
                continue
            break
        with self._cond:
            self._running = None
            req.status = _DONE
            self._post(req, result, error)
            transition = self._health.observe(req.op, error) if error is not None else None
            if transition is not None:
                for queued in self._take_all_queued():
                    self._post(queued, None, self._refusal())
        if transition is not None:
            self._notify(transition)

    def _retry_after_busy(self, req: _Request, attempt: int) -> bool:
        """Back off before retry ``attempt + 1``; False to give the caller the Busy
        instead (caller gone, stopping without drain, or the retry would start at or
        after the deadline)."""
        not_before = self._clock() + self._busy_backoff * (2 ** attempt)
        if self._min_interval > 0 and self._last_start is not None:
            not_before = max(not_before, self._last_start + self._min_interval)
        if not_before >= req.deadline or not self._still_wanted(req):
            return False
        if not self._pace_until(not_before) or not self._still_wanted(req):
            return False
        with self._cond:
            self._stats["retries.busy"] += 1
        return True

    def _still_wanted(self, req: _Request) -> bool:
        with self._cond:
            return not req.abandoned and not (self._stopping and not self._drain)

    def _notify(self, state: BrokerState) -> None:
        (log.error if state.state != "ready" else log.info)(
            "device %s: %s", state.state, state.reason)
        if self._on_state_change is None:
            return
        try:
            self._on_state_change(state)
        except Exception:
            log.exception("on_state_change callback failed")

    def _crash(self, exc: BaseException) -> None:
        log.critical("device worker failed", exc_info=exc)
        reason = (f"internal error in the device worker: {type(exc).__name__}: {exc}. "
                  f"Restart snpd.")
        with self._cond:
            victims = self._take_all_queued()
            if self._running is not None:
                victims.append(self._running)
                self._running.status = _DONE
                self._running = None
            changed = self._health.crash(reason)
            for req in victims:
                self._post(req, None, Internal(reason))
        if changed is not None:
            self._notify(changed)

    def _finish(self) -> None:
        """Last acts of the worker: close the device if asked, then wake stop()."""
        with self._cond:
            closing = self._close_device and not self._device_closed
            self._device_closed = self._device_closed or closing
        if closing:
            self._close_device_now()
        with self._cond:
            self._exited = True
            waiters, self._exit_waiters = self._exit_waiters, []
        for loop, waiter in waiters:
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(_resolve, waiter)

    def _close_device_now(self) -> None:
        try:
            self._device.close()
        except Exception:
            log.exception("closing the device failed")


def _resolve(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)
