"""Fault specifications for the loopback KDS, as command-line text.

``status=429,retry_after=1,count=3`` · ``status=500`` · ``hang=5`` · ``hang`` ·
``truncate`` · ``latency=0.2,count=all`` — ``count`` defaults to 1.
"""

from __future__ import annotations

from typing import Callable, Dict, Optional, Tuple, TypeVar

from snpd.emulator.kds_server import Fault
from snpd.errors import InvalidArgument

T = TypeVar("T", int, float)


def parse_fault(spec: str) -> Tuple[Fault, Optional[int]]:
    """(fault, count) from a spec; count None means every request."""
    fields: Dict[str, Optional[str]] = {}
    for part in spec.split(","):
        key, sep, value = part.strip().partition("=")
        if not key:
            continue
        fields[key.replace("-", "_")] = value if sep else None
    count_text = fields.pop("count", "1") or "1"
    count: Optional[int] = None if count_text == "all" else _number(count_text, "count", int)
    try:
        if "status" in fields:
            retry_after = fields.pop("retry_after", None)
            fault = Fault.status(_number(fields.pop("status"), "status", int),
                                 retry_after=retry_after)
        elif "hang" in fields:
            seconds = fields.pop("hang")
            fault = Fault.hang(_number(seconds, "hang", float) if seconds else None)
        elif "truncate" in fields:
            keep = fields.pop("truncate")
            fault = Fault.truncate(_number(keep, "truncate", int) if keep else None)
        elif "latency" in fields:
            fault = Fault.latency(_number(fields.pop("latency"), "latency", float))
        else:
            raise InvalidArgument(f"fault {spec!r}: say status=N, hang[=S], truncate or "
                                  "latency=S")
    except ValueError as exc:
        raise InvalidArgument(f"fault {spec!r}: {exc}") from exc
    if fields:
        raise InvalidArgument(f"fault {spec!r}: unknown keys {', '.join(sorted(fields))}")
    return fault, count


def _number(text: Optional[str], what: str, kind: Callable[[str], T]) -> T:
    try:
        value = kind(text or "")
    except (TypeError, ValueError):
        raise InvalidArgument(f"{what} needs a number, got {text!r}") from None
    if value < 0:
        raise InvalidArgument(f"{what} must not be negative")
    return value
