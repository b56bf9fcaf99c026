"""The loopback KBS (tests/harness/kbs.py) on its own, driven by plain requests and
jwcrypto, never by snpd.kbs: a harness the client is tested against must first be shown
to hold the protocol itself: the binding, the evidence (snp through the reverse of
Trustee's report JSON, az-snp-vtpm through the quote), every JWE alg, each failure.

One server per module (its keys are made once); knobs are reset after each test."""

from __future__ import annotations

import base64
import hashlib
import json
import socket
import ssl
import struct
import threading
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

import pytest
import requests
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from emuplatform import NOW, Platform  # type: ignore[import-not-found]
from harness.kbs import (  # type: ignore[import-not-found]
    ERROR_TYPE_PREFIX,
    MAX_BODY,
    KbsServer,
    binding,
    canonical_json,
    other_ca_pem,
)
from jwcrypto import jwe, jwk, jwt

from snpd.abi import hcl, tpm
from snpd.abi.report import AttestationReport
from snpd.emulator.hcl import DEFAULT_VM_CONFIGURATION, runtime_json
from snpd.errors import InvalidArgument
from snpd.evidence import az_snp_vtpm_evidence, trustee_evidence
from snpd.trust.verify import Verifier

RESOURCES = {"default/key/disk": b"\x00disk key\xff" * 4, "default/cert/tls": b"PEM..."}
ALGS = ("RSA1_5", "RSA-OAEP-256", "ECDH-ES+A256KW")


# -- fixtures -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def keys() -> Dict[str, jwk.JWK]:
    """The TEE keys, made once: EC P-256 and P-521, RSA 2048."""
    return {"P-256": jwk.JWK.generate(kty="EC", crv="P-256"),
            "P-521": jwk.JWK.generate(kty="EC", crv="P-521"),
            "RSA": jwk.JWK.generate(kty="RSA", size=2048)}


def public(key: jwk.JWK, alg: str) -> Dict[str, str]:
    doc: Dict[str, str] = key.export_public(as_dict=True)
    doc.pop("kid", None)
    doc["alg"] = alg
    return doc


class Client:
    """requests, pinned to one CA per call (a Session's ``verify`` loses to
    REQUESTS_CA_BUNDLE, so it is passed each time), with the session's cookie jar."""

    def __init__(self, server: KbsServer, ca: Optional[Path] = None) -> None:
        self.url = server.url
        self.ca = str(ca or server.ca_pem)
        self.http = requests.Session()
        self.http.trust_env = False

    def close(self) -> None:
        self.http.close()

    def post(self, path: str, doc: Any = None, *, data: Optional[bytes] = None
             ) -> requests.Response:
        return self.http.post(self.url + path, json=doc, data=data, verify=self.ca,
                              timeout=30)

    def get(self, path: str) -> requests.Response:
        return self.http.get(self.url + path, verify=self.ca, timeout=30)

    def auth(self, tee: str = "snp") -> str:
        answer = self.post("/kbs/v0/auth", {"version": "0.4.0", "tee": tee,
                                            "extra-params": ""})
        assert answer.status_code == 200, answer.text
        nonce: str = answer.json()["nonce"]
        return nonce

    def attest(self, nonce: str, tee_pubkey: Dict[str, str], evidence: Any,
               additional: str = "") -> requests.Response:
        return self.post("/kbs/v0/attest", {
            "runtime-data": {"nonce": nonce, "tee-pubkey": tee_pubkey},
            "tee-evidence": {"primary_evidence": evidence, "additional_evidence": additional}})


Connect = Callable[..., Client]


@pytest.fixture
def connect(kbs: KbsServer) -> Iterator[Connect]:
    """Clients of the module's server (``ca=`` pins another CA), closed after the test."""
    made: List[Client] = []

    def make(ca: Optional[Path] = None) -> Client:
        made.append(Client(kbs, ca))
        return made[-1]

    yield make
    for client in made:
        client.close()


def snp_evidence(platform: Platform, report_data: bytes, *, vcek: bool = True) -> Any:
    raw = platform.report(report_data=report_data.ljust(64, b"\0"))
    certs = [("vcek", platform.vcek.der)] if vcek else []
    return json.loads(trustee_evidence(AttestationReport.from_bytes(raw), platform.product,
                                       certs))


def attested(connect: Connect, platform: Platform, pub: Dict[str, str]
             ) -> Tuple[Client, str]:
    """A client whose session is attested with ``pub``; and its token."""
    client = connect()
    nonce = client.auth()
    answer = client.attest(nonce, pub, snp_evidence(platform, binding(nonce, pub)))
    assert answer.status_code == 200, answer.text
    token: str = answer.json()["token"]
    return client, token


def error_type(answer: requests.Response) -> str:
    doc = answer.json()
    assert set(doc) == {"type", "detail"}
    name: str = doc["type"]
    assert name.startswith(ERROR_TYPE_PREFIX)
    return name[len(ERROR_TYPE_PREFIX):]


def decrypt(answer: requests.Response, key: jwk.JWK) -> Tuple[bytes, Dict[str, Any]]:
    """jwcrypto's decryption of a flattened JWE; and its protected header."""
    assert answer.status_code == 200, answer.text
    doc = answer.json()
    assert "aad" not in doc and {"protected", "encrypted_key", "iv", "ciphertext",
                                 "tag"} <= set(doc)
    token = jwe.JWE()
    token.allowed_algs = [*ALGS, "A256GCM"]
    token.deserialize(answer.text, key=key)
    protected = json.loads(base64.urlsafe_b64decode(doc["protected"] + "=="))
    return bytes(token.payload), protected


# -- canonical JSON and the report's reverse ------------------------------------------

def test_jcs_vector_of_trustee() -> None:
    """Trustee's own vector (attestation-service/src/lib.rs)."""
    assert hashlib.sha384(canonical_json({"b": 1, "a": "test", "c": {"d": "e"}})).hexdigest() == (
        "e71ce8e70d814ba6639c3612ebee0ff1f76f650f8dbb5e47157e0f3f525cd22c"
        "4597480a186427c813ca941da78870c3")


def test_jcs_is_sorted_compact_json_for_strings() -> None:
    """What the binding hashes: for all-string objects, sorted compact UTF-8 JSON; RFC
    8785's escapes (controls as lower-case \\u00xx, non-ASCII literal)."""
    doc = {"z": "é\u2028", "a": {"y": "\x01\"\\\n", "b": ""}}
    assert canonical_json(doc) == '{"a":{"b":"","y":"\\u0001\\"\\\\\\n"},"z":"é\u2028"}'.encode()
    assert binding("n", {"kty": "EC"}, "") == hashlib.sha384(
        b'{"additional-evidence":"","nonce":"n","tee-pubkey":{"kty":"EC"}}').digest()
    for bad in ({"f": 1.5}, {"\U0001f600": "x"}, {"i": 1 << 60}, {"s": "\ud800"}):
        with pytest.raises(InvalidArgument):
            canonical_json(bad)


# -- the handshake --------------------------------------------------------------------

def test_auth_answers_a_nonce_and_a_cookie(kbs: KbsServer, connect: Connect) -> None:
    answer = connect().post("/kbs/v0/auth", {"version": "0.4.0", "tee": "snp",
                                               "extra-params": ""})
    assert answer.status_code == 200
    doc = answer.json()
    assert set(doc) == {"nonce", "extra-params"} and doc["extra-params"] == ""
    assert len(base64.b64decode(doc["nonce"], validate=True)) == 32
    cookie = answer.headers["Set-Cookie"]
    assert cookie.startswith("kbs-session-id=") and "Expires=" in cookie


def test_full_handshake_and_resource(kbs: KbsServer, connect: Connect, milan: Platform,
                                     keys: Dict[str, jwk.JWK]) -> None:
    before = kbs.counts()
    pub = public(keys["P-256"], "ECDH-ES+A256KW")
    client, token = attested(connect, milan, pub)
    plain, protected = decrypt(client.get("/kbs/v0/resource/default/key/disk"), keys["P-256"])
    assert plain == RESOURCES["default/key/disk"]
    assert protected == {"alg": "ECDH-ES+A256KW", "enc": "A256GCM"}
    after = kbs.counts()
    assert (after.auth - before.auth, after.attest - before.attest,
            after.resource - before.resource, after.attested - before.attested) == (1, 1, 1, 1)
    signed = jwt.JWT(jwt=token, key=kbs.token_key.public(), algs=["ES256"])
    claims = json.loads(signed.claims)
    assert claims["tee-pubkey"] == pub and claims["exp"] - claims["iat"] == 300


def test_evidence_without_a_vcek_uses_the_configured_one(kbs: KbsServer, connect: Connect,
                                                          milan: Platform,
                                                          keys: Dict[str, jwk.JWK]) -> None:
    pub = public(keys["P-256"], "ECDH-ES+A256KW")
    client = connect()
    nonce = client.auth()
    evidence = snp_evidence(milan, binding(nonce, pub), vcek=False)
    assert client.attest(nonce, pub, evidence).status_code == 401
    kbs.vcek_lookup = lambda report: milan.vcek
    try:
        assert client.attest(nonce, pub, evidence).status_code == 200
    finally:
        kbs.vcek_lookup = None


@pytest.mark.parametrize("key_name,alg", [("RSA", "RSA-OAEP-256"), ("RSA", "RSA1_5"),
                                          ("P-256", "ECDH-ES+A256KW"),
                                          ("P-521", "ECDH-ES+A256KW")])
@pytest.mark.parametrize("epk_in_protected", [False, True])
def test_each_jwe_alg_decrypts_with_jwcrypto(kbs: KbsServer, connect: Connect, milan: Platform,
                                             keys: Dict[str, jwk.JWK], key_name: str,
                                             alg: str, epk_in_protected: bool) -> None:
    """The JWK's alg picks the JWE's (RSA1_5 is forced: a legacy KBS sends it to RSA
    keys); ``epk_in_protected`` re-makes ECDH-ES the way Trustee does."""
    pub = public(keys[key_name], "RSA-OAEP-256" if alg == "RSA1_5" else alg)
    client, _ = attested(connect, milan, pub)
    kbs.jwe_alg = alg if alg == "RSA1_5" else None
    kbs.epk_in_protected = epk_in_protected
    answer = client.get("/kbs/v0/resource/default/cert/tls")
    plain, protected = decrypt(answer, keys[key_name])
    assert plain == RESOURCES["default/cert/tls"]
    assert protected["alg"] == alg and protected["enc"] == "A256GCM"
    in_protected = "epk" in protected
    in_header = "epk" in answer.json().get("header", {})
    if alg.startswith("ECDH"):
        assert (in_protected, in_header) == (epk_in_protected, not epk_in_protected)
        assert protected.get("epk", answer.json().get("header", {}).get("epk"))["crv"] == (
            key_name)
    else:
        assert not in_protected and not in_header


def test_wrong_binding_is_refused(kbs: KbsServer, connect: Connect, milan: Platform,
                                  keys: Dict[str, jwk.JWK]) -> None:
    """REPORT_DATA binds another key than the one sent: 401, and nothing attested."""
    pub = public(keys["P-256"], "ECDH-ES+A256KW")
    other = public(keys["P-521"], "ECDH-ES+A256KW")
    client = connect()
    nonce = client.auth()
    before = kbs.counts().attested
    for evidence in (snp_evidence(milan, binding(nonce, other)),
                     snp_evidence(milan, binding(nonce, pub, "{}")),
                     snp_evidence(milan, hashlib.sha384(json.dumps(
                         {"nonce": nonce, "tee-pubkey": pub}).encode()).digest())):
        answer = client.attest(nonce, pub, evidence)
        assert answer.status_code == 401 and error_type(answer) == "AttestationError"
        assert "Report Data Mismatch" in answer.json()["detail"]
    assert kbs.counts().attested == before
    assert client.get("/kbs/v0/resource/default/key/disk").status_code == 401


def test_a_forged_signature_is_refused(kbs: KbsServer, connect: Connect, milan: Platform,
                                       keys: Dict[str, jwk.JWK]) -> None:
    pub = public(keys["P-256"], "ECDH-ES+A256KW")
    client = connect()
    nonce = client.auth()
    evidence = snp_evidence(milan, binding(nonce, pub))
    evidence["attestation_report"]["measurement"][0] ^= 1
    answer = client.attest(nonce, pub, evidence)
    assert answer.status_code == 401 and "report.signature" in answer.json()["detail"]


def test_wrong_nonce(kbs: KbsServer, connect: Connect, milan: Platform,
                     keys: Dict[str, jwk.JWK]) -> None:
    pub = public(keys["P-256"], "ECDH-ES+A256KW")
    client = connect()
    nonce = client.auth()
    evidence = snp_evidence(milan, binding(nonce, pub))
    kbs.wrong_nonce = True
    answer = client.attest(nonce, pub, evidence)
    assert answer.status_code == 401 and "nonce" in answer.json()["detail"]
    kbs.wrong_nonce = False
    stale = base64.b64encode(bytes(32)).decode()
    answer = client.attest(stale, pub, snp_evidence(milan, binding(stale, pub)))
    assert answer.status_code == 401 and error_type(answer) == "AttestationError"
    assert client.attest(nonce, pub, evidence).status_code == 200


@pytest.mark.parametrize("doc", [{"version": "0.1.1", "tee": "snp", "extra-params": ""},
                                 {"version": "0.4.0", "tee": "tdx", "extra-params": ""},
                                 {"tee": "snp"}, [1]])
def test_bad_request_is_401_error_information(kbs: KbsServer, connect: Connect, doc: Any) -> None:
    answer = connect().post("/kbs/v0/auth", doc)
    assert answer.status_code == 401 and error_type(answer) == "AttestationError"
    assert "Set-Cookie" not in answer.headers


def test_reject_auth_with(kbs: KbsServer, connect: Connect) -> None:
    kbs.reject_auth_with("PolicyDeny", "not today")
    answer = connect().post("/kbs/v0/auth", {"version": "0.4.0", "tee": "snp",
                                               "extra-params": ""})
    assert answer.status_code == 401 and error_type(answer) == "PolicyDeny"
    assert answer.json()["detail"] == "not today"


def test_expired_and_unknown_cookies(kbs: KbsServer, connect: Connect, milan: Platform,
                                     keys: Dict[str, jwk.JWK]) -> None:
    pub = public(keys["P-256"], "ECDH-ES+A256KW")
    client, _ = attested(connect, milan, pub)
    assert client.get("/kbs/v0/resource/default/key/disk").status_code == 200
    kbs.expire_sessions()
    answer = client.get("/kbs/v0/resource/default/key/disk")
    assert answer.status_code == 401 and error_type(answer) == "TokenNotFound"
    answer = client.attest("x", pub, {})
    assert answer.status_code == 401 and error_type(answer) == "AttestationError"
    stranger = connect()
    stranger.http.cookies.set("kbs-session-id", "0" * 32)
    assert stranger.get("/kbs/v0/resource/default/key/disk").status_code == 401
    assert stranger.attest("x", pub, {}).status_code == 401
    assert connect().get("/kbs/v0/resource/default/key/disk").status_code == 401


def test_expired_token(kbs: KbsServer, connect: Connect, milan: Platform,
                       keys: Dict[str, jwk.JWK]) -> None:
    kbs.token_ttl = -1.0
    client, _ = attested(connect, milan, public(keys["P-256"], "ECDH-ES+A256KW"))
    answer = client.get("/kbs/v0/resource/default/key/disk")
    assert answer.status_code == 401 and error_type(answer) == "TokenNotFound"


def test_authed_but_not_attested_gets_no_resource(kbs: KbsServer, connect: Connect) -> None:
    client = connect()
    client.auth()
    assert client.get("/kbs/v0/resource/default/key/disk").status_code == 401


def test_session_ttl(kbs: KbsServer, connect: Connect, milan: Platform,
                     keys: Dict[str, jwk.JWK]) -> None:
    """A session made under a negative TTL is expired when the evidence arrives."""
    pub = public(keys["P-256"], "ECDH-ES+A256KW")
    kbs.session_ttl = -1.0
    client = connect()
    auth = client.post("/kbs/v0/auth", {"version": "0.4.0", "tee": "snp", "extra-params": ""})
    nonce = auth.json()["nonce"]
    assert not client.http.cookies  # requests drops a cookie that expired: send it anyway
    answer = client.http.post(
        kbs.url + "/kbs/v0/attest", verify=client.ca, timeout=30,
        headers={"Cookie": auth.headers["Set-Cookie"].split(";")[0]},
        json={"runtime-data": {"nonce": nonce, "tee-pubkey": pub},
              "tee-evidence": {"primary_evidence": snp_evidence(milan, binding(nonce, pub)),
                               "additional_evidence": ""}})
    assert answer.status_code == 401 and answer.json()["detail"] == "session expired"


def test_second_attest_returns_the_same_token(kbs: KbsServer, connect: Connect, milan: Platform,
                                              keys: Dict[str, jwk.JWK]) -> None:
    pub = public(keys["P-256"], "ECDH-ES+A256KW")
    client, token = attested(connect, milan, pub)
    before = kbs.counts()
    again = client.attest("anything", pub, {})
    assert again.status_code == 200 and again.json() == {"token": token}
    after = kbs.counts()
    assert after.attest == before.attest + 1 and after.attested == before.attested


def test_unknown_forbidden_and_malformed_paths(kbs: KbsServer, connect: Connect, milan: Platform,
                                               keys: Dict[str, jwk.JWK]) -> None:
    client, _ = attested(connect, milan, public(keys["P-256"], "ECDH-ES+A256KW"))
    assert client.get("/kbs/v0/resource/default/key/none").status_code == 404
    kbs.forbid("default/key/disk")
    try:
        answer = client.get("/kbs/v0/resource/default/key/disk")
        assert answer.status_code == 403 and error_type(answer) == "PolicyDeny"
    finally:
        kbs.allow("default/key/disk")
    for path in ("/kbs/v0/resource/default/key", "/kbs/v0/resource/a//b", "/kbs/v0/nope/x",
                 "/other"):
        assert client.get(path).status_code == 404
    kbs.resources["default/key/new"] = b"added at run time"
    plain, _ = decrypt(client.get("/kbs/v0/resource/default/key/new"), keys["P-256"])
    assert plain == b"added at run time"


def test_body_over_a_mebibyte_is_413(kbs: KbsServer, connect: Connect) -> None:
    client = connect()
    before = kbs.counts().auth
    assert client.post("/kbs/v0/auth", data=b" " * (MAX_BODY + 1)).status_code == 413
    assert kbs.counts().auth == before
    assert client.auth()  # the server still serves
    # A length far beyond that is refused before any of the body is sent.
    with socket.create_connection(("127.0.0.1", int(kbs.url.rsplit(":", 1)[1]))) as raw:
        context = ssl.create_default_context(cafile=str(kbs.ca_pem))
        with context.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
            tls.sendall(b"POST /kbs/v0/auth HTTP/1.1\r\nHost: x\r\nContent-Length: "
                        + str(1 << 40).encode() + b"\r\n\r\n")
            tls.settimeout(30)
            assert tls.recv(64).startswith(b"HTTP/1.1 413 ")


def test_tls_with_another_ca_fails(kbs: KbsServer, connect: Connect, tmp_path: Path) -> None:
    client = connect(ca=other_ca_pem(tmp_path / "other.pem"))
    with pytest.raises(requests.exceptions.SSLError):
        client.auth()
    assert connect().auth()


def test_certificate_names_127_0_0_1_and_localhost(kbs: KbsServer) -> None:
    port = int(kbs.url.rsplit(":", 1)[1])
    context = ssl.create_default_context(cafile=str(kbs.ca_pem))
    for name in ("127.0.0.1", "localhost"):
        with socket.create_connection(("127.0.0.1", port), timeout=30) as raw, \
                context.wrap_socket(raw, server_hostname=name) as tls:
            assert tls.version()
    with socket.create_connection(("127.0.0.1", port), timeout=30) as raw, \
            pytest.raises(ssl.SSLCertVerificationError):
        context.wrap_socket(raw, server_hostname="kbs.example")


def _in_thread(call: Callable[[], Any]) -> Tuple[threading.Thread, List[Any]]:
    out: List[Any] = []

    def run() -> None:
        try:
            out.append(call())
        except Exception as exc:  # the test inspects it
            out.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    return thread, out


def test_hang_holds_requests_until_released(kbs: KbsServer, connect: Connect) -> None:
    client = connect()
    kbs.hang.set()
    thread, out = _in_thread(client.auth)
    assert kbs.wait_hanging(1)
    assert thread.is_alive() and out == []
    kbs.hang.clear()
    thread.join(30)
    assert not thread.is_alive() and isinstance(out[0], str)


def test_hang_does_not_prevent_stop(milan: Platform, tmp_path: Path) -> None:
    server = KbsServer(tmp_path, verifier=Verifier(milan.roots, clock=lambda: NOW)).start()
    client = Client(server)
    try:
        server.hang.set()
        thread, out = _in_thread(client.auth)
        assert server.wait_hanging(1)
        server.stop()
        thread.join(30)
    finally:
        server.stop()
        client.close()
    assert not thread.is_alive()
    assert isinstance(out[0], requests.exceptions.ConnectionError)
    assert server.hang.is_set()  # stop released it without clearing the knob


# -- az-snp-vtpm ----------------------------------------------------------------------

def _quote(extra: bytes, pcrs: Tuple[bytes, ...]) -> bytes:
    """A TPMS_ATTEST quote of PCRs 0-23 (SHA-256) with ``extra`` as extraData."""
    digest = hashlib.sha256(b"".join(pcrs)).digest()
    return (struct.pack(">IH", tpm.TPM_GENERATED_VALUE, tpm.TPM_ST_ATTEST_QUOTE)
            + struct.pack(">H", 34) + b"\x00\x0b" + bytes(32)
            + struct.pack(">H", len(extra)) + extra
            + struct.pack(">QIIB", 1000, 1, 0, 1) + struct.pack(">Q", 0x2021)
            + struct.pack(">I", 1) + struct.pack(">HB", tpm.TPM_ALG_SHA256, 3) + b"\xff\xff\xff"
            + struct.pack(">H", len(digest)) + digest)


def azure_evidence(platform: Platform, ak: rsa.RSAPrivateKey, extra: bytes) -> Any:
    """Trustee's az-snp-vtpm v1 evidence: an HCL report around an emulator-signed SNP
    report (VMPL 0, binding the runtime JSON with the AK), a quote signed by the AK."""
    numbers = ak.public_key().public_numbers()
    runtime = runtime_json(numbers.n, numbers.e, user_data=bytes(64),
                           vm_configuration=DEFAULT_VM_CONFIGURATION)
    report = platform.report(report_data=hashlib.sha256(runtime).digest() + bytes(32))
    end = hcl.RUNTIME_DATA_OFFSET + len(runtime)
    blob = (hcl.HCL_SIGNATURE + struct.pack("<7I", 1, end, 2, 0, 0, 0, 0) + report
            + struct.pack("<5I", hcl.REQUEST_DATA_SIZE + len(runtime), 1,
                          hcl.REPORT_TYPE_SNP, hcl.HASH_TYPE_SHA256, len(runtime)) + runtime)
    pcrs = tuple(hashlib.sha256(bytes([i])).digest() for i in range(24))
    message = _quote(extra, pcrs)
    signature = ak.sign(message, padding.PKCS1v15(), hashes.SHA256())
    return json.loads(az_snp_vtpm_evidence(blob, message, signature, pcrs, platform.vcek.der))


def test_az_snp_vtpm_binds_through_the_quote(kbs: KbsServer, connect: Connect, milan: Platform,
                                             keys: Dict[str, jwk.JWK]) -> None:
    ak = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pub = public(keys["P-256"], "ECDH-ES+A256KW")
    client = connect()
    nonce = client.auth("az-snp-vtpm")
    wrong = client.attest(nonce, pub, azure_evidence(milan, ak, binding(nonce, pub, "x")))
    assert wrong.status_code == 401 and "quote.nonce" in wrong.json()["detail"]
    snp = client.attest(nonce, pub, snp_evidence(milan, binding(nonce, pub)))
    assert snp.status_code == 401  # the session's tee is az-snp-vtpm
    answer = client.attest(nonce, pub, azure_evidence(milan, ak, binding(nonce, pub)))
    assert answer.status_code == 200, answer.text
    plain, _ = decrypt(client.get("/kbs/v0/resource/default/key/disk"), keys["P-256"])
    assert plain == RESOURCES["default/key/disk"]
