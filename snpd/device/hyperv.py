"""Is this guest a Hyper-V SNP-isolated VM (an Azure confidential VM)?

The test is snpguest's ``hyperv::present()``: CPUID 0x40000000 names "Microsoft Hv"
with leaves up to at least 0x40000005, 0x40000003 EBX has the isolation bit (22),
and 0x4000000C EBX's isolation type (bits 0-3) is 2, SEV-SNP. Python cannot run
CPUID itself; the leaves come from the kernel's ``/dev/cpu/0/cpuid`` (module
``cpuid``, root) or, failing that, from the line the kernel logs from the same
leaves at boot: ``Hyper-V: Isolation Config: Group A 0x1, Group B 0xba2`` (printed
only when the isolation bit is set; Group B is 0x4000000C EBX). The daemon reads
that line with the rest of the kernel log (snpd.status: snpd-probe as root, for the
unprivileged daemon) and passes its verdict in.
"""

from __future__ import annotations

import os
import re
import struct
from typing import Callable, Iterable, Optional, Tuple

HYPERV_SIGNATURE = b"Microsoft Hv"
LEAF_VENDOR = 0x40000000
LEAF_FEATURES = 0x40000003
LEAF_ISOLATION = 0x4000000C
LEAF_MIN = 0x40000005
ISOLATION_BIT = 1 << 22
ISOLATION_TYPE_MASK = 0xF
ISOLATION_TYPE_SNP = 2
CPUID_DEVICE = "/dev/cpu/0/cpuid"

Registers = Tuple[int, int, int, int]  # eax, ebx, ecx, edx
CpuidReader = Callable[[int], Optional[Registers]]

_ISOLATION_LINE = re.compile(r"Hyper-V: Isolation Config: Group A (0x[0-9a-fA-F]+), "
                             r"Group B (0x[0-9a-fA-F]+)")


def snp_isolated_by_cpuid(cpuid: CpuidReader) -> Optional[bool]:
    """The CPUID test; None when the leaves cannot be read."""
    vendor = cpuid(LEAF_VENDOR)
    if vendor is None:
        return None
    eax, ebx, ecx, edx = vendor
    if eax < LEAF_MIN or struct.pack("<III", ebx, ecx, edx) != HYPERV_SIGNATURE:
        return False
    features, isolation = cpuid(LEAF_FEATURES), cpuid(LEAF_ISOLATION)
    if features is None or isolation is None:
        return None
    return bool(features[1] & ISOLATION_BIT) and \
        isolation[1] & ISOLATION_TYPE_MASK == ISOLATION_TYPE_SNP


def snp_isolated_by_log(lines: Iterable[str]) -> Optional[bool]:
    """The kernel's boot line for the same leaves; None when no such line is logged."""
    for line in lines:
        match = _ISOLATION_LINE.search(line)
        if match:
            return int(match.group(2), 16) & ISOLATION_TYPE_MASK == ISOLATION_TYPE_SNP
    return None


def read_cpuid_device(path: str = CPUID_DEVICE) -> CpuidReader:
    """A reader of the kernel's cpuid device: a pread of 16 bytes at the leaf."""
    def read(leaf: int) -> Optional[Registers]:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            return None
        try:
            data = os.pread(fd, 16, leaf)
        except OSError:
            return None
        finally:
            os.close(fd)
        if len(data) != 16:
            return None
        eax, ebx, ecx, edx = struct.unpack("<4I", data)
        return eax, ebx, ecx, edx
    return read


def snp_isolated(cpuid: CpuidReader, logged: Optional[bool] = None) -> bool:
    """CPUID where it can be read, else what the kernel log said
    (:func:`snp_isolated_by_log`); False when neither says."""
    found = snp_isolated_by_cpuid(cpuid)
    return bool(logged if found is None else found)
