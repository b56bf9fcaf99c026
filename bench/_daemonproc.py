"""The processes behind bench/daemon.py: a private bus, the daemon, and load clients.

Kept out of the measuring script for two reasons. The load clients run as
``python bench/_daemonproc.py load ...`` in their own processes, so that the
clients' JSON, base64 and D-Bus marshalling do not share a GIL with the
measuring process (or with each other), and such a process should import only
what a client imports. And the life-cycle rules live in one place, the harness the
tests use too (tests/harness: proc.py, bus.py, daemon.py), which this module
adapts to the benchmark:

- every child is started in its own session (a Ctrl-C at the terminal reaches
  only the benchmark, which then stops the children in order: workers, daemon,
  bus) and with ``PR_SET_PDEATHSIG``, so that even a benchmark killed with
  SIGKILL leaves no daemon, bus or client behind;
- every wait is bounded: READY=1, the bus's address line, each load phase, and
  each worker's whole life (``--deadline``, enforced with ``alarm``);
- all traffic stays on this machine: Unix sockets in a private temporary
  directory, and a private dbus-daemon that nothing else uses.

The load protocol (one line each way) keeps the workers' connections open
across phases, so a phase measures calls, not connects: a worker prints
``READY`` once every client is connected and has made one call, then answers
each ``RUN <seconds> <calls per client>`` (0 calls: no count limit) with
``DONE <calls> <errors> <first error>``; ``QUIT`` or end of input ends it.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, List, Mapping, Optional, Sequence, Tuple

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

# The harness the tests use too (tests/harness): children, the bus, the daemon.
from tests.harness import bus as harness_bus  # noqa: E402
from tests.harness.bus import ALLOW_ALL_CONFIG as BUS_CONFIG  # noqa: E402, F401  # re-exported
from tests.harness.daemon import DaemonProcess  # noqa: E402
from tests.harness.proc import Child as Child  # noqa: E402  # re-exported
from tests.harness.proc import readline as readline  # noqa: E402  # re-exported

BUS_NAME = "org.snpd.Snpd1"
OBJECT_PATH = "/org/snpd/Snpd1"
ATTESTATION = "org.snpd.Snpd1.Attestation"
GET_REPORT = "org.snpd.Attestation.GetReport"
DEFAULT_VMPL = 0xFFFFFFFF

# -- children --------------------------------------------------------------------------------


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time a live process has used, from /proc/PID/stat."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def machine_busy_seconds() -> float:
    """CPU time all CPUs spent not idle (steal included: a VM's neighbours count),
    from /proc/stat, so that a benchmark can say how much went to other processes."""
    try:
        with open("/proc/stat", encoding="ascii") as f:
            fields = [int(x) for x in f.readline().split()[1:9]]
    except (OSError, ValueError):
        return 0.0
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def rss_kib(pid: int) -> int:
    """VmRSS of a live process, in KiB (0 if it is gone)."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


# -- the bus ---------------------------------------------------------------------------------


class PrivateBus(harness_bus.PrivateBus):
    """The benchmark's bus: allow-all, in the run's ``directory``, and gone with the
    benchmark however it ends."""

    def __init__(self, directory: Path, timeout: float) -> None:
        super().__init__("allow-all", directory=directory, timeout=timeout,
                         die_with_parent=True)


# -- the daemon ------------------------------------------------------------------------------


def write_config(path: Path, *, state_dir: Path, cache_dir: Path, socket_path: Path,
                 bus_address: Optional[str], report_group: Optional[str],
                 max_pending: int, per_client: int, kds_url: Optional[str] = None,
                 firmware_latency: float = 0.0) -> None:
    """The daemon's snpd.toml: emulator backend (``firmware_latency`` seconds per
    request), this run's sockets, queue bounds raised for 64 concurrent clients, and
    the KDS at ``kds_url`` (a loopback emulated one) or none (offline cache)."""
    def q(value: object) -> str:
        return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'

    kds = [f"url = {q(kds_url)}"] if kds_url else ["offline = true"]
    lines = [
        "[device]", 'backend = "emulator"', "",
        "[emulator]", f"state_dir = {q(state_dir)}",
        *([f"latency = {firmware_latency!r}"] if firmware_latency else []), "",
        "[kds]", f"cache_dir = {q(cache_dir)}", *kds, "",
        "[varlink]", f"socket = {q(socket_path)}", "",
        "[dbus]", f"enabled = {'true' if bus_address else 'false'}",
    ]
    if bus_address:
        lines.append(f"bus = {q(bus_address)}")
    lines += ["", "[queue]", f"max_pending = {max_pending}", f"per_client = {per_client}", ""]
    if report_group:  # so that a benchmark run by a non-root user may ask for reports
        lines += ["[access]", f"report_groups = [{q(report_group)}]", ""]
    path.write_text("\n".join(lines), encoding="utf-8")


class Daemon(DaemonProcess):
    """The benchmark's daemon (:class:`tests.harness.daemon.DaemonProcess`): logging to
    ``snpd-NUMBER.log``, gone with the benchmark however it ends, and started by the
    constructor, which returns once READY=1 arrives (``ready_ms``)."""

    def __init__(self, config: Path, directory: Path, *, timeout: float, number: int = 0,
                 profile: Optional[Path] = None, python: Optional[str] = None,
                 env: Optional[Mapping[str, str]] = None, cwd: Optional[Path] = None
                 ) -> None:
        super().__init__(config, directory, name=f"snpd-{number}", python=python,
                         profile=profile, environ=env, cwd=cwd, die_with_parent=True)
        try:
            self.start(timeout)
        except BaseException:
            self.close()
            raise

    def log(self, tail: Optional[int] = 4000) -> str:
        """The end of its log: enough to say why it failed."""
        return super().log(tail)

    def stop(self) -> int:
        """SIGTERM, then SIGKILL after 20 s; its exit status. Everything is closed."""
        try:
            return self.terminate(timeout=20.0)
        finally:
            self.close()


# -- load workers ------------------------------------------------------------------------------


class Worker:
    """One load process (``load`` below) as seen from the benchmark."""

    def __init__(self, transport: str, target: str, clients: int, *, deadline: float,
                 timeout: float) -> None:
        self.child = Child([sys.executable, str(Path(__file__).resolve()), "load",
                            "--transport", transport, "--target", target,
                            "--clients", str(clients), "--deadline", str(int(deadline) + 1)],
                           stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE)
        self.clients = clients
        self._timeout = timeout
        line = self._line(timeout)
        if line != "READY":
            raise RuntimeError(f"a {transport} load worker did not start: {line or 'no answer'}"
                               f"\n{self._stderr()}")

    def _line(self, timeout: float) -> str:
        assert self.child.proc.stdout is not None
        return readline(self.child.proc.stdout, timeout)

    def _stderr(self) -> str:
        if self.child.alive():
            self.child.stop()
        stream = self.child.proc.stderr
        with contextlib.suppress(OSError, ValueError):
            return stream.read().decode(errors="replace")[-2000:] if stream else ""
        return ""

    def send(self, line: str) -> None:
        assert self.child.proc.stdin is not None
        self.child.proc.stdin.write(line.encode() + b"\n")
        self.child.proc.stdin.flush()

    def result(self, timeout: float) -> Tuple[int, int, str]:
        """(calls, errors, first error) of the RUN sent last."""
        line = self._line(timeout)
        parts = line.split(" ", 3)
        if len(parts) < 3 or parts[0] != "DONE":
            raise RuntimeError(f"a load worker failed: {line or 'no answer'}\n{self._stderr()}")
        return int(parts[1]), int(parts[2]), parts[3] if len(parts) > 3 else ""

    def close(self) -> None:
        if self.child.alive():
            with contextlib.suppress(OSError, ValueError):
                self.send("QUIT")
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.child.proc.wait(timeout=5)
        self.child.stop()


def _varlink_clients(path: str, count: int) -> Any:
    from snpd.varlink.client import VarlinkClient

    clients = []
    for i in range(count):
        client = VarlinkClient(path, timeout=30.0)
        data = base64.b64encode(os.urandom(32) + i.to_bytes(32, "little")).decode()
        client.call(GET_REPORT, {"report_data": data})
        clients.append((client, data))

    def run(seconds: float, per_client: int) -> Tuple[int, int, str]:
        totals: List[Tuple[int, int, str]] = []
        lock = threading.Lock()

        def one(client: Any, data: str) -> None:
            from snpd.errors import SnpdError

            calls = errors = 0
            first = ""
            end = time.monotonic() + seconds
            while time.monotonic() < end and (per_client == 0 or calls + errors < per_client):
                try:
                    client.call(GET_REPORT, {"report_data": data})
                    calls += 1
                except (SnpdError, OSError) as exc:
                    errors += 1
                    first = first or f"{type(exc).__name__}: {exc}"
            with lock:
                totals.append((calls, errors, first))

        threads = [threading.Thread(target=one, args=pair, daemon=True) for pair in clients]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        return (sum(t[0] for t in totals), sum(t[1] for t in totals),
                next((t[2] for t in totals if t[2]), ""))

    return run


async def _dbus_load(address: str, count: int) -> None:
    from snpd.bundled import use_bundled_dbus_fast

    use_bundled_dbus_fast()
    from dbus_fast import Message, MessageType
    from dbus_fast.aio import MessageBus

    def get_report(data: bytes) -> Any:
        return Message(destination=BUS_NAME, path=OBJECT_PATH, interface=ATTESTATION,
                       member="GetReport", signature="ayua{sv}", body=[data, DEFAULT_VMPL, {}])

    buses: List[Tuple[Any, bytes]] = []
    try:
        for i in range(count):
            bus = await MessageBus(bus_address=address).connect()
            data = os.urandom(32) + i.to_bytes(32, "little")
            reply = await bus.call(get_report(data))
            if reply.message_type is MessageType.ERROR:
                raise RuntimeError(f"GetReport failed: {reply.error_name} {reply.body}")
            buses.append((bus, data))

        async def one(bus: Any, data: bytes, seconds: float, per_client: int
                      ) -> Tuple[int, int, str]:
            calls = errors = 0
            first = ""
            end = time.monotonic() + seconds
            while time.monotonic() < end and (per_client == 0 or calls + errors < per_client):
                reply = await bus.call(get_report(data))
                if reply.message_type is MessageType.ERROR:
                    errors += 1
                    first = first or f"{reply.error_name}: {reply.body}"
                else:
                    calls += 1
            return calls, errors, first

        print("READY", flush=True)
        loop = asyncio.get_running_loop()
        while True:
            line = await loop.run_in_executor(None, sys.stdin.readline)
            words = line.split()
            if not words or words[0] != "RUN":
                return
            seconds, per_client = float(words[1]), int(words[2])
            totals = await asyncio.gather(*(one(bus, data, seconds, per_client)
                                            for bus, data in buses))
            first = next((t[2] for t in totals if t[2]), "")
            print(f"DONE {sum(t[0] for t in totals)} {sum(t[1] for t in totals)} {first}"
                  .replace("\n", " "), flush=True)
    finally:
        for bus, _ in buses:
            bus.disconnect()


def load_main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="_daemonproc.py load",
                                     description="GetReport load for bench/daemon.py")
    parser.add_argument("--transport", choices=("varlink", "dbus"), required=True)
    parser.add_argument("--target", required=True, help="socket path or bus address")
    parser.add_argument("--clients", type=int, required=True)
    parser.add_argument("--deadline", type=int, required=True,
                        help="seconds after which the process ends, whatever it is doing")
    args = parser.parse_args(argv)
    signal.alarm(max(1, args.deadline))  # SIGALRM's default action ends the process
    if args.transport == "dbus":
        asyncio.run(_dbus_load(args.target, args.clients))
        return 0
    run = _varlink_clients(args.target, args.clients)
    print("READY", flush=True)
    for line in sys.stdin:
        words = line.split()
        if not words or words[0] != "RUN":
            break
        calls, errors, first = run(float(words[1]), int(words[2]))
        print(f"DONE {calls} {errors} {first}".replace("\n", " "), flush=True)
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] != "load":
        print("usage: _daemonproc.py load --transport varlink|dbus --target T --clients N "
              "--deadline S   (run by bench/daemon.py)", file=sys.stderr)
        return 2
    return load_main(args[1:])


def split(total: int, parts: int) -> List[int]:
    """``total`` clients over at most ``parts`` processes, as evenly as possible."""
    parts = max(1, min(parts, total))
    return [total // parts + (1 if i < total % parts else 0) for i in range(parts)]


if __name__ == "__main__":
    sys.exit(main())
