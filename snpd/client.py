"""Call the snpd daemon from an application: a small synchronous client and its asyncio twin.

    from snpd.client import SnpdClient

    with SnpdClient() as snpd:
        report = snpd.get_report(nonce)            # raw 1184 bytes
        key = snpd.derive_sealing_key("my-app")   # 32 bytes, bound to this uid and label

Transport: the varlink socket when it can be reached (standard library only, so
a short-lived caller starts fast), else D-Bus on the system bus; ``socket=``
forces varlink, ``bus=`` forces D-Bus. Errors are the :mod:`snpd.errors`
classes the daemon raised; :class:`DaemonUnavailable` when neither transport
answers.
"""

from __future__ import annotations

import binascii  # not base64, which imports re: a quarter of snpctl status's start-up
import os

from snpd.errors import EXIT_UNAVAILABLE, Internal, PermissionDenied, SnpdError, Timeout
from snpd.varlink.client import VarlinkClient, error_from_reply

TYPE_CHECKING = False  # see snpd/__init__.py: the client path does not import typing
if TYPE_CHECKING:
    import datetime
    from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

    CertificateList = List[Tuple[str, bytes]]

DEFAULT_SOCKET = "/run/snpd/snpd.varlink"
DEFAULT_VMPL = 0xFFFFFFFF


class DaemonUnavailable(SnpdError):
    """Neither the varlink socket nor the bus reached a daemon. Its own kind (what
    ``snpctl --json`` prints), not "NotSupported": that one means a running daemon
    cannot do something. Raised by this client only, so no wire kind (ALL_KINDS)."""

    kind = "DaemonUnavailable"
    exit_code = EXIT_UNAVAILABLE


def _b64(data: bytes) -> str:
    return binascii.b2a_base64(bytes(data), newline=False).decode()  # = base64.b64encode


def _unb64(text: Any) -> bytes:  # Any: whatever JSON value the daemon sent
    if isinstance(text, str):
        return binascii.a2b_base64(text)  # what base64.b64decode does with a str
    import base64  # lazy: base64 imports re (see binascii above); not for a str

    return base64.b64decode(text)  # and its errors for anything else


def _certs_from_varlink(items: Sequence[Mapping[str, str]]) -> CertificateList:
    return [(c["kind"], _unb64(c["data"])) for c in items]


def _by_interface(fields: Dict[str, Any]) -> Dict[str, Dict[str, Any]]:
    """varlink's typed properties (Describe) as this client has always returned them:
    by D-Bus interface name, then by property name (the shape D-Bus serves)."""
    # lazy: only Describe's caller loads it; a report or key call imports no more (25 ms)
    from snpd.status.summary import by_interface

    return by_interface(fields)


def _binding(properties: Mapping[str, Mapping[str, Any]]) -> str:
    """ReportDataBinding; "caller" from a daemon that predates it (and so any Azure
    backend)."""
    return str(properties.get("org.snpd.Snpd1.Attestation", {}).get("ReportDataBinding")
               or "caller")


def _unix_time(at: Optional[datetime.datetime]) -> Optional[int]:
    return None if at is None else int(at.timestamp())


# -- varlink --------------------------------------------------------------------------------


class _Varlink:
    """Method calls as varlink parameters: bytes as base64, nulls left out."""

    def __init__(self, path: str, timeout: float) -> None:
        self.client = VarlinkClient(path, timeout)
        self.client.connect()

    def call(self, method: str, **params: Any) -> Dict[str, Any]:
        return self.client.call(method, {k: v for k, v in params.items() if v is not None})

    def close(self) -> None:
        self.client.close()


def _varlink_ops(call: Any) -> Dict[str, Any]:
    A, K, M = "org.snpd.Attestation.", "org.snpd.Keys.", "org.snpd.Manager."
    S = "org.snpd.Secrets."

    def verify_options(certs: CertificateList, at: Optional[int], policy: Optional[str],
                       product: Optional[str]) -> Dict[str, Any]:
        return {"certificates": [{"kind": k, "data": _b64(d)} for k, d in certs] or None,
                "at": at, "policy": policy, "product": product}

    def verdict(r: Dict[str, Any]) -> Dict[str, Any]:
        return {"valid": r["valid"], "product": r["product"], "failures": r["failures"],
                "checks": [(c["name"], c["status"], c["detail"]) for c in r["checks"]]}
    return {
        "get_report": lambda data, vmpl: _unb64(call(
            A + "GetReport", report_data=_b64(data), vmpl=vmpl)["report"]),
        "get_extended_report": lambda data, vmpl: (lambda r: (
            _unb64(r["report"]), _certs_from_varlink(r["certificates"])))(call(
                A + "GetExtendedReport", report_data=_b64(data), vmpl=vmpl)),
        "get_certificates": lambda crl: _certs_from_varlink(call(
            A + "GetCertificates", options={"crl": True} if crl else None)["certificates"]),
        "verify": lambda report, certs, at, policy, product: verdict(call(
            A + "VerifyReport", report=_b64(report), **verify_options(
                certs, at, policy, product))),
        "verify_evidence": lambda fmt, evidence, nonce, certs, at, policy, product: verdict(
            call(A + "VerifyEvidence", format=fmt, evidence=_b64(evidence), nonce=_b64(nonce),
                 **verify_options(certs, at, policy, product))),
        "get_evidence": lambda fmt, nonce: (lambda r: (r["media_type"], _unb64(
            r["evidence"])))(call(A + "GetEvidence", format=fmt, nonce=_b64(nonce))),
        "derive_key": lambda root, fields, vmpl, svn, tcb: _unb64(call(
            K + "DeriveKey", root_key=root, fields=list(fields), vmpl=vmpl, guest_svn=svn,
            tcb_version=tcb)["key"]),
        "derive_sealing_key": lambda label, fields: _unb64(call(
            K + "DeriveSealingKey", label=label, fields=list(fields) or None)["key"]),
        "get_resource": lambda kbs, path: _unb64(call(
            S + "GetResource", kbs=kbs, path=path)["resource"]),
        "get_token": lambda kbs: call(S + "GetToken", kbs=kbs)["token"],
        "refresh_certificates": lambda: call(M + "RefreshCertificates") and None,
        "properties": lambda: _by_interface(call(M + "Describe")["properties"]),
    }


# -- D-Bus ------------------------------------------------------------------------------------


class _DBus:
    """dbus-fast on its own event loop, so the synchronous API stays synchronous."""

    NAME, PATH = "org.snpd.Snpd1", "/org/snpd/Snpd1"

    def __init__(self, address: Optional[str], timeout: float, tried: Sequence[str] = ()
                 ) -> None:
        import asyncio  # lazy: D-Bus only; the varlink path stays within 25 ms without it

        self.where = _bus_where(address)
        self.tried = tuple(tried)  # what failed before the bus, for DaemonUnavailable
        self.loop = asyncio.new_event_loop()
        self.timeout = timeout
        try:
            self.bus = self.loop.run_until_complete(self._connect(address))
        except BaseException:
            self.loop.close()
            raise

    async def _connect(self, address: Optional[str]) -> Any:
        # lazy: dbus-fast is optional and only for D-Bus (docs/contracts.md: no dbus-fast on
        # the varlink path); the bundled copy must be on sys.path first
        from snpd.bundled import use_bundled_dbus_fast

        use_bundled_dbus_fast()
        from dbus_fast import BusType  # after use_bundled_dbus_fast()
        from dbus_fast.aio import MessageBus

        address = address or os.environ.get("DBUS_SYSTEM_BUS_ADDRESS")
        _check_reachable(address or "unix:path=/var/run/dbus/system_bus_socket")
        bus = (MessageBus(bus_address=address) if address
               else MessageBus(bus_type=BusType.SYSTEM))
        try:
            return await bus.connect()
        except BaseException:
            # dbus-fast (1.84, Debian bookworm's) leaves its socket open when connecting
            # fails; close it here rather than leak a descriptor per attempt.
            _release_transport(bus)
            raise

    def call(self, interface: str, member: str, signature: str, body: List[Any]) -> List[Any]:
        # lazy: asyncio and dbus-fast are for D-Bus only (see _DBus.__init__)
        import asyncio

        from dbus_fast import Message, MessageType

        message = Message(destination=self.NAME, path=self.PATH, interface=interface,
                          member=member, signature=signature, body=body)
        try:
            reply = self.loop.run_until_complete(
                asyncio.wait_for(self.bus.call(message), self.timeout))
        except asyncio.TimeoutError:
            raise Timeout(f"the daemon did not answer {member} within {self.timeout} s") \
                from None
        if reply.message_type == MessageType.ERROR:
            error = _dbus_error(reply.error_name or "", reply.body)
            if isinstance(error, DaemonUnavailable):  # the bus runs, snpd is not on it
                error = DaemonUnavailable(_hint([*self.tried, f"{self.where}: {error}"]))
            raise error
        return list(reply.body)

    def close(self) -> None:
        self.bus.disconnect()
        self.loop.run_until_complete(asyncio_sleep0())
        self.loop.close()
        _release_transport(self.bus)


def _release_transport(bus: Any) -> None:
    """Close dbus-fast's socket and the file object it made from it. Not every version
    does both: 1.84 (Debian 12) leaves them open when connecting fails, and 2.x (2.44,
    Debian 13) closes only the socket on disconnect, so the file object keeps the
    descriptor open until the garbage collector finds it (a ResourceWarning). Closing
    what is closed already is a no-op, so this runs on every version."""
    import contextlib  # here only: the varlink path does without it

    for name in ("_stream", "_sock"):
        with contextlib.suppress(Exception):
            getattr(bus, name).close()


async def asyncio_sleep0() -> None:
    import asyncio  # lazy: D-Bus only (see _DBus.__init__)

    await asyncio.sleep(0)


def _check_reachable(address: str) -> None:
    """Refuse an unreachable unix:path= bus before dbus-fast tries: bookworm's dbus-fast
    (1.84) connects in MessageBus() itself and leaks the socket when that fails."""
    for part in address.split(";"):
        if not part.startswith("unix:"):
            return
        for option in part[len("unix:"):].split(","):
            key, _, value = option.partition("=")
            if key == "path":
                import socket  # lazy: socket.py's enum set-up; D-Bus only (varlink: _socket)

                probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                try:
                    probe.connect(value)
                    return
                except OSError as exc:
                    error = exc
                finally:
                    probe.close()
                raise OSError(error.errno, f"{error.strerror}: {value}")
    return


def _dbus_error(name: str, body: Sequence[Any]) -> SnpdError:
    message = body[0] if body and isinstance(body[0], str) else name
    prefix = "org.snpd.Snpd1.Error."
    if name.startswith(prefix):
        return error_from_reply("org.snpd.Attestation." + name[len(prefix):],
                                {"message": message})
    if name == "org.freedesktop.DBus.Error.AccessDenied":
        return PermissionDenied(f"the bus policy refused the call: {message}")
    if name in ("org.freedesktop.DBus.Error.ServiceUnknown",
                "org.freedesktop.DBus.Error.NameHasNoOwner"):
        return DaemonUnavailable("org.snpd.Snpd1 has no owner (snpd is not on the bus)")
    return Internal(f"{name}: {message}")


def _dbus_ops(dbus: _DBus) -> Dict[str, Any]:
    from dbus_fast import Variant  # lazy: optional, D-Bus only (see _DBus._connect)

    A, K, M = "org.snpd.Snpd1.Attestation", "org.snpd.Snpd1.Keys", "org.snpd.Snpd1.Manager"
    S = "org.snpd.Snpd1.Secrets"

    def vmpl_arg(vmpl: Optional[int]) -> int:
        return DEFAULT_VMPL if vmpl is None else vmpl

    def verify_options(certs: CertificateList, at: Optional[int], policy: Optional[str],
                       product: Optional[str]) -> Dict[str, Any]:
        options: Dict[str, Any] = {}
        if certs:
            options["certificates"] = Variant("a(say)", [[k, d] for k, d in certs])
        if at is not None:
            options["at"] = Variant("x", at)
        if policy is not None:
            options["policy"] = Variant("s", policy)
        if product is not None:
            options["product"] = Variant("s", product)
        return options

    def verify(report: bytes, certs: CertificateList, at: Optional[int], policy: Optional[str],
               product: Optional[str]) -> Dict[str, Any]:
        result = dbus.call(A, "VerifyReport", "aya{sv}",
                           [report, verify_options(certs, at, policy, product)])[0]
        return verdict(result)

    def verify_evidence(fmt: str, evidence: bytes, nonce: bytes, certs: CertificateList,
                        at: Optional[int], policy: Optional[str], product: Optional[str]
                        ) -> Dict[str, Any]:
        result = dbus.call(A, "VerifyEvidence", "sayaya{sv}",
                           [fmt, evidence, nonce, verify_options(certs, at, policy, product)])[0]
        return verdict(result)

    def verdict(result: Dict[str, Any]) -> Dict[str, Any]:
        plain = {k: v.value for k, v in result.items()}
        plain["checks"] = [tuple(c) for c in plain.get("checks", [])]
        return plain

    def properties() -> Dict[str, Any]:
        out = {}
        for interface in (A, M):
            values = dbus.call("org.freedesktop.DBus.Properties", "GetAll", "s", [interface])[0]
            out[interface] = {k: _plain(v) for k, v in values.items()}
        return out

    return {
        "get_report": lambda data, vmpl: bytes(dbus.call(
            A, "GetReport", "ayua{sv}", [data, vmpl_arg(vmpl), {}])[0]),
        "get_extended_report": lambda data, vmpl: (lambda r: (bytes(r[0]), [
            (k, bytes(d)) for k, d in r[1]]))(dbus.call(
                A, "GetExtendedReport", "ayua{sv}", [data, vmpl_arg(vmpl), {}])),
        "get_certificates": lambda crl: [(k, bytes(d)) for k, d in dbus.call(
            A, "GetCertificates", "a{sv}",
            [{"crl": Variant("b", True)} if crl else {}])[0]],
        "verify": verify,
        "verify_evidence": verify_evidence,
        "get_evidence": lambda fmt, nonce: (lambda r: (r[0], bytes(r[1])))(dbus.call(
            A, "GetEvidence", "saya{sv}", [fmt, nonce, {}])),
        "derive_key": lambda root, fields, vmpl, svn, tcb: bytes(dbus.call(
            K, "DeriveKey", "sasuuta{sv}",
            [root, list(fields), vmpl_arg(vmpl), svn or 0, tcb or 0, {}])[0]),
        "derive_sealing_key": lambda label, fields: bytes(dbus.call(
            K, "DeriveSealingKey", "sasa{sv}", [label, list(fields), {}])[0]),
        "get_resource": lambda kbs, path: bytes(dbus.call(
            S, "GetResource", "ssa{sv}", [kbs, path, {}])[0]),
        "get_token": lambda kbs: dbus.call(S, "GetToken", "sa{sv}", [kbs, {}])[0],
        "refresh_certificates": lambda: dbus.call(M, "RefreshCertificates", "", []) and None,
        "properties": properties,
    }


def _plain(value: Any) -> Any:
    from dbus_fast import Variant  # lazy: optional, D-Bus only (see _DBus._connect)

    if isinstance(value, Variant):
        return _plain(value.value)
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


# -- the client ---------------------------------------------------------------------------------


class SnpdClient:
    """A connection to the daemon. Thread-compatible, not thread-safe: one per thread."""

    def __init__(self, *, socket: Optional[str] = None, bus: Optional[str] = None,
                 timeout: float = 60.0) -> None:
        self.transport = ""
        self._closer: Any = None
        errors = []
        if bus is None:
            path = socket or os.environ.get("SNPD_SOCKET") or DEFAULT_SOCKET
            try:
                varlink = _Varlink(path, timeout)
                self._ops = _varlink_ops(varlink.call)
                self._closer, self.transport = varlink, "varlink"
                return
            except OSError as exc:
                errors.append(f"varlink socket {path}: {exc.strerror or exc}")
                if socket is not None:
                    raise DaemonUnavailable(_hint(errors)) from exc
        address = None if bus in (None, "system") else bus
        try:
            dbus = _DBus(address, timeout, errors)
        except ImportError as exc:
            errors.append(f"D-Bus: dbus-fast is not installed ({exc.name})")
            raise DaemonUnavailable(_hint(errors)) from exc
        except (OSError, EOFError, ValueError) as exc:
            code = exc.errno if isinstance(exc, OSError) else None
            reason = os.strerror(code) if code else str(exc)
            errors.append(f"{_bus_where(address)}: {reason}")
            raise DaemonUnavailable(_hint(errors)) from exc
        self._ops = _dbus_ops(dbus)
        self._closer, self.transport = dbus, "dbus"

    def __enter__(self) -> SnpdClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._closer is not None:
            self._closer.close()
            self._closer = None

    # Attestation
    def get_report(self, report_data: bytes = b"", vmpl: Optional[int] = None) -> bytes:
        """A report binding ``report_data`` (0-64 bytes, zero-padded) at ``vmpl``
        (default: the guest's own)."""
        result: bytes = self._ops["get_report"](bytes(report_data), vmpl)
        return result

    def get_extended_report(self, report_data: bytes = b"", vmpl: Optional[int] = None
                            ) -> Tuple[bytes, CertificateList]:
        result: Tuple[bytes, CertificateList] = self._ops["get_extended_report"](
            bytes(report_data), vmpl)
        return result

    def get_certificates(self, crl: bool = False) -> CertificateList:
        result: CertificateList = self._ops["get_certificates"](crl)
        return result

    def verify(self, report: bytes, certificates: CertificateList = (),  # type: ignore[assignment]
               at: Optional[datetime.datetime] = None, policy: Optional[str] = None,
               product: Optional[str] = None) -> Dict[str, Any]:
        """The daemon's verdict on any report: ``valid``, ``failures``, every check."""
        result: Dict[str, Any] = self._ops["verify"](bytes(report), list(certificates),
                                                     _unix_time(at), policy, product)
        return result

    def verify_evidence(self, evidence: bytes, nonce: bytes, fmt: str = "az-snp-vtpm",
                        certificates: CertificateList = (),  # type: ignore[assignment]
                        at: Optional[datetime.datetime] = None, policy: Optional[str] = None,
                        product: Optional[str] = None) -> Dict[str, Any]:
        """The daemon's verdict on evidence (Azure's az-snp-vtpm) for ``nonce``."""
        result: Dict[str, Any] = self._ops["verify_evidence"](
            fmt, bytes(evidence), bytes(nonce), list(certificates), _unix_time(at), policy,
            product)
        return result

    def get_evidence(self, fmt: str = "trustee", nonce: bytes = b"") -> Tuple[str, bytes]:
        result: Tuple[str, bytes] = self._ops["get_evidence"](fmt, bytes(nonce))
        return result

    # Keys
    def derive_key(self, root_key: str = "vcek", fields: Sequence[str] = (),
                   vmpl: Optional[int] = None, guest_svn: int = 0, tcb_version: int = 0) -> bytes:
        result: bytes = self._ops["derive_key"](root_key, fields, vmpl, guest_svn, tcb_version)
        return result

    def derive_sealing_key(self, label: str, fields: Sequence[str] = ()) -> bytes:
        result: bytes = self._ops["derive_sealing_key"](label, fields)
        return result

    # Secrets
    def get_resource(self, kbs: str, path: str) -> bytes:
        """Resource ``path`` (REPOSITORY/TYPE/TAG) from the configured KBS ``kbs``."""
        result: bytes = self._ops["get_resource"](kbs, path)
        return result

    def get_token(self, kbs: str) -> str:
        """The attestation token of the daemon's session with KBS ``kbs``."""
        result: str = self._ops["get_token"](kbs)
        return result

    # Manager
    def refresh_certificates(self) -> None:
        self._ops["refresh_certificates"]()

    def properties(self) -> Dict[str, Dict[str, Any]]:
        result: Dict[str, Dict[str, Any]] = self._ops["properties"]()
        return result

    def report_data_binding(self) -> str:
        """What REPORT_DATA binds in this daemon's reports: "caller" (the bytes given
        to get_report) or "runtime-data" (an Azure CVM: SHA-256 of the paravisor's
        runtime JSON, whose user-data holds those bytes)."""
        return _binding(self.properties())


class AsyncSnpdClient:
    """The asyncio twin of :class:`SnpdClient`: the same methods as coroutines, each run
    on a worker thread so the caller's event loop never blocks."""

    def __init__(self, *, socket: Optional[str] = None, bus: Optional[str] = None,
                 timeout: float = 60.0) -> None:
        self._args: Dict[str, Any] = {"socket": socket, "bus": bus, "timeout": timeout}
        self._client: Optional[SnpdClient] = None

    async def _run(self, name: str, *args: Any, **kw: Any) -> Any:
        # lazy: only AsyncSnpdClient needs these; SnpdClient (snpctl, 25 ms) never does
        import asyncio
        import functools

        loop = asyncio.get_running_loop()
        if self._client is None:
            self._client = await loop.run_in_executor(
                None, functools.partial(SnpdClient, **self._args))
        return await loop.run_in_executor(
            None, functools.partial(getattr(self._client, name), *args, **kw))

    async def __aenter__(self) -> AsyncSnpdClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None

    async def get_report(self, report_data: bytes = b"", vmpl: Optional[int] = None) -> bytes:
        result: bytes = await self._run("get_report", report_data, vmpl)
        return result

    async def get_extended_report(self, report_data: bytes = b"", vmpl: Optional[int] = None
                                  ) -> Tuple[bytes, CertificateList]:
        result: Tuple[bytes, CertificateList] = await self._run("get_extended_report",
                                                                report_data, vmpl)
        return result

    async def verify(self, report: bytes, **kw: Any) -> Dict[str, Any]:
        result: Dict[str, Any] = await self._run("verify", report, **kw)
        return result

    async def verify_evidence(self, evidence: bytes, nonce: bytes, **kw: Any) -> Dict[str, Any]:
        result: Dict[str, Any] = await self._run("verify_evidence", evidence, nonce, **kw)
        return result

    async def get_evidence(self, fmt: str = "trustee", nonce: bytes = b"") -> Tuple[str, bytes]:
        result: Tuple[str, bytes] = await self._run("get_evidence", fmt, nonce)
        return result

    async def derive_sealing_key(self, label: str, fields: Sequence[str] = ()) -> bytes:
        result: bytes = await self._run("derive_sealing_key", label, fields)
        return result

    async def get_resource(self, kbs: str, path: str) -> bytes:
        result: bytes = await self._run("get_resource", kbs, path)
        return result

    async def get_token(self, kbs: str) -> str:
        result: str = await self._run("get_token", kbs)
        return result

    async def derive_key(self, root_key: str = "vcek", fields: Sequence[str] = (),
                         **kw: Any) -> bytes:
        result: bytes = await self._run("derive_key", root_key, fields, **kw)
        return result

    async def properties(self) -> Dict[str, Dict[str, Any]]:
        result: Dict[str, Dict[str, Any]] = await self._run("properties")
        return result

    async def report_data_binding(self) -> str:
        return _binding(await self.properties())


def _bus_where(address: Optional[str]) -> str:
    """The bus as a message names it: the address given, else the system bus's."""
    return "D-Bus " + (address or os.environ.get("DBUS_SYSTEM_BUS_ADDRESS")
                       or "unix:path=/var/run/dbus/system_bus_socket")


def _hint(errors: Sequence[str]) -> str:
    return ("daemon not running or not reachable (" + "; ".join(errors) + "). Start it "
            "with 'systemctl start snpd', or use 'snpctl --direct' to open the device "
            "yourself (root)")
