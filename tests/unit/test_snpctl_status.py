"""snpctl status, ok and evidence: --direct without a daemon (once ignored: both asked
the daemon and failed with exit 3), ok's local fallback, and the status rendering
shared with main()'s fast path."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path
from typing import Any, Dict, Tuple

import pytest
from snpctlrun import run  # type: ignore[import-not-found]

from snpd.abi.report import parse_report
from snpd.cli import snpctl
from snpd.emulator.launch import EmulatorConfig
from snpd.status.summary import ATTESTATION, DOCUMENT_KEYS, MANAGER


@pytest.fixture(scope="module")
def emu(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("emu")


def no_daemon(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Tuple[str, ...]:
    """Options under which no daemon can answer (neither transport exists)."""
    monkeypatch.setenv("DBUS_SYSTEM_BUS_ADDRESS", f"unix:path={tmp_path}/no-bus")
    return ("--socket", str(tmp_path / "no-socket"))


# -- status --direct ---------------------------------------------------------------------


def test_status_direct_reports_the_emulated_guest(emu: Path, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    code, out, err = run("status", "--direct", "--backend", "emulator", "--emulator-dir", emu,
                         "--json", *no_daemon(tmp_path, monkeypatch))
    assert code == 0, err
    doc = json.loads(out)
    assert tuple(doc) == DOCUMENT_KEYS
    expected_tcb = EmulatorConfig().tcb("reported")
    assert doc["source"] == "local" and doc["transport"] is None
    assert doc["backend"] == "emulator" and doc["state"] == "ready"
    assert doc["snp_active"] is True and doc["emulated"] is True and doc["reason"] is None
    assert doc["sev_features"] == ["SEV", "SEV-ES", "SEV-SNP"]
    assert (doc["vmpl"], doc["vmpl_assumed"], doc["vmpck"]) == (0, False, 0)
    assert (doc["product"], doc["product_source"]) == ("Genoa", "report")
    assert doc["reported_tcb"] == expected_tcb.to_json()
    assert doc["device"]["backend"] == "emulator" and doc["report_data"] == "caller"
    code, out, err = run("status", "--emulator-dir", emu, *no_daemon(tmp_path, monkeypatch))
    assert code == 0, err
    assert "  product       Genoa (report)" in out
    assert "  REPORT_DATA   the caller's bytes\n" in out
    assert f"  reported TCB  0x{expected_tcb.raw:016x} (bootloader " in out
    assert out.rstrip().endswith("OK: firmware channel ready (emulator backend, direct)")


def test_status_direct_without_a_guest_interface_says_why(tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch
                                                          ) -> None:
    code, out, err = run("status", "--direct", "--device", tmp_path / "nonexistent",
                         "--configfs-root", tmp_path / "none", "--json",
                         *no_daemon(tmp_path, monkeypatch))
    assert code == 1, err
    doc = json.loads(out)
    assert doc["state"] == "failed" and "no SEV-SNP guest interface" in doc["state_reason"]
    assert doc["backend"] == "none" and doc["reported_tcb"] is None
    assert doc["report_data"] is None  # no backend, so nobody knows


# -- evidence --direct ---------------------------------------------------------------------


def test_evidence_direct_comes_from_the_device(emu: Path, tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    nonce = os.urandom(48)
    (tmp_path / "nonce").write_bytes(nonce)
    code, out, err = run("evidence", tmp_path / "e.json", "--nonce-file", tmp_path / "nonce",
                         "--direct", "--backend", "emulator", "--emulator-dir", emu, "--json",
                         *no_daemon(tmp_path, monkeypatch))
    assert code == 0, err
    assert json.loads(out)["media_type"] == "application/vnd.snpd.trustee-snp-evidence+json"
    evidence = json.loads((tmp_path / "e.json").read_bytes())
    report = evidence["attestation_report"]
    assert bytes(report["report_data"]) == nonce + bytes(16)
    assert report["vmpl"] == 0
    # The host's table verified against the emulator's ARK: its VCEK travels along.
    assert [c["cert_type"] for c in evidence["cert_chain"]] == ["VCEK"]


def test_evidence_direct_matches_a_direct_report(emu: Path, tmp_path: Path) -> None:
    """The same platform as ``report --direct``: same chip, measurement, TCB."""
    assert run("report", tmp_path / "r.bin", tmp_path / "q.bin", "--random", "--direct",
               "--backend", "emulator", "--emulator-dir", emu)[0] == 0
    assert run("evidence", tmp_path / "e.json", "--emulator-dir", emu)[0] == 0
    report = parse_report((tmp_path / "r.bin").read_bytes())
    evidence = json.loads((tmp_path / "e.json").read_bytes())["attestation_report"]
    assert bytes(evidence["chip_id"]) == report.chip_id
    assert bytes(evidence["measurement"]) == report.measurement


# -- ok ------------------------------------------------------------------------------------


def fake_root(tmp_path: Path, *, snp: bool, msr: int = 0) -> Path:
    root = tmp_path / "root"
    (root / "proc").mkdir(parents=True)
    (root / "proc/cpuinfo").write_text("processor\t: 0\nvendor_id\t: AuthenticAMD\n"
                                       "cpu family\t: 25\nmodel\t\t: 17\nstepping\t: 1\n"
                                       "flags\t\t: fpu sev sev_es\n\n")
    if snp:
        (root / "sys/devices/system/cpu/sev").mkdir(parents=True)
        (root / "sys/devices/system/cpu/sev/vmpl").write_text("2\n")
        (root / "dev").mkdir()
        (root / "dev/sev-guest").write_text("")
    if msr:
        (root / "dev/cpu/0").mkdir(parents=True)
        with open(root / "dev/cpu/0/msr", "wb") as f:  # sparse: the MSR number is the offset
            f.seek(0xC0010131)
            f.write(msr.to_bytes(8, "little"))
    return root


def test_ok_without_a_daemon_checks_locally(tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    root = fake_root(tmp_path, snp=True, msr=0b111 | 1 << 7)
    code, out, err = run("ok", "--root", root, "--json", *no_daemon(tmp_path, monkeypatch))
    assert code == 0, err  # once exit 3: "daemon not running"
    doc = json.loads(out)
    assert doc["source"] == "local" and doc["snp_active"] is True
    assert "daemon not running" in doc["daemon_error"]
    checks = {c["name"]: c for c in doc["checks"]}
    assert checks["SEV_STATUS MSR"] == {"name": "SEV_STATUS MSR", "status": "pass",
                                        "detail": "0x87: SEV SEV-ES SEV-SNP DebugSwap"}
    assert checks["VMPL"]["detail"] == "2 (/sys/devices/system/cpu/sev/vmpl)"
    assert checks["kernel log"]["status"] == "skipped"
    assert "could not read kernel log" in checks["kernel log"]["detail"]
    assert checks["CPU"]["detail"].startswith("AuthenticAMD family 0x19 model 0x11 "
                                              "stepping 1 (Genoa); cpuinfo flags: sev sev_es")
    assert checks["snpd"]["status"] == "skipped"
    code, out, err = run("ok", "--root", root, *no_daemon(tmp_path, monkeypatch))
    assert code == 0 and out.rstrip().endswith("OK: SEV-SNP is active"), out + err
    assert "  PASS  SEV_STATUS MSR     0x87: SEV SEV-ES SEV-SNP DebugSwap" in out


def test_ok_says_what_it_could_not_read(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = fake_root(tmp_path, snp=False)
    code, out, _ = run("ok", "--direct", "--root", root, "--json")
    assert code == 1
    doc = json.loads(out)
    assert doc["snp_active"] is None and doc["daemon_error"] is None
    skipped = {c["name"]: c["detail"] for c in doc["checks"] if c["status"] == "skipped"}
    assert "/dev/kmsg" in skipped["kernel log"]
    assert "msr module is not loaded" in skipped["SEV_STATUS MSR"]
    code, out, _ = run("ok", "--direct", "--root", root)
    assert code == 1 and "UNKNOWN: nothing this user may read says" in out


def test_ok_asks_a_daemon_that_answers(monkeypatch: pytest.MonkeyPatch) -> None:
    props = emulator_props(reported_tcb=0x541700000000000A)
    monkeypatch.setattr(snpctl, "_daemon_properties", lambda args: dict(props))
    code, out, err = run("ok", "--json")
    assert code == 0, err
    doc = json.loads(out)
    assert doc["source"] == "daemon" and doc["status"]["product"] == "Genoa"
    assert [c["status"] for c in doc["checks"]] == ["pass"] * len(doc["checks"])
    degraded = emulator_props(state="degraded", reason="VMPCK0 wiped. Reboot the VM.")
    monkeypatch.setattr(snpctl, "_daemon_properties", lambda args: dict(degraded))
    code, out, _ = run("ok")
    assert code == 1 and "  FAIL  firmware channel   degraded (emulator backend): VMPCK0" in out


# -- render_status (shared with the fast path) ---------------------------------------------


def emulator_props(*, state: str = "ready", reason: str = "", reported_tcb: int = 0
                   ) -> Dict[str, Any]:
    return {
        ATTESTATION: {"Backend": "emulator", "Product": "Genoa", "Vmpl": 0,
                      "ReportedTcb": reported_tcb, "State": state, "StateReason": reason},
        MANAGER: {"Version": "0.1.1", "Statistics": {"report.ok": 2, "calls": 0},
                  "SevStatus": {"snp_active": True, "emulated": True,
                                "features": ["SEV", "SEV-ES", "SEV-SNP"], "sev_status": [],
                                "vmpl": 0, "vmpck": 0, "product_source": "report",
                                "kernel_log": "emulator", "unavailable": []}},
        "transport": "varlink",
    }


def test_render_status_text_and_json() -> None:
    out = io.StringIO()
    code = snpctl.render_status(emulator_props(reported_tcb=0x541700000000000A),
                                snpctl.Output(False, False, out, io.StringIO()))
    assert code == 0
    assert out.getvalue().splitlines() == [
        "  state         ready",
        "  backend       emulator (emulated)   daemon via varlink   snpd 0.1.1",
        "  SEV-SNP       active",
        "  features      SEV SEV-ES SEV-SNP",
        "  VMPL          0",
        "  VMPCK         VMPCK0",
        "  product       Genoa (report)",
        "  reported TCB  0x541700000000000a (bootloader 10, tee 0, snp 23, microcode 84)",
        "  statistics    report.ok=2",
        "OK: snpd ready (via varlink)",
    ]
    out = io.StringIO()
    code = snpctl.render_status(emulator_props(state="degraded", reason="gone"),
                                snpctl.Output(True, False, out, io.StringIO()))
    doc = json.loads(out.getvalue())
    assert code == 1 and tuple(doc) == DOCUMENT_KEYS
    assert (doc["state"], doc["state_reason"], doc["reported_tcb"]) == ("degraded", "gone",
                                                                       None)
