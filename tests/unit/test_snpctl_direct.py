"""snpctl in direct mode on the emulator: the snpguest workflow end to end."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Tuple

import pytest
from snpctlrun import run  # type: ignore[import-not-found]

from snpd.abi.report import parse_report


@pytest.fixture(scope="module")
def emu(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("emu")


def direct(emu: Path) -> Tuple[str, ...]:
    return ("--direct", "--backend", "emulator", "--emulator-dir", str(emu))


def test_report_binds_the_request_file(emu: Path, tmp_path: Path) -> None:
    request = tmp_path / "request.bin"
    request.write_bytes(b"nonce-1234" + bytes(54))
    code, _out, err = run("report", tmp_path / "r.bin", request, *direct(emu))
    assert code == 0, err
    report = parse_report((tmp_path / "r.bin").read_bytes())
    assert report.report_data == request.read_bytes()
    # --random writes the generated data to the request file.
    code, _, err = run("report", tmp_path / "r2.bin", tmp_path / "rand.bin", "--random",
                       *direct(emu))
    assert code == 0, err
    assert parse_report((tmp_path / "r2.bin").read_bytes()).report_data == \
        (tmp_path / "rand.bin").read_bytes()


def test_certificates_then_verify(emu: Path, tmp_path: Path) -> None:
    certs = tmp_path / "certs"
    assert run("report", tmp_path / "r.bin", tmp_path / "req", "--random", *direct(emu))[0] == 0
    code, _, err = run("certificates", "pem", certs, *direct(emu))
    assert code == 0, err
    assert {"ark.pem", "ask.pem", "vcek.pem"} <= {p.name for p in certs.iterdir()}
    code, out, _ = run("verify", "attestation", certs, tmp_path / "r.bin", "--json")
    assert code == 1 and json.loads(out)["failures"] == ["chain.ark_trusted"]
    code, out, _ = run("verify", "attestation", certs, tmp_path / "r.bin", "--trust-root",
                       certs / "ark.pem")
    assert code == 0 and "VALID" in out


def test_key_is_stable_and_changes_exactly_with_selected_fields(emu: Path,
                                                                tmp_path: Path) -> None:
    def key(name: str, select: int) -> bytes:
        code, _, err = run("key", tmp_path / name, "vcek", "-g", hex(select), *direct(emu))
        assert code == 0, err
        return (tmp_path / name).read_bytes()

    measurement_only, policy_only = key("m1", 0b1000), key("p1", 0b0001)
    assert key("m2", 0b1000) == measurement_only  # stable across runs
    # Relaunch the emulated guest with another measurement.
    (emu / "emulator.toml").write_text('measurement = "' + "ab" * 48 + '"\n')
    try:
        assert key("m3", 0b1000) != measurement_only  # selected field changed
        assert key("p2", 0b0001) == policy_only      # unselected field changed
    finally:
        (emu / "emulator.toml").unlink()
    assert key("m4", 0b1000) == measurement_only
    assert oct((tmp_path / "m4").stat().st_mode & 0o777) == "0o600"


def test_key_arguments(emu: Path, tmp_path: Path) -> None:
    code, _, err = run("key", tmp_path / "k", "vcek", "-g", "0x80", *direct(emu))
    assert code == 2 and "guest_field_select" in err
    code, _, err = run("key", tmp_path / "k", "vmrk", "-v", "3", *direct(emu))
    assert code == 0, err


def test_ok_and_bad_emulator_config(emu: Path) -> None:
    code, out, _ = run("ok", *direct(emu), "--json")
    assert code == 0 and json.loads(out)["snp_active"] is True
    (emu / "emulator.toml").write_text("measurment = 1\n")
    try:
        code, _, err = run("report", "/dev/null", "/dev/null", *direct(emu))
        assert code == 2 and "measurment" in err
    finally:
        (emu / "emulator.toml").unlink()


def test_no_guest_interface_is_exit_3(tmp_path: Path) -> None:
    code, _, err = run("report", tmp_path / "r", tmp_path / "q", "--random", "--direct",
                       "--device", tmp_path / "nonexistent", "--configfs-root",
                       tmp_path / "none")
    assert code == 3 and "emulator" in err


# Not "ok": without a daemon it checks locally (tests/unit/test_snpctl_status.py).
@pytest.mark.parametrize("command", [["report", "r.bin", "q.bin", "--random"], ["status"],
                                     ["key", "k.bin", "vcek"], ["evidence", "e.json"],
                                     ["certificates", "pem", "certs"]])
def test_daemon_not_running_is_exit_3_with_a_hint(command: list, tmp_path: Path,  # type: ignore[type-arg]
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("DBUS_SYSTEM_BUS_ADDRESS", f"unix:path={tmp_path}/no-bus")
    code, _, err = run(*command, "--socket", tmp_path / "no-socket")
    assert code == 3, err
    assert "daemon not running" in err and "--direct" in err
    code, _, err = run(*command, "--bus", f"unix:path={tmp_path}/no-bus")
    assert code == 3 and "--direct" in err
