"""Smoke test: every shared vector's report.bin goes through snpd.abi."""

from __future__ import annotations

import pytest

import snpd.abi
from snpd.errors import ReportFormatError


def test_every_vector_report_parses(cases, case_dir):
    parsed = 0
    for case in cases:
        raw = (case_dir(case) / "report.bin").read_bytes()
        assert len(raw) == snpd.abi.REPORT_SIZE, case["id"]
        if case.get("parse_error"):
            with pytest.raises(ReportFormatError):
                snpd.abi.parse_report(raw)
            continue
        report = snpd.abi.parse_report(raw)
        assert report.version == case["report_version"], case["id"]
        assert report.vmpl == case["vmpl"], case["id"]
        assert report.raw == raw
        parsed += 1
    assert parsed >= 4


def test_fake_v0_report_is_a_format_error(case_dir):
    raw = (case_dir("neg-oak-fake-v0") / "report.bin").read_bytes()
    with pytest.raises(ReportFormatError, match="version 0"):
        snpd.abi.parse_report(raw)
