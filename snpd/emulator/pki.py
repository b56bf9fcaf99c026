"""An emulator certificate chain with AMD's shape: ARK → ASK/ASVK → VCEK/VLEK.

Same subject layout, extensions and algorithms as AMD's (RSASSA-PSS SHA-384
salt 48 above an ECDSA P-384 endorsement key; serial 0 on the V[CL]EK), but
the organization names it as an emulator, and its ARK is not pinned anywhere.
Also used by the tests to forge what AMD would never sign.
"""

from __future__ import annotations

import dataclasses
import datetime
from typing import Any, Optional, Sequence, Tuple

from cryptography.hazmat.primitives.asymmetric import ec, rsa

from snpd.abi.product import Endorser, Product
from snpd.abi.tcb import TcbVersion
from snpd.trust import vek
from snpd.trust.x509 import (
    Certificate,
    Crl,
    Extension,
    Name,
    basic_constraints,
    build_certificate,
    build_crl,
    crl_distribution_point,
    key_usage_ca,
)

EMULATOR_ORG = "snpd SEV-SNP emulator (not AMD)"
EMULATOR_KDS = "http://127.0.0.1/kds"


def emulator_name(cn: str, org: str = EMULATOR_ORG) -> Name:
    return Name.build([("OU", "Engineering"), ("C", "US"), ("L", "Santa Clara"), ("ST", "CA"),
                       ("O", org), ("CN", cn)])


def new_rsa_key(bits: int = 4096) -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=bits)


def new_ec_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP384R1())


@dataclasses.dataclass(frozen=True)
class Chain:
    """An ARK with its ASK and ASVK, and the private keys that sign with them."""

    product: Product
    ark_key: Any
    ask_key: Any
    asvk_key: Any
    ark: Certificate
    ask: Certificate
    asvk: Certificate
    org: str = EMULATOR_ORG

    def intermediate(self, endorser: Endorser) -> Tuple[Any, Certificate]:
        return (self.ask_key, self.ask) if endorser is Endorser.VCEK else (self.asvk_key,
                                                                           self.asvk)


def make_chain(
    product: Product,
    *,
    now: datetime.datetime,
    rsa_bits: int = 4096,
    org: str = EMULATOR_ORG,
    kds_url: str = EMULATOR_KDS,
    keys: Optional[Tuple[Any, Any, Any]] = None,
    years: int = 25,
) -> Chain:
    """A fresh (or, given ``keys``, reproducible) ARK/ASK/ASVK chain for ``product``."""
    ark_key, ask_key, asvk_key = keys or (new_rsa_key(rsa_bits), new_rsa_key(rsa_bits),
                                          new_rsa_key(rsa_bits))
    start, end = now - datetime.timedelta(days=1), now + datetime.timedelta(days=365 * years)
    ark_name = emulator_name(f"ARK-{product}", org)
    ca_exts: Sequence[Extension] = (key_usage_ca(), basic_constraints(True))
    ark = build_certificate(
        issuer=ark_name, subject=ark_name, serial=0x10000, not_before=start, not_after=end,
        public_key=ark_key.public_key(), signing_key=ark_key,
        extensions=[*ca_exts, crl_distribution_point(f"{kds_url}/vcek/v1/{product}/crl")])
    ask = build_certificate(
        issuer=ark_name, subject=emulator_name(f"SEV-{product}", org), serial=0x10001,
        not_before=start, not_after=end, public_key=ask_key.public_key(), signing_key=ark_key,
        extensions=[*ca_exts, crl_distribution_point(f"{kds_url}/vcek/v1/{product}/crl")])
    asvk = build_certificate(
        issuer=ark_name, subject=emulator_name(f"SEV-VLEK-{product}", org), serial=0x10101,
        not_before=start, not_after=end, public_key=asvk_key.public_key(), signing_key=ark_key,
        extensions=[*ca_exts, crl_distribution_point(f"{kds_url}/vlek/v1/{product}/crl")])
    return Chain(product, ark_key, ask_key, asvk_key, ark, ask, asvk, org)


def make_vcek(
    chain: Chain,
    chip_id: bytes,
    tcb: TcbVersion,
    *,
    now: datetime.datetime,
    key: Optional[ec.EllipticCurvePrivateKey] = None,
    days: int = 7 * 365,
    product_name: Optional[str] = None,
) -> Tuple[ec.EllipticCurvePrivateKey, Certificate]:
    """A VCEK for (chip, TCB) as the KDS issues it: serial 0, backdated a day, 7 years."""
    key = key or new_ec_key()
    hwid = chip_id[:chain.product.hwid_length]
    cert = build_certificate(
        issuer=chain.ask.subject, subject=emulator_name("SEV-VCEK", chain.org), serial=0,
        not_before=now - datetime.timedelta(days=1), not_after=now + datetime.timedelta(days=days),
        public_key=key.public_key(), signing_key=chain.ask_key,
        extensions=vek.build_extensions(chain.product, tcb, hwid=hwid,
                                        product_name=product_name))
    return key, cert


def make_vlek(
    chain: Chain,
    tcb: TcbVersion,
    *,
    now: datetime.datetime,
    csp_id: str = "CN=emulator.snpd.invalid",
    key: Optional[ec.EllipticCurvePrivateKey] = None,
    days: int = 365,
) -> Tuple[ec.EllipticCurvePrivateKey, Certificate]:
    key = key or new_ec_key()
    cert = build_certificate(
        issuer=chain.asvk.subject, subject=emulator_name("SEV-VLEK", chain.org), serial=0,
        not_before=now - datetime.timedelta(days=1), not_after=now + datetime.timedelta(days=days),
        public_key=key.public_key(), signing_key=chain.asvk_key,
        extensions=vek.build_extensions(chain.product, tcb, csp_id=csp_id))
    return key, cert


def make_crl(
    chain: Chain,
    *,
    now: datetime.datetime,
    revoked: Sequence[int] = (),
    next_update: Optional[datetime.datetime] = None,
    this_update: Optional[datetime.datetime] = None,
) -> Crl:
    """An ARK-signed CRL revoking the given intermediate serials."""
    this = this_update or now - datetime.timedelta(hours=1)
    return build_crl(issuer=chain.ark.subject, this_update=this,
                     next_update=next_update or now + datetime.timedelta(days=7),
                     revoked=[(s, this) for s in revoked], signing_key=chain.ark_key)
