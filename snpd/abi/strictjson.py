"""Strict JSON for the evidence formats around a report (Azure's HCL runtime data,
Trustee's evidence documents): UTF-8, bounded, no duplicate keys, no NaN or
Infinity, and nesting too deep for the parser a typed error, never RecursionError.

Pure; every failure is an :class:`~snpd.errors.EvidenceFormatError` whose message
starts with what was being read.
"""

from __future__ import annotations

import json
import math
from typing import Any, Dict, List, NoReturn, Tuple, Union

from snpd.errors import EvidenceFormatError


def loads(data: Union[bytes, bytearray, str], *, what: str, limit: int) -> Any:
    """``data`` (at most ``limit`` bytes or characters) as strict JSON; ``what`` names
    it in errors ("HCL runtime data", "az-snp-vtpm evidence")."""
    if len(data) > limit:
        raise EvidenceFormatError(f"{what}: {len(data)} bytes, at most {limit} allowed")

    def no_duplicates(pairs: List[Tuple[str, Any]]) -> Dict[str, Any]:
        found: Dict[str, Any] = {}
        for key, value in pairs:
            if key in found:
                raise EvidenceFormatError(f"{what}: key {key!r} appears twice")
            found[key] = value
        return found

    def reject_constant(name: str) -> NoReturn:
        raise EvidenceFormatError(f"{what}: {name} is not JSON")

    def finite(number: str) -> float:
        value = float(number)
        if not math.isfinite(value):  # 1e400: Infinity by another name
            raise EvidenceFormatError(f"{what}: the number {number[:40]} is out of range")
        return value

    try:
        text = data if isinstance(data, str) else bytes(data).decode("utf-8")
        return json.loads(text, object_pairs_hook=no_duplicates,
                          parse_constant=reject_constant, parse_float=finite)
    except UnicodeDecodeError as exc:
        raise EvidenceFormatError(f"{what} is not UTF-8: {exc}") from exc
    except RecursionError as exc:
        raise EvidenceFormatError(f"{what}: JSON nested too deeply") from exc
    except ValueError as exc:  # json.JSONDecodeError
        raise EvidenceFormatError(f"{what} is not JSON: {exc}") from exc
