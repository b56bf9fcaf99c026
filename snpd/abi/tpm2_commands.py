"""TPM 2.0 commands and responses as bytes: the few an Azure vTPM client needs.

Pure (sans-IO): builders return a whole command, parsers take a whole response; the
channel that carries them is :mod:`snpd.device.tpm`. Big-endian, as TPM 2.0 Library
Part 2 (structures) and Part 3 (commands) lay them out. An in-tree marshaller rather
than tpm2-pytss: that needs the libtss2 C libraries, which RHEL 9/10's base and SLES 15
do not package, while this runs on every distro profile and can be fuzzed.

Commands that need authorization carry one password session (TPM_RS_PW, empty nonce,
empty password): Azure's vTPM lets the guest read its NV indices and use its AK with
empty authorization. A response with a code other than success raises
:class:`TpmError`; a malformed one (short, a size field that disagrees with its bytes,
trailing bytes, an oversized TPM2B) raises :class:`EvidenceFormatError` naming the
field, never IndexError or struct.error.
"""

from __future__ import annotations

import dataclasses
import hashlib
import struct
from typing import Callable, Iterable, List, Optional, Sequence, Tuple, TypeVar

from snpd.abi.hcl import RsaJwk
from snpd.abi.tpm import (
    DIGEST_SIZES,
    MAX_NAME,
    MAX_QUOTE,
    MAX_SIGNATURE,
    TPM_ALG_RSAPSS,
    TPM_ALG_SHA1,
    TPM_ALG_SHA384,
    TPM_ALG_SHA512,
    Reader,
)
from snpd.abi.tpm import TPM_ALG_RSASSA as TPM_ALG_RSASSA  # re-exported: one module to use
from snpd.abi.tpm import TPM_ALG_SHA256 as TPM_ALG_SHA256
from snpd.errors import EvidenceFormatError, TpmCommandFormatError, TpmError

T = TypeVar("T")

TPM_ST_NO_SESSIONS = 0x8001
TPM_ST_SESSIONS = 0x8002
TPM_ST_CREATION = 0x8021

TPM_RS_PW = 0x40000009
TPM_RH_OWNER = 0x40000001
TPM_RH_NULL = 0x40000007
TPM_RH_ENDORSEMENT = 0x4000000B
TPM_RH_PLATFORM = 0x4000000C

TPM_ALG_RSA = 0x0001
TPM_ALG_NULL = 0x0010

TPM_SU_CLEAR = 0x0000
TPM_SU_STATE = 0x0001

TPM_CC_EVICT_CONTROL = 0x00000120
TPM_CC_NV_UNDEFINE_SPACE = 0x00000122
TPM_CC_NV_DEFINE_SPACE = 0x0000012A
TPM_CC_CREATE_PRIMARY = 0x00000131
TPM_CC_NV_WRITE = 0x00000137
TPM_CC_STARTUP = 0x00000144
TPM_CC_NV_READ = 0x0000014E
TPM_CC_QUOTE = 0x00000158
TPM_CC_FLUSH_CONTEXT = 0x00000165
TPM_CC_NV_READ_PUBLIC = 0x00000169
TPM_CC_READ_PUBLIC = 0x00000173
TPM_CC_GET_CAPABILITY = 0x0000017A
TPM_CC_PCR_READ = 0x0000017E

COMMAND_NAMES = {
    TPM_CC_EVICT_CONTROL: "EvictControl", TPM_CC_NV_UNDEFINE_SPACE: "NV_UndefineSpace",
    TPM_CC_NV_DEFINE_SPACE: "NV_DefineSpace", TPM_CC_CREATE_PRIMARY: "CreatePrimary",
    TPM_CC_NV_WRITE: "NV_Write", TPM_CC_STARTUP: "Startup", TPM_CC_NV_READ: "NV_Read",
    TPM_CC_QUOTE: "Quote", TPM_CC_FLUSH_CONTEXT: "FlushContext",
    TPM_CC_NV_READ_PUBLIC: "NV_ReadPublic", TPM_CC_READ_PUBLIC: "ReadPublic",
    TPM_CC_GET_CAPABILITY: "GetCapability", TPM_CC_PCR_READ: "PCR_Read",
}

# Azure's vTPM: the attestation key, the HCL report, and the index the guest writes its
# 64 bytes of user data to (the paravisor then refreshes the HCL report with them).
AZURE_AK_HANDLE = 0x81000003
AZURE_HCL_REPORT_INDEX = 0x01400001
AZURE_USER_DATA_INDEX = 0x01400002

# TPMA_OBJECT bits (Part 2 §8.3)
TPMA_OBJECT_FIXEDTPM = 1 << 1
TPMA_OBJECT_STCLEAR = 1 << 2
TPMA_OBJECT_FIXEDPARENT = 1 << 4
TPMA_OBJECT_SENSITIVEDATAORIGIN = 1 << 5
TPMA_OBJECT_USERWITHAUTH = 1 << 6
TPMA_OBJECT_ADMINWITHPOLICY = 1 << 7
TPMA_OBJECT_NODA = 1 << 10
TPMA_OBJECT_RESTRICTED = 1 << 16
TPMA_OBJECT_DECRYPT = 1 << 17
TPMA_OBJECT_SIGN = 1 << 18
AK_ATTRIBUTES = (TPMA_OBJECT_FIXEDTPM | TPMA_OBJECT_FIXEDPARENT
                 | TPMA_OBJECT_SENSITIVEDATAORIGIN | TPMA_OBJECT_USERWITHAUTH
                 | TPMA_OBJECT_RESTRICTED | TPMA_OBJECT_SIGN)

# TPMA_NV bits (Part 2 §13.4)
TPMA_NV_PPWRITE = 1 << 0
TPMA_NV_OWNERWRITE = 1 << 1
TPMA_NV_AUTHWRITE = 1 << 2
TPMA_NV_POLICYWRITE = 1 << 3
TPMA_NV_WRITTEN = 1 << 29
TPMA_NV_PPREAD = 1 << 16
TPMA_NV_OWNERREAD = 1 << 17
TPMA_NV_AUTHREAD = 1 << 18
TPMA_NV_POLICYREAD = 1 << 19
TPMA_NV_NO_DA = 1 << 25
# An ordinary index the owner defines and anyone with its (empty) auth reads and writes:
# what an emulated paravisor needs for 0x01400001 and 0x01400002.
NV_ATTRIBUTES_RW = (TPMA_NV_OWNERWRITE | TPMA_NV_AUTHWRITE | TPMA_NV_OWNERREAD
                    | TPMA_NV_AUTHREAD | TPMA_NV_NO_DA)

TPM_CAP_TPM_PROPERTIES = 0x00000006
TPM_PT_FIXED = 0x100
TPM_PT_NV_INDEX_MAX = TPM_PT_FIXED + 23
TPM_PT_NV_BUFFER_MAX = TPM_PT_FIXED + 44

HEADER_SIZE = 10
# The Linux TPM driver's TPM_BUFSIZE and libtpms's MAX_RESPONSE_SIZE/MAX_COMMAND_SIZE are
# both 4096: no response a guest can receive is longer.
MAX_RESPONSE = 4096
MAX_COMMAND = 4096
MAX_NV_BUFFER = 1024  # MAX_NV_BUFFER_SIZE: the most one NV_Read/NV_Write moves
MAX_DIGEST = max(DIGEST_SIZES.values())
MAX_RSA_KEY_BYTES = 512  # RSA-4096; vTPMs and swtpm stop at 2048 or 3072
MAX_PUBLIC = 1024  # a TPMT_PUBLIC: header, parameters and an RSA-4096 modulus fit
MAX_CREATION_DATA = 1024
MAX_PCR_DIGESTS = 8  # TPML_DIGEST in PCR_Read: at most 8 values per call (Part 2 §10.9.2)
PCR_SELECT_MIN = 3  # 24 PCRs: every TPM accepts a 3-byte bitmap
MAX_PCR_SELECT = 4
MAX_SESSIONS = 3

_PW_SESSION = struct.pack(">IHBH", TPM_RS_PW, 0, 0x01, 0)  # continueSession, empty auth

_NAME_HASHES = {TPM_ALG_SHA1: "sha1", TPM_ALG_SHA256: "sha256", TPM_ALG_SHA384: "sha384",
                TPM_ALG_SHA512: "sha512"}

# ------------------------------------------------------------------ response codes

TPM_RC_SUCCESS = 0x000
TPM_RC_INITIALIZE = 0x100
TPM_RC_HANDLE = 0x08B
TPM_RC_RETRY = 0x922
TPM_RC_YIELDED = 0x908
TPM_RC_TESTING = 0x90A
TPM_RC_NV_RATE = 0x920

_FORMAT_ZERO = {
    0x100: ("INITIALIZE", "TPM not initialized by TPM2_Startup or already initialized"),
    0x101: ("FAILURE", "the TPM is in failure mode"),
    0x103: ("SEQUENCE", "improper use of a sequence handle"),
    0x10B: ("PRIVATE", "not currently used"),
    0x119: ("HMAC", "not currently used"),
    0x120: ("DISABLED", "the command is disabled"),
    0x121: ("EXCLUSIVE", "the command failed because audit sequence required exclusivity"),
    0x124: ("AUTH_TYPE", "authorization handle is not correct for the command"),
    0x125: ("AUTH_MISSING", "the command requires an authorization session"),
    0x126: ("POLICY", "policy failure in math operation or an invalid authPolicy value"),
    0x127: ("PCR", "PCR check fail"),
    0x128: ("PCR_CHANGED", "PCR have changed since checked"),
    0x12D: ("UPGRADE", "the TPM is in field upgrade mode"),
    0x12E: ("TOO_MANY_CONTEXTS", "context ID counter is at maximum"),
    0x12F: ("AUTH_UNAVAILABLE", "authValue or authPolicy is not available"),
    0x130: ("REBOOT", "a _TPM_Init and Startup(CLEAR) is required"),
    0x131: ("UNBALANCED", "the protection algorithms (hash and symmetric) are not "
                          "reasonably balanced"),
    0x142: ("COMMAND_SIZE", "commandSize is inconsistent with the command's contents"),
    0x143: ("COMMAND_CODE", "the command code is not supported"),
    0x144: ("AUTHSIZE", "the authorization size is out of range or inconsistent"),
    0x145: ("AUTH_CONTEXT", "use of an authorization session with a context command"),
    0x146: ("NV_RANGE", "NV offset plus size is out of range"),
    0x147: ("NV_SIZE", "requested allocation size is larger than allowed"),
    0x148: ("NV_LOCKED", "NV access locked"),
    0x149: ("NV_AUTHORIZATION", "NV access authorization fails in command actions"),
    0x14A: ("NV_UNINITIALIZED", "an NV index is used before being initialized (written)"),
    0x14B: ("NV_SPACE", "insufficient space for NV allocation"),
    0x14C: ("NV_DEFINED", "the NV index or persistent object is already defined"),
    0x150: ("BAD_CONTEXT", "context in TPM2_ContextLoad() is not valid"),
    0x151: ("CPHASH", "cpHash value already set or not correct for use"),
    0x152: ("PARENT", "handle for parent is not a valid parent"),
    0x153: ("NEEDS_TEST", "some function needs testing"),
    0x154: ("NO_RESULT", "an internal function cannot process a request"),
    0x155: ("SENSITIVE", "the sensitive area did not unmarshal correctly after decryption"),
    0x901: ("CONTEXT_GAP", "gap for context ID is too large"),
    0x902: ("OBJECT_MEMORY", "out of memory for object contexts"),
    0x903: ("SESSION_MEMORY", "out of memory for session contexts"),
    0x904: ("MEMORY", "out of shared object/session memory or need space for internal "
                      "operations"),
    0x905: ("SESSION_HANDLES", "out of session handles"),
    0x906: ("OBJECT_HANDLES", "out of object handles"),
    0x907: ("LOCALITY", "bad locality"),
    0x908: ("YIELDED", "the TPM has suspended operation on the command"),
    0x909: ("CANCELED", "the command was canceled"),
    0x90A: ("TESTING", "the TPM is performing self-tests"),
    0x920: ("NV_RATE", "the TPM is rate-limiting accesses to prevent wearout of NV"),
    0x921: ("LOCKOUT", "authorizations for objects subject to DA protection are not "
                       "allowed at this time"),
    0x922: ("RETRY", "the TPM was not able to start the command"),
    0x923: ("NV_UNAVAILABLE", "the command may require writing of NV and NV is not "
                              "currently accessible"),
}

_FORMAT_ONE = {
    0x081: ("ASYMMETRIC", "asymmetric algorithm not supported or not correct"),
    0x082: ("ATTRIBUTES", "inconsistent attributes"),
    0x083: ("HASH", "hash algorithm not supported or not appropriate"),
    0x084: ("VALUE", "value is out of range or is not correct for the context"),
    0x085: ("HIERARCHY", "hierarchy is not enabled or is not correct for the use"),
    0x087: ("KEY_SIZE", "key size is not supported"),
    0x088: ("MGF", "mask generation function not supported"),
    0x089: ("MODE", "mode of operation not supported"),
    0x08A: ("TYPE", "the type of the value is not appropriate for the use"),
    0x08B: ("HANDLE", "the handle is not correct for the use"),
    0x08C: ("KDF", "unsupported key derivation function or function not appropriate "
                   "for use"),
    0x08D: ("RANGE", "value was out of allowed range"),
    0x08E: ("AUTH_FAIL", "the authorization HMAC check failed and DA counter "
                         "incremented"),
    0x08F: ("NONCE", "invalid nonce size or nonce value mismatch"),
    0x090: ("PP", "authorization requires assertion of PP"),
    0x092: ("SCHEME", "unsupported or incompatible scheme"),
    0x095: ("SIZE", "structure is the wrong size"),
    0x096: ("SYMMETRIC", "unsupported symmetric algorithm or key size, or not appropriate "
                         "for instance"),
    0x097: ("TAG", "incorrect structure tag"),
    0x098: ("SELECTOR", "union selector is incorrect"),
    0x09A: ("INSUFFICIENT", "the TPM was unable to unmarshal a value because there were "
                            "not enough octets in the input buffer"),
    0x09B: ("SIGNATURE", "the signature is not valid"),
    0x09C: ("KEY", "key fields are not compatible with the selected use"),
    0x09D: ("POLICY_FAIL", "a policy check failed"),
    0x09F: ("INTEGRITY", "integrity check failed"),
    0x0A0: ("TICKET", "invalid ticket"),
    0x0A1: ("RESERVED_BITS", "reserved bits not set to zero as required"),
    0x0A2: ("BAD_AUTH", "authorization failure without DA implications"),
    0x0A3: ("EXPIRED", "the policy has expired"),
    0x0A4: ("POLICY_CC", "the commandCode in the policy is not the commandCode of the "
                         "command"),
    0x0A5: ("BINDING", "public and sensitive portions of an object are not cryptographically "
                       "bound"),
    0x0A6: ("CURVE", "curve not supported"),
    0x0A7: ("ECC_POINT", "point is not on the required curve"),
}


def describe_rc(rc: int) -> str:
    """A TPM 2.0 response code in words (Part 2 §6.6): its name, what it means, and for a
    format-one code the parameter, handle or session it is about."""
    if rc == TPM_RC_SUCCESS:
        return "TPM_RC_SUCCESS"
    if rc & 0x080:  # format one: error number, and which parameter/handle/session
        code = 0x080 | (rc & 0x03F)
        name, meaning = _FORMAT_ONE.get(code, (f"0x{code:03X}", "unknown format-one error"))
        number = (rc >> 8) & 0xF
        if rc & 0x040:
            where = f"parameter {number}"
        elif number & 0x8:
            where = f"session {number & 0x7}"
        else:
            where = f"handle {number}" if number else ""
        return f"TPM_RC_{name}" + (f" ({where})" if where else "") + f": {meaning}"
    if rc & 0x400:
        return f"vendor-defined code 0x{rc & 0x7F:02X}"
    if not rc & 0x100:
        return "a TPM 1.2 response code"
    base = rc & 0xF7F
    found = _FORMAT_ZERO.get(base)
    if found is None:
        kind = "warning" if rc & 0x800 else "error"
        return f"unknown TPM 2.0 {kind} 0x{rc & 0x7F:02X}"
    return f"TPM_RC_{found[0]}: {found[1]}"


def tpm_error(command: str, rc: int) -> TpmError:
    """The :class:`TpmError` for ``command`` answering ``rc``."""
    return TpmError(f"TPM2_{command} failed: {describe_rc(rc)} (rc 0x{rc:03X})", rc=rc,
                    command=command)


# ------------------------------------------------------------------ marshalling

def _u16(value: int) -> bytes:
    return struct.pack(">H", value)


def _u32(value: int) -> bytes:
    return struct.pack(">I", value)


def _tpm2b(data: bytes, field: str, limit: int) -> bytes:
    if len(data) > limit:
        raise ValueError(f"{field} is {len(data)} bytes, at most {limit} allowed")
    return _u16(len(data)) + bytes(data)


def _command(code: int, handles: Sequence[int], params: bytes = b"",
             sessions: int = 0) -> bytes:
    """A whole command: header, handles, ``sessions`` password sessions, parameters."""
    body = b"".join(_u32(h) for h in handles)
    if sessions:
        body += _u32(len(_PW_SESSION) * sessions) + _PW_SESSION * sessions
    body += params
    tag = TPM_ST_SESSIONS if sessions else TPM_ST_NO_SESSIONS
    return struct.pack(">HII", tag, HEADER_SIZE + len(body), code) + body


def _pcr_selection(pcrs: Iterable[int], bank: int) -> bytes:
    """A TPML_PCR_SELECTION of one bank (empty ``pcrs`` selects none)."""
    indices = sorted(set(pcrs))
    if indices and not 0 <= indices[0] <= indices[-1] < MAX_PCR_SELECT * 8:
        raise ValueError(f"PCR indices must be 0..{MAX_PCR_SELECT * 8 - 1}")
    size = max(PCR_SELECT_MIN, (indices[-1] // 8 + 1) if indices else 0)
    bitmap = bytearray(size)
    for index in indices:
        bitmap[index // 8] |= 1 << (index % 8)
    return _u32(1) + _u16(bank) + bytes([size]) + bytes(bitmap)


def command_header(data: bytes) -> Tuple[int, int, int]:
    """(tag, commandSize, commandCode) of a command; the sizes are not checked."""
    if len(data) < HEADER_SIZE:
        raise TpmCommandFormatError(f"TPM command: {len(data)} bytes, shorter than the "
                                    f"{HEADER_SIZE}-byte header")
    tag, size, code = struct.unpack(">HII", data[:HEADER_SIZE])
    return tag, size, code


def nv_write_target(command: bytes) -> Optional[Tuple[int, bytes, int]]:
    """(nvIndex, data, offset) when ``command`` is a TPM2_NV_Write, else None. An
    emulated paravisor uses it to notice the guest writing its user data index; a
    malformed NV_Write raises :class:`TpmCommandFormatError` naming the field."""
    tag, size, code = command_header(command)
    if code != TPM_CC_NV_WRITE:
        return None
    what = "TPM2_NV_Write command"
    if tag != TPM_ST_SESSIONS:
        raise TpmCommandFormatError(f"{what}: tag is 0x{tag:04x}, not TPM_ST_SESSIONS")
    if size != len(command):
        raise TpmCommandFormatError(f"{what}: commandSize is {size}, the command is "
                                    f"{len(command)} bytes")
    try:
        r = Reader(bytes(command), what)
        r.take(HEADER_SIZE, "header")
        r.u32("authHandle")
        index = r.u32("nvIndex")
        r.take(r.u32("authorizationSize"), "authorization area")
        data = r.tpm2b("data", MAX_NV_BUFFER)
        offset = r.u16("offset")
        r.end()
    except EvidenceFormatError as exc:
        raise TpmCommandFormatError(str(exc)) from exc
    return index, data, offset


# ------------------------------------------------------------------ responses

def _response(data: bytes, code: int, *, handles: int = 0, sessions: bool = False,
              ok: Tuple[int, ...] = ()) -> Tuple[Tuple[int, ...], Reader]:
    """Check a response's framing and code; its returned handles and a reader over
    exactly its parameters (the password session's echo is checked and skipped)."""
    name = COMMAND_NAMES.get(code, f"0x{code:08x}")
    what = f"TPM2_{name} response"
    if len(data) > MAX_RESPONSE:
        raise EvidenceFormatError(f"{what}: {len(data)} bytes, at most {MAX_RESPONSE} "
                                  "allowed")
    r = Reader(bytes(data), what)
    tag = r.u16("tag")
    size = r.u32("responseSize")
    rc = r.u32("responseCode")
    if size != len(data):
        raise EvidenceFormatError(f"{what}: responseSize is {size}, the response is "
                                  f"{len(data)} bytes")
    if rc != TPM_RC_SUCCESS:
        r.end()  # an error response is the header alone
        if rc not in ok:
            raise tpm_error(name, rc)
        return (), Reader(b"", what)
    expected = TPM_ST_SESSIONS if sessions else TPM_ST_NO_SESSIONS
    if tag != expected:
        raise EvidenceFormatError(f"{what}: tag is 0x{tag:04x}, not 0x{expected:04x}")
    out = tuple(r.u32(f"handle {i + 1}") for i in range(handles))
    if not sessions:
        return out, Reader(r.take(r.remaining, "parameters"), what)
    params = r.take(r.u32("parameterSize"), "parameters")
    r.tpm2b("session nonce", MAX_DIGEST)
    r.u8("session attributes")
    r.tpm2b("session hmac", MAX_DIGEST)
    r.end()
    return out, Reader(params, what)


def _parsed(data: bytes, code: int, parse: Callable[[Reader], T], *, handles: int = 0,
            sessions: bool = False) -> Tuple[Tuple[int, ...], T]:
    found, r = _response(data, code, handles=handles, sessions=sessions)
    value = parse(r)
    r.end()
    return found, value


def _no_params(r: Reader) -> None:
    return None


# ------------------------------------------------------------------ Startup

def startup(clear: bool = True) -> bytes:
    """TPM2_Startup(CLEAR) (or STATE); a platform's firmware normally sends it."""
    return _command(TPM_CC_STARTUP, (), _u16(TPM_SU_CLEAR if clear else TPM_SU_STATE))


def parse_startup(data: bytes) -> None:
    """Success, or TPM_RC_INITIALIZE: the TPM was started already, which is as good."""
    _response(data, TPM_CC_STARTUP, ok=(TPM_RC_INITIALIZE,))[1].end()


# ------------------------------------------------------------------ NV

@dataclasses.dataclass(frozen=True)
class NvPublic:
    """TPMS_NV_PUBLIC of an NV index and the index's name (nameAlg || H(public))."""

    index: int
    name_alg: int
    attributes: int
    auth_policy: bytes
    data_size: int
    name: bytes


def _nv_public(index: int, size: int, attributes: int, name_alg: int = TPM_ALG_SHA256) -> bytes:
    body = _u32(index) + _u16(name_alg) + _u32(attributes) + _u16(0) + _u16(size)
    return _u16(len(body)) + body


def nv_read_public(index: int) -> bytes:
    return _command(TPM_CC_NV_READ_PUBLIC, (index,))


def parse_nv_read_public(data: bytes) -> NvPublic:
    def parse(r: Reader) -> NvPublic:
        public = Reader(r.tpm2b("nvPublic", 2 + 4 + 2 + 4 + 2 + MAX_DIGEST + 2),
                        f"{r.what}: nvPublic")
        index = public.u32("nvIndex")
        name_alg = public.u16("nameAlg")
        attributes = public.u32("attributes")
        policy = public.tpm2b("authPolicy", MAX_DIGEST)
        size = public.u16("dataSize")
        public.end()
        name = r.tpm2b("nvName", MAX_NAME)
        return NvPublic(index, name_alg, attributes, policy, size, name)
    return _parsed(data, TPM_CC_NV_READ_PUBLIC, parse)[1]


def nv_read(index: int, size: int, offset: int = 0, auth_handle: Optional[int] = None) -> bytes:
    """TPM2_NV_Read of ``size`` bytes (at most the TPM's NV buffer, 1024 here) at
    ``offset``, authorized by the index itself (Azure sets AUTHREAD, empty auth)."""
    auth = index if auth_handle is None else auth_handle
    return _command(TPM_CC_NV_READ, (auth, index), _u16(size) + _u16(offset), sessions=1)


def parse_nv_read(data: bytes) -> bytes:
    return _parsed(data, TPM_CC_NV_READ, lambda r: r.tpm2b("data", MAX_NV_BUFFER),
                   sessions=True)[1]


def nv_write(index: int, data: bytes, offset: int = 0,
             auth_handle: Optional[int] = None) -> bytes:
    """TPM2_NV_Write of ``data`` (at most 1024 bytes) at ``offset``."""
    auth = index if auth_handle is None else auth_handle
    return _command(TPM_CC_NV_WRITE, (auth, index),
                    _tpm2b(data, "data", MAX_NV_BUFFER) + _u16(offset), sessions=1)


def parse_nv_write(data: bytes) -> None:
    _parsed(data, TPM_CC_NV_WRITE, _no_params, sessions=True)


def nv_define_space(index: int, size: int, attributes: int = NV_ATTRIBUTES_RW,
                    auth_handle: int = TPM_RH_OWNER) -> bytes:
    """TPM2_NV_DefineSpace of an ordinary index with empty auth and no policy."""
    return _command(TPM_CC_NV_DEFINE_SPACE, (auth_handle,),
                    _u16(0) + _nv_public(index, size, attributes), sessions=1)


def parse_nv_define_space(data: bytes) -> None:
    _parsed(data, TPM_CC_NV_DEFINE_SPACE, _no_params, sessions=True)


def nv_undefine_space(index: int, auth_handle: int = TPM_RH_OWNER) -> bytes:
    return _command(TPM_CC_NV_UNDEFINE_SPACE, (auth_handle, index), sessions=1)


def parse_nv_undefine_space(data: bytes) -> None:
    _parsed(data, TPM_CC_NV_UNDEFINE_SPACE, _no_params, sessions=True)


# ------------------------------------------------------------------ keys

@dataclasses.dataclass(frozen=True)
class TpmPublic:
    """An RSA key's TPMT_PUBLIC (``raw``, as the TPM marshals it) and its name.
    ``rsa_e`` is the real exponent: the wire's 0 means 65537."""

    raw: bytes = dataclasses.field(repr=False)
    type: int
    name_alg: int
    attributes: int
    rsa_n: int
    rsa_e: int
    name: bytes
    scheme: int = TPM_ALG_NULL
    scheme_hash: int = TPM_ALG_NULL
    key_bits: int = 0

    def jwk(self, kid: str = "HCLAkPub") -> RsaJwk:
        """The key as the HCL runtime data lists it."""
        return RsaJwk(kid, self.rsa_n, self.rsa_e)


def ak_template() -> bytes:
    """TPMT_PUBLIC of an RSA-2048 restricted signing key, RSASSA with SHA-256: the shape
    of Azure's AK and of go-tpm-tools' AKTemplateRSA."""
    return (_u16(TPM_ALG_RSA) + _u16(TPM_ALG_SHA256) + _u32(AK_ATTRIBUTES) + _u16(0)
            + _u16(TPM_ALG_NULL)  # symmetric: none (a signing key)
            + _u16(TPM_ALG_RSASSA) + _u16(TPM_ALG_SHA256)  # scheme
            + _u16(2048) + _u32(0)  # keyBits, exponent (0: 65537)
            + _u16(0))  # unique: empty


def _tpmt_public(raw: bytes, what: str, name: bytes) -> TpmPublic:
    r = Reader(raw, what)
    kind = r.u16("type")
    if kind != TPM_ALG_RSA:
        raise EvidenceFormatError(f"{what}: type is 0x{kind:04x}, not TPM_ALG_RSA (only RSA "
                                  "keys are read)")
    name_alg = r.u16("nameAlg")
    attributes = r.u32("objectAttributes")
    r.tpm2b("authPolicy", MAX_DIGEST)
    if r.u16("parameters.symmetric.algorithm") != TPM_ALG_NULL:
        r.u16("parameters.symmetric.keyBits")
        r.u16("parameters.symmetric.mode")
    scheme = r.u16("parameters.scheme.scheme")
    scheme_hash = TPM_ALG_NULL if scheme == TPM_ALG_NULL else r.u16("parameters.scheme.hash")
    bits = r.u16("parameters.keyBits")
    exponent = r.u32("parameters.exponent")
    modulus = r.tpm2b("unique", MAX_RSA_KEY_BYTES)
    r.end()
    if name_alg in _NAME_HASHES and name:
        expected = _u16(name_alg) + hashlib.new(_NAME_HASHES[name_alg], raw).digest()
        if name != expected:
            raise EvidenceFormatError(f"{what}: the TPM's name {name.hex()} is not nameAlg "
                                      "|| H(TPMT_PUBLIC)")
    return TpmPublic(raw, kind, name_alg, attributes, int.from_bytes(modulus, "big"),
                     exponent or 65537, name, scheme, scheme_hash, bits)


def create_primary(hierarchy: int, template: bytes) -> bytes:
    """TPM2_CreatePrimary under ``hierarchy`` (TPM_RH_OWNER/ENDORSEMENT/...) from a
    TPMT_PUBLIC template, empty auth, no outside info, no creation PCRs."""
    sensitive = _u16(4) + _u16(0) + _u16(0)  # TPMS_SENSITIVE_CREATE: empty userAuth, data
    params = (sensitive + _tpm2b(template, "inPublic", MAX_PUBLIC) + _u16(0) + _u32(0))
    return _command(TPM_CC_CREATE_PRIMARY, (hierarchy,), params, sessions=1)


def parse_create_primary(data: bytes) -> Tuple[int, TpmPublic]:
    """(the transient object handle, its public area)."""
    def parse(r: Reader) -> TpmPublic:
        raw = r.tpm2b("outPublic", MAX_PUBLIC)
        r.tpm2b("creationData", MAX_CREATION_DATA)
        r.tpm2b("creationHash", MAX_DIGEST)
        tag = r.u16("creationTicket.tag")
        if tag != TPM_ST_CREATION:
            raise EvidenceFormatError(f"{r.what}: creationTicket.tag is 0x{tag:04x}, not "
                                      "TPM_ST_CREATION")
        r.u32("creationTicket.hierarchy")
        r.tpm2b("creationTicket.digest", MAX_DIGEST)
        name = r.tpm2b("name", MAX_NAME)
        return _tpmt_public(raw, f"{r.what}: outPublic", name)
    handles, public = _parsed(data, TPM_CC_CREATE_PRIMARY, parse, handles=1, sessions=True)
    return handles[0], public


def read_public(handle: int) -> bytes:
    return _command(TPM_CC_READ_PUBLIC, (handle,))


def parse_read_public(data: bytes) -> TpmPublic:
    def parse(r: Reader) -> TpmPublic:
        raw = r.tpm2b("outPublic", MAX_PUBLIC)
        name = r.tpm2b("name", MAX_NAME)
        r.tpm2b("qualifiedName", MAX_NAME)
        return _tpmt_public(raw, f"{r.what}: outPublic", name)
    return _parsed(data, TPM_CC_READ_PUBLIC, parse)[1]


def evict_control(object_handle: int, persistent_handle: int,
                  auth: int = TPM_RH_OWNER) -> bytes:
    """TPM2_EvictControl: make a transient object persistent at ``persistent_handle``
    (or, given a persistent handle for both, evict it)."""
    return _command(TPM_CC_EVICT_CONTROL, (auth, object_handle), _u32(persistent_handle),
                    sessions=1)


def parse_evict_control(data: bytes) -> None:
    _parsed(data, TPM_CC_EVICT_CONTROL, _no_params, sessions=True)


def flush_context(handle: int) -> bytes:
    return _command(TPM_CC_FLUSH_CONTEXT, (), _u32(handle))  # flushHandle is a parameter


def parse_flush_context(data: bytes) -> None:
    _parsed(data, TPM_CC_FLUSH_CONTEXT, _no_params)


# ------------------------------------------------------------------ quote and PCRs

def quote(sign_handle: int, qualifying_data: bytes, pcrs: Sequence[int],
          bank: int = TPM_ALG_SHA256) -> bytes:
    """TPM2_Quote over ``pcrs`` of ``bank`` with the key's own scheme (TPM_ALG_NULL);
    ``qualifying_data`` (the nonce) lands in TPMS_ATTEST.extraData."""
    params = (_tpm2b(qualifying_data, "qualifyingData", MAX_DIGEST) + _u16(TPM_ALG_NULL)
              + _pcr_selection(pcrs, bank))
    return _command(TPM_CC_QUOTE, (sign_handle,), params, sessions=1)


def _signature(r: Reader) -> bytes:
    start = r.offset
    alg = r.u16("signature.sigAlg")
    if alg not in (TPM_ALG_RSASSA, TPM_ALG_RSAPSS):
        raise EvidenceFormatError(f"{r.what}: signature.sigAlg is 0x{alg:04x}, not RSASSA "
                                  "or RSAPSS")
    r.u16("signature.hash")
    r.tpm2b("signature.sig", MAX_SIGNATURE)
    return r.data[start:r.offset]


def parse_quote(data: bytes) -> Tuple[bytes, bytes]:
    """(TPMS_ATTEST, TPMT_SIGNATURE) as bytes: what :class:`snpd.abi.tpm.Quote` and
    :class:`snpd.abi.tpm.Signature` read, and what the signature covers."""
    def parse(r: Reader) -> Tuple[bytes, bytes]:
        attest = r.tpm2b("quoted", MAX_QUOTE)
        return attest, _signature(r)
    return _parsed(data, TPM_CC_QUOTE, parse, sessions=True)[1]


def pcr_read(pcrs: Sequence[int], bank: int = TPM_ALG_SHA256) -> bytes:
    """TPM2_PCR_Read; the TPM answers at most 8 values and says which (the caller loops)."""
    return _command(TPM_CC_PCR_READ, (), _pcr_selection(pcrs, bank))


def parse_pcr_read(data: bytes) -> Tuple[int, Tuple[int, ...], Tuple[bytes, ...]]:
    """(pcrUpdateCounter, the PCR indices answered, in order, their values)."""
    def parse(r: Reader) -> Tuple[int, Tuple[int, ...], Tuple[bytes, ...]]:
        counter = r.u32("pcrUpdateCounter")
        count = r.u32("pcrSelectionOut.count")
        if count > len(DIGEST_SIZES):
            raise EvidenceFormatError(f"{r.what}: pcrSelectionOut.count is {count}, at most "
                                      f"{len(DIGEST_SIZES)} allowed")
        indices: List[int] = []
        for i in range(count):
            field = f"pcrSelectionOut[{i}]"
            r.u16(f"{field}.hash")
            size = r.u8(f"{field}.sizeofSelect")
            if size > MAX_PCR_SELECT:
                raise EvidenceFormatError(f"{r.what}: {field}.sizeofSelect is {size}, at most "
                                          f"{MAX_PCR_SELECT} allowed")
            bitmap = r.take(size, f"{field}.pcrSelect")
            indices.extend(j for j in range(size * 8) if bitmap[j // 8] >> (j % 8) & 1)
        values = r.u32("pcrValues.count")
        if values > MAX_PCR_DIGESTS:
            raise EvidenceFormatError(f"{r.what}: pcrValues.count is {values}, at most "
                                      f"{MAX_PCR_DIGESTS} allowed")
        digests = tuple(r.tpm2b(f"pcrValues[{i}]", MAX_DIGEST) for i in range(values))
        if values != len(indices):
            raise EvidenceFormatError(f"{r.what}: {values} values for {len(indices)} "
                                      "selected PCRs")
        return counter, tuple(indices), digests
    return _parsed(data, TPM_CC_PCR_READ, parse)[1]


# ------------------------------------------------------------------ capabilities

def get_tpm_property(prop: int) -> bytes:
    """TPM2_GetCapability(TPM_CAP_TPM_PROPERTIES) for one property."""
    return _command(TPM_CC_GET_CAPABILITY, (), _u32(TPM_CAP_TPM_PROPERTIES) + _u32(prop)
                    + _u32(1))


def parse_get_tpm_property(data: bytes, prop: int) -> Optional[int]:
    """The property's value, or None when the TPM does not report it."""
    def parse(r: Reader) -> Optional[int]:
        r.u8("moreData")
        capability = r.u32("capability")
        if capability != TPM_CAP_TPM_PROPERTIES:
            raise EvidenceFormatError(f"{r.what}: capability is 0x{capability:x}, not "
                                      "TPM_CAP_TPM_PROPERTIES")
        count = r.u32("tpmProperty.count")
        if count > 1:
            raise EvidenceFormatError(f"{r.what}: {count} properties, 1 asked for")
        found = [(r.u32("property"), r.u32("value")) for _ in range(count)]
        return found[0][1] if found and found[0][0] == prop else None
    return _parsed(data, TPM_CC_GET_CAPABILITY, parse)[1]
