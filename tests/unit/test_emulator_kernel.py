"""The sev-guest driver model at the ioctl boundary: real ctypes structs, real
pointers, errno, exitinfo2 write-back, VMPCK wiping, throttling and sequence numbers.

Time is a fake clock that the injected sleep advances, so a 60 s throttle takes
no wall time.
"""

from __future__ import annotations

import ctypes
import datetime
import errno
import threading
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import pytest

from snpd.abi.certtable import parse_cert_table
from snpd.abi.product import Product
from snpd.abi.report import AttestationReport
from snpd.abi.uapi import (
    SNP_GET_DERIVED_KEY,
    SNP_GET_EXT_REPORT,
    SNP_GET_REPORT,
    DerivedKeyRequest,
    SnpDerivedKeyReq,
    SnpDerivedKeyResp,
    SnpExtReportReq,
    SnpGuestRequestIoctl,
    SnpReportReq,
    SnpReportResp,
    parse_key_response,
    parse_report_response,
)
from snpd.device.base import ReportRequest
from snpd.emulator.faults import DeviceFault
from snpd.emulator.firmware import Firmware
from snpd.emulator.kernel import EmulatedSevGuest
from snpd.emulator.launch import EmulatorConfig
from snpd.emulator.state import EmulatorState
from snpd.trust.certset import CertificateSet
from snpd.trust.roots import TrustRoots
from snpd.trust.verify import Verifier

NOW = datetime.datetime(2026, 6, 1, 12, 0, tzinfo=datetime.timezone.utc)
DATA = b"\xa5" * 64
SENTINEL = 0x5EB7_1A7E_0000_0000  # a stale exitinfo2 the driver must not touch on success
PAGE = 4096
_STATE: Dict[str, Path] = {}


class FakeClock:
    """time.monotonic and time.sleep for the model: sleeping moves time."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.sleeps: List[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


@pytest.fixture(scope="session")
def state_dir(tmp_path_factory: Any) -> Path:
    if "dir" not in _STATE:
        path = tmp_path_factory.mktemp("emu-kernel")
        EmulatorState.load_or_create(path, EmulatorConfig(), now=lambda: NOW, rsa_bits=2048)
        _STATE["dir"] = path
    return _STATE["dir"]


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


def make_guest(state_dir: Path, clock: FakeClock, **config: Any) -> EmulatedSevGuest:
    state = EmulatorState.load_or_create(state_dir, EmulatorConfig(**config), now=lambda: NOW,
                                         rsa_bits=2048)
    return EmulatedSevGuest(Firmware(state, clock=clock, sleep=clock.sleep))


@pytest.fixture
def guest(state_dir: Path, clock: FakeClock) -> EmulatedSevGuest:
    return make_guest(state_dir, clock)


class Call:
    """One ioctl with its buffers kept alive; ``errno`` 0 on success."""

    def __init__(self, guest: EmulatedSevGuest, request: int, req: Any, resp: Any, *,
                 msg_version: int = 1, req_data: Optional[int] = None,
                 resp_data: Optional[int] = None, exitinfo2: int = SENTINEL) -> None:
        self.req, self.resp = req, resp
        self.io = SnpGuestRequestIoctl(
            msg_version, ctypes.addressof(req) if req_data is None else req_data,
            ctypes.addressof(resp) if resp_data is None else resp_data, exitinfo2)
        fd = guest.open("/dev/sev-guest")
        try:
            self.result = guest.ioctl(fd, request, self.io)
            self.errno = 0
        except OSError as exc:
            self.errno = exc.errno or -1
            self.strerror = exc.strerror
        finally:
            guest.close(fd)

    @property
    def exitinfo2(self) -> int:
        return int(self.io.exitinfo2)


def report_call(guest: EmulatedSevGuest, vmpl: int = 0, data: bytes = DATA,
                **kw: Any) -> Tuple[Call, int, bytes]:
    req = SnpReportReq()
    ctypes.memmove(req.user_data, data, 64)
    req.vmpl = vmpl
    call = Call(guest, SNP_GET_REPORT, req, SnpReportResp(), **kw)
    status, report = parse_report_response(bytes(call.resp.data)) if call.errno == 0 else (
        -1, b"")
    return call, status, report


def key_call(guest: EmulatedSevGuest, request: DerivedKeyRequest, **kw: Any
             ) -> Tuple[Call, int, bytes]:
    call = Call(guest, SNP_GET_DERIVED_KEY, request.to_struct(), SnpDerivedKeyResp(), **kw)
    status, value = parse_key_response(bytes(call.resp.data)) if call.errno == 0 else (-1, b"")
    return call, status, value


def ext_call(guest: EmulatedSevGuest, certs_len: int, *, vmpl: int = 0,
             certs_address: Optional[int] = None, **kw: Any) -> Tuple[Call, Any]:
    req = SnpExtReportReq()
    ctypes.memmove(req.data.user_data, DATA, 64)
    req.data.vmpl = vmpl
    buf = ctypes.create_string_buffer(max(certs_len, 1))
    ctypes.memset(buf, 0x77, len(buf))  # the driver must overwrite all of it with zeros first
    req.certs_address = ctypes.addressof(buf) if certs_address is None else certs_address
    req.certs_len = certs_len
    return Call(guest, SNP_GET_EXT_REPORT, req, SnpReportResp(), **kw), buf


def verify(guest: EmulatedSevGuest, report: bytes, certs: Optional[CertificateSet] = None
           ) -> bool:
    state = guest.firmware.state
    v = Verifier(TrustRoots(explicit=(state.ark,)), clock=lambda: NOW)
    return v.verify(report, certs or state.certificates()).valid


# -- success ------------------------------------------------------------------------------


def test_report_through_real_pointers(guest: EmulatedSevGuest) -> None:
    call, status, report = report_call(guest, vmpl=2)
    assert (call.errno, call.result, status) == (0, 0, 0)
    assert call.exitinfo2 == SENTINEL  # not written back on success
    parsed = AttestationReport.from_bytes(report)
    assert parsed.report_data == DATA and parsed.vmpl == 2
    assert bytes(call.resp.data)[0x20 + 1184:] == bytes(4000 - 0x20 - 1184)
    assert verify(guest, report)
    assert guest.msg_seqno == [2, 0, 0, 0]


def test_body_status_for_a_vmpl_below_the_guests(state_dir: Path, clock: FakeClock) -> None:
    guest = make_guest(state_dir, clock, guest_vmpl=1)
    call, status, report = report_call(guest, vmpl=0)
    assert (call.errno, status, report) == (0, 0x16, b"")
    assert call.exitinfo2 == SENTINEL
    assert guest.msg_seqno == [0, 2, 0, 0]  # VMPCK1 by default at VMPL1
    call, status, report = report_call(guest, vmpl=1)
    assert status == 0 and verify(guest, report)


def test_derived_key_through_real_pointers(guest: EmulatedSevGuest) -> None:
    request = DerivedKeyRequest.from_fields("vcek", ["measurement", "policy"], vmpl=1)
    call, status, value = key_call(guest, request)
    assert (call.errno, status, call.exitinfo2) == (0, 0, SENTINEL)
    assert value == guest.firmware.derived_key(request)[1]
    bad = SnpDerivedKeyReq(0, 0, 1 << 7, 0, 0, 0)
    call = Call(guest, SNP_GET_DERIVED_KEY, bad, SnpDerivedKeyResp())
    assert call.errno == 0 and parse_key_response(bytes(call.resp.data)) == (0x16, b"")
    assert guest.msg_seqno[0] == 4


def test_extended_report_length_probe_then_table(guest: EmulatedSevGuest) -> None:
    need = guest.firmware.required_pages * PAGE
    assert need >= PAGE
    probe, _ = ext_call(guest, 0)
    assert probe.errno == errno.EIO
    assert probe.exitinfo2 == 1 << 32  # vmm_error INVALID_LEN, fw_error 0
    assert probe.req.certs_len == need  # the whole request struct was written back
    assert bytes(probe.req.data.user_data) == DATA
    assert bytes(probe.resp.data) == bytes(4000)  # no response copied
    assert guest.msg_seqno[0] == 2  # consumed by the plain re-send
    assert guest.firmware.requests["report"] == 1 and not guest.vmpck_disabled

    call, buf = ext_call(guest, need)
    assert (call.errno, call.exitinfo2) == (0, SENTINEL)
    status, report = parse_report_response(bytes(call.resp.data))
    assert status == 0
    entries = parse_cert_table(buf.raw[:need])
    assert [e.kind for e in entries] == ["ark", "ask", "vcek", "crl"]
    certs = CertificateSet.from_kinds([(str(e.kind), e.data) for e in entries])
    assert verify(guest, report, certs)
    assert guest.msg_seqno[0] == 4


def test_extended_report_bigger_buffer_is_zero_filled(guest: EmulatedSevGuest) -> None:
    call, buf = ext_call(guest, 4 * PAGE)
    assert call.errno == 0
    blob = guest.firmware.cert_blob()
    assert buf.raw[:len(blob)] == blob and buf.raw[len(blob):4 * PAGE] == bytes(
        4 * PAGE - len(blob))


def test_extended_report_from_an_upstream_kvm_host(state_dir: Path, clock: FakeClock) -> None:
    guest = make_guest(state_dir, clock, host_certs="empty")
    call, buf = ext_call(guest, 0)
    assert call.errno == 0  # nothing to ask for: no INVALID_LEN
    call, buf = ext_call(guest, PAGE)
    assert call.errno == 0 and buf.raw[:PAGE] == bytes(PAGE)
    assert parse_cert_table(buf.raw[:PAGE]) == ()


def test_extended_report_without_address_skips_the_length_check(guest: EmulatedSevGuest
                                                                 ) -> None:
    call, _ = ext_call(guest, 123, certs_address=0)  # "does not want certificate data"
    assert call.errno == errno.EIO and call.exitinfo2 == 1 << 32


@pytest.mark.parametrize("certs_len", [100, PAGE + 1, 5 * PAGE])
def test_bad_certs_len_is_einval(guest: EmulatedSevGuest, certs_len: int) -> None:
    call, _ = ext_call(guest, certs_len)
    assert call.errno == errno.EINVAL
    assert call.exitinfo2 == 0xFF  # the kernel's initial value, written back
    assert guest.msg_seqno[0] == 0 and guest.firmware.requests["vmgexit"] == 0


# -- argument errors ------------------------------------------------------------------------


def test_msg_version_zero_is_einval_without_write_back(guest: EmulatedSevGuest) -> None:
    call, _, _ = report_call(guest, msg_version=0)
    assert call.errno == errno.EINVAL and call.exitinfo2 == SENTINEL


@pytest.mark.parametrize("which", ["req_data", "resp_data"])
def test_null_pointers_are_einval(guest: EmulatedSevGuest, which: str) -> None:
    pointers: Dict[str, Any] = {which: 0}
    call, _, _ = report_call(guest, **pointers)
    assert call.errno == errno.EINVAL and call.exitinfo2 == 0xFF


def test_bad_pointer_is_efault_not_a_crash(guest: EmulatedSevGuest) -> None:
    call, _, _ = report_call(guest, req_data=16)
    assert call.errno == errno.EFAULT
    call, _, _ = report_call(guest, resp_data=16)
    assert call.errno == errno.EFAULT  # the firmware answered; the copy-out failed
    assert guest.msg_seqno[0] == 2


def test_unknown_ioctl_is_enotty(guest: EmulatedSevGuest) -> None:
    call = Call(guest, SNP_GET_REPORT + 7, SnpReportReq(), SnpReportResp())
    assert call.errno == errno.ENOTTY and call.exitinfo2 == 0xFF
    assert not guest.vmpck_disabled


def test_open_and_close(state_dir: Path, clock: FakeClock) -> None:
    guest = make_guest(state_dir, clock)
    with pytest.raises(FileNotFoundError):
        guest.open("/dev/sev-guest0")
    fd = guest.open("/dev/sev-guest")
    guest.close(fd)
    with pytest.raises(OSError) as exc:
        guest.close(fd)
    assert exc.value.errno == errno.EBADF
    with pytest.raises(OSError) as exc:
        guest.ioctl(fd, SNP_GET_REPORT, SnpGuestRequestIoctl())
    assert exc.value.errno == errno.EBADF
    with pytest.raises(FileNotFoundError):
        make_guest(state_dir, clock, device="absent").open("/dev/sev-guest")
    with pytest.raises(PermissionError):
        make_guest(state_dir, clock, device="denied").open("/dev/sev-guest")


# -- host and firmware faults -----------------------------------------------------------------

# (fault, kernel, errno, exitinfo2 after the call, wiped, sequence numbers consumed)
FAULTS = [
    (DeviceFault.host_error(), "6.3", errno.EIO, 0xFFFFFFFF_00000000, True, 2),
    (DeviceFault.host_error(vmm_error=7, fw_error=3), "6.3", errno.EIO, 7 << 32 | 3, True, 2),
    (DeviceFault.fw_error(0x17), "6.3", errno.EIO, 0x17, True, 2),
    (DeviceFault.tamper(), "6.3", errno.EBADMSG, SENTINEL, True, 2),
    (DeviceFault.wipe(), "6.3", errno.ENOTTY, 0xFF, True, 0),
    (DeviceFault.busy(), "6.2", errno.EIO, 2 << 32, True, 2),
    (DeviceFault.fw_error(0x17), "6.2", errno.EIO, 0x17, True, 2),
    (DeviceFault.tamper(), "6.2", errno.EBADMSG, SENTINEL, True, 2),
    (DeviceFault.wipe(), "6.2", errno.ENOTTY, SENTINEL, True, 0),
    (DeviceFault.busy(), "6.0", errno.EIO, 2 << 32, False, 0),
    (DeviceFault.fw_error(0x17), "6.0", errno.EIO, 0x17, False, 0),
    (DeviceFault.tamper(), "6.0", errno.EBADMSG, SENTINEL, True, 0),
]


@pytest.mark.parametrize("fault,kernel,code,exitinfo2,wiped,consumed", FAULTS,
                         ids=lambda v: getattr(v, "kind", None) or str(v))
def test_fault(state_dir: Path, clock: FakeClock, fault: DeviceFault, kernel: str, code: int,
               exitinfo2: int, wiped: bool, consumed: int) -> None:
    guest = make_guest(state_dir, clock, kernel=kernel)
    guest.firmware.faults.push(fault)
    call, _, _ = report_call(guest)
    assert call.errno == code
    assert call.exitinfo2 == exitinfo2
    assert guest.vmpck_disabled is wiped
    assert guest.msg_seqno[0] == consumed
    assert bytes(call.resp.data) == bytes(4000)
    if wiped:
        assert any("VMPCK0" in line or "vmpck_id 0" in line for line in guest.log)
        served = guest.firmware.requests["vmgexit"]
        for again in (report_call(guest)[0], key_call(guest, DerivedKeyRequest())[0],
                      ext_call(guest, 0)[0]):
            assert again.errno == errno.ENOTTY
        assert guest.firmware.requests["vmgexit"] == served
    else:
        assert report_call(guest)[1] == 0


def test_body_status_fault_succeeds_with_status(guest: EmulatedSevGuest) -> None:
    guest.firmware.faults.push(DeviceFault.body_status(0x27), count=2)
    call, status, _ = report_call(guest)
    assert (call.errno, status, call.exitinfo2) == (0, 0x27, SENTINEL)
    call, status, _ = key_call(guest, DerivedKeyRequest())
    assert (call.errno, status) == (0, 0x27)
    assert report_call(guest)[1] == 0 and not guest.vmpck_disabled


def test_wipe_log_lines_of_a_modern_kernel(guest: EmulatedSevGuest) -> None:
    guest.firmware.faults.push(DeviceFault.fw_error(0x17))
    report_call(guest)
    assert guest.log[-2:] == [
        "sev-guest: Detected error from ASP request. rc: -5, exitinfo2: 0x17",
        "sev-guest: Disabling VMPCK0 communication key to prevent IV reuse.",
    ]
    report_call(guest)
    assert guest.log[-1] == "sev-guest: VMPCK is disabled"


def test_busy_burst_is_absorbed(guest: EmulatedSevGuest, clock: FakeClock) -> None:
    guest.firmware.faults.push(DeviceFault.busy(), count=5)
    call, status, report = report_call(guest)
    assert (call.errno, status, call.exitinfo2) == (0, 0, SENTINEL)
    assert clock.sleeps == [2.0] * 5
    assert guest.firmware.requests["vmgexit"] == 6 and guest.msg_seqno[0] == 2
    assert verify(guest, report)


def test_busy_for_more_than_a_minute_times_out_and_wipes(guest: EmulatedSevGuest,
                                                         clock: FakeClock) -> None:
    guest.firmware.faults.push(DeviceFault.busy(), count=None)
    call, _, _ = report_call(guest)
    assert call.errno == errno.ETIMEDOUT
    assert call.exitinfo2 == 2 << 32
    assert guest.vmpck_disabled
    assert sum(clock.sleeps) > 60 and len(clock.sleeps) == 31
    assert guest.firmware.requests["vmgexit"] == 32
    assert "rc: -110, exitinfo2: 0x200000000" in guest.log[-2]
    guest.firmware.faults.clear()
    assert report_call(guest)[0].errno == errno.ENOTTY


def test_busy_just_under_a_minute_still_succeeds(guest: EmulatedSevGuest,
                                                 clock: FakeClock) -> None:
    guest.firmware.faults.push(DeviceFault.busy(), count=30)  # retries until t = 60 s
    call, status, _ = report_call(guest)
    assert (call.errno, status) == (0, 0) and sum(clock.sleeps) == 60


def test_invalid_len_fault_rewrites_certs_len_without_wiping(guest: EmulatedSevGuest) -> None:
    guest.firmware.faults.push(DeviceFault.invalid_len(3))
    call, buf = ext_call(guest, 2 * PAGE)
    assert call.errno == errno.EIO and call.exitinfo2 == 1 << 32
    assert call.req.certs_len == 3 * PAGE
    assert buf.raw[:2 * PAGE] == b"\x77" * (2 * PAGE)  # certificates not copied either
    assert not guest.vmpck_disabled and guest.msg_seqno[0] == 2
    call, buf = ext_call(guest, 3 * PAGE)
    assert call.errno == 0 and guest.msg_seqno[0] == 4


def test_invalid_len_beyond_the_kernel_limit(guest: EmulatedSevGuest) -> None:
    guest.firmware.faults.push(DeviceFault.invalid_len(5), count=None)
    call, _ = ext_call(guest, PAGE)
    assert call.errno == errno.EIO and call.req.certs_len == 5 * PAGE
    call, _ = ext_call(guest, 5 * PAGE)
    assert call.errno == errno.EINVAL  # more than 16 KiB: the caller cannot comply


def test_invalid_len_on_60_reuses_the_sequence_number(state_dir: Path, clock: FakeClock
                                                      ) -> None:
    guest = make_guest(state_dir, clock, kernel="6.0")
    probe, _ = ext_call(guest, 0)
    assert probe.errno == errno.EIO and probe.req.certs_len > 0
    assert guest.msg_seqno[0] == 0 and guest.firmware.requests["report"] == 0
    key_call(guest, DerivedKeyRequest())  # a different message under the same IV
    assert guest.iv_reuse == [(0, 1)]
    assert not guest.vmpck_disabled


def test_invalid_len_on_62_resends_like_63(state_dir: Path, clock: FakeClock) -> None:
    guest = make_guest(state_dir, clock, kernel="6.2")
    probe, _ = ext_call(guest, 0)
    assert probe.errno == errno.EIO and probe.exitinfo2 == 1 << 32
    assert guest.msg_seqno[0] == 2 and guest.iv_reuse == []
    assert not guest.vmpck_disabled


def test_sequence_number_overflow_is_eio_without_wipe(guest: EmulatedSevGuest) -> None:
    guest.msg_seqno[0] = 0xFFFFFFFC
    assert report_call(guest)[1] == 0
    assert guest.msg_seqno[0] == 0xFFFFFFFE
    call, _, _ = report_call(guest)
    assert call.errno == errno.EIO and call.exitinfo2 == 0xFF
    assert not guest.vmpck_disabled
    assert guest.log[-1] == "sev-guest: request message sequence counter overflow"


def test_latency_uses_the_injected_sleep(guest: EmulatedSevGuest, clock: FakeClock) -> None:
    guest.firmware.faults.push(DeviceFault.latency(1.5), count=2)
    report_call(guest)
    key_call(guest, DerivedKeyRequest())
    report_call(guest)
    assert clock.sleeps == [1.5, 1.5]


def test_reload_with_another_vmpck_after_a_wipe(guest: EmulatedSevGuest) -> None:
    guest.firmware.faults.push(DeviceFault.wipe())
    assert report_call(guest)[0].errno == errno.ENOTTY
    guest.reload()
    with pytest.raises(FileNotFoundError):
        guest.open("/dev/sev-guest")  # "Empty VMPCK0 communication key"
    guest.reload(vmpck_id=2)
    call, status, _ = report_call(guest, vmpl=1)
    assert (call.errno, status) == (0, 0x16)
    call, status, report = report_call(guest, vmpl=2)
    assert status == 0 and AttestationReport.from_bytes(report).vmpl == 2
    assert guest.msg_seqno == [0, 0, 4, 0]


def test_concurrent_callers_are_serialized(guest: EmulatedSevGuest) -> None:
    errors: List[int] = []

    def worker() -> None:
        for _ in range(5):
            errors.append(report_call(guest)[0].errno)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [0] * 20 and guest.msg_seqno[0] == 40


def test_for_state_dir(state_dir: Path, clock: FakeClock) -> None:
    guest = EmulatedSevGuest.for_state_dir(
        state_dir, EmulatorConfig(product=Product.GENOA, kernel="6.2"), now=lambda: NOW,
        rsa_bits=2048, clock=clock, sleep=clock.sleep)
    assert guest.kernel == "6.2" and guest.sleep == clock.sleep
    assert report_call(guest)[1] == 0


# -- the real ioctl backend on top -------------------------------------------------------------


def test_the_ioctl_backend_runs_unchanged_on_the_model(guest: EmulatedSevGuest) -> None:
    from snpd.device.ioctl import IoctlDevice

    device = IoctlDevice(ops=guest)
    try:
        report = device.report(ReportRequest(DATA, 0))
        assert AttestationReport.from_bytes(report).report_data == DATA
        extended = device.extended_report(ReportRequest(DATA, 1))
        assert [e.kind for e in extended.certificates] == ["ark", "ask", "vcek", "crl"]
        request = DerivedKeyRequest.from_fields("vmrk", ["measurement"])
        assert device.derived_key(request) == guest.firmware.derived_key(request)[1]
    finally:
        device.close()
