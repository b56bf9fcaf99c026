"""snpd: the daemon's entry point. For now only its configuration check.

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

from snpd.errors import EXIT_OK, EXIT_USAGE, SnpdError


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
    return parser


def check_config(path: Optional[Path], as_json: bool, stdout: TextIO, stderr: TextIO) -> int:
    from snpd import config

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
    print("the snpd daemon is not implemented yet", file=stderr)
    return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
