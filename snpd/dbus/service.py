"""org.snpd.Snpd1 on the system bus: a thin dbus-fast front for :mod:`snpd.service`.

Each method does four things and nothing else: establish who is calling (from the
bus, never from anything the caller says), ask the service's access table
(:mod:`snpd.access`) whether they may, decode the arguments into the service's
typed values (the Variants of an ``a{sv}`` become plain values, then
:class:`~snpd.service.ReportOptions` and the like; ``0xFFFFFFFF`` becomes "the
guest's own VMPL"), await the matching Service coroutine, and encode its result.
The rules live in the typed values and the Service, so the varlink twin of every
method behaves the same; the bus policy (conf/dbus/org.snpd.Snpd1.conf) is the
first layer, the Service's re-check the second. Property reads are checked by the
reader against the same table before dbus-fast sees them.

Errors: a :class:`~snpd.errors.SnpdError` travels as its own
``org.snpd.Snpd1.Error.<Kind>``; anything else is a bug, logged here with its
traceback and sent as ``org.snpd.Snpd1.Error.Internal`` with a generic message
(no paths, no argument values), and the loop keeps serving.

Caller identity. dbus-fast hands a method its arguments but not the message, so
a message handler (which dbus-fast runs for every incoming message before it
dispatches, in the same synchronous step) records the method call in a
:class:`contextvars.ContextVar`; the task dbus-fast then creates for the method
copies that context, so the coroutine sees exactly its own message. Each record
can be claimed once and must name the member being served, so a change in
dbus-fast's dispatch fails closed (Internal) rather than misattributing a call.
The sender's uid, pid and groups come from the bus's
``GetConnectionCredentials`` and are cached per unique name: a unique name is
never reused on a bus and its credentials are fixed when it connects (they are
what the bus itself applies its policy to), so the cache is exact; entries are
dropped on NameOwnerChanged and the cache is bounded.

dbus-fast 1.84 (Debian bookworm) to 5.x: only the public API is used (plus
``ServiceInterface.introspect``), :class:`MessageBus` is created inside the
running loop (dbus-fast 5 requires it), and D-Bus signatures are given to
dbus-fast through ``__signature__`` so that the Python annotations stay real
types for mypy.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import dataclasses
import inspect
import io
import logging
import os
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import (
    Any,
    Awaitable,
    Callable,
    Dict,
    List,
    Mapping,
    Optional,
    Sequence,
    Set,
    Tuple,
    TypeVar,
    cast,
)

from dbus_fast import BusType, DBusError, Message, MessageType, NameFlag, RequestNameReply, Variant
from dbus_fast import introspection as intr
from dbus_fast._private.unmarshaller import Unmarshaller
from dbus_fast.aio.message_bus import MessageBus
from dbus_fast.constants import PropertyAccess
from dbus_fast.service import ServiceInterface, dbus_property, method

from snpd.access import Caller, proc_credentials
from snpd.dbus import wire
from snpd.dbus.gate import Gate, Kind, Limits, Refusal, Ticket
from snpd.errors import (
    DBUS_PREFIX,
    Busy,
    Internal,
    PermissionDenied,
    SnpdError,
)
from snpd.ratelimit import LogLimiter
from snpd.service import (
    CERTIFICATE_OPTIONS,
    TIMEOUT_OPTION,
    VERIFY_OPTIONS,
    CertificateOptions,
    KeyRequest,
    Properties,
    ReportOptions,
    SealingKeyRequest,
    ServiceAPI,
    VerifyOptions,
    check_options,
)
from snpd.status.summary import PROPERTY_FIELDS, plain_property
from snpd.trust.certset import CertificateSet
from snpd.trust.result import Verdict

BUS_NAME = "org.snpd.Snpd1"
OBJECT_PATH = "/org/snpd/Snpd1"
ATTESTATION = "org.snpd.Snpd1.Attestation"
KEYS = "org.snpd.Snpd1.Keys"
MANAGER = "org.snpd.Snpd1.Manager"
SECRETS = "org.snpd.Snpd1.Secrets"
INTERFACES = (ATTESTATION, KEYS, SECRETS, MANAGER)
INTROSPECTION_FILE = "org.snpd.Snpd1.xml"
INTERNAL_ERROR = DBUS_PREFIX + "Internal"
DEFAULT_SYSTEM_BUS = "unix:path=/var/run/dbus/system_bus_socket"  # the D-Bus spec default
CREDENTIALS_CACHE_SIZE = 4096
MAX_MESSAGE = 64 * 1024
"""The largest message snpd reads: a VerifyReport with a whole chain and CRL is under
20 KiB; anything larger is skipped unread and answered InvalidArgument."""
_INVALID_ARGUMENT = DBUS_PREFIX + "InvalidArgument"

_DBUS = "org.freedesktop.DBus"
_DBUS_PATH = "/org/freedesktop/DBus"
_ACCESS_DENIED = "org.freedesktop.DBus.Error.AccessDenied"
_PEER = "org.freedesktop.DBus.Peer"
_PROPERTIES = "org.freedesktop.DBus.Properties"
_DROPPED_LOG_INTERVAL = 60.0
_EMITS = "org.freedesktop.DBus.Property.EmitsChangedSignal"
# Only disappearances matter to the credentials cache (arg2 = new owner = none).
_VANISHED_RULE = (f"type='signal',sender='{_DBUS}',path='{_DBUS_PATH}',interface='{_DBUS}',"
                  "member='NameOwnerChanged',arg2=''")

# Property name -> (signature, EmitsChangedSignal). "true" is D-Bus's default and
# is not written out; "const" and "false" are annotated and never emitted.
PROPERTIES: Mapping[str, Mapping[str, Tuple[str, str]]] = {
    ATTESTATION: {
        "Backend": ("s", "true"),
        "ReportDataBinding": ("s", "const"),
        "Product": ("s", "true"),
        "Vmpl": ("u", "true"),
        "ReportedTcb": ("t", "true"),
        "State": ("s", "true"),
        "StateReason": ("s", "true"),
    },
    MANAGER: {
        "Version": ("s", "const"),
        "SevStatus": ("a{sv}", "true"),
        "Statistics": ("a{st}", "false"),
    },
}
FIELDS = PROPERTY_FIELDS
_NAMES = {field: key for key, field in FIELDS.items()}
OWN_VMPL = 0xFFFFFFFF
"""``vmpl`` for "the guest's own VMPL" (D-Bus ``u`` has no null)."""

_log = logging.getLogger(__name__)

_R = TypeVar("_R")
_E = TypeVar("_E")
_F = TypeVar("_F", bound=Callable[..., Any])


def introspection_xml() -> str:
    """The checked-in introspection XML, the API's contract, beside this module (the
    package is installed as files; importlib.resources would import zipfile and more)."""
    return Path(__file__).with_name(INTROSPECTION_FILE).read_text(encoding="utf-8")


# -- values: D-Bus <-> plain Python ----------------------------------------------------------


def plain(value: Any, type_: Any) -> Any:
    """A decoded D-Bus value as plain Python, guided by its signature type: Variants
    unwrapped, ``ay`` bytes, structs tuples, arrays lists, dicts dicts. D-Bus limits
    nesting to 64 levels, so the recursion is bounded."""
    token = type_.token
    if token == "v":
        return plain(value.value, value.type)
    if token == "a":
        child = type_.children[0]
        if child.token == "{":
            key_type, value_type = child.children
            return {plain(k, key_type): plain(v, value_type) for k, v in value.items()}
        if child.token == "y":
            return bytes(value)
        return [plain(item, child) for item in value]
    if token == "(":
        return tuple(plain(item, t) for item, t in zip(value, type_.children))
    return value


def decode_options(options: Mapping[str, Any]) -> Dict[str, Any]:
    """``a{sv}`` -> ``{key: plain value}``; the Service rejects keys it does not know."""
    return {str(key): plain(variant.value, variant.type) for key, variant in options.items()}


def _counts_characters() -> bool:
    """True for a dbus-fast whose marshaller writes a string's length in characters
    rather than UTF-8 bytes (1.84.2, Debian 12; fixed upstream in 2023, PR #261):
    a reply holding a non-ASCII character is then an invalid message, and the bus
    drops the connection."""
    try:
        data = Message(message_type=MessageType.ERROR, destination=":1.1", reply_serial=1,
                       error_name="a.b", signature="s", body=["\u2026"])._marshall(False)
    except Exception:
        return True
    return b"\x01\x00\x00\x00\xe2" in data  # length 1 before the 3 UTF-8 bytes


_ESCAPE_NON_ASCII = _counts_characters()


def text(value: str) -> str:
    """A string as it may be sent: with such a dbus-fast, non-ASCII characters are
    written as backslash escapes (snpd's own texts are ASCII but for a few
    ellipses; callers' strings are echoed only in error texts)."""
    if _ESCAPE_NON_ASCII and not value.isascii():
        return value.encode("ascii", "backslashreplace").decode("ascii")
    return value


def _guess(value: object) -> Tuple[str, Any]:
    """(signature, D-Bus value) for a plain value of a free-form ``a{sv}``."""
    if isinstance(value, Variant):
        return "v", value
    if isinstance(value, bool):
        return "b", value
    if isinstance(value, int):
        if -(1 << 63) <= value < 1 << 63:
            return "x", value
        if 0 <= value < 1 << 64:
            return "t", value
        raise ValueError(f"integer {value} does not fit 64 bits")
    if isinstance(value, float):
        return "d", value
    if isinstance(value, str):
        return "s", text(value)
    if isinstance(value, (bytes, bytearray, memoryview)):
        return "ay", bytes(value)
    if isinstance(value, Mapping):
        return "a{sv}", variant_dict(value)
    if isinstance(value, (list, tuple, set, frozenset)):
        items = [_guess(item) for item in value if item is not None]
        kinds = {sig for sig, _ in items}
        if not items:
            return "as", []
        if len(kinds) == 1 and "v" not in kinds:
            return "a" + kinds.pop(), [v for _, v in items]
        return "av", [v if sig == "v" else Variant(sig, v) for sig, v in items]
    raise ValueError(f"cannot send a {type(value).__name__} over D-Bus")


def to_variant(value: object) -> Variant:
    sig, encoded = _guess(value)
    return encoded if sig == "v" else Variant(sig, encoded)


def variant_dict(values: Mapping[Any, object]) -> Dict[str, Variant]:
    """A free-form ``a{sv}``. D-Bus has no null: a None value leaves its key out."""
    return {str(k): to_variant(v) for k, v in values.items() if v is not None}


def _ay(value: object) -> bytes:
    if not isinstance(value, (bytes, bytearray, memoryview)):
        raise TypeError(f"expected bytes, got {type(value).__name__}")
    return bytes(value)


def _certificates(value: CertificateSet) -> List[List[Any]]:
    return [[kind, item.der] for kind, item in value.items()]


def _verdict(verdict: Verdict) -> Dict[str, Variant]:
    return {
        "valid": Variant("b", verdict.valid),
        "product": Variant("s", text(verdict.product.value if verdict.product else "")),
        "failures": Variant("as", [text(c.name) for c in verdict.failures]),
        "checks": Variant("a(sss)", [[text(c.name), text(c.status.value), text(c.detail)]
                                     for c in verdict.checks]),
    }


def _vmpl(vmpl: int) -> Optional[int]:
    return None if vmpl == OWN_VMPL else vmpl


def _timeout(options: Mapping[str, Any], what: str) -> ReportOptions:
    return ReportOptions(**check_options(decode_options(options), TIMEOUT_OPTION, what))


def _certificate_options(options: Mapping[str, Any]) -> CertificateOptions:
    return CertificateOptions(**check_options(decode_options(options), CERTIFICATE_OPTIONS,
                                              "GetCertificates"))


def _verify_options(options: Mapping[str, Any], method: str = "VerifyReport"
                    ) -> VerifyOptions:
    return VerifyOptions.from_plain(**check_options(decode_options(options), VERIFY_OPTIONS,
                                                    method))


def property_value(props: Properties, field: str) -> object:
    """A :class:`Properties` field as the plain value its D-Bus property carries."""
    return plain_property(field, getattr(props, field))


def _int(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"expected int, got {type(value).__name__}")
    return value


def encode_property(signature: str, value: object) -> Any:
    """A Service property value in the form dbus-fast sends for ``signature``."""
    if signature == "a{sv}":
        if not isinstance(value, Mapping):
            raise TypeError("expected a mapping")
        return variant_dict(value)
    if signature == "a{st}":
        if not isinstance(value, Mapping):
            raise TypeError("expected a mapping")
        return {str(k): _int(v) for k, v in value.items()}
    if signature in ("u", "t"):
        return _int(value)
    if signature == "s":
        if not isinstance(value, str):
            raise TypeError(f"expected str, got {type(value).__name__}")
        return text(value)
    raise ValueError(f"no encoder for properties of type {signature}")


# -- declaring members with D-Bus signatures -----------------------------------------------


def _dbus_method(member: str, returns: str, **args: str) -> Callable[[_F], _F]:
    """dbus-fast's ``method`` with the signatures given here rather than as string
    annotations (which mypy would read as undefined names). The keyword order must be
    the function's parameter order; a mismatch is a TypeError at import."""

    def decorate(fn: _F) -> _F:
        params = list(inspect.signature(fn).parameters)
        if params[1:] != list(args):
            raise TypeError(f"{fn.__qualname__}: D-Bus arguments {list(args)} do not match "
                            f"the parameters {params[1:]}")
        kind = inspect.Parameter.POSITIONAL_OR_KEYWORD
        fn.__signature__ = inspect.Signature(  # type: ignore[attr-defined]
            [inspect.Parameter(params[0], kind)]
            + [inspect.Parameter(name, kind, annotation=sig) for name, sig in args.items()],
            return_annotation=returns or inspect.Signature.empty)
        return cast(_F, method(name=member)(fn))

    return decorate


def _dbus_property(interface: str, name: str) -> Callable[[Callable[[Any], Any]], Any]:
    """A read-only dbus-fast property whose signature comes from :data:`PROPERTIES`."""
    signature = PROPERTIES[interface][name][0]

    def decorate(fn: Callable[[Any], Any]) -> Any:
        fn.__signature__ = inspect.Signature(  # type: ignore[attr-defined]
            [inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD)],
            return_annotation=signature)
        return dbus_property(access=PropertyAccess.READ, name=name)(fn)

    return decorate


class _Documented(intr.Interface):  # type: ignore[misc,unused-ignore]
    """dbus-fast's generated introspection plus what it cannot express on every
    supported version: names of out arguments and property annotations (1.84 has no
    annotations at all), so the live XML can equal the checked-in contract."""

    def __init__(self, base: Any, out_args: Mapping[str, Sequence[str]],
                 emits: Mapping[str, str]) -> None:
        super().__init__(base.name, base.methods, base.signals, base.properties)
        self._snpd_out_args = out_args
        self._snpd_emits = emits

    def to_xml(self) -> ET.Element:
        element: ET.Element = super().to_xml()
        for member in element.findall("method"):
            names = iter(self._snpd_out_args.get(member.get("name", ""), ()))
            for arg in member.findall("arg"):
                if arg.get("direction") == "out" and not arg.get("name"):
                    name = next(names, None)
                    if name:
                        arg.set("name", name)
        for prop in element.findall("property"):
            emits = self._snpd_emits.get(prop.get("name", ""), "true")
            present = {a.get("name") for a in prop.findall("annotation")}
            if emits != "true" and _EMITS not in present:
                ET.SubElement(prop, "annotation", {"name": _EMITS, "value": emits})
        return element


# -- the interfaces --------------------------------------------------------------------------


class _Interface(ServiceInterface):  # type: ignore[misc,unused-ignore]
    """Shared plumbing; subclasses only declare members."""

    OUT_ARGS: Mapping[str, Sequence[str]] = {}

    def __init__(self, name: str, server: _Server) -> None:
        super().__init__(name)
        self._server = server

    def introspect(self) -> Any:
        emits = {prop: spec[1] for prop, spec in PROPERTIES.get(self.name, {}).items()}
        return _Documented(super().introspect(), self.OUT_ARGS, emits)

    async def _call(self, member: str, invoke: Callable[[Caller], Awaitable[_R]],
                    encode: Callable[[_R], _E]) -> _E:
        return await self._server.call(self.name, member, invoke, encode)

    def _property(self, name: str) -> Any:
        return self._server.property_value(self.name, name)


class AttestationInterface(_Interface):
    OUT_ARGS = {
        "GetReport": ("report",),
        "GetExtendedReport": ("report", "certificates"),
        "GetCertificates": ("certificates",),
        "VerifyReport": ("result",),
        "VerifyEvidence": ("result",),
        "GetEvidence": ("media_type", "evidence"),
    }

    def __init__(self, server: _Server) -> None:
        super().__init__(ATTESTATION, server)

    @_dbus_method("GetReport", "ay", report_data="ay", vmpl="u", options="a{sv}")
    async def get_report(self, report_data: bytes, vmpl: int, options: Mapping[str, Any]
                         ) -> bytes:
        core = self._server.core
        return await self._call("GetReport", lambda caller: core.get_report(
            caller, report_data, _vmpl(vmpl), _timeout(options, "GetReport")), _ay)

    @_dbus_method("GetExtendedReport", "aya(say)", report_data="ay", vmpl="u",
                  options="a{sv}")
    async def get_extended_report(self, report_data: bytes, vmpl: int,
                                  options: Mapping[str, Any]) -> List[Any]:
        core = self._server.core
        return await self._call(
            "GetExtendedReport", lambda caller: core.get_extended_report(
                caller, report_data, _vmpl(vmpl), _timeout(options, "GetExtendedReport")),
            lambda result: [_ay(result.report), _certificates(result.certificates)])

    @_dbus_method("GetCertificates", "a(say)", options="a{sv}")
    async def get_certificates(self, options: Mapping[str, Any]) -> List[List[Any]]:
        core = self._server.core
        return await self._call("GetCertificates", lambda caller: core.get_certificates(
            caller, _certificate_options(options)), _certificates)

    @_dbus_method("VerifyReport", "a{sv}", report="ay", options="a{sv}")
    async def verify_report(self, report: bytes, options: Mapping[str, Any]
                            ) -> Dict[str, Variant]:
        core = self._server.core
        return await self._call("VerifyReport", lambda caller: core.verify_report(
            caller, report, _verify_options(options, "VerifyReport")), _verdict)

    @_dbus_method("VerifyEvidence", "a{sv}", format="s", evidence="ay", nonce="ay",
                  options="a{sv}")
    async def verify_evidence(self, format: str, evidence: bytes, nonce: bytes,
                              options: Mapping[str, Any]) -> Dict[str, Variant]:
        core = self._server.core
        return await self._call("VerifyEvidence", lambda caller: core.verify_evidence(
            caller, format, evidence, nonce, _verify_options(options, "VerifyEvidence")),
            _verdict)

    @_dbus_method("GetEvidence", "say", format="s", nonce="ay", options="a{sv}")
    async def get_evidence(self, format: str, nonce: bytes, options: Mapping[str, Any]
                           ) -> List[Any]:
        core = self._server.core
        return await self._call(
            "GetEvidence", lambda caller: core.get_evidence(
                caller, format, nonce, _timeout(options, "GetEvidence")),
            lambda result: [text(result.media_type), _ay(result.data)])

    @_dbus_property(ATTESTATION, "Backend")
    def backend(self) -> Any:
        return self._property("Backend")

    @_dbus_property(ATTESTATION, "ReportDataBinding")
    def report_data_binding(self) -> Any:
        return self._property("ReportDataBinding")

    @_dbus_property(ATTESTATION, "Product")
    def product(self) -> Any:
        return self._property("Product")

    @_dbus_property(ATTESTATION, "Vmpl")
    def vmpl(self) -> Any:
        return self._property("Vmpl")

    @_dbus_property(ATTESTATION, "ReportedTcb")
    def reported_tcb(self) -> Any:
        return self._property("ReportedTcb")

    @_dbus_property(ATTESTATION, "State")
    def state(self) -> Any:
        return self._property("State")

    @_dbus_property(ATTESTATION, "StateReason")
    def state_reason(self) -> Any:
        return self._property("StateReason")


class KeysInterface(_Interface):
    OUT_ARGS = {"DeriveKey": ("key",), "DeriveSealingKey": ("key",)}

    def __init__(self, server: _Server) -> None:
        super().__init__(KEYS, server)

    @_dbus_method("DeriveKey", "ay", root_key="s", fields="as", vmpl="u", guest_svn="u",
                  tcb_version="t", options="a{sv}")
    async def derive_key(self, root_key: str, fields: List[str], vmpl: int, guest_svn: int,
                         tcb_version: int, options: Mapping[str, Any]) -> bytes:
        core = self._server.core
        return await self._call("DeriveKey", lambda caller: core.derive_key(
            caller, KeyRequest(root_key, tuple(fields), _vmpl(vmpl), guest_svn, tcb_version),
            _timeout(options, "DeriveKey")), _ay)

    @_dbus_method("DeriveSealingKey", "ay", label="s", fields="as", options="a{sv}")
    async def derive_sealing_key(self, label: str, fields: List[str],
                                 options: Mapping[str, Any]) -> bytes:
        core = self._server.core
        return await self._call("DeriveSealingKey", lambda caller: core.derive_sealing_key(
            caller, SealingKeyRequest(label, tuple(fields)),
            _timeout(options, "DeriveSealingKey")), _ay)


class SecretsInterface(_Interface):
    OUT_ARGS = {"GetResource": ("resource",), "GetToken": ("token",)}

    def __init__(self, server: _Server) -> None:
        super().__init__(SECRETS, server)

    @_dbus_method("GetResource", "ay", kbs="s", path="s", options="a{sv}")
    async def get_resource(self, kbs: str, path: str, options: Mapping[str, Any]) -> bytes:
        core = self._server.core
        check_options(decode_options(options), {}, "GetResource")
        return await self._call("GetResource", lambda caller: core.get_resource(
            caller, kbs, path), _ay)

    @_dbus_method("GetToken", "s", kbs="s", options="a{sv}")
    async def get_token(self, kbs: str, options: Mapping[str, Any]) -> str:
        core = self._server.core
        check_options(decode_options(options), {}, "GetToken")
        return await self._call("GetToken", lambda caller: core.get_token(caller, kbs), text)


class ManagerInterface(_Interface):
    def __init__(self, server: _Server) -> None:
        super().__init__(MANAGER, server)

    @_dbus_method("RefreshCertificates", "")
    async def refresh_certificates(self) -> None:
        core = self._server.core
        await self._call("RefreshCertificates", core.refresh_certificates,
                         lambda _none: None)

    @_dbus_property(MANAGER, "Version")
    def version(self) -> Any:
        return self._property("Version")

    @_dbus_property(MANAGER, "SevStatus")
    def sev_status(self) -> Any:
        return self._property("SevStatus")

    @_dbus_property(MANAGER, "Statistics")
    def statistics(self) -> Any:
        return self._property("Statistics")


# -- caller identity -------------------------------------------------------------------------


@dataclasses.dataclass
class _Incoming:
    """One method call as dbus-fast received it; claimed by the one coroutine serving it.
    ``ticket``: its admission by the :class:`Gate` (None: not counted yet)."""

    message: Any
    ticket: Optional[Ticket] = None
    claimed: bool = False


# The method call being dispatched. A ContextVar is the one object that can carry
# it from dbus-fast's message handler into the method's task (see the module doc);
# it holds no state of its own: every value lives in a task's context.
_INCOMING: contextvars.ContextVar[Optional[_Incoming]] = contextvars.ContextVar(
    "snpd_dbus_incoming", default=None)


class CallerIdentity:
    """Who is behind a unique bus name, from the bus's GetConnectionCredentials.

    Concurrent first calls from one sender share a single lookup. When the bus gives
    no UnixGroupIDs (dbus-daemon < 1.10), the groups come from /proc/<pid>/status
    (:func:`snpd.access.proc_credentials`: effective ids, as SO_PEERCRED gives them).
    """

    def __init__(self, bus: Any, *, limit: int = CREDENTIALS_CACHE_SIZE,
                 proc: Path = Path("/proc")) -> None:
        self._bus = bus
        self._limit = limit
        self._proc = proc
        self._known: Dict[str, Caller] = {}
        self._pending: Dict[str, asyncio.Future[Caller]] = {}
        self._vanished: Set[str] = set()

    def known(self, sender: Optional[str]) -> Optional[Caller]:
        """The cached caller behind ``sender``, without asking the bus."""
        return self._known.get(sender) if sender else None

    def prefetch(self, sender: str) -> None:
        """Start learning who ``sender`` is, so that its next calls are counted
        against its user from the start."""
        if sender not in self._known and sender not in self._pending:
            fut = asyncio.ensure_future(self.caller(sender))
            fut.add_done_callback(_consume)

    def cached_names(self) -> List[str]:
        """The unique names whose credentials are cached (for tests and diagnostics)."""
        return list(self._known)

    async def caller(self, sender: Optional[str]) -> Caller:
        if not sender:
            raise PermissionDenied("the call carries no sender, so its caller is unknown")
        known = self._known.get(sender)
        if known is not None:
            return known
        pending = self._pending.get(sender)
        if pending is None:
            pending = asyncio.ensure_future(self._lookup(sender))
            self._pending[sender] = pending
            pending.add_done_callback(lambda fut: self._settle(sender, fut))
        return await asyncio.shield(pending)

    def forget(self, name: str) -> None:
        """The name left the bus: its entry goes (and a lookup in flight is not kept)."""
        self._known.pop(name, None)
        if name in self._pending:
            self._vanished.add(name)

    def _settle(self, sender: str, fut: asyncio.Future[Caller]) -> None:
        self._pending.pop(sender, None)
        vanished = sender in self._vanished
        self._vanished.discard(sender)
        if fut.cancelled() or fut.exception() is not None or vanished:
            return
        while len(self._known) >= self._limit:
            self._known.pop(next(iter(self._known)))
        self._known[sender] = fut.result()

    async def _lookup(self, sender: str) -> Caller:
        reply = await self._bus.call(Message(
            destination=_DBUS, path=_DBUS_PATH, interface=_DBUS,
            member="GetConnectionCredentials", signature="s", body=[sender]))
        if reply.message_type is MessageType.ERROR:
            raise PermissionDenied(f"the bus cannot say who {sender} is ({reply.error_name})")
        creds = reply.body[0]
        if "UnixUserID" not in creds:
            raise PermissionDenied(f"the bus does not say which uid {sender} runs as")
        uid = int(creds["UnixUserID"].value)
        pid = int(creds["ProcessID"].value) if "ProcessID" in creds else None
        if "UnixGroupIDs" in creds:
            gids = frozenset(int(g) for g in creds["UnixGroupIDs"].value)
        else:
            gids = proc_credentials(pid, uid, str(self._proc))
        return Caller(uid=uid, gids=gids, pid=pid, transport="dbus", peer=sender)


# -- the server ------------------------------------------------------------------------------


class _Server:
    """Binds one Service to one bus connection: dispatch, properties, signals."""

    def __init__(self, core: ServiceAPI, bus: Any, limits: Limits,
                 clock: Callable[[], float]) -> None:
        self.core = core
        self.bus = bus
        self.identity = CallerIdentity(bus)
        self.interfaces: Dict[str, _Interface] = {
            ATTESTATION: AttestationInterface(self),
            KEYS: KeysInterface(self),
            SECRETS: SecretsInterface(self),
            MANAGER: ManagerInterface(self),
        }
        methods = {(iface.name, m.name): m.in_signature
                   for iface in self.interfaces.values() for m in iface.introspect().methods}
        # D-Bus lets one connection pipeline any number of calls, and the bus hands them
        # to us in arrival order: the gate bounds what each connection and each user
        # may have in flight before a message is even unpacked.
        self.gate = Gate(limits, methods, OBJECT_PATH, clock)
        self.loop = asyncio.get_running_loop()
        self.closed = False

    def on_message(self, msg: Any) -> None:
        """dbus-fast message handler, run for every incoming message before dispatch:
        forgets senders that left the bus. Returns None (never claims a message) and
        never raises."""
        try:
            if (msg.message_type is MessageType.SIGNAL and msg.member == "NameOwnerChanged"
                    and msg.sender == _DBUS):
                name, _old, new = msg.body
                if not new:
                    self.identity.forget(name)
        except Exception:
            _log.exception("D-Bus message handler failed")

    async def call(self, interface: str, member: str,
                   invoke: Callable[[Caller], Awaitable[_R]],
                   encode: Callable[[_R], _E]) -> _E:
        """Serve one method call: who calls (from the bus), whether they may (asked
        before the arguments are decoded, so an outsider learns nothing from them),
        then ``invoke`` (which decodes the arguments into the service's typed values
        and awaits the service) and ``encode``."""
        incoming = _INCOMING.get()
        ticket: Optional[Ticket] = None
        try:
            sender = self._claim(incoming, interface, member)
            ticket = incoming.ticket if incoming is not None else None
            caller = await self.identity.caller(sender)
            ticket, refusal = self._count(ticket, sender, caller.uid)
            if refusal is not None:
                raise Busy(refusal.text)
            self.core.check(caller, member)
            return encode(await invoke(caller))
        except SnpdError as exc:
            raise DBusError(exc.dbus_name(), text(str(exc))) from None
        except DBusError:
            raise
        except Exception:
            _log.exception("%s.%s failed", interface, member)
            raise DBusError(INTERNAL_ERROR, f"{member} failed inside snpd; the daemon's log "
                                            "has the details") from None
        finally:
            if ticket is not None:
                self.gate.release(ticket)

    def _count(self, ticket: Optional[Ticket], sender: Optional[str], uid: int
               ) -> Tuple[Optional[Ticket], Optional[Refusal]]:
        """The call's admission once its user is known: a ticket from the reader is
        moved to that user; a call the reader could not classify is admitted now."""
        if ticket is not None:
            return self.gate.identified(ticket, uid)
        return self.gate.admit(sender or "", uid)  # a call without sender has no caller

    @staticmethod
    def _claim(incoming: Optional[_Incoming], interface: str, member: str) -> Optional[str]:
        """The sender of the message being served. The reader answers calls without
        an interface itself, so the message must name exactly this one."""
        msg: Any = incoming.message if incoming is not None else None
        if (incoming is None or incoming.claimed or msg.member != member
                or msg.interface != interface):
            _log.error("cannot tell which message %s.%s serves: refusing the call (is this "
                       "dbus-fast version supported?)", interface, member)
            raise Internal(f"{member}: the caller's identity is unavailable")
        incoming.claimed = True
        sender: Optional[str] = msg.sender
        return sender

    def property_value(self, interface: str, name: str) -> Any:
        """A property as dbus-fast sends it. Who may read it was decided by the reader
        before dbus-fast got the message (:meth:`_Reader._properties`)."""
        try:
            value = property_value(self.core.properties(), FIELDS[(interface, name)])
            return encode_property(PROPERTIES[interface][name][0], value)
        except Exception:
            _log.exception("property %s.%s failed", interface, name)
            raise DBusError(INTERNAL_ERROR, f"property {name} is unavailable; the daemon's "
                                            "log has the details") from None

    def properties_changed(self, changed: Mapping[str, object]) -> None:
        """Service listener. Safe from any thread; never raises into the Service."""
        if self.closed:
            return
        try:
            running: Optional[asyncio.AbstractEventLoop] = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is self.loop:
            self._emit(dict(changed))
            return
        # RuntimeError: the loop is closed, so nobody is listening any more.
        with contextlib.suppress(RuntimeError):
            self.loop.call_soon_threadsafe(self._emit, dict(changed))

    def _emit(self, changed: Dict[str, object]) -> None:
        """PropertiesChanged, one signal per interface, for the properties that emit."""
        if self.closed:
            return
        by_interface: Dict[str, Dict[str, object]] = {}
        for field, value in changed.items():
            key = _NAMES.get(field)
            if key is not None:
                by_interface.setdefault(key[0], {})[key[1]] = plain_property(field, value)
        for interface, values in by_interface.items():
            target = self.interfaces.get(interface)
            specs = PROPERTIES.get(interface, {})
            if target is None:
                continue
            try:
                encoded = {name: encode_property(specs[name][0], value)
                           for name, value in values.items() if specs[name][1] == "true"}
                if encoded:
                    target.emit_properties_changed(encoded)
            except Exception:
                _log.exception("cannot emit PropertiesChanged for %s", interface)


class ServerHandle:
    """A served connection: :meth:`close` ends it; :meth:`wait_closed` returns when
    the bus connection ends for any reason (the daemon exits and systemd restarts it)."""

    def __init__(self, server: _Server, address: str, unique_name: str) -> None:
        self._server = server
        self.address = address
        self.unique_name = unique_name

    @property
    def bus(self) -> Any:
        return self._server.bus

    @property
    def identity(self) -> CallerIdentity:
        return self._server.identity

    async def wait_closed(self) -> None:
        """Cancelling a waiter must not cancel dbus-fast's one disconnect future, which
        every other waiter (and :meth:`close`) awaits too: hence the shield."""
        try:
            await asyncio.shield(self._server.bus.wait_for_disconnect())
        except Exception as exc:  # the connection broke; that is what the caller waits for
            _log.warning("D-Bus connection ended: %s", str(exc) or type(exc).__name__)

    async def close(self) -> None:
        if self._server.closed:
            return
        self._server.closed = True
        self._server.bus.disconnect()
        await self.wait_closed()


class _Reader:
    """Reads the bus socket in dbus-fast's place (see :mod:`snpd.dbus.wire` for why).

    It frames messages with a bounded :class:`~snpd.dbus.wire.Framer`, skips and
    answers oversized ones, lets the :class:`Gate` admit or refuse method calls
    before they are unpacked, reduces the flags to what every dbus-fast maps, and
    only then hands a message to dbus-fast's own dispatch (``_process_message``),
    which exports, properties and replies keep using. One ``recv`` per wake-up, so
    a flood on the bus socket cannot hold the event loop. Nothing a peer sends ends
    the connection: only the socket's end or a stream that is not D-Bus does.
    """

    def __init__(self, server: _Server, max_message: int,
                 clock: Callable[[], float]) -> None:
        self._server = server
        self._bus = server.bus
        self._framer = wire.Framer(max_message)
        self._sock: Any = self._bus._sock
        self._fd: int = self._bus._fd
        self._log_limiter = LogLimiter(_DROPPED_LOG_INTERVAL, clock)
        self._machine_id: Optional[str] = None

    def install(self) -> None:
        """Take the socket's read side over from dbus-fast. Fails closed: a dbus-fast
        without the expected internals is refused rather than run unprotected."""
        loop = self._server.loop
        for name in ("_process_message", "_finalize"):
            if not callable(getattr(self._bus, name, None)):
                raise Internal(f"this dbus-fast has no MessageBus.{name}: snpd cannot read "
                               "its bus connection safely")
        if not isinstance(self._fd, int) or self._sock is None:
            raise Internal("this dbus-fast exposes no bus socket: snpd cannot read its bus "
                           "connection safely")
        if not loop.remove_reader(self._fd):
            raise Internal("dbus-fast was not reading its bus socket as expected")
        loop.add_reader(self._fd, self._readable)

    def _readable(self) -> None:
        try:
            data = self._sock.recv(self._framer.wanted())
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self._bus._finalize(exc)
            return
        if not data:
            self._bus._finalize(EOFError())
            return
        try:
            events = self._framer.feed(data)
        except wire.WireError as exc:
            _log.error("the bus sent something that is not D-Bus (%s): closing the "
                       "connection", exc)
            self._bus._finalize(exc)
            return
        for event in events:
            try:
                self._handle(event)
            except Exception:
                _log.exception("cannot handle a D-Bus message; it was dropped")

    def _handle(self, event: wire.Event) -> None:
        header, fields = event.header, event.fields
        if isinstance(event, wire.Oversized):
            self._oversized(event)
            return
        assert fields is not None and isinstance(event, wire.Frame)
        if header.type != wire.METHOD_CALL:
            self._dispatch(event.data, None)
            return
        if fields.interface is None:
            # D-Bus lets a call leave out its interface, and dbus-fast versions differ
            # on what follows: 1.84 (Debian 12) answers UnknownMethod, 2.21 (Ubuntu
            # 24.04) raises inside its dispatcher and never answers, so the caller
            # waits out its timeout, and 2.44 finds the method by name. snpd answers
            # the same on every version, and its access rules stay per interface.
            self._answer(header, fields, "org.freedesktop.DBus.Error.UnknownMethod",
                         f"{fields.member or 'the method'}: snpd needs the interface "
                         "named on every call")
            return
        server = self._server
        sender = fields.sender
        known = server.identity.known(sender)
        uid = known.uid if known is not None else None
        if sender and known is None:
            server.identity.prefetch(sender)
        kind = server.gate.classify(fields.path, fields.interface, fields.member,
                                    fields.signature)
        if kind is Kind.SERVICE and sender:
            ticket, refusal = server.gate.admit(sender, uid)
            if refusal is not None:
                self._answer(header, fields, refusal.error_name, refusal.text)
                return
            self._dispatch(event.data, ticket)
            return
        refusal = server.gate.cheap(sender or "", uid)
        if refusal is not None:
            self._answer(header, fields, refusal.error_name, refusal.text)
            return
        if fields.interface == _PEER and fields.path is not None:
            self._peer(header, fields)
            return
        if fields.interface == _PROPERTIES and fields.path == OBJECT_PATH and sender:
            self._properties(event.data, header, fields, sender)
            return
        self._dispatch(event.data, None)

    def _properties(self, data: bytes, header: wire.Header, fields: wire.Fields,
                    sender: str) -> None:
        """org.freedesktop.DBus.Properties, for whom the service's access table lets
        read them ("GetProperties"): dbus-fast does not tell a property who reads it, so
        the reader decides before dispatch; a sender not yet known is looked up
        first (its call is then dispatched when the bus has answered)."""
        known = self._server.identity.known(sender)
        if known is not None:
            self._properties_for(known, data, header, fields)
            return
        fut = asyncio.ensure_future(self._properties_later(data, header, fields, sender))
        fut.add_done_callback(_consume)

    async def _properties_later(self, data: bytes, header: wire.Header, fields: wire.Fields,
                                sender: str) -> None:
        try:
            caller = await self._server.identity.caller(sender)
        except SnpdError as exc:
            self._answer(header, fields, exc.dbus_name(), text(str(exc)))
            return
        if not self._server.closed:
            self._properties_for(caller, data, header, fields)

    def _properties_for(self, caller: Caller, data: bytes, header: wire.Header,
                        fields: wire.Fields) -> None:
        try:
            self._server.core.check(caller, "GetProperties")
        except SnpdError as exc:
            self._answer(header, fields, exc.dbus_name(), text(str(exc)))
            return
        self._dispatch(data, None)

    def _peer(self, header: wire.Header, fields: wire.Fields) -> None:
        """org.freedesktop.DBus.Peer, answered here: dbus-fast 1.84.2 answers every
        GetMachineId after the first with an error (it passes the cached id where a
        list is due)."""
        if not header.expects_reply or not fields.sender:
            return
        if fields.member == "Ping" and fields.signature == "":
            body: List[Any] = []
            signature = ""
        elif fields.member == "GetMachineId" and fields.signature == "":
            if self._machine_id is None:
                self._machine_id = _machine_id()
            if not self._machine_id:
                self._answer(header, fields, "org.freedesktop.DBus.Error.FileNotFound",
                             "this machine has no machine id")
                return
            body, signature = [self._machine_id], "s"
        else:
            self._answer(header, fields, "org.freedesktop.DBus.Error.UnknownMethod",
                         "org.freedesktop.DBus.Peer has Ping() and GetMachineId()")
            return
        self._bus.send(Message(message_type=MessageType.METHOD_RETURN,
                               destination=fields.sender, reply_serial=header.serial,
                               signature=signature, body=body))

    def _dispatch(self, data: bytes, ticket: Optional[Ticket]) -> None:
        try:
            msg = unmarshal(wire.for_dbus_fast(data))
        except Exception:
            if ticket is not None:
                self._server.gate.release(ticket)
            raise
        _INCOMING.set(_Incoming(msg, ticket) if msg.message_type is MessageType.METHOD_CALL
                      and msg.path == OBJECT_PATH else None)
        self._bus._process_message(msg)

    def _oversized(self, event: wire.Oversized) -> None:
        left_out = self._log_limiter.admit("oversized", -1)
        if left_out is not None:
            _log.warning("dropped a D-Bus message of %d bytes unread, over snpd's limit of "
                         "%d; %d similar suppressed in the last %g s",
                         event.header.total_length, self._framer.max_message, left_out,
                         _DROPPED_LOG_INTERVAL)
        if event.fields is not None:
            self._answer(event.header, event.fields, _INVALID_ARGUMENT,
                         f"the message has {event.header.total_length} bytes; snpd reads "
                         f"at most {self._framer.max_message}")

    def _answer(self, header: wire.Header, fields: wire.Fields, error_name: str,
                text: str) -> None:
        if not header.expects_reply or not fields.sender:
            return
        self._bus.send(Message(message_type=MessageType.ERROR, destination=fields.sender,
                               reply_serial=header.serial, error_name=error_name,
                               signature="s", body=[text]))


def unmarshal(data: bytes) -> Any:
    """One whole message as dbus-fast's :class:`Message`, with dbus-fast's own
    unmarshaller over a stream (its constructor differs between 1.x and 5.x)."""
    stream: Any = io.BytesIO(data)  # dbus-fast only calls its read()
    make: Any = Unmarshaller
    try:
        unmarshaller = make(stream, None, False)
    except TypeError:
        unmarshaller = make(stream, None)
    msg = unmarshaller.unmarshall()
    if msg is None:
        raise ValueError("incomplete D-Bus message")
    return msg


def _machine_id() -> str:
    """The machine id as D-Bus defines it, or "" when the machine has none."""
    for path in ("/etc/machine-id", "/var/lib/dbus/machine-id"):
        try:
            with open(path, encoding="ascii") as f:
                value = f.read(64).strip()
        except (OSError, UnicodeDecodeError):
            continue
        if len(value) == 32 and all(c in "0123456789abcdef" for c in value):
            return value
    return ""


def _consume(fut: asyncio.Future[Any]) -> None:
    """Retrieve a background future's outcome so asyncio does not log it as lost."""
    if not fut.cancelled():
        fut.exception()


class _PatientSocket:
    """The bus socket as dbus-fast's writer sees it, with ``send`` reporting a full
    socket buffer as 0 bytes sent instead of raising.

    dbus-fast (1.84 through 5.2 at least) writes to its non-blocking socket at once
    when its queue is empty and takes the ``BlockingIOError`` of a full buffer for a
    broken connection: under load, when dbus-daemon reads slower than snpd answers,
    snpd lost the bus (seen with bench/load.py). A short count is what dbus-fast
    already handles for partial writes: it keeps the rest and waits until the socket
    is writable. ``sendmsg`` (unix fds, which snpd never sends) is left as it is,
    since dbus-fast forgets the fds after one attempt."""

    def __init__(self, sock: Any) -> None:
        self._sock = sock

    def send(self, data: Any, *flags: int) -> int:
        try:
            sent: int = self._sock.send(data, *flags)
        except BlockingIOError:
            return 0
        return sent

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sock, name)


def _tolerate_a_full_socket(bus: Any) -> None:
    writer = getattr(bus, "_writer", None)
    if writer is not None and hasattr(writer, "sock") and not isinstance(writer.sock,
                                                                         _PatientSocket):
        writer.sock = _PatientSocket(writer.sock)
    else:
        _log.warning("this dbus-fast has no writer socket to wrap: a full socket buffer "
                     "may end the bus connection under load")


async def serve(service: ServiceAPI, bus_address: Optional[str] = None, *,
                limits: Optional[Limits] = None, max_message: int = MAX_MESSAGE,
                clock: Optional[Callable[[], float]] = None) -> ServerHandle:
    """Serve ``service`` as org.snpd.Snpd1 on the system bus, or on ``bus_address``.

    ``limits`` bound the calls in flight per connection, per user and in all, and the
    rate of cheap calls (:mod:`snpd.dbus.gate`); messages over ``max_message`` bytes
    are skipped unread and answered InvalidArgument.

    Without an address, ``$DBUS_SYSTEM_BUS_ADDRESS`` is used, then the standard
    system bus socket. Must run inside the event loop (dbus-fast 5 creates its bus
    there). Raises :class:`~snpd.errors.PermissionDenied` when the bus policy does not
    let this uid own the name, :class:`~snpd.errors.Busy` when another connection
    owns it.
    """
    address = (bus_address or os.environ.get("DBUS_SYSTEM_BUS_ADDRESS")
               or DEFAULT_SYSTEM_BUS)
    bus: Any = MessageBus(bus_address=address, bus_type=BusType.SYSTEM)
    await bus.connect()
    _tolerate_a_full_socket(bus)
    try:
        clock = clock or asyncio.get_running_loop().time
        server = _Server(service, bus, limits or Limits(), clock)
        _Reader(server, max_message, clock).install()
        bus.add_message_handler(server.on_message)
        reply = await bus.call(Message(destination=_DBUS, path=_DBUS_PATH, interface=_DBUS,
                                       member="AddMatch", signature="s",
                                       body=[_VANISHED_RULE]))
        if reply.message_type is MessageType.ERROR:
            raise Internal(f"cannot watch for callers leaving the bus: {reply.error_name}")
        for interface in server.interfaces.values():
            bus.export(OBJECT_PATH, interface)
        try:
            owned = await bus.request_name(BUS_NAME, NameFlag.DO_NOT_QUEUE)
        except DBusError as exc:
            if exc.type == _ACCESS_DENIED:
                raise PermissionDenied(
                    f"the bus policy does not let uid {os.getuid()} own {BUS_NAME}: run snpd "
                    f"as user snpd and install org.snpd.Snpd1.conf into the bus's system.d "
                    f"({exc.text})") from None
            raise
        if owned not in (RequestNameReply.PRIMARY_OWNER, RequestNameReply.ALREADY_OWNER):
            raise Busy(f"{BUS_NAME} is owned by another connection on {address} "
                       "(is another snpd running?)")
    except BaseException:
        bus.disconnect()
        with contextlib.suppress(Exception):
            await bus.wait_for_disconnect()
        raise
    service.subscribe(server.properties_changed)
    _log.info("serving %s on %s as %s", BUS_NAME, address, bus.unique_name)
    return ServerHandle(server, address, bus.unique_name)
