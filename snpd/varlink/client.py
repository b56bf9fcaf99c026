"""A small varlink client for snpd's socket: synchronous, and an asyncio twin.

``snpctl`` runs this on every command the daemon answers, within a whole-process
budget of 25 ms (docs/contracts.md, "Performance budget"), so the module imports only the standard
library's cheap parts and :mod:`snpd.errors` — not the protocol core (dataclasses), not
asyncio (imported by :class:`AsyncVarlinkClient` only when it is used), never
cryptography or dbus-fast. Replies are decoded here with a few lines of their own
for the same reason, and the socket comes from ``_socket``, the C module under
:mod:`socket`, whose own import (enum conversions, selectors) costs more than
everything else here together: about 2.5 of 5 ms. For the same reason again the
JSON is read and written by the C accelerator under :mod:`json`, ``_json``,
driven as :mod:`json` drives it: json.decoder and json.encoder import re (and re
imports enum), about 6 ms of a 25 ms budget.

Errors come back as the :mod:`snpd.errors` classes the daemon raised:
``org.snpd.<Interface>.<Kind>`` maps to the class of that kind (``...Busy`` →
:class:`~snpd.errors.Busy`), ``org.varlink.service.InvalidParameter`` to
InvalidArgument, an unknown interface or method (an older daemon) to
NotSupported, anything else to Internal. Failing to reach the socket raises the
OSError unchanged, so a caller can fall back to D-Bus.

    with VarlinkClient("/run/snpd/snpd.varlink") as client:
        report = client.call("org.snpd.Attestation.GetReport",
                             {"report_data": base64.b64encode(nonce).decode()})["report"]
"""

from __future__ import annotations

import _socket  # socket.py's enum set-up would be half this module's import time
import time

from snpd.errors import (
    Busy,
    CertificatesUnavailable,
    DeviceError,
    Internal,
    InvalidArgument,
    KbsError,
    NotSupported,
    PermissionDenied,
    SnpdError,
    Timeout,
    VmpckDisabled,
)

TYPE_CHECKING = False  # see snpd/__init__.py: the client path does not import typing
if TYPE_CHECKING:
    import asyncio
    from typing import Any, Dict, Mapping, Optional, Tuple, Type

DEFAULT_SOCKET = "/run/snpd/snpd.varlink"
DEFAULT_TIMEOUT = 60.0
MAX_REPLY = 16 << 20
_RECV = 1 << 16

_KINDS: Dict[str, Type[SnpdError]] = {
    cls.kind: cls
    for cls in (InvalidArgument, PermissionDenied, Busy, Timeout, DeviceError, VmpckDisabled,
                NotSupported, CertificatesUnavailable, KbsError, Internal)
}
_NOT_FOUND = ("org.varlink.service.InterfaceNotFound", "org.varlink.service.MethodNotFound",
              "org.varlink.service.MethodNotImplemented")


def _not_serializable(value: Any) -> Any:
    raise TypeError(f"Object of type {value.__class__.__name__} is not JSON serializable")


class _Scanning:
    """The settings json.JSONDecoder() gives its C scanner (json.loads' defaults)."""

    def __init__(self) -> None:
        self.strict = True
        self.object_hook = self.object_pairs_hook = None
        self.parse_float, self.parse_int = float, int
        self.parse_constant = {"-Infinity": float("-inf"), "Infinity": float("inf"),
                               "NaN": float("nan")}.__getitem__


try:
    import _json
except ImportError:  # not CPython: json itself, import cost and all
    import json

    def _dumps(value: Any) -> str:
        return json.dumps(value, ensure_ascii=True, separators=(",", ":"))

    def _loads(text: str) -> Any:
        return json.loads(text)
else:
    _scan = _json.make_scanner(_Scanning())  # type: ignore[arg-type]  # typeshed: itself
    _SPACE = " \t\n\r"  # JSON's whitespace, json.decoder's WHITESPACE

    def _dumps(value: Any) -> str:
        """json.dumps(value, ensure_ascii=True, separators=(",", ":")), run as
        JSONEncoder.encode runs it: circular references checked (a fresh set of
        markers each time, as a failed call leaves its own behind), NaN allowed,
        keys in their order."""
        encode = _json.make_encoder({}, _not_serializable, _json.encode_basestring_ascii,
                                    None, ":", ",", False, False, True)
        return "".join(encode(value, 0))

    def _loads(text: str) -> Any:
        """json.loads(text) for a str: a ValueError (as json.JSONDecodeError is) for
        anything but one JSON value between optional whitespace."""
        try:
            value, end = _scan(text, len(text) - len(text.lstrip(_SPACE)))
        except StopIteration:
            raise ValueError("Expecting value") from None
        if text[end:].strip(_SPACE):
            raise ValueError("Extra data")
        return value


class TransportError(Internal):
    """The connection failed in the middle of a call, or the reply is not varlink."""


class _Retry(Exception):
    """The connection was found dead before any reply byte arrived: safe to resend."""


def error_from_reply(name: str, parameters: Mapping[str, Any]) -> SnpdError:
    """The :mod:`snpd.errors` instance for a varlink error reply."""
    interface, _, kind = name.rpartition(".")
    message = parameters.get("message")
    if interface.startswith("org.snpd.") and kind in _KINDS and isinstance(message, str):
        exc = _KINDS[kind](message)
        if isinstance(exc, DeviceError):
            exc.errno = _int_or_none(parameters.get("errno"))
            exc.fw_error = _int_or_none(parameters.get("fw_error"))
            exc.vmm_error = _int_or_none(parameters.get("vmm_error"))
        return exc
    if name == "org.varlink.service.InvalidParameter":
        return InvalidArgument(f"the daemon rejected parameter "
                               f"{parameters.get('parameter')!r}")
    if name in _NOT_FOUND:
        what = parameters.get("method") or parameters.get("interface")
        return NotSupported(f"the daemon does not implement {what!r} ({name})")
    if name == "org.varlink.service.PermissionDenied":
        return PermissionDenied("the daemon denied the call")
    import json  # lazy: json imports re (6 ms of 25); only for an unknown error

    return Internal(f"{name}: {json.dumps(dict(parameters), sort_keys=True)}")


def _int_or_none(value: Any) -> Optional[int]:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def encode_call(method: str, parameters: Optional[Mapping[str, Any]], oneway: bool) -> bytes:
    message: Dict[str, Any] = {"method": method, "parameters": dict(parameters or {})}
    if oneway:
        message["oneway"] = True
    return _dumps(message).encode() + b"\0"


def decode_reply(message: bytes) -> Dict[str, Any]:
    """A reply's parameters; raises the mapped error for an error reply and
    TransportError for anything that is not a single varlink reply."""
    try:
        value = _loads(message.decode("utf-8"))
    except (ValueError, RecursionError):
        raise TransportError("the daemon's reply is not JSON") from None
    if not isinstance(value, dict):
        raise TransportError("the daemon's reply is not a JSON object")
    parameters = value.get("parameters")
    if parameters is None:
        parameters = {}
    if not isinstance(parameters, dict):
        raise TransportError("the daemon's reply has non-object parameters")
    error = value.get("error")
    if error is not None:
        if not isinstance(error, str):
            raise TransportError("the daemon's reply has a non-string error")
        raise error_from_reply(error, parameters)
    if value.get("continues"):
        raise TransportError("the daemon sent a streaming reply to a single call")
    return parameters


class VarlinkClient:
    """One connection to a varlink socket; calls are sequential.

    ``timeout`` bounds each call (connect, send and reply), in seconds; None
    waits forever. The socket is connected on the first call (or by
    :meth:`connect`). If a connection that served earlier calls turns out to have
    been closed by the daemon (idle timeout, restart) before any reply byte
    arrives, the call is resent once on a new connection.
    """

    def __init__(self, path: str = DEFAULT_SOCKET, timeout: Optional[float] = DEFAULT_TIMEOUT,
                 *, max_reply: int = MAX_REPLY) -> None:
        self.path = path
        self.timeout = timeout
        self.max_reply = max_reply
        self._sock: Optional[_socket.socket] = None
        self._buffer = bytearray()
        self._used = False

    def __enter__(self) -> VarlinkClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def connect(self) -> None:
        """Connect now; OSError (FileNotFoundError, PermissionError, ...) if the
        socket cannot be reached."""
        if self._sock is not None:
            return
        sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
        try:
            sock.settimeout(self.timeout)
            sock.connect(self.path)
        except _socket.timeout:
            sock.close()
            raise Timeout(f"cannot connect to {self.path} within {self.timeout} s") from None
        except BaseException:
            sock.close()
            raise
        self._sock = sock
        self._buffer.clear()
        self._used = False

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        self._buffer.clear()

    def call(self, method: str, parameters: Optional[Mapping[str, Any]] = None, *,
             oneway: bool = False) -> Dict[str, Any]:
        """Call ``method`` (``"org.snpd.Attestation.GetReport"``) and return the
        reply's parameters ({} for a oneway call, which gets no reply)."""
        deadline = None if self.timeout is None else time.monotonic() + self.timeout
        data = encode_call(method, parameters, oneway)
        try:
            return self._call_once(data, oneway, deadline)
        except _Retry:
            self.close()
            return self._call_once(data, oneway, deadline, retry=False)

    def _call_once(self, data: bytes, oneway: bool, deadline: Optional[float], *,
                   retry: bool = True) -> Dict[str, Any]:
        self.connect()
        assert self._sock is not None
        may_retry = retry and self._used
        self._used = True
        broken = False
        try:
            self._settimeout(deadline)
            try:
                self._sock.sendall(data)
            except (BrokenPipeError, ConnectionResetError):
                if may_retry:
                    raise _Retry() from None
                broken = True  # the daemon may have replied with the reason first
            if oneway and not broken:
                return {}
            message = self._receive(deadline, may_retry=may_retry and not broken)
        except _socket.timeout:
            self.close()
            raise Timeout(f"no reply from {self.path} within {self.timeout} s") from None
        except OSError as exc:
            self.close()
            raise TransportError(f"connection to {self.path} failed: {exc}") from exc
        except BaseException:
            self.close()
            raise
        if broken:
            self.close()
        try:
            return decode_reply(message)
        except TransportError:
            self.close()
            raise

    def _settimeout(self, deadline: Optional[float]) -> None:
        assert self._sock is not None
        if deadline is None:
            self._sock.settimeout(None)
            return
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise _socket.timeout()
        self._sock.settimeout(remaining)

    def _receive(self, deadline: Optional[float], *, may_retry: bool) -> bytes:
        assert self._sock is not None
        while True:
            end = self._buffer.find(b"\0")
            if end >= 0:
                message = bytes(self._buffer[:end])
                del self._buffer[:end + 1]
                return message
            if len(self._buffer) > self.max_reply:
                raise TransportError(f"reply longer than {self.max_reply} bytes")
            self._settimeout(deadline)
            try:
                chunk = self._sock.recv(_RECV)
            except ConnectionResetError:
                chunk = b""
            if not chunk:
                if may_retry and not self._buffer:
                    raise _Retry()
                raise TransportError(f"{self.path} closed the connection")
            self._buffer += chunk


class AsyncVarlinkClient:
    """:class:`VarlinkClient` for asyncio: the same constructor, and ``connect``,
    ``call`` and ``close`` as coroutines; ``async with`` closes. Concurrent calls
    from several tasks on one client are serialized."""

    def __init__(self, path: str = DEFAULT_SOCKET, timeout: Optional[float] = DEFAULT_TIMEOUT,
                 *, max_reply: int = MAX_REPLY) -> None:
        self.path = path
        self.timeout = timeout
        self.max_reply = max_reply
        self._streams: Optional[Tuple[asyncio.StreamReader, asyncio.StreamWriter]] = None
        self._lock: Optional[asyncio.Lock] = None
        self._used = False

    async def __aenter__(self) -> AsyncVarlinkClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def connect(self) -> None:
        import asyncio  # lazy: the async client only; snpctl's sync calls skip it (25 ms)

        if self._streams is not None:
            return
        try:
            self._streams = await asyncio.wait_for(
                asyncio.open_unix_connection(self.path, limit=self.max_reply), self.timeout)
        except asyncio.TimeoutError:
            raise Timeout(f"cannot connect to {self.path} within {self.timeout} s") from None
        self._used = False

    async def close(self) -> None:
        streams, self._streams = self._streams, None
        if streams is not None:
            streams[1].close()
            import contextlib  # lazy: the async client only (see connect)

            with contextlib.suppress(OSError):
                await streams[1].wait_closed()

    async def call(self, method: str, parameters: Optional[Mapping[str, Any]] = None, *,
                   oneway: bool = False) -> Dict[str, Any]:
        import asyncio  # lazy: the async client only (see connect)

        if self._lock is None:
            self._lock = asyncio.Lock()
        data = encode_call(method, parameters, oneway)
        async with self._lock:
            try:
                return await asyncio.wait_for(self._call(data, oneway), self.timeout)
            except asyncio.TimeoutError:
                await self.close()
                raise Timeout(f"no reply from {self.path} within {self.timeout} s") from None

    async def _call(self, data: bytes, oneway: bool) -> Dict[str, Any]:
        try:
            return await self._call_once(data, oneway, retry=True)
        except _Retry:
            await self.close()
            return await self._call_once(data, oneway, retry=False)

    async def _call_once(self, data: bytes, oneway: bool, *, retry: bool) -> Dict[str, Any]:
        import asyncio  # lazy: the async client only (see connect)

        await self.connect()
        assert self._streams is not None
        reader, writer = self._streams
        may_retry = retry and self._used
        self._used = True
        broken = False
        try:
            try:
                writer.write(data)
                await writer.drain()
            except (BrokenPipeError, ConnectionResetError):
                if may_retry:
                    raise _Retry() from None
                broken = True  # the daemon may have replied with the reason first
            if oneway and not broken:
                return {}
            try:
                message = await reader.readuntil(b"\0")
            except (asyncio.IncompleteReadError, ConnectionResetError) as exc:
                partial = getattr(exc, "partial", b"")
                if may_retry and not broken and not partial:
                    raise _Retry() from None
                raise TransportError(f"{self.path} closed the connection") from None
            except asyncio.LimitOverrunError:
                raise TransportError(f"reply longer than {self.max_reply} bytes") from None
        except OSError as exc:
            await self.close()
            raise TransportError(f"connection to {self.path} failed: {exc}") from exc
        except BaseException:
            await self.close()
            raise
        if broken:
            await self.close()
        try:
            return decode_reply(message[:-1])
        except TransportError:
            await self.close()
            raise
