"""The sans-IO varlink core: framing and its limit, strict decoding of calls,
encoding of replies and errors, parameter checking, and a fuzzer proving that any
byte stream yields only calls or typed protocol errors."""

from __future__ import annotations

import base64
import enum
import json
from typing import Any, List, Union

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from snpd.varlink import protocol as p
from snpd.varlink.protocol import Call, CallError, Field, Framer, Kind, ProtocolError

# -- framing --------------------------------------------------------------------------------


def test_framer_splits_messages_in_one_chunk() -> None:
    framer = Framer()
    framer.feed(b'{"a":1}\0{"b":2}\0{"c"')
    assert framer.messages() == [b'{"a":1}', b'{"b":2}']
    assert framer.pending == 4
    framer.feed(b":3}\0")
    assert framer.next_message() == b'{"c":3}'
    assert framer.next_message() is None
    assert framer.pending == 0


def test_framer_reassembles_byte_by_byte() -> None:
    framer = Framer()
    out: List[bytes] = []
    for byte in b'{"method":"a.b.C"}\0\0x\0':
        framer.feed(bytes([byte]))
        out.extend(framer.messages())
    assert out == [b'{"method":"a.b.C"}', b"", b"x"]


def test_framer_limit_is_inclusive() -> None:
    framer = Framer(max_message=4)
    framer.feed(b"abcd\0")
    assert framer.next_message() == b"abcd"
    framer.feed(b"abcd")  # incomplete, at the limit: still acceptable
    assert framer.next_message() is None
    framer.feed(b"\0")
    assert framer.next_message() == b"abcd"


@pytest.mark.parametrize("data", [b"abcde\0", b"abcde", b"abcdefghij"])
def test_framer_rejects_oversized_with_or_without_terminator(data: bytes) -> None:
    framer = Framer(max_message=4)
    framer.feed(data)
    with pytest.raises(ProtocolError) as info:
        framer.next_message()
    assert info.value.fatal
    assert info.value.error == p.INVALID_PARAMETER
    assert info.value.parameters == {"parameter": ""}


def test_framer_oversize_is_detected_before_the_terminator_arrives() -> None:
    framer = Framer(max_message=8)
    for _ in range(2):
        framer.feed(b"xxxxx")
    with pytest.raises(ProtocolError):
        framer.next_message()


def test_framer_delivers_earlier_messages_then_stays_broken() -> None:
    framer = Framer(max_message=4)
    framer.feed(b"ok\0toolong")
    assert framer.next_message() == b"ok"
    with pytest.raises(ProtocolError):
        framer.next_message()
    framer.feed(b"\0fine\0")  # cannot resynchronise: the error is sticky
    with pytest.raises(ProtocolError):
        framer.next_message()
    assert framer.pending == 0


def test_framer_incremental_scan_finds_terminator_late() -> None:
    framer = Framer(max_message=100)
    for _ in range(10):
        framer.feed(b"0123456789")
        assert framer.next_message() is None
    framer.feed(b"\0")
    assert framer.next_message() == b"0123456789" * 10


def test_framer_requires_positive_limit() -> None:
    with pytest.raises(ValueError):
        Framer(max_message=0)


# -- decoding --------------------------------------------------------------------------------


def test_decode_minimal_call() -> None:
    call = p.decode_call(b'{"method":"org.snpd.Keys.DeriveKey"}')
    assert call == Call("org.snpd.Keys.DeriveKey", {})
    assert (call.interface, call.member) == ("org.snpd.Keys", "DeriveKey")
    assert not (call.oneway or call.more or call.upgrade)


def test_decode_full_call() -> None:
    call = p.decode_call(json.dumps({
        "method": "org.snpd.Attestation.GetReport", "parameters": {"report_data": "AA=="},
        "oneway": True, "more": False, "upgrade": None}).encode())
    assert call.parameters == {"report_data": "AA=="}
    assert call.oneway and not call.more and not call.upgrade


def test_decode_null_parameters_is_empty() -> None:
    assert p.decode_call(b'{"method":"a.b.C","parameters":null}').parameters == {}


def test_decode_accepts_unicode_and_surrogate_pairs() -> None:
    call = p.decode_call('{"method":"a.b.C","parameters":{"l":"\u00e9\\ud83d\\ude00"}}'
                         .encode())
    assert call.parameters["l"] == "\u00e9\U0001f600"


@pytest.mark.parametrize("message, parameter", [
    (b"", ""),
    (b"{", ""),
    (b"{not json}", ""),
    (b"\xff\xfe{}", ""),  # not UTF-8
    (b"\xef\xbb\xbf{}", ""),  # BOM
    (b"[]", ""),
    (b'"method"', ""),
    (b"null", ""),
    (b'{"method":"a.b.C","parameters":{"x":NaN}}', ""),
    (b'{"method":"a.b.C","parameters":{"x":-Infinity}}', ""),
    (b'{"method":"a.b.C","parameters":{"x":123456789012345678901}}', ""),
    (b'{"method":"a.b.C","parameters":{"x":"\\udc00"}}', ""),
    (b'{"method":"a.b.C","parameters":{"\\ud800":1}}', ""),
    (b"[" * 100000 + b"]" * 100000, ""),
    (b"{}", "method"),
    (b'{"method":1}', "method"),
    (b'{"method":null}', "method"),
    (b'{"method":"a.b.C","parameters":[]}', "parameters"),
    (b'{"method":"a.b.C","parameters":"x"}', "parameters"),
    (b'{"method":"a.b.C","oneway":1}', "oneway"),
    (b'{"method":"a.b.C","more":"yes"}', "more"),
    (b'{"method":"a.b.C","upgrade":0}', "upgrade"),
    (b'{"method":"a.b.C","oneway":true,"more":true}', "more"),
    (b'{"method":"a.b.C","extra":1}', "extra"),
])
def test_decode_rejects_non_calls(message: bytes, parameter: str) -> None:
    with pytest.raises(ProtocolError) as info:
        p.decode_call(message)
    assert info.value.fatal
    assert info.value.parameter == parameter
    reply = info.value.encode()
    assert reply.endswith(b"\0")
    assert json.loads(reply[:-1]) == {"error": "org.varlink.service.InvalidParameter",
                                      "parameters": {"parameter": parameter}}


def test_decode_accepts_64_bit_integers() -> None:
    call = p.decode_call(b'{"method":"a.b.C","parameters":{"t":18446744073709551615,'
                         b'"x":-9223372036854775808}}')
    assert call.parameters == {"t": p.UINT64_MAX, "x": p.INT64_MIN}


# -- method names ----------------------------------------------------------------------------


@pytest.mark.parametrize("name, parts", [
    ("org.varlink.service.GetInfo", ("org.varlink.service", "GetInfo")),
    ("org.snpd.Attestation.GetReport", ("org.snpd.Attestation", "GetReport")),
    ("io.systemd-x.Foo2.Bar9", ("io.systemd-x.Foo2", "Bar9")),
])
def test_split_method(name: str, parts: Any) -> None:
    assert p.split_method(name) == parts


@pytest.mark.parametrize("name", ["", "GetInfo", "org.GetInfo.", "org.snpd.getReport",
                                  ".org.snpd.X", "org..snpd.X", "org.Attestation",
                                  "org.snpd.Get-Report", "1org.snpd.X", "org.snpd.X\n"])
def test_split_method_rejects_malformed_names_as_not_found(name: str) -> None:
    with pytest.raises(CallError) as info:
        p.split_method(name)
    assert not info.value.fatal
    assert info.value.error == p.METHOD_NOT_FOUND
    assert info.value.parameters == {"method": name}


def test_standard_errors() -> None:
    assert json.loads(p.interface_not_found("org.x").encode()[:-1]) == {
        "error": "org.varlink.service.InterfaceNotFound", "parameters": {"interface": "org.x"}}
    assert json.loads(p.method_not_found("org.x.Y").encode()[:-1]) == {
        "error": "org.varlink.service.MethodNotFound", "parameters": {"method": "org.x.Y"}}
    assert json.loads(p.invalid_parameter("vmpl").encode()[:-1]) == {
        "error": "org.varlink.service.InvalidParameter", "parameters": {"parameter": "vmpl"}}


# -- encoding --------------------------------------------------------------------------------


def test_encode_reply_and_error() -> None:
    assert p.encode_reply({"report": "AA=="}) == b'{"parameters":{"report":"AA=="}}\0'
    assert p.encode_reply() == b'{"parameters":{}}\0'
    assert p.encode_reply({}, continues=True) == b'{"parameters":{},"continues":true}\0'
    assert p.encode_error("org.snpd.Keys.Busy", {"message": "m"}) == \
        b'{"error":"org.snpd.Keys.Busy","parameters":{"message":"m"}}\0'
    assert p.encode_error("x.y.Z") == b'{"error":"x.y.Z","parameters":{}}\0'


def test_encode_call_round_trips() -> None:
    data = p.encode_call("a.b.C", {"x": [1, "\u00e9"]}, oneway=True)
    framer = Framer()
    framer.feed(data)
    assert p.decode_call(framer.messages()[0]) == Call("a.b.C", {"x": [1, "\u00e9"]},
                                                       oneway=True)
    assert json.loads(p.encode_call("a.b.C", more=True)[:-1]) == {
        "method": "a.b.C", "parameters": {}, "more": True}


def test_encoded_messages_are_ascii_and_hold_one_nul() -> None:
    data = p.encode_reply({"s": "nul\0 \u00e9 \U0001f600 \udc00"})
    assert data.count(b"\0") == 1 and data.endswith(b"\0")
    data[:-1].decode("ascii")


def test_encode_refuses_nan() -> None:
    with pytest.raises(ValueError):
        p.encode_reply({"x": float("nan")})


# -- parameters --------------------------------------------------------------------------------

FIELDS = (
    Field("s", Kind.STRING),
    Field("b", Kind.BYTES, optional=True),
    Field("u", Kind.INT, optional=True, maximum=p.UINT32_MAX),
    Field("x", Kind.INT, optional=True, minimum=p.INT64_MIN, maximum=p.INT64_MAX),
    Field("f", Kind.BOOL, optional=True),
    Field("o", Kind.OBJECT, optional=True),
    Field("l", Kind.STRINGS, optional=True),
    Field("c", Kind.CERTIFICATES, optional=True),
)


def test_check_parameters_decodes_every_kind() -> None:
    out = p.check_parameters({
        "s": "str", "b": base64.b64encode(b"\x00\xff").decode(), "u": p.UINT32_MAX,
        "x": -5, "f": False, "o": {"k": [1]}, "l": ["a", "b"],
        "c": [{"kind": "vcek", "data": "AQI="}]}, FIELDS)
    assert out == {"s": "str", "b": b"\x00\xff", "u": p.UINT32_MAX, "x": -5, "f": False,
                   "o": {"k": [1]}, "l": ["a", "b"], "c": [("vcek", b"\x01\x02")]}


def test_check_parameters_optional_absent_or_null_is_none() -> None:
    out = p.check_parameters({"s": "", "b": None}, FIELDS)
    assert out == {"s": "", "b": None, "u": None, "x": None, "f": None, "o": None, "l": None,
                   "c": None}
    assert p.check_parameters({"b": ""}, (Field("b", Kind.BYTES),)) == {"b": b""}


@pytest.mark.parametrize("parameters, bad", [
    ({}, "s"),
    ({"s": None}, "s"),
    ({"s": 1}, "s"),
    ({"s": "", "zzz": 1}, "zzz"),
    ({"s": "", "b": "not base64!"}, "b"),
    ({"s": "", "b": "AAA"}, "b"),  # missing padding
    ({"s": "", "b": "AA==AA=="}, "b"),
    ({"s": "", "b": "A\u00e9=="}, "b"),
    ({"s": "", "b": "AA-_"}, "b"),  # base64url is not accepted
    ({"s": "", "b": 5}, "b"),
    ({"s": "", "u": -1}, "u"),
    ({"s": "", "u": p.UINT32_MAX + 1}, "u"),
    ({"s": "", "u": True}, "u"),
    ({"s": "", "u": 1.0}, "u"),
    ({"s": "", "u": "1"}, "u"),
    ({"s": "", "x": p.INT64_MAX + 1}, "x"),
    ({"s": "", "f": 1}, "f"),
    ({"s": "", "o": []}, "o"),
    ({"s": "", "l": "a"}, "l"),
    ({"s": "", "l": ["a", 1]}, "l"),
    ({"s": "", "c": {"kind": "ark", "data": ""}}, "c"),
    ({"s": "", "c": [["ark", ""]]}, "c"),
    ({"s": "", "c": [{"kind": "ark"}]}, "c"),
    ({"s": "", "c": [{"kind": "ark", "data": "", "x": 1}]}, "c"),
    ({"s": "", "c": [{"kind": 1, "data": ""}]}, "c"),
    ({"s": "", "c": [{"kind": "ark", "data": "@@"}]}, "c"),
])
def test_check_parameters_names_the_bad_parameter(parameters: Any, bad: str) -> None:
    with pytest.raises(CallError) as info:
        p.check_parameters(parameters, FIELDS)
    assert not info.value.fatal
    assert (info.value.error, info.value.parameters) == (p.INVALID_PARAMETER, {"parameter": bad})


class Colour(enum.Enum):
    RED = "red"


def test_to_json() -> None:
    assert p.to_json({"a": (1, b"\x01", Colour.RED, None, 1.5, True),
                      2: frozenset({"x"}), "n": {"m": [bytearray(b"")]}}) == {
        "a": [1, "AQ==", "red", None, 1.5, True], "2": ["x"], "n": {"m": [""]}}


@pytest.mark.parametrize("value", [float("nan"), float("inf"), object(), {"a": {1j}}])
def test_to_json_refuses_what_json_cannot_hold(value: Any) -> None:
    with pytest.raises(TypeError):
        p.to_json(value)


def test_bytes_round_trip() -> None:
    data = bytes(range(256))
    assert p.decode_bytes(p.encode_bytes(data), "x") == data


# -- fuzzing ---------------------------------------------------------------------------------

Outcome = Union[Call, str]


def _outcomes(chunks: List[bytes], max_message: int) -> List[Outcome]:
    """Run a stream through framer and decoder the way the server does; a protocol
    error ends the stream. Anything but a Call or a ProtocolError fails the test."""
    framer = Framer(max_message)
    out: List[Outcome] = []
    for chunk in chunks:
        framer.feed(chunk)
        while True:
            try:
                message = framer.next_message()
                if message is None:
                    break
                out.append(p.decode_call(message))
            except ProtocolError as exc:
                assert exc.fatal and exc.error == p.INVALID_PARAMETER
                assert exc.encode().endswith(b"\0")
                out.append(f"error:{exc.parameter}")
                return out
    return out


def _split(data: bytes, cuts: List[int]) -> List[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    chunks, start = [], 0
    for point in points:
        chunks.append(data[start:point])
        start = point
    chunks.append(data[start:])
    return chunks


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=300), st.lists(st.integers(min_value=0), max_size=8),
       st.integers(min_value=1, max_value=64))
def test_any_byte_stream_yields_only_calls_or_protocol_errors(
        data: bytes, cuts: List[int], max_message: int) -> None:
    whole = _outcomes([data], max_message)
    assert _outcomes(_split(data, cuts), max_message) == whole


_json_values = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-(1 << 70), max_value=1 << 70)
    | st.floats(allow_nan=True) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner,
                                                                max_size=3),
    max_leaves=8)
_call_objects = st.fixed_dictionaries(
    {"method": st.sampled_from(["org.snpd.Keys.DeriveKey", "a.b.C", "x"]) | _json_values},
    optional={"parameters": st.dictionaries(st.text(max_size=5), _json_values, max_size=3)
              | _json_values, "oneway": st.booleans() | _json_values,
              "more": st.booleans(), "upgrade": st.booleans(), "z": _json_values})
_messages = st.one_of(
    _call_objects.map(lambda v: json.dumps(v).encode()),
    st.binary(max_size=40).filter(lambda b: b"\0" not in b),
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(_messages, max_size=6), st.lists(st.integers(min_value=0), max_size=8))
def test_call_like_streams_yield_only_calls_or_protocol_errors(
        messages: List[bytes], cuts: List[int]) -> None:
    data = b"".join(m + b"\0" for m in messages)
    whole = _outcomes([data], 1 << 20)
    assert _outcomes(_split(data, cuts), 1 << 20) == whole
    for outcome in whole:
        if isinstance(outcome, Call):
            assert isinstance(outcome.method, str)
            assert isinstance(outcome.parameters, dict)
            assert not (outcome.oneway and outcome.more)
