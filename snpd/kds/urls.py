"""KDS URL paths, built and parsed (docs/reference/abi.md §5.1). Pure: no I/O, no HTTP library.

The client builds paths here and the loopback KDS stand-in parses them with the
same code, so the two cannot drift apart. Parsing is the inverse of building but
deliberately as lenient as the real KDS where the spec says it is (query parameter
order, zero-padded SPL values) and strict everywhere else, so that a malformed URL
built by snpd fails against the emulator exactly as it would against AMD.

This module must not import ``requests``: the command-line client imports it to
name the certificates it would fetch, and start-up time matters.
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
import types
from typing import Dict, Literal, Mapping, Optional, Tuple
from urllib.parse import parse_qsl, urlsplit

from snpd.abi.product import Endorser, Product
from snpd.abi.tcb import TcbVersion

DEFAULT_KDS_URL = "https://kdsintf.amd.com"

CHIP_ID_SIZE = 64

KdsKind = Literal["vcek", "cert_chain", "crl"]

# (query parameter, TcbVersion component) in the order the KDS documents them.
# fmcSPL exists only for the Turin layout and comes first, as snpguest sends it.
_SPL_PARAMS: Tuple[Tuple[str, str], ...] = (
    ("fmcSPL", "fmc"),
    ("blSPL", "bootloader"),
    ("teeSPL", "tee"),
    ("snpSPL", "snp"),
    ("ucodeSPL", "microcode"),
)
# A decimal byte, zero padding allowed ("05", "005"): snpguest and trustee pad to two
# digits, go-sev-guest does not, and the KDS serves both.
_SPL_VALUE = re.compile(r"[0-9]{1,3}")
_HEX = re.compile(r"[0-9a-f]+")


def _spl_params(product: Product) -> Tuple[Tuple[str, str], ...]:
    return _SPL_PARAMS if product.turin_layout else _SPL_PARAMS[1:]


def _render_vcek(product: Product, hwid: bytes, components: Mapping[str, int]) -> str:
    query = "&".join(f"{param}={components[name]:d}" for param, name in _spl_params(product))
    return f"/vcek/v1/{product.value}/{hwid.hex()}?{query}"


def vcek_path(product: Product, chip_id: bytes, tcb: TcbVersion) -> str:
    """The KDS path of the VCEK for ``chip_id`` at ``tcb`` (the report's REPORTED_TCB).

    Milan and Genoa use the full 64-byte chip id; Turin only its first 8 bytes (the KDS
    answers 404 for a 64-byte Turin id) plus an fmcSPL parameter. SPL values are
    unpadded decimal, like go-sev-guest and Oak.

    Raises ValueError for a chip id that is not 64 bytes, an all-zero id (MASK_CHIP_ID
    or a VLEK-signed report: no VCEK can be fetched for it, and asking the KDS anyway
    only burns rate limit), or a TCB decoded with the other product generation's layout.
    """
    if not isinstance(product, Product):
        raise ValueError(f"product must be a Product, not {product!r}")
    if len(chip_id) != CHIP_ID_SIZE:
        raise ValueError(f"chip id must be {CHIP_ID_SIZE} bytes, got {len(chip_id)}")
    if tcb.turin_layout != product.turin_layout:
        layout = "Turin" if tcb.turin_layout else "Milan/Genoa"
        raise ValueError(f"TCB {tcb} was decoded with the {layout} layout, not {product}'s")
    hwid = chip_id[: product.hwid_length]
    if not any(hwid):
        raise ValueError(
            "chip id is all zero (MASK_CHIP_ID set, or a VLEK-signed report): "
            "the KDS has no VCEK for it"
        )
    return _render_vcek(product, hwid, tcb.components())


def cert_chain_path(product: Product, endorser: Endorser = Endorser.VCEK) -> str:
    """Path of the PEM chain that signs ``endorser`` keys: ASK+ARK (vcek) or ASVK+ARK (vlek)."""
    return f"/{Endorser(endorser).value}/v1/{Product(product).value}/cert_chain"


def crl_path(product: Product, endorser: Endorser = Endorser.VCEK) -> str:
    """Path of the ARK-signed CRL for ``product`` under the ``endorser`` tree."""
    return f"/{Endorser(endorser).value}/v1/{Product(product).value}/crl"


@dataclasses.dataclass(frozen=True)
class KdsRequest:
    """A parsed KDS request path: what is asked for, independent of its spelling.

    ``hwid`` is what the URL carries (64 bytes for Milan/Genoa, 8 for Turin; empty
    unless ``kind`` is "vcek"). ``tcb`` maps TcbVersion component names (fmc,
    bootloader, tee, snp, microcode) to values; it is empty unless ``kind`` is "vcek".
    Two spellings of the same request (parameter order, zero padding) parse equal and
    have the same :attr:`path`, which is how the emulated KDS matches them.
    """

    kind: KdsKind
    product: Product
    endorser: Endorser
    hwid: bytes = b""
    tcb: Mapping[str, int] = dataclasses.field(default_factory=dict, hash=False)

    def __post_init__(self) -> None:
        # Read-only view of a private copy: the dataclass is frozen, its mapping too.
        object.__setattr__(self, "tcb", types.MappingProxyType(dict(self.tcb)))

    @property
    def path(self) -> str:
        """The canonical spelling: what :func:`vcek_path` and friends would build."""
        if self.kind == "vcek":
            return _render_vcek(self.product, self.hwid, self.tcb)
        if self.kind == "cert_chain":
            return cert_chain_path(self.product, self.endorser)
        return crl_path(self.product, self.endorser)

    def tcb_version(self) -> Optional[TcbVersion]:
        """The TCB a VCEK request names, or None for a chain or CRL request."""
        if self.kind != "vcek":
            return None
        return TcbVersion.from_parts(self.product, **self.tcb)


def parse_path(path: str) -> KdsRequest:
    """Parse a KDS path (with query) or full URL into a :class:`KdsRequest`.

    Accepts what the real KDS accepts for the public endpoints of spec §5.1: any
    parameter order, zero-padded decimal SPLs. Rejects everything else with
    ValueError — unknown endpoints, wrong hwid length for the product, upper-case or
    odd hex, missing, duplicate or unknown parameters, values above 255, and VLEK
    certificates by hwid (not a public endpoint).
    """
    parts = urlsplit(path)
    if parts.fragment:
        raise ValueError(f"KDS path {path!r} has a fragment")
    segments = parts.path.split("/")
    if len(segments) != 5 or segments[0] != "" or segments[2] != "v1":
        raise ValueError(f"not a KDS path: {parts.path!r}")
    _, endorser_name, _, product_name, leaf = segments
    try:
        endorser = Endorser(endorser_name)
    except ValueError:
        raise ValueError(f"unknown KDS tree {endorser_name!r} (expected vcek or vlek)") from None
    try:
        product = Product(product_name)  # exact, case-sensitive: the KDS is
    except ValueError:
        raise ValueError(
            f"unknown KDS product {product_name!r} (expected Milan, Genoa or Turin)"
        ) from None

    if leaf in ("cert_chain", "crl"):
        if parts.query:
            raise ValueError(f"KDS {leaf} takes no query, got {parts.query!r}")
        kind: KdsKind = "cert_chain" if leaf == "cert_chain" else "crl"
        return KdsRequest(kind, product, endorser)

    if endorser is not Endorser.VCEK:
        raise ValueError("VLEK certificates cannot be fetched by hwid (not a public endpoint)")
    hex_len = 2 * product.hwid_length
    if len(leaf) != hex_len or not _HEX.fullmatch(leaf):
        raise ValueError(
            f"{product} hwid must be {hex_len} lower-case hex characters, got {leaf!r}"
        )
    return KdsRequest("vcek", product, endorser, bytes.fromhex(leaf),
                      _parse_spl_query(parts.query, product))


def _parse_spl_query(query: str, product: Product) -> Dict[str, int]:
    try:
        pairs = parse_qsl(query, keep_blank_values=True, strict_parsing=True)
    except ValueError:
        raise ValueError(f"malformed KDS query {query!r}") from None
    expected = dict(_spl_params(product))
    values: Dict[str, int] = {}
    for param, value in pairs:
        name = expected.get(param)
        if name is None:
            raise ValueError(f"unknown KDS parameter {param!r} for {product}")
        if name in values:
            raise ValueError(f"duplicate KDS parameter {param!r}")
        if not _SPL_VALUE.fullmatch(value) or int(value) > 255:
            raise ValueError(f"KDS parameter {param}={value!r} is not a decimal byte")
        values[name] = int(value)
    missing = [param for param, name in expected.items() if name not in values]
    if missing:
        raise ValueError(f"KDS query for {product} lacks {', '.join(missing)}")
    # Components in KDS order, whatever order the query used.
    return {name: values[name] for name in expected.values()}


def chip_digest(hwid: bytes) -> str:
    """A short SHA-256 tag for a chip id, for logs and error messages.

    Full chip ids are never logged (docs/architecture.md, "Security model"). A Turin
    hwid (8 bytes) is zero-padded to the 64-byte CHIP_ID it came from, so the tag
    matches the one for the report's id.
    """
    return "chip-sha256:" + hashlib.sha256(hwid.ljust(CHIP_ID_SIZE, b"\0")).hexdigest()[:16]


_VCEK_HWID = re.compile(r"(/vcek/v1/[A-Za-z]+/)([0-9A-Fa-f]{16,128})(?=[?#]|$)")


def redact_url(url: str) -> str:
    """``url`` with a VCEK hwid replaced by :func:`chip_digest`; other URLs unchanged.

    KDS error messages name the URL so that an operator can retry it by hand, but they
    end up in the journal, where a full chip id must not. Works on bare paths and on
    full URLs, mirror prefixes included.
    """

    def _tag(match: re.Match[str]) -> str:
        hwid = match.group(2)
        digest = chip_digest(bytes.fromhex(hwid)) if len(hwid) % 2 == 0 else "chip-?"
        return f"{match.group(1)}<{digest}>"

    return _VCEK_HWID.sub(_tag, url)


def join_url(base: str, path: str) -> str:
    """``base`` (scheme, host and optional prefix, e.g. a mirror) joined with a KDS path."""
    if not path.startswith("/"):
        raise ValueError(f"KDS path must start with '/': {path!r}")
    return base.rstrip("/") + path
