"""Mandatory access control: the SELinux module (packaging/selinux) and the AppArmor
profile (packaging/apparmor) against the package and the code.

Pure checks (no tool needed, they always run):

- The file contexts (``snpd.fc``) agree with what the package installs and what the
  daemon uses, both ways. The package's files come from the Debian packaging as
  debhelper installs them (``snpd.install``, ``rules``, pyproject's scripts, the
  units, udev rule, sysusers and tmpfiles files, ``snpd.manpages``) and from the RPM
  spec's ``%files`` (all sections, snpd-selinux's included): once as this file's own
  macro expansion reads them, and once per target distribution as ``rpmspec -P``
  expands them (tests/packaging/rpm_targets.py: RHEL 9 with its .egg-info, RHEL 10,
  SLES 15 SP6 and 16, build-rpm's Debian build). A built RPM is checked the same way
  on its payload (``rpm -qp``, every file, directory and %ghost of snpd and
  snpd-selinux): the RPMs named in ``SNPD_TEST_RPMS`` (space-separated; the package
  stage builds them and runs that test, which is deselected without them). The
  run-time paths come from the units
  (ExecStart=, ExecStartPre=, StateDirectory=, ...), snpd.socket, tmpfiles.d, the
  udev rule and the code's defaults. Every path the two domains depend on must get
  the type its role needs, nothing else the package installs (snpctl, snpd-emu, the
  Python package, the D-Bus files) may be relabeled, every entry must match at least
  one of these paths, and no path may match two entries with different types.
  Lookups go through the substitutions libselinux applies (``/lib`` is
  ``/usr/lib``, ``/var/run`` is ``/run``), so Debian bookworm's /lib/systemd/system
  units count.
- ``snpd.te`` stays what was reviewed: no capability for the daemon, exactly
  CAP_DAC_OVERRIDE (and CAP_SYSLOG, through kernel_read_ring_buffer) for the probe,
  and only interfaces on the reviewed list below. Every type in ``snpd.fc`` is
  declared in ``snpd.te``, and every file type declared there is used.
- The AppArmor profiles attach to the installed executables, have a rule for every
  run-time path, and hold the same capabilities.

Tool checks: the module compiles with the reference policy's devel Makefile
(``packaging/selinux/build``, 0.2-0.5 s), so does a module that calls every interface
of ``snpd.if``, and the profiles parse and compile (``packaging/apparmor/check``,
about 0.3 s) with no capability beyond the reviewed ones once the abstractions are
in. They need Debian's selinux-policy-dev and apparmor, which scripts/test installs;
without them these tests fail, they do not skip. So do the ``rpmspec`` checks without
Debian's rpm. Each checker is also shown to fail on a broken input.
"""

from __future__ import annotations

import fnmatch
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Dict, Iterable, List, NamedTuple, Optional, Set, Tuple

import pytest
from rpm_targets import TARGETS, rpmspec  # type: ignore[import-not-found]
from unitfile import unit  # type: ignore[import-not-found]

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
SELINUX = REPO / "packaging" / "selinux"
APPARMOR = REPO / "packaging" / "apparmor"
DEBIAN = REPO / "packaging" / "debian"
RPM_SPEC = REPO / "packaging" / "rpm" / "snpd.spec"
UNITS = REPO / "systemd"
UNIT_FILES = sorted(p.name for p in UNITS.iterdir() if p.suffix in (
    ".service", ".socket", ".timer", ".path"))
SELINUX_DEVEL_MAKEFILE = Path("/usr/share/selinux/devel/Makefile")

# The type each role must get; a path with no role must match no entry.
ROLE_TYPES = {
    "exec": "snpd_exec_t",
    "probe": "snpd_probe_exec_t",
    "unit": "snpd_unit_t",
    "conf": "snpd_conf_t",
    "runtime": "snpd_runtime_t",
    "cache": "snpd_cache_t",
    "state": "snpd_var_lib_t",
    "device": "snpd_device_t",
}
DOMAINS = {"snpd_t", "snpd_probe_t"}

# libselinux's file_contexts.subs_dist (Debian's and Fedora's): a path is looked up
# with these prefixes replaced.
SUBSTITUTIONS = (("/lib64", "/usr/lib"), ("/usr/lib64", "/usr/lib"), ("/lib", "/usr/lib"),
                 ("/bin", "/usr/bin"), ("/sbin", "/usr/sbin"), ("/var/run", "/run"),
                 ("/var/lock", "/run/lock"))

# The interfaces and support macros snpd.te may call, each reviewed against issue 12
# item 4's list. A new one fails the test until it is reviewed and added here, with
# its reason.
REVIEWED_INTERFACES = {
    # declarations
    "init_daemon_domain": "snpd_t: started by systemd",
    "init_system_domain": "snpd_probe_t: the unit's ExecStartPre",
    "files_config_file": "/etc/snpd",
    "files_runtime_file": "/run/snpd (reference policy name)",
    "files_pid_file": "/run/snpd (Fedora policy name)",
    "files_type": "/var/cache/snpd, /var/lib/snpd",
    "dev_node": "/dev/sev-guest",
    "init_unit_file": "the units (reference policy)",
    "systemd_unit_file": "the units (Fedora policy)",
    # files
    "files_search_etc": "/etc/snpd",
    "files_search_runtime": "/run/snpd",
    "files_search_pids": "/run/snpd (Fedora policy name)",
    "files_list_runtime": "snpd-probe opens /run as a directory",
    "files_list_pids": "the same (Fedora policy name)",
    "files_search_var": "/var/cache/snpd",
    "files_search_var_lib": "/var/lib/snpd",
    "list_dirs_pattern": "own types only",
    "read_files_pattern": "own types only",
    "read_lnk_files_pattern": "own types only",
    "manage_dirs_pattern": "own types only",
    "manage_files_pattern": "own types only",
    "manage_sock_files_pattern": "own types only",
    # the firmware channel and SEV facts
    "dev_list_all_dev_nodes": "reach /dev/sev-guest",
    "dev_search_sysfs": "reach /sys/kernel/config",
    "fs_manage_configfs_dirs": "configfs-tsm report entries",
    "fs_manage_configfs_files": "configfs-tsm report attributes",
    "dev_read_sysfs": "/sys/devices/system/cpu/sev/vmpl",
    "kernel_read_system_state": "/proc/cpuinfo",
    "dev_read_kmsg": "snpd-probe: /dev/kmsg",
    "kernel_read_ring_buffer": "snpd-probe: syslog_read, CAP_SYSLOG",
    # the interpreter
    "corecmd_exec_bin": "the kernel maps /usr/bin/python3.X into the domain",
    "libs_use_ld_so": "the interpreter",
    "libs_use_shared_libs": "extension modules",
    "libs_read_lib_files": "the standard library, snpd's package",
    "files_read_usr_files": "the interpreter's data",
    "libs_dontaudit_write_lib_dirs": "bytecode writes, silenced",
    "dev_read_urand": "os.urandom fallback",
    "miscfiles_read_localization": "time zone",
    # logging, systemd, D-Bus
    "logging_send_syslog_msg": "journald",
    "init_search_run": "sd_notify (reference policy)",
    "init_write_runtime_socket": "sd_notify (reference policy)",
    "init_search_pid_dirs": "sd_notify (Fedora policy)",
    "init_write_pid_socket": "sd_notify (Fedora policy)",
    "init_named_socket_activation": "snpd.socket",
    "systemd_tmpfilesd_managed": "tmpfiles.d creates /run/snpd",
    "dbus_system_bus_client": "D-Bus",
    "dbus_connect_system_bus": "own org.snpd.Snpd1",
    "init_dbus_chat_script": "snpd-kds-refresh's busctl (reference policy)",
    "unconfined_server_dbus_chat": "snpd-kds-refresh's busctl (Fedora policy)",
    "unconfined_dbus_send": "replies to unconfined callers",
    # names and the network
    "auth_use_nsswitch": "[access] group names to gids",
    "corenet_tcp_connect_http_port": "the KDS, ports 80 and 443",
    "corenet_sendrecv_http_client_packets": "the KDS",
    "sysnet_dns_name_resolve": "the KDS host name",
    "miscfiles_read_generic_certs": "TLS: the CA bundle",
    "files_read_etc_files": "OpenSSL's configuration, /etc/group",
    "files_read_etc_runtime_files": "/etc/machine-id (Peer.GetMachineId)",
}
# m4 and policy language keywords, not interfaces.
POLICY_KEYWORDS = {"policy_module", "gen_require", "optional_policy", "ifdef", "ifndef",
                   "tunable_policy", "gen_tunable", "gen_context"}
# Raw rules snpd.te may hold (source, target, class): its own types, and what no
# interface expresses.
REVIEWED_RULES = {
    ("allow", "snpd_t", "self", "fifo_file"),
    ("allow", "snpd_t", "self", "unix_stream_socket"),
    ("allow", "snpd_t", "self", "unix_dgram_socket"),
    ("allow", "snpd_t", "self", "tcp_socket"),
    ("allow", "snpd_t", "snpd_device_t", "chr_file"),
    ("allow", "snpd_probe_t", "self", "capability"),
    ("allow", "snpd_probe_t", "self", "fifo_file"),
    ("dontaudit", "snpd_probe_t", "cpu_device_t", "chr_file"),
    ("dontaudit", "snpd_probe_t", "self", "capability"),
}


# -- the package's files ------------------------------------------------------------------------


class Item(NamedTuple):
    """A path and what it is: "file", "dir", "sock" or "chr"."""

    path: str
    kind: str
    source: str


def exec_command(value: str) -> List[str]:
    """An Exec*= value without its prefixes (-+@!:), split on whitespace."""
    words = value.split()
    words[0] = words[0].lstrip("-+@!:")
    return words


def project_scripts() -> List[str]:
    """The console scripts pyproject.toml declares (pybuild puts them in /usr/bin)."""
    names: List[str] = []
    inside = False
    for line in (REPO / "pyproject.toml").read_text().splitlines():
        if line.startswith("["):
            inside = line.strip() == "[project.scripts]"
            continue
        m = re.match(r"\s*([A-Za-z0-9_.-]+)\s*=", line)
        if inside and m:
            names.append(m.group(1))
    assert names, "pyproject.toml declares no [project.scripts]"
    return names


# debhelper's destinations for debian/<package>.<type> files (compat 13, Debian
# bookworm; a later debhelper puts units in /usr/lib/systemd/system, which is the
# same to SELinux).
DH_DESTINATIONS = {
    "service": "/lib/systemd/system/{name}.service",
    "socket": "/lib/systemd/system/{name}.socket",
    "timer": "/lib/systemd/system/{name}.timer",
    "path": "/lib/systemd/system/{name}.path",
    "udev": "/lib/udev/rules.d/60-{name}.rules",
    "sysusers": "/usr/lib/sysusers.d/{name}.conf",
    "tmpfiles": "/usr/lib/tmpfiles.d/{name}.conf",
}


def deb_files() -> List[Item]:
    """What the .deb installs: parsed from the Debian packaging, not from a build."""
    files: List[Item] = []
    for script in project_scripts():
        files.append(Item(f"/usr/bin/{script}", "file", "pyproject [project.scripts]"))
    files.append(Item("/usr/lib/python3/dist-packages/snpd/__init__.py", "file", "pybuild"))
    files.append(Item("/usr/lib/python3/dist-packages/snpd/dbus/org.snpd.Snpd1.xml", "file",
                       "pybuild"))
    for line in (DEBIAN / "snpd.install").read_text().splitlines():
        words = line.split("#", 1)[0].split()
        if not words:
            continue
        src = words[0]
        if len(words) == 1:
            files.append(Item("/" + src.lstrip("/"), "file", "snpd.install"))
            continue
        dest = "/" + words[1].strip("/")
        files.append(Item(f"{dest}/{Path(src).name}", "file", "snpd.install"))
    manpages = DEBIAN / "snpd.manpages"
    if manpages.exists():
        for line in manpages.read_text().split():
            section = line.rsplit(".", 1)[1]
            files.append(Item(f"/usr/share/man/man{section}/{Path(line).name}.gz", "file",
                               "snpd.manpages"))
    rules = (DEBIAN / "rules").read_text()
    # install -m MODE SRC debian/snpd[.NAME].TYPE, for dh_installsystemd and friends
    for m in re.finditer(r"install\s+-m\s*\d+\s+\S+\s+debian/snpd\.(?:([\w.-]+)\.)?(\w+)\s",
                         rules):
        name, kind = m.group(1) or "snpd", m.group(2)
        assert kind in DH_DESTINATIONS, f"rules installs debian/snpd.*.{kind}: where to?"
        files.append(Item(DH_DESTINATIONS[kind].format(name=name), "file", "rules"))
    # mv debian/snpd/A debian/snpd/B: a file moved after the install
    for m in re.finditer(r"\bmv\s+debian/snpd(/\S+)\s+debian/snpd(/\S+)", rules):
        old, new = m.group(1), m.group(2)
        files = [Item(new, f.kind, f.source + " + rules mv") if f.path == old else f
                 for f in files]
    return files


RPM_MACROS = {
    "_prefix": "/usr", "_exec_prefix": "/usr", "_bindir": "/usr/bin", "_sbindir": "/usr/sbin",
    "_libexecdir": "/usr/libexec", "_sysconfdir": "/etc", "_localstatedir": "/var",
    "_sharedstatedir": "/var/lib", "_rundir": "/run", "_datadir": "/usr/share",
    "_mandir": "/usr/share/man", "_docdir": "/usr/share/doc", "_unitdir": "/usr/lib/systemd/system",
    "_sysusersdir": "/usr/lib/sysusers.d", "_tmpfilesdir": "/usr/lib/tmpfiles.d",
    "_udevrulesdir": "/usr/lib/udev/rules.d", "_journalcatalogdir": "/usr/lib/systemd/catalog",
    "_datarootdir": "/usr/share", "_libdir": "/usr/lib64", "_prefix_lib": "/usr/lib",
    "python3_sitelib": "/usr/lib/python3/site-packages", "name": "snpd",
    "selinuxtype": "targeted",
}
RPM_SECTIONS = ("%package", "%description", "%prep", "%build", "%install", "%check",
                "%pre", "%post", "%preun", "%postun", "%posttrans", "%pretrans",
                "%changelog", "%files", "%triggerin", "%triggerun", "%generate_buildrequires")


def rpm_files(spec_text: str) -> Tuple[List[Item], List[str]]:
    """The paths of every %files section of an RPM spec, with the common macros and
    the spec's own %global/%define expanded (globs are kept: see expand_globs). Returns
    the paths and the lines it could not expand."""
    macros = dict(RPM_MACROS)
    for m in re.finditer(r"^%(?:global|define)\s+(\w+)\s+(.+)$", spec_text, re.M):
        macros[m.group(1)] = m.group(2).strip()

    def expand(text: str) -> Optional[str]:
        for _ in range(10):
            new = re.sub(r"%\{\??(\w+)\}|%(\w+)",
                         lambda m: macros.get(m.group(1) or m.group(2), "\0"), text)
            if new == text:
                break
            text = new
        return None if "\0" in text or "%" in text else text

    files: List[Item] = []
    unresolved: List[str] = []
    inside = False
    for raw in spec_text.splitlines():
        line = raw.strip()
        if line.startswith("%"):
            word = line.split()[0]
            if word in RPM_SECTIONS:
                inside = word == "%files"
                continue
            if word in ("%if", "%else", "%endif", "%ifarch", "%ifnarch", "%elif"):
                continue
        if not inside or not line or line.startswith("#"):
            continue
        kind = "file"
        if re.match(r"%(doc|license|exclude)\b", line):
            continue
        while True:  # leading directives: %dir %config(noreplace) %attr(...) %ghost ...
            m = re.match(r"%(dir|config|attr|defattr|ghost|verify|caps)\b(\([^)]*\))?\s*", line)
            if not m:
                break
            if m.group(1) == "dir":
                kind = "dir"
            line = line[m.end():]
        if not line:  # %defattr(...) alone
            continue
        expanded = expand(line)
        if expanded is None or not expanded.startswith("/"):
            unresolved.append(raw.strip())
            continue
        if expanded.endswith("/"):
            kind = "dir"
        files.append(Item(re.sub(r"/+", "/", expanded.rstrip("/")), kind, "rpm %files"))
    return files, unresolved


def expand_globs(files: List[Item], candidates: Iterable[str]) -> List[Item]:
    """A glob in a file list (%{_unitdir}/snpd*) stands for the candidates it matches
    (the files of the .deb, at their /usr paths), or for one sample name if none."""
    pool = sorted({substitute(c) for c in candidates})
    out: List[Item] = []
    for item in files:
        if not re.search(r"[*?\[]", item.path):
            out.append(item)
            continue
        hits = [c for c in pool if fnmatch.fnmatchcase(c, item.path)]
        sample = re.sub(r"[*?]", "", item.path)
        out.extend(Item(hit, item.kind, item.source) for hit in hits or [sample])
    return out


# -- what the daemon uses at run time, and the role of every path --------------------------------


class Layout(NamedTuple):
    exec_path: str
    probe_path: str
    runtime: List[Item]
    # role prefixes: (role, directory) for the directory trees the daemon owns
    trees: List[Tuple[str, str]]


def layout() -> Layout:
    """Derived from the units, tmpfiles.d, the udev rule and the code's defaults."""
    from snpd.config import DEFAULT_CONFIG_PATH, Config
    from snpd.daemon import PROBE_FILE

    cfg = Config()
    service = unit("snpd.service")["Service"]
    exec_path = exec_command(service["ExecStart"][0])[0]
    (pre,) = service["ExecStartPre"]
    pre_words = exec_command(pre)
    probe_path = pre_words[0]
    probe_output = pre_words[pre_words.index("--output") + 1]
    assert probe_output == str(PROBE_FILE)
    state = "/var/lib/" + service["StateDirectory"][-1]
    cache = "/var/cache/" + service["CacheDirectory"][-1]
    conf = "/etc/" + service["ConfigurationDirectory"][-1]
    (rw_path,) = service["ReadWritePaths"]
    tmpfiles = (REPO / "conf" / "tmpfiles.d" / "snpd.conf").read_text()
    run_dirs = [m.group(1) for m in re.finditer(r"^d\s+(\S+)", tmpfiles, re.M)]
    assert run_dirs == [rw_path], (run_dirs, rw_path)
    (socket_path,) = unit("snpd.socket")["Socket"]["ListenStream"]
    udev = (REPO / "conf" / "udev" / "60-snpd.rules").read_text()
    m = re.search(r'KERNEL=="([^"*?]+)"', udev)
    assert m, "the udev rule names no device"
    device = "/dev/" + m.group(1)
    assert device == str(cfg.device.path)
    assert str(cfg.kds.cache_dir) == cache
    assert str(cfg.varlink.socket) == socket_path
    assert str(DEFAULT_CONFIG_PATH).startswith(conf + "/")
    runtime = [
        Item(conf, "dir", "ConfigurationDirectory="),
        Item(str(DEFAULT_CONFIG_PATH), "file", "snpd.config.DEFAULT_CONFIG_PATH"),
        Item(rw_path, "dir", "tmpfiles.d, ReadWritePaths="),
        Item(socket_path, "sock", "snpd.socket ListenStream="),
        Item(probe_output, "file", "ExecStartPre= --output"),
        Item(cache, "dir", "CacheDirectory="),
        Item(state, "dir", "StateDirectory="),
        Item(str(cfg.emulator.state_dir), "dir", "[emulator] state_dir default"),
        Item(device, "chr", "60-snpd.rules"),
    ]
    trees = [("conf", conf), ("runtime", rw_path), ("cache", cache), ("state", state)]
    return Layout(exec_path, probe_path, runtime, trees)


def substitute(path: str) -> str:
    for src, dst in SUBSTITUTIONS:
        if path == src or path.startswith(src + "/"):
            return dst + path[len(src):]
    return path


def role_of(path: str, lay: Layout) -> Optional[str]:
    path = substitute(path)
    if path == substitute(lay.exec_path):
        return "exec"
    if path == substitute(lay.probe_path):
        return "probe"
    if path == "/dev/sev-guest":
        return "device"
    directory, _, base = path.rpartition("/")
    if directory == "/usr/lib/systemd/system" and base in UNIT_FILES:
        return "unit"
    for role, tree in lay.trees:
        if path == tree or path.startswith(tree + "/"):
            return role
    return None


# -- snpd.fc ----------------------------------------------------------------------------------


class Entry(NamedTuple):
    regex: str
    kind: Optional[str]  # None: any file type
    type: str
    line: int


FC_KINDS = {"--": "file", "-d": "dir", "-c": "chr", "-b": "blk", "-s": "sock", "-l": "lnk",
            "-p": "fifo"}


def parse_fc(text: str) -> List[Entry]:
    entries = []
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        words = line.split()
        assert len(words) in (2, 3), f"snpd.fc:{number}: {raw!r}"
        kind = FC_KINDS[words[1]] if len(words) == 3 else None
        m = re.fullmatch(r"gen_context\(system_u:object_r:(\w+),s0\)", words[-1])
        assert m, f"snpd.fc:{number}: not gen_context(system_u:object_r:TYPE,s0): {raw!r}"
        re.compile(words[0])
        entries.append(Entry(words[0], kind, m.group(1), number))
    return entries


def matches(entry: Entry, item: Item) -> bool:
    if entry.kind is not None and entry.kind != item.kind:
        return False
    return re.fullmatch(entry.regex, substitute(item.path)) is not None


def fc_problems(fc_text: str, package: Iterable[Item], lay: Layout) -> List[str]:
    """Everything wrong between the file contexts, the package's files and the run-time
    paths; empty when they agree."""
    entries = parse_fc(fc_text)
    package = list(package)
    problems: List[str] = []
    installed = {substitute(f.path) for f in package}
    # a directory in the list (an RPM %files line) brings everything below it
    trees = {substitute(f.path) + "/" for f in package if f.kind == "dir"}

    def ships(path: str) -> bool:
        path = substitute(path)
        return path in installed or any(path.startswith(tree) for tree in trees)

    for role, path in (("exec", lay.exec_path), ("probe", lay.probe_path)):
        if not ships(path):
            problems.append(f"the unit runs {path} ({role}), which the package does not install")
    for name in UNIT_FILES:
        if not ships(f"/usr/lib/systemd/system/{name}"):
            problems.append(f"systemd/{name} is not installed by the package")
    for item in [*package, *lay.runtime]:
        role = role_of(item.path, lay)
        hits = [e for e in entries if matches(e, item)]
        types = sorted({e.type for e in hits})
        where = f"{item.path} ({item.kind}, from {item.source})"
        if role is None:
            if hits:
                problems.append(f"{where} is relabeled {types} by snpd.fc line "
                                f"{hits[0].line}, but the daemon's domains do not use it")
            continue
        want = ROLE_TYPES[role]
        if not hits:
            problems.append(f"{where} ({role}) matches no entry of snpd.fc: it needs {want}")
        elif types != [want]:
            problems.append(f"{where} ({role}) is labeled {types}, it needs {want}")
    everything = [*package, *lay.runtime]
    for entry in entries:
        if not any(re.fullmatch(entry.regex, substitute(item.path)) and
                   (entry.kind is None or entry.kind == item.kind) for item in everything):
            problems.append(f"snpd.fc line {entry.line} ({entry.regex}) matches nothing the "
                            "package installs or the daemon uses")
    return problems


def test_the_deb_file_list_is_what_debhelper_installs() -> None:
    """The parse of the Debian packaging finds what a build of the .deb holds (checked
    once with dpkg -c on a build of this tree)."""
    paths = {f.path for f in deb_files()}
    assert {"/usr/bin/snpd", "/usr/bin/snpctl", "/usr/bin/snpd-emu",
            "/usr/libexec/snpd/snpd-probe", "/etc/snpd/snpd.toml",
            "/lib/systemd/system/snpd.service", "/lib/systemd/system/snpd.socket",
            "/lib/systemd/system/snpd-kds-refresh.service",
            "/lib/systemd/system/snpd-kds-refresh.timer", "/lib/udev/rules.d/60-snpd.rules",
            "/usr/lib/sysusers.d/snpd.conf", "/usr/lib/tmpfiles.d/snpd.conf",
            "/usr/lib/systemd/catalog/snpd.catalog",
            "/usr/share/dbus-1/system.d/org.snpd.Snpd1.conf",
            "/usr/share/dbus-1/system-services/org.snpd.Snpd1.service"} <= paths
    assert "/usr/bin/snpd-probe" not in paths  # moved to /usr/libexec by rules


def package_lists() -> List[str]:
    if not RPM_SPEC.exists():
        return ["deb"]
    return ["deb", "rpm", *(f"rpmspec-{target}" for target in TARGETS)]


@pytest.mark.parametrize("package", package_lists())
def test_file_contexts_match_the_package_and_the_daemon(package: str) -> None:
    if package == "deb":
        files = deb_files()
    elif package == "rpm":
        files, unresolved = rpm_files(RPM_SPEC.read_text())
        assert files, f"no %files paths in {RPM_SPEC} (unexpanded: {unresolved})"
        files = expand_globs(files, (f.path for f in deb_files()))
    else:  # as rpm expands the spec for one target distribution
        expanded = rpmspec(package[len("rpmspec-"):], "-P")
        files, unresolved = rpm_files(expanded)
        assert files and not unresolved, unresolved
        files = expand_globs(files, (f.path for f in deb_files()))
    problems = fc_problems((SELINUX / "snpd.fc").read_text(), files, layout())
    assert not problems, "\n".join(problems)


# -- a built RPM's payload ----------------------------------------------------------------------

RPM_KINDS = {"-": "file", "d": "dir", "l": "lnk", "s": "sock", "c": "chr", "b": "blk",
             "p": "fifo"}


def rpm_payload(rpm: Path) -> List[Item]:
    """Every path of a built RPM (files, directories, %ghost entries), from rpm -qp."""
    done = subprocess.run(["rpm", "-qp", "--qf", "[%{FILEMODES:perms} %{FILENAMES}\n]", str(rpm)],
                          capture_output=True, text=True, check=False, timeout=60)
    assert done.returncode == 0, done.stderr
    items = []
    for line in done.stdout.splitlines():
        perms, _, path = line.partition(" ")
        items.append(Item(path, RPM_KINDS.get(perms[0], "file"), f"{rpm.name} payload"))
    assert items, f"{rpm}: no files"
    return items


@pytest.mark.rpm_payload
def test_file_contexts_match_the_rpm_payload() -> None:
    """The file contexts against what the built packages install: snpd's payload and
    snpd-selinux's, with the same checks as the file lists above. The RPMs are the
    ones SNPD_TEST_RPMS names (the package stage builds them and runs this test);
    without it the test is deselected (tests/conftest.py), not skipped."""
    rpms = tuple(Path(p) for p in os.environ["SNPD_TEST_RPMS"].split())
    assert rpms, "SNPD_TEST_RPMS is empty"
    for rpm in rpms:
        assert rpm.is_file(), f"SNPD_TEST_RPMS names {rpm}, which does not exist"
    assert any(rpm.name.startswith("snpd-selinux-") for rpm in rpms), f"no snpd-selinux in {rpms}"
    files = [item for rpm in rpms for item in rpm_payload(rpm)]
    paths = {f.path for f in files}
    assert "/usr/bin/snpd" in paths and "/usr/share/selinux/packages/targeted/snpd.pp.bz2" in paths
    problems = fc_problems((SELINUX / "snpd.fc").read_text(), files, layout())
    assert not problems, "\n".join(problems)


def test_the_payload_check_fails_when_it_should(tmp_path: Path) -> None:
    """A payload that moves the daemon, or puts a file the daemon writes under a path
    without its label, is caught (on a list shaped like rpm_payload's)."""
    fc, lay = (SELINUX / "snpd.fc").read_text(), layout()
    payload = [Item(f.path.replace("/lib/systemd/", "/usr/lib/systemd/"), f.kind, "payload")
               for f in deb_files()]
    assert not fc_problems(fc, payload, lay)
    moved = [Item("/usr/sbin/snpd", f.kind, f.source) if f.path == "/usr/bin/snpd" else f
             for f in payload]
    assert any("does not install" in p for p in fc_problems(fc, moved, lay))
    state = [*payload, Item("/var/lib/snpd/emulator", "dir", "payload")]
    assert not fc_problems(fc, state, lay)
    unlabeled = fc.replace("/var/lib/snpd(/.*)?", "/var/lib/snpd")
    assert any(p.startswith("/var/lib/snpd/emulator (dir") and "matches no entry" in p
               for p in fc_problems(unlabeled, state, lay))


def test_the_file_context_check_fails_when_it_should() -> None:
    fc = (SELINUX / "snpd.fc").read_text()
    lay, files = layout(), deb_files()
    without_run = "\n".join(x for x in fc.splitlines() if not x.startswith("/run/snpd"))
    assert any("/run/snpd/snpd.varlink (sock" in p and "matches no entry" in p
               for p in fc_problems(without_run, files, lay))
    too_broad = fc + "/usr/bin/snp.*\t--\tgen_context(system_u:object_r:snpd_exec_t,s0)\n"
    assert any(p.startswith("/usr/bin/snpctl") and "relabeled" in p
               for p in fc_problems(too_broad, files, lay))
    stray = fc + "/opt/snpd(/.*)?\tgen_context(system_u:object_r:snpd_var_lib_t,s0)\n"
    assert any("(/opt/snpd(/.*)?) matches nothing" in p for p in fc_problems(stray, files, lay))
    wrong = fc.replace("object_r:snpd_cache_t", "object_r:snpd_var_lib_t")
    assert wrong != fc
    assert any(p.startswith("/var/cache/snpd (dir") and "it needs snpd_cache_t" in p
               for p in fc_problems(wrong, files, lay))
    elsewhere = [Item("/usr/bin/snpd-probe", f.kind, f.source)
                 if f.path == "/usr/libexec/snpd/snpd-probe" else f for f in files]
    assert any("does not install" in p for p in fc_problems(fc, elsewhere, lay))


def test_the_rpm_files_parser() -> None:
    """The %files parser the rpm case above uses, on a spec written the usual way."""
    spec = """\
%global modulename snpd
%files
%license LICENSE
%doc README.md
%{_bindir}/snpctl
%{_bindir}/snpd
%{_libexecdir}/snpd/snpd-probe
%dir %{_sysconfdir}/snpd
%config(noreplace) %attr(0644,root,root) %{_sysconfdir}/snpd/snpd.toml
%{_unitdir}/snpd.service
%{_unitdir}/snpd*.timer
%{_mandir}/man8/snpd.8*
%{python3_sitelib}/snpd/
%{_datadir}/selinux/packages/%{selinuxtype}/%{modulename}.pp.bz2
%{_weird_macro}/x
%files selinux
%defattr(-,root,root,-)
%exclude %{_datadir}/x
%dir %{_libexecdir}/snpd/
%changelog
* Mon Jan 01 2024 x
"""
    files, unresolved = rpm_files(spec)
    got = {(f.path, f.kind) for f in files}
    assert got == {
        ("/usr/bin/snpctl", "file"), ("/usr/bin/snpd", "file"),
        ("/usr/libexec/snpd/snpd-probe", "file"), ("/etc/snpd", "dir"),
        ("/etc/snpd/snpd.toml", "file"), ("/usr/lib/systemd/system/snpd.service", "file"),
        ("/usr/lib/systemd/system/snpd*.timer", "file"), ("/usr/share/man/man8/snpd.8*", "file"),
        ("/usr/lib/python3/site-packages/snpd", "dir"),
        ("/usr/share/selinux/packages/targeted/snpd.pp.bz2", "file"),
        ("/usr/libexec/snpd", "dir")}
    assert unresolved == ["%{_weird_macro}/x"]
    expanded = {f.path for f in expand_globs(files, [f.path for f in deb_files()])}
    assert "/usr/lib/systemd/system/snpd-kds-refresh.timer" in expanded
    assert "/usr/share/man/man8/snpd.8.gz" in expanded
    assert not any("*" in p for p in expanded)


# -- snpd.te --------------------------------------------------------------------------------


def te_source(text: str) -> str:
    return "\n".join(line.split("#", 1)[0] for line in text.splitlines())


def test_the_policy_calls_only_reviewed_interfaces() -> None:
    calls = set(re.findall(r"\b([a-z][a-z0-9_]*)\(", te_source((SELINUX / "snpd.te").read_text())))
    unknown = sorted(calls - POLICY_KEYWORDS - set(REVIEWED_INTERFACES))
    assert not unknown, (
        f"snpd.te calls {unknown}, which tests/packaging/test_mac.py has not reviewed: check "
        "each against issue 12 item 4 (nothing beyond its list without a reason) and add it "
        "to REVIEWED_INTERFACES with the reason")


def te_rules(text: str) -> Set[Tuple[str, str, str, str]]:
    rules = set()
    for m in re.finditer(r"^\s*(allow|dontaudit|auditallow|neverallow)\s+(\S+)\s+(\S+?):(\S+)\s",
                         te_source(text), re.M):
        rules.add((m.group(1), m.group(2), m.group(3), m.group(4)))
    return rules


def test_the_policy_holds_only_reviewed_rules_and_capabilities() -> None:
    text = (SELINUX / "snpd.te").read_text()
    rules = te_rules(text)
    assert rules <= REVIEWED_RULES, sorted(rules - REVIEWED_RULES)
    source = te_source(text)
    capabilities = re.findall(r"^\s*allow\s+(\w+)\s+self:capability2?\s+([^;]+);", source, re.M)
    assert capabilities == [("snpd_probe_t", "dac_override")], capabilities
    # no type transitions or role changes of its own: systemd does the only ones
    assert not re.search(r"^\s*(type_transition|role_transition|range_transition)\b", source,
                         re.M)


def test_every_type_is_declared_and_used() -> None:
    te = te_source((SELINUX / "snpd.te").read_text())
    te = re.sub(r"gen_require\(`[^']*'\)", "", te)  # types of other modules
    declared = set(re.findall(r"^\s*type\s+(\w+)", te, re.M))
    aliases = set(re.findall(r"^\s*type\s+\w+\s+alias\s+(\w+)", te, re.M))
    fc_types = {e.type for e in parse_fc((SELINUX / "snpd.fc").read_text())}
    assert fc_types <= declared | aliases, sorted(fc_types - declared - aliases)
    file_types = declared - DOMAINS
    assert file_types <= fc_types, f"declared, labeling nothing: {sorted(file_types - fc_types)}"
    assert set(ROLE_TYPES.values()) == fc_types
    assert declared >= DOMAINS


def test_no_m4_quote_characters_in_comments() -> None:
    """A backquote or apostrophe in a comment inside an m4 block opens or closes a
    quote: the policy then compiles into something else, or not at all."""
    for name in ("snpd.te", "snpd.if"):
        for number, line in enumerate((SELINUX / name).read_text().splitlines(), 1):
            comment = line.split("#", 1)[1] if "#" in line else ""
            assert "`" not in comment and "'" not in comment, f"{name}:{number}: {line}"


# -- the AppArmor profile -------------------------------------------------------------------


AA_VARIABLES = {"@{PROC}": "/proc", "@{run}": "/run", "@{sys}": "/sys"}


def aa_regex(glob: str) -> str:
    """An AppArmor path glob as a Python regex."""
    for name, value in AA_VARIABLES.items():
        glob = glob.replace(name, value)
    out, i, depth = "", 0, 0
    while i < len(glob):
        c = glob[i]
        if glob.startswith("**", i):
            out += ".*"
            i += 2
            continue
        if c == "*":
            out += "[^/]*"
        elif c == "?":
            out += "[^/]"
        elif c == "{":
            out += "(?:"
            depth += 1
        elif c == "}":
            out += ")"
            depth -= 1
        elif c == "," and depth:
            out += "|"
        elif c == "[":
            j = glob.index("]", i)
            out += glob[i:j + 1]
            i = j + 1
            continue
        else:
            out += re.escape(c)
        i += 1
    return out


def aa_profiles(text: str) -> Dict[str, Tuple[str, List[str]]]:
    """{profile name: (attachment, rule lines)} of a profile file."""
    profiles: Dict[str, Tuple[str, List[str]]] = {}
    current: Optional[str] = None
    for raw in text.splitlines():
        line = raw.split("#", 1)[0].strip() if not raw.strip().startswith("#include") else ""
        m = re.match(r"profile\s+(\S+)\s+(\S+)\s.*\{$", line)
        if m:
            current = m.group(1)
            profiles[current] = (m.group(2), [])
            continue
        if line == "}":
            current = None
            continue
        if current and line:
            profiles[current][1].append(line)
    return profiles


def aa_allows(rules: List[str], path: str, perms: str) -> bool:
    """Whether the profile's path rules grant every one of ``perms`` on ``path``, and no
    deny rule takes one away."""
    granted: Set[str] = set()
    denied: Set[str] = set()
    for rule in rules:
        m = re.fullmatch(r"(deny\s+|owner\s+)?(/\S+|@\{\w+\}\S*)\s+([a-zA-Z]+),", rule)
        if m and re.fullmatch(aa_regex(m.group(2)), path):
            (denied if (m.group(1) or "").startswith("deny") else granted).update(m.group(3))
    return set(perms) <= granted - denied


def test_apparmor_profiles_cover_the_daemon() -> None:
    lay = layout()
    profiles = aa_profiles((APPARMOR / "usr.bin.snpd").read_text())
    assert set(profiles) == {"snpd", "snpd-probe"}
    assert profiles["snpd"][0] == lay.exec_path
    assert profiles["snpd-probe"][0] == lay.probe_path
    installed = {f.path for f in deb_files()}
    assert {lay.exec_path, lay.probe_path} <= installed
    daemon = profiles["snpd"][1]
    perms = {"conf": "r", "runtime": "r", "cache": "rw", "state": "rw", "device": "rw"}
    for item in lay.runtime:
        role = role_of(item.path, lay)
        assert role is not None, item
        want = "rw" if item.kind == "sock" else perms[role]
        path = item.path + ("/" if item.kind == "dir" else "")
        assert aa_allows(daemon, path, want), f"profile snpd: no {want} rule for {path}"
    from snpd.config import Config

    configfs = str(Config().device.configfs_root)
    assert aa_allows(daemon, configfs + "/", "r")
    assert aa_allows(daemon, configfs + "/report-1/outblob", "r")
    assert aa_allows(daemon, configfs + "/report-1/inblob", "w")
    assert aa_allows(daemon, "/proc/cpuinfo", "r")
    assert not aa_allows(daemon, "/etc/snpd/snpd.toml", "w")
    assert not aa_allows(daemon, "/dev/kmsg", "r")
    probe = profiles["snpd-probe"][1]
    assert aa_allows(probe, "/dev/kmsg", "r")
    assert aa_allows(probe, "/run/snpd/probe.json", "w")
    assert aa_allows(probe, "/run/snpd/.probe.json.123456.tmp", "w")
    assert not aa_allows(probe, "/run/snpd/snpd.varlink", "w")


def test_apparmor_capabilities() -> None:
    profiles = aa_profiles((APPARMOR / "usr.bin.snpd").read_text())

    def capabilities(name: str) -> Set[str]:
        caps: Set[str] = set()
        for rule in profiles[name][1]:
            m = re.fullmatch(r"capability\s+([\w\s,]+),", rule)
            if m:
                caps |= set(m.group(1).replace(",", " ").split())
        return caps

    assert capabilities("snpd") == set()
    # and none an abstraction brings (nis: net_bind_service)
    assert "deny capability," in profiles["snpd"][1]
    assert capabilities("snpd-probe") == {"syslog", "dac_override"}
    assert not any(rule.startswith(("capability,", "file,", "network,", "dbus,", "unix,"))
                   for rules in (p[1] for p in profiles.values()) for rule in rules)


# -- the tools ------------------------------------------------------------------------------


def need(path: Optional[str], what: str) -> str:
    if path is None:
        pytest.fail(f"{what} is not installed: scripts/test installs it (this test fails "
                    "rather than skips without it)")
    return path


def apparmor_parser() -> str:
    return need(shutil.which("apparmor_parser") or next(
        (p for p in ("/sbin/apparmor_parser", "/usr/sbin/apparmor_parser")
         if os.access(p, os.X_OK)), None), "apparmor_parser (Debian package apparmor)")


def run(args: List[str]) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PATH=os.environ.get("PATH", "") + ":/usr/sbin:/sbin")
    return subprocess.run(args, capture_output=True, text=True, check=False, env=env,
                          timeout=300)


def test_the_selinux_module_compiles(tmp_path: Path) -> None:
    need(str(SELINUX_DEVEL_MAKEFILE) if SELINUX_DEVEL_MAKEFILE.exists() else None,
         "the reference policy's devel Makefile (Debian package selinux-policy-dev)")
    done = run([str(SELINUX / "build"), str(tmp_path / "out")])
    assert done.returncode == 0, done.stdout + done.stderr
    pp = Path(done.stdout.strip().splitlines()[-1])
    assert pp == tmp_path / "out" / "snpd.pp" and pp.stat().st_size > 0
    assert not list(SELINUX.glob("tmp")) and not list(SELINUX.glob("*.pp"))  # tree untouched


CLIENT_MODULE = """\
policy_module(snpdclient, 1.0.0)

type snpdclient_t;
type snpdclient_exec_t;
application_domain(snpdclient_t, snpdclient_exec_t)

snpd_stream_connect(snpdclient_t)
snpd_dbus_chat(snpdclient_t)
snpd_read_config(snpdclient_t)
snpd_read_cache(snpdclient_t)
snpd_rw_device(snpdclient_t)
snpd_admin(snpdclient_t, system_r)
"""


def test_every_interface_of_snpd_if_compiles_in_a_caller(tmp_path: Path) -> None:
    """snpd.if is for other modules: a module calling each of its interfaces compiles."""
    need(str(SELINUX_DEVEL_MAKEFILE) if SELINUX_DEVEL_MAKEFILE.exists() else None,
         "the reference policy's devel Makefile (Debian package selinux-policy-dev)")
    defined = re.findall(r"^interface\(`(\w+)'", (SELINUX / "snpd.if").read_text(), re.M)
    assert sorted(defined) == sorted(re.findall(r"^(snpd_\w+)\(", CLIENT_MODULE, re.M))
    for name in ("snpd.te", "snpd.if", "snpd.fc"):
        shutil.copy(SELINUX / name, tmp_path / name)
    (tmp_path / "snpdclient.te").write_text(CLIENT_MODULE)
    done = subprocess.run(["make", "-f", str(SELINUX_DEVEL_MAKEFILE), "snpdclient.pp"],
                          cwd=tmp_path, capture_output=True, text=True, check=False, timeout=300)
    output = done.stdout + done.stderr
    assert done.returncode == 0 and (tmp_path / "snpdclient.pp").exists(), output
    assert not re.search(r"warning|error", output, re.I), output


def test_the_selinux_build_fails_on_a_broken_module(tmp_path: Path) -> None:
    need(str(SELINUX_DEVEL_MAKEFILE) if SELINUX_DEVEL_MAKEFILE.exists() else None,
         "the reference policy's devel Makefile (Debian package selinux-policy-dev)")
    copy = tmp_path / "selinux"
    shutil.copytree(SELINUX, copy)
    te = copy / "snpd.te"
    te.write_text(te.read_text() + "\nsnpd_no_such_interface(snpd_t)\n")
    done = run([str(copy / "build"), str(tmp_path / "out")])
    assert done.returncode != 0 and "ERROR" in done.stderr, done.stderr
    assert not (tmp_path / "out" / "snpd.pp").exists()


def test_the_apparmor_profile_parses() -> None:
    apparmor_parser()
    done = run([str(APPARMOR / "check")])
    assert done.returncode == 0, done.stdout + done.stderr
    assert "profiles snpd snpd-probe parsed and compiled" in done.stderr


def test_the_compiled_profiles_hold_only_their_capabilities() -> None:
    """What the parser builds, abstractions included: the daemon keeps no capability,
    the probe exactly CAP_SYSLOG and CAP_DAC_OVERRIDE."""
    parser = apparmor_parser()
    features = Path("/usr/share/apparmor-features/features")
    args = [parser, "-Q", "-K", "--debug", str(APPARMOR / "usr.bin.snpd")]
    if features.exists():
        args[1:1] = ["-M", str(features)]
    done = run(args)
    assert done.returncode == 0, done.stderr
    allowed: Dict[str, Set[str]] = {}
    denied: Dict[str, Set[str]] = {}
    name = ""
    for line in (done.stdout + done.stderr).splitlines():
        m = re.match(r"Name:\s+(\S+)$", line)
        if m:
            name = m.group(1)
            allowed[name], denied[name] = set(), set()
        m = re.match(r"(Capabilities|Deny Caps):\s*(.*)$", line)
        if m and name:
            (allowed if m.group(1) == "Capabilities" else denied)[name].update(m.group(2).split())
    effective = {profile: allowed[profile] - denied[profile] for profile in allowed}
    assert effective == {"snpd": set(), "snpd-probe": {"dac_override", "syslog"}}, effective


def test_the_apparmor_check_fails_on_a_broken_profile(tmp_path: Path) -> None:
    apparmor_parser()
    for broken in ("  /dev/sev-guest rwz,\n", "  dbus sendd bus=system,\n"):
        profile = tmp_path / "usr.bin.snpd"
        profile.write_text((APPARMOR / "usr.bin.snpd").read_text().replace(
            "  /dev/sev-guest rw,\n", broken))
        done = run([str(APPARMOR / "check"), str(profile)])
        assert done.returncode != 0 and "FAIL" in done.stderr, (broken, done.stderr)
