"""The one interface every firmware backend implements."""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Dict, Optional, Protocol, Tuple, Union

from snpd.abi.certtable import CertTableEntry
from snpd.abi.report import REPORT_DATA_SIZE
from snpd.abi.uapi import DerivedKeyRequest
from snpd.errors import InvalidArgument

if TYPE_CHECKING:
    from snpd.abi.product import Product
    from snpd.trust.x509 import Certificate


@dataclasses.dataclass(frozen=True)
class ExtendedReport:
    """A report and the host's certificate table entries (empty when the host has none)."""

    report: bytes
    certificates: Tuple[CertTableEntry, ...] = ()


@dataclasses.dataclass(frozen=True)
class ReportRequest:
    """MSG_REPORT_REQ as a value: validated once, here, where a request is made.

    Shorter ``report_data`` is padded with zeros to the firmware's 64 bytes, so
    every caller (service, snpctl's direct path, tests) gets the same rule. The repr
    leaves report_data out: it may be a secret's digest and must never be logged."""

    report_data: bytes = dataclasses.field(default=bytes(REPORT_DATA_SIZE), repr=False)
    vmpl: int = 0

    def __post_init__(self) -> None:
        data = self.report_data
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise InvalidArgument("report_data must be bytes")
        data = bytes(data)
        if len(data) > REPORT_DATA_SIZE:
            raise InvalidArgument(f"report_data is {len(data)} bytes; at most "
                                  f"{REPORT_DATA_SIZE}")
        object.__setattr__(self, "report_data", data.ljust(REPORT_DATA_SIZE, b"\0"))
        vmpl = self.vmpl
        if not isinstance(vmpl, int) or isinstance(vmpl, bool) or not 0 <= vmpl <= 3:
            raise InvalidArgument(f"vmpl {vmpl!r} is not 0-3")


@dataclasses.dataclass(frozen=True)
class ExtendedReportRequest(ReportRequest):
    """A report request that also asks for the host's certificate table."""


NO_VTPM = ("vTPM quotes come from an Azure confidential VM's paravisor (backend azure); "
           "this backend has none")
MAX_QUOTE_NONCE = 64  # TPM2B_DATA: at most the largest digest a vTPM knows (SHA-512)
ALL_PCRS = tuple(range(24))


@dataclasses.dataclass(frozen=True)
class QuoteRequest:
    """A vTPM quote over ``nonce`` (the TPM's qualifyingData, 0-64 bytes) and the
    SHA-256 ``pcrs`` (default: all 24), with the HCL report beside it (Azure only).
    The repr leaves the nonce out, as ReportRequest leaves report_data out."""

    nonce: bytes = dataclasses.field(default=b"", repr=False)
    pcrs: Tuple[int, ...] = ALL_PCRS

    def __post_init__(self) -> None:
        if not isinstance(self.nonce, (bytes, bytearray, memoryview)):
            raise InvalidArgument("the quote's nonce must be bytes")
        nonce = bytes(self.nonce)
        if len(nonce) > MAX_QUOTE_NONCE:
            raise InvalidArgument(f"the quote's nonce is {len(nonce)} bytes; at most "
                                  f"{MAX_QUOTE_NONCE}")
        object.__setattr__(self, "nonce", nonce)
        pcrs = tuple(self.pcrs)
        if not pcrs or len(set(pcrs)) != len(pcrs) or not all(
                type(p) is int and 0 <= p < 24 for p in pcrs):
            raise InvalidArgument(f"PCRs {list(pcrs)!r}: distinct indices 0-23, at least one")
        object.__setattr__(self, "pcrs", tuple(sorted(pcrs)))


@dataclasses.dataclass(frozen=True)
class VtpmQuote:
    """What an Azure vTPM gives a verifier: the HCL report, the quote (TPMS_ATTEST),
    its bare RSA signature value and the quoted SHA-256 PCR values, in index order."""

    hcl_report: bytes = dataclasses.field(repr=False)
    attest: bytes = dataclasses.field(repr=False)
    signature: bytes = dataclasses.field(repr=False)
    pcrs: Tuple[bytes, ...] = dataclasses.field(repr=False)


FirmwareRequest = Union[ReportRequest, ExtendedReportRequest, DerivedKeyRequest, QuoteRequest]
"""Everything a caller can ask the firmware (or Azure's vTPM) for: the broker's unit
of work."""


@dataclasses.dataclass(frozen=True)
class Platform:
    """What a backend knows of the platform beneath it without spending a request.

    Hardware backends know nothing more (the defaults): the daemon learns the
    guest's VMPL from the kernel and the product from CPUID. The emulator knows
    the guest it emulates: its VMPL, product, its sev-guest driver's log, whether
    its device node exists, and its own ARK, which is trusted beside AMD's only
    with this backend. The daemon and snpctl read this instead of the emulator."""

    emulated: bool = False
    guest_vmpl: Optional[int] = None  # None: ask the kernel (status.probe)
    product: Optional[Product] = None  # None: learn it from CPUID or a report
    extra_roots: Tuple[Certificate, ...] = ()
    driver_log: Tuple[str, ...] = ()  # kernel log lines of an emulated driver
    device_node: bool = True  # an emulated /dev/sev-guest exists
    # What REPORT_DATA binds: "caller" (the caller's bytes, as the firmware signs them)
    # or "runtime-data" (Azure: SHA-256 of the paravisor's runtime JSON, which holds
    # the caller's bytes as user-data).
    report_data: str = "caller"


class Device(Protocol):
    """A firmware channel. Methods block; call them from one worker thread."""

    name: str

    def report(self, request: ReportRequest) -> bytes:
        """The raw 1184-byte report binding the request's report_data."""
        ...

    def extended_report(self, request: ReportRequest) -> ExtendedReport:
        """The report and the host's certificate table."""
        ...

    def derived_key(self, request: DerivedKeyRequest) -> bytes:
        """The firmware's 32-byte derived key."""
        ...

    def quote(self, request: QuoteRequest) -> VtpmQuote:
        """A vTPM quote and the HCL report (Azure); NotSupported elsewhere."""
        ...

    def describe(self) -> Dict[str, object]:
        """What this backend is (name, path, provider …) for status displays."""
        ...

    def platform(self) -> Platform:
        """The platform beneath this backend; ``Platform()`` on hardware."""
        ...

    def close(self) -> None:
        ...
