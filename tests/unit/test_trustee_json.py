"""Trustee's SNP report JSON back to the raw report (snpd/abi/trustee.py): the bytes
that :func:`snpd.evidence.trustee_report` serialized, identical, for the shared vectors'
real reports (v3 to v5; Trustee takes no v2) and the emulator's, and a typed error
naming the field for what is not a report."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Dict, List

import pytest
from emuplatform import Platform  # type: ignore[import-not-found]

from snpd.abi.product import Product
from snpd.abi.report import parse_report
from snpd.abi.trustee import report_from_trustee_json
from snpd.errors import EvidenceFormatError
from snpd.evidence import trustee_report


def _round_trip(raw: bytes, product: Product) -> None:
    doc = json.loads(json.dumps(trustee_report(parse_report(raw), product)))
    assert report_from_trustee_json(doc) == raw


def test_trustee_json_reverse_on_real_reports(cases: List[Dict[str, Any]],
                                              case_dir: Callable[[Any], Path],
                                              vectors_dir: Path) -> None:
    done = 0
    for case in cases:
        path = case_dir(case) / "report.bin"
        if case["expect"] != "valid" or not path.is_file():
            continue
        raw = path.read_bytes()
        if parse_report(raw).version < 3:  # Trustee takes v3 to v5 only
            continue
        _round_trip(raw, Product.parse(case["product"]))
        done += 1
    golden = vectors_dir / "golden" / "trustee-evidence.report.bin"
    _round_trip(golden.read_bytes(), Product.GENOA)
    assert done >= 3


@pytest.mark.parametrize("version", [3, 4, 5])
def test_trustee_json_reverse_on_emulator_reports(platform: Platform, version: int) -> None:
    _round_trip(platform.report(version=version, report_data=bytes(range(64))),
                platform.product)


def test_trustee_json_reverse_names_the_bad_field(milan: Platform) -> None:
    doc = trustee_report(parse_report(milan.report()), Product.MILAN)
    for field, value, says in (("measurement", [0] * 47, "measurement"),
                               ("policy", -1, "policy"), ("vmpl", True, "vmpl"),
                               ("current_tcb", {"tee": 0}, "current_tcb.bootloader"),
                               ("signature", {"r": [0] * 72}, "signature.s"),
                               ("chip_id", [256] * 64, "chip_id")):
        with pytest.raises(EvidenceFormatError, match=says):
            report_from_trustee_json({**doc, field: value})
    with pytest.raises(EvidenceFormatError, match="report_data is missing"):
        report_from_trustee_json({k: v for k, v in doc.items() if k != "report_data"})
    with pytest.raises(EvidenceFormatError):
        report_from_trustee_json([doc])
