"""packaging/rpm/snpd.spec for every distribution it targets, as rpm parses it.

packaging/build-rpm builds one variant of the spec here (Debian's rpm, with the
spec's fallbacks); the others exist only as branches of the spec. ``rpmspec``
(tests/packaging/rpm_targets.py) evaluates each branch, and this checks what it
yields per distribution:

- the packages: snpd, plus snpd-selinux where SELinux is the MAC system (RHEL,
  SLES 16, and build-rpm's build), not on SLES 15 (AppArmor);
- snpd's dependencies: pyproject.toml's floors for cryptography and requests,
  tomli only below Python 3.11 (RHEL 9), no dbus-fast but the
  bundled(python3dist(dbus-fast)) provide at the pinned version and the license of
  both; --with system_dbus_fast turns that around;
- RHEL 9 builds with %py3_build/%py3_install from setup-legacy.py and ships an
  .egg-info; the others build the wheel;
- snpd-selinux follows Fedora's guidelines for an independent policy module.
"""

from __future__ import annotations

import re
from typing import Dict, List

import pytest
from rpm_targets import (  # type: ignore[import-not-found]
    REPO,
    SELINUX_TARGETS,
    SPEC,
    TARGETS,
    rpmspec,
)

pytestmark = pytest.mark.integration

PIN = dict(line.split(" = ", 1) for line in
           (REPO / "packaging" / "bundled" / "dbus-fast.txt").read_text().splitlines()
           if " = " in line and not line.startswith("#"))
PYTHON = {"debian-host": "3.11", "rhel-9": "3.9", "rhel-10": "3.12", "sles-15-sp6": "3.11",
          "sles-16": "3.13"}
FLAVOR = {"debian-host": "python3", "rhel-9": "python3", "rhel-10": "python3",
          "sles-15-sp6": "python311", "sles-16": "python313"}


def query(target: str, what: str, *extra: str) -> Dict[str, List[str]]:
    """{package: its REQUIRENEVRS, PROVIDENEVRS or LICENSE} as rpmspec -q reports them."""
    fmt = {"requires": "[%{REQUIRENEVRS}\n]", "provides": "[%{PROVIDENEVRS}\n]",
           "license": "%{LICENSE}\n"}[what]
    out: Dict[str, List[str]] = {}
    current = ""
    for line in rpmspec(target, "-q", "--qf", f"=%{{NAME}}\n{fmt}", extra=list(extra)).splitlines():
        if line.startswith("="):
            current = line[1:]
            out[current] = []
        elif line:
            out[current].append(line)
    return out


@pytest.mark.parametrize("target", sorted(TARGETS))
def test_packages_per_distribution(target: str) -> None:
    names = rpmspec(target, "-q", "--qf", "%{NAME}\n").split()
    expected = ["snpd", "snpd-selinux"] if target in SELINUX_TARGETS else ["snpd"]
    assert names == expected


@pytest.mark.parametrize("target", sorted(TARGETS))
def test_requires_and_provides(target: str) -> None:
    requires = query(target, "requires")["snpd"]
    flavor = FLAVOR[target]
    assert f"{flavor}-cryptography >= 3.4.8" in requires
    assert f"{flavor}-requests >= 2.25.1" in requires
    assert not [r for r in requires if "dbus-fast" in r or "dbus_fast" in r], requires
    tomli = [r for r in requires if "tomli" in r]
    below_311 = tuple(int(x) for x in PYTHON[target].split(".")) < (3, 11)
    assert tomli == ([f"{flavor}-tomli >= 1.1"] if below_311 else [])
    provides = query(target, "provides")["snpd"]
    assert f"bundled(python3dist(dbus-fast)) = {PIN['version']}" in provides
    assert query(target, "license")["snpd"] == ["Apache-2.0 AND MIT"]
    if target in SELINUX_TARGETS:
        assert f"(snpd-selinux = {version()}-1 if selinux-policy-targeted)" in requires


def version() -> str:
    m = re.search(r"^Version:\s*(\S+)", SPEC.read_text(), re.M)
    assert m
    return m.group(1)


@pytest.mark.parametrize("target", ["rhel-10", "sles-16"])
def test_system_dbus_fast_instead_of_the_bundled_copy(target: str) -> None:
    extra = ["--with", "system_dbus_fast"]
    requires = query(target, "requires", *extra)["snpd"]
    name = f"{FLAVOR[target]}-{'dbus_fast' if target.startswith('sles') else 'dbus-fast'}"
    assert f"{name} >= 1.84" in requires and f"{name} < 6" in requires
    assert not [p for p in query(target, "provides", *extra)["snpd"] if p.startswith("bundled(")]
    assert query(target, "license", *extra)["snpd"] == ["Apache-2.0"]
    parsed = rpmspec(target, "-P", extra=extra)
    assert "bundle-dbus-fast install" not in parsed and "dbus_fast-" not in parsed
    assert "cp -p license-nobundle/copyright copyright" in parsed


def test_the_spec_bundles_the_pinned_dbus_fast() -> None:
    parsed = rpmspec("debian-host", "-P")
    source1 = ("https://files.pythonhosted.org/packages/source/d/dbus-fast/" + PIN["sdist"])
    assert re.search(rf"^Source1:\s*{re.escape(source1)}$", parsed, re.M), "not the pinned sdist"
    assert f'test "$(packaging/bundle-dbus-fast version)" = "{PIN["version"]}"' in parsed
    m = re.search(r"^packaging/bundle-dbus-fast install (\S+) (\S+)$", parsed, re.M)
    assert m, "no bundle-dbus-fast install in %install"
    assert m.group(1).endswith("/" + PIN["sdist"])
    assert re.fullmatch(r"\S+/usr/lib/python3\.\d+/site-packages/snpd/_bundled", m.group(2))
    # byte-compiled after the bundle is in (Debian's rpm compiles nothing by itself)
    assert parsed.index("bundle-dbus-fast install") < parsed.index("-m compileall")
    assert "%license LICENSE.dbus-fast" in parsed


@pytest.mark.parametrize("target", sorted(TARGETS))
def test_the_build_per_distribution(target: str) -> None:
    parsed = rpmspec(target, "-P")
    parsed = parsed[:parsed.index("\n%changelog")]
    # %prep and %build (rpm 4.18's -P leaves out the %build line itself)
    build = parsed[parsed.index("\n%prep"):parsed.index("\n%install")]
    if target == "rhel-9":
        assert "%py3_build" in build
        assert re.search(r"^%py3_install$", parsed, re.M)
        assert re.search(r"^/usr/lib/python3\.9/site-packages/snpd-[\d.]+-py3\.9\.egg-info/$",
                         parsed, re.M)
        assert "python3-tomli" in rpmspec(target, "-q", "--buildrequires")
    else:
        assert "%py3_build" not in build and "setup-legacy" not in parsed
        assert ".dist-info/" in parsed and ".egg-info" not in parsed
    # byte-compilation after the bundled modules: RHEL's brp script does it by itself
    if target.startswith("sles"):
        assert f"%{FLAVOR[target]}_compile" in parsed
    elif target.startswith("rhel"):
        assert "compileall" not in parsed


def test_py_setup_points_at_setup_legacy() -> None:
    """%py3_build and %py3_install run %{py_setup} (python-rpm-macros); given their
    definitions, the spec's RHEL 9 build runs setup-legacy.py."""
    parsed = rpmspec("rhel-9", "-P", extra=[
        "--define", "py3_build python3 %{py_setup} build",
        "--define", "py3_install python3 %{py_setup} install --root %{buildroot}"])
    assert re.search(r"^python3 packaging/rpm/setup-legacy\.py build$", parsed, re.M)
    assert re.search(r"^python3 packaging/rpm/setup-legacy\.py install --root ", parsed, re.M)
    assert (REPO / "packaging" / "rpm" / "setup-legacy.py").is_file()


@pytest.mark.parametrize("target", sorted(SELINUX_TARGETS))
def test_the_selinux_subpackage(target: str) -> None:
    parsed = rpmspec(target, "-P")
    sub = parsed[parsed.index("%package selinux"):parsed.index("%description selinux")]
    assert "BuildRequires:  selinux-policy-devel" in sub
    assert "Requires:       snpd = " in sub
    assert "Requires(post): selinux-policy-targeted" in sub
    assert "make -C selinux-build -f /usr/share/selinux/devel/Makefile snpd.pp" in parsed
    files = parsed[parsed.index("%files selinux"):parsed.index("%changelog")]
    assert "/usr/share/selinux/packages/targeted/snpd.pp.bz2" in files
    assert "/usr/share/selinux/devel/include/distributed/snpd.if" in files
    if target != "debian-host":  # the real macros, unexpanded here
        for line in ("%pre selinux\n%selinux_relabel_pre -s targeted",
                     "%post selinux\n%selinux_modules_install -s targeted "
                     "/usr/share/selinux/packages/targeted/snpd.pp.bz2",
                     "%selinux_modules_uninstall -s targeted snpd",
                     "%posttrans selinux\n%selinux_relabel_post -s targeted"):
            assert line in parsed, line
    else:  # build-rpm's host shims: no macro left as text
        scripts = parsed[parsed.index("%pre selinux"):parsed.index("%files\n")]
        assert "%selinux" not in scripts and "semodule -n -s ${_policytype} -X 200 -i" in scripts


def test_no_selinux_on_sles_15() -> None:
    parsed = rpmspec("sles-15-sp6", "-P")
    assert "%package selinux" not in parsed and "selinux-policy" not in parsed
