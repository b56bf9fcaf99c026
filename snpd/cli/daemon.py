"""snpd: the daemon's entry point, and its configuration check.

``snpd --check-config [--config PATH] [--json]`` validates a configuration the
way the daemon will read it, so an operator (or a package's postinst, or
``ExecReload=`` wrapper) can refuse a broken file before the running daemon is
asked to reload it. It prints ``PATH: OK`` (or the effective configuration as
JSON) and exits 0, or prints the error, which names the offending key, to stderr
and exits 2 — the exit code every snpd usage or input error has.

Like snpctl, this module imports only the standard library at load time: the
check runs in package scripts where start-up time and missing optional
dependencies (dbus-fast) must not matter.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path
from typing import Optional, Sequence, TextIO

from snpd.errors import EXIT_OK, SnpdError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="snpd",
        description="AMD SEV-SNP attestation daemon.",
    )
    parser.add_argument(
        "--config", metavar="PATH", type=Path,
        help="configuration file (default: /etc/snpd/snpd.toml; when that file is "
             "absent the built-in defaults apply, but a PATH given here must exist)")
    parser.add_argument(
        "--check-config", action="store_true",
        help="validate the configuration, print 'PATH: OK' or the error naming the "
             "offending key, and exit (0 valid, 2 invalid)")
    parser.add_argument(
        "--json", action="store_true",
        help="with --check-config: print the effective configuration as JSON")
    parser.add_argument(
        "--log-target", choices=("auto", "journal", "stderr"), default="auto",
        help="where events go (auto: the journal under systemd, else stderr)")
    return parser


def check_config(path: Optional[Path], as_json: bool, stdout: TextIO, stderr: TextIO) -> int:
    from snpd import config  # lazy: snpd-probe (ExecStartPre) never reads the configuration

    default = config.DEFAULT_CONFIG_PATH
    try:
        cfg = config.load_config(path, default_path=default)
    except SnpdError as exc:
        print(str(exc), file=stderr)
        return exc.exit_code
    if as_json:
        print(cfg.to_json(), file=stdout)
    elif path is None and not default.exists():
        print(f"{default}: not present, the built-in defaults apply: OK", file=stdout)
    else:
        print(f"{path or default}: OK", file=stdout)
    return EXIT_OK


def without_glib() -> None:
    """Keep GLib out of the daemon. dbus-fast's package (before 2.x) imports its GLib
    front end, which loads PyGObject (libglib, libgio, libgobject, typelibs: 3.4 MB of
    RSS) wherever python3-gi is installed, as it is on most Ubuntu servers. The daemon
    uses the asyncio bus only; a process that has already imported gi keeps it."""
    sys.modules.setdefault("gi", None)  # type: ignore[arg-type]


def main(argv: Optional[Sequence[str]] = None, *, stdout: TextIO = sys.stdout,
         stderr: TextIO = sys.stderr) -> int:
    parser = build_parser()
    try:
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            args = parser.parse_args(argv)
            if args.json and not args.check_config:
                parser.error("--json only applies to --check-config")
    except SystemExit as exc:  # argparse: usage errors exit 2, --help exits 0
        return int(exc.code or 0)
    if args.check_config:
        return check_config(args.config, args.json, stdout, stderr)
    without_glib()
    from snpd.daemon import run_daemon  # lazy: after without_glib(); not for --check-config

    return run_daemon(args.config, log_target=args.log_target)


def probe_main(argv: Optional[Sequence[str]] = None) -> int:
    """snpd-probe: the unit's privileged ExecStartPre. Records the kernel's SEV lines and
    sysfs facts in /run/snpd/probe.json for the unprivileged daemon."""
    parser = argparse.ArgumentParser(prog="snpd-probe", description=probe_main.__doc__)
    parser.add_argument("--output", type=Path, default=None, metavar="FILE",
                        help="where to write (default /run/snpd/probe.json)")
    args = parser.parse_args(argv)
    # lazy: the daemon's modules only here and in main(), after without_glib()
    from snpd.daemon import PROBE_FILE, write_probe

    try:
        doc = write_probe(args.output or PROBE_FILE)
    except OSError as exc:
        print(f"snpd-probe: {exc}", file=sys.stderr)
        return 1
    facts = doc["facts"]
    active = isinstance(facts, dict) and facts.get("snp_active")
    print(f"snpd-probe: SEV-SNP {'active' if active else 'not seen in the kernel log'}; "
          f"wrote {args.output or PROBE_FILE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
