"""Collect SEV status from this machine: kernel log, sysfs, device nodes, configfs,
/proc/cpuinfo and (when asked, and readable) the SEV_STATUS MSR.

Reads only; every source that cannot be read is named in ``unavailable`` so
``snpctl ok`` and the daemon's start-up message can say what they could not
check, and why, instead of guessing. The file system root is injectable for
tests.
"""

from __future__ import annotations

import dataclasses
import errno
import os
import subprocess
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from snpd.abi.product import Product, product_from_cpuid
from snpd.status.kernel_log import KernelFacts, parse_kernel_log, sev_status_names

SYSFS_VMPL = "sys/devices/system/cpu/sev/vmpl"
SEV_GUEST_PLATFORM = "sys/devices/platform/sev-guest"
DEVICE = "dev/sev-guest"
CONFIGFS_TSM = "sys/kernel/config/tsm/report"
KMSG = "dev/kmsg"
CPUINFO = "proc/cpuinfo"
MSR_DEVICE = "dev/cpu/0/msr"
SEV_STATUS_MSR = 0xC0010131
MAX_KMSG_RECORDS = 20000
MAX_CPUINFO = 1 << 20
SEV_FEATURES = ("SEV", "SEV-ES", "SEV-SNP")
FEATURES_LINE = "Memory Encryption Features active"
# /proc/cpuinfo flags worth showing: CPUID 0x8000001F capabilities, host-oriented and
# not a reliable guest indicator (docs/reference/abi.md §6.3), so shown, never trusted.
CPU_SEV_FLAGS = ("sev", "sev_es", "sev_snp")


@dataclasses.dataclass(frozen=True)
class CpuInfo:
    """The first processor of /proc/cpuinfo: what names the product without a report
    (docs/reference/abi.md §4.8, "local CPUID when the report is from this machine")."""

    vendor: str
    family: Optional[int]
    model: Optional[int]
    stepping: Optional[int]
    flags: Tuple[str, ...] = ()

    @property
    def product(self) -> Optional[Product]:
        if self.vendor != "AuthenticAMD" or self.family is None or self.model is None:
            return None
        return product_from_cpuid(self.family, self.model)

    def describe(self) -> str:
        """``AuthenticAMD family 0x19 model 0x11 stepping 1 (Genoa)``."""
        parts = [self.vendor or "unknown vendor"]
        for name, value, fmt in (("family", self.family, "0x{:x}"),
                                 ("model", self.model, "0x{:02x}"),
                                 ("stepping", self.stepping, "{}")):
            if value is not None:
                parts.append(f"{name} {fmt.format(value)}")
        product = self.product
        return " ".join(parts) + (f" ({product})" if product else "")

    def to_json(self) -> Dict[str, object]:
        return {"vendor": self.vendor, "family": self.family, "model": self.model,
                "stepping": self.stepping, "product": self.product.value if self.product
                else None, "sev_flags": list(self.flags)}


def parse_cpuinfo(text: str) -> CpuInfo:
    """The first processor block of /proc/cpuinfo (decimal family and model, as the
    kernel prints them: family = base + extended, model = extended << 4 | base)."""
    fields: Dict[str, str] = {}
    for line in text.splitlines():
        if not line.strip():
            if fields:
                break
            continue
        key, sep, value = line.partition(":")
        if sep:
            fields.setdefault(key.strip(), value.strip())

    def number(name: str) -> Optional[int]:
        value = fields.get(name, "")
        return int(value) if value.isdigit() else None

    flags = set(fields.get("flags", "").split())
    return CpuInfo(vendor=fields.get("vendor_id", ""), family=number("cpu family"),
                   model=number("model"), stepping=number("stepping"),
                   flags=tuple(f for f in CPU_SEV_FLAGS if f in flags))


@dataclasses.dataclass(frozen=True)
class SevStatus:
    """What this machine says about SEV. ``kernel_log`` names where the kernel lines
    came from ("/dev/kmsg", "dmesg", "snpd-probe", "emulator") and is None when no
    kernel log could be read; ``sev_status_msr`` is the SEV_STATUS MSR when it was
    read (root and the msr module)."""

    kernel: KernelFacts
    sysfs_vmpl: Optional[int]
    platform_device: bool
    device_node: bool
    configfs_tsm: bool
    unavailable: Tuple[str, ...]
    kernel_log: Optional[str] = None
    cpu: Optional[CpuInfo] = None
    sev_status_msr: Optional[int] = None
    emulated: bool = False

    @property
    def snp_active(self) -> Optional[bool]:
        """True/False when something says so, None when nothing could tell. The MSR
        decides when it was read (AMD: the hypervisor cannot intercept it)."""
        if self.sev_status_msr is not None:
            return bool(self.sev_status_msr >> 2 & 1)
        if self.kernel.snp_active or self.device_node or self.platform_device \
                or self.sysfs_vmpl is not None:
            return True
        if self.kernel_log is not None or self.kernel.lines:
            return False
        return None

    @property
    def vmpl(self) -> Optional[int]:
        return self.sysfs_vmpl if self.sysfs_vmpl is not None else self.kernel.vmpl

    @property
    def features(self) -> Tuple[str, ...]:
        """The active SEV features (of SEV, SEV-ES, SEV-SNP), from the kernel's
        "Memory Encryption Features active" line, its "SEV: Status" line, or the MSR."""
        if self.kernel.memory_encryption:
            return tuple(f for f in self.kernel.memory_encryption if f in SEV_FEATURES) \
                or self.kernel.memory_encryption
        names = self.kernel.sev_status or (sev_status_names(self.sev_status_msr)
                                           if self.sev_status_msr is not None else ())
        return tuple(f for f in SEV_FEATURES if f in names)

    @property
    def reason(self) -> Optional[str]:
        """Why this is not (or not known to be) an SEV-SNP guest, from what was actually
        found; None when SEV-SNP is active."""
        active = self.snp_active
        if active:
            return None
        found: List[str] = []
        if self.sev_status_msr is not None:
            found.append(f"the SEV_STATUS MSR is 0x{self.sev_status_msr:x} (SEV-SNP bit clear)")
        if self.kernel_log is not None:
            k = self.kernel
            if k.memory_encryption:
                found.append(f"the kernel reports '{FEATURES_LINE}: "
                             f"{' '.join(k.memory_encryption)}' without SEV-SNP")
            else:
                found.append(f"no '{FEATURES_LINE}' line in the kernel log")
        if not self.device_node:
            found.append(f"no /{DEVICE}")
        if not self.platform_device and self.kernel_log is None:
            found.append(f"no /{SEV_GUEST_PLATFORM}")
        head = "not an SEV-SNP guest" if active is False else "SEV-SNP state unknown"
        text = f"{head}: {_and(found)}"
        if active is None and self.unavailable:
            text += f"; could not read {'; '.join(self.unavailable)}"
        return text

    def to_json(self) -> Dict[str, object]:
        return {
            "snp_active": self.snp_active,
            "reason": self.reason,
            "emulated": self.emulated,
            "features": list(self.features),
            "vmpl": self.vmpl,
            "sysfs_vmpl": self.sysfs_vmpl,
            "platform_device": self.platform_device,
            "device_node": self.device_node,
            "configfs_tsm": self.configfs_tsm,
            "kernel_log": self.kernel_log,
            "kernel": self.kernel.to_json(),
            "sev_status_msr": (f"0x{self.sev_status_msr:x}" if self.sev_status_msr is not None
                               else None),
            "cpu": self.cpu.to_json() if self.cpu else None,
            "unavailable": list(self.unavailable),
        }


def status_properties(status: SevStatus) -> Dict[str, object]:
    """SevStatus as flat, D-Bus-friendly values (a{sv}, the Manager's SevStatus); a
    fact nothing could establish is left out (D-Bus has no null), ``snp_active``
    included. The keys are listed in snpd/dbus/org.snpd.Snpd1.xml."""
    k = status.kernel
    out: Dict[str, object] = {
        "emulated": status.emulated,
        "features": list(status.features),
        "sev_status": list(k.sev_status),
        "device_node": status.device_node,
        "platform_device": status.platform_device,
        "configfs_tsm": status.configfs_tsm,
        "unavailable": list(status.unavailable),
    }
    for key, value in (("snp_active", status.snp_active), ("reason", status.reason),
                       ("vmpl", status.vmpl), ("vmpck", k.driver_vmpck),
                       ("vmpck_disabled", k.vmpck_disabled),
                       ("cpuid_table_entries", k.cpuid_table_entries),
                       ("kernel_log", status.kernel_log),
                       ("sev_status_msr", status.sev_status_msr),
                       ("cpu", status.cpu.describe() if status.cpu else None)):
        if value is not None:
            out[key] = value
    return out


def _and(items: Sequence[str]) -> str:
    if len(items) <= 1:
        return "".join(items)
    return ", ".join(items[:-1]) + " and " + items[-1]


def _read_kmsg(path: Path) -> List[str]:
    """Every record in /dev/kmsg now, without blocking."""
    records: List[str] = []
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        while len(records) < MAX_KMSG_RECORDS:
            try:
                chunk = os.read(fd, 8192)
            except OSError as exc:
                if exc.errno == errno.EAGAIN:
                    break
                if exc.errno == errno.EPIPE:  # a record was overwritten; keep reading
                    continue
                raise
            if not chunk:
                break
            records.append(chunk.decode("utf-8", "replace"))
    finally:
        os.close(fd)
    return records


def read_kernel_log_from(root: Path) -> Tuple[List[str], Optional[str], Optional[str]]:
    """(lines, where they came from, why they could not be read). /dev/kmsg first,
    then dmesg(1) (only on the real root); both need CAP_SYSLOG where
    ``kernel.dmesg_restrict = 1``, the Debian and Ubuntu default."""
    try:
        return _read_kmsg(root / KMSG), "/dev/kmsg", None
    except OSError as kmsg_error:
        if str(root) != "/":
            return [], None, f"kernel log ({root / KMSG}: {kmsg_error.strerror})"
        try:
            done = subprocess.run(["dmesg"], capture_output=True, text=True, timeout=5,
                                  check=False)
        except (OSError, subprocess.SubprocessError) as exc:
            return [], None, f"kernel log (/dev/kmsg: {kmsg_error.strerror}; dmesg: {exc})"
        if done.returncode != 0:
            return [], None, (f"kernel log (/dev/kmsg: {kmsg_error.strerror}; dmesg: "
                              f"{done.stderr.strip() or 'failed'}; kernel.dmesg_restrict?)")
        return done.stdout.splitlines(), "dmesg", None


def read_kernel_log(root: Path) -> Tuple[List[str], Optional[str]]:
    """Kernel log lines, or why they could not be read."""
    lines, _source, why = read_kernel_log_from(root)
    return lines, why


def read_cpuinfo(root: Path) -> Tuple[Optional[CpuInfo], Optional[str]]:
    """The CPU from /proc/cpuinfo (readable by anyone), or why it could not be read."""
    path = root / CPUINFO
    try:
        with open(path, "rb") as f:
            text = f.read(MAX_CPUINFO).decode("utf-8", "replace")
    except OSError as exc:
        return None, f"/{CPUINFO} ({exc.strerror})"
    return parse_cpuinfo(text), None


def read_sev_status_msr(root: Path) -> Tuple[Optional[int], Optional[str]]:
    """SEV_STATUS (MSR 0xC0010131) through the msr driver, as snpguest ``ok`` reads it;
    or why it could not be read (root with CAP_SYS_RAWIO and the msr module needed)."""
    path = root / MSR_DEVICE
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        why = {errno.ENOENT: "absent: the msr module is not loaded",
               errno.EACCES: "permission denied: needs root",
               errno.EPERM: "not permitted: needs root with CAP_SYS_RAWIO"}.get(
                   exc.errno or 0, exc.strerror or str(exc))
        return None, f"the SEV_STATUS MSR (/{MSR_DEVICE} {why})"
    try:
        data = os.pread(fd, 8, SEV_STATUS_MSR)
    except OSError as exc:
        return None, (f"the SEV_STATUS MSR (/{MSR_DEVICE}: {exc.strerror}; not an AMD CPU "
                      "with SEV, or the hypervisor refused it)")
    finally:
        os.close(fd)
    if len(data) != 8:
        return None, f"the SEV_STATUS MSR (/{MSR_DEVICE}: short read)"
    return int.from_bytes(data, "little"), None


def probe(root: Path = Path("/"), *, kernel_lines: Optional[List[str]] = None,
          kernel_log: Optional[str] = None, unavailable: Sequence[str] = (),
          msr: bool = False, sev_status_msr: Optional[int] = None) -> SevStatus:
    """Everything readable under ``root``. ``kernel_lines`` given: the log is not read
    again and ``kernel_log`` names their source ("given" when left out and there are
    lines). ``msr``: also try the SEV_STATUS MSR (snpctl ok); ``sev_status_msr``: a
    value read earlier (by snpd-probe). ``unavailable``: what an earlier reader
    could not read."""
    missing: List[str] = list(unavailable)
    if kernel_lines is None:
        kernel_lines, kernel_log, why = read_kernel_log_from(root)
        if why:
            missing.append(why)
    elif kernel_log is None and kernel_lines:
        kernel_log = "given"
    vmpl: Optional[int] = None
    vmpl_path = root / SYSFS_VMPL
    try:
        vmpl = int(vmpl_path.read_text().strip())
    except FileNotFoundError:
        pass  # only SNP guests on 6.11+ have it
    except (OSError, ValueError) as exc:
        missing.append(f"{vmpl_path} ({exc})")
    cpu, why = read_cpuinfo(root)
    if why:
        missing.append(why)
    if msr and sev_status_msr is None:
        sev_status_msr, why = read_sev_status_msr(root)
        if why:
            missing.append(why)
    return SevStatus(
        kernel=parse_kernel_log(kernel_lines),
        sysfs_vmpl=vmpl,
        platform_device=(root / SEV_GUEST_PLATFORM).exists(),
        device_node=(root / DEVICE).exists(),
        configfs_tsm=(root / CONFIGFS_TSM).is_dir(),
        unavailable=tuple(missing),
        kernel_log=kernel_log,
        cpu=cpu,
        sev_status_msr=sev_status_msr,
    )


def emulated(vmpl: int, driver_log: Sequence[str] = (), *, device_node: bool = True
             ) -> SevStatus:
    """What an SEV-SNP guest at ``vmpl`` would show, for the emulator backend: the
    kernel's features line and the emulated sev-guest driver's own log lines (which
    name the VMPCK it uses). Nothing of the host machine is read."""
    lines = [f"{FEATURES_LINE}: AMD SEV SEV-ES SEV-SNP", *driver_log]
    return SevStatus(kernel=parse_kernel_log(lines), sysfs_vmpl=vmpl, platform_device=True,
                     device_node=device_node, configfs_tsm=False, unavailable=(),
                     kernel_log="emulator", emulated=True)
