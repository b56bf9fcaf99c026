"""Each verification check fails when it should, under an emulator chain."""

from __future__ import annotations

import dataclasses
import datetime
from pathlib import Path

import pytest
from emuplatform import NOW, TCBS, Platform, chip_id_for  # type: ignore[import-not-found]

from snpd.abi.product import Endorser, Product
from snpd.abi.report import AttestationReport
from snpd.abi.tcb import TcbVersion
from snpd.emulator.pki import make_chain, make_crl, make_vcek
from snpd.trust.certset import CertificateSet
from snpd.trust.result import Status, Verdict
from snpd.trust.roots import AMD_ROOTS
from snpd.trust.verify import Verifier


def failed(verdict: Verdict) -> list:  # type: ignore[type-arg]
    return [c.name for c in verdict.failures]


def test_emulated_report_is_valid_under_its_explicit_root(platform: Platform) -> None:
    for endorser in Endorser:
        verdict = Verifier(platform.roots).verify(platform.report(endorser),
                                                  platform.certs(endorser), at=NOW)
        assert verdict.valid, failed(verdict)
        assert verdict.product is platform.product
        assert verdict.check("chain.names").status is Status.PASS  # type: ignore[union-attr]


def test_unpinned_root_is_rejected(milan: Platform) -> None:
    verdict = Verifier(AMD_ROOTS).verify(milan.report(), milan.certs(), at=NOW)
    assert failed(verdict) == ["chain.ark_trusted"]
    assert "not a pinned AMD ARK" in verdict.failures[0].detail


def test_hwid_mismatch(platform: Platform) -> None:
    other = chip_id_for(platform.product, seed=9)
    raw = platform.report(chip_id=other)
    verdict = Verifier(platform.roots).verify(raw, platform.certs(), at=NOW)
    assert failed(verdict) == ["binding.hwid"]


def test_turin_binds_eight_bytes_and_the_rest_must_be_zero(turin: Platform) -> None:
    chip = bytearray(chip_id_for(Product.TURIN))
    chip[40] = 1
    verdict = Verifier(turin.roots).verify(turin.report(chip_id=bytes(chip)), turin.certs(),
                                           at=NOW)
    assert failed(verdict) == ["binding.hwid"]


def test_masked_chip_id_skips_hwid(milan: Platform) -> None:
    verdict = Verifier(milan.roots).verify(milan.report(chip_id=bytes(64)), milan.certs(), at=NOW)
    assert verdict.valid
    assert verdict.check("binding.hwid").status is Status.SKIP  # type: ignore[union-attr]


def test_tcb_mismatch_each_component(platform: Platform) -> None:
    base = TCBS[platform.product].components()
    for component in base:
        parts = dict(base)
        parts[component] += 1
        tcb = TcbVersion.from_parts(platform.product, **parts)
        verdict = Verifier(platform.roots).verify(platform.report(reported_tcb=tcb),
                                                  platform.certs(), at=NOW)
        assert failed(verdict) == ["binding.tcb"], component
        assert component in verdict.failures[0].detail


def test_tcb_compared_as_whole_integers(milan: Platform) -> None:
    """snpguest compares the last DER byte; 0x1d9 and 0xd9 must differ."""
    assert TCBS[Product.MILAN].microcode == 217
    tcb = TcbVersion.from_parts(Product.MILAN, bootloader=4, tee=0, snp=24, microcode=217)
    assert Verifier(milan.roots).verify(milan.report(reported_tcb=tcb), milan.certs(), at=NOW)


def test_expired_and_not_yet_valid(milan: Platform) -> None:
    later = NOW + datetime.timedelta(days=8 * 365)
    verdict = Verifier(milan.roots).verify(milan.report(), milan.certs(), at=later)
    assert failed(verdict) == ["chain.vcek_validity"]
    assert "expired" in verdict.failures[0].detail
    earlier = NOW - datetime.timedelta(days=30)
    verdict = Verifier(milan.roots).verify(milan.report(), milan.certs(), at=earlier)
    assert set(failed(verdict)) == {"chain.ark_validity", "chain.ask_validity",
                                    "chain.vcek_validity"}


def test_validity_is_rechecked_when_the_chain_is_memoized(milan: Platform) -> None:
    verifier = Verifier(milan.roots)
    assert verifier.verify(milan.report(), milan.certs(), at=NOW)
    later = NOW + datetime.timedelta(days=8 * 365)
    assert not verifier.verify(milan.report(), milan.certs(), at=later)


def test_wrong_product_chain(milan: Platform, genoa: Platform) -> None:
    """A Milan (CPUID) report with a Genoa chain: the product sources disagree."""
    raw = milan.report()
    certs = genoa.certs()
    verdict = Verifier(genoa.roots).verify(raw, certs, at=NOW)
    assert "binding.product" in failed(verdict)
    assert "report.signature" in failed(verdict)


def test_requested_product_must_agree(milan: Platform) -> None:
    verdict = Verifier(milan.roots).verify(milan.report(), milan.certs(), at=NOW,
                                           product=Product.GENOA)
    assert "binding.product" in failed(verdict)


def test_v2_report_takes_product_from_the_certificate(milan: Platform) -> None:
    verdict = Verifier(milan.roots).verify(milan.report(version=2), milan.certs(), at=NOW)
    assert verdict.valid, failed(verdict)
    assert verdict.product is Product.MILAN


def test_revoked_intermediate(milan: Platform) -> None:
    crl = make_crl(milan.chain, now=NOW, revoked=[milan.chain.ask.serial_number])
    verdict = Verifier(milan.roots).verify(milan.report(), milan.certs(crl=crl), at=NOW)
    assert failed(verdict) == ["chain.crl"]
    assert "revoked" in verdict.failures[0].detail
    ok = make_crl(milan.chain, now=NOW, revoked=[0x77])
    verdict = Verifier(milan.roots).verify(milan.report(), milan.certs(crl=ok), at=NOW)
    assert verdict.valid and verdict.check("chain.crl").status is Status.PASS  # type: ignore


def test_vlek_crl_checks_the_asvk(milan: Platform) -> None:
    crl = make_crl(milan.chain, now=NOW, revoked=[milan.chain.asvk.serial_number])
    verdict = Verifier(milan.roots).verify(milan.report(Endorser.VLEK),
                                           milan.certs(Endorser.VLEK, crl=crl), at=NOW)
    assert failed(verdict) == ["chain.crl"]


def test_stale_and_forged_crl(milan: Platform, genoa: Platform) -> None:
    stale = make_crl(milan.chain, now=NOW - datetime.timedelta(days=30))
    verdict = Verifier(milan.roots).verify(milan.report(), milan.certs(crl=stale), at=NOW)
    assert failed(verdict) == ["chain.crl"] and "stale" in verdict.failures[0].detail
    forged = dataclasses.replace(make_crl(genoa.chain, now=NOW), issuer=milan.chain.ark.subject)
    verdict = Verifier(milan.roots).verify(milan.report(), milan.certs(crl=forged), at=NOW)
    assert failed(verdict) == ["chain.crl"]
    other_issuer = make_crl(genoa.chain, now=NOW)
    verdict = Verifier(milan.roots).verify(milan.report(), milan.certs(crl=other_issuer), at=NOW)
    assert failed(verdict) == ["chain.crl"]


def test_vcek_not_signed_by_the_ask(milan: Platform) -> None:
    impostor_chain = make_chain(Product.MILAN, now=NOW, rsa_bits=2048)
    key, vcek = make_vcek(impostor_chain, chip_id_for(Product.MILAN), TCBS[Product.MILAN],
                          now=NOW)
    verdict = Verifier(milan.roots).verify(milan.report(key=key), milan.certs(vcek=vcek), at=NOW)
    assert failed(verdict) == ["chain.vcek_signature"]


def test_ask_from_another_ark(milan: Platform) -> None:
    impostor_chain = make_chain(Product.MILAN, now=NOW, rsa_bits=2048)
    verdict = Verifier(milan.roots).verify(milan.report(),
                                           milan.certs(ask=impostor_chain.ask), at=NOW)
    assert "chain.ask_signature" in failed(verdict)


def test_report_signed_by_another_key(milan: Platform) -> None:
    from snpd.emulator.pki import new_ec_key

    verdict = Verifier(milan.roots).verify(milan.report(key=new_ec_key()), milan.certs(),
                                           at=NOW)
    assert failed(verdict) == ["report.signature"]


def test_key_type_binding(milan: Platform) -> None:
    # A VLEK-signed report verified with a certs set whose "vlek" is really the VCEK.
    certs = CertificateSet(ark=milan.chain.ark, asvk=milan.chain.asvk, vlek=milan.vcek)
    verdict = Verifier(milan.roots).verify(milan.report(Endorser.VLEK, key=milan.vcek_key),
                                           certs, at=NOW)
    assert "binding.key_type" in failed(verdict)


def test_unsigned_reports(milan: Platform) -> None:
    for extra, signing_key in ((0b10, 0), (0, 7), (0, 3)):
        raw = bytearray(milan.report())
        raw[0x48] = signing_key << 2 | extra
        verdict = Verifier(milan.roots).verify(bytes(raw), milan.certs(), at=NOW)
        assert "report.signing_key" in failed(verdict)
        assert not verdict


def test_signature_algo_and_reserved(milan: Platform) -> None:
    verdict = Verifier(milan.roots).verify(milan.report(signature_algo=2), milan.certs(), at=NOW)
    assert failed(verdict) == ["report.signature_algo"]
    raw = bytearray(milan.report())
    raw[0x400] = 1
    verdict = Verifier(milan.roots).verify(bytes(raw), milan.certs(), at=NOW)
    assert failed(verdict) == ["report.signature_reserved"]


def test_policy_bit_17(milan: Platform) -> None:
    verdict = Verifier(milan.roots).verify(milan.report(policy=0x10000), milan.certs(), at=NOW)
    assert failed(verdict) == ["report.policy_reserved"]


def test_missing_certificates(milan: Platform) -> None:
    verdict = Verifier(milan.roots).verify(milan.report(), milan.certs(vcek=None), at=NOW)
    assert failed(verdict) == ["chain.certificates", "report.signature"]
    assert not verdict


def test_unparsable_report_is_a_verdict_not_an_exception(milan: Platform) -> None:
    for raw in (b"", milan.report()[:-1], b"\x06" + milan.report()[1:]):
        verdict = Verifier(milan.roots).verify(raw, milan.certs(), at=NOW)
        assert failed(verdict) == ["report.format"]


def test_naive_time_is_refused(milan: Platform) -> None:
    with pytest.raises(ValueError):
        Verifier(milan.roots).verify(milan.report(), milan.certs(), at=NOW.replace(tzinfo=None))


def test_verdict_json_lists_every_check(milan: Platform) -> None:
    doc = Verifier(milan.roots).verify(milan.report(), milan.certs(), at=NOW).to_json()
    names = [c["name"] for c in doc["checks"]]  # type: ignore[index]
    assert doc["valid"] is True and doc["failures"] == []
    for name in ("report.signature", "chain.ark_trusted", "binding.tcb", "binding.hwid",
                 "chain.crl"):
        assert name in names


def test_chain_only_verdict(milan: Platform) -> None:
    assert Verifier(milan.roots).verify_chain(milan.certs(), at=NOW)
    assert not Verifier(AMD_ROOTS).verify_chain(milan.certs(), at=NOW)


# -- a certificate set that lies about itself (issue 11, item 4) ---------------------------


def test_a_mislabelled_certificate_is_a_failed_check_not_an_error(milan: Platform) -> None:
    """The host, or whoever assembled the pairs, labels them: a lying label fails the
    verdict with the reason, and the lying item is not used."""
    chain = milan.chain
    pairs = [("ark", chain.ark.der), ("ask", chain.ask.der), ("vcek", milan.vcek.der),
             ("asvk", chain.ask.der)]
    certs = CertificateSet.from_kinds(pairs)
    assert certs.asvk is None
    assert certs.defects == ("certificate 3 (given as asvk) holds an ASK certificate, "
                             "not an ASVK",)
    verdict = Verifier(milan.roots).verify(milan.report(), certs, at=NOW)
    assert failed(verdict) == ["chain.certificates"]
    assert verdict.failures[0].detail == certs.defects[0]
    assert not Verifier(milan.roots).verify_chain(certs, at=NOW)
    # The same pairs without the lie verify.
    assert Verifier(milan.roots).verify(milan.report(), CertificateSet.from_kinds(pairs[:3]),
                                        at=NOW)


def test_a_vlek_given_a_vcek_fails_whatever_fills_the_gap(milan: Platform) -> None:
    certs = CertificateSet.from_kinds([("ark", milan.chain.ark.der),
                                       ("asvk", milan.chain.asvk.der),
                                       ("vlek", milan.vcek.der)])
    assert certs.vlek is None and "holds a VCEK certificate, not a VLEK" in certs.defects[0]
    verdict = Verifier(milan.roots).verify(milan.report(Endorser.VLEK), certs, at=NOW)
    assert failed(verdict) == ["chain.certificates", "report.signature"]
    assert verdict.check("chain.certificates").detail.endswith(  # type: ignore[union-attr]
        "not a VLEK; missing: VLEK")
    # A cache that supplies the real VLEK does not make the caller's set honest.
    healed = certs.merged(milan.certs(Endorser.VLEK))
    assert healed.vlek is not None and healed.defects == certs.defects
    verdict = Verifier(milan.roots).verify(milan.report(Endorser.VLEK), healed, at=NOW)
    assert failed(verdict) == ["chain.certificates"]


def test_bytes_that_are_no_certificate_and_duplicates_are_defects(milan: Platform) -> None:
    from snpd.errors import CertificateFormatError

    certs = CertificateSet.from_kinds([("ark", milan.chain.ark.der), ("vcek", b"x"),
                                       ("crl", milan.chain.ark.der),
                                       ("ark", milan.chain.ask.der)])
    assert [d.split(":")[0] for d in certs.defects] == [
        "certificate 1 (given as vcek) is not a VCEK certificate",
        "certificate 2 (given as crl) is not a CRL",
        "certificate 3 (given as ark) holds an ASK certificate, not an ARK"]
    dup = CertificateSet.from_kinds([("vcek", milan.vcek.der),
                                     ("vcek", make_vcek(milan.chain, chip_id_for(
                                         Product.MILAN, seed=5), TCBS[Product.MILAN],
                                         now=NOW)[1].der)])
    assert dup.vcek == milan.vcek
    assert dup.defects == ("certificate 1 (given as vcek) is a second, different VCEK",)
    with pytest.raises(CertificateFormatError, match="unknown certificate kind 'root'"):
        CertificateSet.from_kinds([("root", milan.chain.ark.der)])


def test_load_certs_dir_records_a_lying_file(tmp_path: Path, milan: Platform) -> None:
    from snpd.certsdir import load_certs_dir, write_certs_dir

    write_certs_dir(tmp_path, milan.certs(), "pem")
    (tmp_path / "vlek.der").write_bytes(milan.vcek.der)
    certs = load_certs_dir(tmp_path)
    assert certs.vlek is None and certs.vcek == milan.vcek
    assert certs.defects == ("vlek.der holds a VCEK certificate, not a VLEK",)
    assert failed(Verifier(milan.roots).verify(milan.report(), certs, at=NOW)) == [
        "chain.certificates"]


def test_the_daemon_answers_a_mislabelled_list_with_an_invalid_verdict(
        milan: Platform) -> None:
    """VerifyReport (both transports call Service.verify_report): valid=false with the
    reason, not an InvalidArgument error."""
    import asyncio

    from snpd.access import Access, Caller
    from snpd.events import Events
    from snpd.service import Service, VerifyOptions

    class Sink:
        def send(self, fields: object) -> None:
            pass

    service = Service(broker=None, access=Access(), events=Events(Sink()),  # type: ignore
                      verifier=Verifier(milan.roots))
    root = Caller(uid=0)
    at = int(NOW.timestamp())
    chain = milan.chain

    good = [("ark", chain.ark.der), ("ask", chain.ask.der), ("vcek", milan.vcek.der)]
    lists = (good, [*good, ("asvk", chain.ask.der)], [*good[:2], ("vcek", b"x")])

    async def calls() -> list:  # type: ignore[type-arg]
        return [await service.verify_report(root, milan.report(),
                                            VerifyOptions.from_plain(certificates=pairs, at=at))
                for pairs in lists]

    try:
        honest, lying, garbage = asyncio.run(calls())
    finally:
        service.close()
    assert honest.valid is True
    assert lying.valid is False and [c.name for c in lying.failures] == ["chain.certificates"]
    assert ("chain.certificates", "fail",
            "certificate 3 (given as asvk) holds an ASK certificate, not an ASVK"
            ) in [(c.name, c.status.value, c.detail) for c in lying.checks]
    assert garbage.valid is False and "chain.certificates" in [c.name for c in
                                                                garbage.failures]


# -- partial verification: snpguest's --tcb and --signature --------------------------------


def test_skipping_makes_a_partial_verdict_that_is_never_valid(milan: Platform) -> None:
    from snpd.trust.verify import SIGNATURE_ONLY, TCB_ONLY

    verifier = Verifier(milan.roots)
    for skip in (TCB_ONLY, SIGNATURE_ONLY):
        verdict = verifier.verify(milan.report(), milan.certs(), at=NOW, skip=skip)
        assert verdict.passed and verdict.partial and not verdict.valid and not verdict
        assert verdict.omitted == skip
        assert all(verdict.check(n).status is Status.SKIP for n in skip)  # type: ignore
        doc = verdict.to_json()
        assert doc["valid"] is False and doc["partial"] is True and doc["skipped"] == list(skip)
    forged = bytearray(milan.report())
    forged[0x50] ^= 1
    assert verifier.verify(bytes(forged), milan.certs(), at=NOW, skip=TCB_ONLY).passed
    assert not verifier.verify(bytes(forged), milan.certs(), at=NOW, skip=SIGNATURE_ONLY).passed
    # The chain is checked whatever is skipped.
    other = make_chain(Product.MILAN, now=NOW, rsa_bits=2048)
    verdict = verifier.verify(milan.report(), milan.certs(ask=other.ask), at=NOW, skip=TCB_ONLY)
    assert not verdict.passed and "chain.ask_signature" in failed(verdict)
    with pytest.raises(ValueError, match="cannot skip chain.ark_trusted"):
        verifier.verify(milan.report(), milan.certs(), at=NOW, skip=("chain.ark_trusted",))


def test_several_policies_are_each_appraised(milan: Platform) -> None:
    from snpd.trust.appraisal import AppraisalPolicy

    report = milan.report()
    parsed = AttestationReport.from_bytes(report)
    exact = AppraisalPolicy.expecting({"measurement": parsed.measurement,
                                       "id_key_digest": bytes(48),
                                       "author_key_digest": b"\x01" * 48})
    verdict = Verifier(milan.roots).verify(report, milan.certs(), at=NOW,
                                           policy=[AppraisalPolicy(vmpl=(0,)), exact])
    assert failed(verdict) == ["policy.author_key_digest"]
    names = [c.name for c in verdict.checks if c.name.startswith("policy.")]
    assert names == ["policy.vmpl", "policy.measurement", "policy.id_key_digest",
                     "policy.author_key_digest"]
    with pytest.raises(Exception, match="unknown field 'vmpl'"):
        AppraisalPolicy.expecting({"vmpl": b"\0"})
