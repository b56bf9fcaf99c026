"""The emulated platform: what the guest was launched with (:class:`EmulatorConfig`)
and what the chip owns (:class:`EmulatorState`: keys, certificates, secrets).

The state lives in one directory so the emulator is the same machine across
restarts: same chain, same chip ID, same derived keys. Layout (dir mode 0700)::

    emulator.json        format, chip ID, creation time
    secrets.json   0600  chip/VLEK seeds and the VCEK- and VMRK-rooted key secrets
    keys/          0700  ark.key ask.key asvk.key (PKCS#8 PEM, 0600)
    certs/               ark.pem ask.pem asvk.pem vcek.pem vlek.pem crl.der (snpguest layout)

The VCEK and VLEK private keys are not stored: like AMD's, they are a function
of a secret and the TCB (``HMAC-SHA384(seed, product ‖ chip ‖ TCB)`` as a P-384
scalar), so a platform whose reported TCB changes gets a *different* endorsement
key, and a verifier that caches VCEKs without the TCB in the key fails here as
it would on hardware. On every load the certificates are checked against the
config and the keys; whatever does not match (product, chip ID, reported TCB,
a certificate close to expiry, a stale CRL, a half-finished earlier write) is
re-issued under the same ARK/ASK/ASVK keys, so verifiers that trust the
emulator's ARK keep trusting it.

Generating the three RSA-4096 keys takes seconds and happens once; loading them
costs a quarter second each on cryptography 38, so they are read only when
something must be re-signed (``EmulatorState.chain`` loads them on first use).
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import fcntl
import functools
import hashlib
import hmac
import json
import os
import secrets
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, Mapping, Optional, Tuple

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from snpd.abi.product import Endorser, Product
from snpd.emulator import pki
from snpd.emulator.launch import EmulatorConfig
from snpd.errors import CertificateFormatError
from snpd.files import atomic_write, remove_stale_temporaries
from snpd.trust.certset import CertificateSet
from snpd.trust.x509 import Certificate, Crl, load_certificate, load_crl

Now = Callable[[], datetime.datetime]

CRL_DAYS = 30
RENEW_MARGIN = datetime.timedelta(days=30)
_FORMAT = 1
# -- the persisted platform ------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Secrets:
    """What the chip (and the VM) keep secret. 32 bytes each."""

    chip_seed: bytes  # the VCEK's key and the chip ID derive from it
    vlek_seed: bytes  # the CSP's VLEK hashstick
    vcek_root: bytes  # root of VCEK-rooted derived keys
    vmrk_root: bytes  # root of VMRK-rooted derived keys (the VM root key)

    @classmethod
    def generate(cls) -> Secrets:
        return cls(*(secrets.token_bytes(32) for _ in range(4)))

    def to_json(self) -> Dict[str, str]:
        return {f.name: getattr(self, f.name).hex() for f in dataclasses.fields(self)}

    @classmethod
    def from_json(cls, data: Mapping[str, object]) -> Secrets:
        values = {}
        for f in dataclasses.fields(cls):
            raw = data.get(f.name)
            value = bytes.fromhex(raw) if isinstance(raw, str) else b""
            if len(value) != 32:
                raise ValueError(f"secret {f.name} is not 32 bytes")
            values[f.name] = value
        return cls(**values)


def derive_ec_key(seed: bytes, *parts: bytes) -> ec.EllipticCurvePrivateKey:
    """A P-384 key that is a function of ``seed`` and ``parts`` (as a VCEK is of the
    chip secret and the TCB)."""
    msg = b"".join(len(p).to_bytes(2, "big") + p for p in parts)
    digest = hmac.new(seed, msg, hashlib.sha512).digest()
    order = 0xFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFC7634D81F4372DDF581A0DB248B0A77AECEC196ACCC52973  # noqa: E501
    scalar = int.from_bytes(digest, "big") % (order - 1) + 1
    return ec.derive_private_key(scalar, ec.SECP384R1())


def chip_id_from_seed(seed: bytes) -> bytes:
    """A 64-byte chip identity; Turin reports show only its first 8 bytes."""
    return hmac.new(seed, b"snpd emulator: chip id", hashlib.sha512).digest()


def report_chip_id(product: Product, identity: bytes) -> bytes:
    """The chip's CHIP_ID as its product reports it (Turin: 8 bytes, then zeros)."""
    return identity[:8] + bytes(56) if product.turin_layout else identity


@dataclasses.dataclass(frozen=True)
class EmulatorState:
    """The emulated chip: its chain, endorsement keys and certificates, CRL, chip ID
    and derived-key roots, backed by ``state_dir``. Build with :meth:`load_or_create`."""

    config: EmulatorConfig
    state_dir: Path
    ark: Certificate
    ask: Certificate
    asvk: Certificate
    vcek_key: ec.EllipticCurvePrivateKey
    vcek: Certificate
    vlek_key: ec.EllipticCurvePrivateKey
    vlek: Certificate
    crl: Crl
    chip_id: bytes  # 64 bytes as the product reports it (never masked)
    secrets: Secrets = dataclasses.field(repr=False)

    @property
    def certs_dir(self) -> Path:
        """A snpguest-style certificate directory (ark/ask/asvk/vcek/vlek .pem, crl.der)."""
        return self.state_dir / "certs"

    @property
    def vcek_root(self) -> bytes:
        return self.secrets.vcek_root

    @property
    def vmrk_root(self) -> bytes:
        return self.secrets.vmrk_root

    @functools.cached_property
    def chain(self) -> pki.Chain:
        """The chain with its private keys (read from disk on first use: slow for 4096 bits)."""
        keys = _load_rsa_keys(self.state_dir / "keys")
        return pki.Chain(self.config.product, *keys, self.ark, self.ask, self.asvk)

    @property
    def signing_key(self) -> ec.EllipticCurvePrivateKey:
        return self.vcek_key if self.config.signer == "vcek" else self.vlek_key

    def certificates(self, endorser: Optional[Endorser] = None) -> CertificateSet:
        """ARK, the intermediate, the endorsement key (of ``endorser``, default the
        configured signer) and the CRL."""
        endorser = endorser or self.config.endorser
        if endorser is Endorser.VCEK:
            return CertificateSet(ark=self.ark, ask=self.ask, vcek=self.vcek, crl=self.crl)
        return CertificateSet(ark=self.ark, asvk=self.asvk, vlek=self.vlek, crl=self.crl)

    @classmethod
    def load_or_create(
        cls,
        state_dir: Path,
        config: EmulatorConfig,
        *,
        now: Now,
        rsa_bits: int = 4096,
    ) -> EmulatorState:
        """Load the platform from ``state_dir``, creating it on first use and
        re-issuing whatever no longer matches ``config`` (see the module docstring).
        ``rsa_bits`` applies only when keys are generated (tests use 2048)."""
        state_dir = Path(state_dir)
        state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        with _locked(state_dir):
            remove_stale_temporaries(state_dir)
            return _Loader(state_dir, config, now(), rsa_bits).run()


@contextlib.contextmanager
def _locked(state_dir: Path) -> Iterator[None]:
    """One process at a time creates or repairs a state directory. O_NOFOLLOW: root may
    run this on the daemon's state directory, where user snpd could plant a link that
    O_CREAT would otherwise follow to create or open a file anywhere."""
    fd = os.open(state_dir / ".lock",
                 os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _pem_key(key: Any) -> bytes:
    data: bytes = key.private_bytes(serialization.Encoding.PEM,
                                    serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption())
    return data


def _load_rsa_keys(keys_dir: Path) -> Tuple[Any, Any, Any]:
    loaded = tuple(serialization.load_pem_private_key((keys_dir / f"{n}.key").read_bytes(), None)
                   for n in ("ark", "ask", "asvk"))
    return loaded[0], loaded[1], loaded[2]


def _same_key(cert: Certificate, key: Any) -> bool:
    spki: bytes = key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return cert.spki == spki


class _Loader:
    """One load_or_create run: read what is there, decide what to (re)issue, write it."""

    def __init__(self, state_dir: Path, config: EmulatorConfig, now: datetime.datetime,
                 rsa_bits: int) -> None:
        if now.tzinfo is None:
            raise ValueError("now() must return a timezone-aware datetime")
        self.dir = state_dir
        self.keys_dir = state_dir / "keys"
        self.certs_dir = state_dir / "certs"
        self.config = config
        self.product = config.product
        self.now = now
        self.rsa_bits = rsa_bits
        self._chain: Optional[pki.Chain] = None

    def run(self) -> EmulatorState:
        meta = self._read_json("emulator.json")
        found_secrets: Optional[Secrets] = None
        if meta is not None and meta.get("format") == _FORMAT:
            try:
                found_secrets = Secrets.from_json(self._read_json("secrets.json") or {})
            except ValueError:
                found_secrets = None
        if found_secrets is None or not all(
                (self.keys_dir / f"{n}.key").is_file() for n in ("ark", "ask", "asvk")):
            return self._create()
        chip = self.config.chip_id or report_chip_id(self.product,
                                                     chip_id_from_seed(found_secrets.chip_seed))
        return self._repair(found_secrets, chip)

    # -- first use ------------------------------------------------------------

    def _create(self) -> EmulatorState:
        for d in (self.keys_dir, self.certs_dir):
            d.mkdir(mode=0o700 if d == self.keys_dir else 0o755, exist_ok=True)
        found = Secrets.generate()
        chain = pki.make_chain(self.product, now=self.now, rsa_bits=self.rsa_bits)
        for name, key in (("ark", chain.ark_key), ("ask", chain.ask_key),
                          ("asvk", chain.asvk_key)):
            self._write(self.keys_dir / f"{name}.key", _pem_key(key), mode=0o600)
        self._write(self.dir / "secrets.json", _json(found.to_json()), mode=0o600)
        self._chain = chain
        identity = chip_id_from_seed(found.chip_seed)
        chip = self.config.chip_id or report_chip_id(self.product, identity)
        for name, cert in (("ark", chain.ark), ("ask", chain.ask), ("asvk", chain.asvk)):
            self._write_cert(name, cert)
        vcek_key, vcek = self._issue_vcek(found, chip)
        vlek_key, vlek = self._issue_vlek(found)
        crl = self._issue_crl()
        # Written last: its presence says the rest is complete.
        self._write(self.dir / "emulator.json", _json({
            "format": _FORMAT, "chip_id": identity.hex(),
            "created": self.now.isoformat()}))
        state = EmulatorState(self.config, self.dir, chain.ark, chain.ask, chain.asvk,
                              vcek_key, vcek, vlek_key, vlek, crl, chip, found)
        state.__dict__["chain"] = chain
        return state

    # -- later loads ----------------------------------------------------------

    def _repair(self, found: Secrets, chip: bytes) -> EmulatorState:
        ark, ask, asvk = (self._read_cert(n) for n in ("ark", "ask", "asvk"))
        if not (ark and ask and asvk and self._chain_matches(ark, ask, asvk)):
            chain = self.chain()
            ark, ask, asvk = chain.ark, chain.ask, chain.asvk
            for name, cert in (("ark", ark), ("ask", ask), ("asvk", asvk)):
                self._write_cert(name, cert)
        vcek_key, vlek_key = self._vcek_key(found, chip), self._vlek_key(found)
        vcek = self._read_cert("vcek")
        if not (vcek and vcek.issuer.der == ask.subject.der and _same_key(vcek, vcek_key)
                and self._fresh(vcek)):
            vcek_key, vcek = self._issue_vcek(found, chip)
        vlek = self._read_cert("vlek")
        if not (vlek and vlek.issuer.der == asvk.subject.der and _same_key(vlek, vlek_key)
                and self._fresh(vlek)):
            vlek_key, vlek = self._issue_vlek(found)
        crl = self._read_crl()
        if crl is None or crl.issuer.der != ark.subject.der or crl.next_update is None or (
                crl.next_update - self.now < datetime.timedelta(days=CRL_DAYS / 2)):
            crl = self._issue_crl()
        state = EmulatorState(self.config, self.dir, ark, ask, asvk, vcek_key, vcek,
                              vlek_key, vlek, crl, chip, found)
        if self._chain is not None:
            state.__dict__["chain"] = self._chain
        return state

    def _chain_matches(self, ark: Certificate, ask: Certificate, asvk: Certificate) -> bool:
        """The stored chain is this product's and still fresh. Checked without the
        private keys (slow to load); the key files and certs are written together."""
        names = (ark.subject.common_name, ask.subject.common_name, asvk.subject.common_name)
        if names != (f"ARK-{self.product}", f"SEV-{self.product}", f"SEV-VLEK-{self.product}"):
            return False
        if ask.issuer.der != ark.subject.der or asvk.issuer.der != ark.subject.der:
            return False
        return self._fresh(ark) and self._fresh(ask) and self._fresh(asvk)

    def chain(self) -> pki.Chain:
        """The chain for this product, re-issued under the stored keys when needed."""
        if self._chain is None:
            keys = _load_rsa_keys(self.keys_dir)
            ark, ask, asvk = (self._read_cert(n) for n in ("ark", "ask", "asvk"))
            if (ark and ask and asvk and self._chain_matches(ark, ask, asvk)
                    and all(_same_key(c, k) for c, k in zip((ark, ask, asvk), keys))):
                self._chain = pki.Chain(self.product, *keys, ark, ask, asvk)
            else:
                self._chain = pki.make_chain(self.product, now=self.now, keys=keys)
        return self._chain

    def _fresh(self, cert: Certificate) -> bool:
        return cert.not_before <= self.now and self.now + RENEW_MARGIN <= cert.not_after

    # -- issuing --------------------------------------------------------------

    def _vcek_key(self, found: Secrets, chip: bytes) -> ec.EllipticCurvePrivateKey:
        tcb = self.config.tcb("reported").raw.to_bytes(8, "little")
        return derive_ec_key(found.chip_seed, b"VCEK", self.product.value.encode(), chip, tcb)

    def _vlek_key(self, found: Secrets) -> ec.EllipticCurvePrivateKey:
        tcb = self.config.tcb("reported").raw.to_bytes(8, "little")
        return derive_ec_key(found.vlek_seed, b"VLEK", self.product.value.encode(), tcb)

    def _issue_vcek(self, found: Secrets, chip: bytes
                    ) -> Tuple[ec.EllipticCurvePrivateKey, Certificate]:
        key = self._vcek_key(found, chip)
        _, cert = pki.make_vcek(self.chain(), chip, self.config.tcb("reported"), now=self.now,
                                key=key)
        self._write_cert("vcek", cert)
        return key, cert

    def _issue_vlek(self, found: Secrets) -> Tuple[ec.EllipticCurvePrivateKey, Certificate]:
        key = self._vlek_key(found)
        _, cert = pki.make_vlek(self.chain(), self.config.tcb("reported"), now=self.now,
                                key=key)
        self._write_cert("vlek", cert)
        return key, cert

    def _issue_crl(self) -> Crl:
        crl = pki.make_crl(self.chain(), now=self.now,
                           next_update=self.now + datetime.timedelta(days=CRL_DAYS))
        self._write(self.certs_dir / "crl.der", crl.der)
        return crl

    # -- files ----------------------------------------------------------------

    def _write(self, path: Path, data: bytes, mode: int = 0o644) -> None:
        """files.atomic_write inside the state directory, which is followed as
        configured. A link below it is refused: root may run this on the daemon's
        directory, where user snpd could plant one."""
        atomic_write(path, data, mode, within=self.dir)

    def _write_cert(self, name: str, cert: Certificate) -> None:
        self.certs_dir.mkdir(mode=0o755, exist_ok=True)
        self._write(self.certs_dir / f"{name}.pem", cert.to_pem().encode())

    def _read_cert(self, name: str) -> Optional[Certificate]:
        try:
            return load_certificate((self.certs_dir / f"{name}.pem").read_bytes())
        except (FileNotFoundError, CertificateFormatError):
            return None

    def _read_crl(self) -> Optional[Crl]:
        try:
            return load_crl((self.certs_dir / "crl.der").read_bytes())
        except (FileNotFoundError, CertificateFormatError):
            return None

    def _read_json(self, name: str) -> Optional[Dict[str, object]]:
        """The parsed file, or None when it is missing or damaged (then it is rewritten)."""
        try:
            data = json.loads((self.dir / name).read_text(encoding="utf-8"))
        except (FileNotFoundError, ValueError):
            return None
        return data if isinstance(data, dict) else None


def _json(data: Mapping[str, object]) -> bytes:
    return (json.dumps(data, indent=2, sort_keys=True) + "\n").encode()
