"""A pytest plugin for the unit tests that run during the package build.

pyproject.toml turns every warning into an error (filterwarnings = ["error"]),
which is right for snpd's own code. Two warnings come from Debian bookworm's
own library versions, which the upstream test environments (PyPI wheels) do
not have, and say nothing about snpd:

- python3-gi 3.42 on Python 3.11 warns "DynamicImporter.exec_module() not
  found" when imported; dbus_fast (1.84.2) imports it through dbus_fast.glib
  whenever python3-gi is installed on the build machine.
- dbus-fast 1.84.2 leaks the socket it creates inside MessageBus() when it
  cannot connect (the constructor connects and raises without closing it); the
  tests that check snpctl's answer to a missing bus see it as an unraisable
  ResourceWarning on an AF_UNIX socket.

Each is ignored by an exact message, and only in this run (debian/rules loads
this file with -p); everything else stays an error.
"""

from __future__ import annotations

from typing import Any


def pytest_configure(config: Any) -> None:
    config.addinivalue_line(
        "filterwarnings",
        r"ignore:DynamicImporter\.exec_module\(\) not found; falling back to load_module\(\)"
        r":ImportWarning")
    config.addinivalue_line(
        "filterwarnings",
        r"ignore:Exception ignored in. <socket\.socket fd=-1, family=1, type=1"
        r":pytest.PytestUnraisableExceptionWarning")
