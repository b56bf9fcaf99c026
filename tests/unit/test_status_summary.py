"""The SEV status in words (snpd.status.summary): the journal text, systemd's STATUS=
line and snpctl status, all from one document. Pure functions, exact texts."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any, Dict, Optional

from hypothesis import given
from hypothesis import strategies as st

from snpd.abi.product import Product
from snpd.abi.tcb import TcbVersion
from snpd.status.checks import daemon_checks, local_checks, render
from snpd.status.probe import SevStatus, emulated, probe, status_properties
from snpd.status.summary import (
    ATTESTATION,
    DOCUMENT_KEYS,
    MANAGER,
    changed_message,
    changes,
    decode_tcb,
    journal_fields,
    startup_message,
    status_document,
    status_line,
    status_lines,
)

TCB = 0x541700000000000A  # Genoa layout: bootloader 10, tee 0, snp 23, microcode 84
NO_ROOT = Path("/nonexistent-root")  # nothing to read: the facts are the given lines


def props(sev: Dict[str, Any], *, backend: str = "emulator", product: str = "Genoa",
          tcb: int = 0, state: str = "ready", reason: str = "", vmpl: int = 0,
          stats: Optional[Dict[str, int]] = None) -> Dict[str, Any]:
    return {ATTESTATION: {"Backend": backend, "Product": product, "Vmpl": vmpl,
                          "ReportedTcb": tcb, "State": state, "StateReason": reason},
            MANAGER: {"Version": "0.1.1", "SevStatus": sev, "Statistics": dict(stats or {})}}


def emulator_sev(source: str = "emulator") -> Dict[str, Any]:
    sev = status_properties(emulated(0, ["sev-guest sev-guest: Initialized SEV guest driver "
                                         "(using VMPCK0 communication key)"]))
    sev["product_source"] = source
    return sev


def non_snp_status() -> SevStatus:
    return probe(NO_ROOT,
                 kernel_lines=["[0.0] Linux version 6.12.0", "[0.1] x86/cpu: AMD"],
                 kernel_log="snpd-probe (/dev/kmsg)")


# -- the texts -------------------------------------------------------------------------------


def test_report_data_binding_in_the_document_and_the_lines() -> None:
    """ReportDataBinding becomes ``report_data`` and a line of ``snpctl status``: the
    caller's bytes on the emulator, the runtime JSON's digest on an Azure CVM; a
    daemon that predates the property shows neither."""
    shown = {}
    for binding in ("caller", "runtime-data", None):
        p = props(emulator_sev())
        if binding is not None:
            p[ATTESTATION]["ReportDataBinding"] = binding
        doc = status_document(p)
        lines = [line for line in status_lines(doc) if "REPORT_DATA" in line]
        shown[binding] = (doc["report_data"], lines)
    assert shown == {
        "caller": ("caller", ["  REPORT_DATA   the caller's bytes"]),
        "runtime-data": ("runtime-data", [
            "  REPORT_DATA   SHA-256 of the paravisor's runtime JSON (user-data: the "
            "caller's bytes)"]),
        None: (None, [])}


def test_startup_message_of_the_emulator() -> None:
    doc = status_document(props(emulator_sev()))
    assert startup_message(doc) == (
        "snpd 0.1.1 serving, emulator backend. SEV-SNP guest (emulated): features SEV SEV-ES "
        "SEV-SNP; VMPL 0; VMPCK0; product Genoa (emulator configuration); reported TCB not "
        "known yet; state ready")


def test_the_message_after_the_first_report() -> None:
    before = status_document(props(emulator_sev()))
    after = status_document(props(emulator_sev("report"), tcb=TCB))
    assert changes(before, after) == ["product source", "reported TCB"]
    assert changed_message(after, changes(before, after)) == (
        "SEV-SNP status changed (product source, reported TCB): SEV-SNP guest (emulated): "
        "features SEV SEV-ES SEV-SNP; VMPL 0; VMPCK0; product Genoa (report); reported TCB "
        "0x541700000000000a (bootloader 10, tee 0, snp 23, microcode 84); state ready")
    assert changes(after, after) == []


def test_hardware_facts_with_sev_status_cpu_and_an_assumed_vmpl() -> None:
    lines = ["Memory Encryption Features active: AMD SEV SEV-ES SEV-SNP",
             "SEV: Status: SEV SEV-ES SEV-SNP DebugSwap",
             "sev-guest sev-guest: Initialized SEV guest driver (using vmpck_id 0)"]
    status = probe(NO_ROOT, kernel_lines=lines)
    sev = status_properties(status)
    sev["product_source"] = "cpuid"
    sev["cpu"] = "AuthenticAMD family 0x1a model 0x02 stepping 1 (Turin)"
    doc = status_document(props(sev, backend="ioctl", product="Turin", tcb=0x4700000002000100))
    assert doc["vmpl_assumed"] is True
    assert startup_message(doc) == (
        "snpd 0.1.1 serving, ioctl backend. SEV-SNP guest: features SEV SEV-ES SEV-SNP "
        "(SEV_STATUS also DebugSwap); VMPL 0 (assumed: neither sysfs nor the kernel log says); "
        "VMPCK0; product Turin (CPUID); reported TCB 0x4700000002000100 (fmc 0, bootloader 1, "
        "tee 0, snp 2, microcode 71); CPU AuthenticAMD family 0x1a model 0x02 stepping 1 "
        "(Turin); state ready")
    assert status_line(doc) == ("ready: Turin, VMPL 0, TCB fmc0 bl1 tee0 snp2 uc71, ioctl "
                                "backend; 0 reports, 0 keys, 0 busy")


def test_a_guest_that_is_not_sev_snp_says_why() -> None:
    sev = status_properties(non_snp_status())
    doc = status_document(props(sev, backend="none", product=""))
    assert doc["snp_active"] is False
    assert startup_message(doc) == (
        "snpd 0.1.1 serving, none backend. not an SEV-SNP guest: no 'Memory Encryption "
        "Features active' line in the kernel log and no /dev/sev-guest; state ready")
    assert status_line(doc) == ("ready: not an SEV-SNP guest, none backend; 0 reports, "
                                "0 keys, 0 busy")
    fields = journal_fields(doc)
    assert fields["not_snp_reason"].startswith("not an SEV-SNP guest: no 'Memory Encryption")
    assert fields["snp_active"] is False and fields["product"] is None


def test_status_line_of_the_emulator_and_of_a_degraded_daemon() -> None:
    stats = {"report.ok": 3, "extended_report.ok": 1, "derived_key.ok": 2,
             "queue.rejected_busy": 1}
    doc = status_document(props(emulator_sev("report"), tcb=TCB, stats=stats))
    assert status_line(doc) == ("ready: Genoa, VMPL 0, TCB bl10 tee0 snp23 uc84, emulator "
                                "backend; 4 reports, 2 keys, 1 busy")
    degraded = status_document(props(emulator_sev("report"), tcb=TCB, state="degraded",
                                     reason="VMPCK0 was disabled. Reboot the VM."))
    assert status_line(degraded) == (
        "DEGRADED: Genoa, VMPL 0, TCB bl10 tee0 snp23 uc84, emulator backend; 0 reports, "
        "0 keys, 0 busy; VMPCK0 was disabled. Reboot the VM.")
    assert changed_message(degraded, changes(doc, degraded)).endswith(
        "; state degraded: VMPCK0 was disabled. Reboot the VM.")
    unknown = status_document(props(emulator_sev(), product=""))
    assert status_line(unknown).startswith("ready: product unknown, VMPL 0, TCB unknown, ")


def test_the_document_has_stable_keys_and_nulls_for_unknowns() -> None:
    doc = status_document({})
    assert tuple(doc) == DOCUMENT_KEYS
    assert doc["snp_active"] is None and doc["product"] is None and doc["reported_tcb"] is None
    assert doc["sev_features"] == [] and doc["statistics"] == {}
    full = status_document({**props(emulator_sev("report"), tcb=TCB), "transport": "dbus"})
    assert full["transport"] == "dbus" and full["source"] == "daemon"
    assert full["reported_tcb"] == {"raw": "0x541700000000000a", "bootloader": 10, "tee": 0,
                                    "snp": 23, "microcode": 84}


def test_journal_fields_carry_facts_only() -> None:
    fields = journal_fields(status_document(props(emulator_sev("report"), tcb=TCB)))
    assert {k: v for k, v in fields.items() if v is not None} == {
        "backend": "emulator", "snp_active": True, "emulated": True,
        "features": "SEV SEV-ES SEV-SNP", "vmpl": 0, "vmpck": 0, "product": "Genoa",
        "product_source": "report", "reported_tcb": "0x541700000000000a", "state": "ready"}


@given(st.integers(0, (1 << 64) - 1), st.sampled_from(list(Product)))
def test_decode_tcb_agrees_with_the_abi(raw: int, product: Product) -> None:
    assert decode_tcb(raw, product.value) == TcbVersion.decode(raw, product).to_json()


def test_decode_tcb_without_a_product_keeps_only_the_raw_value() -> None:
    assert decode_tcb(TCB, None) == {"raw": "0x541700000000000a"}


def test_the_summary_module_is_cheap_to_import() -> None:
    """snpctl status's fast path imports it: no typing, dataclasses or enum."""
    code = ("import sys; before = set(sys.modules); import snpd.status.summary; "
            "print(' '.join(sorted(set(sys.modules) - before)))")
    loaded = set(subprocess.run([sys.executable, "-c", code], check=True, capture_output=True,
                                text=True).stdout.split())
    # __future__ is new only where nothing imported it before (a .deb build's bare
    # interpreter): `from __future__ import annotations` loads it, and it is tiny.
    assert loaded <= {"__future__", "snpd", "snpd.status", "snpd.status.summary"}, loaded


# -- snpctl ok's rows ------------------------------------------------------------------------


def test_daemon_checks() -> None:
    rows = daemon_checks(status_document(props(emulator_sev("report"), tcb=TCB)))
    assert render(rows) == [
        "  PASS  SEV-SNP            active: SEV SEV-ES SEV-SNP (emulated)",
        "  PASS  VMPL               0",
        "  PASS  VMPCK              VMPCK0 in use",
        "  PASS  product            Genoa",
        "  PASS  reported TCB       0x541700000000000a (bootloader 10, tee 0, snp 23, "
        "microcode 84)",
        "  PASS  firmware channel   ready (emulator backend)",
    ]


def test_local_checks_of_a_guest_that_is_not_sev_snp() -> None:
    rows = {r.name: r for r in local_checks(non_snp_status())}
    assert rows["SEV-SNP"].status == "fail"
    assert rows["SEV-SNP"].detail == ("not an SEV-SNP guest: no 'Memory Encryption Features "
                                      "active' line in the kernel log and no /dev/sev-guest")
    assert rows["kernel log"].detail == ("read (snpd-probe (/dev/kmsg)): no 'Memory Encryption "
                                         "Features active' line")
    assert rows["/dev/sev-guest"].status == "fail"
    assert rows["CPU"].status == "skipped" and "/proc/cpuinfo" in rows["CPU"].detail
