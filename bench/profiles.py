"""D-Bus overhead per distro profile: bench/daemon.py's figure on each profile's libraries.

    python bench/profiles.py [--samples N] [--repeat N] [PROFILE...]

Runs ``bench/daemon.py`` (phase 2: GetReport at one client, taking turns with
the in-process call) under each profile venv that ``scripts/test``'s profiles
stage built (``.venvs/profile-NAME``; Debian 12 is ``.venvs/floor``), and
prints, per profile, the Python, the dbus-fast that served (the distribution's
version, or the pure-Python copy its package bundles, from snpd/_bundled) and
what D-Bus added over the in-process call, p50 and p99, against the 0.3 ms
budget: the median over --repeat runs (each a new daemon and bus; the profiles
take turns, so a busy neighbour shifts them alike), with the spread of the p50s.
Comparable only on an otherwise idle machine. Nothing asserts.
"""

from __future__ import annotations

import argparse
import re
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

REPO = Path(__file__).resolve().parent.parent
VENVS = REPO / ".venvs"
BUDGET_US = 300.0
WHICH = """
import importlib.util, platform
from snpd.bundled import use_bundled_dbus_fast
bundled = use_bundled_dbus_fast()
import dbus_fast
from dbus_fast.__version__ import __version__
compiled = importlib.util.find_spec("dbus_fast.message").origin.endswith(".so")
print(platform.python_version(), __version__,
      "bundled, pure Python" if bundled else ("compiled" if compiled else "pure Python"))
"""
ADDED = re.compile(r"D-Bus added over in process\s+(-?[\d.]+)\s+(-?[\d.]+)")


def venvs(names: Sequence[str]) -> List[Tuple[str, Path]]:
    found = sorted((p.name[len("profile-"):], p) for p in VENVS.glob("profile-*"))
    if (VENVS / "floor").is_dir():
        found.insert(0, ("debian-12", VENVS / "floor"))
    return [(n, p) for n, p in found if not names or n in names]


def measure(venv: Path, samples: int) -> Tuple[str, Optional[Tuple[float, float]]]:
    python = str(venv / "bin" / "python")
    which = subprocess.run([python, "-c", WHICH], capture_output=True, text=True,
                           cwd=REPO, check=False)
    if which.returncode:
        return f"(cannot import dbus_fast: {which.stderr.strip().splitlines()[-1:]})", None
    run = subprocess.run([python, str(REPO / "bench" / "daemon.py"), "--starts", "1",
                          "--samples", str(samples), "--seconds", "0.5", "--clients", "1",
                          "--rss-requests", "100", "--snpctl-runs", "1"],
                         capture_output=True, text=True, cwd=REPO, check=False)
    m = ADDED.search(run.stdout)
    return which.stdout.strip(), (float(m.group(1)), float(m.group(2))) if m else None


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--samples", type=int, default=2000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("profiles", nargs="*")
    args = parser.parse_args(argv)
    rows = venvs(args.profiles)
    if not rows:
        print("no profile venvs: run SNPD_TEST_STAGES='floor profiles' scripts/test first")
        return 1
    what: Dict[str, str] = {}
    figures: Dict[str, List[Tuple[float, float]]] = {name: [] for name, _ in rows}
    for turn in range(args.repeat):
        for name, venv in rows:
            what[name], added = measure(venv, args.samples)
            if added is not None:
                figures[name].append(added)
        print(f"run {turn + 1}/{args.repeat} done", file=sys.stderr, flush=True)
    print(f"{'profile':<14} {'python':<8} {'dbus-fast':<30} {'added p50':>10} "
          f"{'(range)':>13} {'p99':>8}  budget")
    for name, _ in rows:
        py, _, lib = what[name].partition(" ")
        if not figures[name]:
            print(f"{name:<14} {py:<8} {lib:<30} (no figure: bench/daemon.py failed)")
            continue
        p50s = [f[0] for f in figures[name]]
        p50 = statistics.median(p50s)
        p99 = statistics.median(f[1] for f in figures[name])
        verdict = "ok" if p50 <= BUDGET_US else "OVER"
        spread = f"{min(p50s):.0f}-{max(p50s):.0f}"
        print(f"{name:<14} {py:<8} {lib:<30} {p50:7.0f} µs {spread:>13} {p99:5.0f} µs  "
              f"≤ {BUDGET_US:.0f} µs {verdict}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
