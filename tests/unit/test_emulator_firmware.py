"""The emulated platform: persisted state, reports, derived keys, the host's table.

Reports are checked by the real verifier under the emulator's ARK (an explicit
root), for every product, report version and signer. RSA keys are 2048 bits
and one state directory per product is shared by the whole session.
"""

from __future__ import annotations

import dataclasses
import datetime
import os
import stat
from pathlib import Path
from typing import Any, Dict, List, Tuple

import pytest

from snpd.abi.certtable import parse_cert_table
from snpd.abi.product import Product
from snpd.abi.report import AttestationReport, FirmwareVersion
from snpd.abi.tcb import TcbVersion
from snpd.abi.uapi import DerivedKeyRequest, SnpDerivedKeyReq
from snpd.certsdir import load_certs_dir
from snpd.emulator.faults import DeviceFault
from snpd.emulator.firmware import CPUID, Firmware
from snpd.emulator.launch import EmulatorConfig, default_tcb
from snpd.emulator.state import EmulatorState
from snpd.errors import ConfigError
from snpd.trust.certset import CertificateSet
from snpd.trust.roots import TrustRoots
from snpd.trust.verify import Verifier

NOW = datetime.datetime(2026, 6, 1, 12, 0, tzinfo=datetime.timezone.utc)
DATA = bytes(range(64))
_DIRS: Dict[Product, Path] = {}


@pytest.fixture(scope="session")
def state_dirs(tmp_path_factory: Any) -> Dict[Product, Path]:
    if not _DIRS:
        for product in Product:
            path = tmp_path_factory.mktemp(f"emu-{product.value}")
            EmulatorState.load_or_create(path, EmulatorConfig(product=product), now=lambda: NOW,
                                         rsa_bits=2048)
            _DIRS[product] = path
    return _DIRS


def load(path: Path, config: EmulatorConfig, now: datetime.datetime = NOW) -> EmulatorState:
    return EmulatorState.load_or_create(path, config, now=lambda: now, rsa_bits=2048)


def verifier(state: EmulatorState, at: datetime.datetime = NOW) -> Verifier:
    return Verifier(TrustRoots(explicit=(state.ark,)), clock=lambda: at)


def failed(verdict: Any) -> Tuple[str, ...]:
    return tuple(f"{c.name}: {c.detail}" for c in verdict.checks if not c.ok)


# -- reports ---------------------------------------------------------------------------


@pytest.mark.parametrize("signer", ["vcek", "vlek"])
@pytest.mark.parametrize("version", [2, 3, 5])
@pytest.mark.parametrize("product", list(Product), ids=str)
def test_report_verifies_and_carries_every_field(state_dirs: Dict[Product, Path],
                                                 product: Product, version: int,
                                                 signer: str) -> None:
    config = EmulatorConfig(
        product=product, report_version=version, signer=signer, guest_vmpl=1, guest_svn=7,
        policy=0x3001F, family_id=b"F" * 16, image_id=b"I" * 16, host_data=b"H" * 32,
        measurement=b"M" * 48, platform_info=0x27, launch_mit_vector=0x11,
        current_mit_vector=0x22, current_firmware=FirmwareVersion(1, 58, 9),
        committed_firmware=FirmwareVersion(1, 57, 8))
    state = load(state_dirs[product], config)
    status, raw = Firmware(state).report(DATA, 2)
    assert status == 0 and len(raw) == 1184
    verdict = verifier(state).verify(raw, state.certificates())
    assert verdict.valid, failed(verdict)
    assert verdict.product is product

    report = AttestationReport.from_bytes(raw)
    assert (report.version, report.vmpl, report.report_data) == (version, 2, DATA)
    assert (report.guest_svn, report.policy.raw, report.platform_info.raw) == (7, 0x3001F, 0x27)
    assert (report.family_id, report.image_id) == (b"F" * 16, b"I" * 16)
    assert (report.measurement, report.host_data) == (b"M" * 48, b"H" * 32)
    assert report.key_info.signing_key == (0 if signer == "vcek" else 1)
    assert report.report_id_ma == b"\xff" * 32 and any(report.report_id)
    assert (report.current, report.committed) == (FirmwareVersion(1, 58, 9),
                                                  FirmwareVersion(1, 57, 8))
    for which in ("reported", "current", "committed", "launch"):
        assert report.tcb(which, product) == default_tcb(product)
    if version >= 3:
        assert (report.cpuid_fam_id, report.cpuid_mod_id, report.cpuid_step) == CPUID[product]
        assert report.cpuid_product is product
    else:
        assert report.cpuid_fam_id is None and not any(raw[0x188:0x1A0])
    if version >= 5:
        assert (report.launch_mit_vector, report.current_mit_vector) == (0x11, 0x22)
    else:
        assert not any(raw[0x1F8:0x2A0])
    if signer == "vlek":
        assert report.chip_id_masked
    elif product is Product.TURIN:
        assert any(report.chip_id[:8]) and not any(report.chip_id[8:])
    else:
        # All 64 bytes are the chip's (a random byte is zero one time in 256, so the
        # test asks for a nonzero byte beyond the 8 a Turin hwID has, not a given one).
        assert report.chip_id == state.chip_id and any(report.chip_id[8:])
    assert report.nonzero_reserved() == () and report.signature_reserved_nonzero() == ()


def test_turin_tcb_layout_puts_fmc_first(state_dirs: Dict[Product, Path]) -> None:
    tcb = TcbVersion.from_parts(Product.TURIN, fmc=3, bootloader=4, tee=5, snp=6, microcode=77)
    state = load(state_dirs[Product.TURIN], EmulatorConfig(product=Product.TURIN,
                                                           reported_tcb=tcb))
    _status, raw = Firmware(state).report(DATA, 0)
    assert raw[0x180:0x188] == bytes([3, 4, 5, 6, 0, 0, 0, 77])
    verdict = verifier(state).verify(raw, state.certificates())
    assert verdict.valid, failed(verdict)


def test_mask_chip_id_zeroes_chip_id_and_still_verifies(state_dirs: Dict[Product, Path]
                                                        ) -> None:
    state = load(state_dirs[Product.MILAN], EmulatorConfig(product=Product.MILAN,
                                                           mask_chip_id=True))
    _status, raw = Firmware(state).report(DATA, 0)
    assert AttestationReport.from_bytes(raw).chip_id_masked
    assert verifier(state).verify(raw, state.certificates()).valid


@pytest.mark.parametrize("guest_vmpl,vmpl,status", [
    (0, 0, 0), (0, 3, 0), (0, 4, 0x16), (1, 0, 0x16), (1, 1, 0), (2, 1, 0x16), (3, 3, 0)])
def test_report_vmpl_below_the_guests_is_invalid_param(
        state_dirs: Dict[Product, Path], guest_vmpl: int, vmpl: int, status: int) -> None:
    state = load(state_dirs[Product.GENOA], EmulatorConfig(guest_vmpl=guest_vmpl))
    got, raw = Firmware(state).report(DATA, vmpl)
    assert got == status
    assert (len(raw) == 1184) == (status == 0)


def test_report_id_is_per_launch(state_dirs: Dict[Product, Path]) -> None:
    state = load(state_dirs[Product.GENOA], EmulatorConfig())
    fw = Firmware(state)
    a = AttestationReport.from_bytes(fw.report(DATA, 0)[1])
    b = AttestationReport.from_bytes(fw.report(bytes(64), 0)[1])
    c = AttestationReport.from_bytes(Firmware(state).report(DATA, 0)[1])
    assert a.report_id == b.report_id != c.report_id


# -- derived keys ----------------------------------------------------------------------

ALL_FIELDS = ("policy", "image_id", "family_id", "measurement", "guest_svn", "tcb_version")


def key(fw: Firmware, root: str = "vcek", fields: Tuple[str, ...] = ALL_FIELDS,
        **kw: int) -> bytes:
    status, value = fw.derived_key(DerivedKeyRequest.from_fields(root, fields, **kw))
    assert status == 0
    assert len(value) == 32
    return value


def test_derived_key_is_stable_across_reloads(state_dirs: Dict[Product, Path]) -> None:
    path = state_dirs[Product.GENOA]
    first = key(Firmware(load(path, EmulatorConfig())), guest_svn=0)
    again = key(Firmware(load(path, EmulatorConfig())), guest_svn=0)
    assert first == again
    assert key(Firmware(load(path, EmulatorConfig())), "vmrk") != first


@pytest.mark.parametrize("field,change", [
    ("policy", {"policy": 0x30001}),
    ("image_id", {"image_id": b"i" * 16}),
    ("family_id", {"family_id": b"f" * 16}),
    ("measurement", {"measurement": b"m" * 48}),
])
@pytest.mark.parametrize("root", ["vcek", "vmrk"])
def test_derived_key_changes_exactly_with_selected_guest_fields(
        state_dirs: Dict[Product, Path], field: str, change: Dict[str, Any], root: str) -> None:
    path = state_dirs[Product.GENOA]
    base = Firmware(load(path, EmulatorConfig()))
    changed = Firmware(load(path, EmulatorConfig(**change)))
    others = tuple(f for f in ALL_FIELDS if f != field)
    assert key(base, root, (field,)) != key(changed, root, (field,))
    assert key(base, root, others) == key(changed, root, others)
    assert key(base, root, ()) == key(changed, root, ())


def test_derived_key_request_values(state_dirs: Dict[Product, Path]) -> None:
    config = EmulatorConfig(guest_svn=5, guest_vmpl=0)
    fw = Firmware(load(state_dirs[Product.GENOA], config))
    tcb = config.tcb("committed").raw
    older = TcbVersion.from_parts(Product.GENOA, bootloader=9, tee=0, snp=23, microcode=84).raw
    # the requested SVN and TCB count only when selected
    assert key(fw, fields=("guest_svn",), guest_svn=5) != key(fw, fields=("guest_svn",),
                                                               guest_svn=4)
    assert key(fw, fields=("policy",), guest_svn=5) == key(fw, fields=("policy",), guest_svn=4)
    assert key(fw, fields=("tcb_version",), tcb_version=tcb) != key(
        fw, fields=("tcb_version",), tcb_version=older)
    assert key(fw, fields=(), tcb_version=tcb) == key(fw, fields=(), tcb_version=older)
    # the VMPL always does
    assert key(fw, fields=(), vmpl=0) != key(fw, fields=(), vmpl=1)


def test_vcek_rooted_keys_are_bound_to_the_chip_vmrk_ones_are_not(
        state_dirs: Dict[Product, Path]) -> None:
    path = state_dirs[Product.MILAN]
    base = Firmware(load(path, EmulatorConfig(product=Product.MILAN)))
    other = Firmware(load(path, EmulatorConfig(product=Product.MILAN, chip_id=b"\x42" * 64)))
    assert key(base, "vcek") != key(other, "vcek")
    assert key(base, "vmrk") == key(other, "vmrk")
    load(path, EmulatorConfig(product=Product.MILAN))  # back to the persisted chip


@pytest.mark.parametrize("mutate", [
    {"root_key_select": 2}, {"rsvd": 1}, {"guest_field_select": 1 << 6},
    {"vmpl": 0}, {"vmpl": 4}, {"guest_svn": 4}, {"tcb_version": "bl+1"},
    {"tcb_version": "reserved"},
], ids=lambda m: "-".join(f"{k}={v}" for k, v in m.items()))
def test_derived_key_invalid_requests(state_dirs: Dict[Product, Path],
                                      mutate: Dict[str, Any]) -> None:
    config = EmulatorConfig(guest_vmpl=1, guest_svn=3)
    fw = Firmware(load(state_dirs[Product.GENOA], config))
    committed = config.tcb("committed").raw
    req = SnpDerivedKeyReq(0, 0, 0x3F, 1, 3, committed)
    assert fw.derived_key(req)[0] == 0
    for name, value in mutate.items():
        if value == "bl+1":
            value = committed + 1  # bootloader is byte 0 in Genoa's layout
        elif value == "reserved":
            value = committed | 1 << 16
        setattr(req, name, value)
    assert fw.derived_key(req) == (0x16, b"")


def test_id_block_svn_bounds_the_key_svn(state_dirs: Dict[Product, Path]) -> None:
    fw = Firmware(load(state_dirs[Product.GENOA], EmulatorConfig(guest_svn=2, id_block_svn=9)))
    assert fw.derived_key(SnpDerivedKeyReq(0, 0, 0, 0, 9, 0))[0] == 0
    assert fw.derived_key(SnpDerivedKeyReq(0, 0, 0, 0, 10, 0))[0] == 0x16


# -- the host's certificate table --------------------------------------------------------


@pytest.mark.parametrize("signer", ["vcek", "vlek"])
def test_cert_blob_is_a_verifiable_table(state_dirs: Dict[Product, Path], signer: str) -> None:
    state = load(state_dirs[Product.GENOA], EmulatorConfig(signer=signer))
    fw = Firmware(state)
    blob = fw.cert_blob()
    assert len(blob) % 4096 == 0 and fw.required_pages == len(blob) // 4096
    entries = parse_cert_table(blob)
    assert [e.kind for e in entries] == ["ark", "ask", signer, "crl"]
    inter = "ask" if signer == "vcek" else "asvk"
    certs = CertificateSet.from_kinds(
        [(inter if e.kind == "ask" else str(e.kind), e.data) for e in entries])
    _status, raw = fw.report(DATA, 0)
    verdict = verifier(state).verify(raw, certs)
    assert verdict.valid, failed(verdict)


def test_cert_blob_empty_host(state_dirs: Dict[Product, Path]) -> None:
    fw = Firmware(load(state_dirs[Product.GENOA], EmulatorConfig(host_certs="empty")))
    assert fw.cert_blob() == bytes(24) and fw.required_pages == 0
    assert parse_cert_table(fw.cert_blob()) == ()


# -- faults ------------------------------------------------------------------------------


def test_fault_queue_counts(state_dirs: Dict[Product, Path]) -> None:
    slept: List[float] = []
    fw = Firmware(load(state_dirs[Product.GENOA], EmulatorConfig()), sleep=slept.append)
    fw.faults.push(DeviceFault.busy(), count=2)
    fw.faults.push(DeviceFault.latency(0.5), count=None)
    body = bytes(96)
    assert fw.guest_request(5, 1, body).exitinfo2 == 2 << 32
    assert fw.guest_request(5, 1, body).exitinfo2 == 2 << 32
    assert fw.guest_request(5, 1, body).exitinfo2 == 0
    assert slept == [0.5, 0.5, 0.5]
    assert fw.requests["busy"] == 2 and fw.requests["vmgexit"] == 3
    fw.faults.clear()
    assert fw.faults.pending == ()
    fw.faults.push(DeviceFault.invalid_len(3))
    assert fw.guest_request(5, 1, body, ext_pages=4).exitinfo2 == 0  # enough pages: unused
    assert fw.guest_request(5, 1, body).exitinfo2 == 0  # plain request: unused
    answer = fw.guest_request(5, 1, body, ext_pages=2)
    assert (answer.exitinfo2, answer.npages) == (1 << 32, 3)
    assert fw.faults.pending == ()


def test_fault_constructors_validate() -> None:
    with pytest.raises(ValueError):
        DeviceFault.host_error(vmm_error=0)
    with pytest.raises(ValueError):
        DeviceFault.fw_error(0)
    with pytest.raises(ValueError):
        DeviceFault.invalid_len(0)
    assert DeviceFault.host_error(vmm_error=3, fw_error=4).exitinfo2 == 3 << 32 | 4


# -- state directory ---------------------------------------------------------------------


def test_state_files_modes_and_certs_dir(state_dirs: Dict[Product, Path]) -> None:
    path = state_dirs[Product.GENOA]
    state = load(path, EmulatorConfig())
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(path / "keys").st_mode) == 0o700
    for name in ("ark", "ask", "asvk"):
        assert stat.S_IMODE(os.stat(path / "keys" / f"{name}.key").st_mode) == 0o600
    assert stat.S_IMODE(os.stat(path / "secrets.json").st_mode) == 0o600
    assert sorted(p.name for p in state.certs_dir.iterdir()) == [
        "ark.pem", "ask.pem", "asvk.pem", "crl.der", "vcek.pem", "vlek.pem"]
    certs = load_certs_dir(state.certs_dir)
    assert certs.vcek == state.vcek and certs.crl == state.crl
    assert verifier(state).verify_chain(certs).valid
    assert "Emulator" in str(state.ark.subject) or "emulator" in str(state.ark.subject)
    # the private keys load on demand and match the certificates
    assert state.chain.ark.der == state.ark.der
    assert state.chain.ark_key.public_key().public_numbers() == (
        state.ark.public_key.public_numbers())  # type: ignore[union-attr]


def test_reload_keeps_everything(tmp_path: Path) -> None:
    first = load(tmp_path, EmulatorConfig(product=Product.MILAN))
    mtimes = {p.name: p.stat().st_mtime_ns for p in first.certs_dir.iterdir()}
    again = load(tmp_path, EmulatorConfig(product=Product.MILAN))
    assert (again.ark, again.vcek, again.vlek, again.crl, again.chip_id) == (
        first.ark, first.vcek, first.vlek, first.crl, first.chip_id)
    assert {p.name: p.stat().st_mtime_ns for p in again.certs_dir.iterdir()} == mtimes


def test_tcb_change_reissues_endorsement_keys_under_the_same_chain(tmp_path: Path) -> None:
    first = load(tmp_path, EmulatorConfig())
    newer = TcbVersion.from_parts(Product.GENOA, bootloader=10, tee=0, snp=24, microcode=85)
    config = EmulatorConfig(reported_tcb=newer)
    second = load(tmp_path, config)
    assert (second.ark, second.ask, second.asvk) == (first.ark, first.ask, first.asvk)
    assert second.vcek != first.vcek and second.vcek.spki != first.vcek.spki
    assert second.vlek.spki != first.vlek.spki
    _status, raw = Firmware(second).report(DATA, 0)
    assert verifier(second).verify(raw, second.certificates()).valid
    # a verifier holding the old VCEK rejects the new report (the key is TCB-bound)
    stale = dataclasses.replace(second.certificates(), vcek=first.vcek)
    assert not verifier(second).verify(raw, stale).valid
    # and going back gives the original key again
    assert load(tmp_path, EmulatorConfig()).vcek.spki == first.vcek.spki


def test_product_change_reissues_the_chain_with_the_same_keys(tmp_path: Path) -> None:
    first = load(tmp_path, EmulatorConfig(product=Product.GENOA))
    turin = load(tmp_path, EmulatorConfig(product=Product.TURIN))
    assert turin.ark.subject.common_name == "ARK-Turin"
    assert turin.ark.spki == first.ark.spki and turin.ask.spki == first.ask.spki
    assert turin.chip_id[:8] == first.chip_id[:8] and not any(turin.chip_id[8:])
    _status, raw = Firmware(turin).report(DATA, 0)
    verdict = verifier(turin).verify(raw, turin.certificates())
    assert verdict.valid, failed(verdict)
    # the old ARK's key still anchors it
    assert Verifier(TrustRoots(explicit=(first.ark,)), clock=lambda: NOW).verify(
        raw, turin.certificates()).valid


def test_missing_or_stale_files_are_repaired(tmp_path: Path) -> None:
    first = load(tmp_path, EmulatorConfig())
    (first.certs_dir / "vcek.pem").unlink()
    (first.certs_dir / "crl.der").write_bytes(b"garbage")
    again = load(tmp_path, EmulatorConfig())
    assert again.vcek.spki == first.vcek.spki and (first.certs_dir / "vcek.pem").exists()
    assert again.crl.der != first.crl.der
    later = NOW + datetime.timedelta(days=20)
    renewed = load(tmp_path, EmulatorConfig(), now=later)
    assert renewed.crl.next_update is not None and renewed.crl.next_update > later
    assert verifier(renewed, later).verify_chain(renewed.certificates()).valid


def test_damaged_metadata_recreates_the_platform(tmp_path: Path) -> None:
    first = load(tmp_path, EmulatorConfig())
    (tmp_path / "secrets.json").write_text("{}")
    second = load(tmp_path, EmulatorConfig())
    assert second.ark.spki != first.ark.spki


# -- configuration -----------------------------------------------------------------------


def test_from_mapping_reads_the_emulator_table() -> None:
    config = EmulatorConfig.from_mapping({
        "product": "Turin", "report_version": 3, "guest_vmpl": 1, "vmpck_id": 2,
        "measurement": "ab" * 48, "policy": 0x30000, "host_data": "0x" + "cd" * 32,
        "reported_tcb": {"fmc": 1, "bootloader": 2, "tee": 3, "snp": 4, "microcode": 5},
        "committed_tcb": 0x0500000004030201, "current_firmware": "1.58.3",
        "committed_firmware": {"major": 1, "minor": 57, "build": 2}, "signer": "vlek",
        "mask_chip_id": False, "host_certs": "empty", "kernel": "6.2", "chip_id": "11" * 8,
        "latency": 0.25, "id_block_svn": 4,
    })
    assert config.product is Product.TURIN and config.vmpck == 2
    assert config.tcb("reported") == config.tcb("committed") == config.tcb("launch")
    assert config.tcb("reported").fmc == 1
    assert config.current_firmware == FirmwareVersion(1, 58, 3)
    assert config.chip_id == b"\x11" * 8 + bytes(56)
    assert config.key_svn_limit == 4
    assert EmulatorConfig.from_mapping({}) == EmulatorConfig()


@pytest.mark.parametrize("table,key", [
    ({"bogus": 1}, "bogus"),
    ({"product": "Venice"}, "product"),
    ({"report_version": 4}, "report_version"),
    ({"guest_vmpl": 4}, "guest_vmpl"),
    ({"guest_vmpl": 2, "vmpck_id": 1}, "vmpck_id"),
    ({"measurement": "ab"}, "measurement"),
    ({"measurement": "zz" * 48}, "measurement"),
    ({"policy": 0}, "policy"),
    ({"policy": True}, "policy"),
    ({"reported_tcb": {"bootloader": 1}}, "reported_tcb"),
    ({"reported_tcb": {"fmc": 1, "bootloader": 1, "tee": 0, "snp": 1, "microcode": 1}},
     "reported_tcb"),
    ({"current_firmware": "1.2"}, "current_firmware"),
    ({"signer": "ark"}, "signer"),
    ({"host_certs": "full"}, "host_certs"),
    ({"kernel": "5.15"}, "kernel"),
    ({"chip_id": "00" * 64}, "chip_id"),
    ({"product": "Turin", "chip_id": "01" * 64}, "chip_id"),
    ({"mask_chip_id": 1}, "mask_chip_id"),
    ({"latency": -1}, "latency"),
])
def test_from_mapping_names_the_bad_key(table: Dict[str, Any], key: str) -> None:
    with pytest.raises(ConfigError, match=rf"emulator: {key}: "):
        EmulatorConfig.from_mapping(table)


def test_config_rejects_a_tcb_in_the_wrong_layout() -> None:
    with pytest.raises(ConfigError, match="reported_tcb"):
        EmulatorConfig(product=Product.TURIN, reported_tcb=default_tcb(Product.GENOA))
    config = EmulatorConfig(product=Product.TURIN)
    assert config.tcb("reported").fmc == 1
    assert dataclasses.replace(config, product=Product.MILAN).tcb("reported").fmc is None
