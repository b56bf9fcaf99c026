"""A persistent, verified certificate cache in front of the KDS.

Lookups go: read-only offline dirs (snpguest certs-dir layout) first, then the
cache directory, then the KDS (unless offline). Nothing is stored before it is
verified against the trusted roots and, for a VCEK, bound to the exact chip and
TCB it is stored under, so a bad KDS answer can only cause a rejection, never a
poisoned cache. Entries are re-verified when read; an entry that no longer
verifies is removed and fetched again. Files are written atomically. Concurrent
misses for one key are coalesced into one fetch.

Layout (each ``{Product}/{endorser}`` folder is itself a snpguest certs dir)::

    {root}/{Product}/vcek/ark.pem, ask.pem, crl.der
    {root}/{Product}/vlek/ark.pem, asvk.pem, crl.der
    {root}/{Product}/vcek/chips/{hwid hex}/{reported TCB as 16 hex digits}.der
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import datetime
import hashlib
import threading
from pathlib import Path
from typing import Callable, Dict, Hashable, Optional, Protocol, Sequence, Tuple, TypeVar

from snpd.abi.product import Endorser, Product
from snpd.abi.tcb import TcbVersion
from snpd.errors import CertificateFormatError, CertificatesUnavailable, UntrustedCertificate
from snpd.files import atomic_write, remove_stale_temporaries
from snpd.trust.admission import check_ca_chain, check_crl, check_vcek_binding
from snpd.trust.certset import CertificateSet
from snpd.trust.roots import AMD_ROOTS, TrustRoots
from snpd.trust.x509 import Certificate, Crl, load_certificate, load_certificates, load_crl


class KdsFetcher(Protocol):
    """What the cache needs of a KDS client (snpd.kds.client.KdsFetcher, or a lazy one)."""

    def fetch_cert_chain(self, product: Product, endorser: Endorser) -> bytes: ...

    def fetch_vcek(self, product: Product, chip_id: bytes, tcb: TcbVersion) -> bytes: ...

    def fetch_crl(self, product: Product, endorser: Endorser) -> bytes: ...

T = TypeVar("T")
Clock = Callable[[], datetime.datetime]


def _utc_now() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc)


@dataclasses.dataclass
class CacheStats:
    """Counters for the daemon's Statistics property."""

    hits: int = 0
    offline_hits: int = 0
    fetches: int = 0
    fetch_failures: int = 0
    rejected: int = 0
    evicted: int = 0

    def as_dict(self) -> Dict[str, int]:
        return dataclasses.asdict(self)


class CertificateCache:
    def __init__(
        self,
        root: Path,
        client: Optional[KdsFetcher] = None,
        *,
        offline_dirs: Sequence[Path] = (),
        offline: bool = False,
        roots: TrustRoots = AMD_ROOTS,
        clock: Clock = _utc_now,
        crl_retry_after: datetime.timedelta = datetime.timedelta(minutes=5),
        observer: Optional[Callable[[str, str], None]] = None,
    ) -> None:
        self.root = Path(root)
        self.client = client
        self.offline_dirs = tuple(Path(d) for d in offline_dirs)
        self.offline = offline or client is None
        self.roots = roots
        self.clock = clock
        self.crl_retry_after = crl_retry_after
        self.stats = CacheStats()
        self.observer = observer  # observer(what, outcome) after every KDS fetch
        self._lock = threading.Lock()
        self._inflight: Dict[Hashable, concurrent.futures.Future] = {}  # type: ignore[type-arg]
        self._crl_failed_until: Dict[Tuple[Product, Endorser], datetime.datetime] = {}
        self.root.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(self.root)

    # -- paths -------------------------------------------------------------------

    def chain_dir(self, product: Product, endorser: Endorser) -> Path:
        return self.root / product.value / endorser.value

    def vcek_path(self, product: Product, chip_id: bytes, tcb: TcbVersion) -> Path:
        hwid = chip_id[:product.hwid_length].hex()
        return self.chain_dir(product, Endorser.VCEK) / "chips" / hwid / f"{tcb.raw:016x}.der"

    # -- single flight -------------------------------------------------------------

    def _coalesced(self, key: Hashable, produce: Callable[[], T]) -> T:
        """Run ``produce`` once for concurrent callers with the same key."""
        with self._lock:
            future = self._inflight.get(key)
            leader = future is None
            if future is None:
                future = concurrent.futures.Future()
                self._inflight[key] = future
        if not leader:
            result: T = future.result()
            return result
        try:
            value = produce()
        except BaseException as exc:
            future.set_exception(exc)
            raise
        else:
            future.set_result(value)
            return value
        finally:
            with self._lock:
                self._inflight.pop(key, None)

    # -- chain ---------------------------------------------------------------------

    def chain(self, product: Product, endorser: Endorser) -> Tuple[Certificate, Certificate]:
        """(ARK, ASK or ASVK) for a product, verified."""
        for directory in self.offline_dirs:
            found = self._chain_from_dir(directory, product, endorser)
            if found is not None:
                self.stats.offline_hits += 1
                return found
        found = self._chain_from_dir(self.chain_dir(product, endorser), product, endorser,
                                     evict=True)
        if found is not None:
            self.stats.hits += 1
            return found
        return self._coalesced(("chain", product, endorser),
                               lambda: self._fetch_chain(product, endorser))

    def _chain_from_dir(self, directory: Path, product: Product, endorser: Endorser,
                        *, evict: bool = False) -> Optional[Tuple[Certificate, Certificate]]:
        role = endorser.intermediate
        ark_path: Optional[Path] = directory / "ark.pem"
        inter_path: Optional[Path] = directory / f"{role}.pem"
        if not evict:  # a user's certs dir may hold .pem or .der
            ark_path = _first_existing(directory, "ark")
            inter_path = _first_existing(directory, role)
        if ark_path is None or inter_path is None or not ark_path.is_file() \
                or not inter_path.is_file():
            return None
        try:
            certs = [load_certificate(ark_path.read_bytes()),
                     load_certificate(inter_path.read_bytes())]
            return check_ca_chain(certs, product, endorser, roots=self.roots)
        except (OSError, CertificateFormatError, UntrustedCertificate):
            if evict:
                self._evict(ark_path, inter_path)
            return None

    def _fetch_chain(self, product: Product, endorser: Endorser) -> Tuple[Certificate,
                                                                          Certificate]:
        # Another caller may have stored it while we waited for the lock.
        found = self._chain_from_dir(self.chain_dir(product, endorser), product, endorser,
                                     evict=True)
        if found is not None:
            self.stats.hits += 1
            return found
        what = f"the {product} {endorser.name} certificate chain"
        body = self._fetch(lambda c: c.fetch_cert_chain(product, endorser), what)
        ark, inter = self._admit(what, lambda: check_ca_chain(
            load_certificates(body), product, endorser, roots=self.roots))
        directory = self.chain_dir(product, endorser)
        # The intermediate first: a reader needs both, and the ARK is what it checks last.
        _store(directory / f"{endorser.intermediate}.pem", inter.to_pem().encode())
        _store(directory / "ark.pem", ark.to_pem().encode())
        return ark, inter

    # -- VCEK ------------------------------------------------------------------------

    def vcek(self, product: Product, chip_id: bytes, tcb: TcbVersion) -> Certificate:
        """The VCEK for exactly this chip and reported TCB, verified against its ASK."""
        if len(chip_id) != 64:
            raise ValueError("chip_id must be the report's 64-byte CHIP_ID")
        if not any(chip_id):
            raise CertificatesUnavailable("CHIP_ID is masked: no VCEK can be looked up")
        _ark, ask = self.chain(product, Endorser.VCEK)
        for directory in self.offline_dirs:
            path = _first_existing(directory, "vcek")
            if path is None:
                continue
            cert = self._admit_vcek_file(path, product, chip_id, tcb, ask, evict=False)
            if cert is not None:
                self.stats.offline_hits += 1
                return cert
        path = self.vcek_path(product, chip_id, tcb)
        cert = self._admit_vcek_file(path, product, chip_id, tcb, ask, evict=True)
        if cert is not None:
            self.stats.hits += 1
            return cert
        key = ("vcek", product, hashlib.sha256(chip_id).hexdigest(), tcb.raw)
        return self._coalesced(key, lambda: self._fetch_vcek(product, chip_id, tcb, ask, path))

    def _admit_vcek_file(self, path: Path, product: Product, chip_id: bytes, tcb: TcbVersion,
                         ask: Certificate, *, evict: bool) -> Optional[Certificate]:
        if not path.is_file():
            return None
        try:
            cert = load_certificate(path.read_bytes())
            check_vcek_binding(cert, product, chip_id, tcb, intermediate=ask)
            return cert
        except (OSError, CertificateFormatError, UntrustedCertificate):
            if evict:
                self._evict(path)
            return None

    def _fetch_vcek(self, product: Product, chip_id: bytes, tcb: TcbVersion,
                    ask: Certificate, path: Path) -> Certificate:
        cert = self._admit_vcek_file(path, product, chip_id, tcb, ask, evict=True)
        if cert is not None:
            self.stats.hits += 1
            return cert
        what = f"the {product} VCEK for TCB {tcb}"
        body = self._fetch(lambda c: c.fetch_vcek(product, chip_id, tcb), what)

        def admit() -> Certificate:
            cert = load_certificate(body)
            check_vcek_binding(cert, product, chip_id, tcb, intermediate=ask)
            return cert

        cert = self._admit(what, admit)
        _store(path, cert.der)
        return cert

    # -- CRL ---------------------------------------------------------------------------

    def crl(self, product: Product, endorser: Endorser) -> Optional[Crl]:
        """The newest verified CRL: refreshed after its nextUpdate, the last good one kept
        when a refresh fails. None when no CRL could ever be had."""
        ark, _ = self.chain(product, endorser)
        path = self.chain_dir(product, endorser) / "crl.der"
        cached: Optional[Crl] = None
        if path.is_file():
            try:
                cached = load_crl(path.read_bytes())
                check_crl(cached, ark, product, roots=self.roots)
            except (OSError, CertificateFormatError, UntrustedCertificate):
                self._evict(path)
                cached = None
        for directory in self.offline_dirs:
            offline_path = _first_existing(directory, "crl")
            if offline_path is None:
                continue
            try:
                candidate = load_crl(offline_path.read_bytes())
                check_crl(candidate, ark, product, roots=self.roots)
            except (OSError, CertificateFormatError, UntrustedCertificate):
                continue
            if cached is None or candidate.this_update > cached.this_update:
                cached = candidate
        now = self.clock()
        fresh = cached is not None and (cached.next_update is None or now <= cached.next_update)
        if fresh or self.offline:
            return cached
        if now < self._crl_failed_until.get((product, endorser), now):
            return cached  # negative cache: a failing endpoint is not asked again yet
        try:
            return self._coalesced(("crl", product, endorser),
                                   lambda: self._fetch_crl(product, endorser, ark, path))
        except CertificatesUnavailable:
            self._crl_failed_until[(product, endorser)] = now + self.crl_retry_after
            return cached

    def _fetch_crl(self, product: Product, endorser: Endorser, ark: Certificate,
                   path: Path) -> Crl:
        what = f"the {product} {endorser.name} CRL"
        body = self._fetch(lambda c: c.fetch_crl(product, endorser), what)

        def admit() -> Crl:
            crl = load_crl(body)
            check_crl(crl, ark, product, roots=self.roots, at=self.clock())
            return crl

        crl = self._admit(what, admit)
        _store(path, crl.der)
        return crl

    # -- whole sets --------------------------------------------------------------------

    def certificates(self, product: Product, endorser: Endorser, *,
                     chip_id: Optional[bytes] = None, tcb: Optional[TcbVersion] = None,
                     with_crl: bool = False) -> CertificateSet:
        """The chain, the VCEK when ``chip_id`` and ``tcb`` are given, and the CRL if asked."""
        ark, inter = self.chain(product, endorser)
        found = {"ark": ark, endorser.intermediate: inter}
        if endorser is Endorser.VCEK and chip_id is not None and tcb is not None:
            found["vcek"] = self.vcek(product, chip_id, tcb)
        crl = self.crl(product, endorser) if with_crl else None
        return CertificateSet(crl=crl, **found)

    # -- helpers ---------------------------------------------------------------------------

    def _fetch(self, call: Callable[[KdsFetcher], bytes], what: str) -> bytes:
        if self.offline or self.client is None:
            raise CertificatesUnavailable(f"{what} is not cached and snpd is offline")
        self.stats.fetches += 1
        try:
            body = call(self.client)
        except CertificatesUnavailable as exc:
            self.stats.fetch_failures += 1
            if self.observer is not None:
                self.observer(what, f"failed: {exc}")
            raise
        if self.observer is not None:
            self.observer(what, f"fetched {len(body)} bytes")
        return body

    def _admit(self, what: str, admit: Callable[[], T]) -> T:
        """Run an admission check on a KDS answer; count and explain a rejection."""
        try:
            return admit()
        except (CertificateFormatError, UntrustedCertificate) as exc:
            self.stats.rejected += 1
            raise UntrustedCertificate(f"KDS answer for {what} rejected: {exc}") from exc

    def _evict(self, *paths: Path) -> None:
        for path in paths:
            try:
                path.unlink()
                self.stats.evicted += 1
            except OSError:
                pass


def _store(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, data)


def _first_existing(directory: Path, kind: str) -> Optional[Path]:
    for ext in ("pem", "der"):
        path = directory / f"{kind}.{ext}"
        if path.is_file():
            return path
    return None
