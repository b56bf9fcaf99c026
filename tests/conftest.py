"""Fixtures shared by every test: the SEV-SNP test vectors.

The vectors live outside the repo, in ``$SNPD_VECTORS`` or else
``<repo>/../shared/vectors`` (see that folder's README.md). Tests that use them
are skipped when neither exists; ``scripts/test`` fails instead when ``CI`` is set.

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

REPO_ROOT = Path(__file__).resolve().parent.parent
MISSING = "test vectors not found: set SNPD_VECTORS or check out ../shared/vectors"

Case = Dict[str, Any]


def _vectors_path() -> Path:
    env = os.environ.get("SNPD_VECTORS")
    return Path(env) if env else REPO_ROOT.parent / "shared" / "vectors"


@pytest.fixture(scope="session")
def vectors_dir() -> Path:
    """The vectors folder (holds cases.json, cases/, roots/, golden/)."""
    path = _vectors_path()
    if not (path / "cases.json").is_file():
        pytest.skip(MISSING)
    return path.resolve()


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
