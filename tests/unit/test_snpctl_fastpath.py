"""snpctl's fast path for status and report (snpd.cli.fastpath) and the lean pieces
under it give exactly what the full path gives: the same namespace as argparse for
every command line it accepts, the same output, exit status, files and daemon calls,
and none of the imports it exists to avoid. Its speed is bench/daemon.py's to print;
nothing here measures time."""

from __future__ import annotations

import base64
import contextlib
import io
import itertools
import json
import os
import socket
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import pytest

from snpd.abi.report import AttestationReport
from snpd.cli import fastpath, snpctl
from snpd.client import _b64, _unb64
from snpd.errors import SnpdError
from snpd.files import _plain_split, write_named
from snpd.varlink.client import _dumps, _loads

REPO = Path(__file__).resolve().parents[2]

# -- the namespace: fastpath.parse against build_parser().parse_args ----------------------

# Whatever the fast path must refuse stands here next to what it accepts: other
# commands, abbreviations, help, direct mode, values that look like options, odd VMPL
# spellings, a command's newer options, "--".
BEFORE = [[], ["--json"], ["-q"], ["--quiet"], ["--json", "-q"], ["--socket", "/s"],
          ["--bus=system"], ["--socket=/s", "--bus", "b"], ["--direct"], ["-h"], ["--js"],
          ["--version"], ["-v", "1"], ["-r"], ["--"], ["x"]]
COMMANDS = ["status", "report", "Status", "stat", "ok", "cache", ""]
OPTIONS: List[List[str]] = [
    [], ["--json"], ["-q"], ["--quiet"], ["-r"], ["--random"],
    ["--socket", "/run/s.varlink"], ["--socket=/run/s.varlink"], ["--socket="],
    ["--socket", "-s"], ["--socket=-s"], ["--socket"], ["--socket", "a b"], ["--socket=a=b"],
    ["--bus", "system"], ["--bus=unix:path=/b"], ["--bus", "--json"], ["--bus", ""],
    ["-v", "0"], ["-v", "3"], ["-v2"], ["--vmpl", "1"], ["--vmpl=3"], ["-v", "4"],
    ["-v", "-1"], ["-v", "+1"], ["-v", "01"], ["-v", " 1"], ["-v=1"], ["-v"], ["--vmpl="],
    ["-vv"], ["-p"], ["--platform"], ["-rq"], ["-qr"], ["--direct"],
    ["--backend", "emulator"], ["--emulator-dir", "/e"], ["--device", "/dev/x"],
    ["--configfs-root", "/c"], ["--"], ["-h"], ["--help"], ["--soc", "/s"], ["--rand"],
    ["--json=yes"], ["-x"], ["-"], ["--version"], ["--format", "trustee"]]
POSITIONALS = [[], ["r.bin"], ["r.bin", "q.bin"], ["r.bin", "q.bin", "x"], ["", "q.bin"],
               ["-r.bin", "q.bin"], ["status", "report"]]


def _place(positionals: Sequence[str], first: Sequence[str], second: Sequence[str]
           ) -> Iterator[List[str]]:
    """Two option groups before, between and after the positionals."""
    p = list(positionals)
    yield [*first, *second, *p]
    yield [*p[:1], *first, *p[1:], *second]
    yield [*p, *first, *second]


def command_lines() -> Iterator[List[str]]:
    for before, command, positionals, option in itertools.product(
            BEFORE, COMMANDS, POSITIONALS, OPTIONS):
        for after in _place(positionals, option, []):
            yield [*before, *([command] if command else []), *after]
    # Every ordered pair of options (the last of a repeated option wins).
    for before, (command, positionals), first, second in itertools.product(
            [[], ["--json"], ["--socket", "/t"]],
            [("status", []), ("report", ["r.bin", "q.bin"]), ("report", ["r.bin"])],
            OPTIONS, OPTIONS):
        for after in _place(positionals, first, second):
            yield [*before, command, *after]


# Command lines the fast path must take: if the parser moves away from them, the
# namespace comparison below says how.
ACCEPTED = [
    ["status"], ["status", "--socket", "/s", "-q"], ["--json", "status"],
    ["--socket", "/s", "status", "--json"], ["status", "--bus", "system"],
    ["report", "r.bin", "q.bin"], ["report", "r.bin", "q.bin", "--random", "-q"],
    ["report", "--random", "r.bin", "q.bin", "-v", "2", "--socket=/s"],
    ["-q", "report", "r.bin", "-v0", "q.bin", "--vmpl=3", "--bus", "unix:path=/b"],
]


def _typed(namespace: Dict[str, Any]) -> List[Tuple[str, str, Any]]:
    return sorted((k, type(v).__name__, v) for k, v in namespace.items())


def test_every_command_line_the_fast_path_takes_parses_the_same_with_argparse() -> None:
    """Compared with the parser as it is at test time, so the fast path cannot fall
    behind it: a new option of status or report (a new attribute in the namespace),
    a changed default, or a spelling argparse stops accepting fails here."""
    parser = snpctl.build_parser()
    seen, taken, wrong = 0, 0, []
    for argv in itertools.chain(ACCEPTED, command_lines()):
        seen += 1
        fast = fastpath.parse(argv)
        if fast is None:
            continue
        taken += 1
        err = io.StringIO()
        try:
            with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
                full = vars(parser.parse_args(argv))
        except SystemExit:
            wrong.append(f"{argv}: argparse refuses it: {err.getvalue().strip()}")
            continue
        func = full.pop("func", None)
        if func is not getattr(snpctl, f"cmd_{fast.command}"):
            wrong.append(f"{argv}: argparse runs {func}")
        if _typed(vars(fast)) != _typed(full):
            wrong.append(f"{argv}:\n  fast     {_typed(vars(fast))}\n  argparse {_typed(full)}")
        if len(wrong) > 5:
            break
    assert not wrong, "\n".join(wrong)
    assert all(fastpath.parse(argv) is not None for argv in ACCEPTED)
    assert seen > 50_000 and taken > 1000, (seen, taken)


def test_the_fast_path_leaves_help_errors_and_other_commands_to_argparse() -> None:
    for argv in (["status", "-h"], ["--help"], ["report", "r.bin"], ["status", "x"],
                 ["report", "r", "q", "-v", "7"], ["status", "--direct"], ["sta"],
                 ["report", "r", "q", "--", "x"], ["status", "--socket"], []):
        assert fastpath.parse(argv) is None, argv
    for argv, code, text in ((["report", "r.bin"], 2, "REQUEST_FILE"),
                             (["status", "--socket"], 2, "expected one argument"),
                             (["report", "r", "q", "-v", "7"], 2, "invalid choice")):
        out, err = io.StringIO(), io.StringIO()
        assert snpctl.main(argv, stdout=out, stderr=err) == code
        assert text in err.getvalue() and err.getvalue().startswith("usage: snpctl")


# -- the command: the same output, files and calls ---------------------------------------


REPORT = (5).to_bytes(4, "little") + bytes(0x2C) + (2).to_bytes(4, "little") \
    + bytes(range(256)) * 4 + bytes(0x4A0 - 0x34 - 1024)
PROPERTIES = {
    "org.snpd.Snpd1.Attestation": {"Backend": "emulator", "Product": "Genoa", "Vmpl": 0,
                                   "ReportedTcb": 6059311823650291722, "State": "ready",
                                   "StateReason": ""},
    "org.snpd.Snpd1.Manager": {"Version": "0.1.1", "SevStatus": {"snp_active": True,
                                                                 "emulated": True, "vmpl": 0},
                               "Statistics": {"firmware_requests": 7, "report.ok": 7,
                                              "queue.high_water": 1, "kds.hits": 0}}}
# The same, as varlink's Describe serves them (org.snpd.Manager.Properties).
DESCRIBED = {"backend": "emulator", "product": "Genoa", "vmpl": 0,
             "reported_tcb": 6059311823650291722, "state": "ready", "state_reason": "",
             "version": "0.1.1", "sev_status": PROPERTIES["org.snpd.Snpd1.Manager"]["SevStatus"],
             "statistics": PROPERTIES["org.snpd.Snpd1.Manager"]["Statistics"]}


class FakeDaemon:
    """A varlink socket answering Describe and GetReport as ``mode`` says, and
    recording every call."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)
        self.mode = "ok"
        self.calls: List[Tuple[str, Any]] = []
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(self.path)
        self.sock.listen(8)
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def answer(self, method: str) -> Dict[str, Any]:
        if method == "org.snpd.Manager.Describe":
            return {"parameters": {"properties": DESCRIBED}}
        if self.mode == "busy":
            return {"error": "org.snpd.Attestation.Busy",
                    "parameters": {"message": "the firmware queue is full"}}
        report = REPORT if self.mode == "ok" else (9).to_bytes(4, "little") + REPORT[4:]
        return {"parameters": {"report": base64.b64encode(report).decode()}}

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                buffer = b""
                while True:
                    chunk = conn.recv(65536)
                    if not chunk:
                        break
                    buffer += chunk
                    while b"\0" in buffer:
                        message, buffer = buffer.split(b"\0", 1)
                        call = json.loads(message)
                        self.calls.append((call["method"], call.get("parameters")))
                        conn.sendall(json.dumps(self.answer(call["method"])).encode() + b"\0")

    def close(self) -> None:
        self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()
        self.thread.join(5)


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[FakeDaemon]:
    fake = FakeDaemon(tmp_path / "snpd.varlink")
    try:
        yield fake
    finally:
        fake.close()


def _files(directory: Path) -> Dict[str, Tuple[bytes, int]]:
    return {str(p.relative_to(directory)): (p.read_bytes(), p.stat().st_mode)
            for p in sorted(directory.rglob("*")) if p.is_file()}


CASES = [
    ("ok", ["status", "--socket", "{sock}"]),
    ("ok", ["--json", "status", "--socket", "{sock}"]),
    ("ok", ["status", "-q", "--socket={sock}"]),
    ("ok", ["status", "--socket", "{missing}"]),
    ("ok", ["report", "r.bin", "q.bin", "--socket", "{sock}"]),
    ("ok", ["report", "out/r.bin", "q.bin", "--socket", "{sock}", "--json"]),
    ("ok", ["report", "r.bin", "new.bin", "--random", "-v", "2", "--socket", "{sock}"]),
    ("ok", ["-q", "report", "--random", "r.bin", "q.bin", "--socket={sock}", "--json"]),
    ("ok", ["report", "r.bin", "missing.bin", "--socket", "{sock}"]),
    ("ok", ["report", "nowhere/r.bin", "q.bin", "--socket", "{sock}"]),
    ("ok", ["report", "r.bin", "q.bin", "--socket", "{missing}"]),
    ("bad-report", ["report", "r.bin", "q.bin", "--socket", "{sock}"]),
    ("busy", ["report", "r.bin", "q.bin", "--socket", "{sock}", "--json"]),
]


@pytest.mark.parametrize("mode, template", CASES)
def test_the_fast_path_runs_the_commands_exactly_as_the_full_path(
        mode: str, template: List[str], daemon: FakeDaemon, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Each command line once through the fast path and once through argparse (the
    fast path switched off), each in a fresh directory holding the same files: the
    same stdout, stderr, exit status, written files and modes, and daemon calls."""
    argv = [t.format(sock=daemon.path, missing=tmp_path / "absent.varlink") for t in template]
    assert fastpath.parse(argv) is not None
    monkeypatch.setattr(os, "urandom", lambda n: bytes(range(n)))  # --random, the same twice
    daemon.mode = mode
    results = []
    for name, fast in (("fast", True), ("full", False)):
        work = tmp_path / name
        (work / "out").mkdir(parents=True)
        (work / "q.bin").write_bytes(b"nonce")
        monkeypatch.chdir(work)
        if not fast:
            monkeypatch.setattr(fastpath, "parse", lambda argv: None)
        out, err = io.StringIO(), io.StringIO()
        code = snpctl.main(argv, stdout=out, stderr=err)
        results.append((code, out.getvalue(), err.getvalue(), _files(work), daemon.calls[:]))
        daemon.calls.clear()
    assert results[0] == results[1]
    code, stdout, stderr, files, calls = results[0]
    assert stdout or stderr
    if mode == "ok" and "r.bin" in files:
        assert files["r.bin"][0] == REPORT


# -- the lean pieces: the same answers as what they stand for ----------------------------


def _outcome(func: Callable[[Any], Any], value: Any) -> Any:
    try:
        return "ok", func(value)
    except (SnpdError, ValueError, TypeError) as exc:
        return type(exc), str(exc)


def test_parse_vmpl_agrees_with_the_report_parser() -> None:
    samples: List[Any] = [b"", bytes(1183), bytes(1185), "x" * 1184]
    for version, vmpl in itertools.product((0, 1, 2, 3, 4, 5, 6, 9, 0xFFFFFFFF),
                                           (0, 1, 3, 0xFFFFFFFF)):
        report = version.to_bytes(4, "little") + REPORT[4:0x30] \
            + vmpl.to_bytes(4, "little") + REPORT[0x34:]
        samples += [report, bytearray(report), memoryview(report), report + b"\0",
                    report[:-1]]
    for sample in samples:
        assert _outcome(snpctl.parse_vmpl, sample) == _outcome(
            lambda r: AttestationReport.from_bytes(r).vmpl, sample)


def test_write_named_is_atomic_write_within_the_parent(tmp_path: Path) -> None:
    """The same directory and name as pathlib gives, for every plain name; a planted
    link at the name is replaced, not followed; the user's directory link is followed."""
    parts = ["", ".", "..", "a", "b c", "...", ".x", "a\\b"]
    for k in range(1, 5):
        for combo in itertools.product(parts, repeat=k):
            name = "/".join(combo)
            split = _plain_split(name)
            if split is not None:
                assert split == (str(Path(name).parent), Path(name).name), name
    assert _plain_split("r.bin") == (".", "r.bin")
    assert _plain_split("/x") == ("/", "x")
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to("real")
    (tmp_path / "victim").write_bytes(b"keep")
    (tmp_path / "real" / "r.bin").symlink_to(tmp_path / "victim")
    write_named(str(tmp_path / "link" / "r.bin"), b"data", 0o640)
    assert (tmp_path / "victim").read_bytes() == b"keep"
    written = tmp_path / "real" / "r.bin"
    assert not written.is_symlink() and written.read_bytes() == b"data"
    assert written.stat().st_mode & 0o777 == 0o640 & ~_umask()
    write_named(str(tmp_path / "real" / "." / "s.bin"), b"slow path", 0o600)
    assert (tmp_path / "real" / "s.bin").read_bytes() == b"slow path"
    assert [p.name for p in (tmp_path / "real").iterdir() if p.name.startswith(".")] == []


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


MESSAGES: List[Any] = [
    {"method": "org.snpd.Attestation.GetReport", "parameters": {"report_data": "AAEC", "vmpl": 2}},
    {"method": "m", "parameters": {}, "oneway": True},
    {"s": "é\u2028\"\\\n\x00\U0001F600", "n": [0, -1, 2 ** 70, 1.5, 1e300, None, True, False],
     "nested": {"a": [[], {}, [{}]]}},
    {"nan": float("nan"), "inf": float("inf")},
]


def test_the_varlink_json_is_json() -> None:
    for message in MESSAGES:
        expected = json.dumps(message, ensure_ascii=True, separators=(",", ":"))
        assert _dumps(message) == expected
        assert json.dumps(_loads(expected), sort_keys=True) == json.dumps(message,
                                                                          sort_keys=True)
    cycle: Dict[str, Any] = {}
    cycle["self"] = cycle
    assert _outcome(_dumps, cycle) == _outcome(json.dumps, cycle)
    assert _outcome(_dumps, {"x": object()})[0] is TypeError
    assert _outcome(_dumps, {"x": b"raw"}) == _outcome(json.dumps, {"x": b"raw"})
    texts = ["", " ", "{}", " \t\n\r{} \r\n", "{} x", "{}{}", "\ufeff{}", "[1,]", "[1 2]",
             '{"a":}', '"\x01"', '"\\ud800"', "NaN", "-Infinity", "1e400", "-0", "01",
             "[" * 100 + "]" * 100, "nul", "\u00a0{}", '{"a":1,"a":2}', "9" * 5000]
    for text in texts:
        mine, theirs = _outcome(_loads, text), _outcome(json.loads, text)
        assert mine[0] == theirs[0] or (issubclass(mine[0], ValueError)
                                        and issubclass(theirs[0], ValueError)), text
        if mine[0] == "ok":
            assert repr(mine[1]) == repr(theirs[1]), text


def test_the_client_base64_is_base64() -> None:
    for data in (b"", b"\0", bytes(range(256)), b"x" * 1184):
        assert _b64(data) == base64.b64encode(data).decode()
    for text in ("AAEC", "AAE=", "AAE", "A A\nEC", "AA*EC", "é", "", "====", b"AAEC", 5,
                 None):
        assert _outcome(_unb64, text) == _outcome(base64.b64decode, text), text


# -- what the fast path imports ------------------------------------------------------------


def _modules(code: str) -> Tuple[set[str], str]:
    """sys.modules after ``code`` in a fresh interpreter without the site module (as the
    Debian package's snpctl has no .pth import hooks), snpd from this tree."""
    done = subprocess.run(
        [sys.executable, "-S", "-c", f"import sys; sys.path.insert(0, {str(REPO)!r}); {code}; "
         "print('MODULES', *sorted(sys.modules))"],
        capture_output=True, text=True, check=False, timeout=60)
    last = done.stdout.strip().splitlines()[-1] if done.stdout.strip() else ""
    assert last.startswith("MODULES"), done.stdout + done.stderr
    return set(last.split()[1:]), done.stdout + done.stderr


# What the daemon-answered commands do without (each a few ms of a 25 ms budget), and
# what they never need.
AVOIDED = {"argparse", "re", "enum", "json", "base64", "pathlib", "contextlib", "typing",
           "gettext", "locale", "dataclasses", "inspect", "functools", "collections",
           "socket", "asyncio", "dbus_fast", "cryptography", "snpd.abi", "snpd.abi.report",
           "snpd.varlink.protocol"}


@pytest.mark.parametrize("argv", [
    ["status", "--socket", "{sock}", "-q"],
    ["report", "{dir}/r.bin", "{dir}/q.bin", "--random", "--socket", "{sock}"],
    ["report", "{dir}/r.bin", "{dir}/q.bin", "-v", "1", "--socket={sock}", "-q"],
])
def test_status_and_report_import_none_of_what_the_fast_path_avoids(
        argv: List[str], daemon: FakeDaemon, tmp_path: Path) -> None:
    baseline, _ = _modules("pass")
    (tmp_path / "q.bin").write_bytes(b"nonce")
    argv = [t.format(sock=daemon.path, dir=tmp_path) for t in argv]
    loaded, output = _modules(f"from snpd.cli import snpctl; assert snpctl.main({argv!r}) == 0")
    assert "snpd.cli.fastpath" in loaded and "snpd.varlink.client" in loaded, output
    assert (loaded - baseline) & AVOIDED == set(), output
    assert ("org.snpd.Manager.Describe" if argv[0] == "status"
            else "org.snpd.Attestation.GetReport") in [m for m, _ in daemon.calls]


def test_argparse_is_imported_when_the_full_parser_is_needed(daemon: FakeDaemon) -> None:
    loaded, output = _modules("from snpd.cli import snpctl; "
                              f"assert snpctl.main(['status', '--socket', {daemon.path!r}, "
                              "'--no-such-option']) == 2")
    assert "argparse" in loaded and "unrecognized arguments" in output


def test_fast_args_behave_like_a_namespace() -> None:
    args: Optional[fastpath.FastArgs] = fastpath.parse(["status", "--json"])
    assert args is not None
    assert "json" in args and "quiet" not in args and args.json is True
    assert args == fastpath.FastArgs(**vars(args)) and "socket=None" in repr(args)
