"""Every real vector gets its expected verdict, through the API and through snpctl."""

from __future__ import annotations

import datetime
import io
import json
import random
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import pytest

import snpd
from snpd.cli import snpctl
from snpd.trust.verify import Verifier

Case = Dict[str, Any]


def at_of(case: Case) -> Optional[datetime.datetime]:
    if not case["verify_at"]:
        return None
    return datetime.datetime.fromisoformat(case["verify_at"].replace("Z", "+00:00"))


def run_snpctl(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = snpctl.main(list(argv), stdout=out, stderr=err)
    return code, out.getvalue(), err.getvalue()


def test_every_case_through_snpctl(cases: List[Case], case_dir: Callable[[Any], Path]) -> None:
    assert len(cases) >= 8
    for case in cases:
        d = case_dir(case)
        argv = ["verify", "attestation", str(d), str(d / "report.bin"), "--json"]
        if case["verify_at"]:
            argv += ["--at", case["verify_at"]]
        code, out, err = run_snpctl(*argv)
        doc = json.loads(out)
        if case["expect"] == "valid":
            assert code == 0, (case["id"], doc["failures"], err)
            assert doc["valid"] is True
            assert doc["product"] == case["product"]
        else:
            assert code == 1, (case["id"], out, err)
            assert doc["valid"] is False
            assert doc["failures"], case["id"]


def test_every_case_through_the_api(cases: List[Case], case_dir: Callable[[Any], Path]) -> None:
    for case in cases:
        d = case_dir(case)
        verdict = snpd.verify_attestation((d / "report.bin").read_bytes(), d, at=at_of(case))
        assert bool(verdict) is (case["expect"] == "valid"), (case["id"], verdict.failures)


def test_negative_cases_fail_for_the_documented_reason(case_dir: Callable[[Any], Path]) -> None:
    def first_failure(case_id: str) -> str:
        d = case_dir(case_id)
        verdict = snpd.verify_attestation((d / "report.bin").read_bytes(), d)
        return verdict.failures[0].name

    assert first_failure("neg-oak-fake-v0") == "report.format"
    assert first_failure("neg-invalid-vcek-legacy") == "chain.vcek_signature"
    assert first_failure("neg-invalid-vcek-new") == "chain.vcek_signature"
    d = case_dir("neg-milan-report-genoa-vcek")
    verdict = snpd.verify_attestation((d / "report.bin").read_bytes(), d)
    assert verdict.check("chain.vcek_signature").status.value == "pass"  # type: ignore[union-attr]
    assert verdict.check("report.signature").status.value == "fail"  # type: ignore[union-attr]


def test_vlek_case_is_expired_now(case_dir: Callable[[Any], Path]) -> None:
    d = case_dir("milan-v3-vlek")
    now = datetime.datetime(2026, 1, 1, tzinfo=datetime.timezone.utc)
    verdict = snpd.verify_attestation((d / "report.bin").read_bytes(), d, at=now)
    assert [c.name for c in verdict.failures] == ["chain.vlek_validity"]
    assert "expired" in verdict.failures[0].detail
    assert verdict.check("binding.hwid").status.value == "skipped"  # type: ignore[union-attr]


@pytest.mark.parametrize("case_id", ["milan-v2-vcek", "milan-v3-vlek", "genoa-v5-vcek",
                                     "turin-v5-vcek"])
def test_single_bit_flips_invalidate(case_id: str, cases: List[Case],
                                     case_dir: Callable[[Any], Path]) -> None:
    """Flipping any one bit of the signed region or the signature makes the report invalid."""
    case = next(c for c in cases if c["id"] == case_id)
    d = case_dir(case)
    raw = (d / "report.bin").read_bytes()
    certs = snpd.certificate_set(d)
    verifier = Verifier()
    at = at_of(case)
    assert verifier.verify(raw, certs, at=at)
    rng = random.Random(case_id)
    # Every byte of R and S's significant halves once, plus a sample of the rest.
    bits = [byte * 8 + rng.randrange(8) for byte in range(0x2A0, 0x330)]
    bits += rng.sample(range(0x2A0 * 8), 150)
    bits += rng.sample(range(0x330 * 8, 0x4A0 * 8), 20)
    for bit in bits:
        flipped = bytearray(raw)
        flipped[bit // 8] ^= 1 << (bit % 8)
        verdict = verifier.verify(bytes(flipped), certs, at=at)
        assert not verdict, f"{case_id}: flipping bit {bit} (byte 0x{bit // 8:x}) still valid"
