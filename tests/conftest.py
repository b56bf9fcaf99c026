"""Fixtures shared by every test: the SEV-SNP test vectors.

The vectors live outside the repo, in ``$SNPD_VECTORS`` or else
``<repo>/../shared/vectors`` (see that folder's README.md). Tests that use them
fail when neither exists (``scripts/test`` stops earlier when ``CI`` is set); the
Debian package build, which has no vectors, deselects them by this fixture
(packaging/debian/pytest_debian.py).

    def test_something(cases, case_dir):
        for case in cases:
            raw = (case_dir(case) / "report.bin").read_bytes()
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable, Dict, List, Union

import pytest
from vectors import missing, vectors_path  # type: ignore[import-not-found]

from snpd.bundled import use_bundled_dbus_fast

# As the daemon does: where no dbus-fast is installed (a profile whose distribution
# lacks it), the tests use the copy its package bundles in snpd/_bundled.
use_bundled_dbus_fast()

Case = Dict[str, Any]


@pytest.fixture(scope="session")
def vectors_dir() -> Path:
    """The vectors folder (holds cases.json, cases/, roots/, golden/)."""
    path = vectors_path()
    if path is None:
        pytest.fail(missing())
    return path


@pytest.fixture(scope="session")
def cases(vectors_dir: Path) -> List[Case]:
    """cases.json, parsed: a list of dicts with id, dir, product, expect, ..."""
    with open(vectors_dir / "cases.json", encoding="utf-8") as f:
        data = json.load(f)
    assert isinstance(data, list) and data, "cases.json must be a non-empty list"
    return data


@pytest.fixture(scope="session")
def case_dir(vectors_dir: Path, cases: List[Case]) -> Callable[[Union[Case, str]], Path]:
    """``case_dir(case)`` gives a case's folder; ``case`` is a cases.json entry or an id."""
    by_id = {c["id"]: c for c in cases}

    def _case_dir(case: Union[Case, str]) -> Path:
        entry = by_id[case] if isinstance(case, str) else case
        return vectors_dir / entry["dir"]

    return _case_dir


def pytest_collection_modifyitems(config: pytest.Config, items: List[pytest.Item]) -> None:
    """Tests of a built package run only where the package stage names it
    (SNPD_TEST_RPMS): deselected elsewhere, since no RPM exists before that stage."""
    if os.environ.get("SNPD_TEST_RPMS"):
        return
    keep = [item for item in items if item.get_closest_marker("rpm_payload") is None]
    if len(keep) != len(items):
        config.hook.pytest_deselected(items=[i for i in items if i not in keep])
        items[:] = keep

