"""The appraisal policy: what an already verified report must say to be accepted.

Verification answers "did AMD hardware sign this?"; appraisal answers "is this the
guest, firmware and platform we want?". Keeping them apart lets one verified report
be judged against several named policies, and keeps this module pure: it takes
text, mappings and bytes, never files or the network.

The rule set covers go-sev-guest's ``validate.Options`` in full (docs/reference/peers.md §5.4),
minus what needs the endorsement certificate (certificate TCB, chip binding) or the
certificate table, which belong to verification. It departs from go-sev-guest where
go-sev-guest breaks on real hardware: unknown PLATFORM_INFO bits (real Turin firmware
sets bit 6) and guest POLICY bits 26-63 fail only in an explicitly strict policy.
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
import string
import struct
from typing import (
    TYPE_CHECKING,
    Any,
    Callable,
    Dict,
    List,
    Mapping,
    Optional,
    Sequence,
    Tuple,
    Union,
)

from snpd.abi.bits import PLATFORM_INFO_BITS, POLICY_BITS
from snpd.abi.product import Product
from snpd.abi.report import AttestationReport
from snpd.errors import CertificateFormatError, ConfigError, InvalidArgument
from snpd.schema import Kind, SchemaError, parse_toml, read_table
from snpd.trust.result import Check, Status

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ec import EllipticCurvePublicKey

__all__ = [
    "AMD_PUBLIC_KEY_SIZE",
    "AppraisalPolicy",
    "TcbMinimum",
    "amd_key_digest",
    "expected_value",
    "load_policies",
    "policies_from_mapping",
]

# ---------------------------------------------------------------------------
# The AMD public-key format (docs/reference/abi.md §4.1)

AMD_PUBLIC_KEY_SIZE = 0x404
_AMD_CURVE_P384 = 2
_AMD_COORD_SIZE = 72


def amd_key_digest(public_key: Union[str, bytes, EllipticCurvePublicKey]) -> bytes:
    """SHA-384 of an EC P-384 key in the 0x404-byte AMD format, as in ID_KEY_DIGEST.

    Operators hold ID and author keys as PEM, while the report carries only this
    digest; computing it here lets a policy name keys instead of opaque hashes.
    Accepts PEM text (a public key or a certificate), DER bytes of either, or a
    ``cryptography`` public key object. ``cryptography`` is imported here, not at
    module level, so that loading a policy without keys stays cheap.
    """
    # lazy: snpd --check-config and policies without keys load no cryptography
    from cryptography.hazmat.primitives.asymmetric import ec

    key = _load_public_key(public_key) if isinstance(public_key, (str, bytes)) else public_key
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise InvalidArgument(
            f"ID and author keys are EC P-384 keys, not {type(key).__name__}")
    if not isinstance(key.curve, ec.SECP384R1):
        raise InvalidArgument(f"ID and author keys are EC P-384 keys, not {key.curve.name}")
    numbers = key.public_numbers()
    blob = (struct.pack("<I", _AMD_CURVE_P384)
            + numbers.x.to_bytes(_AMD_COORD_SIZE, "little")
            + numbers.y.to_bytes(_AMD_COORD_SIZE, "little"))
    return hashlib.sha384(blob.ljust(AMD_PUBLIC_KEY_SIZE, b"\0")).digest()


def _load_public_key(data: Union[str, bytes]) -> object:
    """Decode PEM or DER, public key or certificate; every failure is a format error."""
    # lazy: see key_digest: a policy without keys loads no cryptography
    from cryptography import x509
    from cryptography.exceptions import UnsupportedAlgorithm
    from cryptography.hazmat.primitives import serialization

    if isinstance(data, str):
        try:
            raw = data.encode("ascii")
        except UnicodeEncodeError:
            raise CertificateFormatError("PEM text must be ASCII") from None
    else:
        raw = bytes(data)
    try:
        begin = raw.find(b"-----BEGIN ")
        if begin >= 0:
            pem = raw[begin:]
            if pem.startswith(b"-----BEGIN CERTIFICATE-----"):
                return x509.load_pem_x509_certificate(pem).public_key()
            return serialization.load_pem_public_key(pem)
        try:
            return serialization.load_der_public_key(raw)
        except ValueError:
            return x509.load_der_x509_certificate(raw).public_key()
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise CertificateFormatError(
            f"not a PEM or DER public key or certificate: {exc}") from None


# ---------------------------------------------------------------------------
# Expected values as snpguest's ``verify attestation`` flags give them


def expected_value(text: Union[str, bytes], field: str, *, flag: str = "") -> bytes:
    """The bytes an expected-value flag (``-m``, ``-d``, ``-r``, ``--id-key-digest``,
    ``--author-key-digest``) stands for, read as snpguest v0.10 reads it, so that its
    command lines mean the same here:

    * ``0x`` (lower case only) and hex digits of exactly the field's size;
    * otherwise the argument's own bytes (UTF-8; snpguest's "decimal"), which must
      be exactly the field's size: ``-r`` with a 64-character string compares
      those 64 characters;
    * and, where snpguest could only fail on length, exactly twice the field's size
      in hex digits without ``0x`` is hex (the form its own help text describes).

    Nothing is padded or truncated. A value that fits none of these raises
    :class:`InvalidArgument` naming ``flag`` (or the field) and what was wrong.
    """
    size = _MATCH_FIELDS[field]
    what = flag or field
    raw = text.encode("utf-8", "surrogateescape") if isinstance(text, str) else bytes(text)
    if raw.startswith(b"0x"):
        digits = raw[2:].decode("ascii", "replace")
        bad = next((c for c in digits if c not in _HEXDIGITS), None)
        if bad is not None:
            raise InvalidArgument(f"{what}: {bad!r} is not a hex digit (0x is followed by "
                                  f"{2 * size} hex digits, {size} bytes)")
        if len(digits) != 2 * size:
            raise InvalidArgument(f"{what}: expected 0x and {2 * size} hex digits ({size} "
                                  f"bytes), got {len(digits)} digits")
        return bytes.fromhex(digits)
    if len(raw) == size:
        return raw
    if len(raw) == 2 * size and all(chr(b) in _HEXDIGITS for b in raw):
        return bytes.fromhex(raw.decode("ascii"))
    raise InvalidArgument(f"{what}: expected {size} bytes: 0x and {2 * size} hex digits, "
                          f"{2 * size} hex digits, or a string of exactly {size} bytes; got "
                          f"{len(raw)} bytes without 0x")


# ---------------------------------------------------------------------------
# Rule tables. Order here is the order of checks in the output.

# (policy field, POLICY bit name, True if the rule requires the bit, False if it allows it)
_POLICY_FLAG_RULES: Tuple[Tuple[str, str, bool], ...] = (
    ("allow_debug", "debug", False),
    ("allow_migrate_ma", "migrate_ma", False),
    ("allow_smt", "smt", False),
    ("allow_cxl", "cxl_allow", False),
    ("require_single_socket", "single_socket", True),
    ("require_mem_aes_256_xts", "mem_aes_256_xts", True),
    ("require_rapl_dis", "rapl_dis", True),
    ("require_ciphertext_hiding", "ciphertext_hiding", True),
    ("require_page_swap_disable", "page_swap_disable", True),
)

_PLATFORM_FLAG_RULES: Tuple[Tuple[str, str, bool], ...] = (
    ("platform_allow_smt_en", "smt_en", False),
    ("platform_allow_tsme_en", "tsme_en", False),
    ("platform_allow_tio_en", "tio_en", False),
    ("platform_require_ecc_en", "ecc_en", True),
    ("platform_require_rapl_dis", "rapl_dis", True),
    ("platform_require_ciphertext_hiding_en", "ciphertext_hiding_en", True),
    ("platform_require_alias_check_complete", "alias_check_complete", True),
)
assert {b for _, b, _ in _POLICY_FLAG_RULES} <= set(POLICY_BITS)
assert {b for _, b, _ in _PLATFORM_FLAG_RULES} <= set(PLATFORM_INFO_BITS)

# Report fields matched exactly (or against an allow-list): field -> size in bytes.
_MATCH_FIELDS: Dict[str, int] = {
    "report_data": 64,
    "host_data": 32,
    "measurement": 48,
    "family_id": 16,
    "image_id": 16,
    "report_id": 32,
    "report_id_ma": 32,
    "chip_id": 64,
    "id_key_digest": 48,
    "author_key_digest": 48,
}
_DIGEST_SIZE = 48
_TURIN_HWID_SIZE = 8

TCB_COMPONENTS = ("fmc", "bootloader", "tee", "snp", "microcode")
TCB_KINDS = ("reported", "committed", "launch", "current")

_U8 = 0xFF
MAX_PCRS = 24  # the PCRs a TPM 2.0 PC-client bank has, the ones Azure evidence quotes
PCR_SIZE = 32  # SHA-256, the bank Azure evidence quotes
_U32 = 0xFFFF_FFFF
_U64 = (1 << 64) - 1


@dataclasses.dataclass(frozen=True)
class TcbMinimum:
    """Per-component TCB floor. A component left None is unchecked; ``fmc`` exists
    only on Turin and later, so on older products it is reported as not applicable
    rather than failed: there is no FMC firmware there to be out of date."""

    bootloader: Optional[int] = None
    tee: Optional[int] = None
    snp: Optional[int] = None
    microcode: Optional[int] = None
    fmc: Optional[int] = None

    def __post_init__(self) -> None:
        for comp, value in self.required().items():
            if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= _U8:
                raise ConfigError(f"TcbMinimum.{comp}: {value!r} is not an integer 0..255")

    def required(self) -> Dict[str, int]:
        """The configured components, in KDS order."""
        out: Dict[str, int] = {}
        for comp in TCB_COMPONENTS:
            value = getattr(self, comp)
            if value is not None:
                out[comp] = value
        return out

    def __str__(self) -> str:
        return " ".join(f"{k}={v}" for k, v in self.required().items())


@dataclasses.dataclass(frozen=True)
class AppraisalPolicy:
    """A set of rules a verified report must satisfy. Every field defaults to None,
    meaning "unchecked", so the empty policy accepts every report and yields no
    checks; each configured field yields exactly one check named ``policy.<rule>``.

    TOML schema (flat keys; :func:`load_policies` reads the same keys from
    ``[policy.NAME]`` tables). Hex accepts plain or ``0x``-prefixed digits in any
    case; "hex or list" means one value or a list of allowed values ("any of").

    Guest POLICY (a maximum, as in go-sev-guest):
      ``minimum_abi = "MAJOR.MINOR"``     POLICY.ABI_MAJOR.ABI_MINOR >= this
      ``allow_debug``, ``allow_migrate_ma``, ``allow_smt``, ``allow_cxl`` (bool)
                                          false: the bit must be clear
      ``require_single_socket``, ``require_mem_aes_256_xts``, ``require_rapl_dis``,
      ``require_ciphertext_hiding``, ``require_page_swap_disable`` (bool)
                                          true: the bit must be set
      ``strict_policy`` (bool)            true: POLICY bits 26-63 must be clear
    Identity:
      ``minimum_guest_svn`` (u32)
      ``report_data``   hex or list, up to 64 bytes, zero-padded on the right
      ``host_data`` (32), ``measurement`` (48), ``family_id`` (16), ``image_id`` (16),
      ``report_id`` (32), ``report_id_ma`` (32): hex or list, exact length
      ``chip_id``       hex or list, 64 bytes, or 8 bytes (a Turin hwID, zero-padded)
      ``id_key_digest``, ``author_key_digest`` (48): hex or list, exact length; the
                        report's field as it is (snpguest's ``--id-key-digest`` and
                        ``--author-key-digest``; AUTHOR_KEY_EN is not consulted)
      ``vmpl``          integer 0-3 or list of them
    Firmware and TCB:
      ``minimum_build`` (u8)              CURRENT_BUILD >= this
      ``minimum_version = "MAJOR.MINOR"`` CURRENT_MAJOR.CURRENT_MINOR >= this
      ``permit_provisional_firmware`` (bool)
                                          false: COMMITTED == CURRENT (TCB, version,
                                          build); true: COMMITTED <= CURRENT
      ``require_current_ge_committed`` (bool)  CURRENT_TCB >= COMMITTED_TCB
      ``[minimum_tcb.reported]``, ``.committed``, ``.launch``, ``.current``: tables of
      ``bootloader``, ``tee``, ``snp``, ``microcode``, ``fmc`` (u8 each; components
      decoded with the product's layout; absent components are unchecked)
    PLATFORM_INFO (a maximum; unknown bits never fail unless strict):
      ``platform_allow_smt_en``, ``platform_allow_tsme_en``, ``platform_allow_tio_en``
      ``platform_require_ecc_en``, ``platform_require_rapl_dis``,
      ``platform_require_ciphertext_hiding_en``, ``platform_require_alias_check_complete``
      ``strict_platform_info`` (bool)     true: bits other than 0-5 and 7 must be clear
    Mitigation vectors (v5 reports; a v2-v4 report fails a non-zero requirement):
      ``minimum_launch_mit_vector``, ``minimum_current_mit_vector``: required-bits mask,
      integer or hex string (TOML integers stop at 2**63-1)
    Keys:
      ``require_author_key`` (bool)       KEY_INFO.AUTHOR_KEY_EN must be 1
      ``require_id_block`` (bool)         ID_KEY_DIGEST must be non-zero
      ``trusted_id_key_digests``, ``trusted_author_key_digests``: hex or list (48 bytes)
      ``trusted_id_keys``, ``trusted_author_keys``: PEM EC P-384 public keys or
      certificates (a string or list), merged into the digest lists above.
      With either list set, the ID key must be trusted: its digest is listed, or the
      author key is enabled and its digest is listed.
    Azure vTPM evidence (VerifyEvidence and ``snpctl verify evidence``; a bare report
    has neither, so these rules fail it rather than pass unchecked):
      ``[pcrs]``        PCR index (0-23) = SHA-256 value, hex or list: the quoted PCRs
      ``[vm_configuration]``  key = boolean or string: the runtime JSON's
                        ``vm-configuration`` must hold each key with that value
                        (``secure-boot = true``, ``console-enabled = false``...)
    """

    # Guest POLICY
    minimum_abi: Optional[Tuple[int, int]] = None
    allow_debug: Optional[bool] = None
    allow_migrate_ma: Optional[bool] = None
    allow_smt: Optional[bool] = None
    allow_cxl: Optional[bool] = None
    require_single_socket: Optional[bool] = None
    require_mem_aes_256_xts: Optional[bool] = None
    require_rapl_dis: Optional[bool] = None
    require_ciphertext_hiding: Optional[bool] = None
    require_page_swap_disable: Optional[bool] = None
    strict_policy: Optional[bool] = None
    # Identity
    minimum_guest_svn: Optional[int] = None
    report_data: Optional[Tuple[bytes, ...]] = None
    host_data: Optional[Tuple[bytes, ...]] = None
    measurement: Optional[Tuple[bytes, ...]] = None
    family_id: Optional[Tuple[bytes, ...]] = None
    image_id: Optional[Tuple[bytes, ...]] = None
    report_id: Optional[Tuple[bytes, ...]] = None
    report_id_ma: Optional[Tuple[bytes, ...]] = None
    chip_id: Optional[Tuple[bytes, ...]] = None
    id_key_digest: Optional[Tuple[bytes, ...]] = None
    author_key_digest: Optional[Tuple[bytes, ...]] = None
    vmpl: Optional[Tuple[int, ...]] = None
    # Firmware and TCB
    minimum_build: Optional[int] = None
    minimum_version: Optional[Tuple[int, int]] = None
    permit_provisional_firmware: Optional[bool] = None
    require_current_ge_committed: Optional[bool] = None
    minimum_reported_tcb: Optional[TcbMinimum] = None
    minimum_committed_tcb: Optional[TcbMinimum] = None
    minimum_launch_tcb: Optional[TcbMinimum] = None
    minimum_current_tcb: Optional[TcbMinimum] = None
    # PLATFORM_INFO
    platform_allow_smt_en: Optional[bool] = None
    platform_allow_tsme_en: Optional[bool] = None
    platform_allow_tio_en: Optional[bool] = None
    platform_require_ecc_en: Optional[bool] = None
    platform_require_rapl_dis: Optional[bool] = None
    platform_require_ciphertext_hiding_en: Optional[bool] = None
    platform_require_alias_check_complete: Optional[bool] = None
    strict_platform_info: Optional[bool] = None
    # Mitigation vectors
    minimum_launch_mit_vector: Optional[int] = None
    minimum_current_mit_vector: Optional[int] = None
    # Keys
    require_author_key: Optional[bool] = None
    require_id_block: Optional[bool] = None
    trusted_id_key_digests: Optional[Tuple[bytes, ...]] = None
    trusted_author_key_digests: Optional[Tuple[bytes, ...]] = None
    # Azure vTPM evidence
    pcrs: Optional[Tuple[Tuple[int, Tuple[bytes, ...]], ...]] = None
    vm_configuration: Optional[Tuple[Tuple[str, Union[bool, str]], ...]] = None

    def __post_init__(self) -> None:
        # A bare bytes value where a tuple belongs would turn "equals" into
        # "is a substring of": refuse it instead of appraising wrongly.
        sized = dict(_MATCH_FIELDS, trusted_id_key_digests=_DIGEST_SIZE,
                     trusted_author_key_digests=_DIGEST_SIZE)
        for field, size in sized.items():
            values = getattr(self, field)
            if values is None:
                continue
            if not isinstance(values, tuple) or not values or not all(
                    isinstance(v, bytes) and len(v) == size for v in values):
                raise ConfigError(
                    f"AppraisalPolicy.{field}: expected a non-empty tuple of {size}-byte values")
        if self.vmpl is not None and (not isinstance(self.vmpl, tuple) or not self.vmpl or not all(
                type(v) is int and 0 <= v <= 3 for v in self.vmpl)):
            raise ConfigError("AppraisalPolicy.vmpl: expected a non-empty tuple of integers 0..3")
        if self.pcrs is not None and (not isinstance(self.pcrs, tuple) or not self.pcrs or not all(
                isinstance(item, tuple) and len(item) == 2 and type(item[0]) is int
                and 0 <= item[0] < MAX_PCRS and isinstance(item[1], tuple) and item[1]
                and all(isinstance(v, bytes) and len(v) == PCR_SIZE for v in item[1])
                for item in self.pcrs)):
            raise ConfigError("AppraisalPolicy.pcrs: expected a non-empty tuple of (index 0..23, "
                              "non-empty tuple of 32-byte values)")
        if self.vm_configuration is not None and (
                not isinstance(self.vm_configuration, tuple) or not self.vm_configuration
                or not all(isinstance(item, tuple) and len(item) == 2
                           and isinstance(item[0], str) and isinstance(item[1], (bool, str))
                           for item in self.vm_configuration)):
            raise ConfigError("AppraisalPolicy.vm_configuration: expected a non-empty tuple of "
                              "(key, boolean or string)")

    @property
    def evidence_rules(self) -> bool:
        """Whether this policy has rules only vTPM evidence can satisfy."""
        return self.pcrs is not None or self.vm_configuration is not None

    def report_rules(self) -> AppraisalPolicy:
        """This policy without its evidence rules: what the SNP report inside Azure
        evidence is appraised against (trust.azure appraises the rest)."""
        return dataclasses.replace(self, pcrs=None, vm_configuration=None)

    # -- loading -------------------------------------------------------------

    @classmethod
    def from_mapping(cls, data: Mapping[str, object], *, name: str = "policy") -> AppraisalPolicy:
        """Build a policy from parsed TOML (or JSON). Strict on purpose: a typo in a
        security policy must be an error, never a silently unchecked rule."""
        reader = _Reader(name)
        kinds: Dict[str, Kind] = {key: _bound(reader, read) for key, read in _KEYS.items()}
        kinds.update(minimum_tcb=reader.minimum_tcb, trusted_id_keys=reader.pem_keys,
                     trusted_author_keys=reader.pem_keys)
        values = read_table("", data, kinds, name=name)
        # minimum_tcb sets up to four fields; PEM keys join the digests they stand for.
        extra_id: List[bytes] = values.pop("trusted_id_keys", [])
        extra_author: List[bytes] = values.pop("trusted_author_keys", [])
        kwargs: Dict[str, Any] = values.pop("minimum_tcb", {})
        kwargs.update(values)
        for field, extra in (("trusted_id_key_digests", extra_id),
                             ("trusted_author_key_digests", extra_author)):
            if extra:
                kwargs[field] = _dedupe(tuple(kwargs.get(field) or ()) + tuple(extra))
        return cls(**kwargs)

    @classmethod
    def expecting(cls, values: Mapping[str, bytes]) -> AppraisalPolicy:
        """A policy of exact values (snpguest's ``-m``, ``-d``, ``-r``,
        ``--id-key-digest``, ``--author-key-digest``; see :func:`expected_value`):
        each report field named in ``values`` must equal its value."""
        unknown = sorted(set(values) - set(_MATCH_FIELDS))
        if unknown:
            raise ConfigError(f"AppraisalPolicy.expecting: unknown field {unknown[0]!r} "
                              f"(expected some of {', '.join(_MATCH_FIELDS)})")
        kwargs: Dict[str, Any] = {field: (bytes(value),) for field, value in values.items()}
        return cls(**kwargs)

    @classmethod
    def from_toml(cls, text: str, *, name: str = "policy") -> AppraisalPolicy:
        """Parse one policy written as a flat TOML table of the keys above."""
        doc = parse_toml(text, source=name)
        policies = doc.get("policy")
        if isinstance(policies, Mapping):
            raise ConfigError(
                f"{name}: this document holds [policy.NAME] tables "
                f"({', '.join(map(str, policies)) or 'none'}); load it with load_policies")
        return cls.from_mapping(doc, name=name)

    # -- appraisal -----------------------------------------------------------

    def appraise(self, report: AttestationReport, product: Product) -> Tuple[Check, ...]:
        """Judge a report that verification has already accepted. ``product`` picks
        the TCB layout (it is not in v2 reports). One check per configured rule."""
        checks: List[Check] = []
        add = checks.append
        policy = report.policy
        where = f"guest policy 0x{policy.raw:x}"

        if self.minimum_abi is not None:
            have = (policy.abi_major, policy.abi_minor)
            add(_compare("policy.minimum_abi", have >= self.minimum_abi,
                         f"guest policy ABI minimum {_mm(have)}", ">=", _mm(self.minimum_abi)))
        for field, bit, require in _POLICY_FLAG_RULES:
            setting = getattr(self, field)
            if setting is not None:
                add(_flag_check(f"policy.{bit}", bit, policy.flag(bit), setting, require, where))
        if self.strict_policy is not None:
            add(_unknown_bits_check("policy.unknown_bits", where, policy.unknown_bits,
                                    self.strict_policy, "26-63"))

        if self.minimum_guest_svn is not None:
            add(_compare("policy.minimum_guest_svn", report.guest_svn >= self.minimum_guest_svn,
                         f"GUEST_SVN {report.guest_svn}", ">=", str(self.minimum_guest_svn)))
        for field in _MATCH_FIELDS:
            allowed: Optional[Tuple[bytes, ...]] = getattr(self, field)
            if allowed is not None:
                add(_match_check(field, getattr(report, field), allowed))
        if self.vmpl is not None:
            ok = report.vmpl in self.vmpl
            want = " or ".join(map(str, self.vmpl))
            add(Check("policy.vmpl", _status(ok),
                      f"VMPL {report.vmpl} {'is' if ok else 'is not'} {want}"))

        if self.minimum_build is not None:
            add(_compare("policy.minimum_build", report.current.build >= self.minimum_build,
                         f"CURRENT_BUILD {report.current.build}", ">=", str(self.minimum_build)))
        if self.minimum_version is not None:
            have = (report.current.major, report.current.minor)
            add(_compare("policy.minimum_version", have >= self.minimum_version,
                         f"current firmware {_mm(have)}", ">=", _mm(self.minimum_version)))
        if self.permit_provisional_firmware is not None:
            add(self._provisional(report, product))
        if self.require_current_ge_committed is not None:
            current, committed = report.tcb("current", product), report.tcb("committed", product)
            ok = current >= committed
            if self.require_current_ge_committed:
                add(Check("policy.current_ge_committed", _status(ok),
                          f"current TCB {current} {'>=' if ok else 'is not >='} "
                          f"committed TCB {committed}"))
            else:
                add(Check.passed("policy.current_ge_committed",
                                 f"not required (current TCB {current}, committed {committed})"))
        for kind in TCB_KINDS:
            minimum: Optional[TcbMinimum] = getattr(self, f"minimum_{kind}_tcb")
            if minimum is not None:
                add(_tcb_check(kind, report, product, minimum))

        info = report.platform_info
        pwhere = f"platform info 0x{info.raw:x}"
        for field, bit, require in _PLATFORM_FLAG_RULES:
            setting = getattr(self, field)
            if setting is not None:
                add(_flag_check(f"policy.platform_info.{bit}", bit, info.flag(bit), setting,
                                require, pwhere))
        if self.strict_platform_info is not None:
            add(_unknown_bits_check("policy.platform_info.unknown_bits", pwhere,
                                    info.unknown_bits, self.strict_platform_info, "6 and 8-63"))

        for kind in ("launch", "current"):
            mask: Optional[int] = getattr(self, f"minimum_{kind}_mit_vector")
            if mask is not None:
                add(_mit_check(kind, report, mask))

        if self.require_author_key is not None:
            add(_flag_check("policy.author_key", "author_key_en", report.key_info.author_key_en,
                            self.require_author_key, True, f"key info 0x{report.key_info.raw:x}"))
        if self.require_id_block is not None:
            present = any(report.id_key_digest)
            detail = ("ID block present (ID_KEY_DIGEST non-zero)" if present
                      else "no ID block (ID_KEY_DIGEST is zero)")
            ok = present or not self.require_id_block
            add(Check("policy.id_block", _status(ok),
                      detail + ("" if ok else ", but one is required")
                      + ("" if self.require_id_block else " (not required)")))
        if self.trusted_id_key_digests is not None or self.trusted_author_key_digests is not None:
            add(self._id_key_trust(report))
        for rule in ("pcrs", "vm_configuration"):
            if getattr(self, rule) is not None:  # fail closed: a bare report has no vTPM
                add(Check.failed(f"policy.{rule}", "a bare SNP report has no vTPM quote or "
                                 "runtime data; this rule applies to Azure vTPM evidence "
                                 "(VerifyEvidence, snpctl verify evidence)"))
        return tuple(checks)

    def _provisional(self, report: AttestationReport, product: Product) -> Check:
        """Provisional firmware is a live update not yet committed: it can still be
        rolled back, so by default the committed and current versions must agree."""
        name = "policy.provisional_firmware"
        current, committed = report.tcb("current", product), report.tcb("committed", product)
        cur_fw = (report.current.major, report.current.minor, report.current.build)
        com_fw = (report.committed.major, report.committed.minor, report.committed.build)
        if self.permit_provisional_firmware:
            tcb_ok, fw_ok, op = committed <= current, com_fw <= cur_fw, "<="
        else:
            tcb_ok = committed.components() == current.components()
            fw_ok, op = com_fw == cur_fw, "=="
        problems = []
        if not tcb_ok:
            problems.append(f"committed TCB {committed} is not {op} current TCB {current}")
        if not fw_ok:
            problems.append(f"committed firmware {report.committed} is not {op} "
                            f"current {report.current}")
        mode = "permitted" if self.permit_provisional_firmware else "not permitted"
        if problems:
            return Check.failed(name, f"provisional firmware {mode}: " + "; ".join(problems))
        return Check.passed(name, f"provisional firmware {mode}: committed TCB {committed} {op} "
                                  f"current TCB {current}; committed firmware "
                                  f"{report.committed} {op} current {report.current}")

    def _id_key_trust(self, report: AttestationReport) -> Check:
        name = "policy.id_key"
        id_digest, author_digest = report.id_key_digest, report.author_key_digest
        if not any(id_digest):
            return Check.failed(name, "no ID block (ID_KEY_DIGEST is zero); a trusted ID key "
                                      "is required")
        trusted_ids = self.trusted_id_key_digests or ()
        trusted_authors = self.trusted_author_key_digests or ()
        if id_digest in trusted_ids:
            return Check.passed(name, f"ID key {id_digest.hex()} is a trusted ID key")
        author_en = report.key_info.author_key_en
        if author_en and author_digest in trusted_authors:
            return Check.passed(name, f"ID key {id_digest.hex()} is signed by trusted author "
                                      f"key {author_digest.hex()}")
        reasons = [f"ID key {id_digest.hex()} is not among {len(trusted_ids)} trusted ID keys"]
        if trusted_authors and not author_en:
            reasons.append("no author key (AUTHOR_KEY_EN is 0)")
        elif trusted_authors:
            reasons.append(f"author key {author_digest.hex()} is not among "
                           f"{len(trusted_authors)} trusted author keys")
        return Check.failed(name, "; ".join(reasons))


# ---------------------------------------------------------------------------
# Check helpers


def _status(ok: bool) -> Status:
    return Status.PASS if ok else Status.FAIL


def _mm(pair: Sequence[int]) -> str:
    return f"{pair[0]}.{pair[1]}"


def _compare(name: str, ok: bool, have: str, op: str, want: str) -> Check:
    return Check(name, _status(ok), f"{have} {op if ok else 'is not ' + op} {want}")


def _flag_check(name: str, bit: str, is_set: bool, setting: bool, require: bool,
                where: str) -> Check:
    label = bit.upper()
    state = "set" if is_set else "not set"
    if require:
        if is_set or not setting:
            return Check.passed(name, f"{label} {state} in {where}"
                                      + (" (required)" if setting else " (not required)"))
        return Check.failed(name, f"{label} not set in {where}, but required")
    if not is_set or setting:
        return Check.passed(name, f"{label} {state} in {where}"
                                  + (" (allowed)" if setting else " (forbidden)"))
    return Check.failed(name, f"{label} set in {where}, but forbidden")


def _unknown_bits_check(name: str, where: str, bits: Tuple[int, ...], strict: bool,
                        span: str) -> Check:
    listed = ", ".join(map(str, bits))
    if not bits:
        return Check.passed(name, f"no unknown bits in {where}")
    if strict:
        return Check.failed(name, f"{where} sets bits unknown to this ABI revision "
                                  f"({listed}); strict mode rejects bits {span}")
    return Check.passed(name, f"{where} sets unknown bits ({listed}); ignored, not strict")


def _match_check(field: str, actual: bytes, allowed: Tuple[bytes, ...]) -> Check:
    """report_data often carries nonces or key material, so it is never logged in
    full: only the first 4 bytes, and only on failure."""
    name = f"policy.{field}"
    label = field.upper()
    ok = actual in allowed
    many = len(allowed) > 1
    if field == "report_data":
        if ok:
            return Check.passed(name, f"{label} matched"
                                      + (f" one of {len(allowed)} allowed values" if many else ""))
        return Check.failed(name, f"{label} did not match: report begins {actual[:4].hex()}, "
                                  f"expected {' or '.join(a[:4].hex() for a in allowed)} (first "
                                  "4 bytes shown)")
    if ok:
        return Check.passed(name, f"{label} {actual.hex()} matches"
                                  + (f" one of {len(allowed)} allowed values" if many else ""))
    if many:
        return Check.failed(name, f"{label} {actual.hex()} is none of the {len(allowed)} "
                                  "allowed values")
    return Check.failed(name, f"{label} {actual.hex()} is not the expected {allowed[0].hex()}")


def _tcb_check(kind: str, report: AttestationReport, product: Product,
               minimum: TcbMinimum) -> Check:
    name = f"policy.minimum_tcb.{kind}"
    tcb = report.tcb(kind, product)
    have = tcb.components()
    short: List[str] = []
    absent: List[str] = []
    for comp, floor in minimum.required().items():
        if comp not in have:
            absent.append(comp)
        elif have[comp] < floor:
            short.append(f"{comp} {have[comp]} < {floor}")
    note = (f"; {', '.join(absent)} not applicable to {product.value}" if absent else "")
    if short:
        return Check.failed(name, f"{kind} TCB {tcb} is below the minimum: "
                                  f"{', '.join(short)}{note}")
    return Check.passed(name, f"{kind} TCB {tcb} >= minimum ({minimum}){note}")


def _mit_check(kind: str, report: AttestationReport, mask: int) -> Check:
    name = f"policy.minimum_{kind}_mit_vector"
    label = f"{kind.upper()}_MIT_VECTOR"
    value: Optional[int] = getattr(report, f"{kind}_mit_vector")
    if value is None:
        if mask:
            return Check.failed(name, f"report version {report.version} has no {label} (v5 and "
                                      f"later); required bits 0x{mask:x}")
        return Check.passed(name, f"no bits required (report version {report.version} has no "
                                  f"{label})")
    missing = mask & ~value
    if missing:
        return Check.failed(name, f"{label} 0x{value:x} lacks required bits 0x{missing:x} "
                                  f"(required 0x{mask:x})")
    return Check.passed(name, f"{label} 0x{value:x} has the required bits 0x{mask:x}")


# ---------------------------------------------------------------------------
# Loading


def _type_name(value: object) -> str:
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "float"
    if isinstance(value, str):
        return "string"
    if isinstance(value, (list, tuple)):
        return "array"
    if isinstance(value, Mapping):
        return "table"
    return type(value).__name__


def _dedupe(values: Tuple[bytes, ...]) -> Tuple[bytes, ...]:
    return tuple(dict.fromkeys(values))


_MAJOR_MINOR = re.compile(r"([0-9]{1,3})\.([0-9]{1,3})")
_HEXDIGITS = frozenset(string.hexdigits)


class _Reader:
    """Typed accessors that name the full key path in every error."""

    def __init__(self, name: str) -> None:
        self.name = name

    def error(self, path: Optional[str], message: str) -> ConfigError:
        return SchemaError(path or "", message, table=self.name)

    def boolean(self, path: str, value: object) -> bool:
        if not isinstance(value, bool):
            raise self.error(path, f"expected a boolean, got {_type_name(value)}")
        return value

    def integer(self, path: str, value: object, high: int) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.error(path, f"expected an integer, got {_type_name(value)}")
        if not 0 <= value <= high:
            raise self.error(path, f"{value} is out of range 0..{high}")
        return value

    def mask(self, path: str, value: object) -> int:
        """A u64 bit mask: a TOML integer, or a hex string for bit 63."""
        if not isinstance(value, str):
            return self.integer(path, value, _U64)
        digits = self.hex_digits(path, value)
        if len(digits.lstrip("0")) > 16:
            raise self.error(path, f"{value} does not fit in 64 bits")
        return int(digits, 16)

    def major_minor(self, path: str, value: object) -> Tuple[int, int]:
        if not isinstance(value, str):
            raise self.error(path, f"expected a \"MAJOR.MINOR\" string, got {_type_name(value)}")
        m = _MAJOR_MINOR.fullmatch(value)
        if not m or int(m.group(1)) > _U8 or int(m.group(2)) > _U8:
            raise self.error(path, f"expected \"MAJOR.MINOR\" with each part 0..255, "
                                   f"got {value!r}")
        return int(m.group(1)), int(m.group(2))

    def hex_digits(self, path: str, value: object) -> str:
        """The digits of a hex string, without its optional 0x prefix."""
        if not isinstance(value, str):
            raise self.error(path, f"expected a hex string, got {_type_name(value)}")
        digits = value[2:] if value[:2] in ("0x", "0X") else value
        if not digits:
            raise self.error(path, "expected hex digits, got an empty string")
        bad = next((c for c in digits if c not in _HEXDIGITS), None)
        if bad is not None:
            raise self.error(path, f"{bad!r} is not a hex digit")
        return digits

    def hex(self, path: str, value: object, size: int, *, pad: bool = False,
            short: Optional[int] = None) -> bytes:
        """Hex of exactly ``size`` bytes; ``pad`` allows fewer (right-padded with
        zeros, as the daemon pads REPORT_DATA); ``short`` allows one other length."""
        digits = self.hex_digits(path, value)
        n = len(digits)
        if pad:
            if n > 2 * size:
                raise self.error(path, f"expected at most {2 * size} hex digits, got {n}")
            if n % 2:
                raise self.error(path, f"expected an even number of hex digits, got {n}")
            return bytes.fromhex(digits).ljust(size, b"\0")
        if short is not None and n == 2 * short:
            return bytes.fromhex(digits).ljust(size, b"\0")
        if n != 2 * size:
            alt = f" (or {2 * short})" if short is not None else ""
            raise self.error(path, f"expected {2 * size}{alt} hex digits, got {n}")
        return bytes.fromhex(digits)

    def items(self, path: str, value: object) -> List[Tuple[str, object]]:
        """One value or a non-empty list of them, each with its own path."""
        if isinstance(value, (list, tuple)):
            if not value:
                raise self.error(path, "an empty list would reject every report; "
                                       "remove the key to leave the rule unchecked")
            return [(f"{path}[{i}]", v) for i, v in enumerate(value)]
        return [(path, value)]

    def hex_list(self, path: str, value: object, size: int, *, pad: bool = False,
                 short: Optional[int] = None) -> Tuple[bytes, ...]:
        return _dedupe(tuple(self.hex(p, v, size, pad=pad, short=short)
                             for p, v in self.items(path, value)))

    def vmpl(self, path: str, value: object) -> Tuple[int, ...]:
        return tuple(dict.fromkeys(self.integer(p, v, 3) for p, v in self.items(path, value)))

    def table(self, path: str, value: object) -> Mapping[object, object]:
        if not isinstance(value, Mapping):
            raise self.error(path, f"expected a table, got {_type_name(value)}")
        return value

    def minimum_tcb(self, path: str, value: object) -> Dict[str, TcbMinimum]:
        out: Dict[str, TcbMinimum] = {}
        for kind, sub in self.table(path, value).items():
            kpath = f"{path}.{kind}"
            if kind not in TCB_KINDS:
                raise self.error(kpath, f"unknown key (expected one of {', '.join(TCB_KINDS)})")
            comps: Dict[str, int] = {}
            for comp, floor in self.table(kpath, sub).items():
                cpath = f"{kpath}.{comp}"
                if comp not in TCB_COMPONENTS:
                    raise self.error(cpath, "unknown key (expected one of "
                                            f"{', '.join(TCB_COMPONENTS)})")
                comps[str(comp)] = self.integer(cpath, floor, _U8)
            if not comps:
                raise self.error(kpath, "no component given (expected some of "
                                        f"{', '.join(TCB_COMPONENTS)})")
            out[f"minimum_{kind}_tcb"] = TcbMinimum(**comps)
        return out

    def pcrs(self, path: str, value: object) -> Tuple[Tuple[int, Tuple[bytes, ...]], ...]:
        table = self.table(path, value)
        if not table:
            raise self.error(path, "no PCR given; remove the table to leave the rule unchecked")
        out: Dict[int, Tuple[bytes, ...]] = {}
        for key, sub in table.items():
            kpath = f"{path}.{key}"
            index = str(key)
            if not index.isdigit() or not index.isascii() or int(index) >= MAX_PCRS \
                    or index != str(int(index)):
                raise self.error(kpath, f"a PCR index is 0..{MAX_PCRS - 1}")
            out[int(index)] = self.hex_list(kpath, sub, PCR_SIZE)
        return tuple(sorted(out.items()))

    def vm_configuration(self, path: str, value: object
                         ) -> Tuple[Tuple[str, Union[bool, str]], ...]:
        table = self.table(path, value)
        if not table:
            raise self.error(path, "no key given; remove the table to leave the rule unchecked")
        out: List[Tuple[str, Union[bool, str]]] = []
        for key, sub in table.items():
            kpath = f"{path}.{key}"
            if not isinstance(key, str) or not 0 < len(key) <= 64:
                raise self.error(kpath, "a vm-configuration key is 1-64 characters")
            if not isinstance(sub, (bool, str)):
                raise self.error(kpath, f"expected a boolean or a string, got {_type_name(sub)}")
            out.append((key, sub))
        return tuple(out)

    def pem_keys(self, path: str, value: object) -> List[bytes]:
        out = []
        for p, v in self.items(path, value):
            if not isinstance(v, str):
                raise self.error(p, f"expected a PEM string, got {_type_name(v)}")
            try:
                out.append(amd_key_digest(v))
            except InvalidArgument as exc:
                raise self.error(p, str(exc)) from None
        return out


def _bool_key(r: _Reader, path: str, value: object) -> object:
    return r.boolean(path, value)


def _match_key(field: str) -> Callable[[_Reader, str, object], object]:
    size = _MATCH_FIELDS[field]
    pad = field == "report_data"
    short = _TURIN_HWID_SIZE if field == "chip_id" else None
    return lambda r, path, value: r.hex_list(path, value, size, pad=pad, short=short)


_KEYS: Dict[str, Callable[[_Reader, str, object], object]] = {
    "minimum_abi": lambda r, p, v: r.major_minor(p, v),
    **{field: _bool_key for field, _, _ in _POLICY_FLAG_RULES},
    "strict_policy": _bool_key,
    "minimum_guest_svn": lambda r, p, v: r.integer(p, v, _U32),
    **{field: _match_key(field) for field in _MATCH_FIELDS},
    "vmpl": lambda r, p, v: r.vmpl(p, v),
    "minimum_build": lambda r, p, v: r.integer(p, v, _U8),
    "minimum_version": lambda r, p, v: r.major_minor(p, v),
    "permit_provisional_firmware": _bool_key,
    "require_current_ge_committed": _bool_key,
    **{field: _bool_key for field, _, _ in _PLATFORM_FLAG_RULES},
    "strict_platform_info": _bool_key,
    "minimum_launch_mit_vector": lambda r, p, v: r.mask(p, v),
    "minimum_current_mit_vector": lambda r, p, v: r.mask(p, v),
    "require_author_key": _bool_key,
    "require_id_block": _bool_key,
    "trusted_id_key_digests": lambda r, p, v: r.hex_list(p, v, _DIGEST_SIZE),
    "trusted_author_key_digests": lambda r, p, v: r.hex_list(p, v, _DIGEST_SIZE),
    "pcrs": lambda r, p, v: r.pcrs(p, v),
    "vm_configuration": lambda r, p, v: r.vm_configuration(p, v),
}

def _bound(reader: _Reader, read: Callable[[_Reader, str, object], object]) -> Kind:
    return lambda path, value: read(reader, path, value)


_POLICY_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


def policies_from_mapping(table: Mapping[str, object], *,
                          name: str = "policy") -> Dict[str, AppraisalPolicy]:
    """The ``policy`` table of a parsed config: each sub-table is one named policy.
    Names are restricted to a safe alphabet because they travel to D-Bus, varlink
    and logs."""
    if not isinstance(table, Mapping):
        raise ConfigError(f"{name}: expected [{name}.NAME] tables, got {_type_name(table)}")
    out: Dict[str, AppraisalPolicy] = {}
    for key, value in table.items():
        path = f"{name}.{key}"
        if not isinstance(key, str) or not _POLICY_NAME.fullmatch(key):
            raise ConfigError(f"{path}: a policy name is 1-64 characters of A-Z a-z 0-9 _ . - "
                              "and starts with a letter or digit")
        if not isinstance(value, Mapping):
            raise ConfigError(f"{path}: expected a [{path}] table, got {_type_name(value)}")
        out[key] = AppraisalPolicy.from_mapping(value, name=path)
    return out


def load_policies(text: str) -> Dict[str, AppraisalPolicy]:
    """Named policies from the ``[policy.NAME]`` tables of a TOML document. Other
    top-level keys are left alone: they belong to the daemon's own configuration."""
    doc = parse_toml(text, source="policy")
    if "policy" not in doc:
        return {}
    return policies_from_mapping(doc["policy"])
