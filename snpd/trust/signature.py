"""Signature checks: RSASSA-PSS over certificates and CRLs, ECDSA P-384 over reports.

Each function returns None when the signature holds, or a sentence saying why
it does not; callers turn that into a Check. Nothing here raises on bad input.
"""

from __future__ import annotations

from typing import Any, Optional

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from snpd.abi.report import AttestationReport
from snpd.trust.der import DerError
from snpd.trust.x509 import AlgorithmIdentifier, Certificate

_PSS = padding.PSS(mgf=padding.MGF1(hashes.SHA384()), salt_length=48)
_SHA384 = hashes.SHA384()
_ECDSA_SHA384 = ec.ECDSA(hashes.SHA384())


def verify_pss(tbs: bytes, algorithm: AlgorithmIdentifier, signature: bytes,
               issuer: Certificate) -> Optional[str]:
    """AMD signs every certificate and CRL with RSASSA-PSS, SHA-384, MGF1-SHA-384, salt 48."""
    if not algorithm.is_amd_pss:
        return f"signature algorithm {algorithm.oid} is not RSASSA-PSS/SHA-384/salt 48"
    try:
        key: Any = issuer.public_key
    except DerError as exc:
        return f"issuer key unusable: {exc}"
    if not isinstance(key, rsa.RSAPublicKey):
        return "issuer key is not RSA"
    try:
        key.verify(signature, tbs, _PSS, _SHA384)
    except InvalidSignature:
        return f"signature does not verify with the key of {issuer.subject.common_name!r}"
    return None


def verify_certificate(cert: Certificate, issuer: Certificate) -> Optional[str]:
    """The certificate's signature under the issuer's key, and the names that chain them."""
    if cert.issuer.der != issuer.subject.der:
        return (f"issuer {cert.issuer.common_name!r} is not the subject "
                f"{issuer.subject.common_name!r} of the signing certificate")
    if cert.signature_algorithm != cert.tbs_signature_algorithm:
        return "outer and inner signature algorithms differ"
    return verify_pss(cert.tbs, cert.signature_algorithm, cert.signature, issuer)


def is_p384(key: Any) -> bool:
    return isinstance(key, ec.EllipticCurvePublicKey) and isinstance(key.curve, ec.SECP384R1)


def verify_report(report: AttestationReport, key: Any) -> Optional[str]:
    """ECDSA P-384/SHA-384 over the raw bytes [0x000, 0x2A0), r and s little-endian."""
    if not is_p384(key):
        return "the endorsement key is not an ECDSA P-384 key"
    r, s = report.r, report.s
    if r == 0 or s == 0:
        return "the signature is zero"
    try:
        key.verify(encode_dss_signature(r, s), report.signed_bytes, _ECDSA_SHA384)
    except InvalidSignature:
        return "the report signature does not verify with the endorsement key"
    return None
