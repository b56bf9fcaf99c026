"""KDS URL building and parsing (docs/reference/abi.md §4.6, §5.1), against the real examples."""

from __future__ import annotations

import subprocess
import sys

import pytest

from snpd.abi import Endorser, Product, TcbVersion, parse_report
from snpd.kds.urls import (
    DEFAULT_KDS_URL,
    KdsRequest,
    cert_chain_path,
    chip_digest,
    crl_path,
    join_url,
    parse_path,
    redact_url,
    vcek_path,
)

# A 64-byte chip id whose hex shows where every byte lands.
CHIP = bytes(range(0x40, 0x80))
MILAN_TCB = TcbVersion.decode(0x4405000000000002, Product.MILAN)
# Oak's Turin example: chip id 3b42092f69c656d3 followed by 56 zero bytes.
TURIN_CHIP = bytes.fromhex("3b42092f69c656d3") + bytes(56)
TURIN_TCB = TcbVersion.decode(0x4700000002000100, Product.TURIN)
TURIN_PATH = "/vcek/v1/Turin/3b42092f69c656d3?fmcSPL=0&blSPL=1&teeSPL=0&snpSPL=2&ucodeSPL=71"


def test_default_url():
    assert DEFAULT_KDS_URL == "https://kdsintf.amd.com"


def test_milan_vcek_path_is_go_sev_guest_url():
    path = vcek_path(Product.MILAN, CHIP, MILAN_TCB)
    hwid = CHIP.hex()
    assert len(hwid) == 128 and hwid == hwid.lower()
    assert path == f"/vcek/v1/Milan/{hwid}?blSPL=2&teeSPL=0&snpSPL=5&ucodeSPL=68"
    assert join_url(DEFAULT_KDS_URL, path) == "https://kdsintf.amd.com" + path


def test_genoa_vcek_path_uses_full_chip_id():
    tcb = TcbVersion.from_parts(Product.GENOA, bootloader=9, tee=0, snp=23, microcode=72)
    assert vcek_path(Product.GENOA, CHIP, tcb) == (
        f"/vcek/v1/Genoa/{CHIP.hex()}?blSPL=9&teeSPL=0&snpSPL=23&ucodeSPL=72"
    )


def test_turin_vcek_path_uses_8_byte_hwid_and_fmc():
    assert vcek_path(Product.TURIN, TURIN_CHIP, TURIN_TCB) == TURIN_PATH


def test_turin_hwid_ignores_bytes_after_8():
    # The KDS names Turin chips by 8 bytes; the rest of CHIP_ID does not enter the URL.
    path = vcek_path(Product.TURIN, TURIN_CHIP[:8] + b"\xff" * 56, TURIN_TCB)
    assert path == TURIN_PATH


def test_spl_values_are_unpadded_decimal():
    tcb = TcbVersion.from_parts(Product.MILAN, bootloader=3, tee=0, snp=255, microcode=209)
    assert vcek_path(Product.MILAN, CHIP, tcb).endswith(
        "?blSPL=3&teeSPL=0&snpSPL=255&ucodeSPL=209")


@pytest.mark.parametrize("size", [0, 8, 63, 65])
def test_vcek_path_rejects_wrong_chip_id_length(size):
    with pytest.raises(ValueError, match="64 bytes"):
        vcek_path(Product.MILAN, bytes([1]) * size, MILAN_TCB)


def test_vcek_path_rejects_tcb_of_other_layout():
    with pytest.raises(ValueError, match="layout"):
        vcek_path(Product.TURIN, TURIN_CHIP, MILAN_TCB)
    with pytest.raises(ValueError, match="layout"):
        vcek_path(Product.GENOA, CHIP, TURIN_TCB)


def test_vcek_path_rejects_masked_chip_id():
    with pytest.raises(ValueError, match="all zero"):
        vcek_path(Product.MILAN, bytes(64), MILAN_TCB)
    with pytest.raises(ValueError, match="all zero"):
        vcek_path(Product.TURIN, bytes(8) + b"\x01" * 56, TURIN_TCB)


def test_vcek_path_rejects_a_product_name_string():
    with pytest.raises(ValueError, match="Product"):
        vcek_path("Milan", CHIP, MILAN_TCB)  # type: ignore[arg-type]


@pytest.mark.parametrize("product", list(Product))
def test_chain_and_crl_paths(product):
    name = product.value
    assert cert_chain_path(product) == f"/vcek/v1/{name}/cert_chain"
    assert cert_chain_path(product, Endorser.VCEK) == f"/vcek/v1/{name}/cert_chain"
    assert cert_chain_path(product, Endorser.VLEK) == f"/vlek/v1/{name}/cert_chain"
    assert crl_path(product) == f"/vcek/v1/{name}/crl"
    assert crl_path(product, Endorser.VLEK) == f"/vlek/v1/{name}/crl"


# ----------------------------------------------------------------- parse_path ---


def test_parse_turin_vcek_path():
    request = parse_path(TURIN_PATH)
    assert request == KdsRequest("vcek", Product.TURIN, Endorser.VCEK,
                                 bytes.fromhex("3b42092f69c656d3"),
                                 {"fmc": 0, "bootloader": 1, "tee": 0, "snp": 2, "microcode": 71})
    assert list(request.tcb) == ["fmc", "bootloader", "tee", "snp", "microcode"]
    assert request.tcb_version() == TURIN_TCB
    assert request.path == TURIN_PATH


def test_parse_oak_url_with_reversed_parameter_order():
    # Oak's endorsement URL, verbatim from spec §4.6: ucodeSPL first.
    oak = ("https://kdsintf.amd.com/vcek/v1/Turin/3b42092f69c656d3"
           "?ucodeSPL=71&snpSPL=2&teeSPL=0&blSPL=1&fmcSPL=0")
    assert parse_path(oak) == parse_path(TURIN_PATH)
    assert parse_path(oak).path == TURIN_PATH


def test_parse_zero_padded_spls_like_snpguest():
    padded = f"/vcek/v1/Milan/{CHIP.hex()}?blSPL=02&teeSPL=00&snpSPL=05&ucodeSPL=68"
    assert parse_path(padded).path == vcek_path(Product.MILAN, CHIP, MILAN_TCB)
    assert parse_path(padded).tcb_version() == MILAN_TCB


@pytest.mark.parametrize("product", list(Product))
@pytest.mark.parametrize("endorser", list(Endorser))
def test_parse_round_trips_chain_and_crl(product, endorser):
    for path, kind in ((cert_chain_path(product, endorser), "cert_chain"),
                       (crl_path(product, endorser), "crl")):
        request = parse_path(path)
        assert (request.kind, request.product, request.endorser) == (kind, product, endorser)
        assert request.hwid == b"" and dict(request.tcb) == {}
        assert request.tcb_version() is None
        assert request.path == path


@pytest.mark.parametrize("product", list(Product))
def test_parse_round_trips_vcek(product):
    for raw in (0, 0x4405000000000002, 0x4700000002000100, 0xFF00FFFFFFFFFFFF):
        tcb = TcbVersion.decode(raw, product)
        path = vcek_path(product, CHIP, tcb)
        request = parse_path(path)
        assert request.path == path
        assert request.hwid == CHIP[: product.hwid_length]
        # The URL carries the components only: reserved bytes of the raw u64 are lost.
        assert request.tcb == tcb.components()
        assert request.tcb_version() == TcbVersion.from_parts(product, **tcb.components())


def test_parsed_requests_are_hashable_and_read_only():
    a = parse_path(TURIN_PATH)
    b = parse_path("/vcek/v1/Turin/3b42092f69c656d3?fmcSPL=00&ucodeSPL=71&blSPL=1&teeSPL=0"
                   "&snpSPL=2")
    assert a == b and hash(a) == hash(b) and len({a, b}) == 1
    with pytest.raises(TypeError):
        a.tcb["snp"] = 3  # type: ignore[index]


@pytest.mark.parametrize("path", [
    "",
    "/",
    "/vcek/v1/Milan",
    "/vcek/v1/Milan/",
    "/vcek/v1/Milan/cert_chain/",
    "/vcek/v2/Milan/cert_chain",
    "/vcek/v1/milan/cert_chain",            # product names are case-sensitive
    "/vcek/v1/Unknown/cert_chain",          # go-sev-guest's Zen4c URL
    "/vcek/v1/Bergamo/cert_chain",          # filed under Genoa
    "/xyz/v1/Milan/cert_chain",
    "/vcek/v1/Milan/ca",
    "/vcek/v1/Milan/cert_chain?x=1",
    "/vcek/v1/Milan/crl#frag",
    # Turin with the full 64-byte id: the real KDS answers 404 (AMDESE/AMDSEV#285)
    "/vcek/v1/Turin/" + TURIN_CHIP.hex() + "?fmcSPL=0&blSPL=1&teeSPL=0&snpSPL=2&ucodeSPL=71",
    # Milan with an 8-byte id
    "/vcek/v1/Milan/3b42092f69c656d3?blSPL=2&teeSPL=0&snpSPL=5&ucodeSPL=68",
    # upper-case hex
    "/vcek/v1/Milan/" + CHIP.hex().upper() + "?blSPL=2&teeSPL=0&snpSPL=5&ucodeSPL=68",
    "/vcek/v1/Turin/3b42092f69c656zz?fmcSPL=0&blSPL=1&teeSPL=0&snpSPL=2&ucodeSPL=71",
    # parameters: missing, extra, duplicate, out of range, not decimal, empty
    "/vcek/v1/Turin/3b42092f69c656d3?blSPL=1&teeSPL=0&snpSPL=2&ucodeSPL=71",
    "/vcek/v1/Milan/" + CHIP.hex() + "?fmcSPL=0&blSPL=2&teeSPL=0&snpSPL=5&ucodeSPL=68",
    "/vcek/v1/Milan/" + CHIP.hex() + "?blSPL=2&blSPL=2&teeSPL=0&snpSPL=5&ucodeSPL=68",
    "/vcek/v1/Milan/" + CHIP.hex() + "?blSPL=256&teeSPL=0&snpSPL=5&ucodeSPL=68",
    "/vcek/v1/Milan/" + CHIP.hex() + "?blSPL=+2&teeSPL=0&snpSPL=5&ucodeSPL=68",
    "/vcek/v1/Milan/" + CHIP.hex() + "?blSPL=0x2&teeSPL=0&snpSPL=5&ucodeSPL=68",
    "/vcek/v1/Milan/" + CHIP.hex() + "?blSPL=&teeSPL=0&snpSPL=5&ucodeSPL=68",
    "/vcek/v1/Milan/" + CHIP.hex() + "?blSPL=0002&teeSPL=0&snpSPL=5&ucodeSPL=68",
    "/vcek/v1/Milan/" + CHIP.hex(),
    # VLEKs are not fetched by hwid (not a public endpoint)
    "/vlek/v1/Milan/" + CHIP.hex() + "?blSPL=2&teeSPL=0&snpSPL=5&ucodeSPL=68",
])
def test_parse_rejects(path):
    with pytest.raises(ValueError):
        parse_path(path)


# ------------------------------------------------------------------ redaction ---


def test_redact_url_hides_the_chip_id_and_keeps_the_rest():
    url = join_url("http://cache.example/kds/", vcek_path(Product.MILAN, CHIP, MILAN_TCB))
    redacted = redact_url(url)
    assert CHIP.hex() not in redacted
    assert redacted == ("http://cache.example/kds/vcek/v1/Milan/<" + chip_digest(CHIP)
                        + ">?blSPL=2&teeSPL=0&snpSPL=5&ucodeSPL=68")
    assert redact_url(TURIN_PATH).startswith("/vcek/v1/Turin/<chip-sha256:")
    assert "3b42092f69c656d3" not in redact_url(TURIN_PATH)


def test_redact_url_leaves_other_urls_alone():
    for url in (cert_chain_path(Product.GENOA), "https://kdsintf.amd.com/vlek/v1/Turin/crl",
                "http://127.0.0.1:1/whatever?x=1"):
        assert redact_url(url) == url


def test_chip_digest_of_turin_hwid_matches_full_chip_id():
    assert chip_digest(TURIN_CHIP[:8]) == chip_digest(TURIN_CHIP)
    assert chip_digest(CHIP) != chip_digest(TURIN_CHIP)
    assert len(chip_digest(CHIP)) == len("chip-sha256:") + 16


def test_join_url():
    assert join_url("http://h:1/", "/a") == "http://h:1/a"
    assert join_url("http://h:1/prefix", "/a") == "http://h:1/prefix/a"
    with pytest.raises(ValueError):
        join_url("http://h:1", "a")


def test_urls_module_does_not_import_requests():
    # CLI start-up time: naming a KDS URL must not pull in the HTTP stack.
    code = ("import sys, snpd.kds, snpd.kds.urls, snpd.emulator.kds_server; "
            "sys.exit('requests' in sys.modules or 'urllib3' in sys.modules)")
    subprocess.run([sys.executable, "-c", code], check=True)


# --------------------------------------------------------------- real vectors ---


def test_real_vcek_reports_give_parseable_urls(cases, case_dir):
    checked = 0
    for case in cases:
        if case.get("signer") != "VCEK" or case.get("expect") != "valid":
            continue
        report = parse_report((case_dir(case) / "report.bin").read_bytes())
        product = Product(case["product"])
        tcb = report.tcb("reported", product)
        path = vcek_path(product, report.chip_id, tcb)
        request = parse_path(path)
        assert request.hwid == report.chip_id[: product.hwid_length], case["id"]
        assert request.tcb_version() == tcb, case["id"]
        if product is Product.TURIN:
            assert len(path.split("/")[4].split("?")[0]) == 16, case["id"]
        checked += 1
    assert checked >= 3
