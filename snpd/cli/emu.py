"""snpd-emu: the emulator's tools. ``init`` creates or shows an emulator state
directory; ``kds`` serves its certificates like AMD's KDS on 127.0.0.1; ``vtpm``
serves an Azure-style vTPM (swtpm behind the emulated paravisor) on a unix socket.

    snpd-emu kds --port 8080 --emulator-dir /var/lib/snpd/emulator \\
        --fault status=429,retry_after=1,count=2
    snpd-emu vtpm --socket /run/snpd-vtpm.sock
"""

from __future__ import annotations

import argparse
import datetime
import json
import signal
import sys
import threading
from pathlib import Path
from typing import Optional, Sequence, TextIO

from snpd.device.select import EMULATOR_TOML, default_emulator_dir, read_emulator_config
from snpd.emulator.firmware import Firmware
from snpd.emulator.kds import kds_store
from snpd.emulator.kds_faults import parse_fault
from snpd.emulator.kds_server import KdsServer
from snpd.emulator.paravisor import Paravisor, provision
from snpd.emulator.state import EmulatorState
from snpd.emulator.swtpm import SocketChannel, SwtpmProcess
from snpd.errors import SnpdError
from snpd.files import atomic_write


def _state(args: argparse.Namespace) -> EmulatorState:
    directory = Path(args.emulator_dir) if args.emulator_dir else default_emulator_dir()
    config = read_emulator_config(directory / EMULATOR_TOML)
    return EmulatorState.load_or_create(
        directory, config, now=lambda: datetime.datetime.now(datetime.timezone.utc))


def cmd_init(args: argparse.Namespace, out: TextIO) -> int:
    state = _state(args)
    doc = {"state_dir": str(state.state_dir), "product": state.config.product.value,
           "certs_dir": str(state.certs_dir), "ark_sha256": state.ark.sha256,
           "reported_tcb": f"0x{state.config.tcb('reported').raw:016x}"}
    if args.json:
        json.dump(doc, out, indent=2)
        out.write("\n")
    else:
        for key, value in doc.items():
            print(f"{key}: {value}", file=out)
    return 0


def cmd_kds(args: argparse.Namespace, out: TextIO) -> int:
    faults = [parse_fault(spec) for spec in args.fault]
    state = _state(args)
    server = KdsServer(kds_store(state), port=args.port)
    for fault, count in faults:
        server.faults.push(fault, count=count)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    with server:
        print(f"emulated KDS for {state.config.product} at {server.url} "
              f"(emulator {state.state_dir})", file=out, flush=True)
        if args.url_file:  # whole or absent for a poller, and no link followed
            atomic_write(Path(args.url_file), (server.url + "\n").encode())
        stop.wait()
    return 0


def cmd_vtpm(args: argparse.Namespace, out: TextIO) -> int:
    """swtpm as a child, provisioned as an Azure vTPM, behind the paravisor's socket,
    until SIGTERM or SIGINT; swtpm is stopped and reaped on every way out."""
    state = _state(args)
    swtpm_dir = Path(args.swtpm_state) if args.swtpm_state else state.state_dir / "vtpm"
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    firmware = Firmware(state)
    with SwtpmProcess(swtpm_dir) as swtpm, SocketChannel(swtpm.socket_path) as upstream:
        provisioned = provision(upstream, firmware)
        with Paravisor(upstream, firmware, provisioned, Path(args.socket)) as paravisor:
            print(f"emulated Azure vTPM at unix:{paravisor.socket_path} (swtpm pid "
                  f"{swtpm.pid}, state {swtpm_dir}; emulator {state.state_dir})",
                  file=out, flush=True)
            stop.wait()
    return 0


def main(argv: Optional[Sequence[str]] = None, *, stdout: TextIO = sys.stdout,
         stderr: TextIO = sys.stderr) -> int:
    parser = argparse.ArgumentParser(prog="snpd-emu", description=__doc__.splitlines()[0])
    parser.add_argument("--emulator-dir", metavar="DIR", help="emulator state directory")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    p = sub.add_parser("init", help="create (or load) the emulator state and show it")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_init)
    p = sub.add_parser("kds", help="serve the emulator's certificates like AMD's KDS")
    p.add_argument("--port", type=int, default=0, help="TCP port on 127.0.0.1 (0: any free)")
    p.add_argument("--fault", action="append", default=[], metavar="SPEC",
                   help="inject a fault: status=429,retry_after=1,count=3 | status=500 | "
                        "hang[=S] | truncate | latency=S (count=all for every request)")
    p.add_argument("--url-file", metavar="FILE", help="write the server's URL here once up")
    p.set_defaults(func=cmd_kds)
    p = sub.add_parser("vtpm", help="serve an Azure-style vTPM: swtpm behind the emulated "
                                    "paravisor (HCL report at NV 0x01400001)")
    p.add_argument("--socket", required=True, metavar="PATH",
                   help="the unix socket to serve raw TPM commands on")
    p.add_argument("--swtpm-state", metavar="DIR",
                   help="swtpm's state directory (default: vtpm/ in the emulator directory)")
    p.set_defaults(func=cmd_vtpm)
    for sp in sub.choices.values():
        sp.add_argument("--emulator-dir", metavar="DIR", default=argparse.SUPPRESS)
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:
        return int(exc.code or 0)
    try:
        result: int = args.func(args, stdout)
        return result
    except SnpdError as exc:
        print(f"snpd-emu: {exc}", file=stderr)
        return exc.exit_code
    except OSError as exc:
        print(f"snpd-emu: {exc}", file=stderr)
        return 3




if __name__ == "__main__":
    sys.exit(main())
