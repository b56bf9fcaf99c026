"""The D-Bus transport against a real dbus-daemon loading the shipped policy.

The server is snpd.dbus.service around a fake Service (dbus_peer.py), run as user
snpd. Callers: busctl (systemd's independent client), dbus-fast from this process
(root), and dbus-fast in child processes that become the unprivileged test users
before they connect. What is checked: the access matrix of both layers (the bus
policy, then the daemon's own re-check under a permissive policy), the error
mapping, argument and result encoding, properties and PropertiesChanged, the
introspection contract, caller identity and its cache, and startup failures.
"""

from __future__ import annotations

import asyncio
import json
import os
import types
from pathlib import Path
from typing import Any, Dict, List, Tuple

import pytest
from dbusbus import (  # type: ignore[import-not-found]
    ACCESS_DENIED,
    ATTESTATION,
    BUS_NAME,
    DEADLINE,
    KEYS,
    MANAGER,
    OBJECT_PATH,
    REPO_ROOT,
    PeerProcess,
    Reply,
    busctl,
    call_on,
    calls_as,
    connect,
    dbus_calls,
    disconnect,
    introspection_diff,
    introspection_model,
)

from snpd.errors import ALL_KINDS, DBUS_PREFIX

pytestmark = pytest.mark.integration

CHECKED_IN_XML = REPO_ROOT / "snpd" / "dbus" / "org.snpd.Snpd1.xml"
DEFAULT_VMPL = 0xFFFFFFFF
PERMISSION_DENIED = DBUS_PREFIX + "PermissionDenied"
INVALID_ARGUMENT = DBUS_PREFIX + "InvalidArgument"
PROPERTIES = "org.freedesktop.DBus.Properties"


def every_method() -> Dict[str, Tuple[Any, ...]]:
    """One well-formed call of every snpd method."""
    return {
        "GetReport": (ATTESTATION, "GetReport", "ayua{sv}", [b"nonce", DEFAULT_VMPL, {}]),
        "GetExtendedReport": (ATTESTATION, "GetExtendedReport", "ayua{sv}",
                              [b"nonce", DEFAULT_VMPL, {}]),
        "GetCertificates": (ATTESTATION, "GetCertificates", "a{sv}", [{}]),
        "VerifyReport": (ATTESTATION, "VerifyReport", "aya{sv}", [bytes(1184), {}]),
        "VerifyEvidence": (ATTESTATION, "VerifyEvidence", "sayaya{sv}",
                           ["az-snp-vtpm", b"ecnon", b"nonce", {}]),
        "GetEvidence": (ATTESTATION, "GetEvidence", "saya{sv}", ["trustee", b"nonce", {}]),
        "DeriveKey": (KEYS, "DeriveKey", "sasuuta{sv}",
                      ["vcek", ["measurement"], DEFAULT_VMPL, 0, 0, {}]),
        "DeriveSealingKey": (KEYS, "DeriveSealingKey", "sasa{sv}", ["app", [], {}]),
        "RefreshCertificates": (MANAGER, "RefreshCertificates", "", []),
    }


def outcome(reply: Reply) -> str:
    """"ok", "bus" (refused by the bus policy), "daemon" (refused by the daemon's
    re-check) or the error name."""
    if reply.ok:
        return "ok"
    if reply.error == ACCESS_DENIED:
        return "bus"
    if reply.error == PERMISSION_DENIED:
        return "daemon"
    return reply.error


def report_facts(report: bytes) -> Dict[str, Any]:
    """What the fake Service wrote after report_data: who the transport said called."""
    assert len(report) == 1184
    facts: Dict[str, Any] = json.loads(report[64:].rstrip(b"\0"))
    return facts


def variant(signature: str, value: Any) -> Any:
    from dbus_fast import Variant

    return Variant(signature, value)


# -- access: layer 1 (the shipped bus policy) and layer 2 (the daemon) ------------------------

OK, BUS, DAEMON = "ok", "bus", "daemon"
ATTESTATION_METHODS = ("GetReport", "GetExtendedReport", "GetCertificates", "VerifyReport",
                       "VerifyEvidence", "GetEvidence")
STRICT = {
    "snpd-test-outsider": dict.fromkeys(every_method(), BUS),
    "snpd-test-user": {**dict.fromkeys(ATTESTATION_METHODS, OK), "DeriveSealingKey": OK,
                       "DeriveKey": BUS, "RefreshCertificates": BUS},
    # The bus lets the key group call all of Keys; sealing keys are the report groups'
    # (docs/contracts.md, "Access"), so the daemon refuses DeriveSealingKey itself.
    "snpd-test-keys": {**dict.fromkeys(ATTESTATION_METHODS, BUS), "DeriveKey": OK,
                       "DeriveSealingKey": DAEMON, "RefreshCertificates": BUS},
}
PERMISSIVE = {
    # The double uses the daemon's own access table (snpd.access.METHODS): VerifyReport
    # is the report groups', as in production.
    "snpd-test-outsider": dict.fromkeys(every_method(), DAEMON),
    "snpd-test-user": {**dict.fromkeys(ATTESTATION_METHODS, OK), "DeriveSealingKey": OK,
                       "DeriveKey": DAEMON, "RefreshCertificates": DAEMON},
    "snpd-test-keys": {**dict.fromkeys(ATTESTATION_METHODS, DAEMON), "DeriveKey": OK,
                       "DeriveSealingKey": DAEMON, "RefreshCertificates": DAEMON},
}


@pytest.mark.parametrize("user", sorted(STRICT))
def test_shipped_policy_access_matrix(strict: Any, user: str) -> None:
    methods = every_method()
    replies = calls_as(user, strict.address, list(methods.values()))
    got = {name: outcome(r) for name, r in zip(methods, replies)}
    assert got == STRICT[user]


@pytest.mark.parametrize("user", sorted(PERMISSIVE))
def test_daemon_rechecks_every_call_when_the_bus_lets_everything_through(
        permissive: Any, user: str) -> None:
    methods = every_method()
    replies = calls_as(user, permissive.address, list(methods.values()))
    got = {name: outcome(r) for name, r in zip(methods, replies)}
    assert got == PERMISSIVE[user]
    for reply in replies:
        if outcome(reply) == DAEMON:
            assert "is not allowed" in reply.text


def test_root_may_call_everything(strict: Any) -> None:
    methods = every_method()
    replies = dbus_calls(strict.address, list(methods.values()))
    assert {name: outcome(r) for name, r in zip(methods, replies)} == dict.fromkeys(methods, OK)
    reply = dict(zip(methods, replies))
    assert report_facts(reply["GetReport"].value)["uid"] == 0
    report, certs = reply["GetExtendedReport"].value
    assert report_facts(report)["uid"] == 0
    assert [kind for kind, _der in certs] == ["ark", "ask"]
    # structs decode as tuples or lists depending on the dbus-fast version
    assert [tuple(c) for c in reply["GetCertificates"].value] == [tuple(c) for c in certs]
    assert all(bytes(der).startswith(b"\x30\x82") for _kind, der in certs)
    assert reply["VerifyEvidence"].value["valid"].value is True
    media_type, evidence = reply["GetEvidence"].value
    assert media_type == "application/json"
    assert json.loads(evidence) == {"nonce": b"nonce".hex()}
    assert len(reply["DeriveKey"].value) == 32 and len(reply["DeriveSealingKey"].value) == 32
    assert reply["RefreshCertificates"].body == []


def test_the_transport_reports_who_is_calling(strict: Any) -> None:
    accounts = strict.accounts
    user, keys = accounts.user, accounts.keys
    [reply] = calls_as(user.name, strict.address, [every_method()["GetReport"]])
    facts = report_facts(reply.value)
    assert facts["uid"] == user.uid
    assert set(facts["gids"]) == set(user.groups)
    assert accounts.report_gid in facts["gids"]
    assert facts["transport"] == "dbus" and facts["peer"].startswith(":")
    assert isinstance(facts["pid"], int) and facts["pid"] != os.getpid()
    # Sealing keys are bound to the caller's uid: two users, two keys.
    sealing = every_method()["DeriveSealingKey"]
    [mine] = calls_as(user.name, strict.address, [sealing])
    [roots] = dbus_calls(strict.address, [sealing])
    assert mine.ok and roots.ok and mine.value != roots.value
    [derived] = calls_as(keys.name, strict.address, [every_method()["DeriveKey"]])
    assert derived.ok


def test_outsider_cannot_get_around_the_policy(strict: Any) -> None:
    """Addressing the daemon's unique name, or leaving the interface out, is no way
    past the bus policy; neither is Properties.Set."""
    get_report = every_method()["GetReport"]
    derive_key = every_method()["DeriveKey"]
    calls = [
        (*get_report, strict.daemon_name),
        ("", "GetReport", get_report[2], get_report[3]),
        (PROPERTIES, "Set", "ssv", [ATTESTATION, "State", variant("s", "failed")]),
    ]
    assert [outcome(r) for r in calls_as("snpd-test-outsider", strict.address, calls)] == \
        [BUS, BUS, BUS]
    # A report-group member cannot reach DeriveKey by omitting the interface.
    no_interface = ("", "DeriveKey", derive_key[2], derive_key[3])
    assert [outcome(r) for r in calls_as("snpd-test-user", strict.address, [no_interface])] \
        == [BUS]
    # Nor may root: snpd answers UnknownMethod on every dbus-fast version (2.21,
    # Ubuntu 24.04's, never answered at all), and the next call is served.
    replies = dbus_calls(strict.address, [("", "GetReport", get_report[2], get_report[3]),
                                          get_report])
    assert replies[0].error == "org.freedesktop.DBus.Error.UnknownMethod"
    assert "needs the interface" in replies[0].text
    assert replies[1].ok
    assert report_facts(replies[1].value)["uid"] == 0


_CHEAP_CALLS = [
    ("org.freedesktop.DBus.Introspectable", "Introspect", "", []),
    ("org.freedesktop.DBus.Peer", "Ping", "", []),
    (PROPERTIES, "Get", "ss", [ATTESTATION, "State"]),
    (PROPERTIES, "GetAll", "s", [MANAGER]),
]


@pytest.mark.parametrize("user", ["snpd-test-user", "snpd-test-keys"])
def test_members_may_introspect_ping_and_read_properties(strict: Any, user: str) -> None:
    replies = calls_as(user, strict.address, _CHEAP_CALLS)
    assert [outcome(r) for r in replies] == [OK] * 4
    assert introspection_diff(CHECKED_IN_XML.read_text(), replies[0].value) == []
    assert replies[2].value.value == "ready"


@pytest.mark.parametrize("user, expected", [
    ("snpd-test-outsider", [DAEMON, DAEMON]), ("snpd-test-user", [OK, OK]),
    ("snpd-test-keys", [OK, OK])])
def test_the_daemon_applies_the_properties_rule_when_the_bus_does_not(
        permissive: Any, user: str, expected: List[str]) -> None:
    """The access table's GetProperties (root and either group) holds on D-Bus too,
    checked by the daemon before dbus-fast reads a property, not only by the bus."""
    replies = calls_as(user, permissive.address, _CHEAP_CALLS[2:] * 2)
    assert [outcome(r) for r in replies] == expected * 2  # the first and a cached caller
    for reply in replies:
        if outcome(reply) == DAEMON:
            assert reply.text.startswith("GetProperties needs a report or key group")


def test_outsiders_cannot_reach_snpd_at_all(strict: Any) -> None:
    """Every method needs a group, and every message costs the daemon: the bus
    refuses an outsider's Introspect, Ping and Properties before snpd reads them."""
    replies = calls_as("snpd-test-outsider", strict.address, _CHEAP_CALLS)
    assert [outcome(r) for r in replies] == ["bus"] * 4


def test_busctl_calls_get_report_as_root(strict: Any) -> None:
    result = busctl(strict.address, "--json=short", "call", BUS_NAME, OBJECT_PATH, ATTESTATION,
                    "GetReport", "ayua{sv}", "3", "1", "2", "3", str(DEFAULT_VMPL),
                    "1", "timeout", "d", "5")
    assert result.returncode == 0, result.stderr
    reply = json.loads(result.stdout)
    assert reply["type"] == "ay"
    report = bytes(reply["data"][0])
    assert report[:64] == b"\x01\x02\x03".ljust(64, b"\0")
    facts = report_facts(report)
    assert facts["uid"] == 0 and facts["vmpl"] == 0 and facts["own_vmpl"] is True
    assert facts["timeout"] == 5.0


def test_busctl_as_outsider_is_refused_by_the_bus(strict: Any) -> None:
    result = busctl(strict.address, "call", BUS_NAME, OBJECT_PATH, ATTESTATION, "GetReport",
                    "ayua{sv}", "0", "0", "0", user="snpd-test-outsider")
    assert result.returncode != 0
    assert result.stderr.strip() == "Call failed: Access denied"  # busctl's AccessDenied


def test_busctl_as_outsider_past_a_permissive_bus_meets_the_daemon(permissive: Any) -> None:
    result = busctl(permissive.address, "call", BUS_NAME, OBJECT_PATH, ATTESTATION,
                    "GetReport", "ayua{sv}", "0", "0", "0", user="snpd-test-outsider")
    assert result.returncode != 0
    assert "GetReport needs a report group (snpd-users)" in result.stderr


# -- introspection ---------------------------------------------------------------------------


def test_live_introspection_equals_the_checked_in_xml(strict: Any) -> None:
    [reply] = dbus_calls(strict.address,
                         [("org.freedesktop.DBus.Introspectable", "Introspect", "", [])])
    live = reply.value
    assert introspection_diff(CHECKED_IN_XML.read_text(), live) == []
    standard = introspection_model(live, prefix="org.freedesktop.DBus.")
    assert {"org.freedesktop.DBus.Properties", "org.freedesktop.DBus.Introspectable",
            "org.freedesktop.DBus.Peer"} <= set(standard)


def test_busctl_introspection_as_a_member_equals_the_checked_in_xml(strict: Any) -> None:
    result = busctl(strict.address, "introspect", "--xml-interface", BUS_NAME, OBJECT_PATH,
                    user="snpd-test-user")
    assert result.returncode == 0, result.stderr
    assert introspection_diff(CHECKED_IN_XML.read_text(), result.stdout) == []


def test_the_xml_ships_as_package_data() -> None:
    from snpd.dbus.service import introspection_xml

    assert introspection_xml() == CHECKED_IN_XML.read_text(encoding="utf-8")


def test_introspection_diff_sees_drift() -> None:
    xml = CHECKED_IN_XML.read_text()
    assert introspection_diff(xml, xml) == []
    drifted = (xml.replace('<arg name="vmpl" type="u" direction="in"/>',
                           '<arg name="vmpl" type="i" direction="in"/>', 1)
               .replace('value="const"', 'value="true"')
               .replace('<property name="StateReason" type="s" access="read"/>', ""))
    diff = introspection_diff(xml, drifted)
    assert any("method GetReport" in line for line in diff)
    assert any("property Version" in line for line in diff)
    assert any("property ReportDataBinding" in line for line in diff)  # const too
    assert any("property StateReason" in line for line in diff)
    assert len(diff) == 4
    # Comments and layout do not count.
    assert introspection_diff(xml, xml.replace("<!--", "<!-- x ").replace("\n  ", "\n")) == []


# -- errors and bad input --------------------------------------------------------------------


@pytest.mark.parametrize("kind", ALL_KINDS)
def test_every_error_kind_has_its_dbus_name(strict: Any, kind: str) -> None:
    call = (ATTESTATION, "GetReport", "ayua{sv}", [f"raise:{kind}".encode(), 0, {}])
    [reply] = dbus_calls(strict.address, [call])
    assert reply.error == f"org.snpd.Snpd1.Error.{kind}"
    if kind == "DeviceError":
        assert reply.text == "firmware said no (errno=5, fw_error=0x16, vmm_error=0x0)"
    else:
        assert reply.text == f"fake {kind}"


def test_a_bug_is_internal_with_a_generic_message_and_serving_goes_on(strict: Any) -> None:
    crash = (ATTESTATION, "GetReport", "ayua{sv}", [b"crash", 0, {}])
    replies = dbus_calls(strict.address, [crash, crash, every_method()["GetReport"]])
    for reply in replies[:2]:
        assert reply.error == "org.snpd.Snpd1.Error.Internal"
        assert "GetReport failed inside snpd" in reply.text
        assert "secret" not in reply.text and "/srv" not in reply.text
        assert "RuntimeError" not in reply.text
    assert replies[2].ok


def test_bad_input_is_invalid_argument_and_serving_goes_on(strict: Any) -> None:
    get_report = "ayua{sv}"
    calls = [
        (ATTESTATION, "GetReport", get_report, [bytes(65), 0, {}]),
        (ATTESTATION, "GetReport", get_report, [b"", 7, {}]),
        (ATTESTATION, "GetReport", get_report, [b"", 0, {"bogus": variant("s", "x")}]),
        (ATTESTATION, "GetReport", get_report, [b"", 0, {"timeout": variant("s", "soon")}]),
        (ATTESTATION, "VerifyReport", "aya{sv}",
         [bytes(1184), {"certificates": variant("as", ["vcek"])}]),
        (KEYS, "DeriveKey", "sasuuta{sv}", ["vcek", ["measurement"], 7, 0, 0, {}]),
        (KEYS, "DeriveKey", "sasuuta{sv}", ["ark", [], 0, 0, 0, {}]),
        (KEYS, "DeriveSealingKey", "sasa{sv}", ["", [], {}]),
    ]
    replies = dbus_calls(strict.address, [*calls, every_method()["GetReport"]])
    assert [r.error for r in replies[:-1]] == [INVALID_ARGUMENT] * len(calls)
    assert "65 bytes" in replies[0].text and "vmpl 7" in replies[1].text
    assert "bogus: unknown option" in replies[2].text
    assert replies[-1].ok


def test_verify_evidence_arguments_and_result(strict: Any) -> None:
    options = {"policy": variant("s", "azure"), "at": variant("x", 1700000000)}
    replies = dbus_calls(strict.address, [
        (ATTESTATION, "VerifyEvidence", "sayaya{sv}", ["az-snp-vtpm", b"ecnon", b"nonce",
                                                        options]),
        (ATTESTATION, "VerifyEvidence", "sayaya{sv}", ["az-snp-vtpm", b"nonce", b"nonce", {}]),
        (ATTESTATION, "VerifyEvidence", "sayaya{sv}", ["trustee", b"", b"", {}]),
        (ATTESTATION, "VerifyEvidence", "sayaya{sv}",
         ["az-snp-vtpm", b"", b"", {"bogus": variant("b", True)}]),
    ])
    good, bad = (r.value for r in replies[:2])
    assert {k: v.signature for k, v in good.items()} == {
        "valid": "b", "product": "s", "failures": "as", "checks": "a(sss)"}
    assert good["valid"].value is True and bad["valid"].value is False
    assert [tuple(c) for c in good["checks"].value] == [
        ("evidence", "pass", "format=az-snp-vtpm evidence=5 nonce=5 policy=azure"),
        ("report.signature", "pass", "the double's")]
    assert bad["failures"].value == ["evidence"]
    assert replies[2].error == DBUS_PREFIX + "NotSupported"
    assert replies[3].error == INVALID_ARGUMENT and "VerifyEvidence options" in replies[3].text


def test_calls_outside_the_contract_get_standard_errors(strict: Any) -> None:
    calls = [
        (ATTESTATION, "GetReport", "ay", [b""]),  # wrong signature
        (ATTESTATION, "GetEvidence", "saya{sv}", ["nope", b"", {}]),
        (ATTESTATION, "Frobnicate", "", []),
    ]
    replies = dbus_calls(strict.address, [*calls, every_method()["GetReport"]])
    assert replies[0].error == "org.freedesktop.DBus.Error.UnknownMethod"
    assert replies[1].error == DBUS_PREFIX + "NotSupported"
    assert replies[2].error == "org.freedesktop.DBus.Error.UnknownMethod"
    assert replies[3].ok


def test_the_same_user_through_busctl_sees_the_same_errors(strict: Any) -> None:
    """An independent client sees the daemon's message for a refused argument."""
    result = busctl(strict.address, "call", BUS_NAME, OBJECT_PATH, ATTESTATION, "GetReport",
                    "ayua{sv}", "0", "7", "0")
    assert result.returncode != 0
    assert "vmpl 7 is not 0-3" in result.stderr


# -- argument and result encoding ------------------------------------------------------------


def test_option_variants_arrive_as_plain_python(strict: Any) -> None:
    options = {
        "certificates": variant("a(say)", [["vcek", b"\x30\x01"], ["ask", b"\x30\x02"]]),
        "at": variant("x", 1700000000),
        "policy": variant("s", "default"),
    }
    [reply] = dbus_calls(strict.address, [(ATTESTATION, "VerifyReport", "aya{sv}",
                                           [bytes(100), options])])
    result = reply.value
    assert {k: v.signature for k, v in result.items()} == {
        "valid": "b", "product": "s", "failures": "as", "checks": "a(sss)"}
    assert result["valid"].value is False
    assert result["failures"].value == ["size"]
    checks = {name: (status, detail) for name, status, detail in result["checks"].value}
    assert checks["size"] == ("fail", "100 bytes")
    # Two (kind, DER) pairs arrived; bytes that are no certificate are defects (the
    # verdict's to report), not an argument error.
    assert checks["option:certificates"] == ("skipped", "kinds=[] defects=2")
    assert checks["option:at"] == ("skipped", "1700000000")
    assert checks["option:policy"] == ("skipped", "default")
    # A variant inside a variant is unwrapped too; an integer timeout is still a number.
    calls = [(ATTESTATION, "GetReport", "ayua{sv}",
              [b"", 0, {"timeout": variant("v", variant("d", 2.5))}]),
             (ATTESTATION, "GetReport", "ayua{sv}", [b"", 0, {"timeout": variant("u", 5)}])]
    nested, integer = dbus_calls(strict.address, calls)
    assert report_facts(nested.value)["timeout"] == 2.5
    assert report_facts(integer.value)["timeout"] == 5.0


def test_properties_have_their_declared_types(strict: Any) -> None:
    attestation, manager = dbus_calls(strict.address, [
        (PROPERTIES, "GetAll", "s", [ATTESTATION]), (PROPERTIES, "GetAll", "s", [MANAGER])])
    assert {k: v.signature for k, v in attestation.value.items()} == {
        "Backend": "s", "ReportDataBinding": "s", "Product": "s", "Vmpl": "u",
        "ReportedTcb": "t", "State": "s", "StateReason": "s"}
    assert attestation.value["Backend"].value == "emulator"
    assert attestation.value["ReportDataBinding"].value == "caller"
    values = manager.value
    assert {k: v.signature for k, v in values.items()} == {
        "Version": "s", "SevStatus": "a{sv}", "Statistics": "a{st}"}
    sev = values["SevStatus"].value
    assert "sysfs_vmpl" not in sev  # None: D-Bus has no null, so the key is left out
    assert sev["snp_active"].signature == "b" and sev["vmpl"].signature == "x"
    assert sev["kernel"].signature == "a{sv}"
    assert sev["kernel"].value["features"].value == ["SEV", "SNP"]
    assert sev["unavailable"].signature == "as"
    assert values["Statistics"].value["calls"] >= 0


def test_report_data_binding_is_the_services(strict: Any) -> None:
    """ReportDataBinding is what the service says REPORT_DATA binds: "caller" (the
    emulator's), "runtime-data" once the fake says so (the emulated Azure CVM's)."""
    get = (PROPERTIES, "Get", "ss", [ATTESTATION, "ReportDataBinding"])
    replies = dbus_calls(strict.address, [
        get, (ATTESTATION, "GetReport", "ayua{sv}", [b"binding:runtime-data", 0, {}]), get,
        (ATTESTATION, "GetReport", "ayua{sv}", [b"binding:caller", 0, {}]), get])
    assert [(r.value.signature, r.value.value) for r in replies[::2]] == [
        ("s", "caller"), ("s", "runtime-data"), ("s", "caller")]


def test_properties_are_read_only(strict: Any) -> None:
    [reply] = dbus_calls(strict.address, [
        (PROPERTIES, "Set", "ssv", [ATTESTATION, "State", variant("s", "failed")])])
    assert reply.error == "org.freedesktop.DBus.Error.PropertyReadOnly"
    [state] = dbus_calls(strict.address, [(PROPERTIES, "Get", "ss", [ATTESTATION, "State"])])
    assert state.value.value == "ready"


def test_properties_changed_follows_the_service(strict: Any) -> None:
    """Notifications become PropertiesChanged in order; Statistics (annotated
    EmitsChangedSignal=false) is never emitted even when the Service names it."""
    from dbus_fast import Message, MessageType

    async def run() -> List[Any]:
        bus = await connect(strict.address)
        signals: asyncio.Queue[Any] = asyncio.Queue()

        def on_message(msg: Any) -> None:
            if msg.message_type is MessageType.SIGNAL and msg.member == "PropertiesChanged":
                signals.put_nowait(msg)

        bus.add_message_handler(on_message)
        try:
            rule = (f"type='signal',interface='{PROPERTIES}',member='PropertiesChanged',"
                    f"path='{OBJECT_PATH}'")
            await bus.call(Message(destination="org.freedesktop.DBus",
                                   path="/org/freedesktop/DBus",
                                   interface="org.freedesktop.DBus", member="AddMatch",
                                   signature="s", body=[rule]))
            replies = await call_on(bus, [
                (ATTESTATION, "GetReport", "ayua{sv}", [b"tcb:4660", 0, {}]),
                (ATTESTATION, "GetReport", "ayua{sv}", [b"sev", 0, {}])])
            assert all(r.ok for r in replies)
            return [await asyncio.wait_for(signals.get(), DEADLINE) for _ in range(2)]
        finally:
            await disconnect(bus)

    first, second = asyncio.run(run())
    assert first.sender == strict.daemon_name and first.path == OBJECT_PATH
    interface, changed, invalidated = first.body
    assert interface == ATTESTATION and invalidated == []
    assert {k: (v.signature, v.value) for k, v in changed.items()} == {
        "ReportedTcb": ("t", 4660), "State": ("s", "ready")}
    interface, changed, _ = second.body
    assert interface == MANAGER and list(changed) == ["SevStatus"]
    sev = changed["SevStatus"].value
    assert sev["vmpl"].value == 2 and "vmpck" not in sev
    # The new value is what Get says too.
    [tcb] = dbus_calls(strict.address, [(PROPERTIES, "Get", "ss", [ATTESTATION, "ReportedTcb"])])
    assert tcb.value.value == 4660


# -- caller identity -------------------------------------------------------------------------


def test_cached_credentials_go_when_the_caller_leaves(strict: Any) -> None:
    from dbus_fast import Message

    get_report = every_method()["GetReport"]

    async def run() -> Tuple[str, Dict[str, Any], str, Dict[str, Any]]:
        first = await connect(strict.address)
        try:
            [reply] = await call_on(first, [get_report])
            first_name = first.unique_name
        finally:
            await disconnect(first)
        second = await connect(strict.address)
        try:
            # Once the bus says the first name is gone, it has already told the daemon
            # (NameOwnerChanged), and that reaches the daemon before this call does.
            while True:
                owner = await second.call(Message(
                    destination="org.freedesktop.DBus", path="/org/freedesktop/DBus",
                    interface="org.freedesktop.DBus", member="NameHasOwner", signature="s",
                    body=[first_name]))
                if not owner.body[0]:
                    break
                await asyncio.sleep(0.01)
            [again] = await call_on(second, [get_report])
            return (first_name, report_facts(reply.value), second.unique_name,
                    report_facts(again.value))
        finally:
            await disconnect(second)

    first_name, before, second_name, after = asyncio.run(run())
    assert first_name in before["cached"]
    assert first_name not in after["cached"]
    assert second_name in after["cached"]


def test_many_concurrent_first_calls_from_one_connection(strict: Any) -> None:
    async def run() -> List[Reply]:
        bus = await connect(strict.address)
        try:
            calls = [(ATTESTATION, "GetReport", "ayua{sv}", [str(i).encode(), 0, {}])
                     for i in range(32)]
            batches = await asyncio.gather(*(call_on(bus, [c]) for c in calls))
            return [reply for batch in batches for reply in batch]
        finally:
            await disconnect(bus)

    replies = asyncio.run(run())
    for i, reply in enumerate(replies):
        assert reply.value[:64] == str(i).encode().ljust(64, b"\0")
        assert report_facts(reply.value)["uid"] == 0


class _FakeBus:
    """Answers GetConnectionCredentials with canned credentials, counting calls."""

    def __init__(self, creds: Dict[str, Any], error: str = "") -> None:
        self.creds = creds
        self.error = error
        self.calls = 0

    async def call(self, msg: Any) -> Any:
        from dbus_fast import MessageType

        self.calls += 1
        assert msg.member == "GetConnectionCredentials"
        if self.error:
            return types.SimpleNamespace(message_type=MessageType.ERROR, error_name=self.error,
                                         body=["gone"])
        return types.SimpleNamespace(message_type=MessageType.METHOD_RETURN,
                                     error_name=None, body=[self.creds])


def test_caller_identity_cache_and_proc_fallback(tmp_path: Path) -> None:
    from snpd.dbus.service import CallerIdentity
    from snpd.errors import PermissionDenied

    uid, pid = os.getuid(), os.getpid()

    async def run() -> None:
        # No UnixGroupIDs (dbus-daemon < 1.10): groups come from /proc/<pid>/status.
        bus = _FakeBus({"UnixUserID": variant("u", uid), "ProcessID": variant("u", pid)})
        identity = CallerIdentity(bus)
        caller = await identity.caller(":1.7")
        assert caller.uid == uid and caller.pid == pid and caller.peer == ":1.7"
        assert caller.gids == frozenset([os.getgid(), *os.getgroups()])
        assert await identity.caller(":1.7") is caller and bus.calls == 1
        identity.forget(":1.7")
        await identity.caller(":1.7")
        assert bus.calls == 2
        # A pid now owned by another uid gives no groups at all.
        status = tmp_path / str(pid) / "status"
        status.parent.mkdir()
        status.write_text(f"Uid:\t{uid + 1}\t{uid + 1}\t0\t0\nGid:\t5\t5\t5\t5\nGroups:\t6 7\n")
        other = await CallerIdentity(bus, proc=tmp_path).caller(":1.8")
        assert other.gids == frozenset()
        status.write_text(f"Uid:\t{uid}\t{uid}\t0\t0\nGid:\t5\t5\t5\t5\nGroups:\t6 7\n")
        same = await CallerIdentity(bus, proc=tmp_path).caller(":1.8")
        assert same.gids == frozenset({5, 6, 7})
        # The bus's groups win when it gives them; concurrent first calls share a lookup.
        bus = _FakeBus({"UnixUserID": variant("u", 42), "UnixGroupIDs": variant("au", [3, 4])})
        identity = CallerIdentity(bus, limit=2)
        many = await asyncio.gather(*(identity.caller(":1.9") for _ in range(10)))
        assert bus.calls == 1 and {c.gids for c in many} == {frozenset({3, 4})}
        assert many[0].pid is None
        for name in (":1.10", ":1.11"):
            await identity.caller(name)
        assert identity.cached_names() == [":1.10", ":1.11"]  # bounded: oldest out
        # No identity, no call.
        for bad in (_FakeBus({"ProcessID": variant("u", pid)}),
                    _FakeBus({}, error="org.freedesktop.DBus.Error.NameHasNoOwner")):
            with pytest.raises(PermissionDenied):
                await CallerIdentity(bad).caller(":1.12")
        with pytest.raises(PermissionDenied):
            await CallerIdentity(bus).caller(None)

    asyncio.run(run())


# -- startup ---------------------------------------------------------------------------------


@pytest.mark.parametrize("user", ["root", "snpd-test-outsider"])
def test_only_snpd_may_own_the_name(strict: Any, user: str) -> None:
    peer = PeerProcess(strict.address, user, strict.accounts)
    try:
        assert peer.ready is None
        assert peer.failure.startswith("ERROR PermissionDenied: the bus policy does not let uid")
        assert "org.snpd.Snpd1" in peer.failure
    finally:
        assert peer.close() == 3


def test_a_second_daemon_fails_clearly(strict: Any) -> None:
    peer = PeerProcess(strict.address, "snpd", strict.accounts)
    try:
        assert peer.ready is None
        assert peer.failure.startswith("ERROR Busy: org.snpd.Snpd1 is owned by another")
    finally:
        assert peer.close() == 3
    [reply] = dbus_calls(strict.address, [every_method()["GetReport"]])
    assert reply.ok  # the first one still serves


def test_the_shipped_policy_loads_cleanly(strict: Any) -> None:
    log = strict.bus.daemon_log()
    assert "Encountered error" not in log and "Unknown" not in log, log
