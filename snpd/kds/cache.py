"""A persistent, verified certificate cache in front of the KDS.

Lookups go: read-only offline dirs (snpguest certs-dir layout) first, then the
cache directory, then the KDS (unless offline). Nothing is stored before it is
verified against the trusted roots and, for a VCEK, bound to the exact chip and
TCB it is stored under, so a bad KDS answer can only cause a rejection, never a
poisoned cache. Entries are re-verified when read; an entry that no longer
verifies is removed and fetched again. Files are written atomically. Concurrent
misses for one key are coalesced into one fetch, and a failed VCEK lookup is
remembered for a while (snpd/kds/negative.py) so that repeats cost no request.

With a THIM source (Azure's KDS cache, snpd/kds/thim.py), a VCEK miss asks THIM
first: its answer is admitted exactly as a KDS answer is (the chain to the pinned
roots, the VCEK's chip, TCB and signature), and anything it cannot vouch for (another
TCB, another chip, a bad signature, garbage, no answer) falls through to the KDS.

Every lookup takes a ``gate``, called just before an outbound fetch with what is
about to be fetched: it may refuse by raising. :func:`cache_only` is the gate of a
lookup that must not leave the machine (the daemon answers those without entering
its KDS pool; :class:`NotCached` says the KDS would be needed); the daemon's
per-uid budget (snpd/kds/budget.py) is another.

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
from snpd.errors import (
    CertificateFormatError,
    CertificatesUnavailable,
    KdsError,
    UntrustedCertificate,
)
from snpd.files import atomic_write, remove_stale_temporaries, unlink_within
from snpd.kds.negative import NegativeCache
from snpd.kds.thim import ThimAnswer
from snpd.trust.admission import check_ca_chain, check_crl, check_vcek_binding
from snpd.trust.certset import CertificateSet
from snpd.trust.roots import AMD_ROOTS, TrustRoots
from snpd.trust.x509 import Certificate, Crl, load_certificate, load_certificates, load_crl


class KdsFetcher(Protocol):
    """What the cache needs of a KDS client (snpd.kds.client.KdsFetcher, or a lazy one)."""

    def fetch_cert_chain(self, product: Product, endorser: Endorser) -> bytes: ...

    def fetch_vcek(self, product: Product, chip_id: bytes, tcb: TcbVersion) -> bytes: ...

    def fetch_crl(self, product: Product, endorser: Endorser) -> bytes: ...


class ThimFetcher(Protocol):
    """What the cache needs of a THIM source (snpd.kds.thim.ThimSource)."""

    def fetch(self) -> ThimAnswer: ...


T = TypeVar("T")
Clock = Callable[[], datetime.datetime]
#: Called with a description of what is about to be fetched, before the request;
#: raises to refuse it (nothing is sent, nothing is remembered as a KDS failure).
FetchGate = Callable[[str], None]


class NotCached(CertificatesUnavailable):
    """A cache-only lookup needed the KDS: ask again where fetching is allowed."""


def cache_only(what: str) -> None:
    """The gate of a lookup answered from the caches alone."""
    raise NotCached(f"{what} is not cached")


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
    negative_hits: int = 0
    thim_hits: int = 0  # VCEKs (with their chain) admitted from THIM
    thim_fallbacks: int = 0  # THIM asked, the KDS needed: no answer, or not admitted

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
        negative: Optional[NegativeCache] = None,
        thim: Optional[ThimFetcher] = None,
    ) -> None:
        self.root = Path(root)
        self.client = client
        self.thim = thim  # asked before the KDS for a VCEK (never when offline)
        self.offline_dirs = tuple(Path(d) for d in offline_dirs)
        self.offline = offline or client is None
        self.roots = roots
        self.clock = clock
        self.crl_retry_after = crl_retry_after
        self.stats = CacheStats()
        self.observer = observer  # observer(what, outcome) after every KDS fetch
        self.negative = negative if negative is not None else NegativeCache()
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

    def _coalesced(self, key: Hashable, produce: Callable[[], T], what: str,
                   gate: Optional[FetchGate]) -> T:
        """Run ``produce`` once for concurrent callers with the same key. A cache-only
        lookup neither joins nor leads: it would wait on the network, or hand its
        NotCached to callers that may fetch."""
        if gate is cache_only:
            raise NotCached(f"{what} is not cached")
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

    def chain(self, product: Product, endorser: Endorser, *, gate: Optional[FetchGate] = None
              ) -> Tuple[Certificate, Certificate]:
        """(ARK, ASK or ASVK) for a product, verified."""
        found = self._cached_chain(product, endorser)
        if found is not None:
            return found
        return self._coalesced(("chain", product, endorser),
                               lambda: self._fetch_chain(product, endorser, gate),
                               _chain_what(product, endorser), gate)

    def _cached_chain(self, product: Product, endorser: Endorser
                      ) -> Optional[Tuple[Certificate, Certificate]]:
        """The chain from the offline dirs or the cache, verified; None when neither has it."""
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

    def _fetch_chain(self, product: Product, endorser: Endorser, gate: Optional[FetchGate]
                     ) -> Tuple[Certificate, Certificate]:
        # Another caller may have stored it while we waited for the lock.
        found = self._chain_from_dir(self.chain_dir(product, endorser), product, endorser,
                                     evict=True)
        if found is not None:
            self.stats.hits += 1
            return found
        what = _chain_what(product, endorser)
        body = self._fetch(lambda c: c.fetch_cert_chain(product, endorser), what, gate)
        ark, inter = self._admit(what, lambda: check_ca_chain(
            load_certificates(body), product, endorser, roots=self.roots))
        self._store_chain(product, endorser, ark, inter)
        return ark, inter

    def _store_chain(self, product: Product, endorser: Endorser, ark: Certificate,
                     inter: Certificate) -> None:
        directory = self.chain_dir(product, endorser)
        # The intermediate first: a reader needs both, and the ARK is what it checks last.
        self._store(directory / f"{endorser.intermediate}.pem", inter.to_pem().encode())
        self._store(directory / "ark.pem", ark.to_pem().encode())

    # -- VCEK ------------------------------------------------------------------------

    def vcek(self, product: Product, chip_id: bytes, tcb: TcbVersion, *,
             gate: Optional[FetchGate] = None) -> Certificate:
        """The VCEK for exactly this chip and reported TCB, verified against its ASK.
        A lookup that failed recently fails again at once, without a request."""
        if len(chip_id) != 64:
            raise ValueError("chip_id must be the report's 64-byte CHIP_ID")
        if not any(chip_id):
            raise CertificatesUnavailable("CHIP_ID is masked: no VCEK can be looked up")
        # The KDS knows a chip by its hwid (all 64 bytes but on Turin); the key holds a
        # digest of it, never the ID itself.
        hwid = hashlib.sha256(chip_id[:product.hwid_length]).hexdigest()
        key = ("vcek", product, hwid, tcb.raw)
        what = f"the {product} VCEK for TCB {tcb}"
        path = self.vcek_path(product, chip_id, tcb)
        thim_key = ("thim", *key[1:])
        if self._thim_worth_asking(thim_key, gate):
            chain = self._cached_chain(product, Endorser.VCEK)
            if chain is not None:
                cert = self._cached_vcek(product, chip_id, tcb, chain[1], path)
                if cert is not None:
                    return cert
            self._check_negative(key, what)
            from_thim = self._coalesced(thim_key, lambda: self._vcek_from_thim(
                product, chip_id, tcb, path, what, gate, thim_key), what, gate)
            if from_thim is not None:
                return from_thim
        _ark, ask = self.chain(product, Endorser.VCEK, gate=gate)
        cert = self._cached_vcek(product, chip_id, tcb, ask, path)
        if cert is not None:
            return cert
        self._check_negative(key, what)
        try:
            return self._coalesced(key, lambda: self._fetch_vcek(product, chip_id, tcb, ask,
                                                                 path, what, gate),
                                   what, gate)
        except (KdsError, UntrustedCertificate) as exc:
            self.negative.remember(key, exc)
            raise

    def _check_negative(self, key: Hashable, what: str) -> None:
        try:
            self.negative.check(key, what)
        except KdsError:
            self.stats.negative_hits += 1
            raise

    def _cached_vcek(self, product: Product, chip_id: bytes, tcb: TcbVersion,
                     ask: Certificate, path: Path) -> Optional[Certificate]:
        """The VCEK from the offline dirs or the cache at ``path``, verified, or None."""
        for directory in self.offline_dirs:
            found = _first_existing(directory, "vcek")
            if found is None:
                continue
            cert = self._admit_vcek_file(found, product, chip_id, tcb, ask, evict=False)
            if cert is not None:
                self.stats.offline_hits += 1
                return cert
        cert = self._admit_vcek_file(path, product, chip_id, tcb, ask, evict=True)
        if cert is not None:
            self.stats.hits += 1
        return cert

    def _thim_worth_asking(self, thim_key: Hashable, gate: Optional[FetchGate]) -> bool:
        """THIM is configured, fetching is allowed, and it did not fail this VCEK lately
        (it holds one VCEK: a report from another chip or TCB would ask it again and
        again for nothing)."""
        if self.thim is None or self.offline or gate is cache_only:
            return False
        try:
            self.negative.check(thim_key, "THIM")
        except KdsError:
            return False
        return True

    def _vcek_from_thim(self, product: Product, chip_id: bytes, tcb: TcbVersion,
                        path: Path, what: str, gate: Optional[FetchGate],
                        thim_key: Hashable) -> Optional[Certificate]:
        """The VCEK from THIM, admitted as a KDS answer would be, and stored with its
        chain when the cache had none; None (the KDS is asked next, and THIM not again
        for this VCEK for a while) when THIM has no VCEK this cache can vouch for.
        Only the gate's refusal is raised."""
        assert self.thim is not None
        # Another caller may have stored it while we waited.
        chain = self._cached_chain(product, Endorser.VCEK)
        if chain is not None:
            cert = self._cached_vcek(product, chip_id, tcb, chain[1], path)
            if cert is not None:
                return cert
        source = f"{what} from THIM"
        if gate is not None:
            gate(source)  # IMDS is rate-limited too: the caller's budget pays for it
        try:
            answer = self.thim.fetch()
            if answer.tcbm != tcb.raw:
                # THIM caches the host's current TCB only: not for this report.
                raise CertificatesUnavailable(
                    f"THIM serves the VCEK for TCB {answer.tcbm:016x}, not {tcb.raw:016x}")
            new_chain = chain is None
            if chain is None:
                chain = self._admit(source, lambda: check_ca_chain(
                    answer.chain, product, Endorser.VCEK, roots=self.roots))
            ark, ask = chain
            self._admit(source, lambda: check_vcek_binding(answer.vcek, product, chip_id,
                                                           tcb, intermediate=ask))
        except (CertificatesUnavailable, CertificateFormatError) as exc:
            self.stats.thim_fallbacks += 1
            self.negative.remember(thim_key, exc if isinstance(exc, CertificatesUnavailable)
                                   else CertificatesUnavailable(str(exc)))
            if self.observer is not None:
                # "failed": the daemon coalesces these (one per forged chip ID, say)
                self.observer(source, f"failed, so the KDS is asked: {exc}")
            return None
        if new_chain:
            self._store_chain(product, Endorser.VCEK, ark, ask)
        self._store(path, answer.vcek.der)
        self.stats.thim_hits += 1
        if self.observer is not None:
            self.observer(source, "admitted")
        return answer.vcek

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
                    ask: Certificate, path: Path, what: str, gate: Optional[FetchGate]
                    ) -> Certificate:
        cert = self._admit_vcek_file(path, product, chip_id, tcb, ask, evict=True)
        if cert is not None:
            self.stats.hits += 1
            return cert
        body = self._fetch(lambda c: c.fetch_vcek(product, chip_id, tcb), what, gate)

        def admit() -> Certificate:
            cert = load_certificate(body)
            check_vcek_binding(cert, product, chip_id, tcb, intermediate=ask)
            return cert

        cert = self._admit(what, admit)
        self._store(path, cert.der)
        return cert

    # -- CRL ---------------------------------------------------------------------------

    def crl(self, product: Product, endorser: Endorser, *, gate: Optional[FetchGate] = None
            ) -> Optional[Crl]:
        """The newest verified CRL: refreshed after its nextUpdate, the last good one kept
        when a refresh fails. None when no CRL could ever be had."""
        ark, _ = self.chain(product, endorser, gate=gate)
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
        what = f"the {product} {endorser.name} CRL"
        try:
            return self._coalesced(("crl", product, endorser), lambda: self._fetch_crl(
                product, endorser, ark, path, what, gate), what, gate)
        except NotCached:
            raise  # not a failure of the endpoint: the caller asks again, fetching
        except CertificatesUnavailable:
            self._crl_failed_until[(product, endorser)] = now + self.crl_retry_after
            return cached

    def _fetch_crl(self, product: Product, endorser: Endorser, ark: Certificate,
                   path: Path, what: str, gate: Optional[FetchGate]) -> Crl:
        body = self._fetch(lambda c: c.fetch_crl(product, endorser), what, gate)

        def admit() -> Crl:
            crl = load_crl(body)
            check_crl(crl, ark, product, roots=self.roots, at=self.clock())
            return crl

        crl = self._admit(what, admit)
        self._store(path, crl.der)
        return crl

    # -- whole sets --------------------------------------------------------------------

    def certificates(self, product: Product, endorser: Endorser, *,
                     chip_id: Optional[bytes] = None, tcb: Optional[TcbVersion] = None,
                     with_crl: bool = False, gate: Optional[FetchGate] = None
                     ) -> CertificateSet:
        """The chain, the VCEK when ``chip_id`` and ``tcb`` are given, and the CRL if asked.
        With ``gate=cache_only``, what the caches alone can answer, or NotCached."""
        found: Dict[str, Certificate] = {}
        if endorser is Endorser.VCEK and chip_id is not None and tcb is not None:
            # First: from THIM, the VCEK brings its chain along.
            found["vcek"] = self.vcek(product, chip_id, tcb, gate=gate)
        ark, inter = self.chain(product, endorser, gate=gate)
        found.update({"ark": ark, endorser.intermediate: inter})
        crl = self.crl(product, endorser, gate=gate) if with_crl else None
        return CertificateSet(crl=crl, **found)

    # -- helpers ---------------------------------------------------------------------------

    def _fetch(self, call: Callable[[KdsFetcher], bytes], what: str,
               gate: Optional[FetchGate]) -> bytes:
        if self.offline or self.client is None:
            raise CertificatesUnavailable(f"{what} is not cached and snpd is offline")
        if gate is not None:
            gate(what)
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

    def _store(self, path: Path, data: bytes) -> None:
        """Store below the cache root, creating and entering its subdirectories without
        following links: when root runs the cache on a directory another user can
        write, a link planted there must not lead root's write elsewhere."""
        atomic_write(path, data, within=self.root)

    def _evict(self, *paths: Path) -> None:
        for path in paths:
            try:
                unlink_within(path, self.root)  # as _store: no planted link followed
                self.stats.evicted += 1
            except OSError:
                pass




def _chain_what(product: Product, endorser: Endorser) -> str:
    return f"the {product} {endorser.name} certificate chain"


def _first_existing(directory: Path, kind: str) -> Optional[Path]:
    for ext in ("pem", "der"):
        path = directory / f"{kind}.{ext}"
        if path.is_file():
            return path
    return None
