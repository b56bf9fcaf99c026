"""Azure vTPM evidence (issue 14 item 3): the HCL report and TPM quote parsers, Trustee's
az-snp-vtpm evidence v0/v1/v2, and the verifier on the shared real vectors."""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import hashlib
import json
import struct
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa

import snpd
from snpd.abi import hcl, strictjson, tpm
from snpd.abi.azure_evidence import MAX_EVIDENCE, AzureEvidence, parse_azure_evidence
from snpd.errors import EvidenceFormatError, InvalidArgument
from snpd.trust.appraisal import AppraisalPolicy
from snpd.trust.azure import verify_azure_evidence
from snpd.trust.certset import CertificateSet
from snpd.trust.result import Status
from snpd.trust.x509 import load_certificate

AZURE_CASES = ("evidence-v1", "evidence-v1-wrong-nonce", "evidence-v1-runtime-tampered")
# The check each invalid case fails first (the tampered runtime also breaks the quote's
# signature: the AK it names is no longer the one that signed).
FAILS = {"evidence-v1": (),
         "evidence-v1-wrong-nonce": ("quote.nonce",),
         "evidence-v1-runtime-tampered": ("report_data.binds_runtime_data", "quote.signature")}


# -- synthetic material (no vectors) ---------------------------------------------------

_KEY: List[rsa.RSAPrivateKey] = []


def key() -> rsa.RSAPrivateKey:
    if not _KEY:
        _KEY.append(rsa.generate_private_key(public_exponent=65537, key_size=2048))
    return _KEY[0]


def b64url(value: int) -> str:
    raw = value.to_bytes((value.bit_length() + 7) // 8, "big")
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def runtime_json(**overrides: Any) -> bytes:
    numbers = key().public_key().public_numbers()
    doc: Dict[str, Any] = {
        "keys": [{"kid": "HCLAkPub", "key_ops": ["sign"], "kty": "RSA",
                  "e": b64url(numbers.e), "n": b64url(numbers.n)}],
        "vm-configuration": {"console-enabled": False, "secure-boot": True,
                             "tpm-enabled": True},
        "user-data": "00" * 64,
    }
    doc.update(overrides)
    return json.dumps(doc).encode()


def hcl_blob(runtime: Optional[bytes] = None, *, magic: bytes = b"HCLA", report_type: int = 2,
             hash_type: int = 1, var_size: Optional[int] = None, pad: int = 16) -> bytes:
    runtime = runtime_json() if runtime is None else runtime
    size = len(runtime) if var_size is None else var_size
    snp = bytearray(1184)
    snp[0x50:0x70] = hashlib.sha256(runtime).digest()
    header = magic + struct.pack("<7I", 1, 1236 + len(runtime), 2, 0, 0, 0, 0)
    request = struct.pack("<5I", 20 + len(runtime), 1, report_type, hash_type, size)
    return header + bytes(snp) + request + runtime + bytes(pad)


def quote_msg(extra: bytes = b"nonce", pcrs: Tuple[bytes, ...] = (bytes(32),) * 24,
              select: bytes = b"\xff\xff\xff", bank: int = tpm.TPM_ALG_SHA256,
              digest: Optional[bytes] = None) -> bytes:
    digest = hashlib.sha256(b"".join(pcrs)).digest() if digest is None else digest
    return (struct.pack(">IH", tpm.TPM_GENERATED_VALUE, tpm.TPM_ST_ATTEST_QUOTE)
            + struct.pack(">H", 34) + b"\x00\x0b" + bytes(32)
            + struct.pack(">H", len(extra)) + extra
            + struct.pack(">QIIB", 123456, 2, 3, 1) + struct.pack(">Q", 0x2021)
            + struct.pack(">I", 1) + struct.pack(">HB", bank, len(select)) + select
            + struct.pack(">H", len(digest)) + digest)


def sign(message: bytes) -> bytes:
    return key().sign(message, padding.PKCS1v15(), hashes.SHA256())


def pcr_values() -> Tuple[bytes, ...]:
    return tuple(hashlib.sha256(bytes([i])).digest() for i in range(24))


def synthetic(nonce: bytes = b"nonce", **kwargs: Any) -> AzureEvidence:
    pcrs = pcr_values()
    message = quote_msg(nonce, pcrs)
    return AzureEvidence(version=1, hcl_report=hcl_blob(**kwargs), quote_message=message,
                         quote_signature=sign(message), pcrs=pcrs)


def status(verdict: Any, name: str) -> Optional[Status]:
    check = verdict.check(name)
    return None if check is None else check.status


# -- TPMS_ATTEST and TPMT_SIGNATURE ----------------------------------------------------

def test_quote_parses() -> None:
    quote = tpm.Quote.from_bytes(quote_msg(b"challenge"))
    assert quote.extra_data == b"challenge"
    assert quote.clock == 123456 and quote.reset_count == 2 and quote.restart_count == 3
    assert quote.safe and quote.firmware_version == 0x2021
    assert quote.selected == tuple((tpm.TPM_ALG_SHA256, i) for i in range(24))
    assert quote.pcr_digest == hashlib.sha256(bytes(32 * 24)).digest()


def test_quote_every_truncation_is_a_typed_error() -> None:
    message = quote_msg()
    for size in range(len(message)):
        with pytest.raises(EvidenceFormatError, match="TPMS_ATTEST"):
            tpm.Quote.from_bytes(message[:size])


@pytest.mark.parametrize("mutate, match", [
    (lambda m: b"\xff\x54\x43\x48" + m[4:], "magic is 0xff544348"),
    (lambda m: m[:4] + b"\x80\x17" + m[6:], "type is 0x8017"),
    (lambda m: m + b"\x00", "1 byte.s. after the structure"),
    (lambda m: m[:6] + b"\xff\xff" + m[8:], "qualifiedSigner is 65535 bytes"),
])
def test_quote_rejects(mutate: Any, match: str) -> None:
    with pytest.raises(EvidenceFormatError, match=match):
        tpm.Quote.from_bytes(mutate(quote_msg()))


def test_quote_rejects_oversize_fields() -> None:
    with pytest.raises(EvidenceFormatError, match="extraData is 65 bytes"):
        tpm.Quote.from_bytes(quote_msg(bytes(65)))
    with pytest.raises(EvidenceFormatError, match="sizeofSelect is 5"):
        tpm.Quote.from_bytes(quote_msg(select=bytes(5)))
    with pytest.raises(EvidenceFormatError, match="pcrDigest is 65 bytes"):
        tpm.Quote.from_bytes(quote_msg(digest=bytes(65)))
    with pytest.raises(EvidenceFormatError, match="at most 1024"):
        tpm.Quote.from_bytes(bytes(2000))


def test_quote_never_raises_anything_untyped() -> None:
    message = bytearray(quote_msg())
    for offset in range(len(message)):
        for value in (0x00, 0x7F, 0xFF):
            mutated = bytearray(message)
            mutated[offset] = value
            with contextlib.suppress(EvidenceFormatError):
                tpm.Quote.from_bytes(bytes(mutated))


def test_tpmt_signature() -> None:
    value = bytes(range(256))
    framed = struct.pack(">HHH", tpm.TPM_ALG_RSAPSS, tpm.TPM_ALG_SHA256, 256) + value
    sig = tpm.Signature.from_bytes(framed)
    assert (sig.scheme, sig.hash_alg, sig.signature) == ("RSAPSS", tpm.TPM_ALG_SHA256, value)
    assert tpm.Signature.looks_like(framed) and not tpm.Signature.looks_like(value)
    for size in range(len(framed) - 1):
        with pytest.raises(EvidenceFormatError, match="TPMT_SIGNATURE"):
            tpm.Signature.from_bytes(framed[:size])
    with pytest.raises(EvidenceFormatError, match="sigAlg is 0x0018"):
        tpm.Signature.from_bytes(b"\x00\x18" + framed[2:])
    with pytest.raises(EvidenceFormatError, match="hash is 0x0099"):
        tpm.Signature.from_bytes(framed[:2] + b"\x00\x99" + framed[4:])
    with pytest.raises(EvidenceFormatError, match="after the structure"):
        tpm.Signature.from_bytes(framed + b"\x00")


# -- the HCL report --------------------------------------------------------------------

def test_hcl_report_parses() -> None:
    runtime = runtime_json()
    report = hcl.HclReport.from_bytes(hcl_blob(runtime))
    assert report.runtime_data == runtime and len(report.snp_report) == 1184
    assert report.snp_report[0x50:0x70] == hashlib.sha256(runtime).digest()
    numbers = key().public_key().public_numbers()
    assert (report.ak.n, report.ak.e, report.ak.bits) == (numbers.n, numbers.e, 2048)
    assert report.vm_configuration["secure-boot"] is True
    assert report.user_data == bytes(64)
    assert (report.report_type, report.hash_type) == (hcl.REPORT_TYPE_SNP, 1)


@pytest.mark.parametrize("blob, match", [
    (lambda: hcl_blob(magic=b"HCLB"), "signature is b'HCLB'"),
    (lambda: hcl_blob()[:1235], "shorter than its 1236-byte fixed part"),
    (lambda: hcl_blob(report_type=4), "report_type is 4 .a TDX report."),
    (lambda: hcl_blob(hash_type=2), "report_data_hash_type is 2"),
    (lambda: hcl_blob(var_size=5000), "variable_data_size 5000 runs past the end"),
    (lambda: hcl_blob(var_size=1 << 20), "variable_data_size is 1048576"),
    (lambda: hcl_blob(b"x" * 40000, var_size=40000), "variable_data_size is 40000"),
    (lambda: bytes(70000), "70000 bytes, at most"),
    (lambda: hcl_blob(b"[1, 2]"), "a JSON list, not an object"),
    (lambda: hcl_blob(b'{"a": 1, "a": 2}'), "key 'a' appears twice"),
    (lambda: hcl_blob(b'{"a": NaN}'), "NaN is not JSON"),
    (lambda: hcl_blob(b"\xff{}"), "not UTF-8"),
    (lambda: hcl_blob(b"{" * 10), "not JSON"),
    (lambda: hcl_blob(b"[" * 16000 + b"]" * 16000), "nested too deeply"),
    (lambda: hcl_blob(b'{"keys": 3}'), "'keys' is missing or not a list"),
    (lambda: hcl_blob(runtime_json(keys=[])), "no key with kid 'HCLAkPub'"),
    (lambda: hcl_blob(runtime_json(keys=[{"kid": "HCLAkPub", "kty": "EC"}])),
     "kty is 'EC'"),
    (lambda: hcl_blob(runtime_json(keys=[{"kid": "HCLAkPub", "kty": "RSA", "e": "AQAB",
                                          "n": "AQAB"}])), "modulus is 17 bits"),
    (lambda: hcl_blob(runtime_json(keys=[{"kid": "HCLAkPub", "kty": "RSA", "e": "AQ+B",
                                          "n": "AQAB"}])), "HCLAkPub.e is not a base64url"),
])
def test_hcl_report_rejects(blob: Any, match: str) -> None:
    with pytest.raises(EvidenceFormatError, match=match):
        hcl.HclReport.from_bytes(blob())


def test_hcl_report_rejects_two_aks_and_bad_exponent() -> None:
    ak = json.loads(runtime_json())["keys"][0]
    with pytest.raises(EvidenceFormatError, match="2 keys with kid"):
        hcl.HclReport.from_bytes(hcl_blob(runtime_json(keys=[ak, ak])))
    with pytest.raises(EvidenceFormatError, match="exponent 65536"):
        hcl.HclReport.from_bytes(hcl_blob(runtime_json(keys=[dict(ak, e=b64url(65536))])))


def test_hcl_report_every_truncation_is_a_typed_error() -> None:
    blob = hcl_blob(pad=0)
    for size in range(0, len(blob), 7):
        with pytest.raises(EvidenceFormatError):
            hcl.HclReport.from_bytes(blob[:size])


# -- evidence documents ----------------------------------------------------------------

def v1_document(evidence: AzureEvidence, version: int = 1) -> Dict[str, Any]:
    def enc(data: bytes) -> str:
        return base64.urlsafe_b64encode(data).decode()
    doc: Dict[str, Any] = {"version": version, "hcl_report": enc(evidence.hcl_report),
                           "tpm_quote": {"signature": evidence.quote_signature.hex(),
                                         "message": evidence.quote_message.hex(),
                                         "pcrs": [p.hex() for p in evidence.pcrs]}}
    if evidence.vcek is not None:
        doc["vcek"] = enc(evidence.vcek)
    return doc


def v0_document(evidence: AzureEvidence) -> Dict[str, Any]:
    assert evidence.vcek is not None
    body = base64.encodebytes(evidence.vcek).decode()
    return {"quote": {"signature": list(evidence.quote_signature),
                      "message": list(evidence.quote_message),
                      "pcrs": [list(p) for p in evidence.pcrs]},
            "report": list(evidence.hcl_report),
            "vcek": f"-----BEGIN CERTIFICATE-----\n{body}-----END CERTIFICATE-----\n"}


def test_every_version_parses_to_the_same_bytes() -> None:
    evidence = dataclasses.replace(synthetic(), vcek=b"\x30\x03\x02\x01\x00")
    for version, doc in ((0, v0_document(evidence)), (1, v1_document(evidence)),
                         (2, v1_document(evidence, 2))):
        for form in (doc, json.dumps(doc), json.dumps(doc).encode()):
            parsed = parse_azure_evidence(form)  # type: ignore[arg-type]
            assert parsed == dataclasses.replace(evidence, version=version)


def test_unpadded_base64url_and_missing_vcek() -> None:
    evidence = synthetic()
    doc = v1_document(evidence)
    doc["hcl_report"] = doc["hcl_report"].rstrip("=")
    parsed = parse_azure_evidence(doc)
    assert parsed.hcl_report == evidence.hcl_report and parsed.vcek is None


@pytest.mark.parametrize("edit, match", [
    (lambda d: d.update(version=3), "'version' is 3, not 1 or 2"),
    (lambda d: d.update(version="1"), "'version' is '1'"),
    (lambda d: d.update(version=True), "'version' is True"),
    (lambda d: d.pop("version"), "'version' is missing"),
    (lambda d: d.update(hcl_report="abc+/"), "'hcl_report' is not a base64url"),
    (lambda d: d.update(hcl_report=5), "'hcl_report' is not a base64url"),
    (lambda d: d.update(tpm_quote=[]), "'tpm_quote' is missing or not an object"),
    (lambda d: d["tpm_quote"].update(message="abc"), "'tpm_quote.message' is not a hex"),
    (lambda d: d["tpm_quote"].update(signature="zz"), "'tpm_quote.signature' is not a hex"),
    (lambda d: d["tpm_quote"].update(pcrs="00"), "'tpm_quote.pcrs' is missing"),
    (lambda d: d["tpm_quote"]["pcrs"].append("00" * 20), r"pcrs'\[24\] is 20 bytes"),
    (lambda d: d["tpm_quote"].update(pcrs=["00" * 32] * 65), "lists 65 PCRs"),
    (lambda d: d.update(vcek="M"), "'vcek' is not base64url: "),
    (lambda d: d.update(vcek="MA=x"), "'vcek' is not a base64url string"),
])
def test_v1_document_rejects(edit: Any, match: str) -> None:
    doc = v1_document(synthetic())
    edit(doc)
    with pytest.raises(EvidenceFormatError, match=match):
        parse_azure_evidence(doc)


@pytest.mark.parametrize("edit, match", [
    (lambda d: d.update(report=[1, 256]), "'report' holds something other than"),
    (lambda d: d.update(report=[1, True]), "'report' holds something other than"),
    (lambda d: d.update(report="AAAA"), "'report' is not an array"),
    (lambda d: d["quote"]["pcrs"].append([0] * 31), r"'quote.pcrs'\[24\] is 31 bytes"),
    (lambda d: d.update(vcek="not pem"), "'vcek' is not one PEM CERTIFICATE block"),
    (lambda d: d.pop("quote"), "'quote' is missing or not an object"),
])
def test_v0_document_rejects(edit: Any, match: str) -> None:
    doc = v0_document(dataclasses.replace(synthetic(), vcek=b"\x30\x00"))
    edit(doc)
    with pytest.raises(EvidenceFormatError, match=match):
        parse_azure_evidence(doc)


def test_v0_vcek_whitespace_is_linear() -> None:
    """Found while extending the fuzz suite: the v0 ``vcek`` PEM pattern had ``\\s*`` on
    both sides of a body that may hold whitespace, so a BEGIN line followed by a long
    run of spaces backtracked cubically (800 spaces took 0.15 s; the 128 KiB a field
    may hold, hours). Such a value is now refused in one pass."""
    doc = v0_document(dataclasses.replace(synthetic(), vcek=b"\x30\x00"))
    for tail in ("", "\n-----END CERTIFICATE", "=\n"):
        doc["vcek"] = "-----BEGIN CERTIFICATE-----" + " " * 120_000 + tail
        with pytest.raises(EvidenceFormatError, match="not one PEM CERTIFICATE block"):
            parse_azure_evidence(doc)
    doc["vcek"] = ("  -----BEGIN CERTIFICATE-----" + " " * 60_000 + "MAA=" + "\n" * 60_000
                   + "-----END CERTIFICATE-----  ")
    assert parse_azure_evidence(doc).vcek == b"\x30\x00"


def test_document_bounds_and_json() -> None:
    with pytest.raises(EvidenceFormatError, match="at most 262144"):
        parse_azure_evidence(b" " * (MAX_EVIDENCE + 1))
    with pytest.raises(EvidenceFormatError, match="is not JSON"):
        parse_azure_evidence(b"{")
    with pytest.raises(EvidenceFormatError, match="'version' appears twice"):
        parse_azure_evidence(b'{"version": 1, "version": 2}')
    with pytest.raises(EvidenceFormatError, match="the document is missing or not an obj"):
        parse_azure_evidence(b"[]")
    with pytest.raises(EvidenceFormatError, match="Infinity is not JSON"):
        parse_azure_evidence(b'{"version": Infinity}')


def test_an_overflowing_number_is_not_infinity() -> None:
    """Found by the fuzzer: 1e400 is a JSON number that float() makes Infinity, which
    strict JSON promises never to return; it is refused like the Infinity literal."""
    for text in (b"1e400", b"-1e400", b"[0.5, 1E+999]"):
        with pytest.raises(EvidenceFormatError, match="is out of range"):
            strictjson.loads(text, what="t", limit=100)
    with pytest.raises(EvidenceFormatError, match="the number 1e400 is out of range"):
        parse_azure_evidence(b'{"version": 1e400}')
    with pytest.raises(EvidenceFormatError, match="HCL runtime data: the number -1e999"):
        hcl.HclReport.from_bytes(hcl_blob(runtime_json(**{"vm-configuration": 0.0})
                                          .replace(b"0.0", b"-1e999")))
    assert strictjson.loads(b"[1e308, -0.0, 5e-324, 1e-400]", what="t", limit=100) == [
        1e308, -0.0, 5e-324, 0.0]


# -- verification on synthetic evidence (the quote checks; the SNP report is zeros) ----

def test_synthetic_quote_checks_pass_and_report_fails() -> None:
    verdict = verify_azure_evidence(synthetic(b"n0nce"), CertificateSet(), b"n0nce")
    for name in ("evidence.format", "hcl.format", "quote.format", "quote.signature",
                 "quote.nonce", "quote.pcr_digest"):
        assert status(verdict, name) is Status.PASS, verdict.check(name)
    assert status(verdict, "quote.pcrs") is Status.SKIP
    assert status(verdict, "runtime.user_data") is Status.SKIP
    assert not verdict.valid and "report.format" in [c.name for c in verdict.failures]


def test_synthetic_expected_pcrs() -> None:
    pcrs = pcr_values()
    good = verify_azure_evidence(synthetic(), CertificateSet(), b"nonce",
                                 expected_pcrs={0: pcrs[0], 7: pcrs[7]})
    assert status(good, "quote.pcrs") is Status.PASS
    bad = verify_azure_evidence(synthetic(), CertificateSet(), b"nonce",
                                expected_pcrs={7: bytes(32)})
    assert status(bad, "quote.pcrs") is Status.FAIL
    assert "PCR7 is" in bad.check("quote.pcrs").detail  # type: ignore[union-attr]
    with pytest.raises(InvalidArgument, match="expected PCR 99"):
        verify_azure_evidence(synthetic(), CertificateSet(), b"nonce",
                              expected_pcrs={99: bytes(32)})
    with pytest.raises(InvalidArgument, match="nonce must be bytes"):
        verify_azure_evidence(synthetic(), CertificateSet(), "nonce")  # type: ignore[arg-type]


def test_synthetic_quote_failures() -> None:
    evidence = synthetic()
    flipped = bytes([evidence.quote_signature[0] ^ 1]) + evidence.quote_signature[1:]
    verdict = verify_azure_evidence(dataclasses.replace(evidence, quote_signature=flipped),
                                    CertificateSet(), b"nonce")
    assert status(verdict, "quote.signature") is Status.FAIL
    short = dataclasses.replace(evidence, pcrs=evidence.pcrs[:23])
    verdict = verify_azure_evidence(short, CertificateSet(), b"nonce")
    assert "selects 24 PCRs; the evidence lists 23" in verdict.check(  # type: ignore[union-attr]
        "quote.pcr_digest").detail
    swapped = dataclasses.replace(evidence, pcrs=(evidence.pcrs[1], evidence.pcrs[0])
                                  + evidence.pcrs[2:])
    assert status(verify_azure_evidence(swapped, CertificateSet(), b"nonce"),
                  "quote.pcr_digest") is Status.FAIL
    garbage = dataclasses.replace(evidence, quote_message=b"\x00" * 10)
    verdict = verify_azure_evidence(garbage, CertificateSet(), b"nonce")
    assert status(verdict, "quote.format") is Status.FAIL
    assert status(verdict, "quote.nonce") is Status.SKIP
    assert status(verdict, "quote.signature") is Status.FAIL


def test_synthetic_tpmt_signature_and_pss() -> None:
    evidence = synthetic()
    framed = struct.pack(">HHH", tpm.TPM_ALG_RSASSA, tpm.TPM_ALG_SHA256, 256)
    verdict = verify_azure_evidence(dataclasses.replace(
        evidence, quote_signature=framed + evidence.quote_signature), CertificateSet(), b"nonce")
    assert status(verdict, "quote.signature") is Status.PASS
    pss = key().sign(evidence.quote_message,
                     padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=32),
                     hashes.SHA256())
    framed = struct.pack(">HHH", tpm.TPM_ALG_RSAPSS, tpm.TPM_ALG_SHA256, 256)
    verdict = verify_azure_evidence(dataclasses.replace(evidence, quote_signature=framed + pss),
                                    CertificateSet(), b"nonce")
    assert status(verdict, "quote.signature") is Status.PASS, verdict.check("quote.signature")
    framed = struct.pack(">HHH", tpm.TPM_ALG_RSASSA, tpm.TPM_ALG_SHA1, 256)
    verdict = verify_azure_evidence(dataclasses.replace(
        evidence, quote_signature=framed + evidence.quote_signature), CertificateSet(), b"nonce")
    assert "SHA-1, not SHA-256" in verdict.check("quote.signature").detail  # type: ignore[union-attr]


def test_malformed_evidence_is_a_failed_check() -> None:
    verdict = verify_azure_evidence(b"{}", CertificateSet(), b"nonce")
    assert [c.name for c in verdict.failures] == ["evidence.format"] and not verdict.valid
    bad = dataclasses.replace(synthetic(), hcl_report=b"HCLA")
    verdict = verify_azure_evidence(bad, CertificateSet(), b"nonce")
    assert [c.name for c in verdict.failures] == ["hcl.format"] and not verdict.valid


def test_v2_binds_the_nonce_in_user_data() -> None:
    nonce = b"n" * 64
    good = dataclasses.replace(synthetic(nonce, runtime=runtime_json(**{
        "user-data": nonce.hex()})), version=2)
    assert status(verify_azure_evidence(good, CertificateSet(), nonce),
                  "runtime.user_data") is Status.PASS
    bad = dataclasses.replace(synthetic(nonce), version=2)
    assert status(verify_azure_evidence(bad, CertificateSet(), nonce),
                  "runtime.user_data") is Status.FAIL


# -- the shared real vectors -----------------------------------------------------------

@pytest.fixture(scope="module")
def azure_cases(vectors_dir: Path) -> Dict[str, Dict[str, Any]]:
    with open(vectors_dir / "azure" / "cases.json", encoding="utf-8") as f:
        data = json.load(f)
    assert {c["id"] for c in data} == set(AZURE_CASES)
    return {c["id"]: c for c in data}


def case_files(vectors_dir: Path, case: Dict[str, Any]) -> Tuple[bytes, Path, bytes]:
    d = vectors_dir / case["dir"]
    return (d / "evidence.json").read_bytes(), d, case["nonce_utf8"].encode()


@pytest.mark.parametrize("case_id", AZURE_CASES)
def test_shared_case(case_id: str, vectors_dir: Path,
                     azure_cases: Dict[str, Dict[str, Any]]) -> None:
    case = azure_cases[case_id]
    document, d, nonce = case_files(vectors_dir, case)
    verdict = verify_azure_evidence(document, snpd.certificate_set(d), nonce)
    assert verdict.valid is (case["expect"] == "valid"), verdict.to_json()
    assert tuple(c.name for c in verdict.failures) == FAILS[case_id]
    assert verdict.product is not None and verdict.product.value == case["product"]


def test_vcek_from_the_evidence(vectors_dir: Path,
                                azure_cases: Dict[str, Dict[str, Any]]) -> None:
    document, d, nonce = case_files(vectors_dir, azure_cases["evidence-v1"])
    certs = CertificateSet(ark=load_certificate((d / "ark.pem").read_bytes()),
                           ask=load_certificate((d / "ask.pem").read_bytes()))
    evidence = parse_azure_evidence(document)
    assert evidence.vcek == (d / "vcek.der").read_bytes()
    assert verify_azure_evidence(evidence, certs, nonce).valid
    verdict = verify_azure_evidence(evidence, CertificateSet(ark=certs.ark), nonce)
    assert [c.name for c in verdict.failures] == ["chain.certificates", "report.signature"]


def test_real_evidence_in_v0_and_v2_form(vectors_dir: Path,
                                         azure_cases: Dict[str, Dict[str, Any]]) -> None:
    document, d, nonce = case_files(vectors_dir, azure_cases["evidence-v1"])
    v1 = parse_azure_evidence(document)
    certs = snpd.certificate_set(d)
    v0 = parse_azure_evidence(json.dumps(v0_document(v1)))
    assert v0 == dataclasses.replace(v1, version=0)
    assert verify_azure_evidence(v0, certs, nonce).valid
    v2 = parse_azure_evidence(json.dumps(v1_document(v1, 2)))
    assert v2 == dataclasses.replace(v1, version=2)
    # The real runtime JSON's user-data is 64 zero bytes: as v2, the nonce is not bound.
    verdict = verify_azure_evidence(v2, certs, nonce)
    assert [c.name for c in verdict.failures] == ["runtime.user_data"]
    # Zeros match the user-data, but not the quote's extraData.
    verdict = verify_azure_evidence(v2, certs, bytes(64))
    assert status(verdict, "runtime.user_data") is Status.PASS
    assert [c.name for c in verdict.failures] == ["quote.nonce"]


def test_real_hcl_report_facts(vectors_dir: Path,
                               azure_cases: Dict[str, Dict[str, Any]]) -> None:
    document, _, _ = case_files(vectors_dir, azure_cases["evidence-v1"])
    evidence = parse_azure_evidence(document)
    report = hcl.HclReport.from_bytes(evidence.hcl_report)
    assert (report.version, report.report_type, report.hash_type) == (1, 2, 1)
    assert report.report_size == hcl.RUNTIME_DATA_OFFSET + len(report.runtime_data)
    assert report.vm_configuration["secure-boot"] is True
    assert report.vm_configuration["tpm-enabled"] is True
    assert report.ak.bits == 2048 and report.ak.e == 65537
    quote = tpm.Quote.from_bytes(evidence.quote_message)
    assert quote.extra_data == b"challenge"
    assert quote.selected == tuple((tpm.TPM_ALG_SHA256, i) for i in range(24))
    assert len(evidence.quote_signature) == 256
    assert not tpm.Signature.looks_like(evidence.quote_signature)


def test_policy_evidence_rules_on_synthetic_evidence() -> None:
    """A policy's [pcrs] (any of the listed values) and [vm_configuration] (exact value
    and type) judge the quote's PCRs and the runtime JSON."""
    pcrs = pcr_values()
    good = AppraisalPolicy(pcrs=((0, (bytes(32), pcrs[0])), (23, (pcrs[23],))),
                           vm_configuration=(("secure-boot", True), ("console-enabled", False)))
    verdict = verify_azure_evidence(synthetic(), CertificateSet(), b"nonce", policy=good)
    assert status(verdict, "policy.pcrs") is Status.PASS
    assert status(verdict, "policy.vm_configuration") is Status.PASS
    bad = AppraisalPolicy(pcrs=((7, (bytes(32),)),),
                          vm_configuration=(("secure-boot", "true"), ("tpm-persisted", True)))
    verdict = verify_azure_evidence(synthetic(), CertificateSet(), b"nonce", policy=[bad])
    assert "PCR7 is" in verdict.check("policy.pcrs").detail  # type: ignore[union-attr]
    detail = verdict.check("policy.vm_configuration").detail  # type: ignore[union-attr]
    assert detail == ('vm-configuration: secure-boot is true, expected "true"; '
                      "tpm-persisted is absent")
    # A runtime JSON without vm-configuration fails the rule; so does an unparsable quote.
    bare = synthetic(runtime=runtime_json(**{"vm-configuration": None}))
    verdict = verify_azure_evidence(bare, CertificateSet(), b"nonce", policy=good)
    assert status(verdict, "policy.vm_configuration") is Status.FAIL
    broken = dataclasses.replace(synthetic(), quote_message=b"junk")
    verdict = verify_azure_evidence(broken, CertificateSet(), b"nonce", policy=good)
    assert verdict.check("policy.pcrs").detail == "the quote could not be parsed"  # type: ignore[union-attr]
