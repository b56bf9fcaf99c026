"""The SEV-SNP ID block, its ID authentication information and AMD's ECDSA P-384
public-key format: what ``snpctl generate id-block`` and ``generate key-digest``
produce, byte for byte what snpguest 0.10 produces through virtee/sev 7.1.0
(``measurement::idblock`` and ``idblock_types``).

The host passes both structures to SNP_LAUNCH_FINISH (SNP firmware ABI 56860); the
firmware checks the signatures and then reports SHA-384 digests of the two public
keys as ID_KEY_DIGEST and AUTHOR_KEY_DIGEST (docs/reference/abi.md §4.1). All integers are
little-endian.

ID_BLOCK, 96 bytes::

    0x00 LD (expected launch digest) 48 | 0x30 FAMILY_ID 16 | 0x40 IMAGE_ID 16
    0x50 VERSION u32 (1) | 0x54 GUEST_SVN u32 | 0x58 POLICY u64

ID_AUTH_INFO, 4096 bytes::

    0x000 ID_KEY_ALGO u32 (1) | 0x004 AUTHOR_KEY_ALGO u32 (1) | reserved
    0x040 ID_BLOCK_SIG 0x200  | 0x240 ID_KEY 0x404 | reserved
    0x680 ID_KEY_SIG 0x200    | 0x880 AUTHOR_KEY 0x404 | reserved to 0x1000

A signature (0x200) is R and S, each little-endian zero-extended to 72 bytes, then
zeros. A public key (0x404) is CURVE u32 (2 = P-384), QX and QY little-endian in
72 bytes each, then zeros. ID_BLOCK_SIG is the ID key's ECDSA P-384/SHA-384
signature over the 96 ID-block bytes; ID_KEY_SIG is the author key's over the 0x404
ID_KEY bytes.

Everything here is a function of its arguments: no files, no clock. Only the ECDSA
signatures vary from run to run (random nonces, as in sev's signer and the firmware).
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import hashlib
import struct

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

from snpd.errors import InvalidArgument

ID_BLOCK_SIZE = 96
ID_AUTH_INFO_SIZE = 0x1000
SIGNATURE_SIZE = 0x200
PUBLIC_KEY_SIZE = 0x404
LAUNCH_DIGEST_SIZE = 48
ID_SIZE = 16
POINT_SIZE = 72  # R, S, QX and QY fields: 576 bits, room for P-521

ID_BLOCK_VERSION = 1
DEFAULT_POLICY = 0x30000  # SMT allowed, reserved bit 17 set, ABI 0.0: sev's default
ALGO_ECDSA_P384_SHA384 = 1
CURVE_P384 = 2

_ID_BLOCK = struct.Struct("<48s16s16sIIQ")
_ID_AUTH = struct.Struct("<II56s512s1028s60s512s1028s892s")
assert _ID_BLOCK.size == ID_BLOCK_SIZE and _ID_AUTH.size == ID_AUTH_INFO_SIZE
_HEX = frozenset("0123456789abcdefABCDEF")
_B64 = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/=")


class IdBlockInputError(InvalidArgument):
    """An ID-block input (launch digest, ID, key, field value) is malformed (exit 2)."""


def _uint(name: str, value: int, bits: int) -> None:
    if not 0 <= value < 1 << bits:
        raise IdBlockInputError(f"{name} {value} does not fit in {bits} bits")


@dataclasses.dataclass(frozen=True)
class IdBlock:
    """The 96-byte ID block. Defaults are sev's: zero IDs and SVN, version 1,
    policy 0x30000."""

    launch_digest: bytes
    family_id: bytes = bytes(ID_SIZE)
    image_id: bytes = bytes(ID_SIZE)
    version: int = ID_BLOCK_VERSION
    guest_svn: int = 0
    policy: int = DEFAULT_POLICY

    def __post_init__(self) -> None:
        for name, value, size in (("launch digest", self.launch_digest, LAUNCH_DIGEST_SIZE),
                                  ("family ID", self.family_id, ID_SIZE),
                                  ("image ID", self.image_id, ID_SIZE)):
            if len(value) != size:
                raise IdBlockInputError(f"the {name} is {len(value)} bytes; it must be {size}")
        _uint("ID block version", self.version, 32)
        _uint("guest SVN", self.guest_svn, 32)
        _uint("policy", self.policy, 64)

    def to_bytes(self) -> bytes:
        return _ID_BLOCK.pack(self.launch_digest, self.family_id, self.image_id,
                              self.version, self.guest_svn, self.policy)


@dataclasses.dataclass(frozen=True)
class IdAuthInfo:
    """ID_AUTH_INFO: the two signatures and the two public keys, in AMD's formats."""

    id_block_sig: bytes
    id_key: bytes
    id_key_sig: bytes
    author_key: bytes
    id_key_algo: int = ALGO_ECDSA_P384_SHA384
    author_key_algo: int = ALGO_ECDSA_P384_SHA384

    def __post_init__(self) -> None:
        for name, value, size in (("ID block signature", self.id_block_sig, SIGNATURE_SIZE),
                                  ("ID key", self.id_key, PUBLIC_KEY_SIZE),
                                  ("ID key signature", self.id_key_sig, SIGNATURE_SIZE),
                                  ("author key", self.author_key, PUBLIC_KEY_SIZE)):
            if len(value) != size:
                raise IdBlockInputError(f"the {name} is {len(value)} bytes; it must be {size}")

    def to_bytes(self) -> bytes:
        return _ID_AUTH.pack(self.id_key_algo, self.author_key_algo, bytes(56),
                             self.id_block_sig, self.id_key, bytes(60), self.id_key_sig,
                             self.author_key, bytes(892))


@dataclasses.dataclass(frozen=True)
class IdMeasurements:
    """What ``generate id-block`` computes (sev's ``IdMeasurements``)."""

    id_block: IdBlock
    id_auth: IdAuthInfo
    id_key_digest: bytes
    author_key_digest: bytes


# -- keys and signatures ---------------------------------------------------------------


def load_private_key(data: bytes, what: str) -> ec.EllipticCurvePrivateKey:
    """An EC P-384 private key from PEM (PKCS#8 or SEC1 "EC PRIVATE KEY") or DER.

    sev reads PEM when the file starts with a BEGIN line and SEC1 DER otherwise;
    this also takes PKCS#8 DER. Encrypted keys are refused: sev would have OpenSSL
    prompt for the passphrase on the terminal, which a pure function cannot.
    """
    if b"ENCRYPTED" in data and b"-----BEGIN" in data:
        raise IdBlockInputError(f"{what} is encrypted; decrypt it first "
                                "(openssl pkey -in KEY -out PLAIN.pem)")
    loader = (serialization.load_pem_private_key if b"-----BEGIN" in data
              else serialization.load_der_private_key)
    try:
        key = loader(data, None)
    except TypeError:  # "Password was not given but private key is encrypted"
        raise IdBlockInputError(f"{what} is encrypted; decrypt it first "
                                "(openssl pkey -in KEY -out PLAIN.pem)") from None
    except (ValueError, UnsupportedAlgorithm):
        raise IdBlockInputError(f"{what} is not a PEM or DER private key") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise IdBlockInputError(f"{what} is not an EC key; ID and author keys are "
                                "EC P-384 (openssl genpkey -algorithm EC -pkeyopt "
                                "ec_paramgen_curve:P-384)")
    if not isinstance(key.curve, ec.SECP384R1):
        raise IdBlockInputError(f"{what} is an EC key on {key.curve.name}; ID and author "
                                "keys must be on P-384 (secp384r1)")
    return key


def sev_public_key(key: ec.EllipticCurvePublicKey) -> bytes:
    """The 0x404-byte SEV ECDSA public key: curve 2, QX and QY little-endian."""
    if not isinstance(key.curve, ec.SECP384R1):
        raise IdBlockInputError(f"an SEV ECDSA key is on P-384, not {key.curve.name}")
    numbers = key.public_numbers()
    body = (struct.pack("<I", CURVE_P384) + numbers.x.to_bytes(POINT_SIZE, "little")
            + numbers.y.to_bytes(POINT_SIZE, "little"))
    return body + bytes(PUBLIC_KEY_SIZE - len(body))


def key_digest(key: ec.EllipticCurvePublicKey) -> bytes:
    """SHA-384 of the 0x404-byte public key: the report's ID_KEY_DIGEST or
    AUTHOR_KEY_DIGEST for this key."""
    return hashlib.sha384(sev_public_key(key)).digest()


def sev_signature(key: ec.EllipticCurvePrivateKey, data: bytes) -> bytes:
    """ECDSA P-384/SHA-384 over ``data`` in the 0x200-byte SEV layout (R, S
    little-endian in 72 bytes each, then zeros), as the firmware verifies it."""
    r, s = decode_dss_signature(key.sign(data, ec.ECDSA(hashes.SHA384())))
    body = r.to_bytes(POINT_SIZE, "little") + s.to_bytes(POINT_SIZE, "little")
    return body + bytes(SIGNATURE_SIZE - len(body))


def generate(id_block: IdBlock, id_key: ec.EllipticCurvePrivateKey,
             author_key: ec.EllipticCurvePrivateKey) -> IdMeasurements:
    """Sign ``id_block`` with the ID key and the ID key with the author key (sev's
    ``snp_calculate_id``)."""
    id_public = sev_public_key(id_key.public_key())
    author_public = sev_public_key(author_key.public_key())
    auth = IdAuthInfo(id_block_sig=sev_signature(id_key, id_block.to_bytes()),
                      id_key=id_public,
                      id_key_sig=sev_signature(author_key, id_public),
                      author_key=author_public)
    return IdMeasurements(id_block=id_block, id_auth=auth,
                          id_key_digest=hashlib.sha384(id_public).digest(),
                          author_key_digest=hashlib.sha384(author_public).digest())


# -- the text forms snpguest takes -----------------------------------------------------


def parse_launch_digest(text: str) -> bytes:
    """The 48-byte launch digest as snpguest takes it: ``0x`` and hex (that exact,
    lower-case prefix), else standard base64 of the 48 bytes."""
    if text.startswith("0x"):
        digits = text[2:]
        if len(digits) % 2 or not set(digits) <= _HEX:
            raise IdBlockInputError(f"launch digest {text!r}: after 0x, give "
                                    f"{2 * LAUNCH_DIGEST_SIZE} hex digits")
        raw = bytes.fromhex(digits)
    elif text.startswith("0X"):
        raise IdBlockInputError(f"launch digest {text!r}: hex takes a lower-case 0x "
                                "(snpguest reads 0X… as base64)")
    else:
        if not text or not set(text) <= _B64:
            raise IdBlockInputError(f"launch digest {text!r} is neither 0x-prefixed hex nor "
                                    "base64")
        try:
            raw = base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError):
            raise IdBlockInputError(f"launch digest {text!r} is not valid base64") from None
    if len(raw) != LAUNCH_DIGEST_SIZE:
        hint = ""
        if len(raw) == 2 * LAUNCH_DIGEST_SIZE and set(raw.decode("latin-1")) <= _HEX:
            hint = (" (this is base64 of hex text, as 'generate measurement -f base64' "
                    "prints it; give the hex form, 0x…)")
        raise IdBlockInputError(f"the launch digest is {len(raw)} bytes; it must be "
                                f"{LAUNCH_DIGEST_SIZE}{hint}")
    return raw


def parse_id(text: str, what: str) -> bytes:
    """A 16-byte family or image ID given as 32 hex digits (snpguest after 19fc1af,
    which fixed taking the 16 characters' ASCII bytes)."""
    if len(text.encode()) != 2 * ID_SIZE:
        raise IdBlockInputError(f"{what} {text!r} must be {2 * ID_SIZE} hex digits "
                                f"({ID_SIZE} bytes); it has {len(text)} characters")
    if not set(text) <= _HEX:
        raise IdBlockInputError(f"{what} {text!r} is not hex")
    return bytes.fromhex(text)

