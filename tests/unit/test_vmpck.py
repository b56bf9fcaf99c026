"""The VMPCK health machine as plain calls: which device error moves which state,
and what the operator is told. No threads, no broker."""

from __future__ import annotations

import errno
import itertools
from typing import List, Optional

import pytest

from snpd.errors import (
    Busy,
    DeviceError,
    DeviceUnavailable,
    Internal,
    InvalidArgument,
    SnpdError,
    Timeout,
    VmpckBadMessage,
    VmpckDisabled,
    VmpckLost,
    VmpckTimedOut,
)
from snpd.vmpck import TRANSITIONS, BrokerState, Event, VmpckHealth, event_of

LOST = VmpckTimedOut("ETIMEDOUT")
TAMPERED = VmpckBadMessage("bad message", errno=errno.EBADMSG)
DISABLED = VmpckDisabled("ENOTTY")
EIO = DeviceError("failed", errno=errno.EIO, fw_error=0x27)
UNAVAILABLE = DeviceUnavailable("cannot open /dev/sev-guest: EACCES")


@pytest.mark.parametrize("error, event", [
    (LOST, "lost"),
    (TAMPERED, "lost"),
    (DISABLED, "disabled"),
    (EIO, "suspect"),
    (DeviceError("old kernel busy", errno=errno.EIO, vmm_error=2), "suspect"),
    (UNAVAILABLE, "unavailable"),
    (DeviceError("certs", errno=errno.EIO, vmm_error=1), None),  # INVALID_LEN
    (DeviceError("EFAULT", errno=errno.EFAULT), None),
    (DeviceError("tampered, but not from the device layer", errno=errno.EBADMSG), None),
    (Timeout("a caller's deadline"), None),
    (Busy("host busy"), None),
    (InvalidArgument("INVALID_PARAM"), None),
    (Internal("bug"), None),
], ids=lambda v: type(v).__name__ if isinstance(v, Exception) else str(v))
def test_each_error_is_one_precise_event(error: SnpdError, event: Optional[Event]) -> None:
    assert event_of(error) == event


def test_lost_keys_keep_the_wire_kind_their_errno_always_had() -> None:
    assert isinstance(LOST, VmpckLost) and isinstance(LOST, Timeout)
    assert LOST.kind == "Timeout" and LOST.dbus_name() == "org.snpd.Snpd1.Error.Timeout"
    assert LOST.errno == errno.ETIMEDOUT
    assert isinstance(TAMPERED, VmpckLost) and isinstance(TAMPERED, DeviceError)
    assert TAMPERED.kind == "DeviceError" and TAMPERED.errno == errno.EBADMSG
    assert str(TAMPERED) == "bad message (errno=74)"


def test_the_table_leaves_only_ready_and_nothing_returns_to_it() -> None:
    assert {state for state, _ in TRANSITIONS} == {"ready"}
    assert "ready" not in {target for (_, event), target in TRANSITIONS.items()
                           if event != "suspect"}


@pytest.mark.parametrize("error, state", [
    (LOST, "degraded"), (TAMPERED, "degraded"), (DISABLED, "degraded"),
    (UNAVAILABLE, "failed"),
])
def test_one_error_moves_ready_once_and_the_state_is_final(error: SnpdError,
                                                           state: str) -> None:
    health = VmpckHealth(vmpck_id=0)
    moved = health.observe("report", error)
    assert moved is not None and moved.state == state and health.state is moved
    for later in (LOST, TAMPERED, DISABLED, UNAVAILABLE, EIO):
        assert health.observe("report", later) is None
    assert health.crash("bug") is None
    assert health.state is moved


@pytest.mark.parametrize("error, cause", [
    (LOST, "ETIMEDOUT during extended_report"),
    (TAMPERED, "EBADMSG during extended_report"),
    (DISABLED, "ENOTTY during extended_report"),
])
def test_degraded_reason_names_the_cause_the_key_and_the_remedy(error: SnpdError,
                                                                cause: str) -> None:
    state = VmpckHealth(vmpck_id=2).observe("extended_report", error)
    assert state is not None
    assert cause in state.reason and "VMPCK2" in state.reason
    assert "Reboot" in state.reason and "vmpck_id=N" in state.reason


def test_without_a_key_id_the_reason_says_the_vmpck() -> None:
    state = VmpckHealth().observe("report", LOST)
    assert state is not None and "the kernel disabled the VMPCK" in state.reason


def test_an_eio_stays_ready_and_is_named_when_enotty_confirms_it() -> None:
    """5.19-6.0 kernels returned EIO without wiping: only ENOTTY proves the key is gone."""
    health = VmpckHealth()
    assert health.observe("report", EIO) is None
    assert health.state == BrokerState("ready", "")
    state = health.observe("derived_key", DISABLED)
    assert state is not None and state.state == "degraded"
    assert "EIO during report, fw_error 0x27" in state.reason
    assert "ENOTTY during derived_key" in state.reason


def test_enotty_without_an_earlier_eio_says_so() -> None:
    state = VmpckHealth().observe("report", DISABLED)
    assert state is not None and "after an earlier failed request" in state.reason


def test_unavailable_reason_carries_the_device_message() -> None:
    state = VmpckHealth().observe("report", UNAVAILABLE)
    assert state is not None
    assert "EACCES" in state.reason and "restart snpd" in state.reason


def test_a_crash_fails_a_ready_machine_with_the_reason_given() -> None:
    health = VmpckHealth()
    state = health.crash("internal error in the device worker: RuntimeError: x")
    assert state == BrokerState("failed", "internal error in the device worker: RuntimeError: x")


def test_errors_that_say_nothing_of_the_key_never_move_it() -> None:
    health = VmpckHealth()
    quiet: List[SnpdError] = [Timeout("deadline"), Busy("busy"), InvalidArgument("x"),
                              DeviceError("certs", errno=errno.EIO, vmm_error=1)]
    for error, op in itertools.product(quiet, ("report", "extended_report", "derived_key")):
        assert health.observe(op, error) is None
    assert health.state.state == "ready"
