"""Verify a report and its certificate chain against pinned roots; return every check.

The result lists each check with pass / fail / skipped and a reason, so a
rejection says exactly why. A :class:`Verifier` remembers the outcome of the
time-independent chain checks (three RSA-4096 signatures) per exact chain, so
verifying many reports from one platform costs little more than one ECDSA
verification each; validity windows and everything about the report are
checked on every call.
"""

from __future__ import annotations

import collections
import dataclasses
import datetime
from typing import (
    TYPE_CHECKING,
    Callable,
    Collection,
    Dict,
    List,
    Optional,
    Sequence,
    Tuple,
    Union,
)

from snpd.abi.bits import SigningKey
from snpd.abi.product import Endorser, Product
from snpd.abi.report import SIGNATURE_ALGO_ECDSA_P384_SHA384, AttestationReport
from snpd.abi.tcb import TcbVersion
from snpd.errors import CertificateFormatError, ReportFormatError
from snpd.trust import signature
from snpd.trust.certset import CertificateSet
from snpd.trust.result import Check, Status, Verdict
from snpd.trust.roots import AMD_ROOTS, TrustAnchor, TrustRoots, amd_crl_url, amd_names, pinned_role
from snpd.trust.vek import VekExtensions
from snpd.trust.x509 import Certificate, Crl

if TYPE_CHECKING:
    from snpd.trust.appraisal import AppraisalPolicy

Clock = Callable[[], datetime.datetime]


def utc_now() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc)


@dataclasses.dataclass(frozen=True)
class _ChainFacts:
    """What is true of a chain at any time: anchor, signatures, names, extensions."""

    anchor: Optional[TrustAnchor]
    static: Tuple[Check, ...]  # checks that do not depend on time
    extensions: Optional[VekExtensions]
    extensions_error: Optional[str]
    ext_product: Optional[Product]
    # (check name, role, certificate, the Check to reuse while it is valid)
    windows: Tuple[Tuple[str, str, Certificate, Check], ...]
    # binding results per (chip_id, reported_tcb, cpuid, requested product): the same
    # platform's reports repeat these, and recomputing them costs a tenth of an ECDSA verify
    bindings: Dict[Tuple[object, ...], Tuple[Optional[Product], Tuple[Check, ...]]] = (
        dataclasses.field(default_factory=dict))


def _window(cert: Certificate) -> str:
    return f"{cert.not_before:%Y-%m-%dT%H:%M:%SZ} .. {cert.not_after:%Y-%m-%dT%H:%M:%SZ}"


def _validity(name: str, role: str, cert: Certificate, at: datetime.datetime,
              passed: Optional[Check] = None) -> Check:
    if cert.not_before <= at <= cert.not_after:
        return passed or Check.passed(name, f"{role} valid {_window(cert)}")
    window = _window(cert)
    state = "not yet valid" if at < cert.not_before else "expired"
    return Check.failed(name, f"{role} {state} at {at:%Y-%m-%dT%H:%M:%SZ} (valid {window})")


class Verifier:
    """Verifies reports and chains against ``roots`` at the time ``clock`` gives.

    Thread-safe enough for the daemon's use: the memo is a bounded dict whose
    entries are immutable; a lost race only recomputes.
    """

    def __init__(self, roots: TrustRoots = AMD_ROOTS, *, clock: Clock = utc_now,
                 memo_size: int = 64) -> None:
        self.roots = roots
        self.clock = clock
        self._memo: collections.OrderedDict[Tuple[bytes, ...], _ChainFacts] = (
            collections.OrderedDict())
        self._memo_size = memo_size

    # -- chain -----------------------------------------------------------------

    def _facts(self, ark: Certificate, inter: Certificate, leaf: Certificate,
               endorser: Endorser) -> _ChainFacts:
        key = (ark.der, inter.der, leaf.der, endorser.value.encode())
        facts = self._memo.get(key)
        if facts is None:
            facts = self._compute_facts(ark, inter, leaf, endorser)
            self._memo[key] = facts
            while len(self._memo) > self._memo_size:
                self._memo.popitem(last=False)
        return facts

    def _compute_facts(self, ark: Certificate, inter: Certificate, leaf: Certificate,
                       endorser: Endorser) -> _ChainFacts:
        checks: List[Check] = []
        role = endorser.intermediate
        anchor = self.roots.anchor(ark)
        if anchor is None:
            pinned = pinned_role(ark)
            why = (f"it is AMD's {pinned[1].upper()}-{pinned[0]}, not an ARK" if pinned else
                   f"sha256 {ark.sha256} is not a pinned AMD ARK"
                   + (" and matches no explicit trust root" if self.roots.explicit else ""))
            checks.append(Check.failed("chain.ark_trusted", f"ARK {ark.subject.common_name!r}: "
                                       f"{why}"))
        else:
            checks.append(Check.passed("chain.ark_trusted", anchor.description))
        if not ark.is_self_issued:
            checks.append(Check.failed("chain.ark_signature", "ARK is not self-issued"))
        else:
            problem = signature.verify_pss(ark.tbs, ark.signature_algorithm, ark.signature, ark)
            checks.append(Check.failed("chain.ark_signature", f"ARK self-signature: {problem}")
                          if problem else Check.passed("chain.ark_signature", "self-signed"))
        problem = signature.verify_certificate(inter, ark)
        checks.append(Check.failed(f"chain.{role}_signature", f"{role.upper()}: {problem}")
                      if problem else Check.passed(f"chain.{role}_signature",
                                                   f"{role.upper()} signed by the ARK"))
        problem = signature.verify_certificate(leaf, inter)
        checks.append(Check.failed(f"chain.{endorser}_signature", f"{endorser.name}: {problem}")
                      if problem else Check.passed(f"chain.{endorser}_signature",
                                                   f"{endorser.name} signed by the {role.upper()}"))
        ca_problems = []
        for what, cert in (("ARK", ark), (role.upper(), inter)):
            if cert.basic_constraints_ca is not True:
                ca_problems.append(f"{what} is not a CA")
            if cert.key_cert_sign is False:
                ca_problems.append(f"{what} may not sign certificates")
        if leaf.basic_constraints_ca:
            ca_problems.append(f"{endorser.name} is a CA")
        if not signature.is_p384(_safe_key(leaf)):
            ca_problems.append(f"{endorser.name} key is not ECDSA P-384")
        checks.append(Check.failed("chain.constraints", "; ".join(ca_problems)) if ca_problems
                      else Check.passed("chain.constraints",
                                        f"ARK and {role.upper()} are CAs; "
                                        f"{endorser.name} key is P-384"))
        extensions: Optional[VekExtensions] = None
        ext_error: Optional[str] = None
        try:
            extensions = VekExtensions.from_certificate(leaf)
        except CertificateFormatError as exc:
            ext_error = str(exc)
        checks.append(self._names(ark, inter, leaf, endorser, anchor))
        windows = tuple(
            (name, label, cert, Check.passed(name, f"{label} valid {_window(cert)}"))
            for name, label, cert in (("chain.ark_validity", "ARK", ark),
                                      (f"chain.{role}_validity", role.upper(), inter),
                                      (f"chain.{endorser}_validity", endorser.name, leaf)))
        return _ChainFacts(anchor, tuple(checks), extensions, ext_error,
                           extensions.product if extensions else None, windows)

    @staticmethod
    def _names(ark: Certificate, inter: Certificate, leaf: Certificate, endorser: Endorser,
               anchor: Optional[TrustAnchor]) -> Check:
        """AMD's naming and CRL locations, demanded only of a chain under an AMD pin."""
        leaf_cn = "SEV-VCEK" if endorser is Endorser.VCEK else "SEV-VLEK"
        problems = []
        if leaf.subject.common_name != leaf_cn:
            problems.append(f"{endorser.name} subject CN is {leaf.subject.common_name!r}, "
                            f"expected {leaf_cn!r}")
        if anchor is not None and not anchor.explicit and anchor.product is not None:
            product = anchor.product
            names = amd_names(product, endorser)
            if ark.subject.common_name != names["ark"]:
                problems.append(f"ARK CN {ark.subject.common_name!r} != {names['ark']!r}")
            if inter.subject.common_name != names["intermediate"]:
                problems.append(f"{endorser.intermediate.upper()} CN "
                                f"{inter.subject.common_name!r} != {names['intermediate']!r}")
            want = amd_crl_url(product, endorser)
            if inter.crl_distribution_points != (want,):
                problems.append(f"{endorser.intermediate.upper()} CRL distribution point "
                                f"{list(inter.crl_distribution_points)} != [{want!r}]")
        if problems:
            return Check.failed("chain.names", "; ".join(problems))
        return Check.passed("chain.names", "names follow AMD's conventions"
                            if anchor is not None and not anchor.explicit else
                            f"{endorser.name} subject is {leaf_cn}")

    def chain_checks(self, certs: CertificateSet, endorser: Endorser,
                     at: datetime.datetime) -> Tuple[List[Check], Optional[_ChainFacts]]:
        """The chain's checks; a set whose labels lied (``certs.defects``) fails
        ``chain.certificates`` even when the rest of it verifies."""
        ark, inter, leaf = certs.ark, certs.intermediate(endorser), certs.leaf(endorser)
        missing = [name for name, cert in (("ARK", ark), (endorser.intermediate.upper(), inter),
                                           (endorser.name, leaf)) if cert is None]
        problems = list(certs.defects)
        if missing:
            problems.append(f"missing: {', '.join(missing)}")
        if missing or ark is None or inter is None or leaf is None:
            return [Check.failed("chain.certificates", "; ".join(problems))], None
        facts = self._facts(ark, inter, leaf, endorser)
        checks = list(facts.static)
        for index, (name, label, cert, passed) in zip((2, 4, 6), facts.windows):
            checks.insert(index, _validity(name, label, cert, at, passed))
        checks.append(self._crl_check(certs.crl, ark, inter, at, facts.anchor))
        if problems:
            checks.insert(0, Check.failed("chain.certificates", "; ".join(problems)))
        return checks, facts

    @staticmethod
    def _crl_check(crl: Optional[Crl], ark: Certificate, inter: Certificate,
                   at: datetime.datetime, anchor: Optional[TrustAnchor]) -> Check:
        if crl is None:
            return Check.skipped("chain.crl", "no CRL supplied")
        if crl.issuer.der != ark.subject.der:
            return Check.failed("chain.crl", f"CRL issuer {crl.issuer.common_name!r} is not "
                                "the ARK")
        problem = signature.verify_pss(crl.tbs, crl.signature_algorithm, crl.signature, ark)
        if problem:
            return Check.failed("chain.crl", f"CRL: {problem}")
        if at < crl.this_update:
            return Check.failed("chain.crl", f"CRL not yet valid (thisUpdate "
                                f"{crl.this_update:%Y-%m-%dT%H:%M:%SZ})")
        if crl.next_update is not None and at > crl.next_update:
            return Check.failed("chain.crl", f"CRL is stale (nextUpdate "
                                f"{crl.next_update:%Y-%m-%dT%H:%M:%SZ})")
        if inter.serial_number in crl.revoked_serials:
            return Check.failed("chain.crl", f"{inter.subject.common_name} (serial "
                                f"0x{inter.serial_number:x}) is revoked")
        return Check.passed("chain.crl", f"ARK-signed CRL of "
                            f"{crl.this_update:%Y-%m-%d}; intermediate not revoked")

    def verify_chain(self, certs: CertificateSet, *, endorser: Optional[Endorser] = None,
                     at: Optional[datetime.datetime] = None) -> Verdict:
        """Verify a certificate chain alone (``snpctl verify certs``): the chain of
        ``endorser``, by default the set's own (:attr:`CertificateSet.endorser`: the
        VCEK's when it holds both leaves, and then the VLEK is listed as skipped)."""
        chosen = endorser or certs.endorser
        at = at or self.clock()
        checks, facts = self.chain_checks(certs, chosen, at)
        other = Endorser.VLEK if chosen is Endorser.VCEK else Endorser.VCEK
        if endorser is None and certs.leaf(other) is not None:
            checks.append(Check.skipped(
                f"chain.{other}_signature", f"{other.name} not checked: with both present "
                f"the {chosen.name} is used (snpguest's manual); verifying a report checks "
                "the key that signed it"))
        product = facts.anchor.product if facts and facts.anchor else None
        if facts is not None and facts.extensions is not None and product is None:
            product = facts.extensions.product
        # A chain alone has no report signature; record the chain's own verdict instead.
        ok = bool(checks) and all(c.ok for c in checks)
        checks.append(Check(name="report.signature", status=Status.PASS if ok else Status.SKIP,
                            detail="no report: chain only"))
        return Verdict(tuple(checks), None, product)

    # -- report ----------------------------------------------------------------

    def _bindings(self, report: AttestationReport, endorser: Endorser,
                  requested: Optional[Product], facts: _ChainFacts
                  ) -> Tuple[Optional[Product], Tuple[Check, ...]]:
        key = (report.chip_id, report.reported_tcb, report.cpuid_fam_id, report.cpuid_mod_id,
               requested)
        found = facts.bindings.get(key)
        if found is not None:
            return found
        resolved, product_check = _resolve_product(report, requested, facts)
        checks: List[Check] = []
        if facts.extensions is None:
            checks.append(Check.failed("binding.extensions", f"{endorser.name} KDS extensions: "
                                       f"{facts.extensions_error}"))
        else:
            checks.append(Check.passed("binding.extensions", f"{endorser.name} KDS extensions "
                                       f"decoded (productName {facts.extensions.product_name!r})"))
        checks.append(product_check)
        if facts.extensions is not None:
            checks.extend(_binding_checks(report, endorser, facts.extensions, resolved))
        found = (resolved, tuple(checks))
        if len(facts.bindings) >= 64:
            facts.bindings.clear()
        facts.bindings[key] = found
        return found

    def verify(
        self,
        report: Union[bytes, AttestationReport],
        certificates: CertificateSet,
        *,
        at: Optional[datetime.datetime] = None,
        policy: Union[None, AppraisalPolicy, Sequence[AppraisalPolicy]] = None,
        product: Optional[Product] = None,
        skip: Collection[str] = (),
    ) -> Verdict:
        """Verify ``report`` with ``certificates`` at ``at`` (default the clock's now).

        ``policy`` is one appraisal policy or several, each appraised in turn.
        ``skip`` names checks not to run, from :data:`SKIPPABLE` (snpguest's
        ``--tcb`` is :data:`TCB_ONLY`, ``--signature`` :data:`SIGNATURE_ONLY`); they
        are listed as skipped and the verdict is partial, never valid. The chain is
        checked whatever is skipped.
        """
        at = at or self.clock()
        if at.tzinfo is None:
            raise ValueError("verification time must be timezone-aware")
        unknown = sorted(set(skip) - set(SKIPPABLE))
        if unknown:
            raise ValueError(f"cannot skip {', '.join(unknown)}: only "
                             f"{', '.join(SKIPPABLE)} may be skipped")
        omitted = tuple(name for name in SKIPPABLE if name in skip)
        policies: Tuple[AppraisalPolicy, ...] = (
            () if policy is None else (policy,) if not isinstance(policy, Sequence)
            else tuple(policy))
        checks: List[Check] = []
        if isinstance(report, AttestationReport):
            parsed = report
        else:
            try:
                parsed = AttestationReport.from_bytes(report)
            except ReportFormatError as exc:
                return Verdict((Check.failed("report.format", str(exc)),), omitted=omitted)
        checks.append(Check.passed("report.format", f"version {parsed.version}, 1184 bytes"))
        checks.extend(_report_checks(parsed))

        skipped = _skipped(omitted)

        def unverifiable(why: str) -> Verdict:
            checks.append(skipped.get("report.signature") or Check.failed("report.signature",
                                                                          why))
            return Verdict(tuple(checks), parsed, product or parsed.cpuid_product, omitted)

        sk = parsed.signing_key
        if sk == SigningKey.VCEK:
            endorser = Endorser.VCEK
        elif sk == SigningKey.VLEK:
            endorser = Endorser.VLEK
        else:
            return unverifiable(f"report signing key is {SigningKey.describe(sk)}: "
                                "nothing to verify")

        chain, facts = self.chain_checks(certificates, endorser, at)
        checks.extend(chain)
        if facts is None:
            return unverifiable(f"no {endorser.name} to verify with")

        resolved, bound = self._bindings(parsed, endorser, product, facts)
        checks.extend(skipped[c.name] if c.name in omitted else c for c in bound)
        leaf = certificates.leaf(endorser)
        assert leaf is not None
        if "report.signature" in omitted:
            checks.append(skipped["report.signature"])
        else:
            problem = signature.verify_report(parsed, _safe_key(leaf))
            checks.append(Check.failed("report.signature", problem) if problem else
                          _SIGNATURE_OK[endorser])
        for each in policies:
            if resolved is None:
                checks.append(Check.failed("policy", "cannot appraise: product unknown"))
                break
            checks.extend(each.appraise(parsed, resolved))
        return Verdict(tuple(checks), parsed, resolved, omitted)


def _safe_key(cert: Certificate) -> object:
    try:
        return cert.public_key
    except CertificateFormatError:
        return None


# The checks a caller may leave out, as snpguest's ``verify attestation`` can: its
# ``--tcb`` runs "the TCB section" alone (no signature), its ``--signature`` the
# signature alone (no TCB and chip-ID binding). Everything else always runs.
SKIPPABLE = ("binding.hwid", "binding.tcb", "report.signature")
TCB_ONLY = ("report.signature",)
SIGNATURE_ONLY = ("binding.hwid", "binding.tcb")
_SCOPES = {TCB_ONLY: " (TCB only)", SIGNATURE_ONLY: " (signature only)"}


def _skipped(omitted: Tuple[str, ...]) -> Dict[str, Check]:
    scope = _SCOPES.get(omitted, "")
    return {name: Check.skipped(name, f"not checked: skipped on request{scope}")
            for name in omitted}


_SIGNATURE_OK = {e: Check.passed("report.signature", f"ECDSA P-384/SHA-384 by the {e.name} "
                                 "over bytes [0x000, 0x2a0)") for e in Endorser}
_ALGO_OK = Check.passed("report.signature_algo", "ECDSA P-384 with SHA-384")
_SIGNING_KEY_OK = {k: Check.passed("report.signing_key", k.name)
                   for k in (SigningKey.VCEK, SigningKey.VLEK)}
_RESERVED_OK = Check.passed("report.signature_reserved", "zero")
_POLICY_BIT_OK = Check.passed("report.policy_reserved", "POLICY bit 17 is 1")


def _report_checks(report: AttestationReport) -> List[Check]:
    checks = []
    if report.signature_algo == SIGNATURE_ALGO_ECDSA_P384_SHA384:
        checks.append(_ALGO_OK)
    else:
        checks.append(Check.failed("report.signature_algo",
                                   f"SIGNATURE_ALGO is {report.signature_algo}, expected 1"))
    if report.key_info.mask_chip_key:
        checks.append(Check.failed("report.signing_key", "MASK_CHIP_KEY is set: the firmware "
                                   "did not sign this report"))
    elif report.signing_key in (SigningKey.VCEK, SigningKey.VLEK):
        checks.append(_SIGNING_KEY_OK[SigningKey(report.signing_key)])
    else:
        checks.append(Check.failed("report.signing_key", f"SIGNING_KEY is "
                                   f"{SigningKey.describe(report.signing_key)}"))
    bad = report.signature_reserved_nonzero()
    checks.append(Check.failed("report.signature_reserved", "non-zero: " + ", ".join(bad))
                  if bad else _RESERVED_OK)
    if report.policy.flag("reserved_must_be_one"):
        checks.append(_POLICY_BIT_OK)
    else:
        checks.append(Check.failed("report.policy_reserved", "POLICY bit 17 must be 1"))
    return checks


def _resolve_product(report: AttestationReport, requested: Optional[Product],
                     facts: _ChainFacts) -> Tuple[Optional[Product], Check]:
    """The product, from every source that names one; they must agree."""
    sources = []
    if report.cpuid_product is not None:
        sources.append(("report CPUID", report.cpuid_product))
    if requested is not None:
        sources.append(("requested", requested))
    if facts.anchor is not None and facts.anchor.product is not None:
        sources.append(("pinned ARK", facts.anchor.product))
    if facts.ext_product is not None:
        sources.append(("certificate productName", facts.ext_product))
    if not sources:
        return None, Check.failed("binding.product", "cannot determine the product: no CPUID "
                                  "in the report (v2), no productName, no pinned ARK")
    products = {p for _, p in sources}
    desc = ", ".join(f"{name}: {p}" for name, p in sources)
    if len(products) > 1:
        return None, Check.failed("binding.product", f"sources disagree ({desc})")
    product = sources[0][1]
    ext = facts.extensions
    if ext is not None and ext.struct_version is not None:
        want = 1 if product.turin_layout else 0
        if ext.struct_version != want:
            return product, Check.failed("binding.product", f"structVersion "
                                         f"{ext.struct_version} is not {want} for {product}")
    return product, Check.passed("binding.product", f"{product} ({desc})")


def _binding_checks(report: AttestationReport, endorser: Endorser, ext: VekExtensions,
                    product: Optional[Product]) -> List[Check]:
    checks = []
    if ext.endorser is None:
        checks.append(Check.failed("binding.key_type", "certificate carries "
                                   + ("both hwID and cspID" if ext.hwid is not None
                                      else "neither hwID nor cspID")))
    elif ext.endorser is not endorser:
        checks.append(Check.failed("binding.key_type", f"report is signed by the "
                                   f"{endorser.name} but the certificate is a {ext.endorser.name}"))
    else:
        checks.append(Check.passed("binding.key_type", f"{endorser.name} matches KEY_INFO"))

    if endorser is Endorser.VLEK:
        checks.append(Check.skipped("binding.hwid", "VLEK-signed: no hwID to bind"))
    elif report.chip_id_masked:
        checks.append(Check.skipped("binding.hwid", "CHIP_ID is masked (all zero)"))
    elif ext.hwid is None:
        checks.append(Check.failed("binding.hwid", "certificate has no hwID"))
    elif product is None:
        checks.append(Check.failed("binding.hwid", "product unknown: cannot bind hwID"))
    elif len(ext.hwid) != product.hwid_length:
        checks.append(Check.failed("binding.hwid", f"hwID is {len(ext.hwid)} bytes; {product} "
                                   f"uses {product.hwid_length}"))
    elif ext.hwid != report.chip_id[:len(ext.hwid)] or any(report.chip_id[len(ext.hwid):]):
        checks.append(Check.failed("binding.hwid", "certificate hwID does not match CHIP_ID "
                                   f"(hwID {ext.hwid[:4].hex()}…, CHIP_ID "
                                   f"{report.chip_id[:4].hex()}…)"))
    else:
        checks.append(Check.passed("binding.hwid", f"hwID matches CHIP_ID ({len(ext.hwid)} "
                                   f"bytes, {ext.hwid[:4].hex()}…)"))

    if product is None:
        checks.append(Check.failed("binding.tcb", "product unknown: cannot decode REPORTED_TCB"))
    else:
        tcb = TcbVersion.decode(report.reported_tcb, product)
        problems = ext.tcb_mismatches(tcb)
        checks.append(Check.failed("binding.tcb", "; ".join(problems)) if problems else
                      Check.passed("binding.tcb", f"certificate SPLs equal REPORTED_TCB {tcb}"))
    return checks


def verify_report(
    report: Union[bytes, AttestationReport],
    certificates: CertificateSet,
    *,
    at: Optional[datetime.datetime] = None,
    policy: Union[None, AppraisalPolicy, Sequence[AppraisalPolicy]] = None,
    roots: TrustRoots = AMD_ROOTS,
    product: Optional[Product] = None,
    skip: Collection[str] = (),
) -> Verdict:
    """One-shot verification (a fresh :class:`Verifier`, nothing remembered)."""
    return Verifier(roots).verify(report, certificates, at=at, policy=policy, product=product,
                                  skip=skip)
