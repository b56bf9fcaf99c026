"""What the daemon's process imports: nothing it never uses (issue 13, memory)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

PROBE = """
import sys
from snpd.cli.daemon import without_glib
without_glib()
try:
    import gi
except ImportError:
    pass
else:
    sys.exit("gi imported after without_glib()")
from snpd.bundled import use_bundled_dbus_fast
use_bundled_dbus_fast()
import dbus_fast
import snpd.dbus.service
loaded = sorted(name for name, module in sys.modules.items()
                if module is not None and (name == "gi" or name.startswith("gi.")))
print(",".join(loaded))
"""


def test_daemon_entry_keeps_pygobject_out() -> None:
    """dbus-fast 1.x imports its GLib front end, which loads PyGObject wherever
    python3-gi is installed; the daemon's entry point keeps it out."""
    done = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True,
                          cwd=REPO, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == ""


def test_a_process_that_uses_gi_keeps_it() -> None:
    """The guard only fills an empty slot: an embedding process's own gi stays."""
    code = ("import sys, types; sys.modules['gi'] = types.ModuleType('gi'); "
            "from snpd.cli.daemon import without_glib; without_glib(); "
            "print(type(sys.modules['gi']).__name__)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=REPO, check=True)
    assert done.stdout.strip() == "module"
