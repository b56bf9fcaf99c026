"""A daemon that is not running is reported as unavailable, never as "NotSupported".

``snpctl --json`` prints the error's ``kind``; scripts branch on it. "NotSupported"
means the daemon answered that it cannot do something, which would send a script
looking for a missing feature instead of starting the daemon.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path
from typing import Iterator, Tuple

import pytest
from snpctlrun import run  # type: ignore[import-not-found]

from snpd.client import DaemonUnavailable, SnpdClient
from snpd.errors import ALL_KINDS, EXIT_UNAVAILABLE

REPO_ROOT = Path(__file__).resolve().parents[2]
if str(REPO_ROOT) not in sys.path:  # the Debian build runs pytest from its build directory
    sys.path.append(str(REPO_ROOT))

from tests.harness.bus import PrivateBus  # noqa: E402


@pytest.fixture
def nothing_there(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Tuple[str, str]:
    """Neither the varlink socket nor the system bus exists: the daemon is not running."""
    socket, bus = str(tmp_path / "snpd.varlink"), f"unix:path={tmp_path}/system_bus_socket"
    monkeypatch.setenv("SNPD_SOCKET", socket)
    monkeypatch.setenv("DBUS_SYSTEM_BUS_ADDRESS", bus)
    return socket, bus


def test_kind_means_unavailable():
    assert DaemonUnavailable.kind == "DaemonUnavailable"
    assert DaemonUnavailable.exit_code == EXIT_UNAVAILABLE
    # A client-side error: the daemon never sends it, so it is no wire kind.
    assert DaemonUnavailable.kind not in ALL_KINDS


def test_not_running_names_socket_bus_and_direct(nothing_there):
    socket, bus = nothing_there
    with pytest.raises(DaemonUnavailable) as info:
        SnpdClient()
    message = str(info.value)
    assert info.value.kind == "DaemonUnavailable"
    assert "daemon not running or not reachable" in message
    assert f"varlink socket {socket}: No such file or directory" in message
    assert f"D-Bus {bus}: No such file or directory" in message
    assert "snpctl --direct" in message and "\n" not in message


@pytest.mark.parametrize("command", [["status"], ["report", "r.bin", "q.bin", "--random"],
                                     ["key", "k.bin", "vcek"]])
def test_snpctl_json_kind_is_unavailable(command, nothing_there, tmp_path, monkeypatch):
    socket, bus = nothing_there
    monkeypatch.chdir(tmp_path)
    code, out, err = run("--json", *command)
    assert code == EXIT_UNAVAILABLE, err
    doc = json.loads(out)
    assert doc["kind"] == "DaemonUnavailable", doc
    assert socket in doc["message"] and bus in doc["message"]
    assert "--direct" in doc["message"]


@pytest.fixture
def empty_bus() -> Iterator[str]:
    """A running dbus-daemon on which nobody owns org.snpd.Snpd1."""
    if shutil.which("dbus-daemon") is None:
        if os.environ.get("CI"):
            pytest.fail("dbus-daemon is missing (scripts/test installs it)")
        pytest.fail("needs dbus-daemon (scripts/test installs it)")
    with PrivateBus("allow-all") as bus:  # the constructor returns once it listens
        yield bus.address


def test_bus_without_snpd_names_socket_bus_and_direct(empty_bus, nothing_there, monkeypatch):
    socket, _ = nothing_there
    monkeypatch.setenv("DBUS_SYSTEM_BUS_ADDRESS", empty_bus)
    # The bus answers, so the client connects; the first call finds no daemon on it.
    with SnpdClient() as client, pytest.raises(DaemonUnavailable) as info:
        client.properties()
    message = str(info.value)
    assert f"varlink socket {socket}: No such file or directory" in message
    assert f"D-Bus {empty_bus}: org.snpd.Snpd1 has no owner" in message
    assert "snpctl --direct" in message
    code, out, err = run("--json", "status", "--bus", empty_bus)
    assert code == EXIT_UNAVAILABLE, err
    doc = json.loads(out)
    assert doc["kind"] == "DaemonUnavailable", doc
    assert f"D-Bus {empty_bus}: org.snpd.Snpd1 has no owner" in doc["message"], doc
