"""The transport-agnostic service: one method per operation, caller identity in,
typed result or typed error out.

D-Bus and varlink both call exactly these coroutines; neither holds business
logic, and adding a transport never touches this module. Every method checks
the caller's authorization itself (deny by default), validates every argument
and option, and never logs report_data, keys or full chip IDs.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import datetime
import struct
from typing import (
    TYPE_CHECKING,
    Any,
    Callable,
    Dict,
    List,
    Mapping,
    Optional,
    Sequence,
    Tuple,
    TypeVar,
)

from snpd import __version__
from snpd.abi.product import Endorser, Product
from snpd.abi.report import REPORT_DATA_SIZE, AttestationReport
from snpd.abi.tcb import TcbVersion
from snpd.abi.uapi import GUEST_FIELDS, DerivedKeyRequest
from snpd.access import Access, Caller
from snpd.errors import (
    Busy,
    CertificateFormatError,
    CertificatesUnavailable,
    InvalidArgument,
    NotSupported,
    PermissionDenied,
    SnpdError,
)
from snpd.kds.budget import KdsBudget
from snpd.trust.certset import CertificateSet
from snpd.trust.verify import Verifier

if TYPE_CHECKING:
    from snpd.broker import Broker
    from snpd.events import Events
    from snpd.kds.cache import CertificateCache, FetchGate
    from snpd.trust.appraisal import AppraisalPolicy

_T = TypeVar("_T")

DEFAULT_VMPL = 0xFFFFFFFF  # "the guest's own VMPL" on the wire (D-Bus ``u`` has no null)
MAX_LABEL = 255
SEALING_SALT = b"snpd sealing key v2"
DEFAULT_SEALING_FIELDS = ("measurement", "policy")
SEALING_VMPL = 3
"""The VMPL of the firmware key that sealing keys are derived from. DeriveKey refuses
it to everyone but root, so no caller of DeriveKey can reproduce a sealing root."""
CertificateList = List[Tuple[str, bytes]]


def _options(options: Mapping[str, Any], allowed: Mapping[str, type], what: str
             ) -> Dict[str, Any]:
    """Validate an ``a{sv}`` options dict: known keys, right types; unknown keys are errors."""
    out: Dict[str, Any] = {}
    for key, value in options.items():
        if key not in allowed:
            known = ", ".join(sorted(allowed)) or "none"
            raise InvalidArgument(f"{what}: unknown option {key!r} (known: {known})")
        kind = allowed[key]
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise InvalidArgument(f"{what}: option {key!r} must be {kind.__name__}, got "
                                  f"{type(value).__name__}")
        out[key] = value
    return out


def _bytes(value: object, what: str, *, max_len: int) -> bytes:
    if not isinstance(value, (bytes, bytearray, memoryview)):
        raise InvalidArgument(f"{what} must be bytes")
    data = bytes(value)
    if len(data) > max_len:
        raise InvalidArgument(f"{what} is {len(data)} bytes; at most {max_len}")
    return data


class Service:
    """The daemon's API. Construct once; share between transports."""

    def __init__(
        self,
        *,
        broker: Broker,
        access: Access,
        events: Events,
        cache: Optional[CertificateCache] = None,
        verifier: Optional[Verifier] = None,
        policies: Optional[Mapping[str, AppraisalPolicy]] = None,
        guest_vmpl: int = 0,
        backend: str = "",
        sev_status: Optional[Mapping[str, object]] = None,
        product_hint: Optional[Product] = None,
        product_hint_source: str = "",
        request_timeout: float = 30.0,
        clock: Callable[[], float] = lambda: asyncio.get_running_loop().time(),
        kds_budget: Optional[KdsBudget] = None,
        kds_workers: int = 4,
    ) -> None:
        self.broker = broker
        self.access = access
        self.events = events
        self.cache = cache
        self.verifier = verifier or Verifier()
        self.policies = dict(policies or {})
        self.guest_vmpl = guest_vmpl
        self.backend = backend
        self.sev_status = dict(sev_status or {})
        # What names the product before a report does (the emulator's configuration,
        # or CPUID from /proc/cpuinfo): shown by the Product property and the status
        # texts only; certificates go by ``product``, which only reports set.
        self.product_hint = product_hint
        self.product_hint_source = product_hint_source
        self.request_timeout = request_timeout
        self._clock = clock
        self.product: Optional[Product] = None
        self.reported_tcb: int = 0
        self._chip_id: Optional[bytes] = None
        self._listeners: List[Callable[[str, Dict[str, object]], None]] = []
        # Work that may contact the KDS runs in its own small pool, so that a slow or
        # throttling KDS never delays cache answers and verification (the loop's
        # default pool); each uid's share of it is bounded by the budget.
        self.kds_budget = kds_budget or KdsBudget()
        self._kds_pool = concurrent.futures.ThreadPoolExecutor(
            max_workers=kds_workers, thread_name_prefix="snpd-kds")

    # -- plumbing ---------------------------------------------------------------------

    def subscribe(self, listener: Callable[[str, Dict[str, object]], None]) -> None:
        """``listener(interface, changed_properties)`` for PropertiesChanged."""
        self._listeners.append(listener)

    def notify(self, interface: str, changed: Dict[str, object]) -> None:
        for listener in list(self._listeners):
            listener(interface, changed)

    def _deadline(self, opts: Mapping[str, Any]) -> float:
        timeout = opts.get("timeout", self.request_timeout)
        if not 0 < timeout <= 600:
            raise InvalidArgument("option 'timeout' must be in (0, 600] seconds")
        return float(self._clock() + timeout)

    def _vmpl(self, vmpl: int) -> int:
        if vmpl == DEFAULT_VMPL:
            return self.guest_vmpl
        if not isinstance(vmpl, int) or not 0 <= vmpl <= 3:
            raise InvalidArgument(f"vmpl {vmpl} is not 0-3 (or {DEFAULT_VMPL} for the "
                                  "guest's own)")
        return vmpl

    def _learn(self, report: bytes) -> AttestationReport:
        """Remember the platform's product and TCB from a report the firmware produced."""
        parsed = AttestationReport.from_bytes(report)
        product = parsed.cpuid_product or self.product
        changed: Dict[str, object] = {}
        if product is not None and product is not self.product:
            self.product = product
            changed["Product"] = product.value
        if parsed.reported_tcb != self.reported_tcb:
            self.reported_tcb = parsed.reported_tcb
            changed["ReportedTcb"] = parsed.reported_tcb
        self._chip_id = parsed.chip_id
        if changed:
            self.notify("org.snpd.Snpd1.Attestation", changed)
        return parsed

    async def _firmware(self, caller: Caller, op: str, *args: object,
                        deadline: float) -> Any:
        try:
            return await self.broker.submit(caller.client_key, op, *args, deadline=deadline,
                                            user=caller.uid, reserved=caller.uid == 0)
        except SnpdError as exc:
            self.events.request_failed(caller, op, exc)
            raise

    # -- Attestation ----------------------------------------------------------------------

    async def get_report(self, caller: Caller, report_data: bytes, vmpl: int,
                         options: Mapping[str, Any]) -> bytes:
        self.access.check_call(caller, "GetReport")
        opts = _options(options, {"timeout": float}, "GetReport")
        data = _bytes(report_data, "report_data", max_len=REPORT_DATA_SIZE)
        level = self._vmpl(vmpl)
        report: bytes = await self._firmware(caller, "report", data.ljust(REPORT_DATA_SIZE,
                                                                          b"\0"), level,
                                             deadline=self._deadline(opts))
        self.events.report_issued(caller, level, self._learn(report), self.product)
        return report

    async def get_extended_report(self, caller: Caller, report_data: bytes, vmpl: int,
                                  options: Mapping[str, Any]) -> Tuple[bytes, CertificateList]:
        self.access.check_call(caller, "GetExtendedReport")
        opts = _options(options, {"timeout": float}, "GetExtendedReport")
        data = _bytes(report_data, "report_data", max_len=REPORT_DATA_SIZE)
        level = self._vmpl(vmpl)
        extended = await self._firmware(caller, "extended_report",
                                        data.ljust(REPORT_DATA_SIZE, b"\0"), level,
                                        deadline=self._deadline(opts))
        report: bytes = extended.report
        parsed = self._learn(report)
        self.events.report_issued(caller, level, parsed, self.product)
        certs = await self._certificates_for(caller, parsed, extended.certificates)
        return report, certs

    # -- certificates: cache first, then the KDS within the caller's budget ---------------

    async def _local(self, work: Callable[[], _T]) -> _T:
        """CPU work and cache-only lookups: the loop's default pool, where nothing
        waits on the network."""
        return await asyncio.get_running_loop().run_in_executor(None, work)

    async def _lookup(self, caller: Caller, op: str,
                      lookup: Callable[[Optional[FetchGate]], CertificateSet]
                      ) -> CertificateSet:
        """``lookup(gate)`` answered from the caches alone when it can be (no KDS pool,
        no budget); otherwise in the KDS pool, admitted by the caller's budget, each
        outbound fetch gated by it. A refusal is a KdsBudgetExceeded (Busy), logged."""
        from snpd.kds.cache import NotCached, cache_only

        try:
            return await self._local(lambda: lookup(cache_only))
        except NotCached:
            pass
        budget = self.kds_budget
        try:
            release = budget.admit(caller.uid)
            try:
                future = self._kds_pool.submit(lookup, budget.gate(caller.uid))
            except BaseException:
                release()
                raise
            # Released when the work ends, or is cancelled before it starts (a caller
            # that went away must not keep its share).
            future.add_done_callback(lambda _done: release())
            return await asyncio.wrap_future(future)
        except Busy as exc:
            self.events.request_failed(caller, op, exc)
            raise

    def close(self) -> None:
        """Stop the KDS pool: queued lookups are cancelled, running ones end by the KDS
        client's deadline without being waited for."""
        self._kds_pool.shutdown(wait=False, cancel_futures=True)

    async def _certificates_for(self, caller: Caller, report: AttestationReport,
                                table: Sequence[object]) -> CertificateList:
        """The host's table when it verifies, else the verified cache / KDS."""
        endorser = Endorser.VLEK if report.signing_key == 1 else Endorser.VCEK
        product = report.cpuid_product or self.product
        if table:
            try:
                certs = CertificateSet.from_table(table)  # type: ignore[arg-type]
                verdict = await self._local(
                    lambda: self.verifier.verify(report, certs, product=product))
                if verdict.valid:
                    return _as_list(certs)
                self.events.certificate_rejected("host table", ", ".join(
                    c.name for c in verdict.failures))
            except CertificateFormatError as exc:
                self.events.certificate_rejected("host table", str(exc))
        cache = self.cache
        if cache is None or product is None:
            return []
        tcb = TcbVersion.decode(report.reported_tcb, product)
        chip = None if report.chip_id_masked else report.chip_id
        try:
            certs = await self._lookup(caller, "GetExtendedReport", lambda gate: (
                cache.certificates(product, endorser, chip_id=chip, tcb=tcb, gate=gate)))
        except Busy:
            return []  # the report is worth more than its certificates; refusal logged
        except CertificatesUnavailable as exc:
            self.events.certificate_rejected("cache/KDS", str(exc))
            return []
        return _as_list(certs)

    async def get_certificates(self, caller: Caller, options: Mapping[str, Any]
                               ) -> CertificateList:
        self.access.check_call(caller, "GetCertificates")
        opts = _options(options, {"crl": bool, "endorser": str}, "GetCertificates")
        if self.cache is None:
            raise CertificatesUnavailable("no certificate cache is configured")
        if self.product is None:
            await self.get_report(caller, b"", DEFAULT_VMPL, {})
        product = self.product
        if product is None:
            raise CertificatesUnavailable("the platform's product is unknown (v2 firmware?)")
        try:
            endorser = Endorser(opts.get("endorser", "vcek"))
        except ValueError:
            raise InvalidArgument("option 'endorser' must be vcek or vlek") from None
        chip = self._chip_id if endorser is Endorser.VCEK and self._chip_id and any(
            self._chip_id) else None
        tcb = TcbVersion.decode(self.reported_tcb, product) if chip else None
        cache = self.cache
        certs = await self._lookup(caller, "GetCertificates", lambda gate: cache.certificates(
            product, endorser, chip_id=chip, tcb=tcb, with_crl=opts.get("crl", False),
            gate=gate))
        return _as_list(certs)

    async def verify_report(self, caller: Caller, report: bytes, options: Mapping[str, Any]
                            ) -> Dict[str, object]:
        self.access.check_call(caller, "VerifyReport")
        opts = _options(options, {"certificates": list, "at": int, "policy": str,
                                  "product": str}, "VerifyReport")
        data = _bytes(report, "report", max_len=4096)
        policy = None
        if "policy" in opts:
            policy = self.policies.get(opts["policy"])
            if policy is None:
                raise InvalidArgument(f"no policy named {opts['policy']!r} is configured "
                                      f"(known: {', '.join(sorted(self.policies)) or 'none'})")
        at = None
        if "at" in opts:
            try:
                at = datetime.datetime.fromtimestamp(opts["at"], datetime.timezone.utc)
            except (OverflowError, OSError, ValueError):
                raise InvalidArgument("option 'at' is not a valid unix time") from None
        product = None
        if "product" in opts:
            try:
                product = Product.parse(opts["product"])
            except ValueError as exc:
                raise InvalidArgument(str(exc)) from None
        certs = CertificateSet()
        if "certificates" in opts:
            pairs = opts["certificates"]
            if not all(isinstance(p, (tuple, list)) and len(p) == 2 and isinstance(p[0], str)
                       and isinstance(p[1], (bytes, bytearray)) for p in pairs):
                raise InvalidArgument("option 'certificates' must be a(say): (kind, DER)")
            certs = CertificateSet.from_kinds((k, bytes(v)) for k, v in pairs)
        verdict = await self._verify(caller, data, certs, at, policy, product)
        if not verdict.valid:
            self.events.verification_failed(caller, [c.name for c in verdict.failures])
        return {
            "valid": verdict.valid,
            "product": verdict.product.value if verdict.product else "",
            "failures": [c.name for c in verdict.failures],
            "checks": [(c.name, c.status.value, c.detail) for c in verdict.checks],
        }

    async def _verify(self, caller: Caller, report: bytes, certs: CertificateSet,
                      at: Optional[datetime.datetime], policy: Optional[AppraisalPolicy],
                      product: Optional[Product]) -> Any:
        """Fill gaps in the caller's certificates from the cache (or the KDS, within the
        caller's budget: beyond it the call fails Busy), then verify."""
        cache = self.cache
        if cache is not None and len(report) == 0x4A0:
            try:
                parsed = AttestationReport.from_bytes(report)
                found = parsed.cpuid_product or product
                if found is not None:
                    endorser = Endorser.VLEK if parsed.signing_key == 1 else Endorser.VCEK
                    need_leaf = certs.leaf(endorser) is None and endorser is Endorser.VCEK \
                        and not parsed.chip_id_masked
                    chip = parsed.chip_id if need_leaf else None
                    tcb = TcbVersion.decode(parsed.reported_tcb, found) if need_leaf else None
                    cached = await self._lookup(caller, "VerifyReport", lambda gate: (
                        cache.certificates(found, endorser, chip_id=chip, tcb=tcb,
                                           gate=gate)))
                    certs = certs.merged(cached)
            except Busy:
                raise  # throttled, not invalid: the caller retries later
            except SnpdError:
                pass  # verification then reports exactly what is missing
        return await self._local(lambda: self.verifier.verify(report, certs, at=at,
                                                              policy=policy, product=product))

    async def get_evidence(self, caller: Caller, fmt: str, nonce: bytes,
                           options: Mapping[str, Any]) -> Tuple[str, bytes]:
        self.access.check_call(caller, "GetEvidence")
        opts = _options(options, {"timeout": float}, "GetEvidence")
        from snpd.evidence import FORMATS, TRUSTEE_MEDIA_TYPE, trustee_evidence

        if fmt not in FORMATS:
            raise NotSupported(f"evidence format {fmt!r} is not supported "
                               f"(supported: {', '.join(FORMATS)})")
        report, certs = await self.get_extended_report(caller, nonce, DEFAULT_VMPL, opts)
        parsed = AttestationReport.from_bytes(report)
        product = parsed.cpuid_product or self.product
        if product is None:
            raise NotSupported("Trustee evidence needs a v3+ report naming its CPU")
        leaf = [(k, d) for k, d in certs if k in ("vcek", "vlek")]
        return TRUSTEE_MEDIA_TYPE, trustee_evidence(parsed, product, leaf)

    # -- Keys -----------------------------------------------------------------------------------

    async def derive_key(self, caller: Caller, root_key: str, fields: Sequence[str], vmpl: int,
                         guest_svn: int, tcb_version: int, options: Mapping[str, Any]) -> bytes:
        self.access.check_call(caller, "DeriveKey")
        opts = _options(options, {"timeout": float}, "DeriveKey")
        level = self._vmpl(vmpl)
        if level == SEALING_VMPL and caller.uid != 0:
            raise PermissionDenied(f"firmware keys of VMPL {SEALING_VMPL} are reserved for "
                                   "sealing keys (DeriveSealingKey); only root may derive "
                                   "them raw")
        request = DerivedKeyRequest.from_fields(root_key, _names(fields), vmpl=level,
                                                guest_svn=guest_svn, tcb_version=tcb_version)
        key: bytes = await self._firmware(caller, "derived_key", request,
                                          deadline=self._deadline(opts))
        self.events.key_derived(caller, "raw", request.fields)
        return key

    async def derive_sealing_key(self, caller: Caller, label: str, fields: Sequence[str],
                                 options: Mapping[str, Any]) -> bytes:
        """HKDF over a VCEK-rooted firmware key, bound to the caller's uid and label, so two
        local users or applications never obtain the same key.

        The firmware key is requested at :data:`SEALING_VMPL`, which DeriveKey refuses
        to everyone but root: a member of the key groups can no more compute the
        root than anyone else, and the HKDF inputs (uid, label) being public does
        not matter. snpd(8) gives the whole argument."""
        self.access.check_call(caller, "DeriveSealingKey")
        opts = _options(options, {"timeout": float}, "DeriveSealingKey")
        if not isinstance(label, str) or not label or len(label.encode()) > MAX_LABEL:
            raise InvalidArgument(f"label must be 1-{MAX_LABEL} bytes of UTF-8")
        chosen = tuple(_names(fields)) or DEFAULT_SEALING_FIELDS
        unknown = [f for f in chosen if not isinstance(f, str) or f not in GUEST_FIELDS]
        if unknown:
            raise InvalidArgument(f"unknown guest fields {unknown}; expected "
                                  f"{', '.join(GUEST_FIELDS)}")
        request = DerivedKeyRequest.from_fields("vcek", list(chosen), vmpl=SEALING_VMPL)
        raw: bytes = await self._firmware(caller, "derived_key", request,
                                          deadline=self._deadline(opts))
        from cryptography.hazmat.primitives import hashes
        from cryptography.hazmat.primitives.kdf.hkdf import HKDF

        info = b"snpd/v2/sealing\0" + struct.pack("<I", caller.uid) + label.encode()
        key = HKDF(algorithm=hashes.SHA256(), length=32, salt=SEALING_SALT,
                   info=info).derive(raw)
        self.events.key_derived(caller, "sealing", request.fields)
        return key

    # -- Manager --------------------------------------------------------------------------------

    async def refresh_certificates(self, caller: Caller) -> None:
        self.access.check_call(caller, "RefreshCertificates")
        if self.cache is None:
            raise CertificatesUnavailable("no certificate cache is configured")
        await self.get_certificates(caller, {"crl": True})

    def properties(self, caller: Optional[Caller] = None) -> Dict[str, Dict[str, object]]:
        """Every property by interface, as plain Python values. With a ``caller``
        (varlink), only for root and the members of either group; D-Bus leaves that
        to the bus policy (dbus-fast does not say who reads a property)."""
        if caller is not None:
            self.access.check_call(caller, "Properties")
        state = self.broker.state
        stats = {k: int(v) for k, v in self.broker.stats().items()}
        if self.cache is not None:
            stats.update({f"kds.{k}": v for k, v in self.cache.stats.as_dict().items()})
        product, source = ((self.product, "report") if self.product is not None
                           else (self.product_hint, self.product_hint_source))
        sev_status = dict(self.sev_status)
        if product is not None and source:
            sev_status["product_source"] = source
        return {
            "org.snpd.Snpd1.Attestation": {
                "Backend": self.backend,
                "Product": product.value if product else "",
                "Vmpl": self.guest_vmpl,
                "ReportedTcb": self.reported_tcb,
                "State": state.state,
                "StateReason": state.reason,
            },
            "org.snpd.Snpd1.Manager": {
                "Version": __version__,
                "SevStatus": sev_status,
                "Statistics": stats,
            },
        }


def _names(fields: object) -> List[str]:
    """A list of guest-field names, as the transports pass ``as`` / ``[]string``."""
    if not isinstance(fields, (list, tuple)) or not all(isinstance(f, str) for f in fields):
        raise InvalidArgument("fields must be a list of guest field names")
    return list(fields)


def _as_list(certs: CertificateSet) -> CertificateList:
    return [(kind, item.der) for kind, item in certs.items()]
