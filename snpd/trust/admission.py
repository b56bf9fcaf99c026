"""Admission checks for certificates that arrive from outside (the KDS, the host's
certificate table) before snpd writes or caches them.

A bad KDS or host answer must never poison a cache or a certs dir: each
function either returns what it admitted or raises
:class:`snpd.errors.UntrustedCertificate` saying exactly what was wrong.
"""

from __future__ import annotations

import datetime
from typing import Optional, Sequence, Tuple

from snpd.abi.product import Endorser, Product
from snpd.abi.tcb import TcbVersion
from snpd.errors import CertificateFormatError, UntrustedCertificate
from snpd.trust import signature
from snpd.trust.certset import classify
from snpd.trust.roots import AMD_ROOTS, TrustRoots, amd_names
from snpd.trust.vek import VekExtensions
from snpd.trust.x509 import Certificate, Crl


def _roots(extra: Sequence[Certificate], roots: Optional[TrustRoots]) -> TrustRoots:
    base = roots or AMD_ROOTS
    return base.with_explicit(*extra) if extra else base


def _within(cert: Certificate, at: Optional[datetime.datetime], what: str) -> None:
    if at is None:
        return
    if not cert.not_before <= at <= cert.not_after:
        raise UntrustedCertificate(
            f"{what} is not valid at {at:%Y-%m-%dT%H:%M:%SZ} (valid "
            f"{cert.not_before:%Y-%m-%d} .. {cert.not_after:%Y-%m-%d})")


def check_ark(ark: Certificate, product: Product, roots: TrustRoots) -> None:
    """The ARK is anchored (AMD's pin for this product, or an explicit root) and self-signed."""
    anchor = roots.anchor(ark)
    if anchor is None:
        raise UntrustedCertificate(
            f"ARK {ark.subject.common_name!r} (sha256 {ark.sha256}) is not a pinned AMD root"
            + (" and matches no given trust root" if roots.explicit else ""))
    if anchor.product is not None and anchor.product is not product:
        raise UntrustedCertificate(f"ARK is AMD's {anchor.product} root, expected {product}")
    problem = signature.verify_pss(ark.tbs, ark.signature_algorithm, ark.signature, ark)
    if problem or not ark.is_self_issued:
        raise UntrustedCertificate(f"ARK self-signature: {problem or 'not self-issued'}")


def check_ca_chain(
    certs: Sequence[Certificate],
    product: Product,
    endorser: Endorser,
    extra_roots: Sequence[Certificate] = (),
    *,
    roots: Optional[TrustRoots] = None,
    at: Optional[datetime.datetime] = None,
) -> Tuple[Certificate, Certificate]:
    """Admit a KDS ``cert_chain`` answer (ASK or ASVK, then ARK; any order accepted).

    Returns (ark, intermediate)."""
    trust = _roots(extra_roots, roots)
    by_role = {}
    for cert in certs:
        try:
            role = classify(cert)
        except CertificateFormatError as exc:
            raise UntrustedCertificate(f"unexpected certificate in the chain: {exc}") from exc
        by_role[role] = cert
    want = endorser.intermediate
    if set(by_role) != {"ark", want}:
        raise UntrustedCertificate(
            f"a {endorser.name} chain holds an ARK and an {want.upper()}; got "
            f"{', '.join(sorted(r.upper() for r in by_role)) or 'nothing'}")
    ark, inter = by_role["ark"], by_role[want]
    check_ark(ark, product, trust)
    anchor = trust.anchor(ark)
    cn = inter.subject.common_name or ""
    expected = amd_names(product, endorser)["intermediate"]
    if anchor is not None and not anchor.explicit and cn != expected:
        raise UntrustedCertificate(f"{want.upper()} CN {cn!r} is not {expected!r}")
    # Under an explicit root AMD's names are not demanded, but they may not contradict
    # the product asked for (an emulator's Genoa chain is no Milan chain).
    named = _named_product(cn)
    if named is not None and named is not product:
        raise UntrustedCertificate(f"{want.upper()} CN {cn!r} names {named}, not {product}")
    problem = signature.verify_certificate(inter, ark)
    if problem:
        raise UntrustedCertificate(f"{want.upper()}: {problem}")
    if inter.basic_constraints_ca is not True:
        raise UntrustedCertificate(f"{want.upper()} is not a CA certificate")
    _within(ark, at, "ARK")
    _within(inter, at, want.upper())
    return ark, inter


def _named_product(cn: str) -> Optional[Product]:
    """The product in an AMD-style intermediate CN (``SEV-Genoa``, ``SEV-VLEK-Turin``)."""
    name = cn[len("SEV-VLEK-"):] if cn.startswith("SEV-VLEK-") else cn[len("SEV-"):] \
        if cn.startswith("SEV-") else ""
    try:
        return Product.parse(name) if name else None
    except ValueError:
        return None


def check_vcek_binding(
    cert: Certificate,
    product: Product,
    chip_id: bytes,
    tcb: TcbVersion,
    *,
    intermediate: Optional[Certificate] = None,
    at: Optional[datetime.datetime] = None,
) -> VekExtensions:
    """Admit a VCEK for (product, chip, TCB): its extensions must name exactly that
    chip and TCB, so a KDS answer for another chip is never stored under this key."""
    try:
        ext = VekExtensions.from_certificate(cert)
    except CertificateFormatError as exc:
        raise UntrustedCertificate(f"VCEK extensions: {exc}") from exc
    if ext.endorser is not Endorser.VCEK or cert.subject.common_name != "SEV-VCEK":
        raise UntrustedCertificate("the certificate is not a VCEK")
    if ext.product is not None and ext.product is not product:
        raise UntrustedCertificate(f"VCEK productName {ext.product_name!r} is not {product}")
    want = chip_id[:product.hwid_length]
    if ext.hwid != want:
        raise UntrustedCertificate("VCEK hwID does not match the chip ID it was fetched for")
    problems = ext.tcb_mismatches(tcb)
    if problems:
        raise UntrustedCertificate(f"VCEK TCB does not match: {'; '.join(problems)}")
    if not signature.is_p384(cert.public_key):
        raise UntrustedCertificate("VCEK key is not ECDSA P-384")
    if intermediate is not None:
        problem = signature.verify_certificate(cert, intermediate)
        if problem:
            raise UntrustedCertificate(f"VCEK: {problem}")
    _within(cert, at, "VCEK")
    return ext


def check_crl(
    crl: Crl,
    ark: Certificate,
    product: Product,
    extra_roots: Sequence[Certificate] = (),
    *,
    roots: Optional[TrustRoots] = None,
    at: Optional[datetime.datetime] = None,
) -> None:
    """Admit a CRL: issued and signed by the (anchored) ARK, and not stale at ``at``."""
    check_ark(ark, product, _roots(extra_roots, roots))
    if crl.issuer.der != ark.subject.der:
        raise UntrustedCertificate(f"CRL issuer {crl.issuer.common_name!r} is not the ARK")
    problem = signature.verify_pss(crl.tbs, crl.signature_algorithm, crl.signature, ark)
    if problem:
        raise UntrustedCertificate(f"CRL: {problem}")
    if at is not None and crl.next_update is not None and at > crl.next_update:
        raise UntrustedCertificate(
            f"CRL is stale (nextUpdate {crl.next_update:%Y-%m-%dT%H:%M:%SZ})")
