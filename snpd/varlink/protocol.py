"""The varlink wire protocol as pure functions over bytes (no sockets, no clock).

varlink (https://varlink.org) sends JSON objects over a stream socket, each
terminated by one NUL byte. A call is ``{"method": "iface.Method",
"parameters": {...}, "oneway"?: bool, "more"?: bool, "upgrade"?: bool}``; a reply
is ``{"parameters": {...}}`` or ``{"error": "iface.Name", "parameters": {...}}``.
Keeping this layer sans-IO lets every rule below be tested exhaustively on bytes
and fuzzed, and keeps the asyncio server a thin loop.

Two kinds of failure, following systemd's sd-varlink:

- :class:`CallError` — the call was well-formed varlink but cannot be served
  (unknown interface or method, a bad parameter). One error reply; the
  connection stays open and later pipelined calls are served.
- :class:`ProtocolError` — the peer is not speaking varlink: a message longer
  than the limit, bytes that are not UTF-8 JSON, JSON that is not a call object.
  systemd just drops such a peer; snpd first replies
  ``org.varlink.service.InvalidParameter`` (when the connection still takes a
  reply) so that the client learns why, then closes the connection. The
  ``parameter`` names the offending member of the call object (``method``,
  ``parameters``, ``more``, ...), or is ``""`` — the JSON pointer to the whole
  document — when the message as a whole is at fault.

Flags: ``oneway`` calls are executed and get no reply (not even an error).
``more`` asks permission to send several replies; snpd has no streaming methods,
so a ``more`` call gets exactly one reply without ``continues``, which the spec
allows and which is what systemd and varlink/python do for methods that do not
stream. (``org.varlink.service.ExpectedMore`` is for the opposite case: a method
that *requires* ``more`` called without it.) ``upgrade`` (switching the
connection to another protocol after the reply) is supported by no snpd method:
InvalidParameter ``upgrade``, connection kept. ``oneway`` together with ``more``
is a contradiction and a protocol error.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import enum
import json
import re
from typing import Any, ClassVar, Dict, List, Mapping, Optional, Sequence, Tuple

MAX_MESSAGE = 1 << 20
"""Default largest message, in bytes without the NUL. snpd's largest legitimate
message (VerifyReport with a chain and CRL) is a few tens of KiB."""

SERVICE_INTERFACE = "org.varlink.service"
INTERFACE_NOT_FOUND = "org.varlink.service.InterfaceNotFound"
METHOD_NOT_FOUND = "org.varlink.service.MethodNotFound"
METHOD_NOT_IMPLEMENTED = "org.varlink.service.MethodNotImplemented"
INVALID_PARAMETER = "org.varlink.service.InvalidParameter"
PERMISSION_DENIED = "org.varlink.service.PermissionDenied"
EXPECTED_MORE = "org.varlink.service.ExpectedMore"

WHOLE_MESSAGE = ""
"""``InvalidParameter.parameter`` for a message that is wrong as a whole."""

CALL_KEYS = frozenset({"method", "parameters", "oneway", "more", "upgrade"})
_MAX_INT_TEXT = 20  # len("-9223372036854775808") and len("18446744073709551615")

# varlink.org grammar: reverse-domain interface names, CamelCase members.
_INTERFACE = r"[A-Za-z](?:-*[A-Za-z0-9])*(?:\.[A-Za-z0-9](?:-*[A-Za-z0-9])*)+"
INTERFACE_RE = re.compile(_INTERFACE)
MEMBER_RE = re.compile(r"[A-Z][A-Za-z0-9]*")
METHOD_RE = re.compile(rf"({_INTERFACE})\.([A-Z][A-Za-z0-9]*)")

UINT32_MAX = 0xFFFFFFFF
UINT64_MAX = 0xFFFFFFFFFFFFFFFF
INT64_MIN = -(1 << 63)
INT64_MAX = (1 << 63) - 1


class CallError(Exception):
    """An error reply to one call; the connection stays open.

    ``reason`` is for the daemon's log only: the wire carries just the error name
    and its parameters, as the interface definition declares them.
    """

    fatal: ClassVar[bool] = False

    def __init__(self, error: str, parameters: Optional[Mapping[str, Any]] = None,
                 reason: str = "") -> None:
        super().__init__(reason or error)
        self.error = error
        self.parameters: Dict[str, Any] = dict(parameters or {})
        self.reason = reason or error

    def encode(self) -> bytes:
        return encode_error(self.error, self.parameters)


class ProtocolError(CallError):
    """The peer does not speak varlink: reply (InvalidParameter) if possible, then
    close the connection."""

    fatal = True

    def __init__(self, parameter: str, reason: str) -> None:
        super().__init__(INVALID_PARAMETER, {"parameter": parameter}, reason)
        self.parameter = parameter


def interface_not_found(interface: str) -> CallError:
    return CallError(INTERFACE_NOT_FOUND, {"interface": interface},
                     f"no interface {interface!r}")


def method_not_found(method: str) -> CallError:
    return CallError(METHOD_NOT_FOUND, {"method": method}, f"no method {method!r}")


def invalid_parameter(parameter: str, reason: str = "") -> CallError:
    return CallError(INVALID_PARAMETER, {"parameter": parameter},
                     reason or f"invalid parameter {parameter!r}")


# -- framing ------------------------------------------------------------------------------


class Framer:
    """Accumulates received bytes and hands out complete NUL-terminated messages.

    Feed whatever the socket returned, then call :meth:`next_message` until it
    returns None. A message longer than ``max_message`` raises
    :class:`ProtocolError` as soon as that is known (without waiting for its NUL,
    so a peer cannot make the buffer grow without bound), and keeps raising: the
    stream cannot be resynchronised, the connection must close. Messages before
    the oversized one are handed out first, so pipelined calls keep their order.
    """

    def __init__(self, max_message: int = MAX_MESSAGE) -> None:
        if max_message < 1:
            raise ValueError("max_message must be positive")
        self.max_message = max_message
        self._buffer = bytearray()
        self._scanned = 0  # bytes at the buffer's start known to hold no NUL
        self._broken = False

    @property
    def pending(self) -> int:
        """Bytes received that are not yet part of a complete message."""
        return len(self._buffer)

    def feed(self, data: bytes) -> None:
        if not self._broken:
            self._buffer += data

    def next_message(self) -> Optional[bytes]:
        """The next complete message without its NUL, or None if none is complete."""
        if self._broken:
            raise self._too_long()
        end = self._buffer.find(b"\0", self._scanned, self.max_message + 1)
        if end < 0:
            self._scanned = min(len(self._buffer), self.max_message + 1)
            if len(self._buffer) > self.max_message:
                self._broken = True
                self._buffer.clear()
                raise self._too_long()
            return None
        message = bytes(self._buffer[:end])
        del self._buffer[:end + 1]
        self._scanned = 0
        return message

    def messages(self) -> List[bytes]:
        """Every complete message buffered now (raises like :meth:`next_message`)."""
        out: List[bytes] = []
        while True:
            message = self.next_message()
            if message is None:
                return out
            out.append(message)

    def _too_long(self) -> ProtocolError:
        return ProtocolError(WHOLE_MESSAGE,
                             f"message longer than {self.max_message} bytes")


# -- decoding -------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Call:
    """One decoded method call."""

    method: str
    parameters: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    oneway: bool = False
    more: bool = False
    upgrade: bool = False

    @property
    def interface(self) -> str:
        """The interface part of ``method`` (everything before the last dot)."""
        return self.method.rpartition(".")[0]

    @property
    def member(self) -> str:
        return self.method.rpartition(".")[2]


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _bounded_int(text: str) -> int:
    """varlink integers are 64-bit; refusing longer digit strings also keeps
    Python < 3.11 (no int digit limit) from spending quadratic time on them."""
    if len(text) > _MAX_INT_TEXT:
        raise ValueError("integer out of the 64-bit range")
    return int(text)


def _has_lone_surrogate(value: Any) -> bool:
    """True if a decoded string holds a UTF-16 surrogate, which JSON's \\u escapes
    can smuggle in but which no UTF-8 text can carry onwards."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError:
                return True
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return False


def decode_json(message: bytes) -> Any:
    """Strict JSON: UTF-8, no NaN/Infinity, 64-bit integers, no lone surrogates.

    Raises :class:`ProtocolError` (parameter ``""``) for anything else, including
    nesting deeper than the interpreter's recursion limit.
    """
    try:
        text = message.decode("utf-8")
        value = json.loads(text, parse_constant=_reject_constant, parse_int=_bounded_int)
    except RecursionError:
        raise ProtocolError(WHOLE_MESSAGE, "JSON nested too deeply") from None
    except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise ProtocolError(WHOLE_MESSAGE, f"not UTF-8 JSON: {exc}") from None
    if "\\u" in text and _has_lone_surrogate(value):
        raise ProtocolError(WHOLE_MESSAGE, "JSON string holds a lone UTF-16 surrogate")
    return value


def decode_call(message: bytes) -> Call:
    """Decode one message (without its NUL) as a method call.

    Raises :class:`ProtocolError` unless it is a JSON object with a string
    ``method``, an object (or null) ``parameters``, boolean (or null) flags and no
    other members.
    """
    value = decode_json(message)
    if not isinstance(value, dict):
        raise ProtocolError(WHOLE_MESSAGE, "a call must be a JSON object")
    for key in value:
        if key not in CALL_KEYS:
            raise ProtocolError(key, f"unknown member {key!r} in a call")
    method = value.get("method")
    if not isinstance(method, str):
        raise ProtocolError("method", "a call needs a string 'method'")
    parameters = value.get("parameters")
    if parameters is None:
        parameters = {}
    elif not isinstance(parameters, dict):
        raise ProtocolError("parameters", "'parameters' must be an object")
    flags: Dict[str, bool] = {}
    for flag in ("oneway", "more", "upgrade"):
        raw = value.get(flag)
        if raw is not None and not isinstance(raw, bool):
            raise ProtocolError(flag, f"{flag!r} must be a boolean")
        flags[flag] = bool(raw)
    if flags["oneway"] and flags["more"]:
        raise ProtocolError("more", "a call cannot be both 'oneway' and 'more'")
    return Call(method, parameters, **flags)


def split_method(method: str) -> Tuple[str, str]:
    """``("org.example.Iface", "Method")``; MethodNotFound if the name is malformed."""
    match = METHOD_RE.fullmatch(method)
    if match is None:
        raise method_not_found(method)
    return match.group(1), match.group(2)


# -- encoding -------------------------------------------------------------------------------


def encode_message(value: Mapping[str, Any]) -> bytes:
    """One framed message. ASCII-only JSON (non-ASCII as \\u escapes), so the
    output is valid UTF-8 whatever the strings hold and never contains a NUL."""
    text = json.dumps(value, ensure_ascii=True, allow_nan=False, separators=(",", ":"))
    return text.encode("ascii") + b"\0"


def encode_call(method: str, parameters: Optional[Mapping[str, Any]] = None, *,
                oneway: bool = False, more: bool = False) -> bytes:
    message: Dict[str, Any] = {"method": method, "parameters": dict(parameters or {})}
    if oneway:
        message["oneway"] = True
    if more:
        message["more"] = True
    return encode_message(message)


def encode_reply(parameters: Optional[Mapping[str, Any]] = None, *,
                 continues: bool = False) -> bytes:
    message: Dict[str, Any] = {"parameters": dict(parameters or {})}
    if continues:
        message["continues"] = True
    return encode_message(message)


def encode_error(error: str, parameters: Optional[Mapping[str, Any]] = None) -> bytes:
    """An error reply; ``parameters`` is always present (some clients require it)."""
    return encode_message({"error": error, "parameters": dict(parameters or {})})


# -- parameters -------------------------------------------------------------------------------


class Kind(enum.Enum):
    """How a parameter travels; the comment gives its type in the interface file."""

    STRING = "string"
    BYTES = "bytes"  # string: base64
    INT = "int"
    BOOL = "bool"
    OBJECT = "object"
    STRINGS = "[]string"
    CERTIFICATES = "[]Certificate"  # [](kind: string, data: string base64)


@dataclasses.dataclass(frozen=True)
class Field:
    """One method parameter: its name, kind, whether it may be absent or null, and
    for integers the range of the D-Bus type it mirrors (u, t or x)."""

    name: str
    kind: Kind
    optional: bool = False
    minimum: int = 0
    maximum: int = UINT64_MAX


def encode_bytes(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def decode_bytes(value: str, parameter: str) -> bytes:
    """Strict base64 (RFC 4648 alphabet, padding required); InvalidParameter else."""
    try:
        return base64.b64decode(value.encode("ascii"), validate=True)
    except (binascii.Error, ValueError):
        raise invalid_parameter(parameter, f"{parameter!r} is not base64") from None


def _check_value(field: Field, value: Any) -> Any:
    name = field.name
    kind = field.kind
    if kind is Kind.STRING:
        if isinstance(value, str):
            return value
    elif kind is Kind.BYTES:
        if isinstance(value, str):
            return decode_bytes(value, name)
    elif kind is Kind.INT:
        if isinstance(value, int) and not isinstance(value, bool):
            if not field.minimum <= value <= field.maximum:
                raise invalid_parameter(name, f"{name!r} must be in "
                                              f"[{field.minimum}, {field.maximum}]")
            return value
    elif kind is Kind.BOOL:
        if isinstance(value, bool):
            return value
    elif kind is Kind.OBJECT:
        if isinstance(value, dict):
            return value
    elif kind is Kind.STRINGS:
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            return list(value)
    elif kind is Kind.CERTIFICATES and isinstance(value, list):
        out: List[Tuple[str, bytes]] = []
        for item in value:
            if not (isinstance(item, dict) and set(item) == {"kind", "data"}
                    and isinstance(item["kind"], str) and isinstance(item["data"], str)):
                raise invalid_parameter(name, f"{name!r} must be a list of "
                                              "{kind: string, data: base64 string}")
            out.append((item["kind"], decode_bytes(item["data"], name)))
        return out
    raise invalid_parameter(name, f"{name!r} must be {kind.value}, got "
                                  f"{type(value).__name__}")


def check_parameters(parameters: Mapping[str, Any], fields: Sequence[Field]
                     ) -> Dict[str, Any]:
    """Validate a call's parameters against a method's fields.

    Returns every field by name: decoded (bytes for base64, (kind, DER) tuples
    for certificates) or None for an absent optional one. An unknown, missing or
    ill-typed parameter raises InvalidParameter naming it, as systemd does.
    """
    known = {f.name for f in fields}
    for key in parameters:
        if key not in known:
            raise invalid_parameter(key, f"unknown parameter {key!r}")
    out: Dict[str, Any] = {}
    for field in fields:
        value = parameters.get(field.name)
        if value is None:
            if not field.optional:
                raise invalid_parameter(field.name, f"{field.name!r} is required")
            out[field.name] = None
        else:
            out[field.name] = _check_value(field, value)
    return out


def to_json(value: Any) -> Any:
    """Plain Python values (as the service returns them) as JSON values: bytes as
    base64, tuples and sets as lists, enums by value. Anything else is a bug and
    raises TypeError, which the server reports as Internal."""
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        if value != value or value in (float("inf"), float("-inf")):
            raise TypeError("NaN and infinities are not JSON")
        return value
    if isinstance(value, enum.Enum):
        return to_json(value.value)
    if isinstance(value, (bytes, bytearray, memoryview)):
        return encode_bytes(bytes(value))
    if isinstance(value, Mapping):
        return {str(k): to_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_json(v) for v in value]
    if isinstance(value, (set, frozenset)):
        return [to_json(v) for v in sorted(value, key=repr)]
    raise TypeError(f"{type(value).__name__} has no JSON form")
