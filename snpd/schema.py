"""Reading untrusted mappings against a declared schema, and TOML text into one.

One reader for every table an operator or a caller writes: the daemon's
configuration, appraisal policies, the emulator's launch configuration and the
service's option tables. They share its rules, because a misspelt key that
silently left a default in force would be a security bug:

- unknown keys are errors that list the known ones;
- every error names the full key path (``queue.max_pendng``, ``faults[1].kind``)
  and shows the value as the operator wrote it, short and without control
  characters, since messages reach terminals and the journal;
- booleans are booleans only, integers never booleans.

A schema is a mapping of key to *kind*: a function ``(path, value) -> value`` that
checks and normalizes one value or raises :class:`SchemaError` naming ``path``.
:func:`read_table` applies one to a mapping; :func:`read_dataclass` derives it
from a frozen dataclass's field types (a field's ``metadata["kind"]`` overrides),
which is how typed option dataclasses are read from an ``a{sv}`` dict or JSON.

Pure: no I/O. :func:`parse_toml` takes text; :func:`snpd.files.read_toml` reads a
file, bounded, and hands it here.
"""

from __future__ import annotations

import dataclasses
import datetime
import enum
import json
import math
import os
import re
import sys
import types
import typing
from typing import Any, Callable, Dict, Iterable, Mapping, Optional, Tuple, Type, TypeVar

from snpd.errors import ConfigError

__all__ = [
    "MAX_TOML_SIZE",
    "Kind",
    "SchemaError",
    "boolean",
    "choice",
    "integer",
    "join",
    "key_text",
    "kind_for",
    "list_of",
    "number",
    "optional",
    "parse_toml",
    "read_dataclass",
    "read_table",
    "schema_of",
    "seconds",
    "show",
    "string",
    "unknown_key",
]

# A configuration is a few kilobytes; the cap keeps a wrong file (a log, a disk
# image) from being parsed whole.
MAX_TOML_SIZE = 1 << 20

T = TypeVar("T")
Kind = Callable[[str, object], Any]
"""Checks one value found at a key path and returns it normalized."""


class SchemaError(ConfigError):
    """A value that does not fit its schema: ``TABLE: PATH: DETAIL``. ``path`` is the
    full key path inside the table named ``table`` (a policy's name, ``emulator``),
    which is empty when the path starts at the document's top."""

    def __init__(self, path: str, detail: str, *, table: str = "") -> None:
        where = ": ".join(part for part in (table, path) if part)
        super().__init__(f"{where}: {detail}" if where else detail)
        self.path = path
        self.detail = detail
        self.table = table

    def within(self, table: str) -> SchemaError:
        """This error, placed in ``table`` unless it already names one."""
        return self if self.table or not table else SchemaError(self.path, self.detail,
                                                                table=table)


# ---------------------------------------------------------------------------
# Describing keys and values in messages


def show(value: object) -> str:
    """A value as the operator wrote it in TOML, short and free of control characters."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int) and value.bit_length() > 128:
        return "a very large integer"  # and repr() of a huge int may raise ValueError
    if isinstance(value, (int, float)):
        text = repr(value)
        return text if len(text) <= 40 else text[:40] + "..."
    if isinstance(value, str):
        shown = json.dumps(value[:60])
        return shown + ("..." if len(value) > 60 else "")
    if isinstance(value, os.PathLike):  # pathlib is not imported here: snpctl's budget
        return show(os.fspath(value))
    if isinstance(value, (list, tuple)):
        return "an array"
    if isinstance(value, Mapping):
        return "a table"
    if isinstance(value, datetime.datetime):
        return "a date-time"
    if isinstance(value, datetime.date):
        return "a date"
    if isinstance(value, datetime.time):
        return "a time"
    return f"a {type(value).__name__}"


_BARE_KEY = re.compile(r"[A-Za-z0-9_-]{1,64}")


def key_text(key: object) -> str:
    """A key as it would appear in a TOML path: bare if it can be, else quoted."""
    if isinstance(key, str) and _BARE_KEY.fullmatch(key):
        return key
    if isinstance(key, str):
        return show(key)
    return f"<{type(key).__name__} key>"


def join(path: str, key: object) -> str:
    """``path.key``, or ``key`` at the top."""
    return f"{path}.{key_text(key)}" if path else key_text(key)


def unknown_key(path: str, key: object, known: Iterable[str], *, noun: str = "key"
                ) -> SchemaError:
    return SchemaError(join(path, key), f"unknown {noun} (known: {', '.join(known) or 'none'})")


# ---------------------------------------------------------------------------
# Kinds


def choice(*options: str) -> Kind:
    def parse(path: str, value: object) -> str:
        if not isinstance(value, str) or value not in options:
            raise SchemaError(path, f"expected one of {', '.join(options)}, got {show(value)}")
        return value

    return parse


def boolean(path: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise SchemaError(path, f"expected true or false, got {show(value)}")
    return value


def integer(low: int, high: int) -> Kind:
    def parse(path: str, value: object) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise SchemaError(path, f"expected an integer {low}..{high}, got {show(value)}")
        if not low <= value <= high:
            raise SchemaError(path, f"{show(value)} is out of range {low}..{high}")
        return value

    return parse


def number(low: float, high: float) -> Kind:
    """A finite number in ``low..high``; integers are accepted and stored as floats."""

    def parse(path: str, value: object) -> float:
        if (isinstance(value, bool) or not isinstance(value, (int, float))
                or not math.isfinite(value)):
            raise SchemaError(path, f"expected a number {low:g}..{high:g}, got {show(value)}")
        if not low <= value <= high:
            raise SchemaError(path, f"{show(value)} is out of range {low:g}..{high:g}")
        return float(value)

    return parse


def seconds(high: float) -> Kind:
    """A positive, finite duration; integers are accepted and stored as floats."""

    def parse(path: str, value: object) -> float:
        if (isinstance(value, bool) or not isinstance(value, (int, float))
                or not value > 0 or not math.isfinite(value)):
            raise SchemaError(path, f"expected a positive number, got {show(value)}")
        if value > high:
            raise SchemaError(path, f"{show(value)} is more than the maximum {high:g}")
        return float(value)

    return parse


def string(max_length: int = 1024) -> Kind:
    def parse(path: str, value: object) -> str:
        if not isinstance(value, str):
            raise SchemaError(path, f"expected a string, got {show(value)}")
        if len(value) > max_length:
            raise SchemaError(path, f"expected at most {max_length} characters")
        return value

    return parse


def list_of(item: Kind, limit: int = 64, *, dedupe: bool = True) -> Kind:
    """An array of items, each checked with its own path (``kds.mirrors[1]``).
    ``dedupe`` drops repeats, keeping the first: they change nothing but the order."""

    def parse(path: str, value: object) -> Tuple[Any, ...]:
        if not isinstance(value, (list, tuple)):
            raise SchemaError(path, f"expected an array, got {show(value)}")
        if len(value) > limit:
            raise SchemaError(path, f"expected at most {limit} entries, got {len(value)}")
        items = (item(f"{path}[{i}]", v) for i, v in enumerate(value))
        return tuple(dict.fromkeys(items)) if dedupe else tuple(items)

    return parse


def _enum(cls: Type[enum.Enum]) -> Kind:
    def parse(path: str, value: object) -> enum.Enum:
        if isinstance(value, cls):
            return value
        names = [str(m.value) for m in cls]
        for member in cls:
            if member.value == value and not isinstance(value, bool):
                return member
        raise SchemaError(path, f"expected one of {', '.join(names)}, got {show(value)}")

    return parse


def _bytes(path: str, value: object) -> bytes:
    if not isinstance(value, (bytes, bytearray)):
        raise SchemaError(path, f"expected bytes, got {show(value)}")
    return bytes(value)


def optional(inner: Kind) -> Kind:
    """None, or a value of ``inner`` (an absent a{sv} entry or JSON null)."""

    def parse(path: str, value: object) -> Any:
        return None if value is None else inner(path, value)

    return parse


def kind_for(hint: Any) -> Kind:
    """The kind a type annotation implies: bool, int, float, str, bytes, an Enum,
    ``Optional[X]``, ``Tuple[X, ...]`` and frozen dataclasses (nested tables)."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin is typing.Union and type(None) in args and len(args) == 2:
        return optional(kind_for(next(a for a in args if a is not type(None))))
    if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
        return list_of(kind_for(args[0]), dedupe=False)
    if hint is bool:
        return boolean
    if hint is int:
        return integer(-(1 << 63), (1 << 64) - 1)
    if hint is float:
        return number(-math.inf, math.inf)
    if hint is str:
        return string()
    if hint is bytes:
        return _bytes
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        return _enum(hint)
    if isinstance(hint, type) and dataclasses.is_dataclass(hint):
        nested: Type[Any] = hint
        return lambda path, value: read_dataclass(nested, value, path=path)
    raise TypeError(f"no schema kind for {hint!r}; give the field a metadata 'kind'")


# ---------------------------------------------------------------------------
# Tables


def read_table(path: str, table: object, kinds: Mapping[str, Kind], *,
               what: str = "a table", name: str = "", noun: str = "key") -> Dict[str, Any]:
    """The keys of ``table`` that ``kinds`` declares, each checked by its kind.
    Absent keys are absent from the result (the caller's defaults apply); any key
    ``kinds`` does not declare is an error naming it and the known ones, in the
    order ``kinds`` lists them. ``name`` names the table in errors (``emulator:
    latency: ...``) when ``path`` starts inside it; ``noun`` is what a key is called
    there (a service method's "option")."""
    try:
        if not isinstance(table, Mapping):
            raise SchemaError(path, f"expected {what}, got {show(table)}")
        out: Dict[str, Any] = {}
        for key, value in table.items():
            kind = kinds.get(key) if isinstance(key, str) else None
            if kind is None:
                raise unknown_key(path, key, kinds, noun=noun)
            out[key] = kind(join(path, key), value)
        return out
    except SchemaError as exc:
        raise exc.within(name) from None


def schema_of(cls: Type[Any]) -> Mapping[str, Kind]:
    """The kinds of a dataclass's fields, by name, in field order. Resolving type
    hints costs tens of microseconds: a caller on a hot path (a service method)
    computes this once, as a module constant, and passes it to read_dataclass."""
    if not (isinstance(cls, type) and dataclasses.is_dataclass(cls)):
        raise TypeError(f"{cls!r} is not a dataclass")
    hints = typing.get_type_hints(cls)
    kinds: Dict[str, Kind] = {}
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        given: Optional[Kind] = f.metadata.get("kind")
        kinds[f.name] = given if given is not None else kind_for(hints[f.name])
    return types.MappingProxyType(kinds)


def read_dataclass(cls: Type[T], table: object, *, path: str = "",
                   what: str = "a table", name: str = "",
                   kinds: Optional[Mapping[str, Kind]] = None) -> T:
    """``table`` read into the (frozen) dataclass ``cls`` by its field types: keys
    are field names, missing keys take the field defaults, unknown keys are errors.
    A field's ``metadata["kind"]`` replaces the kind its type implies; ``kinds``
    (from :func:`schema_of`) saves resolving the types again. A
    ``ValueError`` or ``TypeError`` from the dataclass's own checks becomes a
    SchemaError at ``path``."""
    if kinds is None:
        kinds = schema_of(cls)
    values = read_table(path, table, kinds, what=what, name=name)
    try:
        return cls(**values)
    except SchemaError as exc:
        raise exc.within(name) from None
    except (ValueError, TypeError) as exc:
        raise SchemaError(path, str(exc), table=name) from None


# ---------------------------------------------------------------------------
# TOML text

_TOML_POSITION = re.compile(r"\s*\(at line (\d+), column (\d+)\)\s*$")
_TOML_END = re.compile(r"\s*\(at end of document\)\s*$")


def _toml_error(exc: Exception) -> str:
    """``line L, column C: invalid TOML: WHAT`` from tomllib's or tomli's message
    (only newer tomli has lineno/colno attributes; the message always has both)."""
    message = str(exc)
    m = _TOML_POSITION.search(message)
    if m:
        return f"line {m.group(1)}, column {m.group(2)}: invalid TOML: {message[:m.start()]}"
    m = _TOML_END.search(message)
    if m:
        return f"at end of document: invalid TOML: {message[:m.start()]}"
    return f"invalid TOML: {message}"


def parse_toml(text: str, *, source: str, limit: int = MAX_TOML_SIZE) -> Dict[str, Any]:
    """TOML text as a dict; every failure a ConfigError starting with ``source``.
    tomllib on Python 3.11 and later, tomli before (imported here, on first use:
    snpctl's verification path never needs it)."""
    if not isinstance(text, str):
        raise ConfigError(f"{source}: expected TOML text, got {type(text).__name__}")
    if len(text) > limit:
        raise ConfigError(f"{source}: larger than {limit} bytes")
    if sys.version_info >= (3, 11):
        import tomllib  # lazy: snpctl verify parses no TOML
    else:
        import tomli as tomllib  # lazy: and tomli is needed only below 3.11
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{source}: {_toml_error(exc)}") from None
    except ValueError as exc:  # an integer beyond Python's digit limit
        raise ConfigError(f"{source}: invalid TOML: {exc}") from None
    except RecursionError:
        raise ConfigError(f"{source}: invalid TOML: arrays or tables nested too deeply") from None
