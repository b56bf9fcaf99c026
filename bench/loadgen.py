"""A mixed-call load of many clients on one transport, for the load suite and bench/load.py.

    python bench/loadgen.py --transport varlink|dbus --target SOCKET|ADDRESS
                            --clients 64 --calls 16 [--greedy 8 --window 12]

Each client is its own connection (the daemon's fairness unit) and makes
``--calls`` calls cycling through every method (GetReport, GetExtendedReport,
GetCertificates, VerifyReport, GetEvidence, DeriveKey, DeriveSealingKey and the
properties), starting at a different method per client so the mix is even at
every moment. A polite client has one call in flight; a greedy one (the first
``--greedy`` clients, D-Bus only, where one connection may pipeline) keeps
``--window`` in flight. A call answered ``Busy`` is retried after a short pause
and counted; any other error, and any answer that is wrong (a report that does
not carry the client's own nonce, a verdict that is not valid, a key that differs
from the same request's earlier key), is a failure.

The process connects every client, prints ``READY``, waits for ``GO`` on stdin
(so that several generators start together), runs, and prints one JSON line:
per client its completion time (seconds from GO to its last answer), successes,
Busy answers and failures; per method every latency of the polite clients
(seconds, from the first send to the successful answer), and the greedy clients'
latencies apart (they include the waits after Busy). It talks only to the given Unix socket or bus
and ends by itself after ``--deadline`` seconds whatever it is doing.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import math
import os
import signal
import statistics
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any, Awaitable, Callable, Dict, List, Optional, Sequence, Tuple

REPORT_DATA_OFFSET = 0x50
DEFAULT_VMPL = 0xFFFFFFFF
BUS_NAME = "org.snpd.Snpd1"
OBJECT_PATH = "/org/snpd/Snpd1"
DBUS_A, DBUS_K = "org.snpd.Snpd1.Attestation", "org.snpd.Snpd1.Keys"
DBUS_BUSY = "org.snpd.Snpd1.Error.Busy"
VL_A, VL_K, VL_M = "org.snpd.Attestation.", "org.snpd.Keys.", "org.snpd.Manager."
METHODS = ("GetReport", "GetExtendedReport", "GetCertificates", "VerifyReport", "GetEvidence",
           "DeriveKey", "DeriveSealingKey", "Properties")
BUSY_PAUSE = 0.002
NONCE_SAMPLE = 256
BUSY_PAUSE_MAX = 0.05


class Wrong(Exception):
    """The daemon answered, but with something it must not have said."""


class BusyAnswer(Exception):
    """The documented refusal beyond capacity; the caller retries."""


class Failed(Exception):
    """Any other error answer, named as the daemon named it."""


Call = Callable[[str, bytes, bytes], Awaitable[Any]]


def _nonce_in(report: bytes, nonce: bytes) -> None:
    if len(report) != 1184:
        raise Wrong(f"a report of {len(report)} bytes")
    if report[REPORT_DATA_OFFSET:REPORT_DATA_OFFSET + 64] != nonce.ljust(64, b"\0"):
        raise Wrong("a report that does not carry this call's report_data")


class Checker:
    """What a right answer looks like; keys must repeat for the same request."""

    def __init__(self) -> None:
        self.keys: Dict[str, bytes] = {}
        self.nonces: List[bytes] = []  # a sample, for a caller's log search

    def same_key(self, name: str, key: bytes) -> None:
        if len(key) != 32:
            raise Wrong(f"a {name} of {len(key)} bytes")
        first = self.keys.setdefault(name, key)
        if key != first:
            raise Wrong(f"{name} differs from the same request's earlier answer")

    def result(self, method: str, nonce: bytes, value: Dict[str, Any]) -> None:
        if method in ("GetReport", "GetExtendedReport"):
            _nonce_in(value["report"], nonce)
        if method == "GetExtendedReport" and "vcek" not in value["kinds"]:
            raise Wrong(f"an extended report without a VCEK: {value['kinds']}")
        if method == "GetCertificates" and not {"ark", "ask", "vcek"} <= set(value["kinds"]):
            raise Wrong(f"certificates without the whole chain: {value['kinds']}")
        if method == "VerifyReport" and value["valid"] is not True:
            raise Wrong(f"a valid report judged invalid: {value['failures']}")
        if method == "GetEvidence":
            doc = json.loads(value["evidence"])
            if bytes(doc["attestation_report"]["report_data"]) != nonce.ljust(64, b"\0"):
                raise Wrong("evidence that does not carry this call's nonce")
        if method == "DeriveKey":
            self.same_key("raw key", value["key"])
        if method == "DeriveSealingKey":
            self.same_key("sealing key", value["key"])
        if method == "Properties" and value["state"] != "ready":
            raise Wrong(f"State {value['state']!r} while serving")


# -- transports -----------------------------------------------------------------------------


async def varlink_client(target: str, timeout: float) -> Any:
    from snpd.errors import Busy, SnpdError
    from snpd.varlink.client import AsyncVarlinkClient

    client = AsyncVarlinkClient(target, timeout=timeout)
    await client.connect()

    def b64(data: bytes) -> str:
        return base64.b64encode(data).decode()

    def unb64(text: str) -> bytes:
        return base64.b64decode(text)

    async def call(method: str, nonce: bytes, report: bytes) -> Dict[str, Any]:
        try:
            if method == "GetReport":
                p = await client.call(VL_A + "GetReport", {"report_data": b64(nonce)})
                return {"report": unb64(p["report"])}
            if method == "GetExtendedReport":
                p = await client.call(VL_A + "GetExtendedReport", {"report_data": b64(nonce)})
                return {"report": unb64(p["report"]),
                        "kinds": [c["kind"] for c in p["certificates"]]}
            if method == "GetCertificates":
                p = await client.call(VL_A + "GetCertificates", {})
                return {"kinds": [c["kind"] for c in p["certificates"]]}
            if method == "VerifyReport":
                p = await client.call(VL_A + "VerifyReport", {"report": b64(report)})
                return {"valid": p["valid"], "failures": p.get("failures")}
            if method == "GetEvidence":
                p = await client.call(VL_A + "GetEvidence",
                                      {"format": "trustee", "nonce": b64(nonce)})
                return {"evidence": unb64(p["evidence"])}
            if method == "DeriveKey":
                p = await client.call(VL_K + "DeriveKey",
                                      {"root_key": "vcek", "fields": ["measurement"]})
                return {"key": unb64(p["key"])}
            if method == "DeriveSealingKey":
                p = await client.call(VL_K + "DeriveSealingKey", {"label": "load"})
                return {"key": unb64(p["key"])}
            p = await client.call(VL_M + "GetProperties")
            return {"state": p["properties"]["org.snpd.Snpd1.Attestation"]["State"]}
        except Busy as exc:
            raise BusyAnswer(str(exc)) from None
        except SnpdError as exc:
            raise Failed(f"{type(exc).__name__}: {exc}") from None

    return call, client.close


async def dbus_client(target: str, timeout: float) -> Any:
    from snpd.bundled import use_bundled_dbus_fast

    use_bundled_dbus_fast()
    from dbus_fast import Message, MessageType
    from dbus_fast.aio import MessageBus

    bus = await MessageBus(bus_address=target).connect()

    async def send(interface: str, member: str, signature: str, body: List[Any]) -> List[Any]:
        message = Message(destination=BUS_NAME, path=OBJECT_PATH, interface=interface,
                          member=member, signature=signature, body=body)
        reply = await asyncio.wait_for(bus.call(message), timeout)
        if reply.message_type is MessageType.ERROR:
            text = reply.body[0] if reply.body else ""
            if reply.error_name == DBUS_BUSY:
                raise BusyAnswer(text)
            raise Failed(f"{reply.error_name}: {text}")
        return list(reply.body)

    async def call(method: str, nonce: bytes, report: bytes) -> Dict[str, Any]:
        if method == "GetReport":
            (report_bytes,) = await send(DBUS_A, "GetReport", "ayua{sv}",
                                         [nonce, DEFAULT_VMPL, {}])
            return {"report": bytes(report_bytes)}
        if method == "GetExtendedReport":
            got, certs = await send(DBUS_A, "GetExtendedReport", "ayua{sv}",
                                    [nonce, DEFAULT_VMPL, {}])
            return {"report": bytes(got), "kinds": [k for k, _ in certs]}
        if method == "GetCertificates":
            (certs,) = await send(DBUS_A, "GetCertificates", "a{sv}", [{}])
            return {"kinds": [k for k, _ in certs]}
        if method == "VerifyReport":
            (verdict,) = await send(DBUS_A, "VerifyReport", "aya{sv}", [report, {}])
            return {"valid": verdict["valid"].value, "failures": verdict["failures"].value}
        if method == "GetEvidence":
            _, evidence = await send(DBUS_A, "GetEvidence", "saya{sv}", ["trustee", nonce, {}])
            return {"evidence": bytes(evidence)}
        if method == "DeriveKey":
            (key,) = await send(DBUS_K, "DeriveKey", "sasuuta{sv}",
                                ["vcek", ["measurement"], DEFAULT_VMPL, 0, 0, {}])
            return {"key": bytes(key)}
        if method == "DeriveSealingKey":
            (key,) = await send(DBUS_K, "DeriveSealingKey", "sasa{sv}", ["load", [], {}])
            return {"key": bytes(key)}
        (value,) = await send("org.freedesktop.DBus.Properties", "Get", "ss",
                              [DBUS_A, "State"])
        return {"state": value.value}

    async def close() -> None:
        bus.disconnect()

    return call, close


# -- the load -------------------------------------------------------------------------------


class Client:
    def __init__(self, index: int, call: Call, *, calls: int, window: int) -> None:
        self.index = index
        self.call = call
        self.report = b""  # for VerifyReport
        self.calls = calls
        self.window = window
        self.next = 0
        self.ok = 0
        self.busy = 0
        self.failures: Counter[str] = Counter()
        self.done = 0.0

    async def run(self, checker: Checker, latencies: Dict[str, List[float]], t0: float
                  ) -> None:
        await asyncio.gather(*(self._lane(checker, latencies) for _ in range(self.window)))
        self.done = time.monotonic() - t0

    async def _lane(self, checker: Checker, latencies: Dict[str, List[float]]) -> None:
        while self.next < self.calls:
            method = METHODS[(self.index + self.next) % len(METHODS)]
            self.next += 1
            nonce = os.urandom(32)
            if len(checker.nonces) < NONCE_SAMPLE:
                checker.nonces.append(nonce)
            start = time.monotonic()
            pause = BUSY_PAUSE
            while True:
                try:
                    checker.result(method, nonce, await self.call(method, nonce, self.report))
                    self.ok += 1
                    latencies[method].append(time.monotonic() - start)
                except BusyAnswer:
                    self.busy += 1
                    await asyncio.sleep(pause)
                    pause = min(pause * 2, BUSY_PAUSE_MAX)
                    continue
                except (Failed, Wrong) as exc:
                    self.failures[f"{type(exc).__name__}: {exc}"] += 1
                except Exception as exc:
                    self.failures[f"{type(exc).__name__}: {exc}"] += 1
                break

    def summary(self) -> Dict[str, Any]:
        return {"index": self.index, "window": self.window, "done": round(self.done, 6),
                "ok": self.ok, "busy": self.busy, "failures": dict(self.failures)}


async def _first_report(call: Call) -> bytes:
    """A report for VerifyReport: the daemon's own, as a relying party would get one
    (asked on the first client's connection: a connection more could pass the
    daemon's per-uid bound)."""
    for _ in range(200):
        try:
            got: bytes = (await call("GetReport", b"loadgen", b""))["report"]
            return got
        except BusyAnswer:
            await asyncio.sleep(0.01)
    raise RuntimeError("the daemon answered Busy to every GetReport")


async def run(args: argparse.Namespace, go: Callable[[], Awaitable[None]]) -> Dict[str, Any]:
    connect = varlink_client if args.transport == "varlink" else dbus_client
    clients: List[Client] = []
    closers = []
    try:
        for index in range(args.clients):
            call, close = await connect(args.target, args.timeout)
            closers.append(close)
            window = args.window if index < args.greedy else 1
            clients.append(Client(index, call, calls=args.calls, window=window))
        report = await _first_report(clients[0].call)
        for client in clients:
            client.report = report
        await go()
        checker = Checker()
        # Greedy clients' calls wait out Busy answers: kept apart, so that the
        # percentiles of the polite ones say what a well-behaved caller sees.
        latencies: Dict[str, List[float]] = {m: [] for m in METHODS}
        greedy: Dict[str, List[float]] = {m: [] for m in METHODS}
        t0 = time.monotonic()
        await asyncio.gather(*(c.run(checker, greedy if c.window > 1 else latencies, t0)
                               for c in clients))
        wall = time.monotonic() - t0
    finally:
        for close in closers:
            await close()
    if args.secrets:
        Path(args.secrets).write_text(json.dumps({
            "nonces": [n.hex() for n in checker.nonces],
            "keys": {name: key.hex() for name, key in checker.keys.items()}}),
            encoding="utf-8")
    return {"transport": args.transport, "wall": round(wall, 6),
            "clients": [c.summary() for c in clients],
            "latency": {m: [round(s, 6) for s in v] for m, v in latencies.items()},
            "latency_greedy": [round(s, 6) for v in greedy.values() for s in v]}


# -- the other side: starting generators and reading their results ----------------------------


class Generator:
    """One ``loadgen.py`` process, started by a benchmark or a test: the constructor
    returns once every client is connected (READY); :meth:`go` starts the calls and
    :meth:`result` reads the JSON line. The process ends by itself after ``deadline``
    seconds, and with its parent (tests/harness/proc.py's Child), so a failing caller
    never leaves it behind."""

    def __init__(self, argv: Sequence[str], *, deadline: int, timeout: float = 60.0,
                 python: str = sys.executable) -> None:
        from tests.harness.proc import Child

        self.child = Child([python, str(Path(__file__).resolve()), *argv,
                            "--deadline", str(deadline)],
                           stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        line = self._line(timeout)
        if line != "READY":
            raise RuntimeError(f"loadgen did not connect: {line or 'no answer'}\n"
                               f"{self._stderr()}")

    def _line(self, timeout: float) -> str:
        from tests.harness.proc import readline

        assert self.child.proc.stdout is not None
        return readline(self.child.proc.stdout, timeout)

    def _stderr(self) -> str:
        proc = self.child.proc
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        try:
            return proc.stderr.read().decode(errors="replace")[-3000:] if proc.stderr else ""
        except (OSError, ValueError):
            return ""
        finally:
            self.close()

    def go(self) -> None:
        assert self.child.proc.stdin is not None
        self.child.proc.stdin.write(b"GO\n")
        self.child.proc.stdin.flush()

    def result(self, timeout: float) -> Dict[str, Any]:
        line = self._line(timeout)
        if not line.startswith("{"):
            raise RuntimeError(f"loadgen failed: {line or 'no answer'}\n{self._stderr()}")
        parsed: Dict[str, Any] = json.loads(line)
        self.close()
        return parsed

    def close(self) -> None:
        self.child.stop()


def run_together(argvs: Sequence[Sequence[str]], *, timeout: float, python: str = sys.executable
                 ) -> Tuple[List[Dict[str, Any]], float]:
    """Start one generator per argv, release them at one moment, return their results
    and the wall time from the release to the last result."""
    generators: List[Generator] = []
    try:
        for argv in argvs:
            generators.append(Generator(argv, deadline=int(timeout) + 60, python=python))
        start = time.monotonic()
        for generator in generators:
            generator.go()
        results = [g.result(timeout) for g in generators]
        return results, time.monotonic() - start
    finally:
        for generator in generators:
            generator.close()


def percentile(samples: Sequence[float], p: float) -> float:
    """Nearest-rank percentile (p in 0..100); NaN for no samples."""
    ordered = sorted(samples)
    if not ordered:
        return float("nan")
    return ordered[min(len(ordered) - 1, max(0, math.ceil(p / 100 * len(ordered)) - 1))]


def failures(results: Sequence[Dict[str, Any]]) -> Dict[str, int]:
    """Every failure of every client, by transport and text."""
    out: Counter[str] = Counter()
    for result in results:
        for client in result["clients"]:
            for text, count in client["failures"].items():
                out[f"{result['transport']}: {text}"] += count
    return dict(out)


def spread(clients: Sequence[Dict[str, Any]]) -> float:
    """Fairness: the slowest client's completion time over the fastest's."""
    done = [float(c["done"]) for c in clients]
    return max(done) / min(done)


def render(results: Sequence[Dict[str, Any]], wall: float) -> str:
    """The figures of one round: latency percentiles per transport and method,
    completion-time spread per group of clients, Busy answers and failures."""
    total = sum(len(v) for r in results for v in r["latency"].values()) + sum(
        len(r.get("latency_greedy", [])) for r in results)
    lines = [f"{total} calls in {wall:.2f} s: {total / wall:.0f} calls/s",
             "", f"   latency, ms           {'p50':>7} {'p90':>7} {'p99':>7} {'max':>7} "
                 f"{'calls':>6}"]
    for result in results:
        lat = result["latency"]
        every = [x for v in lat.values() for x in v]
        rows = [(f"{result['transport']} polite (all)", every)] + [
            (f"  {m}", lat[m]) for m in METHODS if lat.get(m)]
        if result.get("latency_greedy"):
            rows.append((f"{result['transport']} greedy (all)", result["latency_greedy"]))
        for name, samples in rows:
            lines.append(f"   {name:20} " + " ".join(
                f"{percentile(samples, p) * 1e3:7.2f}" for p in (50, 90, 99, 100))
                + f" {len(samples):6d}")
    lines += ["", "   completion time per client, s"
                  f"           {'min':>7} {'median':>7} {'max':>7}  max/min   Busy"]
    everyone: List[Dict[str, Any]] = []
    for result in results:
        for name, group in (("polite", [c for c in result["clients"] if c["window"] == 1]),
                            ("greedy", [c for c in result["clients"] if c["window"] > 1])):
            if not group:
                continue
            everyone += group
            done = [c["done"] for c in group]
            label = f"{result['transport']} {name} ({len(group)})"
            lines.append(f"   {label:40} {min(done):7.3f} {statistics.median(done):7.3f} "
                         f"{max(done):7.3f}  {spread(group):6.2f}x  "
                         f"{sum(c['busy'] for c in group):5d}")
    done = [c["done"] for c in everyone]
    lines.append(f"   {'all clients':40} {min(done):7.3f} {statistics.median(done):7.3f} "
                 f"{max(done):7.3f}  {spread(everyone):6.2f}x")
    failed = failures(results)
    lines += ["", f"   failures: {sum(failed.values())}"]
    lines += [f"     {count} x {text}" for text, count in sorted(failed.items())]
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--transport", choices=("varlink", "dbus"), required=True)
    parser.add_argument("--target", required=True, help="varlink socket path or bus address")
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--calls", type=int, default=16, help="calls per client (16)")
    parser.add_argument("--greedy", type=int, default=0,
                        help="clients (the first N) that pipeline --window calls (D-Bus)")
    parser.add_argument("--window", type=int, default=1)
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds per call (60)")
    parser.add_argument("--deadline", type=int, default=600,
                        help="seconds after which the process ends whatever it does (600)")
    parser.add_argument("--no-wait", action="store_true", help="start at once, without GO")
    parser.add_argument("--secrets", metavar="FILE",
                        help=f"write the first {NONCE_SAMPLE} nonces sent and the keys "
                             "received (hex, JSON) to FILE, for a search of the daemon's logs")
    args = parser.parse_args(argv)
    if args.clients < 1 or args.calls < 1 or args.window < 1 or args.greedy < 0:
        parser.error("--clients, --calls and --window must be at least 1")
    if args.greedy and args.transport == "varlink":
        parser.error("varlink answers one call per connection at a time: --greedy is D-Bus's")
    signal.alarm(max(1, args.deadline))  # SIGALRM's default action ends the process

    async def go() -> None:
        if args.no_wait:
            return
        print("READY", flush=True)
        line = await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
        if line.strip() != "GO":
            raise SystemExit(f"loadgen: expected GO, got {line.strip()!r}")

    result = asyncio.run(run(args, go))
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
