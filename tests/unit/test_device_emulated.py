"""The real backends on the emulator: every error path gives its typed error.

The ioctl backend's own marshalling runs against the emulated sev-guest driver
(real ctypes buffers and pointers); the configfs backend runs against the
configfs-tsm model, directly and mounted with FUSE.
"""

from __future__ import annotations

import datetime
from pathlib import Path
from typing import Any, Callable, Iterator, List

import pytest

from snpd.abi.product import Product
from snpd.abi.report import parse_report
from snpd.abi.uapi import DerivedKeyRequest, RootKey
from snpd.device.base import ReportRequest
from snpd.device.configfs import ConfigfsDevice
from snpd.device.ioctl import IoctlDevice
from snpd.emulator.configfs import TsmReportModel
from snpd.emulator.faults import DeviceFault
from snpd.emulator.kernel import EmulatedSevGuest
from snpd.emulator.launch import EmulatorConfig
from snpd.errors import (
    DeviceError,
    DeviceUnavailable,
    InvalidArgument,
    NotSupported,
    Timeout,
    VmpckBadMessage,
    VmpckDisabled,
    VmpckLost,
    VmpckTimedOut,
)
from snpd.trust.certset import CertificateSet
from snpd.trust.roots import TrustRoots
from snpd.trust.verify import Verifier

NOW = datetime.datetime(2026, 6, 1, tzinfo=datetime.timezone.utc)
DATA = bytes(range(64))


class FakeTime:
    """A clock that sleep() advances: the kernel's 2 s / 60 s throttle loop without waiting."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.slept: List[float] = []

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds


@pytest.fixture(scope="module")
def state_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("emulator")
    EmulatedSevGuest.for_state_dir(path, EmulatorConfig(), now=lambda: NOW, rsa_bits=2048)
    return path


def guest_for(state_dir: Path, **config: Any) -> Callable[..., EmulatedSevGuest]:
    def make(**kw: Any) -> EmulatedSevGuest:
        time = FakeTime()
        kw.setdefault("clock", time.clock)
        kw.setdefault("sleep", time.sleep)
        return EmulatedSevGuest.for_state_dir(state_dir, EmulatorConfig(**config),
                                              now=lambda: NOW, rsa_bits=2048, **kw)
    return make


@pytest.fixture
def guest(state_dir: Path) -> EmulatedSevGuest:
    return guest_for(state_dir)()


def test_report_carries_report_data_and_verifies(guest: EmulatedSevGuest) -> None:
    device = IoctlDevice(ops=guest)
    raw = device.report(ReportRequest(DATA, 0))
    report = parse_report(raw)
    assert report.report_data == DATA and report.vmpl == 0
    state = guest.firmware.state
    verdict = Verifier(TrustRoots(explicit=(state.ark,))).verify(raw, state.certificates(),
                                                                 at=NOW)
    assert verdict.valid, verdict.failures
    assert not Verifier().verify(raw, state.certificates(), at=NOW)  # never AMD-trusted


def test_extended_report_certificate_table(guest: EmulatedSevGuest) -> None:
    extended = IoctlDevice(ops=guest).extended_report(ReportRequest(DATA, 0))
    certs = CertificateSet.from_table(extended.certificates)
    assert certs.ark is not None and certs.ask is not None and certs.vcek is not None
    assert certs.crl is not None


def test_extended_report_grows_its_buffer_once(state_dir: Path) -> None:
    guest = guest_for(state_dir)()
    guest.firmware.faults.push(DeviceFault.invalid_len(3), count=1)
    device = IoctlDevice(ops=guest)
    extended = device.extended_report(ReportRequest(DATA, 0))
    assert parse_report(extended.report).report_data == DATA
    assert not guest.vmpck_disabled  # INVALID_LEN never costs the key


def test_empty_host_table(state_dir: Path) -> None:
    guest = guest_for(state_dir, host_certs="empty")()
    assert IoctlDevice(ops=guest).extended_report(ReportRequest(DATA, 0)).certificates == ()


def test_vmpl_below_the_guests_own(state_dir: Path) -> None:
    guest = guest_for(state_dir, guest_vmpl=2)()
    device = IoctlDevice(ops=guest)
    with pytest.raises(InvalidArgument, match="INVALID_PARAM"):
        device.report(ReportRequest(DATA, 1))
    assert parse_report(device.report(ReportRequest(DATA, 2))).vmpl == 2
    assert not guest.vmpck_disabled


def test_caller_errors_are_refused_before_the_firmware(guest: EmulatedSevGuest) -> None:
    """A request is checked where it is made (ReportRequest), so no device call ever
    carries a bad one: nothing reaches the firmware."""
    with pytest.raises(InvalidArgument, match="65 bytes"):
        ReportRequest(DATA + b"x", 0)
    with pytest.raises(InvalidArgument, match="vmpl 7"):
        ReportRequest(DATA, 7)
    with pytest.raises(InvalidArgument):
        DerivedKeyRequest(guest_field_select=1 << 6)


@pytest.mark.parametrize("fault, error, wiped", [
    (DeviceFault.tamper(), VmpckBadMessage, True),
    (DeviceFault.host_error(), DeviceError, True),
    (DeviceFault.fw_error(0x17), DeviceError, True),
    (DeviceFault.body_status(0x16), InvalidArgument, False),
    (DeviceFault.wipe(), VmpckDisabled, True),
])
def test_fault_gives_its_typed_error(state_dir: Path, fault: DeviceFault, error: type,
                                     wiped: bool) -> None:
    guest = guest_for(state_dir)()
    device = IoctlDevice(ops=guest)
    guest.firmware.faults.push(fault, count=1)
    with pytest.raises(error) as info:
        device.report(ReportRequest(DATA, 0))
    if isinstance(info.value, DeviceError):
        assert info.value.errno is not None
    # Only the errno that proves the wipe says so; EIO leaves the broker to confirm it.
    assert isinstance(info.value, VmpckLost) is (error is VmpckBadMessage)
    assert guest.vmpck_disabled is wiped
    if wiped:
        served = sum(guest.firmware.requests.values())
        for call in (lambda: device.report(ReportRequest(DATA, 0)),
                     lambda: device.extended_report(ReportRequest(DATA, 0)),
                     lambda: device.derived_key(DerivedKeyRequest())):
            with pytest.raises(VmpckDisabled, match=r"[Rr]eboot"):
                call()
        assert sum(guest.firmware.requests.values()) == served  # failed fast, no firmware
    else:
        assert parse_report(device.report(ReportRequest(DATA, 0))).report_data == DATA


def test_host_busy_burst_is_absorbed_by_the_kernel(state_dir: Path) -> None:
    time = FakeTime()
    guest = guest_for(state_dir)(clock=time.clock, sleep=time.sleep)
    guest.firmware.faults.push(DeviceFault.busy(), count=5)
    assert parse_report(IoctlDevice(ops=guest).report(ReportRequest(DATA, 0))).report_data == DATA
    assert not guest.vmpck_disabled


def test_host_busy_past_60s_times_out_and_wipes(state_dir: Path) -> None:
    time = FakeTime()
    guest = guest_for(state_dir)(clock=time.clock, sleep=time.sleep)
    guest.firmware.faults.push(DeviceFault.busy(), count=None)
    device = IoctlDevice(ops=guest)
    with pytest.raises(VmpckTimedOut, match="60 s") as info:
        device.report(ReportRequest(DATA, 0))
    assert isinstance(info.value, Timeout) and info.value.kind == "Timeout"
    guest.firmware.faults.clear()
    with pytest.raises(VmpckDisabled):
        device.report(ReportRequest(DATA, 0))


def test_host_busy_on_an_old_kernel_is_a_device_error(state_dir: Path) -> None:
    guest = guest_for(state_dir, kernel="6.2")()
    guest.firmware.faults.push(DeviceFault.busy(), count=1)
    device = IoctlDevice(ops=guest)
    with pytest.raises(DeviceError, match="BUSY"):
        device.report(ReportRequest(DATA, 0))
    with pytest.raises(VmpckDisabled):
        device.report(ReportRequest(DATA, 0))


def test_missing_and_forbidden_device(state_dir: Path) -> None:
    for device_state, hint in (("absent", "no such device"), ("denied", "permission denied")):
        guest = guest_for(state_dir, device=device_state)()
        with pytest.raises(DeviceUnavailable, match=hint):
            IoctlDevice(ops=guest).report(ReportRequest(DATA, 0))


def test_derived_keys(state_dir: Path) -> None:
    device = IoctlDevice(ops=guest_for(state_dir)())
    vcek = device.derived_key(DerivedKeyRequest(RootKey.VCEK, 0b1001))
    assert len(vcek) == 32
    assert device.derived_key(DerivedKeyRequest(RootKey.VCEK, 0b1001)) == vcek
    assert device.derived_key(DerivedKeyRequest(RootKey.VMRK, 0b1001)) != vcek
    with pytest.raises(InvalidArgument, match="key request"):
        device.derived_key(DerivedKeyRequest(RootKey.VCEK, 0, tcb_version=(1 << 64) - 1))


# -- configfs-tsm ---------------------------------------------------------------------------


def test_configfs_backend_on_the_model(state_dir: Path) -> None:
    guest = guest_for(state_dir)()
    model = TsmReportModel(guest)
    device = ConfigfsDevice(fs=model)
    assert parse_report(device.report(ReportRequest(DATA, 0))).report_data == DATA
    certs = CertificateSet.from_table(device.extended_report(ReportRequest(DATA, 0)).certificates)
    assert certs.vcek is not None
    with pytest.raises(NotSupported, match="ioctl"):
        device.derived_key(DerivedKeyRequest())
    guest.firmware.faults.push(DeviceFault.tamper(), count=1)
    with pytest.raises(VmpckBadMessage) as info:
        device.report(ReportRequest(DATA, 0))
    assert info.value.kind == "DeviceError"
    with pytest.raises(VmpckDisabled):
        device.report(ReportRequest(DATA, 0))


def test_configfs_backend_below_the_floor(state_dir: Path) -> None:
    device = ConfigfsDevice(fs=TsmReportModel(guest_for(state_dir, guest_vmpl=1)()))
    with pytest.raises(InvalidArgument):
        device.report(ReportRequest(DATA, 0))
    assert parse_report(device.report(ReportRequest(DATA, 1))).vmpl == 1


@pytest.fixture
def fuse_root(state_dir: Path, tmp_path: Path) -> Iterator[str]:
    import fuse_tsm  # type: ignore[import-not-found]

    mountpoint = tmp_path / "tsm"
    mountpoint.mkdir()
    model = TsmReportModel(guest_for(state_dir)(), root="/")
    try:
        with fuse_tsm.mounted(model, str(mountpoint)) as root:
            yield root
    except fuse_tsm.Unavailable as exc:  # pragma: no cover - scripts/test installs FUSE
        pytest.fail(f"FUSE unavailable: {exc}")


def test_configfs_backend_with_plain_os_calls_over_fuse(fuse_root: str) -> None:
    device = ConfigfsDevice(fuse_root)
    assert parse_report(device.report(ReportRequest(DATA, 0))).report_data == DATA
    extended = device.extended_report(ReportRequest(DATA, 0))
    assert CertificateSet.from_table(extended.certificates).ark
    assert Product.GENOA is parse_report(device.report(ReportRequest(DATA, 0))).cpuid_product
