"""``snpctl verify`` as a drop-in for snpguest v0.10's ``verify`` (issue 11, items 1 and 4).

The command lines are snpguest's own, from its manual and README (docs/snpguest.1.adoc,
README.md at v0.10.0) plus the ``--id-key-digest`` / ``--author-key-digest`` flags of
commit 5d8c1e3, run against certs dirs built here: copies of the real AMD vectors
(``../shared/vectors``) and emulated chains (given with ``--trust-root``).

What snpctl keeps stricter, on purpose: the chain is always checked against pinned
roots, and ``-t``/``-s`` give a partial verdict ("PASSED (...)", exit 0, JSON
``valid: false, partial: true``), never "VALID". A certs dir whose files are not what
their names say is an invalid verdict (exit 1), not a usage error.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any, Callable, Tuple

import pytest
from emuplatform import NOW, Platform, build_report  # type: ignore[import-not-found]
from snpctlrun import run, run_json  # type: ignore[import-not-found]

from snpd.abi.product import Endorser
from snpd.abi.report import AttestationReport
from snpd.certsdir import write_certs_dir
from snpd.emulator.sign import sign_report
from snpd.errors import InvalidArgument
from snpd.trust.appraisal import expected_value

AT = "2026-06-01T00:00:00Z"  # emuplatform.NOW


def copy_case(case_dir: Callable[[Any], Path], case: str, to: Path) -> Tuple[Path, Path]:
    """A snpguest certs dir (``certs``) and ``attestation-report.bin`` from a vector."""
    certs = to / "certs"
    certs.mkdir()
    src = case_dir(case)
    for f in src.iterdir():
        if f.name != "report.bin":
            shutil.copy(f, certs / f.name)
    report = to / "attestation-report.bin"
    shutil.copy(src / "report.bin", report)
    return certs, report


def fields(report: Path) -> AttestationReport:
    return AttestationReport.from_bytes(report.read_bytes())


@pytest.fixture
def emulated(tmp_path: Path, milan: Platform) -> Tuple[Path, Path, Path]:
    """(certs dir, report, trust root) for an emulated Milan with set report fields."""
    certs = tmp_path / "certs"
    write_certs_dir(certs, milan.certs(), "pem")
    raw = build_report(milan.product, report_data=b"A" * 64)
    raw[0xC0:0xE0] = bytes(range(32))  # HOST_DATA
    raw[0xE0:0x110] = b"\x02" * 48  # ID_KEY_DIGEST
    raw[0x110:0x140] = b"\x03" * 48  # AUTHOR_KEY_DIGEST
    report = tmp_path / "report.bin"
    report.write_bytes(sign_report(bytes(raw), milan.vcek_key))
    root = tmp_path / "root.pem"
    root.write_text(milan.chain.ark.to_pem())
    return certs, report, root


# -- snpguest's manual, verbatim ------------------------------------------------------------


@pytest.mark.parametrize("case", ["genoa-v5-vcek", "turin-v5-vcek", "milan-v2-vcek"])
def test_the_manuals_command_lines(case: str, tmp_path: Path, case_dir: Callable[[Any], Path],
                                   monkeypatch: pytest.MonkeyPatch) -> None:
    certs, report = copy_case(case_dir, case, tmp_path)
    r = fields(report)
    monkeypatch.chdir(tmp_path)  # the manual's relative paths
    assert run("verify", "certs", "./certs")[0] == 0
    code, out, _ = run("verify", "attestation", "./certs", "attestation-report.bin")
    assert code == 0 and out.splitlines()[-1].startswith("VALID: "), out
    # "Verify Attestation Measurement / host-data / report-data only": flags first.
    for flag, value in (("--measurement", r.measurement), ("--host-data", r.host_data),
                        ("--report-data", r.report_data)):
        code, out, _ = run("verify", "attestation", flag, "0x" + value.hex(), str(certs),
                           str(report))
        assert code == 0, out
        assert f"PASS  policy.{flag[2:].replace('-', '_')}" in out


def test_tcb_only_is_partial_and_never_valid(tmp_path: Path,
                                             case_dir: Callable[[Any], Path]) -> None:
    certs, report = copy_case(case_dir, "genoa-v5-vcek", tmp_path)
    for flag in ("-t", "--tcb"):
        code, out, _ = run("verify", "attestation", certs, report, flag)
        assert code == 0, out
        assert "VALID" not in out
        assert ("  SKIP  report.signature           not checked: skipped on request "
                "(TCB only)") in out
        assert out.splitlines()[-1].startswith(
            "PASSED (TCB only; skipped: report.signature): "), out
        assert "PASS  binding.tcb" in out and "PASS  binding.hwid" in out
        assert "PASS  chain.ark_trusted" in out  # the chain is always checked
    code, doc = run_json("verify", "attestation", certs, report, "--tcb")
    assert code == 0
    assert doc["valid"] is False and doc["partial"] is True
    assert doc["skipped"] == ["report.signature"] and doc["failures"] == []
    # Without the flag the same run is complete and valid.
    code, doc = run_json("verify", "attestation", certs, report)
    assert code == 0 and doc["valid"] is True and doc["partial"] is False
    assert doc["skipped"] == []


def test_signature_only_is_partial_and_never_valid(tmp_path: Path,
                                                   case_dir: Callable[[Any], Path]) -> None:
    certs, report = copy_case(case_dir, "turin-v5-vcek", tmp_path)
    for flag in ("-s", "--signature"):
        code, out, _ = run("verify", "attestation", certs, report, flag)
        assert code == 0, out
        assert "VALID" not in out
        assert out.splitlines()[-1].startswith(
            "PASSED (signature only; skipped: binding.hwid, binding.tcb): "), out
        assert "SKIP  binding.hwid" in out and "SKIP  binding.tcb" in out
        assert "PASS  report.signature" in out
    code, doc = run_json("verify", "attestation", certs, report, "-s")
    assert code == 0
    assert doc["valid"] is False and doc["partial"] is True
    assert doc["skipped"] == ["binding.hwid", "binding.tcb"]


def test_tcb_and_signature_are_mutually_exclusive(tmp_path: Path,
                                                  case_dir: Callable[[Any], Path]) -> None:
    certs, report = copy_case(case_dir, "genoa-v5-vcek", tmp_path)
    code, _, err = run("verify", "attestation", certs, report, "-t", "-s")
    assert code == 2 and "not allowed with" in err


def test_tcb_only_ignores_a_bad_signature_and_signature_only_a_bad_tcb(
        tmp_path: Path, milan: Platform) -> None:
    """What each flag leaves out is really left out, as in snpguest; what it keeps
    still fails."""
    write_certs_dir(tmp_path, milan.certs(), "pem")
    (tmp_path / "root.pem").write_text(milan.chain.ark.to_pem())
    opts = ("--at", AT, "--trust-root", tmp_path / "root.pem")
    forged = bytearray(milan.report())
    forged[0x50] ^= 1  # REPORT_DATA changed after signing
    (tmp_path / "forged.bin").write_bytes(forged)
    from snpd.abi.tcb import TcbVersion

    other_tcb = TcbVersion.from_parts(milan.product, bootloader=4, tee=0, snp=25, microcode=217)
    (tmp_path / "tcb.bin").write_bytes(milan.report(reported_tcb=other_tcb))
    assert run("verify", "attestation", tmp_path, tmp_path / "forged.bin", *opts)[0] == 1
    assert run("verify", "attestation", tmp_path, tmp_path / "forged.bin", "-t", *opts)[0] == 0
    code, out, _ = run("verify", "attestation", tmp_path, tmp_path / "forged.bin", "-s", *opts)
    assert code == 1 and out.splitlines()[-1].startswith(
        "INVALID (signature only; skipped: binding.hwid, binding.tcb): "), out
    assert out.splitlines()[-1].endswith("failed report.signature")
    assert run("verify", "attestation", tmp_path, tmp_path / "tcb.bin", *opts)[0] == 1
    assert run("verify", "attestation", tmp_path, tmp_path / "tcb.bin", "-s", *opts)[0] == 0
    code, doc = run_json("verify", "attestation", tmp_path, tmp_path / "tcb.bin", "-t", *opts)
    assert code == 1 and doc["failures"] == ["binding.tcb"] and doc["partial"] is True


# -- -p / --processor-model ----------------------------------------------------------------


def test_processor_model_spellings(tmp_path: Path, case_dir: Callable[[Any], Path]) -> None:
    certs, report = copy_case(case_dir, "milan-v2-vcek", tmp_path)
    for argv in (("-p", "milan"), ("--processor-model", "MILAN"), ("--processor_model", "Milan"),
                 ("--product", "Milan"), ("-pmilan",), ("--processor-model=mIlAn",)):
        code, out, err = run("verify", "attestation", certs, report, *argv)
        assert code == 0, (argv, out, err)
        assert "requested: Milan" in out
    code, _, err = run("verify", "attestation", certs, report, "-p", "Rome")
    assert code == 2 and "invalid choice: 'Rome'" in err


def test_processor_model_bergamo_and_siena_are_genoa(tmp_path: Path,
                                                     case_dir: Callable[[Any], Path]) -> None:
    certs, report = copy_case(case_dir, "genoa-v5-vcek", tmp_path)
    for model in ("bergamo", "Siena", "GENOA"):
        code, out, _ = run("verify", "attestation", certs, report, "-p", model)
        assert code == 0 and "requested: Genoa" in out, out


def test_a_v2_report_needs_no_model_and_a_wrong_model_fails(
        tmp_path: Path, case_dir: Callable[[Any], Path]) -> None:
    """snpguest errors on a v2 Milan report without -p; snpctl takes the product from the
    pinned ARK and productName. A model that disagrees with them fails (snpguest only
    uses the model to decide on Turin's FMC check, and ignores a wrong one)."""
    certs, report = copy_case(case_dir, "milan-v2-vcek", tmp_path)
    assert run("verify", "attestation", certs, report)[0] == 0
    code, doc = run_json("verify", "attestation", certs, report, "-p", "genoa")
    assert code == 1 and "binding.product" in doc["failures"]


# -- expected values -----------------------------------------------------------------------


def test_each_expected_value_flag_passes_and_fails(emulated: Tuple[Path, Path, Path]) -> None:
    certs, report, root = emulated
    opts = ("--at", AT, "--trust-root", root)
    r = fields(report)
    values = {"-m": r.measurement, "-d": r.host_data, "-r": r.report_data,
              "--id-key-digest": r.id_key_digest, "--author-key-digest": r.author_key_digest}
    names = {"-m": "measurement", "-d": "host_data", "-r": "report_data",
             "--id-key-digest": "id_key_digest", "--author-key-digest": "author_key_digest"}
    argv = [a for flag, v in values.items() for a in (flag, "0x" + v.hex())]
    code, doc = run_json("verify", "attestation", certs, report, *argv, *opts)
    assert code == 0 and doc["valid"] is True
    passed = [c["name"] for c in doc["checks"] if c["name"].startswith("policy.")]
    assert sorted(passed) == sorted(f"policy.{n}" for n in names.values())
    for flag, value in values.items():
        wrong = bytes([value[0] ^ 0xFF]) + value[1:]
        code, out, _ = run("verify", "attestation", certs, report, flag, "0x" + wrong.hex(),
                           *opts)
        assert code == 1, (flag, out)
        assert out.splitlines()[-1].endswith(f"failed policy.{names[flag]}"), out


def test_expected_values_are_read_as_snpguest_reads_them(
        emulated: Tuple[Path, Path, Path]) -> None:
    certs, report, root = emulated
    opts = ("--at", AT, "--trust-root", root)
    host = bytes(range(32)).hex()

    def code_of(*argv: str) -> int:
        return run("verify", "attestation", certs, report, *argv, *opts)[0]

    assert code_of("-r", "A" * 64) == 0  # no 0x: the argument's own 64 bytes
    assert code_of("-r", "B" * 64) == 1
    assert code_of("-d", "0x" + host.upper()) == 0  # hex digits in any case
    assert code_of("-d", host) == 0  # 64 hex digits without 0x (snpguest: a length error)
    assert code_of("-r", "0x" + "41" * 32) == 2  # never padded
    assert code_of("-r", "A" * 65) == 2  # never truncated
    assert code_of("-d", "0x" + host[:-1]) == 2  # odd
    assert code_of("-d", "0x" + host[:-2] + "zz") == 2
    assert code_of("-d", "0X" + host) == 2  # "0X" is not snpguest's prefix: 66 bytes


def test_expected_value_errors_name_the_flag(emulated: Tuple[Path, Path, Path]) -> None:
    certs, report, _ = emulated
    code, _, err = run("verify", "attestation", certs, report, "-m", "0x1234")
    assert code == 2
    assert "-m/--measurement: expected 0x and 96 hex digits (48 bytes), got 4 digits" in err
    code, _, err = run("verify", "attestation", certs, report, "--author-key-digest", "abc")
    assert code == 2 and "--author-key-digest: expected 48 bytes" in err and "got 3" in err


def test_expected_value_parsing() -> None:
    assert expected_value("0x" + "ab" * 32, "host_data") == b"\xab" * 32
    assert expected_value("0x" + "AB" * 32, "host_data") == b"\xab" * 32
    assert expected_value("ab" * 32, "host_data") == b"\xab" * 32
    assert expected_value("x" * 32, "host_data") == b"x" * 32
    assert expected_value("é" * 16, "host_data") == "é".encode() * 16  # UTF-8, as Rust's
    assert expected_value("0" * 32, "host_data") == b"0" * 32  # 32 characters, not hex
    for bad in ("", "0x", "0x" + "ab" * 31, "0x " + "ab" * 31 + "a", "ab" * 31, "x" * 33):
        with pytest.raises(InvalidArgument):
            expected_value(bad, "host_data", flag="-d")


def test_expected_values_combine_with_a_policy_file(tmp_path: Path,
                                                    emulated: Tuple[Path, Path, Path]) -> None:
    certs, report, root = emulated
    (tmp_path / "p.toml").write_text("vmpl = 1\n")
    code, doc = run_json("verify", "attestation", certs, report, "--policy", tmp_path / "p.toml",
                         "-d", "0x" + bytes(32).hex(), "--at", AT, "--trust-root", root)
    assert code == 1 and doc["failures"] == ["policy.vmpl", "policy.host_data"]


# -- certs dirs: names in any case, VCEK and VLEK ------------------------------------------


def test_upper_case_file_names_are_read(tmp_path: Path, case_dir: Callable[[Any], Path]) -> None:
    certs, report = copy_case(case_dir, "turin-v5-vcek", tmp_path)
    for name, upper in (("ark.pem", "ARK.PEM"), ("ask.pem", "Ask.pem"), ("vcek.der", "VCEK.DER")):
        (certs / name).rename(certs / upper)
    assert run("verify", "certs", certs)[0] == 0
    code, out, _ = run("verify", "attestation", certs, report)
    assert code == 0 and out.splitlines()[-1].startswith("VALID"), out


def test_which_file_wins_when_names_differ_only_in_case(
        tmp_path: Path, case_dir: Callable[[Any], Path], genoa: Platform) -> None:
    """.pem before .der in any case; then the lower-case name (snpguest's); then the
    first name in code-point order. Another ARK in the losing file would fail."""
    certs, report = copy_case(case_dir, "genoa-v5-vcek", tmp_path)
    good = (certs / "ark.pem").read_bytes()
    other = genoa.chain.ark.to_pem().encode()

    def verdict() -> int:
        return run("verify", "attestation", certs, report)[0]

    (certs / "ARK.PEM").write_bytes(other)
    if len(os.listdir(certs)) == 3:
        pytest.fail("case-insensitive file system: ARK.PEM replaced ark.pem")
    assert verdict() == 0  # ark.pem beats ARK.PEM
    (certs / "ark.pem").unlink()
    (certs / "Ark.pem").write_bytes(good)
    assert verdict() == 1  # "ARK.PEM" < "Ark.pem"
    (certs / "ARK.PEM").unlink()
    assert verdict() == 0
    (certs / "ark.der").write_bytes(genoa.chain.ark.der)
    assert verdict() == 0  # Ark.pem beats ark.der


def test_vcek_and_vlek_in_one_dir(tmp_path: Path, milan: Platform) -> None:
    """verify certs checks the VCEK's chain when both are present (snpguest's manual) and
    says the VLEK was not checked; verify attestation uses the key KEY_INFO names."""
    write_certs_dir(tmp_path, milan.certs(), "pem")
    write_certs_dir(tmp_path, milan.certs(Endorser.VLEK), "der")
    (tmp_path / "root.pem").write_text(milan.chain.ark.to_pem())
    opts = ("--at", AT, "--trust-root", tmp_path / "root.pem")
    code, out, _ = run("verify", "certs", tmp_path, *opts)
    assert code == 0 and "PASS  chain.vcek_signature" in out
    assert "SKIP  chain.vlek_signature       VLEK not checked" in out
    for endorser in Endorser:
        (tmp_path / "report.bin").write_bytes(milan.report(endorser))
        code, out, _ = run("verify", "attestation", tmp_path, tmp_path / "report.bin", *opts)
        assert code == 0 and f"PASS  chain.{endorser.value}_signature" in out, out


# -- item 4: a certs dir that lies about itself --------------------------------------------


@pytest.mark.parametrize("command", ["certs", "attestation"])
def test_an_asvk_file_holding_an_ask_is_an_invalid_verdict(
        command: str, tmp_path: Path, case_dir: Callable[[Any], Path]) -> None:
    certs, report = copy_case(case_dir, "genoa-v5-vcek", tmp_path)
    shutil.copy(certs / "ask.pem", certs / "asvk.pem")
    argv = ["verify", command, certs] + ([report] if command == "attestation" else [])
    code, out, err = run(*argv)
    assert code == 1, err
    assert "  FAIL  chain.certificates         asvk.pem holds an ASK certificate, not an ASVK" \
        in out
    assert out.splitlines()[-1].startswith("INVALID")
    assert "failed chain.certificates" in out.splitlines()[-1]
    code, doc = run_json(*argv)
    assert code == 1 and doc["valid"] is False and doc["failures"] == ["chain.certificates"]


@pytest.mark.parametrize("command", ["certs", "attestation"])
def test_a_vlek_file_holding_a_vcek_is_an_invalid_verdict(
        command: str, tmp_path: Path, case_dir: Callable[[Any], Path]) -> None:
    certs, report = copy_case(case_dir, "milan-v3-vlek", tmp_path)
    (certs / "vlek.der").write_bytes((case_dir("milan-v2-vcek") / "vcek.der").read_bytes())
    argv = ["verify", command, certs, *([report] if command == "attestation" else []),
            "--at", "2025-06-01T00:00:00Z"]
    code, out, err = run(*argv)
    assert code == 1, err
    assert "vlek.der holds a VCEK certificate, not a VLEK; missing: VLEK" in out


@pytest.mark.parametrize("name, content, says", [
    ("vcek.pem", b"hello\n", "vcek.pem is not a VCEK certificate"),
    ("ark.der", b"\x30\x03\x02\x01\x00", "ark.der is not an ARK certificate"),
    ("crl.pem", None, "crl.pem is not a CRL"),
    ("ask.pem", None, "ask.pem holds a VCEK certificate, not an ASK"),
])
def test_files_that_are_not_what_their_names_say(name: str, content: Any, says: str,
                                                 tmp_path: Path,
                                                 case_dir: Callable[[Any], Path]) -> None:
    """Bytes that are no certificate come from the same place as a mislabelled one
    (the host, or whoever assembled the dir): evidence that fails, exit 1."""
    certs, report = copy_case(case_dir, "genoa-v5-vcek", tmp_path)
    for f in certs.glob(name.split(".")[0] + ".*"):
        f.unlink()
    (certs / name).write_bytes(content if content is not None
                               else (case_dir("genoa-v5-vcek") / "vcek.der").read_bytes())
    for argv in (("certs", certs), ("attestation", certs, report)):
        code, out, err = run("verify", *argv)
        assert code == 1, (argv, out, err)
        assert says in out and err == ""


def test_what_cannot_be_read_stays_a_usage_error(tmp_path: Path,
                                                 case_dir: Callable[[Any], Path]) -> None:
    certs, report = copy_case(case_dir, "genoa-v5-vcek", tmp_path)
    code, _, err = run("verify", "attestation", tmp_path / "nope", report)
    assert code == 2 and "not a directory" in err
    (certs / "vcek.der").write_bytes(bytes((1 << 20) + 1))
    code, _, err = run("verify", "attestation", certs, report)
    assert code == 2 and "larger than" in err
    empty = tmp_path / "empty"
    empty.mkdir()
    code, _, err = run("verify", "certs", empty)
    assert code == 2 and "holds no ark/ask/asvk/vcek/vlek/crl" in err


def test_an_unreadable_file_is_a_usage_error(tmp_path: Path,
                                             case_dir: Callable[[Any], Path]) -> None:
    certs, report = copy_case(case_dir, "genoa-v5-vcek", tmp_path)
    if os.geteuid() == 0:  # root reads a mode-0 file: use one whose read fails (EIO)
        (certs / "ask.pem").unlink()
        (certs / "ask.pem").symlink_to("/proc/self/mem")
    else:
        (certs / "ask.pem").chmod(0)
    code, _, err = run("verify", "attestation", certs, report)
    assert code == 2 and "cannot read certificate file" in err


def test_a_lying_dir_through_the_python_api(tmp_path: Path,
                                            case_dir: Callable[[Any], Path]) -> None:
    import snpd

    certs, report = copy_case(case_dir, "genoa-v5-vcek", tmp_path)
    shutil.copy(certs / "ask.pem", certs / "asvk.pem")
    verdict = snpd.verify_attestation(report.read_bytes(), certs, at=NOW)
    assert not verdict and [c.name for c in verdict.failures] == ["chain.certificates"]
