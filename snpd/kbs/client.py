"""A Trustee KBS client: the thin I/O shell around :mod:`snpd.kbs.protocol` and
:mod:`snpd.kbs.jwe`.

One :class:`KbsClient` per configured KBS, shared by every caller. Its lock makes it
single-flight: concurrent calls wait for the one attestation in progress and then
reuse its session (cookie and token) instead of each attesting. The session is kept
until the token's ``exp`` (or the KBS's 401 says the cookie expired); then the next
call attests again, with a new ephemeral TEE key. Resources are returned, never kept.

What the KBS learns is what attestation shows it: the report (or Azure evidence)
binding the challenge nonce and the TEE key. The evidence comes from ``attester``,
injected so that the daemon (through its broker) and ``snpctl kbs --direct`` (in
process) run the same client.
"""

from __future__ import annotations

import contextlib
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator, List, Optional, Protocol, Tuple

import requests

from snpd.errors import KbsError, Timeout
from snpd.kbs import jwe, protocol
from snpd.kds.client import error_reason


class Attester(Protocol):
    """Where evidence comes from: the daemon's broker, or the device in process."""

    tee: str
    """The KBS protocol's TEE name: ``snp``, or ``az-snp-vtpm`` on Azure."""

    def evidence(self, binding: bytes) -> object:
        """The primary evidence (a JSON value) binding the 48-byte SHA-384 ``binding``:
        REPORT_DATA is it, zero-padded; on Azure, the TPM quote's extraData."""

MAX_BODY = 1 << 20
"""The largest KBS answer read: a token or a JWE-wrapped secret of some KiB."""
TOKEN_SKEW = 30.0
"""Seconds before a token's ``exp`` at which it is no longer used: a request that
starts just before expiry would otherwise be refused mid-way."""
_CHUNK = 16 * 1024


class KbsClient:
    """The protocol against one KBS. Thread-safe; calls are serialized."""

    def __init__(self, name: str, url: str, *, ca_cert: Optional[Path] = None,
                 tee_key: str = "ec-p256", timeout: float = 30.0,
                 session_factory: Callable[[], requests.Session] = requests.Session,
                 clock: Callable[[], float] = time.time,
                 monotonic: Callable[[], float] = time.monotonic) -> None:
        self.name = name
        self.url = url.rstrip("/")
        self.timeout = timeout
        self._verify: Any = str(ca_cert) if ca_cert is not None else True
        self._tee_key = tee_key
        self._session_factory = session_factory
        self._clock = clock
        self._monotonic = monotonic
        self._lock = threading.Lock()
        self._http: Optional[requests.Session] = None
        self._key: Optional[jwe.TeeKey] = None
        self._token: Optional[str] = None
        self._expires: Optional[float] = None
        self.attestations = 0
        self._closed = threading.Event()

    def __repr__(self) -> str:
        return f"KbsClient({self.name!r}, {self.url!r})"

    # -- the API --------------------------------------------------------------------------

    @contextlib.contextmanager
    def _turn(self) -> Iterator[float]:
        """This call's turn at the client (the lock), and its deadline. A client closed
        meanwhile refuses the call, and one closed during it ends its session after."""
        with self._lock:
            if self._closed.is_set():
                raise KbsError(f"the client of KBS {self.name} is closed")
            try:
                yield self._monotonic() + self.timeout
            finally:
                if self._closed.is_set():
                    self._forget()

    def token(self, attester: Attester) -> str:
        """The attestation token of the current session (attesting with ``attester``
        if there is none)."""
        with self._turn() as deadline:
            self._ensure_session(deadline, attester)
            assert self._token is not None
            return self._token

    def resource(self, path: str, attester: Attester) -> bytes:
        """The plaintext of ``REPOSITORY/TYPE/TAG``, decrypted with the TEE key."""
        url_path = protocol.resource_path(path)
        with self._turn() as deadline:
            fresh = self._ensure_session(deadline, attester)
            status, body = self._send("GET", url_path, None, deadline)
            if status == 401 and not fresh:
                # The KBS forgot the session (its cookie expired before our token did,
                # or it restarted): attest once more, then ask again.
                self._forget()
                self._attest(deadline, attester)
                status, body = self._send("GET", url_path, None, deadline)
            if status != 200:
                raise self._refusal(f"resource {path}", status, body)
            assert self._key is not None
            return jwe.decrypt(self._key, body)

    def close(self) -> None:
        """End the session. Never waits: a call in progress ends it when it finishes
        (the daemon's event loop closes clients, and must not wait for a KBS)."""
        self._closed.set()
        if self._lock.acquire(blocking=False):
            try:
                self._forget()
            finally:
                self._lock.release()

    def __enter__(self) -> KbsClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- the session ------------------------------------------------------------------------

    def _forget(self) -> None:
        if self._http is not None:
            self._http.close()
        self._http = self._key = self._token = self._expires = None

    def _valid(self) -> bool:
        if self._token is None:
            return False
        return self._expires is None or self._clock() < self._expires - TOKEN_SKEW

    def _ensure_session(self, deadline: float, attester: Attester) -> bool:
        """Attest unless the current session is still good; True if this call attested."""
        if self._valid():
            return False
        self._forget()
        self._attest(deadline, attester)
        return True

    def _attest(self, deadline: float, attester: Attester) -> None:
        http = self._session_factory()
        http.trust_env = False  # no proxy or netrc from the daemon's environment
        self._http = http
        tee = attester.tee
        status, body = self._send("POST", "kbs/v0/auth", protocol.request_body(tee), deadline)
        if status != 200:
            raise self._refusal("authentication", status, body)
        challenge = protocol.parse_challenge(body)
        key = jwe.TeeKey.generate(self._tee_key)
        public = key.public_jwk()
        binding = protocol.binding(challenge.nonce, public)
        evidence = attester.evidence(binding)
        status, body = self._send("POST", "kbs/v0/attest", protocol.attestation_body(
            challenge.nonce, public, evidence), deadline)
        if status != 200:
            raise self._refusal("attestation", status, body)
        token = protocol.parse_token(body)
        exp = protocol.token_expiry(token)
        self._key, self._token = key, token
        self._expires = float(exp) if exp is not None else None
        self.attestations += 1

    # -- HTTP -------------------------------------------------------------------------------

    def _send(self, method: str, path: str, body: Optional[bytes], deadline: float
              ) -> Tuple[int, bytes]:
        """One request: its status and body (at most :data:`MAX_BODY` bytes, read by
        ``deadline``). Transport trouble is KbsError or Timeout."""
        http = self._http
        assert http is not None
        remaining = deadline - self._monotonic()
        if remaining <= 0:
            raise Timeout(f"KBS {self.name} did not finish within {self.timeout:g} s")
        headers = {"Accept-Encoding": "identity"}
        if body is not None:
            headers["Content-Type"] = "application/json"
        try:
            response = http.request(method, f"{self.url}/{path}", data=body, headers=headers,
                                    stream=True, timeout=(remaining, remaining),
                                    allow_redirects=False, verify=self._verify)
        except requests.exceptions.SSLError as exc:
            raise KbsError(f"KBS {self.name}: TLS failed ({error_reason(exc)}); is "
                                    "ca_cert the CA that signed the KBS's certificate?"
                                    ) from None
        except requests.exceptions.Timeout:
            raise Timeout(f"KBS {self.name} did not answer within {self.timeout:g} s"
                          ) from None
        except requests.exceptions.RequestException as exc:
            raise KbsError(f"KBS {self.name} unreachable ({error_reason(exc)})") from None
        with response:
            return response.status_code, self._read(response, deadline)

    def _read(self, response: requests.Response, deadline: float) -> bytes:
        chunks: List[bytes] = []
        size = 0
        try:
            for chunk in response.iter_content(chunk_size=_CHUNK):
                size += len(chunk)
                if size > MAX_BODY:
                    raise KbsError(f"KBS {self.name} sent more than {MAX_BODY} "
                                            "bytes")
                chunks.append(chunk)
                if self._monotonic() > deadline:
                    raise Timeout(f"KBS {self.name} still sending at the deadline")
        except requests.exceptions.Timeout:
            raise Timeout(f"KBS {self.name} stopped sending before the deadline") from None
        except requests.exceptions.RequestException as exc:
            raise KbsError(f"KBS {self.name}: answer cut short ({error_reason(exc)})"
                                    ) from None
        return b"".join(chunks)

    def _refusal(self, what: str, status: int, body: bytes) -> KbsError:
        info = protocol.parse_error(body)
        if info is not None:
            # parse_error bounded the detail and replaced its control characters.
            return KbsError(f"KBS {self.name} refused {what}: HTTP {status} {info.name}: "
                            f"{info.detail}", status=status, error_type=info.name)
        return KbsError(f"KBS {self.name} refused {what}: HTTP {status}", status=status)
