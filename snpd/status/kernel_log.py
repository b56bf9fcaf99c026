"""Parse the guest kernel's SEV lines (docs/reference/abi.md §6.1) into facts. Pure.

The lines changed wording across kernel versions; every known form is matched,
unknown lines are ignored, and nothing here raises on odd input.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Dict, Iterable, List, Optional, Tuple

from snpd.device.hyperv import snp_isolated_by_log

SEV_STATUS_BITS: Dict[int, str] = {
    0: "SEV", 1: "SEV-ES", 2: "SEV-SNP", 3: "vTom", 4: "ReflectVC", 5: "RI", 6: "AI",
    7: "DebugSwap", 8: "NoHostIBS", 9: "BTBIsol", 10: "VmplSSS", 11: "SecureTSC",
    12: "VMGExitParam", 14: "IBSVirt", 16: "VMSARegProt", 17: "SMTProt", 18: "SecureAVIC",
    23: "IBPBOnEntry",
}

MAX_LINE = 4096

_FEATURES = re.compile(r"(?:AMD )?Memory Encryption Features active:\s*(?:AMD)?\s*(.*)$")
_STATUS = re.compile(r"SEV: Status:\s*(.*)$")
_CPUID = re.compile(r"SEV: Using SNP CPUID table, (\d+) entries present")
_VMPL = re.compile(r"SEV: SNP running at VMPL(\d)")
_DRIVER = re.compile(r"Initialized SEV guest driver \(using (?:vmpck_id (\d+)|VMPCK(\d) "
                     r"communication key)\)")
_DISABLED = re.compile(r"Disabling (?:vmpck_id (\d+)|VMPCK(\d) communication key) to prevent "
                       r"IV reuse")
_PROBE_FAIL = re.compile(r"(Invalid VMPCK(\d) communication key|Empty VMPCK(\d) communication "
                         r"key|invalid vmpck id (\d+)|vmpck id (\d+) is null)")
_ASP_ERROR = re.compile(r"Detected (?:error from ASP request|unexpected decode failure from "
                        r"ASP)[^\n]*")
_PLATFORM = re.compile(r"SEV: SNP guest platform devices? initialized")


@dataclasses.dataclass(frozen=True)
class KernelFacts:
    """What the kernel log says about SEV. None means the log did not say."""

    memory_encryption: Tuple[str, ...] = ()
    sev_status: Tuple[str, ...] = ()
    cpuid_table_entries: Optional[int] = None
    vmpl: Optional[int] = None
    platform_device: bool = False
    driver_vmpck: Optional[int] = None
    vmpck_disabled: Optional[int] = None
    driver_probe_error: Optional[str] = None
    asp_errors: Tuple[str, ...] = ()
    hyperv_snp: Optional[bool] = None  # Hyper-V's isolation line: an SNP-isolated VM?
    lines: int = 0

    @property
    def snp_active(self) -> bool:
        return "SEV-SNP" in self.memory_encryption or "SEV-SNP" in self.sev_status

    def to_json(self) -> Dict[str, object]:
        return {
            "memory_encryption": list(self.memory_encryption),
            "sev_status": list(self.sev_status),
            "snp_active": self.snp_active,
            "cpuid_table_entries": self.cpuid_table_entries,
            "vmpl": self.vmpl,
            "platform_device": self.platform_device,
            "driver_vmpck": self.driver_vmpck,
            "vmpck_disabled": self.vmpck_disabled,
            "driver_probe_error": self.driver_probe_error,
            "asp_errors": list(self.asp_errors),
            "hyperv_snp": self.hyperv_snp,
        }


def _first(match: re.Match[str]) -> Optional[int]:
    for group in match.groups():
        if group is not None and group.isdigit():
            return int(group)
    return None


def parse_kernel_log(lines: Iterable[str]) -> KernelFacts:
    """Facts from kernel log lines (``dmesg`` text, ``/dev/kmsg`` records or journal
    messages; timestamps and prefixes are tolerated). Later lines win."""
    facts: Dict[str, object] = {}
    asp: List[str] = []
    count = 0
    for raw in lines:
        count += 1
        line = raw[:MAX_LINE].rstrip("\n")
        if ";" in line and line.split(";", 1)[0].replace(",", "").replace("-", "").isdigit():
            line = line.split(";", 1)[1]  # /dev/kmsg "prio,seq,ts,flags;message"
        m = _FEATURES.search(line)
        if m:
            facts["memory_encryption"] = tuple(w for w in m.group(1).split() if w != "AMD")
            continue
        m = _STATUS.search(line)
        if m:
            facts["sev_status"] = tuple(m.group(1).split())
            continue
        m = _CPUID.search(line)
        if m:
            facts["cpuid_table_entries"] = int(m.group(1))
            continue
        m = _VMPL.search(line)
        if m:
            facts["vmpl"] = int(m.group(1))
            continue
        if _PLATFORM.search(line):
            facts["platform_device"] = True
            continue
        m = _DRIVER.search(line)
        if m:
            facts["driver_vmpck"] = _first(m)
            facts["vmpck_disabled"] = None
            continue
        m = _DISABLED.search(line)
        if m:
            facts["vmpck_disabled"] = _first(m)
            continue
        m = _PROBE_FAIL.search(line)
        if m:
            facts["driver_probe_error"] = m.group(1)
            continue
        isolated = snp_isolated_by_log((line,))
        if isolated is not None:
            facts["hyperv_snp"] = isolated
            continue
        m = _ASP_ERROR.search(line)
        if m and len(asp) < 16:
            asp.append(m.group(0))
    return KernelFacts(asp_errors=tuple(asp), lines=count, **facts)  # type: ignore[arg-type]


def sev_status_names(msr: int) -> Tuple[str, ...]:
    """Feature names of a SEV_STATUS MSR value, as the kernel prints them."""
    names = []
    for bit in range(64):
        if msr >> bit & 1:
            names.append(SEV_STATUS_BITS.get(bit, f"bit{bit}"))
    return tuple(names)
