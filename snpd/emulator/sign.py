"""Sign a report as the firmware does: ECDSA P-384/SHA-384 over [0x000, 0x2A0),
r and s stored little-endian, zero-extended to 72 bytes each."""

from __future__ import annotations

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

from snpd.abi.report import REPORT_SIZE, SIGNED_SIZE


def sign_report(raw: bytes, key: ec.EllipticCurvePrivateKey) -> bytes:
    """Return ``raw`` with its signature replaced; bytes after S are zeroed."""
    if len(raw) != REPORT_SIZE:
        raise ValueError(f"a report is {REPORT_SIZE} bytes, got {len(raw)}")
    body = bytes(raw[:SIGNED_SIZE])
    r, s = decode_dss_signature(key.sign(body, ec.ECDSA(hashes.SHA384())))
    sig = r.to_bytes(72, "little") + s.to_bytes(72, "little")
    return body + sig + bytes(REPORT_SIZE - SIGNED_SIZE - len(sig))
