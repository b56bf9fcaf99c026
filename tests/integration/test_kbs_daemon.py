"""Secrets from a Trustee KBS through the real daemon (issue 15).

The loopback KBS (tests/harness/kbs.py: HTTPS on 127.0.0.1, jwcrypto, snpd's verifier
under the emulator's root) runs in the test process; the daemon (user snpd, real bus,
real socket) is configured with it as ``[kbs.test]``, its CA as ``ca_cert``, and allow
rules for the report group, for root, and for nobody else. Members, an outsider and
root call GetResource and GetToken on both transports and through snpctl; the KBS
sees one attestation for all of it, and nothing secret reaches the daemon's logs.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import stat
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Dict, Iterator, List, Mapping, Tuple

import pytest
from daemonproc import (  # type: ignore[import-not-found]
    EmulatedKds,
    EmulatorTemplate,
    Launcher,
    SnpdDaemon,
    snpd_client_call,
    varlink_calls,
    varlink_calls_as,
)
from dbusbus import (  # type: ignore[import-not-found]
    ACCESS_DENIED,
    REPO_ROOT,
    calls_as,
    dbus_calls,
)
from harness.kbs import KbsServer  # type: ignore[import-not-found]
from test_azure_daemon import Vtpm, _start  # type: ignore[import-not-found]

from snpd.errors import DBUS_PREFIX
from snpd.trust.certset import CertificateSet
from snpd.trust.roots import TrustRoots
from snpd.trust.verify import Verifier
from snpd.trust.x509 import load_certificate

pytestmark = pytest.mark.integration

SECRETS = "org.snpd.Snpd1.Secrets"
USER, OUTSIDER, KEYS_MEMBER, ROOT = ("snpd-test-user", "snpd-test-outsider",
                                     "snpd-test-keys", "root")
RESOURCES = {"default/key/disk": b"disk key \x00\x01\xfe" * 3,
             "ops/key/root-only": b"for root only",
             "default/cert/tls": b"-----BEGIN CERTIFICATE-----..."}
ALLOW = [
    {"groups": ["snpd-users"], "resources": ["default/*/*"]},
    {"uids": [0], "resources": ["*/*/*"], "token": True},
]


@pytest.fixture(scope="module")
def kbs(template: EmulatorTemplate) -> Iterator[KbsServer]:
    directory = Path(tempfile.mkdtemp(prefix="snpd-kbs-"))
    certs = template.directory / "certs"
    ark = load_certificate((certs / "ark.pem").read_bytes())
    ask = load_certificate((certs / "ask.pem").read_bytes())
    server = KbsServer(directory, verifier=Verifier(TrustRoots(explicit=(ark,))),
                       certificates=CertificateSet(ark=ark, ask=ask), resources=RESOURCES)
    try:
        with server:
            yield server
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def configure_kbs(d: SnpdDaemon, kbs: KbsServer) -> None:
    """[kbs.test] in the daemon's configuration, with the KBS's CA where user snpd reads it."""
    ca = d.runtime_dir / "kbs-ca.pem"
    shutil.copyfile(kbs.ca_pem, ca)
    ca.chmod(0o644)
    config = dict(d.config)
    config["kbs.test"] = {"url": kbs.url, "ca_cert": str(ca), "allow": ALLOW}
    d.config = config
    d.write_config(config)


@pytest.fixture(scope="module")
def daemon(template: EmulatorTemplate, kds: EmulatedKds, kbs: KbsServer
           ) -> Iterator[SnpdDaemon]:
    launcher = Launcher(template, kds)
    try:
        yield launcher.start(before=lambda d: configure_kbs(d, kbs))
    finally:
        launcher.close(secrets_of=lambda _d: {
            **{f"resource {p}": v for p, v in RESOURCES.items()},
            **{f"token {i}": t.encode() for i, t in enumerate(TOKENS)}},
            expect_running=True)


TOKENS: List[str] = []  # every token handed out, for the leak check at the end


def call(daemon: SnpdDaemon, transport: str, op: str, *args: Any, user: str = ROOT) -> Any:
    where = ({"socket_path": str(daemon.socket_path)} if transport == "varlink"
             else {"bus": daemon.bus_address})
    return snpd_client_call(op, *args, user=None if user == ROOT else user, **where)


@pytest.mark.parametrize("transport", ["varlink", "dbus"])
def test_member_fetches_a_resource(daemon: SnpdDaemon, kbs: KbsServer, transport: str
                                   ) -> None:
    """A member of snpd-users, named by the first rule, gets default/* through SnpdClient
    (varlink as the user; D-Bus as root, the bus policy is tested below)."""
    user = USER if transport == "varlink" else ROOT
    got = call(daemon, transport, "get_resource", "test", "default/key/disk", user=user)
    assert got == RESOURCES["default/key/disk"]


def test_one_attestation_serves_every_caller(daemon: SnpdDaemon, kbs: KbsServer) -> None:
    before = kbs.counts().attested
    for path in ("default/cert/tls", "default/key/disk"):
        assert call(daemon, "varlink", "get_resource", "test", path) == RESOURCES[path]
    token = call(daemon, "varlink", "get_token", "test")
    TOKENS.append(token)
    assert token.count(".") == 2
    assert call(daemon, "dbus", "get_token", "test") == token  # the same session
    assert kbs.counts().attested - before <= 1


def test_an_expired_session_is_renewed(daemon: SnpdDaemon, kbs: KbsServer) -> None:
    call(daemon, "varlink", "get_resource", "test", "default/key/disk")
    attested = kbs.counts().attested
    kbs.expire_sessions()
    assert call(daemon, "dbus", "get_resource", "test", "default/key/disk") == \
        RESOURCES["default/key/disk"]
    assert kbs.counts().attested == attested + 1
    TOKENS.append(call(daemon, "varlink", "get_token", "test"))


# -- who gets what: both layers, both transports ----------------------------------------------

DBUS_CALLS = {
    "member resource": (SECRETS, "GetResource", "ssa{sv}", ["test", "default/key/disk", {}]),
    "root-only resource": (SECRETS, "GetResource", "ssa{sv}",
                           ["test", "ops/key/root-only", {}]),
    "token": (SECRETS, "GetToken", "sa{sv}", ["test", {}]),
}
VARLINK_CALLS = {
    "member resource": {"method": "org.snpd.Secrets.GetResource",
                        "parameters": {"kbs": "test", "path": "default/key/disk"}},
    "root-only resource": {"method": "org.snpd.Secrets.GetResource",
                           "parameters": {"kbs": "test", "path": "ops/key/root-only"}},
    "token": {"method": "org.snpd.Secrets.GetToken", "parameters": {"kbs": "test"}},
}
OK, DAEMON, BUS = "ok", "refused by the daemon", "refused by the bus"
# The rules: snpd-users gets default/*/*, root everything and the token. The key group
# reaches the daemon (bus policy) but no rule names it; the outsider is kept off by
# the bus on D-Bus, and (the test socket is 0666) by the daemon on varlink.
EXPECTED: Dict[Tuple[str, str], Mapping[str, str]] = {
    (ROOT, "dbus"): {"member resource": OK, "root-only resource": OK, "token": OK},
    (USER, "dbus"): {"member resource": OK, "root-only resource": DAEMON, "token": DAEMON},
    (KEYS_MEMBER, "dbus"): {"member resource": DAEMON, "root-only resource": DAEMON,
                            "token": DAEMON},
    (OUTSIDER, "dbus"): {"member resource": BUS, "root-only resource": BUS, "token": BUS},
    (ROOT, "varlink"): {"member resource": OK, "root-only resource": OK, "token": OK},
    (USER, "varlink"): {"member resource": OK, "root-only resource": DAEMON,
                        "token": DAEMON},
    (KEYS_MEMBER, "varlink"): {"member resource": DAEMON, "root-only resource": DAEMON,
                               "token": DAEMON},
    (OUTSIDER, "varlink"): {"member resource": DAEMON, "root-only resource": DAEMON,
                            "token": DAEMON},
}


@pytest.mark.parametrize("who", sorted(EXPECTED), ids=lambda w: f"{w[0]}-{w[1]}")
def test_the_allow_rules_on_both_transports(daemon: SnpdDaemon, who: Tuple[str, str]
                                            ) -> None:
    user, transport = who
    if transport == "dbus":
        calls = list(DBUS_CALLS.values())
        replies = dbus_calls(daemon.bus_address, calls) if user == ROOT else \
            calls_as(user, daemon.bus_address, calls)
        got = {}
        for name, reply in zip(DBUS_CALLS, replies):
            if reply.ok:
                got[name] = OK
                if name == "member resource":
                    assert bytes(reply.body[0]) == RESOURCES["default/key/disk"]
                if name == "token":
                    TOKENS.append(reply.body[0])
            elif reply.error == ACCESS_DENIED:
                got[name] = BUS
            else:
                assert reply.error == DBUS_PREFIX + "PermissionDenied", reply
                assert "is not allowed" in reply.text
                got[name] = DAEMON
    else:
        vcalls = list(VARLINK_CALLS.values())
        answers = varlink_calls(str(daemon.socket_path), vcalls) if user == ROOT else \
            varlink_calls_as(user, str(daemon.socket_path), vcalls)
        got = {}
        for name, answer in zip(VARLINK_CALLS, answers):
            if answer["ok"]:
                got[name] = OK
                if name == "token":
                    TOKENS.append(answer["parameters"]["token"])
            else:
                assert answer["error"] == "org.snpd.Secrets.PermissionDenied", answer
                assert "is not allowed" in answer["parameters"]["message"]
                got[name] = DAEMON
    assert got == EXPECTED[who]


@pytest.mark.parametrize("transport", ["varlink", "dbus"])
def test_unknown_kbs_and_bad_path_are_invalid(daemon: SnpdDaemon, transport: str) -> None:
    for args in (("nope", "default/key/disk"), ("test", "default/../x"), ("test", "a/b")):
        with pytest.raises(AssertionError, match="InvalidArgument"):
            call(daemon, transport, "get_resource", *args)


HOSTILE_PATHS = ("x" * 60_000, "default/key/disk\0", "default/key/d\u00efsk",
                 "default/*/*", "/default/key/disk", "default/key/disk/")


def test_hostile_names_and_paths_from_a_member(daemon: SnpdDaemon, kbs: KbsServer) -> None:
    """What a member of snpd-users can send the Secrets interface, on both transports:
    oversized, NUL (varlink), non-ASCII, pattern and slash-laden paths, a hostile KBS name and
    wrong types are refused as InvalidArgument (InvalidParameter for a wrong type on
    varlink) before the KBS is asked; then the member is still served."""
    before = kbs.counts()
    # D-Bus strings cannot carry a NUL (the wire refuses them before the daemon), and
    # Debian 12's dbus-fast 1.84, the test's client, mis-sizes a non-ASCII string and
    # the bus drops it: those two go over varlink only.
    dcalls = [(SECRETS, "GetResource", "ssa{sv}", ["test", p, {}])
              for p in HOSTILE_PATHS if "\0" not in p and p.isascii()]
    dcalls += [(SECRETS, "GetResource", "ssa{sv}", ["t" * 60_000, "default/key/disk", {}]),
               (SECRETS, "GetToken", "sa{sv}", ["test/../x", {}])]
    for reply in calls_as(USER, daemon.bus_address, dcalls):
        assert reply.error == DBUS_PREFIX + "InvalidArgument", reply
    vcalls: List[Dict[str, Any]] = [
        {"method": "org.snpd.Secrets.GetResource", "parameters": {"kbs": "test", "path": p}}
        for p in HOSTILE_PATHS]
    vcalls += [{"method": "org.snpd.Secrets.GetResource",
                "parameters": {"kbs": ["test"], "path": "default/key/disk"}},
               {"method": "org.snpd.Secrets.GetResource",
                "parameters": {"kbs": "test", "path": 7}},
               {"method": "org.snpd.Secrets.GetToken", "parameters": {"kbs": "t" * 60_000}}]
    for answer in varlink_calls_as(USER, str(daemon.socket_path), vcalls):
        assert not answer["ok"]
        assert answer["error"] in ("org.snpd.Secrets.InvalidArgument",
                                   "org.varlink.service.InvalidParameter"), answer
    after = kbs.counts()
    assert (after.auth, after.resource) == (before.auth, before.resource)
    assert call(daemon, "varlink", "get_resource", "test", "default/key/disk", user=USER) \
        == RESOURCES["default/key/disk"]


def test_a_kbs_refusal_is_a_kbs_error_and_the_daemon_serves_on(daemon: SnpdDaemon,
                                                               kbs: KbsServer) -> None:
    kbs.forbid("default/key/disk")
    try:
        with pytest.raises(AssertionError, match="KbsError.*403"):
            call(daemon, "varlink", "get_resource", "test", "default/key/disk")
    finally:
        kbs.allow("default/key/disk")
    assert call(daemon, "dbus", "get_resource", "test", "default/key/disk") == \
        RESOURCES["default/key/disk"]


# -- snpctl ------------------------------------------------------------------------------------


def snpctl(daemon: SnpdDaemon, *argv: str, user: str = ROOT) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "snpd.cli.snpctl", "--socket", str(daemon.socket_path),
           *argv]
    if user != ROOT:
        cmd = ["setpriv", f"--reuid={user}", f"--regid={user}", "--init-groups", *cmd]
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    return subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=str(REPO_ROOT),
                          timeout=120)


def test_snpctl_kbs_get_resource_as_a_member(daemon: SnpdDaemon) -> None:
    out_dir = Path(tempfile.mkdtemp(prefix="snpd-kbs-out-"))
    try:
        shutil.chown(out_dir, USER, USER)
        target = out_dir / "disk-key"
        done = snpctl(daemon, "kbs", "get-resource", "test", "default/key/disk", str(target),
                      user=USER)
        assert done.returncode == 0, done.stderr
        assert target.read_bytes() == RESOURCES["default/key/disk"]
        assert stat.S_IMODE(target.stat().st_mode) == 0o600
        assert RESOURCES["default/key/disk"].hex() not in done.stdout
        refused = snpctl(daemon, "kbs", "get-resource", "test", "ops/key/root-only",
                         str(out_dir / "x"), user=USER)
        assert refused.returncode == 3 and "is not allowed" in refused.stderr
        assert not (out_dir / "x").exists()
    finally:
        shutil.rmtree(out_dir, ignore_errors=True)


def test_snpctl_kbs_token_as_root(daemon: SnpdDaemon) -> None:
    done = snpctl(daemon, "kbs", "token", "test")
    assert done.returncode == 0, done.stderr
    token = done.stdout.strip()
    TOKENS.append(token)
    assert token.count(".") == 2


def test_snpctl_direct_runs_the_same_client(daemon: SnpdDaemon, kbs: KbsServer,
                                            tmp_path: Path) -> None:
    """--direct (root): snpctl reads [kbs.test] from the daemon's configuration and runs
    the KBS client itself, on the emulator backend: a session of its own."""
    before = kbs.counts().attested
    target = tmp_path / "disk-key"
    done = snpctl(daemon, "--emulator-dir", str(daemon.emulator_dir), "kbs",
                  "get-resource", "test", "default/key/disk", str(target),
                  "--config", str(daemon.config_path))
    assert done.returncode == 0, done.stderr
    assert target.read_bytes() == RESOURCES["default/key/disk"]
    assert kbs.counts().attested == before + 1


def test_on_azure_the_kbs_attests_az_snp_vtpm_evidence(template: EmulatorTemplate,
                                                      kds: EmulatedKds, kbs: KbsServer
                                                      ) -> None:
    """On the emulated Azure CVM (snpd-emu vtpm) the daemon's session is an az-snp-vtpm
    one: the binding is the TPM quote's extraData, which the KBS checks (and the token
    it issues names the TEE)."""
    launcher = Launcher(template, kds)
    started: Dict[str, Vtpm] = {}

    def paravisor(d: SnpdDaemon) -> None:
        started["vtpm"] = Vtpm(d)
        configure_kbs(d, kbs)

    try:
        azure = _start(launcher, paravisor)
        before = kbs.counts().attested
        for transport in ("varlink", "dbus"):
            assert call(azure, transport, "get_resource", "test", "default/key/disk") == \
                RESOURCES["default/key/disk"]
        token = call(azure, "varlink", "get_token", "test")
        TOKENS.append(token)
        assert kbs.counts().attested == before + 1
        payload = token.split(".")[1]
        claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
        assert claims["tee"] == "az-snp-vtpm"
    finally:
        launcher.close(secrets_of=lambda _d: {
            **{f"resource {p}": v for p, v in RESOURCES.items()},
            **{f"token {i}": t.encode() for i, t in enumerate(TOKENS)}})
        if "vtpm" in started:
            assert started["vtpm"].close() == 0
