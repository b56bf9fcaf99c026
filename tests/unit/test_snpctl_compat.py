"""snpctl reads snpguest v0.10's command lines as snpguest does: names in any case,
Bergamo and Siena, its integer syntax, its option spellings, options before the
command, and its request-file and key-file rules. (The end-to-end table runs as
processes in tests/integration/test_snpguest_compat.py.)"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, List, Tuple

import pytest
from snpctlrun import run  # type: ignore[import-not-found]

from snpd.abi.product import Product
from snpd.abi.report import parse_report
from snpd.cli import snpctl


def parse(*argv: str) -> argparse.Namespace:
    return snpctl.build_parser().parse_args(list(argv))


@pytest.fixture(scope="module")
def emu(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("emu")


def direct(emu: Path) -> Tuple[str, ...]:
    return ("--direct", "--backend", "emulator", "--emulator-dir", str(emu))


# -- snpguest's parse_int_auto_radix ------------------------------------------------------


@pytest.mark.parametrize("text, value", [
    ("0", 0), ("33", 33), ("010", 10), ("+7", 7), ("0x3f", 63), ("0xFF", 255),
    ("0b100001", 33), ("0b0", 0), ("18446744073709551615", (1 << 64) - 1)])
def test_integers_read_as_snpguest_reads_them(text: str, value: int) -> None:
    assert snpctl._int(text) == value


@pytest.mark.parametrize("text", ["", "0x", "0b", "0X3f", "0o17", "1_000", " 1", "0b102",
                                  "-1", "0x-1", "3f", "1.0", "++1"])
def test_what_snpguest_refuses_is_refused(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError, match="not an integer"):
        snpctl._int(text)


# -- names in any case ---------------------------------------------------------------------


@pytest.mark.parametrize("spelled, product", [
    ("milan", "Milan"), ("MILAN", "Milan"), ("Genoa", "Genoa"), ("bergamo", "Bergamo"),
    ("SIENA", "Siena"), ("turin", "Turin")])
def test_processor_models_in_any_case(spelled: str, product: str) -> None:
    args = parse("fetch", "ca", "PEM", "certs", spelled, "-e", "VLEK")
    assert (args.product, args.encoding, args.endorser) == (product, "pem", "vlek")


@pytest.mark.parametrize("model, product", [
    ("Milan", Product.MILAN), ("Genoa", Product.GENOA), ("Bergamo", Product.GENOA),
    ("Siena", Product.GENOA), ("Turin", Product.TURIN)])
def test_bergamo_and_siena_use_genoas_chain(model: str, product: Product) -> None:
    """snpguest's ProcType::to_kds_url: Bergamo and Siena are filed under Genoa."""
    assert snpctl.product_arg(model) is product


def test_an_unknown_model_is_a_usage_error_that_lists_the_models() -> None:
    code, _, err = run("fetch", "ca", "pem", "certs", "atlantis")
    assert code == 2
    assert "invalid choice: 'atlantis'" in err and "Bergamo" in err


@pytest.mark.parametrize("argv, dest, value", [
    (["fetch", "vcek", "DER", "d", "r.bin", "-p", "milan"], "product", "Milan"),
    (["fetch", "vcek", "pem", "d", "r.bin", "--processor-model", "SIENA"], "product", "Siena"),
    (["display", "report", "r.bin", "-p", "genoa"], "product", "Genoa"),
    (["key", "k", "VCEK"], "root_key", "vcek"),
    (["key", "k", "vmrk", "--guest_field_select", "0b100001"], "guest_field_select", 33),
    (["key", "k", "vmrk", "--guest-field-select", "0x21"], "guest_field_select", 33),
    (["key", "k", "vmrk", "--guest_svn", "0x2"], "guest_svn", 2),
    (["key", "k", "vmrk", "--tcb_version", "0b1"], "tcb_version", 1),
    (["key", "k", "vmrk", "--launch_mit_vector", "0x1"], "launch_mit_vector", 1),
    (["key", "k", "vmrk", "-l", "3"], "launch_mit_vector", 3),
    (["certificates", "DER", "d"], "encoding", "der"),
    (["report", "r", "q", "-p"], "platform", True),
    (["report", "r", "q", "--platform"], "platform", True),
])
def test_snpguest_spellings(argv: List[str], dest: str, value: Any) -> None:
    assert getattr(parse(*argv), dest) == value


# -- options before the command ------------------------------------------------------------


def test_firmware_options_before_or_after_the_command_mean_the_same() -> None:
    before = parse("--direct", "--backend", "emulator", "--emulator-dir", "E",
                   "--socket", "S", "report", "r", "q")
    after = parse("report", "r", "q", "--direct", "--backend", "emulator",
                  "--emulator-dir", "E", "--socket", "S")
    fields = ("direct", "backend", "emulator_dir", "socket", "bus", "device", "configfs_root")
    assert [getattr(before, f) for f in fields] == [getattr(after, f) for f in fields] == \
        [True, "emulator", "E", "S", None, "/dev/sev-guest", "/sys/kernel/config/tsm/report"]
    # After the command wins when both are given; absent, the defaults hold.
    assert parse("--socket", "A", "status", "--socket", "B").socket == "B"
    assert parse("status").direct is False


def test_the_no_daemon_hint_form_runs(emu: Path, tmp_path: Path) -> None:
    code, out, err = run(*direct(emu), "report", tmp_path / "r.bin", tmp_path / "q", "--random")
    assert code == 0, err
    assert "emulator backend" in out


# -- report, key and display -------------------------------------------------------------------


def test_a_long_request_file_gives_its_first_64_bytes(emu: Path, tmp_path: Path) -> None:
    request = tmp_path / "request.txt"
    request.write_bytes(bytes(range(100)))
    code, _, err = run("report", tmp_path / "r.bin", request, *direct(emu))
    assert code == 0, err
    assert parse_report((tmp_path / "r.bin").read_bytes()).report_data == bytes(range(64))
    assert request.read_bytes() == bytes(range(100)), "the request file is only read"


def test_platform_says_why_it_cannot(emu: Path, tmp_path: Path) -> None:
    """--platform needs the azure backend: the plain emulator's reports bind the
    request bytes themselves (exit 3, as NotSupported); with --random it is a usage
    error, as snpguest's -r conflicts with it. Neither writes a file."""
    request = tmp_path / "q"
    request.write_bytes(b"nonce")
    code, _, err = run("report", tmp_path / "r.bin", request, "-p", *direct(emu))
    assert code == 3, err
    assert "--platform is for Azure confidential VMs" in err and "emulator backend" in err
    code, _, err = run("report", tmp_path / "r.bin", request, "-p", "--random", *direct(emu))
    assert code == 2 and "--random conflicts with --platform" in err
    assert not (tmp_path / "r.bin").exists() and request.read_bytes() == b"nonce"


class CountingDevice:
    """Stands in for the firmware to count what a refused command would have spent."""

    name = "counting"

    def __init__(self) -> None:
        self.requests = 0

    def report(self, *request: Any) -> bytes:
        self.requests += 1
        raise AssertionError("the firmware was asked before the output was checked")

    derived_key = extended_report = report

    def close(self) -> None:
        pass


@pytest.mark.parametrize("command", ["report", "key", "key-in-missing-dir", "report-dir"])
def test_an_unwritable_output_fails_before_the_firmware_is_asked(
        command: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    device = CountingDevice()
    monkeypatch.setattr(snpctl, "_device", lambda args: device)
    (tmp_path / "q").write_bytes(bytes(64))
    argv = {"report": ["report", tmp_path, tmp_path / "q"],
            "report-dir": ["report", tmp_path / "r.bin", tmp_path],
            "key": ["key", tmp_path, "vcek"],
            "key-in-missing-dir": ["key", tmp_path / "nowhere" / "k.bin", "vcek"]}[command]
    if command == "report-dir":
        argv += ["--random"]  # the request file is an output too
    code, out, err = run(*argv, "--direct", "-v", "0")
    assert (code, device.requests) == (2, 0), err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err


def test_an_unreadable_emulator_state_is_one_line(tmp_path: Path) -> None:
    state = tmp_path / "emu"
    state.mkdir()
    (state / "keys").write_bytes(b"")  # a file where a directory must be: even root fails
    code, _, err = run("report", tmp_path / "r.bin", tmp_path / "q", "--random",
                       "--emulator-dir", state)
    assert code == 2, err
    assert "Traceback" not in err and "emulator" in err


def test_display_key_rejects_anything_but_32_bytes(tmp_path: Path) -> None:
    for size in (0, 31, 33, 64):
        (tmp_path / "k").write_bytes(bytes(size))
        code, out, err = run("display", "key", tmp_path / "k")
        assert (code, out) == (2, ""), size
        assert f"holds {size} bytes; a derived key is 32" in err
    (tmp_path / "k").write_bytes(bytes(range(32)))
    code, out, _ = run("display", "key", tmp_path / "k")
    assert code == 0 and out.split() == [f"{b:02x}" for b in range(32)]


def test_display_report_marks_what_a_v2_report_does_not_have(vectors_dir: Path) -> None:
    report = vectors_dir / "cases" / "milan-v2-vcek" / "report.bin"
    assert parse_report(report.read_bytes()).version == 2
    code, out, _ = run("display", "report", report)
    assert code == 0
    lines = {line.split(":", 1)[0].strip(): line.split(":", 1)[1].strip()
             for line in out.splitlines() if ":" in line}
    for field in ("cpuid_fam_id", "cpuid_mod_id", "cpuid_step", "launch_mit_vector",
                  "current_mit_vector"):
        assert lines[field] == "n/a (v2)", field
    assert lines["product"].startswith("unknown")
    # The JSON keeps null: a program reads absence, not a sentence.
    code, out, _ = run("display", "report", report, "--json")
    assert json.loads(out)["cpuid_fam_id"] is None
