"""Load and soak figures: many clients, every method, both transports at once.

    python bench/load.py [--clients 64] [--calls 64] [--greedy 8] [--window 12]
                         [--max-pending 256] [--per-client 4]
    python bench/load.py --soak 30            # rounds for 30 minutes, memory sampled

One round runs ``bench/loadgen.py`` twice at the same moment: ``--clients``
clients over D-Bus (the first ``--greedy`` of them pipelining ``--window`` calls
on their connection) and ``--clients`` over varlink, each making ``--calls``
mixed calls (every method in turn). It prints, per transport and per method, the
latency percentiles, the rate, the spread of the clients' completion times
(fairness: the slowest client's over the fastest's, greedy clients included),
the Busy answers (only the greedy clients, beyond ``--per-client``, may get them
while the load stays within ``--max-pending``) and every failure.

``--soak MINUTES`` repeats rounds (new connections each round, as clients come
and go) until the time is up, sampling the daemon's RSS, open file descriptors
and threads after every round, and prints the growth over the second half of the
run: flat memory means the same figure at half time and at the end, within
``--rss-noise`` KiB.

The daemon runs on the emulator backend (zero firmware latency, or
``--firmware-ms`` per request, as real hardware takes) with a private dbus-daemon
and the emulated KDS on 127.0.0.1 in a temporary directory, both stopped at exit, on Ctrl-C and when
this process is killed; all traffic stays on Unix sockets on this machine. The
exit status is 1 when any call failed or was answered wrongly, or when the soak's
memory grew; the figures are printed either way.
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _daemonproc import (
    Child,
    Daemon,
    PrivateBus,
    cpu_seconds,
    readline,
    rss_kib,
    write_config,
)
from loadgen import failures, render, run_together

READY_TIMEOUT = 60.0


def open_fds(pid: int) -> int:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return 0


def threads(pid: int) -> int:
    try:
        return len(os.listdir(f"/proc/{pid}/task"))
    except OSError:
        return 0


def one_round(args: argparse.Namespace, socket_path: Path, bus: str
              ) -> Tuple[List[Dict[str, Any]], float]:
    common = ["--clients", str(args.clients), "--calls", str(args.calls)]
    return run_together([
        ["--transport", "dbus", "--target", bus, *common, "--greedy", str(args.greedy),
         "--window", str(args.window)],
        ["--transport", "varlink", "--target", str(socket_path), *common],
    ], timeout=args.round_timeout)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--clients", type=int, default=64, help="clients per transport (64)")
    parser.add_argument("--calls", type=int, default=64, help="calls per client (64)")
    parser.add_argument("--greedy", type=int, default=8,
                        help="D-Bus clients that pipeline --window calls (8)")
    parser.add_argument("--window", type=int, default=12)
    parser.add_argument("--max-pending", type=int, default=256,
                        help="the daemon's [queue] max_pending (256)")
    parser.add_argument("--per-client", type=int, default=4,
                        help="the daemon's [queue] per_client (4)")
    parser.add_argument("--firmware-ms", type=float, default=0.0,
                        help="the emulated firmware's time per request, ms (0; real "
                             "hardware takes about 1 to 5)")
    parser.add_argument("--soak", type=float, metavar="MINUTES",
                        help="repeat rounds for MINUTES, sampling memory")
    parser.add_argument("--rss-noise", type=int, default=1024,
                        help="KiB of RSS change over the soak's second half still called "
                             "flat (1024)")
    parser.add_argument("--round-timeout", type=float, default=600.0)
    args = parser.parse_args(argv)
    if min(args.clients, args.calls, args.window, args.max_pending, args.per_client) < 1:
        parser.error("counts must be at least 1")

    def interrupted(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupted)
    with tempfile.TemporaryDirectory(prefix="snpd-load-") as tmp:
        directory = Path(tmp)
        bus = PrivateBus(directory, READY_TIMEOUT)
        kds: Optional[Child] = None
        daemon: Optional[Daemon] = None
        result = 1
        try:
            state_dir = directory / "emulator"
            kds, kds_url = emulated_kds(state_dir)
            socket_path = directory / "snpd.varlink"
            config = directory / "snpd.toml"
            write_config(config, state_dir=state_dir, cache_dir=directory / "kds",
                         socket_path=socket_path, bus_address=bus.address, report_group=None,
                         max_pending=args.max_pending, per_client=args.per_client,
                         kds_url=kds_url, firmware_latency=args.firmware_ms / 1000)
            daemon = Daemon(config, directory, timeout=READY_TIMEOUT)
            result = measure(args, daemon, socket_path, bus.address)
            if result:
                print(f"\nsnpd's log, the end:\n{daemon.log()}")
        except KeyboardInterrupt:
            print("\ninterrupted: stopping the daemon and the bus", file=sys.stderr)
            result = 130
        finally:
            if daemon is not None:
                stopped = daemon.stop()
                if stopped not in (0, None):
                    print(f"snpd exited with {stopped}; its log:\n{daemon.log()}")
                    result = result or 1
            if kds is not None:
                kds.stop()
            bus.close()
    return result


def emulated_kds(state_dir: Path) -> Tuple[Child, str]:
    """``snpd-emu kds`` on 127.0.0.1 for the emulator state in ``state_dir`` (made now)."""
    kds = Child([sys.executable, "-m", "snpd.cli.emu", "--emulator-dir", str(state_dir), "kds"],
                stdout=subprocess.PIPE)
    assert kds.proc.stdout is not None
    line = readline(kds.proc.stdout, READY_TIMEOUT)
    match = re.search(r" at (http://127\.0\.0\.1:\d+)", line)
    if match is None:
        kds.stop()
        raise RuntimeError(f"snpd-emu kds did not start: {line or 'no answer'}")
    return kds, match.group(1)


def measure(args: argparse.Namespace, daemon: Daemon, socket_path: Path, bus: str) -> int:
    pid = daemon.pid
    firmware = (f"{args.firmware_ms:g} ms per firmware request" if args.firmware_ms
                else "zero firmware latency")
    print(f"bench/load.py — Python {platform.python_version()}, {os.cpu_count()} CPUs, "
          f"emulator backend ({firmware}), queue max_pending {args.max_pending} "
          f"per_client {args.per_client}; {args.clients} D-Bus clients ({args.greedy} greedy, "
          f"window {args.window}) and {args.clients} varlink clients at once, "
          f"{args.calls} mixed calls each")
    print(f"daemon at READY=1: RSS {rss_kib(pid) / 1024:.1f} MB, {open_fds(pid)} fds, "
          f"{threads(pid)} threads")
    end = time.monotonic() + args.soak * 60 if args.soak else None
    samples: List[Tuple[float, int, int, int]] = []
    failed = 0
    rounds = 0
    began = time.monotonic()
    cpu0 = cpu_seconds(pid)
    while True:
        results, wall = one_round(args, socket_path, bus)
        rounds += 1
        failed += sum(failures(results).values())
        samples.append((time.monotonic() - began, rss_kib(pid), open_fds(pid), threads(pid)))
        if end is None:
            print("\n" + render(results, wall))
            print(f"\n   daemon CPU {cpu_seconds(pid) - cpu0:.1f} s; after the round: "
                  f"RSS {samples[-1][1] / 1024:.1f} MB, {samples[-1][2]} fds, "
                  f"{samples[-1][3]} threads")
            return 1 if failed else 0
        if rounds == 1 or rounds % 10 == 0:
            t, rss, fds, nthreads = samples[-1]
            calls = 2 * args.clients * args.calls
            print(f"   {t / 60:6.1f} min  round {rounds:5d}  RSS {rss / 1024:6.2f} MB  "
                  f"{fds:3d} fds  {nthreads:2d} threads  {calls / wall:6.0f} calls/s  "
                  f"failures so far {failed}", flush=True)
        if time.monotonic() >= end:
            break
    half = next(s for s in samples if s[0] >= samples[-1][0] / 2)
    last = samples[-1]
    growth = last[1] - half[1]
    calls_total = rounds * 2 * args.clients * args.calls
    print(f"\nsoak: {rounds} rounds, {calls_total} calls in {last[0] / 60:.1f} min, "
          f"{failed} failures")
    print(f"   RSS after round 1 {samples[0][1] / 1024:.2f} MB, at half time "
          f"{half[1] / 1024:.2f} MB, at the end {last[1] / 1024:.2f} MB, peak "
          f"{max(s[1] for s in samples) / 1024:.2f} MB")
    print(f"   growth over the second half: {growth:+d} KiB "
          f"({'flat' if abs(growth) <= args.rss_noise else 'GROWS'}, noise ±{args.rss_noise} KiB)"
          f"; fds {half[2]} → {last[2]}; threads {half[3]} → {last[3]}")
    grew = growth > args.rss_noise or last[2] > half[2]
    return 1 if failed or grew else 0


if __name__ == "__main__":
    sys.exit(main())
