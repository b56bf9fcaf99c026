"""The daemon's life cycle in-process on every supported Python: start, serve over
varlink, reload, stop (the full subprocess tests with D-Bus are in tests/integration)."""

from __future__ import annotations

import asyncio
import base64
import io
from pathlib import Path
from typing import Any, Callable, Dict

from inprocess import emulator_config  # type: ignore[import-not-found]

from snpd.config import parse_config
from snpd.daemon import Daemon
from snpd.events import Events, StderrSink
from snpd.notify import Notifier
from snpd.varlink.client import VarlinkClient


async def _serving(daemon: Daemon, socket_path: Path, calls: Callable[[], None]
                   ) -> asyncio.Future[int]:
    """Run ``daemon``, wait (bounded) for its socket, make ``calls`` on a thread; the
    daemon's task, still running."""
    task = asyncio.ensure_future(daemon.run())
    for _ in range(600):
        if socket_path.exists():
            break
        await asyncio.sleep(0.05)
    await asyncio.get_running_loop().run_in_executor(None, calls)
    return task


def test_start_serve_reload_stop(tmp_path: Path) -> None:
    socket_path = tmp_path / "run" / "snpd.varlink"
    config_path = tmp_path / "snpd.toml"
    config_path.write_text(emulator_config(tmp_path, socket_path))
    config = parse_config(config_path.read_text())
    log = io.StringIO()
    events = Events(StderrSink(log))
    daemon = Daemon(config, config_path=config_path, events=events,
                    notifier=Notifier({}), probe_file=tmp_path / "probe.json", root=tmp_path)
    answers = {}
    reloaded = {}

    def client_calls() -> None:
        with VarlinkClient(str(socket_path), timeout=30) as client:
            reply = client.call("org.snpd.Attestation.GetReport",
                                {"report_data": base64.b64encode(b"in-process").decode()})
            answers["report"] = base64.b64decode(reply["report"])
            answers["props"] = client.call("org.snpd.Manager.GetProperties", {})

    async def main() -> int:
        task = await _serving(daemon, socket_path, client_calls)
        # The reload must happen before the stop: wait (bounded) until it is logged.
        # (Stopping right after asking let the stop win the race: nothing reloaded.)
        config_path.write_text(config_path.read_text() + '[log]\nlevel = "debug"\n')
        daemon.request_reload()
        for _ in range(600):
            if "configuration reloaded" in log.getvalue():
                break
            await asyncio.sleep(0.05)
        reloaded["max_priority"] = events.max_priority
        daemon.request_stop()
        return await task

    assert asyncio.run(main()) == 0
    assert len(answers["report"]) == 1184 and answers["report"][0x50:0x5A] == b"in-process"
    attestation = answers["props"]["properties"]["org.snpd.Snpd1.Attestation"]
    assert attestation["Backend"] == "emulator" and attestation["State"] == "ready"
    assert not socket_path.exists()  # the bound socket is removed on stop
    assert "serving" in log.getvalue()
    assert "configuration reloaded" in log.getvalue()
    assert reloaded["max_priority"] == 7  # [log] level = "debug", from the reload


def _described(tmp_path: Path, emulator: str = "") -> Dict[str, Any]:
    """Describe's properties from an in-process daemon with these [emulator] keys."""
    socket_path = tmp_path / "run" / "snpd.varlink"
    config_path = tmp_path / "snpd.toml"
    tmp_path.mkdir()
    config_path.write_text(emulator_config(tmp_path, socket_path, emulator=emulator))
    daemon = Daemon(parse_config(config_path.read_text()), config_path=config_path,
                    events=Events(StderrSink(io.StringIO())), notifier=Notifier({}),
                    probe_file=tmp_path / "probe.json", root=tmp_path)
    answers: Dict[str, Any] = {}

    def describe() -> None:
        with VarlinkClient(str(socket_path), timeout=30) as client:
            answers.update(client.call("org.snpd.Manager.Describe", {})["properties"])

    async def main() -> int:
        task = await _serving(daemon, socket_path, describe)
        daemon.request_stop()
        return await task

    assert asyncio.run(main()) == 0
    return answers


def test_report_data_binding_follows_the_backend(tmp_path: Path) -> None:
    """The daemon passes its backend's Platform.report_data to the service: "caller" on
    the emulator, "runtime-data" on the emulated Azure CVM (``[emulator] vtpm``; what
    REPORT_DATA binds is known before the vTPM answers, so none runs here)."""
    plain = _described(tmp_path / "plain")
    azure = _described(tmp_path / "azure",
                       emulator=f'vtpm = "unix:{tmp_path / "vtpm.sock"}"')
    assert (plain["backend"], plain["report_data"]) == ("emulator", "caller")
    assert (azure["backend"], azure["report_data"]) == ("azure", "runtime-data")
