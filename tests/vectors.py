"""Where the shared SEV-SNP test vectors are: ``$SNPD_VECTORS`` or ``<repo>/../shared/vectors``.

They are third-party data and never part of the repository. The only skips in
the suite are tests that need them when neither place has them (scripts/test
fails instead under CI).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

REPO_ROOT = Path(__file__).resolve().parent.parent
MISSING = "test vectors not found: set SNPD_VECTORS or check out ../shared/vectors"


def vectors_path() -> Optional[Path]:
    """The vectors folder (holding cases.json), or None when it is absent."""
    env = os.environ.get("SNPD_VECTORS")
    path = Path(env) if env else REPO_ROOT.parent / "shared" / "vectors"
    return path.resolve() if (path / "cases.json").is_file() else None
