"""packaging/rpm/setup-legacy.py installs what a pyproject build installs (issue 12).

RHEL 9's python3-setuptools (53.0.0) cannot read pyproject.toml's [project] table;
snpd.spec builds there with %py3_build/%py3_install and setup-legacy.py, which reads
pyproject.toml with tomli. This runs both builds under CPython 3.9 (RHEL 9's python3)
from copies of the tree:

- legacy: a venv with setuptools 53.0.0 and tomli 2.0.1, RHEL 9's versions;
  ``setup-legacy.py build --executable=...`` then ``install -O1 --skip-build --root R
  --prefix /usr``, which is what %py3_build and %py3_install run;
- pyproject: a venv with setuptools 69.0.3 (RHEL 10's) and wheel; ``pip wheel
  --no-build-isolation`` then ``pip install --root R --prefix /usr`` of the wheel,
  as %pyproject_wheel and %pyproject_install do;

and checks that both install the same files under site-packages/snpd (every module
of the tree, the package data), the same commands and entry points, and the same
metadata: name, version, Requires-Python, extras and requirements (compared by
meaning: an egg-info's requires.txt and a wheel's Requires-Dist spell markers
differently).

The two venvs are cached in .venvs/legacy-setup (rebuilt when missing or when the
pins change; about 15 s, with PyPI reachable); then the test takes a few seconds.
Without a CPython 3.9 (PATH, ``pyenv root``, /root/.pyenv) it fails, naming where it
looked; scripts/test's interpreters include 3.9.
"""

from __future__ import annotations

import configparser
import contextlib
import fcntl
import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any, Dict, Iterator, List, NamedTuple, Optional, Set, Tuple

import pytest

from packaging.markers import Marker
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

REPO = Path(__file__).resolve().parents[2]
SETUP_LEGACY = REPO / "packaging" / "rpm" / "setup-legacy.py"
CACHE = REPO / ".venvs" / "legacy-setup"
PYTHON = "3.9"
PINS = {
    # RHEL 9: python3-setuptools 53.0.0, python3-tomli 2.0.1
    "legacy": ["setuptools==53.0.0", "tomli==2.0.1"],
    # RHEL 10's setuptools; wheel for its bdist_wheel (built in only from 70.1)
    "pyproject": ["setuptools==69.0.3", "wheel==0.42.0"],
}
SITE = f"usr/lib/python{PYTHON}/site-packages"


def find_python() -> Optional[str]:
    """A working CPython 3.9, looked for as scripts/lib.sh's find_python does."""
    candidates: List[str] = []
    on_path = shutil.which(f"python{PYTHON}")
    if on_path:
        candidates.append(on_path)
    roots: List[Path] = []
    if shutil.which("pyenv"):
        done = subprocess.run(["pyenv", "root"], capture_output=True, text=True, check=False)
        if done.returncode == 0 and done.stdout.strip():
            roots.append(Path(done.stdout.strip()))
    if os.environ.get("PYENV_ROOT"):
        roots.append(Path(os.environ["PYENV_ROOT"]))
    roots.append(Path("/root/.pyenv"))
    for root in roots:
        found = sorted((root / "versions").glob(f"{PYTHON}.*/bin/python{PYTHON}"),
                       key=lambda p: [int(x) for x in re.findall(r"\d+", p.parent.parent.name)],
                       reverse=True)
        candidates.extend(str(p) for p in found)
    for candidate in candidates:
        done = subprocess.run(
            [candidate, "-c", "import sys, venv, ensurepip; print(sys.version_info[:2])"],
            capture_output=True, text=True, check=False, env=clean_env())
        if done.returncode == 0 and done.stdout.strip() == "(3, 9)":
            return candidate
    return None


def clean_env() -> Dict[str, str]:
    """The caller's environment without what would point an interpreter elsewhere."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("PYTHON") and k not in ("VIRTUAL_ENV", "PYENV_VERSION")}
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    env["PIP_NO_INPUT"] = "1"
    return env


def run(args: List[str], cwd: Optional[Path] = None) -> str:
    done = subprocess.run([str(a) for a in args], cwd=cwd, capture_output=True, text=True,
                          check=False, env=clean_env(), timeout=600)
    if done.returncode != 0:
        pytest.fail(f"{' '.join(map(str, args))} (in {cwd}) exited {done.returncode}:\n"
                    f"{done.stdout}\n{done.stderr}")
    return done.stdout


@contextlib.contextmanager
def locked() -> Iterator[None]:
    """One builder of the cached venvs at a time (pytest-xdist workers, parallel runs)."""
    CACHE.mkdir(parents=True, exist_ok=True)
    with open(CACHE / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def venv(name: str, python: str) -> Path:
    """The cached venv NAME with its pins, (re)built when missing or stale."""
    where = CACHE / name
    stamp = json.dumps({"python": python, "pins": PINS[name]}, sort_keys=True)
    stamp_file = where / "snpd-stamp"
    exe = where / "bin" / "python"
    if exe.exists() and stamp_file.exists() and stamp_file.read_text() == stamp:
        return exe
    shutil.rmtree(where, ignore_errors=True)
    run([python, "-m", "venv", where])
    run([exe, "-m", "pip", "install", "--quiet", *PINS[name]])
    stamp_file.write_text(stamp)
    return exe


def copy_tree(dest: Path) -> Path:
    """The files a build of snpd reads, without build products or a bundled dbus-fast."""
    dest.mkdir(parents=True)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, dest / name)
    shutil.copytree(REPO / "snpd", dest / "snpd",
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "_bundled"))
    (dest / "packaging" / "rpm").mkdir(parents=True)
    shutil.copy2(SETUP_LEGACY, dest / "packaging" / "rpm" / SETUP_LEGACY.name)
    return dest


METADATA_SCRIPT = """
import json, sys
from importlib.metadata import PathDistribution
from pathlib import Path
dist = PathDistribution(Path(sys.argv[1]))
meta = dist.metadata
print(json.dumps({
    "name": meta["Name"], "version": dist.version, "summary": meta["Summary"],
    "requires_python": meta["Requires-Python"],
    "extras": sorted(meta.get_all("Provides-Extra") or []),
    "requires": dist.requires or [],
    "entry_points": sorted([ep.group, ep.name, ep.value] for ep in dist.entry_points),
}))
"""


class Install(NamedTuple):
    root: Path
    info: Path  # the .egg-info or .dist-info directory
    metadata: Dict[str, Any]


@pytest.fixture(scope="module")
def python39() -> str:
    python = find_python()
    if python is None:
        message = (f"no CPython {PYTHON} found (python{PYTHON} on PATH, $(pyenv root)/versions,"
                   " /root/.pyenv/versions): the legacy setup.py build cannot be checked")
        pytest.fail(message + " (scripts/test finds or names it)")
    return python


@pytest.fixture(scope="module")
def installs(tmp_path_factory: pytest.TempPathFactory,
             python39: str) -> Tuple[Install, Install, Path]:
    python = python39
    with locked():
        legacy_py = venv("legacy", python)
        pyproject_py = venv("pyproject", python)
    base = tmp_path_factory.mktemp("legacy-setup")

    src = copy_tree(base / "src-legacy")
    setup = src / "packaging" / "rpm" / SETUP_LEGACY.name
    legacy_root = base / "root-legacy"
    # %py3_build and %py3_install (python-rpm-macros), with this venv's interpreter
    run([legacy_py, setup, "build", "--executable=/usr/bin/python3 -s"], cwd=src)
    run([legacy_py, setup, "install", "-O1", "--skip-build", "--root", legacy_root,
         "--prefix", "/usr"], cwd=src)

    src2 = copy_tree(base / "src-pyproject")
    wheels = base / "wheels"
    run([pyproject_py, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
         "--wheel-dir", wheels, src2])
    (wheel,) = wheels.glob("snpd-*.whl")
    pyproject_root = base / "root-pyproject"
    run([pyproject_py, "-m", "pip", "install", "--quiet", "--no-deps", "--no-index",
         "--no-compile", "--no-warn-script-location", "--root", pyproject_root,
         "--prefix", "/usr", wheel])

    result = []
    for root, pattern, py in ((legacy_root, "snpd-*.egg-info", legacy_py),
                              (pyproject_root, "snpd-*.dist-info", pyproject_py)):
        (info,) = (root / SITE).glob(pattern)
        meta = json.loads(run([py, "-I", "-c", METADATA_SCRIPT, info]))
        result.append(Install(root, info, meta))
    return result[0], result[1], src


def package_files(root: Path) -> Set[str]:
    top = root / SITE / "snpd"
    return {p.relative_to(top).as_posix() for p in top.rglob("*")
            if p.is_file() and "__pycache__" not in p.parts}


def test_the_same_modules_and_package_data(installs: Tuple[Install, Install, Path]) -> None:
    legacy, pyproject, src = installs
    files = package_files(legacy.root)
    assert files == package_files(pyproject.root)
    modules = {p.relative_to(src / "snpd").as_posix() for p in (src / "snpd").rglob("*.py")}
    assert modules <= files, sorted(modules - files)
    for data in ("py.typed", "dbus/org.snpd.Snpd1.xml", "varlink/org.snpd.Attestation.varlink",
                 "varlink/org.snpd.Keys.varlink", "varlink/org.snpd.Manager.varlink"):
        assert data in files
    for name in sorted(files):
        a = (legacy.root / SITE / "snpd" / name).read_bytes()
        assert a == (pyproject.root / SITE / "snpd" / name).read_bytes(), name
    # nothing else in site-packages but the package and its metadata
    assert {p.name for p in (legacy.root / SITE).iterdir()} == {"snpd", legacy.info.name}


def test_the_same_commands(installs: Tuple[Install, Install, Path]) -> None:
    legacy, pyproject, src = installs
    commands = sorted(p.name for p in (legacy.root / "usr" / "bin").iterdir())
    assert commands == sorted(p.name for p in (pyproject.root / "usr" / "bin").iterdir())
    assert commands == ["snpctl", "snpd", "snpd-emu", "snpd-probe"]
    assert legacy.metadata["entry_points"] == pyproject.metadata["entry_points"]
    parser = configparser.ConfigParser()
    parser.read_string((pyproject.info / "entry_points.txt").read_text())
    for command in commands:
        target = parser["console_scripts"][command]
        module, _, _attr = target.partition(":")
        assert (legacy.root / SITE / (module.replace(".", "/") + ".py")).is_file(), target
        # setuptools 53's script finds its entry point through the distribution's metadata
        script = (legacy.root / "usr" / "bin" / command).read_text()
        assert f"'console_scripts', '{command}'" in script, script
        # the interpreter that ran the install: /usr/bin/python3 in the RPM build
        assert re.match(r"#!/\S+/python3?\n", script), script.splitlines()[0]


def requirement_meaning(text: str, extras: List[str]) -> Tuple[Any, ...]:
    """A requirement as what it asks for and when: the name, extras and versions, and
    whether it applies on each Python 3.6-3.14 for each extra (or none)."""
    req = Requirement(text)
    when: List[bool] = []
    for minor in range(6, 15):
        for extra in ["", *extras]:
            env = {"python_version": f"3.{minor}", "python_full_version": f"3.{minor}.0",
                   "extra": extra}
            when.append(True if req.marker is None else Marker(str(req.marker)).evaluate(env))
    specifiers = sorted(str(s) for s in req.specifier)
    return (canonicalize_name(req.name), sorted(req.extras), specifiers, tuple(when))


def test_the_same_metadata(installs: Tuple[Install, Install, Path]) -> None:
    legacy, pyproject, src = installs
    a, b = legacy.metadata, pyproject.metadata
    version = re.search(r'^version = "([^"]+)"', (src / "pyproject.toml").read_text(), re.M)
    assert version
    assert (a["name"], a["version"]) == (b["name"], b["version"]) == ("snpd", version.group(1))
    assert a["summary"] == b["summary"]
    assert a["requires_python"] == b["requires_python"] == ">=3.9"
    assert a["extras"] == b["extras"] and "daemon" in a["extras"]
    assert sorted(requirement_meaning(r, a["extras"]) for r in a["requires"]) == \
        sorted(requirement_meaning(r, b["extras"]) for r in b["requires"])
    names = {Requirement(r).name for r in a["requires"]}
    assert {"cryptography", "requests", "tomli", "dbus-fast"} <= names


def test_setup_legacy_refuses_what_it_does_not_translate(tmp_path: Path,
                                                         python39: str) -> None:
    """A pyproject.toml key the shim would drop stops it, rather than building a
    package that lacks it."""
    with locked():
        legacy_py = venv("legacy", python39)
    src = copy_tree(tmp_path / "src")
    text = (src / "pyproject.toml").read_text()
    assert "[project]\n" in text
    (src / "pyproject.toml").write_text(
        text.replace("[project]\n", '[project]\nimport-names = ["snpd"]\n', 1))
    done = subprocess.run([str(legacy_py), str(src / "packaging/rpm/setup-legacy.py"), "--name"],
                          capture_output=True, text=True, check=False, env=clean_env())
    assert done.returncode != 0
    assert "import-names" in done.stderr and "setup-legacy.py" in done.stderr, done.stderr
    (src / "pyproject.toml").write_text(text)
    assert run([legacy_py, src / "packaging/rpm/setup-legacy.py", "--name"]).strip() == "snpd"
