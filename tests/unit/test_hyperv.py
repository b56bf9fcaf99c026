"""Azure CVM detection (snpd.device.hyperv): snpguest's CPUID test, and the kernel's
boot line for the same leaves."""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Dict, Optional

import pytest

from snpd.device import hyperv
from snpd.device.azure import AzureVtpmDevice
from snpd.device.select import open_device
from snpd.errors import DeviceUnavailable
from snpd.status.kernel_log import parse_kernel_log

SIG = struct.unpack("<III", b"Microsoft Hv")


def leaves(*, max_leaf: int = 0x4000000C, sig: tuple = SIG, features_ebx: int = 1 << 22,
           isolation_ebx: int = 0xBA2) -> Dict[int, hyperv.Registers]:
    return {0x40000000: (max_leaf, *sig), 0x40000003: (0, features_ebx, 0, 0),
            0x4000000C: (1, isolation_ebx, 0, 0)}


def reader(table: Optional[Dict[int, hyperv.Registers]]) -> hyperv.CpuidReader:
    return lambda leaf: None if table is None else table.get(leaf)


@pytest.mark.parametrize("table, expected", [
    (leaves(), True),                                        # an Azure SNP CVM (type 2)
    (leaves(isolation_ebx=0xBA3), False),                    # TDX isolation
    (leaves(features_ebx=0), False),                         # not isolated
    (leaves(sig=struct.unpack("<III", b"KVMKVMKVM\0\0\0")), False),  # not Hyper-V
    (leaves(max_leaf=0x40000004), False),                    # too few Hyper-V leaves
    (None, None),                                            # unreadable
])
def test_cpuid(table: Optional[Dict[int, hyperv.Registers]], expected: Optional[bool]) -> None:
    assert hyperv.snp_isolated_by_cpuid(reader(table)) is expected


def test_kernel_log_line() -> None:
    snp = ["[    0.000000] Hyper-V: Isolation Config: Group A 0x1, Group B 0xba2"]
    tdx = ["Hyper-V: Isolation Config: Group A 0x1, Group B 0xbe3"]
    assert hyperv.snp_isolated_by_log(snp) is True
    assert hyperv.snp_isolated_by_log(tdx) is False
    assert hyperv.snp_isolated_by_log(["Hyper-V: privilege flags low 0x2e7f"]) is None
    # CPUID first; the log only when the leaves cannot be read.
    logged = hyperv.snp_isolated_by_log(snp)
    assert hyperv.snp_isolated(reader(leaves(features_ebx=0)), logged) is False
    assert hyperv.snp_isolated(reader(None), logged) is True
    assert hyperv.snp_isolated(reader(None), hyperv.snp_isolated_by_log(())) is False
    # The daemon gets the verdict from the kernel facts snpd-probe (root) recorded.
    facts = parse_kernel_log(["SEV: Status: SEV SEV-ES SEV-SNP", *tdx, *snp])
    assert facts.hyperv_snp is True and facts.to_json()["hyperv_snp"] is True
    assert parse_kernel_log(tdx).hyperv_snp is False
    assert parse_kernel_log(["SEV: Status: SEV"]).hyperv_snp is None


def test_cpuid_device_reader(tmp_path: Path) -> None:
    """The kernel's cpuid device answers a pread of 16 bytes at the leaf's offset."""
    fake = tmp_path / "cpuid"
    with open(fake, "wb") as f:
        f.seek(0x40000000)
        f.write(struct.pack("<4I", 0x4000000C, *SIG))
    read = hyperv.read_cpuid_device(str(fake))
    assert read(0x40000000) == (0x4000000C, *SIG)
    assert read(0x40000003) is None  # past the end: short read
    assert hyperv.read_cpuid_device(str(tmp_path / "absent"))(0x40000000) is None


def test_auto_picks_azure_on_an_snp_isolated_guest(tmp_path: Path) -> None:
    device = open_device("auto", cpuid=reader(leaves()), tpm="unix:/nonexistent")
    assert isinstance(device, AzureVtpmDevice) and device.name == "azure"
    assert device.platform().report_data == "runtime-data"
    assert device.describe()["tpm"] == "unix:/nonexistent"
    with pytest.raises(DeviceUnavailable, match="no SEV-SNP guest interface"):
        open_device("auto", cpuid=reader(leaves(features_ebx=0)),
                    path=str(tmp_path / "sev-guest"), configfs_root=str(tmp_path / "none"))
