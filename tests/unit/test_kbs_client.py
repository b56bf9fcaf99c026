"""snpd.kbs.client against the loopback KBS (tests/harness/kbs.py), which was written from
Trustee's protocol document, encrypts with jwcrypto and verifies the evidence with
snpd's verifier under the emulator's root. The golden and failure cases of issue 15:
every JWE alg, the session's reuse and its renewal, a wrong nonce, a wrong binding, an
expired cookie, a 401 with ErrorInformation, a KBS that hangs, and a certificate that
ca_cert did not sign."""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any, Dict, List

import pytest
from emuplatform import Platform  # type: ignore[import-not-found]
from harness.kbs import KbsServer, other_ca_pem  # type: ignore[import-not-found]

from snpd.abi.report import AttestationReport
from snpd.errors import KbsError, Timeout
from snpd.evidence import trustee_evidence
from snpd.kbs import protocol
from snpd.kbs.client import KbsClient

RESOURCES = {"default/key/disk": b"\x00disk key\xff" * 4, "app/cert/tls": b"-----BEGIN..."}


class Attester:
    """Real evidence from the emulated platform, binding what the client asks; records
    each binding (one per attestation)."""

    tee = "snp"

    def __init__(self, platform: Platform, *, tamper: bool = False) -> None:
        self.platform = platform
        self.tamper = tamper
        self.bindings: List[bytes] = []

    def evidence(self, binding: bytes) -> object:
        self.bindings.append(binding)
        data = bytes(48) if self.tamper else binding
        raw = self.platform.report(report_data=protocol.report_data(data))
        return json.loads(trustee_evidence(AttestationReport.from_bytes(raw),
                                           self.platform.product,
                                           [("vcek", self.platform.vcek.der)]))


def client(kbs: KbsServer, **kw: Any) -> KbsClient:
    options: Dict[str, Any] = {"ca_cert": kbs.ca_pem, "timeout": 30.0}
    options.update(kw)
    return KbsClient("test", kbs.url, **options)


@pytest.mark.parametrize("tee_key, alg, epk_in_protected", [
    ("ec-p256", None, False),
    ("ec-p256", None, True),
    ("ec-p521", None, False),
    ("rsa", None, False),
    ("rsa1_5", None, False),
])
def test_fetch_decrypts_each_alg(kbs: KbsServer, milan: Platform, tee_key: str,
                                 alg: Any, epk_in_protected: bool) -> None:
    """The KBS encrypts with jwcrypto to the key the evidence bound (RSA-OAEP-256 or
    ECDH-ES+A256KW by the JWK's alg; RSA1_5 forced; Trustee's epk-in-protected form)."""
    kbs.jwe_alg, kbs.epk_in_protected = alg, epk_in_protected
    attester = Attester(milan)
    with client(kbs, tee_key=tee_key) as c:
        assert c.resource("default/key/disk", attester) == RESOURCES["default/key/disk"]
    assert len(attester.bindings) == 1 and len(attester.bindings[0]) == 48
    assert kbs.counts().attested == 1


def test_an_rsa_key_is_not_downgraded_to_rsa1_5(kbs: KbsServer, milan: Platform) -> None:
    """A KBS that answers RSA1_5 to a key advertised for RSA-OAEP-256 is refused: only
    a key made for the legacy alg ("rsa1_5") takes it."""
    kbs.jwe_alg = "RSA1_5"
    with client(kbs, tee_key="rsa") as c, pytest.raises(KbsError, match="alg"):
        c.resource("default/key/disk", Attester(milan))


def test_session_is_reused_then_renewed(kbs: KbsServer, milan: Platform) -> None:
    """One attestation serves many fetches and the token; once the KBS forgets the
    session (expired cookie: 401), the next fetch attests again, transparently."""
    attester = Attester(milan)
    with client(kbs) as c:
        for _ in range(3):
            assert c.resource("app/cert/tls", attester) == RESOURCES["app/cert/tls"]
        token = c.token(attester)
        assert token.count(".") == 2 and protocol.token_expiry(token) is not None
        assert kbs.counts().attested == 1 and kbs.counts().auth == 1
        kbs.expire_sessions()
        assert c.resource("default/key/disk", attester) == RESOURCES["default/key/disk"]
        assert kbs.counts().attested == 2
        assert attester.bindings[0] != attester.bindings[1]  # a new nonce and a new key
        assert c.token(attester) != token


def test_expired_token_attests_again(kbs: KbsServer, milan: Platform) -> None:
    """A token within TOKEN_SKEW of its exp is not used: the client attests anew
    before asking, instead of failing mid-way."""
    kbs.token_ttl = 10.0
    attester = Attester(milan)
    with client(kbs) as c:
        c.resource("default/key/disk", attester)
        c.resource("default/key/disk", attester)
    assert kbs.counts().attested == 2


def test_concurrent_fetches_share_one_attestation(kbs: KbsServer, milan: Platform) -> None:
    attester = Attester(milan)
    results: List[bytes] = []
    with client(kbs) as c:
        threads = [threading.Thread(target=lambda: results.append(
            c.resource("default/key/disk", attester))) for _ in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert results == [RESOURCES["default/key/disk"]] * 6
    assert kbs.counts().attested == 1 and len(attester.bindings) == 1


def test_wrong_nonce_is_refused_with_the_kbs_reason(kbs: KbsServer, milan: Platform) -> None:
    kbs.wrong_nonce = True
    with client(kbs) as c, pytest.raises(KbsError) as info:
        c.resource("default/key/disk", Attester(milan))
    assert info.value.status == 401 and info.value.error_type
    assert "attestation" in str(info.value)


def test_wrong_binding_is_refused(kbs: KbsServer, milan: Platform) -> None:
    """Evidence that binds something else than the nonce and key (a replayed or
    substituted report) gets no token."""
    with client(kbs) as c, pytest.raises(KbsError) as info:
        c.resource("default/key/disk", Attester(milan, tamper=True))
    assert info.value.status == 401 and kbs.counts().attested == 0


def test_auth_refusal_carries_error_information(kbs: KbsServer, milan: Platform) -> None:
    kbs.reject_auth_with("ProtocolVersion", "expected 0.4.0\x1b[31m")
    with client(kbs) as c, pytest.raises(KbsError) as info:
        c.token(Attester(milan))
    exc = info.value
    assert exc.status == 401 and exc.error_type == "ProtocolVersion"
    assert "ProtocolVersion" in str(exc) and "expected 0.4.0" in str(exc)
    assert "\x1b" not in str(exc)  # the KBS's text is sanitized before it is shown


def test_unknown_and_forbidden_resources(kbs: KbsServer, milan: Platform) -> None:
    attester = Attester(milan)
    with client(kbs) as c:
        with pytest.raises(KbsError) as info:
            c.resource("default/key/absent", attester)
        assert info.value.status == 404
        kbs.forbid("app/cert/tls")
        with pytest.raises(KbsError) as info:
            c.resource("app/cert/tls", attester)
        assert info.value.status == 403
        # the session survives a refusal
        assert c.resource("default/key/disk", attester) == RESOURCES["default/key/disk"]
    assert kbs.counts().attested == 1


def test_a_hanging_kbs_times_out(kbs: KbsServer, milan: Platform) -> None:
    kbs.hang.set()
    try:
        with client(kbs, timeout=1.0) as c, pytest.raises(Timeout):
            c.token(Attester(milan))
    finally:
        kbs.hang.clear()


def test_certificate_not_signed_by_ca_cert(kbs: KbsServer, milan: Platform,
                                           tmp_path: Path) -> None:
    attester = Attester(milan)
    with client(kbs, ca_cert=other_ca_pem(tmp_path / "other.pem")) as c, \
            pytest.raises(KbsError) as info:
        c.token(attester)
    assert "TLS" in str(info.value) and "ca_cert" in str(info.value)
    # (no count of the KBS's: a request the hang test held may still arrive late)
    assert attester.bindings == []


def test_bad_path_is_refused_before_any_request(kbs: KbsServer, milan: Platform) -> None:
    from snpd.errors import InvalidArgument

    attester = Attester(milan)
    with client(kbs) as c:
        for bad in ("a/b", "../etc/passwd/x", "a/b/c?x=1", "a/b/c/d"):
            with pytest.raises(InvalidArgument):
                c.resource(bad, attester)
    assert attester.bindings == [] and kbs.counts().resource == 0
