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
from typing import TYPE_CHECKING, Any, Callable, Dict, Iterator, Mapping, Optional, Sequence, Tuple

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from snpd.abi.product import Endorser, Product
from snpd.abi.report import FirmwareVersion
from snpd.abi.tcb import TcbVersion
from snpd.emulator import pki
from snpd.errors import CertificateFormatError, ConfigError
from snpd.files import atomic_write, remove_stale_temporaries
from snpd.trust.certset import CertificateSet
from snpd.trust.x509 import Certificate, Crl, load_certificate, load_crl

if TYPE_CHECKING:
    from snpd.emulator.firmware import DeviceFault

Now = Callable[[], datetime.datetime]

REPORT_VERSIONS = (2, 3, 5)
SIGNERS = ("vcek", "vlek")
HOST_CERTS = ("table", "empty")
KERNELS = ("6.3", "6.2", "6.0")
DEVICES = ("present", "absent", "denied")
POLICY_RESERVED_ONE = 1 << 17

DEFAULT_TCB: Dict[Product, Dict[str, int]] = {
    Product.MILAN: dict(bootloader=4, tee=0, snp=24, microcode=217),
    Product.GENOA: dict(bootloader=10, tee=0, snp=23, microcode=84),
    Product.TURIN: dict(fmc=1, bootloader=1, tee=0, snp=2, microcode=71),
}
DEFAULT_FIRMWARE = FirmwareVersion(major=1, minor=58, build=1)
DEFAULT_MEASUREMENT = hashlib.sha384(b"snpd emulator: launch measurement").digest()

CRL_DAYS = 30
RENEW_MARGIN = datetime.timedelta(days=30)
_FORMAT = 1
_TCB_NAMES = ("reported", "current", "committed", "launch")


def default_tcb(product: Product) -> TcbVersion:
    return TcbVersion.from_parts(product, **DEFAULT_TCB[product])


FAULT_KINDS = ("busy", "host_error", "fw_error", "body_status", "tamper", "invalid_len",
               "wipe", "latency")


@dataclasses.dataclass(frozen=True)
class FaultSpec:
    """A fault as the emulator configuration schedules it:
    ``{kind = "wipe", after = 3}`` or ``{kind = "busy", count = 4, after = 1}``.
    ``count`` 0 means every exchange from then on."""

    kind: str
    count: int = 1
    after: int = 0
    status: int = 0x16
    pages: int = 4
    seconds: float = 0.0

    def fault(self) -> DeviceFault:
        from snpd.emulator.firmware import DeviceFault

        builders: Dict[str, Callable[[], DeviceFault]] = {
            "busy": DeviceFault.busy, "host_error": DeviceFault.host_error,
            "fw_error": lambda: DeviceFault.fw_error(self.status),
            "body_status": lambda: DeviceFault.body_status(self.status),
            "tamper": DeviceFault.tamper, "wipe": DeviceFault.wipe,
            "invalid_len": lambda: DeviceFault.invalid_len(self.pages),
            "latency": lambda: DeviceFault.latency(self.seconds),
        }
        return builders[self.kind]()

    @property
    def times(self) -> Optional[int]:
        return self.count or None



@dataclasses.dataclass(frozen=True)
class EmulatorConfig:
    """The launched guest and its platform, as a report would show them.

    ``None`` means "derived": ``vmpck_id`` defaults to ``guest_vmpl`` (the kernel's
    default since 6.11), ``id_block_svn`` to ``guest_svn``, the reported TCB to a
    typical one for the product and the other TCBs to the reported one, ``chip_id``
    to the one the state directory generated. Resolved values are the properties
    ``vmpck``, ``key_svn_limit`` and :meth:`tcb`; the fields keep what was asked
    for, so ``dataclasses.replace(config, product=...)`` stays coherent.

    ``kernel`` picks the sev-guest driver generation the ioctl model follows:
    "6.3" (6.3 and later: BUSY retried for 60 s), "6.2" (6.1-6.2: BUSY wipes the
    VMPCK at once) or "6.0" (5.19-6.0: errors do not wipe and INVALID_LEN does not
    consume the sequence number). ``host_certs`` "table" makes extended reports
    carry the chain and CRL, "empty" is upstream KVM's 24-byte terminator.
    ``device`` "absent"/"denied" makes opening ``/dev/sev-guest`` fail.
    """

    product: Product = Product.GENOA
    report_version: int = 5
    guest_vmpl: int = 0
    vmpck_id: Optional[int] = None
    measurement: bytes = DEFAULT_MEASUREMENT
    policy: int = 0x30000
    host_data: bytes = bytes(32)
    family_id: bytes = bytes(16)
    image_id: bytes = bytes(16)
    id_key_digest: bytes = bytes(48)
    author_key_digest: bytes = bytes(48)
    guest_svn: int = 0
    id_block_svn: Optional[int] = None
    reported_tcb: Optional[TcbVersion] = None
    current_tcb: Optional[TcbVersion] = None
    committed_tcb: Optional[TcbVersion] = None
    launch_tcb: Optional[TcbVersion] = None
    current_firmware: FirmwareVersion = DEFAULT_FIRMWARE
    committed_firmware: FirmwareVersion = DEFAULT_FIRMWARE
    platform_info: int = 0x25
    launch_mit_vector: int = 0
    current_mit_vector: int = 0
    signer: str = "vcek"
    mask_chip_id: bool = False
    host_certs: str = "table"
    kernel: str = "6.3"
    device: str = "present"
    chip_id: Optional[bytes] = None
    latency: float = 0.0
    faults: Tuple[FaultSpec, ...] = ()

    def __post_init__(self) -> None:
        if not isinstance(self.product, Product):
            raise _error("product", f"expected a Product, got {self.product!r}")
        _choice("report_version", self.report_version, REPORT_VERSIONS)
        _choice("signer", self.signer, SIGNERS)
        _choice("host_certs", self.host_certs, HOST_CERTS)
        _choice("kernel", self.kernel, KERNELS)
        _choice("device", self.device, DEVICES)
        _uint("guest_vmpl", self.guest_vmpl, 3)
        if self.vmpck_id is not None:
            _uint("vmpck_id", self.vmpck_id, 3)
            if self.vmpck_id < self.guest_vmpl:
                raise _error("vmpck_id", f"VMPCK{self.vmpck_id} is not available to a guest at "
                             f"VMPL{self.guest_vmpl} (its secrets page holds it zeroed)")
        for name, size in (("measurement", 48), ("host_data", 32), ("family_id", 16),
                           ("image_id", 16), ("id_key_digest", 48), ("author_key_digest", 48)):
            value = getattr(self, name)
            if not isinstance(value, bytes) or len(value) != size:
                raise _error(name, f"expected {size} bytes")
        _uint("policy", self.policy, (1 << 64) - 1)
        if not self.policy & POLICY_RESERVED_ONE:
            raise _error("policy", f"0x{self.policy:x} has bit 17 clear; it is reserved and "
                         "must be 1 (the firmware refuses to launch such a guest)")
        _uint("guest_svn", self.guest_svn, (1 << 32) - 1)
        if self.id_block_svn is not None:
            _uint("id_block_svn", self.id_block_svn, (1 << 32) - 1)
        for which in _TCB_NAMES:
            tcb = getattr(self, f"{which}_tcb")
            if tcb is None:
                continue
            if not isinstance(tcb, TcbVersion):
                raise _error(f"{which}_tcb", f"expected a TcbVersion, got {tcb!r}")
            if tcb.turin_layout != self.product.turin_layout:
                raise _error(f"{which}_tcb", f"{tcb} is in the "
                             f"{'Turin' if tcb.turin_layout else 'Milan/Genoa'} layout, "
                             f"not {self.product}'s")
        for name in ("current_firmware", "committed_firmware"):
            fw = getattr(self, name)
            if not isinstance(fw, FirmwareVersion) or not all(
                    0 <= v <= 255 for v in (fw.major, fw.minor, fw.build)):
                raise _error(name, "expected a FirmwareVersion of bytes")
        for name in ("platform_info", "launch_mit_vector", "current_mit_vector"):
            _uint(name, getattr(self, name), (1 << 64) - 1)
        if not isinstance(self.mask_chip_id, bool):
            raise _error("mask_chip_id", "expected a boolean")
        if self.chip_id is not None:
            _check_chip_id(self.product, self.chip_id)
        if (isinstance(self.latency, bool) or not isinstance(self.latency, (int, float))
                or not 0 <= self.latency <= 3600):
            raise _error("latency", "expected seconds between 0 and 3600")
        if not isinstance(self.faults, tuple) or not all(
                isinstance(f, FaultSpec) for f in self.faults):
            raise _error("faults", "expected a tuple of FaultSpec")

    # -- resolved values ------------------------------------------------------

    @property
    def vmpck(self) -> int:
        """The VMPCK the driver uses: ``vmpck_id``, else the guest's VMPL (kernel ≥ 6.11)."""
        return self.guest_vmpl if self.vmpck_id is None else self.vmpck_id

    @property
    def key_svn_limit(self) -> int:
        """The highest guest_svn a key request may name: the ID block's SVN."""
        return self.guest_svn if self.id_block_svn is None else self.id_block_svn

    @property
    def endorser(self) -> Endorser:
        return Endorser(self.signer)

    def tcb(self, which: str) -> TcbVersion:
        """``reported``, ``current``, ``committed`` or ``launch``, defaults resolved."""
        if which not in _TCB_NAMES:
            raise ValueError(f"no TCB named {which!r}")
        value: Optional[TcbVersion] = getattr(self, f"{which}_tcb")
        if value is None and which != "reported":
            value = self.reported_tcb
        return value if value is not None else default_tcb(self.product)

    # -- loading --------------------------------------------------------------

    @classmethod
    def from_mapping(cls, data: Mapping[str, object]) -> EmulatorConfig:
        """From the daemon's ``[emulator]`` table; every error names the key."""
        if not isinstance(data, Mapping):
            raise ConfigError(f"emulator: expected a table, got {type(data).__name__}")
        unknown = [str(k) for k in data if k not in _READERS]
        if unknown:
            raise _error(unknown[0], f"unknown key (known: {', '.join(sorted(_READERS))})")
        product = Product.GENOA
        if "product" in data:
            product = _read_product("product", data["product"])
        kwargs: Dict[str, Any] = {"product": product}
        for key, value in data.items():
            if key != "product":
                kwargs[key] = _READERS[key](str(key), value, product)
        return cls(**kwargs)


def _error(key: str, message: str) -> ConfigError:
    return ConfigError(f"emulator: {key}: {message}")


def _choice(key: str, value: object, allowed: Tuple[Any, ...]) -> None:
    if value not in allowed or isinstance(value, bool):
        raise _error(key, f"{value!r} is not one of {', '.join(map(str, allowed))}")


def _uint(key: str, value: object, high: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= high:
        raise _error(key, f"expected an integer 0..{high:#x}, got {value!r}")


def _check_chip_id(product: Product, chip_id: object) -> None:
    if not isinstance(chip_id, bytes) or len(chip_id) != 64:
        raise _error("chip_id", "expected 64 bytes")
    if product.turin_layout and any(chip_id[8:]):
        raise _error("chip_id", "a Turin CHIP_ID has only 8 significant bytes; 8-63 must be zero")
    if not any(chip_id):
        raise _error("chip_id", "an all-zero chip ID is what MASK_CHIP_ID reports; use "
                     "mask_chip_id = true instead")


# -- TOML readers: (key, value, product) -> field value ------------------------------


def _read_product(key: str, value: object) -> Product:
    if not isinstance(value, str):
        raise _error(key, f"expected a string, got {value!r}")
    try:
        return Product.parse(value)
    except ValueError as exc:
        raise _error(key, str(exc)) from None


def _read_int(key: str, value: object, _product: Product) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise _error(key, f"expected an integer, got {value!r}")
    return value


def _read_optional_int(key: str, value: object, product: Product) -> Optional[int]:
    return _read_int(key, value, product)


def _read_str(key: str, value: object, _product: Product) -> str:
    if not isinstance(value, str):
        raise _error(key, f"expected a string, got {value!r}")
    return value


def _read_bool(key: str, value: object, _product: Product) -> bool:
    if not isinstance(value, bool):
        raise _error(key, f"expected true or false, got {value!r}")
    return value


def _read_faults(key: str, value: object, _product: Product) -> Tuple[FaultSpec, ...]:
    """``faults = [{kind = "wipe", after = 3}, {kind = "busy", count = 4}]``."""
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence) or len(value) > 64:
        raise _error(key, "expected a list of at most 64 tables")
    specs = []
    fields = {"kind": str, "count": int, "after": int, "status": int, "pages": int,
              "seconds": (int, float)}
    for index, item in enumerate(value):
        where = f"{key}[{index}]"
        if not isinstance(item, Mapping):
            raise _error(where, "expected a table such as {kind = \"busy\", count = 2}")
        for name, val in item.items():
            kind = fields.get(name)
            if kind is None:
                raise _error(f"{where}.{name}", f"unknown key (known: {', '.join(fields)})")
            if isinstance(val, bool) or not isinstance(val, kind):  # type: ignore[arg-type]
                raise _error(f"{where}.{name}", f"wrong type {type(val).__name__}")
        if item.get("kind") not in FAULT_KINDS:
            raise _error(f"{where}.kind", f"expected one of {', '.join(FAULT_KINDS)}")
        for name in ("count", "after", "status", "pages"):
            if name in item and not 0 <= item[name] < 1 << 32:
                raise _error(f"{where}.{name}", "expected an integer 0..2**32-1")
        if not 0 <= float(item.get("seconds", 0)) <= 3600:
            raise _error(f"{where}.seconds", "expected 0..3600")
        spec = FaultSpec(kind=item["kind"], count=item.get("count", 1),
                         after=item.get("after", 0), status=item.get("status", 0x16),
                         pages=item.get("pages", 4), seconds=float(item.get("seconds", 0)))
        try:
            spec.fault()
        except ValueError as exc:
            raise _error(where, str(exc)) from None
        specs.append(spec)
    return tuple(specs)


def _read_float(key: str, value: object, _product: Product) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _error(key, f"expected a number of seconds, got {value!r}")
    return float(value)


def _read_hex(key: str, value: object, _product: Product) -> bytes:
    if not isinstance(value, str):
        raise _error(key, f"expected hex digits in a string, got {value!r}")
    text = value.strip().lower()
    text = text[2:] if text.startswith("0x") else text
    try:
        return bytes.fromhex(text)
    except ValueError:
        raise _error(key, "expected hex digits") from None


def _read_chip_id(key: str, value: object, product: Product) -> bytes:
    raw = _read_hex(key, value, product)
    if product.turin_layout and len(raw) == 8:
        raw += bytes(56)
    return raw


def _read_tcb(key: str, value: object, product: Product) -> TcbVersion:
    """A raw u64 in the product's layout, or a table of components."""
    try:
        if isinstance(value, int) and not isinstance(value, bool):
            return TcbVersion.decode(value, product)
        if isinstance(value, Mapping):
            allowed = ("fmc", "bootloader", "tee", "snp", "microcode")
            parts: Dict[str, int] = {}
            for name, part in value.items():
                if name not in allowed or (name == "fmc" and not product.turin_layout):
                    raise ValueError(f"unknown TCB component {name!r} for {product}")
                if isinstance(part, bool) or not isinstance(part, int):
                    raise ValueError(f"{name} must be an integer")
                parts[str(name)] = part
            missing = [n for n in ("bootloader", "tee", "snp", "microcode") if n not in parts]
            if missing:
                raise ValueError(f"missing {', '.join(missing)}")
            return TcbVersion.from_parts(product, **parts)
    except ValueError as exc:
        raise _error(key, str(exc)) from None
    raise _error(key, "expected a u64 or a table {bootloader, tee, snp, microcode"
                 f"{', fmc' if product.turin_layout else ''}}}")


def _read_firmware(key: str, value: object, _product: Product) -> FirmwareVersion:
    """``"1.55.21"`` (major.minor.build) or a table {major, minor, build}."""
    parts: Dict[str, object] = {}
    if isinstance(value, str):
        pieces = value.split(".")
        if len(pieces) == 3 and all(p.isdigit() for p in pieces):
            parts = dict(zip(("major", "minor", "build"), map(int, pieces)))
    elif isinstance(value, Mapping) and set(value) == {"major", "minor", "build"}:
        parts = dict(value)
    if not parts or not all(type(v) is int and 0 <= v <= 255 for v in parts.values()):
        raise _error(key, "expected \"MAJOR.MINOR.BUILD\" or {major, minor, build} of bytes")
    return FirmwareVersion(**parts)  # type: ignore[arg-type]


_READERS: Dict[str, Callable[[str, object, Product], object]] = {
    "product": lambda k, v, p: _read_product(k, v),
    "report_version": _read_int,
    "guest_vmpl": _read_int,
    "vmpck_id": _read_optional_int,
    "measurement": _read_hex,
    "policy": _read_int,
    "host_data": _read_hex,
    "family_id": _read_hex,
    "image_id": _read_hex,
    "id_key_digest": _read_hex,
    "author_key_digest": _read_hex,
    "guest_svn": _read_int,
    "id_block_svn": _read_optional_int,
    "reported_tcb": _read_tcb,
    "current_tcb": _read_tcb,
    "committed_tcb": _read_tcb,
    "launch_tcb": _read_tcb,
    "current_firmware": _read_firmware,
    "committed_firmware": _read_firmware,
    "platform_info": _read_int,
    "launch_mit_vector": _read_int,
    "current_mit_vector": _read_int,
    "signer": _read_str,
    "mask_chip_id": _read_bool,
    "host_certs": _read_str,
    "kernel": _read_str,
    "device": _read_str,
    "chip_id": _read_chip_id,
    "latency": _read_float,
    "faults": _read_faults,
}


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
