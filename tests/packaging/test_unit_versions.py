"""The shipped units work on every profile's systemd, 249 to 257 (issue 12, item 5).

``systemd/directives.toml`` lists every setting the units in systemd/ use, with the
first systemd version that has it and where that comes from (systemd's NEWS). This
parses the units themselves and fails when

- a unit uses a setting the table does not list (so a new setting is looked up
  before it ships);
- a setting is newer than the oldest supported systemd (``oldest_systemd``, Ubuntu
  22.04's 249), unless the table marks it ``on_older = "ignored"``: systemd only warns
  about a key it does not know and starts the unit without that protection;
- a value (a boolean, an enum value, a list item such as a system call group) or an
  Exec prefix is not in the table or newer than the oldest systemd. No exemption
  there: an old systemd ignores an unknown value and leaves the setting at its
  default (``PrivateTmp=disconnected`` becomes no private /tmp), or refuses the unit
  (an unknown Exec prefix);
- the units combine settings that only work together on a newer systemd
  (``[[combination]]``: ProcSubset=pid with ProtectKernelTunables=, before 250);
- the table lists a setting no unit uses, or its oldest_systemd is not the lowest
  systemd version of packaging/distros.toml's profiles.

Plain file parsing, no systemd needed, so it runs in every unit stage. The one check
that runs ``systemd-analyze security`` (the exposure this machine's systemd measures
equals the table's record for that version) is an integration test.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import pytest

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on 3.9 and 3.10
    import tomli as tomllib

REPO = Path(__file__).resolve().parents[2]
UNITS = REPO / "systemd"
TABLE_FILE = UNITS / "directives.toml"
README = UNITS / "README.md"
UNIT_FILES = sorted(p.name for p in UNITS.iterdir() if p.suffix in (
    ".service", ".socket", ".timer", ".path", ".target", ".mount"))
KINDS = {"bool", "enum", "list", "command", "condition", "free"}
#: systemd 247 is the version every inexact entry was checked against (Debian 11's
#: systemd-analyze verify); it is older than every profile's.
CHECKED_BOUND = 247
TRUE = {"yes", "true", "on", "1"}
FALSE = {"no", "false", "off", "0"}

Assignment = Tuple[str, str, str, int]  # section, key, value, line number
Table = Dict[str, Any]


def load_table() -> Table:
    with open(TABLE_FILE, "rb") as f:
        return tomllib.load(f)


TABLE = load_table()
OLDEST: int = TABLE["oldest_systemd"]


def assignments(text: str) -> List[Assignment]:
    """Every ``Key=value`` of a unit file, in order, with its section and line."""
    out: List[Assignment] = []
    section = ""
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        start = i
        line = lines[i]
        while line.endswith("\\") and i + 1 < len(lines):  # continuation lines
            i += 1
            line = line[:-1] + " " + lines[i]
        i += 1
        stripped = line.strip()
        if not stripped or stripped.startswith(("#", ";")):
            continue
        if stripped.startswith("["):
            section = stripped.strip("[]")
            continue
        key, sep, value = stripped.partition("=")
        assert sep, f"line {start + 1}: not a Key=value line: {stripped!r}"
        out.append((section, key.strip(), value.strip(), start + 1))
    return out


def value_tokens(kind: str, value: str) -> List[str]:
    """The parts of a value the table must know, for bool, enum and list settings."""
    if kind in ("bool", "enum"):
        return [value]
    if not value:
        return [""]  # an empty assignment: the reset
    words = value.split()
    if words[0].startswith("~"):
        words[0] = words[0][1:]
        return ["~", *[w for w in words if w]]
    return words


def exec_prefixes(value: str) -> List[str]:
    """The special prefixes of an Exec*= command line ("-", "+", "!!", ...)."""
    m = re.match(r"[^\w/%$]*", value)
    raw = m.group(0) if m else ""
    out: List[str] = []
    j = 0
    while j < len(raw):
        if raw.startswith("!!", j):
            out.append("!!")
            j += 2
        else:
            out.append(raw[j])
            j += 1
    return out


def condition_prefixes(value: str) -> List[str]:
    m = re.match(r"[|!]*", value)
    return list(m.group(0)) if m else []


def normalized(value: str) -> str:
    low = value.lower()
    return "yes" if low in TRUE else "no" if low in FALSE else value


def problems(name: str, text: str, table: Optional[Table] = None) -> List[str]:
    """Everything in one unit file that an ``oldest_systemd`` might not run."""
    table = table if table is not None else TABLE
    oldest = table["oldest_systemd"]
    directives = table["directive"]
    found: List[str] = []
    last: Dict[str, str] = {}
    for section, key, value, line in assignments(text):
        where = f"{name}:{line}: {key}="
        if key.startswith("X-"):  # systemd ignores these by design
            continue
        entry = directives.get(section, {}).get(key)
        if entry is None:
            found.append(f"{where} is not in systemd/directives.toml [directive.{section}]: "
                         "look up the systemd version that added it (NEWS) and add it")
            continue
        last[key] = normalized(value)
        ignored = entry.get("on_older") == "ignored"
        if entry["since"] > oldest and not ignored:
            found.append(f"{where} needs systemd {entry['since']}; the oldest supported "
                         f"is {oldest}")
        # Where an old systemd skips the whole line, its values matter only from the
        # version that knows the setting.
        floor = max(oldest, entry["since"]) if ignored else oldest
        kind = entry["kind"]
        if kind in ("bool", "enum", "list"):
            for token in value_tokens(kind, value):
                since = entry["values"].get(token)
                if since is None:
                    found.append(f"{where}{value}: value {token!r} is not in the table")
                elif since > floor:
                    found.append(f"{where}{value}: value {token!r} needs systemd {since}")
        elif kind in ("command", "condition"):
            prefixes = exec_prefixes(value) if kind == "command" else condition_prefixes(value)
            for prefix in prefixes:
                since = entry["prefixes"].get(prefix)
                if since is None:
                    found.append(f"{where}{value}: prefix {prefix!r} is not in the table")
                elif since > floor:
                    found.append(f"{where}{value}: prefix {prefix!r} needs systemd {since}")
    for combo in table.get("combination", []):
        wanted = {k: normalized(v) for k, v in combo["settings"].items()}
        if combo["works_since"] > oldest and all(last.get(k) == v for k, v in wanted.items()):
            together = " with ".join(f"{k}={v}" for k, v in wanted.items())
            found.append(f"{name}: {together} works only from systemd {combo['works_since']} "
                         f"({combo['source']})")
    return found


def used() -> Dict[Tuple[str, str], List[str]]:
    out: Dict[Tuple[str, str], List[str]] = {}
    for name in UNIT_FILES:
        for section, key, _value, _line in assignments((UNITS / name).read_text()):
            out.setdefault((section, key), []).append(name)
    return out


# -- the table itself ----------------------------------------------------------------------


def test_the_table_is_well_formed() -> None:
    assert TABLE["schema"] == 1
    assert isinstance(OLDEST, int) and OLDEST >= CHECKED_BOUND
    bad = []
    for section, entries in TABLE["directive"].items():
        for key, entry in entries.items():
            what = f"[directive.{section}.{key}]"
            if not isinstance(entry.get("since"), int) or not isinstance(entry.get("exact"), bool):
                bad.append(f"{what}: since (integer) and exact (boolean) are required")
                continue
            if not entry.get("source", "").strip():
                bad.append(f"{what}: no source")
            if not entry["exact"] and entry["since"] != CHECKED_BOUND:
                bad.append(f"{what}: an inexact entry's since is {CHECKED_BOUND}, the "
                           "version it was checked against")
            kind = entry.get("kind")
            if kind not in KINDS:
                bad.append(f"{what}: kind {kind!r} is not one of {sorted(KINDS)}")
            if kind in ("bool", "enum", "list") and not entry.get("values"):
                bad.append(f"{what}: a {kind} setting needs its values")
            if kind in ("command", "condition") and "prefixes" not in entry:
                bad.append(f"{what}: a {kind} setting needs its prefixes")
            for token, since in {**entry.get("values", {}), **entry.get("prefixes", {})}.items():
                if not isinstance(since, int):
                    bad.append(f"{what}: {token!r} = {since!r} is not a version")
                elif entry["exact"] and since < entry["since"]:
                    bad.append(f"{what}: {token!r} = {since} is older than the setting")
            if entry.get("on_older") not in (None, "ignored"):
                bad.append(f"{what}: on_older is \"ignored\" or absent")
    for combo in TABLE.get("combination", []):
        if not (combo.get("settings") and isinstance(combo.get("works_since"), int)
                and combo.get("source")):
            bad.append(f"[[combination]] {combo}: settings, works_since and source are required")
    assert not bad, "\n".join(bad)


def test_oldest_systemd_is_the_lowest_profiles() -> None:
    """The floor is the oldest systemd a supported distribution runs (packaging/distros.toml)."""
    profiles_file = REPO / TABLE["profiles_file"]
    if not profiles_file.exists():
        pytest.fail(f"{TABLE['profiles_file']} is not in this tree")
    with open(profiles_file, "rb") as f:
        profiles = tomllib.load(f)["profiles"]
    versions = {}
    for name, profile in profiles.items():
        m = re.match(r"\d+", str(profile.get("systemd", {}).get("version", "")))
        if m:  # "unknown" where a profile's version is not established
            versions[name] = int(m.group(0))
    assert versions, f"no systemd versions in {TABLE['profiles_file']}"
    assert min(versions.values()) == OLDEST, versions


def test_the_table_lists_only_settings_the_units_use() -> None:
    in_use = used()
    stale = [f"[directive.{section}.{key}]" for section, entries in TABLE["directive"].items()
             for key in entries if (section, key) not in in_use]
    assert not stale, f"no unit in systemd/ uses: {', '.join(stale)}"


def test_settings_newer_than_the_floor_are_documented() -> None:
    """A setting an old systemd ignores leaves that profile without its protection:
    systemd/README.md must say so."""
    readme = README.read_text()
    missing = [f"{key}=" for entries in TABLE["directive"].values()
               for key, entry in entries.items()
               if entry["since"] > OLDEST and f"{key}=" not in readme]
    assert not missing, f"systemd/README.md does not name {missing}"


# -- the units against the table -------------------------------------------------------------


def test_there_are_units() -> None:
    assert {"snpd.service", "snpd.socket"} <= set(UNIT_FILES)


@pytest.mark.parametrize("name", UNIT_FILES)
def test_unit_runs_on_the_oldest_supported_systemd(name: str) -> None:
    found = problems(name, (UNITS / name).read_text())
    assert not found, "\n".join(found)


# -- the checks catch what they should -------------------------------------------------------


def service(*lines: str) -> str:
    return "[Service]\nExecStart=/usr/bin/snpd\n" + "\n".join(lines) + "\n"


@pytest.mark.parametrize(("line", "expected"), [
    ("ProtectSytem=strict", "is not in systemd/directives.toml"),
    ("PrivateTmp=disconnected", "value 'disconnected' is not in the table"),
    ("Type=notify-reload", "value 'notify-reload' is not in the table"),
    ("ProtectProc=noaccess", "value 'noaccess' is not in the table"),
    ("SystemCallFilter=@system-service @sandbox", "value '@sandbox' is not in the table"),
    ("ExecStartPre=|/usr/bin/true", "prefix '|' is not in the table"),
    ("ExecStartPre=!!/usr/bin/true", "prefix '!!' is not in the table"),
])
def test_problems_are_found(line: str, expected: str) -> None:
    found = problems("t.service", service(line))
    assert any(expected in p for p in found), found


def test_a_setting_newer_than_the_floor_fails_unless_marked_ignored() -> None:
    table = {**TABLE, "directive": {**TABLE["directive"], "Service": {
        **TABLE["directive"]["Service"],
        "PrivateBPF": {"since": 258, "exact": True, "kind": "bool", "values": {"yes": 258},
                       "source": "test"}}}}
    found = problems("t.service", service("PrivateBPF=yes"), table)
    assert any("needs systemd 258" in p for p in found), found
    table["directive"]["Service"]["PrivateBPF"]["on_older"] = "ignored"
    assert not problems("t.service", service("PrivateBPF=yes"), table)
    # ... but a value newer than the setting itself still counts.
    table["directive"]["Service"]["PrivateBPF"]["values"]["strict"] = 259
    found = problems("t.service", service("PrivateBPF=strict"), table)
    assert found == ["t.service:3: PrivateBPF=strict: value 'strict' needs systemd 259"], found


def test_a_combination_that_fails_before_250_is_found() -> None:
    table = {**TABLE, "directive": {**TABLE["directive"], "Service": {
        **TABLE["directive"]["Service"],
        "ProcSubset": {"since": 247, "exact": True, "kind": "enum", "values": {"pid": 247},
                       "source": "NEWS 247"}}}}
    assert not problems("t.service", service("ProcSubset=pid"), table)
    found = problems("t.service", service("ProcSubset=pid", "ProtectKernelTunables=true"), table)
    assert any("works only from systemd 250" in p for p in found), found


def test_what_the_units_use_parses_as_expected() -> None:
    assert exec_prefixes("-+/usr/libexec/snpd/snpd-probe --output x") == ["-", "+"]
    assert exec_prefixes("!!/bin/true") == ["!!"]
    assert exec_prefixes("/bin/kill -HUP $MAINPID") == []
    assert condition_prefixes("|/dev/sev-guest") == ["|"]
    assert value_tokens("list", "~@privileged @resources") == ["~", "@privileged", "@resources"]
    assert value_tokens("list", "") == [""]
    text = "[Service]\nExecStart=/bin/a \\\n  --b\nUser=snpd\n"
    assert assignments(text) == [("Service", "ExecStart", "/bin/a    --b", 2),
                                 ("Service", "User", "snpd", 4)]


# -- the recorded exposure ---------------------------------------------------------------------


def analyze_version(analyze: str) -> str:
    out = subprocess.run([analyze, "--version"], capture_output=True, text=True,
                         check=True).stdout
    m = re.match(r"systemd (\d+)", out)
    assert m, out
    return m.group(1)


@pytest.mark.integration
@pytest.mark.parametrize("name", sorted(TABLE["exposure"]))
def test_recorded_exposure_matches_this_systemd(name: str) -> None:
    """systemd/directives.toml (and the README) give the exposure per systemd
    version; for this machine's version the record must be what it measures."""
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.fail("systemd-analyze is not installed (scripts/test installs systemd)")
    version = analyze_version(analyze)
    recorded = TABLE["exposure"][name].get(version)
    if recorded is None:
        pytest.fail(f"no exposure recorded for systemd {version}: measure it and add it")
    done = subprocess.run([analyze, "security", "--offline=yes", "--no-pager",
                           str(UNITS / name)], capture_output=True, text=True, check=False,
                          env=dict(os.environ, SYSTEMD_LOG_COLOR="0"))
    m = re.search(r"Overall exposure level for \S+: (\d+\.\d)", done.stdout + done.stderr)
    assert m, done.stdout + done.stderr
    assert float(m.group(1)) == recorded, (
        f"systemd {version} measures {m.group(1)} for {name}; directives.toml records "
        f"{recorded}: update [exposure] and systemd/README.md")
