"""Appraisal policy: loading (strict, path-naming errors) and judging real reports."""

from __future__ import annotations

import datetime
import hashlib
import struct
from pathlib import Path
from typing import TYPE_CHECKING, Dict, Iterator, Optional, Tuple

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from snpd.abi.product import Product
from snpd.abi.report import AttestationReport
from snpd.errors import ConfigError, InvalidArgument
from snpd.trust.appraisal import (
    AppraisalPolicy,
    TcbMinimum,
    amd_key_digest,
    load_policies,
    policies_from_mapping,
)
from snpd.trust.result import Check, Status

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ec import EllipticCurvePrivateKey

# -- vectors -------------------------------------------------------------------


PRODUCTS = {"milan-v2-vcek": Product.MILAN, "milan-v3-vlek": Product.MILAN,
            "genoa-v5-vcek": Product.GENOA, "turin-v5-vcek": Product.TURIN}

# The vectors folder while a test that asked for it (needs_vectors) runs; else None.
_VECTORS: Optional[Path] = None


@pytest.fixture
def real_reports(vectors_dir: Path) -> Iterator[Path]:
    """Lends the vectors to raw() for one test. Through vectors_dir, a test that uses it is
    one that needs the vectors, which a build without them deselects by that fixture."""
    global _VECTORS
    _VECTORS = vectors_dir
    yield vectors_dir
    _VECTORS = None


# Every test that reads a report (raw, report, patched, appraise) carries this mark.
needs_vectors = pytest.mark.usefixtures("real_reports")


def raw(case: str) -> bytes:
    if _VECTORS is None:
        pytest.fail("this test reads the test vectors but is not marked @needs_vectors: mark"
                    " it, so that a build without the vectors deselects it by that mark")
    path = _VECTORS / "cases" / case / "report.bin"
    return path.read_bytes()


def report(case: str) -> AttestationReport:
    return AttestationReport.from_bytes(raw(case))


def patched(case: str, **fields: bytes) -> AttestationReport:
    """A real report with some bytes replaced: appraisal never looks at the signature."""
    offsets = {"policy": 0x008, "platform_info": 0x040, "key_info": 0x048,
               "id_key_digest": 0x0E0, "author_key_digest": 0x110,
               "committed_tcb": 0x1E0, "committed_fw": 0x1EC, "current_fw": 0x1E8,
               "current_tcb": 0x038, "launch_mit": 0x1F8, "guest_svn": 0x004}
    data = bytearray(raw(case))
    for name, value in fields.items():
        off = offsets[name]
        data[off:off + len(value)] = value
    return AttestationReport.from_bytes(bytes(data))


def by_name(checks: Tuple[Check, ...]) -> Dict[str, Check]:
    names = [c.name for c in checks]
    assert len(names) == len(set(names)), names
    return {c.name: c for c in checks}


def appraise(policy: AppraisalPolicy, case: str,
             rep: Optional[AttestationReport] = None) -> Dict[str, Check]:
    return by_name(policy.appraise(rep or report(case), PRODUCTS[case]))


def pol(**data: object) -> AppraisalPolicy:
    return AppraisalPolicy.from_mapping(data)


# -- empty policy and guest policy ---------------------------------------------


@needs_vectors
@pytest.mark.parametrize("case", sorted(PRODUCTS))
def test_empty_policy_yields_no_checks(case: str) -> None:
    assert AppraisalPolicy().appraise(report(case), PRODUCTS[case]) == ()
    assert AppraisalPolicy.from_toml("").appraise(report(case), PRODUCTS[case]) == ()


@needs_vectors
def test_milan_debug_policy_rejected() -> None:
    rep = report("milan-v2-vcek")
    assert rep.policy.raw == 0xB0000
    checks = appraise(AppraisalPolicy.from_toml("allow_debug = false"), "milan-v2-vcek")
    assert list(checks) == ["policy.debug"]
    assert checks["policy.debug"].status is Status.FAIL
    assert "0xb0000" in checks["policy.debug"].detail
    assert appraise(pol(allow_debug=True), "milan-v2-vcek")["policy.debug"].ok
    assert appraise(pol(allow_debug=False), "genoa-v5-vcek")["policy.debug"].ok


@needs_vectors
def test_guest_policy_flags_on_real_reports() -> None:
    # 0x30000: SMT + reserved bit 17; nothing else.
    checks = appraise(pol(allow_smt=False, allow_migrate_ma=False, allow_cxl=False,
                          require_single_socket=True, require_mem_aes_256_xts=False,
                          require_rapl_dis=True, require_ciphertext_hiding=True,
                          require_page_swap_disable=True), "genoa-v5-vcek")
    fails = {n for n, c in checks.items() if not c.ok}
    assert fails == {"policy.smt", "policy.single_socket", "policy.rapl_dis",
                     "policy.ciphertext_hiding", "policy.page_swap_disable"}
    assert checks["policy.migrate_ma"].ok and checks["policy.cxl_allow"].ok
    assert checks["policy.mem_aes_256_xts"].ok  # false = not required


@needs_vectors
def test_minimum_abi() -> None:
    rep = patched("genoa-v5-vcek", policy=struct.pack("<Q", 0x3011F))  # ABI 1.31
    ok = appraise(pol(minimum_abi="1.31"), "genoa-v5-vcek", rep)["policy.minimum_abi"]
    assert ok.ok and "1.31" in ok.detail
    assert not appraise(pol(minimum_abi="1.32"), "genoa-v5-vcek", rep)["policy.minimum_abi"].ok
    assert not appraise(pol(minimum_abi="2.0"), "genoa-v5-vcek", rep)["policy.minimum_abi"].ok
    assert appraise(pol(minimum_abi="0.255"), "genoa-v5-vcek", rep)["policy.minimum_abi"].ok


@needs_vectors
def test_unknown_policy_bits_fail_only_when_strict() -> None:
    rep = patched("genoa-v5-vcek", policy=struct.pack("<Q", 0x30000 | 1 << 30))
    assert appraise(AppraisalPolicy(), "genoa-v5-vcek", rep) == {}
    assert appraise(pol(strict_policy=False), "genoa-v5-vcek", rep)["policy.unknown_bits"].ok
    strict = appraise(pol(strict_policy=True), "genoa-v5-vcek", rep)["policy.unknown_bits"]
    assert strict.status is Status.FAIL and "30" in strict.detail
    assert appraise(pol(strict_policy=True), "genoa-v5-vcek")["policy.unknown_bits"].ok


# -- platform info ---------------------------------------------------------------


@needs_vectors
def test_turin_platform_info_bit6_passes_unless_strict() -> None:
    rep = report("turin-v5-vcek")
    assert rep.platform_info.raw == 0x67 and rep.platform_info.unknown_bits == (6,)
    policy = pol(platform_allow_smt_en=True, platform_allow_tsme_en=True,
                 platform_allow_tio_en=False, platform_require_ecc_en=True,
                 platform_require_alias_check_complete=True, platform_require_rapl_dis=False,
                 platform_require_ciphertext_hiding_en=False)
    checks = appraise(policy, "turin-v5-vcek")
    assert len(checks) == 7 and all(c.status is Status.PASS for c in checks.values())
    relaxed = appraise(pol(strict_platform_info=False), "turin-v5-vcek")
    assert relaxed["policy.platform_info.unknown_bits"].ok
    strict = appraise(pol(strict_platform_info=True), "turin-v5-vcek")
    assert strict["policy.platform_info.unknown_bits"].status is Status.FAIL
    assert "6" in strict["policy.platform_info.unknown_bits"].detail


@needs_vectors
def test_platform_info_maximum_rejects() -> None:
    checks = appraise(pol(platform_allow_smt_en=False, platform_allow_tsme_en=False,
                          platform_require_rapl_dis=True), "turin-v5-vcek")
    assert not checks["policy.platform_info.smt_en"].ok
    assert not checks["policy.platform_info.tsme_en"].ok
    assert not checks["policy.platform_info.rapl_dis"].ok
    assert "0x67" in checks["policy.platform_info.smt_en"].detail


# -- exact matches ---------------------------------------------------------------


@needs_vectors
def test_measurement_exact_and_allow_list() -> None:
    rep = report("genoa-v5-vcek")
    good = rep.measurement.hex()
    other = "ab" * 48
    assert appraise(pol(measurement=good), "genoa-v5-vcek")["policy.measurement"].ok
    assert appraise(pol(measurement="0X" + good.upper()), "genoa-v5-vcek")[
        "policy.measurement"].ok
    listed = appraise(pol(measurement=[other, good]), "genoa-v5-vcek")["policy.measurement"]
    assert listed.ok and "one of 2" in listed.detail
    bad = appraise(pol(measurement=other), "genoa-v5-vcek")["policy.measurement"]
    assert bad.status is Status.FAIL and good in bad.detail and other in bad.detail
    assert not appraise(pol(measurement=[other, "cd" * 48]), "genoa-v5-vcek")[
        "policy.measurement"].ok


@needs_vectors
def test_report_data_padded_and_never_logged_in_full() -> None:
    rep = report("turin-v5-vcek")
    data = rep.report_data
    prefix = data.rstrip(b"\0") or data[:1]
    # The daemon zero-pads short REPORT_DATA; so does the policy.
    ok = appraise(pol(report_data=prefix.hex()), "turin-v5-vcek")["policy.report_data"]
    assert ok.ok and data.hex()[:8] not in ok.detail
    wrong = bytes(b ^ 0xFF for b in data)
    bad = appraise(pol(report_data=wrong.hex()), "turin-v5-vcek")["policy.report_data"]
    assert bad.status is Status.FAIL
    assert data[:4].hex() in bad.detail and wrong[:4].hex() in bad.detail
    assert data[:5].hex() not in bad.detail and wrong[:5].hex() not in bad.detail


@needs_vectors
@pytest.mark.parametrize("field", ["host_data", "family_id", "image_id", "report_id",
                                   "report_id_ma", "chip_id"])
def test_other_exact_fields(field: str) -> None:
    rep = report("genoa-v5-vcek")
    value: bytes = getattr(rep, field)
    assert appraise(pol(**{field: value.hex()}), "genoa-v5-vcek")[f"policy.{field}"].ok
    flipped = bytes([value[0] ^ 1]) + value[1:]
    assert not appraise(pol(**{field: flipped.hex()}), "genoa-v5-vcek")[f"policy.{field}"].ok


@needs_vectors
def test_turin_chip_id_as_8_byte_hwid() -> None:
    rep = report("turin-v5-vcek")
    assert not any(rep.chip_id[8:])
    assert appraise(pol(chip_id=rep.chip_id[:8].hex()), "turin-v5-vcek")["policy.chip_id"].ok


@needs_vectors
def test_vmpl_guest_svn_build_version() -> None:
    assert appraise(pol(vmpl=0), "genoa-v5-vcek")["policy.vmpl"].ok
    vlek = appraise(pol(vmpl=0), "milan-v3-vlek")["policy.vmpl"]
    assert not vlek.ok and "VMPL 1" in vlek.detail
    assert appraise(pol(vmpl=[0, 1]), "milan-v3-vlek")["policy.vmpl"].ok
    rep = patched("genoa-v5-vcek", guest_svn=struct.pack("<I", 7))
    assert appraise(pol(minimum_guest_svn=7), "genoa-v5-vcek", rep)["policy.minimum_guest_svn"].ok
    assert not appraise(pol(minimum_guest_svn=8), "genoa-v5-vcek", rep)[
        "policy.minimum_guest_svn"].ok
    # Genoa vector: firmware 1.55 build 43.
    assert appraise(pol(minimum_build=43), "genoa-v5-vcek")["policy.minimum_build"].ok
    assert not appraise(pol(minimum_build=44), "genoa-v5-vcek")["policy.minimum_build"].ok
    assert appraise(pol(minimum_version="1.55"), "genoa-v5-vcek")["policy.minimum_version"].ok
    assert appraise(pol(minimum_version="0.99"), "genoa-v5-vcek")["policy.minimum_version"].ok
    bad = appraise(pol(minimum_version="1.56"), "genoa-v5-vcek")["policy.minimum_version"]
    assert not bad.ok and "1.55" in bad.detail and "1.56" in bad.detail


# -- TCB -------------------------------------------------------------------------


@needs_vectors
def test_minimum_tcb_milan_layout() -> None:
    # 0x4405000000000002: bootloader 2, TEE 0, SNP 5, microcode 68.
    ok = appraise(pol(minimum_tcb={"reported": {"bootloader": 2, "snp": 5, "microcode": 68}}),
                  "milan-v2-vcek")["policy.minimum_tcb.reported"]
    assert ok.ok and "snp=5" in ok.detail
    bad = appraise(pol(minimum_tcb={"reported": {"snp": 6, "microcode": 70, "tee": 0}}),
                   "milan-v2-vcek")["policy.minimum_tcb.reported"]
    assert bad.status is Status.FAIL
    assert "snp 5 < 6" in bad.detail and "microcode 68 < 70" in bad.detail
    assert "tee" not in bad.detail.split(":", 1)[1]
    na = appraise(pol(minimum_tcb={"launch": {"fmc": 3}}), "milan-v2-vcek")[
        "policy.minimum_tcb.launch"]
    assert na.ok and "fmc not applicable to Milan" in na.detail


@needs_vectors
def test_minimum_tcb_turin_layout() -> None:
    # 0x4700000002000100: FMC 0, bootloader 1, TEE 0, SNP 2, microcode 71.
    checks = appraise(pol(minimum_tcb={
        "reported": {"fmc": 0, "bootloader": 1, "snp": 2, "microcode": 71},
        "committed": {"fmc": 1},
        "launch": {"bootloader": 2},
        "current": {"snp": 2}}), "turin-v5-vcek")
    assert list(checks) == [f"policy.minimum_tcb.{k}" for k in
                            ("reported", "committed", "launch", "current")]
    assert checks["policy.minimum_tcb.reported"].ok
    assert "fmc 0 < 1" in checks["policy.minimum_tcb.committed"].detail
    assert "bootloader 1 < 2" in checks["policy.minimum_tcb.launch"].detail
    assert checks["policy.minimum_tcb.current"].ok
    # The same bytes read with the Milan layout give bootloader 0: the product matters.
    rep = report("turin-v5-vcek")
    milan = by_name(pol(minimum_tcb={"reported": {"bootloader": 1}}).appraise(rep, Product.MILAN))
    assert not milan["policy.minimum_tcb.reported"].ok


@needs_vectors
def test_provisional_firmware() -> None:
    same = {"permit": appraise(pol(permit_provisional_firmware=True), "genoa-v5-vcek"),
            "deny": appraise(pol(permit_provisional_firmware=False), "genoa-v5-vcek")}
    assert all(c["policy.provisional_firmware"].ok for c in same.values())

    # Committed one SNP SVN and one build behind current: a provisional update.
    rep0 = report("genoa-v5-vcek")
    tcb = bytearray(rep0.committed_tcb.to_bytes(8, "little"))
    tcb[6] -= 1
    older = patched("genoa-v5-vcek", committed_tcb=bytes(tcb),
                    committed_fw=bytes([rep0.committed.build - 1]))
    assert older.committed.build == 42 and older.current.build == 43
    deny = appraise(pol(permit_provisional_firmware=False), "genoa-v5-vcek", older)[
        "policy.provisional_firmware"]
    assert deny.status is Status.FAIL
    assert "committed TCB" in deny.detail and "build 42" in deny.detail
    assert appraise(pol(permit_provisional_firmware=True), "genoa-v5-vcek", older)[
        "policy.provisional_firmware"].ok
    assert appraise(pol(require_current_ge_committed=True), "genoa-v5-vcek", older)[
        "policy.current_ge_committed"].ok

    # Committed ahead of current is never acceptable.
    tcb[6] += 2
    ahead = patched("genoa-v5-vcek", committed_tcb=bytes(tcb))
    assert not appraise(pol(permit_provisional_firmware=True), "genoa-v5-vcek", ahead)[
        "policy.provisional_firmware"].ok
    assert not appraise(pol(require_current_ge_committed=True), "genoa-v5-vcek", ahead)[
        "policy.current_ge_committed"].ok
    assert appraise(pol(require_current_ge_committed=False), "genoa-v5-vcek", ahead)[
        "policy.current_ge_committed"].ok


# -- mitigation vectors ------------------------------------------------------------


@needs_vectors
def test_mitigation_vectors_v5_and_v3() -> None:
    # genoa-v5: LAUNCH_MIT_VECTOR = CURRENT_MIT_VECTOR = 1.
    checks = appraise(pol(minimum_launch_mit_vector=1, minimum_current_mit_vector="0x1"),
                      "genoa-v5-vcek")
    assert checks["policy.minimum_launch_mit_vector"].ok
    assert checks["policy.minimum_current_mit_vector"].ok
    bad = appraise(pol(minimum_launch_mit_vector=3), "genoa-v5-vcek")[
        "policy.minimum_launch_mit_vector"]
    assert bad.status is Status.FAIL and "0x2" in bad.detail
    v3 = appraise(pol(minimum_current_mit_vector=1), "milan-v3-vlek")[
        "policy.minimum_current_mit_vector"]
    assert v3.status is Status.FAIL and "version 3" in v3.detail and "v5" in v3.detail
    assert appraise(pol(minimum_launch_mit_vector=0), "milan-v3-vlek")[
        "policy.minimum_launch_mit_vector"].ok
    top = AppraisalPolicy.from_toml('minimum_launch_mit_vector = "0x8000000000000000"')
    assert top.minimum_launch_mit_vector == 1 << 63


# -- keys ----------------------------------------------------------------------------


def _p384() -> EllipticCurvePrivateKey:
    from cryptography.hazmat.primitives.asymmetric import ec

    return ec.generate_private_key(ec.SECP384R1())


def _manual_digest(key: EllipticCurvePrivateKey) -> bytes:
    nums = key.public_key().public_numbers()
    blob = bytearray(0x404)
    blob[0:4] = (2).to_bytes(4, "little")
    blob[0x04:0x04 + 72] = nums.x.to_bytes(72, "little")
    blob[0x4C:0x4C + 72] = nums.y.to_bytes(72, "little")
    return hashlib.sha384(bytes(blob)).digest()


def _pem(key: EllipticCurvePrivateKey) -> str:
    from cryptography.hazmat.primitives import serialization

    return key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode()


def _cert_pem(key: EllipticCurvePrivateKey) -> str:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.x509.oid import NameOID

    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "id key")])
    now = datetime.datetime(2024, 1, 1, tzinfo=datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key())
            .serial_number(1).not_valid_before(now)
            .not_valid_after(now + datetime.timedelta(days=1))
            .sign(key, hashes.SHA384()))
    return cert.public_bytes(serialization.Encoding.PEM).decode()


def test_amd_key_digest_matches_manual_structure() -> None:
    from cryptography.hazmat.primitives import serialization

    key = _p384()
    expected = _manual_digest(key)
    pub = key.public_key()
    assert amd_key_digest(pub) == expected
    assert amd_key_digest(_pem(key)) == expected
    assert amd_key_digest(_pem(key).encode()) == expected
    assert amd_key_digest(_cert_pem(key)) == expected
    der = pub.public_bytes(serialization.Encoding.DER,
                           serialization.PublicFormat.SubjectPublicKeyInfo)
    assert amd_key_digest(der) == expected


def test_amd_key_digest_rejects_other_keys() -> None:
    from cryptography.hazmat.primitives.asymmetric import ec

    p256 = ec.generate_private_key(ec.SECP256R1())
    with pytest.raises(InvalidArgument, match="P-384"):
        amd_key_digest(p256.public_key())
    with pytest.raises(InvalidArgument):
        amd_key_digest("-----BEGIN PUBLIC KEY-----\nnope\n-----END PUBLIC KEY-----\n")
    with pytest.raises(ConfigError, match=r"^policy: trusted_id_keys\[0\]: .*P-384"):
        pol(trusted_id_keys=[_pem(p256)])


@needs_vectors
def test_id_and_author_key_trust() -> None:
    id_key, author_key = _p384(), _p384()
    id_d, author_d = _manual_digest(id_key), _manual_digest(author_key)
    with_id = patched("genoa-v5-vcek", id_key_digest=id_d)
    with_both = patched("genoa-v5-vcek", id_key_digest=id_d, author_key_digest=author_d,
                        key_info=struct.pack("<I", 1))

    def check(policy: AppraisalPolicy, rep: AttestationReport, name: str) -> Check:
        return appraise(policy, "genoa-v5-vcek", rep)[name]

    plain = report("genoa-v5-vcek")
    assert not check(pol(require_id_block=True), plain, "policy.id_block").ok
    assert check(pol(require_id_block=True), with_id, "policy.id_block").ok
    assert not check(pol(require_author_key=True), with_id, "policy.author_key").ok
    assert check(pol(require_author_key=True), with_both, "policy.author_key").ok

    by_digest = pol(trusted_id_key_digests=[id_d.hex()])
    assert check(by_digest, with_id, "policy.id_key").ok
    assert not check(by_digest, plain, "policy.id_key").ok
    by_pem = pol(trusted_id_keys=_pem(id_key))
    assert by_pem.trusted_id_key_digests == (id_d,)
    assert check(by_pem, with_id, "policy.id_key").ok
    by_author = pol(trusted_author_keys=[_cert_pem(author_key)])
    assert check(by_author, with_both, "policy.id_key").ok
    # An author key only counts when AUTHOR_KEY_EN is set.
    no_en = patched("genoa-v5-vcek", id_key_digest=id_d, author_key_digest=author_d)
    refused = check(by_author, no_en, "policy.id_key")
    assert not refused.ok and "AUTHOR_KEY_EN" in refused.detail
    other = pol(trusted_id_key_digests="00" * 47 + "01", trusted_author_key_digests="11" * 48)
    assert not check(other, with_both, "policy.id_key").ok
    merged = pol(trusted_id_key_digests=["22" * 48], trusted_id_keys=[_pem(id_key)])
    assert merged.trusted_id_key_digests == (b"\x22" * 48, id_d)


# -- loading ---------------------------------------------------------------------------


@pytest.mark.parametrize(("data", "message"), [
    ({"measurment": "00"}, "policy.strict: measurment: unknown key"),
    ({"minimum_tcb": {"reported": {"snpp": 1}}},
     "policy.strict: minimum_tcb.reported.snpp: unknown key"),
    ({"minimum_tcb": {"reportd": {"snp": 1}}}, "policy.strict: minimum_tcb.reportd: unknown key"),
    ({"measurement": "0" * 95}, "policy.strict: measurement: expected 96 hex digits, got 95"),
    ({"measurement": ["0" * 96, "0x" + "0" * 94]},
     "policy.strict: measurement[1]: expected 96 hex digits, got 94"),
    ({"measurement": "zz" * 48}, "policy.strict: measurement: 'z' is not a hex digit"),
    ({"measurement": []}, "policy.strict: measurement: an empty list"),
    ({"report_data": "0" * 130}, "policy.strict: report_data: expected at most 128 hex digits"),
    ({"report_data": "abc"}, "policy.strict: report_data: expected an even number"),
    ({"chip_id": "00" * 9}, "policy.strict: chip_id: expected 128 (or 16) hex digits, got 18"),
    ({"allow_debug": "no"}, "policy.strict: allow_debug: expected a boolean, got string"),
    ({"allow_debug": 0}, "policy.strict: allow_debug: expected a boolean, got integer"),
    ({"minimum_build": True}, "policy.strict: minimum_build: expected an integer, got boolean"),
    ({"minimum_build": 256}, "policy.strict: minimum_build: 256 is out of range 0..255"),
    ({"minimum_guest_svn": -1}, "policy.strict: minimum_guest_svn: -1 is out of range"),
    ({"vmpl": 4}, "policy.strict: vmpl: 4 is out of range 0..3"),
    ({"vmpl": [0, "1"]}, "policy.strict: vmpl[1]: expected an integer, got string"),
    ({"minimum_version": 1.5}, "policy.strict: minimum_version: expected a \"MAJOR.MINOR\""),
    ({"minimum_version": "1.256"}, "policy.strict: minimum_version: expected \"MAJOR.MINOR\""),
    ({"minimum_tcb": {"current": {"microcode": 300}}},
     "policy.strict: minimum_tcb.current.microcode: 300 is out of range 0..255"),
    ({"minimum_tcb": {"current": {}}}, "policy.strict: minimum_tcb.current: no component"),
    ({"minimum_tcb": 5}, "policy.strict: minimum_tcb: expected a table, got integer"),
    ({"minimum_launch_mit_vector": "0x1" + "0" * 16},
     "policy.strict: minimum_launch_mit_vector: 0x10000000000000000 does not fit in 64 bits"),
    ({"trusted_author_key_digests": "00" * 32},
     "policy.strict: trusted_author_key_digests: expected 96 hex digits, got 64"),
    ({"trusted_id_keys": ["not a key"]}, "policy.strict: trusted_id_keys[0]: not a PEM or DER"),
])
def test_from_mapping_errors_name_the_key(data: Dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        AppraisalPolicy.from_mapping(data, name="policy.strict")
    assert str(info.value).startswith(message), str(info.value)


def test_from_mapping_values() -> None:
    p = pol(report_data="0xABCD", vmpl=[1, 1, 0], minimum_version="1.55", minimum_abi="0.31",
            minimum_tcb={"reported": {"snp": 3, "fmc": 1}}, chip_id="0a" * 8)
    assert p.report_data == (b"\xab\xcd" + bytes(62),)
    assert p.vmpl == (1, 0)
    assert p.minimum_version == (1, 55) and p.minimum_abi == (0, 31)
    assert p.minimum_reported_tcb == TcbMinimum(snp=3, fmc=1)
    assert p.minimum_launch_tcb is None
    assert p.chip_id == (b"\x0a" * 8 + bytes(56),)


def test_constructor_refuses_bare_bytes() -> None:
    with pytest.raises(ConfigError, match="measurement"):
        AppraisalPolicy(measurement=b"\0" * 48)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="vmpl"):
        AppraisalPolicy(vmpl=(4,))
    with pytest.raises(ConfigError, match="snp"):
        TcbMinimum(snp=256)


TOML_TWO = """
[daemon]
socket = "/run/snpd.sock"

[policy.a]
allow_debug = false
measurement = ["%s", "0x%s"]

[policy.b]
vmpl = [0, 1]
strict_platform_info = false
[policy.b.minimum_tcb.reported]
snp = 2
microcode = 71
"""


@needs_vectors
def test_toml_named_policies() -> None:
    rep = report("turin-v5-vcek")
    text = TOML_TWO % ("00" * 48, rep.measurement.hex().upper())
    policies = load_policies(text)
    assert sorted(policies) == ["a", "b"]
    a = by_name(policies["a"].appraise(rep, Product.TURIN))
    assert list(a) == ["policy.debug", "policy.measurement"] and all(c.ok for c in a.values())
    b = by_name(policies["b"].appraise(rep, Product.TURIN))
    assert set(b) == {"policy.vmpl", "policy.minimum_tcb.reported",
                      "policy.platform_info.unknown_bits"}
    assert all(c.ok for c in b.values())
    assert load_policies("[daemon]\nx = 1\n") == {}


def test_toml_errors() -> None:
    with pytest.raises(ConfigError, match=r"^policy\.b: minimum_tcb\.reported\.snpp: unknown key"):
        load_policies("[policy.a]\n[policy.b.minimum_tcb.reported]\nsnpp = 1\n")
    with pytest.raises(ConfigError, match=r"^policy: line 2, column \d+: invalid TOML: "):
        AppraisalPolicy.from_toml("allow_debug = false\nmeasurement = \n")
    with pytest.raises(ConfigError, match=r"line 3"):
        load_policies("[policy.a]\nvmpl = 0\nvmpl = 1\n")
    with pytest.raises(ConfigError, match="load_policies"):
        AppraisalPolicy.from_toml("[policy.a]\nvmpl = 0\n")
    with pytest.raises(ConfigError, match=r"^policy\.x: expected a \[policy\.x\] table"):
        load_policies("[policy]\nx = 1\n")
    with pytest.raises(ConfigError, match=r"policy name"):
        policies_from_mapping({"bad name": {}})
    with pytest.raises(ConfigError, match=r"^mine: allow_debug: expected a boolean"):
        AppraisalPolicy.from_toml('allow_debug = "false"', name="mine")


@needs_vectors
def test_every_configured_rule_yields_one_check() -> None:
    rep = report("genoa-v5-vcek")
    data: Dict[str, object] = {
        "minimum_abi": "0.0", "allow_debug": False, "allow_migrate_ma": False,
        "allow_smt": True, "allow_cxl": False, "require_single_socket": False,
        "require_mem_aes_256_xts": False, "require_rapl_dis": False,
        "require_ciphertext_hiding": False, "require_page_swap_disable": False,
        "strict_policy": True, "minimum_guest_svn": 0,
        **{f: getattr(rep, f).hex() for f in ("report_data", "host_data", "measurement",
                                              "family_id", "image_id", "report_id",
                                              "report_id_ma", "chip_id")},
        "vmpl": 0, "minimum_build": 1, "minimum_version": "1.0",
        "permit_provisional_firmware": False, "require_current_ge_committed": True,
        "minimum_tcb": {k: {"snp": 1} for k in ("reported", "committed", "launch", "current")},
        "platform_allow_smt_en": True, "platform_allow_tsme_en": False,
        "platform_allow_tio_en": False, "platform_require_ecc_en": True,
        "platform_require_rapl_dis": False, "platform_require_ciphertext_hiding_en": False,
        "platform_require_alias_check_complete": True, "strict_platform_info": True,
        "minimum_launch_mit_vector": 1, "minimum_current_mit_vector": 1,
        "require_author_key": False, "require_id_block": False,
    }
    checks = AppraisalPolicy.from_mapping(data).appraise(rep, Product.GENOA)
    assert len(checks) == len(data) - 1 + 4  # minimum_tcb holds four rules
    assert all(c.name.startswith("policy.") for c in checks)
    assert [c.name for c in checks if not c.ok] == []


# -- properties ---------------------------------------------------------------------------

_KNOWN = ["allow_debug", "measurement", "report_data", "vmpl", "minimum_tcb", "minimum_abi",
          "minimum_version", "minimum_build", "chip_id", "minimum_launch_mit_vector",
          "trusted_id_keys", "trusted_author_key_digests", "strict_policy"]
_scalars = (st.none() | st.booleans() | st.integers(min_value=-(1 << 70), max_value=1 << 70)
            | st.floats(allow_nan=True) | st.text(max_size=140)
            | st.text(alphabet="0123456789abcdefABCDEFx.", max_size=140))
_values = st.recursive(_scalars, lambda inner: st.lists(inner, max_size=4)
                       | st.dictionaries(st.sampled_from(["reported", "launch", "snp", "fmc",
                                                          "tee", "x"]) | st.text(max_size=5),
                                         inner, max_size=4), max_leaves=12)


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.sampled_from(_KNOWN) | st.text(max_size=12) | st.integers(),
                       _values, max_size=5))
def test_from_mapping_only_raises_config_error(data: Dict[object, object]) -> None:
    try:
        policy = AppraisalPolicy.from_mapping(data)  # type: ignore[arg-type]
    except ConfigError as exc:
        assert str(exc).startswith("policy: ")
    else:
        assert isinstance(policy, AppraisalPolicy)


@settings(max_examples=100, deadline=None)
@given(st.binary(min_size=48, max_size=48), st.booleans(), st.booleans())
def test_measurement_hex_round_trip(value: bytes, prefix: bool, upper: bool) -> None:
    text = value.hex().upper() if upper else value.hex()
    p = pol(measurement=("0x" if prefix else "") + text)
    assert p.measurement == (value,)


# -- Azure vTPM evidence rules -------------------------------------------------


def test_evidence_rules_parse() -> None:
    a, b, c = "aa" * 32, "bb" * 32, "CC" * 32
    policy = AppraisalPolicy.from_toml(
        f'[pcrs]\n0 = "{a}"\n7 = ["{b}", "0x{c}"]\n'
        '[vm_configuration]\nsecure-boot = true\nvmUniqueId = "26F8"\n')
    assert policy.pcrs == ((0, (b"\xaa" * 32,)), (7, (b"\xbb" * 32, b"\xcc" * 32)))
    assert policy.vm_configuration == (("secure-boot", True), ("vmUniqueId", "26F8"))
    assert policy.evidence_rules
    assert not policy.report_rules().evidence_rules
    assert policy.report_rules() == AppraisalPolicy()


@pytest.mark.parametrize("text, match", [
    ('[pcrs]\n24 = "%s"' % ("00" * 32), r"pcrs\.24: a PCR index is 0\.\.23"),
    ('[pcrs]\n07 = "%s"' % ("00" * 32), r"pcrs\.07: a PCR index is 0\.\.23"),
    ('[pcrs]\n"-1" = "%s"' % ("00" * 32), r"pcrs\.-1: a PCR index is 0\.\.23"),
    ('[pcrs]\n0 = "%s"' % ("00" * 48), r"pcrs\.0: expected 64 hex digits, got 96"),
    ('[pcrs]\n0 = []', r"pcrs\.0: an empty list would reject every report"),
    ("[pcrs]", "pcrs: no PCR given"),
    ("pcrs = 3", "pcrs: expected a table, got integer"),
    ("[vm_configuration]", "vm_configuration: no key given"),
    ("[vm_configuration]\nsecure-boot = 1", r"vm_configuration\.secure-boot: expected a "
                                            "boolean or a string, got integer"),
    ('[vm_configuration]\n"" = true', r"vm_configuration\.: a vm-configuration key is 1-64"),
])
def test_evidence_rules_reject(text: str, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        AppraisalPolicy.from_toml(text)


def test_evidence_rules_checked_in_the_constructor() -> None:
    with pytest.raises(ConfigError, match="AppraisalPolicy.pcrs"):
        AppraisalPolicy(pcrs=((24, (bytes(32),)),))
    with pytest.raises(ConfigError, match="AppraisalPolicy.pcrs"):
        AppraisalPolicy(pcrs=((0, bytes(32)),))  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="AppraisalPolicy.vm_configuration"):
        AppraisalPolicy(vm_configuration=(("secure-boot", 1),))  # type: ignore[arg-type]


@needs_vectors
def test_evidence_rules_fail_a_bare_report() -> None:
    """A bare report has no quote or runtime data: an evidence rule fails it rather
    than pass unchecked, so a policy written for Azure never waves a report through."""
    policy = pol(vm_configuration={"secure-boot": True}, pcrs={"0": "00" * 32})
    checks = appraise(policy, sorted(PRODUCTS)[0])
    assert {name: c.status for name, c in checks.items()} == {
        "policy.pcrs": Status.FAIL, "policy.vm_configuration": Status.FAIL}
    assert "Azure vTPM evidence" in checks["policy.pcrs"].detail
