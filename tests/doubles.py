"""The test doubles of snpd's service, shared by unit and integration tests.

:class:`FakeService` implements :class:`snpd.service.ServiceAPI` over canned answers,
with the production access table (:data:`snpd.access.METHODS`, through
:class:`snpd.access.Access`), so no test can grant what the daemon refuses. It
records every call (the typed values the transport built) and its caller, so a
transport test sees exactly what crossed the wire and who the transport said was
calling.

``report_data`` steers GetReport / GetExtendedReport: ``raise:<Kind>`` raises that
SnpdError, ``crash`` raises a RuntimeError (a bug), ``tcb:<n>`` changes
reported_tcb, ``sev`` changes sev_status, ``binding:<value>`` report_data (what
REPORT_DATA binds; all three notify), ``block`` waits until
:meth:`FakeService.release`. ``fail`` makes every call (and properties) raise it.
The report itself is report_data padded to 64 bytes, then a JSON document of what
the service was given (caller, vmpl, timeout), padded to 1184 bytes.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime
import hashlib
import json
import threading
from typing import Any, Dict, List, Mapping, Optional, Tuple

from snpd import errors
from snpd.abi.product import Product
from snpd.access import Access, Caller
from snpd.service import (
    CertificateOptions,
    Evidence,
    ExtendedReport,
    KeyRequest,
    Listener,
    Properties,
    ReportOptions,
    SealingKeyRequest,
    VerifyOptions,
)
from snpd.trust.certset import CertificateSet
from snpd.trust.result import Check, Verdict

REPORT_SIZE = 1184
ERRORS: Dict[str, type] = {
    "InvalidArgument": errors.InvalidArgument,
    "PermissionDenied": errors.PermissionDenied,
    "Busy": errors.Busy,
    "Timeout": errors.Timeout,
    "DeviceError": errors.DeviceError,
    "VmpckDisabled": errors.VmpckDisabled,
    "NotSupported": errors.NotSupported,
    "CertificatesUnavailable": errors.CertificatesUnavailable,
    "KbsError": errors.KbsError,
    "Internal": errors.Internal,
}
# The name each FakeService method records, and the access-table name it checks.
_METHODS = {
    "get_report": "GetReport", "get_extended_report": "GetExtendedReport",
    "get_certificates": "GetCertificates", "verify_report": "VerifyReport",
    "verify_evidence": "VerifyEvidence",
    "get_evidence": "GetEvidence", "derive_key": "DeriveKey",
    "derive_sealing_key": "DeriveSealingKey", "refresh_certificates": "RefreshCertificates",
    "get_resource": "GetResource", "get_token": "GetToken",
}


def make_certificates(product: Product = Product.MILAN) -> CertificateSet:
    """A real (emulator-signed) ARK and ASK, small keys: what a transport carries."""
    from snpd.emulator.pki import make_chain

    chain = make_chain(product, now=datetime.datetime(2026, 1, 1,
                                                      tzinfo=datetime.timezone.utc),
                       rsa_bits=2048)
    return CertificateSet(ark=chain.ark, ask=chain.ask)


def initial_properties() -> Properties:
    return Properties(backend="emulator", report_data="caller", product=Product.MILAN,
                      vmpl=0, reported_tcb=0,
                      state="ready", state_reason="", version="0.0-fake",
                      sev_status={"snp_active": True, "vmpl": 0, "sysfs_vmpl": None,
                                  "kernel": {"lines": 2, "features": ["SEV", "SNP"]},
                                  "unavailable": []},
                      statistics={})


class FakeService:
    """:class:`snpd.service.ServiceAPI` over canned answers (see the module doc)."""

    def __init__(self, access: Optional[Access] = None, *,
                 certificates: Optional[CertificateSet] = None) -> None:
        self.access = access or Access()
        self.certificates = certificates if certificates is not None else CertificateSet()
        self.calls: List[Tuple[str, Tuple[Any, ...]]] = []
        self.callers: List[Caller] = []
        self.fail: Optional[BaseException] = None
        self.identity: Any = None  # the D-Bus transport's CallerIdentity, when served
        self.entered = threading.Event()
        self.loop: Optional[asyncio.AbstractEventLoop] = None
        self._release: Optional[asyncio.Event] = None
        self._listeners: List[Listener] = []
        self._props = initial_properties()

    # -- plumbing -----------------------------------------------------------------------

    def check(self, caller: Caller, method: str) -> None:
        self.access.check_call(caller, method)

    def subscribe(self, listener: Listener) -> None:
        self._listeners.append(listener)

    def notify(self, changed: Mapping[str, object]) -> None:
        self._props = dataclasses.replace(self._props, **changed)  # type: ignore[arg-type]
        for listener in self._listeners:
            listener(dict(changed))

    def properties(self, caller: Optional[Caller] = None) -> Properties:
        if caller is not None:
            self.access.check_call(caller, "GetProperties")
        if self.fail is not None:
            raise self.fail
        return dataclasses.replace(self._props, statistics={"calls": len(self.calls)})

    def release(self) -> None:
        """Let a ``block`` call finish (from any thread)."""
        assert self.loop is not None and self._release is not None
        self.loop.call_soon_threadsafe(self._release.set)

    async def _enter(self, name: str, caller: Caller, *args: Any) -> None:
        self.calls.append((name, args))
        self.callers.append(caller)
        self.access.check_call(caller, _METHODS[name])
        if self.fail is not None:
            raise self.fail

    async def _report(self, caller: Caller, data: bytes, vmpl: Optional[int],
                      options: ReportOptions) -> bytes:
        if len(data) > 64:
            raise errors.InvalidArgument(f"report_data is {len(data)} bytes; at most 64")
        if vmpl is not None and not 0 <= vmpl <= 3:
            raise errors.InvalidArgument(f"vmpl {vmpl} is not 0-3")
        if data.startswith(b"raise:"):
            kind = data[6:].decode()
            if kind == "DeviceError":
                raise errors.DeviceError("firmware said no", errno=5, fw_error=0x16,
                                         vmm_error=0)
            raise ERRORS[kind](f"fake {kind}")
        if data == b"crash":
            raise RuntimeError("secret detail /srv/private/path")
        if data == b"block":
            self.loop = asyncio.get_running_loop()
            self._release = asyncio.Event()
            self.entered.set()
            await self._release.wait()
        if data.startswith(b"tcb:"):
            self.notify({"reported_tcb": int(data[4:]), "state": "ready"})
            self.notify({"statistics": {"calls": len(self.calls)}})
        if data.startswith(b"binding:"):
            self.notify({"report_data": data[8:].decode()})
        if data == b"sev":
            self.notify({"sev_status": {"snp_active": True, "vmpl": 2, "vmpck": None,
                                        "kernel": {"features": ["SNP"]}}})
        facts = {"uid": caller.uid, "gids": sorted(caller.gids), "pid": caller.pid,
                 "transport": caller.transport, "peer": caller.peer,
                 "vmpl": 0 if vmpl is None else vmpl, "own_vmpl": vmpl is None,
                 "timeout": options.timeout,
                 "cached": self.identity.cached_names() if self.identity else []}
        body = json.dumps(facts).encode()
        return (data.ljust(64, b"\0") + body).ljust(REPORT_SIZE, b"\0")

    # -- the service's methods ----------------------------------------------------------

    async def get_report(self, caller: Caller, report_data: bytes, vmpl: Optional[int],
                         options: ReportOptions) -> bytes:
        await self._enter("get_report", caller, report_data, vmpl, options)
        return await self._report(caller, report_data, vmpl, options)

    async def get_extended_report(self, caller: Caller, report_data: bytes,
                                  vmpl: Optional[int], options: ReportOptions
                                  ) -> ExtendedReport:
        await self._enter("get_extended_report", caller, report_data, vmpl, options)
        return ExtendedReport(await self._report(caller, report_data, vmpl, options),
                              self.certificates)

    async def get_certificates(self, caller: Caller, options: CertificateOptions
                               ) -> CertificateSet:
        await self._enter("get_certificates", caller, options)
        return self.certificates

    async def verify_report(self, caller: Caller, report: bytes, options: VerifyOptions
                            ) -> Verdict:
        """Valid when the report has the right size; one check per option given, its
        detail what arrived, so a transport test sees the decoded options."""
        await self._enter("verify_report", caller, report, options)
        valid = len(report) == REPORT_SIZE
        checks = [Check.passed("size", f"{len(report)} bytes") if valid
                  else Check.failed("size", f"{len(report)} bytes")]
        certs = options.certificates
        kinds = ",".join(k for k, _ in certs.items())
        given = {"certificates": (f"kinds=[{kinds}] defects={len(certs.defects)}"
                                  if kinds or certs.defects else None),
                 "at": str(int(options.at.timestamp())) if options.at else None,
                 "policy": options.policy,
                 "product": options.product.value if options.product else None}
        checks += [Check.skipped(f"option:{k}", v) for k, v in sorted(given.items())
                   if v is not None]
        return Verdict(tuple(checks), product=Product.MILAN)

    async def verify_evidence(self, caller: Caller, fmt: str, evidence: bytes, nonce: bytes,
                              options: VerifyOptions) -> Verdict:
        """Valid when the evidence is the nonce reversed; the detail shows what arrived."""
        await self._enter("verify_evidence", caller, fmt, evidence, nonce, options)
        if fmt != "az-snp-vtpm":
            raise errors.NotSupported(f"evidence format {fmt!r} cannot be verified")
        ok = evidence == nonce[::-1]
        detail = f"format={fmt} evidence={len(evidence)} nonce={len(nonce)} " \
                 f"policy={options.policy}"
        # Verdict.valid needs a passed report.signature: the double signs nothing.
        return Verdict((Check.passed("evidence", detail), Check.passed("report.signature",
                                                                      "the double's")) if ok
                       else (Check.failed("evidence", detail),), product=Product.MILAN)

    async def get_evidence(self, caller: Caller, fmt: str, nonce: bytes,
                           options: ReportOptions) -> Evidence:
        await self._enter("get_evidence", caller, fmt, nonce, options)
        if fmt != "trustee":
            raise errors.NotSupported(f"evidence format {fmt!r} is not supported")
        return Evidence("application/json", json.dumps({"nonce": nonce.hex()}).encode())

    async def derive_key(self, caller: Caller, request: KeyRequest, options: ReportOptions
                         ) -> bytes:
        await self._enter("derive_key", caller, request, options)
        return hashlib.sha256(f"raw {request}".encode()).digest()

    async def derive_sealing_key(self, caller: Caller, request: SealingKeyRequest,
                                 options: ReportOptions) -> bytes:
        await self._enter("derive_sealing_key", caller, request, options)
        return hashlib.sha256(f"sealing {caller.uid} {request.label}".encode()).digest()

    async def refresh_certificates(self, caller: Caller) -> None:
        await self._enter("refresh_certificates", caller)

    async def get_resource(self, caller: Caller, kbs: str, path: str) -> bytes:
        await self._enter("get_resource", caller, kbs, path)
        return f"resource {kbs} {path}".encode()

    async def get_token(self, caller: Caller, kbs: str) -> str:
        await self._enter("get_token", caller, kbs)
        return f"token.{kbs}.fake"

