"""Fuzzing: every parser and validator that takes outside input lets only its documented
typed error escape (issue 6, docs/architecture.md "Security model").

One property per target: arbitrary and mutated-real input either parses or raises the
named :mod:`snpd.errors` class (or, for the varlink wire, ``ProtocolError``); never
IndexError, struct.error, ValueError, UnicodeDecodeError, RecursionError, TypeError...

Profiles (registered here, applied per test so other modules keep their settings):
``ci`` (default; small, the module runs in well under a minute) and ``long``
(``SNPD_FUZZ_PROFILE=long``, ``SNPD_FUZZ_EXAMPLES`` examples per target, default
20000). Neither writes an example database. ``scripts/fuzz`` runs the long one.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import dataclasses
import datetime
import functools
import hashlib
import json
import math
import os
import struct
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Type

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from emuplatform import NOW, Platform  # type: ignore[import-not-found]
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from jwcrypto import jwe as jwcrypto_jwe
from jwcrypto import jwk as jwcrypto_jwk
from vectors import vectors_path  # type: ignore[import-not-found]

import snpd
from snpd.abi import hcl, strictjson, tpm
from snpd.abi.azure_evidence import AzureEvidence, parse_azure_evidence
from snpd.abi.certtable import (
    ARK_GUID,
    ASK_GUID,
    CRL_GUID,
    EXTRA_PLATFORM_INFO_GUID,
    GUID_KINDS,
    VCEK_GUID,
    VLEK_GUID,
    CertTableEntry,
    ExtraPlatformInfo,
    build_cert_table,
    parse_cert_table,
)
from snpd.abi.product import Product
from snpd.abi.report import AttestationReport, parse_report
from snpd.abi.uapi import DerivedKeyRequest
from snpd.access import Access, Caller
from snpd.config import Config, parse_config
from snpd.device.base import ExtendedReportRequest, ReportRequest
from snpd.errors import (
    CanonicalizationError,
    CertificateFormatError,
    CertTableError,
    ConfigError,
    EvidenceFormatError,
    InvalidArgument,
    KbsProtocolError,
    ReportFormatError,
    SnpdError,
)
from snpd.events import Events
from snpd.kbs import jcs as kbs_jcs
from snpd.kbs import jwe as kbs_jwe
from snpd.kbs import protocol as kbs_protocol
from snpd.kbs.jwe import TeeKey
from snpd.service import (
    CERTIFICATE_OPTIONS,
    TIMEOUT_OPTION,
    VERIFY_OPTIONS,
    CertificateOptions,
    KeyRequest,
    ReportOptions,
    SealingKeyRequest,
    Service,
    VerifyOptions,
    check_options,
)
from snpd.status.kernel_log import parse_kernel_log
from snpd.trust.appraisal import AppraisalPolicy
from snpd.trust.azure import quote_signature_check, verify_azure_evidence
from snpd.trust.certset import CertificateSet
from snpd.trust.result import Status, Verdict
from snpd.trust.vek import VekExtensions
from snpd.trust.verify import Verifier
from snpd.trust.x509 import (
    Certificate,
    Crl,
    Name,
    build_crl,
    load_certificate,
    load_certificates,
    load_crl,
)
from snpd.varlink.protocol import Framer, ProtocolError, decode_call

# -- profiles ------------------------------------------------------------------------------

_SUPPRESS = [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much]
settings.register_profile("ci", max_examples=int(os.environ.get("SNPD_FUZZ_CI_EXAMPLES", "200")),
                          deadline=None, database=None, suppress_health_check=_SUPPRESS)
settings.register_profile("long", max_examples=int(os.environ.get("SNPD_FUZZ_EXAMPLES", "20000")),
                          deadline=None, database=None, suppress_health_check=_SUPPRESS)
PROFILE = os.environ.get("SNPD_FUZZ_PROFILE", "ci")
fuzz = settings(settings.get_profile(PROFILE))

# Per-target example counts, printed at the end of the module (scripts/fuzz reads them).
COUNTS: Dict[str, int] = {}


def _count(target: str) -> None:
    COUNTS[target] = COUNTS.get(target, 0) + 1


@pytest.fixture(scope="module", autouse=True)
def _report_counts() -> Iterator[None]:
    yield
    path = os.environ.get("SNPD_FUZZ_COUNTS")
    if path:
        with open(path, "a", encoding="utf-8") as out:
            for target, n in sorted(COUNTS.items()):
                out.write(f"{target} {n}\n")


def _only(allowed: Tuple[Type[BaseException], ...], fn: Callable[..., Any], *args: Any,
          **kwargs: Any) -> Any:
    """Call fn; a raised exception must be one of ``allowed`` (anything else propagates
    and fails the property with its own traceback)."""
    try:
        return fn(*args, **kwargs)
    except allowed:
        return None


# -- real material from the shared vectors -----------------------------------------------


VECTORS = vectors_path()
REPORTS: List[bytes] = []
CERT_FILES: List[bytes] = []  # DER and PEM exactly as shipped
CERT_DERS: List[bytes] = []
if VECTORS is not None:
    for case in json.loads((VECTORS / "cases.json").read_text()):
        folder = VECTORS / case["dir"]
        REPORTS.append((folder / "report.bin").read_bytes())
        for f in sorted(folder.iterdir()):
            if f.suffix in (".pem", ".der"):
                CERT_FILES.append(f.read_bytes())
    for pem in sorted((VECTORS / "roots").glob("*.pem")):
        CERT_FILES.append(pem.read_bytes())
    for blob in CERT_FILES:
        CERT_DERS.extend(c.der for c in _only((CertificateFormatError,), load_certificates,
                                              blob) or [])
    CERT_DERS = sorted(set(CERT_DERS))

# The tests that draw from this material use the vectors fixture: without the vectors it
# says so, and a build without them (the .deb's) deselects them by that fixture.
needs_vectors = pytest.mark.usefixtures("vectors_dir")


def _make_crl() -> Crl:
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.derive_private_key(0x5EED, ec.SECP384R1())
    when = datetime.datetime(2025, 1, 1, tzinfo=datetime.timezone.utc)
    return build_crl(issuer=Name.build([("CN", "ARK-Milan"), ("O", "fuzz")]),
                     this_update=when, next_update=when + datetime.timedelta(days=30),
                     revoked=[(7, when), (1 << 70, when)], signing_key=key)


CRL = _make_crl()
PEM_CERT_LABEL = b"-----BEGIN CERTIFICATE-----\n"

# -- mutation strategies ---------------------------------------------------------------


@st.composite
def mutated(draw: st.DrawFn, seeds: Sequence[bytes]) -> bytes:
    """A seed with a few byte flips, overwrites, splices, truncations or extensions."""
    data = bytearray(draw(st.sampled_from(list(seeds))))
    for _ in range(draw(st.integers(0, 6))):
        op = draw(st.sampled_from(["flip", "set", "cut", "insert", "delete", "dup"]))
        n = len(data)
        if op == "flip" and n:
            i = draw(st.integers(0, n - 1))
            data[i] ^= 1 << draw(st.integers(0, 7))
        elif op == "set" and n:
            i = draw(st.integers(0, n - 1))
            data[i] = draw(st.sampled_from([0x00, 0x01, 0x7F, 0x80, 0x81, 0x82, 0x83, 0x84,
                                             0xFF, draw(st.integers(0, 255))]))
        elif op == "cut":
            data = data[:draw(st.integers(0, n))]
        elif op == "insert":
            i = draw(st.integers(0, n))
            data[i:i] = draw(st.binary(min_size=1, max_size=16))
        elif op == "delete" and n:
            i = draw(st.integers(0, n - 1))
            del data[i:i + draw(st.integers(1, 16))]
        elif op == "dup" and n:
            i = draw(st.integers(0, n - 1))
            data[i:i] = data[i:i + draw(st.integers(1, 64))]
    return bytes(data)


def _seeded(seeds: Sequence[bytes], max_size: int = 2048) -> st.SearchStrategy[bytes]:
    raw = st.binary(max_size=max_size)
    return st.one_of(raw, mutated(seeds)) if seeds else raw


# JSON-ish values: what varlink (JSON) and D-Bus (a{sv} variants) can carry, 64-bit ints.
_INT64 = st.integers(-(1 << 63), (1 << 64) - 1)
_SCALARS = st.one_of(st.none(), st.booleans(), _INT64, st.floats(), st.text(max_size=20),
                     st.binary(max_size=80))
JSONISH = st.recursive(_SCALARS, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.tuples(inner, inner),
    st.dictionaries(st.text(max_size=10), inner, max_size=4)), max_leaves=12)

# -- report parser ----------------------------------------------------------------------


@needs_vectors
@fuzz
@given(data=_seeded(REPORTS, max_size=1300),
       version=st.one_of(st.none(), st.integers(0, 0xFFFFFFFF)))
def test_fuzz_report_parser(data: bytes, version: Optional[int]) -> None:
    """AttestationReport.from_bytes / parse_report: ReportFormatError only; to_json of
    anything that parses never raises and is JSON-serialisable."""
    _count("report")
    if version is not None and len(data) >= 4:
        data = version.to_bytes(4, "little") + data[4:]
    parsed = _only((ReportFormatError,), AttestationReport.from_bytes, data)
    _only((ReportFormatError,), parse_report, data)
    if parsed is not None:
        for product in (None, *Product):
            json.dumps(parsed.to_json(product))


@fuzz
@given(data=st.one_of(st.none(), st.integers(), st.text(max_size=8), st.lists(st.integers())))
def test_fuzz_report_parser_non_bytes(data: object) -> None:
    _count("report")
    _only((ReportFormatError,), AttestationReport.from_bytes, data)


# -- certificate loader ----------------------------------------------------------------

_CERT_SEEDS = [*CERT_FILES, *CERT_DERS, CRL.der, CRL.to_pem().encode()]


@st.composite
def pem_mutations(draw: st.DrawFn) -> bytes:
    """PEM framing variants around real and random bodies."""
    label = draw(st.sampled_from([b"CERTIFICATE", b"X509 CRL", b"PRIVATE KEY", b"CERT"]))
    body = draw(st.one_of(st.binary(max_size=200).map(lambda b: __import__("base64")
                                                           .b64encode(b)),
                          st.binary(max_size=200),
                          st.sampled_from(_CERT_SEEDS) if _CERT_SEEDS else st.binary()))
    end = label if draw(st.booleans()) else draw(st.sampled_from([b"CERTIFICATE", b"X"]))
    return (b"-----BEGIN " + label + b"-----\n" + body + b"\n-----END " + end + b"-----\n"
            ) * draw(st.integers(1, 2))


def _exercise_certificate(cert: Certificate) -> None:
    """Everything a verifier reads from a certificate that parsed."""
    for fn in (lambda: cert.public_key, lambda: VekExtensions.from_certificate(cert),
               lambda: cert.basic_constraints_ca, lambda: cert.key_cert_sign,
               lambda: cert.crl_distribution_points, lambda: cert.is_self_issued,
               lambda: cert.sha256, lambda: cert.spki_sha256, lambda: cert.to_pem(),
               lambda: str(cert.subject), lambda: str(cert.issuer), lambda: repr(cert)):
        _only((CertificateFormatError,), fn)
    ext = _only((CertificateFormatError,), VekExtensions.from_certificate, cert)
    if ext is not None:
        _only((CertificateFormatError,), lambda: (ext.endorser, ext.product))


@fuzz
@given(data=st.one_of(_seeded(_CERT_SEEDS, max_size=4096), pem_mutations()))
def test_fuzz_certificate_loader(data: bytes) -> None:
    """load_certificates / load_certificate / load_crl, then every accessor and
    VekExtensions.from_certificate on whatever parsed: CertificateFormatError only
    (DerError and VekFormatError are its subclasses)."""
    _count("certificates")
    certs = _only((CertificateFormatError,), load_certificates, data) or []
    one = _only((CertificateFormatError,), load_certificate, data)
    crl = _only((CertificateFormatError,), load_crl, data)
    for cert in [*certs, *([one] if one else [])]:
        _exercise_certificate(cert)
    if crl is not None:
        _only((CertificateFormatError,), lambda: (crl.to_pem(), repr(crl)))


_KINDS = st.one_of(st.sampled_from(["ark", "ask", "asvk", "vcek", "vlek", "crl"]),
                   st.text(max_size=6))


@fuzz
@given(pairs=st.lists(st.tuples(_KINDS, _seeded(_CERT_SEEDS, max_size=4096)), max_size=4))
def test_fuzz_certificate_set_from_kinds(pairs: List[Tuple[str, bytes]]) -> None:
    """CertificateSet.from_kinds (the a(say) of D-Bus and varlink): CertificateFormatError."""
    _count("certset_from_kinds")
    certs = _only((CertificateFormatError,), CertificateSet.from_kinds, pairs)
    if certs is not None:
        list(certs.items())


# -- certificate table -----------------------------------------------------------------

_GUIDS = st.one_of(st.sampled_from([ARK_GUID, ASK_GUID, VCEK_GUID, VLEK_GUID, CRL_GUID,
                                    EXTRA_PLATFORM_INFO_GUID]),
                   st.uuids().filter(lambda u: u.int != 0))
_BLOBS = st.one_of(st.sampled_from(_CERT_SEEDS) if _CERT_SEEDS else st.binary(),
                   mutated(_CERT_SEEDS) if _CERT_SEEDS else st.binary(),
                   st.binary(max_size=64), st.binary(min_size=8, max_size=8))


@st.composite
def cert_tables(draw: st.DrawFn) -> bytes:
    entries = draw(st.lists(st.tuples(_GUIDS, _BLOBS), max_size=6))
    pad = draw(st.sampled_from([None, 16, 4096]))
    table = build_cert_table(entries, pad_to=pad)
    return draw(mutated([table])) if draw(st.booleans()) else table


@fuzz
@given(buf=st.one_of(cert_tables(), st.binary(max_size=512)))
def test_fuzz_cert_table(buf: bytes) -> None:
    """parse_cert_table: CertTableError only; CertificateSet.from_table on the entries:
    CertificateFormatError only; ExtraPlatformInfo.from_bytes: CertTableError only."""
    _count("cert_table")
    entries = _only((CertTableError,), parse_cert_table, buf)
    if entries is None:
        return
    for entry in entries:
        assert GUID_KINDS.get(entry.guid) == entry.kind
        if entry.guid == EXTRA_PLATFORM_INFO_GUID:
            info = _only((CertTableError,), ExtraPlatformInfo.from_bytes, entry.data)
            if info is not None:
                info.product  # noqa: B018
    certs = _only((CertificateFormatError,), CertificateSet.from_table, entries)
    if certs is not None:
        list(certs.items())


# -- varlink framing and JSON decoding -------------------------------------------------

_WIRE = st.one_of(
    st.binary(max_size=200),
    st.sampled_from([b"\0", b'{"method":"org.snpd.Attestation.GetReport"}\0', b"[" * 50,
                     b'{"a":' * 40, b"1e999999", b"\xff\xfe", b'"\\ud800"', b"NaN",
                     b'{"method":"a.b.C","parameters":{},"more":true,"oneway":true}',
                     b"99999999999999999999999"]))


@fuzz
@given(chunks=st.lists(_WIRE, max_size=8), limit=st.sampled_from([None, 1, 64, 1 << 20]))
def test_fuzz_varlink_framing(chunks: List[bytes], limit: Optional[int]) -> None:
    """Framer fed arbitrary chunks, each message through decode_call: only ProtocolError
    (a varlink CallError: the server answers it and keeps the connection's order)."""
    _count("varlink_framing")
    framer = Framer() if limit is None else Framer(limit)
    for chunk in chunks:
        framer.feed(chunk)
        while True:
            try:
                message = framer.next_message()
            except ProtocolError:
                return  # the connection is dropped after a framing error
            if message is None:
                break
            _only((ProtocolError,), decode_call, message)


def _dbus_seed() -> bytes:
    """A Ping with flags 6 (what busctl --auto-start=no sends)."""
    fields = bytes([1, 1]) + b"o\0" + (15).to_bytes(4, "little") + b"/org/snpd/Snpd1\0"
    fields += b"\0" * (-len(fields) & 7)
    fields += bytes([3, 1]) + b"s\0" + (4).to_bytes(4, "little") + b"Ping\0"
    head = b"l\x01\x06\x01" + (0).to_bytes(4, "little") + (1).to_bytes(4, "little")
    head += len(fields).to_bytes(4, "little") + fields
    return head + b"\0" * (-len(head) & 7)


@fuzz
@given(chunks=st.lists(_seeded([_dbus_seed()], max_size=512), max_size=6),
       limit=st.sampled_from([16, 64, 4096]))
def test_fuzz_dbus_framing(chunks: List[bytes], limit: int) -> None:
    """The D-Bus reader's framer and header-field parser (what snpd reads before
    dbus-fast sees anything): only WireError, the buffer bounded, and every flag
    byte reduced to one dbus-fast maps."""
    from snpd.dbus import wire

    _count("dbus_framing")
    framer = wire.Framer(limit, read_size=128)
    for chunk in chunks:
        try:
            events = framer.feed(chunk)
        except wire.WireError:
            return  # the reader closes a connection that is not D-Bus
        # One message (or an oversized one's header fields) plus the last chunk.
        assert framer.buffered <= max(limit, wire.FIXED_SIZE + wire.MAX_FIELDS) + len(chunk)
        for item in events:
            if isinstance(item, wire.Frame):
                assert len(item.data) <= limit
                assert wire.for_dbus_fast(item.data)[2] in (0, 1)


_CALL_MEMBERS = st.sampled_from(["method", "parameters", "oneway", "more", "upgrade", "x"])


@fuzz
@given(value=st.one_of(JSONISH.filter(lambda v: not isinstance(v, bytes)),
                       st.dictionaries(_CALL_MEMBERS, st.one_of(
                           JSONISH, st.sampled_from(["org.snpd.Keys.DeriveKey", "a.b", ""])),
                           max_size=5)),
       nest=st.integers(0, 3000))
def test_fuzz_varlink_decode_json_values(value: Any, nest: int) -> None:
    """decode_call on any JSON value (and on deep nesting): ProtocolError only."""
    _count("varlink_decode")
    text = json.dumps(value, default=lambda b: b.hex(), allow_nan=True)
    _only((ProtocolError,), decode_call, text.encode())
    _only((ProtocolError,), decode_call, (b"[" * nest + b"]" * nest))
    deep = b'{"method":' + b'{"a":' * nest + b"1" + b"}" * nest + b"}"
    _only((ProtocolError,), decode_call, deep)


@fuzz
@given(data=st.binary(max_size=300), text=st.text(max_size=100))
def test_fuzz_varlink_decode_bytes(data: bytes, text: str) -> None:
    _count("varlink_decode")
    _only((ProtocolError,), decode_call, data)
    _only((ProtocolError,), decode_call, text.encode("utf-8", "surrogatepass"))


# -- D-Bus / varlink argument validation through the transport-agnostic service ----------

REPORT_GID, KEY_GID = 900, 901


class _ListSink:
    def __init__(self) -> None:
        self.sent: List[Any] = []

    def send(self, fields: Any) -> None:
        self.sent.append(dict(fields))


@dataclasses.dataclass
class _State:
    state: str = "ready"
    reason: str = ""


@dataclasses.dataclass
class _Extended:
    report: bytes
    certificates: Sequence[CertTableEntry]


class FakeBroker:
    """Answers like the broker would, with canned (possibly mutated) firmware output."""

    def __init__(self, report: bytes, table: Sequence[CertTableEntry]) -> None:
        self.report = report
        self.table = table
        self.state = _State()

    def stats(self) -> Dict[str, int]:
        return {"requests": 1}

    async def submit(self, request: Any, *, client: Any, deadline: float,
                     user: Any = None, reserved: bool = False) -> Any:
        assert math.isfinite(deadline)
        if isinstance(request, ExtendedReportRequest):
            return _Extended(self.report, self.table)
        if isinstance(request, ReportRequest):
            return self.report
        assert isinstance(request, DerivedKeyRequest)
        return bytes(32)


_LOOP: Optional[asyncio.AbstractEventLoop] = None


def _run(coro: Any) -> Any:
    global _LOOP
    if _LOOP is None:
        _LOOP = asyncio.new_event_loop()
    return _LOOP.run_until_complete(coro)


@pytest.fixture(scope="module", autouse=True)
def _close_loop() -> Iterator[None]:
    yield
    global _LOOP
    if _LOOP is not None:
        _LOOP.run_until_complete(_LOOP.shutdown_default_executor())
        _LOOP.close()
        _LOOP = None


_CALLERS = st.builds(Caller, uid=st.sampled_from([0, 1000, 65534]),
                     gids=st.sampled_from([frozenset(), frozenset({REPORT_GID}),
                                           frozenset({KEY_GID}), frozenset({REPORT_GID, KEY_GID})]),
                     pid=st.none() | st.integers(1, 1 << 22),
                     transport=st.sampled_from(["dbus", "varlink"]))
_OPTION_KEYS = st.sampled_from(["timeout", "crl", "endorser", "certificates", "at", "policy",
                                "product", "x"])
_CERT_OPTION = st.lists(st.one_of(st.tuples(_KINDS, _BLOBS), JSONISH), max_size=3)
_OPTION_VALUES = st.one_of(JSONISH, _CERT_OPTION, st.sampled_from(
    [0.0, -1.0, 600.0, 600.5, math.inf, math.nan, 1e-300, "vcek", "vlek", "milan", "strict",
     1 << 62, -(1 << 63), True]))
OPTIONS = st.dictionaries(st.one_of(_OPTION_KEYS, st.text(max_size=8)), _OPTION_VALUES, max_size=4)
OWN_VMPL = 0xFFFFFFFF  # the D-Bus transport's "the guest's own VMPL"
_U32 = st.one_of(st.sampled_from([0, 1, 3, 4, OWN_VMPL]), st.integers(0, 0xFFFFFFFF))


def _own(vmpl: Any) -> Any:
    return None if vmpl == OWN_VMPL else vmpl


def _timeout(options: Any) -> ReportOptions:
    return ReportOptions(**check_options(options, TIMEOUT_OPTION, "fuzz"))


def _verify(options: Any) -> VerifyOptions:
    return VerifyOptions.from_plain(**check_options(options, VERIFY_OPTIONS, "fuzz"))


def _certificate(options: Any) -> CertificateOptions:
    return CertificateOptions(**check_options(options, CERTIFICATE_OPTIONS, "fuzz"))
_FIELDS = st.lists(st.one_of(st.sampled_from(["policy", "image_id", "family_id", "measurement",
                                              "guest_svn", "tcb_version"]), st.text(max_size=6)),
                   max_size=7)
# Values of the wire types (D-Bus signature / varlink interface) with arbitrary contents,
# and of the wrong type: the service must hold its ground in both cases.
_ANY = st.one_of(JSONISH, _INT64)


def _policy() -> AppraisalPolicy:
    return AppraisalPolicy.from_mapping({"allow_debug": False}, name="strict")


@needs_vectors
@fuzz
@given(caller=_CALLERS, method=st.sampled_from(
    ["get_report", "get_extended_report", "get_certificates", "verify_report", "get_evidence",
     "derive_key", "derive_sealing_key", "refresh_certificates"]),
    firmware=_seeded(REPORTS, max_size=1300), table=st.one_of(cert_tables(), st.just(b"")),
    report_data=st.one_of(st.binary(max_size=80), _ANY), vmpl=st.one_of(_U32, _ANY),
    options=st.one_of(OPTIONS, st.dictionaries(st.text(max_size=4), _ANY, max_size=3)),
    text=st.one_of(st.text(max_size=300), st.sampled_from(["trustee", "vcek", "vmrk"]), _ANY),
    fields=st.one_of(_FIELDS, st.lists(_ANY, max_size=3)),
    u32=st.one_of(_U32, _ANY), u64=st.one_of(st.integers(0, (1 << 64) - 1), _ANY),
    report=st.one_of(_seeded(REPORTS, max_size=4200), _ANY))
def test_fuzz_service_arguments(caller: Caller, method: str, firmware: bytes, table: bytes,
                                report_data: Any, vmpl: Any, options: Any, text: Any,
                                fields: Any, u32: Any, u64: Any, report: Any) -> None:
    """Every Service method with arbitrary argument values and option dicts: only
    SnpdError subclasses escape (InvalidArgument, PermissionDenied, NotSupported,
    CertificatesUnavailable for a missing cache; ReportFormatError when the canned
    firmware output is itself malformed)."""
    _count("service")
    entries = _only((CertTableError,), parse_cert_table, table) or ()
    service = Service(broker=FakeBroker(firmware, entries),  # type: ignore[arg-type]
                      access=Access(report_gids=frozenset({REPORT_GID}),
                                    key_gids=frozenset({KEY_GID})),
                      events=Events(_ListSink()), policies={"strict": _policy()})
    calls: Dict[str, Callable[[], Any]] = {
        "get_report": lambda: service.get_report(caller, report_data, _own(vmpl),
                                                 _timeout(options)),
        "get_extended_report": lambda: service.get_extended_report(
            caller, report_data, _own(vmpl), _timeout(options)),
        "get_certificates": lambda: service.get_certificates(caller, _certificate(options)),
        "verify_report": lambda: service.verify_report(caller, report, _verify(options)),
        "get_evidence": lambda: service.get_evidence(caller, text, report_data,
                                                     _timeout(options)),
        "derive_key": lambda: service.derive_key(
            caller, KeyRequest(text, fields, _own(vmpl), u32, u64), _timeout(options)),
        "derive_sealing_key": lambda: service.derive_sealing_key(
            caller, SealingKeyRequest(text, fields), _timeout(options)),
        "refresh_certificates": lambda: service.refresh_certificates(caller),
    }
    _only((SnpdError,), lambda: _run(calls[method]()))
    json.dumps(vars(service.properties()), default=repr)


# -- D-Bus arguments off the wire --------------------------------------------------------------

_DBUS_TEXT = st.text(st.characters(blacklist_characters="\0", blacklist_categories=("Cs",)),
                     max_size=12)
_DBUS_BASIC = st.one_of(
    st.tuples(st.just("b"), st.booleans()),
    st.tuples(st.just("y"), st.integers(0, 255)),
    st.tuples(st.just("i"), st.integers(-(1 << 31), (1 << 31) - 1)),
    st.tuples(st.just("u"), st.integers(0, (1 << 32) - 1)),
    st.tuples(st.just("x"), st.integers(-(1 << 63), (1 << 63) - 1)),
    st.tuples(st.just("t"), st.integers(0, (1 << 64) - 1)),
    st.tuples(st.just("d"), st.floats()),
    st.tuples(st.just("s"), st.one_of(_DBUS_TEXT, st.sampled_from(
        ["vcek", "vlek", "milan", "Genoa", "strict", "trustee"]))),
    st.tuples(st.just("ay"), st.binary(max_size=64)),
    st.tuples(st.just("a(say)"), st.lists(st.tuples(st.one_of(_KINDS, _DBUS_TEXT),
                                                   st.binary(max_size=48)).map(list),
                                         max_size=3)),
)


def _variant(sig: str, value: Any) -> Any:
    """A Variant, or where this dbus-fast refuses the pair (versions differ on what a
    struct may be), a plain string one: generating input must not fail the test."""
    from dbus_fast import Variant

    try:
        return Variant(sig, value)
    except Exception:  # dbus-fast's SignatureBodyMismatchError and kin
        return Variant("s", "unbuildable")


def _dbus_containers(children: Any) -> Any:
    def array(items: List[Tuple[str, Any]]) -> Tuple[str, Any]:
        sigs = {sig for sig, _ in items}
        if not items:
            return "as", []
        if sigs == {"y"}:
            return "ay", bytes(v for _, v in items)
        if len(sigs) == 1:
            return "a" + sigs.pop(), [v for _, v in items]
        return "av", [_variant(sig, v) for sig, v in items]

    return st.one_of(
        st.lists(children, max_size=3).map(array),
        st.lists(children, min_size=1, max_size=3).map(
            lambda items: ("(" + "".join(sig for sig, _ in items) + ")",
                           [v for _, v in items])),
        st.dictionaries(_DBUS_TEXT, children, max_size=3).map(
            lambda d: ("a{sv}", {k: _variant(sig, v) for k, (sig, v) in d.items()})),
        children.map(lambda sv: ("v", _variant(*sv))),
    )


_DBUS_VALUES = st.recursive(_DBUS_BASIC, _dbus_containers, max_leaves=12)


def _strings(value: Any) -> Iterator[str]:
    """Every string in a D-Bus value: keys, items, variants' contents."""
    from dbus_fast import Variant

    if isinstance(value, str):
        yield value
    elif isinstance(value, Variant):
        yield from _strings(value.value)
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from _strings(key)
            yield from _strings(item)
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _strings(item)


def _over_the_wire(options: Dict[str, Any]) -> Any:
    """``options`` as an ``a{sv}`` marshalled into a method call and read back the way
    the daemon's dbus-fast reads it: the types and values a peer can really send."""
    import inspect
    import io

    from dbus_fast import Message
    from dbus_fast._private.unmarshaller import Unmarshaller

    from snpd.dbus.service import _ESCAPE_NON_ASCII  # computed once, at import

    if _ESCAPE_NON_ASCII and not all(text.isascii() for text in _strings(options)):
        # dbus-fast 1.84 (Debian 12) writes such a string's length in characters: the
        # message is invalid, a bus refuses it, and 1.84's own unmarshaller may crash
        # on it (SIGSEGV). A peer with a correct marshaller sends it fine, and other
        # examples cover that.
        raise ValueError("this dbus-fast cannot marshal non-ASCII strings")
    message = Message(destination="org.snpd.Snpd1", path="/org/snpd/Snpd1",
                      interface="org.snpd.Snpd1.Attestation", member="GetReport",
                      signature="a{sv}", body=[options])
    marshall: Any = message._marshall
    wire = (marshall(False) if "negotiate_unix_fd" in inspect.signature(marshall).parameters
            else marshall())
    reader = Unmarshaller(io.BytesIO(bytes(wire)))
    reader.unmarshall()
    return reader.message.body[0]


@needs_vectors
@fuzz
@given(caller=_CALLERS, method=st.sampled_from(
    ["get_report", "get_extended_report", "get_certificates", "verify_report", "get_evidence",
     "derive_key", "derive_sealing_key"]),
    firmware=_seeded(REPORTS, max_size=1300),
    options=st.dictionaries(st.one_of(_OPTION_KEYS, _DBUS_TEXT), _DBUS_VALUES, max_size=4))
def test_fuzz_dbus_options(caller: Caller, method: str, firmware: bytes,
                           options: Dict[str, Tuple[str, Any]]) -> None:
    """The ``a{sv}`` options of every method as D-Bus really delivers them (any type a
    peer may marshal, nested variants, structs, dicts), decoded by the D-Bus
    transport and checked by the Service: only SnpdError subclasses escape."""
    from snpd.dbus.service import decode_options

    _count("dbus_options")
    try:
        received = _over_the_wire({k: _variant(sig, v) for k, (sig, v) in options.items()})
    except Exception:  # a value dbus-fast cannot marshal never reaches snpd
        event("not marshallable")
        return
    event("over the wire")
    opts = decode_options(received)
    service = Service(broker=FakeBroker(firmware, ()),  # type: ignore[arg-type]
                      access=Access(report_gids=frozenset({REPORT_GID}),
                                    key_gids=frozenset({KEY_GID})),
                      events=Events(_ListSink()), policies={"strict": _policy()})
    calls: Dict[str, Callable[[], Any]] = {
        "get_report": lambda: service.get_report(caller, b"n", None, _timeout(opts)),
        "get_extended_report": lambda: service.get_extended_report(caller, b"n", None,
                                                                   _timeout(opts)),
        "get_certificates": lambda: service.get_certificates(caller, _certificate(opts)),
        "verify_report": lambda: service.verify_report(caller, firmware, _verify(opts)),
        "get_evidence": lambda: service.get_evidence(caller, "trustee", b"n", _timeout(opts)),
        "derive_key": lambda: service.derive_key(caller, KeyRequest("vcek"), _timeout(opts)),
        "derive_sealing_key": lambda: service.derive_sealing_key(
            caller, SealingKeyRequest("app"), _timeout(opts)),
    }
    _only((SnpdError,), lambda: _run(calls[method]()))


# -- config parser -------------------------------------------------------------------------

_SECTION_KEYS = {
    "device": ["backend", "path", "configfs_root", "min_interval_ms", "request_timeout_s",
               "busy_retries"],
    "queue": ["max_pending", "per_client"],
    "kds": ["url", "mirrors", "timeout_s", "cache_dir", "offline", "offline_dirs"],
    "access": ["report_groups", "key_groups"],
    "dbus": ["enabled", "bus"],
    "varlink": ["enabled", "socket", "max_message_bytes", "max_connections",
                "max_connections_per_uid", "root_reserved_connections", "max_buffer_bytes",
                "max_buffer_bytes_per_uid", "root_reserved_buffer_bytes", "idle_timeout_s",
                "message_timeout_s"],
    "emulator": ["state_dir", "product"],
    "log": ["level"],
}
_POLICY_KEYS = [f.name for f in dataclasses.fields(AppraisalPolicy)]
_TOML_VALUES = st.one_of(
    st.sampled_from(["true", "false", "0", "-1", "1e999", "nan", "inf", '"/x"', '"auto"',
                     '"ioctl"', '"emulator"', '"https://kds.example"', '"milan"', "[]",
                     '["a", 1]', '{ a = 1 }', "1979-05-27T07:32:00Z", "0x7fffffffffffffff",
                     "9" * 30, '"\\u0000"', "'''x'''", '"' + "a" * 300 + '"', "[[[[1]]]]",
                     '"vcek"', "[0, 1]", "{ microcode = 1, snp = 2 }", '["00" ]']),
    st.integers().map(str), st.floats().map(repr),
    st.text(max_size=30).map(json.dumps))


@st.composite
def toml_docs(draw: st.DrawFn) -> str:
    lines: List[str] = []
    for _ in range(draw(st.integers(0, 4))):
        section = draw(st.sampled_from([*_SECTION_KEYS, "policy.strict", "policy", "bogus",
                                        "policy.a.b", "device.x"]))
        lines.append(f"[{section}]")
        keys = (_POLICY_KEYS if section.startswith("policy") else
                _SECTION_KEYS.get(section, ["k"]))
        for _ in range(draw(st.integers(0, 4))):
            key = draw(st.one_of(st.sampled_from(keys), st.sampled_from(["x", '"q"', "a.b"])))
            lines.append(f"{key} = {draw(_TOML_VALUES)}")
    doc = "\n".join(lines)
    if draw(st.booleans()):
        doc = draw(mutated([doc.encode()])).decode("utf-8", "replace")
    return doc


@fuzz
@given(text=st.one_of(toml_docs(), st.text(max_size=200),
                      st.text(st.characters(blacklist_categories=()), max_size=40)))
def test_fuzz_config_parser(text: str) -> None:
    """parse_config on TOML-ish and arbitrary text: ConfigError only."""
    _count("config_text")
    _only((ConfigError,), parse_config, text)


_MAP_KEYS = st.one_of(st.sampled_from([*_SECTION_KEYS, "policy", *_POLICY_KEYS,
                                       *[k for keys in _SECTION_KEYS.values() for k in keys]]),
                      st.text(max_size=6),
                      st.integers(), st.none())
NESTED = st.recursive(st.one_of(_SCALARS, st.integers(), st.sampled_from(
    ["ioctl", "emulator", "/run/x", "https://a.example", "milan", "debug", 1 << 70])),
    lambda inner: st.one_of(st.lists(inner, max_size=4),
                            st.dictionaries(_MAP_KEYS, inner, max_size=5)), max_leaves=20)


@st.composite
def config_mappings(draw: st.DrawFn) -> Any:
    doc: Dict[Any, Any] = {}
    for section in draw(st.lists(st.sampled_from([*_SECTION_KEYS, "policy"]), max_size=3)):
        if section == "policy":
            doc[section] = draw(st.dictionaries(st.text(max_size=6), st.one_of(
                policy_mappings(), NESTED), max_size=2))
        else:
            doc[section] = draw(st.one_of(st.dictionaries(st.sampled_from(
                _SECTION_KEYS[section]), NESTED, max_size=4), NESTED))
    return doc


@st.composite
def policy_mappings(draw: st.DrawFn) -> Any:
    return draw(st.dictionaries(st.one_of(st.sampled_from(_POLICY_KEYS), _MAP_KEYS), st.one_of(
        NESTED, st.sampled_from([True, False, 0, 7, [1, 51], "00" * 48, ["00" * 64],
                                 {"microcode": 1, "snp": 2, "tee": 0, "boot_loader": 0}])),
        max_size=5))


@fuzz
@given(data=st.one_of(config_mappings(), NESTED))
def test_fuzz_config_from_mapping(data: Any) -> None:
    """Config.from_mapping on arbitrary nested mappings: ConfigError only."""
    _count("config_mapping")
    _only((ConfigError,), Config.from_mapping, data)


# -- kernel log ------------------------------------------------------------------------

_KLOG = st.sampled_from([
    "Memory Encryption Features active: AMD SEV SEV-ES SEV-SNP",
    "AMD Memory Encryption Features active: SEV SEV-ES SEV-SNP", "SEV: Status: SEV SEV-ES SEV-SNP",
    "SEV: Using SNP CPUID table, {n} entries present", "SEV: SNP running at VMPL{n}",
    "sev-guest sev-guest: Initialized SEV guest driver (using vmpck_id {n})",
    "Initialized SEV guest driver (using VMPCK{n} communication key)",
    "Disabling vmpck_id {n} to prevent IV reuse",
    "Disabling VMPCK{n} communication key to prevent IV reuse",
    "Invalid VMPCK{n} communication key", "Empty VMPCK{n} communication key",
    "invalid vmpck id {n}", "vmpck id {n} is null",
    "Detected error from ASP request. rc: {n}, exitinfo2: 0x{n}",
    "SEV: SNP guest platform devices initialized", "[    0.000000] SEV: Status: {n}"])
_KLINES = st.one_of(
    st.builds(lambda t, n: t.replace("{n}", n), _KLOG,
              st.one_of(st.integers(-5, 1 << 80).map(str), st.text("0123456789", max_size=40),
                        st.text(max_size=8))),
    st.text(max_size=200), st.text(st.characters(blacklist_categories=()), max_size=50),
    st.text("SEV: Status VMPL0123()", max_size=5000))


@fuzz
@given(lines=st.lists(_KLINES, max_size=20))
def test_fuzz_kernel_log(lines: List[str]) -> None:
    """parse_kernel_log never raises at all, on any lines."""
    _count("kernel_log")
    facts = parse_kernel_log(iter(lines))
    repr(facts)


# -- appraisal policy ------------------------------------------------------------------


@fuzz
@given(data=st.one_of(policy_mappings(), NESTED))
def test_fuzz_appraisal_from_mapping(data: Any) -> None:
    """AppraisalPolicy.from_mapping: ConfigError only."""
    _count("appraisal_mapping")
    _only((ConfigError,), AppraisalPolicy.from_mapping, data, name="fuzz")


@st.composite
def policy_toml(draw: st.DrawFn) -> str:
    lines = [f"{draw(st.one_of(st.sampled_from(_POLICY_KEYS), st.just('x')))} = "
             f"{draw(_TOML_VALUES)}" for _ in range(draw(st.integers(0, 5)))]
    if draw(st.booleans()):
        lines.insert(0, draw(st.sampled_from(["[policy.a]", "[minimum_reported_tcb]",
                                              "[policy]", "[x]"])))
    return "\n".join(lines)


@fuzz
@given(text=st.one_of(policy_toml(), st.text(max_size=200)))
def test_fuzz_appraisal_from_toml(text: str) -> None:
    """AppraisalPolicy.from_toml: ConfigError only."""
    _count("appraisal_toml")
    _only((ConfigError,), AppraisalPolicy.from_toml, text, name="fuzz")


# -- Azure vTPM evidence: HCL report, TPM quote and signature, evidence documents ----------

AK_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
AK_NUMBERS = AK_KEY.public_key().public_numbers()
AZURE_NONCE = b"fuzz-nonce"
_PCRS = tuple(hashlib.sha256(bytes([i])).digest() for i in range(24))


def _b64url_int(value: int) -> str:
    raw = value.to_bytes((value.bit_length() + 7) // 8, "big")
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def _runtime_doc() -> Dict[str, Any]:
    """The runtime JSON as the HCL writes it; user-data starts with the nonce (v2)."""
    return {"keys": [{"kid": "HCLAkPub", "key_ops": ["sign"], "kty": "RSA",
                      "e": _b64url_int(AK_NUMBERS.e), "n": _b64url_int(AK_NUMBERS.n)}],
            "vm-configuration": {"console-enabled": False, "secure-boot": True,
                                 "tpm-enabled": True},
            "user-data": AZURE_NONCE.ljust(64, b"\0").hex()}


def _hcl_blob(runtime: bytes, snp: Optional[bytes] = None, *, var_size: Optional[int] = None,
              report_type: int = hcl.REPORT_TYPE_SNP, hash_type: int = hcl.HASH_TYPE_SHA256,
              pad: int = 16) -> bytes:
    """An HCL report around ``snp`` (default: zeros binding ``runtime``)."""
    if snp is None:
        snp = bytes(0x50) + hashlib.sha256(runtime).digest() + bytes(1184 - 0x70)
    size = len(runtime) if var_size is None else var_size
    header = b"HCLA" + struct.pack("<7I", 1, hcl.RUNTIME_DATA_OFFSET + len(runtime), 2, 0, 0,
                                   0, 0)
    request = struct.pack("<5I", 20 + len(runtime), 1, report_type, hash_type, size)
    return header + snp + request + runtime + bytes(pad)


def _tpm2b(data: bytes) -> bytes:
    return struct.pack(">H", len(data)) + data


def _marshal_quote(signer: bytes, extra: bytes, clock: Tuple[int, int, int, int],
                   firmware: int, count: int, selections: Sequence[Tuple[int, bytes]],
                   digest: bytes) -> bytes:
    """A TPMS_ATTEST quote from its fields (``count`` may disagree with ``selections``)."""
    return (struct.pack(">IH", tpm.TPM_GENERATED_VALUE, tpm.TPM_ST_ATTEST_QUOTE)
            + _tpm2b(signer) + _tpm2b(extra) + struct.pack(">QIIB", *clock)
            + struct.pack(">QI", firmware, count)
            + b"".join(struct.pack(">HB", alg, len(bitmap)) + bitmap
                       for alg, bitmap in selections)
            + _tpm2b(digest))


def _remarshal(quote: tpm.Quote) -> bytes:
    """A parsed quote marshalled again from its fields (the parser's inverse)."""
    selections = []
    for s in quote.pcr_selections:
        bitmap = bytearray(s.size_of_select)
        for pcr in s.pcrs:
            bitmap[pcr // 8] |= 1 << (pcr % 8)
        selections.append((s.hash_alg, bytes(bitmap)))
    return _marshal_quote(quote.qualified_signer, quote.extra_data,
                          (quote.clock, quote.reset_count, quote.restart_count,
                           int(quote.safe)), quote.firmware_version,
                          len(quote.pcr_selections), selections, quote.pcr_digest)


def _synthetic_quote(nonce: bytes = AZURE_NONCE) -> bytes:
    return _marshal_quote(b"\x00\x0b" + bytes(32), nonce, (123456, 2, 3, 1), 0x2021, 1,
                          [(tpm.TPM_ALG_SHA256, b"\xff\xff\xff")],
                          hashlib.sha256(b"".join(_PCRS)).digest())


def _sign(message: bytes) -> bytes:
    return AK_KEY.sign(message, padding.PKCS1v15(), hashes.SHA256())


RUNTIME = json.dumps(_runtime_doc()).encode()
QUOTE = _synthetic_quote()
QUOTE_SIGNATURE = _sign(QUOTE)
SYNTHETIC = AzureEvidence(version=1, hcl_report=_hcl_blob(RUNTIME), quote_message=QUOTE,
                          quote_signature=QUOTE_SIGNATURE, pcrs=_PCRS, vcek=b"\x30\x00")


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode()


def _pem_text(der: bytes) -> str:
    body = base64.encodebytes(der).decode()
    return f"-----BEGIN CERTIFICATE-----\n{body}-----END CERTIFICATE-----\n"


def evidence_document(evidence: AzureEvidence, version: int) -> Dict[str, Any]:
    """Trustee's document for ``evidence`` in form v0, v1 or v2."""
    if version == 0:
        doc: Dict[str, Any] = {"quote": {"signature": list(evidence.quote_signature),
                                         "message": list(evidence.quote_message),
                                         "pcrs": [list(p) for p in evidence.pcrs]},
                               "report": list(evidence.hcl_report)}
        if evidence.vcek is not None:
            doc["vcek"] = _pem_text(evidence.vcek)
        return doc
    doc = {"version": version, "hcl_report": _b64(evidence.hcl_report),
           "tpm_quote": {"signature": evidence.quote_signature.hex(),
                         "message": evidence.quote_message.hex(),
                         "pcrs": [p.hex() for p in evidence.pcrs]}}
    if evidence.vcek is not None:
        doc["vcek"] = _b64(evidence.vcek)
    return doc


# The real Azure evidence, when the vectors are there: extra seeds only. Every Azure
# target runs on the synthetic material above without them.
AZURE_REAL: List[Tuple[bytes, Path, bytes]] = []  # (evidence.json, its folder, nonce)
if VECTORS is not None and (VECTORS / "azure" / "cases.json").is_file():
    for case in json.loads((VECTORS / "azure" / "cases.json").read_text()):
        if case["expect"] == "valid":
            folder = VECTORS / case["dir"]
            AZURE_REAL.append(((folder / "evidence.json").read_bytes(), folder,
                               case["nonce_utf8"].encode()))
AZURE_REAL_PARSED = [parse_azure_evidence(doc) for doc, _, _ in AZURE_REAL]
HCL_SEEDS = [SYNTHETIC.hcl_report, *(e.hcl_report for e in AZURE_REAL_PARSED)]
QUOTE_SEEDS = [QUOTE, *(e.quote_message for e in AZURE_REAL_PARSED)]
_FRAMED = struct.pack(">HHH", tpm.TPM_ALG_RSASSA, tpm.TPM_ALG_SHA256, len(QUOTE_SIGNATURE))
SIGNATURE_SEEDS = [QUOTE_SIGNATURE, _FRAMED + QUOTE_SIGNATURE,
                   *(e.quote_signature for e in AZURE_REAL_PARSED)]
EVIDENCE_SEEDS = [json.dumps(evidence_document(SYNTHETIC, v)).encode() for v in (0, 1, 2)]
EVIDENCE_SEEDS += [doc for doc, _, _ in AZURE_REAL]

# Strict JSON values (no NaN, no Infinity, integers JSON round-trips everywhere).
STRICT_JSON = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-(1 << 70), 1 << 70),
              st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=20)),
    lambda inner: st.one_of(st.lists(inner, max_size=4),
                            st.dictionaries(st.text(max_size=8), inner, max_size=4)),
    max_leaves=12)
_B64URL_TEXT = st.text("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_=+/ ",
                       max_size=40)
_JWK_VALUES = st.one_of(
    STRICT_JSON, _B64URL_TEXT,
    st.sampled_from(["AQAB", "", "A", "AQ+B", "AQAB=", "HCLAkPub", "RSA", "EC",
                     _b64url_int(AK_NUMBERS.n), _b64url_int(AK_NUMBERS.n ^ 1),  # even
                     _b64url_int(AK_NUMBERS.n >> 1), _b64url_int((1 << 16385) - 1),
                     _b64url_int(1 << 16383), _b64url_int(65536), _b64url_int(3),
                     _b64url_int(AK_NUMBERS.n + 2)]),
    st.integers(0, 1 << 2100).map(_b64url_int),
    st.binary(max_size=300).map(lambda b: base64.urlsafe_b64encode(b).rstrip(b"=").decode()))
_JWKS = st.dictionaries(st.sampled_from(["kid", "kty", "n", "e", "key_ops", "x"]), _JWK_VALUES,
                        max_size=5).map(lambda d: {"kid": "HCLAkPub", **d})


@st.composite
def runtime_data(draw: st.DrawFn) -> bytes:
    """Runtime JSON: valid, with keys and members replaced by random values, any JSON
    value, random text, or mutated bytes."""
    kind = draw(st.sampled_from(["valid", "edited", "edited", "json", "text", "mutated"]))
    doc: Dict[str, Any] = _runtime_doc()
    if kind == "edited":
        for _ in range(draw(st.integers(1, 4))):
            where = draw(st.sampled_from(["top", "ak", "keys"]))
            if where == "top":
                member = draw(st.sampled_from(["keys", "vm-configuration", "user-data", "x"]))
                if draw(st.booleans()):
                    doc[member] = draw(_JWK_VALUES)
                else:
                    doc.pop(member, None)
            elif where == "ak" and isinstance(doc.get("keys"), list) and doc["keys"]:
                ak = doc["keys"][0]
                if isinstance(ak, dict):
                    ak[draw(st.sampled_from(["kid", "kty", "n", "e", "x"]))] = draw(_JWK_VALUES)
            else:
                doc["keys"] = draw(st.lists(st.one_of(_JWKS, _JWK_VALUES), max_size=3))
    elif kind == "json":
        return json.dumps(draw(STRICT_JSON)).encode()
    elif kind == "text":
        return draw(st.text(max_size=200)).encode("utf-8", "surrogatepass")
    elif kind == "mutated":
        return draw(mutated([RUNTIME]))
    return json.dumps(doc).encode()


@st.composite
def hcl_blobs(draw: st.DrawFn) -> bytes:
    """An HCL report around random runtime data, with random variable_data_size,
    report and hash types and padding; sometimes mutated further."""
    runtime = draw(runtime_data())
    var_size = draw(st.one_of(
        st.just(len(runtime)), st.integers(0, len(runtime) + 8),
        st.sampled_from([0, hcl.MAX_RUNTIME_DATA, hcl.MAX_RUNTIME_DATA + 1, 0xFFFFFFFF]),
        st.integers(0, 0xFFFFFFFF)))
    blob = _hcl_blob(runtime, var_size=var_size,
                     report_type=draw(st.sampled_from([2, 2, 2, 4, 0, 0xFFFFFFFF])),
                     hash_type=draw(st.sampled_from([1, 1, 1, 2, 0])),
                     pad=draw(st.integers(0, 64)))
    return draw(mutated([blob])) if draw(st.booleans()) else blob


@fuzz
@given(data=st.one_of(st.binary(max_size=2048), mutated(HCL_SEEDS), hcl_blobs()))
def test_fuzz_hcl_report(data: bytes) -> None:
    """HclReport.from_bytes: EvidenceFormatError only; what parses has the SNP report's
    1184 bytes, exactly variable_data_size bytes of runtime data (a JSON object), and
    an AK of 2048..16384 bits with a usable exponent."""
    _count("hcl_report")
    report = _only((EvidenceFormatError,), hcl.HclReport.from_bytes, data)
    event("refused" if report is None else "parsed")
    if report is None:
        return
    (var_size,) = struct.unpack_from("<I", data, hcl.RUNTIME_DATA_OFFSET - 4)
    assert data[:4] == hcl.HCL_SIGNATURE
    assert report.snp_report == data[hcl.SNP_REPORT_OFFSET:hcl.SNP_REPORT_OFFSET + 1184]
    assert len(report.snp_report) == hcl.SNP_REPORT_SIZE
    assert len(report.runtime_data) == var_size
    assert report.runtime_data == data[hcl.RUNTIME_DATA_OFFSET:hcl.RUNTIME_DATA_OFFSET
                                       + var_size]
    assert (report.report_type, report.hash_type) == (hcl.REPORT_TYPE_SNP,
                                                      hcl.HASH_TYPE_SHA256)
    assert isinstance(report.runtime, dict)
    assert hcl.MIN_RSA_BITS <= report.ak.bits <= hcl.MAX_RSA_BITS
    assert 3 <= report.ak.e < report.ak.n and report.ak.e % 2 == 1
    assert isinstance(report.vm_configuration, dict)
    _only((EvidenceFormatError,), lambda: report.user_data)


@fuzz
@given(data=st.one_of(runtime_data(), st.binary(max_size=300)),
       runtime=st.one_of(st.dictionaries(st.sampled_from(["keys", "x"]), st.one_of(
           st.lists(st.one_of(_JWKS, _JWK_VALUES), max_size=3), _JWK_VALUES), max_size=2),
           st.dictionaries(st.one_of(st.text(max_size=4), st.integers()), STRICT_JSON,
                           max_size=3)))
def test_fuzz_hcl_runtime(data: bytes, runtime: Dict[Any, Any]) -> None:
    """parse_runtime_json on any bytes and find_ak on any mapping: EvidenceFormatError
    only; parse_runtime_json gives an object, find_ak a key of 2048..16384 bits."""
    _count("hcl_runtime")
    parsed = _only((EvidenceFormatError,), hcl.parse_runtime_json, data)
    for value in (parsed, runtime):
        if value is None:
            continue
        assert isinstance(value, dict)
        ak = _only((EvidenceFormatError,), hcl.find_ak, value)
        if ak is not None:
            assert ak.kid == hcl.AK_KID and hcl.MIN_RSA_BITS <= ak.bits <= hcl.MAX_RSA_BITS


_HASH_ALGS = st.sampled_from([tpm.TPM_ALG_SHA1, tpm.TPM_ALG_SHA256, tpm.TPM_ALG_SHA384,
                              tpm.TPM_ALG_SHA512, 0x0000, 0x9999])


@st.composite
def tpm_quotes(draw: st.DrawFn) -> bytes:
    """A TPMS_ATTEST quote field by field, sizes and counts at and past their bounds."""
    selections = draw(st.lists(st.tuples(_HASH_ALGS, st.binary(max_size=6)), max_size=17))
    count = draw(st.one_of(st.just(len(selections)), st.sampled_from([0, 16, 17, 0xFFFFFFFF])))
    message = _marshal_quote(
        draw(st.binary(max_size=70)), draw(st.binary(max_size=70)),
        (draw(st.integers(0, (1 << 64) - 1)), draw(st.integers(0, 0xFFFFFFFF)),
         draw(st.integers(0, 0xFFFFFFFF)), draw(st.sampled_from([0, 1, 2, 255]))),
        draw(st.integers(0, (1 << 64) - 1)), count, selections, draw(st.binary(max_size=70)))
    return draw(mutated([message])) if draw(st.booleans()) else message


@fuzz
@given(data=st.one_of(st.binary(max_size=1100), mutated(QUOTE_SEEDS), tpm_quotes()))
def test_fuzz_tpm_quote(data: bytes) -> None:
    """Quote.from_bytes: EvidenceFormatError only; a quote that parses marshals back
    to exactly its bytes, within every bound."""
    _count("tpm_quote")
    quote = _only((EvidenceFormatError,), tpm.Quote.from_bytes, data)
    event("refused" if quote is None else "parsed")
    if quote is None:
        return
    assert quote.raw == data and _remarshal(quote) == data
    assert len(data) <= tpm.MAX_QUOTE and len(quote.extra_data) <= tpm.MAX_EXTRA_DATA
    assert len(quote.pcr_selections) <= tpm.MAX_SELECTIONS
    for s in quote.pcr_selections:
        assert s.size_of_select <= tpm.MAX_PCR_SELECT and all(p < 8 * s.size_of_select
                                                              for p in s.pcrs)


@st.composite
def tpm_signatures(draw: st.DrawFn) -> bytes:
    """A TPMT_SIGNATURE with any scheme, hash and size field around a value."""
    value = draw(st.one_of(st.binary(max_size=300), st.sampled_from([QUOTE_SIGNATURE,
                                                                     bytes(1025)])))
    size = draw(st.one_of(st.just(len(value)), st.integers(0, 0xFFFF)))
    return struct.pack(">HHH", draw(st.one_of(st.sampled_from(
        [tpm.TPM_ALG_RSASSA, tpm.TPM_ALG_RSAPSS, 0x0018]), st.integers(0, 0xFFFF))),
        draw(_HASH_ALGS), size) + value


@fuzz
@given(data=st.one_of(st.binary(max_size=1100), mutated(SIGNATURE_SEEDS), tpm_signatures()))
def test_fuzz_tpm_signature(data: bytes) -> None:
    """Signature.looks_like never raises; Signature.from_bytes: EvidenceFormatError only,
    and it accepts what looks_like says is framed unless the value is empty or too
    long; quote.signature is a Check, a pass only for the AK's signature."""
    _count("tpm_signature")
    looks = tpm.Signature.looks_like(data)
    sig = _only((EvidenceFormatError,), tpm.Signature.from_bytes, data)
    event("refused" if sig is None else "parsed")
    if sig is not None:
        assert looks and sig.signature and sig.scheme in ("RSASSA", "RSAPSS")
        assert struct.pack(">HHH", sig.sig_alg, sig.hash_alg, len(sig.signature)) \
            + sig.signature == data
    elif looks:
        assert len(data) == 6 or len(data) - 6 > tpm.MAX_SIGNATURE
    ak = hcl.RsaJwk(hcl.AK_KID, AK_NUMBERS.n, AK_NUMBERS.e)
    check = quote_signature_check(QUOTE, data, ak)
    assert check.status in (Status.PASS, Status.FAIL)
    if check.status is Status.PASS:
        assert data[-len(QUOTE_SIGNATURE):] == QUOTE_SIGNATURE


# Where each member of a document sits, and how its bytes are written there.
_V1_FIELDS = {("version",): None, ("hcl_report",): "b64", ("vcek",): "b64",
              ("tpm_quote",): None, ("tpm_quote", "signature"): "hex",
              ("tpm_quote", "message"): "hex", ("tpm_quote", "pcrs"): None,
              ("tpm_quote", "pcrs", 0): "hex", ("tpm_quote", "pcrs", 23): "hex",
              ("x",): None}
_V0_FIELDS = {("report",): "ints", ("vcek",): "pem", ("quote",): None,
              ("quote", "signature"): "ints", ("quote", "message"): "ints",
              ("quote", "pcrs"): None, ("quote", "pcrs", 0): "ints",
              ("quote", "pcrs", 23): "ints", ("version",): None, ("tpm_quote",): None}
_DOC_VALUES = st.one_of(
    STRICT_JSON, _B64URL_TEXT, st.text("0123456789abcdefABCDEFx", max_size=70),
    st.lists(st.integers(-1, 256), max_size=40),
    st.lists(st.one_of(st.integers(0, 255), st.booleans(), st.floats(0, 255)), max_size=8),
    st.lists(st.sampled_from(["00" * 32, "00" * 31, "zz" * 32, "0" * 64]), max_size=70),
    st.sampled_from([0, 1, 2, 3, -1, True, 1.0, "1", "", "=", "A", "AA==", "AAA=", "MA=x",
                     "-----BEGIN CERTIFICATE-----\n-----END CERTIFICATE-----",
                     "-----BEGIN CERTIFICATE-----" + " " * 3000,
                     "-----BEGIN CERTIFICATE-----\nMAA=\n-----END CERTIFICATE-----\n" * 2,
                     "-----BEGIN CERTIFICATE-----\n\u00a0MAA=\n-----END CERTIFICATE-----"]))


def _encode(data: bytes, how: str, draw: st.DrawFn) -> Any:
    if how == "hex":
        return data.hex()
    if how == "ints":
        return list(data)
    if how == "pem":
        return _pem_text(data)
    text = _b64(data)
    return text.rstrip("=") if draw(st.booleans()) else text


def _decode(value: Any, how: str) -> Optional[bytes]:
    """The bytes an unedited member holds (None when it is no longer of its form)."""
    try:
        if how == "hex":
            return bytes.fromhex(value)
        if how == "ints":
            return bytes(value)
        if how == "pem":
            return base64.b64decode("".join(value.splitlines()[1:-1]))
        return base64.urlsafe_b64decode(value + "=" * (-len(value) % 4))
    except (AttributeError, TypeError, ValueError, binascii.Error):
        return None


def _child(parent: Any, step: Any) -> Any:
    """``parent[step]`` when it is there, else None."""
    if isinstance(parent, dict):
        return parent.get(step)
    if isinstance(parent, list) and isinstance(step, int) and step < len(parent):
        return parent[step]
    return None


# The valid evidence evidence_edits starts from, by name (a short repr in reports).
EVIDENCE_BASES: Dict[str, AzureEvidence] = {"synthetic": SYNTHETIC}


@st.composite
def evidence_edits(draw: st.DrawFn, base: str) -> Dict[str, Any]:
    """EVIDENCE_BASES[base] as a v0, v1 or v2 document, then a few members replaced by
    random values, deleted, or their bytes mutated and written back in the member's form."""
    version = draw(st.sampled_from([0, 1, 2]))
    doc = evidence_document(EVIDENCE_BASES[base], version)
    fields = _V0_FIELDS if version == 0 else _V1_FIELDS
    for _ in range(draw(st.integers(0, 3))):
        path, how = draw(st.sampled_from(sorted(fields.items(), key=repr)))
        parent: Any = doc
        for step in path[:-1]:
            parent = _child(parent, step)
        last = path[-1]
        if not (isinstance(parent, dict) or _child(parent, last) is not None):
            continue
        action = draw(st.sampled_from(["replace", "delete", "mutate"] if how else
                                      ["replace", "delete"]))
        if action == "delete":
            if isinstance(parent, dict):
                parent.pop(last, None)
            else:
                del parent[last]
            continue
        raw = _decode(_child(parent, last), how) if how and action == "mutate" else None
        parent[last] = (_encode(draw(mutated([raw])), how, draw) if raw is not None
                        else draw(_DOC_VALUES))
    return doc


def _strict_text(doc: Any) -> Optional[str]:
    try:
        return json.dumps(doc, allow_nan=False)
    except ValueError:
        return None


@fuzz
@given(doc=st.one_of(evidence_edits("synthetic"), STRICT_JSON,
                     st.dictionaries(st.sampled_from(["version", "quote", "tpm_quote", "report",
                                                      "hcl_report", "vcek"]), _DOC_VALUES,
                                     max_size=5)),
       as_bytes=st.booleans())
def test_fuzz_azure_evidence_documents(doc: Any, as_bytes: bool) -> None:
    """parse_azure_evidence on v0/v1/v2-shaped documents with random members, decoded and
    as JSON text: EvidenceFormatError only, both forms agree, and what parses is a
    version 0..2 with at most 64 SHA-256-sized PCRs."""
    _count("azure_evidence")
    parsed = _only((EvidenceFormatError,), parse_azure_evidence, doc)
    event("refused" if parsed is None else f"parsed v{parsed.version}")
    text = _strict_text(doc)
    if text is not None:
        again = _only((EvidenceFormatError,), parse_azure_evidence,
                      text.encode() if as_bytes else text)
        assert again == parsed
    if parsed is not None:
        assert parsed.version == doc.get("version", 0)
        assert parsed.version in (0, 1, 2)
        assert len(parsed.pcrs) <= 64 and all(len(p) == 32 for p in parsed.pcrs)
        assert all(isinstance(b, bytes) for b in (parsed.hcl_report, parsed.quote_message,
                                                  parsed.quote_signature))


@fuzz
@given(data=st.one_of(st.binary(max_size=600), mutated(EVIDENCE_SEEDS),
                      st.text(max_size=200)))
def test_fuzz_azure_evidence_bytes(data: Any) -> None:
    """parse_azure_evidence on arbitrary and mutated JSON bytes and text:
    EvidenceFormatError only."""
    _count("azure_evidence")
    _only((EvidenceFormatError,), parse_azure_evidence, data)


_OPENERS = st.sampled_from([("[", "]"), ('{"a":', "}"), ('{"version":[', "]}"),
                            ('{"quote":{"message":', "}}"), ('{"keys":[{"n":', "}]}")])


@st.composite
def duplicate_keys(draw: st.DrawFn) -> str:
    """An object, possibly nested in arrays and objects, with one key twice."""
    key = json.dumps(draw(st.text(max_size=6)))
    members = [f"{key}:{json.dumps(draw(STRICT_JSON))}" for _ in range(2)]
    members += [f"{json.dumps('o' + str(i))}:1" for i in range(draw(st.integers(0, 3)))]
    body = "{" + ",".join(draw(st.permutations(members))) + "}"
    for _ in range(draw(st.integers(0, 3))):
        body = draw(st.sampled_from(["[{}]", '{{"k":{}}}', "[1,{}]"])).format(body)
    return body


@fuzz
@given(data=st.one_of(st.binary(max_size=300), st.text(max_size=200),
                      mutated([RUNTIME, *EVIDENCE_SEEDS[:3]]),
                      st.sampled_from([b"NaN", b"-Infinity", b"[1e999]", b'"\\ud800"',
                                       b"\xef\xbb\xbf{}", b"9" * 5000, b'{"a":1,"a":1}',
                                       b"\xed\xa0\x80", b"\xc0\xaf", b"[" * 3000])),
       nest=st.integers(0, 5000), opener=_OPENERS, dup=duplicate_keys())
def test_fuzz_strict_json(data: Any, nest: int, opener: Tuple[str, str], dup: str) -> None:
    """strictjson.loads on any bytes and text, nesting bombs and duplicate keys:
    EvidenceFormatError only; a duplicate key is always refused, and what parses is
    JSON with no NaN or Infinity. The evidence and runtime parsers on the bombs too."""
    _count("strict_json")
    value = _only((EvidenceFormatError,), strictjson.loads, data, what="fuzz", limit=8192)
    if value is not None:
        json.dumps(value, allow_nan=False)  # ValueError for a NaN or Infinity inside
    with pytest.raises(EvidenceFormatError, match="appears twice"):
        strictjson.loads(dup.encode(), what="fuzz", limit=1 << 16)
    head, tail = opener
    bomb = head * nest + "0" + tail * nest
    for parse in (lambda: strictjson.loads(bomb, what="fuzz", limit=1 << 20),
                  lambda: parse_azure_evidence(bomb.encode()),
                  lambda: hcl.parse_runtime_json(bomb.encode()),
                  lambda: hcl.HclReport.from_bytes(_hcl_blob(bomb.encode()))):
        _only((EvidenceFormatError,), parse)


# -- the Azure verifier end to end --------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _AzureCase:
    name: str
    evidence: AzureEvidence  # valid for nonce under certificates and verifier
    certificates: CertificateSet
    verifier: Verifier
    nonce: bytes


_AZURE_CASES: List[_AzureCase] = []


def _azure_cases(milan: Platform) -> List[_AzureCase]:
    """Valid evidence: an emulator-signed SNP report binding the runtime JSON in an HCL
    report, a quote by AK_KEY over the nonce, the emulator's VCEK in the document;
    and the real Azure evidence when the vectors are there."""
    if not _AZURE_CASES:
        snp = milan.report(report_data=hashlib.sha256(RUNTIME).digest() + bytes(32))
        evidence = dataclasses.replace(SYNTHETIC, hcl_report=_hcl_blob(RUNTIME, snp),
                                       vcek=milan.vcek.der)
        certs = CertificateSet(ark=milan.chain.ark, ask=milan.chain.ask)
        _AZURE_CASES.append(_AzureCase("emulated", evidence, certs,
                                       Verifier(milan.roots, clock=lambda: NOW), AZURE_NONCE))
        for (_, folder, nonce), parsed in zip(AZURE_REAL, AZURE_REAL_PARSED):
            full = snpd.certificate_set(folder)
            _AZURE_CASES.append(_AzureCase(f"real {folder.name}", parsed,
                                           CertificateSet(ark=full.ark, ask=full.ask),
                                           Verifier(), nonce))
        EVIDENCE_BASES.update((case.name, case.evidence) for case in _AZURE_CASES)
        for case in _AZURE_CASES:  # else the property below would hold vacuously
            for version in (0, 1, 2):
                document = evidence_document(case.evidence, version)
                verdict = verify_azure_evidence(document, case.certificates, case.nonce,
                                                verifier=case.verifier)
                assert verdict.valid or (version == 2 and case.nonce != AZURE_NONCE), \
                    verdict.to_json()
    return _AZURE_CASES


def _signed_content(evidence: AzureEvidence) -> Tuple[bytes, ...]:
    """What the signatures and bindings cover: the SNP report up to its signature, the
    runtime JSON, the quote and the PCR values."""
    report = hcl.HclReport.from_bytes(evidence.hcl_report)
    return (report.snp_report[:0x2A0], report.runtime_data, evidence.quote_message,
            *evidence.pcrs)


@fuzz
@given(data=st.data())
def test_fuzz_verify_azure_evidence(milan: Platform, data: st.DataObject) -> None:
    """verify_azure_evidence on edited and mutated valid evidence: never an exception,
    only a Verdict; one that is not valid names a failed check; and one that is valid
    has every signed or bound byte of the original (the edit changed only what no
    signature covers: encoding, padding, unsigned HCL header fields, the form)."""
    case = data.draw(st.sampled_from(_azure_cases(milan)), label="case")
    document = data.draw(st.one_of(
        evidence_edits(case.name),
        st.sampled_from([0, 1, 2]).flatmap(lambda v: mutated(
            [json.dumps(evidence_document(case.evidence, v)).encode()]))), label="document")
    _count("azure_verify")  # after the draws: a draw hypothesis rejects is no input
    verdict = verify_azure_evidence(document, case.certificates, case.nonce,
                                    verifier=case.verifier)
    assert isinstance(verdict, Verdict)
    if not verdict.valid:
        event("not valid")
        assert verdict.failures, verdict.to_json()
        return
    event("still valid")
    assert _signed_content(parse_azure_evidence(document)) == _signed_content(case.evidence)


# -- Trustee KBS (issue 15): canonical JSON, protocol messages, JWE ----------------------


@functools.cache
def _kbs_key(kind: str) -> TeeKey:
    return TeeKey.generate(kind)


@functools.cache
def _kbs_jwe(kind: str) -> bytes:
    """A JWE from jwcrypto (the independent library) to the kind's key; for EC, with epk
    moved into the protected header as Trustee has it (compact serialization's parts)."""
    key = _kbs_key(kind)
    token = jwcrypto_jwe.JWE(b"fuzz secret", protected=json.dumps({"alg": key.alg,
                                                                   "enc": "A256GCM"}))
    token.allowed_algs = [key.alg, "A256GCM"]
    token.add_recipient(jwcrypto_jwk.JWK(**key.public_jwk()))
    if kind.startswith("ec"):
        parts = token.serialize(compact=True).split(".")
        doc = dict(zip(("protected", "encrypted_key", "iv", "ciphertext", "tag"), parts))
        return json.dumps(doc).encode()
    return token.serialize().encode()


_KBS_KINDS = st.sampled_from(["ec-p256", "ec-p521", "rsa", "rsa1_5"])
_JWE_MEMBERS = st.sampled_from(["protected", "encrypted_key", "iv", "ciphertext", "tag", "aad",
                                "header", "unprotected", "recipients"])
_JWE_HEADER = st.sampled_from(["alg", "enc", "epk", "zip", "crit", "apu", "apv", "kid"])


@fuzz
@given(kind=_KBS_KINDS, data=st.data(),
       members=st.dictionaries(_JWE_MEMBERS, STRICT_JSON | _B64URL_TEXT, max_size=3),
       header=st.dictionaries(_JWE_HEADER, STRICT_JSON | _B64URL_TEXT, max_size=3))
def test_fuzz_kbs_jwe(kind: str, data: st.DataObject, members: Dict[str, Any],
                      header: Dict[str, Any]) -> None:
    """jwe.decrypt on arbitrary bytes, mutated JWEs, and JWEs with members or protected
    header fields replaced by random values: KbsProtocolError (SecretDecryptionError is
    one) only; what decrypts is the original plaintext."""
    _count("kbs_jwe")
    key, seed = _kbs_key(kind), _kbs_jwe(kind)
    raw = data.draw(st.one_of(st.binary(max_size=400), mutated([seed])))
    plaintext = _only((KbsProtocolError,), kbs_jwe.decrypt, key, raw)
    assert plaintext in (None, b"fuzz secret")
    doc = {**json.loads(seed), **members}
    if header and isinstance(doc.get("protected"), str):
        try:
            protected = json.loads(base64.urlsafe_b64decode(doc["protected"] + "=="))
        except ValueError:
            protected = None
        if isinstance(protected, dict):
            edited = json.dumps({**protected, **header}).encode()
            doc["protected"] = base64.urlsafe_b64encode(edited).rstrip(b"=").decode()
    plaintext = _only((KbsProtocolError,), kbs_jwe.decrypt, key, json.dumps(doc).encode())
    event("decrypts" if plaintext is not None else "refused")
    assert plaintext in (None, b"fuzz secret")


_KBS_TOKEN = ".".join(base64.urlsafe_b64encode(p).rstrip(b"=").decode() for p in (
    b'{"alg":"RS384"}', b'{"exp":1767225600,"tcb-status":{}}', b"sig"))
_KBS_BODIES = [
    b'{"nonce":"q3NXbc7mnh6Q0mwyAHbE7zgPYvJ/1b+IqCO6dB4ifKg=","extra-params":""}',
    json.dumps({"token": _KBS_TOKEN}).encode(),
    b'{"type":"https://github.com/confidential-containers/kbs/errors/AttestationError",'
    b'"detail":"verify TEE evidence failed"}',
]


@fuzz
@given(body=st.one_of(st.binary(max_size=300), st.text(max_size=200).map(str.encode),
                      mutated(_KBS_BODIES), STRICT_JSON.map(lambda v: json.dumps(v).encode())),
       token=st.one_of(st.text(max_size=200), mutated([_KBS_TOKEN.encode()]).map(
           lambda b: b.decode("utf-8", "replace"))),
       path=st.one_of(st.text(max_size=90), st.lists(st.text("ab._-/%\\", max_size=6),
                                                     max_size=5).map("/".join)))
def test_fuzz_kbs_protocol(body: bytes, token: str, path: str) -> None:
    """The parsers of what a KBS answers: KbsProtocolError only (parse_error: None, never
    an exception); resource_path: InvalidArgument only, and what passes is three segments
    none of which starts with '.'."""
    _count("kbs_protocol")
    challenge = _only((KbsProtocolError,), kbs_protocol.parse_challenge, body)
    if challenge is not None:
        assert 0 < len(challenge.nonce) <= kbs_protocol.MAX_NONCE
    _only((KbsProtocolError,), kbs_protocol.parse_token, body)
    info = kbs_protocol.parse_error(body)
    if info is not None:
        assert info.detail.isprintable() and len(info.detail) <= kbs_protocol.MAX_DETAIL + 3
    expiry = _only((KbsProtocolError,), kbs_protocol.token_expiry, token)
    assert expiry is None or 0 <= expiry < 2**63
    url = _only((InvalidArgument,), kbs_protocol.resource_path, path)
    if url is not None:
        assert url == kbs_protocol.RESOURCE_PREFIX + path
        segments = path.split("/")
        assert len(segments) == 3 and all(s and not s.startswith(".") for s in segments)


_ODD_VALUES = st.recursive(
    st.one_of(STRICT_JSON, st.binary(max_size=4), st.sets(st.integers(), max_size=2),
              st.floats(), st.text(st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF),
                                   min_size=1, max_size=2)),
    lambda inner: st.one_of(
        st.lists(inner, max_size=3), st.tuples(inner, inner),
        st.dictionaries(st.one_of(st.text(max_size=4), st.integers(), st.none()), inner,
                        max_size=3)),
    max_leaves=10)


@fuzz
@given(value=st.one_of(STRICT_JSON, _ODD_VALUES))
def test_fuzz_jcs(value: Any) -> None:
    """jcs.canonicalize on JSON values (ints past 2**53 included) and on what JSON has no
    form for (bytes, sets, NaN, lone surrogates, non-str keys): CanonicalizationError
    only; what canonicalizes reads back, every number a double, as an equal value whose
    canonical form is the same bytes."""
    _count("jcs")
    out = _only((CanonicalizationError,), kbs_jcs.canonicalize, value)
    if out is None:
        return
    back = json.loads(out.decode("utf-8"), parse_int=float)
    assert kbs_jcs.canonicalize(back) == out
    assert back == json.loads(json.dumps(value), parse_int=float)


def test_fuzz_allowed_errors_are_typed() -> None:
    """The errors the properties allow are all snpd.errors.SnpdError subclasses mapped to
    InvalidArgument, CertificatesUnavailable or KbsError (ProtocolError is the varlink
    wire's own)."""
    for cls in (ReportFormatError, CertificateFormatError, ConfigError, EvidenceFormatError,
                CanonicalizationError):
        assert issubclass(cls, InvalidArgument)
    assert CertTableError.kind == "CertificatesUnavailable"
    assert KbsProtocolError.kind == "KbsError"


# -- crashes the fuzzer found: deterministic reproducers ----------------------------------

_RSA_OID_DER = bytes.fromhex("06092a864886f70d010101")  # rsaEncryption in the SPKI


@needs_vectors
def test_an_unknown_spki_algorithm_is_a_typed_error() -> None:
    """Found by the fuzzer: cryptography's UnsupportedAlgorithm escaped untyped."""
    ark = next(d for d in CERT_DERS if _RSA_OID_DER in d)
    der = ark.replace(_RSA_OID_DER, bytes.fromhex("06092a864886f70d01017f"), 1)
    cert = Certificate.from_der(der)  # the structure still parses
    with pytest.raises(CertificateFormatError):
        cert.public_key  # noqa: B018
