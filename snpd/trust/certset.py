"""A set of certificates for one platform: ARK, ASK/ASVK, VCEK/VLEK and a CRL.

Certificates are sorted into roles by AMD's naming (CN ``ARK-*``, ``SEV-*``,
``SEV-VLEK-*``, ``SEV-VCEK``, ``SEV-VLEK``) and, for the endorsement key, by its
KDS extensions, so a set can be built from a snpguest certs dir, a PEM stack,
the host's certificate table or a D-Bus ``a(say)`` array alike.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Iterable, Iterator, List, Optional, Tuple, Union

from snpd.abi.product import Endorser
from snpd.errors import CertificateFormatError
from snpd.trust.vek import OID_CSP_ID, OID_HWID
from snpd.trust.x509 import Certificate, Crl, load_certificate, load_crl

if TYPE_CHECKING:  # the host's table is parsed only where a host answers; keep verify lean
    from snpd.abi.certtable import CertTableEntry

KINDS = ("ark", "ask", "asvk", "vcek", "vlek", "crl")


def classify(cert: Certificate) -> str:
    """The role of a certificate: ark, ask, asvk, vcek or vlek."""
    cn = cert.subject.common_name or ""
    if cert.extension(OID_HWID) is not None and cert.extension(OID_CSP_ID) is None:
        return "vcek"
    if cert.extension(OID_CSP_ID) is not None and cert.extension(OID_HWID) is None:
        return "vlek"
    if cn == "SEV-VCEK":
        return "vcek"
    if cn == "SEV-VLEK":
        return "vlek"
    if cert.is_self_issued:
        return "ark"
    if cn.startswith("SEV-VLEK-"):
        return "asvk"
    if cn.startswith("SEV-"):
        return "ask"
    raise CertificateFormatError(
        f"cannot tell the role of certificate {cert.subject} (not an ARK, ASK, ASVK, "
        f"VCEK or VLEK by AMD's naming)")


@dataclasses.dataclass(frozen=True)
class CertificateSet:
    ark: Optional[Certificate] = None
    ask: Optional[Certificate] = None
    asvk: Optional[Certificate] = None
    vcek: Optional[Certificate] = None
    vlek: Optional[Certificate] = None
    crl: Optional[Crl] = None

    @classmethod
    def from_items(cls, items: Iterable[Union[Certificate, Crl]]) -> CertificateSet:
        found: dict = {}  # type: ignore[type-arg]
        for item in items:
            kind = "crl" if isinstance(item, Crl) else classify(item)
            if kind in found and found[kind].der != item.der:
                raise CertificateFormatError(f"two different {kind.upper()} certificates given")
            found[kind] = item
        return cls(**found)

    @classmethod
    def from_kinds(cls, pairs: Iterable[Tuple[str, bytes]]) -> CertificateSet:
        """From (kind, DER or PEM) pairs, as D-Bus ``a(say)`` and the host table carry them.
        The declared kind must agree with the certificate's own role."""
        items: List[Union[Certificate, Crl]] = []
        for kind, data in pairs:
            if kind not in KINDS:
                raise CertificateFormatError(f"unknown certificate kind {kind!r}; "
                                             f"expected one of {', '.join(KINDS)}")
            if kind == "crl":
                items.append(load_crl(data))
                continue
            cert = load_certificate(data)
            actual = classify(cert)
            if actual != kind:
                raise CertificateFormatError(f"certificate given as {kind} is a {actual}")
            items.append(cert)
        return cls.from_items(items)

    @classmethod
    def from_table(cls, entries: Iterable[CertTableEntry]) -> CertificateSet:
        """From the host's certificate table (snpd.abi.certtable), DER or PEM per entry.

        The host files the ASVK under the ASK GUID, so that entry's role comes from its
        content; every other GUID must agree with its certificate's role. Unknown GUIDs
        and extra_platform_info carry no certificate and are skipped."""
        items: List[Union[Certificate, Crl]] = []
        for entry in entries:
            kind = entry.kind
            if kind is None or kind == "extra_platform_info":
                continue
            what = f"host certificate table {kind} entry"
            try:
                if kind == "crl":
                    items.append(load_crl(entry.data))
                    continue
                cert = load_certificate(entry.data)
                actual = classify(cert)
            except CertificateFormatError as exc:
                raise CertificateFormatError(f"{what}: {exc}") from exc
            allowed = ("ask", "asvk") if kind == "ask" else (kind,)
            if actual not in allowed:
                raise CertificateFormatError(f"{what} holds a {actual} certificate")
            items.append(cert)
        return cls.from_items(items)

    def intermediate(self, endorser: Endorser) -> Optional[Certificate]:
        return self.ask if endorser is Endorser.VCEK else self.asvk

    def leaf(self, endorser: Endorser) -> Optional[Certificate]:
        return self.vcek if endorser is Endorser.VCEK else self.vlek

    @property
    def endorser(self) -> Endorser:
        """snpguest's rule for a certs dir: the VLEK flavour when a VLEK is present."""
        return Endorser.VLEK if self.vlek is not None else Endorser.VCEK

    def items(self) -> Iterator[Tuple[str, Union[Certificate, Crl]]]:
        for kind in KINDS:
            value = getattr(self, kind)
            if value is not None:
                yield kind, value

    def merged(self, other: CertificateSet) -> CertificateSet:
        """This set, with gaps filled from ``other``."""
        return CertificateSet(**{k: getattr(self, k) or getattr(other, k) for k in KINDS})
