"""KBS protocol messages: the bodies snpd sends, strict parsing of what the KBS
answers, and the evidence binding (Trustee's vector and a hand-written one)."""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from snpd.errors import InvalidArgument, KbsError, KbsProtocolError
from snpd.kbs import protocol
from snpd.kbs.protocol import (
    Challenge,
    ErrorInformation,
    attestation_body,
    binding,
    parse_challenge,
    parse_error,
    parse_token,
    report_data,
    request_body,
    resource_path,
    runtime_data,
    token_expiry,
)

NONCE = "q3NXbc7mnh6Q0mwyAHbE7zgPYvJ/1b+IqCO6dB4ifKg="
JWK = {"kty": "EC", "crv": "P-256", "alg": "ECDH-ES+A256KW",
       "x": "9DaxYEFPqH2zA6qFQN0Wk3QQWe0LBpJ1Xg3GNmFJ3Aw",
       "y": "XJvqfXS6tNfw3mPzI8jFtTAdbhZBTG9rk2ipV4qxEZU"}


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _jwt(claims: Any) -> str:
    head = _b64url(b'{"alg":"ES256","typ":"JWT"}')
    return f"{head}.{_b64url(json.dumps(claims).encode())}.{_b64url(b'sig')}"


def test_request_body() -> None:
    assert json.loads(request_body("snp")) == {"version": "0.4.0", "tee": "snp",
                                               "extra-params": ""}
    assert json.loads(request_body("az-snp-vtpm"))["tee"] == "az-snp-vtpm"
    assert protocol.PROTOCOL_VERSION == "0.4.0"
    for bad in ("", "SNP", "snp\n", "x" * 40, 1):
        with pytest.raises(InvalidArgument):
            request_body(bad)  # type: ignore[arg-type]


def test_parse_challenge() -> None:
    body = json.dumps({"nonce": NONCE, "extra-params": ""}).encode()
    assert parse_challenge(body) == Challenge(nonce=NONCE, extra_params="")
    assert parse_challenge(b'{"nonce": "abc", "extra-params": {}}').extra_params == {}
    assert parse_challenge(b'{"nonce": "abc"}') == Challenge("abc", "")


@pytest.mark.parametrize(("body", "match"), [
    (b"", "not JSON"), (b"[]", "not a JSON object"), (b"{}", "no nonce"),
    (b'{"nonce": 1}', "int, not a string"), (b'{"nonce": ""}', "nonce must be"),
    (b'{"nonce": "a b"}', "nonce must be"), (b'{"nonce": "\\u0000"}', "nonce must be"),
    (json.dumps({"nonce": "a" * 1025}).encode(), "nonce must be"),
    (b'{"nonce": "a", "nonce": "b"}', "twice"), (b'{"nonce": NaN}', "NaN"),
    (b"\xff", "not UTF-8"), (b'{"nonce": "' + b"a" * 20000 + b'"}', "at most"),
])
def test_parse_challenge_is_strict(body: bytes, match: str) -> None:
    with pytest.raises(KbsProtocolError, match=match):
        parse_challenge(body)


def test_binding_matches_trustee_and_a_hand_written_canonical_form() -> None:
    # The same object Trustee's attestation service hashes (kbs/src/attestation/backend.rs)
    canonical = ('{"additional-evidence":"","nonce":"' + NONCE + '","tee-pubkey":{'
                 '"alg":"ECDH-ES+A256KW","crv":"P-256","kty":"EC",'
                 '"x":"9DaxYEFPqH2zA6qFQN0Wk3QQWe0LBpJ1Xg3GNmFJ3Aw",'
                 '"y":"XJvqfXS6tNfw3mPzI8jFtTAdbhZBTG9rk2ipV4qxEZU"}}')
    digest = binding(NONCE, JWK)
    assert digest == hashlib.sha384(canonical.encode()).digest()
    assert len(digest) == 48
    assert report_data(digest) == digest + bytes(16)
    # additional evidence is hashed as the string it is
    extra = '{"tpm":{}}'
    assert binding(NONCE, JWK, extra) == hashlib.sha384(
        canonical.replace('"additional-evidence":""',
                          '"additional-evidence":"{\\"tpm\\":{}}"').encode()).digest()
    # the binding changes with each of its inputs
    assert binding("b" + NONCE[1:], JWK) != digest
    assert binding(NONCE, {**JWK, "x": JWK["y"]}) != digest


def test_binding_of_an_rsa_key() -> None:
    jwk = {"kty": "RSA", "alg": "RSA-OAEP-256", "n": "sXch", "e": "AQAB"}
    canonical = ('{"additional-evidence":"","nonce":"abc","tee-pubkey":'
                 '{"alg":"RSA-OAEP-256","e":"AQAB","kty":"RSA","n":"sXch"}}')
    assert binding("abc", jwk) == hashlib.sha384(canonical.encode()).digest()


def test_report_data_bounds() -> None:
    assert report_data(b"") == bytes(64)
    assert report_data(bytes(range(64))) == bytes(range(64))
    with pytest.raises(InvalidArgument):
        report_data(bytes(65))


def test_attestation_body() -> None:
    evidence = {"attestation_report": {"version": 3}, "cert_chain": None}
    body = json.loads(attestation_body(NONCE, JWK, evidence))
    assert body == {"runtime-data": {"nonce": NONCE, "tee-pubkey": JWK},
                    "tee-evidence": {"primary_evidence": evidence, "additional_evidence": ""}}
    assert runtime_data(NONCE, JWK) == body["runtime-data"]
    init = {"format": "toml", "body": "algorithm = \"sha384\""}
    with_init = json.loads(attestation_body(NONCE, JWK, evidence, "", init))
    assert with_init["init-data"] == init
    with pytest.raises(InvalidArgument, match="serialize"):
        attestation_body(NONCE, JWK, {"x": float("nan")})
    with pytest.raises(InvalidArgument, match="serialize"):
        attestation_body(NONCE, JWK, {"x": b"bytes"})
    with pytest.raises(InvalidArgument, match="string"):
        attestation_body(NONCE, JWK, evidence, None)  # type: ignore[arg-type]


def test_parse_token_and_expiry() -> None:
    token = _jwt({"exp": 1767225600, "iss": "as"})
    assert parse_token(json.dumps({"token": token}).encode()) == token
    assert token_expiry(token) == 1767225600
    assert token_expiry(_jwt({"exp": 1767225600.7})) == 1767225600
    assert token_expiry(_jwt({"iss": "as"})) is None


@pytest.mark.parametrize("body", [
    b"{}", b'{"token": 1}', b'{"token": "a.b"}', b'{"token": "a.b.c.d"}', b'{"token": ".b.c"}',
    b'{"token": "a.b!.c"}', b"[]", b"nope",
])
def test_parse_token_is_strict(body: bytes) -> None:
    with pytest.raises(KbsProtocolError):
        parse_token(body)


@pytest.mark.parametrize("token", [
    "a.b", _jwt([1]), _jwt({"exp": "soon"}), _jwt({"exp": True}), _jwt({"exp": -1}),
    _jwt({"exp": 2**64}), "eyJ9.e.c", "x.eyJleHAiOjF9=.c", "x." + _b64url(b"\xff") + ".c",
])
def test_token_expiry_refuses_malformed(token: str) -> None:
    with pytest.raises(KbsProtocolError):
        token_expiry(token)


def test_token_errors_never_quote_the_token() -> None:
    secret = _b64url(b'{"exp": "secret-claim"}')
    with pytest.raises(KbsProtocolError) as info:
        token_expiry(f"head.{secret}.sig")
    assert "secret" not in str(info.value) and secret not in str(info.value)


def test_parse_error() -> None:
    body = json.dumps({"type": "https://github.com/confidential-containers/kbs/errors/"
                               "AttestationError", "detail": "bad\nnonce"}).encode()
    info = parse_error(body)
    assert info == ErrorInformation(
        type="https://github.com/confidential-containers/kbs/errors/AttestationError",
        detail="bad nonce")
    assert info is not None and info.name == "AttestationError"
    long = parse_error(json.dumps({"type": info.type, "detail": "x" * 5000}).encode())
    assert long is not None and long.detail == "x" * 1024 + "..."


@pytest.mark.parametrize("body", [
    b"", b"<html>502</html>", b"[]", b'{"type": "about:blank", "detail": "x"}',
    b'{"type": "https://github.com/confidential-containers/kbs/errors/", "detail": "x"}',
    b'{"type": "https://github.com/confidential-containers/kbs/errors/A/B", "detail": "x"}',
    b'{"type": "https://github.com/confidential-containers/kbs/errors/X", "detail": 1}',
    b'{"type": "https://github.com/confidential-containers/kbs/errors/X"}',
    b'{"type": "https://github.com/confidential-containers/kbs/errors/X", "detail": "'
    + b"x" * 70000 + b'"}',
])
def test_parse_error_answers_none_for_anything_else(body: bytes) -> None:
    assert parse_error(body) is None


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300) | st.text(max_size=200).map(str.encode))
def test_parsers_raise_only_typed_errors(body: bytes) -> None:
    parse_error(body)  # never raises
    for parse in (parse_challenge, parse_token):
        with contextlib.suppress(KbsProtocolError):  # anything else fails the test
            parse(body)
    with contextlib.suppress(KbsProtocolError):
        token_expiry(body.decode("utf-8", "replace"))


def test_resource_path() -> None:
    assert resource_path("default/key/disk-1") == "kbs/v0/resource/default/key/disk-1"
    assert resource_path("my_repo/cert.pem/v1.2") == "kbs/v0/resource/my_repo/cert.pem/v1.2"
    assert resource_path("-/_/x..") == "kbs/v0/resource/-/_/x.."  # Trustee accepts these


@pytest.mark.parametrize("path", [
    "", "a/b", "a/b/c/d", "a//c", "/a/b/c", "a/b/c/", "a/../c", "a/./c", "../b/c",
    ".git/b/c", "a/.b/c", "a/b/.c",
    "a/b/%2e%2e", "a/b/c?x=1", "a/b/c#f", "a/b c/d", "a\\b/c/d", "a/b/\u00e9", "a/b/c\n",
    "a/b/" + "c" * 81, "a" * 80 + "/" + "b" * 80 + "/" + "c" * 80 + "/x",
])
def test_resource_path_refuses(path: str) -> None:
    with pytest.raises(InvalidArgument, match="REPOSITORY/TYPE/TAG|at most"):
        resource_path(path)


def test_kbs_errors_travel_as_their_own_kind() -> None:
    assert KbsProtocolError.kind == "KbsError"
    assert KbsProtocolError.dbus_name() == "org.snpd.Snpd1.Error.KbsError"
    assert issubclass(KbsProtocolError, KbsError)
    assert KbsError("x", status=401).status == 401
