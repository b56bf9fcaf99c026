"""Every import inside a function says why it is not at module level (issue 13).

An import belongs at the top of its module unless a start-up budget, an optional
dependency or a heavy library a process often never needs keeps it in a function;
that reason is written beside it: a comment on the import's line or the line before.
A run of imports one after another in the same body shares the comment of its first.
"""

from __future__ import annotations

import ast
from pathlib import Path
from typing import List

PACKAGE = Path(__file__).resolve().parents[2] / "snpd"
Import = (ast.Import, ast.ImportFrom)


def undocumented(source: str, name: str) -> List[str]:
    """``name:line`` of each function-level import with no comment for it."""
    tree = ast.parse(source, name)
    lines = source.splitlines()
    lazy = {id(node) for function in ast.walk(tree)
            if isinstance(function, (ast.FunctionDef, ast.AsyncFunctionDef))
            for node in ast.walk(function) if isinstance(node, Import)}
    bad = []
    for parent in ast.walk(tree):
        for field in ("body", "orelse", "finalbody"):
            body = getattr(parent, field, None)
            previous = None
            for node in body if isinstance(body, list) else []:
                if id(node) in lazy and not isinstance(previous, Import):
                    line, before = lines[node.lineno - 1], lines[node.lineno - 2]
                    if "#" not in line and not before.lstrip().startswith("#"):
                        bad.append(f"{name}:{node.lineno}")
                previous = node
    return bad


def test_every_function_level_import_gives_its_reason() -> None:
    bad = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if "_bundled" in path.relative_to(PACKAGE).parts:  # third-party (dbus-fast)
            continue
        bad += undocumented(path.read_text(), str(path.relative_to(PACKAGE.parent)))
    assert bad == []


def test_the_check_sees_an_import_without_a_reason() -> None:
    source = '''
import os


def documented():
    # lazy: a reason
    import json
    import re

    from snpd import errors
    return json, re, errors


def same_line():
    import json  # lazy: a reason
    return json


def bare():
    x = 1
    import json
    import re
    return json, re, x


def in_a_branch(flag):
    if flag:
        import json
    else:
        # lazy: a reason
        import re
    try:
        import tomllib  # lazy: a reason
    except ImportError:
        import tomli
'''
    assert undocumented(source, "m.py") == ["m.py:21", "m.py:28", "m.py:35"]
