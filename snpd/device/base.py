"""The one interface every firmware backend implements."""

from __future__ import annotations

import dataclasses
from typing import Dict, Protocol, Tuple

from snpd.abi.certtable import CertTableEntry
from snpd.abi.report import REPORT_DATA_SIZE
from snpd.abi.uapi import DerivedKeyRequest
from snpd.errors import InvalidArgument


@dataclasses.dataclass(frozen=True)
class ExtendedReport:
    """A report and the host's certificate table entries (empty when the host has none)."""

    report: bytes
    certificates: Tuple[CertTableEntry, ...] = ()


class Device(Protocol):
    """A firmware channel. Methods block; call them from one worker thread."""

    name: str

    def report(self, report_data: bytes, vmpl: int) -> bytes:
        """The raw 1184-byte report binding ``report_data`` (exactly 64 bytes)."""
        ...

    def extended_report(self, report_data: bytes, vmpl: int) -> ExtendedReport:
        ...

    def derived_key(self, request: DerivedKeyRequest) -> bytes:
        """The firmware's 32-byte derived key."""
        ...

    def describe(self) -> Dict[str, object]:
        """What this backend is (name, path, provider …) for status displays."""
        ...

    def close(self) -> None:
        ...


def check_request(report_data: bytes, vmpl: int) -> None:
    """Caller-side validation shared by every backend (the firmware checks again)."""
    if not isinstance(report_data, (bytes, bytearray)) or len(report_data) != REPORT_DATA_SIZE:
        raise InvalidArgument(f"report_data must be exactly {REPORT_DATA_SIZE} bytes "
                              f"(pad shorter data with zeros)")
    if not isinstance(vmpl, int) or not 0 <= vmpl <= 3:
        raise InvalidArgument(f"vmpl {vmpl!r} is not 0-3")
