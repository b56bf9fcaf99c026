"""Integration fixtures: a real private system-like bus loading the shipped policy,
the D-Bus transport served by user ``snpd`` in a child process, and the test
accounts (see dbusbus.py).

These tests need root (they create users and groups and change uid), dbus-daemon,
busctl and dbus-fast; a missing prerequisite is a failure, never a skip:
scripts/test installs and creates all of them.

At the end of the session, after every fixture has stopped what it started (the
private dbus-daemons, the daemon, the emulated KDS), any process the tests started
that is still alive fails the session (tests/leftovers.py).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import shutil
from typing import TYPE_CHECKING, Iterator

import pytest
from dbusbus import (  # type: ignore[import-not-found]
    Accounts,
    PeerProcess,
    PrivateBus,
    ensure_test_accounts,
)
from leftovers import no_leftover_processes  # type: ignore[import-not-found]  # noqa: F401

if TYPE_CHECKING:
    from daemonproc import EmulatedKds, EmulatorTemplate  # type: ignore[import-not-found]


@dataclasses.dataclass(frozen=True)
class Served:
    """A private bus with the transport serving org.snpd.Snpd1 on it."""

    address: str
    daemon_name: str  # the server's unique name
    accounts: Accounts
    bus: PrivateBus


def _missing() -> str:
    missing = []
    if os.geteuid() != 0:
        missing.append("root")
    missing += [tool for tool in ("dbus-daemon", "busctl", "useradd", "groupadd", "gpasswd")
                if shutil.which(tool) is None]
    if importlib.util.find_spec("dbus_fast") is None:
        missing.append("the dbus-fast package")
    return ", ".join(missing)


@pytest.fixture(scope="session")
def accounts() -> Accounts:
    missing = _missing()
    if missing:
        message = f"D-Bus integration tests need {missing}"
        pytest.fail(message + " (scripts/test installs and creates all of it, as root)")
    return ensure_test_accounts()


@pytest.fixture(scope="module")
def template(accounts: Accounts) -> Iterator[EmulatorTemplate]:
    """An emulator state for the daemon tests (one per module; keys made once)."""
    from daemonproc import EmulatorTemplate  # type: ignore[import-not-found]

    if shutil.which("setpriv") is None:
        pytest.fail("the daemon tests need setpriv (util-linux) to run snpd as user snpd")
    made = EmulatorTemplate()
    yield made
    made.close()


@pytest.fixture(scope="module")
def kds(template: EmulatorTemplate) -> Iterator[EmulatedKds]:
    """``snpd-emu kds`` on 127.0.0.1 for the template (modules with an in-process
    KdsServer define their own ``kds``)."""
    from daemonproc import EmulatedKds

    server = EmulatedKds(template.directory)
    yield server
    server.close()


def _serve(bus: PrivateBus, accounts: Accounts, *, address_from_env: bool) -> Iterator[Served]:
    peer = PeerProcess(bus.address, "snpd", accounts, address_from_env=address_from_env)
    try:
        if peer.ready is None:
            pytest.fail(f"the D-Bus server did not start: {peer.failure}\n{peer.stderr()}\n"
                        f"dbus-daemon: {bus.daemon_log()}")
        yield Served(bus.address, peer.ready, accounts, bus)
    finally:
        log = peer.stderr()
        status = peer.close()
    assert status == 0, f"the D-Bus server exited with {status}:\n{log}"


@pytest.fixture(scope="session")
def strict_bus(accounts: Accounts) -> Iterator[PrivateBus]:
    """The bus with exactly the shipped policy."""
    bus = PrivateBus.shipped()
    yield bus
    bus.close()


@pytest.fixture(scope="session")
def strict(strict_bus: PrivateBus, accounts: Accounts) -> Iterator[Served]:
    yield from _serve(strict_bus, accounts, address_from_env=False)


@pytest.fixture(scope="session")
def permissive(accounts: Accounts) -> Iterator[Served]:
    """The shipped policy plus a mandatory allow-all for sends to org.snpd.Snpd1:
    only the daemon's own re-check remains. This server finds its bus through
    DBUS_SYSTEM_BUS_ADDRESS."""
    bus = PrivateBus.shipped(permissive=True)
    try:
        yield from _serve(bus, accounts, address_from_env=True)
    finally:
        bus.close()
