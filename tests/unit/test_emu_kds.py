"""snpd-emu kds as a real process on 127.0.0.1, driven by snpctl's fetch commands."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator, List, Tuple

import pytest
from snpctlrun import run  # type: ignore[import-not-found]

REPO = Path(__file__).resolve().parents[2]


def start_kds(emu: Path, tmp_path: Path, *faults: str) -> Tuple[subprocess.Popen[bytes], str]:
    url_file = tmp_path / "url"
    argv: List[str] = [sys.executable, "-m", "snpd.cli.emu", "--emulator-dir", str(emu), "kds",
                       "--url-file", str(url_file)]
    for fault in faults:
        argv += ["--fault", fault]
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    for _ in range(600):  # wait for the URL file (bounded: 60 s)
        if url_file.is_file() and url_file.read_text().strip():
            return proc, url_file.read_text().strip()
        if proc.poll() is not None:
            raise AssertionError(proc.stderr.read().decode() if proc.stderr else "exited")
        time.sleep(0.1)
    proc.kill()
    raise AssertionError("snpd-emu kds did not start")


@pytest.fixture(scope="module")
def emu(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("emu")


@pytest.fixture
def kds(emu: Path, tmp_path: Path) -> Iterator[str]:
    proc, url = start_kds(emu, tmp_path, "status=429,retry_after=0,count=1")
    try:
        yield url
    finally:
        proc.terminate()
        assert proc.wait(timeout=30) == 0
        if proc.stderr:
            proc.stderr.close()


def test_fetch_and_verify_against_the_emulated_kds(emu: Path, kds: str, tmp_path: Path) -> None:
    direct = ("--backend", "emulator", "--emulator-dir", emu)
    assert run("report", tmp_path / "r.bin", tmp_path / "q.bin", "--random", *direct)[0] == 0
    root = emu / "certs" / "ark.pem"
    certs = tmp_path / "certs"
    code, _, err = run("fetch", "ca", "pem", certs, "--report", tmp_path / "r.bin",
                       "--kds-url", kds, "--trust-root", root)
    assert code == 0, err  # the first request met a 429 and was retried
    code, _, err = run("fetch", "vcek", "pem", certs, tmp_path / "r.bin", "--kds-url", kds)
    assert code == 0, err
    code, _, err = run("fetch", "crl", "der", certs, "--report", tmp_path / "r.bin",
                       "--kds-url", kds, "--trust-root", root)
    assert code == 0, err
    code, out, _ = run("verify", "attestation", certs, tmp_path / "r.bin", "--trust-root", root)
    assert code == 0, out
    assert "PASS  chain.crl" in out
    # Without the explicit root, the emulator is never trusted.
    assert run("verify", "attestation", certs, tmp_path / "r.bin")[0] == 1


def test_fault_specs_are_validated(tmp_path: Path) -> None:
    from snpd.cli import emu

    out, err = io.StringIO(), io.StringIO()
    argv = ["--emulator-dir", str(tmp_path / "never"), "kds", "--fault", "status=abc"]
    assert emu.main(argv, stdout=out, stderr=err) == 2
    assert "status" in err.getvalue()
    assert not (tmp_path / "never").exists()  # refused before any state was created
