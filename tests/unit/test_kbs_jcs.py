"""RFC 8785 canonical JSON: the RFC's own samples, Trustee's binding vector, UTF-16 key
order, what is refused, and round-trip properties."""

from __future__ import annotations

import hashlib
import json
import struct
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from snpd.errors import CanonicalizationError, InvalidArgument
from snpd.kbs.jcs import MAX_DEPTH, canonicalize, number

# RFC 8785 Appendix B: IEEE 754 bit patterns and their canonical text.
APPENDIX_B = [
    ("0000000000000000", "0"),  # zero
    ("8000000000000000", "0"),  # minus zero
    ("0000000000000001", "5e-324"),
    ("8000000000000001", "-5e-324"),
    ("7fefffffffffffff", "1.7976931348623157e+308"),
    ("ffefffffffffffff", "-1.7976931348623157e+308"),
    ("4340000000000000", "9007199254740992"),
    ("c340000000000000", "-9007199254740992"),
    ("4430000000000000", "295147905179352830000"),
    ("44b52d02c7e14af5", "9.999999999999997e+22"),
    ("44b52d02c7e14af6", "1e+23"),
    ("44b52d02c7e14af7", "1.0000000000000001e+23"),
    ("444b1ae4d6e2ef4e", "999999999999999700000"),
    ("444b1ae4d6e2ef4f", "999999999999999900000"),
    ("444b1ae4d6e2ef50", "1e+21"),
    ("3eb0c6f7a0b5ed8c", "9.999999999999997e-7"),
    ("3eb0c6f7a0b5ed8d", "0.000001"),
    ("41b3de4355555553", "333333333.3333332"),
    ("41b3de4355555554", "333333333.33333325"),
    ("41b3de4355555555", "333333333.3333333"),
    ("41b3de4355555556", "333333333.3333334"),
    ("41b3de4355555557", "333333333.33333343"),
    ("becbf647612f3696", "-0.0000033333333333333333"),
    ("43143ff3c1cb0959", "1424953923781206.2"),  # round to even
]


def _double(hex_bits: str) -> float:
    value: float = struct.unpack(">d", bytes.fromhex(hex_bits))[0]
    return value


@pytest.mark.parametrize(("bits", "text"), APPENDIX_B)
def test_appendix_b_numbers(bits: str, text: str) -> None:
    value = _double(bits)
    assert number(value) == text
    assert canonicalize(value) == text.encode()
    assert float(text) == value or (value == 0 and float(text) == 0)


@pytest.mark.parametrize("bits", ["7fffffffffffffff", "7ff0000000000000", "fff0000000000000"])
def test_appendix_b_nan_and_infinity_are_refused(bits: str) -> None:
    with pytest.raises(CanonicalizationError, match="NaN and Infinity"):
        canonicalize([_double(bits)])


@pytest.mark.parametrize(("value", "text"), [
    (1e21, "1e+21"), (1e20, "100000000000000000000"), (1e-7, "1e-7"), (1e-6, "0.000001"),
    (-0.0, "0"), (0.5, "0.5"), (1.0, "1"), (-1.5e-9, "-1.5e-9"), (123e-20, "1.23e-18"),
    (1.25e22, "1.25e+22"), (2**53, "9007199254740992"), (-(2**53), "-9007199254740992"),
    (0, "0"), (-7, "-7"),
])
def test_ecmascript_number_forms(value: float, text: str) -> None:
    assert number(value) == text


def test_rfc8785_section_3_2_2_sample() -> None:
    source = ('{"numbers": [333333333.33333329, 1E30, 4.50, 2e-3, 0.000000000000000000000000001],'
              ' "string": "\\u20ac$\\u000F\\u000aA\'\\u0042\\u0022\\u005c\\\\\\"\\/",'
              ' "literals": [null, true, false]}')
    expected = ('{"literals":[null,true,false],"numbers":[333333333.3333333,1e+30,4.5,0.002,1e-27],'
                '"string":"\u20ac$\\u000f\\nA\'B\\"\\\\\\\\\\"/"}')
    assert canonicalize(json.loads(source)) == expected.encode("utf-8")


def test_rfc8785_section_3_2_3_sorting() -> None:
    source = {"\u20ac": "Euro Sign", "\r": "Carriage Return",
              "\ufb33": "Hebrew Letter Dalet With Dagesh", "1": "One",
              "\U0001F600": "Emoji: Grinning Face", "\u0080": "Control",
              "\u00f6": "Latin Small Letter O With Diaeresis"}
    order = [key for key in json.loads(canonicalize(source))]
    assert order == ["\r", "1", "\u0080", "\u00f6", "\u20ac", "\U0001F600", "\ufb33"]


def test_keys_sort_by_utf16_code_units_not_code_points() -> None:
    # U+1F600 is the surrogate pair D83D DE00: before U+FB33 in UTF-16, after it by code
    # point, so a code-point sort (Python's own) gives the other order.
    value = {"\ufb33": 1, "\U0001F600": 2}
    assert canonicalize(value) == '{"\U0001F600":2,"\ufb33":1}'.encode()
    assert sorted(value) == ["\ufb33", "\U0001F600"]
    assert canonicalize({"\u20ac": 1, "\U0001F600": 2}) == '{"\u20ac":1,"\U0001F600":2}'.encode()


def test_trustee_binding_vector() -> None:
    canonical = canonicalize({"b": 1, "a": "test", "c": {"d": "e"}})
    assert canonical == b'{"a":"test","b":1,"c":{"d":"e"}}'
    assert hashlib.sha384(canonical).hexdigest() == (
        "e71ce8e70d814ba6639c3612ebee0ff1f76f650f8dbb5e47157e0f3f525cd22c"
        "4597480a186427c813ca941da78870c3")


def test_string_escapes_only_the_mandatory_ones() -> None:
    text = "".join(chr(c) for c in range(0x20)) + '"\\/\x7f\u2028\u00e9\U0001F600'
    out = canonicalize(text).decode("utf-8")
    assert out == ('"\\u0000\\u0001\\u0002\\u0003\\u0004\\u0005\\u0006\\u0007\\b\\t\\n\\u000b'
                   '\\f\\r\\u000e\\u000f\\u0010\\u0011\\u0012\\u0013\\u0014\\u0015\\u0016\\u0017'
                   '\\u0018\\u0019\\u001a\\u001b\\u001c\\u001d\\u001e\\u001f\\"\\\\/'
                   '\x7f\u2028\u00e9\U0001F600"')
    assert canonicalize("\u00e9") == b'"\xc3\xa9"'


@pytest.mark.parametrize("value", [
    2**53 + 1, -(2**53) - 1, 10**30, {"a": [2**64]},
])
def test_integers_beyond_2_53_are_refused(value: Any) -> None:
    with pytest.raises(CanonicalizationError, match="2\\*\\*53"):
        canonicalize(value)


@pytest.mark.parametrize(("value", "match"), [
    ({1: "a"}, "key is int"), ({None: 1}, "key is NoneType"), ({b"k": 1}, "key is bytes"),
    (float("nan"), "NaN"), ([float("-inf")], "NaN and Infinity"),
    (b"bytes", "bytes is not a JSON value"), ({1, 2}, "set is not a JSON value"),
    ("\ud800", "lone surrogate"), ({"\udc00": 1}, "lone surrogate"),
])
def test_values_without_a_canonical_form_are_refused(value: Any, match: str) -> None:
    with pytest.raises(CanonicalizationError, match=match):
        canonicalize(value)


def test_canonicalization_error_is_invalid_argument() -> None:
    assert issubclass(CanonicalizationError, InvalidArgument)


def test_nesting_is_bounded() -> None:
    deep: Any = "x"
    for _ in range(MAX_DEPTH):
        deep = [deep]
    assert canonicalize(deep) == b"[" * MAX_DEPTH + b'"x"' + b"]" * MAX_DEPTH
    with pytest.raises(CanonicalizationError, match="nested too deeply"):
        canonicalize([deep])
    with pytest.raises(CanonicalizationError, match="nested too deeply"):
        canonicalize({"a": {"b": {}}}, max_depth=2)
    hostile: Any = {}
    for _ in range(100_000):  # far beyond the interpreter's recursion limit
        hostile = {"k": hostile}
    with pytest.raises(CanonicalizationError):
        canonicalize(hostile)


def test_bool_is_not_a_number_and_tuples_and_mappings_work() -> None:
    assert canonicalize([True, False, None]) == b"[true,false,null]"
    with pytest.raises(CanonicalizationError, match="bool"):
        number(True)
    assert canonicalize((1, "a")) == b'[1,"a"]'


_json = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**53), 2**53)
    | st.floats(allow_nan=False, allow_infinity=False) | st.text(),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(), inner, max_size=5),
    max_leaves=30)


@settings(max_examples=300, deadline=None)
@given(_json)
def test_round_trip_and_idempotence(value: Any) -> None:
    out = canonicalize(value)
    # Read back as I-JSON reads it, every number a double: a float like 6.165345379250298e16
    # is written "61653453792502980", which Python's json would make a different int.
    back = json.loads(out.decode("utf-8"), parse_int=float)
    assert back == value  # -0.0 comes back as 0: equal
    assert canonicalize(back) == out
    assert out == canonicalize(json.loads(json.dumps(value)))  # the layout does not matter


@settings(max_examples=300, deadline=None)
@given(st.floats(allow_nan=False, allow_infinity=False))
def test_every_double_round_trips_in_the_shortest_form(value: float) -> None:
    text = number(value)
    assert float(text) == value
    assert "E" not in text and not text.startswith("+")
    if value != 0:  # the digits are Python's shortest repr's, so no other string is shorter
        digits = repr(abs(value)).split("e")[0].replace(".", "").strip("0")
        assert text.lstrip("-").split("e")[0].replace(".", "").strip("0") == digits



_json_without_floats = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**53), 2**53) | st.text(),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(), inner, max_size=5),
    max_leaves=30)


@settings(max_examples=200, deadline=None)
@given(_json_without_floats)
def test_plain_json_loads_reads_back_what_has_no_floats(value: Any) -> None:
    assert json.loads(canonicalize(value)) == value
