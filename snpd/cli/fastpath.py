"""snpctl's arguments for the commands the daemon answers, without argparse.

``snpctl status`` and ``snpctl report`` run in a whole-process budget of 25 ms
(README, Performance), of which the interpreter's own start takes about half.
Importing argparse (with the re, enum and gettext modules it pulls in) and
building snpctl's full parser would take most of the rest. So :func:`parse`
recognises the plain, well-formed spellings of these two commands and gives the
namespace argparse would give for them; for anything else — help, a typo, an
abbreviation, ``--``, direct mode, a value that looks like an option, a
command's newer options — it returns None and snpctl parses with argparse as
it always did, so every help text and every usage error stays argparse's own.

What it accepts must parse to the same namespace with the full parser:
tests/unit/test_snpctl_fastpath.py holds :func:`parse` to
``snpctl.build_parser().parse_args`` over a generated table of command lines,
so a change to the parser that this module does not follow fails there.

This module imports nothing: it runs before anything else snpctl needs.
"""

from __future__ import annotations

TYPE_CHECKING = False  # see snpd/__init__.py: the client path does not import typing
if TYPE_CHECKING:
    from typing import Any, Dict, List, Optional, Sequence

# Defaults of the firmware options the two commands share with direct mode.
DEFAULT_DEVICE = "/dev/sev-guest"
DEFAULT_CONFIGFS_ROOT = "/sys/kernel/config/tsm/report"

# --json and -q have default=SUPPRESS: the attribute exists only when given.
_FLAGS = {"--json": "json", "-q": "quiet", "--quiet": "quiet"}
_VALUES = {"--socket": "socket", "--bus": "bus"}
_REPORT_FLAGS = {"-r": "random", "--random": "random"}
_REPORT_VALUES = {"-v": "vmpl", "--vmpl": "vmpl"}
_VMPLS = {"0": 0, "1": 1, "2": 2, "3": 3}
_POSITIONALS = {"status": (), "report": ("report_file", "request_file")}


class FastArgs:
    """What argparse.Namespace offers the commands: attributes, ``vars()``, ``in``
    and equality."""

    def __init__(self, **kwargs: Any) -> None:
        self.__dict__.update(kwargs)

    def __contains__(self, key: str) -> bool:
        return key in self.__dict__

    def __eq__(self, other: object) -> bool:
        return vars(self) == vars(other) if hasattr(other, "__dict__") else NotImplemented

    __hash__ = None  # type: ignore[assignment]  # mutable, like Namespace

    def __repr__(self) -> str:
        return "FastArgs(" + ", ".join(f"{k}={v!r}" for k, v in self.__dict__.items()) + ")"


def parse(argv: Sequence[str]) -> Optional[FastArgs]:
    """The namespace ``snpctl.build_parser().parse_args(argv)`` gives for a plain
    ``status`` or ``report`` command line (without ``func``, which the caller
    sets from ``command``), or None: parse it with argparse."""
    tokens = list(argv)
    if not all(isinstance(token, str) for token in tokens):
        return None
    args: Dict[str, Any] = {
        "direct": False, "backend": None, "socket": None, "bus": None, "emulator_dir": None,
        "device": DEFAULT_DEVICE, "configfs_root": DEFAULT_CONFIGFS_ROOT}
    flags, values = _FLAGS, _VALUES  # before the command: the top-level parser's options
    command = ""
    positionals: List[str] = []
    i = 0
    while i < len(tokens):
        token = tokens[i]
        i += 1
        if not token.startswith("-"):
            if not command and token in _POSITIONALS:
                command = token
                if command == "report":
                    args.update(random=False, vmpl=None, platform=False)
                    flags, values = dict(_FLAGS, **_REPORT_FLAGS), dict(_VALUES, **_REPORT_VALUES)
            elif command and token:
                positionals.append(token)
            else:
                return None
            continue
        if token in flags:
            args[flags[token]] = True
            continue
        if token in values:
            if i == len(tokens):
                return None
            option, value = token, tokens[i]
            i += 1
        elif token.startswith("--") and "=" in token:
            option, _, value = token.partition("=")
        elif "-v" in values and token.startswith("-v") and not token.startswith("--"):
            option, value = "-v", token[2:]  # -v3, as argparse reads a short option's value
        else:
            return None
        dest = values.get(option)
        if dest == "vmpl":
            if value not in _VMPLS:
                return None
            args[dest] = _VMPLS[value]
        elif dest is not None and value and not value.startswith("-"):
            args[dest] = value
        else:
            return None
    names = _POSITIONALS.get(command)
    if names is None or len(positionals) != len(names):
        return None
    args.update(zip(names, positionals), command=command)
    return FastArgs(**args)
