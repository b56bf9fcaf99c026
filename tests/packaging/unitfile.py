"""The shipped systemd units, parsed the simple way the packaging tests need."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Dict, List

UNITS = Path(__file__).resolve().parents[2] / "systemd"


def unit(name: str) -> Dict[str, Dict[str, List[str]]]:
    """A unit file as {section: {key: [values in order]}} (keys repeat in units)."""
    out: Dict[str, Dict[str, List[str]]] = {}
    section = ""
    text = re.sub(r"\\\n", " ", (UNITS / name).read_text())  # continuation lines
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            out.setdefault(section, {})
            continue
        key, _, value = line.partition("=")
        out[section].setdefault(key.strip(), []).append(value.strip())
    return out
