"""The host's certificate table: layout, GUID byte order, and a hostile host."""

from __future__ import annotations

import contextlib
import datetime
import struct
import uuid
from pathlib import Path
from typing import Any, Callable, List, Tuple

import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from hypothesis import given, settings
from hypothesis import strategies as st

from snpd.abi.certtable import (
    ARK_GUID,
    ASK_GUID,
    CRL_GUID,
    ENTRY_SIZE,
    EXTRA_PLATFORM_INFO_GUID,
    MAX_BUFFER_SIZE,
    MAX_ENTRIES,
    VCEK_GUID,
    VLEK_GUID,
    CertTableEntry,
    ExtraPlatformInfo,
    build_cert_table,
    parse_cert_table,
)
from snpd.abi.product import Product
from snpd.errors import CertificateFormatError, CertificatesUnavailable, CertTableError
from snpd.trust.certset import CertificateSet
from snpd.trust.x509 import build_crl, load_certificate, pem_blocks

CaseDir = Callable[[Any], Path]
UNKNOWN_GUID = uuid.UUID("11111111-2222-3333-4444-555555555555")


def entry(guid: uuid.UUID, offset: int, length: int) -> bytes:
    return struct.pack("<16sII", guid.bytes, offset, length)


def der(path: Path) -> bytes:
    data = path.read_bytes()
    return pem_blocks(data, "CERTIFICATE")[0] if data.startswith(b"-----") else data


@pytest.fixture
def vlek_table(case_dir: CaseDir) -> List[Tuple[uuid.UUID, bytes]]:
    d = case_dir("milan-v3-vlek")
    return [(ARK_GUID, (d / "ark.pem").read_bytes()), (ASK_GUID, (d / "asvk.pem").read_bytes()),
            (VLEK_GUID, (d / "vlek.der").read_bytes())]


# -- layout and round trip ------------------------------------------------------------


def test_round_trip_vlek_case(case_dir: CaseDir, vlek_table: List[Tuple[uuid.UUID, bytes]],
                              ) -> None:
    buf = build_cert_table(vlek_table)
    parsed = parse_cert_table(buf)
    assert [(e.guid, e.data) for e in parsed] == vlek_table
    assert [e.kind for e in parsed] == ["ark", "ask", "vlek"]
    certs = CertificateSet.from_table(parsed)
    d = case_dir("milan-v3-vlek")
    assert certs.asvk is not None and certs.ask is None  # ASK GUID, ASVK content
    assert certs.asvk.der == der(d / "asvk.pem")
    assert certs.vlek is not None and certs.vlek.der == (d / "vlek.der").read_bytes()
    assert certs.ark is not None and certs.ark.der == der(d / "ark.pem")


def test_round_trip_vcek_case_padded_to_pages(case_dir: CaseDir) -> None:
    d = case_dir("genoa-v5-vcek")
    pairs = [(str(ARK_GUID), der(d / "ark.pem")), (str(ASK_GUID), der(d / "ask.pem")),
             (str(VCEK_GUID), (d / "vcek.der").read_bytes())]
    buf = build_cert_table(pairs, pad_to=4096)
    assert len(buf) % 4096 == 0 and len(buf) <= 16384
    parsed = parse_cert_table(buf)
    assert [(str(e.guid), e.data) for e in parsed] == pairs
    certs = CertificateSet.from_table(parsed)
    assert certs.ask is not None and certs.asvk is None and certs.vcek is not None
    assert certs.ask.subject.common_name == "SEV-Genoa"


def test_layout_is_table_terminator_then_blobs() -> None:
    buf = build_cert_table([(VCEK_GUID, b"abc"), (ARK_GUID, b"de")])
    assert buf[:24] == VCEK_GUID.bytes + struct.pack("<II", 72, 3)
    assert buf[24:48] == ARK_GUID.bytes + struct.pack("<II", 75, 2)
    assert buf[48:72] == bytes(24)
    assert buf[72:] == b"abcde"


def test_guid_byte_order_is_rfc4122() -> None:
    buf = build_cert_table([(ARK_GUID, b"x")])
    assert buf[:16].hex() == "c0b406a4a803495297433fb6014cd0ae"
    assert buf[:16] != ARK_GUID.bytes_le  # not the mixed-endian EFI form a406b4c0…
    assert parse_cert_table(buf)[0].guid == ARK_GUID


def test_guid_constants_match_the_spec() -> None:
    wire = {ARK_GUID: "c0b406a4a803495297433fb6014cd0ae",
            ASK_GUID: "4ab7b379bbac4fe4a02f05aef327c782",
            VCEK_GUID: "63da758de6644564adc5f4b93be8accd",
            VLEK_GUID: "a8074bc2a25a483eaae639c045a0b8a1",
            CRL_GUID: "92f81bc358114d3d97ffd19f88dc67ea",
            EXTRA_PLATFORM_INFO_GUID: "ecae0c0f950243b1afa20ae2e0d565b6"}
    for guid, hexed in wire.items():
        assert guid.bytes.hex() == hexed


@pytest.mark.parametrize("buf", [b"", bytes(24), bytes(4096), bytes(16384)])
def test_empty_tables(buf: bytes) -> None:
    assert parse_cert_table(buf) == ()


def test_build_empty_table() -> None:
    assert build_cert_table([]) == bytes(24)
    assert build_cert_table([], pad_to=4096) == bytes(4096)


def test_unknown_guid_kept_and_skipped_by_from_table(
        vlek_table: List[Tuple[uuid.UUID, bytes]]) -> None:
    parsed = parse_cert_table(build_cert_table([(UNKNOWN_GUID, b"endorsement"), *vlek_table]))
    assert parsed[0] == CertTableEntry(UNKNOWN_GUID, b"endorsement")
    assert parsed[0].kind is None
    assert CertificateSet.from_table(parsed).vlek is not None


def test_crl_entry_is_loaded_as_crl(case_dir: CaseDir,
                                    vlek_table: List[Tuple[uuid.UUID, bytes]]) -> None:
    ark = load_certificate((case_dir("milan-v3-vlek") / "ark.pem").read_bytes())
    now = datetime.datetime(2026, 1, 1, tzinfo=datetime.timezone.utc)
    crl = build_crl(issuer=ark.subject, this_update=now,
                    next_update=now + datetime.timedelta(days=7), revoked=[(7, now)],
                    signing_key=ec.generate_private_key(ec.SECP384R1()))
    for blob in (crl.der, crl.to_pem().encode()):
        parsed = parse_cert_table(build_cert_table([*vlek_table, (CRL_GUID, blob)]))
        assert parsed[-1].kind == "crl"
        certs = CertificateSet.from_table(parsed)
        assert certs.crl is not None and certs.crl.der == crl.der
        assert certs.crl.revoked_serials == frozenset({7})


def test_extra_platform_info_entry() -> None:
    info = ExtraPlatformInfo.from_cpuid_eax(0x00A10F11 | 0xF000F000)
    assert info.cpuid_eax == 0x00A10F11 and info.product is Product.GENOA
    payload = info.to_bytes()
    assert payload == struct.pack("<II", 8, 0x00A10F11)
    parsed = parse_cert_table(build_cert_table([(EXTRA_PLATFORM_INFO_GUID, payload)]))
    assert parsed[0].kind == "extra_platform_info"
    assert ExtraPlatformInfo.from_bytes(parsed[0].data) == info
    assert CertificateSet.from_table(parsed) == CertificateSet()
    assert ExtraPlatformInfo.from_bytes(struct.pack("<II4x", 12, 0x00A00F11)).product \
        is Product.MILAN


@pytest.mark.parametrize("payload, problem", [
    (b"\x08\x00\x00\x00", "has 4 bytes"),
    (struct.pack("<II", 4, 0x00A10F11), "declares size 4"),
    (struct.pack("<II", 16, 0x00A10F11), "declares size 16"),
])
def test_extra_platform_info_malformed(payload: bytes, problem: str) -> None:
    with pytest.raises(CertTableError, match=problem):
        ExtraPlatformInfo.from_bytes(payload)


def test_zero_length_entry_is_dropped() -> None:
    buf = entry(VCEK_GUID, 72, 0) + entry(ARK_GUID, 72, 3) + bytes(24) + b"ark"
    assert parse_cert_table(buf) == (CertTableEntry(ARK_GUID, b"ark"),)


def test_zero_length_entry_is_still_bounds_checked() -> None:
    with pytest.raises(CertTableError, match=r"entry 0 .*points into the table"):
        parse_cert_table(entry(VCEK_GUID, 0, 0) + bytes(24))


def test_bytes_after_the_last_blob_are_ignored() -> None:
    buf = entry(VCEK_GUID, 48, 2) + bytes(24) + b"ok" + b"\xff" * 100
    assert parse_cert_table(buf) == (CertTableEntry(VCEK_GUID, b"ok"),)


def test_build_rejects_what_cannot_be_parsed_back() -> None:
    with pytest.raises(Exception, match="null GUID"):
        build_cert_table([(uuid.UUID(int=0), b"x")])
    with pytest.raises(Exception, match="pad_to"):
        build_cert_table([], pad_to=0)


# -- the hostile host ------------------------------------------------------------------


def test_overlapping_data_regions_are_accepted() -> None:
    buf = entry(ARK_GUID, 72, 6) + entry(UNKNOWN_GUID, 75, 6) + bytes(24) + b"abcdefghi"
    parsed = parse_cert_table(buf)
    assert [e.data for e in parsed] == [b"abcdef", b"defghi"]


def test_offset_pointing_into_the_table() -> None:
    # Entry 1 points at its own bytes: the table is 72 bytes with its terminator.
    buf = entry(ARK_GUID, 72, 3) + entry(VCEK_GUID, 30, 10) + bytes(24) + b"ark"
    with pytest.raises(CertTableError,
                       match=r"entry 1 \(vcek\): offset 30, length 10 points into the table "
                             r"itself \(72 bytes.*75-byte buffer"):
        parse_cert_table(buf)


def test_offset_at_the_terminator() -> None:
    with pytest.raises(CertTableError, match="points into the table"):
        parse_cert_table(entry(ARK_GUID, 24, 24) + bytes(24))


def test_offset_out_of_range() -> None:
    with pytest.raises(CertTableError,
                       match=r"entry 0 \(ark\): offset 5000, length 1: offset is past the "
                             r"end of the 4096-byte buffer"):
        parse_cert_table((entry(ARK_GUID, 5000, 1) + bytes(24)).ljust(4096, b"\0"))


def test_length_out_of_range() -> None:
    with pytest.raises(CertTableError,
                       match=r"entry 0 \(vcek\): offset 48, length 100: offset \+ length = "
                             r"148 runs past the end of the 60-byte buffer"):
        parse_cert_table(entry(VCEK_GUID, 48, 100) + bytes(24) + b"x" * 12)


def test_offset_plus_length_overflowing_32_bits() -> None:
    # 0xFFFFFF00 + 0x200 wraps to 0x100 in u32 arithmetic, which would "fit".
    buf = (entry(VCEK_GUID, 0xFFFFFF00, 0x200) + bytes(24)).ljust(4096, b"\0")
    with pytest.raises(CertTableError, match="offset 4294967040, length 512"):
        parse_cert_table(buf)


def test_huge_length() -> None:
    buf = (entry(ASK_GUID, 48, 0xFFFFFFFF) + bytes(24)).ljust(16384, b"\0")
    with pytest.raises(CertTableError, match=r"length 4294967295: offset \+ length"):
        parse_cert_table(buf)


def test_unterminated_table() -> None:
    buf = entry(ARK_GUID, 48, 1) + entry(ASK_GUID, 48, 1)
    with pytest.raises(CertTableError,
                       match="no terminator: the buffer ends at entry 2 in a buffer of 48"):
        parse_cert_table(buf)


def test_buffer_ends_mid_entry() -> None:
    buf = entry(ARK_GUID, 48, 1) + bytes(10)
    with pytest.raises(CertTableError,
                       match=r"ends mid-entry \(10 of 24 bytes left\) at entry 1"):
        parse_cert_table(buf)


@pytest.mark.parametrize("size", [1, 23])
def test_short_nonempty_buffer_is_unterminated(size: int) -> None:
    with pytest.raises(CertTableError, match="no terminator"):
        parse_cert_table(bytes(size))


def test_ten_thousand_entries() -> None:
    blob_offset = 10_001 * ENTRY_SIZE
    buf = b"".join(entry(UNKNOWN_GUID, blob_offset, 1) for _ in range(10_000))
    buf += bytes(24) + b"x"
    with pytest.raises(CertTableError, match=f"{len(buf)} bytes exceeds the {MAX_BUFFER_SIZE}"):
        parse_cert_table(buf)


def test_too_many_entries_within_the_size_cap() -> None:
    count = MAX_ENTRIES + 1
    buf = b"".join(entry(UNKNOWN_GUID, (count + 1) * 24, 1) for _ in range(count))
    buf += bytes(24) + b"x"
    assert len(buf) < MAX_BUFFER_SIZE
    with pytest.raises(CertTableError, match=f"more than {MAX_ENTRIES} entries"):
        parse_cert_table(buf)


def test_max_entries_is_accepted() -> None:
    buf = b"".join(entry(UNKNOWN_GUID, (MAX_ENTRIES + 1) * 24, 1) for _ in range(MAX_ENTRIES))
    assert len(parse_cert_table(buf + bytes(24) + b"x")) == MAX_ENTRIES


def test_parser_stops_at_the_first_all_zero_entry(
        case_dir: CaseDir, vlek_table: List[Tuple[uuid.UUID, bytes]]) -> None:
    """go-sev-guest's bug: an ASVK after an all-zero entry is not part of the table."""
    asvk = vlek_table[1][1]
    vlek = vlek_table[2][1]
    data_at = 3 * ENTRY_SIZE
    buf = (entry(VLEK_GUID, data_at, len(vlek)) + bytes(24)
           + entry(ASK_GUID, data_at + len(vlek), len(asvk)) + vlek + asvk)
    parsed = parse_cert_table(buf)
    assert [e.kind for e in parsed] == ["vlek"]
    certs = CertificateSet.from_table(parsed)
    assert certs.asvk is None and certs.vlek is not None


def test_null_guid_with_offset_is_rejected() -> None:
    buf = entry(uuid.UUID(int=0), 72, 1) + entry(ARK_GUID, 72, 1) + bytes(24) + b"a"
    with pytest.raises(CertTableError, match="entry 0 has a null GUID but offset 72, length 1"):
        parse_cert_table(buf)


def test_garbage_certificate_at_a_valid_offset() -> None:
    parsed = parse_cert_table(build_cert_table([(VCEK_GUID, b"\x30\x82garbage")]))
    assert parsed[0].data == b"\x30\x82garbage"
    with pytest.raises(CertificateFormatError, match="host certificate table vcek entry"):
        CertificateSet.from_table(parsed)


@pytest.mark.parametrize("guid", [ARK_GUID, ASK_GUID, VLEK_GUID, CRL_GUID])
def test_garbage_in_each_kind(guid: uuid.UUID) -> None:
    kind = CertTableEntry(guid, b"").kind
    for junk in (b"junk", b"-----BEGIN CERTIFICATE-----\n!!\n-----END CERTIFICATE-----\n"):
        with pytest.raises(CertificateFormatError, match=f"table {kind} entry"):
            CertificateSet.from_table([CertTableEntry(guid, junk)])


def test_certificate_under_the_wrong_guid(vlek_table: List[Tuple[uuid.UUID, bytes]]) -> None:
    vlek = vlek_table[2][1]
    with pytest.raises(CertificateFormatError, match="table vcek entry holds a vlek"):
        CertificateSet.from_table([CertTableEntry(VCEK_GUID, vlek)])
    ark = vlek_table[0][1]
    with pytest.raises(CertificateFormatError, match="table ask entry holds a ark"):
        CertificateSet.from_table([CertTableEntry(ASK_GUID, ark)])


def test_cert_table_error_is_certificates_unavailable() -> None:
    assert issubclass(CertTableError, CertificatesUnavailable)
    assert CertTableError.dbus_name().endswith(".CertificatesUnavailable")


# -- properties: only CertTableError ever escapes ---------------------------------------


def _parse_or_typed_error(buf: bytes) -> None:
    try:
        entries = parse_cert_table(buf)
    except CertTableError:
        return
    for e in entries:
        assert e.data and len(e.data) <= len(buf)


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=600))
def test_arbitrary_bytes(buf: bytes) -> None:
    _parse_or_typed_error(buf)


_VALID = build_cert_table([(ARK_GUID, b"A" * 40), (ASK_GUID, b"B" * 30),
                           (UNKNOWN_GUID, b"C" * 5), (VCEK_GUID, b"D" * 20)])


@settings(max_examples=600, deadline=None)
@given(st.lists(st.tuples(st.integers(0, len(_VALID) + 8), st.integers(0, 255)), max_size=6),
       st.integers(0, len(_VALID) + 30))
def test_mutated_valid_tables(mutations: List[Tuple[int, int]], cut: int) -> None:
    buf = bytearray(_VALID)
    for pos, value in mutations:
        if pos < len(buf):
            buf[pos] = value
        else:
            buf.append(value)
    _parse_or_typed_error(bytes(buf[:cut]))


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.sampled_from([ARK_GUID, ASK_GUID, VCEK_GUID, UNKNOWN_GUID]),
                          st.sampled_from([0, 1, 24, 48, 96, 0x7FFFFFFF, 0xFFFFFFFF]),
                          st.sampled_from([0, 1, 5, 0x80000000, 0xFFFFFFFF])), max_size=5),
       st.binary(max_size=64), st.booleans())
def test_hostile_entries(fields: List[Tuple[uuid.UUID, int, int]], tail: bytes,
                         terminate: bool) -> None:
    buf = b"".join(entry(*f) for f in fields) + (bytes(24) if terminate else b"") + tail
    _parse_or_typed_error(buf)


_PEM_HEAD = b"-----BEGIN CERTIFICATE-----\n"
_PEM_TAIL = b"\n-----END CERTIFICATE-----\n"


@settings(max_examples=300, deadline=None)
@given(st.sampled_from([ARK_GUID, ASK_GUID, VCEK_GUID, VLEK_GUID, CRL_GUID]),
       st.one_of(st.binary(max_size=300),
                 st.binary(max_size=300).map(lambda b: b"\x30\x82" + b),
                 st.binary(max_size=200).map(lambda b: _PEM_HEAD + b + _PEM_TAIL)))
def test_from_table_raises_only_certificate_format_error(guid: uuid.UUID, data: bytes) -> None:
    with contextlib.suppress(CertificateFormatError):
        CertificateSet.from_table([CertTableEntry(guid, data)])
