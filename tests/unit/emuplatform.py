"""An emulator PKI and reports signed under it, for the trust-core tests.

RSA keys are 2048 bits here (AMD's are 4096) only to keep key generation fast;
nothing in the verifier depends on the size.
"""

from __future__ import annotations

import dataclasses
import datetime
import struct
from pathlib import Path
from typing import Any, Dict, Mapping, Optional

from cryptography.hazmat.primitives.asymmetric import ec

from snpd.abi.product import Endorser, Product
from snpd.abi.tcb import TcbVersion
from snpd.emulator.pki import Chain, make_chain, make_vcek, make_vlek
from snpd.emulator.sign import sign_report
from snpd.trust.certset import CertificateSet
from snpd.trust.roots import TrustRoots
from snpd.trust.verify import Verifier
from snpd.trust.x509 import Certificate

NOW = datetime.datetime(2026, 6, 1, tzinfo=datetime.timezone.utc)
CPUID = {Product.MILAN: (0x19, 0x01, 0x01), Product.GENOA: (0x19, 0x11, 0x01),
         Product.TURIN: (0x1A, 0x02, 0x01)}
TCBS = {
    Product.MILAN: TcbVersion.from_parts(Product.MILAN, bootloader=4, tee=0, snp=24,
                                         microcode=217),
    Product.GENOA: TcbVersion.from_parts(Product.GENOA, bootloader=10, tee=0, snp=25,
                                         microcode=84),
    Product.TURIN: TcbVersion.from_parts(Product.TURIN, bootloader=1, tee=0, snp=2,
                                         microcode=71, fmc=3),
}


def chip_id_for(product: Product, seed: int = 1) -> bytes:
    full = bytes((seed * 37 + i * 11) % 256 or 1 for i in range(64))
    return full[:8] + bytes(56) if product is Product.TURIN else full


def build_report(
    product: Product,
    *,
    version: int = 5,
    chip_id: Optional[bytes] = None,
    reported_tcb: Optional[TcbVersion] = None,
    signing_key: int = 0,
    policy: int = 0x30000,
    report_data: bytes = b"\x5a" * 64,
    vmpl: int = 0,
    key_info_extra: int = 0,
    signature_algo: int = 1,
) -> bytearray:
    """An unsigned report with the given fields (the rest zero or typical)."""
    raw = bytearray(0x4A0)
    tcb = reported_tcb or TCBS[product]
    struct.pack_into("<IIQ", raw, 0, version, 1, policy)
    struct.pack_into("<II", raw, 0x30, vmpl, signature_algo)
    struct.pack_into("<QQI", raw, 0x38, tcb.raw, 0x25, signing_key << 2 | key_info_extra)
    raw[0x50:0x90] = report_data
    raw[0x90:0xC0] = b"\x11" * 48
    raw[0x140:0x160] = b"\x22" * 32
    raw[0x160:0x180] = b"\xff" * 32
    struct.pack_into("<Q", raw, 0x180, tcb.raw)
    if version >= 3:
        raw[0x188:0x18B] = bytes(CPUID[product])
    if signing_key == 0:
        raw[0x1A0:0x1E0] = chip_id if chip_id is not None else chip_id_for(product)
    struct.pack_into("<QBBBxBBBxQ", raw, 0x1E0, tcb.raw, 40, 55, 1, 40, 55, 1, tcb.raw)
    return raw


@dataclasses.dataclass
class Platform:
    """One emulated platform: chain, VCEK and VLEK with their keys, and helpers."""

    product: Product
    chain: Chain
    vcek_key: ec.EllipticCurvePrivateKey
    vcek: Certificate
    vlek_key: ec.EllipticCurvePrivateKey
    vlek: Certificate

    @property
    def roots(self) -> TrustRoots:
        return TrustRoots(explicit=(self.chain.ark,))

    def certs(self, endorser: Endorser = Endorser.VCEK, **override: Any) -> CertificateSet:
        base: Dict[str, Any] = {"ark": self.chain.ark}
        if endorser is Endorser.VCEK:
            base.update(ask=self.chain.ask, vcek=self.vcek)
        else:
            base.update(asvk=self.chain.asvk, vlek=self.vlek)
        base.update(override)
        return CertificateSet(**base)

    def report(self, endorser: Endorser = Endorser.VCEK, *, key: Any = None,
               **fields: Any) -> bytes:
        raw = build_report(self.product, signing_key=0 if endorser is Endorser.VCEK else 1,
                           **fields)
        signer = key or (self.vcek_key if endorser is Endorser.VCEK else self.vlek_key)
        return sign_report(bytes(raw), signer)


def make_platform(product: Product) -> Platform:
    chain = make_chain(product, now=NOW, rsa_bits=2048)
    vcek_key, vcek = make_vcek(chain, chip_id_for(product), TCBS[product], now=NOW)
    vlek_key, vlek = make_vlek(chain, TCBS[product], now=NOW)
    return Platform(product, chain, vcek_key, vcek, vlek_key, vlek)


def loopback_kbs(platform: Platform, directory: Path, resources: Mapping[str, bytes]
                 ) -> Any:
    """The loopback KBS (tests/harness/kbs.py, unstarted) that verifies ``platform``'s
    evidence at :data:`NOW` and serves ``resources``."""
    from harness.kbs import KbsServer  # type: ignore[import-not-found]  # lazy: jwcrypto

    return KbsServer(directory, verifier=Verifier(platform.roots, clock=lambda: NOW),
                     certificates=CertificateSet(ark=platform.chain.ark, ask=platform.chain.ask),
                     resources=resources)
