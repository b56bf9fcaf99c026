"""Pure byte layouts of the SEV-SNP guest ABI: bytes in, typed values out, no I/O."""

from snpd.abi.bits import GuestPolicy, KeyInfo, PlatformInfo, SigningKey
from snpd.abi.product import Endorser, Product, product_from_cpuid, product_from_cpuid_eax
from snpd.abi.report import REPORT_SIZE, AttestationReport, FirmwareVersion, parse_report
from snpd.abi.tcb import TcbVersion

__all__ = [
    "REPORT_SIZE",
    "AttestationReport",
    "Endorser",
    "FirmwareVersion",
    "GuestPolicy",
    "KeyInfo",
    "PlatformInfo",
    "Product",
    "SigningKey",
    "TcbVersion",
    "parse_report",
    "product_from_cpuid",
    "product_from_cpuid_eax",
]
