"""The KDS extensions of a VCEK or VLEK (OID arc 1.3.6.1.4.1.3704.1, docs/reference/abi.md §5.4).

Real certificates carry hwID as raw bytes with no ASN.1 tag; some test
certificates wrap it in an OCTET STRING. Both are accepted, by length rather
than by sniffing a tag byte (which is how snpguest panicked on chip IDs that
start with 0x02 or 0x04). INTEGERs are compared as whole integers.
"""

from __future__ import annotations

import dataclasses
from typing import Dict, List, Optional

from snpd.abi.product import Endorser, Product
from snpd.abi.tcb import TcbVersion
from snpd.trust import der
from snpd.trust.der import DerError
from snpd.trust.x509 import Certificate, Extension

ARC = "1.3.6.1.4.1.3704.1"
OID_STRUCT_VERSION = ARC + ".1"
OID_PRODUCT_NAME = ARC + ".2"
OID_BL_SPL = ARC + ".3.1"
OID_TEE_SPL = ARC + ".3.2"
OID_SNP_SPL = ARC + ".3.3"
OID_SPL_4 = ARC + ".3.4"
OID_SPL_5 = ARC + ".3.5"
OID_SPL_6 = ARC + ".3.6"
OID_SPL_7 = ARC + ".3.7"
OID_UCODE_SPL = ARC + ".3.8"
OID_FMC_SPL = ARC + ".3.9"
OID_HWID = ARC + ".4"
OID_CSP_ID = ARC + ".5"

# component name -> OID of the SPL extension
SPL_OIDS: Dict[str, str] = {
    "fmc": OID_FMC_SPL,
    "bootloader": OID_BL_SPL,
    "tee": OID_TEE_SPL,
    "snp": OID_SNP_SPL,
    "microcode": OID_UCODE_SPL,
}


class VekFormatError(DerError):
    """A V[CL]EK's KDS extensions are missing or malformed."""


@dataclasses.dataclass(frozen=True)
class VekExtensions:
    """The decoded KDS extensions of an endorsement-key certificate."""

    struct_version: Optional[int]
    product_name: Optional[str]
    spls: Dict[str, int]  # component -> value, only those present
    hwid: Optional[bytes]
    csp_id: Optional[str]

    @property
    def endorser(self) -> Optional[Endorser]:
        """VCEK when it carries hwID, VLEK when it carries cspID, None when both or neither."""
        if self.hwid is not None and self.csp_id is None:
            return Endorser.VCEK
        if self.csp_id is not None and self.hwid is None:
            return Endorser.VLEK
        return None

    @property
    def product(self) -> Optional[Product]:
        """The product part of productName (the stepping, e.g. '-B0', is unreliable and cut)."""
        if self.product_name is None:
            return None
        try:
            return Product.parse(self.product_name)
        except ValueError:
            return None

    @classmethod
    def from_certificate(cls, cert: Certificate) -> VekExtensions:
        def integer(oid: str, what: str) -> Optional[int]:
            ext = cert.extension(oid)
            if ext is None:
                return None
            value = der.decode_integer(der.parse_single(ext.value, what), what)
            if value < 0:
                raise VekFormatError(f"{what} is negative")
            return value

        name_ext = cert.extension(OID_PRODUCT_NAME)
        product_name = None
        if name_ext is not None:
            tlv = der.parse_single(name_ext.value, "productName")
            product_name = der.decode_string(tlv, "productName")
        spls = {}
        for component, oid in SPL_OIDS.items():
            value = integer(oid, f"{component}SPL")
            if value is not None:
                spls[component] = value
        hwid_ext = cert.extension(OID_HWID)
        hwid = decode_hwid(hwid_ext.value) if hwid_ext is not None else None
        csp_ext = cert.extension(OID_CSP_ID)
        csp_id = None
        if csp_ext is not None:
            csp_id = der.decode_string(der.parse_single(csp_ext.value, "cspID"), "cspID")
        return cls(
            struct_version=integer(OID_STRUCT_VERSION, "structVersion"),
            product_name=product_name,
            spls=spls,
            hwid=hwid,
            csp_id=csp_id,
        )

    def tcb_mismatches(self, tcb: TcbVersion) -> List[str]:
        """Each TCB component whose certificate SPL differs from ``tcb`` or is missing."""
        problems = []
        for component, value in tcb.components().items():
            have = self.spls.get(component)
            if have is None:
                problems.append(f"{component}SPL extension missing (report has {value})")
            elif have != value:
                problems.append(f"{component}SPL {have} != report {value}")
        if not tcb.turin_layout and "fmc" in self.spls:
            problems.append(f"fmcSPL {self.spls['fmc']} present on a non-Turin certificate")
        return problems


def decode_hwid(value: bytes) -> bytes:
    """hwID as the raw 64 (Milan/Genoa) or 8 (Turin) bytes real certificates carry,
    or a tagged OCTET STRING wrapping them."""
    if len(value) in (8, 64):
        return value
    if len(value) in (10, 66) and value[0] == der.OCTET_STRING and value[1] == len(value) - 2:
        return value[2:]
    raise VekFormatError(f"hwID of {len(value)} bytes is neither 8 nor 64 bytes, raw or "
                         f"as an OCTET STRING")


def build_extensions(
    product: Product,
    tcb: TcbVersion,
    *,
    hwid: Optional[bytes] = None,
    csp_id: Optional[str] = None,
    product_name: Optional[str] = None,
) -> List[Extension]:
    """The KDS extension set of a VCEK (hwid) or VLEK (csp_id), as AMD issues them:
    structVersion 1 with fmcSPL and no spl_4 on Turin, structVersion 0 otherwise."""
    if (hwid is None) == (csp_id is None):
        raise ValueError("exactly one of hwid (VCEK) and csp_id (VLEK) is required")
    turin = product.turin_layout
    c = tcb.components()
    exts = [
        Extension(OID_STRUCT_VERSION, False, der.integer(1 if turin else 0)),
        Extension(OID_PRODUCT_NAME, False, der.ia5(product_name or product.value)),
    ]
    if turin:
        exts.append(Extension(OID_FMC_SPL, False, der.integer(c.get("fmc", 0))))
    exts += [
        Extension(OID_BL_SPL, False, der.integer(c["bootloader"])),
        Extension(OID_TEE_SPL, False, der.integer(c["tee"])),
        Extension(OID_SNP_SPL, False, der.integer(c["snp"])),
    ]
    if not turin:
        exts.append(Extension(OID_SPL_4, False, der.integer(0)))
    exts += [Extension(oid, False, der.integer(0)) for oid in (OID_SPL_5, OID_SPL_6, OID_SPL_7)]
    exts.append(Extension(OID_UCODE_SPL, False, der.integer(c["microcode"])))
    if hwid is not None:
        if len(hwid) != product.hwid_length:
            raise ValueError(f"{product} hwID is {product.hwid_length} bytes, got {len(hwid)}")
        exts.append(Extension(OID_HWID, False, bytes(hwid)))
    else:
        assert csp_id is not None
        exts.append(Extension(OID_CSP_ID, False, der.ia5(csp_id)))
    return exts
