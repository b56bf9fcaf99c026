"""The [kbs.NAME] configuration and its allow rules (snpd.config, snpd.kbs.access)."""

from __future__ import annotations

import json
from typing import Optional

import pytest

from snpd.config import Config, KbsEndpoint, parse_config
from snpd.errors import ConfigError
from snpd.kbs.access import (
    AllowRule,
    SecretsAccess,
    pattern_matches,
    pattern_ok,
    split_resource_path,
)

GIDS = {"app": 5000, "ops": 5001}


def lookup(name: str) -> Optional[int]:
    return GIDS.get(name)


FLEET = """
[kbs.fleet]
url = "https://kbs.example:8080"
ca_cert = "/etc/snpd/kbs-ca.pem"
allow = [
  { groups = ["app"], uids = [0], resources = ["default/*/*"] },
  { uids = [1000], resources = ["team/key/one", "team/cert/*"], token = true },
  { groups = ["ghost"], resources = ["*/*/*"] },
]
"""


def test_fleet_config_parses_and_round_trips_through_json() -> None:
    cfg = parse_config(FLEET)
    fleet = cfg.kbs["fleet"]
    assert fleet.url == "https://kbs.example:8080" and fleet.tee_key == "ec-p256"
    assert str(fleet.ca_cert) == "/etc/snpd/kbs-ca.pem" and fleet.timeout_s == 30.0
    assert fleet.allow[0] == AllowRule(groups=("app",), uids=(0,), resources=("default/*/*",))
    assert fleet.allow[1].token is True
    assert Config.from_mapping(json.loads(cfg.to_json())) == cfg


def test_no_kbs_by_default() -> None:
    assert dict(Config().kbs) == {} and dict(parse_config("").kbs) == {}


@pytest.mark.parametrize("text, path", [
    ('[kbs.x]\nurl = "http://kbs:8080"', "kbs.x.url"),
    ('[kbs.x]\nca_cert = "/a"', "kbs.x.url"),
    ('[kbs.x]\nurl = "https://a"\nurls = 1', "kbs.x.urls"),
    ('[kbs.x]\nurl = "https://a"\nca_cert = "relative.pem"', "kbs.x.ca_cert"),
    ('[kbs.x]\nurl = "https://a"\ntee_key = "dsa"', "kbs.x.tee_key"),
    ('[kbs.x]\nurl = "https://a"\ntimeout_s = 0', "kbs.x.timeout_s"),
    ('[kbs.x]\nurl = "https://a"\nallow = [{ resources = ["a/b/c"] }]', "kbs.x.allow[0]"),
    ('[kbs.x]\nurl = "https://a"\nallow = [{ uids = [1] }]', "kbs.x.allow[0]"),
    ('[kbs.x]\nurl = "https://a"\nallow = [{ uids = [1], resources = ["a/b"] }]',
     "kbs.x.allow[0].resources[0]"),
    ('[kbs.x]\nurl = "https://a"\nallow = [{ uids = [1], resources = ["a/../c"] }]',
     "kbs.x.allow[0].resources[0]"),
    ('[kbs.x]\nurl = "https://a"\nallow = [{ uids = [-1], resources = ["a/b/c"] }]',
     "kbs.x.allow[0].uids[0]"),
    ('[kbs.x]\nurl = "https://a"\nallow = [{ uids = [1], resources = ["a/b/c"], tok = 1 }]',
     "kbs.x.allow[0].tok"),
    ('[kbs.x]\nurl = "https://a"\nallow = [{ groups = ["bad name"], resources = ["a/b/c"] }]',
     "kbs.x.allow[0].groups[0]"),
    ('[kbs."a b"]\nurl = "https://a"', 'kbs."a b"'),
    ('kbs = 1', "kbs"),
])
def test_config_errors_name_the_key(text: str, path: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(text)
    assert f": {path}: " in str(info.value)


def test_endpoint_built_in_code_obeys_the_same_rules() -> None:
    with pytest.raises(ConfigError):
        KbsEndpoint(name="x", url="http://a")
    with pytest.raises(ConfigError):
        KbsEndpoint(name="x", url="https://a", allow=({"uids": [1]},))  # type: ignore[arg-type]


@pytest.mark.parametrize("path, ok", [
    ("default/key/one", True), ("a.b/c_d/e-f", True), ("a/b", False), ("a/b/c/d", False),
    ("a//c", False), ("./b/c", False), ("../b/c", False), ("a/b/-c", False), ("a/b/c ", False),
    ("a/b/c\n", False), ("a/b/" + "x" * 129, False), ("*/b/c", False), (7, False),
])
def test_resource_paths(path: object, ok: bool) -> None:
    assert (split_resource_path(path) is not None) is ok


@pytest.mark.parametrize("pattern, path, match", [
    ("default/*/*", "default/key/one", True),
    ("default/*/*", "other/key/one", False),
    ("*/*/*", "x/y/z", True),
    ("a/b/*", "a/b/c", True),
    ("a/b/*", "a/bb/c", False),
    ("a/b/c", "a/b/c", True),
    ("a/*/c", "a/b/cd", False),
    ("*/*/*", "a/b", False),  # '*' is one whole segment, never several or none
    ("*/*/*", "a/b/c/d", False),
])
def test_patterns(pattern: str, path: str, match: bool) -> None:
    assert pattern_ok(pattern)
    assert pattern_matches(pattern, path) is match


@pytest.mark.parametrize("pattern", ["a/b", "a/b*/c", "**/b/c", "a/b/c/*", "", "a/./c"])
def test_bad_patterns(pattern: str) -> None:
    assert not pattern_ok(pattern)


def test_rules_decide_and_nothing_is_allowed_by_default() -> None:
    access = SecretsAccess.resolve(parse_config(FLEET).kbs["fleet"].allow, lookup)
    member, outsider = frozenset({5000}), frozenset({42})
    assert access.may_fetch(1001, member, "default/key/one")
    assert not access.may_fetch(1001, member, "team/key/one")
    assert not access.may_fetch(1001, outsider, "default/key/one")
    assert access.may_fetch(0, frozenset(), "default/key/one")  # root, by the rule's uids
    assert not access.may_fetch(0, frozenset(), "team/key/one")  # root has no blanket grant
    assert access.may_fetch(1000, outsider, "team/cert/x")
    assert not access.may_fetch(1000, outsider, "team/key/two")
    # token = true only: a resource rule does not give the token
    assert access.may_have_token(1000, frozenset())
    assert not access.may_have_token(1001, member) and not access.may_have_token(0, frozenset())
    # a group that does not exist names nobody, not "every gid that is None"
    assert access.unknown_groups == {"ghost"}
    assert not access.may_fetch(1002, frozenset({5002}), "x/y/z")
    empty = SecretsAccess()
    assert not empty.may_fetch(0, frozenset(), "a/b/c") and not empty.may_have_token(0, frozenset())
