"""The broker's queue as a pure scheduler: who gets the firmware next, and who waits.

Policy (the broker's reasons are in snpd/broker.py):

- bounded admission: at most ``max_pending`` requests wait, ``per_client`` per
  client (one connection) and ``per_user`` per user (all of one account's
  connections); a ``reserved`` request (root's) may use ``reserve`` slots beyond
  ``max_pending`` and is not bounded per user;
- fairness: round-robin across users, then across one user's clients, FIFO within
  one client, so neither a chatty client nor a user with many connections can
  starve the others;
- deadlines: a request whose deadline passed is never handed out.

Pure: no threads, no locks, no clock reads (``now`` is passed in), so every rule is
tested with plain calls. The caller serializes access (the broker holds its lock).

Besides its counters, the scheduler checks its own fairness as it goes: the user
and the client it serves must be the ones that have waited longest since their last
turn (or since they started waiting). ``queue.out_of_turn.user`` and
``queue.out_of_turn.client`` count the turns that broke this, so a load test can
assert on what the scheduler did rather than on wall-clock ratios.
"""

from __future__ import annotations

from collections import deque
from typing import Deque, Dict, Generic, Hashable, List, Optional, Tuple, TypeVar

from snpd.errors import Busy, Timeout

__all__ = ["STAT_KEYS", "Scheduler", "Ticket"]

T = TypeVar("T")

STAT_KEYS = (
    "queue.high_water",
    "queue.rejected_busy",
    "queue.out_of_turn.user",
    "queue.out_of_turn.client",
    "dropped.deadline",
    "dropped.cancelled",
)
"""The counters :meth:`Scheduler.stats` always has."""


class Ticket(Generic[T]):
    """One admitted request: ``item`` is the caller's, the rest the scheduler's.
    Mutable bookkeeping, not a value: identity matters, so no equality."""

    __slots__ = ("client", "deadline", "item", "queued", "reserved", "user")

    def __init__(self, item: T, client: Hashable, user: Hashable, reserved: bool,
                 deadline: float) -> None:
        self.item = item
        self.client = client
        self.user = user
        self.reserved = reserved
        self.deadline = deadline
        self.queued = True  # False once popped, withdrawn, expired or taken


class Scheduler(Generic[T]):
    """Bounded, fair queueing of tickets; see the module docstring for the policy."""

    def __init__(self, *, max_pending: int = 64, per_client: int = 8,
                 per_user: Optional[int] = None, reserve: int = 0) -> None:
        if max_pending < 1 or per_client < 1 or (per_user is not None and per_user < 1):
            raise ValueError("max_pending, per_client and per_user must be at least 1")
        if reserve < 0:
            raise ValueError("reserve must not be negative")
        self.max_pending = max_pending
        self.per_client = per_client
        self.per_user = per_user if per_user is not None else max_pending
        self.reserve = reserve
        self._queues: Dict[Hashable, Deque[Ticket[T]]] = {}
        # Users with queued work in serving order, and each one's clients likewise.
        self._ring: Deque[Hashable] = deque()
        self._clients: Dict[Hashable, Deque[Hashable]] = {}
        self._by_user: Dict[Hashable, int] = {}
        self._queued = 0
        # When each waiting user and client last had a turn or started waiting: the
        # fairness self-check (see the module docstring). _tick orders those events.
        self._tick = 0
        self._user_since: Dict[Hashable, int] = {}
        self._client_since: Dict[Hashable, int] = {}
        self._stats: Dict[str, int] = dict.fromkeys(STAT_KEYS, 0)

    def __len__(self) -> int:
        """Requests waiting (popped ones are no longer the scheduler's)."""
        return self._queued

    def stats(self) -> Dict[str, int]:
        return dict(self._stats)

    def admit(self, item: T, *, client: Hashable, deadline: float, now: float,
              user: Hashable = None, reserved: bool = False) -> Ticket[T]:
        """Queue ``item`` for ``client`` (of ``user``, default the client itself).

        Raises :class:`Timeout` if ``deadline`` has passed, :class:`Busy` if the
        queue or the client's or user's share of it is full.
        """
        user = client if user is None else user
        queue = self._queues.get(client)
        if now >= deadline:
            self._stats["dropped.deadline"] += 1
            raise Timeout("the request's deadline had passed before it was queued")
        refusal: Optional[str] = None
        if self._queued >= self.max_pending + (self.reserve if reserved else 0):
            refusal = (f"the firmware queue is full ({self._queued} requests waiting); "
                       "retry later")
        elif queue is not None and len(queue) >= self.per_client:
            refusal = (f"this client already has {len(queue)} requests waiting for the "
                       "firmware; retry later")
        elif not reserved and self._by_user.get(user, 0) >= self.per_user:
            refusal = (f"this user already has {self._by_user[user]} requests waiting "
                       "for the firmware, its share of the queue; retry later")
        if refusal is not None:
            self._stats["queue.rejected_busy"] += 1
            raise Busy(refusal)
        ticket = Ticket(item, client, user, reserved, deadline)
        if queue is None:
            queue = self._queues[client] = deque()
            clients = self._clients.get(user)
            if clients is None:
                clients = self._clients[user] = deque()
                self._ring.append(user)
                self._user_since[user] = self._next_tick()
            clients.append(client)
            self._client_since[client] = self._next_tick()
        queue.append(ticket)
        self._by_user[user] = self._by_user.get(user, 0) + 1
        self._queued += 1
        if self._queued > self._stats["queue.high_water"]:
            self._stats["queue.high_water"] = self._queued
        return ticket

    def pop(self, now: float) -> Tuple[Optional[Ticket[T]], List[Ticket[T]]]:
        """The next ticket in round-robin order whose deadline has not passed, and
        the tickets whose deadline had passed (dropped on the way, never to run)."""
        expired: List[Ticket[T]] = []
        while self._ring:
            user = self._ring.popleft()
            clients = self._clients[user]
            client = clients.popleft()
            self._check_turn(user, client)
            queue = self._queues[client]
            ticket = queue.popleft()
            self._dequeued(ticket, queue)
            tick = self._next_tick()
            if queue:
                clients.append(client)
                self._client_since[client] = tick
            else:
                del self._client_since[client]
            if clients:
                self._ring.append(user)
                self._user_since[user] = tick
            else:
                del self._clients[user]
                del self._user_since[user]
            if now >= ticket.deadline:
                self._stats["dropped.deadline"] += 1
                expired.append(ticket)
                continue
            return ticket, expired
        return None, expired

    def withdraw(self, ticket: Ticket[T]) -> bool:
        """The caller went away: drop ``ticket`` if it still waits (True if it did)."""
        if not ticket.queued:
            return False
        self._unqueue(ticket)
        self._stats["dropped.cancelled"] += 1
        return True

    def expire(self, ticket: Ticket[T]) -> bool:
        """``ticket``'s deadline passed: drop it if it still waits (True if it did)."""
        if not ticket.queued:
            return False
        self._unqueue(ticket)
        self._stats["dropped.deadline"] += 1
        return True

    def take_all(self) -> List[Ticket[T]]:
        """Empty the queue (stopping, or the firmware can no longer answer)."""
        taken = [ticket for queue in self._queues.values() for ticket in queue]
        for ticket in taken:
            ticket.queued = False
        self._queues.clear()
        self._clients.clear()
        self._by_user.clear()
        self._ring.clear()
        self._user_since.clear()
        self._client_since.clear()
        self._queued = 0
        return taken

    # -- bookkeeping ------------------------------------------------------------------

    def _next_tick(self) -> int:
        self._tick += 1
        return self._tick

    def _check_turn(self, user: Hashable, client: Hashable) -> None:
        """Count a turn given while another user, or another client of this user, had
        waited longer (round-robin means that never happens)."""
        since = self._user_since[user]
        if any(self._user_since[other] < since for other in self._ring):
            self._stats["queue.out_of_turn.user"] += 1
        since = self._client_since[client]
        if any(self._client_since[other] < since for other in self._clients[user]):
            self._stats["queue.out_of_turn.client"] += 1

    def _unqueue(self, ticket: Ticket[T]) -> None:
        queue = self._queues[ticket.client]
        queue.remove(ticket)
        self._dequeued(ticket, queue)
        if not queue:
            clients = self._clients[ticket.user]
            clients.remove(ticket.client)
            del self._client_since[ticket.client]
            if not clients:
                del self._clients[ticket.user]
                del self._user_since[ticket.user]
                self._ring.remove(ticket.user)

    def _dequeued(self, ticket: Ticket[T], queue: Deque[Ticket[T]]) -> None:
        """Bookkeeping for ``ticket`` having left ``queue`` (already removed from it)."""
        ticket.queued = False
        self._queued -= 1
        left = self._by_user[ticket.user] - 1
        if left:
            self._by_user[ticket.user] = left
        else:
            del self._by_user[ticket.user]
        if not queue:
            del self._queues[ticket.client]
