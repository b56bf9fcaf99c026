"""TPM 2.0 structures a quote carries: TPMS_ATTEST (a quote) and TPMT_SIGNATURE.

Pure layout, big-endian as the TPM marshals it (TPM 2.0 Library, Part 2). Every
length is checked against the buffer, and a structure must use its buffer exactly:
a hostile input raises :class:`EvidenceFormatError` naming the field, never an
IndexError or struct.error.
"""

from __future__ import annotations

import dataclasses
import struct
from typing import Tuple

from snpd.errors import EvidenceFormatError

TPM_GENERATED_VALUE = 0xFF544347  # "\xffTCG"
TPM_ST_ATTEST_QUOTE = 0x8018

TPM_ALG_SHA1 = 0x0004
TPM_ALG_SHA256 = 0x000B
TPM_ALG_SHA384 = 0x000C
TPM_ALG_SHA512 = 0x000D
TPM_ALG_RSASSA = 0x0014
TPM_ALG_RSAPSS = 0x0016

DIGEST_SIZES = {TPM_ALG_SHA1: 20, TPM_ALG_SHA256: 32, TPM_ALG_SHA384: 48, TPM_ALG_SHA512: 64}
HASH_NAMES = {TPM_ALG_SHA1: "SHA-1", TPM_ALG_SHA256: "SHA-256", TPM_ALG_SHA384: "SHA-384",
              TPM_ALG_SHA512: "SHA-512"}

MAX_EXTRA_DATA = 64  # TPM2B_DATA holds at most sizeof(TPMU_HA)
MAX_NAME = 2 + 64  # TPM2B_NAME: sizeof(TPMU_NAME), a hash algorithm and a digest
MAX_PCR_SELECT = 4  # PCR_SELECT_MAX for 32 PCRs; Azure selects 24 (3 bytes)
MAX_SELECTIONS = 16  # TPML_PCR_SELECTION count (HASH_COUNT bounds it in practice)
MAX_SIGNATURE = 1024  # an RSA-8192 signature; vTPM AKs are RSA-2048
MAX_QUOTE = 1024


class Reader:
    """A bounds-checked big-endian cursor over ``data``; ``what`` prefixes errors.
    Shared with :mod:`snpd.abi.tpm2_commands`, which reads whole TPM responses."""

    def __init__(self, data: bytes, what: str) -> None:
        self.data = data
        self.what = what
        self.offset = 0

    def take(self, size: int, field: str) -> bytes:
        end = self.offset + size
        if size < 0 or end > len(self.data):
            raise EvidenceFormatError(
                f"{self.what}: {field} needs {size} byte(s) at offset {self.offset}, "
                f"only {len(self.data) - self.offset} left")
        chunk = self.data[self.offset:end]
        self.offset = end
        return chunk

    def u8(self, field: str) -> int:
        return self.take(1, field)[0]

    def u16(self, field: str) -> int:
        value: int = struct.unpack(">H", self.take(2, field))[0]
        return value

    def u32(self, field: str) -> int:
        value: int = struct.unpack(">I", self.take(4, field))[0]
        return value

    def u64(self, field: str) -> int:
        value: int = struct.unpack(">Q", self.take(8, field))[0]
        return value

    def tpm2b(self, field: str, limit: int) -> bytes:
        size = self.u16(f"{field} size")
        if size > limit:
            raise EvidenceFormatError(f"{self.what}: {field} is {size} bytes, at most {limit} "
                                      "allowed")
        return self.take(size, field)

    @property
    def remaining(self) -> int:
        return len(self.data) - self.offset

    def end(self) -> None:
        extra = len(self.data) - self.offset
        if extra:
            raise EvidenceFormatError(f"{self.what}: {extra} byte(s) after the structure "
                                      f"(it ends at offset {self.offset})")


@dataclasses.dataclass(frozen=True)
class PcrSelection:
    """One TPMS_PCR_SELECTION: a hash bank and the PCRs selected in it, ascending."""

    hash_alg: int
    size_of_select: int
    pcrs: Tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class Quote:
    """A TPMS_ATTEST of type TPM_ST_ATTEST_QUOTE, parsed from exactly its bytes."""

    qualified_signer: bytes
    extra_data: bytes
    clock: int
    reset_count: int
    restart_count: int
    safe: bool
    firmware_version: int
    pcr_selections: Tuple[PcrSelection, ...]
    pcr_digest: bytes
    raw: bytes = dataclasses.field(repr=False)

    @property
    def selected(self) -> Tuple[Tuple[int, int], ...]:
        """(hash algorithm, PCR index) in the order the digest covers them."""
        return tuple((s.hash_alg, pcr) for s in self.pcr_selections for pcr in s.pcrs)

    @classmethod
    def from_bytes(cls, data: bytes) -> Quote:
        what = "TPM quote (TPMS_ATTEST)"
        if len(data) > MAX_QUOTE:
            raise EvidenceFormatError(f"{what}: {len(data)} bytes, at most {MAX_QUOTE} allowed")
        r = Reader(bytes(data), what)
        magic = r.u32("magic")
        if magic != TPM_GENERATED_VALUE:
            raise EvidenceFormatError(f"{what}: magic is 0x{magic:08x}, not TPM_GENERATED_VALUE "
                                      f"0x{TPM_GENERATED_VALUE:08x}")
        kind = r.u16("type")
        if kind != TPM_ST_ATTEST_QUOTE:
            raise EvidenceFormatError(f"{what}: type is 0x{kind:04x}, not TPM_ST_ATTEST_QUOTE "
                                      f"0x{TPM_ST_ATTEST_QUOTE:04x}")
        signer = r.tpm2b("qualifiedSigner", MAX_NAME)
        extra = r.tpm2b("extraData", MAX_EXTRA_DATA)
        clock = r.u64("clockInfo.clock")
        resets = r.u32("clockInfo.resetCount")
        restarts = r.u32("clockInfo.restartCount")
        safe = r.u8("clockInfo.safe")
        if safe > 1:
            raise EvidenceFormatError(f"{what}: clockInfo.safe is {safe}, not a TPMI_YES_NO")
        firmware = r.u64("firmwareVersion")
        count = r.u32("pcrSelect.count")
        if count > MAX_SELECTIONS:
            raise EvidenceFormatError(f"{what}: pcrSelect.count is {count}, at most "
                                      f"{MAX_SELECTIONS} allowed")
        selections = []
        for index in range(count):
            field = f"pcrSelect.pcrSelections[{index}]"
            alg = r.u16(f"{field}.hash")
            size = r.u8(f"{field}.sizeofSelect")
            if size > MAX_PCR_SELECT:
                raise EvidenceFormatError(f"{what}: {field}.sizeofSelect is {size}, at most "
                                          f"{MAX_PCR_SELECT} allowed")
            bitmap = r.take(size, f"{field}.pcrSelect")
            pcrs = tuple(i for i in range(size * 8) if bitmap[i // 8] >> (i % 8) & 1)
            selections.append(PcrSelection(alg, size, pcrs))
        digest = r.tpm2b("pcrDigest", max(DIGEST_SIZES.values()))
        r.end()
        return cls(signer, extra, clock, resets, restarts, bool(safe), firmware,
                   tuple(selections), digest, bytes(data))


@dataclasses.dataclass(frozen=True)
class Signature:
    """A TPMT_SIGNATURE with an RSA scheme (RSASSA or RSAPSS): the scheme, its hash
    and the signature value."""

    sig_alg: int
    hash_alg: int
    signature: bytes

    @property
    def scheme(self) -> str:
        return "RSASSA" if self.sig_alg == TPM_ALG_RSASSA else "RSAPSS"

    @classmethod
    def from_bytes(cls, data: bytes) -> Signature:
        what = "TPM signature (TPMT_SIGNATURE)"
        if len(data) > MAX_SIGNATURE + 6:
            raise EvidenceFormatError(f"{what}: {len(data)} bytes, at most {MAX_SIGNATURE + 6} "
                                      "allowed")
        r = Reader(bytes(data), what)
        alg = r.u16("sigAlg")
        if alg not in (TPM_ALG_RSASSA, TPM_ALG_RSAPSS):
            raise EvidenceFormatError(f"{what}: sigAlg is 0x{alg:04x}, not RSASSA (0x0014) or "
                                      "RSAPSS (0x0016)")
        hash_alg = r.u16("hash")
        if hash_alg not in DIGEST_SIZES:
            raise EvidenceFormatError(f"{what}: hash is 0x{hash_alg:04x}, not a known "
                                      "algorithm")
        value = r.tpm2b("sig", MAX_SIGNATURE)
        if not value:
            raise EvidenceFormatError(f"{what}: sig is empty")
        r.end()
        return cls(alg, hash_alg, value)

    @classmethod
    def looks_like(cls, data: bytes) -> bool:
        """Whether ``data`` is framed as a TPMT_SIGNATURE with an RSA scheme (rather than
        the bare signature value Trustee's evidence carries): a known scheme and hash, and
        a size field that accounts for exactly the rest."""
        return (len(data) >= 6 and struct.unpack(">H", data[:2])[0] in (TPM_ALG_RSASSA,
                                                                         TPM_ALG_RSAPSS)
                and struct.unpack(">H", data[2:4])[0] in DIGEST_SIZES
                and struct.unpack(">H", data[4:6])[0] == len(data) - 6)
