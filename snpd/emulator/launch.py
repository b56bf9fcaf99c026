"""What the emulated guest was launched with: :class:`EmulatorConfig`, the keys of
snpd.toml's ``[emulator]`` table (and of ``emulator.toml``) as a frozen value.

Apart from :mod:`snpd.emulator.state` so that reading and checking a configuration
needs no ``cryptography`` and no state directory, and so that the state (which
holds a config) and the firmware (which reads one) both import it without
importing each other.
"""

from __future__ import annotations

import dataclasses
import hashlib
from typing import Any, Callable, Dict, Mapping, Optional, Sequence, Tuple

from snpd.abi.product import Endorser, Product
from snpd.abi.report import FirmwareVersion
from snpd.abi.tcb import TcbVersion
from snpd.emulator.faults import DeviceFault
from snpd.errors import ConfigError
from snpd.schema import Kind, SchemaError, choice, integer, number, read_table

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
    ``device`` "absent"/"denied" makes opening ``/dev/sev-guest`` fail. ``vtpm``
    ("unix:PATH", the socket ``snpd-emu vtpm`` serves) makes the guest an Azure CVM:
    no sev-guest device, the SNP report through the emulated paravisor's vTPM.
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
    vtpm: Optional[str] = None

    def __post_init__(self) -> None:
        if not isinstance(self.product, Product):
            raise _error("product", f"expected a Product, got {self.product!r}")
        _choice("report_version", self.report_version, REPORT_VERSIONS)
        _choice("signer", self.signer, SIGNERS)
        _choice("host_certs", self.host_certs, HOST_CERTS)
        _choice("kernel", self.kernel, KERNELS)
        if self.vtpm is not None and not (self.vtpm.startswith("unix:/")
                                          and "\0" not in self.vtpm):
            raise _error("vtpm", f"expected \"unix:\" and an absolute socket path, got "
                                 f"{self.vtpm!r}")
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
        product = Product.GENOA
        if isinstance(data, Mapping) and "product" in data:
            product = _read_product("product", data["product"])
        kinds = {key: _for_product(_READERS[key], product) for key in sorted(_READERS)}
        kwargs: Dict[str, Any] = {"product": product}
        kwargs.update(read_table("", data, kinds, name=_TABLE))
        return cls(**kwargs)


_TABLE = "emulator"


def _for_product(reader: Callable[[str, object, Product], object], product: Product) -> Kind:
    """A TOML reader as a schema kind: TCBs and chip IDs read in the product's layout."""
    return lambda path, value: reader(path, value, product)


def _error(key: str, message: str) -> ConfigError:
    return SchemaError(key, message, table=_TABLE)


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
    for index, item in enumerate(value):
        where = f"{key}[{index}]"
        if not isinstance(item, Mapping):
            raise _error(where, "expected a table such as {kind = \"busy\", count = 2}")
        fields = read_table(where, item, _FAULT_FIELDS, name=_TABLE)
        if "kind" not in fields:
            raise _error(f"{where}.kind", f"missing (one of {', '.join(FAULT_KINDS)})")
        spec = FaultSpec(**fields)
        try:
            spec.fault()
        except ValueError as exc:
            raise _error(where, str(exc)) from None
        specs.append(spec)
    return tuple(specs)


_FAULT_FIELDS: Mapping[str, Kind] = {
    "kind": choice(*FAULT_KINDS), "count": integer(0, (1 << 32) - 1),
    "after": integer(0, (1 << 32) - 1), "status": integer(0, (1 << 32) - 1),
    "pages": integer(0, (1 << 32) - 1), "seconds": number(0, 3600),
}


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
    "vtpm": _read_str,
}
