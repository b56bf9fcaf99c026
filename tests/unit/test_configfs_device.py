"""The configfs-tsm backend against an in-test model of the kernel's report directories."""

from __future__ import annotations

import errno
import logging
import os
import posixpath
import struct
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple, Type

import pytest

from snpd.abi.certtable import ARK_GUID, ASK_GUID, VLEK_GUID, build_cert_table
from snpd.abi.report import parse_report
from snpd.abi.uapi import DerivedKeyRequest
from snpd.device.base import Device, ReportRequest
from snpd.device.configfs import ConfigfsDevice, OsFsOps
from snpd.errors import (
    Busy,
    CertTableError,
    DeviceError,
    DeviceUnavailable,
    InvalidArgument,
    NotSupported,
    SnpdError,
    Timeout,
    VmpckBadMessage,
    VmpckDisabled,
    VmpckLost,
    VmpckTimedOut,
)
from snpd.trust.certset import CertificateSet

ROOT = "/sys/kernel/config/tsm/report"
DATA = bytes(range(64))


def _oserror(code: int, path: str) -> OSError:
    return OSError(code, os.strerror(code), path)


class FakeTsm:
    """A dict model of configfs-tsm (docs/reference/abi.md §3.2): per-directory attributes, the
    write generation, report generation on the first blob read, fault injection."""

    def __init__(self, base_report: bytes, *, provider: bytes = b"sev_guest\n",
                 floor: Optional[int] = 0, aux: Optional[bytes] = None) -> None:
        self.base_report = base_report
        self.provider = provider
        self.floor = floor  # None: no privlevel_floor attribute
        self.aux = aux  # None: no auxblob attribute
        self.root_exists = True
        self.dirs: Dict[str, Dict[str, Any]] = {}
        self.created: List[str] = []
        self.log: List[Tuple[str, str]] = []
        self.faults: Dict[Tuple[str, str], int] = {}
        self.foreign_writes = 0  # requests during which another writer bumps the generation
        self.outblob: Optional[bytes] = None  # override the generated report

    def _state(self, path: str) -> Tuple[Dict[str, Any], str]:
        entry, attribute = posixpath.split(path)
        if entry not in self.dirs:
            raise _oserror(errno.ENOENT, path)
        return self.dirs[entry], attribute

    def _fault(self, op: str, attribute: str, path: str) -> None:
        self.log.append((op, attribute))
        code = self.faults.get((op, attribute))
        if code is not None:
            raise _oserror(code, path)

    def mkdir(self, path: str) -> None:
        parent = posixpath.dirname(path)
        if parent != ROOT or not self.root_exists:
            raise _oserror(errno.ENOENT, path)
        self._fault("mkdir", "", path)
        if path in self.dirs:
            raise _oserror(errno.EEXIST, path)
        self.dirs[path] = {"write_gen": 0, "read_gen": None, "privlevel": 0, "inblob": None}
        self.created.append(path)

    def rmdir(self, path: str) -> None:
        self._fault("rmdir", "", path)
        if path not in self.dirs:
            raise _oserror(errno.ENOENT, path)
        del self.dirs[path]

    def exists(self, path: str) -> bool:
        if path in self.dirs or path == ROOT:
            return True
        entry, attribute = posixpath.split(path)
        if entry not in self.dirs:
            return False
        if attribute == "privlevel_floor":
            return self.floor is not None
        if attribute == "auxblob":
            return self.aux is not None
        return attribute in ("provider", "generation", "privlevel", "inblob", "outblob")

    def write(self, path: str, data: bytes) -> None:
        state, attribute = self._state(path)
        self._fault("write", attribute, path)
        if attribute == "privlevel":
            level = int(data)
            if level > 3 or level < (self.floor or 0):
                raise _oserror(errno.EINVAL, path)
            state["privlevel"] = level
        elif attribute == "inblob":
            if len(data) > 64:
                raise _oserror(errno.EINVAL, path)
            state["inblob"] = bytes(data)
        else:
            raise _oserror(errno.EACCES, path)
        state["write_gen"] += 1

    def read(self, path: str) -> bytes:
        state, attribute = self._state(path)
        self._fault("read", attribute, path)
        if attribute == "provider":
            return self.provider
        if attribute == "generation":
            return b"%d\n" % state["write_gen"]
        if attribute == "privlevel_floor" and self.floor is not None:
            return b"%d\n" % self.floor
        if attribute in ("outblob", "auxblob") and (attribute == "outblob" or self.aux is not None):
            if state["inblob"] is None or len(state["inblob"]) != 64:
                raise _oserror(errno.EINVAL, path)
            if state["read_gen"] != state["write_gen"]:
                report = bytearray(self.base_report)
                struct.pack_into("<I", report, 0x30, state["privlevel"])
                report[0x50:0x90] = state["inblob"]
                state["outblob"] = self.outblob if self.outblob is not None else bytes(report)
                state["read_gen"] = state["write_gen"]
                if self.foreign_writes:
                    self.foreign_writes -= 1
                    state["write_gen"] += 1  # someone else wrote inblob meanwhile
            return state["outblob"] if attribute == "outblob" else self.aux or b""
        raise _oserror(errno.ENOENT, path)


@pytest.fixture
def base_report(case_dir: Callable[[Any], Path]) -> bytes:
    return (case_dir("milan-v3-vlek") / "report.bin").read_bytes()


@pytest.fixture
def fake(base_report: bytes) -> FakeTsm:
    return FakeTsm(base_report)


def device(fake: FakeTsm, **kw: Any) -> ConfigfsDevice:
    return ConfigfsDevice(ROOT, fs=fake, **kw)


def test_is_a_device(fake: FakeTsm) -> None:
    dev: Device = device(fake)
    assert dev.name == "configfs"


def test_report(fake: FakeTsm, base_report: bytes) -> None:
    raw = device(fake).report(ReportRequest(DATA, 1))
    report = parse_report(raw)
    assert report.report_data == DATA and report.vmpl == 1
    assert raw[0x90:] == base_report[0x90:]
    assert fake.dirs == {}
    assert len(fake.created) == 1
    assert posixpath.basename(fake.created[0]).startswith(f"snpd-{os.getpid()}-")
    writes = [a for op, a in fake.log if op == "write"]
    assert writes == ["privlevel", "inblob"]
    assert ("read", "auxblob") not in fake.log


def test_directories_are_unique(fake: FakeTsm) -> None:
    dev = device(fake)
    for _ in range(3):
        dev.report(ReportRequest(DATA, 0))
    assert len(set(fake.created)) == 3 and fake.dirs == {}


def test_extended_report_with_host_certificates(
        fake: FakeTsm, case_dir: Callable[[Any], Path]) -> None:
    d = case_dir("milan-v3-vlek")
    fake.aux = build_cert_table([(ARK_GUID, (d / "ark.pem").read_bytes()),
                                 (ASK_GUID, (d / "asvk.pem").read_bytes()),
                                 (VLEK_GUID, (d / "vlek.der").read_bytes())])
    ext = device(fake).extended_report(ReportRequest(DATA, 0))
    assert parse_report(ext.report).report_data == DATA
    assert [c.kind for c in ext.certificates] == ["ark", "ask", "vlek"]
    certs = CertificateSet.from_table(ext.certificates)
    assert certs.asvk is not None and certs.vlek is not None
    assert fake.dirs == {}


@pytest.mark.parametrize("aux", [None, b"", bytes(24)], ids=["absent", "empty", "terminator"])
def test_extended_report_without_certificates(fake: FakeTsm, aux: Optional[bytes]) -> None:
    fake.aux = aux
    ext = device(fake).extended_report(ReportRequest(DATA, 0))
    assert ext.certificates == () and len(ext.report) == 1184


def test_malformed_auxblob(fake: FakeTsm) -> None:
    fake.aux = struct.pack("<16sII", ARK_GUID.bytes, 4000, 10) + bytes(24)
    with pytest.raises(CertTableError, match=r"entry 0 .ark.: offset 4000"):
        device(fake).extended_report(ReportRequest(DATA, 0))
    assert fake.dirs == {}


def test_wrong_provider(fake: FakeTsm) -> None:
    fake.provider = b"tdx_guest\n"
    dev = device(fake)
    with pytest.raises(NotSupported, match="'tdx_guest'"):
        dev.report(ReportRequest(DATA, 0))
    assert fake.dirs == {} and dev.describe()["provider"] == "tdx_guest"
    assert not [a for op, a in fake.log if op == "write"]


def test_generation_race_once_is_retried(fake: FakeTsm, caplog: pytest.LogCaptureFixture,
                                         ) -> None:
    fake.foreign_writes = 1
    with caplog.at_level(logging.WARNING, logger="snpd.device.configfs"):
        raw = device(fake).report(ReportRequest(DATA, 0))
    assert parse_report(raw).report_data == DATA
    assert len(fake.created) == 2 and fake.dirs == {}
    assert "generation changed" in caplog.text


def test_generation_race_persists(fake: FakeTsm) -> None:
    fake.foreign_writes = 5
    with pytest.raises(Busy, match="generation"):
        device(fake).extended_report(ReportRequest(DATA, 0))
    assert len(fake.created) == 2 and fake.dirs == {}


@pytest.mark.parametrize("op, attribute, code, error, message", [
    ("mkdir", "", errno.EACCES, DeviceUnavailable, "permission denied.*root"),
    ("mkdir", "", errno.EPERM, DeviceUnavailable, "permission denied"),
    ("mkdir", "", errno.ENOMEM, DeviceError, "ENOMEM"),
    ("read", "provider", errno.EACCES, DeviceUnavailable, "permission denied"),
    ("write", "privlevel", errno.EPERM, DeviceUnavailable, "permission denied"),
    ("write", "privlevel", errno.EINVAL, InvalidArgument, "privlevel: EINVAL"),
    ("write", "inblob", errno.EBUSY, Busy, "EBUSY"),
    ("write", "inblob", errno.EFAULT, DeviceError, "EFAULT"),
    ("read", "outblob", errno.EINVAL, InvalidArgument, "firmware rejected.*VMPL"),
    ("read", "outblob", errno.ENOTTY, VmpckDisabled, "VMPCK.*reboot"),
    ("read", "outblob", errno.EBUSY, Busy, "retry later"),
    ("read", "outblob", errno.ETIMEDOUT, VmpckTimedOut, "60 s"),
    ("read", "outblob", errno.EBADMSG, VmpckBadMessage, "EBADMSG"),
    ("read", "outblob", errno.ENXIO, DeviceError, "ENXIO.*error status"),
    ("read", "outblob", errno.EIO, DeviceError, "EIO.*kernel log"),
    ("read", "outblob", errno.ENOMEM, DeviceError, "ENOMEM"),
    ("read", "auxblob", errno.ENOTTY, VmpckDisabled, "VMPCK"),
    ("read", "generation", errno.EIO, DeviceError, "generation failed: EIO"),
])
def test_errno_mapping(fake: FakeTsm, op: str, attribute: str, code: int,
                       error: Type[SnpdError], message: str) -> None:
    fake.aux = bytes(24)
    fake.faults[(op, attribute)] = code
    with pytest.raises(error, match=message) as info:
        device(fake).extended_report(ReportRequest(DATA, 0))
    assert type(info.value) is error
    if issubclass(error, DeviceError):
        assert isinstance(info.value, DeviceError) and info.value.errno == code
    assert isinstance(info.value.__cause__, OSError)
    assert fake.dirs == {}
    # A lost key travels under the kind this errno always had: the wire is unchanged.
    assert isinstance(info.value, VmpckLost) == (code in (errno.ETIMEDOUT, errno.EBADMSG))
    if code == errno.ETIMEDOUT:
        assert info.value.kind == "Timeout" and isinstance(info.value, Timeout)
    if code == errno.EBADMSG:
        assert info.value.kind == "DeviceError" and info.value.errno == code


def test_missing_root(fake: FakeTsm) -> None:
    fake.root_exists = False
    with pytest.raises(DeviceUnavailable, match=f"configfs-tsm not available at {ROOT}"):
        device(fake).report(ReportRequest(DATA, 0))


def test_missing_root_on_the_real_filesystem(tmp_path: Path) -> None:
    dev = ConfigfsDevice(str(tmp_path / "tsm" / "report"))
    with pytest.raises(DeviceUnavailable, match="not available at"):
        dev.report(ReportRequest(DATA, 0))


def test_privlevel_below_the_kernel_floor(fake: FakeTsm) -> None:
    fake.floor = 2
    dev = device(fake)
    with pytest.raises(InvalidArgument, match="VMPL 1 is below the privlevel floor 2"):
        dev.report(ReportRequest(DATA, 1))
    assert fake.dirs == {}
    assert not [a for op, a in fake.log if op == "write"]
    assert dev.describe()["privlevel_floor"] == 2
    assert parse_report(dev.report(ReportRequest(DATA, 2))).vmpl == 2


def test_configured_floor_without_the_attribute(fake: FakeTsm) -> None:
    fake.floor = None
    dev = device(fake, privlevel_floor=1)
    with pytest.raises(InvalidArgument, match="below the privlevel floor 1"):
        dev.report(ReportRequest(DATA, 0))
    assert parse_report(dev.report(ReportRequest(DATA, 3))).vmpl == 3
    assert fake.dirs == {}


def test_configured_floor_is_validated() -> None:
    with pytest.raises(InvalidArgument, match="privlevel_floor 4"):
        ConfigfsDevice(ROOT, privlevel_floor=4)


def test_short_outblob(fake: FakeTsm) -> None:
    fake.outblob = bytes(1000)
    with pytest.raises(DeviceError, match="1000 bytes, expected an 1184-byte"):
        device(fake).report(ReportRequest(DATA, 0))
    assert fake.dirs == {}


def test_garbled_generation(fake: FakeTsm) -> None:
    original = fake.read

    def read(path: str) -> bytes:
        return b"soon\n" if path.endswith("/generation") else original(path)

    fake.read = read  # type: ignore[method-assign]
    with pytest.raises(DeviceError, match="generation reads 'soon'"):
        device(fake).report(ReportRequest(DATA, 0))
    assert fake.dirs == {}


def test_rmdir_failure_does_not_lose_the_report(fake: FakeTsm,
                                                caplog: pytest.LogCaptureFixture) -> None:
    fake.faults[("rmdir", "")] = errno.EBUSY
    with caplog.at_level(logging.WARNING, logger="snpd.device.configfs"):
        raw = device(fake).report(ReportRequest(DATA, 0))
    assert len(raw) == 1184
    assert "could not remove" in caplog.text


def test_rmdir_failure_does_not_mask_the_error(fake: FakeTsm) -> None:
    fake.faults[("rmdir", "")] = errno.EBUSY
    fake.faults[("read", "outblob")] = errno.ENOTTY
    with pytest.raises(VmpckDisabled):
        device(fake).report(ReportRequest(DATA, 0))


@pytest.mark.parametrize("data, vmpl", [("text", 0), (DATA + b"x", 0), (DATA, 4), (DATA, -1),
                                        (DATA, True)])
def test_bad_requests_touch_nothing(fake: FakeTsm, data: bytes, vmpl: int) -> None:
    with pytest.raises(InvalidArgument):
        device(fake).report(ReportRequest(data, vmpl))
    assert fake.created == []


def test_derived_key_not_supported(fake: FakeTsm) -> None:
    with pytest.raises(NotSupported, match="ioctl backend"):
        device(fake).derived_key(DerivedKeyRequest())
    assert fake.created == []


def test_describe(fake: FakeTsm) -> None:
    dev = device(fake)
    assert dev.describe() == {"backend": "configfs", "root": ROOT, "provider": None,
                              "privlevel_floor": None}
    dev.report(ReportRequest(DATA, 0))
    assert dev.describe() == {"backend": "configfs", "root": ROOT, "provider": "sev_guest",
                              "privlevel_floor": 0}
    dev.close()


# -- the default FsOps on a real filesystem ---------------------------------------------


def test_os_fs_ops(tmp_path: Path) -> None:
    fs = OsFsOps(max_read=100)
    entry = str(tmp_path / "entry")
    fs.mkdir(entry)
    assert fs.exists(entry)
    attribute = os.path.join(entry, "inblob")
    Path(attribute).touch()
    fs.write(attribute, DATA)
    assert fs.read(attribute) == DATA
    fs.write(attribute, bytes(101))
    with pytest.raises(OSError) as info:
        fs.read(attribute)
    assert info.value.errno == errno.EFBIG
    with pytest.raises(OSError) as info:
        fs.write(os.path.join(entry, "missing"), b"0")  # O_WRONLY only: never creates
    assert info.value.errno == errno.ENOENT
    os.unlink(attribute)
    fs.rmdir(entry)
    assert not fs.exists(entry)
