"""The sev-guest driver at the ioctl boundary (docs/reference/abi.md §1, §2.1-2.6, §7 items 1-5).

:class:`EmulatedSevGuest` offers ``open``/``ioctl``/``close`` with the signatures
of ``os.open``/``fcntl.ioctl(fd, request, arg, True)``/``os.close``, so the real
ioctl backend runs unchanged on top of it: the same ctypes structs, the same
pointers, the same errno and ``exitinfo2`` write-back. User memory is read and
written through the caller's real pointers, via a pipe so that a bad pointer
gives EFAULT (as ``copy_from_user`` does) instead of a crash.

The model follows the driver's code paths for three generations (``kernel`` in
the config), quoted where they differ:

- "6.3" (6.3 and later; log text of 6.11+): BUSY is retried every 2 s while
  holding the mutex, ETIMEDOUT and a wipe after 60 s; INVALID_LEN re-sends the
  message as a plain request (consuming the sequence number) and returns EIO
  without a wipe; the wiped-VMPCK check sits in the send path, after the
  argument checks, so ENOTTY comes with ``exitinfo2`` 0xff written back.
- "6.2" (6.1-6.2): BUSY is an error like any other: EIO and an immediate wipe.
  The wiped check runs first, ENOTTY writes nothing back.
- "6.0" (5.19-6.0): host and firmware errors return EIO without a wipe and
  without consuming the sequence number (INVALID_LEN included: the IV-reuse bug,
  recorded in ``iv_reuse``); only a decode failure wipes.

Errors detected before the guest request is issued (a NULL pointer, a bad
``certs_len``, an unknown ioctl, sequence overflow) leave the kernel's initial
``exitinfo2`` of 0xff, and the driver writes that back: callers must zero it
first and trust it only with EIO, as go-sev-guest does.
"""

from __future__ import annotations

import ctypes
import datetime
import errno
import itertools
import os
import threading
import weakref
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Set, Tuple

from snpd.abi.uapi import (
    PAGE_SIZE,
    SEV_FW_BLOB_MAX_SIZE,
    SNP_GET_DERIVED_KEY,
    SNP_GET_EXT_REPORT,
    SNP_GET_REPORT,
    SNP_GUEST_VMM_ERR_BUSY,
    SNP_GUEST_VMM_ERR_INVALID_LEN,
    SnpDerivedKeyReq,
    SnpDerivedKeyResp,
    SnpExtReportReq,
    SnpGuestRequestIoctl,
    SnpReportReq,
    SnpReportResp,
    vmm_err,
)
from snpd.emulator.firmware import MSG_KEY_REQ, MSG_REPORT_REQ, Firmware, HostAnswer
from snpd.emulator.launch import EmulatorConfig
from snpd.emulator.state import EmulatorState, Now

DEVICE_PATH = "/dev/sev-guest"
RETRY_DELAY = 2.0  # SNP_REQ_RETRY_DELAY
MAX_RETRY_DURATION = 60.0  # SNP_REQ_MAX_RETRY_DURATION
UINT_MAX = 0xFFFFFFFF
LOG_LIMIT = 1000
INVALID_LEN = vmm_err(SNP_GUEST_VMM_ERR_INVALID_LEN)
BUSY = vmm_err(SNP_GUEST_VMM_ERR_BUSY)
_REPORT_REQ_SIZE = ctypes.sizeof(SnpReportReq)
_REPORT_RESP_SIZE = ctypes.sizeof(SnpReportResp)
_KEY_REQ_SIZE = ctypes.sizeof(SnpDerivedKeyReq)
_KEY_RESP_SIZE = ctypes.sizeof(SnpDerivedKeyResp)
_EXT_REQ_SIZE = ctypes.sizeof(SnpExtReportReq)


class _Fault(Exception):
    """An errno on its way out of the driver (with the host's page count, which the
    extended-report path writes back on INVALID_LEN)."""

    def __init__(self, code: int, data_npages: int = 0) -> None:
        super().__init__(code)
        self.code = code
        self.data_npages = data_npages


# -- user memory -------------------------------------------------------------------------

_libc = ctypes.CDLL(None, use_errno=True)
_libc.read.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t]
_libc.read.restype = ctypes.c_ssize_t
_libc.write.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t]
_libc.write.restype = ctypes.c_ssize_t


class _UserMemory:
    """copy_from_user / copy_to_user on real addresses. The bytes go through a pipe,
    so the kernel itself checks the pointer and answers EFAULT for a bad one."""

    def __init__(self) -> None:
        self._r, self._w = os.pipe()
        os.set_blocking(self._r, False)
        weakref.finalize(self, _close_pair, self._r, self._w)

    def read(self, addr: int, size: int) -> bytes:
        done = _libc.write(self._w, addr, size)
        data = self._drain() if done > 0 else b""
        if done != size:
            raise _Fault(errno.EFAULT)
        return data

    def write(self, addr: int, data: bytes) -> None:
        view = memoryview(data)
        while view:
            view = view[os.write(self._w, view):]
        done = _libc.read(self._r, addr, len(data))
        if done != len(data):
            self._drain()
            raise _Fault(errno.EFAULT)

    def _drain(self) -> bytes:
        chunks = []
        while True:
            try:
                chunk = os.read(self._r, 65536)
            except BlockingIOError:
                break
            if not chunk:
                break
            chunks.append(chunk)
        return b"".join(chunks)


def _close_pair(r: int, w: int) -> None:
    os.close(r)
    os.close(w)


# -- the driver --------------------------------------------------------------------------


class EmulatedSevGuest:
    """The sev-guest driver over an emulated :class:`Firmware`.

    State that the real driver keeps in the secrets page is here too: the
    per-VMPCK message sequence numbers (``msg_seqno``, writable by tests to reach
    the overflow) and which VMPCKs are wiped. ``log`` collects the kernel log
    lines the driver would print (the newest :data:`LOG_LIMIT`).
    """

    def __init__(
        self,
        firmware: Firmware,
        *,
        kernel: Optional[str] = None,
        device: Optional[str] = None,
        path: str = DEVICE_PATH,
        clock: Optional[Callable[[], float]] = None,
        sleep: Optional[Callable[[float], None]] = None,
    ) -> None:
        cfg = firmware.config
        self.firmware = firmware
        self.kernel = kernel or cfg.kernel
        if self.kernel not in ("6.3", "6.2", "6.0"):
            raise ValueError(f"unknown kernel profile {self.kernel!r}")
        self.device = device or cfg.device
        self.path = path
        self.clock = clock or firmware.clock
        self.sleep = sleep or firmware.sleep
        self.vmpck_id = cfg.vmpck
        self.msg_seqno: List[int] = [0, 0, 0, 0]
        self.wiped: Set[int] = set(range(cfg.guest_vmpl))  # lower VMPLs' keys are zero
        self.iv_reuse: List[Tuple[int, int]] = []  # (vmpck, seqno) sent twice with new content
        self.log: List[str] = []
        self._last_sent: Dict[int, Tuple[int, bytes]] = {}
        self._fds: Set[int] = set()
        self._next_fd = itertools.count(1000)
        self._mutex = threading.RLock()  # snp_cmd_mutex
        self._mem = _UserMemory()
        self._probe()

    @classmethod
    def for_state_dir(
        cls,
        state_dir: Path,
        config: EmulatorConfig,
        *,
        now: Optional[Now] = None,
        rsa_bits: int = 4096,
        **kw: Any,
    ) -> EmulatedSevGuest:
        """Load (or create) the platform in ``state_dir`` and put a driver on it.
        ``clock``, ``sleep`` and ``random`` go to the firmware, the rest here."""
        state = EmulatorState.load_or_create(
            state_dir, config, rsa_bits=rsa_bits,
            now=now or (lambda: datetime.datetime.now(datetime.timezone.utc)))
        fw_kw = {k: kw.pop(k) for k in ("clock", "sleep", "random") if k in kw}
        return cls(Firmware(state, **fw_kw), **kw)

    # -- module state ------------------------------------------------------------

    @property
    def modern(self) -> bool:
        return self.kernel == "6.3"

    @property
    def vmpck_disabled(self) -> bool:
        return self.vmpck_id in self.wiped

    def reload(self, vmpck_id: Optional[int] = None) -> None:
        """``modprobe -r sev-guest; modprobe sev-guest vmpck_id=N``: the only in-guest
        way back after a wipe, if another usable VMPCK exists. Open descriptors die."""
        with self._mutex:
            self._fds.clear()
            self.vmpck_id = self.firmware.config.vmpck if vmpck_id is None else vmpck_id
            self._probe()

    def _probe(self) -> None:
        if not 0 <= self.vmpck_id <= 3:
            self._present = False
            self._log(self._dev(f"Invalid VMPCK{self.vmpck_id} communication key" if self.modern
                                else f"invalid vmpck id {self.vmpck_id}"))
        elif self.vmpck_id in self.wiped:
            self._present = False
            self._log(self._dev(f"Empty VMPCK{self.vmpck_id} communication key" if self.modern
                                else f"vmpck id {self.vmpck_id} is null"))
        else:
            self._present = True
            self._log(self._dev(
                f"Initialized SEV guest driver (using VMPCK{self.vmpck_id} communication key)"
                if self.modern else
                f"Initialized SEV guest driver (using vmpck_id {self.vmpck_id})"))

    # -- file operations ---------------------------------------------------------

    def open(self, path: str) -> int:
        if os.fspath(path) != self.path or self.device == "absent" or not self._present:
            raise _oserror(errno.ENOENT, path)
        if self.device == "denied":
            raise _oserror(errno.EACCES, path)
        with self._mutex:
            fd = next(self._next_fd)
            self._fds.add(fd)
        return fd

    def close(self, fd: int) -> None:
        with self._mutex:
            if fd not in self._fds:
                raise _oserror(errno.EBADF)
            self._fds.discard(fd)

    def ioctl(self, fd: int, request: int, arg: Any, mutate_flag: bool = True) -> int:
        """``fcntl.ioctl(fd, request, arg, True)`` with ``arg`` a SnpGuestRequestIoctl
        (or a writable 32-byte buffer): 0, or OSError with the driver's errno."""
        if fd not in self._fds:
            raise _oserror(errno.EBADF)
        io = arg if isinstance(arg, SnpGuestRequestIoctl) else (
            SnpGuestRequestIoctl.from_buffer(arg))
        call = _Call(int(io.msg_version), int(io.req_data), int(io.resp_data))
        if call.msg_version == 0:
            raise _oserror(errno.EINVAL)
        rc = 0
        with self._mutex:
            if not self.modern:  # checked before the dispatch, returned without write-back
                if self._vmpck_empty():
                    raise _oserror(errno.ENOTTY)
                call.vmpck_checked = True
            try:
                if request == SNP_GET_REPORT:
                    self._get_report(call)
                elif request == SNP_GET_DERIVED_KEY:
                    self._get_derived_key(call)
                elif request == SNP_GET_EXT_REPORT:
                    self._get_ext_report(call)
                else:
                    rc = errno.ENOTTY
            except _Fault as fault:
                rc = fault.code
        if call.exitinfo2:
            io.exitinfo2 = call.exitinfo2
        if rc:
            raise _oserror(rc)
        return 0

    # -- the three requests --------------------------------------------------------

    def _get_report(self, call: _Call) -> None:
        if not call.req_data or not call.resp_data:
            raise _Fault(errno.EINVAL)
        body = self._mem.read(call.req_data, _REPORT_REQ_SIZE)
        answer, _ = self._send(call, MSG_REPORT_REQ, body)
        self._mem.write(call.resp_data, _pad(answer.response, _REPORT_RESP_SIZE))

    def _get_derived_key(self, call: _Call) -> None:
        if not call.req_data or not call.resp_data:
            raise _Fault(errno.EINVAL)
        body = self._mem.read(call.req_data, _KEY_REQ_SIZE)
        answer, _ = self._send(call, MSG_KEY_REQ, body)
        self._mem.write(call.resp_data, _pad(answer.response, _KEY_RESP_SIZE))

    def _get_ext_report(self, call: _Call) -> None:
        if not call.req_data or not call.resp_data:
            raise _Fault(errno.EINVAL)
        raw = self._mem.read(call.req_data, _EXT_REQ_SIZE)
        req = SnpExtReportReq.from_buffer_copy(raw)
        certs_len, certs_address = int(req.certs_len), int(req.certs_address)
        npages = 0
        if certs_len and certs_address:
            if certs_len > SEV_FW_BLOB_MAX_SIZE or certs_len % PAGE_SIZE:
                raise _Fault(errno.EINVAL)
            npages = certs_len // PAGE_SIZE
        try:
            answer, _ = self._send(call, MSG_REPORT_REQ, bytes(raw[:_REPORT_REQ_SIZE]), npages)
        except _Fault as fault:
            self._write_back_certs_len(call, req, fault)
            raise
        if npages:
            self._mem.write(certs_address, _pad(answer.certs[:certs_len], certs_len))
        self._mem.write(call.resp_data, _pad(answer.response, _REPORT_RESP_SIZE))

    def _write_back_certs_len(self, call: _Call, req: SnpExtReportReq, fault: _Fault) -> None:
        """The caller's buffer was too small: tell it how many bytes the host wants,
        writing the whole 112-byte request back (6.3+ tests vmm_error, older fw_err)."""
        too_small = ((call.exitinfo2 >> 32) == SNP_GUEST_VMM_ERR_INVALID_LEN if self.modern
                     else call.exitinfo2 == INVALID_LEN)
        if too_small:
            req.certs_len = (fault.data_npages << 12) & UINT_MAX
            try:
                self._mem.write(call.req_data, bytes(req))
            except _Fault as efault:
                fault.code = efault.code

    # -- snp_send_guest_request ------------------------------------------------------

    def _send(self, call: _Call, msg_type: int, body: bytes, ext_pages: Optional[int] = None
              ) -> Tuple[HostAnswer, int]:
        """Send one guest message; return the answer and the host's page count, or
        raise _Fault (carrying data_npages for the INVALID_LEN write-back)."""
        if not call.vmpck_checked and self._vmpck_empty():
            raise _Fault(errno.ENOTTY)
        vmpck = self.vmpck_id
        seqno = self.msg_seqno[vmpck] + 1
        if seqno >= UINT_MAX:
            self._log("sev-guest: request message sequence counter overflow")
            raise _Fault(errno.EIO)
        self._note_iv(vmpck, seqno, msg_type, body, ext_pages)
        handle = {"6.3": self._handle_63, "6.2": self._handle_62, "6.0": self._handle_60}
        rc, answer, data_npages = handle[self.kernel](call, msg_type, body, vmpck, ext_pages)
        if rc:
            raise _Fault(rc, data_npages)
        return answer, data_npages

    def _issue(self, call: _Call, msg_type: int, body: bytes, vmpck: int,
               ext_pages: Optional[int]) -> Tuple[int, HostAnswer]:
        """snp_issue_guest_request: one VMGEXIT; rc in the driver's terms."""
        answer = self.firmware.guest_request(msg_type, call.msg_version, body, vmpck=vmpck,
                                             ext_pages=ext_pages)
        call.exitinfo2 = answer.exitinfo2
        if answer.exitinfo2 == 0:
            return 0, answer
        if self.modern and answer.exitinfo2 == BUSY:
            return errno.EAGAIN, answer
        if answer.exitinfo2 == INVALID_LEN and ext_pages is not None:
            return errno.ENOSPC, answer
        return errno.EIO, answer

    def _handle_63(self, call: _Call, msg_type: int, body: bytes, vmpck: int,
                   ext_pages: Optional[int]) -> Tuple[int, HostAnswer, int]:
        """__handle_guest_request and the tail of snp_send_guest_request, 6.3+."""
        start = self.clock()
        data_npages = ext_pages or 0
        override_npages = 0
        override_err = 0
        rc, answer = 0, HostAnswer()
        while True:
            rc, answer = self._issue(call, msg_type, body, vmpck, ext_pages)
            if rc == errno.ENOSPC:
                data_npages = override_npages = answer.npages
                ext_pages = None
                override_err = INVALID_LEN
                continue
            if rc == errno.EAGAIN:
                if self.clock() - start > MAX_RETRY_DURATION:
                    rc = errno.ETIMEDOUT
                    break
                self.sleep(RETRY_DELAY)
                continue
            break
        self._inc_seqno(vmpck)
        if override_err:
            call.exitinfo2 = override_err
            if not rc:
                rc = errno.EIO
        if override_npages:
            data_npages = override_npages
        if rc:
            if rc == errno.EIO and call.exitinfo2 == INVALID_LEN:
                return rc, answer, data_npages
            self._log(f"sev-guest: Detected error from ASP request. rc: {-rc}, "
                      f"exitinfo2: 0x{call.exitinfo2:x}")
            self._disable_vmpck()
            return rc, answer, data_npages
        if answer.tampered:
            self._log(f"sev-guest: Detected unexpected decode failure from ASP. rc: "
                      f"{-errno.EBADMSG}")
            self._disable_vmpck()
            return errno.EBADMSG, answer, data_npages
        return 0, answer, data_npages

    def _handle_62(self, call: _Call, msg_type: int, body: bytes, vmpck: int,
                   ext_pages: Optional[int]) -> Tuple[int, HostAnswer, int]:
        """handle_guest_request of 6.1-6.2: the IV-reuse fix, no throttling awareness."""
        rc, answer = self._issue(call, msg_type, body, vmpck, ext_pages)
        data_npages = ext_pages or 0
        err = call.exitinfo2
        if rc == errno.ENOSPC:
            data_npages = answer.npages
            rc, answer = self._issue(call, msg_type, body, vmpck, None)
            err = INVALID_LEN
        self._inc_seqno(vmpck)
        call.exitinfo2 = err
        if not rc and err == INVALID_LEN:
            return errno.EIO, answer, data_npages
        if rc:
            self._log(self._dev(f"Detected error from ASP request. rc: {-rc}, fw_err: {err}"))
            self._disable_vmpck()
            return rc, answer, data_npages
        if answer.tampered:
            self._log(self._dev(f"Detected unexpected decode failure from ASP. rc: "
                                f"{-errno.EBADMSG}"))
            self._disable_vmpck()
            return errno.EBADMSG, answer, data_npages
        return 0, answer, data_npages

    def _handle_60(self, call: _Call, msg_type: int, body: bytes, vmpck: int,
                   ext_pages: Optional[int]) -> Tuple[int, HostAnswer, int]:
        """handle_guest_request of 5.19-6.0: errors return at once, unconsumed."""
        rc, answer = self._issue(call, msg_type, body, vmpck, ext_pages)
        data_npages = answer.npages if rc == errno.ENOSPC else ext_pages or 0
        if rc:
            return errno.EIO, answer, data_npages
        if answer.tampered:
            self._log(self._dev(f"Detected unexpected decode failure, disabling the vmpck_id "
                                f"{vmpck}"))
            self._disable_vmpck()
            return errno.EBADMSG, answer, data_npages
        self._inc_seqno(vmpck)
        return 0, answer, data_npages

    # -- helpers -----------------------------------------------------------------------

    def _vmpck_empty(self) -> bool:
        """is_vmpck_empty, after letting an injected wipe() fault take the key."""
        if self.firmware.faults.take(lambda f: f.kind == "wipe") is not None:
            self.firmware.requests["wipe"] += 1
            if not self.vmpck_disabled:
                self._disable_vmpck()
        if self.vmpck_disabled:
            self._log(self._dev("VMPCK is disabled") if not self.modern
                      else "sev-guest: VMPCK is disabled")
            return True
        return False

    def _disable_vmpck(self) -> None:
        if self.modern:
            self._log(f"sev-guest: Disabling VMPCK{self.vmpck_id} communication key to "
                      "prevent IV reuse.")
        elif self.kernel == "6.2":
            self._log(self._dev(f"Disabling vmpck_id {self.vmpck_id} to prevent IV reuse."))
        self.wiped.add(self.vmpck_id)

    def _inc_seqno(self, vmpck: int) -> None:
        self.msg_seqno[vmpck] = (self.msg_seqno[vmpck] + 2) & UINT_MAX

    def _note_iv(self, vmpck: int, seqno: int, msg_type: int, body: bytes,
                 ext_pages: Optional[int]) -> None:
        """Record a sequence number (the AES-GCM IV) reused for a different message."""
        content = bytes([msg_type]) + body
        last = self._last_sent.get(vmpck)
        if last is not None and last[0] == seqno and last[1] != content:
            self.iv_reuse.append((vmpck, seqno))
        self._last_sent[vmpck] = (seqno, content)

    def _dev(self, message: str) -> str:
        return f"sev-guest sev-guest: {message}"

    def _log(self, line: str) -> None:
        self.log.append(line)
        if len(self.log) > 2 * LOG_LIMIT:
            del self.log[:-LOG_LIMIT]

    # -- the configfs-tsm path -------------------------------------------------------

    def tsm_report(self, user_data: bytes, vmpl: int) -> Tuple[bytes, bytes]:
        """get_ext_report from the kernel side (sev_report_new): a 16 KiB certificate
        buffer, kernel pointers. Returns (4000-byte response, certificate buffer) or
        raises OSError with the driver's errno."""
        req = SnpExtReportReq()
        ctypes.memmove(req.data.user_data, user_data, len(user_data))
        req.data.vmpl = vmpl
        npages = SEV_FW_BLOB_MAX_SIZE // PAGE_SIZE
        call = _Call(1, 1, 1)  # kernel buffers: never NULL, never a bad address
        with self._mutex:
            try:
                answer, _ = self._send(call, MSG_REPORT_REQ, bytes(req)[:_REPORT_REQ_SIZE],
                                       npages)
            except _Fault as fault:
                raise _oserror(fault.code) from None
        return (_pad(answer.response, _REPORT_RESP_SIZE),
                _pad(answer.certs[:SEV_FW_BLOB_MAX_SIZE], SEV_FW_BLOB_MAX_SIZE))


class _Call:
    """The kernel's copy of the ioctl argument (``exitinfo2`` starts at 0xff)."""

    def __init__(self, msg_version: int, req_data: int, resp_data: int) -> None:
        self.msg_version = msg_version
        self.req_data = req_data
        self.resp_data = resp_data
        self.exitinfo2 = 0xFF
        self.vmpck_checked = False


def _pad(data: bytes, size: int) -> bytes:
    return data[:size] + bytes(size - min(len(data), size))


def _oserror(code: int, path: Optional[str] = None) -> OSError:
    if path is None:
        return OSError(code, os.strerror(code))
    return OSError(code, os.strerror(code), path)
