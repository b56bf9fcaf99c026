"""The ``/dev/sev-guest`` ioctl backend.

Real ctypes buffers and pointers go to the kernel exactly as the uapi defines
them; the emulator plugs in at the same boundary (an object with ``open``,
``ioctl`` and ``close``), so this marshalling is what the tests exercise.

Kernel rules this follows (docs/reference/abi.md §1-2): ``exitinfo2`` is zeroed before
every call because the kernel writes it back only when non-zero; firmware
status is read from the response body, where a rejected request (e.g. a VMPL
below the guest's own) shows up while the ioctl itself succeeds; the extended
report grows its certificate buffer once when the host answers INVALID_LEN. No
other retry happens here: a retry can cost the VMPCK, so the broker decides.
"""

from __future__ import annotations

import ctypes
import errno as errno_mod
import fcntl
import os
import threading
from typing import Any, Callable, Dict, Optional, Protocol

from snpd.abi.certtable import parse_cert_table
from snpd.abi.uapi import (
    IOCTL_NAMES,
    MSG_VERSION,
    PAGE_SIZE,
    SEV_FW_BLOB_MAX_SIZE,
    SNP_GET_DERIVED_KEY,
    SNP_GET_EXT_REPORT,
    SNP_GET_REPORT,
    SNP_GUEST_VMM_ERR_BUSY,
    SNP_GUEST_VMM_ERR_INVALID_LEN,
    DerivedKeyRequest,
    FirmwareStatus,
    SnpDerivedKeyResp,
    SnpExtReportReq,
    SnpGuestRequestIoctl,
    SnpReportReq,
    SnpReportResp,
    parse_key_response,
    parse_report_response,
)
from snpd.device.base import (
    NO_VTPM,
    ExtendedReport,
    Platform,
    QuoteRequest,
    ReportRequest,
    VtpmQuote,
)
from snpd.errors import (
    Busy,
    DeviceError,
    DeviceUnavailable,
    InvalidArgument,
    NotSupported,
    SnpdError,
    VmpckBadMessage,
    VmpckDisabled,
    VmpckTimedOut,
)

DEFAULT_PATH = "/dev/sev-guest"

__all__ = [
    "DEFAULT_PATH",
    "SNP_GET_DERIVED_KEY",
    "SNP_GET_EXT_REPORT",
    "SNP_GET_REPORT",
    "IoctlDevice",
    "IoctlOps",
    "OsIoctl",
]


class IoctlOps(Protocol):
    """The system calls this backend makes; the emulator implements the same three."""

    def open(self, path: str) -> int: ...

    def ioctl(self, fd: int, request: int, arg: SnpGuestRequestIoctl) -> int: ...

    def close(self, fd: int) -> None: ...


class OsIoctl:
    """The real kernel."""

    def open(self, path: str) -> int:
        return os.open(path, os.O_RDWR | os.O_CLOEXEC)

    def ioctl(self, fd: int, request: int, arg: SnpGuestRequestIoctl) -> int:
        return fcntl.ioctl(fd, request, arg, True)  # type: ignore[no-any-return]

    def close(self, fd: int) -> None:
        os.close(fd)


def classify_failure(exc: OSError, req: SnpGuestRequestIoctl, what: str) -> SnpdError:
    """One ioctl failure as a typed error, keeping errno, fw_error and vmm_error."""
    err = exc.errno or 0
    fw, vmm = req.fw_error, req.vmm_error
    if err != errno_mod.EIO:
        fw = vmm = 0  # old kernels wrote uninitialised exitinfo2 back (go-sev-guest#5)
    if err == errno_mod.ENOTTY:
        return VmpckDisabled(
            f"{what}: the kernel refuses guest requests (ENOTTY): the VMPCK was disabled "
            "after an earlier failure. Reboot the VM, or reload sev-guest with another "
            "vmpck_id if this guest may use one")
    if err == errno_mod.ETIMEDOUT:
        return VmpckTimedOut(f"{what}: the host kept the firmware busy past the kernel's "
                             "60 s retry window (ETIMEDOUT); the kernel has disabled the "
                             "VMPCK")
    if err == errno_mod.EINVAL:
        return InvalidArgument(f"{what}: the kernel rejected the request (EINVAL)")
    if err in (errno_mod.EAGAIN, errno_mod.EBUSY):
        return Busy(f"{what}: the host is busy; retry later")
    if vmm == SNP_GUEST_VMM_ERR_BUSY:
        # Only kernels without the throttle retry (<= 6.2) surface BUSY as EIO, and they
        # have already wiped the VMPCK: this is a device failure, not a retryable answer.
        return DeviceError(f"{what}: the host answered BUSY and this kernel (<= 6.2) "
                           "disabled the VMPCK in response", errno=err, vmm_error=vmm)
    if err == errno_mod.EBADMSG:
        return VmpckBadMessage(f"{what}: the firmware response failed authentication "
                               "(EBADMSG); the kernel has disabled the VMPCK", errno=err)
    detail = f"{what} failed: {os.strerror(err)}"
    if fw and fw not in (0xFF, 0xFFFFFFFF):  # 0xff: the kernel's initial value, no fw call
        detail += f", firmware {FirmwareStatus.describe(fw)}"
    return DeviceError(detail, errno=err, fw_error=fw or None, vmm_error=vmm or None)


class IoctlDevice:
    """``/dev/sev-guest`` through SNP_GET_REPORT, SNP_GET_EXT_REPORT, SNP_GET_DERIVED_KEY."""

    name = "ioctl"

    def __init__(self, path: str = DEFAULT_PATH, *, ops: Optional[IoctlOps] = None,
                 msg_version: int = MSG_VERSION,
                 platform: Optional[Callable[[], Platform]] = None) -> None:
        """``platform`` describes what is beneath ``ops`` when that is not the
        kernel (the emulator); asked each time, since a driver log grows."""
        self.path = path
        self._platform = platform
        self.ops: IoctlOps = ops or OsIoctl()
        self.msg_version = msg_version
        self._fd: Optional[int] = None
        self._lock = threading.Lock()
        self._certs_len = 0  # learned from the host's first INVALID_LEN answer

    # -- plumbing ----------------------------------------------------------------

    def _open(self) -> int:
        if self._fd is None:
            try:
                self._fd = self.ops.open(self.path)
            except OSError as exc:
                reason = ("permission denied: run as root or add the daemon's user to the "
                          "device's group" if exc.errno in (errno_mod.EACCES, errno_mod.EPERM)
                          else "no such device: is this an SEV-SNP guest with the sev-guest "
                          "module loaded?" if exc.errno in (errno_mod.ENOENT, errno_mod.ENXIO,
                                                             errno_mod.ENODEV)
                          else os.strerror(exc.errno or 0))
                raise DeviceUnavailable(f"cannot open {self.path}: {reason}") from exc
        return self._fd

    def _call(self, request: int, req: Any, resp: Any) -> SnpGuestRequestIoctl:
        arg = SnpGuestRequestIoctl(msg_version=self.msg_version,
                                   req_data=ctypes.addressof(req),
                                   resp_data=ctypes.addressof(resp), exitinfo2=0)
        fd = self._open()
        try:
            self.ops.ioctl(fd, request, arg)
        except OSError as exc:
            raise _Failed(exc, arg) from exc
        return arg

    def close(self) -> None:
        with self._lock:
            if self._fd is not None:
                fd, self._fd = self._fd, None
                self.ops.close(fd)

    # -- requests --------------------------------------------------------------------

    def report(self, request: ReportRequest) -> bytes:
        report_data, vmpl = request.report_data, request.vmpl
        req = SnpReportReq(vmpl=vmpl)
        ctypes.memmove(req.user_data, report_data, len(report_data))
        resp = SnpReportResp()
        with self._lock:
            try:
                self._call(SNP_GET_REPORT, req, resp)
            except _Failed as failed:
                raise classify_failure(failed.exc, failed.arg, "SNP_GET_REPORT") from failed.exc
        return _report_from(bytes(resp.data), vmpl)

    def extended_report(self, request: ReportRequest) -> ExtendedReport:
        report_data, vmpl = request.report_data, request.vmpl
        with self._lock:
            for attempt in range(2):
                req = SnpExtReportReq()
                req.data.vmpl = vmpl
                ctypes.memmove(req.data.user_data, report_data, len(report_data))
                certs = ctypes.create_string_buffer(max(self._certs_len, PAGE_SIZE))
                req.certs_address = ctypes.addressof(certs)
                req.certs_len = max(self._certs_len, PAGE_SIZE)
                resp = SnpReportResp()
                try:
                    self._call(SNP_GET_EXT_REPORT, req, resp)
                except _Failed as failed:
                    needed = int(req.certs_len)
                    if (failed.exc.errno == errno_mod.EIO and failed.arg.vmm_error ==
                            SNP_GUEST_VMM_ERR_INVALID_LEN and attempt == 0
                            and needed > self._certs_len):
                        if needed % PAGE_SIZE or needed > SEV_FW_BLOB_MAX_SIZE:
                            raise DeviceError(f"the host asks for a {needed}-byte certificate "
                                              f"buffer; the kernel allows at most "
                                              f"{SEV_FW_BLOB_MAX_SIZE}", errno=errno_mod.EIO,
                                              vmm_error=SNP_GUEST_VMM_ERR_INVALID_LEN
                                              ) from failed.exc
                        self._certs_len = needed  # grow once and retry: no key risk here
                        continue
                    raise classify_failure(failed.exc, failed.arg,
                                           "SNP_GET_EXT_REPORT") from failed.exc
                report = _report_from(bytes(resp.data), vmpl)
                table = parse_cert_table(certs.raw[:int(req.certs_len) or len(certs.raw)])
                return ExtendedReport(report, table)
        raise DeviceError("the host kept asking for a larger certificate buffer",
                          errno=errno_mod.EIO, vmm_error=SNP_GUEST_VMM_ERR_INVALID_LEN)

    def quote(self, request: QuoteRequest) -> VtpmQuote:
        raise NotSupported(NO_VTPM)

    def derived_key(self, request: DerivedKeyRequest) -> bytes:
        req = request.to_struct()
        resp = SnpDerivedKeyResp()
        with self._lock:
            try:
                self._call(SNP_GET_DERIVED_KEY, req, resp)
            except _Failed as failed:
                raise classify_failure(failed.exc, failed.arg,
                                       "SNP_GET_DERIVED_KEY") from failed.exc
        status, key = parse_key_response(bytes(resp.data))
        if status:
            raise InvalidArgument(f"the firmware rejected the key request: "
                                  f"{FirmwareStatus.describe(status)} (vmpl at least the "
                                  "VMPCK's, guest_svn at most the ID block's, tcb_version "
                                  "at most COMMITTED_TCB)")
        return key

    def platform(self) -> Platform:
        return self._platform() if self._platform is not None else Platform()

    def describe(self) -> Dict[str, object]:
        return {"backend": self.name, "path": self.path, "msg_version": self.msg_version,
                "ioctls": sorted(IOCTL_NAMES.values())}


class _Failed(Exception):
    def __init__(self, exc: OSError, arg: SnpGuestRequestIoctl) -> None:
        super().__init__(str(exc))
        self.exc = exc
        self.arg = arg


def _report_from(body: bytes, vmpl: int) -> bytes:
    status, report = parse_report_response(body)
    if status:
        hint = (f" (VMPL {vmpl} is below the guest's own?)"
                if status == FirmwareStatus.INVALID_PARAM else "")
        raise InvalidArgument(f"the firmware rejected the report request: "
                              f"{FirmwareStatus.describe(status)}{hint}")
    return report
