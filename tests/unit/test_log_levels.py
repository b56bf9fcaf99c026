"""[log] level: start-up and reload agree on what each level lets through.

A reload once looked the level up in the journal's own priority names, where
"error" is "err", and silently fell back to info."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from inprocess import emulator_config  # type: ignore[import-not-found]

from snpd.config import LOG_LEVELS, parse_config
from snpd.daemon import Daemon
from snpd.events import PRIORITIES, Events, StderrSink
from snpd.notify import Notifier


def config_text(tmp_path: Path, level: str) -> str:
    return emulator_config(tmp_path, tmp_path / "snpd.varlink", f'[log]\nlevel = "{level}"\n')


# What each level lets through: journald's priorities (syslog's), "error" being "err".
EXPECTED = {"debug": PRIORITIES["debug"], "info": PRIORITIES["info"],
            "notice": PRIORITIES["notice"], "warning": PRIORITIES["warning"],
            "error": PRIORITIES["err"]}


def test_the_config_knows_exactly_these_levels() -> None:
    assert dict(LOG_LEVELS) == EXPECTED


@pytest.mark.parametrize("level", sorted(EXPECTED))
def test_reload_applies_the_level_start_up_applies(tmp_path: Path, level: str) -> None:
    path = tmp_path / "snpd.toml"
    path.write_text(config_text(tmp_path, "debug"))
    config = parse_config(path.read_text())
    events = Events(StderrSink(io.StringIO()))
    daemon = Daemon(config, config_path=path, events=events, notifier=Notifier({}),
                    probe_file=tmp_path / "probe.json", root=tmp_path)
    path.write_text(config_text(tmp_path, level))
    daemon.reload()
    assert events.max_priority == EXPECTED[level]
