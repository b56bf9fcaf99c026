"""RFC 8785 JSON Canonicalization Scheme (JCS).

Trustee's KBS binds the TEE key to the evidence by hashing the canonical form of the
runtime data, so these bytes must match any other JCS implementation exactly: object
members sorted by their names' UTF-16 code units, strings with only the mandatory
escapes (other control characters as lowercase ``\\u00xx``, nothing else escaped),
numbers as ECMAScript's ``Number.prototype.toString`` writes an IEEE double, UTF-8.

What has no canonical form is refused with :class:`~snpd.errors.CanonicalizationError`
rather than changed: an integer a double cannot hold exactly (beyond 2**53), NaN and
Infinity, a non-string key, a lone surrogate, nesting deeper than ``max_depth``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import List

from snpd.errors import CanonicalizationError

MAX_DEPTH = 64
MAX_SAFE_INTEGER = 2**53  # every integer up to here is exactly one double

# RFC 8785 §3.2.2.2: the two-character escapes; every other character below U+0020 is
# \u00xx with lowercase hex, and nothing else is escaped.
_ESCAPES = {0x22: '\\"', 0x5C: "\\\\", 0x08: "\\b", 0x0C: "\\f", 0x0A: "\\n", 0x0D: "\\r",
            0x09: "\\t"}
_TRANSLATE = {c: _ESCAPES.get(c, f"\\u{c:04x}") for c in (*range(0x20), 0x22, 0x5C)}


def canonicalize(value: object, *, max_depth: int = MAX_DEPTH) -> bytes:
    """The RFC 8785 canonical UTF-8 bytes of ``value`` (dict or Mapping with str keys,
    list or tuple, str, int, float, bool, None)."""
    parts: List[str] = []
    _write(value, parts, max_depth)
    try:
        return "".join(parts).encode("utf-8")
    except UnicodeEncodeError as exc:  # a lone surrogate (RFC 8785 §3.2.2.2)
        raise CanonicalizationError("a string holds a lone surrogate; not I-JSON") from exc


def number(value: float) -> str:
    """``value`` as ECMAScript ``Number.prototype.toString`` writes it (RFC 8785
    §3.2.2.3); an int must be at most 2**53 in magnitude."""
    if isinstance(value, bool):
        raise CanonicalizationError("a bool is not a number")
    if isinstance(value, int):
        if abs(value) > MAX_SAFE_INTEGER:
            raise CanonicalizationError(
                "an integer beyond 2**53 has no exact IEEE double; send it as a string")
        return str(value)
    if not isinstance(value, float):
        raise CanonicalizationError(f"{type(value).__name__} is not a JSON number")
    if not math.isfinite(value):
        raise CanonicalizationError("NaN and Infinity are not JSON")
    if value == 0:
        return "0"  # -0 too
    # Python's repr is the shortest round-tripping digit string, nearest the exact value
    # on ties: the same digits ECMAScript chooses; only the layout differs.
    mantissa, _, exp = repr(abs(value)).partition("e")
    whole, _, frac = mantissa.partition(".")
    digits = (whole + frac).lstrip("0")
    # n: the decimal exponent with value = 0.DIGITS * 10**n (ECMA-262 Number::toString)
    n = len(whole) + int(exp or "0") - (len(whole + frac) - len((whole + frac).lstrip("0")))
    digits = digits.rstrip("0")
    k = len(digits)
    sign = "-" if value < 0 else ""
    if k <= n <= 21:
        text = digits + "0" * (n - k)
    elif 0 < n <= 21:
        text = f"{digits[:n]}.{digits[n:]}"
    elif -6 < n <= 0:
        text = "0." + "0" * -n + digits
    else:
        e = n - 1
        head = digits if k == 1 else f"{digits[0]}.{digits[1:]}"
        text = f"{head}e{'+' if e > 0 else '-'}{abs(e)}"
    return sign + text


def _string(text: str) -> str:
    return '"' + text.translate(_TRANSLATE) + '"'


def _utf16_key(name: str) -> bytes:
    try:
        return name.encode("utf-16-be")  # big-endian bytes sort as the code units do
    except UnicodeEncodeError as exc:
        raise CanonicalizationError("a key holds a lone surrogate; not I-JSON") from exc


def _write(value: object, parts: List[str], depth: int) -> None:
    if value is None:
        parts.append("null")
    elif value is True:
        parts.append("true")
    elif value is False:
        parts.append("false")
    elif isinstance(value, str):
        parts.append(_string(value))
    elif isinstance(value, (int, float)):
        parts.append(number(value))
    elif isinstance(value, Mapping):
        if depth <= 0:
            raise CanonicalizationError("nested too deeply")
        for key in value:
            if not isinstance(key, str):
                raise CanonicalizationError(f"an object key is {type(key).__name__}, not str")
        parts.append("{")
        for i, key in enumerate(sorted(value, key=_utf16_key)):
            if i:
                parts.append(",")
            parts.append(_string(key))
            parts.append(":")
            _write(value[key], parts, depth - 1)
        parts.append("}")
    elif isinstance(value, (list, tuple)):
        if depth <= 0:
            raise CanonicalizationError("nested too deeply")
        parts.append("[")
        for i, item in enumerate(value):
            if i:
                parts.append(",")
            _write(item, parts, depth - 1)
        parts.append("]")
    else:
        raise CanonicalizationError(f"{type(value).__name__} is not a JSON value")
