"""What snpctl and its ``generate`` commands share: reading and writing the files the
user names, the Output (text or one JSON document), usage errors and case-insensitive
choices.

snpctl's start-up budget applies (docs/contracts.md, 25 ms for a daemon-answered
command): like snpctl, this module imports only os and snpd.errors at load time.
"""

from __future__ import annotations

import os

from snpd.errors import EXIT_USAGE, InputFileError, SnpdError

TYPE_CHECKING = False  # see snpd/__init__.py: the client path does not import typing
if TYPE_CHECKING:
    from typing import Any, Callable, Dict, TextIO


class UsageError(SnpdError):
    kind = "InvalidArgument"
    exit_code = EXIT_USAGE


class OutputFileError(InputFileError):
    """A file snpctl was told to read or write cannot be (exit 2, one line)."""


def choice(*values: str) -> Callable[[str], str]:
    """An argparse type that matches ``values`` in any case and gives the canonical
    spelling, so ``milan``, ``MILAN``, ``PEM`` and ``VLEK`` mean what snpguest means;
    anything else falls through to argparse's own "invalid choice" error."""
    canonical = {v.lower(): v for v in values}

    def convert(text: str) -> str:
        return canonical.get(text.lower(), text)

    convert.__name__ = "choice"
    return convert


def write_file(name: str, data: bytes, mode: int = 0o644) -> None:
    """Write a file the user named, as that user, with files.atomic_write: a reader
    never sees half of it, and no link planted in the directory is followed. The
    directory the user named is the one exception: it is followed even if it is a
    symlink, because it is the user's own choice."""
    # lazy: snpctl status writes no file (25 ms budget); atomic_write(path, …, within=path.parent)
    from snpd.files import write_named

    try:
        write_named(name, data, mode)  # without pathlib: snpctl report's budget
    except OSError as exc:
        raise OutputFileError(f"cannot write {name}: {exc.strerror or exc}") from None


def check_output(name: str, what: str) -> None:
    """Refuse an output path that cannot be written before anything is asked of the
    firmware or the KDS: a report or key request spent for nothing is a firmware
    message (and a sequence number) gone, and the caller still has no file."""
    if os.path.isdir(name):
        raise OutputFileError(f"{what} {name} is a directory; give a file name")
    parent = os.path.dirname(name) or "."
    if not os.path.isdir(parent):
        raise OutputFileError(f"cannot write {what} {name}: directory {parent} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputFileError(f"cannot write {what} {name}: directory {parent} is not "
                              "writable")


def read_file(path: str, what: str, limit: int = 1 << 20) -> bytes:
    from snpd.files import read_bounded  # lazy: see write_file

    return read_bounded(path, what, limit)


class Output:
    """Human lines on stdout, or one JSON document with --json; diagnostics on stderr."""

    def __init__(self, as_json: bool, quiet: bool, out: TextIO, err: TextIO) -> None:
        self.as_json, self.quiet, self.out, self.err = as_json, quiet, out, err

    def line(self, text: str = "") -> None:
        if not self.as_json and not self.quiet:
            print(text, file=self.out)

    def result(self, text: str) -> None:
        """The one-line outcome: shown even with --quiet."""
        if not self.as_json:
            print(text, file=self.out)

    def json(self, doc: Dict[str, Any]) -> None:
        if self.as_json:
            import json  # lazy: json imports re; only for --json (25 ms budget)

            json.dump(doc, self.out, indent=2, sort_keys=False)
            self.out.write("\n")

    def warn(self, text: str) -> None:
        print(f"snpctl: {text}", file=self.err)
