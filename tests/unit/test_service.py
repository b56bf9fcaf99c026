"""The service in-process, without root: the whole access table (every method for
root, a report-group member, a key-group member and an outsider) and every argument
rule of the typed values the transports build. A fake broker stands in for the
firmware and records what reached it, so a refusal is seen to cost no request."""

from __future__ import annotations

import asyncio
import dataclasses
import datetime
import math
from pathlib import Path
from typing import Any, Awaitable, Callable, Dict, List, Mapping, Optional, Tuple, TypeVar

import pytest
from emuplatform import Platform  # type: ignore[import-not-found]

from snpd.abi.product import Endorser, Product
from snpd.abi.report import AttestationReport
from snpd.abi.uapi import DerivedKeyRequest
from snpd.access import METHODS, Access, Caller, Permission, proc_credentials
from snpd.broker import BrokerState, operation
from snpd.device.base import ExtendedReport as DeviceExtendedReport
from snpd.device.base import FirmwareRequest
from snpd.errors import (
    CertificatesUnavailable,
    InvalidArgument,
    NotSupported,
    PermissionDenied,
)
from snpd.events import Events
from snpd.service import (
    CERTIFICATE_OPTIONS,
    TIMEOUT_OPTION,
    VERIFY_OPTIONS,
    CertificateOptions,
    KeyRequest,
    Properties,
    ReportOptions,
    SealingKeyRequest,
    Service,
    VerifyOptions,
    check_options,
)
from snpd.trust.appraisal import AppraisalPolicy
from snpd.trust.certset import CertificateSet
from snpd.trust.result import Status, Verdict
from snpd.trust.verify import Verifier
from snpd.trust.x509 import load_certificate

REPORT_GID, KEY_GID = 4242, 4343
ROOT = Caller(uid=0, transport="test")
REPORTER = Caller(uid=1000, gids=frozenset({REPORT_GID}), transport="test")
KEYHOLDER = Caller(uid=1001, gids=frozenset({KEY_GID}), transport="test")
OUTSIDER = Caller(uid=1002, gids=frozenset({100}), transport="test")
CALLERS = {"root": ROOT, "report group": REPORTER, "key group": KEYHOLDER,
           "outsider": OUTSIDER}
NOW = 1000.0
T = TypeVar("T")

# Who may call what, written out: a change to snpd.access.METHODS must change this too.
WHO_MAY = {
    "GetReport": {"root", "report group"},
    "GetExtendedReport": {"root", "report group"},
    "GetCertificates": {"root", "report group"},
    "VerifyReport": {"root", "report group"},
    "VerifyEvidence": {"root", "report group"},
    "GetEvidence": {"root", "report group"},
    "DeriveKey": {"root", "key group"},
    "DeriveSealingKey": {"root", "report group"},
    "RefreshCertificates": {"root"},
    "GetProperties": {"root", "report group", "key group"},
    # Past the table for everyone: the [kbs.NAME] allow rules decide (test_secrets.py),
    # and with no KBS configured every caller gets NotSupported.
    "GetResource": {"root", "report group", "key group", "outsider"},
    "GetToken": {"root", "report group", "key group", "outsider"},
}


class FakeBroker:
    """Stands in for the broker: the platform's genuine report, a fixed key; records
    every submission as (op, the request's fields, keywords)."""

    def __init__(self, report: bytes) -> None:
        self.report = report
        self.submitted: List[Tuple[str, Tuple[Any, ...], Dict[str, Any]]] = []
        self.state = BrokerState("ready", "")

    async def submit(self, request: FirmwareRequest, **kw: Any) -> Any:
        op = operation(request)
        args: Tuple[Any, ...] = ((request,) if isinstance(request, DerivedKeyRequest)
                                 else (request.report_data, request.vmpl))
        self.submitted.append((op, args, kw))
        if op == "report":
            return self.report
        if op == "extended_report":
            return DeviceExtendedReport(self.report)
        assert op == "derived_key"
        return bytes(range(32))

    def stats(self) -> Dict[str, int]:
        return {"firmware_requests": len(self.submitted)}


class FakeCache:
    """A certificate cache answering from the platform's chain; records each lookup."""

    def __init__(self, platform: Platform) -> None:
        self.platform = platform
        self.lookups: List[Dict[str, Any]] = []
        self.stats = _Stats()

    def certificates(self, product: Product, endorser: Endorser, *, chip_id: Optional[bytes],
                     tcb: Any, with_crl: bool = False, gate: Any = None) -> CertificateSet:
        self.lookups.append({"product": product, "endorser": endorser, "chip_id": chip_id,
                             "with_crl": with_crl})
        return self.platform.certs(endorser)


class _Stats:
    def as_dict(self) -> Dict[str, int]:
        return {"hits": 0}


class Sink:
    def __init__(self) -> None:
        self.records: List[Mapping[str, str]] = []

    def send(self, fields: Mapping[str, str]) -> None:
        self.records.append(dict(fields))


@dataclasses.dataclass
class Setup:
    service: Service
    broker: FakeBroker
    cache: Optional[FakeCache]
    sink: Sink


def make(platform: Platform, *, cache: bool = False, guest_vmpl: int = 1,
         product_hint: Optional[Product] = None, verifier: Optional[Verifier] = None,
         policies: Optional[Mapping[str, AppraisalPolicy]] = None,
         report_data: str = "caller") -> Setup:
    broker = FakeBroker(platform.report())
    fake_cache = FakeCache(platform) if cache else None
    sink = Sink()
    service = Service(broker=broker,  # type: ignore[arg-type]
                      access=Access(report_gids=frozenset({REPORT_GID}),
                                    key_gids=frozenset({KEY_GID})),
                      events=Events(sink), cache=fake_cache,  # type: ignore[arg-type]
                      verifier=verifier or Verifier(platform.roots), guest_vmpl=guest_vmpl,
                      policies=policies,
                      backend="test", report_data=report_data, product_hint=product_hint,
                      product_hint_source="cpuid" if product_hint else "",
                      request_timeout=30.0, clock=lambda: NOW)
    return Setup(service, broker, fake_cache, sink)


def run(make_coro: Callable[[], Awaitable[T]]) -> T:
    async def guarded() -> T:
        return await asyncio.wait_for(make_coro(), 60.0)

    return asyncio.run(guarded())


def call(service: Service, method: str, caller: Caller, report: bytes) -> Any:
    """One well-formed call of ``method`` (a METHODS name)."""
    none = ReportOptions()
    calls: Dict[str, Callable[[], Awaitable[Any]]] = {
        "GetReport": lambda: service.get_report(caller, b"nonce", None, none),
        "GetExtendedReport": lambda: service.get_extended_report(caller, b"n", None, none),
        "GetCertificates": lambda: service.get_certificates(caller, CertificateOptions()),
        "VerifyReport": lambda: service.verify_report(caller, report, VerifyOptions()),
        "VerifyEvidence": lambda: service.verify_evidence(caller, "az-snp-vtpm", b"{}", b"n",
                                                          VerifyOptions()),
        "GetEvidence": lambda: service.get_evidence(caller, "trustee", b"n", none),
        "DeriveKey": lambda: service.derive_key(caller, KeyRequest("vcek", ("measurement",)),
                                                none),
        "DeriveSealingKey": lambda: service.derive_sealing_key(
            caller, SealingKeyRequest("app"), none),
        "RefreshCertificates": lambda: service.refresh_certificates(caller),
        "GetResource": lambda: service.get_resource(caller, "fleet", "a/b/c"),
        "GetToken": lambda: service.get_token(caller, "fleet"),
    }
    if method == "GetProperties":
        return service.properties(caller)
    return run(calls[method])


# -- the access table ----------------------------------------------------------------------------


def test_the_table_names_every_method_and_nothing_else() -> None:
    assert set(METHODS) == set(WHO_MAY)
    assert METHODS["GetProperties"] is Permission.MEMBER


@pytest.mark.parametrize("method", sorted(WHO_MAY))
@pytest.mark.parametrize("who", sorted(CALLERS))
def test_access_table(milan: Platform, method: str, who: str) -> None:
    """Allowed callers get past the check (any other outcome: the cache is missing,
    and so on); refused ones get PermissionDenied naming the method, before any
    firmware request is made."""
    setup = make(milan)
    caller = CALLERS[who]
    assert setup.service.access.may_call(caller, method) is (who in WHO_MAY[method])
    if who in WHO_MAY[method]:
        try:
            call(setup.service, method, caller, milan.report())
        except PermissionDenied as exc:  # pragma: no cover - the failure being tested
            pytest.fail(f"{who} was refused {method}: {exc}")
        except (CertificatesUnavailable, NotSupported):
            pass  # no cache configured: past the access check
        return
    with pytest.raises(PermissionDenied, match=f"^{method} needs .*is not allowed"):
        call(setup.service, method, caller, milan.report())
    assert setup.broker.submitted == []
    with pytest.raises(PermissionDenied):
        setup.service.check(caller, method)


def test_an_unknown_method_is_never_granted() -> None:
    with pytest.raises(KeyError):
        Access().check_call(ROOT, "Frobnicate")


def test_properties_without_a_caller_are_the_daemons_own(milan: Platform) -> None:
    """The daemon itself (status texts) reads them without a caller."""
    assert isinstance(make(milan).service.properties(), Properties)


# -- reports: report_data, vmpl, timeout ---------------------------------------------------------


def test_report_data_is_padded_and_the_guests_own_vmpl_is_none(milan: Platform) -> None:
    setup = make(milan, guest_vmpl=2)
    report = run(lambda: setup.service.get_report(REPORTER, b"abc", None, ReportOptions()))
    assert report == setup.broker.report
    op, args, kw = setup.broker.submitted[0]
    assert op == "report" and args == (b"abc".ljust(64, b"\0"), 2)
    assert kw["deadline"] == NOW + 30.0 and kw["user"] == 1000 and kw["reserved"] is False
    run(lambda: setup.service.get_report(ROOT, b"", 0, ReportOptions(timeout=5)))
    op, args, kw = setup.broker.submitted[1]
    assert args == (bytes(64), 0) and kw["deadline"] == NOW + 5.0 and kw["reserved"] is True


@pytest.mark.parametrize("data, vmpl, message", [
    (bytes(65), None, "report_data is 65 bytes; at most 64"),
    ("text", None, "report_data must be bytes"),
    (b"", 4, "vmpl 4 is not 0-3"),
    (b"", -1, "vmpl -1 is not 0-3"),
    (b"", 0xFFFFFFFF, "vmpl 4294967295 is not 0-3"),
    (b"", True, "vmpl True is not 0-3"),
])
def test_report_arguments(milan: Platform, data: Any, vmpl: Any, message: str) -> None:
    setup = make(milan)
    for method in (setup.service.get_report, setup.service.get_extended_report):
        with pytest.raises(InvalidArgument, match=f"^{message}$"):
            run(lambda: method(REPORTER, data, vmpl, ReportOptions()))  # noqa: B023
    assert setup.broker.submitted == []


@pytest.mark.parametrize("timeout, message", [
    (0, r"option 'timeout' must be in \(0, 600\] seconds"),
    (-1.0, r"option 'timeout' must be in \(0, 600\] seconds"),
    (600.5, r"option 'timeout' must be in \(0, 600\] seconds"),
    (math.nan, r"option 'timeout' must be in \(0, 600\] seconds"),
    (math.inf, r"option 'timeout' must be in \(0, 600\] seconds"),
    ("soon", "option 'timeout' must be a number of seconds, got str"),
    (True, "option 'timeout' must be a number of seconds, got bool"),
])
def test_timeout_rules(timeout: Any, message: str) -> None:
    with pytest.raises(InvalidArgument, match=f"^{message}$"):
        ReportOptions(timeout)


def test_timeouts_in_range() -> None:
    assert ReportOptions(600).timeout == 600.0 and isinstance(ReportOptions(1).timeout, float)
    assert ReportOptions().timeout is None


def test_extended_report_without_a_cache_has_no_certificates(milan: Platform) -> None:
    setup = make(milan)
    extended = run(lambda: setup.service.get_extended_report(REPORTER, b"n", 3,
                                                             ReportOptions()))
    assert extended.report == setup.broker.report
    assert extended.certificates == CertificateSet()
    assert setup.broker.submitted[0][:2] == ("extended_report", (b"n".ljust(64, b"\0"), 3))


# -- options as both transports check them ------------------------------------------------------


def test_check_options_names_the_method_the_option_and_the_rule() -> None:
    with pytest.raises(InvalidArgument,
                       match=r"^GetReport options: x: unknown option \(known: timeout\)$"):
        check_options({"x": 1}, TIMEOUT_OPTION, "GetReport")
    with pytest.raises(InvalidArgument, match="^GetReport options: timeout: expected a "
                                              'positive number, got "soon"$'):
        check_options({"timeout": "soon"}, TIMEOUT_OPTION, "GetReport")
    with pytest.raises(InvalidArgument, match="^GetReport options: timeout: 601 is more "
                                              "than the maximum 600$"):
        check_options({"timeout": 601}, TIMEOUT_OPTION, "GetReport")
    with pytest.raises(InvalidArgument, match="^GetCertificates options: crl: expected true "
                                              "or false, got 1$"):
        check_options({"crl": 1}, CERTIFICATE_OPTIONS, "GetCertificates")
    with pytest.raises(InvalidArgument, match="^GetCertificates options: endorser: expected "
                                              'one of vcek, vlek, got "ask"$'):
        check_options({"endorser": "ask"}, CERTIFICATE_OPTIONS, "GetCertificates")
    with pytest.raises(InvalidArgument, match=r"timeout: unknown option \(known: none\)"):
        check_options({"timeout": 1}, {}, "RefreshCertificates")
    assert check_options({"timeout": 2}, TIMEOUT_OPTION, "x") == {"timeout": 2.0}
    with pytest.raises(InvalidArgument, match="at: expected an integer"):
        check_options({"at": True}, VERIFY_OPTIONS, "VerifyReport")
    with pytest.raises(InvalidArgument, match=r"certificates\[1\]: expected a \(kind, DER\) "
                                              "pair$"):
        check_options({"certificates": [("ark", b"x"), ("ask",)]}, VERIFY_OPTIONS,
                      "VerifyReport")
    with pytest.raises(InvalidArgument, match="^VerifyReport options: expected an options "
                                              "object, got an array$"):
        check_options([], VERIFY_OPTIONS, "VerifyReport")
    assert check_options({"certificates": [["ark", bytearray(b"x")]]}, VERIFY_OPTIONS,
                         "v") == {"certificates": (("ark", b"x"),)}


def test_certificate_options() -> None:
    assert CertificateOptions(endorser="vlek").endorser is Endorser.VLEK  # type: ignore
    assert CertificateOptions() == CertificateOptions(False, Endorser.VCEK)
    with pytest.raises(InvalidArgument, match="^option 'endorser' must be vcek or vlek$"):
        CertificateOptions(endorser="ark")  # type: ignore[arg-type]
    with pytest.raises(InvalidArgument, match="^option 'crl' must be a bool$"):
        CertificateOptions(crl="yes")  # type: ignore[arg-type]


def test_verify_options(milan: Platform) -> None:
    options = VerifyOptions.from_plain(
        certificates=[("ark", milan.chain.ark.der)], at=1700000000, policy="p",
        product="milan")
    assert options.certificates.ark == milan.chain.ark
    assert options.at == datetime.datetime(2023, 11, 14, 22, 13, 20,
                                           tzinfo=datetime.timezone.utc)
    assert options.policy == "p" and options.product is Product.MILAN
    with pytest.raises(InvalidArgument, match="^option 'at' is not a valid unix time$"):
        VerifyOptions.from_plain(at=1 << 62)
    with pytest.raises(InvalidArgument, match="^option 'product': unknown product 'Zen9'"):
        VerifyOptions.from_plain(product="Zen9")
    with pytest.raises(InvalidArgument, match=r"^option 'certificates' must be \(kind, DER\)"):
        VerifyOptions.from_plain(certificates=[("ark",)])  # type: ignore[list-item]
    with pytest.raises(InvalidArgument, match="^option 'at' must be an aware datetime$"):
        VerifyOptions(at=datetime.datetime(2026, 1, 1))
    # A label that lies is evidence (a defect the verdict reports), not an argument error.
    assert VerifyOptions.from_plain(certificates=[("vcek", b"x")]).certificates.defects


def test_verify_report_rules(milan: Platform) -> None:
    setup = make(milan)
    service = setup.service
    with pytest.raises(InvalidArgument, match="^report is 4097 bytes; at most 4096$"):
        run(lambda: service.verify_report(REPORTER, bytes(4097), VerifyOptions()))
    with pytest.raises(InvalidArgument, match="^report must be bytes$"):
        run(lambda: service.verify_report(REPORTER, "r", VerifyOptions()))  # type: ignore
    with pytest.raises(InvalidArgument,
                       match=r"^no policy named 'strict' is configured \(known: none\)$"):
        run(lambda: service.verify_report(REPORTER, milan.report(),
                                          VerifyOptions(policy="strict")))
    # A bad report is a verdict, not an error.
    verdict = run(lambda: service.verify_report(REPORTER, bytes(100), VerifyOptions()))
    assert not verdict.valid and verdict.failures
    good = run(lambda: service.verify_report(REPORTER, milan.report(), VerifyOptions(
        certificates=milan.certs(), at=datetime.datetime(2026, 6, 1,
                                                         tzinfo=datetime.timezone.utc))))
    assert good.valid and good.product is Product.MILAN
    assert setup.broker.submitted == []  # verification spends no firmware request


def test_verify_evidence_rules(milan: Platform, vectors_dir: Path) -> None:
    """VerifyEvidence: typed errors for a wrong format, size or policy name; a verdict
    for anything else, the real Azure evidence valid under AMD's roots, and a policy's
    evidence rules judged on it."""
    case = vectors_dir / "azure" / "evidence-v1"
    document = (case / "evidence.json").read_bytes()
    chain = CertificateSet(ark=load_certificate((case / "ark.pem").read_bytes()),
                           ask=load_certificate((case / "ask.pem").read_bytes()))
    policies = {
        "azure": AppraisalPolicy.from_toml(
            '[vm_configuration]\nsecure-boot = true\ntpm-enabled = true\n'),
        "no-console": AppraisalPolicy.from_toml('[vm_configuration]\nconsole-enabled = false\n'),
    }
    setup = make(milan, verifier=Verifier(), policies=policies)
    service = setup.service

    def verify(evidence: bytes = document, nonce: bytes = b"challenge",
               fmt: str = "az-snp-vtpm", **options: Any) -> Verdict:
        return run(lambda: service.verify_evidence(
            REPORTER, fmt, evidence, nonce, VerifyOptions(certificates=chain, **options)))

    with pytest.raises(NotSupported, match="^evidence format 'trustee' cannot be verified "
                                           r"\(supported: az-snp-vtpm\)$"):
        verify(fmt="trustee")
    with pytest.raises(InvalidArgument, match="^evidence is 65537 bytes; at most 65536$"):
        verify(evidence=bytes(65537))
    with pytest.raises(InvalidArgument, match="^nonce is 1025 bytes; at most 1024$"):
        verify(nonce=bytes(1025))
    with pytest.raises(InvalidArgument, match="^no policy named 'strict' is configured "
                                              r"\(known: azure, no-console\)$"):
        verify(policy="strict")
    garbage = verify(evidence=b"[1]")
    assert [c.name for c in garbage.failures] == ["evidence.format"]
    good = verify()
    assert good.valid and good.product is Product.MILAN, good.to_json()
    assert [c.name for c in verify(nonce=b"challengf").failures] == ["quote.nonce"]
    judged = verify(policy="azure")
    assert judged.valid and any(c.name == "policy.vm_configuration" and c.status is Status.PASS
                                for c in judged.checks)
    refused = verify(policy="no-console")
    assert [c.name for c in refused.failures] == ["policy.vm_configuration"]
    assert "console-enabled is true, expected false" in refused.failures[0].detail
    assert setup.broker.submitted == []  # verification spends no firmware request
    failed = [r for r in setup.sink.records if r.get("SNPD_EVENT") == "VERIFY_FAILED"]
    assert failed and all(r["MESSAGE"].startswith("az-snp-vtpm evidence from uid 1000 ")
                          for r in failed), setup.sink.records


def test_evidence_format(milan: Platform) -> None:
    setup = make(milan)
    with pytest.raises(NotSupported, match="^evidence format 'nope' is not supported"):
        run(lambda: setup.service.get_evidence(REPORTER, "nope", b"", ReportOptions()))
    assert setup.broker.submitted == []
    evidence = run(lambda: setup.service.get_evidence(REPORTER, "trustee", b"n",
                                                      ReportOptions()))
    assert evidence.media_type and evidence.data


# -- keys ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs, message", [
    ({"root_key": "ark"}, "^root key 'ark' is neither vcek nor vmrk$"),
    ({"root_key": 1}, "^root_key must be a string"),
    ({"root_key": "vcek", "fields": ("nope",)}, "^unknown guest field 'nope'"),
    ({"root_key": "vcek", "fields": "policy"}, "^fields must be a list of guest field names$"),
    ({"root_key": "vcek", "vmpl": 4}, "^vmpl 4 is not 0-3$"),
    ({"root_key": "vcek", "guest_svn": 1 << 32}, "^guest_svn 4294967296 is not a u32$"),
    ({"root_key": "vcek", "tcb_version": 1 << 64}, "is not a u64$"),
    ({"root_key": "vcek", "guest_svn": "1"}, "^guest_svn must be an integer, not str$"),
])
def test_key_request_rules(kwargs: Dict[str, Any], message: str) -> None:
    with pytest.raises(InvalidArgument, match=message):
        KeyRequest(**kwargs)


def test_derive_key_reaches_the_firmware_as_asked(milan: Platform) -> None:
    setup = make(milan, guest_vmpl=1)
    key = run(lambda: setup.service.derive_key(
        KEYHOLDER, KeyRequest("vmrk", ("policy", "measurement"), None, 7, 9), ReportOptions()))
    assert key == bytes(range(32))
    op, (request,), _ = setup.broker.submitted[0]
    assert op == "derived_key" and request.vmpl == 1 and request.guest_svn == 7
    assert request.tcb_version == 9 and set(request.fields) == {"policy", "measurement"}


def test_the_sealing_vmpl_is_roots_alone(milan: Platform) -> None:
    setup = make(milan)
    with pytest.raises(PermissionDenied, match="reserved for sealing keys"):
        run(lambda: setup.service.derive_key(KEYHOLDER, KeyRequest("vcek", (), 3),
                                             ReportOptions()))
    assert setup.broker.submitted == []
    run(lambda: setup.service.derive_key(ROOT, KeyRequest("vcek", (), 3), ReportOptions()))
    assert setup.broker.submitted[0][1][0].vmpl == 3


@pytest.mark.parametrize("kwargs, message", [
    ({"label": ""}, "^label must be 1-255 bytes of UTF-8$"),
    ({"label": "\u00e9" * 128}, "^label must be 1-255 bytes of UTF-8$"),
    ({"label": 7}, "^label must be 1-255 bytes of UTF-8$"),
    ({"label": "a", "fields": ("nope",)}, r"^unknown guest fields \['nope'\]"),
    ({"label": "a", "fields": "policy"}, "^fields must be a list of guest field names$"),
])
def test_sealing_key_request_rules(kwargs: Dict[str, Any], message: str) -> None:
    with pytest.raises(InvalidArgument, match=message):
        SealingKeyRequest(**kwargs)


def test_sealing_keys_are_bound_to_uid_and_label(milan: Platform) -> None:
    assert SealingKeyRequest("a").fields == ("measurement", "policy")
    assert SealingKeyRequest("a" * 255, ("image_id",)).fields == ("image_id",)
    setup = make(milan)
    other = Caller(uid=2000, gids=frozenset({REPORT_GID}))

    def seal(caller: Caller, label: str) -> bytes:
        return run(lambda: setup.service.derive_sealing_key(caller, SealingKeyRequest(label),
                                                            ReportOptions()))

    mine = seal(REPORTER, "app")
    assert mine == seal(REPORTER, "app") and len(mine) == 32
    assert mine not in (seal(REPORTER, "other"), seal(other, "app"))
    assert all(request.vmpl == 3 for _, (request,), _ in setup.broker.submitted)


# -- certificates: the product without a report ----------------------------------------------


def test_vlek_certificates_spend_no_report_when_the_product_is_known(
        milan: Platform) -> None:
    setup = make(milan, cache=True, product_hint=Product.MILAN)
    certs = run(lambda: setup.service.get_certificates(
        REPORTER, CertificateOptions(endorser=Endorser.VLEK)))
    assert certs.vlek == milan.vlek
    assert setup.broker.submitted == []
    assert setup.cache is not None and setup.cache.lookups == [
        {"product": Product.MILAN, "endorser": Endorser.VLEK, "chip_id": None,
         "with_crl": False}]


def test_a_vcek_chain_costs_one_report_before_any_was_seen_and_none_after(
        milan: Platform) -> None:
    setup = make(milan, cache=True, product_hint=Product.MILAN)
    run(lambda: setup.service.get_certificates(REPORTER, CertificateOptions()))
    assert [op for op, _, _ in setup.broker.submitted] == ["report"]
    run(lambda: setup.service.get_certificates(REPORTER, CertificateOptions(crl=True)))
    assert [op for op, _, _ in setup.broker.submitted] == ["report"]
    assert setup.cache is not None
    assert [lookup["chip_id"] is not None for lookup in setup.cache.lookups] == [True, True]
    assert setup.cache.lookups[1]["with_crl"] is True


def test_certificates_need_a_cache_and_a_product(milan: Platform) -> None:
    with pytest.raises(CertificatesUnavailable, match="no certificate cache"):
        run(lambda: make(milan).service.get_certificates(REPORTER, CertificateOptions()))
    setup = make(milan, cache=True)  # no hint, and VLEK asks for no report
    with pytest.raises(CertificatesUnavailable, match="product is unknown"):
        run(lambda: setup.service.get_certificates(
            REPORTER, CertificateOptions(endorser=Endorser.VLEK)))


# -- properties ------------------------------------------------------------------------------------


def test_properties_say_what_report_data_binds(milan: Platform, tmp_path: Path) -> None:
    """ReportDataBinding is the backend's Platform.report_data, which the daemon passes
    in: "caller" on the emulator, "runtime-data" on the emulated Azure CVM (known
    without a request, so its vTPM need not be running)."""
    import datetime as dt

    from snpd.device.select import open_emulator
    from snpd.emulator.launch import EmulatorConfig
    from snpd.emulator.state import EmulatorState

    state_dir = tmp_path / "emu"
    EmulatorState.load_or_create(state_dir, EmulatorConfig(), rsa_bits=2048,
                                 now=lambda: dt.datetime.now(dt.timezone.utc))
    found = {}
    for config in (EmulatorConfig(), EmulatorConfig(vtpm=f"unix:{tmp_path / 'vtpm.sock'}")):
        device = open_emulator(state_dir, config)
        try:
            binding = device.platform().report_data
        finally:
            device.close()
        found[device.name] = make(milan, report_data=binding).service.properties(
            REPORTER).report_data
    assert found == {"emulator": "caller", "azure": "runtime-data"}
    assert make(milan).service.properties().report_data == "caller"  # Service's default


def test_properties_name_the_product_and_hold_no_chip_id(milan: Platform) -> None:
    setup = make(milan, product_hint=Product.MILAN)
    changes: List[Mapping[str, object]] = []
    setup.service.subscribe(changes.append)
    before = setup.service.properties(KEYHOLDER)
    assert before.product is Product.MILAN
    assert before.sev_status["product_source"] == "cpuid"
    assert (before.backend, before.vmpl, before.state) == ("test", 1, "ready")
    run(lambda: setup.service.get_report(REPORTER, b"", None, ReportOptions()))
    after = setup.service.properties(REPORTER)
    assert after.sev_status["product_source"] == "report"
    assert after.reported_tcb != 0 and after.statistics["firmware_requests"] == 1
    assert changes and set(changes[0]) <= {"product", "reported_tcb"}
    text = repr(vars(after))
    chip_id = AttestationReport.from_bytes(setup.broker.report).chip_id
    assert any(chip_id) and chip_id.hex() not in text and chip_id.hex().upper() not in text


def test_notify_refuses_names_that_are_no_property(milan: Platform) -> None:
    with pytest.raises(KeyError):
        make(milan).service.notify({"Product": "Milan"})


# -- caller credentials ---------------------------------------------------------------------------


def test_proc_credentials_have_so_peercreds_semantics(tmp_path: Any) -> None:
    status = tmp_path / "7" / "status"
    status.parent.mkdir()
    status.write_text("Uid:\t0\t1000\t1000\t1000\nGid:\t0\t50\t50\t50\nGroups:\t4 27\n")
    assert proc_credentials(7, 1000, str(tmp_path)) == {50, 4, 27}  # effective ids
    assert proc_credentials(7, 0, str(tmp_path)) == frozenset()  # the real uid is not enough

