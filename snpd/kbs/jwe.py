"""The TEE key and the JWE a KBS encrypts resources to (RFC 7516 flattened JSON).

The daemon makes an ephemeral :class:`TeeKey`, sends its public JWK in the attestation
(the binding hashes it into the evidence), and the KBS encrypts every resource to it:
``enc`` A256GCM, ``alg`` one of RSA1_5 (legacy), RSA-OAEP-256, ECDH-ES+A256KW on P-256
or P-521 (trustee ``kbs/src/jwe``). The private key never leaves the process and never
appears in a repr.

:func:`decrypt` accepts exactly those, with the JOSE header as the union of the
protected header, ``unprotected`` and the per-recipient ``header`` (RFC 7516 §7.2.1):
Trustee puts ``epk`` in the protected header, a standard library may put it in
``header``. The algorithm must be the one the key was advertised with, so a KBS cannot
downgrade an OAEP key to PKCS#1 v1.5. Every failure is a typed error: a malformed JWE
a :class:`~snpd.errors.KbsProtocolError`, one that does not decrypt a
:class:`~snpd.errors.SecretDecryptionError` that does not say which step failed.

Only cryptography APIs present in 3.4.8 are used.
"""

from __future__ import annotations

import dataclasses
import os
import struct
from typing import Any, Dict, Mapping, Optional, Union

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.concatkdf import ConcatKDFHash
from cryptography.hazmat.primitives.keywrap import InvalidUnwrap, aes_key_unwrap

from snpd.errors import InvalidArgument, KbsProtocolError, SecretDecryptionError
from snpd.kbs.protocol import b64url_decode, b64url_encode, is_b64url, loads

ECDH_ES_A256KW = "ECDH-ES+A256KW"
RSA_OAEP_256 = "RSA-OAEP-256"
RSA1_5 = "RSA1_5"
A256GCM = "A256GCM"
MAX_JWE = 1 << 20
RSA_BITS = 3072
CEK_SIZE = 32
IV_SIZE = 12
TAG_SIZE = 16

PrivateKey = Union[ec.EllipticCurvePrivateKey, rsa.RSAPrivateKey]


@dataclasses.dataclass(frozen=True)
class _Kind:
    alg: str
    curve: Optional[str] = None  # JWK crv; None for RSA
    size: int = 0  # coordinate bytes for EC


KINDS: Dict[str, _Kind] = {
    "ec-p256": _Kind(ECDH_ES_A256KW, "P-256", 32),
    "ec-p521": _Kind(ECDH_ES_A256KW, "P-521", 66),
    "rsa": _Kind(RSA_OAEP_256),
    "rsa1_5": _Kind(RSA1_5),  # legacy: Trustee warns about it; never the default
}
_CURVES = {"P-256": ec.SECP256R1, "P-521": ec.SECP521R1}
# The JWE members of the flattened syntax; others are ignored (RFC 7516 §7.2.1).
_MEMBERS = ("protected", "unprotected", "header", "encrypted_key", "iv", "ciphertext", "tag",
            "aad")
_REQUIRED = ("protected", "encrypted_key", "iv", "ciphertext", "tag")


@dataclasses.dataclass(frozen=True, repr=False, eq=False)
class TeeKey:
    """An ephemeral key pair of one :data:`KINDS` kind; only the public half is ever
    exported. Equal only to itself."""

    kind: str
    _private: PrivateKey

    def __post_init__(self) -> None:
        spec = KINDS.get(self.kind)
        if spec is None:
            raise InvalidArgument(f"TEE key kind must be one of {', '.join(KINDS)}")
        if spec.curve is None:
            fits = isinstance(self._private, rsa.RSAPrivateKey) \
                and self._private.key_size >= 2048
        else:
            fits = isinstance(self._private, ec.EllipticCurvePrivateKey) \
                and isinstance(self._private.curve, _CURVES[spec.curve])
        if not fits:
            raise InvalidArgument(f"the private key is not a {self.kind} key")

    @classmethod
    def generate(cls, kind: str = "ec-p256") -> TeeKey:
        spec = KINDS.get(kind)
        if spec is None:
            raise InvalidArgument(f"TEE key kind must be one of {', '.join(KINDS)}")
        private: PrivateKey
        if spec.curve is not None:
            private = ec.generate_private_key(_CURVES[spec.curve]())
        else:
            private = rsa.generate_private_key(public_exponent=65537, key_size=RSA_BITS)
        return cls(kind, private)

    @property
    def alg(self) -> str:
        """The JWE ``alg`` this key is advertised with, and the only one it accepts."""
        return KINDS[self.kind].alg

    def public_jwk(self) -> Dict[str, str]:
        """The public key as the JWK Trustee's ``TeePubKey`` reads: fixed-length
        coordinates, the modulus at the key's full length."""
        spec = KINDS[self.kind]
        if isinstance(self._private, ec.EllipticCurvePrivateKey):
            numbers = self._private.public_key().public_numbers()
            return {"kty": "EC", "crv": str(spec.curve), "alg": spec.alg,
                    "x": b64url_encode(numbers.x.to_bytes(spec.size, "big")),
                    "y": b64url_encode(numbers.y.to_bytes(spec.size, "big"))}
        public = self._private.public_key().public_numbers()
        size = (self._private.key_size + 7) // 8
        exponent = public.e.to_bytes((public.e.bit_length() + 7) // 8, "big")
        return {"kty": "RSA", "alg": spec.alg, "n": b64url_encode(public.n.to_bytes(size, "big")),
                "e": b64url_encode(exponent)}

    def __repr__(self) -> str:
        return f"TeeKey(kind={self.kind!r})"


def _header(value: Any, what: str) -> Dict[str, Any]:
    if not isinstance(value, dict):
        raise KbsProtocolError(f"JWE {what}: not a JSON object")
    return value


def _joined_header(jwe: Mapping[str, Any], protected: Dict[str, Any]) -> Dict[str, Any]:
    """The JOSE header: the union of the three, a name in two of them an error."""
    joined = dict(protected)
    for member in ("unprotected", "header"):
        if member in jwe:
            for name, value in _header(jwe[member], member).items():
                if name in joined:
                    raise KbsProtocolError(f"JWE header: {name[:40]!r} appears twice")
                joined[name] = value
    return joined


def _epk(key: TeeKey, header: Mapping[str, Any]) -> ec.EllipticCurvePublicKey:
    spec = KINDS[key.kind]
    epk = header.get("epk")
    if not isinstance(epk, dict):
        raise KbsProtocolError("JWE header: no epk object for ECDH-ES")
    if epk.get("kty") != "EC" or epk.get("crv") != spec.curve:
        raise KbsProtocolError(f"JWE epk: not an EC key on {spec.curve}")
    x = b64url_decode(epk.get("x"), "JWE epk x")
    y = b64url_decode(epk.get("y"), "JWE epk y")
    if len(x) != spec.size or len(y) != spec.size:
        raise KbsProtocolError(f"JWE epk: coordinates are not {spec.size} bytes")
    curve = _CURVES[str(spec.curve)]()
    try:  # refuses a point not on the curve (an invalid-curve attack)
        return ec.EllipticCurvePublicNumbers(int.from_bytes(x, "big"), int.from_bytes(y, "big"),
                                             curve).public_key()
    except ValueError:
        raise KbsProtocolError("JWE epk: the point is not on the curve") from None


def _party_info(header: Mapping[str, Any], name: str) -> bytes:
    if name not in header:
        return b""
    return b64url_decode(header[name], f"JWE {name}")


def _ecdh_cek(key: TeeKey, header: Mapping[str, Any], encrypted_key: bytes) -> bytes:
    assert isinstance(key._private, ec.EllipticCurvePrivateKey)
    peer = _epk(key, header)
    shared = key._private.exchange(ec.ECDH(), peer)
    apu, apv = _party_info(header, "apu"), _party_info(header, "apv")
    alg = ECDH_ES_A256KW.encode("ascii")
    # RFC 7518 §4.6.2: AlgorithmID, PartyUInfo, PartyVInfo (each length-prefixed), then
    # SuppPubInfo = keydatalen in bits; the KDF prepends the counter and Z.
    other = b"".join(struct.pack(">I", len(part)) + part for part in (alg, apu, apv))
    other += struct.pack(">I", CEK_SIZE * 8)
    kek = ConcatKDFHash(algorithm=hashes.SHA256(), length=CEK_SIZE,
                        otherinfo=other).derive(shared)
    try:
        return aes_key_unwrap(kek, encrypted_key)
    except (InvalidUnwrap, ValueError):
        raise SecretDecryptionError("the resource does not decrypt with the TEE key") from None


def _rsa_cek(key: TeeKey, alg: str, encrypted_key: bytes) -> bytes:
    assert isinstance(key._private, rsa.RSAPrivateKey)
    if alg == RSA_OAEP_256:
        try:
            return key._private.decrypt(encrypted_key, padding.OAEP(
                mgf=padding.MGF1(algorithm=hashes.SHA256()), algorithm=hashes.SHA256(),
                label=None))
        except ValueError:
            raise SecretDecryptionError(
                "the resource does not decrypt with the TEE key") from None
    # RSA1_5: a padding failure must look like any other failure, or the answer is a
    # Bleichenbacher oracle; so a random CEK goes on and GCM's tag fails instead
    # (RFC 7516 §11.5). Newer OpenSSL does the same itself (implicit rejection).
    fallback = os.urandom(CEK_SIZE)
    try:
        cek = key._private.decrypt(encrypted_key, padding.PKCS1v15())
    except ValueError:
        return fallback
    return cek if len(cek) == CEK_SIZE else fallback


def decrypt(key: TeeKey, jwe: bytes, *, limit: int = MAX_JWE) -> bytes:
    """The plaintext of ``jwe`` (flattened JSON serialization) encrypted to ``key``."""
    if not isinstance(jwe, (bytes, bytearray)):
        raise KbsProtocolError("JWE: not bytes")
    doc = loads(bytes(jwe), "JWE", limit)
    if not isinstance(doc, dict):
        raise KbsProtocolError("JWE: not a JSON object")
    if "recipients" in doc:
        raise KbsProtocolError("JWE: the general serialization is not supported")
    for member in _REQUIRED:
        if member not in doc:
            raise KbsProtocolError(f"JWE: no {member}")
    for member in _MEMBERS:
        if member in doc and member not in ("unprotected", "header") \
                and not isinstance(doc[member], str):
            raise KbsProtocolError(f"JWE {member}: not a string")
    protected_b64: str = doc["protected"]
    protected = _header(loads(b64url_decode(protected_b64, "JWE protected"),
                              "JWE protected header", limit), "protected header")
    header = _joined_header(doc, protected)
    if "zip" in header:
        raise KbsProtocolError("JWE: compressed plaintext (zip) is refused")
    if "crit" in header:
        raise KbsProtocolError("JWE: no critical header extension is understood")
    if header.get("enc") != A256GCM:
        raise KbsProtocolError("JWE: enc must be A256GCM")
    alg = header.get("alg")
    if alg != key.alg:
        raise KbsProtocolError(f"JWE: alg must be {key.alg}, the TEE key's")
    encrypted_key = b64url_decode(doc["encrypted_key"], "JWE encrypted_key")
    iv = b64url_decode(doc["iv"], "JWE iv")
    ciphertext = b64url_decode(doc["ciphertext"], "JWE ciphertext")
    tag = b64url_decode(doc["tag"], "JWE tag")
    if len(iv) != IV_SIZE or len(tag) != TAG_SIZE:
        raise KbsProtocolError(f"JWE: A256GCM needs a {IV_SIZE}-byte iv and {TAG_SIZE}-byte tag")
    aad = protected_b64.encode("ascii")
    if "aad" in doc:
        if not is_b64url(doc["aad"]):  # used as sent, like Trustee: never decoded
            raise KbsProtocolError("JWE aad: not base64url")
        aad += b"." + doc["aad"].encode("ascii")
    if alg == ECDH_ES_A256KW:
        cek = _ecdh_cek(key, header, encrypted_key)
    else:
        cek = _rsa_cek(key, alg, encrypted_key)
    if len(cek) != CEK_SIZE:
        raise SecretDecryptionError("the resource does not decrypt with the TEE key")
    try:
        return AESGCM(cek).decrypt(iv, ciphertext + tag, aad)
    except InvalidTag:
        raise SecretDecryptionError("the resource does not decrypt with the TEE key") from None
