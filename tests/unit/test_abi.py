"""Report ABI: layout, versions, TCB layouts, product detection, bit fields."""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Any, Callable

import pytest
from hypothesis import given
from hypothesis import strategies as st

from snpd.abi import (
    AttestationReport,
    Product,
    TcbVersion,
    parse_report,
    product_from_cpuid,
    product_from_cpuid_eax,
)
from snpd.errors import ReportFormatError


def real(case_dir: Callable[[Any], Path], case: str) -> AttestationReport:
    return parse_report((case_dir(case) / "report.bin").read_bytes())


def test_fields_of_real_reports(case_dir: Callable[[Any], Path]) -> None:
    milan = real(case_dir, "milan-v2-vcek")
    assert milan.version == 2 and milan.cpuid_fam_id is None and milan.cpuid_product is None
    assert milan.policy.raw == 0xB0000 and milan.policy.flag("debug")
    assert milan.reported_tcb == 0x4405000000000002
    assert str(milan.current) == "1.49 build 3"
    assert milan.launch_mit_vector is None

    vlek = real(case_dir, "milan-v3-vlek")
    assert vlek.vmpl == 1 and vlek.signing_key == 1 and vlek.chip_id_masked
    assert vlek.cpuid_product is Product.MILAN
    assert vlek.platform_info.raw == 0x27 and vlek.platform_info.flag("alias_check_complete")

    genoa = real(case_dir, "genoa-v5-vcek")
    assert genoa.launch_mit_vector == 1 and genoa.current_mit_vector == 1
    assert genoa.cpuid_product is Product.GENOA

    turin = real(case_dir, "turin-v5-vcek")
    assert turin.platform_info.unknown_bits == (6,)
    tcb = turin.tcb("reported", Product.TURIN)
    assert (tcb.fmc, tcb.bootloader, tcb.tee, tcb.snp, tcb.microcode) == (0, 1, 0, 2, 71)
    assert turin.raw == (case_dir("turin-v5-vcek") / "report.bin").read_bytes()


def test_milan_tcb_layout() -> None:
    tcb = TcbVersion.decode(0x4405000000000002, Product.MILAN)
    assert (tcb.bootloader, tcb.tee, tcb.snp, tcb.microcode, tcb.fmc) == (2, 0, 5, 68, None)
    assert TcbVersion.from_parts(Product.MILAN, bootloader=2, tee=0, snp=5,
                                 microcode=68).raw == 0x4405000000000002
    assert TcbVersion.from_parts(Product.TURIN, fmc=0, bootloader=1, tee=0, snp=2,
                                 microcode=71).raw == 0x4700000002000100


def test_tcb_order_is_componentwise() -> None:
    a = TcbVersion.from_parts(Product.MILAN, bootloader=3, tee=0, snp=5, microcode=68)
    b = TcbVersion.from_parts(Product.MILAN, bootloader=2, tee=0, snp=6, microcode=68)
    assert not a <= b and not b <= a  # incomparable, though a.raw < b.raw
    assert a <= a and a >= a


@pytest.mark.parametrize("family, model, product", [
    (0x19, 0x01, Product.MILAN), (0x19, 0x11, Product.GENOA), (0x19, 0xA0, Product.GENOA),
    (0x19, 0xAF, Product.GENOA), (0x1A, 0x02, Product.TURIN), (0x1A, 0x11, Product.TURIN),
    (0x19, 0x30, None), (0x1A, 0x50, None), (0x17, 0x01, None),
])
def test_product_from_cpuid(family: int, model: int, product: Product) -> None:
    assert product_from_cpuid(family, model) is product


def test_product_from_cpuid_eax() -> None:
    assert product_from_cpuid_eax(0x00A00F11) is Product.MILAN
    assert product_from_cpuid_eax(0x00A10F11) is Product.GENOA
    assert product_from_cpuid_eax(0x00B00F21) is Product.TURIN


def test_product_names() -> None:
    assert Product.parse("Milan-B0") is Product.MILAN
    assert Product.parse("genoa") is Product.GENOA
    with pytest.raises(ValueError):
        Product.parse("Venice")


@pytest.mark.parametrize("version", [0, 1, 6, 0xFFFFFFFF])
def test_unsupported_versions(version: int) -> None:
    raw = struct.pack("<I", version) + bytes(1180)
    with pytest.raises(ReportFormatError, match=f"version {version} is not supported"):
        parse_report(raw)


@pytest.mark.parametrize("size", [0, 1183, 1185, 4000])
def test_wrong_sizes(size: int) -> None:
    with pytest.raises(ReportFormatError, match="exactly 1184 bytes"):
        parse_report(b"\x02" + bytes(size - 1) if size else b"")


def test_version_4_uses_the_v3_layout(case_dir: Callable[[Any], Path]) -> None:
    raw = bytearray((case_dir("milan-v3-vlek") / "report.bin").read_bytes())
    raw[0] = 4
    report = parse_report(bytes(raw))
    assert report.cpuid_product is Product.MILAN and report.launch_mit_vector is None


def test_unknown_cpu_still_parses() -> None:
    raw = bytearray(struct.pack("<I", 3) + bytes(1180))
    raw[0x188:0x18B] = b"\x1a\x55\x00"
    report = parse_report(bytes(raw))
    assert report.cpuid_product is None


def test_reserved_bits_are_reported_not_fatal() -> None:
    raw = bytearray(struct.pack("<IIQ", 5, 0, 0x30000 | 1 << 40) + bytes(1168))
    raw[0x4C] = 1
    report = parse_report(bytes(raw))
    assert report.policy.unknown_bits == (40,)
    assert "reserved_0x04c" in report.nonzero_reserved()


def test_json_view_is_hex(case_dir: Callable[[Any], Path]) -> None:
    doc = real(case_dir, "turin-v5-vcek").to_json()
    assert doc["product"] == "Turin"
    assert doc["chip_id"] == "3b42092f69c656d3" + "00" * 56
    assert doc["reported_tcb"] == {"raw": "0x4700000002000100", "fmc": 0, "bootloader": 1,
                                   "tee": 0, "snp": 2, "microcode": 71}
    v2 = real(case_dir, "milan-v2-vcek")
    assert v2.to_json()["reported_tcb"] == {"raw": "0x4405000000000002"}
    assert v2.to_json(Product.MILAN)["reported_tcb"]["microcode"] == 68  # type: ignore[index]


@given(st.binary(min_size=1184, max_size=1184))
def test_any_1184_bytes_parse_or_raise_typed(data: bytes) -> None:
    try:
        report = parse_report(data)
    except ReportFormatError:
        return
    report.to_json()
