"""The one schema reader: unknown keys, key paths, typed dataclasses, TOML text and files."""

from __future__ import annotations

import dataclasses
import enum
import os
from pathlib import Path
from typing import Optional, Tuple

import pytest

from snpd.errors import ConfigError
from snpd.files import read_toml
from snpd.schema import (
    SchemaError,
    boolean,
    integer,
    list_of,
    parse_toml,
    read_dataclass,
    read_table,
    schema_of,
)


class Colour(enum.Enum):
    RED = "red"
    BLUE = "blue"


@dataclasses.dataclass(frozen=True)
class Inner:
    depth: int = 0


@dataclasses.dataclass(frozen=True)
class Options:
    verbose: bool = False
    vmpl: Optional[int] = None
    names: Tuple[str, ...] = ()
    colour: Colour = Colour.RED
    inner: Inner = dataclasses.field(default_factory=Inner)
    level: int = dataclasses.field(default=1, metadata={"kind": integer(1, 3)})

    def __post_init__(self) -> None:
        if self.vmpl is not None and not 0 <= self.vmpl <= 3:
            raise ValueError(f"vmpl {self.vmpl} is not 0-3")


def test_read_table_names_the_unknown_key_and_the_known_ones() -> None:
    kinds = {"a": boolean, "b": integer(0, 9)}
    assert read_table("s", {"a": True}, kinds) == {"a": True}
    with pytest.raises(SchemaError) as caught:
        read_table("s", {"c": 1}, kinds)
    assert str(caught.value) == "s.c: unknown key (known: a, b)"
    assert caught.value.path == "s.c"


def test_errors_give_the_path_of_a_nested_value_and_the_table_name() -> None:
    with pytest.raises(SchemaError, match=r'^emulator: x\[1\]: expected an integer 0\.\.9, '
                                          r'got "2"$'):
        read_table("", {"x": [1, "2"]}, {"x": list_of(integer(0, 9))}, name="emulator")


def test_a_quoted_key_is_shown_as_toml_would_write_it() -> None:
    with pytest.raises(SchemaError, match=r'^log\."lev el": unknown key'):
        read_table("log", {"lev el": 1}, {"level": boolean})


def test_read_dataclass_by_field_types() -> None:
    got = read_dataclass(Options, {"verbose": True, "vmpl": 2, "names": ["x", "x"],
                                   "colour": "blue", "inner": {"depth": 4}, "level": 3})
    assert got == Options(verbose=True, vmpl=2, names=("x", "x"), colour=Colour.BLUE,
                          inner=Inner(4), level=3)
    assert read_dataclass(Options, {}) == Options()
    kinds = schema_of(Options)  # once, for a hot path
    assert list(kinds) == ["verbose", "vmpl", "names", "colour", "inner", "level"]
    assert read_dataclass(Options, {"vmpl": 1}, kinds=kinds) == Options(vmpl=1)
    with pytest.raises(TypeError):
        schema_of(dict)


@pytest.mark.parametrize("table, message", [
    ({"verbose": 1}, "verbose: expected true or false, got 1"),
    ({"vmpl": True}, "vmpl: expected an integer"),
    ({"vmpl": 7}, "opts: vmpl 7 is not 0-3"),
    ({"colour": "green"}, "colour: expected one of red, blue, got \"green\""),
    ({"inner": {"deep": 1}}, "inner.deep: unknown key (known: depth)"),
    ({"level": 4}, "level: 4 is out of range 1..3"),
    ({"names": "x"}, "names: expected an array"),
    ({"verbos": True}, "verbos: unknown key (known: verbose, vmpl, names, colour, inner, level)"),
])
def test_read_dataclass_rejects_with_the_key(table: dict, message: str) -> None:
    with pytest.raises(SchemaError) as caught:
        read_dataclass(Options, table, name="opts")
    assert str(caught.value).startswith(message if message.startswith("opts") else
                                        f"opts: {message}")


def test_schema_error_is_a_config_error() -> None:
    """Callers that catch ConfigError (snpd --check-config) see schema errors too."""
    assert issubclass(SchemaError, ConfigError)


def test_parse_toml_gives_line_and_column() -> None:
    assert parse_toml("a = 1\n", source="f") == {"a": 1}
    with pytest.raises(ConfigError, match=r"^f: line 2, column \d+: invalid TOML: "):
        parse_toml("a = 1\nb = \n", source="f")
    with pytest.raises(ConfigError, match=r"^f: larger than 4 bytes$"):
        parse_toml("a = 10", source="f", limit=4)


def test_read_toml_file(tmp_path: Path) -> None:
    path = tmp_path / "x.toml"
    assert read_toml(path, missing_ok=True) is None
    with pytest.raises(ConfigError, match=r": no such file$"):
        read_toml(path)
    path.write_bytes(b"\xef\xbb\xbfa = 1\n")  # a byte order mark is tolerated
    assert read_toml(path) == {"a": 1}
    with pytest.raises(ConfigError, match=r"larger than 3 bytes$"):
        read_toml(path, limit=3)
    path.write_bytes(b"a = \"\xff\"\n")
    with pytest.raises(ConfigError, match=r"not UTF-8 text"):
        read_toml(path)
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with pytest.raises(ConfigError, match=r"not a regular file$"):
        read_toml(fifo)  # and does not hang
