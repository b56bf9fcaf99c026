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

FakeService has the Service's signatures and authorization (the real
:class:`snpd.service.Access`), validates the inputs the tests send, and answers
with what it was given, so the tests can see what crossed the wire and who the
transport said the caller was. report_data steers it: ``raise:<Kind>`` raises that
SnpdError, ``crash`` raises a RuntimeError (a bug), ``tcb:<n>`` changes ReportedTcb,
``sev`` changes SevStatus (both notify).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import signal
import sys
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import dbusbus

from snpd import errors
from snpd.access import Access, Caller
from snpd.dbus.gate import Limits
from snpd.dbus.service import (
    ATTESTATION,
    MANAGER,
    CallerIdentity,
    ServerHandle,
    serve,
)
from snpd.service import DEFAULT_VMPL

ERRORS: Dict[str, type] = {
    "InvalidArgument": errors.InvalidArgument,
    "PermissionDenied": errors.PermissionDenied,
    "Busy": errors.Busy,
    "Timeout": errors.Timeout,
    "DeviceError": errors.DeviceError,
    "VmpckDisabled": errors.VmpckDisabled,
    "NotSupported": errors.NotSupported,
    "CertificatesUnavailable": errors.CertificatesUnavailable,
    "Internal": errors.Internal,
}
CERTS = [("ark", b"\x30\x03ARK"), ("ask", b"\x30\x03ASK"), ("vcek", b"\x30\x04VCEK")]
GUEST_FIELDS = ("policy", "image_id", "family_id", "measurement", "guest_svn", "tcb_version")
REPORT_SIZE = 1184


def _options(options: Mapping[str, Any], allowed: Mapping[str, type], what: str
             ) -> Dict[str, Any]:
    for key, value in options.items():
        if key not in allowed:
            raise errors.InvalidArgument(f"{what}: unknown option {key!r}")
        kind = allowed[key]
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, kind):
            raise errors.InvalidArgument(f"{what}: option {key!r} must be {kind.__name__}")
    return dict(options)


def _vmpl(vmpl: int) -> int:
    if vmpl == DEFAULT_VMPL:
        return 0
    if not 0 <= vmpl <= 3:
        raise errors.InvalidArgument(f"vmpl {vmpl} is not 0-3")
    return vmpl


def _describe(value: Any) -> str:
    """The Python shape of a decoded option, e.g. ``list[tuple[str,bytes]]``."""
    if isinstance(value, (list, tuple)):
        inner = ",".join(sorted({_describe(v) for v in value}))
        return f"{type(value).__name__}[{inner}]"
    if isinstance(value, dict):
        inner = ",".join(sorted({f"{_describe(k)}:{_describe(v)}" for k, v in value.items()}))
        return f"dict[{inner}]"
    return type(value).__name__


class FakeService:
    """The Service's API over canned answers (see the module doc)."""

    def __init__(self, access: Access) -> None:
        self.access = access
        self.identity: Optional[CallerIdentity] = None
        self.calls = 0
        self._listeners: List[Callable[[str, Dict[str, object]], None]] = []
        self._props: Dict[str, Dict[str, object]] = {
            ATTESTATION: {"Backend": "emulator", "Product": "Milan", "Vmpl": 0,
                          "ReportedTcb": 0, "State": "ready", "StateReason": ""},
            MANAGER: {"Version": "0.0-fake",
                      "SevStatus": {"snp_active": True, "vmpl": 0, "sysfs_vmpl": None,
                                    "kernel": {"lines": 2, "features": ["SEV", "SNP"]},
                                    "unavailable": []}},
        }

    def subscribe(self, listener: Callable[[str, Dict[str, object]], None]) -> None:
        self._listeners.append(listener)

    def notify(self, interface: str, changed: Dict[str, object]) -> None:
        self._props[interface].update(changed)
        for listener in self._listeners:
            listener(interface, changed)

    def properties(self) -> Dict[str, Dict[str, object]]:
        out = {k: dict(v) for k, v in self._props.items()}
        out[MANAGER]["Statistics"] = {"calls": self.calls}
        return out

    def _enter(self, caller: Caller, what: str) -> None:
        self.calls += 1
        self.access.check_call(caller, what)

    def _report(self, caller: Caller, data: bytes, vmpl: int, options: Mapping[str, Any]
                ) -> bytes:
        if len(data) > 64:
            raise errors.InvalidArgument(f"report_data is {len(data)} bytes; at most 64")
        level = _vmpl(vmpl)
        if data.startswith(b"raise:"):
            kind = data[6:].decode()
            if kind == "DeviceError":
                raise errors.DeviceError("firmware said no", errno=5, fw_error=0x16,
                                         vmm_error=0)
            raise ERRORS[kind](f"fake {kind}")
        if data == b"crash":
            raise RuntimeError("secret detail /srv/private/path")
        if data.startswith(b"tcb:"):
            self.notify(ATTESTATION, {"ReportedTcb": int(data[4:]), "State": "ready"})
            self.notify(MANAGER, {"Statistics": {"calls": self.calls}})
        if data == b"sev":
            self.notify(MANAGER, {"SevStatus": {"snp_active": True, "vmpl": 2, "vmpck": None,
                                                "kernel": {"features": ["SNP"]}}})
        facts = {"uid": caller.uid, "gids": sorted(caller.gids), "pid": caller.pid,
                 "transport": caller.transport, "peer": caller.peer, "vmpl": level,
                 "options": {k: _describe(v) for k, v in options.items()},
                 "cached": self.identity.cached_names() if self.identity else []}
        body = json.dumps(facts).encode()
        return (data.ljust(64, b"\0") + body).ljust(REPORT_SIZE, b"\0")

    async def get_report(self, caller: Caller, report_data: bytes, vmpl: int,
                         options: Mapping[str, Any]) -> bytes:
        self._enter(caller, "GetReport")
        opts = _options(options, {"timeout": float}, "GetReport")
        return self._report(caller, report_data, vmpl, opts)

    async def get_extended_report(self, caller: Caller, report_data: bytes, vmpl: int,
                                  options: Mapping[str, Any]
                                  ) -> Tuple[bytes, List[Tuple[str, bytes]]]:
        self._enter(caller, "GetExtendedReport")
        opts = _options(options, {"timeout": float}, "GetExtendedReport")
        return self._report(caller, report_data, vmpl, opts), list(CERTS)

    async def get_certificates(self, caller: Caller, options: Mapping[str, Any]
                               ) -> List[Tuple[str, bytes]]:
        self._enter(caller, "GetCertificates")
        opts = _options(options, {"crl": bool, "endorser": str}, "GetCertificates")
        return list(CERTS) + ([("crl", b"\x30\x03CRL")] if opts.get("crl") else [])

    async def verify_report(self, caller: Caller, report: bytes, options: Mapping[str, Any]
                            ) -> Dict[str, object]:
        self._enter(caller, "VerifyReport")
        opts = _options(options, {"certificates": list, "at": int, "policy": str,
                                  "product": str}, "VerifyReport")
        pairs = opts.get("certificates", [])
        if not all(isinstance(p, tuple) and len(p) == 2 and isinstance(p[0], str)
                   and isinstance(p[1], bytes) for p in pairs):
            raise errors.InvalidArgument("option 'certificates' must be a(say): (kind, DER)")
        valid = len(report) == REPORT_SIZE
        checks = [("size", "pass" if valid else "fail", f"{len(report)} bytes")]
        checks += [(f"option:{k}", _describe(v), json.dumps(v, default=repr))
                   for k, v in sorted(opts.items())]
        return {"valid": valid, "product": "Milan", "failures": [] if valid else ["size"],
                "checks": checks, "caller_uid": caller.uid}

    async def get_evidence(self, caller: Caller, fmt: str, nonce: bytes,
                           options: Mapping[str, Any]) -> Tuple[str, bytes]:
        self._enter(caller, "GetEvidence")
        _options(options, {"timeout": float}, "GetEvidence")
        if fmt != "trustee":
            raise errors.NotSupported(f"evidence format {fmt!r} is not supported")
        return "application/json", json.dumps({"nonce": nonce.hex()}).encode()

    async def derive_key(self, caller: Caller, root_key: str, fields: Sequence[str], vmpl: int,
                         guest_svn: int, tcb_version: int, options: Mapping[str, Any]
                         ) -> bytes:
        self._enter(caller, "DeriveKey")
        _options(options, {"timeout": float}, "DeriveKey")
        if root_key not in ("vcek", "vmrk"):
            raise errors.InvalidArgument(f"root_key {root_key!r} is not vcek or vmrk")
        if any(f not in GUEST_FIELDS for f in fields):
            raise errors.InvalidArgument("unknown guest field")
        _vmpl(vmpl)
        return hashlib.sha256(f"raw {root_key} {sorted(fields)} {guest_svn} "
                              f"{tcb_version}".encode()).digest()

    async def derive_sealing_key(self, caller: Caller, label: str, fields: Sequence[str],
                                 options: Mapping[str, Any]) -> bytes:
        self._enter(caller, "DeriveSealingKey")
        _options(options, {"timeout": float}, "DeriveSealingKey")
        if not label or len(label.encode()) > 255:
            raise errors.InvalidArgument("label must be 1-255 bytes of UTF-8")
        return hashlib.sha256(f"sealing {caller.uid} {label}".encode()).digest()

    async def refresh_certificates(self, caller: Caller) -> None:
        self._enter(caller, "RefreshCertificates")


async def run_server(address: str, report_gid: int, key_gid: int) -> int:
    fake = FakeService(Access(report_gids=frozenset({report_gid}),
                              key_gids=frozenset({key_gid})))
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
    dbusbus.drop_privileges(args.as_user)
    if args.mode == "serve":
        return asyncio.run(run_server(args.address, args.report_gid, args.key_gid))
    print(json.dumps(asyncio.run(run_calls(args.address, calls))))
    return 0

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
