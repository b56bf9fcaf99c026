"""Collect SEV status from this machine: kernel log, sysfs, device nodes, configfs.

Reads only; every source that cannot be read is named in ``unavailable`` so
``snpctl ok`` can say what it could not check instead of guessing. The file
system root is injectable for tests.
"""

from __future__ import annotations

import dataclasses
import errno
import os
import subprocess
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from snpd.status.kernel_log import KernelFacts, parse_kernel_log

SYSFS_VMPL = "sys/devices/system/cpu/sev/vmpl"
SEV_GUEST_PLATFORM = "sys/devices/platform/sev-guest"
DEVICE = "dev/sev-guest"
CONFIGFS_TSM = "sys/kernel/config/tsm/report"
KMSG = "dev/kmsg"
MAX_KMSG_RECORDS = 20000


@dataclasses.dataclass(frozen=True)
class SevStatus:
    kernel: KernelFacts
    sysfs_vmpl: Optional[int]
    platform_device: bool
    device_node: bool
    configfs_tsm: bool
    unavailable: Tuple[str, ...]

    @property
    def snp_active(self) -> Optional[bool]:
        """True/False when something says so, None when nothing could tell."""
        if self.kernel.snp_active or self.device_node or self.platform_device \
                or self.sysfs_vmpl is not None:
            return True
        if self.kernel.lines:
            return False
        return None

    @property
    def vmpl(self) -> Optional[int]:
        return self.sysfs_vmpl if self.sysfs_vmpl is not None else self.kernel.vmpl

    def to_json(self) -> Dict[str, object]:
        return {
            "snp_active": self.snp_active,
            "vmpl": self.vmpl,
            "sysfs_vmpl": self.sysfs_vmpl,
            "platform_device": self.platform_device,
            "device_node": self.device_node,
            "configfs_tsm": self.configfs_tsm,
            "kernel": self.kernel.to_json(),
            "unavailable": list(self.unavailable),
        }


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


def read_kernel_log(root: Path) -> Tuple[List[str], Optional[str]]:
    """Kernel log lines, or why they could not be read."""
    try:
        return _read_kmsg(root / KMSG), None
    except OSError as kmsg_error:
        if str(root) != "/":
            return [], f"kernel log ({root / KMSG}: {kmsg_error.strerror})"
        try:
            done = subprocess.run(["dmesg"], capture_output=True, text=True, timeout=5,
                                  check=False)
        except (OSError, subprocess.SubprocessError) as exc:
            return [], f"kernel log (/dev/kmsg: {kmsg_error.strerror}; dmesg: {exc})"
        if done.returncode != 0:
            return [], (f"kernel log (/dev/kmsg: {kmsg_error.strerror}; dmesg: "
                        f"{done.stderr.strip() or 'failed'}; kernel.dmesg_restrict?)")
        return done.stdout.splitlines(), None


def probe(root: Path = Path("/"), *, kernel_lines: Optional[List[str]] = None) -> SevStatus:
    unavailable: List[str] = []
    if kernel_lines is None:
        kernel_lines, why = read_kernel_log(root)
        if why:
            unavailable.append(why)
    vmpl: Optional[int] = None
    vmpl_path = root / SYSFS_VMPL
    try:
        vmpl = int(vmpl_path.read_text().strip())
    except FileNotFoundError:
        pass  # only SNP guests on 6.11+ have it
    except (OSError, ValueError) as exc:
        unavailable.append(f"{vmpl_path} ({exc})")
    return SevStatus(
        kernel=parse_kernel_log(kernel_lines),
        sysfs_vmpl=vmpl,
        platform_device=(root / SEV_GUEST_PLATFORM).exists(),
        device_node=(root / DEVICE).exists(),
        configfs_tsm=(root / CONFIGFS_TSM).is_dir(),
        unavailable=tuple(unavailable),
    )
