"""Faults injected into the emulated host and firmware: :class:`DeviceFault` (one
failure) and :class:`FaultQueue` (faults waiting for the exchanges they apply to).

A module of their own because the launch configuration schedules faults
(:class:`snpd.emulator.launch.FaultSpec`) and the firmware applies them: both import
this, neither imports the other.
"""

from __future__ import annotations

import dataclasses
import threading
from typing import Callable, List, Optional, Tuple

from snpd.abi.uapi import SNP_GUEST_VMM_ERR_BUSY, SNP_GUEST_VMM_ERR_INVALID_LEN, vmm_err


@dataclasses.dataclass(frozen=True)
class DeviceFault:
    """One injected failure. Build with the class methods; ``kind`` names it."""

    kind: str
    status: int = 0
    exitinfo2: int = 0
    pages: int = 0
    seconds: float = 0.0

    @classmethod
    def busy(cls) -> DeviceFault:
        """The host throttles: exitinfo2 = vmm_error BUSY (2)."""
        return cls("busy", exitinfo2=vmm_err(SNP_GUEST_VMM_ERR_BUSY))

    @classmethod
    def host_error(cls, vmm_error: int = 0xFFFFFFFF, fw_error: int = 0) -> DeviceFault:
        """A generic host failure: exitinfo2 = vmm_error << 32 | fw_error. The default is
        what a failed GHCB call leaves (all ones in vmm_error)."""
        if not 0 < vmm_error <= 0xFFFFFFFF or not 0 <= fw_error <= 0xFFFFFFFF:
            raise ValueError("vmm_error must be a non-zero u32 and fw_error a u32")
        return cls("host_error", exitinfo2=vmm_err(vmm_error) | fw_error)

    @classmethod
    def fw_error(cls, status: int) -> DeviceFault:
        """The host's SNP_GUEST_REQUEST failed in the firmware: exitinfo2 = status."""
        if not 0 < status <= 0xFFFFFFFF:
            raise ValueError("a firmware error is a non-zero u32")
        return cls("fw_error", status=status, exitinfo2=status)

    @classmethod
    def body_status(cls, status: int) -> DeviceFault:
        """The firmware answers with STATUS in the response body; the ioctl succeeds."""
        if not 0 < status <= 0xFFFFFFFF:
            raise ValueError("a body STATUS fault is a non-zero u32")
        return cls("body_status", status=status)

    @classmethod
    def tamper(cls) -> DeviceFault:
        """The response fails authentication in the guest (EBADMSG, VMPCK wiped)."""
        return cls("tamper")

    @classmethod
    def invalid_len(cls, pages: int) -> DeviceFault:
        """The host demands ``pages`` pages of certificate buffer from extended
        requests that offer fewer (INVALID_LEN with RBX = pages)."""
        if not 0 < pages < 1 << 32:
            raise ValueError("pages must be a positive u32")
        return cls("invalid_len", exitinfo2=vmm_err(SNP_GUEST_VMM_ERR_INVALID_LEN), pages=pages)

    @classmethod
    def wipe(cls) -> DeviceFault:
        """The VMPCK is already gone when the next request arrives (the kernel sees a
        zeroed key and answers ENOTTY)."""
        return cls("wipe")

    @classmethod
    def latency(cls, seconds: float) -> DeviceFault:
        """Each affected host exchange takes ``seconds`` longer (injected sleep)."""
        if not 0 <= seconds <= 3600:
            raise ValueError("latency must be 0-3600 seconds")
        return cls("latency", seconds=seconds)


@dataclasses.dataclass
class _Pending:
    fault: DeviceFault
    remaining: Optional[int]
    skip: int = 0  # exchanges this fault lets pass before it applies


class FaultQueue:
    """Faults waiting for the exchanges they apply to, first pushed first used."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pending: List[_Pending] = []

    def push(self, fault: DeviceFault, count: Optional[int] = 1, *, after: int = 0) -> None:
        """Apply ``fault`` to the next ``count`` exchanges it concerns (None: until
        cleared), after letting ``after`` of them pass."""
        if count is not None and count <= 0:
            raise ValueError("count must be positive or None")
        if after < 0:
            raise ValueError("after must not be negative")
        with self._lock:
            self._pending.append(_Pending(fault, count, after))

    def clear(self) -> None:
        with self._lock:
            self._pending.clear()

    @property
    def pending(self) -> Tuple[Tuple[DeviceFault, Optional[int]], ...]:
        with self._lock:
            return tuple((p.fault, p.remaining) for p in self._pending)

    def take(self, applies: Callable[[DeviceFault], bool]) -> Optional[DeviceFault]:
        """Use the first pending fault ``applies`` accepts (latency excluded)."""
        with self._lock:
            for pending in self._pending:
                if pending.fault.kind != "latency" and applies(pending.fault):
                    if pending.skip:
                        pending.skip -= 1
                        continue
                    self._use(pending)
                    return pending.fault
        return None

    def delay(self) -> float:
        """Seconds of injected latency for one exchange (uses every latency fault once)."""
        with self._lock:
            total = 0.0
            for pending in [p for p in self._pending if p.fault.kind == "latency"]:
                if pending.skip:
                    pending.skip -= 1
                    continue
                total += pending.fault.seconds
                self._use(pending)
            return total

    def _use(self, pending: _Pending) -> None:
        if pending.remaining is not None:
            pending.remaining -= 1
            if pending.remaining == 0:
                self._pending.remove(pending)
