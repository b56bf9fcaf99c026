"""The backend that stands in when none can be opened."""

from __future__ import annotations

from typing import Dict

from snpd.abi.uapi import DerivedKeyRequest
from snpd.device.base import ExtendedReport, Platform, QuoteRequest, ReportRequest, VtpmQuote
from snpd.errors import DeviceUnavailable


class UnavailableDevice:
    """Stands in when no backend can be opened: every request says why, and the
    daemon still serves verification and certificates."""

    name = "none"

    def __init__(self, error: DeviceUnavailable) -> None:
        self.error = error

    def report(self, request: ReportRequest) -> bytes:
        raise self.error

    def extended_report(self, request: ReportRequest) -> ExtendedReport:
        raise self.error

    def derived_key(self, request: DerivedKeyRequest) -> bytes:
        raise self.error

    def quote(self, request: QuoteRequest) -> VtpmQuote:
        raise self.error

    def describe(self) -> Dict[str, object]:
        return {"backend": "none", "error": str(self.error)}

    def platform(self) -> Platform:
        return Platform()

    def close(self) -> None:
        pass
