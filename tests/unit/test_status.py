"""SEV status from kernel log lines of every kernel era, sysfs and device nodes."""

from __future__ import annotations

from pathlib import Path

from hypothesis import given
from hypothesis import strategies as st

from snpd.abi.product import Product
from snpd.status.kernel_log import parse_kernel_log, sev_status_names
from snpd.status.probe import emulated, parse_cpuinfo, probe, status_properties

MODERN = """\
[    0.000000] Linux version 6.12.0 (builder@debian)
[    0.120000] Memory Encryption Features active: AMD SEV SEV-ES SEV-SNP
[    0.120001] SEV: Status: SEV SEV-ES SEV-SNP DebugSwap
[    0.130000] SEV: Using SNP CPUID table, 31 entries present.
[    0.130001] SEV: SNP running at VMPL0.
[    1.200000] SEV: SNP guest platform device initialized.
[    3.000000] sev-guest sev-guest: Initialized SEV guest driver (using VMPCK0 communication key)
""".splitlines()

OLD = """\
[    0.1] AMD Memory Encryption Features active: SEV SEV-ES SEV-SNP
[    0.2] SEV: Using SNP CPUID table, 29 entries present.
[    2.0] sev-guest sev-guest: Initialized SEV guest driver (using vmpck_id 0)
[  100.0] sev-guest sev-guest: Detected error from ASP request. rc: -5, fw_err: 17
[  100.1] sev-guest sev-guest: Disabling vmpck_id 0 to prevent IV reuse.
""".splitlines()


def test_modern_kernel() -> None:
    facts = parse_kernel_log(MODERN)
    assert facts.snp_active
    assert facts.memory_encryption == ("SEV", "SEV-ES", "SEV-SNP")
    assert facts.sev_status == ("SEV", "SEV-ES", "SEV-SNP", "DebugSwap")
    assert facts.cpuid_table_entries == 31 and facts.vmpl == 0 and facts.driver_vmpck == 0
    assert facts.platform_device and facts.vmpck_disabled is None


def test_old_kernel_with_a_wiped_vmpck() -> None:
    facts = parse_kernel_log(OLD)
    assert facts.snp_active and facts.memory_encryption == ("SEV", "SEV-ES", "SEV-SNP")
    assert facts.vmpl is None and facts.driver_vmpck == 0
    assert facts.vmpck_disabled == 0
    assert facts.asp_errors and "Detected error from ASP request" in facts.asp_errors[0]


def test_new_wording_and_kmsg_records() -> None:
    facts = parse_kernel_log([
        "6,512,3000000,-;sev-guest sev-guest: Initialized SEV guest driver (using VMPCK2 "
        "communication key)",
        "1,600,9000000,-;SEV: Disabling VMPCK2 communication key to prevent IV reuse.",
        "3,601,9000001,-;sev-guest sev-guest: Empty VMPCK3 communication key",
    ])
    assert facts.driver_vmpck == 2 and facts.vmpck_disabled == 2
    assert facts.driver_probe_error == "Empty VMPCK3 communication key"


def test_not_a_snp_guest() -> None:
    facts = parse_kernel_log(["[0.1] Memory Encryption Features active: AMD SEV SEV-ES"])
    assert not facts.snp_active
    assert not parse_kernel_log([]).snp_active


def test_sev_status_msr_names() -> None:
    assert sev_status_names(0b111 | 1 << 7) == ("SEV", "SEV-ES", "SEV-SNP", "DebugSwap")
    assert sev_status_names(1 << 13) == ("bit13",)


@given(st.lists(st.text(max_size=300), max_size=50))
def test_arbitrary_lines_never_raise(lines: list) -> None:  # type: ignore[type-arg]
    parse_kernel_log(lines).to_json()


def test_probe_reads_a_fake_root(tmp_path: Path) -> None:
    (tmp_path / "sys/devices/system/cpu/sev").mkdir(parents=True)
    (tmp_path / "sys/devices/system/cpu/sev/vmpl").write_text("1\n")
    (tmp_path / "sys/devices/platform/sev-guest").mkdir(parents=True)
    (tmp_path / "sys/kernel/config/tsm/report").mkdir(parents=True)
    (tmp_path / "dev").mkdir()
    (tmp_path / "dev/sev-guest").write_text("")
    status = probe(tmp_path, kernel_lines=MODERN)
    assert status.snp_active is True and status.vmpl == 1
    assert status.device_node and status.configfs_tsm and status.platform_device
    assert status.to_json()["kernel"]["cpuid_table_entries"] == 31  # type: ignore[index]


def test_probe_says_what_it_could_not_read(tmp_path: Path) -> None:
    status = probe(tmp_path)
    assert status.snp_active is None
    assert any("kernel log" in why for why in status.unavailable)


# -- the facts beyond the kernel log, and why a guest is not SEV-SNP -------------------------

CPUINFO = """\
processor\t: 0
vendor_id\t: AuthenticAMD
cpu family\t: 25
model\t\t: 160
stepping\t: 2
flags\t\t: fpu sev_snp sev
"""


def test_cpuinfo_names_the_product() -> None:
    cpu = parse_cpuinfo(CPUINFO + "\nprocessor\t: 1\nvendor_id\t: Other\n")
    assert (cpu.vendor, cpu.family, cpu.model, cpu.stepping) == ("AuthenticAMD", 0x19, 0xA0, 2)
    assert cpu.product is Product.GENOA  # Zen4c is filed under Genoa
    assert cpu.flags == ("sev", "sev_snp")
    assert cpu.describe() == "AuthenticAMD family 0x19 model 0xa0 stepping 2 (Genoa)"
    assert parse_cpuinfo(CPUINFO.replace("AuthenticAMD", "GenuineIntel")).product is None
    assert parse_cpuinfo("").describe() == "unknown vendor"


def test_a_log_without_sev_lines_is_not_sev_snp_and_says_why(tmp_path: Path) -> None:
    status = probe(tmp_path, kernel_lines=[], kernel_log="snpd-probe (/dev/kmsg)")
    assert status.snp_active is False  # the log was read: it said nothing of SEV
    assert status.reason == ("not an SEV-SNP guest: no 'Memory Encryption Features active' "
                             "line in the kernel log and no /dev/sev-guest")
    sev_only = probe(tmp_path, kernel_lines=["Memory Encryption Features active: AMD SEV"])
    assert sev_only.features == ("SEV",)
    assert sev_only.reason == ("not an SEV-SNP guest: the kernel reports 'Memory Encryption "
                               "Features active: SEV' without SEV-SNP and no /dev/sev-guest")
    unknown = probe(tmp_path)
    assert unknown.snp_active is None and unknown.reason is not None
    assert unknown.reason.startswith("SEV-SNP state unknown: no /dev/sev-guest and no "
                                     "/sys/devices/platform/sev-guest; could not read kernel "
                                     "log (")
    assert probe(tmp_path, kernel_lines=MODERN).reason is None


def test_the_msr_decides_when_it_was_read(tmp_path: Path) -> None:
    (tmp_path / "dev/cpu/0").mkdir(parents=True)
    with open(tmp_path / "dev/cpu/0/msr", "wb") as f:
        f.seek(0xC0010131)
        f.write((0b011).to_bytes(8, "little"))  # SEV and SEV-ES, no SNP
    status = probe(tmp_path, kernel_lines=MODERN, msr=True)
    assert status.sev_status_msr == 0b011 and status.snp_active is False
    assert status.reason is not None and "SEV_STATUS MSR is 0x3" in status.reason
    missing = probe(tmp_path / "elsewhere", kernel_lines=MODERN, msr=True)
    assert any("msr module is not loaded" in why for why in missing.unavailable)
    assert probe(tmp_path, kernel_lines=MODERN).sev_status_msr is None  # only when asked


def test_emulated_status_and_its_properties() -> None:
    status = emulated(2, ["sev-guest sev-guest: Initialized SEV guest driver (using VMPCK2 "
                          "communication key)"])
    assert status.snp_active and status.emulated and status.vmpl == 2
    props = status_properties(status)
    assert props["features"] == ["SEV", "SEV-ES", "SEV-SNP"]
    assert (props["vmpl"], props["vmpck"], props["kernel_log"]) == (2, 2, "emulator")
    assert "reason" not in props and props["emulated"] is True
    # Unknowns are left out (D-Bus has no null), snp_active included.
    assert "snp_active" not in status_properties(probe(Path("/nonexistent-root")))
