"""snpd.secrets: the daemon's GetResource/GetToken over the configured KBSes, with the
loopback KBS (tests/harness/kbs.py) and evidence from the emulated platform; the
transports and the real daemon are in tests/integration/test_kbs_daemon.py."""

from __future__ import annotations

import asyncio
import json
from typing import Any, Dict, List, Mapping, Optional

import pytest
from emuplatform import Platform  # type: ignore[import-not-found]
from harness.kbs import KbsServer  # type: ignore[import-not-found]

from snpd.abi.report import AttestationReport
from snpd.access import Caller
from snpd.config import KbsEndpoint
from snpd.errors import Busy, InvalidArgument, KbsError, PermissionDenied
from snpd.events import Events
from snpd.evidence import trustee_evidence
from snpd.kbs import protocol
from snpd.secrets import MAX_WAITING, PER_UID_WAITING, Secrets

RESOURCES = {"default/key/disk": b"secret disk key \x00\xff", "ops/key/x": b"ops only"}
APP_GID = 4242
MEMBER = Caller(uid=1000, gids=frozenset({APP_GID}), pid=7, transport="varlink")
OTHER = Caller(uid=1001, gids=frozenset({99}), pid=8, transport="dbus")
ROOT = Caller(uid=0, pid=9, transport="varlink")


class Sink:
    def __init__(self) -> None:
        self.records: List[Mapping[str, str]] = []

    def send(self, fields: Mapping[str, str]) -> None:
        self.records.append(dict(fields))


def endpoint(kbs: KbsServer, **kw: Any) -> KbsEndpoint:
    options: Dict[str, Any] = {
        "url": kbs.url, "ca_cert": kbs.ca_pem,
        "allow": ({"groups": ["app"], "resources": ["default/*/*"]},
                  {"uids": [0], "resources": ["*/*/*"], "token": True})}
    options.update(kw)
    return KbsEndpoint(name="test", **options)


class Setup:
    def __init__(self, milan: Platform, endpoints: Mapping[str, KbsEndpoint]) -> None:
        self.platform = milan
        self.sink = Sink()
        self.evidence_for: List[Caller] = []
        self.secrets = Secrets(endpoints, tee="snp", evidence=self.evidence,
                               events=Events(self.sink),
                               gid_lookup=lambda g: APP_GID if g == "app" else None)

    async def evidence(self, caller: Caller, binding: bytes) -> bytes:
        self.evidence_for.append(caller)
        raw = self.platform.report(report_data=protocol.report_data(binding))
        return trustee_evidence(AttestationReport.from_bytes(raw), self.platform.product,
                                [("vcek", self.platform.vcek.der)])


def run(coro: Any) -> Any:
    return asyncio.run(coro)


def test_member_root_and_others(kbs: KbsServer, milan: Platform) -> None:
    setup = Setup(milan, {"test": endpoint(kbs)})
    s = setup.secrets
    try:
        assert run(s.get_resource(MEMBER, "test", "default/key/disk")) == \
            RESOURCES["default/key/disk"]
        assert run(s.get_resource(ROOT, "test", "ops/key/x")) == RESOURCES["ops/key/x"]
        token = run(s.get_token(ROOT, "test"))
        assert token.count(".") == 2
        for call in (lambda: s.get_resource(MEMBER, "test", "ops/key/x"),
                     lambda: s.get_token(MEMBER, "test"),
                     lambda: s.get_resource(OTHER, "test", "default/key/disk")):
            with pytest.raises(PermissionDenied, match="is not allowed"):
                run(call())
        # the first caller's evidence served everyone after it
        assert setup.evidence_for == [MEMBER]
    finally:
        s.close()
    # what was logged: who got which resource, never the resource or the token
    released = [r for r in setup.sink.records if r.get("SNPD_EVENT") == "SECRET_RELEASED"]
    assert [r["SNPD_SECRET"] for r in released] == [
        "resource default/key/disk", "resource ops/key/x", "token"]
    text = json.dumps(setup.sink.records)
    assert token not in text
    for value in RESOURCES.values():
        assert value.hex() not in text and repr(value)[2:-1] not in text


def test_unknown_kbs_and_bad_path(kbs: KbsServer, milan: Platform) -> None:
    s = Setup(milan, {"test": endpoint(kbs)}).secrets
    try:
        with pytest.raises(InvalidArgument, match="configured: test"):
            run(s.get_resource(ROOT, "nope", "default/key/disk"))
        for bad in ("default/key", "default/../x", "a/b/c/d", "a/b/" + "x" * 200):
            with pytest.raises(InvalidArgument):
                run(s.get_resource(ROOT, "test", bad))
        with pytest.raises(InvalidArgument):
            run(s.get_resource(ROOT, 7, "a/b/c"))  # type: ignore[arg-type]
    finally:
        s.close()


def test_kbs_failures_are_logged_and_typed(kbs: KbsServer, milan: Platform) -> None:
    setup = Setup(milan, {"test": endpoint(kbs)})
    kbs.forbid("default/key/disk")
    try:
        with pytest.raises(KbsError):
            run(setup.secrets.get_resource(MEMBER, "test", "default/key/disk"))
    finally:
        kbs.allow("default/key/disk")
        setup.secrets.close()
    failed = [r for r in setup.sink.records if r.get("SNPD_EVENT") == "SECRET_FAILED"]
    assert failed and failed[0]["SNPD_ERROR"] == "KbsError" and failed[0]["SNPD_KBS"] == "test"


def test_waiting_calls_are_bounded(kbs: KbsServer, milan: Platform) -> None:
    """A KBS that hangs holds at most MAX_WAITING calls; the next is Busy at once."""
    setup = Setup(milan, {"test": endpoint(kbs, timeout_s=5)})
    s = setup.secrets

    async def flood() -> List[Optional[BaseException]]:
        calls = [asyncio.ensure_future(s.get_resource(ROOT, "test", "default/key/disk"))
                 for _ in range(MAX_WAITING)]
        await asyncio.sleep(0)
        with pytest.raises(Busy):
            await s.get_resource(ROOT, "test", "default/key/disk")
        kbs.hang.clear()
        done = await asyncio.gather(*calls, return_exceptions=True)
        return [d if isinstance(d, BaseException) else None for d in done]

    kbs.hang.set()
    try:
        outcomes = run(flood())
    finally:
        kbs.hang.clear()
        s.close()
    assert all(o is None for o in outcomes), outcomes


def test_one_uid_has_a_bounded_share(kbs: KbsServer, milan: Platform) -> None:
    """A member's flood waits PER_UID_WAITING deep; another user is still admitted."""
    setup = Setup(milan, {"test": endpoint(kbs, timeout_s=5, allow=(
        {"uids": [1000, 1001], "resources": ["*/*/*"]},))})
    s = setup.secrets

    async def flood() -> None:
        mine = [asyncio.ensure_future(s.get_resource(MEMBER, "test", "default/key/disk"))
                for _ in range(PER_UID_WAITING)]
        await asyncio.sleep(0)
        with pytest.raises(Busy, match="uid 1000"):
            await s.get_resource(MEMBER, "test", "default/key/disk")
        other = asyncio.ensure_future(s.get_resource(OTHER, "test", "ops/key/x"))
        await asyncio.sleep(0)
        kbs.hang.clear()
        assert await other == RESOURCES["ops/key/x"]
        assert all(r == RESOURCES["default/key/disk"] for r in await asyncio.gather(*mine))
        assert s._kbs["test"].waiting_by_uid == {}

    kbs.hang.set()
    try:
        run(flood())
    finally:
        kbs.hang.clear()
        s.close()


def test_reload_keeps_or_renews_sessions(kbs: KbsServer, milan: Platform) -> None:
    setup = Setup(milan, {"test": endpoint(kbs)})
    s = setup.secrets
    try:
        run(s.get_resource(ROOT, "test", "default/key/disk"))
        attested = kbs.counts().attested
        # rules change: the session stays, the new rule applies at once
        s.configure({"test": endpoint(kbs, allow=({"uids": [1001], "resources": ["*/*/*"]},))})
        assert run(s.get_resource(OTHER, "test", "ops/key/x")) == RESOURCES["ops/key/x"]
        with pytest.raises(PermissionDenied):
            run(s.get_resource(ROOT, "test", "ops/key/x"))
        assert kbs.counts().attested == attested
        # the server changes (here: its timeout): a new client, a new session
        s.configure({"test": endpoint(kbs, timeout_s=20,
                                      allow=({"uids": [0], "resources": ["*/*/*"]},))})
        run(s.get_resource(ROOT, "test", "ops/key/x"))
        assert kbs.counts().attested == attested + 1
        s.configure({})
        with pytest.raises(InvalidArgument, match="configured: none"):
            run(s.get_resource(ROOT, "test", "ops/key/x"))
    finally:
        s.close()


def test_close_releases_a_call_waiting_for_evidence(kbs: KbsServer, milan: Platform) -> None:
    """A stopping daemon's loop will not run the evidence request: the KBS worker
    waiting for it gives up at close() instead of holding the process's exit."""
    setup = Setup(milan, {"test": endpoint(kbs)})

    async def scenario() -> None:
        asked = asyncio.Event()  # made in the loop (Python 3.9 binds it at creation)

        async def never(caller: Caller, binding: bytes) -> bytes:
            asked.set()
            await asyncio.Event().wait()
            raise AssertionError("unreachable")

        setup.secrets._evidence = never
        call = asyncio.ensure_future(setup.secrets.get_resource(ROOT, "test",
                                                                "default/key/disk"))
        await asyncio.wait_for(asked.wait(), 30)
        setup.secrets.close()
        with pytest.raises(KbsError, match="stopping"):
            await asyncio.wait_for(call, 30)

    run(scenario())
