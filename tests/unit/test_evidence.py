"""The Trustee evidence format, rebuilt byte for byte from the golden report and VCEK."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from snpd.abi.product import Product
from snpd.abi.report import parse_report
from snpd.errors import InvalidArgument
from snpd.evidence import trustee_evidence


def test_golden_trustee_evidence(vectors_dir: Path) -> None:
    golden = vectors_dir / "golden"
    report = parse_report((golden / "trustee-evidence.report.bin").read_bytes())
    assert report.cpuid_product is Product.GENOA  # Zen 4c, model 0xA0
    vcek = (golden / "trustee-evidence.vcek.der").read_bytes()
    rebuilt = trustee_evidence(report, Product.GENOA, [("vcek", vcek)])
    assert rebuilt == (golden / "trustee-evidence.json").read_bytes()


def test_turin_and_v5_fields(case_dir: object) -> None:
    d = case_dir("turin-v5-vcek")  # type: ignore[operator]
    report = parse_report((d / "report.bin").read_bytes())
    doc = json.loads(trustee_evidence(report, Product.TURIN))
    assert doc["cert_chain"] is None
    assert doc["attestation_report"]["reported_tcb"]["fmc"] == 0
    assert "launch_mit_vector" in doc["attestation_report"]
    assert list(doc["attestation_report"])[-1] == "signature"


def test_v2_is_refused(case_dir: object) -> None:
    d = case_dir("milan-v2-vcek")  # type: ignore[operator]
    with pytest.raises(InvalidArgument, match="versions 3 to 5"):
        trustee_evidence(parse_report((d / "report.bin").read_bytes()), Product.MILAN)
