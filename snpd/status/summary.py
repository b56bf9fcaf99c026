"""The SEV status in words: one document, and the texts made from it for the journal,
systemd's STATUS= line and ``snpctl status``. Pure functions over plain values.

Everything starts from the daemon's properties (the same dictionary D-Bus and
varlink serve), so the journal, ``systemctl status`` and ``snpctl status`` can
never disagree. ``snpctl status --direct`` builds the same dictionary from local
facts. This module is on snpctl's fast path: standard library only, and not even
``typing`` or ``dataclasses`` at run time (see tests/unit/test_snpctl.py).
"""

from __future__ import annotations

TYPE_CHECKING = False  # see snpd/__init__.py: the client path does not import typing
if TYPE_CHECKING:
    from typing import Any, Dict, List, Mapping, Optional

ATTESTATION = "org.snpd.Snpd1.Attestation"
MANAGER = "org.snpd.Snpd1.Manager"

#: ``product_source`` values and how the texts say them.
PRODUCT_SOURCES = {"report": "report", "cpuid": "CPUID", "emulator": "emulator configuration"}

#: The keys of :func:`status_document` (``snpctl status --json``), in order. Stable:
#: add keys, never rename or remove them.
DOCUMENT_KEYS = ("source", "transport", "version", "backend", "state", "state_reason",
                 "snp_active", "emulated", "reason", "sev_features", "sev_status", "vmpl",
                 "vmpl_assumed", "vmpck", "vmpck_disabled", "product", "product_source",
                 "reported_tcb", "cpu", "kernel_log", "unavailable", "device", "statistics",
                 "report_data")

#: What REPORT_DATA binds (the ReportDataBinding property), in words.
REPORT_DATA_BINDINGS = {
    "caller": "the caller's bytes",
    "runtime-data": "SHA-256 of the paravisor's runtime JSON (user-data: the caller's bytes)",
}


def decode_tcb(raw: int, product: Optional[str]) -> Dict[str, Any]:
    """REPORTED_TCB's components in the product's layout (docs/reference/abi.md §4.6): Milan
    and Genoa byte 0 bootloader, 1 TEE, 6 SNP, 7 microcode; Turin byte 0 FMC, 1
    bootloader, 2 TEE, 3 SNP, 7 microcode. Only ``raw`` when the product is unknown.
    (snpd.abi.tcb does the same with dataclasses, too slow to import here; a unit
    test holds the two together.)"""
    out: Dict[str, Any] = {"raw": f"0x{raw:016x}"}
    b = (raw & (1 << 64) - 1).to_bytes(8, "little")
    if product == "Turin":
        out.update(fmc=b[0], bootloader=b[1], tee=b[2], snp=b[3], microcode=b[7])
    elif product in ("Milan", "Genoa"):
        out.update(bootloader=b[0], tee=b[1], snp=b[6], microcode=b[7])
    return out


def tcb_text(tcb: Optional[Mapping[str, Any]]) -> str:
    """``0x… (bootloader 3, tee 0, snp 8, microcode 115)``."""
    if not tcb:
        return "not known yet"
    parts = ", ".join(f"{k} {v}" for k, v in tcb.items() if k != "raw")
    return f"{tcb['raw']} ({parts})" if parts else f"{tcb['raw']} (layout unknown)"


def tcb_short(tcb: Optional[Mapping[str, Any]]) -> str:
    """``bl3 tee0 snp8 uc115`` (``fmc0`` first on Turin): short enough for STATUS=."""
    if not tcb:
        return "unknown"
    names = {"fmc": "fmc", "bootloader": "bl", "tee": "tee", "snp": "snp", "microcode": "uc"}
    parts = [f"{names[k]}{v}" for k, v in tcb.items() if k in names]
    return " ".join(parts) if parts else str(tcb["raw"])


# (interface, property) -> the snpd.service.Properties field it shows: the one map
# between the typed properties and the shape D-Bus serves, snpd.client returns and
# the status texts read.
PROPERTY_FIELDS = {
    (ATTESTATION, "Backend"): "backend",
    (ATTESTATION, "ReportDataBinding"): "report_data",
    (ATTESTATION, "Product"): "product",
    (ATTESTATION, "Vmpl"): "vmpl",
    (ATTESTATION, "ReportedTcb"): "reported_tcb",
    (ATTESTATION, "State"): "state",
    (ATTESTATION, "StateReason"): "state_reason",
    (MANAGER, "Version"): "version",
    (MANAGER, "SevStatus"): "sev_status",
    (MANAGER, "Statistics"): "statistics",
}


def plain_property(field: str, value: Any) -> Any:
    """A Properties field's value as the interface-keyed shape carries it: the
    product by its KDS name ("" when unknown), mappings as dicts."""
    if field == "product":
        return "" if value is None else str(getattr(value, "value", value))
    if field in ("sev_status", "statistics"):
        return dict(value)
    return value


def by_interface(fields: Mapping[str, Any]) -> Dict[str, Dict[str, Any]]:
    """Properties fields by name (e.g. ``dataclasses.asdict`` of
    :class:`snpd.service.Properties`, or varlink's GetProperties) by interface and
    then by property name, as :func:`status_document` reads them."""
    out: Dict[str, Dict[str, Any]] = {ATTESTATION: {}, MANAGER: {}}
    for (interface, name), field in PROPERTY_FIELDS.items():
        if field in fields:
            out[interface][name] = plain_property(field, fields[field])
    return out


def status_document(props: Mapping[str, Any], *, source: str = "daemon") -> Dict[str, Any]:
    """The status as ``snpctl status --json`` gives it (keys: :data:`DOCUMENT_KEYS`;
    a fact nobody knows is null), from the daemon's properties by interface
    (``transport`` may be added at the top level)."""
    att = props.get(ATTESTATION) or {}
    man = props.get(MANAGER) or {}
    sev = man.get("SevStatus") or {}
    product = att.get("Product") or None
    raw_tcb = int(att.get("ReportedTcb") or 0)
    stats = man.get("Statistics") or {}
    return {
        "source": source,
        "transport": props.get("transport") or None,
        "version": man.get("Version") or None,
        "backend": att.get("Backend") or None,
        "state": att.get("State") or None,
        "state_reason": att.get("StateReason") or None,
        "snp_active": sev.get("snp_active"),
        "emulated": bool(sev.get("emulated")),
        "reason": sev.get("reason") or None,
        "sev_features": list(sev.get("features") or []),
        "sev_status": list(sev.get("sev_status") or []),
        "vmpl": att.get("Vmpl"),
        "vmpl_assumed": att.get("Vmpl") is not None and sev.get("vmpl") is None,
        "vmpck": sev.get("vmpck"),
        "vmpck_disabled": sev.get("vmpck_disabled"),
        "product": product,
        "product_source": (sev.get("product_source") or None) if product else None,
        # 0 is what the property holds before any report: no firmware reports it.
        "reported_tcb": decode_tcb(raw_tcb, product) if raw_tcb else None,
        "cpu": sev.get("cpu") or None,
        "kernel_log": sev.get("kernel_log") or None,
        "unavailable": list(sev.get("unavailable") or []),
        # status --direct: the backend's own description (path, provider ...).
        "device": props.get("device") or None,
        "statistics": {str(k): int(v) for k, v in sorted(stats.items())},
        # "caller" or "runtime-data" (Azure); null from a daemon that predates it
        "report_data": att.get("ReportDataBinding") or None,
    }


def _product(doc: Mapping[str, Any]) -> str:
    product = doc.get("product")
    if not product:
        return "product unknown"
    source = PRODUCT_SOURCES.get(doc.get("product_source") or "", "")
    return f"product {product}" + (f" ({source})" if source else "")


def _vmpl(doc: Mapping[str, Any]) -> str:
    vmpl = doc.get("vmpl")
    if vmpl is None:
        return "VMPL unknown"
    return f"VMPL {vmpl}" + (" (assumed: neither sysfs nor the kernel log says)"
                             if doc.get("vmpl_assumed") else "")


def _vmpck(doc: Mapping[str, Any], *, named: bool = True) -> str:
    vmpck, disabled = doc.get("vmpck"), doc.get("vmpck_disabled")
    if disabled is not None:
        return f"VMPCK{disabled} DISABLED by the kernel"
    if vmpck is None:
        return ("VMPCK " if named else "") + "unknown (the kernel log did not say)"
    return f"VMPCK{vmpck}"


def sev_summary(doc: Mapping[str, Any]) -> str:
    """The facts in one sentence: what the kernel log, sysfs and the firmware showed,
    or why this is not an SEV-SNP guest. Never report_data, keys or chip IDs."""
    cpu = f"; CPU {doc['cpu']}" if doc.get("cpu") else ""
    if not doc.get("snp_active"):
        reason = doc.get("reason") or (
            "not an SEV-SNP guest" if doc.get("snp_active") is False else
            "SEV-SNP state unknown")
        return f"{reason}{cpu}"
    head = "SEV-SNP guest (emulated)" if doc.get("emulated") else "SEV-SNP guest"
    features = " ".join(doc.get("sev_features") or ()) or "not logged"
    extra = [f for f in doc.get("sev_status") or () if f not in ("SEV", "SEV-ES", "SEV-SNP")]
    if extra:
        features += f" (SEV_STATUS also {' '.join(extra)})"
    return (f"{head}: features {features}; {_vmpl(doc)}; {_vmpck(doc)}; {_product(doc)}; "
            f"reported TCB {tcb_text(doc.get('reported_tcb'))}{cpu}")


def _state(doc: Mapping[str, Any]) -> str:
    state = doc.get("state") or "unknown"
    reason = doc.get("state_reason")
    return f"state {state}" + (f": {reason}" if reason and state != "ready" else "")


def startup_message(doc: Mapping[str, Any]) -> str:
    """The start-up journal MESSAGE."""
    version = f" {doc['version']}" if doc.get("version") else ""
    return (f"snpd{version} serving, {doc.get('backend') or 'no'} backend. "
            f"{sev_summary(doc)}; {_state(doc)}")


def changed_message(doc: Mapping[str, Any], changed: List[str]) -> str:
    """The journal MESSAGE when the status changed after start-up."""
    what = f" ({', '.join(changed)})" if changed else ""
    return f"SEV-SNP status changed{what}: {sev_summary(doc)}; {_state(doc)}"


def changes(before: Mapping[str, Any], after: Mapping[str, Any]) -> List[str]:
    """Which facts differ, in words, for :func:`changed_message`."""
    names = (("product", "product"), ("product_source", "product source"),
             ("reported_tcb", "reported TCB"), ("state", "state"),
             ("vmpck_disabled", "VMPCK"), ("snp_active", "SEV-SNP"))
    return [name for key, name in names if before.get(key) != after.get(key)]


def journal_fields(doc: Mapping[str, Any]) -> Dict[str, Any]:
    """The record's SNPD_* fields (None: left out)."""
    tcb = doc.get("reported_tcb")
    return {
        "backend": doc.get("backend"),
        "snp_active": doc.get("snp_active"),
        "emulated": doc.get("emulated") or None,
        "features": " ".join(doc.get("sev_features") or ()) or None,
        "sev_status": " ".join(doc.get("sev_status") or ()) or None,
        "vmpl": doc.get("vmpl"),
        "vmpck": doc.get("vmpck"),
        "product": doc.get("product"),
        "product_source": doc.get("product_source"),
        "reported_tcb": tcb["raw"] if tcb else None,
        "state": doc.get("state"),
        "state_reason": doc.get("state_reason"),
        "not_snp_reason": None if doc.get("snp_active") else doc.get("reason"),
        "unavailable": "; ".join(doc.get("unavailable") or ()) or None,
    }


def status_line(doc: Mapping[str, Any]) -> str:
    """systemd's STATUS= (``systemctl status snpd``): state, product, VMPL, reported
    TCB, backend and request counts on one short line. A non-ready state leads in
    capitals and its reason (with the remedy) comes last, so that a display that
    cuts the line keeps the facts."""
    if doc.get("snp_active") is False:
        head = "not an SEV-SNP guest"
    elif doc.get("snp_active") is None:
        head = "SEV-SNP state unknown"
    else:
        vmpl = doc.get("vmpl")
        head = (f"{doc.get('product') or 'product unknown'}, "
                f"VMPL {'?' if vmpl is None else vmpl}, "
                f"TCB {tcb_short(doc.get('reported_tcb'))}")
    head += f", {doc.get('backend') or 'no'} backend"
    stats = doc.get("statistics") or {}
    counts = (f"{stats.get('report.ok', 0) + stats.get('extended_report.ok', 0)} reports, "
              f"{stats.get('derived_key.ok', 0)} keys, "
              f"{stats.get('queue.rejected_busy', 0)} busy")
    state = doc.get("state") or "unknown"
    if state != "ready":
        return f"{state.upper()}: {head}; {counts}; {doc.get('state_reason') or 'no reason given'}"
    return f"ready: {head}; {counts}"


def status_lines(doc: Mapping[str, Any]) -> List[str]:
    """``snpctl status`` as text: one fact per line, in a fixed order. A guest that is
    not SEV-SNP gets the reason instead of the SEV-SNP facts (--json has them all)."""
    state = doc.get("state") or "unknown"
    lines = [f"  state         {state}" + (f" ({doc['state_reason']})"
                                           if doc.get("state_reason") else "")]
    via = f" via {doc['transport']}" if doc.get("transport") else ""
    version = f"   snpd {doc['version']}" if doc.get("version") else ""
    lines.append(f"  backend       {doc.get('backend') or 'none'}"
                 + (" (emulated)" if doc.get("emulated") else "") + f"   {doc.get('source')}"
                 f"{via}{version}")
    active = doc.get("snp_active")
    if active:
        lines.append("  SEV-SNP       active")
        lines.append(f"  features      {' '.join(doc.get('sev_features') or ()) or 'not logged'}")
        if doc.get("sev_status"):
            lines.append(f"  SEV_STATUS    {' '.join(doc['sev_status'])}")
        vmpl = doc.get("vmpl")
        lines.append(f"  VMPL          {'unknown' if vmpl is None else vmpl}"
                     + (" (assumed: neither sysfs nor the kernel log says)"
                        if doc.get("vmpl_assumed") else ""))
        lines.append(f"  VMPCK         {_vmpck(doc, named=False)}")
        lines.append(f"  product       {_product(doc).replace('product ', '', 1)}")
        lines.append(f"  reported TCB  {tcb_text(doc.get('reported_tcb'))}")
        binding = doc.get("report_data")
        if binding:
            lines.append(f"  REPORT_DATA   {REPORT_DATA_BINDINGS.get(binding, binding)}")
    else:
        lines.append("  SEV-SNP       " + (doc.get("reason") or (
            "not active" if active is False else "unknown")))
    if doc.get("cpu"):
        lines.append(f"  CPU           {doc['cpu']}")
    for why in doc.get("unavailable") or ():
        lines.append(f"  unreadable    {why}")
    if doc.get("source") == "daemon":
        stats = {k: v for k, v in (doc.get("statistics") or {}).items() if v}
        lines.append("  statistics    " + (", ".join(f"{k}={v}" for k, v in stats.items())
                                           or "none"))
    return lines
