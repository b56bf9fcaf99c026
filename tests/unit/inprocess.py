"""The configuration of an in-process daemon on the emulator backend, varlink only."""

from __future__ import annotations

from pathlib import Path


def emulator_config(tmp_path: Path, socket_path: Path, extra: str = "", *,
                    device: str = 'backend = "emulator"', emulator: str = "") -> str:
    """snpd.toml text: emulator state and an offline cache under tmp_path, the varlink
    socket at socket_path, no D-Bus; ``device`` and ``emulator`` are the keys of those
    tables, ``extra`` is appended (more sections)."""
    return f"""
[device]
{device}
[emulator]
state_dir = "{tmp_path / 'emu'}"
{emulator}
[kds]
cache_dir = "{tmp_path / 'cache'}"
offline = true
[varlink]
socket = "{socket_path}"
[dbus]
enabled = false
{extra}"""
