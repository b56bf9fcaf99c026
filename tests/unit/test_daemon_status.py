"""The daemon's SEV status where operators look, in-process: the start-up journal
record's text and fields, the record after a change, and STATUS= (the subprocess
version over a real journal socket is tests/integration/test_sev_status.py)."""

from __future__ import annotations

import asyncio
import base64
import json
from pathlib import Path
from typing import Callable, Dict, List, Mapping, Optional

import pytest
from inprocess import emulator_config

from snpd import __version__
from snpd.config import parse_config
from snpd.daemon import Daemon
from snpd.emulator.launch import EmulatorConfig
from snpd.errors import VmpckDisabled
from snpd.events import MESSAGE_IDS, Events
from snpd.notify import Notifier
from snpd.varlink.client import VarlinkClient

Record = Dict[str, str]


class ListSink:
    def __init__(self) -> None:
        self.records: List[Record] = []

    def send(self, fields: Mapping[str, str]) -> None:
        self.records.append(dict(fields))


class ListNotifier(Notifier):
    def __init__(self) -> None:
        super().__init__({})
        self.sent: List[Dict[str, object]] = []

    def send(self, **fields: object) -> bool:
        self.sent.append(fields)
        return True


def run_daemon(tmp_path: Path, device: str, *, until: Callable[[List[Record]], bool],
               emulator: str = "", client: Optional[Callable[[VarlinkClient], None]] = None,
               root: Optional[Path] = None) -> Daemon:
    """Start a daemon (varlink only), call ``client``, wait (bounded) until ``until``
    holds for the journal records, stop it."""
    socket_path = tmp_path / "run" / "snpd.varlink"
    config = parse_config(emulator_config(tmp_path, socket_path, device=device,
                                          emulator=emulator))
    sink = ListSink()
    daemon = Daemon(config, config_path=None, events=Events(sink), notifier=ListNotifier(),
                    probe_file=tmp_path / "probe.json", root=root or tmp_path)
    daemon.sink = sink  # type: ignore[attr-defined]

    def calls() -> None:
        if client is not None:
            with VarlinkClient(str(socket_path), timeout=30) as connection:
                client(connection)

    async def main() -> int:
        task = asyncio.ensure_future(daemon.run())
        for _ in range(600):  # bounded waits, no timing assertions
            if socket_path.exists():
                break
            await asyncio.sleep(0.05)
        await asyncio.get_running_loop().run_in_executor(None, calls)
        for _ in range(600):
            if until(sink.records):
                break
            await asyncio.sleep(0.05)
        daemon.request_stop()
        return await task

    assert asyncio.run(main()) == 0
    return daemon


def by_id(records: List[Record], event: str) -> List[Record]:
    return [r for r in records if r.get("MESSAGE_ID") == MESSAGE_IDS[event]]


def statuses(daemon: Daemon) -> List[str]:
    return [str(m["STATUS"]) for m in daemon.notifier.sent  # type: ignore[attr-defined]
            if "STATUS" in m]


def test_the_emulator_logs_its_facts_then_the_tcb(tmp_path: Path) -> None:
    daemon = run_daemon(tmp_path, 'backend = "emulator"',
                        until=lambda rs: bool(by_id(rs, "SEV_STATUS_CHANGED")))
    records: List[Record] = daemon.sink.records  # type: ignore[attr-defined]
    (start,) = by_id(records, "STARTUP_STATUS")
    assert start["PRIORITY"] == "5"
    assert start["MESSAGE"] == (
        f"snpd {__version__} serving, emulator backend. SEV-SNP guest (emulated): features "
        "SEV SEV-ES SEV-SNP; VMPL 0; VMPCK0; product Genoa (emulator configuration); "
        "reported TCB not known yet; state ready")
    assert {k: start[k] for k in ("SNPD_FEATURES", "SNPD_VMPL", "SNPD_VMPCK", "SNPD_PRODUCT",
                                  "SNPD_PRODUCT_SOURCE", "SNPD_STATE")} == {
        "SNPD_FEATURES": "SEV SEV-ES SEV-SNP", "SNPD_VMPL": "0", "SNPD_VMPCK": "0",
        "SNPD_PRODUCT": "Genoa", "SNPD_PRODUCT_SOURCE": "emulator", "SNPD_STATE": "ready"}
    (changed,) = by_id(records, "SEV_STATUS_CHANGED")
    tcb = EmulatorConfig().tcb("reported")
    assert changed["SNPD_CHANGED"] == "product source, reported TCB"
    assert changed["SNPD_REPORTED_TCB"] == f"0x{tcb.raw:016x}"
    assert f"product Genoa (report); reported TCB 0x{tcb.raw:016x} (bootloader " \
        f"{tcb.bootloader}, tee {tcb.tee}, snp {tcb.snp}, microcode {tcb.microcode})" \
        in changed["MESSAGE"]
    # The first STATUS= already names the product; a later one adds the TCB.
    lines = statuses(daemon)
    assert lines[0] == ("ready: Genoa, VMPL 0, TCB unknown, emulator backend; 0 reports, "
                        "0 keys, 0 busy")
    assert f"ready: Genoa, VMPL 0, TCB bl{tcb.bootloader} tee{tcb.tee} snp{tcb.snp} " \
        f"uc{tcb.microcode}, emulator backend; 1 reports" in lines[1:-1][0]


def test_a_degraded_state_is_logged_again(tmp_path: Path) -> None:
    def report(client: VarlinkClient) -> None:
        with pytest.raises(VmpckDisabled):  # what this test is about
            client.call("org.snpd.Attestation.GetReport",
                        {"report_data": base64.b64encode(b"x").decode()})

    # Exchange 1 is the daemon's own start-up report; the wipe takes the key before 2.
    daemon = run_daemon(tmp_path, 'backend = "emulator"',
                        emulator='faults = [{kind = "wipe", after = 1}]', client=report,
                        until=lambda rs: any(r.get("SNPD_STATE") == "degraded" for r in rs))
    records: List[Record] = daemon.sink.records  # type: ignore[attr-defined]
    degraded = [r for r in by_id(records, "SEV_STATUS_CHANGED")
                if r.get("SNPD_STATE") == "degraded"]
    # The state change is logged once, as a warning. The start-up report's answer may
    # reach the loop after the broker has already turned degraded; it then either
    # rides in the same record or comes as one more (a TCB change, still degraded),
    # depending on which the loop sees first. Never the same text twice.
    assert 1 <= len(degraded) <= 2, degraded
    assert all(r["PRIORITY"] == "4" for r in degraded)
    assert "state" in degraded[0]["SNPD_CHANGED"].split(", ")
    assert all("state" not in r["SNPD_CHANGED"].split(", ") for r in degraded[1:])
    assert len({r["MESSAGE"] for r in degraded}) == len(degraded)
    assert degraded[0]["MESSAGE"].startswith("SEV-SNP status changed (")
    assert "SEV-SNP guest (emulated): features SEV SEV-ES SEV-SNP; " in degraded[0]["MESSAGE"]
    assert "; state degraded: " in degraded[0]["MESSAGE"]
    assert any(s.startswith("DEGRADED: Genoa, VMPL 0, TCB bl") for s in statuses(daemon))


def test_a_guest_that_is_not_sev_snp(tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    # What snpd-probe recorded: a readable kernel log without a single SEV line.
    (tmp_path / "probe.json").write_text(json.dumps({
        "root": str(root), "kernel_lines": [], "kernel_log_source": "/dev/kmsg",
        "kernel_log_error": None, "sev_status_msr": None}))
    daemon = run_daemon(tmp_path, f'backend = "auto"\npath = "{root}/dev/sev-guest"\n'
                        f'configfs_root = "{root}/tsm"', root=root,
                        until=lambda rs: bool(by_id(rs, "SEV_STATUS_CHANGED")))
    records: List[Record] = daemon.sink.records  # type: ignore[attr-defined]
    (start,) = by_id(records, "STARTUP_STATUS")
    assert start["MESSAGE"] == (
        f"snpd {__version__} serving, none backend. not an SEV-SNP guest: no 'Memory "
        "Encryption Features active' line in the kernel log and no /dev/sev-guest; state ready")
    assert start["SNPD_SNP_ACTIVE"] == "False"
    assert start["SNPD_NOT_SNP_REASON"].startswith("not an SEV-SNP guest")
    assert "SNPD_PRODUCT" not in start  # no firmware channel: no CPU product claimed
    (failed,) = by_id(records, "SEV_STATUS_CHANGED")
    assert failed["SNPD_STATE"] == "failed" and failed["PRIORITY"] == "4"
    lines = statuses(daemon)
    assert lines[0] == "ready: not an SEV-SNP guest, none backend; 0 reports, 0 keys, 0 busy"
    assert any(s.startswith("FAILED: not an SEV-SNP guest, none backend; 0 reports, 0 keys, "
                            "0 busy; the firmware channel is unavailable") for s in lines)
