"""``snpctl ok``'s checks, as snpguest ``ok`` lists them: one row per fact, PASS,
FAIL, SKIP (could not be checked, and why) or INFO. Pure: facts in, rows out.

Two sources: the daemon's status document (snpd.status.summary), whose facts the
privileged snpd-probe gathered; or what this process could read itself
(snpd.status.probe), where every source it could not read is named with the
reason, never silently skipped.
"""

from __future__ import annotations

from typing import Any, Dict, List, Mapping, NamedTuple, Optional, Sequence

from snpd.status.kernel_log import sev_status_names
from snpd.status.probe import (
    CPU_SEV_FLAGS,
    DEVICE,
    FEATURES_LINE,
    SYSFS_VMPL,
    SevStatus,
)
from snpd.status.summary import tcb_text

PASS, FAIL, SKIP, INFO = "pass", "fail", "skipped", "info"
MARKS = {PASS: "PASS", FAIL: "FAIL", SKIP: "SKIP", INFO: "INFO"}


class Row(NamedTuple):
    status: str
    name: str
    detail: str

    def to_json(self) -> Dict[str, str]:
        return {"name": self.name, "status": self.status, "detail": self.detail}


def _mark(value: Optional[bool]) -> str:
    return SKIP if value is None else PASS if value else FAIL


def daemon_checks(doc: Mapping[str, Any]) -> List[Row]:
    """Rows from the daemon's status document (``snpctl ok`` with a daemon)."""
    active = doc.get("snp_active")
    features = " ".join(doc.get("sev_features") or ())
    rows = [Row(_mark(active), "SEV-SNP",
                (f"active: {features or 'features not logged'}"
                 + (" (emulated)" if doc.get("emulated") else "")) if active
                else doc.get("reason") or "not active")]
    if doc.get("sev_status"):
        rows.append(Row(PASS, "SEV_STATUS", " ".join(doc["sev_status"])))
    vmpl = doc.get("vmpl")
    rows.append(Row(SKIP if doc.get("vmpl_assumed") or vmpl is None else PASS, "VMPL",
                    f"{vmpl} (assumed: neither sysfs nor the kernel log says)"
                    if doc.get("vmpl_assumed") else str(vmpl)))
    if doc.get("vmpck_disabled") is not None:
        rows.append(Row(FAIL, "VMPCK", f"VMPCK{doc['vmpck_disabled']} DISABLED: reboot, or "
                                       "reload sev-guest with another vmpck_id"))
    elif doc.get("vmpck") is not None:
        rows.append(Row(PASS, "VMPCK", f"VMPCK{doc['vmpck']} in use"))
    else:
        rows.append(Row(SKIP, "VMPCK", "unknown: the kernel log did not say"))
    product = doc.get("product")
    rows.append(Row(PASS if product else SKIP, "product", product or "unknown"))
    tcb = doc.get("reported_tcb")
    rows.append(Row(PASS if tcb else SKIP, "reported TCB", tcb_text(tcb)))
    state = doc.get("state") or "unknown"
    rows.append(Row(PASS if state == "ready" else FAIL, "firmware channel",
                    f"{state} ({doc.get('backend') or 'no'} backend)"
                    + (f": {doc['state_reason']}" if doc.get("state_reason") else "")))
    return rows


def _why(unavailable: List[str], prefix: str) -> Optional[str]:
    """Take the first ``unavailable`` entry starting with ``prefix`` out of the list."""
    for i, why in enumerate(unavailable):
        if why.startswith(prefix):
            return unavailable.pop(i)
    return None


def local_checks(status: SevStatus, *, device_access: Optional[bool] = None,
                 daemon_error: Optional[str] = None) -> List[Row]:
    """Rows from what this process read itself. ``device_access``: whether it may open
    /dev/sev-guest for reading and writing (None: not checked); ``daemon_error``: why
    the daemon was not asked (it did not answer)."""
    k = status.kernel
    unread = list(status.unavailable)
    log_says = ("the kernel log does not say" if status.kernel_log is not None
                else "the kernel log could not be read")
    active = status.snp_active
    features = " ".join(status.features)
    if active:
        detail = f"active: {features or 'features not logged'}"
    elif active is False:
        detail = status.reason or "not active"
    else:  # the rows below say what could not be read
        detail = "unknown: nothing readable here says" + (
            "" if status.device_node else f" (and no /{DEVICE})")
    rows = [Row(_mark(active), "SEV-SNP", detail)]
    log_why = _why(unread, "kernel log")
    if status.kernel_log is not None:
        said = (f"'{FEATURES_LINE}: {' '.join(k.memory_encryption)}'" if k.memory_encryption
                else f"no '{FEATURES_LINE}' line")
        rows.append(Row(PASS, "kernel log", f"read ({status.kernel_log}): {said}"))
    else:
        rows.append(Row(SKIP, "kernel log", f"could not read {log_why}" if log_why
                        else "not read"))
    if k.sev_status:
        rows.append(Row(PASS, "SEV_STATUS (log)", " ".join(k.sev_status)))
    elif status.kernel_log is not None and active:
        rows.append(Row(SKIP, "SEV_STATUS (log)", "not logged (kernels before 6.9 do not)"))
    msr_why = _why(unread, "the SEV_STATUS MSR")
    msr = status.sev_status_msr
    if msr is not None:
        rows.append(Row(PASS if msr & 0b111 == 0b111 else FAIL, "SEV_STATUS MSR",
                        f"0x{msr:x}: {' '.join(sev_status_names(msr)) or 'no feature'}"))
    else:
        rows.append(Row(SKIP, "SEV_STATUS MSR", f"could not read {msr_why}" if msr_why
                        else "not read"))
    if status.sysfs_vmpl is not None:
        rows.append(Row(PASS, "VMPL", f"{status.sysfs_vmpl} (/{SYSFS_VMPL})"))
    elif k.vmpl is not None:
        rows.append(Row(PASS, "VMPL", f"{k.vmpl} (kernel log)"))
    else:
        rows.append(Row(SKIP, "VMPL", f"unknown: no /{SYSFS_VMPL} (kernels before 6.11 "
                                      f"have none) and {log_says}"))
    if status.device_node:
        access = ("" if device_access is None else
                  ", this user may open it" if device_access else
                  ", but this user may not open it (ask the daemon, or run as root)")
        rows.append(Row(PASS, f"/{DEVICE}", f"present{access}"))
    else:
        rows.append(Row(SKIP if status.configfs_tsm else FAIL, f"/{DEVICE}",
                        "absent" + (" (configfs-tsm may serve reports)"
                                    if status.configfs_tsm else "")))
    rows.append(Row(PASS if status.configfs_tsm else SKIP, "configfs-tsm",
                    "present" if status.configfs_tsm else "absent"))
    if k.vmpck_disabled is not None:
        rows.append(Row(FAIL, "VMPCK", f"VMPCK{k.vmpck_disabled} DISABLED: reboot, or "
                                       "reload sev-guest with another vmpck_id"))
    elif k.driver_vmpck is not None:
        rows.append(Row(PASS, "VMPCK", f"VMPCK{k.driver_vmpck} in use"))
    elif k.driver_probe_error:
        rows.append(Row(FAIL, "VMPCK", f"the sev-guest driver refused: {k.driver_probe_error}"))
    else:
        rows.append(Row(SKIP, "VMPCK", f"unknown: {log_says}"))
    cpu_why = _why(unread, "/proc/cpuinfo")
    if status.cpu is not None:
        flags = " ".join(status.cpu.flags) or f"none of {' '.join(CPU_SEV_FLAGS)}"
        rows.append(Row(INFO, "CPU", f"{status.cpu.describe()}; cpuinfo flags: {flags} (host "
                                     "capability flags, not a guest indicator)"))
    else:
        rows.append(Row(SKIP, "CPU", f"could not read {cpu_why}" if cpu_why else "unknown"))
    rows += [Row(SKIP, "could not read", why) for why in unread]
    if daemon_error is not None:
        # The client's hint goes on to say how to start snpd; the cause is enough here.
        rows.append(Row(SKIP, "snpd", f"did not answer ({daemon_error.split('. ', 1)[0]}); "
                                      "checked locally"))
    return rows


def render(rows: Sequence[Row]) -> List[str]:
    """``  PASS  SEV-SNP            active: SEV SEV-ES SEV-SNP``."""
    return [f"  {MARKS[r.status]}  {r.name:<18} {r.detail}" for r in rows]

