"""snpctl in this process, its output captured: what the snpctl unit tests share."""

from __future__ import annotations

import io
import json
from typing import Any, Dict, Tuple

from snpd.cli import snpctl


def run(*argv: object) -> Tuple[int, str, str]:
    """``snpctl ARGV…`` → (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    code = snpctl.main([str(a) for a in argv], stdout=out, stderr=err)
    return code, out.getvalue(), err.getvalue()


def run_json(*argv: object) -> Tuple[int, Dict[str, Any]]:
    """``snpctl ARGV… --json`` → (exit code, the document)."""
    code, out, err = run(*argv, "--json")
    assert out, err
    doc: Dict[str, Any] = json.loads(out)
    return code, doc
