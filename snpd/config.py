"""The daemon's configuration, ``/etc/snpd/snpd.toml``, as frozen values.

Every key has a default, so an empty file or no file at all is a valid
configuration: the package works out of the box and the shipped file
(``conf/snpd.toml``) only documents the defaults, commented out.

Parsing is strict on purpose. A misspelt key that silently left its default in
force (``report_grups = []`` keeping ``snpd-users`` able to get reports, say)
would be a security bug, so unknown sections and keys are errors, booleans are
TOML booleans only, and every error names the full key (``queue.max_pendng``),
what was expected and what was given. ``snpd --check-config`` prints exactly
that message, so an operator can fix a file before reloading the daemon.

Validation lives in the section dataclasses themselves (``__post_init__``), so
a configuration built in code (tests, the emulator tooling) obeys the same
rules as one read from a file; the TOML and mapping entry points only add the
checks for unknown names and the file name in front of the message.

The ``[policy.NAME]`` tables are appraisal policies, parsed by
:func:`snpd.trust.appraisal.policies_from_mapping` so that ``snpctl verify
attestation --policy FILE`` and the daemon accept exactly the same schema.

``[emulator]``: this module owns ``state_dir`` and ``product``; the other keys
describe the emulated guest and are defined and checked by
``snpd.emulator.launch.EmulatorConfig.from_mapping`` (see :class:`EmulatorSection`).
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import math
import re
import types
from dataclasses import field
from pathlib import Path
from typing import (
    Any,
    Callable,
    ClassVar,
    Dict,
    Mapping,
    Optional,
    Tuple,
    Type,
    TypeVar,
)
from urllib.parse import urlsplit

from snpd.abi.product import Product
from snpd.device import BACKENDS
from snpd.emulator.launch import EmulatorConfig
from snpd.errors import ConfigError
from snpd.files import read_toml
from snpd.kbs.access import AllowRule, pattern_ok
from snpd.schema import (
    MAX_TOML_SIZE,
    Kind,
    SchemaError,
    boolean,
    choice,
    integer,
    key_text,
    list_of,
    parse_toml,
    seconds,
    show,
    unknown_key,
)
from snpd.trust.appraisal import AppraisalPolicy, TcbMinimum, policies_from_mapping

__all__ = [
    "DEFAULT_CONFIG_PATH",
    "MAX_CONFIG_SIZE",
    "AccessSection",
    "Config",
    "DbusSection",
    "DeviceSection",
    "EmulatorSection",
    "KbsEndpoint",
    "KdsSection",
    "LogSection",
    "QueueSection",
    "VarlinkSection",
    "load_config",
    "parse_config",
]

DEFAULT_CONFIG_PATH = Path("/etc/snpd/snpd.toml")
DEFAULT_SOURCE = "snpd.toml"
# A configuration is a few kilobytes; the cap keeps a wrong --config (a log, a
# disk image) from being read whole into the daemon.
MAX_CONFIG_SIZE = MAX_TOML_SIZE

# [log] level -> the highest syslog priority (journald PRIORITY=) the daemon emits.
# The one table: start-up and reload both read it (LogSection.max_priority).
LOG_LEVELS = {"debug": 7, "info": 6, "notice": 5, "warning": 4, "error": 3}
BUS_NAMES = ("system", "session")

_MAX_PATH = 4096
_MAX_URL = 2048
_MAX_STRING = 1024
_MAX_MIRRORS = 16
_MAX_DEPTH = 16
_MIB = 1 << 20

def _error(path: str, message: str) -> ConfigError:
    return SchemaError(path, message)


# ---------------------------------------------------------------------------
# Value kinds: each takes (path, value) and returns the canonical value or raises
# a ConfigError naming the path. They accept the TOML form (str, list) and the
# canonical form (Path, tuple), so that sections built in code validate too.

_Kind = Kind


def _abs_path(path: str, value: object) -> Path:
    if isinstance(value, Path):
        value = str(value)
    if not isinstance(value, str) or not value.startswith("/"):
        raise _error(path, f"expected an absolute path, got {show(value)}")
    if "\0" in value or len(value) > _MAX_PATH:
        raise _error(path, f"{show(value)} is not a usable path")
    return Path(value)


def _tpm_spec(path: str, value: object) -> str:
    """A TPM: a character device's absolute path, or ``unix:`` and a socket's."""
    text = value if isinstance(value, str) else ""
    _abs_path(path, text[len("unix:"):] if text.startswith("unix:") else value)
    return text


def _url(path: str, value: object) -> str:
    """http(s)://host[:port][/prefix]: the same rule as KdsClient, checked at load
    time so that a bad mirror is a config error, not a failure on first fetch."""
    if not isinstance(value, str):
        raise _error(path, f"expected an http(s) URL, got {show(value)}")
    bad = (len(value) > _MAX_URL or any(c.isspace() or not c.isprintable() for c in value))
    try:
        parts = urlsplit(value)
        parts.port  # noqa: B018  # raises ValueError on a bad port
    except ValueError:
        bad = True
    else:
        bad = bad or parts.scheme not in ("http", "https") or not parts.hostname
    if bad:
        raise _error(path, f"expected an http(s) URL, got {show(value)}")
    if parts.query or parts.fragment:
        raise _error(path, f"{show(value)} must not carry a query or fragment")
    return value


def _optional_url(path: str, value: object) -> str:
    """An http(s) URL with a path, or "" (off)."""
    if value == "":
        return ""
    return _url(path, value)


_GROUP_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]{0,255}")


def _group(path: str, value: object) -> str:
    if not isinstance(value, str) or not _GROUP_NAME.fullmatch(value):
        raise _error(path, f"expected a group name, got {show(value)}")
    return value


_BUS_ADDRESS = re.compile(
    r"[A-Za-z][A-Za-z0-9-]*:(?:[A-Za-z0-9_-]+=[^;,=\s]*(?:,[A-Za-z0-9_-]+=[^;,=\s]*)*)?")


def _bus(path: str, value: object) -> str:
    """``system``, ``session``, or a D-Bus address such as ``unix:path=/run/x``
    (several separated by ``;``, as in DBUS_SYSTEM_BUS_ADDRESS)."""
    if isinstance(value, str) and value in BUS_NAMES:
        return value
    if (isinstance(value, str) and 0 < len(value) <= _MAX_STRING and value.isascii()
            and all(_BUS_ADDRESS.fullmatch(part) for part in value.split(";"))):
        return value
    raise _error(path, f"expected \"system\", \"session\" or a D-Bus address such as "
                       f"\"unix:path=/run/dbus/system_bus_socket\", got {show(value)}")


def _product(path: str, value: object) -> Product:
    if isinstance(value, Product):
        return value
    names = [p.value for p in Product]
    if not isinstance(value, str) or value not in names:
        raise _error(path, f"expected one of {', '.join(names)}, got {show(value)}")
    return Product(value)


def _kind(kind: _Kind) -> Mapping[str, _Kind]:
    """Field metadata: the kind that validates and normalizes the field."""
    return {"kind": kind}


# ---------------------------------------------------------------------------
# Sections

_S = TypeVar("_S", bound="_Section")


class _Section:
    """Shared behaviour of the ``[NAME]`` sections: field kinds in the dataclass
    metadata drive validation, the unknown-key check and the JSON form."""

    NAME: ClassVar[str]
    __dataclass_fields__: ClassVar[Dict[str, dataclasses.Field[Any]]]

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            kind: Optional[_Kind] = f.metadata.get("kind")
            if kind is not None:
                value = kind(f"{self.NAME}.{f.name}", getattr(self, f.name))
                object.__setattr__(self, f.name, value)
        self._check()

    def _check(self) -> None:
        """Rules that tie keys of one section together."""

    @classmethod
    def key_names(cls) -> Tuple[str, ...]:
        """The TOML keys of this section, in documentation order."""
        return tuple(f.name for f in dataclasses.fields(cls) if "kind" in f.metadata)

    @classmethod
    def from_mapping(cls: Type[_S], table: object) -> _S:
        if not isinstance(table, Mapping):
            raise _error(cls.NAME, f"expected a [{cls.NAME}] table, got {show(table)}")
        known = cls.key_names()
        kwargs: Dict[str, Any] = {}
        extra: Dict[object, object] = {}
        for key, value in table.items():
            if isinstance(key, str) and key in known:
                kwargs[key] = value
            else:
                extra[key] = value
        kwargs.update(cls._extra(extra))
        factory: Callable[..., _S] = cls
        return factory(**kwargs)

    @classmethod
    def _extra(cls, extra: Mapping[object, object]) -> Dict[str, Any]:
        """Keys this section does not define; by default, an error."""
        for key in extra:
            raise unknown_key(cls.NAME, key, cls.key_names())
        return {}

    def to_dict(self) -> Dict[str, Any]:
        """The section as JSON-ready values, under the same keys as in TOML."""
        return {name: _jsonable(getattr(self, name)) for name in self.key_names()}


@dataclasses.dataclass(frozen=True)
class DeviceSection(_Section):
    """``[device]``: which firmware channel to use and how gently to drive it."""

    NAME: ClassVar[str] = "device"

    backend: str = field(default="auto", metadata=_kind(choice(*BACKENDS)))
    path: Path = field(default=Path("/dev/sev-guest"), metadata=_kind(_abs_path))
    configfs_root: Path = field(
        default=Path("/sys/kernel/config/tsm/report"), metadata=_kind(_abs_path))
    # backend azure: the vTPM, through the kernel's resource manager, or "unix:PATH"
    # for a TPM speaking raw commands on a socket (the emulated paravisor, swtpm).
    tpm: str = field(default="/dev/tpmrm0", metadata=_kind(_tpm_spec))
    # Kernels before 6.3 (without the throttling backport) wipe the VMPCK when the
    # host answers BUSY; a minimum gap between requests keeps the host from
    # throttling. 0 turns it off, which is right on 6.3 and later.
    min_interval_ms: int = field(default=0, metadata=_kind(integer(0, 60_000)))
    request_timeout_s: float = field(default=30.0, metadata=_kind(seconds(3600)))
    busy_retries: int = field(default=3, metadata=_kind(integer(0, 100)))


@dataclasses.dataclass(frozen=True)
class QueueSection(_Section):
    """``[queue]``: bounds on waiting requests, so one client cannot starve the rest
    or grow the daemon without limit."""

    NAME: ClassVar[str] = "queue"

    max_pending: int = field(default=64, metadata=_kind(integer(1, 10_000)))
    per_client: int = field(default=8, metadata=_kind(integer(1, 10_000)))
    # Counted per uid, so one user's many connections cannot take another's share.
    per_uid: int = field(default=16, metadata=_kind(integer(1, 10_000)))
    # Requests root may queue beyond max_pending, so no other user can lock root out.
    root_reserve: int = field(default=8, metadata=_kind(integer(0, 10_000)))

    def _check(self) -> None:
        if self.per_client > self.max_pending:
            raise _error("queue.per_client", f"{self.per_client} is more than "
                                             f"queue.max_pending ({self.max_pending})")
        if self.per_uid > self.max_pending:
            raise _error("queue.per_uid", f"{self.per_uid} is more than "
                                          f"queue.max_pending ({self.max_pending})")


@dataclasses.dataclass(frozen=True)
class KdsSection(_Section):
    """``[kds]``: where AMD certificates come from and where they are kept, and how
    much of the KDS (a shared, rate-limited service) each local user may spend."""

    NAME: ClassVar[str] = "kds"

    url: str = field(default="https://kdsintf.amd.com", metadata=_kind(_url))
    mirrors: Tuple[str, ...] = field(default=(), metadata=_kind(list_of(_url, _MAX_MIRRORS)))
    # Azure's THIM endpoint (IMDS), asked first for a VCEK; "" (the default): never.
    thim: str = field(default="", metadata=_kind(_optional_url))
    timeout_s: float = field(default=60.0, metadata=_kind(seconds(3600)))
    cache_dir: Path = field(default=Path("/var/cache/snpd"), metadata=_kind(_abs_path))
    offline: bool = field(default=False, metadata=_kind(boolean))
    offline_dirs: Tuple[Path, ...] = field(default=(), metadata=_kind(list_of(_abs_path)))
    # Threads for work that may contact the KDS, apart from cache answers and
    # verification, so that a slow KDS never delays those.
    workers: int = field(default=4, metadata=_kind(integer(1, 64)))
    # Per non-root uid: calls waiting on the KDS at once, and outbound fetches (a
    # burst, then one more per interval). Beyond either a call fails Busy at once.
    per_uid_calls: int = field(default=2, metadata=_kind(integer(1, 64)))
    per_uid_fetch_burst: int = field(default=10, metadata=_kind(integer(1, 10_000)))
    per_uid_fetch_interval_s: float = field(default=60.0, metadata=_kind(seconds(86_400)))
    # A failed VCEK lookup is not asked again for this long (a 429/503 Retry-After
    # instead); at most negative_entries such failures are remembered.
    negative_ttl_s: float = field(default=600.0, metadata=_kind(seconds(86_400)))
    negative_entries: int = field(default=4096, metadata=_kind(integer(16, 1_000_000)))

    def _check(self) -> None:
        if self.per_uid_calls > self.workers:
            raise _error("kds.per_uid_calls", f"{self.per_uid_calls} is more than "
                                              f"kds.workers ({self.workers})")


@dataclasses.dataclass(frozen=True)
class AccessSection(_Section):
    """``[access]``: group names (not gids, so the file survives a reinstall) whose
    members may ask for reports, and for raw firmware keys. root always may."""

    NAME: ClassVar[str] = "access"

    report_groups: Tuple[str, ...] = field(default=("snpd-users",), metadata=_kind(list_of(_group)))
    key_groups: Tuple[str, ...] = field(default=("snpd-keys",), metadata=_kind(list_of(_group)))


@dataclasses.dataclass(frozen=True)
class DbusSection(_Section):
    """``[dbus]``: the D-Bus transport."""

    NAME: ClassVar[str] = "dbus"

    enabled: bool = field(default=True, metadata=_kind(boolean))
    bus: str = field(default="system", metadata=_kind(_bus))
    # Larger messages are skipped unread (dbus-fast alone would hold up to the bus's
    # 32 MiB per message); a VerifyReport with a whole chain is under 20 KiB.
    max_message_bytes: int = field(default=64 * 1024,
                                   metadata=_kind(integer(16 * 1024, 16 * _MIB)))
    # Properties, Introspectable and Peer calls per second per user (root: unmetered).
    cheap_calls_per_s: int = field(default=50, metadata=_kind(integer(1, 100_000)))


@dataclasses.dataclass(frozen=True)
class VarlinkSection(_Section):
    """``[varlink]``: the varlink transport. With socket activation the socket
    comes from systemd and ``socket`` only names it for clients and status."""

    NAME: ClassVar[str] = "varlink"

    enabled: bool = field(default=True, metadata=_kind(boolean))
    socket: Path = field(default=Path("/run/snpd/snpd.varlink"), metadata=_kind(_abs_path))
    # Large enough for an extended report with a full certificate chain in base64,
    # small enough that a client cannot make the daemon buffer much.
    max_message_bytes: int = field(default=_MIB, metadata=_kind(integer(64 * 1024, 64 * _MIB)))
    # Local users can open any number of connections, so what they can make the
    # daemon hold is capped per uid as well as in all; root is held to the totals
    # plus a reserve only, so that other users filling the server never lock it out.
    # 32 connections per uid are more than any client program needs at once, and
    # 8 users are needed to fill the 256 that all users share.
    max_connections: int = field(default=256, metadata=_kind(integer(1, 65_536)))
    max_connections_per_uid: int = field(default=32, metadata=_kind(integer(1, 65_536)))
    root_reserved_connections: int = field(default=16, metadata=_kind(integer(0, 65_536)))
    # Bytes of messages not yet complete (or being served), over all connections.
    # 4 MiB per uid is four largest messages at once; 32 MiB keeps the worst case
    # far below the unit's MemoryMax.
    max_buffer_bytes: int = field(default=32 * _MIB,
                                  metadata=_kind(integer(64 * 1024, 4096 * _MIB)))
    max_buffer_bytes_per_uid: int = field(default=4 * _MIB,
                                          metadata=_kind(integer(64 * 1024, 4096 * _MIB)))
    root_reserved_buffer_bytes: int = field(default=4 * _MIB,
                                            metadata=_kind(integer(0, 4096 * _MIB)))
    # Silence allowed between messages; and the deadline for the whole of a message
    # once its first byte has come (a deadline, so a byte now and then cannot hold
    # a connection forever).
    idle_timeout_s: float = field(default=60.0, metadata=_kind(seconds(86_400)))
    message_timeout_s: float = field(default=10.0, metadata=_kind(seconds(3600)))

    def _check(self) -> None:
        # A per-uid cap within the total, and room in it for one whole message.
        for key, other, relation in (("max_connections_per_uid", "max_connections", "more"),
                                     ("max_buffer_bytes_per_uid", "max_buffer_bytes", "more"),
                                     ("max_buffer_bytes_per_uid", "max_message_bytes", "less")):
            value, bound = getattr(self, key), getattr(self, other)
            if value > bound if relation == "more" else value < bound:
                raise _error(f"varlink.{key}",
                             f"{value} is {relation} than varlink.{other} ({bound})")


def _freeze(path: str, value: object, depth: int = 0) -> object:
    """A TOML value made immutable (arrays to tuples, tables to read-only
    mappings), so the frozen Config cannot be changed through a nested list."""
    if depth > _MAX_DEPTH:
        raise _error(path, f"nested more than {_MAX_DEPTH} levels deep")
    if isinstance(value, (str, bool, int, float, datetime.date, datetime.time)):
        return value
    if isinstance(value, (list, tuple)):
        return tuple(_freeze(f"{path}[{i}]", v, depth + 1) for i, v in enumerate(value))
    if isinstance(value, Mapping):
        out: Dict[str, object] = {}
        for k, v in value.items():
            if not isinstance(k, str):
                raise _error(f"{path}.{key_text(k)}", "keys must be strings")
            out[k] = _freeze(f"{path}.{key_text(k)}", v, depth + 1)
        return types.MappingProxyType(out)
    raise _error(path, f"expected a TOML value, got {show(value)}")


def _options(path: str, value: object) -> Mapping[str, object]:
    if not isinstance(value, Mapping):
        raise _error(path, f"expected a table, got {show(value)}")
    frozen = _freeze(path, value)
    assert isinstance(frozen, types.MappingProxyType)
    return frozen


@dataclasses.dataclass(frozen=True)
class EmulatorSection(_Section):
    """``[emulator]``: the software SEV-SNP platform used with ``device.backend =
    "emulator"``.

    ``state_dir`` and ``product`` are this module's; every other key of the table
    (``reported_tcb``, ``latency``, ``kernel``, ...) describes the emulated guest
    and belongs to :class:`snpd.emulator.launch.EmulatorConfig`. Those keys are kept
    as written in ``options`` (so the JSON form shows what the operator wrote and
    reads back), and are validated here by ``EmulatorConfig.from_mapping`` so that
    ``snpd --check-config`` catches their errors too. The daemon gets the parsed
    value from :meth:`emulator_config`. The launch schema is pure (no
    ``cryptography``, no state directory), so reading it costs the daemon nothing
    it does not load anyway; the arrow points down, from the daemon's configuration
    to the emulator's, and the emulator never imports this module.
    """

    NAME: ClassVar[str] = "emulator"

    state_dir: Path = field(default=Path("/var/lib/snpd/emulator"), metadata=_kind(_abs_path))
    # Genoa: EmulatorConfig's own default, so both agree when the key is absent.
    product: Product = field(default=Product.GENOA, metadata=_kind(_product))
    options: Mapping[str, object] = field(default_factory=lambda: types.MappingProxyType({}))

    def __post_init__(self) -> None:
        super().__post_init__()
        object.__setattr__(self, "options", _options("emulator", self.options))
        clash = sorted(set(self.options) & set(self.key_names()))
        if clash:
            raise _error(f"emulator.{clash[0]}", "given both as a field and in options")
        if self.options:
            self.emulator_config()

    def emulator_config(self) -> EmulatorConfig:
        """The emulated guest and platform these settings describe."""
        return EmulatorConfig.from_mapping({"product": self.product.value, **self.options})

    @classmethod
    def _extra(cls, extra: Mapping[object, object]) -> Dict[str, Any]:
        for key in extra:
            if not isinstance(key, str):
                raise _error(f"emulator.{key_text(key)}", "keys must be strings")
        return {"options": extra}

    def to_dict(self) -> Dict[str, Any]:
        out = super().to_dict()
        out.update({k: _jsonable(v) for k, v in self.options.items()})
        return out


@dataclasses.dataclass(frozen=True)
class LogSection(_Section):
    """``[log]``: the lowest journal priority the daemon emits, and how often one
    kind of event for one key (a user's refused calls, say) may be logged."""

    NAME: ClassVar[str] = "log"

    level: str = field(default="info", metadata=_kind(choice(*LOG_LEVELS)))
    # A burst of records per event type and key, then one per interval; the rest are
    # counted and reported as "suppressed N similar".
    repeat_burst: int = field(default=10, metadata=_kind(integer(1, 100_000)))
    repeat_interval_s: float = field(default=10.0, metadata=_kind(seconds(3600)))

    @property
    def max_priority(self) -> int:
        return LOG_LEVELS[self.level]


# ---------------------------------------------------------------------------
# [kbs.NAME]: Trustee Key Broker Services the daemon fetches secrets from

KBS_SECTION = "kbs"
TEE_KEYS = ("ec-p256", "ec-p521", "rsa", "rsa1_5")  # snpd.kbs.jwe.KINDS
_KBS_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_-]{0,63}")
_MAX_RULES = 64
_RULE_KEYS = ("groups", "uids", "resources", "token")


def _https_url(path: str, value: object) -> str:
    url = _url(path, value)
    if urlsplit(url).scheme != "https":
        raise _error(path, f"{show(value)} is not https: the KBS protocol relies on TLS to "
                           "authenticate the KBS")
    return url


def _uid(path: str, value: object) -> int:
    uid: int = integer(0, 2**32 - 2)(path, value)
    return uid


def _rule(path: str, value: object) -> AllowRule:
    if not isinstance(value, Mapping):
        raise _error(path, f"expected a table such as {{ groups = [\"app\"], resources = "
                           f"[\"default/*/*\"] }}, got {show(value)}")
    for key in value:
        if key not in _RULE_KEYS:
            raise unknown_key(path, key, _RULE_KEYS)
    resources = list_of(_pattern)(f"{path}.resources", value.get("resources", ()))
    rule = AllowRule(
        groups=list_of(_group)(f"{path}.groups", value.get("groups", ())),
        uids=list_of(_uid)(f"{path}.uids", value.get("uids", ())),
        resources=resources,
        token=boolean(f"{path}.token", value.get("token", False)))
    if not rule.groups and not rule.uids:
        raise _error(path, "names nobody: give groups or uids")
    if not rule.resources and not rule.token:
        raise _error(path, "grants nothing: give resources (or token = true)")
    return rule


def _pattern(path: str, value: object) -> str:
    if not pattern_ok(value):
        raise _error(path, f"expected REPOSITORY/TYPE/TAG, each a name or *, got {show(value)}")
    assert isinstance(value, str)
    return value


@dataclasses.dataclass(frozen=True)
class KbsEndpoint:
    """``[kbs.NAME]``: one Trustee KBS. Callers name it; they never pass a URL, so a
    local user cannot point the daemon's attestation at a server of their own."""

    name: str
    url: str
    # The CA that signed the KBS's certificate; None: the system's trust store.
    ca_cert: Optional[Path] = None
    # The ephemeral key the KBS encrypts resources to: EC (ECDH-ES+A256KW), RSA
    # (RSA-OAEP-256), or RSA for a KBS that only does RSA1_5 (legacy). A key takes
    # only its own alg, so a KBS cannot downgrade an "rsa" key to PKCS#1 v1.5. It is
    # made in the daemon and never leaves it.
    tee_key: str = "ec-p256"
    timeout_s: float = 30.0
    allow: Tuple[AllowRule, ...] = ()

    KEYS: ClassVar[Tuple[str, ...]] = ("url", "ca_cert", "tee_key", "timeout_s", "allow")

    def __post_init__(self) -> None:
        path = f"{KBS_SECTION}.{key_text(self.name)}"
        if not isinstance(self.name, str) or not _KBS_NAME.fullmatch(self.name):
            raise _error(path, "a KBS name is 1-64 letters, digits, '_' or '-'")
        object.__setattr__(self, "url", _https_url(f"{path}.url", self.url))
        if self.ca_cert is not None:
            object.__setattr__(self, "ca_cert", _abs_path(f"{path}.ca_cert", self.ca_cert))
        choice(*TEE_KEYS)(f"{path}.tee_key", self.tee_key)
        object.__setattr__(self, "timeout_s",
                           seconds(600)(f"{path}.timeout_s", self.timeout_s))
        rules = self.allow
        if not isinstance(rules, (list, tuple)) or len(rules) > _MAX_RULES:
            raise _error(f"{path}.allow", f"expected an array of at most {_MAX_RULES} rules")
        object.__setattr__(self, "allow", tuple(
            r if isinstance(r, AllowRule) else _rule(f"{path}.allow[{i}]", r)
            for i, r in enumerate(rules)))

    @classmethod
    def from_mapping(cls, name: object, table: object) -> KbsEndpoint:
        path = f"{KBS_SECTION}.{key_text(name)}"
        if not isinstance(table, Mapping):
            raise _error(path, f"expected a [{path}] table, got {show(table)}")
        for key in table:
            if key not in cls.KEYS:
                raise unknown_key(path, key, cls.KEYS)
        if "url" not in table:
            raise _error(f"{path}.url", "missing: the KBS's https:// URL")
        kwargs: Dict[str, Any] = dict(table)
        return cls(name=name, **kwargs)  # type: ignore[arg-type]

    def to_dict(self) -> Dict[str, Any]:
        out: Dict[str, Any] = {"url": self.url, "tee_key": self.tee_key,
                               "timeout_s": self.timeout_s,
                               "allow": [dataclasses.asdict(r) for r in self.allow]}
        if self.ca_cert is not None:
            out["ca_cert"] = str(self.ca_cert)
        for rule in out["allow"]:
            for key in ("groups", "uids", "resources"):
                rule[key] = list(rule[key])
        return out


def _kbs_endpoints(value: object) -> Mapping[str, KbsEndpoint]:
    if not isinstance(value, Mapping):
        raise _error(KBS_SECTION, f"expected [kbs.NAME] tables, got {show(value)}")
    return types.MappingProxyType(
        {str(name): KbsEndpoint.from_mapping(name, table) for name, table in value.items()})


_SECTIONS: Dict[str, Type[_Section]] = {
    cls.NAME: cls
    for cls in (DeviceSection, QueueSection, KdsSection, AccessSection, DbusSection,
                VarlinkSection, EmulatorSection, LogSection)
}
POLICY_SECTION = "policy"


# ---------------------------------------------------------------------------
# JSON


def _jsonable(value: object) -> Any:
    if isinstance(value, Product):
        return value.value
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (datetime.date, datetime.time)):
        return value.isoformat()
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, bytes):
        return value.hex()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no NaN or infinity
    return value


_TCB_FIELD = re.compile(r"minimum_(reported|committed|launch|current)_tcb")


def _policy_to_dict(policy: AppraisalPolicy) -> Dict[str, Any]:
    """A policy in the TOML schema it was read from, so the JSON of a config can be
    read back (``minimum_tcb.KIND`` tables, ``"MAJOR.MINOR"`` strings, hex)."""
    out: Dict[str, Any] = {}
    for f in dataclasses.fields(policy):
        value = getattr(policy, f.name)
        if value is None:
            continue
        tcb = _TCB_FIELD.fullmatch(f.name)
        if tcb and isinstance(value, TcbMinimum):
            out.setdefault("minimum_tcb", {})[tcb.group(1)] = value.required()
        elif f.name in ("minimum_abi", "minimum_version"):
            out[f.name] = f"{value[0]}.{value[1]}"
        elif f.name.endswith("_mit_vector"):
            # A hex string: a u64 mask does not survive JSON readers with 53-bit ints.
            out[f.name] = f"0x{value:x}"
        else:
            out[f.name] = _jsonable(value)
    return out


# ---------------------------------------------------------------------------
# The configuration


@dataclasses.dataclass(frozen=True)
class Config:
    """The whole configuration. ``Config()`` is the default configuration."""

    device: DeviceSection = field(default_factory=DeviceSection)
    queue: QueueSection = field(default_factory=QueueSection)
    kds: KdsSection = field(default_factory=KdsSection)
    access: AccessSection = field(default_factory=AccessSection)
    dbus: DbusSection = field(default_factory=DbusSection)
    varlink: VarlinkSection = field(default_factory=VarlinkSection)
    emulator: EmulatorSection = field(default_factory=EmulatorSection)
    log: LogSection = field(default_factory=LogSection)
    # [policy.NAME] tables, by name.
    policies: Mapping[str, AppraisalPolicy] = field(
        default_factory=lambda: types.MappingProxyType({}))
    # [kbs.NAME] tables, by name.
    kbs: Mapping[str, KbsEndpoint] = field(default_factory=lambda: types.MappingProxyType({}))

    def __post_init__(self) -> None:
        for name, cls in _SECTIONS.items():
            if not isinstance(getattr(self, name), cls):
                raise _error(name, f"expected a {cls.__name__}")
        if not isinstance(self.policies, Mapping):
            raise _error(POLICY_SECTION, "expected a mapping of names to AppraisalPolicy")
        for name, policy in self.policies.items():
            if not isinstance(name, str) or not isinstance(policy, AppraisalPolicy):
                raise _error(f"{POLICY_SECTION}.{key_text(name)}", "expected an AppraisalPolicy")
        object.__setattr__(self, "policies", types.MappingProxyType(dict(self.policies)))
        if not isinstance(self.kbs, Mapping) or not all(
                isinstance(e, KbsEndpoint) and e.name == n for n, e in self.kbs.items()):
            raise _error(KBS_SECTION, "expected a mapping of names to KbsEndpoint")
        object.__setattr__(self, "kbs", types.MappingProxyType(dict(self.kbs)))
        if not self.dbus.enabled and not self.varlink.enabled:
            raise _error("varlink.enabled", "false together with dbus.enabled = false "
                                            "leaves the daemon no transport to serve")

    @classmethod
    def sections(cls) -> Mapping[str, Type[_Section]]:
        """The ``[NAME]`` sections with fixed keys, by name (``policy`` aside)."""
        return types.MappingProxyType(_SECTIONS)

    @classmethod
    def from_mapping(cls, data: Mapping[str, object], *, source: str = DEFAULT_SOURCE) -> Config:
        """Build from a parsed document (TOML, or the JSON of :meth:`to_json`).
        Raises ConfigError only; its message starts with ``source``."""
        try:
            return cls._from_mapping(data)
        except ConfigError as exc:
            raise ConfigError(f"{source}: {exc}") from None

    @classmethod
    def _from_mapping(cls, data: object) -> Config:
        if not isinstance(data, Mapping):
            raise ConfigError(f"expected a TOML document (a table), got {show(data)}")
        kwargs: Dict[str, Any] = {}
        for key, value in data.items():
            if key == POLICY_SECTION:
                table: Any = value  # policies_from_mapping checks that it is a table
                kwargs["policies"] = policies_from_mapping(table, name=POLICY_SECTION)
            elif key == KBS_SECTION:
                kwargs["kbs"] = _kbs_endpoints(value)
            elif isinstance(key, str) and key in _SECTIONS:
                kwargs[key] = _SECTIONS[key].from_mapping(value)
            else:
                known = ", ".join(sorted([*_SECTIONS, POLICY_SECTION, KBS_SECTION]))
                raise _error(key_text(key), f"unknown section (known: {known})")
        return cls(**kwargs)

    def to_dict(self) -> Dict[str, Any]:
        """JSON-ready values under the TOML names; :meth:`from_mapping` reads it back."""
        out: Dict[str, Any] = {name: getattr(self, name).to_dict() for name in _SECTIONS}
        out[POLICY_SECTION] = {name: _policy_to_dict(p) for name, p in self.policies.items()}
        out[KBS_SECTION] = {name: e.to_dict() for name, e in self.kbs.items()}
        return out

    def to_json(self, *, indent: Optional[int] = 2) -> str:
        """For ``snpd --check-config --json`` and the daemon's status."""
        return json.dumps(self.to_dict(), indent=indent)


# ---------------------------------------------------------------------------
# Reading


def parse_config(text: str, *, source: str = DEFAULT_SOURCE) -> Config:
    """Parse TOML text. ``source`` (the file name) starts every error message."""
    return Config.from_mapping(parse_toml(text, source=source, limit=MAX_CONFIG_SIZE),
                               source=source)


def load_config(path: Optional[Path] = None, *,
                default_path: Optional[Path] = None) -> Config:
    """Read the configuration file.

    ``path`` None means the default file (``DEFAULT_CONFIG_PATH`` unless
    ``default_path`` says otherwise), and if that does not exist the defaults
    apply: a fresh install needs no file. A ``path`` given explicitly must exist,
    because ``--config`` naming a file that is not there is a mistake to report,
    not to paper over.
    """
    explicit = path is not None
    target = Path(path) if path is not None else (default_path or DEFAULT_CONFIG_PATH)
    doc = read_toml(target, missing_ok=not explicit, limit=MAX_CONFIG_SIZE)
    if doc is None:
        return Config()
    return Config.from_mapping(doc, source=str(target))
