"""configfs-tsm report model: attributes, generation counting, caching, errno."""

from __future__ import annotations

import datetime
import errno
import os
from pathlib import Path
from typing import Any, Dict, Iterator, Tuple

import pytest

from snpd.abi.certtable import parse_cert_table
from snpd.abi.report import AttestationReport
from snpd.device.base import ReportRequest
from snpd.emulator.configfs import DEFAULT_ROOT, TsmReportModel
from snpd.emulator.faults import DeviceFault
from snpd.emulator.firmware import Firmware
from snpd.emulator.kernel import EmulatedSevGuest
from snpd.emulator.launch import EmulatorConfig
from snpd.emulator.state import EmulatorState
from snpd.trust.certset import CertificateSet
from snpd.trust.roots import TrustRoots
from snpd.trust.verify import Verifier

NOW = datetime.datetime(2026, 6, 1, 12, 0, tzinfo=datetime.timezone.utc)
DATA = bytes(range(64))
ITEM = f"{DEFAULT_ROOT}/r1"
_STATE: Dict[str, Path] = {}


@pytest.fixture(scope="session")
def state_dir(tmp_path_factory: Any) -> Path:
    if "dir" not in _STATE:
        path = tmp_path_factory.mktemp("emu-configfs")
        EmulatorState.load_or_create(path, EmulatorConfig(), now=lambda: NOW, rsa_bits=2048)
        _STATE["dir"] = path
    return _STATE["dir"]


def make_model(state_dir: Path, **config: Any) -> TsmReportModel:
    state = EmulatorState.load_or_create(state_dir, EmulatorConfig(**config), now=lambda: NOW,
                                         rsa_bits=2048)
    return TsmReportModel(EmulatedSevGuest(Firmware(state, sleep=lambda s: None)))


@pytest.fixture
def model(state_dir: Path) -> TsmReportModel:
    m = make_model(state_dir)
    m.mkdir(ITEM)
    return m


def errno_of(fn: Any, *args: Any) -> int:
    with pytest.raises(OSError) as exc:
        fn(*args)
    return exc.value.errno or -1


def test_report_with_certificates(model: TsmReportModel) -> None:
    assert model.read(f"{ITEM}/provider") == b"sev_guest\n"
    assert model.read(f"{ITEM}/generation") == b"0\n"
    assert model.read(f"{ITEM}/privlevel_floor") == b"0\n"
    model.write(f"{ITEM}/inblob", DATA)
    model.write(f"{ITEM}/privlevel", b"2\n")
    assert model.read(f"{ITEM}/generation") == b"2\n"
    out = model.read(f"{ITEM}/outblob")
    aux = model.read(f"{ITEM}/auxblob")
    report = AttestationReport.from_bytes(out)
    assert report.report_data == DATA and report.vmpl == 2
    entries = parse_cert_table(aux)
    assert [e.kind for e in entries] == ["ark", "ask", "vcek", "crl"]
    # trimmed to the end of the last certificate, not padded to pages
    assert len(aux) == (len(entries) + 1) * 24 + sum(len(e.data) for e in entries)
    assert aux.endswith(entries[-1].data)
    state = model.guest.firmware.state
    certs = CertificateSet.from_kinds([(str(e.kind), e.data) for e in entries])
    assert Verifier(TrustRoots(explicit=(state.ark,)), clock=lambda: NOW).verify(out, certs)
    # one extended request produced both blobs
    assert model.guest.firmware.requests["ext"] == 1


def test_blobs_are_cached_per_generation(model: TsmReportModel) -> None:
    fw = model.guest.firmware
    model.write(f"{ITEM}/inblob", DATA)
    first = model.read(f"{ITEM}/outblob")
    assert model.read(f"{ITEM}/outblob") == first and model.read(f"{ITEM}/auxblob")
    assert fw.requests["report"] == 1 and model.generation(ITEM) == (1, 1)
    model.write(f"{ITEM}/inblob", DATA)  # same bytes, new generation: a new report
    second = model.read(f"{ITEM}/auxblob")
    assert second and fw.requests["report"] == 2 and model.generation(ITEM) == (2, 2)
    assert model.read(f"{ITEM}/outblob") != first  # freshly signed


def test_empty_host_table_gives_an_empty_auxblob(state_dir: Path) -> None:
    model = make_model(state_dir, host_certs="empty")
    model.mkdir(ITEM)
    model.write(f"{ITEM}/inblob", DATA)
    assert model.read(f"{ITEM}/auxblob") == b""
    assert len(model.read(f"{ITEM}/outblob")) == 1184


def test_inblob_rules(model: TsmReportModel) -> None:
    assert errno_of(model.read, f"{ITEM}/outblob") == errno.EINVAL  # never written
    assert errno_of(model.write, f"{ITEM}/inblob", bytes(65)) == errno.EFBIG
    model.write(f"{ITEM}/inblob", bytes(32))
    assert model.read(f"{ITEM}/generation") == b"1\n"
    assert errno_of(model.read, f"{ITEM}/outblob") == errno.EINVAL  # SNP wants exactly 64
    assert model.guest.firmware.requests["vmgexit"] == 0
    model.write(f"{ITEM}/inblob", DATA)
    assert len(model.read(f"{ITEM}/outblob")) == 1184


@pytest.mark.parametrize("value,code", [
    (b"4", errno.EINVAL), (b"-1", errno.EINVAL), (b"x", errno.EINVAL), (b"", errno.EINVAL),
    (b"99999999999", errno.ERANGE)])
def test_privlevel_bounds(model: TsmReportModel, value: bytes, code: int) -> None:
    assert errno_of(model.write, f"{ITEM}/privlevel", value) == code
    assert model.read(f"{ITEM}/generation") == b"0\n"


def test_privlevel_floor_is_the_vmpck(state_dir: Path) -> None:
    model = make_model(state_dir, guest_vmpl=1, vmpck_id=2)
    model.mkdir(ITEM)
    assert model.read(f"{ITEM}/privlevel_floor") == b"2\n"
    assert errno_of(model.write, f"{ITEM}/privlevel", b"1") == errno.EINVAL
    model.write(f"{ITEM}/privlevel", b"0x3")
    model.write(f"{ITEM}/inblob", DATA)
    assert AttestationReport.from_bytes(model.read(f"{ITEM}/outblob")).vmpl == 3
    # under an SVSM the service attributes appear
    assert model.exists(f"{ITEM}/service_provider") and model.exists(f"{ITEM}/manifestblob")


def test_firmware_status_maps_to_errno(state_dir: Path) -> None:
    model = make_model(state_dir, guest_vmpl=1, vmpck_id=1)
    model.mkdir(ITEM)
    model.write(f"{ITEM}/inblob", DATA)
    # privlevel defaults to 0, below this guest's VMPL: the firmware says 0x16
    assert errno_of(model.read, f"{ITEM}/outblob") == errno.EINVAL
    fw = model.guest.firmware
    fw.faults.push(DeviceFault.body_status(0x27))
    model.write(f"{ITEM}/privlevel", b"1")
    assert errno_of(model.read, f"{ITEM}/outblob") == errno.EINVAL
    fw.faults.push(DeviceFault.body_status(0x17))
    assert errno_of(model.read, f"{ITEM}/auxblob") == errno.ENXIO
    assert len(model.read(f"{ITEM}/outblob")) == 1184  # a failed read regenerates next time


def test_wiped_vmpck_gives_enotty(model: TsmReportModel) -> None:
    model.write(f"{ITEM}/inblob", DATA)
    model.guest.firmware.faults.push(DeviceFault.fw_error(0x17))
    assert errno_of(model.read, f"{ITEM}/outblob") == errno.EIO
    assert model.guest.vmpck_disabled
    assert errno_of(model.read, f"{ITEM}/outblob") == errno.ENOTTY
    model.guest.firmware.faults.push(DeviceFault.busy(), count=None)
    assert errno_of(model.read, f"{ITEM}/auxblob") == errno.ENOTTY


def test_shares_the_driver_with_the_ioctl_path(model: TsmReportModel) -> None:
    model.write(f"{ITEM}/inblob", DATA)
    model.read(f"{ITEM}/outblob")
    assert model.guest.msg_seqno[0] == 2


def test_generation_wraparound_is_ebusy(model: TsmReportModel) -> None:
    model.set_generation(ITEM, write=(1 << 64) - 2, read=(1 << 64) - 1)
    assert errno_of(model.write, f"{ITEM}/inblob", DATA) == errno.EBUSY
    model.set_generation(ITEM, write=(1 << 64) - 1, read=5)
    model.write(f"{ITEM}/inblob", DATA)
    assert model.read(f"{ITEM}/generation") == b"0\n"


def test_directory_operations(model: TsmReportModel) -> None:
    assert model.exists(DEFAULT_ROOT) and model.exists("/sys/kernel/config/tsm")
    assert model.exists(ITEM) and model.exists(f"{ITEM}/inblob")
    assert not model.exists(f"{ITEM}/service_provider")  # VMPL 0: no SVSM attributes
    assert not model.exists(f"{DEFAULT_ROOT}/r2")
    assert errno_of(model.mkdir, ITEM) == errno.EEXIST
    assert errno_of(model.mkdir, f"{ITEM}/sub") == errno.EPERM
    assert errno_of(model.mkdir, f"{DEFAULT_ROOT}/no/sub") == errno.ENOENT
    assert errno_of(model.mkdir, "/elsewhere/r1") == errno.ENOENT
    assert errno_of(model.read, f"{ITEM}/inblob") == errno.EACCES
    assert errno_of(model.read, f"{ITEM}/privlevel") == errno.EACCES
    assert errno_of(model.write, f"{ITEM}/outblob", b"x") == errno.EACCES
    assert errno_of(model.write, f"{ITEM}/provider", b"x") == errno.EACCES
    assert errno_of(model.read, f"{ITEM}/nosuch") == errno.ENOENT
    assert errno_of(model.read, ITEM) == errno.EISDIR
    assert errno_of(model.rmdir, f"{ITEM}/inblob") == errno.ENOTDIR
    assert errno_of(model.rmdir, DEFAULT_ROOT) == errno.EPERM
    model.rmdir(ITEM)
    assert not model.exists(ITEM)
    assert errno_of(model.rmdir, ITEM) == errno.ENOENT
    assert errno_of(model.read, f"{ITEM}/provider") == errno.ENOENT


def test_items_are_independent(model: TsmReportModel) -> None:
    other = f"{DEFAULT_ROOT}/r2"
    model.mkdir(other)
    model.write(f"{ITEM}/inblob", DATA)
    model.write(f"{other}/inblob", bytes(64))
    model.write(f"{other}/privlevel", b"1")
    assert model.read(f"{ITEM}/generation") == b"1\n"
    assert model.read(f"{other}/generation") == b"2\n"
    assert AttestationReport.from_bytes(model.read(f"{ITEM}/outblob")).report_data == DATA
    assert AttestationReport.from_bytes(model.read(f"{other}/outblob")).vmpl == 1


def test_svsm_provider_is_not_emulated(state_dir: Path) -> None:
    model = make_model(state_dir, guest_vmpl=1)
    model.mkdir(ITEM)
    model.write(f"{ITEM}/privlevel", b"1")
    model.write(f"{ITEM}/inblob", DATA)
    model.write(f"{ITEM}/service_provider", b"tpm\n")
    assert errno_of(model.read, f"{ITEM}/outblob") == errno.EINVAL
    model.write(f"{ITEM}/service_provider", b"svsm\n")
    assert errno_of(model.read, f"{ITEM}/outblob") == errno.EOPNOTSUPP
    assert errno_of(model.write, f"{ITEM}/service_guid", b"not-a-guid") == errno.EINVAL


def test_the_configfs_backend_runs_on_the_model(model: TsmReportModel) -> None:
    from snpd.device.configfs import ConfigfsDevice

    device = ConfigfsDevice(fs=model)
    report = device.extended_report(ReportRequest(DATA, 0))
    assert AttestationReport.from_bytes(report.report).report_data == DATA
    assert [e.kind for e in report.certificates] == ["ark", "ask", "vcek", "crl"]
    assert model.exists(ITEM) and len(model._items) == 1  # its own directory is gone again


# -- through a FUSE mount: the backend's plain os calls ------------------------------------


@pytest.fixture
def fuse_root(tmp_path: Path, state_dir: Path) -> Iterator[Tuple[str, TsmReportModel]]:
    try:
        import fuse_tsm  # type: ignore[import-not-found, unused-ignore]
    except ImportError as exc:
        pytest.fail(f"fuse_tsm: {exc} (scripts/test installs fusepy)")
    model = make_model(state_dir)
    mountpoint = tmp_path / "tsm"
    mountpoint.mkdir()
    try:
        with fuse_tsm.mounted(model, str(mountpoint)) as root:
            yield root, model
    except fuse_tsm.Unavailable as exc:
        pytest.fail(f"{exc} (scripts/test installs libfuse2; FUSE needs root and /dev/fuse)")


def test_the_configfs_backend_over_fuse(fuse_root: Tuple[str, TsmReportModel]) -> None:
    from snpd.device.configfs import ConfigfsDevice

    root, model = fuse_root
    device = ConfigfsDevice(root)  # OsFsOps: os.mkdir, os.open/read/write, os.rmdir
    report = device.extended_report(ReportRequest(DATA, 1))
    parsed = AttestationReport.from_bytes(report.report)
    assert parsed.report_data == DATA and parsed.vmpl == 1
    assert [e.kind for e in report.certificates] == ["ark", "ask", "vcek", "crl"]
    assert os.listdir(root) == []  # the backend removed its directory
    assert model.guest.firmware.requests["ext"] == 1


def test_configfs_errors_over_fuse(fuse_root: Tuple[str, TsmReportModel]) -> None:
    root, _model = fuse_root
    item = os.path.join(root, "r1")
    os.mkdir(item)
    assert "inblob" in os.listdir(item)
    fd = os.open(os.path.join(item, "privlevel"), os.O_WRONLY)
    try:
        with pytest.raises(OSError) as exc:
            os.write(fd, b"7")  # text attributes fail in write(2)
        assert exc.value.errno == errno.EINVAL
    finally:
        os.close(fd)
    assert errno_of(Path(item, "outblob").read_bytes) == errno.EINVAL  # no inblob yet
    assert errno_of(os.open, os.path.join(item, "inblob"), os.O_RDONLY) == errno.EACCES
    with open(os.path.join(item, "inblob"), "wb", buffering=0) as f:
        f.write(DATA)
    with open(os.path.join(item, "generation"), "rb") as f:
        assert f.read() == b"1\n"
    with open(os.path.join(item, "outblob"), "rb") as f:
        assert AttestationReport.from_bytes(f.read()).report_data == DATA
    os.rmdir(item)
    assert not os.path.exists(item)
