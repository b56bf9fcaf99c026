"""Verify Azure vTPM evidence (Trustee's ``az-snp-vtpm``): every check, named.

The evidence is an HCL report (an SNP report whose REPORT_DATA binds the
paravisor's runtime JSON, which holds the vTPM attestation key ``HCLAkPub``) and a
TPM2 quote by that key over the caller's nonce and the PCRs. The checks follow
Trustee's verifier (deps/verifier/src/az_snp_vtpm/mod.rs):

- the SNP report and its chain, by :class:`~snpd.trust.verify.Verifier`, as for any
  report; ``report.vmpl``: the HCL asks at VMPL 0;
- ``report_data.binds_runtime_data``: REPORT_DATA[0:32] = SHA-256(runtime JSON);
  Trustee does not look at REPORT_DATA[32:64] (zero on Azure) and neither does this;
- ``quote.format``, ``quote.signature`` (RSASSA-PKCS1-v1_5/SHA-256 by HCLAkPub over
  the TPMS_ATTEST bytes, or the scheme a TPMT_SIGNATURE names), ``quote.nonce``
  (extraData equals the nonce's raw bytes: Trustee compares ``extra_data()`` with
  the expected report data itself, not a hash of it), ``quote.pcr_digest`` (pcrDigest
  = SHA-256 over the listed PCR values, in selection order);
- ``runtime.user_data`` for v2 evidence: the runtime JSON's ``user-data`` starts
  with the nonce (Trustee's ``verify_user_data``); skipped for v0 and v1;
- ``quote.pcrs``: the caller's expected PCR values, when given.

Pure: bytes and certificates in, a :class:`Verdict` out.
"""

from __future__ import annotations

import datetime
import hashlib
import json
from typing import Any, List, Mapping, Optional, Sequence, Tuple, Union

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from snpd.abi import tpm
from snpd.abi.azure_evidence import AzureEvidence, parse_azure_evidence
from snpd.abi.hcl import HclReport, RsaJwk
from snpd.abi.product import Product
from snpd.errors import EvidenceFormatError, InvalidArgument
from snpd.trust.appraisal import AppraisalPolicy
from snpd.trust.certset import CertificateSet, load_as
from snpd.trust.result import Check, Verdict
from snpd.trust.verify import Verifier

HCL_VMPL = 0  # Trustee's HCL_VMPL_VALUE: the paravisor requests the report at VMPL 0


def _ak_key(ak: RsaJwk) -> Any:
    # backend-free public_key() works from cryptography 3.1 on (Ubuntu 22.04 has 3.4.8)
    return rsa.RSAPublicNumbers(ak.e, ak.n).public_key()


def quote_signature_check(message: bytes, signature: bytes, ak: RsaJwk) -> Check:
    """``quote.signature``: ``signature`` by the AK over ``message``. Trustee's
    evidence carries the bare RSASSA value; a TPMT_SIGNATURE names its scheme."""
    name = "quote.signature"
    scheme, hash_alg, value = "RSASSA", tpm.TPM_ALG_SHA256, signature
    if tpm.Signature.looks_like(signature):
        try:
            parsed = tpm.Signature.from_bytes(signature)
        except EvidenceFormatError as exc:
            return Check.failed(name, str(exc))
        scheme, hash_alg, value = parsed.scheme, parsed.hash_alg, parsed.signature
    if hash_alg != tpm.TPM_ALG_SHA256:
        return Check.failed(name, f"{scheme} with {tpm.HASH_NAMES[hash_alg]}, not SHA-256")
    size = (ak.bits + 7) // 8
    if len(value) != size:
        return Check.failed(name, f"signature is {len(value)} bytes; the {ak.bits}-bit "
                            f"{ak.kid} signs {size}")
    key = _ak_key(ak)
    algorithm = hashes.SHA256()
    paddings: List[padding.AsymmetricPadding] = (
        [padding.PKCS1v15()] if scheme == "RSASSA" else
        # TPM 2.0 signs PSS with the digest-sized salt; some TPMs use the maximum
        [padding.PSS(mgf=padding.MGF1(algorithm), salt_length=algorithm.digest_size),
         padding.PSS(mgf=padding.MGF1(algorithm), salt_length=padding.PSS.MAX_LENGTH)])
    for pad in paddings:
        try:
            key.verify(value, message, pad, algorithm)
        except InvalidSignature:
            continue
        return Check.passed(name, f"{scheme}/SHA-256 by {ak.kid} (RSA-{ak.bits}) over the "
                            f"{len(message)}-byte TPMS_ATTEST")
    return Check.failed(name, f"the quote's {scheme}/SHA-256 signature does not verify with "
                        f"{ak.kid} from the HCL runtime data")


def pcr_digest_check(quote: tpm.Quote, pcrs: List[bytes]) -> Check:
    """``quote.pcr_digest``: pcrDigest = SHA-256 over the listed PCR values."""
    name = "quote.pcr_digest"
    banks = {s.hash_alg for s in quote.pcr_selections}
    if banks - {tpm.TPM_ALG_SHA256}:
        names = ", ".join(tpm.HASH_NAMES.get(b, f"0x{b:04x}") for b in sorted(banks))
        return Check.failed(name, f"the quote selects PCR banks {names}; only SHA-256 is "
                            "listed in the evidence")
    selected = len(quote.selected)
    if selected != len(pcrs):
        return Check.failed(name, f"the quote selects {selected} PCRs; the evidence lists "
                            f"{len(pcrs)}")
    digest = hashlib.sha256(b"".join(pcrs)).digest()
    if digest != quote.pcr_digest:
        return Check.failed(name, f"SHA-256 of the {len(pcrs)} listed PCRs is {digest.hex()}; "
                            f"the quote's pcrDigest is {quote.pcr_digest.hex()}")
    return Check.passed(name, f"pcrDigest covers the {len(pcrs)} listed SHA-256 PCRs "
                        f"({_ranges([i for _, i in quote.selected])})")


def _ranges(indices: List[int]) -> str:
    if indices and indices == list(range(indices[0], indices[-1] + 1)):
        return f"{indices[0]}-{indices[-1]}" if len(indices) > 1 else str(indices[0])
    return ",".join(map(str, indices))


def expected_pcrs_check(quote: tpm.Quote, pcrs: List[bytes],
                        expected: Mapping[int, Sequence[bytes]], *,
                        name: str = "quote.pcrs") -> Check:
    """Each expected PCR is selected and has one of its allowed values (``quote.pcrs``
    for a library caller's values, ``policy.pcrs`` for a policy's). The values are
    the evidence's list, which ``quote.pcr_digest`` ties to the signed quote."""
    values = {index: value for (_, index), value in zip(quote.selected, pcrs)}
    problems = []
    for index in sorted(expected):
        allowed = [bytes(v) for v in expected[index]]
        got = values.get(index)
        if got is None:
            problems.append(f"PCR{index} is not in the quote")
        elif got not in allowed:
            want = " or ".join(v.hex() for v in allowed)
            problems.append(f"PCR{index} is {got.hex()}, expected {want}")
    if problems:
        return Check.failed(name, "; ".join(problems))
    return Check.passed(name, f"{len(expected)} PCR value(s) as expected: "
                        f"{_ranges(sorted(expected))}")


def vm_configuration_check(hcl: HclReport,
                           expected: Sequence[Tuple[str, Union[bool, str]]]) -> Check:
    """``policy.vm_configuration``: the runtime JSON's ``vm-configuration`` holds each
    expected key with exactly the expected value (a boolean is not the string "true")."""
    name = "policy.vm_configuration"
    have = hcl.vm_configuration
    problems = []
    for key, want in expected:
        if key not in have:
            problems.append(f"{key} is absent")
        elif type(have[key]) is not type(want) or have[key] != want:
            problems.append(f"{key} is {json.dumps(have[key])[:80]}, expected "
                            f"{json.dumps(want)}")
    if problems:
        return Check.failed(name, "vm-configuration: " + "; ".join(problems))
    return Check.passed(name, "vm-configuration: " + ", ".join(
        f"{key} = {json.dumps(want)}" for key, want in expected))


def _evidence_rules(policies: Sequence[AppraisalPolicy], quote: Optional[tpm.Quote],
                    pcrs: List[bytes], hcl: HclReport) -> List[Check]:
    checks: List[Check] = []
    for each in policies:
        if each.pcrs is not None:
            checks.append(
                Check.failed("policy.pcrs", "the quote could not be parsed") if quote is None
                else expected_pcrs_check(quote, pcrs, dict(each.pcrs), name="policy.pcrs"))
        if each.vm_configuration is not None:
            checks.append(vm_configuration_check(hcl, each.vm_configuration))
    return checks


def verify_azure_evidence(
    evidence: Union[AzureEvidence, bytes, str, Mapping[str, Any]],
    certificates: CertificateSet,
    nonce: bytes,
    *,
    verifier: Optional[Verifier] = None,
    at: Optional[datetime.datetime] = None,
    product: Optional[Product] = None,
    expected_pcrs: Optional[Mapping[int, bytes]] = None,
    policy: Union[None, AppraisalPolicy, Sequence[AppraisalPolicy]] = None,
) -> Verdict:
    """Verify ``evidence`` (parsed, or the JSON document) for ``nonce``.

    ``certificates`` holds at least the ARK and ASK; the evidence's VCEK fills a set
    without one (the caller's VCEK, when given, is the one used). ``verifier`` holds
    the trust roots and clock (default: AMD's roots, now); ``at`` and ``product`` are
    :meth:`Verifier.verify`'s. ``expected_pcrs`` maps PCR index to the SHA-256 value
    it must have. ``policy`` is one appraisal policy or several: their report rules
    judge the SNP report, their ``pcrs`` and ``vm_configuration`` rules the quote and
    the runtime JSON. Malformed evidence is a failed check (``evidence.format``,
    ``hcl.format``, ``quote.format``), never an exception; only a caller's wrong
    argument types raise :class:`InvalidArgument`.
    """
    if not isinstance(nonce, (bytes, bytearray)):
        raise InvalidArgument(f"the nonce must be bytes, not {type(nonce).__name__}")
    nonce = bytes(nonce)
    if expected_pcrs is not None:
        for index, value in expected_pcrs.items():
            if (type(index) is not int or not 0 <= index < 64
                    or not isinstance(value, (bytes, bytearray)) or len(value) != 32):
                raise InvalidArgument(f"expected PCR {index!r}: the index must be 0..63 and "
                                      "the value 32 bytes (SHA-256)")
    policies: Tuple[AppraisalPolicy, ...] = (
        () if policy is None else (policy,) if isinstance(policy, AppraisalPolicy)
        else tuple(policy))
    verifier = verifier or Verifier()
    checks: List[Check] = []
    if isinstance(evidence, AzureEvidence):
        parsed = evidence
    else:
        try:
            parsed = parse_azure_evidence(evidence)
        except EvidenceFormatError as exc:
            return Verdict((Check.failed("evidence.format", str(exc)),))
    checks.append(Check.passed("evidence.format", f"az-snp-vtpm v{parsed.version}"))
    try:
        hcl = HclReport.from_bytes(parsed.hcl_report)
    except EvidenceFormatError as exc:
        checks.append(Check.failed("hcl.format", str(exc)))
        return Verdict(tuple(checks))
    checks.append(Check.passed("hcl.format", f"HCL report v{hcl.version}, SNP report and "
                               f"{len(hcl.runtime_data)} bytes of runtime data"))

    certs = certificates
    if parsed.vcek is not None and certs.vcek is None:
        vcek, defect = load_as("vcek", parsed.vcek, "the evidence's VCEK")
        certs = (certs.merged(CertificateSet(vcek=vcek)) if vcek is not None  # type: ignore[arg-type]
                 else certs.with_defects([defect or "the evidence's VCEK: unusable"]))
    inner = verifier.verify(hcl.snp_report, certs, at=at, product=product,
                            policy=[p.report_rules() for p in policies])
    checks.extend(inner.checks)
    report = inner.report
    if report is not None:
        checks.append(Check.passed("report.vmpl", f"VMPL {report.vmpl}")
                      if report.vmpl == HCL_VMPL else
                      Check.failed("report.vmpl", f"VMPL {report.vmpl}: the paravisor's "
                                   f"report must come from VMPL {HCL_VMPL}"))
        runtime_hash = hashlib.sha256(hcl.runtime_data).digest()
        bound = report.report_data[:32]
        checks.append(
            Check.passed("report_data.binds_runtime_data",
                         f"REPORT_DATA[0:32] = SHA-256 of the {len(hcl.runtime_data)}-byte "
                         "runtime JSON") if runtime_hash == bound else
            Check.failed("report_data.binds_runtime_data",
                         f"SHA-256 of the runtime JSON is {runtime_hash.hex()}; "
                         f"REPORT_DATA[0:32] is {bound.hex()}"))

    checks.append(quote_signature_check(parsed.quote_message, parsed.quote_signature, hcl.ak))
    try:
        quote: Optional[tpm.Quote] = tpm.Quote.from_bytes(parsed.quote_message)
    except EvidenceFormatError as exc:
        quote = None
        checks.append(Check.failed("quote.format", str(exc)))
    if quote is None:
        for name in ("quote.nonce", "quote.pcr_digest"):
            checks.append(Check.skipped(name, "the quote could not be parsed"))
    else:
        checks.append(Check.passed("quote.format", f"TPMS_ATTEST quote, {len(quote.raw)} "
                                   "bytes"))
        checks.append(
            Check.passed("quote.nonce", f"extraData is the {len(nonce)}-byte nonce")
            if quote.extra_data == nonce else
            Check.failed("quote.nonce", f"extraData {quote.extra_data.hex()} is not the "
                         f"nonce {nonce.hex()}"))
        checks.append(pcr_digest_check(quote, list(parsed.pcrs)))
    if expected_pcrs is None:
        checks.append(Check.skipped("quote.pcrs", "no expected PCR values given"))
    elif quote is None:
        checks.append(Check.failed("quote.pcrs", "the quote could not be parsed"))
    else:
        checks.append(expected_pcrs_check(quote, list(parsed.pcrs), {
            index: (value,) for index, value in expected_pcrs.items()}))
    checks.append(_user_data_check(parsed.version, hcl, nonce))
    checks.extend(_evidence_rules(policies, quote, list(parsed.pcrs), hcl))
    return Verdict(tuple(checks), report, inner.product, inner.omitted)


def _user_data_check(version: int, hcl: HclReport, nonce: bytes) -> Check:
    name = "runtime.user_data"
    if version < 2:
        return Check.skipped(name, f"v{version} evidence binds the nonce through the quote "
                             "alone")
    try:
        user_data = hcl.user_data
    except EvidenceFormatError as exc:
        return Check.failed(name, str(exc))
    if user_data is None:
        return Check.failed(name, "v2 evidence: the runtime JSON has no 'user-data'")
    if user_data[:len(nonce)] != nonce or len(user_data) < len(nonce):
        return Check.failed(name, f"user-data {user_data.hex()} does not start with the "
                            f"nonce {nonce.hex()}")
    return Check.passed(name, "the runtime JSON's user-data starts with the nonce")
