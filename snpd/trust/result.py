"""The outcome of a verification: every check with pass / fail / skipped and why."""

from __future__ import annotations

import dataclasses
import enum
from typing import Dict, List, Optional, Tuple

from snpd.abi.product import Product
from snpd.abi.report import AttestationReport


class Status(str, enum.Enum):
    PASS = "pass"
    FAIL = "fail"
    SKIP = "skipped"

    def __str__(self) -> str:
        return self.value


@dataclasses.dataclass(frozen=True)
class Check:
    """One named check. ``detail`` says what was compared, or why it failed or was skipped."""

    name: str
    status: Status
    detail: str = ""

    @classmethod
    def passed(cls, name: str, detail: str = "") -> Check:
        return cls(name, Status.PASS, detail)

    @classmethod
    def failed(cls, name: str, detail: str) -> Check:
        return cls(name, Status.FAIL, detail)

    @classmethod
    def skipped(cls, name: str, detail: str) -> Check:
        return cls(name, Status.SKIP, detail)

    @property
    def ok(self) -> bool:
        return self.status is not Status.FAIL

    def to_json(self) -> Dict[str, str]:
        return {"name": self.name, "status": self.status.value, "detail": self.detail}


@dataclasses.dataclass(frozen=True)
class Verdict:
    """The result of verifying a report. Its truth value is its validity.

    Valid means: at least one check ran, none failed, the report signature check
    itself passed (a verification that could not run is a failure), and no check
    was left out on request. ``omitted`` names the checks the caller asked not to
    run (snpguest's ``--tcb`` / ``--signature``): such a verdict is ``partial``,
    never valid, and ``passed`` says whether every check that did run passed.
    """

    checks: Tuple[Check, ...]
    report: Optional[AttestationReport] = None
    product: Optional[Product] = None
    omitted: Tuple[str, ...] = ()

    @property
    def passed(self) -> bool:
        """Every check that ran passed, and the signature did unless it was omitted."""
        return bool(self.checks) and all(c.ok for c in self.checks) and (
            "report.signature" in self.omitted or any(
                c.name == "report.signature" and c.status is Status.PASS for c in self.checks))

    @property
    def partial(self) -> bool:
        return bool(self.omitted)

    @property
    def valid(self) -> bool:
        return not self.omitted and self.passed

    def __bool__(self) -> bool:
        return self.valid

    @property
    def failures(self) -> Tuple[Check, ...]:
        return tuple(c for c in self.checks if c.status is Status.FAIL)

    def check(self, name: str) -> Optional[Check]:
        for c in self.checks:
            if c.name == name:
                return c
        return None

    def to_json(self) -> Dict[str, object]:
        checks: List[Dict[str, str]] = [c.to_json() for c in self.checks]
        return {
            "valid": self.valid,
            "partial": self.partial,
            "skipped": list(self.omitted),
            "product": self.product.value if self.product else None,
            "failures": [c.name for c in self.failures],
            "checks": checks,
        }
