"""A set of certificates for one platform: ARK, ASK/ASVK, VCEK/VLEK and a CRL.

Certificates are sorted into roles by AMD's naming (CN ``ARK-*``, ``SEV-*``,
``SEV-VLEK-*``, ``SEV-VCEK``, ``SEV-VLEK``) and, for the endorsement key, by its
KDS extensions, so a set can be built from a snpguest certs dir, a PEM stack,
the host's certificate table or a D-Bus ``a(say)`` array alike.

Where certificates arrive labelled (a file ``asvk.pem``, a ``("vlek", der)``
pair), the label comes from whoever assembled them, usually the untrusted host.
A label that lies (an ASK filed as the ASVK, bytes that are no certificate at
all) is evidence that fails, not a usage error: :func:`load_as` turns it into a
*defect*, the set keeps it in ``defects`` and drops the item, and verification
reports every defect as a failed ``chain.certificates`` check.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Dict, Iterable, Iterator, List, Optional, Tuple, Union

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


def _a(kind: str) -> str:
    """``an ARK``, ``a VCEK``: the defect messages read as sentences."""
    return f"{'an' if kind in ('ark', 'ask', 'asvk') else 'a'} {kind.upper()}"


def load_as(kind: str, data: bytes, source: str
            ) -> Tuple[Optional[Union[Certificate, Crl]], Optional[str]]:
    """Decode ``data`` that ``source`` labels as ``kind``: (the item, None) when it is
    what the label says, else (None, the defect: what ``source`` holds instead).

    ``kind`` itself must be one of :data:`KINDS`: an unknown label is the caller's
    mistake and raises :class:`CertificateFormatError` (an InvalidArgument)."""
    if kind not in KINDS:
        raise CertificateFormatError(f"unknown certificate kind {kind!r}; "
                                     f"expected one of {', '.join(KINDS)}")
    if kind == "crl":
        try:
            return load_crl(data), None
        except CertificateFormatError as exc:
            return None, f"{source} is not a CRL: {exc}"
    try:
        cert = load_certificate(data)
    except CertificateFormatError as exc:
        return None, f"{source} is not {_a(kind)} certificate: {exc}"
    try:
        actual = classify(cert)
    except CertificateFormatError as exc:
        return None, f"{source} holds no {kind.upper()}: {exc}"
    if actual != kind:
        return None, f"{source} holds {_a(actual)} certificate, not {_a(kind)}"
    return cert, None


@dataclasses.dataclass(frozen=True)
class CertificateSet:
    """ARK, intermediate, endorsement key and CRL, each optional; ``defects`` lists
    the labelled items that were not what their label said (see :func:`load_as`).
    A set with defects never verifies."""

    ark: Optional[Certificate] = None
    ask: Optional[Certificate] = None
    asvk: Optional[Certificate] = None
    vcek: Optional[Certificate] = None
    vlek: Optional[Certificate] = None
    crl: Optional[Crl] = None
    # Not an __init__ argument, so that ``CertificateSet(**certificates)`` stays
    # well-typed; set through with_defects.
    defects: Tuple[str, ...] = dataclasses.field(default=(), init=False)

    def with_defects(self, defects: Iterable[str]) -> CertificateSet:
        """This set, recording ``defects`` as well (see :func:`load_as`)."""
        found = tuple(dict.fromkeys((*self.defects, *defects)))
        copy = dataclasses.replace(self)
        object.__setattr__(copy, "defects", found)  # frozen: set once, on a fresh copy
        return copy

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

        An item that is not what its kind says, or a second, different item of one
        kind, is a defect of the set (it fails verification), not an error: the
        pairs come from whoever the caller got them from. Only an unknown kind, the
        caller's own mistake, raises :class:`CertificateFormatError`."""
        found: Dict[str, Union[Certificate, Crl]] = {}
        defects: List[str] = []
        for index, (kind, data) in enumerate(pairs):
            source = f"certificate {index} (given as {kind})"
            item, defect = load_as(kind, data, source)
            if item is None:
                defects.append(defect or f"{source}: unusable")
            elif kind in found and found[kind].der != item.der:
                defects.append(f"{source} is a second, different {kind.upper()}")
            else:
                found[kind] = item
        return cls(**found).with_defects(defects)  # type: ignore[arg-type]

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
        """The chain a set stands for when no report says which: the VCEK's when it has
        one (snpguest's manual: "If both a VLEK and a VCEK are in the directory, then
        the VCEK will be used"), else the VLEK's; without a leaf, the flavour of the
        intermediate present, so that a failure names what is missing."""
        if self.vcek is not None:
            return Endorser.VCEK
        if self.vlek is not None or (self.asvk is not None and self.ask is None):
            return Endorser.VLEK
        return Endorser.VCEK

    def items(self) -> Iterator[Tuple[str, Union[Certificate, Crl]]]:
        for kind in KINDS:
            value = getattr(self, kind)
            if value is not None:
                yield kind, value

    def merged(self, other: CertificateSet) -> CertificateSet:
        """This set, with gaps filled from ``other``; the defects of both are kept (a
        gap another source fills does not make a lying set honest)."""
        return CertificateSet(**{k: getattr(self, k) or getattr(other, k) for k in KINDS}
                              ).with_defects((*self.defects, *other.defects))
