"""snpctl end to end (in-process): fetch from a loopback KDS, then verify, as a user would."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest
from emuplatform import NOW, Platform  # type: ignore[import-not-found]
from snpctlrun import run, run_json  # type: ignore[import-not-found]

from snpd.abi.product import Endorser, Product
from snpd.abi.report import parse_report
from snpd.abi.tcb import TcbVersion
from snpd.emulator.kds_server import Fault, KdsServer
from snpd.emulator.pki import make_crl
from snpd.kds import urls

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def amd_kds(vectors_dir: Path) -> Iterator[KdsServer]:
    """A loopback KDS serving AMD's real chains and the real VCEKs of the vectors."""
    with KdsServer() as server:
        for product in Product:
            for endorser in Endorser:
                name = f"{product.value.lower()}_{endorser.value}_chain.pem"
                server.put(urls.cert_chain_path(product, endorser), "application/x-pem-file",
                           (vectors_dir / "roots" / name).read_bytes())
        for case, product in (("milan-v2-vcek", Product.MILAN), ("genoa-v5-vcek", Product.GENOA),
                              ("turin-v5-vcek", Product.TURIN)):
            d = vectors_dir / "cases" / case
            report = parse_report((d / "report.bin").read_bytes())
            tcb = TcbVersion.decode(report.reported_tcb, product)
            server.put(urls.vcek_path(product, report.chip_id, tcb), "application/pkix-cert",
                       (d / "vcek.der").read_bytes())
        yield server


@pytest.mark.parametrize("case", ["turin-v5-vcek", "genoa-v5-vcek"])
def test_snpguest_workflow_against_a_loopback_kds(case: str, tmp_path: Path, vectors_dir: Path,
                                                  amd_kds: KdsServer) -> None:
    report = vectors_dir / "cases" / case / "report.bin"
    certs = tmp_path / "certs"
    code, out, err = run("fetch", "ca", "pem", certs, "--report", report, "--kds-url", amd_kds.url)
    assert code == 0, err
    assert sorted(p.name for p in certs.iterdir()) == ["ark.pem", "ask.pem"]
    code, out, err = run("fetch", "vcek", "der", certs, report, "--kds-url", amd_kds.url)
    assert code == 0, err
    code, out, err = run("verify", "certs", certs)
    assert code == 0 and "VALID" in out, out
    code, out, err = run("verify", "attestation", certs, report, "--json")
    assert code == 0, out
    assert json.loads(out)["valid"] is True
    # The Turin URL uses 8 bytes of chip ID and fmcSPL.
    vcek_url = next(r for r in amd_kds.requests if "SPL" in r)
    if case.startswith("turin"):
        assert "/Turin/3b42092f69c656d3?" in vcek_url and "fmcSPL=0" in vcek_url


def test_fetch_vcek_of_a_v2_report_needs_the_product(tmp_path: Path, vectors_dir: Path,
                                                     amd_kds: KdsServer) -> None:
    report = vectors_dir / "cases" / "milan-v2-vcek" / "report.bin"
    code, _, err = run("fetch", "vcek", "pem", tmp_path, report, "--kds-url", amd_kds.url)
    assert code == 2 and "give -p/--processor-model" in err
    code, _, err = run("fetch", "vcek", "pem", tmp_path, report, "-p", "Milan",
                       "--kds-url", amd_kds.url)
    assert code == 0, err
    assert (tmp_path / "vcek.pem").read_text().startswith("-----BEGIN CERTIFICATE-----")


def test_fetch_ca_for_vlek_and_by_product_name(tmp_path: Path, amd_kds: KdsServer) -> None:
    code, out, err = run("fetch", "ca", "der", tmp_path, "Genoa", "--endorser", "vlek",
                         "--kds-url", amd_kds.url, "--json")
    assert code == 0, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ark.der", "asvk.der"]
    assert json.loads(out)["endorser"] == "vlek"


def test_fetch_ca_refuses_a_chain_that_is_not_amds(tmp_path: Path, milan: Platform,
                                                   amd_kds: KdsServer) -> None:
    fake = (milan.chain.ask.to_pem() + milan.chain.ark.to_pem()).encode()
    amd_kds.put(urls.cert_chain_path(Product.MILAN), "application/x-pem-file", fake)
    code, _, err = run("fetch", "ca", "pem", tmp_path / "d", "Milan", "--kds-url", amd_kds.url)
    assert code == 3 and "not a pinned AMD root" in err
    assert not (tmp_path / "d").exists()
    # The same chain is accepted when its root is given explicitly.
    (tmp_path / "root.pem").write_text(milan.chain.ark.to_pem())
    code, _, err = run("fetch", "ca", "pem", tmp_path / "d", "Milan", "--kds-url", amd_kds.url,
                       "--trust-root", tmp_path / "root.pem")
    assert code == 0, err


def test_fetch_vcek_refuses_a_certificate_for_another_chip(
        tmp_path: Path, vectors_dir: Path, amd_kds: KdsServer) -> None:
    report = vectors_dir / "cases" / "genoa-v5-vcek" / "report.bin"
    wrong = (vectors_dir / "cases" / "milan-v2-vcek" / "vcek.der").read_bytes()
    amd_kds.faults.push(Fault.wrong_body(wrong), count=1)
    code, _, err = run("fetch", "vcek", "der", tmp_path, report, "--kds-url", amd_kds.url)
    assert code == 3 and "VCEK" in err
    assert not (tmp_path / "vcek.der").exists()


def test_kds_failure_exit_code(tmp_path: Path, amd_kds: KdsServer) -> None:
    amd_kds.faults.push(Fault.status(404), count=None)
    code, _, err = run("fetch", "ca", "pem", tmp_path, "Milan", "--kds-url", amd_kds.url,
                       "--timeout", "2")
    assert code == 3 and "404" in err


def test_fetch_crl_is_verified_against_the_ark(tmp_path: Path, milan: Platform) -> None:
    root = tmp_path / "root.pem"
    root.write_text(milan.chain.ark.to_pem())
    crl = make_crl(milan.chain, now=NOW, revoked=[7])
    with KdsServer() as kds:
        kds.put(urls.cert_chain_path(Product.MILAN), "application/x-pem-file",
                (milan.chain.ask.to_pem() + milan.chain.ark.to_pem()).encode())
        kds.put(urls.crl_path(Product.MILAN), "application/pkix-crl", crl.der)
        assert run("fetch", "ca", "pem", tmp_path, "Milan", "--kds-url", kds.url,
                   "--trust-root", root)[0] == 0
        code, out, err = run("fetch", "crl", "der", tmp_path, "Milan", "--kds-url", kds.url,
                             "--trust-root", root, "--json")
        assert code == 0, err
        doc = json.loads(out)
        assert doc["verified"] is True and doc["revoked_serials"] == [7]
        # A CRL from another ARK is refused.
        from snpd.emulator.pki import make_chain

        other = make_crl(make_chain(Product.MILAN, now=NOW, rsa_bits=2048), now=NOW)
        kds.put(urls.crl_path(Product.MILAN), "application/pkix-crl", other.der)
        code, _, err = run("fetch", "crl", "der", tmp_path, "Milan", "--kds-url", kds.url,
                           "--trust-root", root)
        assert code == 3 and "CRL" in err


def test_verify_with_policy_and_trust_root(tmp_path: Path, milan: Platform,
                                           vectors_dir: Path) -> None:
    from snpd.certsdir import write_certs_dir

    write_certs_dir(tmp_path, milan.certs(), "pem")
    (tmp_path / "report.bin").write_bytes(milan.report())
    (tmp_path / "root.pem").write_text(milan.chain.ark.to_pem())
    at = "2026-06-01T00:00:00Z"
    code, out, _ = run("verify", "attestation", tmp_path, tmp_path / "report.bin", "--at", at)
    assert code == 1 and "chain.ark_trusted" in out
    code, out, _ = run("verify", "attestation", tmp_path, tmp_path / "report.bin", "--at", at,
                       "--trust-root", tmp_path / "root.pem")
    assert code == 0, out
    (tmp_path / "p.toml").write_text('allow_debug = false\nvmpl = 1\n')
    code, out, _ = run("verify", "attestation", tmp_path, tmp_path / "report.bin", "--at", at,
                       "--trust-root", tmp_path / "root.pem", "--policy", tmp_path / "p.toml",
                       "--json")
    assert code == 1
    assert json.loads(out)["failures"] == ["policy.vmpl"]
    # The real Milan report allows DEBUG: a no-debug policy rejects it on policy grounds.
    d = vectors_dir / "cases" / "milan-v2-vcek"
    code, out, _ = run("verify", "attestation", d, d / "report.bin", "--policy",
                       tmp_path / "p.toml", "--json")
    assert code == 1
    assert set(json.loads(out)["failures"]) == {"policy.debug", "policy.vmpl"}


@pytest.mark.parametrize("argv, code, message", [
    (["verify", "attestation", "/nonexistent", "/nonexistent/r.bin"], 2, "not a directory"),
    (["verify", "attestation", ".", "r.bin", "--at", "yesterday"], 2, "RFC 3339"),
    (["verify", "attestation", ".", "r.bin", "--at", "2025-01-01T00:00:00"], 2, "time zone"),
    (["display", "report", "/nonexistent.bin"], 2, "cannot read"),
    (["frobnicate"], 2, "invalid choice"),
])
def test_usage_errors(argv: list, code: int, message: str) -> None:  # type: ignore[type-arg]
    got, out, err = run(*argv)
    assert got == code and message in err, (got, out, err)


def test_bad_policy_names_the_key(tmp_path: Path, case_dir: Callable[[Any], Path]) -> None:
    (tmp_path / "p.toml").write_text("allow_debugg = false\n")
    d = case_dir("milan-v2-vcek")
    code, _, err = run("verify", "attestation", d, d / "report.bin", "--policy",
                       tmp_path / "p.toml")
    assert code == 2 and "allow_debugg" in err


def test_display_report_rejects_an_unparsable_file(tmp_path: Path) -> None:
    (tmp_path / "r.bin").write_bytes(bytes(1183))
    code, out, err = run("display", "report", tmp_path / "r.bin", "--json")
    assert code == 1 and "1184" in err
    assert "error" in json.loads(out)


def test_display_key_and_json_everywhere(tmp_path: Path, case_dir: Callable[[Any], Path]) -> None:
    (tmp_path / "k.bin").write_bytes(bytes(range(32)))
    code, out, _ = run("display", "key", tmp_path / "k.bin")
    assert code == 0 and out.splitlines()[0].startswith("00 01 02")
    code, out, _ = run("display", "key", tmp_path / "k.bin", "--json")
    assert json.loads(out)["length"] == 32
    d = case_dir("turin-v5-vcek")
    code, out, _ = run("display", "report", d / "report.bin", "--json")
    assert json.loads(out)["reported_tcb"]["fmc"] == 0


def test_console_script_runs_as_a_process(case_dir: Callable[[Any], Path]) -> None:
    d = case_dir("genoa-v5-vcek")
    done = subprocess.run([sys.executable, "-m", "snpd.cli.snpctl", "verify", "attestation",
                           str(d), str(d / "report.bin"), "-q"], capture_output=True, text=True,
                          cwd=REPO, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("VALID")
    assert done.stderr == ""  # no warnings (serial-0 certificates) reach users


def test_verify_imports_neither_requests_nor_tomllib(case_dir: Callable[[Any], Path]) -> None:
    d = case_dir("genoa-v5-vcek")
    code = ("import sys; from snpd.cli import snpctl; "
            f"rc = snpctl.main(['verify','attestation',{str(d)!r},{str(d / 'report.bin')!r},'-q']);"
            "bad = [m for m in ('requests','urllib3','tomllib','tomli','snpd.kds.client') "
            "if m in sys.modules]; print(rc, bad)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO,
                          check=False)
    assert done.stdout.strip().endswith("0 []"), done.stdout + done.stderr


def _modules_after(code: str) -> set[str]:
    out = subprocess.run([sys.executable, "-c", code + "; import sys; "
                          "print(' '.join(sorted(sys.modules)))"],
                         check=True, capture_output=True, text=True).stdout
    return set(out.split())


def test_a_daemon_answered_command_imports_only_what_its_budget_affords() -> None:
    """docs/contracts.md, "Performance budget": any snpctl command the daemon answers takes at most
    25 ms as a whole process, so its path (parser, client, varlink) imports neither the heavy
    libraries nor typing, shutil and the compressors that a careless import drags in.
    Measured against what the interpreter has loaded anyway."""
    baseline = _modules_after("pass")
    loaded = _modules_after("from snpd.cli import snpctl; snpctl.build_parser(); "
                            "import snpd.client, snpd.varlink.client") - baseline
    assert {"snpd.cli.snpctl", "snpd.client", "snpd.varlink.client", "argparse"} <= loaded
    heavy = {"typing", "shutil", "bz2", "lzma", "fnmatch", "asyncio", "socket", "ssl",
             "dataclasses", "cryptography", "dbus_fast", "requests", "pathlib", "datetime"}
    assert loaded & heavy == set()


# -- verify evidence (Azure vTPM) ------------------------------------------------------------


def test_verify_evidence_shared_azure_cases(vectors_dir: Path, tmp_path: Path) -> None:
    """Every shared Azure case gives its verdict and its exit code; a certs dir with
    only the ARK and ASK is enough (the VCEK comes from the evidence)."""
    cases = json.loads((vectors_dir / "azure" / "cases.json").read_text(encoding="utf-8"))
    chain = tmp_path / "chain"
    chain.mkdir()
    for name in ("ark.pem", "ask.pem"):
        (chain / name).write_bytes((vectors_dir / "azure" / "evidence-v1" / name).read_bytes())
    for case in cases:
        d = vectors_dir / case["dir"]
        nonce = tmp_path / f"{case['id']}.nonce"
        nonce.write_bytes(case["nonce_utf8"].encode())
        code, doc = run_json("verify", "evidence", chain, d / "evidence.json",
                             "--nonce-file", nonce)
        assert (code, doc["valid"]) == ((0, True) if case["expect"] == "valid" else
                                        (1, False)), (case["id"], doc["failures"])
        assert doc["product"] == case["product"]
        code, out, _ = run("verify", "evidence", chain, d / "evidence.json",
                           "--nonce-file", nonce)
        last = out.splitlines()[-1]
        assert last.startswith("VALID: " if case["expect"] == "valid" else "INVALID: "), last


def test_verify_evidence_policy_and_bad_input(vectors_dir: Path, tmp_path: Path) -> None:
    d = vectors_dir / "azure" / "evidence-v1"
    nonce = tmp_path / "nonce"
    nonce.write_bytes(b"challenge")
    evidence = d / "evidence.json"
    policy = tmp_path / "azure.toml"
    policy.write_text("[vm_configuration]\nsecure-boot = true\nconsole-enabled = false\n")
    code, doc = run_json("verify", "evidence", d, evidence, "--nonce-file", nonce,
                         "--policy", policy)
    assert code == 1 and doc["failures"] == ["policy.vm_configuration"]
    policy.write_text("[vm_configuration]\nsecure-boot = true\n[pcrs]\n0 = \"%s\"\n"
                      % ("00" * 32))
    code, doc = run_json("verify", "evidence", d, evidence, "--nonce-file", nonce,
                         "--policy", policy)
    assert code == 1 and doc["failures"] == ["policy.pcrs"]
    policy.write_text("[vm_configuraton]\nsecure-boot = true\n")  # a typo is an error
    code, out, err = run("verify", "evidence", d, evidence, "--nonce-file", nonce,
                         "--policy", policy)
    assert code == 2 and "vm_configuraton" in err
    garbage = tmp_path / "garbage.json"
    garbage.write_bytes(b"\xff\x00")
    code, doc = run_json("verify", "evidence", d, garbage, "--nonce-file", nonce)
    assert code == 1 and doc["failures"] == ["evidence.format"]
    code, out, err = run("verify", "evidence", d, evidence)
    assert code == 2 and "--nonce-file" in err
    code, out, err = run("verify", "evidence", d, evidence, "--nonce-file", tmp_path / "none")
    assert code == 2 and "nonce" in err
