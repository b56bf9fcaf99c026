"""Azure confidential VMs: the SNP report through the paravisor's vTPM.

An Azure CVM has no ``/dev/sev-guest``: the paravisor (HCL) owns the firmware channel
at VMPL0. It leaves its SNP report, wrapped in an HCL report whose runtime JSON
REPORT_DATA binds, at vTPM NV index 0x01400001, and refreshes it with the 64 bytes
written to 0x01400002 as the runtime JSON's ``user-data``. So on this backend
REPORT_DATA binds the runtime JSON, never the caller's bytes; the caller's bytes
reach the report as ``user-data`` (snpguest ``report --platform`` does the same).
Freshness for a verifier comes from a TPM2 quote by the runtime JSON's AK
(``HCLAkPub``, persistent at 0x81000003) over its nonce. The paravisor gives no
derived keys: those calls are refused, never faked.
"""

from __future__ import annotations

from typing import Callable, Dict, Optional, TypeVar

from snpd.abi import tpm
from snpd.abi import tpm2_commands as tc
from snpd.abi.hcl import HclReport
from snpd.abi.uapi import DerivedKeyRequest
from snpd.device.base import (
    ExtendedReport,
    Platform,
    QuoteRequest,
    ReportRequest,
    VtpmQuote,
)
from snpd.device.tpm import DEFAULT_SPEC, Tpm, TpmChannel, open_tpm
from snpd.errors import DeviceError, EvidenceFormatError, NotSupported, Timeout

T = TypeVar("T")
USER_DATA_SIZE = 64
NO_DERIVED_KEYS = (
    "derived keys are not available on an Azure confidential VM: the paravisor owns the "
    "SEV firmware channel and offers no MSG_KEY_REQ; snpd does not fake one (sealing "
    "through the vTPM is not implemented)")


class AzureVtpmDevice:
    """The ``azure`` backend over one TPM channel (``/dev/tpmrm0``, or ``unix:PATH``
    for the emulated paravisor). Blocking; the broker's worker thread serializes it."""

    name = "azure"

    def __init__(self, spec: str = DEFAULT_SPEC, *,
                 opener: Callable[[str], TpmChannel] = open_tpm,
                 platform: Optional[Platform] = None) -> None:
        self.spec = spec
        self._opener = opener
        self._platform = platform or Platform(report_data="runtime-data")
        self._tpm: Optional[Tpm] = None

    def _open(self) -> Tpm:
        if self._tpm is None:
            self._tpm = Tpm(self._opener(self.spec))
        return self._tpm

    def _run(self, work: Callable[[Tpm], T]) -> T:
        """Run ``work``; a channel that failed is closed so the next call reopens it."""
        tpm_ = self._open()
        try:
            return work(tpm_)
        except (DeviceError, Timeout, OSError):
            self.close()
            raise

    def hcl_report(self, user_data: Optional[bytes] = None) -> bytes:
        """The HCL report, refreshed first with ``user_data`` when given."""
        def work(t: Tpm) -> bytes:
            if user_data is not None:
                t.nv_write(tc.AZURE_USER_DATA_INDEX, user_data.ljust(USER_DATA_SIZE, b"\0"))
            return t.nv_read(tc.AZURE_HCL_REPORT_INDEX)
        return self._run(work)

    def report(self, request: ReportRequest) -> bytes:
        """The SNP report. Non-zero report_data becomes the runtime JSON's user-data
        (the paravisor refreshes the report); zeros read the report as it is. A
        malformed HCL report is the device's failure (DeviceError), never the caller's
        (the EvidenceFormatError of a document a caller sent)."""
        data = request.report_data
        blob = self.hcl_report(data if any(data) else None)
        try:
            return HclReport.from_bytes(blob).snp_report
        except EvidenceFormatError as exc:
            raise DeviceError(f"the vTPM's HCL report is malformed: {exc}") from None

    def extended_report(self, request: ReportRequest) -> ExtendedReport:
        """Azure puts no certificate table beside the report: the VCEK comes from the
        KDS (or the THIM mirror)."""
        return ExtendedReport(self.report(request), ())

    def derived_key(self, request: DerivedKeyRequest) -> bytes:
        raise NotSupported(NO_DERIVED_KEYS)

    def quote(self, request: QuoteRequest) -> VtpmQuote:
        """The HCL report and a quote by the AK over ``request.nonce`` and its PCRs."""
        def work(t: Tpm) -> VtpmQuote:
            blob = t.nv_read(tc.AZURE_HCL_REPORT_INDEX)
            attest, signature = t.quote(tc.AZURE_AK_HANDLE, request.nonce, request.pcrs)
            values = t.pcr_values(request.pcrs)
            bare = tpm.Signature.from_bytes(signature).signature
            return VtpmQuote(blob, attest, bare, tuple(values))
        return self._run(work)

    def describe(self) -> Dict[str, object]:
        return {"backend": "azure", "tpm": self.spec,
                "ak_handle": f"0x{tc.AZURE_AK_HANDLE:08x}",
                "hcl_report_index": f"0x{tc.AZURE_HCL_REPORT_INDEX:08x}"}

    def platform(self) -> Platform:
        """On hardware only what REPORT_DATA binds; the emulated Azure CVM's Platform
        (snpd.device.select) also names its root and product."""
        return self._platform

    def close(self) -> None:
        if self._tpm is not None:
            tpm_, self._tpm = self._tpm, None
            tpm_.close()
