"""The TEE key and JWE decryption against an independent JOSE library (jwcrypto, test
only) and against the layout Trustee's KBS writes (kbs/src/jwe: ``epk`` in the
protected header), built here from cryptography primitives and hashlib.

Every failure must be a typed error: KbsProtocolError for a malformed JWE,
SecretDecryptionError (a KbsProtocolError) for one that does not decrypt.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import struct
from typing import Any, Callable, Dict

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.keywrap import aes_key_wrap
from hypothesis import given, settings
from hypothesis import strategies as st
from jwcrypto import jwe as jwcrypto_jwe
from jwcrypto import jwk as jwcrypto_jwk

from snpd.errors import InvalidArgument, KbsProtocolError, SecretDecryptionError
from snpd.kbs.jwe import KINDS, TeeKey, decrypt

PLAINTEXT = b"disk key \x00\xff for the fleet"
EC_KINDS = ["ec-p256", "ec-p521"]
ALL_KINDS = [*EC_KINDS, "rsa", "rsa1_5"]
_KEYS: Dict[str, TeeKey] = {}


def _key(kind: str) -> TeeKey:
    """One key per kind for the module: RSA 3072 takes a second to make."""
    if kind not in _KEYS:
        _KEYS[kind] = TeeKey.generate(kind)
    return _KEYS[kind]


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _jwcrypto(key: TeeKey, plaintext: bytes = PLAINTEXT) -> Dict[str, Any]:
    """jwcrypto's flattened JSON serialization, unmodified: for ECDH-ES it puts epk in
    the per-recipient ``header``."""
    token = jwcrypto_jwe.JWE(plaintext, protected=json.dumps({"alg": key.alg,
                                                              "enc": "A256GCM"}))
    token.allowed_algs = [key.alg, "A256GCM"]  # RSA1_5 is off by default
    token.add_recipient(jwcrypto_jwk.JWK(**key.public_jwk()))
    doc: Dict[str, Any] = json.loads(token.serialize())
    return doc


def _jwcrypto_compact_as_flattened(key: TeeKey) -> Dict[str, Any]:
    """jwcrypto's compact serialization, whose one protected header holds epk, laid out
    as flattened JSON part by part (nothing re-encoded)."""
    token = jwcrypto_jwe.JWE(PLAINTEXT, protected=json.dumps({"alg": key.alg,
                                                              "enc": "A256GCM"}))
    token.allowed_algs = [key.alg, "A256GCM"]
    token.add_recipient(jwcrypto_jwk.JWK(**key.public_jwk()))
    protected, encrypted_key, iv, ciphertext, tag = token.serialize(compact=True).split(".")
    return {"protected": protected, "encrypted_key": encrypted_key, "iv": iv,
            "ciphertext": ciphertext, "tag": tag}


def _concat_kdf(z: bytes, alg: str) -> bytes:
    """RFC 7518 §4.6.2 for one SHA-256 block, as Trustee's concat_kdf writes it."""
    name = alg.encode()
    other = struct.pack(">I", len(name)) + name + struct.pack(">II", 0, 0) \
        + struct.pack(">I", 256)
    return hashlib.sha256(struct.pack(">I", 1) + z + other).digest()


def _trustee(key: TeeKey, plaintext: bytes = PLAINTEXT) -> Dict[str, Any]:
    """A resource as Trustee's KBS writes it for an EC key: epk in the protected header
    (serde_json order: alg, enc, then epk with its keys sorted), aad absent."""
    jwk = key.public_jwk()
    curve = {"P-256": ec.SECP256R1(), "P-521": ec.SECP521R1()}[jwk["crv"]]
    size = {"P-256": 32, "P-521": 66}[jwk["crv"]]
    ours = ec.EllipticCurvePublicNumbers(int.from_bytes(_unb64(jwk["x"]), "big"),
                                         int.from_bytes(_unb64(jwk["y"]), "big"),
                                         curve).public_key()
    ephemeral = ec.generate_private_key(curve)
    kek = _concat_kdf(ephemeral.exchange(ec.ECDH(), ours), "ECDH-ES+A256KW")
    cek = os.urandom(32)
    numbers = ephemeral.public_key().public_numbers()
    header = {"alg": "ECDH-ES+A256KW", "enc": "A256GCM",
              "epk": {"crv": jwk["crv"], "kty": "EC", "x": _b64(numbers.x.to_bytes(size, "big")),
                      "y": _b64(numbers.y.to_bytes(size, "big"))}}
    protected = _b64(json.dumps(header, separators=(",", ":")).encode())
    iv = os.urandom(12)
    sealed = AESGCM(cek).encrypt(iv, plaintext, protected.encode())
    return {"protected": protected, "encrypted_key": _b64(aes_key_wrap(kek, cek)),
            "iv": _b64(iv), "ciphertext": _b64(sealed[:-16]), "tag": _b64(sealed[-16:])}


def _trustee_rsa(key: TeeKey, plaintext: bytes = PLAINTEXT) -> Dict[str, Any]:
    """Trustee's RSA layout: protected {"alg","enc"} only."""
    jwk = key.public_jwk()
    public = _public_rsa(jwk)
    cek = os.urandom(32)
    if key.alg == "RSA1_5":
        wrapped = public.encrypt(cek, padding.PKCS1v15())
    else:
        wrapped = public.encrypt(cek, padding.OAEP(mgf=padding.MGF1(hashes.SHA256()),
                                                   algorithm=hashes.SHA256(), label=None))
    protected = _b64(json.dumps({"alg": key.alg, "enc": "A256GCM"},
                                separators=(",", ":")).encode())
    iv = os.urandom(12)
    sealed = AESGCM(cek).encrypt(iv, plaintext, protected.encode())
    return {"protected": protected, "encrypted_key": _b64(wrapped), "iv": _b64(iv),
            "ciphertext": _b64(sealed[:-16]), "tag": _b64(sealed[-16:])}


def _public_rsa(jwk: Dict[str, str]) -> Any:
    from cryptography.hazmat.primitives.asymmetric import rsa

    return rsa.RSAPublicNumbers(int.from_bytes(_unb64(jwk["e"]), "big"),
                                int.from_bytes(_unb64(jwk["n"]), "big")).public_key()


def _make(kind: str) -> Dict[str, Any]:
    key = _key(kind)
    return _trustee(key) if kind in EC_KINDS else _trustee_rsa(key)


def _bytes(doc: Dict[str, Any]) -> bytes:
    return json.dumps(doc).encode()


# -- the key -----------------------------------------------------------------------------------


@pytest.mark.parametrize(("kind", "fields"), [
    ("ec-p256", {"kty": "EC", "crv": "P-256", "alg": "ECDH-ES+A256KW"}),
    ("ec-p521", {"kty": "EC", "crv": "P-521", "alg": "ECDH-ES+A256KW"}),
    ("rsa", {"kty": "RSA", "alg": "RSA-OAEP-256", "e": "AQAB"}),
    ("rsa1_5", {"kty": "RSA", "alg": "RSA1_5", "e": "AQAB"}),
])
def test_public_jwk(kind: str, fields: Dict[str, str]) -> None:
    key = _key(kind)
    jwk = key.public_jwk()
    assert {k: jwk[k] for k in fields} == fields
    assert all(isinstance(v, str) and "=" not in v for v in jwk.values())
    if jwk["kty"] == "EC":
        assert set(jwk) == {"kty", "crv", "alg", "x", "y"}
        size = 32 if kind == "ec-p256" else 66
        assert len(_unb64(jwk["x"])) == len(_unb64(jwk["y"])) == size
    else:
        assert set(jwk) == {"kty", "alg", "n", "e"}
        assert len(_unb64(jwk["n"])) == 384 and _unb64(jwk["n"])[0] & 0x80
    # an independent library reads it, and it is the public half only
    imported = jwcrypto_jwk.JWK(**jwk)
    assert not imported.has_private
    assert key.public_jwk() == jwk  # stable


def test_coordinates_keep_their_leading_zeros() -> None:
    """x or y below 2**(8*(size-1)) must still be written at full length: one key in
    256 has such a coordinate, so look among fresh keys until one does."""
    for _ in range(2000):
        key = TeeKey.generate("ec-p256")
        jwk = key.public_jwk()
        x, y = _unb64(jwk["x"]), _unb64(jwk["y"])
        if x[0] == 0 or y[0] == 0:
            assert len(x) == len(y) == 32
            assert decrypt(key, _bytes(_trustee(key))) == PLAINTEXT
            return
    pytest.fail("no coordinate with a leading zero byte in 2000 keys")


def test_key_material_never_shows() -> None:
    key = _key("rsa")
    assert repr(key) == str(key) == "TeeKey(kind='rsa')"
    assert TeeKey.generate("ec-p256") != TeeKey.generate("ec-p256")
    assert key == key


@pytest.mark.parametrize("kind", ["", "ec-p384", "RSA", "rsa-2048"])
def test_unknown_kind(kind: str) -> None:
    with pytest.raises(InvalidArgument, match="kind must be one of"):
        TeeKey.generate(kind)


def test_the_key_must_fit_its_kind() -> None:
    with pytest.raises(InvalidArgument, match="not a ec-p521 key"):
        TeeKey("ec-p521", _key("ec-p256")._private)
    with pytest.raises(InvalidArgument, match="not a rsa key"):
        TeeKey("rsa", _key("ec-p256")._private)


# -- decryption --------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ALL_KINDS)
def test_jwcrypto_flattened_unmodified(kind: str) -> None:
    doc = _jwcrypto(_key(kind))
    if kind in EC_KINDS:  # the case Trustee differs on: epk per recipient
        assert "epk" in doc["header"]
        assert "epk" not in json.loads(_unb64(doc["protected"]))
    assert decrypt(_key(kind), _bytes(doc)) == PLAINTEXT


@pytest.mark.parametrize("kind", ALL_KINDS)
def test_jwcrypto_compact_with_epk_protected(kind: str) -> None:
    doc = _jwcrypto_compact_as_flattened(_key(kind))
    if kind in EC_KINDS:
        assert "epk" in json.loads(_unb64(doc["protected"]))
    assert decrypt(_key(kind), _bytes(doc)) == PLAINTEXT


@pytest.mark.parametrize("kind", ALL_KINDS)
def test_trustee_layout(kind: str) -> None:
    doc = _make(kind)
    assert set(doc) == {"protected", "encrypted_key", "iv", "ciphertext", "tag"}
    assert decrypt(_key(kind), _bytes(doc)) == PLAINTEXT


def test_our_decryption_is_checked_against_jwcrypto_on_trustee_layout() -> None:
    """The hand-built Trustee layout is itself a valid JWE: jwcrypto decrypts it."""
    key = TeeKey.generate("ec-p256")
    private = jwcrypto_jwk.JWK.from_pyca(key._private)
    token = jwcrypto_jwe.JWE()
    token.deserialize(json.dumps(_trustee(key)), key=private)
    assert token.payload == PLAINTEXT


def test_empty_and_large_plaintexts() -> None:
    key = _key("ec-p256")
    assert decrypt(key, _bytes(_trustee(key, b""))) == b""
    big = os.urandom(600_000)
    assert decrypt(key, _bytes(_trustee(key, big))) == big


def test_aad_member_is_authenticated() -> None:
    """RFC 7516: with an aad member the GCM AAD is protected || '.' || aad."""
    key = _key("ec-p256")
    token = jwcrypto_jwe.JWE(PLAINTEXT, protected=json.dumps({"alg": key.alg,
                                                              "enc": "A256GCM"}), aad=b"ctx")
    token.add_recipient(jwcrypto_jwk.JWK(**key.public_jwk()))
    doc = json.loads(token.serialize())
    assert doc["aad"] == _b64(b"ctx")
    assert decrypt(key, _bytes(doc)) == PLAINTEXT
    with pytest.raises(SecretDecryptionError):
        decrypt(key, _bytes({**doc, "aad": _b64(b"cty")}))
    with pytest.raises(SecretDecryptionError):
        decrypt(key, _bytes({k: v for k, v in doc.items() if k != "aad"}))
    with pytest.raises(KbsProtocolError, match="aad"):
        decrypt(key, _bytes({**doc, "aad": "not base64!"}))


def _flip(text: str, at: int = -1) -> str:
    raw = bytearray(_unb64(text))
    raw[at] ^= 0x01
    return _b64(bytes(raw))


@pytest.mark.parametrize("kind", ALL_KINDS)
@pytest.mark.parametrize("member", ["ciphertext", "tag", "encrypted_key", "iv"])
def test_tampering_fails_as_decryption(kind: str, member: str) -> None:
    doc = _make(kind)
    doc[member] = _flip(doc[member], 0)
    with pytest.raises(SecretDecryptionError, match="does not decrypt with the TEE key"):
        decrypt(_key(kind), _bytes(doc))


@pytest.mark.parametrize("kind", ALL_KINDS)
def test_a_changed_protected_header_fails_as_decryption(kind: str) -> None:
    doc = _make(kind)
    header = json.loads(_unb64(doc["protected"]))
    header["kid"] = "x"  # same alg/enc/epk: only the AAD differs
    doc["protected"] = _b64(json.dumps(header).encode())
    with pytest.raises(SecretDecryptionError):
        decrypt(_key(kind), _bytes(doc))


@pytest.mark.parametrize("kind", ALL_KINDS)
def test_wrong_key(kind: str) -> None:
    other = TeeKey.generate(kind) if kind in EC_KINDS else TeeKey(kind, _key(
        "rsa1_5" if kind == "rsa" else "rsa")._private)
    with pytest.raises(SecretDecryptionError):
        decrypt(other, _bytes(_make(kind)))


def test_rsa1_5_padding_failure_looks_like_a_tag_failure() -> None:
    """RSA1_5 with an encrypted_key that is not PKCS#1 v1.5 at all: the same error, the
    same message, as a tag failure (no padding oracle)."""
    key = _key("rsa1_5")
    doc = _make("rsa1_5")
    messages = set()
    for encrypted_key in (_b64(bytes(384)), _b64(os.urandom(384)), _b64(b"\x01"),
                          _flip(doc["encrypted_key"], 200)):
        with pytest.raises(SecretDecryptionError) as info:
            decrypt(key, _bytes({**doc, "encrypted_key": encrypted_key}))
        messages.add(str(info.value))
    with pytest.raises(SecretDecryptionError) as info:
        decrypt(key, _bytes({**doc, "tag": _flip(doc["tag"])}))
    messages.add(str(info.value))
    assert len(messages) == 1


@pytest.mark.parametrize(("kind", "alg"), [
    ("ec-p256", "RSA-OAEP-256"), ("rsa", "ECDH-ES+A256KW"), ("rsa", "RSA1_5"),
    ("rsa1_5", "RSA-OAEP-256"), ("ec-p256", "ECDH-ES"), ("ec-p256", "dir"),
])
def test_alg_must_be_the_keys(kind: str, alg: str) -> None:
    doc = _make(kind)
    header = json.loads(_unb64(doc["protected"]))
    doc["protected"] = _b64(json.dumps({**header, "alg": alg}).encode())
    with pytest.raises(KbsProtocolError, match="alg must be") as info:
        decrypt(_key(kind), _bytes(doc))
    assert not isinstance(info.value, SecretDecryptionError)


def test_a_real_jwe_for_another_kind_is_refused_by_alg() -> None:
    with pytest.raises(KbsProtocolError, match="alg must be RSA-OAEP-256"):
        decrypt(_key("rsa"), _bytes(_jwcrypto(_key("rsa1_5"))))
    with pytest.raises(KbsProtocolError, match="alg must be"):
        decrypt(_key("ec-p256"), _bytes(_jwcrypto(_key("rsa"))))
    with pytest.raises(KbsProtocolError, match="epk: not an EC key on P-256"):
        decrypt(_key("ec-p256"), _bytes(_jwcrypto(_key("ec-p521"))))


def _with_header(doc: Dict[str, Any], **changes: Any) -> Dict[str, Any]:
    header = json.loads(_unb64(doc["protected"]))
    header.update(changes)
    return {**doc, "protected": _b64(json.dumps(header).encode())}


def _epk_moved(doc: Dict[str, Any], **epk: Any) -> Dict[str, Any]:
    header = json.loads(_unb64(doc["protected"]))
    return _with_header(doc, epk={**header["epk"], **epk})


def _off_curve(doc: Dict[str, Any]) -> Dict[str, Any]:
    header = json.loads(_unb64(doc["protected"]))
    y = bytearray(_unb64(header["epk"]["y"]))
    y[-1] ^= 1
    return _epk_moved(doc, y=_b64(bytes(y)))


def _without(member: str) -> Callable[[Dict[str, Any]], Any]:
    return lambda d: {k: v for k, v in d.items() if k != member}


def _without_enc(doc: Dict[str, Any]) -> Dict[str, Any]:
    header = json.loads(_unb64(doc["protected"]))
    del header["enc"]
    return {**doc, "protected": _b64(json.dumps(header).encode())}


# (what the message says, how a valid Trustee-layout JWE is broken)
MALFORMED = [
    ("no protected", _without("protected")),
    ("no encrypted_key", _without("encrypted_key")),
    ("no iv", _without("iv")),
    ("no ciphertext", _without("ciphertext")),
    ("no tag", _without("tag")),
    ("JWE iv: not a string", lambda d: {**d, "iv": 12}),
    ("JWE: not a JSON object", lambda d: [d]),
    ("general serialization", lambda d: {**d, "recipients": []}),
    ("(zip) is refused", lambda d: _with_header(d, zip="DEF")),
    ("no critical header extension", lambda d: _with_header(d, crit=["b64"], b64=False)),
    ("enc must be A256GCM", lambda d: _with_header(d, enc="A128GCM")),
    ("enc must be A256GCM", _without_enc),
    ("12-byte iv", lambda d: {**d, "iv": _b64(os.urandom(16))}),
    ("16-byte tag", lambda d: {**d, "tag": _b64(os.urandom(12))}),
    ("protected: not unpadded base64url", lambda d: {**d, "protected": d["protected"] + "="}),
    ("ciphertext: not unpadded base64url", lambda d: {**d, "ciphertext": "a+b/"}),
    # a 16-byte tag leaves 4 spare bits in its last character: "B" sets one
    ("tag: not canonical base64url", lambda d: {**d, "tag": d["tag"][:-1] + "B"}),
    ("protected header: not a JSON object", lambda d: {**d, "protected": _b64(b"[1]")}),
    ("protected header is not JSON", lambda d: {**d, "protected": _b64(b"{")}),
    ("'enc' appears twice", lambda d: {**d, "header": {"enc": "A256GCM"}}),
    ("header: not a JSON object", lambda d: {**d, "header": "x"}),
    ("epk: not an EC key on P-256", lambda d: _epk_moved(d, crv="P-521")),
    ("epk x: not unpadded base64url", lambda d: _epk_moved(d, x=None)),
    ("coordinates are not 32 bytes", lambda d: _epk_moved(d, x=_b64(bytes(31)))),
    ("not on the curve", _off_curve),
    ("no epk", lambda d: {**d, "protected": _b64(json.dumps(
        {"alg": "ECDH-ES+A256KW", "enc": "A256GCM"}).encode())}),
    ("apu: not unpadded base64url", lambda d: _with_header(d, apu="!")),
]


@pytest.mark.parametrize(("message", "breaks"), MALFORMED, ids=[m for m, _ in MALFORMED])
def test_malformed_jwe(message: str, breaks: Callable[[Dict[str, Any]], Any]) -> None:
    bad = breaks(_trustee(_key("ec-p256")))
    with pytest.raises(KbsProtocolError, match=re.escape(message)) as info:
        decrypt(_key("ec-p256"), json.dumps(bad).encode())
    assert not isinstance(info.value, SecretDecryptionError)


def test_epk_in_both_headers_is_a_duplicate() -> None:
    doc = _trustee(_key("ec-p256"))
    epk = json.loads(_unb64(doc["protected"]))["epk"]
    with pytest.raises(KbsProtocolError, match="'epk' appears twice"):
        decrypt(_key("ec-p256"), _bytes({**doc, "header": {"epk": epk}}))
    with pytest.raises(KbsProtocolError, match="appears twice"):
        decrypt(_key("ec-p256"), _bytes({**doc, "unprotected": {"alg": "x"}}))


def test_apu_apv_enter_the_kdf() -> None:
    """jwcrypto writes apu/apv into the KDF when given; so must we."""
    key = _key("ec-p256")
    token = jwcrypto_jwe.JWE(PLAINTEXT, protected=json.dumps(
        {"alg": key.alg, "enc": "A256GCM", "apu": _b64(b"kbs"), "apv": _b64(b"tee")}))
    token.add_recipient(jwcrypto_jwk.JWK(**key.public_jwk()))
    doc = json.loads(token.serialize())
    assert decrypt(key, _bytes(doc)) == PLAINTEXT


def test_size_bound() -> None:
    key = _key("ec-p256")
    doc = _bytes(_trustee(key))
    with pytest.raises(KbsProtocolError, match="at most"):
        decrypt(key, doc + b" " * (1 << 20))
    with pytest.raises(KbsProtocolError, match="at most 100"):
        decrypt(key, doc, limit=100)


@pytest.mark.parametrize("data", [b"", b"null", b"{", b"\xff\xfe", b'{"a":1,"a":2}',
                                  b'{"protected": NaN}', b"[" * 100_000])
def test_garbage(data: bytes) -> None:
    with pytest.raises(KbsProtocolError):
        decrypt(_key("ec-p256"), data)


def test_not_bytes() -> None:
    with pytest.raises(KbsProtocolError, match="not bytes"):
        decrypt(_key("ec-p256"), json.dumps(_trustee(_key("ec-p256"))))  # type: ignore[arg-type]


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=2000))
def test_fuzz_bytes_only_typed_errors(data: bytes) -> None:
    try:
        decrypt(_key("ec-p256"), data)
    except KbsProtocolError:
        return
    pytest.fail("random bytes decrypted")


_VALUES = st.one_of(st.text(max_size=60), st.text("ABCDEFabcdef0123456789-_", max_size=60),
                    st.integers(), st.none(), st.booleans(),
                    st.dictionaries(st.text(max_size=5), st.text(max_size=10), max_size=3))


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(["ec-p256", "rsa1_5"]),
       st.dictionaries(st.sampled_from(["protected", "encrypted_key", "iv", "ciphertext", "tag",
                                        "aad", "header", "unprotected", "recipients"]),
                       _VALUES, min_size=1, max_size=3),
       st.dictionaries(st.sampled_from(["alg", "enc", "epk", "zip", "crit", "apu", "apv"]),
                       _VALUES, max_size=3))
def test_fuzz_structured_only_typed_errors(kind: str, members: Dict[str, Any],
                                           header: Dict[str, Any]) -> None:
    """A valid JWE with members and header fields replaced by arbitrary values."""
    doc = {**_make(kind), **members}
    if header and isinstance(doc.get("protected"), str):
        try:
            protected = json.loads(_unb64(doc["protected"]))
        except ValueError:
            protected = {}
        if isinstance(protected, dict):
            doc["protected"] = _b64(json.dumps({**protected, **header}).encode())
    try:
        plaintext = decrypt(_key(kind), _bytes(doc))
    except KbsProtocolError:
        return
    assert plaintext == PLAINTEXT  # only a change that leaves the JWE valid can succeed


def test_kinds_cover_every_trustee_alg() -> None:
    assert {spec.alg for spec in KINDS.values()} == {"ECDH-ES+A256KW", "RSA-OAEP-256", "RSA1_5"}
    assert TeeKey.generate().kind == "ec-p256"
