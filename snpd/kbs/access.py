"""Who may fetch which KBS resource: the ``allow`` rules of ``[kbs.NAME]``. Pure.

A rule names callers (``groups`` by name, ``uids``) and resource patterns
(``REPOSITORY/TYPE/TAG``, where ``*`` matches exactly one whole segment). A caller
may fetch a resource when one rule names both. Nothing is allowed by default, root
included: a secret is released by the rule that names its reader, so an operator can
read from the configuration alone who gets what. ``token = true`` also lets the
rule's callers have the attestation token, which is a bearer credential for every
resource the KBS would release to this VM, so no pattern grants it.
"""

from __future__ import annotations

import dataclasses
import re
from typing import AbstractSet, Callable, FrozenSet, Mapping, Optional, Sequence, Tuple

SEGMENT = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")
"""One segment of a resource path: what the daemon accepts from callers and in rules.
A conservative subset of what Trustee's repositories accept; never '.' or '..'."""
MAX_PATH = 3 * 128 + 2


def split_resource_path(path: object) -> Optional[Tuple[str, str, str]]:
    """REPOSITORY/TYPE/TAG as three segments, or None if ``path`` is not one."""
    if not isinstance(path, str) or len(path) > MAX_PATH:
        return None
    parts = path.split("/")
    if len(parts) != 3 or not all(SEGMENT.fullmatch(p) for p in parts):
        return None
    return parts[0], parts[1], parts[2]


def pattern_ok(pattern: object) -> bool:
    """A rule's resource pattern: three segments, each a segment or ``*``."""
    if not isinstance(pattern, str) or len(pattern) > MAX_PATH:
        return False
    parts = pattern.split("/")
    return len(parts) == 3 and all(p == "*" or SEGMENT.fullmatch(p) for p in parts)


def pattern_matches(pattern: str, path: str) -> bool:
    """Whether ``pattern`` (checked by :func:`pattern_ok`) covers ``path``."""
    segments = split_resource_path(path)
    if segments is None:
        return False
    return all(p == "*" or p == s for p, s in zip(pattern.split("/"), segments))


@dataclasses.dataclass(frozen=True)
class AllowRule:
    """One entry of ``allow``: who (any of ``groups`` or ``uids``) gets what."""

    groups: Tuple[str, ...] = ()
    uids: Tuple[int, ...] = ()
    resources: Tuple[str, ...] = ()
    token: bool = False

    def names(self, uid: int, gids: AbstractSet[int],
              gid_of: Mapping[str, Optional[int]]) -> bool:
        """Whether the rule names a caller with ``uid`` and ``gids``. A group that
        does not exist (``gid_of`` gives None) names nobody."""
        if uid in self.uids:
            return True
        return any(gid_of.get(g) is not None and gid_of.get(g) in gids for g in self.groups)


@dataclasses.dataclass(frozen=True)
class SecretsAccess:
    """The rules of one KBS, with group names resolved to gids when the
    configuration was (re)loaded."""

    rules: Tuple[AllowRule, ...] = ()
    gid_of: Mapping[str, Optional[int]] = dataclasses.field(default_factory=dict)

    @classmethod
    def resolve(cls, rules: Sequence[AllowRule],
                lookup: Callable[[str], Optional[int]]) -> SecretsAccess:
        groups = {g for rule in rules for g in rule.groups}
        return cls(tuple(rules), {g: lookup(g) for g in sorted(groups)})

    def may_fetch(self, uid: int, gids: AbstractSet[int], path: str) -> bool:
        return any(rule.names(uid, gids, self.gid_of)
                   and any(pattern_matches(p, path) for p in rule.resources)
                   for rule in self.rules)

    def may_have_token(self, uid: int, gids: AbstractSet[int]) -> bool:
        return any(rule.token and rule.names(uid, gids, self.gid_of) for rule in self.rules)

    @property
    def unknown_groups(self) -> FrozenSet[str]:
        return frozenset(g for g, gid in self.gid_of.items() if gid is None)
