"""A pytest plugin for the unit tests that run during the package build.

It does two things, only in this run (debian/rules loads this file with -p).

The AMD test vectors (real AMD-signed reports and their certificates) are
third-party data, not part of the source package, and everywhere else a test
that needs them fails when they are missing. Here they are deselected instead,
by what they need rather than by name, so a new vector test is deselected
without anyone listing it: every test whose fixture closure holds the
``vectors_dir`` fixture (tests/conftest.py; ``cases`` and ``case_dir`` depend on
it, tests/unit/test_fuzz.py's ``needs_vectors`` and test_appraisal.py's
``needs_vectors`` mark their tests with fixtures that do). The run says how many
it deselected and why, after collection and in the summary.

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

Each is ignored by an exact message; everything else stays an error.
"""

from __future__ import annotations

from typing import Any, List

# The fixture every test that reads the vectors needs, directly or through another.
VECTORS_FIXTURE = "vectors_dir"
WHY = (f"they need the AMD test vectors (fixture {VECTORS_FIXTURE}), third-party data"
       " that is not in the source package")

_deselected: List[str] = []


def pytest_configure(config: Any) -> None:
    config.addinivalue_line(
        "filterwarnings",
        r"ignore:DynamicImporter\.exec_module\(\) not found; falling back to load_module\(\)"
        r":ImportWarning")
    config.addinivalue_line(
        "filterwarnings",
        r"ignore:Exception ignored in. <socket\.socket fd=-1, family=1, type=1"
        r":pytest.PytestUnraisableExceptionWarning")


def pytest_collection_modifyitems(config: Any, items: List[Any]) -> None:
    need = [i for i in items if VECTORS_FIXTURE in getattr(i, "fixturenames", ())]
    if need:
        config.hook.pytest_deselected(items=need)
        items[:] = [i for i in items if VECTORS_FIXTURE not in getattr(i, "fixturenames", ())]
        _deselected[:] = [i.nodeid for i in need]


def _line() -> str:
    return f"pytest_debian: deselected {len(_deselected)} tests: {WHY}"


def pytest_report_collectionfinish(config: Any, start_path: Any, items: List[Any]) -> str:
    return _line()


def pytest_terminal_summary(terminalreporter: Any) -> None:
    terminalreporter.write_line(_line())
