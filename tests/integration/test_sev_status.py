"""The SEV status where operators look, from the real daemon (``python -m
snpd.cli.daemon`` as user snpd, daemonproc.py): the start-up journal record's text,
the record that follows once the first report gives the TCB, STATUS=, and
``snpctl status`` / ``status --json`` / ``ok`` as real processes against it.

The journal here is the harness's journald stand-in: a Unix datagram socket bound
in the daemon's temporary directory and passed as ``SNPD_JOURNAL_SOCKET`` (the
override snpd/events.py honours), each datagram parsed as the native protocol,
binary-length fields for values with newlines included (daemonproc.parse_journal).
"""

from __future__ import annotations

import json
import os
import pwd
import subprocess
import sys
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Tuple

import pytest
from daemonproc import (  # type: ignore[import-not-found]
    DEADLINE,
    EmulatedKds,
    EmulatorTemplate,
    Launcher,
    SnpdDaemon,
)

from snpd.emulator.launch import EmulatorConfig
from snpd.events import MESSAGE_IDS
from snpd.status.summary import DOCUMENT_KEYS

pytestmark = pytest.mark.integration

REPO_ROOT = Path(__file__).resolve().parents[2]
Record = Dict[str, str]


@pytest.fixture(scope="module")
def daemon(template: EmulatorTemplate, kds: EmulatedKds) -> Iterator[SnpdDaemon]:
    launcher = Launcher(template, kds)
    try:
        yield launcher.start()
    finally:
        launcher.close(lambda _daemon: {})  # the chip ID must not be in any log


def record(daemon: SnpdDaemon, event: str, **fields: str) -> Record:
    """The first journal record of ``event`` whose fields include ``fields``."""
    found: Record = daemon.wait_journal(
        lambda r: r.get("MESSAGE_ID") == MESSAGE_IDS[event]
        and all(r.get(k) == v for k, v in fields.items()), f"{event} {fields}")
    return found


def snpctl(*argv: str, user: Optional[str] = None) -> Tuple[int, str, str]:
    """``python -m snpd.cli.snpctl ARGV`` as a process of its own (as ``user``, with
    that user's groups, or root), with no daemon address in its environment."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("SNPD_SOCKET", "DBUS_SYSTEM_BUS_ADDRESS")}
    prefix: List[str] = []
    if user is not None:
        pw = pwd.getpwnam(user)
        prefix = ["setpriv", f"--reuid={pw.pw_uid}", f"--regid={pw.pw_gid}", "--init-groups"]
    done = subprocess.run([*prefix, sys.executable, "-m", "snpd.cli.snpctl", *argv],
                          capture_output=True, text=True, cwd=str(REPO_ROOT), env=env,
                          timeout=DEADLINE, check=False)
    return done.returncode, done.stdout, done.stderr


def expected_tcb() -> Any:
    return EmulatorConfig().tcb("reported")  # the template's (default) configuration


def test_the_startup_record_says_what_the_guest_is(daemon: SnpdDaemon) -> None:
    start = record(daemon, "STARTUP_STATUS")
    text = start["MESSAGE"]
    assert text.startswith("snpd ") and " serving, emulator backend. " in text
    for fact in ("SEV-SNP guest (emulated)", "features SEV SEV-ES SEV-SNP", "VMPL 0",
                 "VMPCK0", "product Genoa (emulator configuration)", "state ready"):
        assert fact in text, (fact, text)
    assert start["PRIORITY"] == "5" and start["SNPD_EVENT"] == "STARTUP_STATUS"
    assert (start["SNPD_FEATURES"], start["SNPD_VMPL"], start["SNPD_VMPCK"],
            start["SNPD_PRODUCT"]) == ("SEV SEV-ES SEV-SNP", "0", "0", "Genoa")
    # The product is known at READY=1 without a firmware request.
    ready = daemon.ready["STATUS"]
    assert ready.startswith("ready: Genoa, VMPL 0, TCB ") and "product unknown" not in ready
    assert "emulator backend" in ready
    assert not daemon.capture.errors


def test_the_first_report_gives_the_tcb_in_a_second_record(daemon: SnpdDaemon) -> None:
    tcb = expected_tcb()
    changed = record(daemon, "SEV_STATUS_CHANGED", SNPD_REPORTED_TCB=f"0x{tcb.raw:016x}")
    assert "reported TCB" in changed["SNPD_CHANGED"]
    assert changed["MESSAGE"].startswith("SEV-SNP status changed (")
    for fact in ("features SEV SEV-ES SEV-SNP", "VMPL 0", "VMPCK0", "product Genoa (report)",
                 f"reported TCB 0x{tcb.raw:016x} (bootloader {tcb.bootloader}, tee {tcb.tee}, "
                 f"snp {tcb.snp}, microcode {tcb.microcode})"):
        assert fact in changed["MESSAGE"], (fact, changed["MESSAGE"])
    start = record(daemon, "STARTUP_STATUS")
    assert "reported TCB not known yet" in start["MESSAGE"] or \
        f"0x{tcb.raw:016x}" in start["MESSAGE"]  # a client's report may come first
    # systemctl status follows: product, VMPL, TCB and state on one line.
    short = f"TCB bl{tcb.bootloader} tee{tcb.tee} snp{tcb.snp} uc{tcb.microcode}"
    status = daemon.capture.wait(
        lambda: next((m["STATUS"] for m in daemon.capture.notify
                      if short in m.get("STATUS", "")), None), f"a STATUS= line with {short}")
    assert status.startswith(f"ready: Genoa, VMPL 0, {short}, emulator backend; ")


def test_snpctl_status_shows_the_same_facts(daemon: SnpdDaemon) -> None:
    tcb = expected_tcb()
    record(daemon, "SEV_STATUS_CHANGED", SNPD_REPORTED_TCB=f"0x{tcb.raw:016x}")
    socket = str(daemon.socket_path)
    code, out, err = snpctl("status", "--socket", socket, "--json")
    assert code == 0, err
    doc = json.loads(out)
    assert tuple(doc) == DOCUMENT_KEYS
    assert doc["source"] == "daemon" and doc["transport"] == "varlink"
    assert (doc["state"], doc["backend"], doc["snp_active"], doc["emulated"]) == (
        "ready", "emulator", True, True)
    assert doc["sev_features"] == ["SEV", "SEV-ES", "SEV-SNP"]
    assert (doc["vmpl"], doc["vmpl_assumed"], doc["vmpck"]) == (0, False, 0)
    assert (doc["product"], doc["product_source"]) == ("Genoa", "report")
    assert doc["reported_tcb"] == tcb.to_json()
    # The journal's fields and the document agree.
    start = record(daemon, "STARTUP_STATUS")
    assert start["SNPD_FEATURES"] == " ".join(doc["sev_features"])
    assert (start["SNPD_VMPL"], start["SNPD_VMPCK"]) == (str(doc["vmpl"]), str(doc["vmpck"]))
    # Over D-Bus: the same document but for the transport.
    code, out, err = snpctl("status", "--bus", daemon.bus_address, "--json")
    assert code == 0, err
    over_dbus = json.loads(out)
    assert over_dbus["transport"] == "dbus"
    same = ("state", "snp_active", "sev_features", "vmpl", "vmpck", "product",
            "product_source", "reported_tcb", "backend", "reason")
    assert {k: over_dbus[k] for k in same} == {k: doc[k] for k in same}
    # As text, for a member of snpd-users.
    code, out, err = snpctl("status", "--socket", socket, user="snpd-test-user")
    assert code == 0, err
    lines = out.splitlines()
    assert "  features      SEV SEV-ES SEV-SNP" in lines
    assert "  VMPL          0" in lines and "  VMPCK         VMPCK0" in lines
    assert "  product       Genoa (report)" in lines
    assert f"  reported TCB  0x{tcb.raw:016x} (bootloader {tcb.bootloader}, tee {tcb.tee}, " \
           f"snp {tcb.snp}, microcode {tcb.microcode})" in lines
    assert lines[-1] == "OK: snpd ready (via varlink)"


def test_snpctl_ok_through_the_daemon_and_without_it(daemon: SnpdDaemon,
                                                     tmp_path: Path) -> None:
    code, out, err = snpctl("ok", "--socket", str(daemon.socket_path), "--json")
    assert code == 0, err
    doc = json.loads(out)
    assert doc["source"] == "daemon" and doc["snp_active"] is True
    assert {c["name"]: c["status"] for c in doc["checks"]}["firmware channel"] == "pass"
    # The daemon refuses an outsider its properties: ok looks locally instead (this
    # machine is no SEV-SNP guest, and an unprivileged user cannot read the kernel
    # log where kernel.dmesg_restrict is 1), and says so, instead of failing with 3.
    code, out, err = snpctl("ok", "--socket", str(daemon.socket_path), "--json",
                            user="snpd-test-outsider")
    assert code == 1, err
    local = json.loads(out)
    assert local["source"] == "local" and "GetProperties" in local["daemon_error"]
    names = [c["name"] for c in local["checks"]]
    assert names[:2] == ["SEV-SNP", "kernel log"] and names[-1] == "snpd"
    # No daemon at all: the same local checks.
    code, out, err = snpctl("ok", "--socket", str(tmp_path / "none"), "--bus",
                            f"unix:path={tmp_path}/no-bus", "--json")
    assert code in (0, 1), err  # 1 here; 0 on an SEV-SNP guest
    assert json.loads(out)["source"] == "local"
