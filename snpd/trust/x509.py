"""X.509 certificates and CRLs for AMD's SEV-SNP chain, parsed with snpd's own DER reader.

Structure is parsed here (see :mod:`snpd.trust.der` for why); keys and
signatures are handled by ``cryptography``, imported only when a key is needed.
Builders exist for the emulator and the tests: they sign with RSASSA-PSS
(SHA-384, salt 48) exactly like AMD, on every supported ``cryptography``.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import datetime
import functools
import hashlib
import re
from typing import TYPE_CHECKING, Any, List, Optional, Sequence, Tuple

from snpd.trust import der
from snpd.trust.der import DerError, Tlv

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.types import PublicKeyTypes

OID_RSASSA_PSS = "1.2.840.113549.1.1.10"
OID_RSA_ENCRYPTION = "1.2.840.113549.1.1.1"
OID_EC_PUBLIC_KEY = "1.2.840.10045.2.1"
OID_SECP384R1 = "1.3.132.0.34"
OID_ECDSA_SHA384 = "1.2.840.10045.4.3.3"
OID_SHA384 = "2.16.840.1.101.3.4.2.2"
OID_MGF1 = "1.2.840.113549.1.1.8"
OID_BASIC_CONSTRAINTS = "2.5.29.19"
OID_KEY_USAGE = "2.5.29.15"
OID_CRL_DISTRIBUTION_POINTS = "2.5.29.31"
OID_SUBJECT_KEY_ID = "2.5.29.14"
OID_AUTHORITY_KEY_ID = "2.5.29.35"

_ATTR_NAMES = {
    "2.5.4.3": "CN", "2.5.4.6": "C", "2.5.4.7": "L", "2.5.4.8": "ST",
    "2.5.4.10": "O", "2.5.4.11": "OU",
}
_ATTR_OIDS = {v: k for k, v in _ATTR_NAMES.items()}

MAX_CERT_SIZE = 64 * 1024
_PEM_RE = re.compile(
    rb"-----BEGIN ([A-Z0-9 ]+)-----\r?\n(.*?)-----END \1-----", re.DOTALL)


@dataclasses.dataclass(frozen=True)
class Name:
    """A distinguished name as its ordered (attribute OID, value) pairs."""

    attributes: Tuple[Tuple[str, str], ...]
    der: bytes = b""

    def get(self, short: str) -> Optional[str]:
        oid = _ATTR_OIDS.get(short, short)
        for key, value in self.attributes:
            if key == oid:
                return value
        return None

    @property
    def common_name(self) -> Optional[str]:
        return self.get("CN")

    def __str__(self) -> str:
        return ", ".join(f"{_ATTR_NAMES.get(k, k)}={v}" for k, v in self.attributes)

    @classmethod
    def build(cls, pairs: Sequence[Tuple[str, str]]) -> Name:
        """Build from (short name or OID, value) pairs, one attribute per RDN."""
        rdns = []
        attrs = []
        for key, value in pairs:
            oid = _ATTR_OIDS.get(key, key)
            enc = (der.encode(der.PRINTABLE_STRING, value.encode()) if key == "C"
                   else der.utf8(value))
            rdns.append(der.set_of(der.seq(der.oid(oid), enc)))
            attrs.append((oid, value))
        return cls(tuple(attrs), der.seq(*rdns))


def _parse_name(tlv: Tlv, what: str) -> Name:
    tlv.expect(der.SEQUENCE, what)
    attrs: List[Tuple[str, str]] = []
    for rdn in tlv.children():
        rdn.expect(der.SET, f"{what} RDN")
        for atv in rdn.children():
            parts = atv.expect(der.SEQUENCE, f"{what} attribute").children()
            if len(parts) != 2:
                raise DerError(f"{what}: attribute with {len(parts)} parts")
            attrs.append((der.decode_oid(parts[0], what), der.decode_string(parts[1], what)))
    return Name(tuple(attrs), tlv.raw)


@dataclasses.dataclass(frozen=True)
class Extension:
    oid: str
    critical: bool
    value: bytes  # the contents of extnValue's OCTET STRING


@dataclasses.dataclass(frozen=True)
class AlgorithmIdentifier:
    oid: str
    parameters: Optional[bytes]  # the DER of the parameters, if any

    def pss_parameters(self) -> Tuple[str, str, int]:
        """(hash OID, MGF1 hash OID, salt length) of an RSASSA-PSS identifier."""
        if self.oid != OID_RSASSA_PSS or self.parameters is None:
            raise DerError("not an RSASSA-PSS algorithm identifier")
        hash_oid, mgf_hash, salt = "1.3.14.3.2.26", "1.3.14.3.2.26", 20  # RFC 4055 defaults
        for field in der.parse_single(self.parameters, "PSS parameters").children():
            inner = field.children()
            if len(inner) != 1:
                raise DerError("malformed PSS parameter")
            if field.tag == der.context(0):
                hash_oid = der.decode_oid(inner[0].expect(der.SEQUENCE, "hash").children()[0])
            elif field.tag == der.context(1):
                mgf = inner[0].expect(der.SEQUENCE, "maskGen").children()
                if len(mgf) != 2 or der.decode_oid(mgf[0]) != OID_MGF1:
                    raise DerError("PSS mask generation is not MGF1")
                mgf_hash = der.decode_oid(mgf[1].expect(der.SEQUENCE, "MGF1 hash").children()[0])
            elif field.tag == der.context(2):
                salt = der.decode_integer(inner[0], "saltLength")
            elif field.tag == der.context(3):
                if der.decode_integer(inner[0], "trailerField") != 1:
                    raise DerError("PSS trailer field must be 1")
            else:
                raise DerError(f"unknown PSS parameter tag 0x{field.tag:02x}")
        return hash_oid, mgf_hash, salt

    @property
    def is_amd_pss(self) -> bool:
        """RSASSA-PSS with SHA-384, MGF1-SHA-384 and salt 48, as AMD signs."""
        try:
            return self.pss_parameters() == (OID_SHA384, OID_SHA384, 48)
        except DerError:
            return False


def _parse_algorithm(tlv: Tlv, what: str) -> AlgorithmIdentifier:
    parts = tlv.expect(der.SEQUENCE, what).children()
    if not 1 <= len(parts) <= 2:
        raise DerError(f"{what}: malformed AlgorithmIdentifier")
    params = parts[1].raw if len(parts) == 2 and parts[1].tag != der.NULL else None
    return AlgorithmIdentifier(der.decode_oid(parts[0], what), params)


def _load_public_key(spki: bytes) -> PublicKeyTypes:
    # lazy: snpctl certificates parses DER without cryptography (25 ms budget)
    from cryptography.exceptions import UnsupportedAlgorithm
    from cryptography.hazmat.primitives.serialization import load_der_public_key

    try:
        return load_der_public_key(spki)
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:  # incl. an unknown key OID
        raise DerError(f"unusable public key: {exc}") from exc


@dataclasses.dataclass(frozen=True)
class Certificate:
    """A parsed X.509 v3 certificate. ``der`` is the exact encoding it came from."""

    der: bytes
    tbs: bytes
    version: int
    serial_number: int
    tbs_signature_algorithm: AlgorithmIdentifier
    issuer: Name
    not_before: datetime.datetime
    not_after: datetime.datetime
    subject: Name
    spki: bytes
    spki_algorithm: AlgorithmIdentifier
    extensions: Tuple[Extension, ...]
    signature_algorithm: AlgorithmIdentifier
    signature: bytes

    @classmethod
    def from_der(cls, data: bytes) -> Certificate:
        if len(data) > MAX_CERT_SIZE:
            raise DerError(f"certificate of {len(data)} bytes exceeds {MAX_CERT_SIZE}")
        top, tbs_tlv, alg_tlv, sig_tlv = _signed_parts(data, "certificate")
        fields = tbs_tlv.expect(der.SEQUENCE, "tbsCertificate").children()
        i = 0
        version = 1
        if fields and fields[0].tag == der.context(0):
            inner = fields[0].children()
            if len(inner) != 1:
                raise DerError("malformed version field")
            version = der.decode_integer(inner[0], "version") + 1
            i = 1
        if len(fields) < i + 6:
            raise DerError("tbsCertificate is missing fields")
        serial = der.decode_integer(fields[i], "serialNumber")
        tbs_alg = _parse_algorithm(fields[i + 1], "signature")
        issuer = _parse_name(fields[i + 2], "issuer")
        validity = fields[i + 3].expect(der.SEQUENCE, "validity").children()
        if len(validity) != 2:
            raise DerError("validity must have notBefore and notAfter")
        not_before = der.decode_time(validity[0], "notBefore")
        not_after = der.decode_time(validity[1], "notAfter")
        subject = _parse_name(fields[i + 4], "subject")
        spki_tlv = fields[i + 5].expect(der.SEQUENCE, "subjectPublicKeyInfo")
        spki_parts = spki_tlv.children()
        if len(spki_parts) != 2:
            raise DerError("malformed subjectPublicKeyInfo")
        spki_alg = _parse_algorithm(spki_parts[0], "subjectPublicKeyInfo algorithm")
        extensions: List[Extension] = []
        for extra in fields[i + 6:]:
            if extra.tag in (der.context(1, False), der.context(2, False)):
                continue  # issuer/subject unique IDs
            if extra.tag != der.context(3):
                raise DerError(f"unexpected tbsCertificate field tag 0x{extra.tag:02x}")
            inner = extra.children()
            if len(inner) != 1:
                raise DerError("malformed extensions field")
            extensions.extend(_parse_extensions(inner[0]))
        seen = set()
        for ext in extensions:
            if ext.oid in seen:
                raise DerError(f"extension {ext.oid} appears twice")
            seen.add(ext.oid)
        return cls(
            der=top.raw,
            tbs=tbs_tlv.raw,
            version=version,
            serial_number=serial,
            tbs_signature_algorithm=tbs_alg,
            issuer=issuer,
            not_before=not_before,
            not_after=not_after,
            subject=subject,
            spki=spki_tlv.raw,
            spki_algorithm=spki_alg,
            extensions=tuple(extensions),
            signature_algorithm=_parse_algorithm(alg_tlv, "signatureAlgorithm"),
            signature=der.decode_bit_string(sig_tlv, "signatureValue"),
        )

    # -- views ---------------------------------------------------------------

    @property
    def sha256(self) -> str:
        """SHA-256 of the DER encoding, lowercase hex: the pinning fingerprint."""
        return hashlib.sha256(self.der).hexdigest()

    @property
    def spki_sha256(self) -> str:
        return hashlib.sha256(self.spki).hexdigest()

    def extension(self, oid: str) -> Optional[Extension]:
        for ext in self.extensions:
            if ext.oid == oid:
                return ext
        return None

    @functools.cached_property
    def public_key(self) -> PublicKeyTypes:
        return _load_public_key(self.spki)

    @property
    def is_self_issued(self) -> bool:
        return self.issuer.der == self.subject.der

    @property
    def basic_constraints_ca(self) -> Optional[bool]:
        """cA of basicConstraints, or None when the extension is absent."""
        ext = self.extension(OID_BASIC_CONSTRAINTS)
        if ext is None:
            return None
        parts = der.parse_single(ext.value, "basicConstraints").expect(
            der.SEQUENCE, "basicConstraints").children()
        return bool(parts and parts[0].tag == der.BOOLEAN and der.decode_bool(parts[0]))

    @property
    def key_cert_sign(self) -> Optional[bool]:
        """keyCertSign of keyUsage, or None when the extension is absent."""
        ext = self.extension(OID_KEY_USAGE)
        if ext is None:
            return None
        bits = der.decode_bit_string(der.parse_single(ext.value, "keyUsage"), "keyUsage")
        return bool(bits and bits[0] & 0x04)

    @property
    def crl_distribution_points(self) -> Tuple[str, ...]:
        """The URIs of the CRL distribution points (GeneralName uniformResourceIdentifier)."""
        ext = self.extension(OID_CRL_DISTRIBUTION_POINTS)
        if ext is None:
            return ()
        uris: List[str] = []

        def walk(tlv: Tlv) -> None:
            if tlv.tag == der.context(6, False):
                uris.append(tlv.value.decode("ascii", "replace"))
            elif tlv.tag & 0x20:
                for child in tlv.children():
                    walk(child)

        walk(der.parse_single(ext.value, "cRLDistributionPoints"))
        return tuple(uris)

    def to_pem(self) -> str:
        return pem_encode(self.der, "CERTIFICATE")

    def __repr__(self) -> str:
        return (f"Certificate(subject={self.subject.common_name!r}, "
                f"issuer={self.issuer.common_name!r}, sha256={self.sha256[:16]}…)")


def _signed_parts(data: bytes, what: str) -> Tuple[Tlv, Tlv, Tlv, Tlv]:
    """The outer SEQUENCE of a signed structure and its (tbs, algorithm, signature)."""
    top = der.parse_single(bytes(data), what).expect(der.SEQUENCE, what)
    parts = top.children()
    if len(parts) != 3:
        raise DerError(f"{what} has {len(parts)} top-level parts, expected 3")
    return top, parts[0], parts[1], parts[2]


def _parse_extensions(tlv: Tlv) -> List[Extension]:
    out = []
    for ext in tlv.expect(der.SEQUENCE, "extensions").children():
        parts = ext.expect(der.SEQUENCE, "extension").children()
        if len(parts) not in (2, 3):
            raise DerError("malformed extension")
        critical = False
        if len(parts) == 3:
            critical = der.decode_bool(parts[1], "critical")
        value = parts[-1].expect(der.OCTET_STRING, "extnValue").value
        out.append(Extension(der.decode_oid(parts[0], "extnID"), critical, value))
    return out


@dataclasses.dataclass(frozen=True)
class Crl:
    """A parsed X.509 v2 CRL."""

    der: bytes
    tbs: bytes
    issuer: Name
    this_update: datetime.datetime
    next_update: Optional[datetime.datetime]
    revoked_serials: frozenset  # type: ignore[type-arg]
    signature_algorithm: AlgorithmIdentifier
    signature: bytes

    @classmethod
    def from_der(cls, data: bytes) -> Crl:
        if len(data) > 4 * MAX_CERT_SIZE:
            raise DerError(f"CRL of {len(data)} bytes is too large")
        top, tbs_tlv, alg_tlv, sig_tlv = _signed_parts(data, "CRL")
        fields = tbs_tlv.expect(der.SEQUENCE, "tbsCertList").children()
        i = 1 if fields and fields[0].tag == der.INTEGER else 0
        if len(fields) < i + 3:
            raise DerError("tbsCertList is missing fields")
        issuer = _parse_name(fields[i + 1], "CRL issuer")
        this_update = der.decode_time(fields[i + 2], "thisUpdate")
        j = i + 3
        next_update = None
        if j < len(fields) and fields[j].tag in (der.UTC_TIME, der.GENERALIZED_TIME):
            next_update = der.decode_time(fields[j], "nextUpdate")
            j += 1
        revoked = set()
        if j < len(fields) and fields[j].tag == der.SEQUENCE:
            for entry in fields[j].children():
                entry_parts = entry.expect(der.SEQUENCE, "revokedCertificate").children()
                if not entry_parts:
                    raise DerError("empty revokedCertificate entry")
                revoked.add(der.decode_integer(entry_parts[0], "userCertificate"))
        return cls(
            der=top.raw,
            tbs=tbs_tlv.raw,
            issuer=issuer,
            this_update=this_update,
            next_update=next_update,
            revoked_serials=frozenset(revoked),
            signature_algorithm=_parse_algorithm(alg_tlv, "CRL signatureAlgorithm"),
            signature=der.decode_bit_string(sig_tlv, "CRL signatureValue"),
        )

    def to_pem(self) -> str:
        return pem_encode(self.der, "X509 CRL")


# -- loading -----------------------------------------------------------------


def pem_encode(data: bytes, label: str) -> str:
    b64 = base64.b64encode(data).decode()
    lines = [b64[i:i + 64] for i in range(0, len(b64), 64)]
    return f"-----BEGIN {label}-----\n" + "\n".join(lines) + f"\n-----END {label}-----\n"


def pem_blocks(data: bytes, label: str) -> List[bytes]:
    """The DER payloads of every PEM block with ``label``, in order."""
    out = []
    for match in _PEM_RE.finditer(data):
        if match.group(1).decode() != label:
            continue
        try:
            out.append(base64.b64decode(b"".join(match.group(2).split()), validate=True))
        except (binascii.Error, ValueError) as exc:
            raise DerError(f"malformed base64 in a PEM {label} block") from exc
    return out


def _is_pem(data: bytes) -> bool:
    return data.lstrip()[:11] == b"-----BEGIN "


def load_certificates(data: bytes) -> List[Certificate]:
    """Every certificate in ``data``: a PEM stack (in order) or one DER certificate."""
    data = bytes(data)
    if _is_pem(data):
        blocks = pem_blocks(data, "CERTIFICATE")
        if not blocks:
            raise DerError("no PEM CERTIFICATE block found")
        return [Certificate.from_der(b) for b in blocks]
    return [Certificate.from_der(data)]


def load_certificate(data: bytes) -> Certificate:
    """Exactly one certificate, PEM or DER."""
    certs = load_certificates(data)
    if len(certs) != 1:
        raise DerError(f"expected one certificate, found {len(certs)}")
    return certs[0]


def load_crl(data: bytes) -> Crl:
    data = bytes(data)
    if _is_pem(data):
        blocks = pem_blocks(data, "X509 CRL")
        if len(blocks) != 1:
            raise DerError(f"expected one PEM X509 CRL block, found {len(blocks)}")
        data = blocks[0]
    return Crl.from_der(data)


# -- building (emulator and tests) ---------------------------------------------


def amd_pss_algorithm() -> bytes:
    """AlgorithmIdentifier for RSASSA-PSS, SHA-384, MGF1-SHA-384, salt 48."""
    sha384 = der.seq(der.oid(OID_SHA384))
    return der.seq(der.oid(OID_RSASSA_PSS), der.seq(
        der.explicit(0, sha384),
        der.explicit(1, der.seq(der.oid(OID_MGF1), sha384)),
        der.explicit(2, der.integer(48)),
    ))


def sign_tbs(tbs: bytes, signing_key: Any) -> Tuple[bytes, bytes]:
    """Sign TBS bytes; return (AlgorithmIdentifier DER, signature). RSA → AMD's PSS."""
    # lazy: signing is the emulator's; parsing needs no cryptography (see above)
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa

    if isinstance(signing_key, rsa.RSAPrivateKey):
        sig = signing_key.sign(tbs, padding.PSS(mgf=padding.MGF1(hashes.SHA384()),
                                                salt_length=48), hashes.SHA384())
        return amd_pss_algorithm(), sig
    if isinstance(signing_key, ec.EllipticCurvePrivateKey):
        return der.seq(der.oid(OID_ECDSA_SHA384)), signing_key.sign(
            tbs, ec.ECDSA(hashes.SHA384()))
    raise TypeError(f"unsupported signing key {type(signing_key).__name__}")


def encode_extension(ext: Extension) -> bytes:
    parts = [der.oid(ext.oid)]
    if ext.critical:
        parts.append(der.boolean(True))
    parts.append(der.octet_string(ext.value))
    return der.seq(*parts)


def basic_constraints(ca: bool) -> Extension:
    return Extension(OID_BASIC_CONSTRAINTS, True, der.seq(der.boolean(True)) if ca else der.seq())


def key_usage_ca() -> Extension:
    """keyCertSign and cRLSign, as on AMD's ARK and ASK."""
    return Extension(OID_KEY_USAGE, True, der.encode(der.BIT_STRING, b"\x01\x06"))


def crl_distribution_point(uri: str) -> Extension:
    gn = der.encode(der.context(6, False), uri.encode("ascii"))
    dp = der.seq(der.explicit(0, der.explicit(0, gn)))
    return Extension(OID_CRL_DISTRIBUTION_POINTS, False, der.seq(dp))


def build_certificate(
    *,
    issuer: Name,
    subject: Name,
    serial: int,
    not_before: datetime.datetime,
    not_after: datetime.datetime,
    public_key: Any,
    extensions: Sequence[Extension],
    signing_key: Any,
) -> Certificate:
    """Build and sign an X.509 v3 certificate (serial 0 allowed, as AMD issues VCEKs)."""
    # lazy: signing is the emulator's; parsing needs no cryptography (see above)
    from cryptography.hazmat.primitives import serialization

    spki = public_key.public_bytes(serialization.Encoding.DER,
                                   serialization.PublicFormat.SubjectPublicKeyInfo)
    sig_alg = amd_pss_algorithm() if _is_rsa(signing_key) else der.seq(der.oid(OID_ECDSA_SHA384))
    fields = [
        der.explicit(0, der.integer(2)),
        der.integer(serial),
        sig_alg,
        issuer.der,
        der.seq(der.time(not_before), der.time(not_after)),
        subject.der,
        spki,
    ]
    if extensions:
        fields.append(der.explicit(3, der.seq(*(encode_extension(e) for e in extensions))))
    tbs = der.seq(*fields)
    sig_alg_signed, signature = sign_tbs(tbs, signing_key)
    assert sig_alg_signed == sig_alg
    return Certificate.from_der(der.seq(tbs, sig_alg, der.bit_string(signature)))


def _is_rsa(key: Any) -> bool:
    from cryptography.hazmat.primitives.asymmetric import rsa  # lazy: see sign_tbs

    return isinstance(key, rsa.RSAPrivateKey)


def build_crl(
    *,
    issuer: Name,
    this_update: datetime.datetime,
    next_update: Optional[datetime.datetime],
    revoked: Sequence[Tuple[int, datetime.datetime]],
    signing_key: Any,
) -> Crl:
    """Build and sign an X.509 v2 CRL, as the ARK signs AMD's."""
    sig_alg = amd_pss_algorithm() if _is_rsa(signing_key) else der.seq(der.oid(OID_ECDSA_SHA384))
    fields = [der.integer(1), sig_alg, issuer.der, der.time(this_update)]
    if next_update is not None:
        fields.append(der.time(next_update))
    if revoked:
        fields.append(der.seq(*(der.seq(der.integer(s), der.time(t)) for s, t in revoked)))
    tbs = der.seq(*fields)
    _, signature = sign_tbs(tbs, signing_key)
    return Crl.from_der(der.seq(tbs, sig_alg, der.bit_string(signature)))
