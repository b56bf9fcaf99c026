"""snpd.bundled: the dbus-fast copy a package carries is used only when no other is."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from snpd.bundled import BUNDLED_DIR, use_bundled_dbus_fast

REPO = Path(__file__).resolve().parents[2]

# Run with -S: no site-packages, so no installed dbus_fast; the repo gives snpd.
PROBE = """
import sys
from pathlib import Path
from snpd.bundled import use_bundled_dbus_fast
used = use_bundled_dbus_fast(Path(sys.argv[1]))
try:
    import dbus_fast
except ImportError:
    print(used, "none", sys.path[-1])
else:
    print(used, dbus_fast.__file__, sys.path[-1])
"""


def probe(bundled: Path) -> list[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env["PYTHONPATH"] = str(REPO)
    out = subprocess.run([sys.executable, "-S", "-c", PROBE, str(bundled)], env=env,
                         check=True, capture_output=True, text=True).stdout
    return out.split()


def plant(bundled: Path) -> Path:
    init = bundled / "dbus_fast" / "__init__.py"
    init.parent.mkdir(parents=True)
    init.write_text("MARK = 'bundled'\n")
    return init


def test_bundled_copy_is_used_when_nothing_else_provides_dbus_fast(tmp_path: Path) -> None:
    init = plant(tmp_path / "_bundled")
    used, where, last = probe(tmp_path / "_bundled")
    assert used == "True"
    assert Path(where) == init
    assert last == str(tmp_path / "_bundled")  # appended, so it shadows nothing


def test_no_bundled_copy_leaves_the_path_alone(tmp_path: Path) -> None:
    used, where, last = probe(tmp_path / "_bundled")
    assert (used, where) == ("False", "none")
    assert last != str(tmp_path / "_bundled")


def test_an_installed_dbus_fast_wins_over_the_bundled_copy(tmp_path: Path) -> None:
    # This process has dbus-fast from the venv (or from the bundled copy in a
    # profile that lacks it, put on sys.path by conftest): a planted copy is ignored.
    plant(tmp_path / "_bundled")
    path: list[str] = []
    assert use_bundled_dbus_fast(tmp_path / "_bundled", path) is False
    assert path == []


def test_the_packages_bundle_into_the_snpd_package() -> None:
    # packaging/bundle-dbus-fast installs into <site-packages>/snpd/_bundled.
    assert BUNDLED_DIR.name == "_bundled"
    assert BUNDLED_DIR.parent == Path(sys.modules["snpd.bundled"].__file__).resolve().parent
