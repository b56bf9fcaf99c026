"""snpd: the AMD SEV-SNP attestation daemon and its library.

The public API is small and imported lazily, so ``import snpd`` stays cheap for
the command-line client:

- :func:`verify_attestation` — verify a report and its chain, get a :class:`Verdict`.
- :class:`Verifier` — the same, remembering verified chains across calls.
- :class:`AttestationReport`, :class:`Product`, :class:`TcbVersion` — the report ABI.
- :class:`AppraisalPolicy` — what a relying party accepts beyond a valid signature.
"""

from __future__ import annotations

TYPE_CHECKING = False  # typing itself costs snpctl's start-up ~2 ms; mypy reads this as True
if TYPE_CHECKING:
    from typing import Any

__version__ = "0.1.1"

_LAZY = {
    "verify_attestation": "snpd.api",
    "certificate_set": "snpd.api",
    "Verifier": "snpd.trust.verify",
    "Verdict": "snpd.trust.result",
    "Check": "snpd.trust.result",
    "Status": "snpd.trust.result",
    "CertificateSet": "snpd.trust.certset",
    "TrustRoots": "snpd.trust.roots",
    "AppraisalPolicy": "snpd.trust.appraisal",
    "AttestationReport": "snpd.abi.report",
    "parse_report": "snpd.abi.report",
    "Product": "snpd.abi.product",
    "Endorser": "snpd.abi.product",
    "TcbVersion": "snpd.abi.tcb",
    "load_certificate": "snpd.trust.x509",
    "load_certificates": "snpd.trust.x509",
    "load_crl": "snpd.trust.x509",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'snpd' has no attribute {name!r}")
    import importlib  # lazy: every snpctl start imports this package (25 ms budget)

    return getattr(importlib.import_module(module), name)
