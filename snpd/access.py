"""Who is calling and what they may do: below both transports, the service and events.

The transports establish a :class:`Caller` from the kernel or the bus (never from
anything the caller says); the service asks one :class:`Access` whether that caller
may call a method, by the one :data:`METHODS` table. Production and every test
double use this table, so a test cannot grant what the daemon refuses.
"""

from __future__ import annotations

import dataclasses
import enum
from typing import Dict, FrozenSet, List, Mapping, Optional, Tuple

from snpd.errors import PermissionDenied


class Permission(enum.Enum):
    PUBLIC = "public"
    MEMBER = "member"
    REPORT = "report"
    KEYS = "keys"
    MANAGE = "manage"


METHODS: Mapping[str, Permission] = {
    "GetReport": Permission.REPORT,
    "GetExtendedReport": Permission.REPORT,
    "GetCertificates": Permission.REPORT,
    "VerifyReport": Permission.REPORT,
    "VerifyEvidence": Permission.REPORT,
    "GetEvidence": Permission.REPORT,
    "DeriveKey": Permission.KEYS,
    # Bound to the caller's uid and label, so the report groups' (snpd(8)).
    "DeriveSealingKey": Permission.REPORT,
    "RefreshCertificates": Permission.MANAGE,
    # The properties hold no secrets (no full chip id, no keys), but an outsider has
    # no use for them and each read costs the daemon: root and either group, as the
    # shipped bus policy already says for D-Bus.
    "GetProperties": Permission.MEMBER,
    # Anyone may ask; the [kbs.NAME] allow rules decide per resource (snpd.secrets),
    # and nothing is allowed by default.
    "GetResource": Permission.PUBLIC,
    "GetToken": Permission.PUBLIC,
}
"""Every method of the service (transport-neutral names) and who may call it."""

_NEEDS: Mapping[Permission, str] = {
    Permission.MEMBER: "a report or key group (snpd-users, snpd-keys)",
    Permission.REPORT: "a report group (snpd-users)",
    Permission.KEYS: "a key group (snpd-keys)",
    Permission.MANAGE: "root",
}


@dataclasses.dataclass(frozen=True)
class Caller:
    """Who is calling, as the transport established it (never as the caller claims)."""

    uid: int
    gids: FrozenSet[int] = frozenset()
    pid: Optional[int] = None
    transport: str = ""
    peer: str = ""

    @property
    def client_key(self) -> Tuple[object, ...]:
        """The broker's fairness key: one queue per connection (the broker groups a
        user's connections by uid)."""
        return (self.transport, self.peer or self.pid, self.uid)

    def describe(self) -> str:
        pid = f" pid {self.pid}" if self.pid is not None else ""
        return f"uid {self.uid}{pid} via {self.transport or '?'}"


@dataclasses.dataclass(frozen=True)
class Access:
    """Who may do what: root always; report groups for attestation and sealing keys;
    key groups for raw firmware keys; management is root's."""

    report_gids: FrozenSet[int] = frozenset()
    key_gids: FrozenSet[int] = frozenset()

    def allowed(self, caller: Caller, need: Permission) -> bool:
        if need is Permission.PUBLIC or caller.uid == 0:
            return True
        if need is Permission.MEMBER:
            return bool(caller.gids & (self.report_gids | self.key_gids))
        if need is Permission.REPORT:
            return bool(caller.gids & self.report_gids)
        if need is Permission.KEYS:
            return bool(caller.gids & self.key_gids)
        return False

    def check(self, caller: Caller, need: Permission, what: str) -> None:
        if not self.allowed(caller, need):
            raise PermissionDenied(f"{what} needs {_NEEDS.get(need, 'root')}; "
                                   f"{caller.describe()} is not allowed")

    def may_call(self, caller: Caller, method: str) -> bool:
        """Whether ``caller`` may call ``method`` (a :data:`METHODS` name)."""
        return self.allowed(caller, METHODS[method])

    def check_call(self, caller: Caller, method: str) -> None:
        """PermissionDenied unless ``caller`` may call ``method``; a name the table
        does not know is a KeyError (a bug), never a grant."""
        self.check(caller, METHODS[method], method)


def proc_credentials(pid: Optional[int], uid: int, proc: str = "/proc") -> FrozenSet[int]:
    """The groups ``/proc/<pid>/status`` gives ``pid``, with SO_PEERCRED's semantics:
    its effective gid plus its supplementary groups, and only while its effective uid
    is ``uid`` (else none: deny by default; root's access does not need groups).

    The fallback where neither the kernel (SO_PEERGROUPS, Linux 4.13) nor the bus
    (UnixGroupIDs, dbus-daemon 1.10) says. It is racy where they are not: it reads
    the groups now, not at connect(); the process may have changed them since, or
    exited and its pid been reused (a pidfd would close that half of the race).
    """
    if pid is None:
        return frozenset()
    try:
        with open(f"{proc}/{pid}/status", "rb") as f:
            text = f.read(1 << 20).decode("ascii", "replace")
    except OSError:
        return frozenset()
    fields: Dict[str, List[str]] = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep:
            fields[key] = value.split()
    try:
        if int(fields["Uid"][1]) != uid:  # real, effective, saved, filesystem
            return frozenset()
        effective_gid = int(fields["Gid"][1])
        return frozenset([effective_gid, *(int(g) for g in fields.get("Groups", []))])
    except (KeyError, IndexError, ValueError):
        return frozenset()
