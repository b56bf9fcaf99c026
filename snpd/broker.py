"""The single owner of the firmware channel: queue, fairness, deadlines, VMPCK health.

Why a broker (spec/ABI.md §2.7): the kernel serializes guest requests behind an
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
- VMPCK health: after an error that makes the kernel wipe the key (ETIMEDOUT,
  EBADMSG, EIO other than a certificate-length answer) or that shows it is gone
  (ENOTTY), every later request fails fast with an explanation of what the
  operator must do, instead of queueing for a device that can no longer answer.

Threading contract: the asyncio side (``submit``, ``stop``, ``close``) runs on
one event loop; the worker thread touches the loop only through
``loop.call_soon_threadsafe``. Shared state lives behind one
:class:`threading.Condition`.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import errno as errno_mod
import logging
import math
import threading
import time
from collections import deque
from typing import (
    Any,
    Callable,
    Deque,
    Dict,
    Hashable,
    List,
    Literal,
    Optional,
    Tuple,
    overload,
)

from snpd.abi.uapi import SNP_GUEST_VMM_ERR_INVALID_LEN, DerivedKeyRequest
from snpd.device.base import Device, ExtendedReport, check_request
from snpd.errors import (
    Busy,
    DeviceError,
    DeviceUnavailable,
    Internal,
    ShuttingDown,
    SnpdError,
    Timeout,
    VmpckDisabled,
)

__all__ = ["OPS", "Broker", "BrokerState", "StateName"]

log = logging.getLogger(__name__)

StateName = Literal["ready", "degraded", "failed"]

OPS: Tuple[str, ...] = ("report", "extended_report", "derived_key")
"""The device operations a caller may submit (the :class:`Device` method names)."""

_FIXED_STATS = (
    "firmware_requests",
    "queue.high_water",
    "queue.rejected_busy",
    "dropped.deadline",
    "dropped.cancelled",
    "retries.busy",
)


@dataclasses.dataclass(frozen=True)
class BrokerState:
    """The broker's health, as the D-Bus ``State``/``StateReason`` properties show it.

    ``ready``: requests go to the firmware. ``degraded``: the kernel disabled the
    VMPCK; nothing can succeed until the operator acts, and ``reason`` says how.
    ``failed``: the firmware channel is unavailable (missing node, permissions) or
    the worker broke. Both non-ready states are final for this broker: recovering
    needs the operator (reboot, or reload the driver with another key, or fix the
    device), and the daemon is restarted afterwards.
    """

    state: StateName = "ready"
    reason: str = ""


_QUEUED, _RUNNING, _DONE = 0, 1, 2


class _Request:
    """One submitted call; mutable bookkeeping private to the broker (not a value)."""

    __slots__ = ("abandoned", "args", "client", "deadline", "future", "loop", "op", "reserved",
                 "status", "user")

    def __init__(self, client: Hashable, op: str, args: Tuple[Any, ...], deadline: float,
                 loop: asyncio.AbstractEventLoop, future: asyncio.Future[Any], *,
                 user: Hashable = None, reserved: bool = False) -> None:
        self.client = client
        self.user = client if user is None else user
        self.reserved = reserved
        self.op = op
        self.args = args
        self.deadline = deadline
        self.loop = loop
        self.future = future
        self.status = _QUEUED
        # Set (under the lock) when the caller stopped waiting while the request
        # was running: the worker then stops retrying on its behalf.
        self.abandoned = False


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
        if max_pending < 1 or per_client < 1 or (per_user is not None and per_user < 1):
            raise ValueError("max_pending, per_client and per_user must be at least 1")
        if reserve < 0:
            raise ValueError("reserve must not be negative")
        if min_interval < 0 or busy_backoff < 0 or busy_retries < 0:
            raise ValueError("min_interval, busy_backoff and busy_retries must not be negative")
        if not request_timeout > 0:
            raise ValueError("request_timeout must be positive (math.inf for none)")
        self._device = device
        self._max_pending = max_pending
        self._per_client = per_client
        self._per_user = per_user if per_user is not None else max_pending
        self._reserve = reserve
        self._min_interval = min_interval
        self._request_timeout = request_timeout
        self._busy_retries = busy_retries
        self._busy_backoff = busy_backoff
        self._clock = clock
        self._abort = threading.Event()  # set by a non-draining stop: cut sleeps short
        self._sleep: Callable[[float], None] = sleep or self._interruptible_sleep
        self._vmpck = f"VMPCK{vmpck_id}" if vmpck_id is not None else "the VMPCK"
        self._suspect: Optional[str] = None  # an EIO that probably cost the VMPCK
        self._on_state_change = on_state_change

        self._cond = threading.Condition(threading.Lock())
        # Everything below is guarded by self._cond.
        self._queues: Dict[Hashable, Deque[_Request]] = {}
        # Users with queued work in serving order, and each one's clients likewise.
        self._ring: Deque[Hashable] = deque()
        self._clients: Dict[Hashable, Deque[Hashable]] = {}
        self._by_user: Dict[Hashable, int] = {}
        self._queued = 0
        self._running: Optional[_Request] = None
        self._state = BrokerState()
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
            return self._state

    def pending(self) -> int:
        """Requests accepted and not yet answered: queued plus the one in flight."""
        with self._cond:
            return self._queued + (self._running is not None)

    def stats(self) -> Dict[str, int]:
        """A snapshot of the counters (the D-Bus ``Statistics a{st}`` property).

        ``<op>.<outcome>`` counts answers given to callers (``ok`` or the error
        class name, including fast refusals); ``firmware_requests`` counts device
        calls, retries included; ``dropped.*`` counts requests never sent because
        their deadline passed or their caller went away.
        """
        with self._cond:
            return dict(self._stats)

    def start(self) -> None:
        """Start the one worker thread. Requests submitted earlier wait in the queue."""
        with self._cond:
            if self._thread is not None or self._stopping:
                raise RuntimeError("the broker was already started or stopped")
            self._thread = threading.Thread(target=self._run, name="snpd-device", daemon=True)
            thread = self._thread
        thread.start()

    @overload
    async def submit(self, client: Hashable, op: Literal["report"], report_data: bytes,
                     vmpl: int, /, *, deadline: Optional[float] = None, user: Hashable = None,
                     reserved: bool = False) -> bytes: ...

    @overload
    async def submit(self, client: Hashable, op: Literal["extended_report"],
                     report_data: bytes, vmpl: int, /, *,
                     deadline: Optional[float] = None, user: Hashable = None,
                     reserved: bool = False) -> ExtendedReport: ...

    @overload
    async def submit(self, client: Hashable, op: Literal["derived_key"],
                     request: DerivedKeyRequest, /, *,
                     deadline: Optional[float] = None, user: Hashable = None,
                     reserved: bool = False) -> bytes: ...

    @overload
    async def submit(self, client: Hashable, op: str, *args: Any,
                     deadline: Optional[float] = None, user: Hashable = None,
                     reserved: bool = False) -> object: ...

    async def submit(self, client: Hashable, op: str, *args: Any,
                     deadline: Optional[float] = None, user: Hashable = None,
                     reserved: bool = False) -> Any:
        """Run ``device.<op>(*args)`` on the worker and return its result.

        ``client`` is one connection, ``user`` the account behind it (default: the
        client itself); ``reserved`` requests (root's) may use the reserve beyond
        ``max_pending`` and are not bounded per user.

        Raises the device's typed error; :class:`Busy` at once when the queue or
        this client's or user's share of it is full; :class:`Timeout` when ``deadline``
        passes first (a request still queued then is never sent);
        :class:`VmpckDisabled` / :class:`DeviceUnavailable` at once when the
        broker is degraded / failed; :class:`ShuttingDown` once stopping.
        Cancelling the awaiting task withdraws a queued request.
        """
        loop = asyncio.get_running_loop()
        self._check_args(op, args)
        now = self._clock()
        if deadline is None:
            deadline = now + self._request_timeout
        req = _Request(client, op, args, deadline, loop, loop.create_future(), user=user,
                       reserved=reserved)
        with self._cond:
            refusal = self._admit(req, now)
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

    def _check_args(self, op: str, args: Tuple[Any, ...]) -> None:
        """Reject malformed calls before they take a queue slot or a firmware turn."""
        if op in ("report", "extended_report") and len(args) == 2:
            try:
                check_request(args[0], args[1])
            except SnpdError as exc:
                with self._cond:
                    self._count(op, exc)
                raise
        elif not (op == "derived_key" and len(args) == 1
                  and isinstance(args[0], DerivedKeyRequest)):
            raise Internal(f"broker: unknown operation or arguments: {op}"
                           f"({', '.join(type(a).__name__ for a in args)})")

    def _admit(self, req: _Request, now: float) -> Optional[SnpdError]:
        """Queue ``req`` or say why not. Caller holds the lock."""
        refusal: Optional[SnpdError] = None
        queue = self._queues.get(req.client)
        if not self._accepting:
            refusal = ShuttingDown("snpd is stopping: the request was not queued")
        elif self._state.state != "ready":
            refusal = self._refusal()
        elif now >= req.deadline:
            refusal = Timeout("the request's deadline had passed before it was queued")
            self._stats["dropped.deadline"] += 1
        elif self._queued >= self._max_pending + (self._reserve if req.reserved else 0):
            refusal = Busy(f"the firmware queue is full ({self._queued} requests waiting); "
                           "retry later")
        elif queue is not None and len(queue) >= self._per_client:
            refusal = Busy(f"this client already has {len(queue)} requests waiting for the "
                           "firmware; retry later")
        elif not req.reserved and self._by_user.get(req.user, 0) >= self._per_user:
            refusal = Busy(f"this user already has {self._by_user[req.user]} requests "
                           "waiting for the firmware, its share of the queue; retry later")
        if isinstance(refusal, Busy):
            self._stats["queue.rejected_busy"] += 1
        if refusal is not None:
            self._count(req.op, refusal)
            return refusal
        if queue is None:
            queue = self._queues[req.client] = deque()
            clients = self._clients.get(req.user)
            if clients is None:
                clients = self._clients[req.user] = deque()
                self._ring.append(req.user)
            clients.append(req.client)
        queue.append(req)
        self._by_user[req.user] = self._by_user.get(req.user, 0) + 1
        self._queued += 1
        if self._queued > self._stats["queue.high_water"]:
            self._stats["queue.high_water"] = self._queued
        self._cond.notify()
        return None

    def _withdraw(self, req: _Request) -> None:
        """The caller went away: drop a queued request, or stop retrying a running one."""
        with self._cond:
            if req.status == _QUEUED:
                self._unqueue(req)
                self._stats["dropped.cancelled"] += 1
            elif req.status == _RUNNING:
                req.abandoned = True

    def _expire(self, req: _Request) -> None:
        """Deadline timer (loop thread): answer Timeout now, even while the worker is
        stuck in a long kernel call; a queued request also frees its slot."""
        with self._cond:
            if req.status == _QUEUED:
                self._unqueue(req)
                self._stats["dropped.deadline"] += 1
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
        if self._state.state == "degraded":
            return VmpckDisabled(self._state.reason)
        return DeviceUnavailable(self._state.reason)

    def _unqueue(self, req: _Request) -> None:
        queue = self._queues[req.client]
        queue.remove(req)
        self._dequeued(req, queue)
        req.status = _DONE
        clients = self._clients[req.user]
        if not queue and req.client in clients:
            clients.remove(req.client)
            self._forget_empty(req.user)

    def _dequeued(self, req: _Request, queue: Deque[_Request]) -> None:
        """Bookkeeping for ``req`` having left ``queue`` (already removed from it)."""
        self._queued -= 1
        left = self._by_user[req.user] - 1
        if left:
            self._by_user[req.user] = left
        else:
            del self._by_user[req.user]
        if not queue:
            del self._queues[req.client]

    def _forget_empty(self, user: Hashable) -> None:
        if not self._clients[user]:
            del self._clients[user]
            self._ring.remove(user)

    def _take_all_queued(self) -> List[_Request]:
        taken = [req for queue in self._queues.values() for req in queue]
        for req in taken:
            req.status = _DONE
        self._queues.clear()
        self._clients.clear()
        self._by_user.clear()
        self._ring.clear()
        self._queued = 0
        return taken

    def _pop_next(self) -> Optional[_Request]:
        """The next live request in round-robin order; expired ones are dropped."""
        now = self._clock()
        while self._ring:
            user = self._ring.popleft()
            clients = self._clients[user]
            client = clients.popleft()
            queue = self._queues[client]
            req = queue.popleft()
            self._dequeued(req, queue)
            if queue:
                clients.append(client)
            if clients:
                self._ring.append(user)
            else:
                del self._clients[user]
            if now >= req.deadline:
                req.status = _DONE
                self._stats["dropped.deadline"] += 1
                self._post(req, None, Timeout(
                    "the request's deadline passed while it waited for the firmware; "
                    "it was not sent"))
                continue
            req.status = _RUNNING
            self._running = req
            return req
        return None

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
                while not self._queued:
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
        call = getattr(self._device, req.op)
        retries = 0
        while True:
            with self._cond:
                self._stats["firmware_requests"] += 1
            self._last_start = self._clock()
            result: Any = None
            error: Optional[SnpdError] = None
            try:
                result = call(*req.args)
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
        transition = self._health(req.op, error) if error is not None else None
        with self._cond:
            self._running = None
            req.status = _DONE
            self._post(req, result, error)
            if transition is not None and self._state.state != "ready":
                transition = None  # only ready may change: one transition, one callback
            if transition is not None:
                self._state = transition
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

    def _health(self, op: str, error: SnpdError) -> Optional[BrokerState]:
        """The state an error from the device moves the broker to, if any."""
        key = self._vmpck
        remedy = ("Reboot the VM, or stop snpd, reload sev-guest with another key "
                  "(modprobe -r sev-guest && modprobe sev-guest vmpck_id=N, N a VMPCK this "
                  "guest may use; reports then carry at least that key's VMPL) and start "
                  "snpd again.")
        if isinstance(error, DeviceUnavailable):
            return BrokerState("failed", f"the firmware channel is unavailable ({op}): "
                                         f"{error}. Fix the device or its permissions and "
                                         f"restart snpd.")
        cause: Optional[str] = None
        if isinstance(error, VmpckDisabled):
            earlier = self._suspect or "an earlier failed request"
            cause = (f"the kernel refuses guest requests (ENOTTY during {op}): {key} was "
                     f"disabled after {earlier} (see the kernel log)")
        elif isinstance(error, Timeout):
            cause = (f"the host kept the firmware busy past the kernel's 60 s retry window "
                     f"(ETIMEDOUT during {op}) and the kernel disabled {key} to prevent IV "
                     f"reuse")
        elif isinstance(error, DeviceError) and error.errno == errno_mod.EBADMSG:
            cause = (f"a firmware response failed authentication (EBADMSG during {op}: the "
                     f"host may have tampered with it) and the kernel disabled {key}")
        elif (isinstance(error, DeviceError) and error.errno == errno_mod.EIO
                and error.vmm_error != SNP_GUEST_VMM_ERR_INVALID_LEN):
            codes = "".join(f", {name} 0x{value:x}" for name, value in
                            (("fw_error", error.fw_error), ("vmm_error", error.vmm_error))
                            if value is not None)
            # Most kernels wipe the key after such an EIO, but 5.19-6.0 did not, and
            # the errno alone cannot tell: the next request's ENOTTY confirms a wipe
            # (SYSTEM.md §5.5). Remember the EIO for that message; stay ready.
            self._suspect = f"a failed guest request (EIO during {op}{codes})"
            return None
        if cause is None:
            return None
        return BrokerState("degraded", f"{cause}: no firmware request can succeed. {remedy}")

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
        state = BrokerState("failed", f"internal error in the device worker: "
                                      f"{type(exc).__name__}: {exc}. Restart snpd.")
        with self._cond:
            victims = self._take_all_queued()
            if self._running is not None:
                victims.append(self._running)
                self._running.status = _DONE
                self._running = None
            changed = self._state.state == "ready"
            self._state = state if changed else self._state
            for req in victims:
                self._post(req, None, Internal(state.reason))
        if changed:
            self._notify(state)

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
