"""Where the shared SEV-SNP test vectors are: ``$SNPD_VECTORS`` or ``<repo>/../shared/vectors``.

They are third-party data and never part of the repository. A test that needs
them fails, naming both places, when neither has them (scripts/test stops
earlier under CI). Nothing in the suite skips; only the Debian package build,
which never has them, deselects those tests (packaging/debian/pytest_debian.py,
by the vectors_dir fixture).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

REPO_ROOT = Path(__file__).resolve().parent.parent
MISSING = "test vectors not found: set SNPD_VECTORS or check out ../shared/vectors"


def _candidate() -> Path:
    env = os.environ.get("SNPD_VECTORS")
    return Path(env) if env else REPO_ROOT.parent / "shared" / "vectors"


def vectors_path() -> Optional[Path]:
    """The vectors folder (holding cases.json), or None when it is absent."""
    path = _candidate()
    return path.resolve() if (path / "cases.json").is_file() else None


def missing() -> str:
    """MISSING, with where this run looked (a set SNPD_VECTORS is the only place looked)."""
    where = ("SNPD_VECTORS=" if os.environ.get("SNPD_VECTORS") else "") + str(_candidate())
    return f"{MISSING} (no cases.json in {where})"
