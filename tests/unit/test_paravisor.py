"""The emulated Azure paravisor (issue 14 item 4): the HCL report it builds, and (over a
real swtpm) the vTPM proxy that keeps it at NV 0x01400001 and refreshes it on a write
to 0x01400002."""

from __future__ import annotations

import base64
import dataclasses
import datetime
import hashlib
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterator, Optional, Tuple

import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from snpd.abi import hcl, tpm
from snpd.abi import tpm2_commands as tc
from snpd.device.azure import AzureVtpmDevice
from snpd.device.base import ReportRequest
from snpd.device.tpm import Tpm, open_tpm
from snpd.emulator import hcl as emuhcl
from snpd.emulator.firmware import Firmware
from snpd.emulator.launch import EmulatorConfig
from snpd.emulator.paravisor import HCL_NV_SIZE, Paravisor, Provisioned, provision
from snpd.emulator.state import EmulatorState
from snpd.emulator.swtpm import SocketChannel, SwtpmProcess
from snpd.errors import Busy, DeviceError, DeviceUnavailable, EvidenceFormatError, InvalidArgument
from snpd.trust.azure import verify_azure_evidence
from snpd.trust.certset import CertificateSet
from snpd.trust.result import Status
from snpd.trust.roots import AMD_ROOTS
from snpd.trust.verify import Verifier

REPO = Path(__file__).resolve().parents[2]
# Without swtpm these fail (conftest.swtpm_installed): scripts/test installs it.
needs_swtpm = pytest.mark.usefixtures("swtpm_installed")


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc)


@pytest.fixture(scope="module")
def state(tmp_path_factory: Any) -> EmulatorState:
    path = tmp_path_factory.mktemp("paravisor-emu")
    return EmulatorState.load_or_create(path, EmulatorConfig(), now=_now, rsa_bits=2048)


@pytest.fixture(scope="module")
def ak_numbers() -> Tuple[int, int]:
    numbers = rsa.generate_private_key(public_exponent=65537,
                                       key_size=2048).public_key().public_numbers()
    return numbers.n, numbers.e


# -- the HCL report builder (no TPM) ---------------------------------------------------

def test_runtime_json_has_azures_layout(ak_numbers: Tuple[int, int]) -> None:
    n, e = ak_numbers
    data = emuhcl.runtime_json(n, e, user_data=bytes(range(64)),
                               vm_configuration=emuhcl.DEFAULT_VM_CONFIGURATION)
    assert b" " not in data  # compact, like the paravisor's
    doc = json.loads(data)
    assert list(doc) == ["keys", "vm-configuration", "user-data"]
    assert list(doc["keys"][0]) == ["kid", "key_ops", "kty", "e", "n"]
    assert doc["keys"][0]["e"] == "AQAB"
    assert doc["user-data"] == bytes(range(64)).hex().upper()
    ak = hcl.find_ak(hcl.parse_runtime_json(data))
    assert (ak.n, ak.e) == (n, e)
    with pytest.raises(ValueError):
        emuhcl.runtime_json(n, e, user_data=bytes(32), vm_configuration={})


def test_hcl_report_round_trips(state: EmulatorState, ak_numbers: Tuple[int, int]) -> None:
    runtime = emuhcl.runtime_json(*ak_numbers, user_data=b"\x07" * 64,
                                  vm_configuration=emuhcl.DEFAULT_VM_CONFIGURATION)
    blob = emuhcl.build_hcl_report(Firmware(state), runtime, size=2048)
    assert len(blob) == 2048
    report = hcl.HclReport.from_bytes(blob)
    assert report.runtime_data == runtime
    assert report.user_data == b"\x07" * 64
    assert report.vm_configuration == dict(emuhcl.DEFAULT_VM_CONFIGURATION)
    assert report.report_size == hcl.RUNTIME_DATA_OFFSET + len(runtime)
    assert report.data_size == 20 + len(runtime)
    assert (report.ak.n, report.ak.e) == ak_numbers
    report_data = report.snp_report[0x50:0x90]
    assert report_data == hashlib.sha256(runtime).digest() + bytes(32)
    assert int.from_bytes(report.snp_report[0x30:0x34], "little") == 0  # VMPL 0
    assert blob[hcl.RUNTIME_DATA_OFFSET + len(runtime):] == bytes(2048 - report.report_size)


def test_hcl_report_must_fit(state: EmulatorState, ak_numbers: Tuple[int, int]) -> None:
    runtime = emuhcl.runtime_json(*ak_numbers, user_data=bytes(64), vm_configuration={})
    with pytest.raises(ValueError):
        emuhcl.build_hcl_report(Firmware(state), runtime, size=hcl.RUNTIME_DATA_OFFSET)


def test_a_wrong_variable_data_size_is_a_format_error(state: EmulatorState,
                                                      ak_numbers: Tuple[int, int]) -> None:
    runtime = emuhcl.runtime_json(*ak_numbers, user_data=bytes(64), vm_configuration={})
    blob = bytearray(emuhcl.build_hcl_report(Firmware(state), runtime, size=2048))
    blob[hcl.REQUEST_DATA_OFFSET + 16:hcl.REQUEST_DATA_OFFSET + 20] = (5000).to_bytes(4, "little")
    with pytest.raises(EvidenceFormatError):
        hcl.HclReport.from_bytes(bytes(blob))




# -- the paravisor over a real swtpm ---------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Vtpm:
    state: EmulatorState
    paravisor: Paravisor
    provisioned: Provisioned

    @property
    def spec(self) -> str:
        return f"unix:{self.paravisor.socket_path}"

    def tpm(self) -> Tpm:
        return Tpm(open_tpm(self.spec, timeout=30), sleep=lambda s: None)


@pytest.fixture(scope="module")
def vtpm(state: EmulatorState, tmp_path_factory: Any, swtpm_installed: None
         ) -> Iterator[Vtpm]:
    base = tmp_path_factory.mktemp("vtpm")
    firmware = Firmware(state)
    with SwtpmProcess(base / "swtpm") as swtpm, SocketChannel(swtpm.socket_path) as upstream:
        provisioned = provision(upstream, firmware)
        with Paravisor(upstream, firmware, provisioned, base / "paravisor.sock") as paravisor:
            yield Vtpm(state, paravisor, provisioned)


def read_hcl(t: Tpm) -> hcl.HclReport:
    return hcl.HclReport.from_bytes(t.nv_read(tc.AZURE_HCL_REPORT_INDEX))


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def evidence(t: Tpm, vcek: bytes, nonce: bytes, version: int = 1) -> str:
    """Trustee's az-snp-vtpm evidence, as its attester builds it (signature: the bare
    RSA value; 24 SHA-256 PCRs)."""
    blob = t.nv_read(tc.AZURE_HCL_REPORT_INDEX)
    attest, signature = t.quote(tc.AZURE_AK_HANDLE, nonce, range(24))
    pcrs = t.pcr_values(range(24))
    bare = tpm.Signature.from_bytes(signature).signature
    return json.dumps({"version": version,
                       "tpm_quote": {"signature": bare.hex(), "message": attest.hex(),
                                     "pcrs": [p.hex() for p in pcrs]},
                       "hcl_report": b64url(blob), "vcek": b64url(vcek)})


@needs_swtpm
def test_provisioned_indices_and_ak(vtpm: Vtpm) -> None:
    assert vtpm.paravisor.socket_path.stat().st_mode & 0o777 == 0o600
    with vtpm.tpm() as t:
        public = t.nv_public(tc.AZURE_HCL_REPORT_INDEX)
        assert public.data_size == HCL_NV_SIZE
        assert public.attributes & tc.TPMA_NV_AUTHREAD
        assert not public.attributes & tc.TPMA_NV_AUTHWRITE  # the guest cannot forge it
        assert t.nv_public(tc.AZURE_USER_DATA_INDEX).data_size == 64
        report = read_hcl(t)
        ak = t.read_public(tc.AZURE_AK_HANDLE)
    assert (report.ak.n, report.ak.e) == (ak.rsa_n, ak.rsa_e)
    assert (ak.rsa_n, ak.rsa_e) == (vtpm.provisioned.ak_n, vtpm.provisioned.ak_e)
    assert report.snp_report[0x50:0x70] == hashlib.sha256(report.runtime_data).digest()
    assert report.vm_configuration == dict(emuhcl.DEFAULT_VM_CONFIGURATION)


@needs_swtpm
def test_a_user_data_write_refreshes_the_report(vtpm: Vtpm) -> None:
    with vtpm.tpm() as t:
        before = read_hcl(t)
        data = hashlib.sha512(b"refresh").digest()
        t.nv_write(tc.AZURE_USER_DATA_INDEX, data)
        after = read_hcl(t)
    assert after.user_data == data != before.user_data
    assert after.snp_report != before.snp_report  # a new SNP report
    assert after.snp_report[0x50:0x90] == hashlib.sha256(after.runtime_data).digest() + bytes(32)
    assert after.ak == before.ak


@needs_swtpm
@pytest.mark.parametrize("version", [1, 2])
def test_quote_through_the_proxy_verifies(vtpm: Vtpm, version: int) -> None:
    nonce = os.urandom(32)
    state = vtpm.state
    with vtpm.tpm() as t:
        if version == 2:  # v2 binds the nonce into the runtime JSON's user-data too
            t.nv_write(tc.AZURE_USER_DATA_INDEX, nonce + bytes(32))
        document = evidence(t, state.vcek.der, nonce, version)
    certs = CertificateSet(ark=state.ark, ask=state.ask)
    trusted = Verifier(AMD_ROOTS.with_explicit(state.ark))
    verdict = verify_azure_evidence(document, certs, nonce, verifier=trusted)
    assert verdict.valid, [f"{c.name}: {c.detail}" for c in verdict.failures]
    user_data = verdict.check("runtime.user_data")
    assert user_data is not None
    assert user_data.status is (Status.PASS if version == 2 else Status.SKIP)
    amd_only = verify_azure_evidence(document, certs, nonce, verifier=Verifier(AMD_ROOTS))
    assert not amd_only.valid
    assert [c.name for c in amd_only.failures] == ["chain.ark_trusted"]
    wrong = verify_azure_evidence(document, certs, os.urandom(32), verifier=trusted)
    assert "quote.nonce" in [c.name for c in wrong.failures]


@needs_swtpm
def test_busy_answers_make_tpm_raise_busy(vtpm: Vtpm) -> None:
    with vtpm.tpm() as t:
        vtpm.paravisor.fail_busy(t.tries)
        try:
            with pytest.raises(Busy):
                t.nv_public(tc.AZURE_HCL_REPORT_INDEX)
        finally:
            vtpm.paravisor.fail_busy(0)
        vtpm.paravisor.fail_busy(1)  # fewer than the tries: served after a retry
        assert t.nv_public(tc.AZURE_HCL_REPORT_INDEX).data_size == HCL_NV_SIZE


@needs_swtpm
def test_a_missing_hcl_index_is_a_typed_error(vtpm: Vtpm) -> None:
    vtpm.paravisor.remove_hcl_index()
    try:
        with vtpm.tpm() as t:
            with pytest.raises(DeviceUnavailable, match="0x01400001"):
                t.nv_read(tc.AZURE_HCL_REPORT_INDEX)
            t.nv_write(tc.AZURE_USER_DATA_INDEX, bytes(64))  # a refresh: it stays missing
            with pytest.raises(DeviceUnavailable):
                t.nv_public(tc.AZURE_HCL_REPORT_INDEX)
    finally:
        vtpm.paravisor.clear_faults()
    with vtpm.tpm() as t:
        assert read_hcl(t).user_data == bytes(64)


@needs_swtpm
@pytest.mark.parametrize("kind", ["garbage", "variable_data_size", "variable_data_size_short"])
def test_a_malformed_hcl_blob_is_a_format_error(vtpm: Vtpm, kind: str) -> None:
    vtpm.paravisor.serve_malformed(kind)
    try:
        with vtpm.tpm() as t:
            with pytest.raises(EvidenceFormatError):
                read_hcl(t)
            t.nv_write(tc.AZURE_USER_DATA_INDEX, b"\x01" * 64)  # refreshes stay malformed
            with pytest.raises(EvidenceFormatError):
                read_hcl(t)
    finally:
        vtpm.paravisor.clear_faults()
    with vtpm.tpm() as t:
        assert read_hcl(t).user_data == b"\x01" * 64


def _closed(sock: socket.socket) -> bool:
    sock.settimeout(30)  # a bound, not a measurement: the proxy closes at once
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True


@needs_swtpm
@pytest.mark.parametrize("garbage", [
    b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
    struct.pack(">HII", 0x8001, 1 << 20, 0x17A),  # a size past the bound
    struct.pack(">HII", 0x8001, 4, 0x17A),  # a size shorter than the header
])
def test_a_client_sending_garbage_is_dropped_and_others_are_served(vtpm: Vtpm,
                                                                   garbage: bytes) -> None:
    path = str(vtpm.paravisor.socket_path)
    slow = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    bad = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        slow.connect(path)
        slow.sendall(b"\x80\x01\x00")  # half a header, and then nothing
        bad.connect(path)
        bad.sendall(garbage)
        assert _closed(bad)
        with vtpm.tpm() as t:  # served while the slow client still holds its frame
            assert t.nv_public(tc.AZURE_USER_DATA_INDEX).data_size == 64
    finally:
        slow.close()
        bad.close()


@needs_swtpm
def test_the_proxy_never_binds_over_a_file(vtpm: Vtpm, tmp_path: Path) -> None:
    path = tmp_path / "not-a-socket"
    path.write_text("keep me")
    other = Paravisor(vtpm.paravisor.upstream, vtpm.paravisor.firmware, vtpm.provisioned, path)
    with pytest.raises(OSError):
        other.start()
    assert path.read_text() == "keep me"


# -- snpd-emu vtpm -----------------------------------------------------------------------

def _wait_for_line(path: Path, proc: subprocess.Popen[bytes]) -> str:
    for _ in range(600):  # bounded: 60 s (swtpm start and provisioning)
        text = path.read_text() if path.exists() else ""
        if text.endswith("\n"):
            return text
        if proc.poll() is not None:
            raise AssertionError(f"snpd-emu vtpm exited with {proc.returncode}")
        time.sleep(0.1)
    raise AssertionError("snpd-emu vtpm did not say where it serves")


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


@needs_swtpm
def test_snpd_emu_vtpm_serves_and_stops_on_sigterm(state: EmulatorState, tmp_path: Path) -> None:
    sock = tmp_path / "vtpm.sock"
    out = tmp_path / "out"
    argv = [sys.executable, "-m", "snpd.cli.emu", "--emulator-dir", str(state.state_dir),
            "vtpm", "--socket", str(sock), "--swtpm-state", str(tmp_path / "swtpm")]
    env = dict(os.environ, PYTHONPATH=str(REPO))
    with out.open("wb") as stdout:
        proc = subprocess.Popen(argv, env=env, stdout=stdout, stderr=subprocess.PIPE)
    swtpm_pid: Optional[int] = None
    try:
        line = _wait_for_line(out, proc)
        assert f"unix:{sock}" in line
        swtpm_pid = int(line.split("swtpm pid ")[1].split(",")[0])
        with Tpm(open_tpm(f"unix:{sock}")) as t:
            ak = t.read_public(tc.AZURE_AK_HANDLE)
            assert (read_hcl(t).ak.n, read_hcl(t).ak.e) == (ak.rsa_n, ak.rsa_e)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if proc.stderr:
            proc.stderr.close()
    assert not _alive(swtpm_pid)
    assert not sock.exists()


@needs_swtpm
@pytest.mark.parametrize("kind", ["garbage", "variable_data_size_short"])
def test_the_azure_device_calls_a_malformed_report_its_own_failure(vtpm: Vtpm,
                                                                   kind: str) -> None:
    """A caller sent nothing malformed: the device's error, never InvalidArgument."""
    device = AzureVtpmDevice(vtpm.spec, opener=lambda spec: open_tpm(spec, timeout=30))
    vtpm.paravisor.serve_malformed(kind)
    try:
        with pytest.raises(DeviceError, match="HCL report is malformed") as caught:
            device.report(ReportRequest(b"\x01" * 64, 0))
        assert not isinstance(caught.value, InvalidArgument)
    finally:
        vtpm.paravisor.clear_faults()
        device.close()
