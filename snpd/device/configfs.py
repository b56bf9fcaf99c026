"""The configfs-tsm backend (docs/reference/abi.md §3): reports through
``/sys/kernel/config/tsm/report``.

Each request gets a private report directory, so no other process shares its
attributes; the generation check catches the one remaining race (someone writing
into our directory), after which the request is repeated once in a fresh
directory. The directory is always removed: each one pins kernel memory.

All filesystem access goes through :class:`FsOps`, so the same code runs on the
real configfs, on an emulator's FUSE mount (with :class:`OsFsOps`) or on an
in-process model. Derived keys are not offered by configfs-tsm (§3.5).
"""

from __future__ import annotations

import errno
import itertools
import logging
import os
import posixpath
import secrets
from typing import Dict, Optional, Protocol, Tuple

from snpd.abi.certtable import CertTableEntry, parse_cert_table
from snpd.abi.report import REPORT_SIZE
from snpd.abi.uapi import DerivedKeyRequest
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

log = logging.getLogger(__name__)

DEFAULT_ROOT = "/sys/kernel/config/tsm/report"
PROVIDER = "sev_guest"
WRITES_PER_REQUEST = 2  # privlevel, inblob: each bumps the generation once
ATTEMPTS = 2
MAX_ATTRIBUTE_SIZE = 64 * 1024  # outblob is at most 32 KiB for SNP (TSM_OUTBLOB_MAX)


class FsOps(Protocol):
    """The filesystem operations the backend needs; failures raise OSError with errno."""

    def mkdir(self, path: str) -> None: ...

    def rmdir(self, path: str) -> None: ...

    def read(self, path: str) -> bytes: ...

    def write(self, path: str, data: bytes) -> None: ...

    def exists(self, path: str) -> bool: ...


class OsFsOps:
    """Plain os calls. configfs commits a write per write(2) (text attributes) or at
    close (binary ones), so each write opens, writes everything and closes."""

    def __init__(self, max_read: int = MAX_ATTRIBUTE_SIZE) -> None:
        self.max_read = max_read

    def mkdir(self, path: str) -> None:
        os.mkdir(path, 0o700)

    def rmdir(self, path: str) -> None:
        os.rmdir(path)

    def read(self, path: str) -> bytes:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            chunks = []
            total = 0
            while True:
                chunk = os.read(fd, self.max_read + 1 - total)
                if not chunk:
                    break
                chunks.append(chunk)
                total += len(chunk)
                if total > self.max_read:
                    raise OSError(errno.EFBIG, f"more than {self.max_read} bytes", path)
            return b"".join(chunks)
        finally:
            os.close(fd)

    def write(self, path: str, data: bytes) -> None:
        fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
        finally:
            os.close(fd)

    def exists(self, path: str) -> bool:
        return os.path.exists(path)


class _Raced(Exception):
    """The generation moved by more than our own writes."""


class ConfigfsDevice:
    """A :class:`~snpd.device.base.Device` over configfs-tsm.

    ``privlevel_floor`` is a caller-side minimum VMPL enforced in addition to the
    kernel's ``privlevel_floor`` attribute (when that exists), so a request the
    firmware would reject fails fast with a clear message."""

    name = "configfs"

    def __init__(
        self,
        root: str = DEFAULT_ROOT,
        *,
        fs: Optional[FsOps] = None,
        privlevel_floor: Optional[int] = None,
    ) -> None:
        if privlevel_floor is not None and not 0 <= privlevel_floor <= 3:
            raise InvalidArgument(f"privlevel_floor {privlevel_floor} is not 0-3")
        self.root = root
        self.fs: FsOps = fs if fs is not None else OsFsOps()
        self.privlevel_floor = privlevel_floor
        self.provider: Optional[str] = None
        self._kernel_floor: Optional[int] = None
        self._counter = itertools.count(1)

    # -- Device protocol -------------------------------------------------------------

    def report(self, request: ReportRequest) -> bytes:
        return self._request(request, with_certificates=False)[0]

    def extended_report(self, request: ReportRequest) -> ExtendedReport:
        report, certificates = self._request(request, with_certificates=True)
        return ExtendedReport(report, certificates)

    def derived_key(self, request: DerivedKeyRequest) -> bytes:
        raise NotSupported("derived keys are not available through configfs-tsm; "
                           "use the ioctl backend (/dev/sev-guest)")

    def quote(self, request: QuoteRequest) -> VtpmQuote:
        raise NotSupported(NO_VTPM)

    def platform(self) -> Platform:
        return Platform()

    def describe(self) -> Dict[str, object]:
        return {"backend": self.name, "root": self.root, "provider": self.provider,
                "privlevel_floor": self._floor()}

    def close(self) -> None:
        """Nothing to release: every request removes its own directory."""

    # -- one request ------------------------------------------------------------------

    def _floor(self) -> Optional[int]:
        floors = [f for f in (self.privlevel_floor, self._kernel_floor) if f is not None]
        return max(floors) if floors else None

    def _request(self, request: ReportRequest, *, with_certificates: bool,
                 ) -> Tuple[bytes, Tuple[CertTableEntry, ...]]:
        for _ in range(ATTEMPTS):
            try:
                return self._attempt(request.report_data, request.vmpl, with_certificates)
            except _Raced:
                log.warning("configfs-tsm generation changed during a report request; "
                            "another writer touched the report directory")
        raise Busy(f"another writer changed the configfs-tsm report generation during "
                   f"{ATTEMPTS} attempts; retry later")

    def _attempt(self, report_data: bytes, vmpl: int, with_certificates: bool,
                 ) -> Tuple[bytes, Tuple[CertTableEntry, ...]]:
        entry = posixpath.join(
            self.root, f"snpd-{os.getpid()}-{next(self._counter)}-{secrets.token_hex(4)}")
        try:
            self.fs.mkdir(entry)
        except OSError as exc:
            raise self._error(exc, "create", entry) from exc
        try:
            return self._generate(entry, report_data, vmpl, with_certificates)
        finally:
            try:
                self.fs.rmdir(entry)
            except OSError as exc:
                log.warning("could not remove configfs-tsm report directory %s: %s",
                            entry, exc)

    def _generate(self, entry: str, report_data: bytes, vmpl: int, with_certificates: bool,
                  ) -> Tuple[bytes, Tuple[CertTableEntry, ...]]:
        provider = self._read(entry, "provider").decode("utf-8", "replace").strip()
        self.provider = provider
        if provider != PROVIDER:
            raise NotSupported(f"configfs-tsm provider is {provider!r}, not {PROVIDER!r}: "
                               f"this is not an SEV-SNP guest")
        generation = self._generation(entry)
        floor_path = posixpath.join(entry, "privlevel_floor")
        if self.fs.exists(floor_path):
            self._kernel_floor = self._int(entry, "privlevel_floor")
        floor = self._floor()
        if floor is not None and vmpl < floor:
            raise InvalidArgument(f"VMPL {vmpl} is below the privlevel floor {floor}: "
                                  f"request VMPL {floor} or higher")
        self._write(entry, "privlevel", str(vmpl).encode())
        self._write(entry, "inblob", report_data)
        report = self._read(entry, "outblob")
        if len(report) != REPORT_SIZE:
            raise DeviceError(f"configfs-tsm outblob has {len(report)} bytes, expected an "
                              f"{REPORT_SIZE}-byte SEV-SNP report")
        aux = b""
        if with_certificates and self.fs.exists(posixpath.join(entry, "auxblob")):
            aux = self._read(entry, "auxblob", missing_ok=True)
        if self._generation(entry) != generation + WRITES_PER_REQUEST:
            raise _Raced()
        return report, parse_cert_table(aux)

    # -- attribute access with errno mapping -------------------------------------------

    def _generation(self, entry: str) -> int:
        return self._int(entry, "generation")

    def _int(self, entry: str, attribute: str) -> int:
        text = self._read(entry, attribute).decode("ascii", "replace").strip()
        if not text.isdigit():
            raise DeviceError(f"configfs-tsm {attribute} reads {text[:32]!r}, "
                              f"not a decimal number")
        return int(text)

    def _read(self, entry: str, attribute: str, *, missing_ok: bool = False) -> bytes:
        path = posixpath.join(entry, attribute)
        try:
            return self.fs.read(path)
        except OSError as exc:
            if missing_ok and exc.errno == errno.ENOENT:
                return b""
            raise self._error(exc, "read", path) from exc

    def _write(self, entry: str, attribute: str, data: bytes) -> None:
        path = posixpath.join(entry, attribute)
        try:
            self.fs.write(path, data)
        except OSError as exc:
            raise self._error(exc, "write", path) from exc

    def _error(self, exc: OSError, op: str, path: str) -> SnpdError:
        """The taxonomy error for a failed configfs operation (docs/reference/abi.md §2.4, §3.2)."""
        code = exc.errno
        attribute = posixpath.basename(path)
        what = f"{op} {path}"
        if code == errno.ENOENT and op == "create":
            return DeviceUnavailable(
                f"configfs-tsm not available at {self.root}: needs kernel 6.7+ with the "
                f"sev-guest module loaded and configfs mounted on /sys/kernel/config")
        if code in (errno.EACCES, errno.EPERM):
            return DeviceUnavailable(
                f"permission denied to {what}: configfs-tsm report directories need "
                f"root; run as root or use the ioctl backend (/dev/sev-guest)")
        if code == errno.EINVAL and attribute in ("outblob", "auxblob"):
            return InvalidArgument(
                f"the firmware rejected the report request ({what}: EINVAL): the VMPL may "
                f"be below the guest's own (privlevel_floor)")
        if code == errno.EINVAL and attribute in ("privlevel", "inblob"):
            return InvalidArgument(f"the kernel rejected the value ({what}: EINVAL): privlevel "
                                   f"must lie between privlevel_floor and 3")
        if code == errno.ENOTTY:
            return VmpckDisabled(
                "the kernel disabled the VMPCK after a failed firmware request; no report "
                "is possible until reboot (or modprobe sev-guest vmpck_id=<another key>)")
        if code == errno.EBUSY:
            return Busy(f"configfs-tsm is busy ({what}: EBUSY); retry later")
        if code == errno.ETIMEDOUT:
            return VmpckTimedOut(f"the host kept the firmware busy for over 60 s ({what}); "
                                 f"the kernel has likely disabled the VMPCK")
        name = errno.errorcode.get(code, str(code)) if code is not None else "no errno"
        hint = {errno.ENXIO: ": the firmware returned an error status",
                errno.EIO: ": the guest request failed (check the kernel log)"}.get(code or 0, "")
        if code == errno.EBADMSG:  # the response failed authentication: the key is gone
            return VmpckBadMessage(f"configfs-tsm {what} failed: {name}", errno=code)
        return DeviceError(f"configfs-tsm {what} failed: {name}{hint}", errno=code)
