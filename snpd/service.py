"""The transport-agnostic service: one method per operation, caller identity in,
typed values in, typed result or typed error out.

D-Bus and varlink both call exactly these coroutines; neither holds business
logic, and adding a transport never touches this module. Each transport turns its
wire values into the typed inputs here (:class:`ReportOptions`,
:class:`CertificateOptions`, :class:`VerifyOptions`, :class:`KeyRequest`,
:class:`SealingKeyRequest`, ``vmpl`` None for the guest's own), which validate
themselves once, at construction; the firmware requests (ReportRequest,
DerivedKeyRequest) do the same. Every method checks the caller's authorization
itself by the one table in :mod:`snpd.access` (deny by default), and never logs
report_data, keys or full chip IDs. Nothing here knows D-Bus signatures, interface
names or JSON.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
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
    Protocol,
    Sequence,
    Tuple,
    TypeVar,
)

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from snpd import __version__, schema
from snpd.abi.azure_evidence import parse_azure_evidence
from snpd.abi.hcl import HclReport
from snpd.abi.product import Endorser, Product
from snpd.abi.report import AttestationReport
from snpd.abi.tcb import TcbVersion
from snpd.abi.uapi import GUEST_FIELDS, DerivedKeyRequest
from snpd.access import Access, Caller
from snpd.broker import operation
from snpd.device.base import (
    ExtendedReportRequest,
    FirmwareRequest,
    QuoteRequest,
    ReportRequest,
    VtpmQuote,
)
from snpd.errors import (
    Busy,
    CertificateFormatError,
    CertificatesUnavailable,
    DeviceError,
    EvidenceFormatError,
    InvalidArgument,
    NotSupported,
    PermissionDenied,
    SnpdError,
)
from snpd.evidence import (
    AZ_SNP_VTPM_MEDIA_TYPE,
    FORMATS,
    TRUSTEE_MEDIA_TYPE,
    VERIFIABLE_FORMATS,
    az_snp_vtpm_evidence,
    trustee_evidence,
)
from snpd.kds.budget import KdsBudget
from snpd.kds.cache import CertificateCache, FetchGate, NotCached, cache_only
from snpd.trust.azure import verify_azure_evidence
from snpd.trust.certset import CertificateSet
from snpd.trust.result import Verdict
from snpd.trust.verify import Verifier

if TYPE_CHECKING:
    from snpd.secrets import Secrets

if TYPE_CHECKING:
    from snpd.broker import Broker
    from snpd.events import Events
    from snpd.trust.appraisal import AppraisalPolicy

_T = TypeVar("_T")

MAX_LABEL = 255
MAX_TIMEOUT = 600
MAX_REPORT = 4096
MAX_CERTIFICATES = 64  # a chain is ark, ask or asvk, vcek or vlek, crl
MAX_NAME = 255  # a policy's or a product's name
"""VerifyReport takes anything up to this size: a wrong size is a verdict, not an error."""
MAX_EVIDENCE = 64 * 1024  # Azure's az-snp-vtpm evidence is about 8 KiB
MAX_NONCE = 1024  # a verifier's challenge; Trustee's are 32 bytes (base64: 44)
AZURE_BACKEND = "azure"  # snpd.device.azure.AzureVtpmDevice.name
SEALING_SALT = b"snpd sealing key v2"
DEFAULT_SEALING_FIELDS = ("measurement", "policy")
SEALING_VMPL = 3
"""The VMPL of the firmware key that sealing keys are derived from. DeriveKey refuses
it to everyone but root, so no caller of DeriveKey can reproduce a sealing root."""


@dataclasses.dataclass(frozen=True)
class ReportOptions:
    """Options of the firmware methods. ``timeout``: seconds in (0, 600]; None for
    the daemon's ``device.request_timeout_s``."""

    timeout: Optional[float] = None

    def __post_init__(self) -> None:
        t = self.timeout
        if t is None:
            return
        if isinstance(t, bool) or not isinstance(t, (int, float)):
            raise InvalidArgument(f"option 'timeout' must be a number of seconds, got "
                                  f"{type(t).__name__}")
        if not 0 < t <= MAX_TIMEOUT:
            raise InvalidArgument(f"option 'timeout' must be in (0, {MAX_TIMEOUT}] seconds")
        object.__setattr__(self, "timeout", float(t))


@dataclasses.dataclass(frozen=True)
class CertificateOptions:
    """GetCertificates: ``crl`` adds the CRL; ``endorser`` picks the VCEK or VLEK chain."""

    crl: bool = False
    endorser: Endorser = Endorser.VCEK

    def __post_init__(self) -> None:
        if not isinstance(self.crl, bool):
            raise InvalidArgument("option 'crl' must be a bool")
        value: object = self.endorser
        try:  # a name, as both wires carry it, or an Endorser
            object.__setattr__(self, "endorser", Endorser(value))
        except ValueError:
            raise InvalidArgument("option 'endorser' must be vcek or vlek") from None


@dataclasses.dataclass(frozen=True)
class VerifyOptions:
    """VerifyReport: the caller's ``certificates`` (gaps filled from the cache), the
    time ``at`` which to check validity (None: now), the name of a configured
    appraisal ``policy`` and the ``product`` for reports that do not name it."""

    certificates: CertificateSet = dataclasses.field(default_factory=CertificateSet)
    at: Optional[datetime.datetime] = None
    policy: Optional[str] = None
    product: Optional[Product] = None

    def __post_init__(self) -> None:
        if not isinstance(self.certificates, CertificateSet):
            raise InvalidArgument("option 'certificates' must be a certificate set")
        if self.at is not None and (not isinstance(self.at, datetime.datetime)
                                    or self.at.tzinfo is None):
            raise InvalidArgument("option 'at' must be an aware datetime")
        if self.policy is not None and not isinstance(self.policy, str):
            raise InvalidArgument("option 'policy' must be a string")
        if self.product is not None and not isinstance(self.product, Product):
            raise InvalidArgument("option 'product' must be a product")

    @classmethod
    def from_plain(cls, *, certificates: Optional[Sequence[Tuple[str, bytes]]] = None,
                   at: Optional[int] = None, policy: Optional[str] = None,
                   product: Optional[str] = None) -> VerifyOptions:
        """From the values both wires carry: (kind, DER) pairs, unix seconds, names."""
        when = None
        if at is not None:
            try:
                when = datetime.datetime.fromtimestamp(at, datetime.timezone.utc)
            except (OverflowError, OSError, ValueError):
                raise InvalidArgument("option 'at' is not a valid unix time") from None
        parsed = None
        if product is not None:
            try:
                parsed = Product.parse(product)
            except ValueError as exc:
                raise InvalidArgument(f"option 'product': {exc}") from None
        if certificates and not all(
                isinstance(p, (tuple, list)) and len(p) == 2 and isinstance(p[0], str)
                and isinstance(p[1], (bytes, bytearray)) for p in certificates):
            raise InvalidArgument("option 'certificates' must be (kind, DER) pairs")
        certs = (CertificateSet.from_kinds((k, bytes(d)) for k, d in certificates)
                 if certificates else CertificateSet())
        return cls(certs, when, policy, parsed)


@dataclasses.dataclass(frozen=True)
class KeyRequest:
    """DeriveKey's request: validated as the firmware request it becomes (``vmpl``
    None: the guest's own, resolved by the service)."""

    root_key: str
    fields: Tuple[str, ...] = ()
    vmpl: Optional[int] = None
    guest_svn: int = 0
    tcb_version: int = 0

    def __post_init__(self) -> None:
        fields = _names(self.fields)
        object.__setattr__(self, "fields", tuple(fields))
        if not isinstance(self.root_key, str):
            raise InvalidArgument("root_key must be a string (vcek or vmrk)")
        self.firmware_request(0 if self.vmpl is None else self.vmpl)

    def firmware_request(self, vmpl: int) -> DerivedKeyRequest:
        return DerivedKeyRequest.from_fields(self.root_key, list(self.fields), vmpl=vmpl,
                                             guest_svn=self.guest_svn,
                                             tcb_version=self.tcb_version)


@dataclasses.dataclass(frozen=True)
class SealingKeyRequest:
    """DeriveSealingKey's request: ``label`` 1-255 bytes of UTF-8; ``fields`` the
    guest fields to bind (empty: measurement and policy)."""

    label: str
    fields: Tuple[str, ...] = ()

    def __post_init__(self) -> None:
        label = self.label
        if not isinstance(label, str) or not label or len(label.encode()) > MAX_LABEL:
            raise InvalidArgument(f"label must be 1-{MAX_LABEL} bytes of UTF-8")
        chosen = tuple(_names(self.fields)) or DEFAULT_SEALING_FIELDS
        unknown = [f for f in chosen if f not in GUEST_FIELDS]
        if unknown:
            raise InvalidArgument(f"unknown guest fields {unknown}; expected "
                                  f"{', '.join(GUEST_FIELDS)}")
        object.__setattr__(self, "fields", chosen)


@dataclasses.dataclass(frozen=True)
class ExtendedReport:
    """A raw report and the certificates that verify it (empty when none could be had)."""

    report: bytes = dataclasses.field(repr=False)
    certificates: CertificateSet = dataclasses.field(default_factory=CertificateSet)


@dataclasses.dataclass(frozen=True)
class Evidence:
    media_type: str
    data: bytes = dataclasses.field(repr=False)


@dataclasses.dataclass(frozen=True)
class Properties:
    """What the daemon shows anyone allowed to look (no secrets: no full chip id).
    ``product`` is the report's, else the hint's (``sev_status["product_source"]``
    says which). ``report_data`` is what REPORT_DATA binds (Platform.report_data):
    "caller", the caller's bytes; "runtime-data", on Azure, SHA-256 of the paravisor's
    runtime JSON, whose user-data holds the caller's bytes."""

    backend: str
    report_data: str
    product: Optional[Product]
    vmpl: int
    reported_tcb: int
    state: str
    state_reason: str
    version: str
    sev_status: Mapping[str, object]
    statistics: Mapping[str, int]


PROPERTY_NAMES = tuple(f.name for f in dataclasses.fields(Properties))
Listener = Callable[[Mapping[str, object]], None]
"""``listener(changed)``: :class:`Properties` fields by name, with their new values."""


def check_options(values: object, kinds: Mapping[str, schema.Kind], what: str
                  ) -> Dict[str, Any]:
    """Plain option values, decoded from either wire, read by the schema reader the
    configuration uses: an unknown name or a wrong value is InvalidArgument naming the
    method, the option and the rule (``GetReport options: timeout: expected a
    positive number, got "soon"``)."""
    return schema.read_table("", values, kinds, what="an options object",
                             name=f"{what} options", noun="option")


def _certificate_pair(path: str, value: object) -> Tuple[str, bytes]:
    if (not isinstance(value, (tuple, list)) or len(value) != 2 or not isinstance(value[0], str)
            or not isinstance(value[1], (bytes, bytearray))):
        raise schema.SchemaError(path, "expected a (kind, DER) pair")
    return value[0], bytes(value[1])


TIMEOUT_OPTION: Mapping[str, schema.Kind] = {"timeout": schema.seconds(MAX_TIMEOUT)}
CERTIFICATE_OPTIONS: Mapping[str, schema.Kind] = {
    "crl": schema.boolean, "endorser": schema.choice(*(e.value for e in Endorser))}
VERIFY_OPTIONS: Mapping[str, schema.Kind] = {
    "certificates": schema.list_of(_certificate_pair, limit=MAX_CERTIFICATES, dedupe=False),
    "at": schema.integer(-(1 << 63), (1 << 63) - 1),
    "policy": schema.string(MAX_NAME),
    "product": schema.string(MAX_NAME),
}
"""The options each method takes where a transport carries them as a dictionary."""


class ServiceAPI(Protocol):
    """What a transport needs of :class:`Service`: typed values in and out. Test
    doubles (tests/doubles.py) implement it too."""

    def check(self, caller: Caller, method: str) -> None: ...

    async def get_report(self, caller: Caller, report_data: bytes, vmpl: Optional[int],
                         options: ReportOptions) -> bytes: ...

    async def get_extended_report(self, caller: Caller, report_data: bytes,
                                  vmpl: Optional[int], options: ReportOptions
                                  ) -> ExtendedReport: ...

    async def get_certificates(self, caller: Caller, options: CertificateOptions
                               ) -> CertificateSet: ...

    async def verify_report(self, caller: Caller, report: bytes, options: VerifyOptions
                            ) -> Verdict: ...

    async def verify_evidence(self, caller: Caller, fmt: str, evidence: bytes, nonce: bytes,
                              options: VerifyOptions) -> Verdict: ...

    async def get_evidence(self, caller: Caller, fmt: str, nonce: bytes,
                           options: ReportOptions) -> Evidence: ...

    async def derive_key(self, caller: Caller, request: KeyRequest, options: ReportOptions
                         ) -> bytes: ...

    async def derive_sealing_key(self, caller: Caller, request: SealingKeyRequest,
                                 options: ReportOptions) -> bytes: ...

    async def refresh_certificates(self, caller: Caller) -> None: ...

    async def get_resource(self, caller: Caller, kbs: str, path: str) -> bytes: ...

    async def get_token(self, caller: Caller, kbs: str) -> str: ...

    def properties(self, caller: Optional[Caller] = None) -> Properties: ...

    def subscribe(self, listener: Listener) -> None: ...


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
        report_data: str = "caller",
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
        self.report_data = report_data
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
        self._listeners: List[Listener] = []
        # Work that may contact the KDS runs in its own small pool, so that a slow or
        # throttling KDS never delays cache answers and verification (the loop's
        # default pool); each uid's share of it is bounded by the budget.
        self.kds_budget = kds_budget or KdsBudget()
        self._kds_pool = concurrent.futures.ThreadPoolExecutor(
            max_workers=kds_workers, thread_name_prefix="snpd-kds")
        # GetResource and GetToken; the daemon sets it from [kbs.NAME] (None: none).
        self.secrets: Optional[Secrets] = None

    # -- plumbing ---------------------------------------------------------------------

    def check(self, caller: Caller, method: str) -> None:
        """PermissionDenied unless ``caller`` may call ``method`` (by the one table,
        :data:`snpd.access.METHODS`). Transports ask before they decode arguments, so
        an outsider gets PermissionDenied whatever it sent; each method asks again."""
        self.access.check_call(caller, method)

    def subscribe(self, listener: Listener) -> None:
        """``listener(changed)`` whenever properties change (PropertiesChanged)."""
        self._listeners.append(listener)

    def notify(self, changed: Mapping[str, object]) -> None:
        """Tell the listeners that the :class:`Properties` fields in ``changed`` took
        these values; names that are no field are a bug (KeyError)."""
        for name in changed:
            if name not in PROPERTY_NAMES:
                raise KeyError(f"no property {name!r}")
        for listener in list(self._listeners):
            listener(dict(changed))

    def _deadline(self, options: ReportOptions) -> float:
        timeout = self.request_timeout if options.timeout is None else options.timeout
        return float(self._clock() + timeout)

    def _vmpl(self, vmpl: Optional[int]) -> int:
        return self.guest_vmpl if vmpl is None else vmpl

    def _learn(self, report: bytes) -> AttestationReport:
        """Remember the platform's product and TCB from a report the firmware produced."""
        parsed = AttestationReport.from_bytes(report)
        product = parsed.cpuid_product or self.product
        changed: Dict[str, object] = {}
        if product is not None and product is not self.product:
            self.product = product
            changed["product"] = product
        if parsed.reported_tcb != self.reported_tcb:
            self.reported_tcb = parsed.reported_tcb
            changed["reported_tcb"] = parsed.reported_tcb
        self._chip_id = parsed.chip_id
        if changed:
            self.notify(changed)
        return parsed

    async def _firmware(self, caller: Caller, request: FirmwareRequest, *,
                        deadline: float) -> Any:
        """The one way to the broker: the caller's fairness key, deadline and reserve."""
        try:
            return await self.broker.submit(request, client=caller.client_key,
                                            deadline=deadline, user=caller.uid,
                                            reserved=caller.uid == 0)
        except SnpdError as exc:
            self.events.request_failed(caller, operation(request), exc)
            raise

    # -- Attestation ----------------------------------------------------------------------

    async def get_report(self, caller: Caller, report_data: bytes, vmpl: Optional[int],
                         options: ReportOptions) -> bytes:
        """A raw report binding ``report_data`` (0-64 bytes, zero-padded) at ``vmpl``
        (None: the guest's own)."""
        self.access.check_call(caller, "GetReport")
        request = ReportRequest(report_data, self._vmpl(vmpl))
        report: bytes = await self._firmware(caller, request,
                                             deadline=self._deadline(options))
        self.events.report_issued(caller, request.vmpl, self._learn(report), self.product)
        return report

    async def get_extended_report(self, caller: Caller, report_data: bytes,
                                  vmpl: Optional[int], options: ReportOptions
                                  ) -> ExtendedReport:
        """GetReport plus the certificates that verify it: the host's table when it
        verifies, else the verified cache / KDS; empty when none could be had."""
        self.access.check_call(caller, "GetExtendedReport")
        return await self._extended_report(caller, report_data, vmpl, options)

    async def _extended_report(self, caller: Caller, report_data: bytes,
                               vmpl: Optional[int], options: ReportOptions) -> ExtendedReport:
        request = ExtendedReportRequest(report_data, self._vmpl(vmpl))
        extended = await self._firmware(caller, request, deadline=self._deadline(options))
        report: bytes = extended.report
        parsed = self._learn(report)
        self.events.report_issued(caller, request.vmpl, parsed, self.product)
        certs = await self._certificates_for(caller, parsed, extended.certificates)
        return ExtendedReport(report, certs)

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
        if self.secrets is not None:
            self.secrets.close()

    async def _certificates_for(self, caller: Caller, report: AttestationReport,
                                table: Sequence[object]) -> CertificateSet:
        """The host's table when it verifies, else the verified cache / KDS."""
        endorser = Endorser.VLEK if report.signing_key == 1 else Endorser.VCEK
        product = report.cpuid_product or self.product
        if table:
            try:
                certs = CertificateSet.from_table(table)  # type: ignore[arg-type]
                verdict = await self._local(
                    lambda: self.verifier.verify(report, certs, product=product))
                if verdict.valid:
                    return certs
                self.events.certificate_rejected("host table", ", ".join(
                    c.name for c in verdict.failures))
            except CertificateFormatError as exc:
                self.events.certificate_rejected("host table", str(exc))
        cache = self.cache
        if cache is None or product is None:
            return CertificateSet()
        tcb = TcbVersion.decode(report.reported_tcb, product)
        chip = None if report.chip_id_masked else report.chip_id
        try:
            return await self._lookup(caller, "GetExtendedReport", lambda gate: (
                cache.certificates(product, endorser, chip_id=chip, tcb=tcb, gate=gate)))
        except Busy:
            return CertificateSet()  # the report is worth more than its certificates
        except CertificatesUnavailable as exc:
            self.events.certificate_rejected("cache/KDS", str(exc))
            return CertificateSet()

    async def get_certificates(self, caller: Caller, options: CertificateOptions
                               ) -> CertificateSet:
        """This platform's chain (and CRL, with ``options.crl``).

        The product comes from the last report, else from what the daemon knew at
        start (CPUID or the emulator's configuration): naming the product spends no
        report. Only the VCEK names the chip and its TCB, which only a report tells:
        a VCEK chain asked for before any report was seen costs one report (at the
        guest's own VMPL, on the caller's account); once one has been seen (the
        daemon asks for one at start), none. A masked chip id gives the chain
        without its VCEK."""
        self.access.check_call(caller, "GetCertificates")
        if self.cache is None:
            raise CertificatesUnavailable("no certificate cache is configured")
        endorser = options.endorser
        if endorser is Endorser.VCEK and self._chip_id is None:
            await self.get_report(caller, b"", None, ReportOptions())
        product = self.product or self.product_hint
        if product is None:
            raise CertificatesUnavailable("the platform's product is unknown (v2 firmware?)")
        chip = self._chip_id if endorser is Endorser.VCEK and self._chip_id and any(
            self._chip_id) else None
        tcb = TcbVersion.decode(self.reported_tcb, product) if chip else None
        cache = self.cache
        return await self._lookup(caller, "GetCertificates", lambda gate: cache.certificates(
            product, endorser, chip_id=chip, tcb=tcb, with_crl=options.crl, gate=gate))

    async def verify_report(self, caller: Caller, report: bytes, options: VerifyOptions
                            ) -> Verdict:
        """Verify any report against the pinned roots. An invalid report is a verdict
        naming every failed check, not an error; an unknown policy name is."""
        self.access.check_call(caller, "VerifyReport")
        data = _bounded_bytes(report, "report", MAX_REPORT)
        policy = self._policy(options)
        certs = await self._completed(caller, "VerifyReport", data, options.certificates,
                                      options.product)
        verdict = await self._local(lambda: self.verifier.verify(
            data, certs, at=options.at, policy=policy, product=options.product))
        if not verdict.valid:
            self.events.verification_failed(caller, [c.name for c in verdict.failures])
        return verdict

    async def verify_evidence(self, caller: Caller, fmt: str, evidence: bytes, nonce: bytes,
                              options: VerifyOptions) -> Verdict:
        """Verify evidence in format ``fmt`` (Azure's ``az-snp-vtpm``) for ``nonce``:
        the SNP report and chain as VerifyReport does, then what binds the report to
        the vTPM and the quote to the nonce (snpd.trust.azure). Invalid evidence is a
        verdict; an unknown format or policy name is an error."""
        self.access.check_call(caller, "VerifyEvidence")
        if fmt not in VERIFIABLE_FORMATS:
            raise NotSupported(f"evidence format {fmt!r} cannot be verified (supported: "
                               f"{', '.join(VERIFIABLE_FORMATS)})")
        document = _bounded_bytes(evidence, "evidence", MAX_EVIDENCE)
        challenge = _bounded_bytes(nonce, "nonce", MAX_NONCE)
        policy = self._policy(options)
        certs = options.certificates
        parsed: Any = document
        try:
            parsed = parse_azure_evidence(document)
            report = HclReport.from_bytes(parsed.hcl_report).snp_report
        except EvidenceFormatError:
            pass  # the verdict says exactly what is malformed
        else:
            certs = await self._completed(caller, "VerifyEvidence", report, certs,
                                          options.product, leaf=parsed.vcek is not None)
        verdict = await self._local(lambda: verify_azure_evidence(
            parsed, certs, challenge, verifier=self.verifier, at=options.at,
            product=options.product, policy=policy))
        if not verdict.valid:
            self.events.verification_failed(caller, [c.name for c in verdict.failures],
                                            what=f"{fmt} evidence")
        return verdict

    def _policy(self, options: VerifyOptions) -> Optional[AppraisalPolicy]:
        if options.policy is None:
            return None
        policy = self.policies.get(options.policy)
        if policy is None:
            raise InvalidArgument(f"no policy named {options.policy!r} is configured "
                                  f"(known: {', '.join(sorted(self.policies)) or 'none'})")
        return policy

    async def _completed(self, caller: Caller, method: str, report: bytes,
                         certs: CertificateSet, product: Optional[Product], *,
                         leaf: bool = False) -> CertificateSet:
        """The caller's certificates with gaps filled from the cache (or the KDS, within
        the caller's budget: beyond it the call fails Busy). ``leaf``: the evidence
        carries its own VCEK, so only the chain above it is looked up."""
        cache = self.cache
        if cache is None or len(report) != 0x4A0:
            return certs
        try:
            parsed = AttestationReport.from_bytes(report)
            found = parsed.cpuid_product or product
            if found is None:
                return certs
            endorser = Endorser.VLEK if parsed.signing_key == 1 else Endorser.VCEK
            need_leaf = not leaf and certs.leaf(endorser) is None \
                and endorser is Endorser.VCEK and not parsed.chip_id_masked
            chip = parsed.chip_id if need_leaf else None
            tcb = TcbVersion.decode(parsed.reported_tcb, found) if need_leaf else None
            cached = await self._lookup(caller, method, lambda gate: cache.certificates(
                found, endorser, chip_id=chip, tcb=tcb, gate=gate))
            return certs.merged(cached)
        except Busy:
            raise  # throttled, not invalid: the caller retries later
        except SnpdError:
            return certs  # verification then reports exactly what is missing

    async def get_evidence(self, caller: Caller, fmt: str, nonce: bytes,
                           options: ReportOptions) -> Evidence:
        """Evidence for a remote verifier in format ``fmt``, binding ``nonce``."""
        self.access.check_call(caller, "GetEvidence")
        if fmt not in FORMATS:
            raise NotSupported(f"evidence format {fmt!r} is not supported "
                               f"(supported: {', '.join(FORMATS)})")
        return await self._evidence(caller, nonce, options)

    async def _evidence(self, caller: Caller, nonce: bytes, options: ReportOptions
                        ) -> Evidence:
        """Trustee's evidence for this platform: az-snp-vtpm on Azure, else snp."""
        if self.backend == AZURE_BACKEND:
            return await self._azure_evidence(caller, nonce, options)
        extended = await self._extended_report(caller, nonce, None, options)
        parsed = AttestationReport.from_bytes(extended.report)
        product = parsed.cpuid_product or self.product
        if product is None:
            raise NotSupported("Trustee evidence needs a v3+ report naming its CPU")
        leaf = [(k, c.der) for k, c in extended.certificates.items() if k in ("vcek", "vlek")]
        return Evidence(TRUSTEE_MEDIA_TYPE, trustee_evidence(parsed, product, leaf))

    async def _azure_evidence(self, caller: Caller, nonce: bytes, options: ReportOptions
                              ) -> Evidence:
        """Trustee's az-snp-vtpm evidence (v1, as Trustee's attester makes it): the HCL
        report, a quote over ``nonce`` and all 24 SHA-256 PCRs, and the VCEK, which
        Trustee requires and Azure keeps out of the report (the cache or KDS has it)."""
        quote: VtpmQuote = await self._firmware(caller, QuoteRequest(nonce),
                                                deadline=self._deadline(options))
        try:
            snp_report = HclReport.from_bytes(quote.hcl_report).snp_report
        except EvidenceFormatError as exc:
            raise DeviceError(f"the vTPM's HCL report is malformed: {exc}") from None
        self._learn(snp_report)
        certs = await self._completed(caller, "GetEvidence", snp_report, CertificateSet(),
                                      self.product)
        if certs.vcek is None:
            raise CertificatesUnavailable("az-snp-vtpm evidence needs the VCEK, and neither "
                                          "the cache nor the KDS gave it")
        return Evidence(AZ_SNP_VTPM_MEDIA_TYPE, az_snp_vtpm_evidence(
            quote.hcl_report, quote.attest, quote.signature, quote.pcrs, certs.vcek.der))

    # -- Keys -----------------------------------------------------------------------------------

    async def derive_key(self, caller: Caller, request: KeyRequest, options: ReportOptions
                         ) -> bytes:
        """The firmware's raw derived key; VMPL :data:`SEALING_VMPL` is root's only."""
        self.access.check_call(caller, "DeriveKey")
        level = self._vmpl(request.vmpl)
        if level == SEALING_VMPL and caller.uid != 0:
            raise PermissionDenied(f"firmware keys of VMPL {SEALING_VMPL} are reserved for "
                                   "sealing keys (DeriveSealingKey); only root may derive "
                                   "them raw")
        firmware = request.firmware_request(level)
        key: bytes = await self._firmware(caller, firmware, deadline=self._deadline(options))
        self.events.key_derived(caller, "raw", firmware.fields)
        return key

    async def derive_sealing_key(self, caller: Caller, request: SealingKeyRequest,
                                 options: ReportOptions) -> bytes:
        """HKDF over a VCEK-rooted firmware key, bound to the caller's uid and label, so two
        local users or applications never obtain the same key.

        The firmware key is requested at :data:`SEALING_VMPL`, which DeriveKey refuses
        to everyone but root: a member of the key groups can no more compute the
        root than anyone else, and the HKDF inputs (uid, label) being public does
        not matter. snpd(8) gives the whole argument."""
        self.access.check_call(caller, "DeriveSealingKey")
        firmware = DerivedKeyRequest.from_fields("vcek", list(request.fields),
                                                 vmpl=SEALING_VMPL)
        raw: bytes = await self._firmware(caller, firmware, deadline=self._deadline(options))
        info = b"snpd/v2/sealing\0" + struct.pack("<I", caller.uid) + request.label.encode()
        key = HKDF(algorithm=hashes.SHA256(), length=32, salt=SEALING_SALT,
                   info=info).derive(raw)
        self.events.key_derived(caller, "sealing", firmware.fields)
        return key

    # -- Secrets: the [kbs.NAME] allow rules decide, per resource -----------------------------

    @property
    def kbs_tee(self) -> str:
        """The KBS protocol's name for this platform's evidence."""
        return "az-snp-vtpm" if self.backend == AZURE_BACKEND else "snp"

    async def kbs_evidence(self, caller: Caller, binding: bytes) -> bytes:
        """The primary evidence a KBS attests, binding ``binding``, on the caller's
        account at the broker (the caller was admitted by an allow rule, not a group)."""
        evidence = await self._evidence(caller, binding, ReportOptions())
        return evidence.data

    def _secrets(self, caller: Caller, method: str) -> Secrets:
        self.access.check_call(caller, method)
        if self.secrets is None:
            raise NotSupported("no KBS is configured ([kbs.NAME] in snpd.toml)")
        return self.secrets

    async def get_resource(self, caller: Caller, kbs: str, path: str) -> bytes:
        """Resource ``path`` (REPOSITORY/TYPE/TAG) from KBS ``kbs``, decrypted."""
        return await self._secrets(caller, "GetResource").get_resource(caller, kbs, path)

    async def get_token(self, caller: Caller, kbs: str) -> str:
        """The attestation token of the daemon's session with KBS ``kbs``."""
        return await self._secrets(caller, "GetToken").get_token(caller, kbs)

    # -- Manager --------------------------------------------------------------------------------

    async def refresh_certificates(self, caller: Caller) -> None:
        self.access.check_call(caller, "RefreshCertificates")
        if self.cache is None:
            raise CertificatesUnavailable("no certificate cache is configured")
        await self.get_certificates(caller, CertificateOptions(crl=True))

    def properties(self, caller: Optional[Caller] = None) -> Properties:
        """The daemon's properties. With a ``caller``, only if :data:`METHODS` lets it
        read them; without, for the daemon itself and for transports that checked the
        caller already (D-Bus, in its reader, before dbus-fast reads a property)."""
        if caller is not None:
            self.access.check_call(caller, "GetProperties")
        state = self.broker.state
        stats = {k: int(v) for k, v in self.broker.stats().items()}
        if self.cache is not None:
            stats.update({f"kds.{k}": v for k, v in self.cache.stats.as_dict().items()})
        product, source = ((self.product, "report") if self.product is not None
                           else (self.product_hint, self.product_hint_source))
        sev_status = dict(self.sev_status)
        if product is not None and source:
            sev_status["product_source"] = source
        return Properties(backend=self.backend, report_data=self.report_data,
                          product=product, vmpl=self.guest_vmpl,
                          reported_tcb=self.reported_tcb, state=state.state,
                          state_reason=state.reason, version=__version__,
                          sev_status=sev_status, statistics=stats)


def _bounded_bytes(value: object, what: str, limit: int) -> bytes:
    if not isinstance(value, (bytes, bytearray, memoryview)):
        raise InvalidArgument(f"{what} must be bytes")
    data = bytes(value)
    if len(data) > limit:
        raise InvalidArgument(f"{what} is {len(data)} bytes; at most {limit}")
    return data


def _names(fields: object) -> List[str]:
    """A list of guest-field names, as the transports pass ``as`` / ``[]string``."""
    if not isinstance(fields, (list, tuple)) or not all(isinstance(f, str) for f in fields):
        raise InvalidArgument("fields must be a list of guest field names")
    return list(fields)
