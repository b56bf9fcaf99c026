"""The varlink server on a real socket, with a fake Service, called through snpd's
own client and through the independent PyPI ``varlink`` client.

The server runs on its own event loop in a thread, so that the synchronous
clients can be called from the test; every socket, loop and thread is closed
by the fixtures.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import datetime
import functools
import json
import os
import socket
import stat
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

import pytest
import varlink  # type: ignore[import-untyped]  # the independent client, test-only
from doubles import (  # type: ignore[import-not-found]
    FakeService,
    initial_properties,
    make_certificates,
)

from snpd import __version__, errors
from snpd.abi.product import Endorser, Product
from snpd.access import Access, proc_credentials
from snpd.service import (
    CertificateOptions,
    KeyRequest,
    ReportOptions,
    SealingKeyRequest,
    VerifyOptions,
)
from snpd.trust.certset import CertificateSet
from snpd.varlink import client as vclient
from snpd.varlink import server as vserver
from snpd.varlink.client import AsyncVarlinkClient, TransportError, VarlinkClient
from snpd.varlink.protocol import Kind
from snpd.varlink.server import ListenFd, VarlinkServer

REPO = Path(__file__).resolve().parents[2]
IDL_DIR = REPO / "snpd" / "varlink"
SNPD_INTERFACES = ("org.snpd.Attestation", "org.snpd.Keys", "org.snpd.Secrets",
                   "org.snpd.Manager")
ONE_METHOD = {  # a cheap method of each interface, to raise errors from
    "org.snpd.Attestation": ("org.snpd.Attestation.GetCertificates", {}),
    "org.snpd.Keys": ("org.snpd.Keys.DeriveSealingKey", {"label": "x"}),
    "org.snpd.Secrets": ("org.snpd.Secrets.GetToken", {"kbs": "fleet"}),
    "org.snpd.Manager": ("org.snpd.Manager.RefreshCertificates", {}),
}
WAIT = 30.0  # only a guard against hangs; no test asserts on time


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


@functools.lru_cache(maxsize=1)
def certificates() -> CertificateSet:
    """One emulator-signed ARK and ASK for every harness of this module (RSA keys take
    a while to make)."""
    return make_certificates()


class Harness:
    """A VarlinkServer on its own loop in a thread, bound to a short temp path."""

    def __init__(self, directory: str, service: FakeService, **options: Any) -> None:
        self.path = os.path.join(directory, "snpd.varlink")
        self.service = service
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.server = VarlinkServer(service, url="https://example.invalid/snpd", **options)
        self.closed = False
        self.opened: List[socket.socket] = []  # raw client sockets, closed by stop()
        try:
            self.run(self.server.bind(self.path))
        except BaseException:
            self.stop()
            raise

    def run(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(WAIT)

    def submit(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def connections(self) -> int:
        async def count() -> int:
            return self.server.connections
        return int(self.run(count()))

    def close_server(self) -> None:
        if not self.closed:
            self.closed = True
            self.run(self.server.close(timeout=WAIT))

    def stop(self) -> None:
        for sock in self.opened:
            sock.close()
        try:
            self.close_server()
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(WAIT)
            self.loop.close()


@pytest.fixture
def short_dir() -> Iterator[str]:
    """sun_path holds 108 bytes; pytest's tmp_path can be longer."""
    with tempfile.TemporaryDirectory(prefix="snpd-vl-") as directory:
        yield directory


@pytest.fixture
def make_harness(short_dir: str) -> Iterator[Callable[..., Harness]]:
    made: List[Harness] = []

    def make(service: Optional[FakeService] = None, **options: Any) -> Harness:
        sub = tempfile.mkdtemp(dir=short_dir)
        harness = Harness(sub, service or FakeService(certificates=certificates()),
                          **options)
        made.append(harness)
        return harness

    yield make
    for harness in made:
        harness.stop()


@pytest.fixture
def h(make_harness: Callable[..., Harness]) -> Harness:
    return make_harness()


@pytest.fixture
def client(h: Harness) -> Iterator[VarlinkClient]:
    with VarlinkClient(h.path, timeout=WAIT) as c:
        yield c


class Independent:
    """The PyPI varlink client: it fetches and parses our interface descriptions
    itself (GetInterfaceDescription) before it can call anything."""

    def __init__(self, path: str) -> None:
        self.client = varlink.Client(address=f"unix:{path}")
        self.conns: List[Any] = []

    def open(self, interface: str) -> Any:
        conn = self.client.open(interface)
        self.conns.append(conn)
        return conn

    def close(self) -> None:
        for conn in self.conns:
            conn.close()
        self.client.cleanup()


@pytest.fixture
def independent(h: Harness) -> Iterator[Independent]:
    ind = Independent(h.path)
    yield ind
    ind.close()


def raw_session(path: str, data: bytes, *, shut: bool = True) -> List[Any]:
    """Send raw bytes, read until the server closes; the replies, decoded.
    A reset (the server closed with our bytes unread) ends the reading too."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(WAIT)
        s.connect(path)
        try:
            s.sendall(data)
            if shut:
                s.shutdown(socket.SHUT_WR)
        except (BrokenPipeError, ConnectionResetError):
            pass
        received = b""
        while True:
            try:
                chunk = s.recv(65536)
            except ConnectionResetError:
                break
            if not chunk:
                break
            received += chunk
    assert received == b"" or received.endswith(b"\0")
    return [json.loads(m) for m in received.split(b"\0")[:-1]]


def wait_until(predicate: Callable[[], bool]) -> None:
    """Poll for a state change the server makes asynchronously (bounded by WAIT)."""
    for _ in range(int(WAIT / 0.01)):
        if predicate():
            return
        threading.Event().wait(0.01)
    raise AssertionError("condition not reached")


def call_message(method: str, parameters: Optional[Dict[str, Any]] = None, **flags: Any
                 ) -> bytes:
    return json.dumps({"method": method, "parameters": parameters or {}, **flags}).encode() + \
        b"\0"


# -- org.varlink.service ------------------------------------------------------------------------


def test_get_info(client: VarlinkClient, independent: Independent) -> None:
    info = client.call("org.varlink.service.GetInfo")
    assert info == {"vendor": "snpd", "product": "snpd", "version": __version__,
                    "url": "https://example.invalid/snpd",
                    "interfaces": ["org.varlink.service", *SNPD_INTERFACES]}
    assert independent.client.get_interfaces() == info["interfaces"]


def test_interface_descriptions_round_trip(client: VarlinkClient) -> None:
    for name in client.call("org.varlink.service.GetInfo")["interfaces"]:
        text = client.call("org.varlink.service.GetInterfaceDescription",
                           {"interface": name})["description"]
        assert varlink.Interface(text).name == name
        if name != "org.varlink.service":
            assert text == (IDL_DIR / f"{name}.varlink").read_text(encoding="utf-8")
    with pytest.raises(errors.NotSupported):
        client.call("org.varlink.service.GetInterfaceDescription", {"interface": "org.x.Y"})


def test_unknown_interface_and_method(h: Harness) -> None:
    replies = raw_session(h.path, b"".join([
        call_message("org.example.Nope.Method"),
        call_message("org.snpd.Attestation.GetNothing"),
        call_message("org.varlink.service.Explode"),
        call_message("not-a-method"),
        call_message("org.varlink.service.GetInterfaceDescription", {"interface": "x.y"}),
        call_message("org.varlink.service.GetInfo", {"unexpected": 1}),
        call_message("org.varlink.service.GetInfo"),
    ]))
    assert [(r.get("error"), r["parameters"]) for r in replies[:6]] == [
        ("org.varlink.service.InterfaceNotFound", {"interface": "org.example.Nope"}),
        ("org.varlink.service.MethodNotFound", {"method": "org.snpd.Attestation.GetNothing"}),
        ("org.varlink.service.MethodNotFound", {"method": "org.varlink.service.Explode"}),
        ("org.varlink.service.MethodNotFound", {"method": "not-a-method"}),
        ("org.varlink.service.InterfaceNotFound", {"interface": "x.y"}),
        ("org.varlink.service.InvalidParameter", {"parameter": "unexpected"}),
    ]
    assert replies[6]["parameters"]["vendor"] == "snpd"  # the connection stayed usable


# -- the interface files ---------------------------------------------------------------------------

IDL_TYPES = {Kind.STRING: "string", Kind.BYTES: "string", Kind.INT: "int", Kind.BOOL: "bool",
             Kind.OBJECT: "object", Kind.STRINGS: "[]string",
             Kind.CERTIFICATES: "[]Certificate"}


def _idl_type(t: Any) -> Tuple[str, bool]:
    """(type, optional) of a varlink-package type node."""
    from varlink import scanner

    if isinstance(t, scanner._Maybe):
        return _idl_type(t.element_type)[0], True
    if isinstance(t, scanner._Array):
        return "[]" + _idl_type(t.element_type)[0], False
    if isinstance(t, scanner._CustomType):
        return t.name, False
    if isinstance(t, scanner._Object):
        return "object", False
    for python, name in ((bool, "bool"), (int, "int"), (float, "float"), (str, "string")):
        if type(t) is python:
            return name, False
    raise AssertionError(f"unexpected IDL type {t!r}")


def test_idl_files_parse_and_match_the_method_table(h: Harness) -> None:
    from varlink import scanner

    table: Dict[str, List[Tuple[str, str, bool]]] = {}
    for name in SNPD_INTERFACES:
        iface = varlink.Interface((IDL_DIR / f"{name}.varlink").read_text(encoding="utf-8"))
        assert iface.name == name
        for member in iface.members.values():
            if isinstance(member, scanner._Method):
                table[f"{name}.{member.name}"] = [
                    (field, *_idl_type(t)) for field, t in member.in_type.fields.items()]
    assert set(table) == set(h.server.methods)
    for method, spec in h.server.methods.items():
        assert table[method] == [(f.name, IDL_TYPES[f.kind], f.optional) for f in spec.fields], \
            method


def test_idl_declares_every_error_kind_with_a_message() -> None:
    from varlink import scanner

    for name in SNPD_INTERFACES:
        iface = varlink.Interface((IDL_DIR / f"{name}.varlink").read_text(encoding="utf-8"))
        declared = {m.name: m for m in iface.members.values() if isinstance(m, scanner._Error)}
        assert set(declared) == set(errors.ALL_KINDS)
        for error in declared.values():
            fields = {k: _idl_type(t) for k, t in error.type.fields.items()}
            assert fields["message"] == ("string", False)
        assert set(declared["DeviceError"].type.fields) == {"message", "errno", "fw_error",
                                                            "vmm_error"}


def test_idl_is_package_data() -> None:
    text = (REPO / "pyproject.toml").read_text(encoding="utf-8")
    for name in SNPD_INTERFACES:
        assert f"varlink/{name}.varlink" in text or "varlink/*.varlink" in text


# -- org.snpd.* argument mapping ------------------------------------------------------------------


def _facts(report: bytes) -> Dict[str, Any]:
    """What the double wrote after report_data (tests/doubles.py)."""
    assert len(report) == 1184
    facts: Dict[str, Any] = json.loads(report[64:].rstrip(b"\0"))
    return facts


def test_get_report(client: VarlinkClient, h: Harness) -> None:
    out = client.call("org.snpd.Attestation.GetReport", {"report_data": b64(b"\x00nonce\xff")})
    assert base64.b64decode(out["report"])[:64] == b"\x00nonce\xff".ljust(64, b"\0")
    out = client.call("org.snpd.Attestation.GetReport",
                      {"report_data": "", "vmpl": 2, "options": {"timeout": 5}})
    assert _facts(base64.b64decode(out["report"]))["vmpl"] == 2
    assert h.service.calls == [("get_report", (b"\x00nonce\xff", None, ReportOptions())),
                               ("get_report", (b"", 2, ReportOptions(timeout=5.0)))]


def test_get_extended_report(client: VarlinkClient, h: Harness) -> None:
    out = client.call("org.snpd.Attestation.GetExtendedReport",
                      {"report_data": b64(b"n"), "vmpl": None, "options": None})
    assert base64.b64decode(out["report"])[:1] == b"n"
    assert out["certificates"] == [{"kind": kind, "data": b64(item.der)}
                                   for kind, item in h.service.certificates.items()]
    assert [c["kind"] for c in out["certificates"]] == ["ark", "ask"]
    assert h.service.calls == [("get_extended_report", (b"n", None, ReportOptions()))]


def test_get_certificates(client: VarlinkClient, h: Harness) -> None:
    out = client.call("org.snpd.Attestation.GetCertificates",
                      {"options": {"crl": True, "endorser": "vlek"}})
    assert [c["kind"] for c in out["certificates"]] == ["ark", "ask"]
    assert h.service.calls == [("get_certificates", (CertificateOptions(True, Endorser.VLEK),))]


def test_verify_report(client: VarlinkClient, h: Harness) -> None:
    ark = h.service.certificates.ark
    assert ark is not None
    out = client.call("org.snpd.Attestation.VerifyReport", {
        "report": b64(b"\x01" * 1184),
        "certificates": [{"kind": "ark", "data": b64(ark.der)}, {"kind": "vcek", "data": ""}],
        "at": 1700000000, "policy": "strict", "product": "Genoa"})
    assert out == {"valid": False, "product": "Milan", "failures": [],
                   "checks": [{"name": "size", "status": "pass", "detail": "1184 bytes"},
                              {"name": "option:at", "status": "skipped",
                               "detail": "1700000000"},
                              {"name": "option:certificates", "status": "skipped",
                               "detail": "kinds=[ark] defects=1"},
                              {"name": "option:policy", "status": "skipped",
                               "detail": "strict"},
                              {"name": "option:product", "status": "skipped",
                               "detail": "Genoa"}]}
    client.call("org.snpd.Attestation.VerifyReport", {"report": "", "at": None})
    (name, (report, options)), (_, (empty, none)) = h.service.calls
    assert name == "verify_report" and report == b"\x01" * 1184
    assert options.at == datetime.datetime(2023, 11, 14, 22, 13, 20,
                                           tzinfo=datetime.timezone.utc)
    assert (options.policy, options.product) == ("strict", Product.GENOA)
    assert options.certificates.ark == ark and options.certificates.vcek is None
    assert empty == b"" and none == VerifyOptions()


def test_verify_evidence(client: VarlinkClient, h: Harness) -> None:
    out = client.call("org.snpd.Attestation.VerifyEvidence", {
        "format": "az-snp-vtpm", "evidence": b64(b"ecnon"), "nonce": b64(b"nonce"),
        "policy": "azure", "product": "Milan"})
    assert out == {"valid": True, "product": "Milan", "failures": [], "checks": [
        {"name": "evidence", "status": "pass",
         "detail": "format=az-snp-vtpm evidence=5 nonce=5 policy=azure"},
        {"name": "report.signature", "status": "pass", "detail": "the double's"}]}
    [(name, (fmt, evidence, nonce, options))] = h.service.calls
    assert (name, fmt, evidence, nonce) == ("verify_evidence", "az-snp-vtpm", b"ecnon",
                                            b"nonce")
    assert options == VerifyOptions(policy="azure", product=Product.MILAN)


def test_get_evidence(client: VarlinkClient, h: Harness) -> None:
    out = client.call("org.snpd.Attestation.GetEvidence",
                      {"format": "trustee", "nonce": b64(b"\xab")})
    assert out == {"media_type": "application/json", "evidence": b64(b'{"nonce": "ab"}')}
    assert h.service.calls == [("get_evidence", ("trustee", b"\xab", ReportOptions()))]


def test_derive_key(client: VarlinkClient, h: Harness) -> None:
    out = client.call("org.snpd.Keys.DeriveKey", {"root_key": "vcek", "fields": []})
    assert len(base64.b64decode(out["key"])) == 32
    client.call("org.snpd.Keys.DeriveKey", {
        "root_key": "vmrk", "fields": ["measurement", "policy"], "vmpl": 1, "guest_svn": 7,
        "tcb_version": (1 << 64) - 1, "options": {"timeout": 1.5}})
    assert h.service.calls == [
        ("derive_key", (KeyRequest("vcek"), ReportOptions())),
        ("derive_key", (KeyRequest("vmrk", ("measurement", "policy"), 1, 7, (1 << 64) - 1),
                        ReportOptions(1.5))),
    ]


def test_derive_sealing_key(client: VarlinkClient, h: Harness) -> None:
    key = client.call("org.snpd.Keys.DeriveSealingKey", {"label": "app"})["key"]
    assert len(base64.b64decode(key)) == 32
    client.call("org.snpd.Keys.DeriveSealingKey",
                {"label": "app", "fields": ["image_id"], "options": {}})
    assert h.service.calls == [
        ("derive_sealing_key", (SealingKeyRequest("app"), ReportOptions())),
        ("derive_sealing_key", (SealingKeyRequest("app", ("image_id",)), ReportOptions()))]


def test_manager(client: VarlinkClient, h: Harness) -> None:
    assert client.call("org.snpd.Manager.RefreshCertificates") == {}
    assert h.service.calls == [("refresh_certificates", ())]
    props = client.call("org.snpd.Manager.Describe")["properties"]
    assert props == {"backend": "emulator", "report_data": "caller", "product": "Milan",
                     "vmpl": 0, "reported_tcb": 0,
                     "state": "ready", "state_reason": "", "version": "0.0-fake",
                     "sev_status": dict(initial_properties().sev_status),
                     "statistics": {"calls": 1}}
    old = client.call("org.snpd.Manager.GetProperties")["properties"]
    assert old["org.snpd.Snpd1.Attestation"] == {
        "Backend": "emulator", "ReportDataBinding": "caller", "Product": "Milan", "Vmpl": 0,
        "ReportedTcb": 0, "State": "ready", "StateReason": ""}
    assert old["org.snpd.Snpd1.Manager"]["Version"] == "0.0-fake"


def test_properties_say_what_report_data_binds(client: VarlinkClient, h: Harness) -> None:
    """The service's binding, as Describe and GetProperties carry it: "caller" (the
    emulator's), then "runtime-data" (the emulated Azure CVM's)."""
    seen = []
    for binding in ("caller", "runtime-data"):
        h.service.notify({"backend": "emulator" if binding == "caller" else "azure",
                          "report_data": binding})
        typed = client.call("org.snpd.Manager.Describe")["properties"]
        old = client.call("org.snpd.Manager.GetProperties")["properties"]
        seen.append((typed["backend"], typed["report_data"],
                     old["org.snpd.Snpd1.Attestation"]["ReportDataBinding"]))
    assert seen == [("emulator", "caller", "caller"), ("azure", "runtime-data", "runtime-data")]


def test_properties_values_as_json(client: VarlinkClient, h: Harness) -> None:
    """Bytes, tuples and 64-bit integers in a property keep their JSON forms."""
    h.service.notify({"reported_tcb": 1 << 63,
                      "sev_status": {"vmpck": 0, "raw": b"\x01", "features": ("SNP", "VMPL")}})
    props = client.call("org.snpd.Manager.Describe")["properties"]
    assert props["reported_tcb"] == 1 << 63
    assert props["sev_status"] == {"vmpck": 0, "raw": b64(b"\x01"), "features": ["SNP", "VMPL"]}


def test_every_method_through_the_independent_client(independent: Independent,
                                                      h: Harness) -> None:
    att = independent.open("org.snpd.Attestation")
    assert base64.b64decode(att.GetReport(report_data=b64(b"x"))["report"])[:1] == b"x"
    report = att.GetReport(report_data=b64(b"y"), vmpl=3, options={"timeout": 2})["report"]
    assert _facts(base64.b64decode(report))["timeout"] == 2.0
    ext = att.GetExtendedReport(report_data=b64(b"z"))
    assert ext["certificates"][1]["kind"] == "ask"
    assert att.GetCertificates()["certificates"][0]["kind"] == "ark"
    verdict = att.VerifyReport(report=b64(b"r"), certificates=[{"kind": "ark", "data": "QQ=="}],
                               at=5)
    assert verdict["valid"] is False and verdict["checks"][0]["name"] == "size"
    assert att.GetEvidence(format="trustee", nonce="")["media_type"] == "application/json"
    keys = independent.open("org.snpd.Keys")
    assert len(keys.DeriveKey(root_key="vcek", fields=["policy"], guest_svn=1)["key"]) == 44
    assert len(keys.DeriveSealingKey(label="l", fields=["measurement"])["key"]) == 44
    manager = independent.open("org.snpd.Manager")
    assert manager.RefreshCertificates() == {}
    described = manager.Describe()["properties"]  # parsed by its reading of our interface
    assert (described["version"], described["report_data"]) == ("0.0-fake", "caller")
    assert manager.GetProperties()["properties"]["org.snpd.Snpd1.Manager"]["Version"] == \
        "0.0-fake"
    assert [name for name, _ in h.service.calls] == [
        "get_report", "get_report", "get_extended_report", "get_certificates", "verify_report",
        "get_evidence", "derive_key", "derive_sealing_key", "refresh_certificates"]
    assert h.service.calls[1][1] == (b"y", 3, ReportOptions(2.0))
    assert h.service.calls[4][1][1].at.timestamp() == 5
    assert h.service.calls[6][1] == (KeyRequest("vcek", ("policy",), None, 1, 0),
                                     ReportOptions())


def test_oneway_call_through_the_independent_client(independent: Independent,
                                                     h: Harness) -> None:
    manager = independent.open("org.snpd.Manager")
    assert manager.RefreshCertificates(_oneway=True) is None
    assert "version" in independent.open("org.varlink.service").GetInfo()
    assert h.service.calls == [("refresh_certificates", ())]


@pytest.mark.parametrize("parameters, bad", [
    ({"report_data": "%%%"}, "report_data"),
    ({"report_data": "AAA"}, "report_data"),
    ({}, "report_data"),
    ({"report_data": "", "vmpl": -1}, "vmpl"),
    ({"report_data": "", "vmpl": 1 << 32}, "vmpl"),
    ({"report_data": "", "vmpl": "0"}, "vmpl"),
    ({"report_data": "", "options": [1]}, "options"),
    ({"report_data": "", "nonce": ""}, "nonce"),
])
def test_invalid_parameters_are_named(h: Harness, client: VarlinkClient,
                                      parameters: Dict[str, Any], bad: str) -> None:
    reply = raw_session(h.path, call_message("org.snpd.Attestation.GetReport", parameters))
    assert reply == [{"error": "org.varlink.service.InvalidParameter",
                      "parameters": {"parameter": bad}}]
    with pytest.raises(errors.InvalidArgument, match=bad):
        client.call("org.snpd.Attestation.GetReport", parameters)
    assert h.service.calls == []


# -- errors ------------------------------------------------------------------------------------

KIND_CLASSES = {cls.kind: cls for cls in (
    errors.InvalidArgument, errors.PermissionDenied, errors.Busy, errors.Timeout,
    errors.DeviceError, errors.VmpckDisabled, errors.NotSupported,
    errors.CertificatesUnavailable, errors.KbsError, errors.Internal)}


@pytest.mark.parametrize("interface", SNPD_INTERFACES)
@pytest.mark.parametrize("kind", errors.ALL_KINDS)
def test_each_error_kind_maps_to_its_varlink_name(h: Harness, client: VarlinkClient,
                                                  interface: str, kind: str) -> None:
    method, parameters = ONE_METHOD[interface]
    h.service.fail = KIND_CLASSES[kind](f"{kind} happened")
    reply = raw_session(h.path, call_message(method, parameters))
    assert reply == [{"error": f"{interface}.{kind}",
                      "parameters": {"message": f"{kind} happened"}}]
    with pytest.raises(errors.SnpdError) as info:
        client.call(method, parameters)
    assert type(info.value) is KIND_CLASSES[kind]
    assert str(info.value) == f"{kind} happened"
    assert client.call("org.varlink.service.GetInfo")["vendor"] == "snpd"  # still connected


def test_error_subclasses_travel_as_their_kind(h: Harness, client: VarlinkClient) -> None:
    h.service.fail = errors.ReportFormatError("not a report")
    with pytest.raises(errors.InvalidArgument, match="not a report"):
        client.call("org.snpd.Attestation.GetCertificates")
    h.service.fail = errors.DeviceUnavailable("no /dev/sev-guest")
    reply = raw_session(h.path, call_message("org.snpd.Keys.DeriveSealingKey", {"label": "x"}))
    assert reply[0] == {"error": "org.snpd.Keys.DeviceError",
                        "parameters": {"message": "no /dev/sev-guest"}}


def test_device_error_carries_its_codes(h: Harness, client: VarlinkClient,
                                        independent: Independent) -> None:
    h.service.fail = errors.DeviceError("firmware said no", errno=5, fw_error=0x16,
                                        vmm_error=0x100000000)
    reply = raw_session(h.path, call_message("org.snpd.Attestation.GetReport",
                                             {"report_data": ""}))
    assert reply == [{"error": "org.snpd.Attestation.DeviceError", "parameters": {
        "message": "firmware said no (errno=5, fw_error=0x16, vmm_error=0x100000000)",
        "errno": 5, "fw_error": 0x16, "vmm_error": 0x100000000}}]
    with pytest.raises(errors.DeviceError) as info:
        client.call("org.snpd.Attestation.GetReport", {"report_data": ""})
    assert (info.value.errno, info.value.fw_error, info.value.vmm_error) == (5, 0x16, 1 << 32)
    assert str(info.value).startswith("firmware said no (errno=5")
    with pytest.raises(varlink.VarlinkError) as vinfo:
        independent.open("org.snpd.Attestation").GetReport(report_data="")
    assert vinfo.value.error() == "org.snpd.Attestation.DeviceError"
    assert vinfo.value.parameters()["fw_error"] == 0x16


def test_unexpected_exception_is_internal_without_traceback(
        h: Harness, client: VarlinkClient, caplog: pytest.LogCaptureFixture) -> None:
    h.service.fail = ZeroDivisionError("secret detail")
    reply = raw_session(h.path, call_message("org.snpd.Manager.RefreshCertificates"))
    assert reply[0]["error"] == "org.snpd.Manager.Internal"
    text = json.dumps(reply)
    assert "secret" not in text and "Traceback" not in text and "ZeroDivision" not in text
    with pytest.raises(errors.Internal):
        client.call("org.snpd.Manager.GetProperties")
    h.service.fail = None
    assert client.call("org.snpd.Manager.RefreshCertificates") == {}
    assert any("ZeroDivisionError" in (r.exc_text or "") for r in caplog.records)


def test_error_from_reply() -> None:
    exc = vclient.error_from_reply("org.snpd.Keys.Busy", {"message": "later"})
    assert type(exc) is errors.Busy and str(exc) == "later"
    assert type(vclient.error_from_reply("org.snpd.Keys.Nope", {"message": "m"})) is \
        errors.Internal
    assert type(vclient.error_from_reply("com.other.Busy", {"message": "m"})) is errors.Internal
    assert type(vclient.error_from_reply("org.snpd.Keys.Busy", {})) is errors.Internal
    assert type(vclient.error_from_reply("org.varlink.service.InvalidParameter",
                                         {"parameter": "x"})) is errors.InvalidArgument
    for name in ("InterfaceNotFound", "MethodNotFound", "MethodNotImplemented"):
        assert type(vclient.error_from_reply(f"org.varlink.service.{name}", {})) is \
            errors.NotSupported
    assert type(vclient.error_from_reply("org.varlink.service.PermissionDenied", {})) is \
        errors.PermissionDenied
    assert type(vclient.error_from_reply("org.varlink.service.ExpectedMore", {})) is \
        errors.Internal


# -- protocol on the wire ---------------------------------------------------------------------


def test_pipelined_calls_are_answered_in_order(h: Harness) -> None:
    replies = raw_session(h.path, b"".join(
        call_message("org.snpd.Attestation.GetReport", {"report_data": b64(bytes([i]))})
        for i in range(20)))
    assert [base64.b64decode(r["parameters"]["report"])[:64] for r in replies] == [
        bytes([i]).ljust(64, b"\0") for i in range(20)]


def test_oneway_gets_no_reply_more_gets_one_upgrade_is_refused(h: Harness) -> None:
    replies = raw_session(h.path, b"".join([
        call_message("org.snpd.Manager.RefreshCertificates", oneway=True),
        call_message("org.snpd.Attestation.GetNothing", oneway=True),  # errors too are silent
        call_message("org.snpd.Attestation.GetReport", {"report_data": ""}, more=True),
        call_message("org.snpd.Attestation.GetReport", {"report_data": ""}, upgrade=True),
        call_message("org.varlink.service.GetInfo"),
    ]))
    assert list(replies[0]) == ["parameters"]  # no "continues"
    assert base64.b64decode(replies[0]["parameters"]["report"])[:64] == bytes(64)
    assert replies[1] == {"error": "org.varlink.service.InvalidParameter",
                          "parameters": {"parameter": "upgrade"}}
    assert replies[2]["parameters"]["vendor"] == "snpd"
    assert len(replies) == 3
    assert [name for name, _ in h.service.calls] == ["refresh_certificates", "get_report"]


@pytest.mark.parametrize("garbage, parameter", [
    (b"{this is not json}\0", ""),
    (b"\xff\xfe\0", ""),
    (b"[1,2]\0", ""),
    (b'{"method": 5}\0', "method"),
    (b'{"method": "org.varlink.service.GetInfo", "bogus": true}\0', "bogus"),
])
def test_malformed_messages_get_an_error_then_disconnect(h: Harness, garbage: bytes,
                                                         parameter: str) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as other:
        other.connect(h.path)  # a connection open across the bad one
        replies = raw_session(h.path, call_message("org.varlink.service.GetInfo") + garbage
                              + call_message("org.varlink.service.GetInfo"), shut=False)
        assert replies[0]["parameters"]["vendor"] == "snpd"  # before the garbage: served
        assert replies[1:] == [{"error": "org.varlink.service.InvalidParameter",
                                "parameters": {"parameter": parameter}}]  # then closed
        other.sendall(call_message("org.varlink.service.GetInfo"))
        other.settimeout(WAIT)
        assert other.recv(65536).endswith(b"\0")
    with VarlinkClient(h.path, timeout=WAIT) as fresh:
        assert fresh.call("org.varlink.service.GetInfo")["vendor"] == "snpd"


def test_a_10_mb_message_gets_an_error_then_disconnect(h: Harness) -> None:
    replies = raw_session(h.path, b'{"method":"org.varlink.service.GetInfo","parameters":{"x":"'
                          + b"A" * (10 << 20), shut=False)
    assert replies == [{"error": "org.varlink.service.InvalidParameter",
                        "parameters": {"parameter": ""}}]
    with VarlinkClient(h.path, timeout=WAIT) as fresh:
        assert fresh.call("org.varlink.service.GetInfo")["vendor"] == "snpd"
    wait_until(lambda: h.connections() == 0)


def test_own_client_reports_the_oversize_reason(h: Harness) -> None:
    with VarlinkClient(h.path, timeout=WAIT) as c, pytest.raises(errors.InvalidArgument):
        c.call("org.snpd.Attestation.GetReport", {"report_data": "A" * (2 << 20)})


def test_message_limit_is_configurable(make_harness: Callable[..., Harness]) -> None:
    h = make_harness(max_message=200)
    with VarlinkClient(h.path, timeout=WAIT) as c:
        assert c.call("org.snpd.Attestation.GetReport", {"report_data": "AA=="})
        with pytest.raises(errors.InvalidArgument):
            c.call("org.snpd.Attestation.GetReport", {"report_data": "A" * 400})


# -- identity, socket, activation ----------------------------------------------------------------


def test_peer_credentials_reach_the_service(client: VarlinkClient, h: Harness) -> None:
    client.call("org.snpd.Attestation.GetReport", {"report_data": ""})
    client.call("org.snpd.Attestation.GetCertificates")
    with VarlinkClient(h.path, timeout=WAIT) as second:
        second.call("org.snpd.Manager.RefreshCertificates")
    first, again, other = h.service.callers
    assert first.uid == os.geteuid() and first.pid == os.getpid()
    assert first.transport == "varlink"
    assert first.gids == frozenset(os.getgroups()) | {os.getegid()}
    assert first.client_key == again.client_key != other.client_key


GROUPS_CHILD = """
import sys
from snpd.varlink.client import VarlinkClient
with VarlinkClient(sys.argv[1], timeout=30) as c:
    c.call("org.snpd.Attestation.GetCertificates")
"""


@pytest.mark.parametrize("source", ["SO_PEERGROUPS", "/proc"])
def test_supplementary_groups_reach_the_service(h: Harness, monkeypatch: pytest.MonkeyPatch,
                                                source: str) -> None:
    if os.geteuid() != 0:
        pytest.fail("setting a child's supplementary groups needs root (scripts/test runs "
                    "as root)")
    if source == "/proc":
        monkeypatch.setattr(vserver, "_peer_groups_sockopt", lambda sock: None)
    child = subprocess.run([sys.executable, "-c", GROUPS_CHILD, h.path],
                           extra_groups=[4242, 4343], capture_output=True, text=True,
                           timeout=WAIT)
    assert child.returncode == 0, child.stderr
    (caller,) = h.service.callers
    assert caller.uid == 0 and caller.pid != os.getpid()
    assert caller.gids == {0, 4242, 4343}


def test_peer_groups_from_proc(tmp_path: Path) -> None:
    """SO_PEERCRED's semantics: the effective uid must match; effective gid plus
    supplementary groups."""
    status = tmp_path / "42" / "status"
    status.parent.mkdir()
    status.write_text("Name:\tx\nUid:\t1000\t1001\t1001\t1001\nGid:\t5\t6\t6\t6\n"
                      "Groups:\t4 24 27 \n")
    assert proc_credentials(42, 1001, str(tmp_path)) == {6, 4, 24, 27}
    assert proc_credentials(42, 1000, str(tmp_path)) == frozenset()  # not effective
    assert proc_credentials(43, 1001, str(tmp_path)) == frozenset()  # gone
    assert proc_credentials(None, 1001, str(tmp_path)) == frozenset()
    status.write_text("Uid:\t1\t1\t1\t1\nGroups:\n")
    assert proc_credentials(42, 1, str(tmp_path)) == frozenset()  # no Gid line
    mine = proc_credentials(os.getpid(), os.geteuid())
    assert mine == frozenset(os.getgroups()) | {os.getegid()}


def test_socket_mode_and_stale_socket(short_dir: str, make_harness: Callable[..., Harness]
                                      ) -> None:
    h = make_harness()
    assert stat.S_IMODE(os.stat(h.path).st_mode) == 0o660
    assert stat.S_ISSOCK(os.stat(h.path).st_mode)
    with pytest.raises(OSError, match="another server"):  # a live socket is not taken over
        h.run(VarlinkServer(FakeService()).bind(h.path))
    stale = os.path.join(short_dir, "stale.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as dead:
        dead.bind(stale)
    server = VarlinkServer(FakeService())
    h.run(server.bind(stale, mode=0o600))
    try:
        assert stat.S_IMODE(os.stat(stale).st_mode) == 0o600
        with VarlinkClient(stale, timeout=WAIT) as c:
            assert c.call("org.varlink.service.GetInfo")["vendor"] == "snpd"
    finally:
        h.run(server.close())
    assert not os.path.exists(stale)  # close removes what it bound
    regular = os.path.join(short_dir, "file")
    Path(regular).write_text("keep me")
    with pytest.raises(FileExistsError):
        h.run(VarlinkServer(FakeService()).bind(regular))
    assert Path(regular).read_text() == "keep me"


def test_listen_fds_parsing() -> None:
    pid = 4242
    env = {"LISTEN_PID": str(pid), "LISTEN_FDS": "3", "LISTEN_FDNAMES": "varlink:other:x",
           "HOME": "/root"}
    assert vserver.listen_fds(env, pid=pid) == [ListenFd(3, "varlink"), ListenFd(4, "other"),
                                                ListenFd(5, "x")]
    assert env == {"HOME": "/root"}  # unset after use
    env = {"LISTEN_PID": str(pid), "LISTEN_FDS": "2"}
    assert vserver.listen_fds(env, pid=pid, unset=False) == [ListenFd(3, "unknown"),
                                                            ListenFd(4, "unknown")]
    assert "LISTEN_FDS" in env
    env = {"LISTEN_PID": "1", "LISTEN_FDS": "1", "LISTEN_FDNAMES": "varlink"}
    assert vserver.listen_fds(env, pid=pid) == []  # meant for another process
    assert env == {}
    assert vserver.listen_fds({}, pid=pid) == []
    for bad in ({"LISTEN_PID": "x", "LISTEN_FDS": "1"},
                {"LISTEN_PID": str(pid), "LISTEN_FDS": "-1"},
                {"LISTEN_PID": str(pid), "LISTEN_FDS": "2", "LISTEN_FDNAMES": "a"}):
        with pytest.raises(ValueError):
            vserver.listen_fds(dict(bad), pid=pid)


def test_adopting_an_activated_socket(short_dir: str, h: Harness) -> None:
    path = os.path.join(short_dir, "activated.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(8)
    fds = [ListenFd(listener.detach(), "varlink")]
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as unrelated:
        fds.append(ListenFd(unrelated.fileno(), "other"))
        sockets = vserver.activation_sockets(fds)
    assert len(sockets) == 1 and not os.get_inheritable(sockets[0].fileno())
    server = VarlinkServer(FakeService())
    h.run(server.adopt(sockets[0]))
    try:
        with VarlinkClient(path, timeout=WAIT) as c:
            assert c.call("org.snpd.Keys.DeriveSealingKey", {"label": "a"})["key"]
    finally:
        h.run(server.close())
    assert os.path.exists(path)  # systemd owns an activated socket's file


def test_adopting_refuses_a_non_listening_socket() -> None:
    a, b = socket.socketpair()
    with a, b:
        with pytest.raises(ValueError):
            vserver.adopt_socket(a.fileno())
        assert a.fileno() >= 0  # left open for its owner


ACTIVATED_CHILD = r"""
import asyncio, os, sys
sys.path.insert(0, os.path.dirname(sys.argv[1]))
os.dup2(int(os.environ.pop("TEST_FD")), 3)
os.environ.update(LISTEN_PID=str(os.getpid()), LISTEN_FDS="1", LISTEN_FDNAMES="varlink")
from doubles import FakeService
from snpd.varlink import server as vserver

async def main():
    fds = vserver.listen_fds()
    assert "LISTEN_FDS" not in os.environ
    server = vserver.VarlinkServer(FakeService())
    for sock in vserver.activation_sockets(fds):
        await server.adopt(sock)
    print("ready", [(f.fd, f.name) for f in fds], flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
    await server.close()

asyncio.run(main())
"""


def test_socket_activation_in_a_real_process(short_dir: str) -> None:
    path = os.path.join(short_dir, "activated.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
        listener.bind(path)
        listener.listen(8)
        child = subprocess.Popen(
            [sys.executable, "-c", ACTIVATED_CHILD, str(Path(__file__).parent)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
            pass_fds=(listener.fileno(),),
            env={**os.environ, "TEST_FD": str(listener.fileno())})
    try:
        assert child.stdout is not None and child.stdin is not None
        assert child.stdout.readline().strip() == "ready [(3, 'varlink')]"
        with VarlinkClient(path, timeout=WAIT) as c:
            assert c.call("org.varlink.service.GetInfo")["vendor"] == "snpd"
            report = c.call("org.snpd.Attestation.GetReport", {"report_data": "QQ=="})["report"]
            assert base64.b64decode(report)[:64] == b"A".ljust(64, b"\0")
        child.stdin.close()
        assert child.wait(WAIT) == 0
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        for stream in (child.stdin, child.stdout):
            if stream is not None:
                stream.close()


# -- connections -------------------------------------------------------------------------------


def test_connection_limits(make_harness: Callable[..., Harness]) -> None:
    h = make_harness(max_connections=2, max_connections_per_uid=2, root_reserved_connections=0)
    with VarlinkClient(h.path, timeout=WAIT) as one, VarlinkClient(h.path, timeout=WAIT) as two:
        one.call("org.varlink.service.GetInfo")
        two.call("org.varlink.service.GetInfo")
        assert raw_session(h.path, call_message("org.varlink.service.GetInfo")) == []
        assert h.connections() == 2
    wait_until(lambda: h.connections() == 0)
    with VarlinkClient(h.path, timeout=WAIT) as three:  # slots free again
        assert three.call("org.varlink.service.GetInfo")["vendor"] == "snpd"


def test_idle_connections_are_closed_and_the_client_reconnects(
        make_harness: Callable[..., Harness]) -> None:
    h = make_harness(idle_timeout=0.05)
    with VarlinkClient(h.path, timeout=WAIT) as c:
        assert c.call("org.snpd.Attestation.GetReport", {"report_data": ""})
        assert c._sock is not None
        c._sock.settimeout(WAIT)
        assert c._sock.recv(1) == b""  # the server closed the idle connection
        assert c.call("org.snpd.Attestation.GetReport", {"report_data": ""})  # resent once
    assert len(h.service.calls) == 2


def test_close_waits_for_calls_in_flight(h: Harness) -> None:
    with VarlinkClient(h.path, timeout=WAIT) as busy, \
            VarlinkClient(h.path, timeout=WAIT) as idle:
        idle.call("org.varlink.service.GetInfo")
        result: Dict[str, Any] = {}
        caller = threading.Thread(target=lambda: result.update(busy.call(
            "org.snpd.Attestation.GetReport", {"report_data": b64(b"block")})))
        caller.start()
        assert h.service.entered.wait(WAIT)
        closing = h.submit(h.server.close())
        assert idle._sock is not None
        idle._sock.settimeout(WAIT)
        assert idle._sock.recv(1) == b""  # idle connections close at once
        assert not closing.done()
        h.service.release()
        closing.result(WAIT)
        h.closed = True
        caller.join(WAIT)
        # the call in flight was answered
        assert base64.b64decode(result["report"])[:64] == b"block".ljust(64, b"\0")
    assert not os.path.exists(h.path)


def test_client_timeout_and_unreachable_socket(short_dir: str) -> None:
    path = os.path.join(short_dir, "silent.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as silent:
        silent.bind(path)
        silent.listen(1)
        with VarlinkClient(path, timeout=0.05) as c, pytest.raises(errors.Timeout):
            c.call("org.varlink.service.GetInfo")
    with pytest.raises(FileNotFoundError), VarlinkClient(os.path.join(short_dir, "none")) as c:
        c.call("org.varlink.service.GetInfo")


def test_client_rejects_non_varlink_replies(short_dir: str) -> None:
    path = os.path.join(short_dir, "odd.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as odd:
        odd.bind(path)
        odd.listen(1)
        for answer in (b"not json\0", b"[]\0", b'{"parameters":{},"continues":true}\0',
                       b"truncated"):
            with VarlinkClient(path, timeout=WAIT) as c:
                c.connect()
                peer, _ = odd.accept()
                with peer:
                    peer.sendall(answer)
                    peer.shutdown(socket.SHUT_WR)
                    with pytest.raises(TransportError):
                        c.call("org.varlink.service.GetInfo")


def test_async_client(h: Harness) -> None:
    async def main() -> None:
        async with AsyncVarlinkClient(h.path, timeout=WAIT) as c:
            info = await c.call("org.varlink.service.GetInfo")
            assert info["vendor"] == "snpd"
            results = await asyncio.gather(*(
                c.call("org.snpd.Attestation.GetReport", {"report_data": b64(bytes([i]))})
                for i in range(5)))
            assert [base64.b64decode(r["report"])[:64] for r in results] == [
                bytes([i]).ljust(64, b"\0") for i in range(5)]
            h.service.fail = errors.Busy("queue full")
            with pytest.raises(errors.Busy, match="queue full"):
                await c.call("org.snpd.Keys.DeriveSealingKey", {"label": "x"})
            h.service.fail = None
            assert await c.call("org.snpd.Manager.RefreshCertificates", oneway=True) == {}
            assert (await c.call("org.snpd.Keys.DeriveSealingKey", {"label": "x"}))["key"]
        with pytest.raises(OSError):
            await AsyncVarlinkClient(h.path + ".missing").connect()

    asyncio.run(main())


def test_client_module_imports_only_what_snpctl_can_afford() -> None:
    code = ("import sys; import snpd.varlink.client; "
            "print(' '.join(sorted(sys.modules)))")
    modules = set(subprocess.run([sys.executable, "-c", code], check=True,
                                 capture_output=True, text=True).stdout.split())
    assert "snpd.varlink.client" in modules
    for heavy in ("asyncio", "dataclasses", "cryptography", "dbus_fast", "snpd.service", "socket",
                  "snpd.varlink.protocol", "snpd.varlink.server", "inspect"):
        assert heavy not in modules, heavy


# -- per-uid bounds: connections, buffered bytes, message deadline (issue 10) -------------------
#
# The uid of a test connection is chosen by the test: the client binds its socket to an
# abstract address naming the uid, and the server is given credentials() that read it
# back (unbound clients get their real credentials). No test here asserts a duration:
# deadlines run on a FakeClock, or on short timeouts whose only effect checked is a close.

KIB = 1024


class FakeClock:
    """A monotonic clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def credentials_from_address(sock: socket.socket) -> vserver.PeerCredentials:
    """The uid a test client named in its abstract address (``connect_as``)."""
    name = sock.getpeername()
    if isinstance(name, bytes) and name.startswith(b"\0snpd-test-uid/"):
        uid = int(name.split(b"/")[1])
        return vserver.PeerCredentials(pid=os.getpid(), uid=uid, gid=uid, groups=frozenset({uid}))
    return vserver.peer_credentials(sock)


def connect_as(path: str, uid: int) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(f"\0snpd-test-uid/{uid}/{os.urandom(8).hex()}".encode())
        sock.settimeout(WAIT)
        sock.connect(path)
    except BaseException:
        sock.close()
        raise
    return sock


def next_reply(sock: socket.socket) -> Optional[Dict[str, Any]]:
    """The next reply on ``sock``, or None once the server has closed it."""
    data = b""
    while not data.endswith(b"\0"):
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            chunk = b""
        if not chunk:
            return None
        data += chunk
    reply: Dict[str, Any] = json.loads(data[:-1])
    return reply


def served(sock: socket.socket) -> bool:
    """True if a GetInfo on ``sock`` is answered, False if the server closed it."""
    with contextlib.suppress(BrokenPipeError, ConnectionResetError):
        sock.sendall(call_message("org.varlink.service.GetInfo"))
    return next_reply(sock) is not None


def sized_call(size: int) -> bytes:
    """A VerifyReport of exactly ``size`` bytes, its NUL included (the double takes a
    report of any size)."""
    head = call_message("org.snpd.Attestation.VerifyReport", {"report": "", "policy": ""})
    padding = size - len(head)
    assert padding >= 0
    message = call_message("org.snpd.Attestation.VerifyReport", {
        "report": b64(bytes(padding // 4 * 3)), "policy": "x" * (padding % 4)})
    assert len(message) == size
    return message


def on_loop(h: Harness, read: Callable[[], Any]) -> Any:
    """``read()`` on the server's loop, so it sees a consistent state."""
    async def run() -> Any:
        return read()
    return h.run(run())


@pytest.fixture
def uids(make_harness: Callable[..., Harness]) -> Callable[..., Harness]:
    """Makes harnesses whose connections have the uid ``open_as`` gives them."""
    def make(**options: Any) -> Harness:
        # Every test uid is in its own group (credentials_from_address): all may attest.
        service = FakeService(Access(report_gids=frozenset(range(1000, 1100))),
                              certificates=certificates())
        return make_harness(service, credentials=credentials_from_address, **options)

    return make


def open_as(h: Harness, uid: int) -> socket.socket:
    """A raw connection to ``h`` as ``uid``, closed when the harness stops."""
    sock = connect_as(h.path, uid)
    h.opened.append(sock)
    return sock


def test_quota_caps_per_uid_in_all_and_keeps_roots_reserve() -> None:
    quota = vserver._Quota(2, 5, 3, per_uid_key="per_uid", total_key="total")
    assert quota.room(1001) == 2 and quota.room(0) == 8
    quota.add(1001, 2)
    assert quota.room(1001) == 0 and quota.binding(1001) == "per_uid"
    quota.add(1002, 2)
    quota.add(1003, 1)
    assert quota.room(1004) == 0 and quota.binding(1004) == "total"
    assert quota.room(0) == 3  # beyond the total, and not held to the per-uid cap
    quota.add(0, 3)
    assert quota.room(0) == 0 and quota.binding(0) == "total"
    quota.add(1001, -2)
    assert quota.room(1001) == 0  # root's reserve is in use: the total still binds
    quota.add(0, -3)
    assert quota.room(1001) == 2 and quota.used == 3
    assert "uid 1002 holds 2, all 3" in quota.describe(1002)
    with pytest.raises(AssertionError):
        quota.add(1005, -1)


def test_connections_are_capped_per_uid(uids: Callable[..., Harness]) -> None:
    h = uids(max_connections=8, max_connections_per_uid=2, root_reserved_connections=0)
    first = [open_as(h, 1001) for _ in range(2)]
    assert all(served(sock) for sock in first)
    assert not served(open_as(h, 1001))  # its third: closed unanswered, as before
    assert all(served(open_as(h, 1002)) for _ in range(2))  # another uid has its own share
    assert all(served(sock) for sock in first)  # and the refusal cost the others nothing
    first[0].close()
    wait_until(lambda: on_loop(h, lambda: h.server.slots.held(1001)) == 1)
    assert served(open_as(h, 1001))  # a slot given back is taken again


def test_root_is_admitted_beyond_the_total_up_to_its_reserve(
        uids: Callable[..., Harness]) -> None:
    h = uids(max_connections=4, max_connections_per_uid=2, root_reserved_connections=3)
    assert all(served(open_as(h, uid)) for uid in (1001, 1001, 1002, 1002))
    assert not served(open_as(h, 1003))  # the total is reached
    assert all(served(open_as(h, 0)) for _ in range(3))  # root: more than per_uid, too
    assert not served(open_as(h, 0))  # the reserve is used up
    assert h.connections() == 7


def test_root_is_not_held_to_the_per_uid_cap(uids: Callable[..., Harness]) -> None:
    h = uids(max_connections=8, max_connections_per_uid=2, root_reserved_connections=0)
    assert all(served(open_as(h, 0)) for _ in range(8))
    assert not served(open_as(h, 0))


def test_refusals_are_logged_once_per_interval_with_the_count_left_out(
        uids: Callable[..., Harness], caplog: pytest.LogCaptureFixture) -> None:
    clock = FakeClock()
    h = uids(max_connections=8, max_connections_per_uid=1, root_reserved_connections=0,
             clock=clock)
    caplog.set_level("INFO", logger="snpd.varlink.server")

    def refusals(uid: int) -> List[str]:
        return [r.getMessage() for r in caplog.records
                if "too many connections" in r.getMessage() and f"uid {uid} pid" in r.getMessage()]

    assert served(open_as(h, 1001)) and served(open_as(h, 1002))
    for _ in range(20):
        assert not served(open_as(h, 1001))
    assert not served(open_as(h, 1002))  # another uid's refusals are not hidden
    assert len(refusals(1001)) == 1 and len(refusals(1002)) == 1
    assert "varlink.max_connections_per_uid = 1" in refusals(1001)[0]
    clock.now += vserver.LOG_INTERVAL
    assert not served(open_as(h, 1001))
    assert len(refusals(1001)) == 2
    assert refusals(1001)[1].endswith(f"19 similar suppressed in the last "
                                      f"{vserver.LOG_INTERVAL:g} s")


def test_a_uid_over_its_buffer_budget_is_told_busy_and_closed(
        uids: Callable[..., Harness]) -> None:
    h = uids(max_message=80 * KIB, max_buffer_bytes_per_uid=100 * KIB,
             max_buffer_bytes=1024 * KIB, root_reserved_buffer_bytes=0)
    peaks: List[int] = []
    budget = h.server.buffers
    take = budget.add

    def watched(uid: int, amount: int) -> None:
        take(uid, amount)
        peaks.append(budget.held(uid))

    budget.add = watched  # type: ignore[method-assign]
    message = sized_call(60 * KIB)
    holder, greedy, other = open_as(h, 1001), open_as(h, 1001), open_as(h, 1002)
    holder.sendall(message[:-1])  # all but the NUL: a message not yet complete
    wait_until(lambda: on_loop(h, lambda: budget.held(1001)) == len(message) - 1)
    greedy.sendall(message[:-1])
    reply = next_reply(greedy)
    assert reply == {"error": "org.snpd.Manager.Busy", "parameters": {"message": (
        "the daemon buffers no more varlink input now "
        "(varlink.max_buffer_bytes_per_uid); retry later")}}
    assert next_reply(greedy) is None  # then closed
    with pytest.raises(errors.Busy):  # snpd's own client maps it to Busy
        vclient.decode_reply(json.dumps(reply).encode())
    assert max(peaks) <= 100 * KIB  # never read more than the budget had room for
    other.sendall(message)  # another uid's connection is served as usual
    assert_report(next_reply(other))
    holder.sendall(b"\0")  # and the holder's message, completed, is served too
    assert_report(next_reply(holder))
    wait_until(lambda: on_loop(h, lambda: budget.used) == 0)  # served: given back


def assert_report(reply: Optional[Dict[str, Any]]) -> None:
    """``reply`` is the service's answer to a :func:`sized_call`."""
    assert reply is not None and reply["parameters"]["checks"][0]["name"] == "size", reply


def test_the_global_buffer_budget_binds_all_uids_but_roots_reserve(
        uids: Callable[..., Harness]) -> None:
    h = uids(max_message=80 * KIB, max_buffer_bytes_per_uid=100 * KIB,
             max_buffer_bytes=150 * KIB, root_reserved_buffer_bytes=100 * KIB)
    budget = h.server.buffers
    message = sized_call(68 * KIB)
    holders = [open_as(h, 1001), open_as(h, 1002)]
    for sock in holders:
        sock.sendall(message[:-1])
    wait_until(lambda: on_loop(h, lambda: budget.used) == 2 * (len(message) - 1))
    late = open_as(h, 1003)  # well within its own budget, but not within everyone's
    late.sendall(message)
    reply = next_reply(late)
    assert reply is not None and reply["error"] == "org.snpd.Manager.Busy"
    assert "(varlink.max_buffer_bytes)" in reply["parameters"]["message"]
    root = open_as(h, 0)
    root.sendall(message)  # root's reserve takes it
    assert_report(next_reply(root))
    for sock in holders:  # the holders were not disturbed
        sock.sendall(b"\0")
        assert_report(next_reply(sock))


def test_a_message_must_arrive_whole_within_the_deadline(uids: Callable[..., Harness]) -> None:
    clock = FakeClock()
    h = uids(message_timeout=10.0, idle_timeout=WAIT, clock=clock)
    budget = h.server.buffers
    slow, steady = open_as(h, 1001), open_as(h, 1002)
    message = call_message("org.varlink.service.GetInfo")
    slow.sendall(message[:1])
    steady.sendall(message[:1])
    wait_until(lambda: on_loop(h, lambda: budget.used) == 2)  # both first bytes read
    clock.now += 6
    steady.sendall(message[1:])  # whole within 10 s: served
    assert next_reply(steady) is not None
    slow.sendall(message[1:2])
    wait_until(lambda: on_loop(h, lambda: budget.held(1001)) == 2)
    clock.now += 6  # 12 s since its first byte
    slow.sendall(message[2:3])  # each read on time, the message not
    assert next_reply(slow) is None  # closed, unanswered
    assert served(steady)  # the deadline starts again with each message
    clock.now += 100
    assert served(steady)  # and between messages only the idle timeout counts
    wait_until(lambda: on_loop(h, lambda: budget.used) == 0)


def test_a_slowloris_sender_is_closed_within_the_message_deadline(
        uids: Callable[..., Harness]) -> None:
    """A byte every 20 ms, with a read timeout (idle_timeout) far longer than that:
    only the message deadline can close it. Nothing is asserted about time."""
    h = uids(message_timeout=0.2, idle_timeout=WAIT)
    sock = open_as(h, 1001)
    message = call_message("org.snpd.Attestation.GetReport", {"report_data": b64(bytes(600))})
    closed = False
    for byte in message[:-1]:
        try:
            sock.sendall(bytes([byte]))
        except (BrokenPipeError, ConnectionResetError):
            closed = True
            break
        threading.Event().wait(0.02)
    assert closed, "the whole message was accepted a byte at a time"
    assert next_reply(sock) is None
    assert h.service.calls == []
    wait_until(lambda: h.connections() == 0)
