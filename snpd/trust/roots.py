"""AMD's SEV-SNP roots, pinned by the SHA-256 of their DER encoding (docs/reference/abi.md §5.3).

The certificates themselves are not shipped: they arrive from a certs dir, the
host's certificate table or the KDS, and are trusted only if they hash to one
of these. A self-signed "ARK" proves nothing by itself.
"""

from __future__ import annotations

import dataclasses
from typing import Dict, Optional, Tuple

from snpd.abi.product import Endorser, Product
from snpd.trust.x509 import Certificate

# (product, role) -> SHA-256 of the DER certificate. Roles: ark, ask, asvk.
AMD_FINGERPRINTS: Dict[Tuple[Product, str], str] = {
    (Product.MILAN, "ark"): "69d063b45344d26a2e94e1f4210de49ef555308287d4c174445c95639a540bcd",
    (Product.MILAN, "ask"): "67d303bd3905fd38db8b20e0793699870e7fa612eaad5dec358293fd8c0bac1b",
    (Product.MILAN, "asvk"): "c5e081f59b7efab1fe2f8b505e159704e72f29cab7ef7cf628a05a42439082f5",
    (Product.GENOA, "ark"): "4c6598d19c18719c5dfd4a7d335f674e5bfe1d8f800cea2cf270c10d103db2f1",
    (Product.GENOA, "ask"): "5464738c1546aed5f2cecf1dc98c5c960a92e8913238a61711bc90ec6e828521",
    (Product.GENOA, "asvk"): "197e610743a917d6b9bb982a5a9226ccc0a15b611be0619e626aca9151457372",
    (Product.TURIN, "ark"): "1f084161a44bb6d93778a904877d4819cafa5d05ef4193b2ded9dd9c73dd3f6a",
    (Product.TURIN, "ask"): "5b77ef5fe7a7a004fd9032668fba9d0fda22f88c4442069a479636a6ae3b3185",
    (Product.TURIN, "asvk"): "104e10a8bd060a3c20a434261a57d0588fd65a88915b4f65b08bdecaf8df1a3c",
}
_BY_FINGERPRINT = {fp: key for key, fp in AMD_FINGERPRINTS.items()}

KDS_CRL_URL = "https://kdsintf.amd.com/{endorser}/v1/{product}/crl"


def pinned_role(cert: Certificate) -> Optional[Tuple[Product, str]]:
    """(product, role) when ``cert`` is one of AMD's pinned certificates."""
    return _BY_FINGERPRINT.get(cert.sha256)


def amd_ark_fingerprint(product: Product) -> str:
    return AMD_FINGERPRINTS[(product, "ark")]


@dataclasses.dataclass(frozen=True)
class TrustAnchor:
    """Why an ARK is trusted: AMD's pin for a product, or a root the caller passed."""

    explicit: bool
    product: Optional[Product]
    description: str


@dataclasses.dataclass(frozen=True)
class TrustRoots:
    """The roots one verification accepts.

    AMD's pinned ARKs unless ``amd`` is false, plus ``explicit`` roots passed
    for this verification (``--trust-root``, the emulator's root): the chain's
    ARK must have the same key as one of them, and nothing AMD-specific about
    its names or CRL location is demanded.
    """

    explicit: Tuple[Certificate, ...] = ()
    amd: bool = True

    def anchor(self, ark: Certificate) -> Optional[TrustAnchor]:
        if self.amd:
            pinned = pinned_role(ark)
            if pinned is not None and pinned[1] == "ark":
                return TrustAnchor(False, pinned[0], f"AMD ARK-{pinned[0]} (pinned "
                                   f"sha256 {ark.sha256[:16]}…)")
        for root in self.explicit:
            if root.spki == ark.spki:
                return TrustAnchor(True, None, f"explicit trust root "
                                   f"{root.subject.common_name or root.subject} "
                                   f"(sha256 {root.sha256[:16]}…)")
        return None

    def with_explicit(self, *roots: Certificate) -> TrustRoots:
        return dataclasses.replace(self, explicit=self.explicit + tuple(roots))


AMD_ROOTS = TrustRoots()


def amd_names(product: Product, endorser: Endorser) -> Dict[str, str]:
    """The common names AMD gives each certificate of a product's chain."""
    return {
        "ark": f"ARK-{product}",
        "intermediate": f"SEV-{product}" if endorser is Endorser.VCEK else f"SEV-VLEK-{product}",
        "leaf": "SEV-VCEK" if endorser is Endorser.VCEK else "SEV-VLEK",
    }


def amd_crl_url(product: Product, endorser: Endorser) -> str:
    return KDS_CRL_URL.format(endorser=endorser.value, product=product.value)
