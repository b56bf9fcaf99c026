"""Fault-injection matrix (the short version for CI): emulator faults crossed with KDS
faults while every method is called. The daemon never exits, each call returns a
result or the documented typed error, and nothing wrong (above all a forged VCEK)
lands in the cache.

One daemon start per emulator fault; the KDS faults run against that daemon one after
another, each on an emptied cache so the certificates are fetched again.

The azure backend has its own rows (test_azure_fault_matrix): the vTPM busy, absent,
without its HCL index, or holding a malformed HCL report, from a paravisor in this
process (snpd/emulator/paravisor.py)."""

from __future__ import annotations

import base64
import dataclasses
import datetime
import os
import pwd
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Dict, FrozenSet, Iterator, List, Mapping, Optional, Tuple

import pytest
from daemonproc import DAEMON_USER, EmulatorTemplate  # type: ignore[import-not-found]
from reliability import (  # type: ignore[import-not-found]
    A,
    K,
    M,
    b64,
    call,
    emulator_kds,
    new_daemon,
    outcome,
    scan_cache,
    shared_cache_dir,
)

from snpd.emulator import pki
from snpd.emulator.firmware import Firmware
from snpd.emulator.kds_server import Fault, KdsServer
from snpd.emulator.paravisor import Paravisor, provision
from snpd.emulator.swtpm import SocketChannel, SwtpmProcess
from snpd.kds import urls

pytestmark = pytest.mark.integration

FIRMWARE = ("GetReport", "GetExtendedReport", "GetEvidence", "DeriveKey", "DeriveSealingKey")
KDS_BACKED = ("GetCertificates", "VerifyReport")
METHODS = FIRMWARE + KDS_BACKED


@dataclasses.dataclass(frozen=True)
class EmuFault:
    name: str
    faults: Tuple[Mapping[str, Any], ...]
    # Allowed outcomes of the firmware methods: first call after the fault is armed,
    # then every later call.
    first: FrozenSet[str]
    later: FrozenSet[str]


def _set(*names: str) -> FrozenSet[str]:
    return frozenset(names)


# ``after = 1`` lets the daemon's start-up report through.
EMU_FAULTS = (
    EmuFault("none", (), _set("ok"), _set("ok")),
    EmuFault("busy burst absorbed", ({"kind": "busy", "count": 2, "after": 1},),
             _set("ok"), _set("ok")),
    EmuFault("latency", ({"kind": "latency", "seconds": 0.02, "count": 0, "after": 1},),
             _set("ok"), _set("ok")),
    EmuFault("fw_error", ({"kind": "fw_error", "status": 0x16, "after": 1},),
             _set("DeviceError"), _set("VmpckDisabled")),
    EmuFault("body_status 0x16", ({"kind": "body_status", "status": 0x16, "after": 1},),
             _set("InvalidArgument"), _set("ok")),
    EmuFault("tamper", ({"kind": "tamper", "after": 1},),
             _set("DeviceError"), _set("VmpckDisabled")),
    EmuFault("wipe", ({"kind": "wipe", "after": 1},),
             _set("VmpckDisabled"), _set("VmpckDisabled")),
)

# KDS faults: name -> (fault to push, count); "wrong signer" replaces the VCEK.
KDS_FAULTS: Tuple[Tuple[str, Optional[Fault], Optional[int]], ...] = (
    ("none", None, None),
    ("429 Retry-After 0", Fault.status(429, retry_after=0), 2),
    ("500", Fault.status(500), 1),
    ("hang 0.3 s", Fault.hang(0.3), 1),
    ("truncate", Fault.truncate(), 1),
    ("wrong signer", None, None),
)
KDS_OK = _set("ok")
KDS_WRONG_SIGNER = {"GetCertificates": _set("CertificatesUnavailable"),
                    "VerifyReport": _set("ok")}  # a verdict: valid false


@pytest.fixture(scope="module")
def kds(template: EmulatorTemplate) -> Iterator[KdsServer]:
    server = emulator_kds(template)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def forged_vcek(template: EmulatorTemplate) -> bytes:
    """A VCEK with the right chip, TCB and issuer name, signed by a key that is not the
    ASK's."""
    state = template.state
    now = datetime.datetime.now(datetime.timezone.utc)
    chain = dataclasses.replace(state.chain, ask_key=pki.new_rsa_key(2048))
    _key, cert = pki.make_vcek(chain, state.chip_id, state.config.tcb("reported"), now=now)
    return cert.der


@pytest.fixture(scope="module")
def reference_report(template: EmulatorTemplate, kds: KdsServer) -> bytes:
    """A genuine report from a fault-free daemon, for VerifyReport."""
    cache = shared_cache_dir()
    daemon = new_daemon(template, kds.url, cache)
    try:
        daemon.start()
        result = call(daemon, A + "GetReport", report_data=b64(b"reference"))
        assert result["ok"], result
        report: str = result["parameters"]["report"]
        return report.encode()
    finally:
        daemon.close()
        shutil.rmtree(cache.parent, ignore_errors=True)


def _call_method(daemon: Any, method: str, report: str, secrets: Dict[str, bytes]
                 ) -> Dict[str, Any]:
    """One call; the nonce it sends and any key it gets go into ``secrets``."""
    raw = os.urandom(32)
    secrets[f"nonce #{len(secrets)}"] = raw
    nonce = b64(raw)
    result = _call(daemon, method, report, nonce)
    if method in ("DeriveKey", "DeriveSealingKey") and result["ok"]:
        secrets[f"{method} key #{len(secrets)}"] = base64.b64decode(result["parameters"]["key"])
    return result


def _call(daemon: Any, method: str, report: str, nonce: str) -> Dict[str, Any]:
    if method == "GetReport":
        return call(daemon, A + method, report_data=nonce)
    if method == "GetExtendedReport":
        return call(daemon, A + method, report_data=nonce)
    if method == "GetEvidence":
        return call(daemon, A + method, format="trustee", nonce=nonce)
    if method == "DeriveKey":
        return call(daemon, K + method, root_key="vcek", fields=["measurement"])
    if method == "DeriveSealingKey":
        return call(daemon, K + method, label="fault-matrix")
    if method == "GetCertificates":
        return call(daemon, A + method, options={})
    return call(daemon, A + "VerifyReport", report=report)


def _empty(cache_dir: Any) -> None:
    for child in cache_dir.iterdir():
        if child.is_dir():
            shutil.rmtree(child)
        else:
            child.unlink()


@pytest.mark.parametrize("emu", EMU_FAULTS, ids=[e.name for e in EMU_FAULTS])
def test_fault_matrix(emu: EmuFault, template: EmulatorTemplate, kds: KdsServer,
                      forged_vcek: bytes, reference_report: bytes) -> None:
    state = template.state
    vcek_path = urls.vcek_path(state.config.product, state.chip_id,
                               state.config.tcb("reported"))
    genuine = kds.lookup(vcek_path)
    assert genuine is not None
    cache_dir = shared_cache_dir()
    config: Dict[str, Dict[str, Any]] = {"emulator": {"faults": list(emu.faults)}}
    daemon = new_daemon(template, kds.url, cache_dir, config)
    table: List[str] = []
    problems: List[str] = []
    secrets: Dict[str, bytes] = {"chip ID": state.chip_id}
    firmware_calls = 0
    try:
        daemon.start()
        for kds_name, fault, count in KDS_FAULTS:
            _empty(cache_dir)
            kds.faults.clear()
            if fault is not None:
                kds.faults.push(fault, count=count)
            if kds_name == "wrong signer":
                kds.put(vcek_path, "application/pkix-cert", forged_vcek)
            try:
                for method in METHODS:
                    result = _call_method(daemon, method, reference_report.decode(), secrets)
                    got = outcome(result)
                    assert daemon.running(), (f"snpd exited after {method} under {emu.name} x "
                                              f"{kds_name}\n{daemon.diagnostics()}")
                    if method in FIRMWARE:
                        allowed = emu.first if firmware_calls == 0 else emu.later
                        firmware_calls += 1
                    elif kds_name == "wrong signer":
                        allowed = KDS_WRONG_SIGNER[method]
                    else:
                        allowed = KDS_OK
                    if method == "VerifyReport" and got == "ok":
                        verdict = result["parameters"]
                        # Without a trustworthy VCEK the report cannot verify.
                        assert verdict.get("valid") is (kds_name != "wrong signer"), verdict
                    table.append(f"{emu.name:20} x {kds_name:18} {method:18} {got}")
                    if got not in allowed:
                        problems.append(f"{emu.name} x {kds_name}: {method} -> {got} "
                                        f"(expected one of {sorted(allowed)}): "
                                        f"{result.get('parameters')}")
            finally:
                kds.faults.clear()
                kds.put(vcek_path, *genuine)
            scan = scan_cache(cache_dir, template, forbidden=[forged_vcek])
            assert not scan.problems and not scan.temporaries, (emu.name, kds_name, scan)
        print("\n" + "\n".join(table))
        assert not problems, "\n".join(problems)
        assert daemon.running()
        # Error paths log the most; none of it may carry a nonce, a key or the chip ID.
        assert daemon.find_leaks(secrets) == []
    finally:
        daemon.close()
        shutil.rmtree(cache_dir.parent, ignore_errors=True)


# -- the azure backend ----------------------------------------------------------------------
# An emulated Azure CVM: the daemon takes the real vTPM path (snpd.device.azure) to a
# paravisor (snpd.emulator.paravisor) that runs in this process in front of one swtpm,
# so that its faults can be armed between calls. One swtpm and paravisor for the
# module; a daemon per row, since a fault that makes the vTPM unavailable is final for
# a daemon's broker (snpd/vmpck.py: "failed" needs a restart).

AZURE_METHODS = ("GetReport", "GetExtendedReport", "GetEvidence", "GetCertificates")


@dataclasses.dataclass
class EmulatedVtpm:
    paravisor: Paravisor
    uid: int
    gid: int

    @property
    def spec(self) -> str:
        return f"unix:{self.paravisor.socket_path}"

    def listen(self) -> None:
        """Serve; the daemon (user snpd) may connect to the socket (made 0600 root)."""
        self.paravisor.start()
        os.chown(self.paravisor.socket_path, self.uid, self.gid)


@pytest.fixture(scope="module")
def vtpm(template: EmulatorTemplate) -> Iterator[EmulatedVtpm]:
    base = Path(tempfile.mkdtemp(prefix="snpd-vtpm-"))
    base.chmod(0o755)
    firmware = Firmware(template.state)
    pw = pwd.getpwnam(DAEMON_USER)
    try:
        with SwtpmProcess(base / "swtpm") as swtpm, \
                SocketChannel(swtpm.socket_path) as upstream:
            provisioned = provision(upstream, firmware)
            made = EmulatedVtpm(Paravisor(upstream, firmware, provisioned, base / "vtpm.sock"),
                                pw.pw_uid, pw.pw_gid)
            made.listen()
            try:
                yield made
            finally:
                made.paravisor.stop()
    finally:
        shutil.rmtree(base, ignore_errors=True)


@dataclasses.dataclass(frozen=True)
class AzureFault:
    name: str
    arm: Callable[[EmulatedVtpm], None]
    # What each of AZURE_METHODS answers while the fault lasts ("ok" or the error).
    during: Tuple[str, str, str, str]
    # The broker's state after it: "ready" (a good call succeeds once the fault is
    # cleared), or "failed" (the vTPM was unavailable: final until snpd restarts).
    state: str
    reason: str = ""  # in StateReason when failed


def _malformed(kind: str) -> Callable[[EmulatedVtpm], None]:
    return lambda v: v.paravisor.serve_malformed(kind)


DEVICE_FAULT = ("DeviceError", "DeviceError", "DeviceError", "ok")
AZURE_FAULTS = (
    # More busy answers than the TPM layer's retries (the broker's are off here).
    AzureFault("tpm busy", lambda v: v.paravisor.fail_busy(1_000_000),
               ("Busy", "Busy", "Busy", "ok"), "ready"),
    AzureFault("tpm absent", lambda v: v.paravisor.stop(), DEVICE_FAULT, "failed",
               "no TPM at unix:"),
    AzureFault("nv index missing", lambda v: v.paravisor.remove_hcl_index(), DEVICE_FAULT,
               "failed", "NV index 0x01400001 is not defined"),
    AzureFault("malformed hcl", _malformed("garbage"), DEVICE_FAULT, "ready"),
    AzureFault("runtime data size past the end", _malformed("variable_data_size"),
               DEVICE_FAULT, "ready"),
    AzureFault("runtime data size short", _malformed("variable_data_size_short"),
               DEVICE_FAULT, "ready"),
)


@pytest.mark.parametrize("fault", AZURE_FAULTS, ids=[f.name for f in AZURE_FAULTS])
def test_azure_fault_matrix(fault: AzureFault, template: EmulatorTemplate, kds: KdsServer,
                            vtpm: EmulatedVtpm) -> None:
    """Each vTPM fault on the azure backend, over varlink: the typed error each method
    answers (GetCertificates keeps serving the chain and VCEK), the daemon keeps
    serving, the broker's state says whether the fault was final, nothing unverified
    is cached and nothing secret is logged."""
    cache_dir = shared_cache_dir()
    daemon = new_daemon(template, kds.url, cache_dir, {
        "device": {"busy_retries": 0}, "emulator": {"vtpm": vtpm.spec}})
    secrets: Dict[str, bytes] = {"chip ID": template.state.chip_id}
    got: List[str] = []
    try:
        daemon.start()
        # A good report first: the daemon knows the chip (for GetCertificates) and
        # holds an open vTPM connection when the fault strikes.
        assert outcome(_call_method(daemon, "GetReport", "", secrets)) == "ok"
        fault.arm(vtpm)
        try:
            for method in AZURE_METHODS:
                result = _call_method(daemon, method, "", secrets)
                got.append(outcome(result))
                assert daemon.running(), f"snpd exited after {method}\n{daemon.diagnostics()}"
                if method == "GetCertificates" and result["ok"]:
                    kinds = {c["kind"] for c in result["parameters"]["certificates"]}
                    assert {"ark", "ask", "vcek"} <= kinds, kinds
        finally:
            if fault.name == "tpm absent":
                vtpm.listen()
            vtpm.paravisor.clear_faults()
        assert tuple(got) == fault.during, list(zip(AZURE_METHODS, got))
        props = call(daemon, M + "GetProperties")
        assert props["ok"], props
        state = props["parameters"]["properties"]["org.snpd.Snpd1.Attestation"]
        assert state["State"] == fault.state, state
        assert fault.reason in state["StateReason"]
        after = outcome(_call_method(daemon, "GetReport", "", secrets))
        assert after == ("ok" if fault.state == "ready" else "DeviceError")
        assert daemon.running()
        scan = scan_cache(cache_dir, template)
        assert not scan.problems and not scan.temporaries, scan
        assert daemon.find_leaks(secrets) == []
    finally:
        daemon.close()
        shutil.rmtree(cache_dir.parent, ignore_errors=True)
