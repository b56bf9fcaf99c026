"""The broker's scheduler as plain calls: no threads, no clock, no polling.

Every ``now`` is explicit; the order of ``pop`` is the serving order the worker
would follow."""

from __future__ import annotations

from typing import Hashable, List, Optional, Tuple

import pytest

from snpd.errors import Busy, Timeout
from snpd.scheduler import STAT_KEYS, Scheduler, Ticket

NOW = 100.0
LATER = 1000.0  # a deadline no test reaches


def admit(s: Scheduler[str], item: str, client: Hashable, *, user: Hashable = None,
          reserved: bool = False, deadline: float = LATER, now: float = NOW) -> Ticket[str]:
    return s.admit(item, client=client, user=user, reserved=reserved, deadline=deadline,
                   now=now)


def drain(s: Scheduler[str], now: float = NOW) -> List[str]:
    """Pop until empty: the serving order (expired tickets are left out)."""
    order: List[str] = []
    while True:
        ticket, _ = s.pop(now)
        if ticket is None:
            return order
        order.append(ticket.item)


def fair(s: Scheduler[str]) -> bool:
    stats = s.stats()
    return stats["queue.out_of_turn.user"] == stats["queue.out_of_turn.client"] == 0


# -- order -------------------------------------------------------------------------------


def test_round_robin_across_clients_and_fifo_within_one() -> None:
    s: Scheduler[str] = Scheduler(per_client=16)
    for i in range(4):
        admit(s, f"a{i}", "A")
    for i in range(2):
        admit(s, f"b{i}", "B")
    assert drain(s) == ["a0", "b0", "a1", "b1", "a2", "a3"]
    assert len(s) == 0 and fair(s)


def test_users_take_turns_before_their_clients_do() -> None:
    """User U's four connections together get the firmware as often as V's one."""
    s: Scheduler[str] = Scheduler(per_client=16)
    for c in range(4):
        for i in range(2):
            admit(s, f"u{c}.{i}", f"u{c}", user="U")
    for i in range(4):
        admit(s, f"v.{i}", "v", user="V")
    order = drain(s)
    assert order[:8] == ["u0.0", "v.0", "u1.0", "v.1", "u2.0", "v.2", "u3.0", "v.3"]
    assert order[8:] == ["u0.1", "u1.1", "u2.1", "u3.1"]
    assert fair(s)


def test_a_client_that_comes_back_waits_behind_those_already_waiting() -> None:
    s: Scheduler[str] = Scheduler()
    admit(s, "a0", "A")
    admit(s, "b0", "B")
    assert s.pop(NOW)[0] is not None  # a0: A leaves the ring, its queue is empty
    admit(s, "a1", "A")
    admit(s, "c0", "C")
    assert drain(s) == ["b0", "a1", "c0"]
    assert fair(s)


def test_fairness_holds_through_a_long_mixed_run() -> None:
    """Greedy and polite clients of several users, joining, leaving and withdrawing:
    the self-check never sees a turn out of order, and each client is served FIFO."""
    s: Scheduler[str] = Scheduler(max_pending=64, per_client=8, per_user=64)
    served: List[str] = []
    withdrawn: List[str] = []
    tickets: List[Ticket[str]] = []
    refused = 0
    for step in range(400):
        client = f"c{step % 7}" if step % 3 else "greedy"
        user = {"c0": "X", "c1": "X", "c2": "Y"}.get(client, client)
        try:
            tickets.append(admit(s, f"{client}:{step}", client, user=user))
        except Busy:
            refused += 1
        if step % 11 == 0 and tickets and tickets[-1].queued:
            assert s.withdraw(tickets[-1])
            withdrawn.append(tickets[-1].item)
        if step % 2:
            ticket, _ = s.pop(NOW)
            if ticket is not None:
                served.append(ticket.item)
    served += drain(s)
    assert fair(s)
    assert s.stats()["dropped.cancelled"] == len(withdrawn) > 0
    assert s.stats()["queue.rejected_busy"] == refused > 0  # the greedy client hit its cap
    for name in {item.split(":")[0] for item in served}:
        steps = [int(item.split(":")[1]) for item in served if item.startswith(name + ":")]
        assert steps == sorted(steps), f"{name} was not served FIFO"
    assert not set(served) & set(withdrawn)


# -- bounds ----------------------------------------------------------------------------------


def test_a_full_queue_answers_busy_and_counts_it() -> None:
    s: Scheduler[str] = Scheduler(max_pending=3, per_client=8)
    for i in range(3):
        admit(s, f"x{i}", f"c{i}")
    with pytest.raises(Busy, match="queue is full"):
        admit(s, "late", "late")
    stats = s.stats()
    assert stats["queue.rejected_busy"] == 1 and stats["queue.high_water"] == 3
    assert "late" not in drain(s)


def test_per_client_cap_rejects_only_that_client() -> None:
    s: Scheduler[str] = Scheduler(max_pending=10, per_client=2)
    admit(s, "a0", "a")
    admit(s, "a1", "a")
    with pytest.raises(Busy, match="this client"):
        admit(s, "a2", "a")
    admit(s, "b0", "b")
    assert drain(s) == ["a0", "b0", "a1"]


def test_per_user_share_counts_every_connection_of_that_user() -> None:
    s: Scheduler[str] = Scheduler(max_pending=64, per_client=8, per_user=3)
    for i in range(3):
        admit(s, f"u{i}", f"u{i}", user=1000)
    with pytest.raises(Busy, match="this user"):
        admit(s, "u9", "u9", user=1000)
    admit(s, "w", "w", user=1001)
    s.pop(NOW)  # one of user 1000's turns frees one of its slots
    admit(s, "u9", "u9", user=1000)
    assert len(s) == 4


def test_root_keeps_a_reserve_beyond_a_full_queue() -> None:
    s: Scheduler[str] = Scheduler(max_pending=4, per_client=8, per_user=4, reserve=2)
    for i in range(4):
        admit(s, f"x{i}", f"x{i}", user=1000 + i)
    with pytest.raises(Busy, match="queue is full"):
        admit(s, "y", "y", user=2000)
    admit(s, "r0", "r", user=0, reserved=True)
    admit(s, "r1", "r", user=0, reserved=True)
    with pytest.raises(Busy, match="queue is full"):
        admit(s, "r2", "r", user=0, reserved=True)
    assert len(s) == 6 and s.stats()["queue.high_water"] == 6
    assert {"r0", "r1"} <= set(drain(s))


def test_reserved_requests_are_not_bounded_per_user() -> None:
    s: Scheduler[str] = Scheduler(max_pending=8, per_client=2, per_user=1)
    for i in range(4):
        admit(s, f"r{i}", f"r{i}", user=0, reserved=True)
    admit(s, "n0", "n0", user=1000)
    with pytest.raises(Busy, match="this user"):
        admit(s, "n1", "n1", user=1000)
    assert len(s) == 5


@pytest.mark.parametrize("limits", [dict(max_pending=0), dict(per_client=0),
                                    dict(per_user=0), dict(reserve=-1)])
def test_nonsense_limits_are_refused(limits: dict) -> None:  # type: ignore[type-arg]
    with pytest.raises(ValueError):
        Scheduler(**limits)


# -- deadlines, withdrawal, taking everything ---------------------------------------------


def test_a_deadline_already_past_is_refused_and_counted() -> None:
    s: Scheduler[str] = Scheduler()
    with pytest.raises(Timeout, match="before it was queued"):
        admit(s, "x", "a", deadline=NOW, now=NOW)
    assert len(s) == 0 and s.stats()["dropped.deadline"] == 1


def test_pop_drops_what_expired_in_the_queue_and_serves_the_next() -> None:
    s: Scheduler[str] = Scheduler()
    admit(s, "soon", "a", deadline=NOW + 5)
    admit(s, "later", "b", deadline=NOW + 50)
    ticket, expired = s.pop(NOW + 10)
    assert ticket is not None and ticket.item == "later"
    assert [t.item for t in expired] == ["soon"] and not expired[0].queued
    assert s.stats()["dropped.deadline"] == 1 and len(s) == 0
    assert s.pop(NOW + 10) == (None, [])


def test_an_expired_turn_is_still_a_turn() -> None:
    """A client whose head expired moves behind the others, as if it had been served."""
    s: Scheduler[str] = Scheduler()
    admit(s, "a0", "A", deadline=NOW + 1)
    admit(s, "a1", "A")
    admit(s, "b0", "B")
    admit(s, "b1", "B")
    assert drain(s, now=NOW + 2) == ["b0", "a1", "b1"]
    assert fair(s)


def test_withdraw_and_expire_free_the_slot_once() -> None:
    s: Scheduler[str] = Scheduler(max_pending=2)
    gone = admit(s, "gone", "a")
    late = admit(s, "late", "b")
    assert s.withdraw(gone) and not s.withdraw(gone)
    assert s.expire(late) and not s.expire(late)
    assert len(s) == 0
    stats = s.stats()
    assert stats["dropped.cancelled"] == 1 and stats["dropped.deadline"] == 1
    admit(s, "x", "a")
    admit(s, "y", "b")  # both slots are free again
    assert drain(s) == ["x", "y"]


def test_a_popped_ticket_can_no_longer_be_withdrawn() -> None:
    s: Scheduler[str] = Scheduler()
    ticket = admit(s, "x", "a")
    popped, _ = s.pop(NOW)
    assert popped is ticket and not ticket.queued
    assert not s.withdraw(ticket) and not s.expire(ticket)
    assert s.stats()["dropped.cancelled"] == 0


def test_withdrawing_from_the_middle_keeps_the_rest_in_order() -> None:
    s: Scheduler[str] = Scheduler()
    a0 = admit(s, "a0", "A")
    admit(s, "a1", "A")
    b0 = admit(s, "b0", "B")
    admit(s, "c0", "C")
    assert s.withdraw(a0) and s.withdraw(b0)
    assert drain(s) == ["a1", "c0"]
    assert fair(s)


def test_take_all_empties_the_queue() -> None:
    s: Scheduler[str] = Scheduler()
    tickets = [admit(s, f"x{i}", f"c{i % 2}", user=i % 3) for i in range(5)]
    taken = s.take_all()
    assert sorted(t.item for t in taken) == sorted(t.item for t in tickets)
    assert all(not t.queued for t in tickets)
    assert len(s) == 0 and s.pop(NOW) == (None, [])
    admit(s, "again", "c0", user=0)
    assert drain(s) == ["again"]


def test_stats_always_carry_every_key_as_int() -> None:
    stats = Scheduler[str]().stats()
    assert set(stats) == set(STAT_KEYS)
    assert all(type(v) is int and v == 0 for v in stats.values())


# -- the fairness self-check can fail ---------------------------------------------------------


class FifoScheduler(Scheduler[str]):
    """A scheduler that serves the ring's last user and client first: the self-check
    must notice every such turn."""

    def pop(self, now: float) -> Tuple[Optional[Ticket[str]], List[Ticket[str]]]:
        self._ring.rotate(1)
        for clients in self._clients.values():
            clients.rotate(1)
        return super().pop(now)


def test_the_self_check_counts_turns_out_of_order() -> None:
    s = FifoScheduler(per_client=8)
    for c in ("A", "B", "C"):
        admit(s, f"{c}0", c)
        admit(s, f"s{c}", f"s{c}", user="shared")
        admit(s, f"s{c}'", f"s{c}", user="shared")
    drain(s)
    stats = s.stats()
    assert stats["queue.out_of_turn.user"] > 0 and stats["queue.out_of_turn.client"] > 0
