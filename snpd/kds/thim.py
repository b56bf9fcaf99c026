"""Azure's THIM endpoint as a source of this host's VCEK and its chain.

On an Azure confidential VM the paravisor puts no certificates beside the report;
Azure's Trusted Hardware Identity Management service caches them for the host and
the instance metadata service (IMDS) serves them to the guest::

    GET http://169.254.169.254/metadata/THIM/amd/certification
    Metadata: true

    {"vcekCert": "-----BEGIN CERTIFICATE-----...", "tcbm": "DB18000000000004",
     "certificateChain": "<ASK PEM><ARK PEM>", "cacheControl": "..."}

``tcbm`` is the TCB the VCEK was issued for, as 16 hex digits of the REPORTED_TCB u64
(the report's eight bytes in reverse). THIM only has the VCEK of the host's current
TCB, so it is a mirror for one key, not a KDS: the cache (snpd/kds/cache.py) asks it
for a VCEK first, takes its answer only if the TCB, the chip and the signatures all
verify, and otherwise asks the KDS. Nothing here trusts anything: this module fetches
(bounded, through :class:`~snpd.kds.client.KdsClient` with its deadline and size cap)
and parses; verification is the cache's.

IMDS must be asked directly, never through a proxy (Azure's IMDS documentation), so
the session this module makes ignores the proxy environment.
"""

from __future__ import annotations

import dataclasses
import re
import threading
from typing import Any, Dict, Optional, Tuple
from urllib.parse import urlsplit

from snpd import __version__ as snpd_version
from snpd.abi import strictjson
from snpd.errors import CertificateFormatError, EvidenceFormatError
from snpd.trust.x509 import Certificate, load_certificate, load_certificates

__all__ = ["MAX_THIM_BODY", "THIM_PATH", "THIM_URL", "ThimAnswer", "ThimSource",
           "parse_thim", "tcbm_text"]

THIM_PATH = "/metadata/THIM/amd/certification"
THIM_URL = "http://169.254.169.254" + THIM_PATH
#: A VCEK and two CA certificates in PEM are about 7 KiB; a body beyond this is not
#: a THIM answer, and is not read past it.
MAX_THIM_BODY = 64 * 1024
_TCBM = re.compile(r"[0-9A-Fa-f]{16}")


def tcbm_text(raw: int) -> str:
    """The REPORTED_TCB u64 ``raw`` as THIM spells it (16 upper-case hex digits)."""
    return f"{raw:016X}"


@dataclasses.dataclass(frozen=True)
class ThimAnswer:
    """A parsed THIM answer, unverified: the VCEK, the chain (ASK then ARK, as sent)
    and the TCB THIM says the VCEK is for (a REPORTED_TCB u64)."""

    vcek: Certificate = dataclasses.field(repr=False)
    chain: Tuple[Certificate, ...] = dataclasses.field(repr=False)
    tcbm: int


def _pem_field(doc: Any, key: str) -> str:
    value = doc.get(key)
    if not isinstance(value, str) or not value.strip():
        raise CertificateFormatError(f"THIM answer: {key!r} is missing or not a PEM string")
    return value


def parse_thim(body: bytes) -> ThimAnswer:
    """``body`` as a THIM answer. A body that is not one (not strict JSON, a field
    missing, a PEM that does not load, a tcbm that is not 16 hex digits) is a
    :class:`~snpd.errors.CertificateFormatError`."""
    try:
        doc = strictjson.loads(body, what="THIM answer", limit=MAX_THIM_BODY)
    except EvidenceFormatError as exc:
        raise CertificateFormatError(str(exc)) from None
    if not isinstance(doc, dict):
        raise CertificateFormatError(f"THIM answer is a JSON {type(doc).__name__}, "
                                     "not an object")
    tcbm = doc.get("tcbm")
    if not isinstance(tcbm, str) or not _TCBM.fullmatch(tcbm):
        raise CertificateFormatError("THIM answer: 'tcbm' is not 16 hex digits")
    vcek_pem = _pem_field(doc, "vcekCert")
    chain_pem = _pem_field(doc, "certificateChain")
    try:
        vcek = load_certificate(vcek_pem.encode())
        chain = tuple(load_certificates(chain_pem.encode()))
    except (UnicodeError, ValueError) as exc:  # a lone surrogate cannot be encoded
        raise CertificateFormatError(f"THIM answer: not PEM ({exc})") from None
    except CertificateFormatError as exc:
        raise CertificateFormatError(f"THIM answer: {exc}") from None
    return ThimAnswer(vcek, chain, int(tcbm, 16))


class ThimSource:
    """Fetches THIM answers from ``url`` (default: Azure's IMDS), each request with
    ``Metadata: true``, bounded by ``deadline`` and :data:`MAX_THIM_BODY`.

    ``session`` is injected like the KDS client's (it stays the caller's to close); a
    session made here ignores proxy settings. The HTTP client is made on the first
    fetch, so that a daemon that never misses its cache never imports requests.
    Thread-safe.
    """

    def __init__(self, url: str = THIM_URL, session: Any = None, *,
                 deadline: float = 10.0, connect_timeout: float = 2.0,
                 read_timeout: float = 5.0, max_retries: int = 1,
                 max_retry_wait: Optional[float] = 2.0, max_body: int = MAX_THIM_BODY) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ValueError(f"THIM URL must be http(s)://host[:port]/path, got {url!r}")
        if parts.query or parts.fragment:
            raise ValueError(f"THIM URL must not carry a query or fragment: {url!r}")
        self.url = url
        self._base = f"{parts.scheme}://{parts.netloc}"
        self._path = parts.path or "/"
        self._session = session
        self._owns_session = session is None
        self._options: Dict[str, Any] = dict(deadline=deadline, connect_timeout=connect_timeout,
                             read_timeout=read_timeout, max_retries=max_retries,
                             max_retry_wait=max_retry_wait, max_body=max_body)
        self._client: Any = None
        self._lock = threading.Lock()

    def _get_client(self) -> Any:
        with self._lock:
            if self._client is None:
                # lazy: requests (megabytes with TLS) only once a VCEK is missed
                import requests

                from snpd.kds.client import KdsClient

                if self._session is None:
                    self._session = requests.Session()
                    self._session.trust_env = False  # IMDS is never asked through a proxy
                    self._session.headers["User-Agent"] = f"snpd/{snpd_version}"
                self._client = KdsClient(self._base, session=self._session,
                                         headers={"Metadata": "true"}, **self._options)
            return self._client

    def fetch(self) -> ThimAnswer:
        """The current THIM answer, parsed but unverified. Raises
        :class:`~snpd.errors.KdsError` when THIM does not answer 200 in time and
        :class:`~snpd.errors.CertificateFormatError` when the answer is malformed."""
        body: bytes = self._get_client().get(self._path)
        return parse_thim(body)

    def close(self) -> None:
        """Close the session if this source made it."""
        with self._lock:
            if self._owns_session and self._session is not None:
                self._session.close()
