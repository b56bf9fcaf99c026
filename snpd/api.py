"""The public Python API for verification, as applications and ``snpctl`` use it.

    >>> import snpd
    >>> verdict = snpd.verify_attestation(report_bytes, "/path/to/certs")
    >>> if not verdict:
    ...     print([c.detail for c in verdict.failures])
"""

from __future__ import annotations

import datetime
import os
from typing import TYPE_CHECKING, Iterable, Optional, Sequence, Union

from snpd.abi.product import Product
from snpd.certsdir import load_certs_dir
from snpd.trust.certset import CertificateSet
from snpd.trust.result import Verdict
from snpd.trust.roots import AMD_ROOTS
from snpd.trust.verify import Verifier
from snpd.trust.x509 import Certificate, Crl, load_certificates, load_crl

if TYPE_CHECKING:
    from snpd.trust.appraisal import AppraisalPolicy

CertificatesArg = Union[
    str, "os.PathLike[str]", CertificateSet, Iterable[Union[Certificate, Crl, bytes]]]


def certificate_set(certificates: CertificatesArg) -> CertificateSet:
    """Normalize what callers pass: a certs dir path, a set, or certificates / PEM / DER bytes."""
    if isinstance(certificates, CertificateSet):
        return certificates
    if isinstance(certificates, (str, os.PathLike)):
        return load_certs_dir(certificates)
    items: list = []  # type: ignore[type-arg]
    for item in certificates:
        if isinstance(item, (Certificate, Crl)):
            items.append(item)
        elif b"X509 CRL" in bytes(item)[:64]:
            items.append(load_crl(item))
        else:
            items.extend(load_certificates(item))
    return CertificateSet.from_items(items)


def verify_attestation(
    report: bytes,
    certificates: CertificatesArg,
    at: Optional[datetime.datetime] = None,
    policy: Optional[AppraisalPolicy] = None,
    *,
    trust_roots: Sequence[Certificate] = (),
    product: Optional[Product] = None,
) -> Verdict:
    """Verify ``report`` (the raw 1184 bytes) with its chain against AMD's pinned roots.

    ``certificates`` is a snpguest-style directory or the certificates themselves;
    ``at`` is the time for validity windows (default now, timezone-aware);
    ``policy`` an optional :class:`~snpd.trust.appraisal.AppraisalPolicy`;
    ``trust_roots`` extra roots for this verification only. The verdict's truth
    value is its validity; ``verdict.checks`` says why. A report that does not
    parse is an invalid verdict, not an exception, and so is a certificate that is
    not what its name or kind says, or no certificate at all (``chain.certificates``:
    host data is attacker-controlled). A directory or file that cannot be read
    raises :class:`snpd.errors.InputFileError`; an unknown kind raises
    :class:`snpd.errors.InvalidArgument`.
    """
    roots = AMD_ROOTS.with_explicit(*trust_roots) if trust_roots else AMD_ROOTS
    return Verifier(roots).verify(report, certificate_set(certificates), at=at,
                                  policy=policy, product=product)
