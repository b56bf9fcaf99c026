"""Evidence formats that fleet verifiers accept. Pure: report bytes and certificates in.

``trustee``: the SNP evidence JSON of Trustee's verifier — the serde form of the
Rust ``sev`` crate's AttestationReport (byte fields as integer arrays, absent
optional fields as null) plus a ``cert_chain``. Pinned byte-for-byte by a golden
test against Trustee's own e2e evidence file.
"""

from __future__ import annotations

import base64
import json
from typing import Dict, List, Optional, Sequence, Tuple

from snpd.abi.product import Product
from snpd.abi.report import AttestationReport, FirmwareVersion
from snpd.abi.tcb import TcbVersion
from snpd.errors import InvalidArgument

TRUSTEE_MEDIA_TYPE = "application/vnd.snpd.trustee-snp-evidence+json"
AZ_SNP_VTPM_MEDIA_TYPE = "application/vnd.snpd.trustee-az-snp-vtpm-evidence+json"
FORMATS = ("trustee",)
VERIFIABLE_FORMATS = ("az-snp-vtpm",)
"""What VerifyEvidence reads: Trustee's Azure vTPM evidence, every version (v0-v2)."""

_CERT_TYPES = {"ark": "ARK", "ask": "ASK", "asvk": "ASVK", "vcek": "VCEK", "vlek": "VLEK",
               "crl": "CRL"}


def _tcb(raw: int, product: Product) -> Dict[str, Optional[int]]:
    tcb = TcbVersion.decode(raw, product)
    return {"fmc": tcb.fmc, "bootloader": tcb.bootloader, "tee": tcb.tee, "snp": tcb.snp,
            "microcode": tcb.microcode}


def _version(v: FirmwareVersion) -> Dict[str, int]:
    return {"major": v.major, "minor": v.minor, "build": v.build}


def trustee_report(report: AttestationReport, product: Product) -> Dict[str, object]:
    """The ``attestation_report`` object, keys in the sev crate's field order."""
    if report.version < 3:
        raise InvalidArgument("Trustee accepts report versions 3 to 5 only; this firmware "
                              f"produced version {report.version}")
    out: Dict[str, object] = {
        "version": report.version,
        "guest_svn": report.guest_svn,
        "policy": report.policy.raw,
        "family_id": list(report.family_id),
        "image_id": list(report.image_id),
        "vmpl": report.vmpl,
        "sig_algo": report.signature_algo,
        "current_tcb": _tcb(report.current_tcb, product),
        "plat_info": report.platform_info.raw,
        "key_info": report.key_info.raw,
        "report_data": list(report.report_data),
        "measurement": list(report.measurement),
        "host_data": list(report.host_data),
        "id_key_digest": list(report.id_key_digest),
        "author_key_digest": list(report.author_key_digest),
        "report_id": list(report.report_id),
        "report_id_ma": list(report.report_id_ma),
        "reported_tcb": _tcb(report.reported_tcb, product),
        "cpuid_fam_id": report.cpuid_fam_id,
        "cpuid_mod_id": report.cpuid_mod_id,
        "cpuid_step": report.cpuid_step,
        "chip_id": list(report.chip_id),
        "committed_tcb": _tcb(report.committed_tcb, product),
        "current": _version(report.current),
        "committed": _version(report.committed),
        "launch_tcb": _tcb(report.launch_tcb, product),
    }
    if report.launch_mit_vector is not None:
        out["launch_mit_vector"] = report.launch_mit_vector
        out["current_mit_vector"] = report.current_mit_vector
    out["signature"] = {"r": list(report.signature_r), "s": list(report.signature_s)}
    return out


def trustee_evidence(report: AttestationReport, product: Product,
                     certificates: Sequence[Tuple[str, bytes]] = ()) -> bytes:
    """Trustee's SNP evidence JSON. ``certificates`` are (kind, DER) pairs; by default
    only the endorsement key is sent (Trustee embeds AMD's ARK and ASK itself)."""
    chain: Optional[List[Dict[str, object]]] = None
    if certificates:
        chain = []
        for kind, der in certificates:
            if kind not in _CERT_TYPES:
                raise InvalidArgument(f"unknown certificate kind {kind!r}")
            chain.append({"cert_type": _CERT_TYPES[kind], "data": list(der)})
    doc = {"attestation_report": trustee_report(report, product), "cert_chain": chain}
    return json.dumps(doc, separators=(",", ":")).encode()


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def az_snp_vtpm_evidence(hcl_report: bytes, attest: bytes, signature: bytes,
                         pcrs: Sequence[bytes], vcek: bytes) -> bytes:
    """Trustee's ``az-snp-vtpm`` evidence, version 1 (the version Trustee's attester
    makes and its test data holds): the quote's TPMS_ATTEST and bare RSA signature and
    the SHA-256 PCRs as hex, the HCL report and the VCEK (DER) as unpadded base64url.
    snpd.abi.azure_evidence parses it back."""
    return json.dumps({
        "version": 1,
        "tpm_quote": {"signature": signature.hex(), "message": attest.hex(),
                      "pcrs": [p.hex() for p in pcrs]},
        "hcl_report": _b64url(hcl_report),
        "vcek": _b64url(vcek),
    }).encode()
