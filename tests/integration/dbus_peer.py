"""The other end of the D-Bus transport tests, run as a child process of pytest.

``serve``: the real transport (:func:`snpd.dbus.service.serve`) around
:class:`FakeService`, owning org.snpd.Snpd1 as ``--as-user`` (``snpd``; the shipped
policy lets no one else own it). Prints ``READY <unique name>`` once it owns the
name, or ``ERROR <Kind>: <message>`` and exits 3. SIGTERM closes it cleanly.

``call``: reads a JSON list of calls on stdin, makes them on one connection opened
as ``--as-user`` and prints the replies as JSON.

Both start as root, import everything they will need, and only then drop to the
user (initgroups, setgid, setuid) and connect: the bus authenticates the process
as it is when it connects, and the interpreter may live where the test users
cannot read it.

The service is tests/doubles.py's FakeService, with the production access table
(see there for how report_data steers it).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import json
import signal
import sys
from pathlib import Path
from typing import Any, Dict, List, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import dbusbus
from doubles import FakeService, make_certificates

from snpd import errors
from snpd.access import Access
from snpd.dbus.gate import Limits
from snpd.dbus.service import ServerHandle, serve
from snpd.trust.certset import CertificateSet


async def run_server(address: str, report_gid: int, key_gid: int,
                     certificates: CertificateSet) -> int:
    fake = FakeService(Access(report_gids=frozenset({report_gid}),
                              key_gids=frozenset({key_gid})), certificates=certificates)
    try:
        # Loose bounds: these tests pipeline 32 first calls on one connection; the
        # daemon's own bounds are tested through the daemon (test_attack_dbus.py).
        handle: ServerHandle = await serve(fake, address or None,
                                           limits=Limits(per_connection=64))
    except errors.SnpdError as exc:
        print(f"ERROR {exc.kind}: {exc}", flush=True)
        return 3
    fake.identity = handle.identity
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    print(f"READY {handle.unique_name}", flush=True)
    closed = asyncio.ensure_future(handle.wait_closed())
    stopping = asyncio.ensure_future(stop.wait())
    await asyncio.wait([closed, stopping], return_when=asyncio.FIRST_COMPLETED)
    stopping.cancel()
    await handle.close()
    with contextlib.suppress(asyncio.CancelledError):
        await stopping
    await closed
    return 0


async def run_calls(address: str, calls: List[Any]) -> List[Dict[str, Any]]:
    bus = await dbusbus.connect(address)
    try:
        replies = await dbusbus.call_on(bus, [tuple(dbusbus.from_json(c)) for c in calls])
    finally:
        await dbusbus.disconnect(bus)
    return [dbusbus.to_json(vars(r)) for r in replies]


def main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=["serve", "call"])
    parser.add_argument("--address", required=True)
    parser.add_argument("--as-user", required=True)
    parser.add_argument("--report-gid", type=int, default=-1)
    parser.add_argument("--key-gid", type=int, default=-1)
    args = parser.parse_args(argv)
    calls = json.load(sys.stdin) if args.mode == "call" else []
    # Made (and the modules certificate parsing loads imported) before dropping to a
    # user that may not read the interpreter's library.
    certificates = make_certificates() if args.mode == "serve" else CertificateSet()
    datetime.datetime.strptime("2026", "%Y")
    dbusbus.drop_privileges(args.as_user)
    if args.mode == "serve":
        return asyncio.run(run_server(args.address, args.report_gid, args.key_gid,
                                      certificates))
    print(json.dumps(asyncio.run(run_calls(args.address, calls))))
    return 0

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
