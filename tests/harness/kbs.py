"""A loopback Trustee Key Broker Service for the tests: HTTPS on 127.0.0.1, built from
Trustee's protocol document (kbs/docs/kbs_attestation_protocol.md) and the facts of its
server (kbs/src/attestation/backend.rs, session.rs, error.rs, jwe), not from snpd's
client. It never imports :mod:`snpd.kbs`: it is the independent side the client is
tested against. It encrypts and signs with jwcrypto (test-only) and verifies evidence
with snpd's verifier under the trust roots the test injects (the emulator's ARK).

Protocol facts it holds the client to:

- ``POST /kbs/v0/auth`` ``{"version", "tee", "extra-params"}``: the version must be
  exactly 0.4.0 and the tee ``snp`` or ``az-snp-vtpm``. The answer is
  ``{"nonce": base64(32 random bytes), "extra-params": ""}`` and the cookie
  ``kbs-session-id`` (a simple UUID) with its expiry.
- ``POST /kbs/v0/attest`` with the cookie: an unknown or expired session is a 401; an
  already attested one gets the same token back; ``runtime-data.nonce`` must be the
  session's nonce; REPORT_DATA (``snp``: zero-padded to 64) or the TPM quote's
  extraData (``az-snp-vtpm``, Trustee's verify_tpm_nonce) must be SHA-384 over the JCS
  form of ``{"additional-evidence", "nonce", "tee-pubkey"}``. The answer is
  ``{"token": JWT}`` (ES256, with ``iat``, ``exp``, ``tee-pubkey``).
- ``GET /kbs/v0/resource/<repository>/<type>/<tag>`` with an attested, unexpired cookie
  and token: a flattened JWE (A256GCM) to the session's ``tee-pubkey``.
- Errors are Trustee's ErrorInformation JSON ``{"type":
  "https://github.com/confidential-containers/kbs/errors/<Name>", "detail"}``: 401,
  and 404 for an unknown resource or plugin.

Fault knobs the tests flip at run time: :attr:`KbsServer.wrong_nonce`,
:meth:`~KbsServer.expire_sessions`, :attr:`~KbsServer.session_ttl`,
:attr:`~KbsServer.token_ttl`, :attr:`~KbsServer.hang` (an Event: while it is set, every
request waits, until it is cleared or the server stops), :meth:`~KbsServer.reject_auth_with`,
:meth:`~KbsServer.forbid`, :attr:`~KbsServer.jwe_alg`, :attr:`~KbsServer.epk_in_protected`.
Counters: :meth:`~KbsServer.counts`. Nothing secret (resources, keys, tokens, report
data) is logged: the server logs nothing at all.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import datetime
import email.utils
import hashlib
import http.server
import ipaddress
import json
import os
import socket
import ssl
import threading
import time
import uuid
from http.cookies import CookieError, SimpleCookie
from pathlib import Path
from types import TracebackType
from typing import Any, Callable, Dict, List, Mapping, Optional, Set, Tuple, Type

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.concatkdf import ConcatKDFHash
from cryptography.hazmat.primitives.keywrap import aes_key_wrap
from cryptography.x509.oid import NameOID
from jwcrypto import jwe, jwk, jwt

from snpd.abi.report import AttestationReport
from snpd.abi.trustee import report_from_trustee_json
from snpd.errors import InvalidArgument
from snpd.trust.azure import verify_azure_evidence
from snpd.trust.certset import CertificateSet
from snpd.trust.verify import Verifier
from snpd.trust.x509 import Certificate, load_certificate

PROTOCOL_VERSION = "0.4.0"
TEES = ("snp", "az-snp-vtpm")
COOKIE = "kbs-session-id"
ERROR_TYPE_PREFIX = "https://github.com/confidential-containers/kbs/errors/"
MAX_BODY = 1 << 20
NONCE_SIZE = 32
REPORT_DATA_SIZE = 64
JWE_ALGS = ("RSA1_5", "RSA-OAEP-256", "ECDH-ES+A256KW")
_IDLE_TIMEOUT = 10.0  # a keep-alive connection's idle limit (stop shuts them anyway)
_HANG_POLL = 0.02
_DRAIN_LIMIT = 4 * MAX_BODY  # a larger body is not read at all

Clock = Callable[[], float]
VcekLookup = Callable[[AttestationReport], Optional[Certificate]]


# -- canonical JSON and the binding ---------------------------------------------------

def canonical_json(value: Any) -> bytes:
    """RFC 8785 (JCS) for the JSON Trustee hashes: objects, arrays, strings, booleans,
    null and integers of at most 2^53. For these, ``json.dumps`` with sorted keys, no
    whitespace and no ASCII escaping is JCS byte for byte: JCS escapes exactly ``"``,
    ``\\``, the two-letter controls and other controls as lower-case ``\\u00xx``, as
    Python does; integers print alike; and keys sort alike as long as no key holds a
    character outside the BMP (JCS sorts UTF-16 code units, Python code points), which
    this refuses. Floats are refused: their JCS form is ECMAScript's, not Python's."""
    def check(item: Any) -> None:
        if isinstance(item, dict):
            for key, member in item.items():
                if not isinstance(key, str) or any(ord(c) > 0xFFFF for c in key):
                    raise InvalidArgument("a canonical JSON key must be a BMP string")
                check(member)
        elif isinstance(item, list):
            for member in item:
                check(member)
        elif isinstance(item, bool) or item is None or isinstance(item, str):
            pass
        elif isinstance(item, int):
            if abs(item) > 1 << 53:
                raise InvalidArgument("an integer beyond 2^53 has no exact JCS form")
        else:
            raise InvalidArgument(f"{type(item).__name__} has no canonical form here")

    check(value)
    try:
        return json.dumps(value, sort_keys=True, separators=(",", ":"),
                          ensure_ascii=False).encode()
    except UnicodeEncodeError as exc:  # a lone surrogate: JCS would escape it
        raise InvalidArgument("a lone surrogate has no UTF-8 form") from exc


def binding(nonce: str, tee_pubkey: Mapping[str, Any], additional_evidence: str = "") -> bytes:
    """The 48 bytes the evidence must carry: SHA-384 over the JCS form of the runtime
    data as the KBS rebuilds it (not as the client sent it)."""
    return hashlib.sha384(canonical_json({
        "additional-evidence": additional_evidence, "nonce": nonce,
        "tee-pubkey": dict(tee_pubkey)})).digest()


# -- TLS material ---------------------------------------------------------------------

def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "snpd test KBS"),
                      x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _make_ca(cn: str) -> Tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(_name(cn)).issuer_name(_name(cn))
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False,
                                         False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                           critical=False)
            .sign(key, hashes.SHA256()))
    return key, cert


def other_ca_pem(path: Path) -> Path:
    """Write a fresh CA that signed nothing the server presents to ``path``: the
    ``ca_cert`` of a client that must refuse this server."""
    path.write_bytes(_pem(_make_ca("snpd test KBS: some other CA")[1]))
    return path


@dataclasses.dataclass(frozen=True)
class TlsFiles:
    ca: Path
    certificate: Path
    key: Path


def make_tls(directory: Path) -> TlsFiles:
    """A test CA (``ca.pem``) and a server certificate it signs for 127.0.0.1 (an IP
    SAN) and ``localhost``, with its key, in ``directory``. EC P-256: fast to make."""
    ca_key, ca = _make_ca("snpd test KBS CA")
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(_name("127.0.0.1")).issuer_name(ca.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=30))
            .add_extension(x509.SubjectAlternativeName([
                x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                x509.DNSName("localhost")]), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]),
                           critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256()))
    directory.mkdir(parents=True, exist_ok=True)
    files = TlsFiles(directory / "ca.pem", directory / "server.pem", directory / "server.key")
    files.ca.write_bytes(_pem(ca))
    files.certificate.write_bytes(_pem(cert))
    files.key.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                            serialization.PrivateFormat.PKCS8,
                                            serialization.NoEncryption()))
    os.chmod(files.key, 0o600)
    return files


# -- JWE ------------------------------------------------------------------------------

def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _coordinate(value: int, curve: ec.EllipticCurve) -> str:
    return _b64url(value.to_bytes((curve.key_size + 7) // 8, "big"))


_CURVES: Dict[str, ec.EllipticCurve] = {"P-256": ec.SECP256R1(), "P-384": ec.SECP384R1(),
                                        "P-521": ec.SECP521R1()}


def jwe_epk_protected(tee_pubkey: Mapping[str, Any], plaintext: bytes) -> Dict[str, str]:
    """ECDH-ES+A256KW / A256GCM the way Trustee's KBS writes it, by hand: ``epk`` in the
    protected header (not a per-recipient ``header``), the CEK wrapped under the Concat
    KDF (SHA-256, AlgorithmID "ECDH-ES+A256KW", empty PartyU/PartyV) of the shared
    secret, and the encoded protected header as the AAD."""
    curve = _CURVES[tee_pubkey["crv"]]
    peer = ec.EllipticCurvePublicNumbers(
        int.from_bytes(base64.urlsafe_b64decode(tee_pubkey["x"] + "=="), "big"),
        int.from_bytes(base64.urlsafe_b64decode(tee_pubkey["y"] + "=="), "big"),
        curve).public_key()
    ephemeral = ec.generate_private_key(curve)
    shared = ephemeral.exchange(ec.ECDH(), peer)
    alg = b"ECDH-ES+A256KW"
    other_info = (len(alg).to_bytes(4, "big") + alg + bytes(4) + bytes(4)
                  + (256).to_bytes(4, "big"))
    kek = ConcatKDFHash(hashes.SHA256(), 32, other_info).derive(shared)
    cek = AESGCM.generate_key(256)
    numbers = ephemeral.public_key().public_numbers()
    protected = _b64url(json.dumps({
        "alg": alg.decode(), "enc": "A256GCM",
        "epk": {"crv": tee_pubkey["crv"], "kty": "EC", "x": _coordinate(numbers.x, curve),
                "y": _coordinate(numbers.y, curve)}}).encode())
    iv = os.urandom(12)
    sealed = AESGCM(cek).encrypt(iv, plaintext, protected.encode("ascii"))
    return {"protected": protected, "encrypted_key": _b64url(aes_key_wrap(kek, cek)),
            "iv": _b64url(iv), "ciphertext": _b64url(sealed[:-16]), "tag": _b64url(sealed[-16:])}


def jwe_jwcrypto(tee_pubkey: Mapping[str, Any], plaintext: bytes, alg: str) -> Dict[str, Any]:
    """jwcrypto's flattened JWE, unmodified (for ECDH-ES, ``epk`` is in the recipient's
    unprotected ``header``)."""
    token = jwe.JWE(plaintext, protected=json.dumps({"alg": alg, "enc": "A256GCM"}))
    token.allowed_algs = [*JWE_ALGS, "A256GCM"]
    token.add_recipient(jwk.JWK(**dict(tee_pubkey)))
    out: Dict[str, Any] = json.loads(token.serialize(compact=False))
    return out


def default_alg(tee_pubkey: Mapping[str, Any]) -> str:
    alg = tee_pubkey.get("alg")
    if isinstance(alg, str) and alg in JWE_ALGS:
        return alg
    return "RSA-OAEP-256" if tee_pubkey.get("kty") == "RSA" else "ECDH-ES+A256KW"


# -- the server -----------------------------------------------------------------------

@dataclasses.dataclass
class _Session:
    """One RCAR session (Trustee's SessionStatus: Authed, then Attested)."""

    id: str
    tee: str
    nonce: str
    expires: float
    token: Optional[str] = None
    token_expires: float = 0.0
    tee_pubkey: Optional[Dict[str, Any]] = None


class KbsError(Exception):
    """An error answer: status and Trustee's ErrorInformation."""

    def __init__(self, status: int, name: str, detail: str) -> None:
        super().__init__(detail)
        self.status, self.name, self.detail = status, name, detail


class _Stopping(Exception):
    """The server stopped while a request hung: close without an answer."""


@dataclasses.dataclass(frozen=True)
class Counts:
    auth: int
    attest: int
    resource: int
    attested: int


class KbsServer:
    """The loopback KBS. ``with KbsServer(directory, verifier=..., certificates=...) as
    kbs``: ``kbs.url`` serves, ``directory / "ca.pem"`` (``kbs.ca_pem``) is its CA.

    ``verifier`` holds the trust roots (the emulator's ARK) and the clock the evidence
    is verified at; ``certificates`` the ARK and ASK (Trustee embeds AMD's itself), and
    a VCEK to use when the evidence's ``cert_chain`` has none; ``vcek_lookup`` finds one
    for a report otherwise. ``resources`` maps ``repository/type/tag`` to bytes; the
    test may change :attr:`resources` at run time. ``clock`` gives seconds since the
    epoch for sessions and tokens."""

    def __init__(self, directory: Path, *, verifier: Verifier,
                 certificates: Optional[CertificateSet] = None,
                 resources: Optional[Mapping[str, bytes]] = None,
                 vcek_lookup: Optional[VcekLookup] = None, session_ttl: float = 300.0,
                 token_ttl: float = 300.0, clock: Clock = time.time) -> None:
        self.directory = Path(directory)
        self.tls = make_tls(self.directory)
        self.verifier = verifier
        self.certificates = certificates or CertificateSet()
        self.vcek_lookup = vcek_lookup
        self.resources: Dict[str, bytes] = dict(resources or {})
        self.session_ttl = session_ttl
        self.token_ttl = token_ttl
        self._initial = (dict(self.resources), session_ttl, token_ttl)
        self.clock = clock
        self.token_key = jwk.JWK.generate(kty="EC", crv="P-256")
        # knobs
        self.wrong_nonce = False
        self.hang = threading.Event()
        self.jwe_alg: Optional[str] = None
        self.epk_in_protected = False
        self._rejection: Optional[Tuple[str, str]] = None
        self._forbidden: Dict[str, int] = {}
        # state
        self._lock = threading.Lock()
        self._sessions: Dict[str, _Session] = {}
        self._counts = {"auth": 0, "attest": 0, "resource": 0, "attested": 0}
        self._hanging = 0
        self._hang_changed = threading.Condition(self._lock)
        self._stopping = threading.Event()
        self._connections: Set[socket.socket] = set()
        self._httpd: Optional[_HttpServer] = None
        self._thread: Optional[threading.Thread] = None

    # -- life -----------------------------------------------------------------------

    @property
    def ca_pem(self) -> Path:
        return self.tls.ca

    @property
    def url(self) -> str:
        if self._httpd is None:
            raise RuntimeError("the KBS is not running")
        return f"https://127.0.0.1:{self._httpd.server_address[1]}"

    def start(self) -> KbsServer:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(str(self.tls.certificate), str(self.tls.key))
        self._stopping.clear()
        self._httpd = _HttpServer(("127.0.0.1", 0), _Handler, kbs=self, context=context)
        self._thread = threading.Thread(target=self._httpd.serve_forever,
                                        kwargs={"poll_interval": 0.05},
                                        name="test-kbs", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving: release hung requests (unanswered), close every connection,
        join every handler thread."""
        httpd, self._httpd = self._httpd, None
        if httpd is None:
            return
        self._stopping.set()
        with self._lock:
            self._hang_changed.notify_all()
        httpd.shutdown()
        with self._lock:
            open_connections = list(self._connections)
        for conn in open_connections:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
        httpd.server_close()  # joins the handler threads
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def __enter__(self) -> KbsServer:
        return self.start()

    def __exit__(self, kind: Optional[Type[BaseException]], value: Optional[BaseException],
                 tb: Optional[TracebackType]) -> None:
        self.stop()

    # -- knobs and counters -----------------------------------------------------------

    def expire_sessions(self) -> None:
        """Every session known now is expired (its cookie gets 401s)."""
        with self._lock:
            for session in self._sessions.values():
                session.expires = float("-inf")

    def reject_auth_with(self, type_name: Optional[str], detail: str = "") -> None:
        """Answer every auth with 401 ErrorInformation of this type; None undoes it."""
        with self._lock:
            self._rejection = None if type_name is None else (type_name, detail)

    def forbid(self, path: str, status: int = 403) -> None:
        """Refuse ``repository/type/tag`` to everyone (403 by default; Trustee's
        PolicyDeny is a 401)."""
        with self._lock:
            self._forbidden[path.strip("/")] = status

    def allow(self, path: str) -> None:
        with self._lock:
            self._forbidden.pop(path.strip("/"), None)

    def reset(self) -> None:
        """Every knob, the resources and the counters as constructed: what a module's
        tests sharing one server call after each test."""
        resources, self.session_ttl, self.token_ttl = self._initial
        self.resources = dict(resources)
        self.wrong_nonce = self.epk_in_protected = False
        self.jwe_alg = None
        self.hang.clear()
        self.reject_auth_with(None)
        with self._lock:
            self._forbidden.clear()
        self.reset_counts()

    def counts(self) -> Counts:
        with self._lock:
            return Counts(**self._counts)

    def reset_counts(self) -> None:
        with self._lock:
            for key in self._counts:
                self._counts[key] = 0

    def wait_hanging(self, count: int = 1, timeout: float = 10.0) -> bool:
        """Wait until at least ``count`` requests are held by :attr:`hang`."""
        deadline = time.monotonic() + timeout
        with self._lock:
            while self._hanging < count:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._hang_changed.wait(left)
            return True

    def _count(self, name: str) -> None:
        with self._lock:
            self._counts[name] += 1

    def _hold(self) -> None:
        """While :attr:`hang` is set, wait (polled: an Event cannot wait to be cleared)."""
        if not self.hang.is_set():
            return
        with self._lock:
            self._hanging += 1
            self._hang_changed.notify_all()
        try:
            while self.hang.is_set():
                if self._stopping.wait(_HANG_POLL):
                    raise _Stopping()
        finally:
            with self._lock:
                self._hanging -= 1

    # -- the protocol -----------------------------------------------------------------

    def _cookie(self, session: _Session) -> str:
        expires = email.utils.formatdate(max(session.expires, 0.0), usegmt=True)
        return f"{COOKIE}={session.id}; Expires={expires}"

    def auth(self, body: Any) -> Tuple[Dict[str, Any], str]:
        self._count("auth")
        with self._lock:
            rejection = self._rejection
        if rejection is not None:
            raise KbsError(401, *rejection)
        if not isinstance(body, dict) or not isinstance(body.get("version"), str):
            raise KbsError(401, "AttestationError", "deserialize Request failed")
        if body["version"] != PROTOCOL_VERSION:
            raise KbsError(401, "AttestationError",
                           f"KBS Client Protocol Version Mismatch: expect ={PROTOCOL_VERSION} "
                           f"while the request is {body['version'][:40]}")
        if body.get("tee") not in TEES:
            raise KbsError(401, "AttestationError", "deserialize Request failed: unknown tee")
        if "extra-params" not in body:
            raise KbsError(401, "AttestationError", "deserialize Request failed: extra-params")
        session = _Session(id=uuid.uuid4().hex, tee=body["tee"],
                           nonce=base64.b64encode(os.urandom(NONCE_SIZE)).decode(),
                           expires=self.clock() + self.session_ttl)
        with self._lock:
            self._sessions[session.id] = session
        return {"nonce": session.nonce, "extra-params": ""}, self._cookie(session)

    def _session(self, session_id: Optional[str]) -> _Session:
        with self._lock:
            session = self._sessions.get(session_id or "")
            if session is None:
                raise KbsError(401, "AttestationError", "session not found")
            if session.expires < self.clock():
                del self._sessions[session.id]
                raise KbsError(401, "AttestationError", "session expired")
            return session

    def attest(self, session_id: Optional[str], body: Any) -> Tuple[Dict[str, Any], str]:
        self._count("attest")
        if session_id is None:
            raise KbsError(401, "AttestationError", "cookie not found")
        session = self._session(session_id)
        with self._lock:
            if session.token is not None:  # already attested: the same token again
                return {"token": session.token}, self._cookie(session)
            nonce = session.nonce
        runtime, evidence = _attestation_parts(body)
        expected = base64.b64encode(os.urandom(NONCE_SIZE)).decode() if self.wrong_nonce \
            else nonce
        if runtime["nonce"] != expected:
            raise KbsError(401, "AttestationError", "the nonce in the handshake session is "
                           "different from the client side in KBS protocol's Attestation message")
        tee_pubkey = runtime["tee-pubkey"]
        try:
            bound = binding(nonce, tee_pubkey, evidence["additional_evidence"])
        except InvalidArgument as exc:
            raise KbsError(401, "AttestationError", f"runtime data: {exc}") from None
        if session.tee == "snp":
            self._verify_snp(evidence["primary_evidence"], bound)
        else:
            self._verify_azure(evidence["primary_evidence"], bound)
        now = self.clock()
        claims = {"iss": "snpd-test-kbs", "iat": int(now), "exp": int(now + self.token_ttl),
                  "tee": session.tee, "tee-pubkey": tee_pubkey, "jti": uuid.uuid4().hex}
        token = jwt.JWT(header={"alg": "ES256", "typ": "JWT",
                                "kid": self.token_key.thumbprint()}, claims=claims)
        token.make_signed_token(self.token_key)
        with self._lock:
            if session.token is None:  # a concurrent attest may have won
                session.token = token.serialize()
                session.token_expires = now + self.token_ttl
                session.tee_pubkey = dict(tee_pubkey)
                self._counts["attested"] += 1
            return {"token": session.token}, self._cookie(session)

    def _verify_snp(self, evidence: Any, bound: bytes) -> None:
        if not isinstance(evidence, dict):
            raise KbsError(401, "AttestationError", "SNP evidence is not a JSON object")
        try:
            raw = report_from_trustee_json(evidence.get("attestation_report"))
            report = AttestationReport.from_bytes(raw)
        except InvalidArgument as exc:
            raise KbsError(401, "AttestationError", f"SNP evidence: {exc}") from None
        if report.report_data != bound.ljust(REPORT_DATA_SIZE, b"\0"):
            raise KbsError(401, "AttestationError", "verify TEE evidence failed: Report Data "
                           "Mismatch")
        certs = self.certificates
        chain = evidence.get("cert_chain")
        for entry in chain if isinstance(chain, list) else ():
            kind = entry.get("cert_type") if isinstance(entry, dict) else None
            if kind in ("VCEK", "VLEK") and isinstance(entry.get("data"), list):
                try:
                    cert = load_certificate(bytes(entry["data"]))
                except (InvalidArgument, ValueError, TypeError):
                    raise KbsError(401, "AttestationError",
                                   f"SNP evidence: the {kind} is not a certificate") from None
                certs = CertificateSet(**{kind.lower(): cert}).merged(certs)
        if certs.vcek is None and certs.vlek is None and self.vcek_lookup is not None:
            found = self.vcek_lookup(report)
            if found is not None:
                certs = certs.merged(CertificateSet(vcek=found))
        verdict = self.verifier.verify(report, certs)
        if not verdict.valid:
            failed = ", ".join(c.name for c in verdict.failures) or "incomplete"
            raise KbsError(401, "AttestationError", f"verify TEE evidence failed: {failed}")

    def _verify_azure(self, evidence: Any, bound: bytes) -> None:
        if not isinstance(evidence, dict):
            raise KbsError(401, "AttestationError", "az-snp-vtpm evidence is not a JSON object")
        verdict = verify_azure_evidence(evidence, self.certificates, bound,
                                        verifier=self.verifier)
        if not verdict.valid:
            failed = ", ".join(c.name for c in verdict.failures) or "incomplete"
            raise KbsError(401, "AttestationError", f"verify TEE evidence failed: {failed}")

    def resource(self, session_id: Optional[str], path: str) -> Dict[str, Any]:
        self._count("resource")
        try:
            session = self._session(session_id)
        except KbsError:
            raise KbsError(401, "TokenNotFound", "Attestation Token not found") from None
        with self._lock:
            token_ok = session.token is not None and session.token_expires >= self.clock()
            tee_pubkey = session.tee_pubkey
            forbidden = self._forbidden.get(path)
            value = self.resources.get(path)
            alg = self.jwe_alg
            epk_protected = self.epk_in_protected
        if not token_ok or tee_pubkey is None:
            raise KbsError(401, "TokenNotFound", "Attestation Token not found")
        if forbidden is not None:
            raise KbsError(forbidden, "PolicyDeny", "Access denied by policy")
        if value is None:
            raise KbsError(404, "PluginInternalError", "resource not found")
        alg = alg or default_alg(tee_pubkey)
        if epk_protected and alg == "ECDH-ES+A256KW":
            return jwe_epk_protected(tee_pubkey, value)
        return jwe_jwcrypto(tee_pubkey, value, alg)


def _attestation_parts(body: Any) -> Tuple[Dict[str, Any], Dict[str, Any]]:
    """``runtime-data`` and ``tee-evidence`` of an Attestation, shape-checked (a JWK of
    string members, an ``additional_evidence`` string, "" when absent)."""
    bad = KbsError(401, "AttestationError", "deserialize Attestation failed")
    if not isinstance(body, dict):
        raise bad
    runtime, evidence = body.get("runtime-data"), body.get("tee-evidence")
    if not isinstance(runtime, dict) or not isinstance(evidence, dict):
        raise bad
    pubkey = runtime.get("tee-pubkey")
    if (not isinstance(runtime.get("nonce"), str) or not isinstance(pubkey, dict)
            or not all(isinstance(v, str) for v in pubkey.values())
            or "primary_evidence" not in evidence):
        raise bad
    additional = evidence.get("additional_evidence", "")
    if not isinstance(additional, str):
        raise bad
    return runtime, {"primary_evidence": evidence["primary_evidence"],
                     "additional_evidence": additional}


class _HttpServer(http.server.ThreadingHTTPServer):
    """TLS per connection, in the connection's own thread: a client that never
    completes its handshake holds only that thread, never the accept loop."""

    daemon_threads = False
    block_on_close = True

    def __init__(self, address: Tuple[str, int], handler: Any, *, kbs: KbsServer,
                 context: ssl.SSLContext) -> None:
        self.kbs = kbs
        self.context = context
        super().__init__(address, handler)

    def finish_request(self, request: Any, client_address: Any) -> None:
        request.settimeout(_IDLE_TIMEOUT)
        with self.kbs._lock:
            self.kbs._connections.add(request)
        try:
            if self.kbs._stopping.is_set():  # accepted as stop snapshotted the connections
                return
            try:
                tls = self.context.wrap_socket(request, server_side=True)
            except (ssl.SSLError, OSError):
                return  # e.g. the client refused our certificate
            try:
                super().finish_request(tls, client_address)
            except (ssl.SSLError, OSError, _Stopping):
                pass
            finally:
                tls.close()
        finally:
            with self.kbs._lock:
                self.kbs._connections.discard(request)

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # nothing is logged (tracebacks could carry request data)


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    # The headers and the body are written apart: without TCP_NODELAY, Nagle and the
    # client's delayed ACK add 40 ms to every answer on a kept-alive connection.
    disable_nagle_algorithm = True
    server: _HttpServer

    def log_message(self, format: str, *args: Any) -> None:
        pass  # paths and cookies stay out of logs

    def _send(self, status: int, body: bytes, content_type: str = "application/json",
              cookie: Optional[str] = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        if cookie is not None:
            self.send_header("Set-Cookie", cookie)
        if self.close_connection:
            # Said, so that a client does not reuse the connection (urllib3 1.26 would,
            # and find it closed).
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(body)

    def _error(self, error: KbsError) -> None:
        self._send(error.status, json.dumps(
            {"type": ERROR_TYPE_PREFIX + error.name, "detail": error.detail}).encode())

    def _session_id(self) -> Optional[str]:
        header = self.headers.get("Cookie")
        if not header:
            return None
        try:
            jar: SimpleCookie[str] = SimpleCookie()
            jar.load(header)
        except CookieError:
            return None
        morsel = jar.get(COOKIE)
        return None if morsel is None else morsel.value

    def _body(self) -> Optional[bytes]:
        """The request body, or None when too large (answered 413, connection closed)."""
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            length = -1
        if length < 0 or length > MAX_BODY:
            self.close_connection = True
            # Read and drop a body of moderate size: closing on unread data resets the
            # connection, and the client may never see the 413.
            while 0 < length <= _DRAIN_LIMIT:
                chunk = self.rfile.read(min(length, 1 << 16))
                if not chunk:
                    break
                length -= len(chunk)
            self._send(413, json.dumps({"type": ERROR_TYPE_PREFIX + "PayloadTooLarge",
                                        "detail": f"at most {MAX_BODY} bytes"}).encode())
            return None
        return self.rfile.read(length)

    def _route(self, method: str) -> None:
        kbs = self.server.kbs
        kbs._hold()
        path = self.path.split("?", 1)[0]
        body = self._body() if method == "POST" else b""
        if body is None:
            return
        prefix = "/kbs/v0/"
        try:
            if not path.startswith(prefix):
                raise KbsError(404, "InvalidRequestPath", "Request path is invalid")
            plugin, _, rest = path[len(prefix):].partition("/")
            if plugin in ("auth", "attest") and method == "POST":
                try:
                    doc = json.loads(body)
                except ValueError:
                    doc = None
                answer, cookie = (kbs.auth(doc) if plugin == "auth"
                                  else kbs.attest(self._session_id(), doc))
                self._send(200, json.dumps(answer).encode(), cookie=cookie)
            elif plugin == "resource" and method == "GET":
                parts = rest.split("/")
                if len(parts) != 3 or not all(parts):
                    raise KbsError(404, "InvalidRequestPath", "Request path is invalid")
                self._send(200, json.dumps(kbs.resource(self._session_id(), rest)).encode())
            else:
                raise KbsError(404, "PluginNotFound", f"Plugin {plugin[:40]} not found")
        except KbsError as exc:
            self._error(exc)

    def do_GET(self) -> None:
        self._route("GET")

    def do_POST(self) -> None:
        self._route("POST")


__all__: List[str] = [
    "COOKIE", "ERROR_TYPE_PREFIX", "MAX_BODY", "PROTOCOL_VERSION", "Counts", "KbsError",
    "KbsServer", "TlsFiles", "binding", "canonical_json", "default_alg", "jwe_epk_protected",
    "jwe_jwcrypto", "make_tls", "other_ca_pem"]
