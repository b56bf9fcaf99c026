"""The in-tree TPM 2.0 marshaller (snpd/abi/tpm2_commands.py) and its thin client
(snpd/device/tpm.py): golden bytes computed by hand from TCG TPM 2.0 Part 2/3, every
response parser against truncation and trailing bytes, response codes in words, the
retry policy with an injected sleep, and round trips against a real swtpm, whose quote
snpd's own Azure verifier must accept."""

from __future__ import annotations

import hashlib
import os
import socket
import struct
from pathlib import Path
from typing import Any, Callable, Iterator, List, Sequence, Tuple

import pytest
from harness.swtpm import SWTPM_NV_BUFFER_MAX, SWTPM_NV_INDEX_MAX  # type: ignore[import-not-found]

from snpd.abi import tpm
from snpd.abi import tpm2_commands as tc
from snpd.device.tpm import DeviceChannel, SocketChannel, Tpm, open_tpm
from snpd.errors import (
    Busy,
    DeviceError,
    DeviceUnavailable,
    EvidenceFormatError,
    Timeout,
    TpmCommandFormatError,
    TpmError,
)
from snpd.trust.azure import pcr_digest_check, quote_signature_check
from snpd.trust.result import Status

PW_SESSION = bytes.fromhex("40000009" "0000" "01" "0000")


# ---------------------------------------------------------------- golden commands

def test_nv_read_public_command() -> None:
    assert tc.nv_read_public(tc.AZURE_HCL_REPORT_INDEX) == bytes.fromhex(
        "8001" "0000000e" "00000169" "01400001")


def test_startup_command() -> None:
    assert tc.startup() == bytes.fromhex("8001" "0000000c" "00000144" "0000")
    assert tc.startup(clear=False)[-2:] == b"\x00\x01"


def test_nv_read_command_authorizes_with_the_index() -> None:
    assert tc.nv_read(tc.AZURE_HCL_REPORT_INDEX, 1024, 512) == bytes.fromhex(
        "8002" "00000023" "0000014e" "01400001" "01400001" "00000009") + PW_SESSION \
        + bytes.fromhex("0400" "0200")


def test_nv_write_command() -> None:
    assert tc.nv_write(tc.AZURE_USER_DATA_INDEX, b"\xab" * 3, 7) == bytes.fromhex(
        "8002" "00000026" "00000137" "01400002" "01400002" "00000009") + PW_SESSION \
        + bytes.fromhex("0003" "ababab" "0007")


def test_quote_command() -> None:
    nonce = bytes(range(32))
    assert tc.quote(tc.AZURE_AK_HANDLE, nonce, range(24)) == bytes.fromhex(
        "8002" "00000049" "00000158" "81000003" "00000009") + PW_SESSION \
        + b"\x00\x20" + nonce + bytes.fromhex("0010" "00000001" "000b" "03" "ffffff")


def test_pcr_selection_bitmaps() -> None:
    assert tc.pcr_read([0, 9, 23])[10:] == bytes.fromhex("00000001" "000b" "03" "010280")
    assert tc.pcr_read([])[10:] == bytes.fromhex("00000001" "000b" "03" "000000")
    assert tc.pcr_read([31], tpm.TPM_ALG_SHA1)[10:] == bytes.fromhex(
        "00000001" "0004" "04" "00000080")
    with pytest.raises(ValueError):
        tc.pcr_read([32])


def test_ak_template() -> None:
    assert tc.ak_template() == bytes.fromhex(
        "0001" "000b" "00050072" "0000" "0010" "0014" "000b" "0800" "00000000" "0000")


def test_create_primary_and_evict_and_flush_commands() -> None:
    template = tc.ak_template()
    assert tc.create_primary(tc.TPM_RH_OWNER, template) == bytes.fromhex(
        "8002") + struct.pack(">I", 10 + 4 + 4 + 9 + 6 + 2 + len(template) + 2 + 4) \
        + bytes.fromhex("00000131" "40000001" "00000009") + PW_SESSION \
        + bytes.fromhex("0004" "0000" "0000") + struct.pack(">H", len(template)) + template \
        + bytes.fromhex("0000" "00000000")
    assert tc.evict_control(0x80000000, tc.AZURE_AK_HANDLE) == bytes.fromhex(
        "8002" "00000023" "00000120" "40000001" "80000000" "00000009") + PW_SESSION \
        + bytes.fromhex("81000003")
    assert tc.flush_context(0x80000000) == bytes.fromhex("8001" "0000000e" "00000165"
                                                         "80000000")


def test_nv_define_space_command() -> None:
    assert tc.nv_define_space(0x01400001, 2048, 0x2060006) == bytes.fromhex(
        "8002" "0000002d" "0000012a" "40000001" "00000009") + PW_SESSION + bytes.fromhex(
        "0000" "000e" "01400001" "000b" "02060006" "0000" "0800")
    assert tc.nv_undefine_space(0x01400001) == bytes.fromhex(
        "8002" "0000001f" "00000122" "40000001" "01400001" "00000009") + PW_SESSION


def test_oversized_arguments_are_refused() -> None:
    with pytest.raises(ValueError):
        tc.nv_write(1, bytes(1025))
    with pytest.raises(ValueError):
        tc.quote(1, bytes(65), [0])


# ---------------------------------------------------------------- nv_write_target

def test_nv_write_target() -> None:
    assert tc.nv_write_target(tc.nv_write(tc.AZURE_USER_DATA_INDEX, b"u" * 64, 0)) == (
        tc.AZURE_USER_DATA_INDEX, b"u" * 64, 0)
    assert tc.nv_write_target(tc.nv_write(5, b"x", 9, auth_handle=tc.TPM_RH_OWNER)) == (
        5, b"x", 9)
    assert tc.nv_write_target(tc.quote(1, b"", [0])) is None
    assert tc.nv_write_target(tc.startup()) is None
    assert tc.command_header(tc.startup()) == (tc.TPM_ST_NO_SESSIONS, 12, tc.TPM_CC_STARTUP)


def test_nv_write_target_rejects_malformed_commands() -> None:
    command = tc.nv_write(tc.AZURE_USER_DATA_INDEX, b"u" * 64)
    for n in range(len(command)):
        with pytest.raises(TpmCommandFormatError):
            tc.nv_write_target(command[:n])
        if n >= 10:
            with pytest.raises(TpmCommandFormatError):
                tc.nv_write_target(_resize(command[:n]))
    with pytest.raises(TpmCommandFormatError, match="after the structure"):
        tc.nv_write_target(_resize(command + b"\0"))
    with pytest.raises(TpmCommandFormatError, match="tag"):
        tc.nv_write_target(b"\x80\x01" + command[2:])


# ---------------------------------------------------------------- responses

def _resize(data: bytes) -> bytes:
    """``data`` with its size field made to agree with its length."""
    return data[:2] + struct.pack(">I", len(data)) + data[6:]


def _ok(params: bytes = b"", *, handles: bytes = b"", sessions: bool = True) -> bytes:
    if sessions:
        body = handles + struct.pack(">I", len(params)) + params + bytes.fromhex("0000010000")
    else:
        body = handles + params
    tag = tc.TPM_ST_SESSIONS if sessions else tc.TPM_ST_NO_SESSIONS
    return struct.pack(">HII", tag, 10 + len(body), 0) + body


def _rc(rc: int) -> bytes:
    return struct.pack(">HII", tc.TPM_ST_NO_SESSIONS, 10, rc)


def _b(data: bytes) -> bytes:
    return struct.pack(">H", len(data)) + data


MODULUS = (1 << 2047) | 0x1234567  # any odd 2048-bit number will do for parsing
PUBLIC = tc.ak_template()[:-2] + _b(MODULUS.to_bytes(256, "big"))
NAME = b"\x00\x0b" + hashlib.sha256(PUBLIC).digest()
NV_PUBLIC = _b(bytes.fromhex("01400001" "000b" "22060006" "0000" "0a28"))
ATTEST = (bytes.fromhex("ff544347" "8018") + _b(NAME) + _b(b"n" * 32) + bytes(8 + 4 + 4)
          + b"\x01" + bytes(8) + bytes.fromhex("00000001" "000b" "03" "ffffff")
          + _b(bytes(32)))
SIGNATURE = bytes.fromhex("0014" "000b") + _b(b"\x5a" * 256)
PCR_DIGESTS = b"".join(_b(bytes([i]) * 32) for i in range(8))

RESPONSES: List[Tuple[str, Callable[[bytes], Any], bytes]] = [
    ("startup", tc.parse_startup, _ok(sessions=False)),
    ("nv_read_public", tc.parse_nv_read_public, _ok(NV_PUBLIC + _b(NAME), sessions=False)),
    ("nv_read", tc.parse_nv_read, _ok(_b(b"abcd"))),
    ("nv_write", tc.parse_nv_write, _ok()),
    ("nv_define_space", tc.parse_nv_define_space, _ok()),
    ("nv_undefine_space", tc.parse_nv_undefine_space, _ok()),
    ("create_primary", tc.parse_create_primary, _ok(
        _b(PUBLIC) + _b(b"creation data") + _b(bytes(32))
        + bytes.fromhex("8021" "40000001") + _b(bytes(32)) + _b(NAME),
        handles=bytes.fromhex("80000000"))),
    ("read_public", tc.parse_read_public, _ok(_b(PUBLIC) + _b(NAME) + _b(NAME),
                                              sessions=False)),
    ("evict_control", tc.parse_evict_control, _ok()),
    ("flush_context", tc.parse_flush_context, _ok(sessions=False)),
    ("quote", tc.parse_quote, _ok(_b(ATTEST) + SIGNATURE)),
    ("pcr_read", tc.parse_pcr_read, _ok(bytes.fromhex("00000014" "00000001" "000b" "03"
                                                      "ff0000") + struct.pack(">I", 8)
                                        + PCR_DIGESTS, sessions=False)),
    ("get_tpm_property", lambda r: tc.parse_get_tpm_property(r, tc.TPM_PT_NV_BUFFER_MAX),
     _ok(bytes.fromhex("00" "00000006" "00000001" "0000012c" "00000400"), sessions=False)),
]
IDS = [name for name, _, _ in RESPONSES]


def test_the_canned_responses_parse() -> None:
    parsed = {name: parse(data) for name, parse, data in RESPONSES}
    assert parsed["nv_read_public"] == tc.NvPublic(0x01400001, tc.TPM_ALG_SHA256, 0x22060006,
                                                   b"", 2600, NAME)
    assert parsed["nv_read"] == b"abcd"
    handle, public = parsed["create_primary"]
    assert handle == 0x80000000 and public == parsed["read_public"]
    assert (public.rsa_n, public.rsa_e, public.key_bits) == (MODULUS, 65537, 2048)
    assert (public.scheme, public.scheme_hash) == (tc.TPM_ALG_RSASSA, tc.TPM_ALG_SHA256)
    assert public.attributes == tc.AK_ATTRIBUTES and public.raw == PUBLIC
    assert public.jwk().n == MODULUS
    attest, signature = parsed["quote"]
    assert tpm.Quote.from_bytes(attest).extra_data == b"n" * 32
    assert tpm.Signature.from_bytes(signature).signature == b"\x5a" * 256
    counter, indices, digests = parsed["pcr_read"]
    assert (counter, indices) == (20, tuple(range(8))) and digests[7] == b"\x07" * 32
    assert parsed["get_tpm_property"] == 1024


@pytest.mark.parametrize("parse, data", [(p, d) for _, p, d in RESPONSES], ids=IDS)
def test_every_truncation_is_refused(parse: Callable[[bytes], Any], data: bytes) -> None:
    for n in range(len(data)):
        with pytest.raises(EvidenceFormatError):
            parse(data[:n])
        if n >= 6:  # and with a size field that agrees: the fields themselves run short
            with pytest.raises(EvidenceFormatError):
                parse(_resize(data[:n]))


@pytest.mark.parametrize("parse, data", [(p, d) for _, p, d in RESPONSES], ids=IDS)
def test_trailing_bytes_are_refused(parse: Callable[[bytes], Any], data: bytes) -> None:
    with pytest.raises(EvidenceFormatError, match="responseSize"):
        parse(data + b"\0")
    with pytest.raises(EvidenceFormatError, match="after the structure"):
        parse(_resize(data + b"\0"))


def test_oversized_fields_and_responses_are_refused() -> None:
    with pytest.raises(EvidenceFormatError, match="data is 1025 bytes, at most 1024"):
        tc.parse_nv_read(_ok(_b(bytes(1025))))
    with pytest.raises(EvidenceFormatError, match="at most 4096"):
        tc.parse_nv_read(_ok(_b(bytes(1024))) + bytes(4096))
    with pytest.raises(EvidenceFormatError, match="tag"):
        tc.parse_nv_read(_ok(_b(b"x"), sessions=False))
    with pytest.raises(EvidenceFormatError, match="pcrValues.count is 9"):
        tc.parse_pcr_read(_ok(bytes.fromhex("00000000" "00000000" "00000009"),
                              sessions=False))
    with pytest.raises(EvidenceFormatError, match="2 values for 0 selected"):
        tc.parse_pcr_read(_ok(bytes.fromhex("00000000" "00000000" "00000002" "0000" "0000"),
                              sessions=False))
    bad_name = _ok(_b(PUBLIC) + _b(b"\x00\x0b" + bytes(32)) + _b(NAME), sessions=False)
    with pytest.raises(EvidenceFormatError, match="name"):
        tc.parse_read_public(bad_name)


# ---------------------------------------------------------------- response codes

@pytest.mark.parametrize("rc, words", [
    (0x18B, "TPM_RC_HANDLE (handle 1): the handle is not correct"),
    (0x28B, "TPM_RC_HANDLE (handle 2)"),
    (0x2D5, "TPM_RC_SIZE (parameter 2): structure is the wrong size"),
    (0x9A2, "TPM_RC_BAD_AUTH (session 1)"),
    (0x084, "TPM_RC_VALUE: value is out of range"),
    (0x922, "TPM_RC_RETRY: the TPM was not able to start the command"),
    (0x14A, "TPM_RC_NV_UNINITIALIZED"),
    (0x101, "TPM_RC_FAILURE: the TPM is in failure mode"),
    (0x17F, "unknown TPM 2.0 error 0x7F"),
    (0x47F, "vendor-defined code 0x7F"),
    (0x00A, "a TPM 1.2 response code"),
])
def test_response_codes_in_words(rc: int, words: str) -> None:
    assert tc.describe_rc(rc).startswith(words)


def test_an_error_response_raises_tpm_error() -> None:
    with pytest.raises(TpmError) as caught:
        tc.parse_nv_read(_rc(0x18B))
    error = caught.value
    assert str(error) == ("TPM2_NV_Read failed: TPM_RC_HANDLE (handle 1): the handle is not "
                          "correct for the use (rc 0x18B)")
    assert (error.rc, error.command, error.code) == (0x18B, "NV_Read", 0x08B)
    assert error.handle_missing and not error.retryable
    assert isinstance(error, DeviceError) and error.kind == "DeviceError"
    for rc in (tc.TPM_RC_RETRY, tc.TPM_RC_YIELDED, tc.TPM_RC_TESTING, tc.TPM_RC_NV_RATE):
        with pytest.raises(TpmError) as caught:
            tc.parse_quote(_rc(rc))
        assert caught.value.retryable and not caught.value.handle_missing
    with pytest.raises(TpmError) as caught:
        tc.parse_quote(_rc(0x184))
    assert not caught.value.handle_missing
    with pytest.raises(EvidenceFormatError):  # an error response is the header alone
        tc.parse_quote(_resize(_rc(0x184) + b"\0"))


def test_startup_accepts_an_already_started_tpm() -> None:
    tc.parse_startup(_rc(tc.TPM_RC_INITIALIZE))
    with pytest.raises(TpmError):
        tc.parse_startup(_rc(0x101))


# ---------------------------------------------------------------- retry policy

class FakeChannel:
    """Answers each command with the next of ``answers`` (the last one repeats)."""

    def __init__(self, answers: Sequence[bytes]) -> None:
        self.answers = list(answers)
        self.commands: List[bytes] = []
        self.closed = False

    def transact(self, command: bytes) -> bytes:
        self.commands.append(command)
        return self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]

    def close(self) -> None:
        self.closed = True


def _client(answers: Sequence[bytes]) -> Tuple[Tpm, FakeChannel, List[float]]:
    channel, slept = FakeChannel(answers), []  # type: Tuple[FakeChannel, List[float]]
    return Tpm(channel, sleep=slept.append), channel, slept


def test_retry_then_success() -> None:
    client, channel, slept = _client([_rc(tc.TPM_RC_RETRY), _rc(tc.TPM_RC_RETRY),
                                      _ok(_b(ATTEST) + SIGNATURE)])
    assert client.quote(tc.AZURE_AK_HANDLE, b"n" * 32, range(24)) == (ATTEST, SIGNATURE)
    assert len(channel.commands) == 3 and len(set(channel.commands)) == 1
    assert len(slept) == 2


def test_retry_forever_is_busy() -> None:
    client, channel, slept = _client([_rc(tc.TPM_RC_RETRY)])
    with pytest.raises(Busy, match=r"the TPM stayed busy \(TPM_RC_RETRY\) after 8 tries of "
                                   "TPM2_Quote") as caught:
        client.quote(tc.AZURE_AK_HANDLE, b"", [0])
    assert isinstance(caught.value.__cause__, TpmError)
    assert len(channel.commands) == 8 and len(slept) == 7


def test_an_error_that_is_not_a_warning_is_not_retried() -> None:
    client, channel, slept = _client([_rc(0x101)])
    with pytest.raises(TpmError, match="FAILURE"):
        client.startup()
    assert len(channel.commands) == 1 and slept == []


def test_pcr_values_start_over_when_the_counter_moves() -> None:
    def answer(counter: int, first: int) -> bytes:
        bitmap = (0xFF << first).to_bytes(4, "little")[:3]
        return _ok(struct.pack(">II", counter, 1) + b"\x00\x0b\x03" + bitmap
                   + struct.pack(">I", 8) + b"".join(_b(bytes([first + i]) * 32)
                                                     for i in range(8)), sessions=False)
    client, channel, _ = _client([answer(1, 0), answer(2, 8), answer(2, 0), answer(2, 8),
                                  answer(2, 16)])
    values = client.pcr_values(range(24))
    assert values == [bytes([i]) * 32 for i in range(24)] and len(channel.commands) == 5
    client, _, _ = _client([answer(1, 0), answer(2, 8), answer(3, 0), answer(4, 8),
                            answer(5, 0), answer(6, 8), answer(7, 0), answer(8, 8)])
    with pytest.raises(Busy, match="kept changing"):
        client.pcr_values(range(24))


def test_an_unallocated_bank_is_a_device_error() -> None:
    empty = _ok(bytes.fromhex("00000001" "00000000" "00000000"), sessions=False)
    client, _, _ = _client([empty])
    with pytest.raises(DeviceError, match="is the bank allocated"):
        client.pcr_values([0], tpm.TPM_ALG_SHA384)


# ---------------------------------------------------------------- channels

def test_device_channel_moves_whole_messages() -> None:
    ours, theirs = socket.socketpair()
    with ours, theirs:
        theirs.sendall(_ok(sessions=False))
        channel = DeviceChannel("/dev/tpmrm0", os.dup(ours.fileno()))
        assert channel.transact(tc.startup()) == _ok(sessions=False)
        assert theirs.recv(100) == tc.startup()
        channel.close()
        channel.close()
        with pytest.raises(DeviceError, match="closed"):
            channel.transact(tc.startup())


def test_socket_channel_closed_mid_response() -> None:
    ours, theirs = socket.socketpair()
    with theirs:
        theirs.sendall(_ok(_b(b"abcd"))[:12])
        theirs.shutdown(socket.SHUT_WR)
        channel = SocketChannel("/run/tpm.sock", ours)
        with pytest.raises(DeviceError, match="closed the connection in the middle"):
            channel.transact(tc.nv_read(1, 4))
        channel.close()


def test_socket_channel_refuses_an_absurd_size() -> None:
    ours, theirs = socket.socketpair()
    with theirs:
        theirs.sendall(struct.pack(">HII", 0x8001, 5000, 0))
        channel = SocketChannel("/run/tpm.sock", ours)
        with pytest.raises(EvidenceFormatError, match="responseSize is 5000"):
            channel.transact(tc.startup())
        channel.close()


def test_socket_channel_timeout() -> None:
    ours, theirs = socket.socketpair()
    with theirs:
        ours.settimeout(0.001)
        channel = SocketChannel("/run/tpm.sock", ours)
        with pytest.raises(Timeout, match="did not answer"):
            channel.transact(tc.startup())
        channel.close()


def test_no_tpm_is_unavailable(tmp_path: Path) -> None:
    with pytest.raises(DeviceUnavailable, match=r"no TPM at .*tpmrm0 \(No such file or "
                                                r"directory\); is this an Azure "
                                                r"confidential VM\?"):
        open_tpm(str(tmp_path / "tpmrm0"))
    with pytest.raises(DeviceUnavailable, match="no TPM at unix:.*; is the TPM emulator"):
        open_tpm(f"unix:{tmp_path}/absent.sock")
    listening = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listening.bind(str(tmp_path / "stale.sock"))
    listening.close()  # a socket file nobody listens on: refused
    with pytest.raises(DeviceUnavailable, match="Connection refused"):
        open_tpm(f"unix:{tmp_path}/stale.sock")


# ---------------------------------------------------------------- against swtpm

@pytest.fixture
def client(swtpm: Any) -> Iterator[Tpm]:
    with Tpm(open_tpm(swtpm.spec, timeout=30.0)) as tpm_client:
        tpm_client.startup()  # swtpm ran Startup(CLEAR) itself: TPM_RC_INITIALIZE is fine
        yield tpm_client


def test_swtpm_limits(client: Tpm) -> None:
    assert client.nv_buffer_max() == SWTPM_NV_BUFFER_MAX == tc.MAX_NV_BUFFER
    found = {prop: client.tpm_property(prop)
             for prop in (tc.TPM_PT_NV_INDEX_MAX, tc.TPM_PT_FIXED + 30, tc.TPM_PT_FIXED + 31)}
    assert found == {tc.TPM_PT_NV_INDEX_MAX: SWTPM_NV_INDEX_MAX,
                     tc.TPM_PT_FIXED + 30: tc.MAX_COMMAND,
                     tc.TPM_PT_FIXED + 31: tc.MAX_RESPONSE}


def test_swtpm_nv_round_trip(client: Tpm) -> None:
    index = tc.AZURE_HCL_REPORT_INDEX
    with pytest.raises(TpmError) as caught:  # Azure's 2600 bytes exceed libtpms's 2048
        client.define_space(index, 2600)
    assert caught.value.rc == 0x2D5  # TPM_RC_SIZE, parameter 2 (publicInfo)
    client.define_space(index, SWTPM_NV_INDEX_MAX)
    public = client.nv_public(index)
    assert (public.index, public.data_size, public.name_alg) == (index, 2048, tc.TPM_ALG_SHA256)
    assert public.attributes & tc.TPMA_NV_WRITTEN == 0
    with pytest.raises(TpmError, match="NV_UNINITIALIZED"):
        client.nv_read(index)
    data = os.urandom(SWTPM_NV_INDEX_MAX)
    client.nv_write(index, data)  # two chunks of 1024
    assert client.nv_public(index).attributes & tc.TPMA_NV_WRITTEN
    assert client.nv_read(index) == data
    client.nv_write(index, b"HCLA", 1000)  # across nothing, at an offset
    assert client.nv_read(index) == data[:1000] + b"HCLA" + data[1004:]
    with pytest.raises(TpmError, match="NV_RANGE"):
        client.nv_write(index, b"x", SWTPM_NV_INDEX_MAX)
    client.undefine_space(index)
    with pytest.raises(DeviceUnavailable, match="NV index 0x01400001 is not defined: no Azure "
                                                "HCL report in this TPM"):
        client.nv_read(index)


def test_swtpm_missing_things(client: Tpm) -> None:
    with pytest.raises(DeviceUnavailable, match="no Azure user data index") as caught:
        client.nv_public(tc.AZURE_USER_DATA_INDEX)
    assert isinstance(caught.value.__cause__, TpmError)
    assert caught.value.__cause__.handle_missing
    with pytest.raises(DeviceUnavailable, match="no key at handle 0x81000003: no Azure "
                                                "attestation key"):
        client.read_public(tc.AZURE_AK_HANDLE)


def test_swtpm_quote_verifies_with_the_azure_checks(client: Tpm) -> None:
    handle, created = client.create_primary(tc.TPM_RH_OWNER, tc.ak_template())
    client.evict_control(handle, tc.AZURE_AK_HANDLE)
    client.flush(handle)
    ak = client.read_public(tc.AZURE_AK_HANDLE)
    assert ak == created
    assert (ak.attributes, ak.key_bits, ak.rsa_e, ak.rsa_n.bit_length()) == (
        tc.AK_ATTRIBUTES, 2048, 65537, 2048)
    nonce = os.urandom(32)
    attest, signature = client.quote(tc.AZURE_AK_HANDLE, nonce, range(24))
    quote = tpm.Quote.from_bytes(attest)
    assert quote.extra_data == nonce
    assert quote.selected == tuple((tpm.TPM_ALG_SHA256, i) for i in range(24))
    assert quote.qualified_signer  # the AK's qualified name
    assert tpm.Signature.from_bytes(signature).scheme == "RSASSA"
    pcrs = client.pcr_values(range(24))
    assert len(pcrs) == 24 and all(len(v) == 32 for v in pcrs)
    assert quote_signature_check(attest, signature, ak.jwk()).status is Status.PASS
    assert pcr_digest_check(quote, pcrs).status is Status.PASS
    tampered = attest[:-1] + bytes([attest[-1] ^ 1])
    assert quote_signature_check(tampered, signature, ak.jwk()).status is Status.FAIL
    other, _ = client.quote(tc.AZURE_AK_HANDLE, bytes(32), range(24))
    assert quote_signature_check(other, signature, ak.jwk()).status is Status.FAIL


def test_swtpm_gone_is_unavailable(swtpm: Any) -> None:
    channel = open_tpm(swtpm.spec)
    Tpm(channel).startup()
    swtpm.stop()
    with pytest.raises(DeviceError):
        Tpm(channel).startup()
    channel.close()
    with pytest.raises(DeviceUnavailable, match=f"no TPM at {swtpm.spec}"):
        open_tpm(swtpm.spec)
