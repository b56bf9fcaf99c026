"""packaging/distros.toml, the distribution profile table (issue 12, item 1).

Checks that the table is complete and well-formed (every required profile and
key, every fact with a source and a ``confirmed`` flag, parseable versions), that
its Debian 12 profile is what scripts/test's ``floor`` and ``debian`` stages
really test (read from scripts/floor-requirements.txt and scripts/test, not
repeated here), and that pyproject.toml's dependency ranges admit each profile's
packaged versions. A library a profile lacks or packages outside the range must
be marked ``bundled`` or ``absent-needs-alternative`` with a reason; the gaps
that issue 12 item 2 is to close by widening pyproject.toml are marked
``widen-range`` and reported as an expected failure until then (the test fails
once they are closed, so the marks cannot go stale).
"""

from __future__ import annotations

import copy
import re
import sys
from pathlib import Path
from typing import Any, Dict, List, NamedTuple, Optional

import pytest

from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name
from packaging.version import InvalidVersion, Version

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[2]
DISTROS = ROOT / "packaging" / "distros.toml"
PYPROJECT = ROOT / "pyproject.toml"
FLOOR_REQUIREMENTS = ROOT / "scripts" / "floor-requirements.txt"
SCRIPTS_TEST = ROOT / "scripts" / "test"
DEBIAN_CONTROL = ROOT / "packaging" / "debian" / "control"

# profile -> (family, release): the distributions issue 12 names.
REQUIRED_PROFILES = {
    "debian-12": ("debian", "12"),
    "debian-13": ("debian", "13"),
    "ubuntu-22.04": ("ubuntu", "22.04"),
    "ubuntu-24.04": ("ubuntu", "24.04"),
    "rhel-9": ("rhel", "9"),
    "rhel-10": ("rhel", "10"),
    "sles-15-sp6": ("sles", "15.6"),
    "sles-16": ("sles", "16.0"),
}
REQUIRED_LIBS = ("cryptography", "requests", "urllib3", "dbus-fast")
FORMAT_OF_FAMILY = {"debian": "deb", "ubuntu": "deb", "rhel": "rpm", "sles": "rpm"}
MAC_SYSTEMS = ("apparmor", "selinux")
# The pyproject.toml extras a distribution package has to satisfy at run time.
RUNTIME_EXTRAS = ("daemon",)

ABSENT = "absent"
UNKNOWN = "unknown"
EXEMPT = ("bundled", "absent-needs-alternative")
PENDING = "widen-range"  # issue 12 item 2: pyproject.toml to be widened
RESOLUTIONS = (*EXEMPT, PENDING)

FACT_KEYS = {"source", "confirmed", "note"}
ALLOWED_KEYS = {
    "profile": {"name", "family", "release", "codename", "package_format", "mac",
                "systemd", "python", "libs", "dbus_bindings"},
    "package_format": FACT_KEYS | {"value"},
    "mac": FACT_KEYS | {"value"},
    "systemd": FACT_KEYS | {"version", "package", "package_version"},
    "python": FACT_KEYS | {"version", "package", "interpreter", "package_version", "why"},
    "lib": FACT_KEYS | {"version", "package", "package_version", "resolution", "reason"},
    "binding": FACT_KEYS | {"version", "package", "package_version"},
}
REQUIRED_KEYS = {
    "package_format": FACT_KEYS | {"value"},
    "mac": FACT_KEYS | {"value"},
    "systemd": FACT_KEYS | {"version", "package"},
    "python": FACT_KEYS | {"version", "package", "interpreter", "why"},
    "lib": FACT_KEYS | {"version", "package"},
    "binding": FACT_KEYS | {"version", "package"},
}


def load_toml(path: Path) -> Dict[str, Any]:
    with path.open("rb") as f:
        return tomllib.load(f)


@pytest.fixture(scope="module")
def distros() -> Dict[str, Any]:
    return load_toml(DISTROS)


@pytest.fixture(scope="module")
def pyproject() -> Dict[str, Any]:
    return load_toml(PYPROJECT)


# ------------------------------------------------------------ validation ---

def _is_version(text: str) -> bool:
    try:
        Version(text)
    except InvalidVersion:
        return False
    return True


def _check_fact(where: str, kind: str, fact: Any, problems: List[str]) -> None:
    if not isinstance(fact, dict):
        problems.append(f"{where}: expected a table, got {type(fact).__name__}")
        return
    missing = REQUIRED_KEYS[kind] - fact.keys()
    if missing:
        problems.append(f"{where}: missing {', '.join(sorted(missing))}")
    unknown = fact.keys() - ALLOWED_KEYS[kind]
    if unknown:
        problems.append(f"{where}: unknown key(s) {', '.join(sorted(unknown))}")
    for key, value in fact.items():
        if key == "confirmed":
            if not isinstance(value, bool):
                problems.append(f"{where}.confirmed: expected true or false, got {value!r}")
        elif not isinstance(value, str):
            problems.append(f"{where}.{key}: expected a string, got {value!r}")
    source = fact.get("source")
    if isinstance(source, str) and not re.fullmatch(r"https?://\S+", source):
        problems.append(f"{where}.source: not a URL: {source!r}")
    note = fact.get("note")
    if isinstance(note, str) and not note.strip():
        problems.append(f"{where}.note: empty")
    for key in ("package", "value", "why", "interpreter"):
        if isinstance(fact.get(key), str) and not fact[key].strip():
            problems.append(f"{where}.{key}: empty")


def _check_package_version(where: str, fact: Dict[str, Any], problems: List[str]) -> None:
    """version is absent, unknown (only unconfirmed) or a PEP 440 version."""
    version = fact.get("version")
    if not isinstance(version, str):
        return
    if version == UNKNOWN:
        if fact.get("confirmed") is not False:
            problems.append(f"{where}: version 'unknown' cannot be confirmed")
    elif version != ABSENT and not _is_version(version):
        problems.append(f"{where}.version: not a version: {version!r}")


def python_version(profile: Dict[str, Any]) -> Optional[Version]:
    version = profile.get("python", {}).get("version")
    if isinstance(version, str) and re.fullmatch(r"3\.\d+", version):
        return Version(version)
    return None


def validate(doc: Dict[str, Any]) -> List[str]:
    """Every problem in a parsed distros.toml, as one line each (empty: valid)."""
    problems: List[str] = []
    if doc.get("schema") != 1:
        problems.append(f"schema: expected 1, got {doc.get('schema')!r}")
    profiles = doc.get("profiles")
    if not isinstance(profiles, dict):
        return [*problems, "profiles: missing"]
    for name in sorted(REQUIRED_PROFILES.keys() - profiles.keys()):
        problems.append(f"profiles.{name}: missing")
    for name, profile in profiles.items():
        where = f"profiles.{name}"
        if not isinstance(profile, dict):
            problems.append(f"{where}: expected a table")
            continue
        unknown = profile.keys() - ALLOWED_KEYS["profile"]
        if unknown:
            problems.append(f"{where}: unknown key(s) {', '.join(sorted(unknown))}")
        for key in ("name", "family", "release", "codename"):
            if not isinstance(profile.get(key), str):
                problems.append(f"{where}.{key}: missing or not a string")
        family = profile.get("family")
        if family not in FORMAT_OF_FAMILY:
            problems.append(f"{where}.family: {family!r} is not one of {sorted(FORMAT_OF_FAMILY)}")
        release = profile.get("release")
        if name in REQUIRED_PROFILES and (family, release) != REQUIRED_PROFILES[name]:
            problems.append(f"{where}: family/release {family!r}/{release!r}, "
                            f"expected {REQUIRED_PROFILES[name]}")

        for kind in ("package_format", "mac", "systemd", "python"):
            if kind not in profile:
                problems.append(f"{where}.{kind}: missing")
            else:
                _check_fact(f"{where}.{kind}", kind, profile[kind], problems)

        fmt = profile.get("package_format", {})
        if isinstance(fmt, dict) and family in FORMAT_OF_FAMILY \
                and fmt.get("value") != FORMAT_OF_FAMILY[family]:
            problems.append(f"{where}.package_format: {fmt.get('value')!r} for a {family} "
                            f"profile, expected {FORMAT_OF_FAMILY[family]!r}")
        mac = profile.get("mac", {})
        if isinstance(mac, dict) and mac.get("value") not in MAC_SYSTEMS:
            problems.append(f"{where}.mac: {mac.get('value')!r} is not one of {MAC_SYSTEMS}")
        systemd = profile.get("systemd", {})
        if isinstance(systemd, dict) and not re.fullmatch(r"\d+", str(systemd.get("version"))):
            problems.append(f"{where}.systemd.version: not a systemd version: "
                            f"{systemd.get('version')!r}")
        pyver = python_version(profile)
        if isinstance(profile.get("python"), dict) and pyver is None:
            problems.append(f"{where}.python.version: expected 3.N, got "
                            f"{profile['python'].get('version')!r}")

        bindings = profile.get("dbus_bindings", {})
        if not isinstance(bindings, dict) or not bindings:
            problems.append(f"{where}.dbus_bindings: missing (list the D-Bus bindings the "
                            "distribution packages, or their absence)")
            bindings = {}
        for binding, fact in bindings.items():
            _check_fact(f"{where}.dbus_bindings.{binding}", "binding", fact, problems)
            if isinstance(fact, dict):
                _check_package_version(f"{where}.dbus_bindings.{binding}", fact, problems)
        alternatives = [b for b, f in bindings.items()
                        if isinstance(f, dict) and f.get("version") != ABSENT]

        libs = profile.get("libs")
        if not isinstance(libs, dict):
            problems.append(f"{where}.libs: missing")
            continue
        needed = list(REQUIRED_LIBS)
        if pyver is not None and pyver < Version("3.11"):
            needed.append("tomli")  # no tomllib before 3.11
        for lib in needed:
            if lib not in libs:
                problems.append(f"{where}.libs.{lib}: missing")
        for lib, fact in libs.items():
            lwhere = f"{where}.libs.{lib}"
            _check_fact(lwhere, "lib", fact, problems)
            if not isinstance(fact, dict):
                continue
            _check_package_version(lwhere, fact, problems)
            resolution, reason = fact.get("resolution"), fact.get("reason")
            if resolution is not None and resolution not in RESOLUTIONS:
                problems.append(f"{lwhere}.resolution: {resolution!r} is not one of {RESOLUTIONS}")
            if (resolution is None) != (reason is None) or (
                    isinstance(reason, str) and not reason.strip()):
                problems.append(f"{lwhere}: a resolution needs a reason and a reason a resolution")
            if fact.get("version") == ABSENT and resolution not in EXEMPT:
                problems.append(f"{lwhere}: absent, so it needs resolution 'bundled' or "
                                "'absent-needs-alternative' with a reason")
            if resolution == "absent-needs-alternative":
                if fact.get("version") != ABSENT:
                    problems.append(f"{lwhere}: 'absent-needs-alternative' but version "
                                    f"{fact.get('version')!r}")
                if lib == "dbus-fast" and not alternatives:
                    problems.append(f"{lwhere}: 'absent-needs-alternative' but no D-Bus "
                                    "binding is packaged: bundle it")
    return problems


def test_table_is_complete_and_well_formed(distros):
    problems = validate(distros)
    assert not problems, "packaging/distros.toml:\n  " + "\n  ".join(problems)


def test_validator_rejects_broken_tables(distros):
    """The checks above can fail: each breakage is reported."""
    assert validate(distros) == []

    def broken(edit) -> List[str]:
        doc = copy.deepcopy(distros)
        edit(doc["profiles"])
        return validate(doc)

    def drop_profile(p):
        del p["rhel-10"]

    def drop_source(p):
        del p["debian-13"]["libs"]["requests"]["source"]

    def bad_flag(p):
        p["ubuntu-24.04"]["systemd"]["confirmed"] = "yes"

    def bad_version(p):
        p["debian-12"]["libs"]["cryptography"]["version"] = "1:38.0.4-3~deb12u1"

    def unknown_confirmed(p):
        p["sles-16"]["libs"]["requests"]["confirmed"] = True

    def absent_unexplained(p):
        fact = p["ubuntu-22.04"]["libs"]["dbus-fast"]
        del fact["resolution"], fact["reason"]

    def no_tomli_on_39(p):
        del p["rhel-9"]["libs"]["tomli"]

    def wrong_format(p):
        p["sles-15-sp6"]["package_format"]["value"] = "deb"

    def typo(p):
        p["debian-12"]["mac"]["sorce"] = p["debian-12"]["mac"].pop("source")

    def no_alternative(p):
        p["rhel-9"]["libs"]["dbus-fast"]["resolution"] = "absent-needs-alternative"
        for fact in p["rhel-9"]["dbus_bindings"].values():
            fact["version"] = ABSENT

    cases = {
        drop_profile: "profiles.rhel-10: missing",
        drop_source: "profiles.debian-13.libs.requests: missing source",
        bad_flag: "profiles.ubuntu-24.04.systemd.confirmed: expected true or false",
        bad_version: "profiles.debian-12.libs.cryptography.version: not a version",
        unknown_confirmed: "profiles.sles-16.libs.requests: version 'unknown' cannot be",
        absent_unexplained: "profiles.ubuntu-22.04.libs.dbus-fast: absent, so it needs",
        no_tomli_on_39: "profiles.rhel-9.libs.tomli: missing",
        wrong_format: "profiles.sles-15-sp6.package_format: 'deb' for a sles profile",
        typo: "profiles.debian-12.mac: unknown key(s) sorce",
        no_alternative: "profiles.rhel-9.libs.dbus-fast: 'absent-needs-alternative' but no",
    }
    for edit, expected in cases.items():
        problems = broken(edit)
        assert any(p.startswith(expected) for p in problems), (edit.__name__, problems)


# ------------------------------------------- Debian 12 = what CI tests ---

def floor_pins() -> Dict[str, str]:
    """scripts/floor-requirements.txt as {canonical name: version} (parsed as
    scripts/test's check_floor does)."""
    pins = {}
    for line in FLOOR_REQUIREMENTS.read_text(encoding="utf-8").splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, _, version = line.partition("==")
            pins[canonicalize_name(name)] = version.strip()
    return pins


def shell_assignment(name: str) -> str:
    """The value of NAME=... or NAME=(...) in scripts/test."""
    text = SCRIPTS_TEST.read_text(encoding="utf-8")
    m = re.search(rf"^{name}=(\([^)]*\)|\S+)", text, re.MULTILINE)
    assert m, f"scripts/test no longer assigns {name}"
    return m.group(1)


def packages_by_name(profile: Dict[str, Any]) -> Dict[str, Dict[str, Any]]:
    """The profile's libraries and bindings, keyed by distribution package name."""
    facts = {**profile["libs"], **profile["dbus_bindings"]}
    return {fact["package"]: fact for fact in facts.values()}


def test_debian_12_is_what_the_floor_stage_pins(distros):
    """scripts/floor-requirements.txt holds bookworm's versions (the floor stage
    installs exactly these): the profile must agree on every library both name."""
    profile = distros["profiles"]["debian-12"]
    pins = floor_pins()
    facts = {canonicalize_name(k): v for k, v in
             {**profile["libs"], **profile["dbus_bindings"]}.items()}
    for lib in REQUIRED_LIBS:
        assert canonicalize_name(lib) in pins, f"floor-requirements.txt no longer pins {lib}"
    compared = 0
    for name, fact in facts.items():
        if name in pins:
            assert fact["version"] == pins[name], (
                f"debian-12 {name}: distros.toml says {fact['version']}, "
                f"scripts/floor-requirements.txt pins {pins[name]}")
            compared += 1
    assert compared >= len(REQUIRED_LIBS)

    # The floor stage runs on bookworm's interpreter version.
    text = SCRIPTS_TEST.read_text(encoding="utf-8")
    m = re.search(r"^stage_floor\(\)\s*\{.*?\$\{PY\[(3\.\d+)\]", text, re.MULTILINE | re.DOTALL)
    assert m, "scripts/test: stage_floor no longer names its Python"
    assert profile["python"]["version"] == m.group(1)


def test_debian_12_is_what_the_debian_stage_installs(distros):
    """The debian stage runs the tests on DEBIAN_PY with DEBIAN_APT from apt:
    every Python library it installs is a packaged library of the profile."""
    profile = distros["profiles"]["debian-12"]
    assert shell_assignment("DEBIAN_PY") == profile["python"]["interpreter"]
    apt = shell_assignment("DEBIAN_APT").strip("()").split()
    assert profile["python"]["package"] in apt
    packaged = packages_by_name(profile)
    libraries = [p for p in apt if p.startswith("python3-") and p != "python3-venv"]
    assert libraries, "scripts/test: DEBIAN_APT names no Python library"
    for package in libraries:
        assert package in packaged, f"debian stage installs {package}; debian-12 lacks it"
        assert packaged[package]["version"] not in (ABSENT, UNKNOWN), package
    # ... and every library snpd needs is among them (none comes from pip).
    needed = {profile["libs"][lib]["package"] for lib in REQUIRED_LIBS}
    assert needed <= set(libraries), f"not installed by the debian stage: {needed - set(libraries)}"


def test_debian_stage_test_tools_are_the_debs_check_build_depends(
        pyproject: Dict[str, Any]) -> None:
    """DEBIAN_TEST_APT: test tools the debian stage takes from apt because the .deb's
    build tests with them; each is a <!nocheck> Build-Depends, and the test extra
    names it for pip."""
    tools = shell_assignment("DEBIAN_TEST_APT").strip("()").split()
    assert tools, "scripts/test: DEBIAN_TEST_APT is empty"
    text = DEBIAN_CONTROL.read_text(encoding="utf-8")
    source = text[:text.index("\nPackage: snpd")]
    extra = [Requirement(r).name for r in pyproject["project"]["optional-dependencies"]["test"]]
    for package in tools:
        assert re.search(rf"^ {re.escape(package)} <!nocheck>,$", source, re.MULTILINE), package
        assert package.removeprefix("python3-") in extra, package


def deb_depends() -> List[str]:
    """The python3-* packages the snpd binary package's Depends names."""
    text = DEBIAN_CONTROL.read_text(encoding="utf-8")
    stanza = text[text.index("\nPackage: snpd"):]
    m = re.search(r"^Depends:(.*?)(?=^[^\s#]|\Z)", stanza, re.MULTILINE | re.DOTALL)
    assert m, "packaging/debian/control: no Depends in the snpd stanza"
    lines = [ln for ln in m.group(1).splitlines() if not ln.lstrip().startswith("#")]
    names = []
    for alternative in " ".join(lines).split(","):
        for item in alternative.split("|"):
            word = item.strip().split(" ")[0]
            if word.startswith("python3-"):
                names.append(word)
    return names


@pytest.mark.parametrize("name", ["debian-12", "debian-13"])
def test_deb_depends_are_packaged_on_debian(distros, name):
    """The .deb is built for Debian 12 and newer: its Depends must exist there.
    (Ubuntu is issue 12 item 3: jammy lacks python3-dbus-fast.)"""
    depends = deb_depends()
    assert "python3-dbus-fast" in depends and "python3-cryptography" in depends
    packaged = packages_by_name(distros["profiles"][name])
    missing = [d for d in depends
               if d not in packaged or packaged[d]["version"] in (ABSENT, UNKNOWN)]
    assert not missing, f"{name}: Depends not packaged: {missing}"


# ------------------------------------ pyproject ranges vs. the profiles ---

class Violation(NamedTuple):
    profile: str
    lib: str
    version: str
    wanted: str
    resolution: Optional[str]

    def __str__(self) -> str:
        why = f" [{self.resolution}]" if self.resolution else ""
        return f"{self.profile}: {self.lib} {self.version} not in '{self.wanted}'{why}"


def runtime_requirements(pyproject: Dict[str, Any]) -> List[Requirement]:
    project = pyproject["project"]
    reqs = [Requirement(r) for r in project["dependencies"]]
    for extra in RUNTIME_EXTRAS:
        reqs += [Requirement(r) for r in project["optional-dependencies"][extra]]
    return reqs


def range_violations(doc: Dict[str, Any], pyproject: Dict[str, Any]) -> List[Violation]:
    """Each (profile, library) whose packaged version pyproject.toml's ranges do not
    admit, absent libraries included; the Python version against requires-python."""
    requires_python = SpecifierSet(pyproject["project"]["requires-python"])
    found: List[Violation] = []
    for name, profile in doc["profiles"].items():
        pyver = profile["python"]["version"]
        if not requires_python.contains(Version(pyver), prereleases=True):
            found.append(Violation(name, "python", pyver, str(requires_python), None))
        env = {"python_version": pyver, "python_full_version": f"{pyver}.0"}
        libs = {canonicalize_name(k): v for k, v in profile["libs"].items()}
        for req in runtime_requirements(pyproject):
            if req.marker is not None and not req.marker.evaluate(env):
                continue
            fact = libs.get(canonicalize_name(req.name))
            if fact is None:
                found.append(Violation(name, req.name, "not listed", str(req.specifier), None))
                continue
            version = fact["version"]
            if version == UNKNOWN:
                continue  # unconfirmed; validate() made sure it says so
            if version == ABSENT or not req.specifier.contains(Version(version), prereleases=True):
                found.append(Violation(name, req.name, version, str(req.specifier),
                                       fact.get("resolution")))
    return found


def test_range_check_finds_what_is_out_of_range(distros, pyproject):
    """range_violations() reports an old library, an absent one and an unlisted one."""
    doc = copy.deepcopy(distros)
    profile = doc["profiles"]["debian-12"]
    profile["libs"]["cryptography"]["version"] = "3.3.2"  # below every floor
    profile["libs"]["dbus-fast"]["version"] = ABSENT
    del profile["libs"]["requests"]
    found = {(v.lib, v.version) for v in range_violations(doc, pyproject)
             if v.profile == "debian-12"}
    assert found == {("cryptography", "3.3.2"), ("dbus-fast", ABSENT),
                     ("requests", "not listed")}


def test_pyproject_ranges_admit_every_profile(distros, pyproject):
    """A profile whose packaged version pyproject.toml does not admit fails this
    test unless that library is marked 'bundled' or 'absent-needs-alternative'
    with a reason. Libraries marked 'widen-range' are the gaps issue 12 item 2
    closes by widening pyproject.toml: they are listed as an expected failure;
    once pyproject.toml admits them, the stale mark fails this test."""
    violations = range_violations(distros, pyproject)
    unresolved = [v for v in violations if v.resolution not in EXEMPT]
    unplanned = [v for v in unresolved if v.resolution != PENDING]
    assert not unplanned, ("pyproject.toml does not admit these packaged versions, and "
                           "distros.toml marks none of them bundled or "
                           "absent-needs-alternative:\n  "
                           + "\n  ".join(map(str, unplanned)))

    violated = {(v.profile, v.lib) for v in violations}
    stale = [f"{name}: {lib}"
             for name, profile in distros["profiles"].items()
             for lib, fact in profile["libs"].items()
             if fact.get("resolution") is not None and (name, lib) not in violated]
    assert not stale, ("marked with a resolution but pyproject.toml admits the packaged "
                       "version (remove the mark): " + ", ".join(stale))

    pending = [v for v in unresolved if v.resolution == PENDING]
    if pending:
        pytest.xfail("issue 12 item 2, pyproject.toml not widened yet: "
                     + "; ".join(map(str, pending)))


# ------------------------------------------------- bundled libraries ---

BUNDLED_PINS = Path(__file__).resolve().parents[2] / "packaging" / "bundled"


def bundled_pin(lib: str) -> Dict[str, str]:
    """packaging/bundled/LIB.txt as a dict (the format packaging/bundle-dbus-fast reads)."""
    pin = {}
    for line in (BUNDLED_PINS / f"{lib}.txt").read_text(encoding="utf-8").splitlines():
        if line.strip() and not line.startswith("#"):
            key, _, value = line.partition(" = ")
            pin[key.strip()] = value.strip()
    return pin


def test_bundled_libraries_are_pinned_within_pyproject_ranges(distros, pyproject):
    """A library a profile gets from snpd's own package is pinned, hash and all, and
    the pinned version is one pyproject.toml admits."""
    bundled = {lib for profile in distros["profiles"].values()
               for lib, fact in profile["libs"].items() if fact.get("resolution") == "bundled"}
    assert bundled == {"dbus-fast"}
    wanted = {canonicalize_name(r.name): r.specifier for r in runtime_requirements(pyproject)}
    for lib in bundled:
        pin = bundled_pin(lib)
        assert pin["name"] == lib
        assert re.fullmatch(r"[0-9a-f]{64}", pin["sha256"]), pin
        assert pin["sdist"].endswith(f"-{pin['version']}.tar.gz"), pin
        assert wanted[canonicalize_name(lib)].contains(Version(pin["version"])), pin

