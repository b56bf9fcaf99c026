"""Expected launch measurements of an SEV-SNP guest, for ``snpctl generate measurement``
and ``generate ovmf-hash``, computed by virtee's sev-snp-measure (module
``sevsnpmeasure``), an optional dependency: ``pip install 'snpd[measure]'``.

The inputs are snpguest 0.10's (virtee/sev 7.1.0 ``measurement``): its vCPU types and
the four CPU signatures they stand for, its VMM types QEMU, ec2 and KRUN, and its
kernel command line, trimmed of surrounding white space. sev-snp-measure has no KRUN;
KRUN is built here from the library's parts with sev's register values (see
:func:`_krun_launch_digest`). For ec2 the library's VMSA is used as it is: since
0.0.13 its RDX is 0x600, which AWS says the firmware measures; sev 7.1.0 still has 0.
"""

from __future__ import annotations

import dataclasses
import importlib
import os
import sys
from typing import Any, Dict, Optional, Tuple

from snpd.errors import EXIT_USAGE, InputFileError, InvalidArgument, SnpdError

PAGE_SIZE = 4096
DIGEST_SIZE = 48
MIN_LIBRARY = (0, 0, 13)  # the ec2 VMSA fix; 0.0.12 computes another ec2 measurement
VMM_TYPES = ("QEMU", "ec2", "KRUN")
DEFAULT_GUEST_FEATURES = 0x1  # SNPActive


def cpu_sig(family: int, model: int, stepping: int) -> int:
    """The CPUID Fn0000_0001_EAX signature of family, model and stepping (AMD 25481),
    with sev's i32 arithmetic: base family 0xF plus the extended family above it."""
    if family > 0xF:
        family_low, family_high = 0xF, (family - 0xF) & 0xFF
    else:
        family_low, family_high = family, 0
    return ((family_high << 20) | (((model >> 4) & 0xF) << 16) | (family_low << 8)
            | ((model & 0xF) << 4) | (stepping & 0xF))


_EPYC, _ROME = cpu_sig(23, 1, 2), cpu_sig(23, 49, 0)
_MILAN, _GENOA = cpu_sig(25, 1, 1), cpu_sig(25, 17, 0)
# sev 7.1.0's CpuType: the QEMU model names snpguest 0.10 takes, in any case.
CPU_TYPES: Dict[str, int] = {
    "EPYC": _EPYC, "EPYC-v1": _EPYC, "EPYC-v2": _EPYC, "EPYC-IBPB": _EPYC,
    "EPYC-v3": _EPYC, "EPYC-v4": _EPYC,
    "EPYC-Rome": _ROME, "EPYC-Rome-v1": _ROME, "EPYC-Rome-v2": _ROME, "EPYC-Rome-v3": _ROME,
    "EPYC-Milan": _MILAN, "EPYC-Milan-v1": _MILAN, "EPYC-Milan-v2": _MILAN,
    "EPYC-Genoa": _GENOA, "EPYC-Genoa-v1": _GENOA,
}
# The signatures sev accepts from --vcpu-sig or family/model/stepping.
CPU_SIGNATURES: Dict[int, str] = {_EPYC: "EPYC", _ROME: "EPYC-Rome", _MILAN: "EPYC-Milan",
                                  _GENOA: "EPYC-Genoa"}
_CPU_TYPES_LOWER = {name.lower(): sig for name, sig in CPU_TYPES.items()}
_VMM_TYPES_LOWER = {name.lower(): name for name in VMM_TYPES}


class MeasureUnavailable(SnpdError):
    """sev-snp-measure is not installed, or too old: the command cannot run here (exit 2,
    like any other input snpctl cannot work with)."""

    kind = "NotSupported"
    exit_code = EXIT_USAGE


class MeasurementInputError(InvalidArgument):
    """The inputs do not describe a guest the measurement can be computed for."""


def vcpu_type_sig(name: str) -> int:
    try:
        return _CPU_TYPES_LOWER[name.lower()]
    except KeyError:
        raise MeasurementInputError(f"unknown vCPU type {name!r}; one of "
                                    f"{', '.join(CPU_TYPES)}") from None


def checked_sig(sig: int) -> int:
    """``sig`` if it is one of the four signatures sev knows, which is all snpguest
    accepts; the VMSA's RDX carries it."""
    if sig not in CPU_SIGNATURES:
        known = ", ".join(f"0x{s:x} ({n})" for s, n in CPU_SIGNATURES.items())
        raise MeasurementInputError(f"vCPU signature {sig} (0x{sig & 0xFFFFFFFF:x}) is not "
                                    f"one of {known}")
    return sig


def vmm_type(name: str) -> str:
    """The canonical spelling of a VMM type given in any case, as sev reads it."""
    try:
        return _VMM_TYPES_LOWER[name.lower()]
    except KeyError:
        raise MeasurementInputError(f"unknown VMM type {name!r}; one of "
                                    f"{', '.join(VMM_TYPES)}") from None


def parse_ovmf_hash(text: str) -> bytes:
    """A precalculated OVMF hash as sev takes it: 96 hex digits, no prefix (what
    ``generate ovmf-hash`` prints in hex)."""
    digits = text.strip()
    if len(digits) != 2 * DIGEST_SIZE or any(c not in "0123456789abcdefABCDEF"
                                             for c in digits):
        raise MeasurementInputError(f"OVMF hash {text!r} must be {2 * DIGEST_SIZE} hex "
                                    f"digits ({DIGEST_SIZE} bytes, SHA-384 sized)")
    return bytes.fromhex(digits)


@dataclasses.dataclass(frozen=True)
class MeasurementInputs:
    """One guest launch, as ``generate measurement`` describes it."""

    ovmf: str
    vcpu_sig: int
    vcpus: int = 1
    vmm_type: str = "QEMU"
    kernel: Optional[str] = None
    initrd: Optional[str] = None
    append: Optional[str] = None
    guest_features: int = DEFAULT_GUEST_FEATURES
    ovmf_hash: Optional[bytes] = None

    def __post_init__(self) -> None:
        if self.vmm_type not in VMM_TYPES:
            raise MeasurementInputError(f"unknown VMM type {self.vmm_type!r}")
        if not 0 <= self.vcpus < 1 << 32:
            raise MeasurementInputError(f"vCPU count {self.vcpus} does not fit in 32 bits")
        if not 0 <= self.guest_features < 1 << 64:
            raise MeasurementInputError(f"guest features 0x{self.guest_features:x} do not "
                                        "fit in 64 bits")
        if self.ovmf_hash is not None and len(self.ovmf_hash) != DIGEST_SIZE:
            raise MeasurementInputError(f"an OVMF hash is {DIGEST_SIZE} bytes")
        if (self.initrd is not None or self.append is not None) and self.kernel is None:
            raise MeasurementInputError("an initrd or a command line needs a kernel")


def library(command: str) -> Any:
    """The sevsnpmeasure package, or MeasureUnavailable with the one line that says how
    to get it. Imported here, not at start-up: most snpctl commands never need it."""
    try:
        package = importlib.import_module("sevsnpmeasure")
    except ImportError:
        if sys.version_info < (3, 10):
            raise MeasureUnavailable(
                f"{command} needs the optional sev-snp-measure package (0.0.13 or later), "
                "which needs Python 3.10 or later; this is Python "
                f"{sys.version_info[0]}.{sys.version_info[1]}") from None
        raise MeasureUnavailable(f"{command} needs the optional sev-snp-measure package: "
                                 "pip install 'snpd[measure]'") from None
    version = _library_version()
    if version is not None and version < MIN_LIBRARY:
        raise MeasureUnavailable(
            f"{command} needs sev-snp-measure {'.'.join(map(str, MIN_LIBRARY))} or later "
            f"({'.'.join(map(str, version))} is installed): pip install 'snpd[measure]'")
    return package


def _library_version() -> Optional[Tuple[int, ...]]:
    from importlib import metadata  # lazy: email, zipfile…; only to check the optional package

    try:
        text = metadata.version("sev-snp-measure")
    except metadata.PackageNotFoundError:  # a vendored copy: nothing to compare
        return None
    parts = []
    for part in text.split("."):
        digits = "".join(c for c in part if c.isdigit())
        if not digits:
            break
        parts.append(int(digits))
    return tuple(parts)


def _readable(path: str, what: str) -> None:
    """Name the unreadable file before the library fails with a bare traceback."""
    try:
        with open(path, "rb"):
            pass
    except OSError as exc:
        raise InputFileError(f"cannot read {what} {path}: {exc.strerror or exc}") from None


def _check_ovmf(path: str) -> None:
    _readable(path, "OVMF file")
    size = os.stat(path).st_size
    if size == 0 or size % PAGE_SIZE:
        raise MeasurementInputError(f"OVMF file {path} is {size} bytes, not a whole "
                                    f"number of {PAGE_SIZE}-byte pages")


def _run(call: Any, *args: Any) -> Any:
    """Call into sev-snp-measure; its complaints about an OVMF image it cannot use
    (RuntimeError, ValueError, failed asserts) become MeasurementInputError."""
    try:
        return call(*args)
    except OSError as exc:
        raise InputFileError(f"cannot read {exc.filename}: {exc.strerror or exc}") from None
    except (RuntimeError, ValueError, AssertionError, IndexError, KeyError,
            AttributeError) as exc:
        detail = str(exc) or type(exc).__name__
        raise MeasurementInputError(f"sev-snp-measure cannot compute it: {detail}") from None


def ovmf_hash(path: str, command: str = "generate ovmf-hash") -> bytes:
    """The launch digest after OVMF's pages alone: what ``--ovmf-hash`` takes."""
    lib = library(command)
    _check_ovmf(path)
    guest = _submodule(lib, "guest")
    return bytes(_run(guest.calc_snp_ovmf_hash, path))


def launch_digest(inputs: MeasurementInputs,
                  command: str = "generate measurement") -> bytes:
    """The SNP launch digest (MEASUREMENT) of the guest ``inputs`` describe."""
    lib = library(command)
    _check_ovmf(inputs.ovmf)
    for path, what in ((inputs.kernel, "kernel"), (inputs.initrd, "initrd")):
        if path is not None:
            _readable(path, what)
    # sev trims the command line (str::trim); the library takes it as given.
    append = None if inputs.append is None else inputs.append.strip()
    if inputs.vmm_type == "KRUN":
        return _krun_launch_digest(lib, inputs, append)
    guest = _submodule(lib, "guest")
    vmm_types = _submodule(lib, "vmm_types")
    vmm = vmm_types.VMMType.QEMU if inputs.vmm_type == "QEMU" else vmm_types.VMMType.ec2
    seed = None if inputs.ovmf_hash is None else inputs.ovmf_hash.hex()
    return bytes(_run(guest.snp_calc_launch_digest, inputs.vcpus, inputs.vcpu_sig,
                      inputs.ovmf, inputs.kernel, inputs.initrd, append,
                      inputs.guest_features, seed, vmm))


def _krun_launch_digest(lib: Any, inputs: MeasurementInputs, append: Optional[str]) -> bytes:
    """KRUN as sev 7.1.0 measures it: the metadata pages in QEMU's order, then every
    vCPU's VMSA with CS attributes 0x9A, SS 0x92, TR 0x83, RDX, MXCSR and the x87
    control word 0 (sev's KRUN branch also assigns RIP, RSP, RBP, RSI and CS, but the
    common code overwrites them, or they stay 0, for any vCPU count above 0)."""
    gctx = _submodule(lib, "gctx")
    guest = _submodule(lib, "guest")
    ovmf_mod = _submodule(lib, "ovmf")
    sev_hashes = _submodule(lib, "sev_hashes")
    vmsa = _submodule(lib, "vmsa")
    vmm_types = _submodule(lib, "vmm_types")

    def compute() -> bytes:
        ovmf = ovmf_mod.OVMF(inputs.ovmf)
        if inputs.ovmf_hash is not None:
            ctx = gctx.GCTX(seed=inputs.ovmf_hash)
        else:
            ctx = gctx.GCTX()
            ctx.update_normal_pages(ovmf.gpa(), ovmf.data())
        hashes = (sev_hashes.SevHashes(inputs.kernel, inputs.initrd, append)
                  if inputs.kernel else None)
        guest.snp_update_metadata_pages(ctx, ovmf, hashes, vmm_types.VMMType.QEMU)
        ap_eip = ovmf.sev_es_reset_eip()
        for index in range(inputs.vcpus):
            if index and not ap_eip:
                break  # sev builds no AP save area when the reset block says EIP 0
            eip = vmsa.VMSA.BSP_EIP if index == 0 else ap_eip
            area = vmsa.VMSA.build_save_area(eip, inputs.guest_features, 0,
                                             vmm_types.VMMType.QEMU)
            area.cs.attrib, area.ss.attrib, area.tr.attrib = 0x9A, 0x92, 0x83
            area.rdx, area.mxcsr, area.x87_fcw = 0, 0, 0
            ctx.update_vmsa_page(bytes(area))
        return bytes(ctx.ld())

    return bytes(_run(compute))


def _submodule(lib: Any, name: str) -> Any:
    return importlib.import_module(f"{lib.__name__}.{name}")
