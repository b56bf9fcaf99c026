"""Choose and open a backend: ``auto | ioctl | configfs | azure | emulator``.

``auto`` takes azure on a Hyper-V SNP-isolated guest (an Azure CVM, where the
paravisor owns the firmware and the guest has no sev-guest device; see
snpd.device.hyperv), else the ioctl when ``/dev/sev-guest`` opens (it is the only
path to derived keys and works for an unprivileged daemon with a udev group), else
configfs-tsm when its report directory exists.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Optional

from snpd.device import BACKENDS
from snpd.device.base import Device, Platform
from snpd.device.hyperv import CpuidReader, read_cpuid_device, snp_isolated
from snpd.device.ioctl import DEFAULT_PATH, IoctlDevice
from snpd.errors import ConfigError, DeviceUnavailable, InvalidArgument
from snpd.files import read_toml

if TYPE_CHECKING:
    from snpd.emulator.kernel import EmulatedSevGuest
    from snpd.emulator.launch import EmulatorConfig

DEFAULT_CONFIGFS_ROOT = "/sys/kernel/config/tsm/report"
DEFAULT_TPM = "/dev/tpmrm0"


def default_emulator_dir() -> Path:
    """/var/lib/snpd/emulator for root, else under the user's XDG state directory."""
    if os.geteuid() == 0:
        return Path("/var/lib/snpd/emulator")
    base = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"),
                                                            ".local", "state")
    return Path(base) / "snpd" / "emulator"


EMULATOR_TOML = "emulator.toml"


def read_emulator_config(path: Path) -> EmulatorConfig:
    """The emulated guest's launch configuration: the keys of snpd.toml's ``[emulator]``
    table, from ``emulator.toml`` in the state directory; defaults when absent."""
    # lazy: the emulator (json, datetime, schema) only for backend = emulator
    from snpd.emulator.launch import EmulatorConfig

    data = read_toml(path, missing_ok=True)
    if data is None:
        return EmulatorConfig()
    data.pop("state_dir", None)
    try:
        return EmulatorConfig.from_mapping(data)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None


def open_emulator(state_dir: Optional[Path] = None,
                  config: Optional[EmulatorConfig] = None) -> Device:
    """The emulator behind the real ioctl marshalling; with ``vtpm`` set, an emulated
    Azure CVM behind the real vTPM path (its paravisor is ``snpd-emu vtpm``)."""
    # lazy: the emulator and its cryptography only for backend = emulator
    from snpd.emulator.kernel import EmulatedSevGuest

    state_dir = state_dir or default_emulator_dir()
    if config is None:
        config = read_emulator_config(state_dir / EMULATOR_TOML)
    if config.vtpm is not None:
        return _emulated_azure(state_dir, config, config.vtpm)
    kernel = EmulatedSevGuest.for_state_dir(state_dir, config)
    device = IoctlDevice(DEFAULT_PATH, ops=kernel, platform=lambda: emulated_platform(kernel))
    device.name = "emulator"
    return device


def _emulated_azure(state_dir: Path, config: EmulatorConfig, spec: str) -> Device:
    # lazy: the emulator's state (cryptography) only for backend = emulator
    import datetime

    from snpd.device.azure import AzureVtpmDevice
    from snpd.emulator.state import EmulatorState

    state = EmulatorState.load_or_create(
        state_dir, config, now=lambda: datetime.datetime.now(datetime.timezone.utc))
    platform = Platform(emulated=True, guest_vmpl=config.guest_vmpl, product=config.product,
                        extra_roots=(state.ark,), device_node=False,
                        report_data="runtime-data")
    return AzureVtpmDevice(spec, platform=platform)


def emulated_platform(kernel: EmulatedSevGuest) -> Platform:
    """The emulated guest as a :class:`Platform`: the one place outside the emulator
    that reads its state, so the daemon and snpctl need not."""
    state = kernel.firmware.state
    return Platform(emulated=True, guest_vmpl=state.config.guest_vmpl,
                    product=state.config.product, extra_roots=(state.ark,),
                    driver_log=tuple(kernel.log), device_node=kernel.device != "absent")


def open_device(
    backend: str = "auto",
    *,
    path: str = DEFAULT_PATH,
    configfs_root: str = DEFAULT_CONFIGFS_ROOT,
    emulator_dir: Optional[Path] = None,
    emulator_config: Optional[EmulatorConfig] = None,
    tpm: str = DEFAULT_TPM,
    cpuid: Optional[CpuidReader] = None,
    hyperv_snp: Optional[bool] = None,
) -> Device:
    """``cpuid`` (default: the kernel's cpuid device) and, where it cannot be read,
    ``hyperv_snp`` (the kernel log's verdict, KernelFacts.hyperv_snp) tell ``auto``
    whether this is an Azure CVM."""
    if backend not in BACKENDS:
        raise InvalidArgument(f"backend {backend!r} is not one of {', '.join(BACKENDS)}")
    if backend == "emulator":
        return open_emulator(emulator_dir, emulator_config)
    if backend == "azure" or (backend == "auto" and snp_isolated(
            cpuid or read_cpuid_device(), hyperv_snp)):
        # lazy: the TPM marshaller and HCL parser only on an Azure CVM
        from snpd.device.azure import AzureVtpmDevice

        return AzureVtpmDevice(tpm)
    if backend in ("ioctl", "auto"):
        device = IoctlDevice(path)
        if backend == "ioctl":
            return device
        try:
            device._open()
            return device
        except DeviceUnavailable as ioctl_error:
            if not Path(configfs_root).is_dir():
                raise DeviceUnavailable(
                    f"no SEV-SNP guest interface: {ioctl_error}; and no configfs-tsm at "
                    f"{configfs_root}. Not an SEV-SNP guest? Use the emulator backend to "
                    "develop without hardware") from ioctl_error
    # lazy: snpctl --direct on an ioctl guest skips configfs's logging, secrets, hashlib
    from snpd.device.configfs import ConfigfsDevice

    return ConfigfsDevice(configfs_root)
