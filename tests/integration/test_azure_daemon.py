"""The daemon on an emulated Azure confidential VM (issue 14, items 2 and 4).

``snpd-emu vtpm`` runs swtpm as the vTPM and plays the paravisor in front of it: the
AK at 0x81000003, the HCL report at NV 0x01400001 around an emulator-signed SNP
report, refreshed on a write to 0x01400002. The daemon (user snpd, real bus, real
socket) takes the real Azure path (snpd.device.azure, snpd.device.tpm) to it, and
both transports are driven through SnpdClient in a child process.
"""

from __future__ import annotations

import hashlib
import json
import re
import select
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any, Dict, Iterator, Optional

import pytest
from daemonproc import (  # type: ignore[import-not-found]
    DEADLINE,
    EmulatedKds,
    EmulatorTemplate,
    Launcher,
    SnpdDaemon,
    snpd_client_call,
)
from dbusbus import ATTESTATION, REPO_ROOT, calls_as  # type: ignore[import-not-found]
from harness.proc import stop_process

from snpd.abi.azure_evidence import parse_azure_evidence
from snpd.abi.hcl import HclReport
from snpd.abi.report import AttestationReport
from snpd.evidence import AZ_SNP_VTPM_MEDIA_TYPE

pytestmark = pytest.mark.integration

TRANSPORTS = ("varlink", "dbus")


class Vtpm:
    """``snpd-emu vtpm`` as the daemon's user, on the daemon's emulator directory."""

    def __init__(self, daemon: SnpdDaemon) -> None:
        self.socket = daemon.runtime_dir / "vtpm.sock"
        self.proc: Optional[subprocess.Popen[bytes]] = subprocess.Popen(
            ["setpriv", f"--reuid={daemon.uid}", f"--regid={daemon.gid}", "--clear-groups",
             sys.executable, "-m", "snpd.cli.emu", "--emulator-dir", str(daemon.emulator_dir),
             "vtpm", "--socket", str(self.socket)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
            cwd=str(REPO_ROOT))
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], DEADLINE)
        line = self.proc.stdout.readline().decode() if ready else ""
        if not re.search(r" at unix:", line):
            self.close()
            raise RuntimeError(f"snpd-emu vtpm did not start: {line!r}")

    def close(self) -> int:
        proc, self.proc = self.proc, None
        return 0 if proc is None else stop_process(proc)


@pytest.fixture(scope="module")
def azure(template: EmulatorTemplate, kds: EmulatedKds) -> Iterator[SnpdDaemon]:
    launcher = Launcher(template, kds)
    started: Dict[str, Vtpm] = {}

    def paravisor(daemon: SnpdDaemon) -> None:
        started["vtpm"] = Vtpm(daemon)

    try:
        yield _start(launcher, paravisor)
    finally:
        launcher.close()
        if "vtpm" in started:
            assert started["vtpm"].close() == 0, "snpd-emu vtpm did not exit cleanly"


def _start(launcher: Launcher, paravisor: Any) -> SnpdDaemon:
    """The daemon's config names the socket in its own runtime directory, which only
    exists once the daemon object does: rewrite it in ``before``."""
    def before(daemon: SnpdDaemon) -> None:
        paravisor(daemon)
        config = dict(daemon.config)
        config["emulator"] = {**config["emulator"],
                              "vtpm": f"unix:{daemon.runtime_dir / 'vtpm.sock'}"}
        daemon.config = config
        daemon.write_config(config)

    return launcher.start(before=before)


def call(daemon: SnpdDaemon, transport: str, op: str, *args: Any) -> Any:
    where = ({"socket_path": str(daemon.socket_path)} if transport == "varlink"
             else {"bus": daemon.bus_address})
    return snpd_client_call(op, *args, **where)


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_report_carries_the_callers_data_as_user_data(azure: SnpdDaemon,
                                                      transport: str) -> None:
    """GetReport: the caller's bytes become the runtime JSON's user-data (the paravisor
    refreshes the report), and REPORT_DATA binds that JSON, not the bytes."""
    data = hashlib.sha256(f"azure {transport}".encode()).digest()
    report = AttestationReport.from_bytes(call(azure, transport, "get_report", data))
    assert report.vmpl == 0 and report.report_data[:32] != data
    media_type, evidence = call(azure, transport, "get_evidence", "trustee", b"n" * 32)
    assert media_type == AZ_SNP_VTPM_MEDIA_TYPE
    hcl = HclReport.from_bytes(parse_azure_evidence(evidence).hcl_report)
    assert hcl.user_data == data.ljust(64, b"\0")
    assert hcl.snp_report == report.raw
    assert report.report_data[:32] == hashlib.sha256(hcl.runtime_data).digest()


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_evidence_round_trip(azure: SnpdDaemon, transport: str, tmp_path: Path) -> None:
    """GetEvidence("trustee") is az-snp-vtpm v1 with the nonce in the quote: the daemon
    (which trusts the emulator's root on this backend) and snpctl with --trust-root
    accept it; under AMD's roots alone it fails on the root."""
    nonce = hashlib.sha256(f"nonce {transport}".encode()).digest()
    _, evidence = call(azure, transport, "get_evidence", "trustee", nonce)
    parsed = parse_azure_evidence(evidence)
    assert parsed.version == 1 and len(parsed.pcrs) == 24 and parsed.vcek
    verdict = call(azure, transport, "verify_evidence", evidence, nonce)
    assert verdict["valid"] is True, verdict
    wrong = call(azure, transport, "verify_evidence", evidence, bytes(32))
    assert wrong["failures"] == ["quote.nonce"]
    (tmp_path / "evidence.json").write_bytes(evidence)
    (tmp_path / "nonce").write_bytes(nonce)
    certs = tmp_path / "certs"
    certs.mkdir()
    for kind in ("ark", "ask"):
        (certs / f"{kind}.pem").write_bytes(
            (azure.emulator_dir / "certs" / f"{kind}.pem").read_bytes())
    argv = [sys.executable, "-m", "snpd.cli.snpctl", "verify", "evidence", str(certs),
            str(tmp_path / "evidence.json"), "--nonce-file", str(tmp_path / "nonce"),
            "--json"]
    trusted = subprocess.run([*argv, "--trust-root", str(certs / "ark.pem")],
                             capture_output=True, cwd=str(REPO_ROOT), timeout=DEADLINE)
    assert trusted.returncode == 0, trusted.stdout + trusted.stderr
    amd = subprocess.run(argv, capture_output=True, cwd=str(REPO_ROOT), timeout=DEADLINE)
    assert amd.returncode == 1
    assert "chain.ark_trusted" in json.loads(amd.stdout)["failures"]


def snpctl(*argv: object) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([sys.executable, "-m", "snpd.cli.snpctl", *map(str, argv)],
                          capture_output=True, cwd=str(REPO_ROOT), timeout=DEADLINE)


def runtime_user_data(daemon: SnpdDaemon) -> HclReport:
    """The HCL report as the paravisor holds it now (GetEvidence reads it, no write)."""
    _, evidence = call(daemon, "varlink", "get_evidence", "trustee", b"n" * 32)
    return HclReport.from_bytes(parse_azure_evidence(evidence).hcl_report)


def assert_platform_report(daemon: SnpdDaemon, report_file: Path, request: Path,
                           sent: bytes) -> AttestationReport:
    """The report is the paravisor's, ``sent`` is its runtime JSON's user-data, and the
    request file now holds the report's REPORT_DATA (the JSON's digest), as snpguest."""
    report = AttestationReport.from_bytes(report_file.read_bytes())
    hcl = runtime_user_data(daemon)
    assert hcl.snp_report == report.raw and hcl.user_data == sent
    assert request.read_bytes() == report.report_data
    assert report.report_data[:32] == hashlib.sha256(hcl.runtime_data).digest()
    return report


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_snpctl_report_platform_through_the_daemon(azure: SnpdDaemon, transport: str,
                                                   tmp_path: Path) -> None:
    """``snpctl report --platform``: the request file's 64 bytes go to the paravisor
    as user-data, and the request file then holds REPORT_DATA; --random conflicts."""
    where = (["--socket", azure.socket_path] if transport == "varlink"
             else ["--bus", azure.bus_address])
    sent = hashlib.sha512(f"platform {transport}".encode()).digest()
    request, report_file = tmp_path / "request.bin", tmp_path / "report.bin"
    request.write_bytes(sent)
    done = snpctl("report", report_file, request, "--platform", "--json", *where)
    assert done.returncode == 0, done.stdout + done.stderr
    doc = json.loads(done.stdout)
    assert doc["platform"] is True and doc["backend"] == f"daemon ({transport})"
    assert_platform_report(azure, report_file, request, sent)
    refused = snpctl("report", tmp_path / "r2.bin", request, "--platform", "--random", *where)
    assert refused.returncode == 2 and b"--random conflicts with --platform" in refused.stderr
    assert not (tmp_path / "r2.bin").exists()


def test_snpctl_report_platform_direct(azure: SnpdDaemon, tmp_path: Path) -> None:
    """--direct on the emulated Azure CVM (a copy of the daemon's emulator state whose
    emulator.toml names the vTPM): the same as through the daemon. Without a request
    file nothing is written to the paravisor, as snpguest, and the report is the one
    it holds."""
    emu = tmp_path / "emu"
    shutil.copytree(azure.emulator_dir, emu, ignore=shutil.ignore_patterns("vtpm"))
    (emu / "emulator.toml").write_text(f'vtpm = "unix:{azure.runtime_dir / "vtpm.sock"}"\n')
    sent = hashlib.sha512(b"platform direct").digest()
    request, report_file = tmp_path / "request.bin", tmp_path / "report.bin"
    request.write_bytes(sent)
    done = snpctl("report", report_file, request, "--platform", "--emulator-dir", emu,
                  "--json")
    assert done.returncode == 0, done.stdout + done.stderr
    assert json.loads(done.stdout)["backend"] == "azure"
    first = assert_platform_report(azure, report_file, request, sent)
    absent = tmp_path / "absent.bin"
    done = snpctl("report", tmp_path / "again.bin", absent, "--platform", "--emulator-dir", emu)
    assert done.returncode == 0, done.stdout + done.stderr
    again = assert_platform_report(azure, tmp_path / "again.bin", absent, sent)
    assert again.raw == first.raw


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_key_derivation_is_refused(azure: SnpdDaemon, transport: str) -> None:
    for op, args in (("derive_key", ("vcek", ["measurement"])),
                     ("derive_sealing_key", ("app", []))):
        with pytest.raises(AssertionError, match="NotSupported.*Azure confidential VM"):
            call(azure, transport, op, *args)


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_the_daemon_names_its_backend_and_binding(azure: SnpdDaemon, transport: str) -> None:
    """Backend "azure" and ReportDataBinding "runtime-data" (REPORT_DATA binds the
    runtime JSON) on both transports, and SnpdClient.report_data_binding says so."""
    props = call(azure, transport, "properties")["org.snpd.Snpd1.Attestation"]
    assert (props["Backend"], props["ReportDataBinding"]) == ("azure", "runtime-data")
    assert call(azure, transport, "report_data_binding") == "runtime-data"


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_the_certificate_methods_on_azure(azure: SnpdDaemon, transport: str) -> None:
    """The rest of the methods, on both transports: GetExtendedReport (no host table on
    Azure: the chain comes from the cache or KDS), GetCertificates, VerifyReport of
    the paravisor's report with that chain, and RefreshCertificates (root)."""
    report, certs = call(azure, transport, "get_extended_report", b"x" * 32)
    kinds = {kind for kind, _der in certs}
    assert AttestationReport.from_bytes(report).vmpl == 0 and {"ark", "ask", "vcek"} <= kinds
    chain = call(azure, transport, "get_certificates")
    assert {"ark", "ask", "vcek"} <= {kind for kind, _der in chain}
    verdict = call(azure, transport, "verify", report, chain)
    assert verdict["valid"] is True, verdict
    assert call(azure, transport, "refresh_certificates") is None


HOSTILE = (b"\xff\xfe garbage", b"[" * 60_000, b'{"version": 1, "version": 2}')
MEMBER = "snpd-test-user"


def test_hostile_evidence_from_a_member_leaves_the_daemon_serving(azure: SnpdDaemon) -> None:
    """What a report-group member can send VerifyEvidence, on both transports: garbage
    and a nesting bomb are verdicts naming evidence.format, an oversize document is
    InvalidArgument, an unknown format NotSupported; the daemon then still serves."""
    where = {"socket_path": str(azure.socket_path)}

    def verify(evidence: bytes, fmt: str = "az-snp-vtpm") -> Any:
        return snpd_client_call("verify_evidence", evidence, b"n", fmt, user=MEMBER, **where)

    for evidence in HOSTILE:
        verdict = verify(evidence)
        assert verdict["valid"] is False and verdict["failures"] == ["evidence.format"]
    with pytest.raises(AssertionError, match="InvalidArgument.*65537 bytes"):
        verify(b" " * 65537)
    with pytest.raises(AssertionError, match="NotSupported"):
        verify(b"{}", fmt="trustee")

    method = (ATTESTATION, "VerifyEvidence", "sayaya{sv}")
    replies = calls_as(MEMBER, azure.bus_address, [
        *((*method, ["az-snp-vtpm", e, b"n", {}]) for e in HOSTILE),
        (*method, ["az-snp-vtpm", b" " * 65537, b"n", {}]),
        (*method, ["trustee", b"{}", b"n", {}]),
        (ATTESTATION, "GetReport", "ayua{sv}", [b"still serving", 0xFFFFFFFF, {}]),
    ])
    for reply in replies[:len(HOSTILE)]:
        result = reply.body[0]
        assert result["valid"].value is False
        assert result["failures"].value == ["evidence.format"]
    # The bus transport's message bound (64 KiB) answers before the method's own.
    assert replies[-3].error.endswith("InvalidArgument") and "65536" in replies[-3].text
    assert replies[-2].error.endswith("NotSupported")
    assert replies[-1].ok and len(replies[-1].body[0]) == 1184
    assert len(snpd_client_call("get_report", b"still serving", user=MEMBER, **where)) == 1184
