"""snpctl as a drop-in for snpguest v0.10: the seed workflow and the manual's
command lines, verbatim, as real ``snpctl`` processes.

Every line runs twice: against the daemon (a real subprocess on a private bus,
reached through ``$SNPD_SOCKET``) and with the firmware opened directly on the
emulator (``snpctl --direct --backend emulator --emulator-dir D …``, options
before the command as the no-daemon hint prints them). The emulated platform is
a Milan, as the seed's ``fetch ca pem ./certs milan`` says; its KDS is the
emulated one (``$SNPD_KDS_URL``) and its root the emulator's (``$SNPD_TRUST_ROOT``):
snpguest has no flags for either, so the command lines stay as the guides
print them. The written files are checked, not only the exit codes.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence

import pytest
from daemonproc import (  # type: ignore[import-not-found]
    DEADLINE,
    EmulatedKds,
    EmulatorTemplate,
    Launcher,
    SnpdDaemon,
)

pytestmark = pytest.mark.integration

REPO_ROOT = Path(__file__).resolve().parents[2]
REQUEST = bytes(range(64))

# The workflow every SNP guide teaches, s/snpguest/snpctl/ (its first step,
# `dmesg | grep -i sev`, is `snpctl ok`).
SEED = """\
snpctl ok
snpctl report attestation-report.bin random-request-file.txt --random
snpctl fetch ca pem ./certs milan
snpctl fetch vcek pem ./certs attestation-report.bin
snpctl verify certs ./certs
snpctl verify attestation ./certs attestation-report.bin
"""

# Command lines from snpguest's manual (docs/snpguest.1.adoc and --help of v0.10),
# in an order where each finds the files the earlier ones wrote.
MANUAL = """\
snpctl report report.bin request-file.txt
snpctl report report-vmpl1.bin request-file.txt -v 1
snpctl report report-random.bin random.txt -r
snpctl --quiet report quiet.bin request-file.txt
snpctl certificates PEM ./host-certs
snpctl fetch ca PEM ./certs-a MILAN
snpctl fetch ca der ./certs-der Milan --endorser vcek
snpctl fetch ca pem ./certs-r -r report.bin
snpctl fetch vcek PEM ./certs-a report.bin
snpctl fetch vcek der ./certs-der report.bin --processor-model milan
snpctl fetch vcek pem ./certs-r report.bin -p MILAN
snpctl fetch crl pem ./certs-a milan
snpctl verify certs ./certs-a
snpctl verify certs ./certs-der
snpctl verify attestation ./certs-a report.bin
snpctl verify attestation ./certs-der report.bin --processor-model milan
snpctl verify attestation ./certs-r report-vmpl1.bin -p Milan
snpctl verify attestation ./certs-a report.bin -t
snpctl verify attestation ./certs-a report.bin --signature
snpctl verify attestation ./certs-a report.bin -m 0x{measurement} -d 0x{host_data}
snpctl verify attestation ./certs-a report.bin --report-data 0x{report_data}
snpctl verify attestation ./certs-a report.bin --id-key-digest 0x{digest} \
    --author-key-digest 0x{digest}
snpctl key derived-key.bin vcek
snpctl key derived-vmrk.bin VMRK --vmpl 0
snpctl key derived-gfs.bin vcek --guest_field_select 0b100001 --guest_svn 0 --tcb_version 0x0
snpctl key derived-gfs2.bin vcek -g 33 -s 0 -t 0
snpctl display report report.bin
snpctl display key derived-key.bin
snpctl generate key-digest id-key.pem -d id-key-digest.txt
snpctl generate id-block id-key.pem author-key.pem 0x{measurement} -i id-block.txt -a auth-block.txt
snpctl generate ovmf-hash --help
"""


def _lines(text: str) -> List[List[str]]:
    """The command lines, with the emulated guest's launch values filled in."""
    from snpd.emulator.launch import DEFAULT_MEASUREMENT

    values = {"measurement": DEFAULT_MEASUREMENT.hex(), "host_data": bytes(32).hex(),
              "report_data": REQUEST.hex(), "digest": bytes(48).hex()}
    return [shlex.split(line.format(**values)) for line in text.splitlines() if line.strip()]


class Runner:
    """snpctl as a process in ``cwd``: ``--direct`` on an emulator copy, or the daemon."""

    def __init__(self, cwd: Path, env: Dict[str, str], direct: Optional[Path]) -> None:
        self.cwd, self.env, self.direct = cwd, env, direct

    def __call__(self, argv: Sequence[str]) -> subprocess.CompletedProcess[str]:
        assert argv[0] == "snpctl"
        prefix = (["--direct", "--backend", "emulator", "--emulator-dir", str(self.direct)]
                  if self.direct is not None else [])
        return subprocess.run([sys.executable, "-m", "snpd.cli.snpctl", *prefix, *argv[1:]],
                              cwd=self.cwd, env=self.env, capture_output=True, text=True,
                              timeout=DEADLINE, check=False)

    def ok(self, argv: Sequence[str]) -> subprocess.CompletedProcess[str]:
        done = self(argv)
        assert done.returncode == 0, (f"{shlex.join(argv)} exited {done.returncode}\n"
                                      f"stdout: {done.stdout}\nstderr: {done.stderr}")
        return done


@pytest.fixture(scope="module")
def milan() -> Iterator[EmulatorTemplate]:
    from snpd.abi.product import Product
    from snpd.emulator.launch import EmulatorConfig

    made = EmulatorTemplate(EmulatorConfig(product=Product.MILAN))
    # Read by `snpd-emu kds` and by --direct: the platform is a Milan for them too.
    (made.directory / "emulator.toml").write_text('product = "Milan"\n')
    yield made
    made.close()


@pytest.fixture(scope="module")
def milan_kds(milan: EmulatorTemplate) -> Iterator[EmulatedKds]:
    server = EmulatedKds(milan.directory)
    yield server
    server.close()


@pytest.fixture(scope="module")
def daemon(accounts: object, milan: EmulatorTemplate, milan_kds: EmulatedKds
           ) -> Iterator[SnpdDaemon]:
    launcher = Launcher(milan, milan_kds)
    try:
        yield launcher.start({"emulator": {"product": "Milan"}})
    finally:
        launcher.close(expect_running=True)


@pytest.fixture(params=["daemon", "direct"])
def runner(request: pytest.FixtureRequest, tmp_path: Path, milan: EmulatorTemplate,
           milan_kds: EmulatedKds) -> Runner:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SNPD_", "DBUS_"))}
    env.update(PYTHONPATH=str(REPO_ROOT), SNPD_KDS_URL=milan_kds.url,
               SNPD_TRUST_ROOT=str(milan.directory / "certs" / "ark.pem"))
    work = tmp_path / "work"
    work.mkdir()
    (work / "request-file.txt").write_bytes(REQUEST + b"trailing bytes snpguest ignores")
    for name in ("id-key.pem", "author-key.pem"):
        (work / name).write_bytes(_p384_pem())
    direct = None
    if request.param == "daemon":
        daemon: SnpdDaemon = request.getfixturevalue("daemon")
        env["SNPD_SOCKET"] = str(daemon.socket_path)
    else:
        direct = tmp_path / "emulator"
        shutil.copytree(milan.directory, direct, symlinks=True)
    return Runner(work, env, direct)


def _p384_pem() -> bytes:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    return ec.generate_private_key(ec.SECP384R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption())


def _report(path: Path) -> object:
    from snpd.abi.report import AttestationReport

    return AttestationReport.from_bytes(path.read_bytes())


def test_the_seed_workflow_verbatim(runner: Runner) -> None:
    from snpd.abi.product import Product
    from snpd.trust.certset import classify
    from snpd.trust.x509 import load_certificate

    results = [runner.ok(argv) for argv in _lines(SEED)]
    work = runner.cwd
    report = _report(work / "attestation-report.bin")
    request = (work / "random-request-file.txt").read_bytes()
    assert len(request) == 64 and report.report_data == request  # type: ignore[attr-defined]
    assert report.cpuid_product is Product.MILAN  # type: ignore[attr-defined]
    kinds = {p.name: classify(load_certificate(p.read_bytes()))
             for p in sorted((work / "certs").iterdir())}
    assert kinds == {"ark.pem": "ark", "ask.pem": "ask", "vcek.pem": "vcek"}
    assert all((work / "certs" / name).read_bytes().startswith(b"-----BEGIN CERTIFICATE-----")
               for name in kinds)
    verify_certs, verify_attestation = results[-2], results[-1]
    assert "VALID" in verify_certs.stdout and "INVALID" not in verify_certs.stdout
    assert verify_attestation.stdout.splitlines()[-1].startswith("VALID: ")
    # The root it trusted beyond AMD's is announced, never silent.
    assert "SNPD_TRUST_ROOT" in verify_attestation.stderr


def test_the_manual_command_lines(runner: Runner) -> None:
    from snpd.trust.certset import classify
    from snpd.trust.x509 import load_certificate

    outputs = {shlex.join(argv): runner.ok(argv) for argv in _lines(MANUAL)}
    work = runner.cwd
    given = (work / "request-file.txt").read_bytes()[:64]
    assert _report(work / "report.bin").report_data == given  # type: ignore[attr-defined]
    assert _report(work / "report-vmpl1.bin").vmpl == 1  # type: ignore[attr-defined]
    assert _report(work / "report-random.bin").report_data == \
        (work / "random.txt").read_bytes()  # type: ignore[attr-defined]
    assert outputs["snpctl --quiet report quiet.bin request-file.txt"].stdout.count("\n") <= 1
    for directory, ext in (("certs-a", "pem"), ("certs-der", "der"), ("certs-r", "pem")):
        files = {p.name for p in (work / directory).iterdir()}
        assert {f"ark.{ext}", f"ask.{ext}", f"vcek.{ext}"} <= files, (directory, files)
        vcek = load_certificate((work / directory / f"vcek.{ext}").read_bytes())
        assert classify(vcek) == "vcek"
    assert (work / "certs-a" / "crl.pem").read_bytes().startswith(b"-----BEGIN X509 CRL")
    assert (work / "certs-der" / "ark.der").read_bytes()[:1] == b"\x30"
    host = {p.name for p in (work / "host-certs").iterdir()}
    assert {"ark.pem", "ask.pem", "vcek.pem"} <= host
    keys = {name: (work / name).read_bytes() for name in
            ("derived-key.bin", "derived-vmrk.bin", "derived-gfs.bin", "derived-gfs2.bin")}
    assert all(len(k) == 32 for k in keys.values())
    assert keys["derived-key.bin"] != keys["derived-vmrk.bin"]
    # 0b100001 and 33 are the same selection: the same key.
    assert keys["derived-gfs.bin"] == keys["derived-gfs2.bin"] != keys["derived-key.bin"]
    assert oct((work / "derived-key.bin").stat().st_mode & 0o777) == oct(0o600)
    shown = outputs["snpctl display key derived-key.bin"].stdout.split()
    assert bytes.fromhex("".join(shown)) == keys["derived-key.bin"]
    display = outputs["snpctl display report report.bin"].stdout
    assert given.hex()[:64] in display and "measurement" in display
    # -t and -s say what they skipped and never call the report VALID.
    tcb_only = outputs["snpctl verify attestation ./certs-a report.bin -t"].stdout
    assert "SKIP  report.signature" in tcb_only
    assert tcb_only.splitlines()[-1].startswith("PASSED (TCB only; skipped: report.signature)")
    signature_only = outputs["snpctl verify attestation ./certs-a report.bin --signature"].stdout
    assert "SKIP  binding.tcb" in signature_only and "VALID" not in signature_only
    digest = (work / "id-key-digest.txt").read_text()
    assert len(bytes.fromhex(digest)) == 48
    import base64

    assert len(base64.b64decode((work / "id-block.txt").read_text())) == 96
    assert len(base64.b64decode((work / "auth-block.txt").read_text())) == 4096


def test_what_snpguest_refuses_snpctl_refuses_with_a_reason(runner: Runner) -> None:
    """The manual's ``--guest_field_select 100001`` is decimal to snpguest v0.10 too
    (its parser reads binary only after 0b), so both refuse it."""
    for argv in _lines(SEED)[1:4]:  # a report and its chain, for the verify lines
        runner.ok(argv)
    for line, exit_code, reason in (
            ("snpctl key k.bin vcek --guest_field_select 100001", 2, "guest_field_select"),
            ("snpctl key k.bin vcek -l 1", 2, "launch_mit_vector"),
            ("snpctl report r.bin request-file.txt --random --platform", 2, "--platform"),
            ("snpctl fetch ca pem ./certs atlantis", 2, "invalid choice"),
            ("snpctl display key request-file.txt", 2, "a derived key is 32"),
            ("snpctl verify attestation ./certs attestation-report.bin -t -s", 2,
             "not allowed with"),
            (f"snpctl verify attestation ./certs attestation-report.bin -m 0x{'ab' * 48}", 1,
             "FAIL  policy.measurement")):
        done = runner(shlex.split(line))
        assert (done.returncode, reason in done.stderr + done.stdout) == (exit_code, True), (
            line, done.stdout, done.stderr)
        assert not (runner.cwd / "k.bin").exists() and not (runner.cwd / "r.bin").exists()
