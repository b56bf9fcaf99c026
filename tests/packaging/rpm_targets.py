"""packaging/rpm/snpd.spec as rpm parses it for each distribution it targets.

``rpmspec`` (Debian's rpm package, which scripts/test installs) expands the spec with
the defines below: the distribution macros that select its branches (``rhel``,
``suse_version``) and the interpreter facts the spec would read from the
distribution's Python at build time. The result is what rpm itself makes of the
spec's conditionals and macros, not a re-implementation. Macros only the
distributions define (%py3_build, %selinux_modules_install, ...) stay unexpanded in
the text, which the tests read as such.

"debian-host" is packaging/build-rpm's build on Debian: --with selinux and the host
shims of packaging/rpm/macros.debian-host.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Dict, List, Optional

import pytest

REPO = Path(__file__).resolve().parents[2]
SPEC = REPO / "packaging" / "rpm" / "snpd.spec"
HOST_MACROS = REPO / "packaging" / "rpm" / "macros.debian-host"


def _python(version: str) -> List[str]:
    """The target's interpreter version, which the spec otherwise asks the interpreter."""
    major, minor = (int(x) for x in version.split("."))
    return ["--define", f"snpd_python_version {version}",
            "--define", f"snpd_python_vernum {major * 100 + minor}"]


TARGETS: Dict[str, List[str]] = {
    "debian-host": ["--with", "selinux", "--load", str(HOST_MACROS)],
    "rhel-9": ["--define", "rhel 9", "--define", "python3_sitelib /usr/lib/python3.9/site-packages",
               *_python("3.9")],
    "rhel-10": ["--define", "rhel 10",
                "--define", "python3_sitelib /usr/lib/python3.12/site-packages",
                *_python("3.12")],
    # SLES' sysuser-tools defines %sysusers_requires; Debian's rpm does not.
    "sles-15-sp6": ["--define", "suse_version 1500", "--define", "sysusers_requires %{nil}",
                    *_python("3.11")],
    "sles-16": ["--define", "suse_version 1600", "--define", "sysusers_requires %{nil}",
                *_python("3.13")],
}
#: Where the spec builds snpd-selinux by default (and build-rpm --with selinux).
SELINUX_TARGETS = {"debian-host", "rhel-9", "rhel-10", "sles-16"}


def rpmspec_tool() -> str:
    path = shutil.which("rpmspec") or next(
        (p for p in ("/usr/bin/rpmspec",) if os.access(p, os.X_OK)), None)
    if path is None:
        pytest.fail("rpmspec is not installed (Debian package rpm): scripts/test installs it "
                    "(this test fails rather than skips without it)")
    return path


def rpmspec(target: str, *args: str, extra: Optional[List[str]] = None) -> str:
    """``rpmspec ARGS`` on the spec for TARGET; the spec's Source2 (the sysusers file,
    read while parsing) is given from the tree."""
    with tempfile.TemporaryDirectory() as sources:
        shutil.copy(REPO / "conf" / "sysusers.d" / "snpd.conf", Path(sources) / "snpd.sysusers")
        cmd = [rpmspec_tool(), *args, "--define", f"_sourcedir {sources}", *TARGETS[target],
               *(extra or []), str(SPEC)]
        done = subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=120)
    if done.returncode != 0 or "error:" in done.stderr:
        pytest.fail(f"{' '.join(cmd)} exited {done.returncode}:\n{done.stderr}")
    return done.stdout
