"""The DER/X.509 layer: real certificates, serial 0, both hwID encodings, hostile bytes."""

from __future__ import annotations

import contextlib
import datetime
import warnings
from pathlib import Path
from typing import Any, Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from snpd.abi.product import Product
from snpd.errors import CertificateFormatError
from snpd.trust import der
from snpd.trust.certset import CertificateSet, classify
from snpd.trust.roots import AMD_FINGERPRINTS, pinned_role
from snpd.trust.vek import VekExtensions, decode_hwid
from snpd.trust.x509 import (
    Certificate,
    load_certificate,
    load_certificates,
    load_crl,
    pem_encode,
)


def test_real_vceks_have_serial_zero_and_load_without_warnings(
        case_dir: Callable[[Any], Path]) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for case in ("milan-v2-vcek", "genoa-v5-vcek", "turin-v5-vcek"):
            cert = load_certificate((case_dir(case) / "vcek.der").read_bytes())
            assert cert.serial_number == 0
            assert cert.subject.common_name == "SEV-VCEK"
            assert cert.public_key.curve.name == "secp384r1"  # type: ignore[union-attr]


def test_turin_vcek_extensions(case_dir: Callable[[Any], Path]) -> None:
    ext = VekExtensions.from_certificate(
        load_certificate((case_dir("turin-v5-vcek") / "vcek.der").read_bytes()))
    assert ext.struct_version == 1
    assert ext.product is Product.TURIN
    assert ext.hwid == bytes.fromhex("3b42092f69c656d3")
    assert ext.spls == {"fmc": 0, "bootloader": 1, "tee": 0, "snp": 2, "microcode": 71}


def test_vlek_extensions_two_byte_integer(case_dir: Callable[[Any], Path]) -> None:
    ext = VekExtensions.from_certificate(
        load_certificate((case_dir("milan-v3-vlek") / "vlek.der").read_bytes()))
    assert ext.csp_id == "CN=cc-us-east-2.amazonaws.com"
    assert ext.hwid is None
    assert ext.spls["microcode"] == 217
    assert ext.product_name == "Milan"


def test_both_hwid_encodings(case_dir: Callable[[Any], Path]) -> None:
    legacy = VekExtensions.from_certificate(
        load_certificate((case_dir("neg-invalid-vcek-legacy") / "vcek.der").read_bytes()))
    new = VekExtensions.from_certificate(
        load_certificate((case_dir("neg-invalid-vcek-new") / "vcek.der").read_bytes()))
    assert legacy.hwid == new.hwid == bytes(range(64))
    # Raw chip IDs starting with a DER tag byte are still raw (snpguest panicked here).
    assert decode_hwid(b"\x04" + bytes(63)) == b"\x04" + bytes(63)
    assert decode_hwid(b"\x04\x08" + bytes(8)) == bytes(8)
    with pytest.raises(CertificateFormatError):
        decode_hwid(bytes(12))


def test_pem_stack_order_and_fingerprints(vectors_dir: Path) -> None:
    for product in Product:
        certs = load_certificates((vectors_dir / "roots" /
                                   f"{product.value.lower()}_vcek_chain.pem").read_bytes())
        assert [classify(c) for c in certs] == ["ask", "ark"]
        assert certs[1].sha256 == AMD_FINGERPRINTS[(product, "ark")]
        assert pinned_role(certs[0]) == (product, "ask")
        vlek = load_certificates((vectors_dir / "roots" /
                                  f"{product.value.lower()}_vlek_chain.pem").read_bytes())
        assert pinned_role(vlek[0]) == (product, "asvk")


def test_pem_der_round_trip(case_dir: Callable[[Any], Path]) -> None:
    cert = load_certificate((case_dir("milan-v2-vcek") / "vcek.der").read_bytes())
    again = load_certificate(cert.to_pem().encode())
    assert again.der == cert.der and again == cert


def test_certificate_set_from_kinds_checks_the_kind(case_dir: Callable[[Any], Path]) -> None:
    d = case_dir("milan-v2-vcek")
    ark = (d / "ark.pem").read_bytes()
    # A kind that lies is a defect of the set (it fails verification), not an error.
    lying = CertificateSet.from_kinds([("ask", ark)])
    assert lying.ask is None and lying.ark is None
    assert lying.defects == ("certificate 0 (given as ask) holds an ARK certificate, "
                             "not an ASK",)
    with pytest.raises(CertificateFormatError, match="unknown certificate kind"):
        CertificateSet.from_kinds([("root", ark)])
    certs = CertificateSet.from_kinds([("ark", ark), ("vcek", (d / "vcek.der").read_bytes())])
    assert certs.ark is not None and certs.vcek is not None


@pytest.mark.parametrize("data, message", [
    (b"", "truncated"),
    (b"\x30\x80\x00\x00", "indefinite"),
    (b"\x30\x85\x01\x00\x00\x00\x00", "too large"),
    (b"\x30\x81\x05abcde", "non-minimal"),
    (b"\x30\x10abc", "claims 16 bytes"),
    (b"\x30\x00\x00", "trailing"),
    (b"-----BEGIN CERTIFICATE-----\n!!!!\n-----END CERTIFICATE-----\n", "base64"),
    (b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n", "no PEM CERTIFICATE"),
])
def test_malformed_input_is_a_typed_error(data: bytes, message: str) -> None:
    with pytest.raises(CertificateFormatError, match=message):
        load_certificate(data)


def test_truncations_of_a_real_certificate(case_dir: Callable[[Any], Path]) -> None:
    raw = (case_dir("turin-v5-vcek") / "vcek.der").read_bytes()
    for cut in range(0, len(raw), 7):
        with pytest.raises(CertificateFormatError):
            load_certificate(raw[:cut])


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=400))
def test_arbitrary_bytes_only_raise_typed_errors(data: bytes) -> None:
    for loader in (load_certificate, load_crl):
        with contextlib.suppress(CertificateFormatError):
            loader(data)


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_mutated_certificates_only_raise_typed_errors(vectors_dir: Path,
                                                      data: st.DataObject) -> None:
    path = vectors_dir / "cases" / "milan-v2-vcek" / "vcek.der"
    raw = bytearray(path.read_bytes())
    for _ in range(data.draw(st.integers(1, 4))):
        i = data.draw(st.integers(0, len(raw) - 1))
        raw[i] = data.draw(st.integers(0, 255))
    try:
        cert = load_certificate(bytes(raw))
        VekExtensions.from_certificate(cert)
        _ = (cert.basic_constraints_ca, cert.key_cert_sign, cert.crl_distribution_points)
    except CertificateFormatError:
        pass


def test_der_integer_and_oid_round_trip() -> None:
    for value in (0, 1, 127, 128, 255, 256, 0xD9, -1, -128, -129, 2**70):
        tlv = der.parse_single(der.integer(value), "int")
        assert der.decode_integer(tlv) == value
    for dotted in ("1.3.6.1.4.1.3704.1.3.9", "2.5.29.19", "1.2.840.113549.1.1.10"):
        assert der.decode_oid(der.parse_single(der.oid(dotted), "oid")) == dotted
    with pytest.raises(CertificateFormatError, match="non-minimal INTEGER"):
        der.decode_integer(der.parse_single(b"\x02\x02\x00\x01", "int"))


def test_times() -> None:
    for year in (1999, 2026, 2049, 2050, 2100):
        when = datetime.datetime(year, 5, 6, 7, 8, 9, tzinfo=datetime.timezone.utc)
        assert der.decode_time(der.parse_single(der.time(when), "t")) == when


def test_pem_encode_is_standard() -> None:
    text = pem_encode(bytes(100), "CERTIFICATE")
    assert text.startswith("-----BEGIN CERTIFICATE-----\n")
    assert all(len(line) <= 64 for line in text.splitlines())


def test_certificate_is_hashable_value() -> None:
    assert Certificate.__dataclass_params__.frozen  # type: ignore[attr-defined]
