"""The session-end check of tests/unit and tests/integration: a process a test started
and did not stop fails the session (see tests/leftovers.py).

Each case runs an inner pytest session whose conftest is the real conftest of
tests/unit or tests/integration, with tests that leak a child, a double-forked
process and (as root) one that changed uid; the inner session must fail naming each
and leave none alive. This file reads /proc itself rather than trusting the module
it tests, and stops whatever the inner session left.
"""

from __future__ import annotations

import os
import pwd
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator, List

import pytest

TESTS = Path(__file__).resolve().parents[1]

INNER_CONFTEST = """
import importlib.util
import sys

sys.path[:0] = [{tests!r}, {suite!r}]
spec = importlib.util.spec_from_file_location("real_conftest", {conftest!r})
real = importlib.util.module_from_spec(spec)
sys.modules["real_conftest"] = real
spec.loader.exec_module(real)
globals().update({{k: v for k, v in vars(real).items() if not k.startswith("__")}})
"""

LEAKY_TESTS = """
import subprocess


def test_forgets_its_child():
    subprocess.Popen(["sleep", {child!r}])


def test_double_forks():
    subprocess.run(["setsid", "-f", "sleep", {escaped!r}], check=True)


def test_changes_uid():
    if {as_snpd!r}:
        subprocess.run(["setpriv", "--reuid", "snpd", "--regid", "snpd", "--clear-groups",
                        "setsid", "-f", "sleep", {as_snpd!r}], check=True)
"""

TIDY_TESTS = """
import subprocess


def test_stops_its_child():
    child = subprocess.Popen(["sleep", {child!r}])
    child.terminate()
    child.wait()
"""


def _running_sleep(seconds: str) -> bool:
    """Whether a process's command line is exactly ``sleep SECONDS``."""
    for pid in _alive_with(seconds):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if f.read().split(b"\0")[:2] == [b"sleep", seconds.encode()]:
                    return True
        except OSError:
            continue
    return False


def _alive_with(argument: str) -> List[int]:
    """Pids of live (not zombie) processes with ``argument`` in their command line."""
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/cmdline", "rb") as f:
                args = f.read().split(b"\0")
            with open(f"/proc/{name}/stat", "rb") as f:
                state = f.read().rsplit(b")", 1)[1].split()[0]
        except OSError:
            continue
        if argument.encode() in args and state not in (b"Z", b"X"):
            found.append(int(name))
    return found


def _unique_seconds() -> str:
    """A sleep argument no other process on the machine has (and long enough to
    outlive the inner session by far)."""
    return f"{random.randint(3000, 9000)}.{random.randint(0, 10**6):06d}"


@pytest.fixture
def arguments() -> Iterator[List[str]]:
    made: List[str] = []
    yield made
    for argument in made:  # whatever the inner session left: ours to stop
        for pid in _alive_with(argument):
            os.kill(pid, signal.SIGKILL)


def _inner(tmp_path: Path, suite: str, tests: str) -> subprocess.CompletedProcess[str]:
    (tmp_path / "conftest.py").write_text(INNER_CONFTEST.format(
        tests=str(TESTS), suite=str(TESTS / suite), conftest=str(TESTS / suite / "conftest.py")))
    (tmp_path / "test_inner.py").write_text(tests)
    # The inner session imports snpd from where this one does: an installed copy, a
    # checkout, or a package build tree (whose path only this process's sys.path has).
    import snpd

    where = str(Path(snpd.__file__).resolve().parents[1])
    path = os.pathsep.join(p for p in (where, os.environ.get("PYTHONPATH", "")) if p)
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           "--rootdir", str(tmp_path), str(tmp_path)],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "SNPD_LEFTOVER_GRACE": "0.5",
                               "PYTHONPATH": path})


@pytest.mark.parametrize("suite", ["unit", "integration"])
def test_a_session_that_leaves_processes_fails(suite, tmp_path, arguments):
    if shutil.which("setsid") is None:
        pytest.fail("needs setsid (util-linux, which scripts/test installs)")
    child, escaped = _unique_seconds(), _unique_seconds()
    arguments += [child, escaped]
    as_snpd = ""
    if os.geteuid() == 0 and shutil.which("setpriv"):
        try:
            pwd.getpwnam("snpd")
            as_snpd = _unique_seconds()
            arguments.append(as_snpd)
        except KeyError:
            pass
    done = _inner(tmp_path, suite, LEAKY_TESTS.format(child=child, escaped=escaped,
                                                      as_snpd=as_snpd))
    output = done.stdout + done.stderr
    assert done.returncode != 0, output
    assert "outlived the session" in output, output
    for argument in arguments:
        assert f"sleep {argument}  [killed]" in output, output
        assert _alive_with(argument) == [], f"sleep {argument} still runs:\n{output}"


@pytest.mark.parametrize("suite", ["unit", "integration"])
def test_a_session_that_stops_its_processes_passes(suite, tmp_path, arguments):
    child = _unique_seconds()
    arguments.append(child)
    done = _inner(tmp_path, suite, TIDY_TESTS.format(child=child))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "outlived" not in done.stdout + done.stderr


def test_a_test_only_account_without_a_marker_is_reported_not_killed(arguments):
    """Rule 3: a process of a test-only account, new and with a cleared environment,
    is the session's by inference: reported, left to whoever owns it."""
    from leftovers import check, snapshot  # type: ignore[import-not-found]

    if os.geteuid() != 0 or shutil.which("setpriv") is None or shutil.which("setsid") is None:
        pytest.fail("needs root, setpriv and setsid (run scripts/test as root)")
    try:
        pwd.getpwnam("snpd-test-outsider")
    except KeyError:
        pytest.fail("needs the test account snpd-test-outsider (scripts/test creates it)")
    seconds = _unique_seconds()
    arguments.append(seconds)
    before = snapshot()
    subprocess.run(["env", "-i", "setpriv", "--reuid", "snpd-test-outsider", "--regid",
                    "snpd-test-outsider", "--clear-groups", "setsid", "-f", "sleep", seconds],
                   check=True)
    # setsid -f returns before its child has finished exec'ing sleep (mid-exec, the
    # kernel shows comm "sleep" and an empty command line): wait (bounded) until
    # the process is sleep with its argument, as the report must name it.
    deadline = time.monotonic() + 30
    while not _running_sleep(seconds) and time.monotonic() < deadline:
        time.sleep(0.01)
    report = check("no-such-session", before, os.getpid(), grace=0)
    assert f"sleep {seconds}  [a test-only account's" in report, report
    assert "not killed" in report and len(_alive_with(seconds)) == 1
