"""The VMPCK health machine: what a device error says about the key, as a table.

The kernel wipes the VMPCK after some failures, and then every later guest request
fails; a broker that knows it answers at once with what the operator must do
instead of queueing for a device that can no longer answer. The device layer tells
the errors apart precisely (:class:`~snpd.errors.VmpckLost` for ETIMEDOUT and
EBADMSG, :class:`~snpd.errors.VmpckDisabled` for ENOTTY), so nothing here guesses
from a base class: a caller's deadline :class:`~snpd.errors.Timeout` is no event.

Pure: no threads, no locks, no clock. The broker feeds it every error from the
device and applies the state it returns.
"""

from __future__ import annotations

import dataclasses
import errno as errno_mod
from typing import Callable, Dict, Literal, Optional, Tuple

from snpd.abi.uapi import SNP_GUEST_VMM_ERR_INVALID_LEN
from snpd.errors import DeviceError, DeviceUnavailable, SnpdError, VmpckDisabled, VmpckLost

__all__ = ["TRANSITIONS", "BrokerState", "Event", "StateName", "VmpckHealth", "event_of"]

StateName = Literal["ready", "degraded", "failed"]

Event = Literal["unavailable", "lost", "disabled", "suspect", "crash"]
"""What one device error (or a worker crash) says about the firmware channel:

- ``unavailable``: the channel cannot be opened (missing node, permissions);
- ``lost``: the kernel wiped the VMPCK answering this request (VmpckLost);
- ``disabled``: the kernel refuses guest requests, the key is gone (ENOTTY);
- ``suspect``: an EIO that most kernels answer by wiping the key, but 5.19-6.0 did
  not, and the errno cannot tell: remembered, confirmed by a later ``disabled``;
- ``crash``: the broker's own worker broke.
"""


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


TRANSITIONS: Dict[Tuple[StateName, Event], StateName] = {
    ("ready", "unavailable"): "failed",
    ("ready", "lost"): "degraded",
    ("ready", "disabled"): "degraded",
    ("ready", "suspect"): "ready",
    ("ready", "crash"): "failed",
}
"""Every transition there is. A pair not listed leaves the state as it is: degraded
and failed are final, so one broker changes state at most once."""

REMEDY = ("Reboot the VM, or stop snpd, reload sev-guest with another key "
          "(modprobe -r sev-guest && modprobe sev-guest vmpck_id=N, N a VMPCK this "
          "guest may use; reports then carry at least that key's VMPL) and start "
          "snpd again.")


def event_of(error: SnpdError) -> Optional[Event]:
    """The health event a device error is, if any (most errors say nothing of the key)."""
    if isinstance(error, DeviceUnavailable):
        return "unavailable"
    if isinstance(error, VmpckLost):
        return "lost"
    if isinstance(error, VmpckDisabled):
        return "disabled"
    if (isinstance(error, DeviceError) and error.errno == errno_mod.EIO
            and error.vmm_error != SNP_GUEST_VMM_ERR_INVALID_LEN):
        return "suspect"  # INVALID_LEN: the host asked for a larger certificate buffer
    return None


class VmpckHealth:
    """The current :class:`BrokerState` and the memory the reasons need.

    ``vmpck_id``, when known (from the kernel log), only makes the degraded reason
    name the key. Not thread-safe: the broker calls it under its lock.
    """

    def __init__(self, vmpck_id: Optional[int] = None) -> None:
        self._key = f"VMPCK{vmpck_id}" if vmpck_id is not None else "the VMPCK"
        self._suspect: Optional[str] = None  # an EIO that probably cost the VMPCK
        self.state = BrokerState()

    def observe(self, op: str, error: SnpdError) -> Optional[BrokerState]:
        """Feed the error ``op`` got from the device; the new state if it changed."""
        event = event_of(error)
        if event is None:
            return None
        if event == "suspect" and isinstance(error, DeviceError) \
                and self.state.state == "ready":
            codes = "".join(f", {name} 0x{value:x}" for name, value in
                            (("fw_error", error.fw_error), ("vmm_error", error.vmm_error))
                            if value is not None)
            self._suspect = f"a failed guest request (EIO during {op}{codes})"
        return self._move(event, lambda: self._reason(event, op, error))

    def crash(self, reason: str) -> Optional[BrokerState]:
        """The worker broke (``reason`` says how); the new state if it changed."""
        return self._move("crash", lambda: reason)

    def _move(self, event: Event, reason: Callable[[], str]) -> Optional[BrokerState]:
        target = TRANSITIONS.get((self.state.state, event), self.state.state)
        if target == self.state.state:
            return None
        self.state = BrokerState(target, reason())
        return self.state

    def _reason(self, event: Event, op: str, error: SnpdError) -> str:
        key = self._key
        if event == "unavailable":
            return (f"the firmware channel is unavailable ({op}): {error}. Fix the device "
                    f"or its permissions and restart snpd.")
        if event == "disabled":
            earlier = self._suspect or "an earlier failed request"
            cause = (f"the kernel refuses guest requests (ENOTTY during {op}): {key} was "
                     f"disabled after {earlier} (see the kernel log)")
        elif getattr(error, "errno", None) == errno_mod.EBADMSG:
            cause = (f"a firmware response failed authentication (EBADMSG during {op}: the "
                     f"host may have tampered with it) and the kernel disabled {key}")
        else:
            cause = (f"the host kept the firmware busy past the kernel's 60 s retry window "
                     f"(ETIMEDOUT during {op}) and the kernel disabled {key} to prevent IV "
                     f"reuse")
        return f"{cause}: no firmware request can succeed. {REMEDY}"
