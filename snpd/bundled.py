"""Libraries that snpd's packages carry for distributions that lack them.

Ubuntu 22.04, RHEL 9/10 and SLES package no dbus-fast (packaging/distros.toml),
so snpd's packages for them carry its pure-Python modules in ``snpd/_bundled``
(packaging/bundle-dbus-fast). The directory joins ``sys.path`` only when no
other ``dbus_fast`` is importable, and at its end: a copy the system (or a venv)
has always wins, and nothing else on the path is shadowed.
"""

import importlib.util
import sys
from pathlib import Path
from typing import List, Optional

BUNDLED_DIR = Path(__file__).resolve().parent / "_bundled"


def use_bundled_dbus_fast(bundled_dir: Path = BUNDLED_DIR,
                          path: Optional[List[str]] = None) -> bool:
    """Make ``import dbus_fast`` work from the bundled copy if nothing else provides it.

    Returns True when the bundled copy is (now) the one that will be imported.
    """
    path = sys.path if path is None else path
    where = str(bundled_dir)
    if where in path:
        return True
    if importlib.util.find_spec("dbus_fast") is not None:
        return False
    if not (bundled_dir / "dbus_fast" / "__init__.py").is_file():
        return False
    path.append(where)
    return True
