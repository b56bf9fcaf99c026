"""Who may put how much into the daemon over D-Bus: the per-connection, per-user and
global bounds, decided before a message is unpacked (pure; ``now`` passed in).

Every method call addressed to snpd is one of two kinds:

- a *service call* (one of snpd's own methods, with the exact signature dbus-fast
  will dispatch): it holds a task and its message until answered, so it is
  counted while in flight against its connection (``per_connection``), its user
  (``per_uid``) and the daemon (``total``). Root is counted against ``root``
  alone, so no other user can use up root's share. A caller whose uid the
  daemon has not learnt yet (its first call) is counted in a small pool of its
  own, ``unidentified``, until the bus tells the daemon who it is.
- a *cheap call* (Properties, Introspectable, Peer, anything unknown): answered
  synchronously, so it is metered by rate instead, per user, with a token bucket;
  root's are not metered.

Refusals are answered at once with Busy (service calls) or LimitsExceeded (cheap
calls); the caller retries. Replies and signals are never metered: they are the
bus's and the daemon's own traffic.
"""

from __future__ import annotations

import dataclasses
import enum
from typing import Dict, Mapping, Optional, Tuple, Union

from snpd.ratelimit import Clock, Rate, TokenBucket

ROOT = 0


class Kind(enum.Enum):
    SERVICE = "service"
    CHEAP = "cheap"
    OTHER = "other"


@dataclasses.dataclass(frozen=True)
class Limits:
    """The bounds; see the module docstring. Rates are calls per second."""

    per_connection: int = 8
    per_uid: int = 32
    total: int = 256
    root: int = 64
    unidentified: int = 64
    cheap_rate: float = 50.0
    cheap_burst: int = 100


@dataclasses.dataclass(frozen=True)
class Refusal:
    """Why a call was not admitted, in words for the caller."""

    error_name: str
    text: str


@dataclasses.dataclass(frozen=True)
class Ticket:
    """An admitted service call; hand it back to :meth:`Gate.release` once."""

    sender: str
    uid: Optional[int]


UNIDENTIFIED_BURST = 8
"""Cheap calls a connection may make before the bus has said who it is."""
BUSY = "org.snpd.Snpd1.Error.Busy"
LIMITS_EXCEEDED = "org.freedesktop.DBus.Error.LimitsExceeded"


class Gate:
    """The admission bookkeeping of one bus connection (mutable, owned by its reader)."""

    def __init__(self, limits: Limits, methods: Mapping[Tuple[str, str], str], path: str,
                 clock: Clock) -> None:
        # (interface, member) -> signature of every service method.
        self.limits = limits
        self._methods = dict(methods)
        self._members = {member: (interface, sig) for (interface, member), sig
                         in self._methods.items()}
        self._path = path
        self._by_sender: Dict[str, int] = {}
        self._by_uid: Dict[int, int] = {}
        self._unidentified = 0
        self._total = 0
        self._clock = clock
        self._buckets: Dict[Union[int, str], TokenBucket] = {}
        self.refused = 0

    def classify(self, path: Optional[str], interface: str,
                 member: Optional[str], signature: str) -> Kind:
        """The kind of a method call (as dbus-fast will dispatch it). Calls that name
        no interface never get here: the reader answers them UnknownMethod."""
        if path == self._path and member is not None:
            known = self._members.get(member)
            if known is not None and interface == known[0] and signature == known[1]:
                return Kind.SERVICE
        return Kind.CHEAP

    def admit(self, sender: str, uid: Optional[int]) -> Tuple[Optional[Ticket],
                                                              Optional[Refusal]]:
        """Count a service call in, or say why not."""
        lim = self.limits
        running = self._by_sender.get(sender, 0)
        if running >= lim.per_connection:
            return self._refuse(BUSY, f"this connection already has {running} calls in "
                                      "flight, the most one connection may have "
                                      "(queue.per_client); retry when one is answered")
        if uid is None:
            if self._unidentified >= lim.unidentified:
                return self._refuse(BUSY, "snpd is busy identifying other callers; retry")
            self._unidentified += 1
        else:
            refusal = self._room_for(uid)
            if refusal is not None:
                return None, refusal
            self._count_uid(uid)
        self._by_sender[sender] = running + 1
        return Ticket(sender, uid), None

    def identified(self, ticket: Ticket, uid: int
                   ) -> Tuple[Optional[Ticket], Optional[Refusal]]:
        """The bus told the daemon who the caller of an unidentified ticket is: move
        the call from the unidentified pool to its user, or refuse it now (the
        ticket is then released and must not be released again)."""
        if ticket.uid is not None:
            return ticket, None
        self._unidentified -= 1
        refusal = self._room_for(uid)
        if refusal is not None:
            self._release_sender(ticket.sender)
            return None, refusal
        self._count_uid(uid)
        return Ticket(ticket.sender, uid), None

    def release(self, ticket: Ticket) -> None:
        if ticket.uid is None:
            self._unidentified = max(0, self._unidentified - 1)
        else:
            left = self._by_uid.get(ticket.uid, 0) - 1
            if left > 0:
                self._by_uid[ticket.uid] = left
            else:
                self._by_uid.pop(ticket.uid, None)
            if ticket.uid != ROOT:
                self._total = max(0, self._total - 1)
        self._release_sender(ticket.sender)

    def cheap(self, sender: str, uid: Optional[int]) -> Optional[Refusal]:
        """Meter one cheap call, per user; per connection while its user is not known
        yet (a shared bucket would let anyone drain root's first calls; the daemon
        asks the bus at a connection's first message, so this lasts one round trip)."""
        if uid == ROOT:
            return None
        lim = self.limits
        key: Union[int, str] = sender if uid is None else uid
        bucket = self._buckets.get(key)
        if bucket is None:
            if len(self._buckets) >= 4096:
                self._buckets.clear()  # bounded; forgetting only resets budgets to full
            burst = lim.cheap_burst if uid is not None else min(lim.cheap_burst,
                                                                UNIDENTIFIED_BURST)
            bucket = self._buckets[key] = TokenBucket(Rate(burst, 1.0 / lim.cheap_rate),
                                                      self._clock)
        if not bucket.take():
            self.refused += 1
            return Refusal(LIMITS_EXCEEDED, "too many calls of this kind; slow down")
        return None

    def in_flight(self) -> Dict[str, int]:
        """Counters for the Statistics property."""
        return {"dbus.in_flight": self._total + self._by_uid.get(ROOT, 0)
                + self._unidentified,
                "dbus.refused": self.refused}

    # -- helpers ------------------------------------------------------------------

    def _room_for(self, uid: int) -> Optional[Refusal]:
        lim = self.limits
        mine = self._by_uid.get(uid, 0)
        if uid == ROOT:
            if mine >= lim.root:
                return self._refuse(BUSY, f"root already has {mine} calls in flight")[1]
            return None
        if mine >= lim.per_uid:
            return self._refuse(BUSY, f"uid {uid} already has {mine} calls in flight, the "
                                      "most one user may have (queue.per_uid); retry when "
                                      "one is answered")[1]
        if self._total >= lim.total:
            return self._refuse(BUSY, "snpd has as many calls in flight as it takes; "
                                      "retry later")[1]
        return None

    def _count_uid(self, uid: int) -> None:
        self._by_uid[uid] = self._by_uid.get(uid, 0) + 1
        if uid != ROOT:
            self._total += 1

    def _release_sender(self, sender: str) -> None:
        left = self._by_sender.get(sender, 0) - 1
        if left > 0:
            self._by_sender[sender] = left
        else:
            self._by_sender.pop(sender, None)

    def _refuse(self, name: str, text: str) -> Tuple[None, Refusal]:
        self.refused += 1
        return None, Refusal(name, text)
