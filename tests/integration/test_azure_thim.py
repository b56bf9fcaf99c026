"""THIM as the VCEK's mirror, through the real daemon on the emulated Azure CVM (issue
14): ``[kds] thim`` names a loopback THIM that, like Azure's IMDS, answers only
requests with ``Metadata: true``, and serves the emulated host's VCEK and chain in
THIM's JSON. The vTPM is ``snpd-emu vtpm`` (test_azure_daemon.py's fixtures)."""

from __future__ import annotations

import dataclasses
import datetime
import shutil
import socket
import types
from typing import Any, Dict, Iterator
from urllib.parse import urlsplit

import pytest
from daemonproc import EmulatorTemplate, Launcher, SnpdDaemon  # type: ignore[import-not-found]
from reliability import scan_cache  # type: ignore[import-not-found]
from test_azure_daemon import TRANSPORTS, Vtpm, _start, call  # type: ignore[import-not-found]

from snpd.abi.azure_evidence import parse_azure_evidence
from snpd.emulator import pki
from snpd.emulator.kds import JSON, kds_store, thim_document, thim_store
from snpd.emulator.kds_server import KdsServer
from snpd.kds import urls
from snpd.kds.thim import THIM_PATH

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def thim(template: EmulatorTemplate) -> Iterator[KdsServer]:
    with KdsServer(thim_store(template.state), required_headers={"Metadata": "true"}) as server:
        yield server


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class _Configured:
    """A Launcher whose daemons all get ``config`` (for test_azure_daemon's _start)."""

    def __init__(self, launcher: Launcher, config: Dict[str, Dict[str, Any]]) -> None:
        self.launcher, self.config = launcher, config

    def start(self, before: Any) -> SnpdDaemon:
        return self.launcher.start(config=self.config, before=before)


def _empty(directory: Any) -> None:
    for child in directory.iterdir():
        if child.is_dir():
            shutil.rmtree(child)
        else:
            child.unlink()


def test_the_vcek_comes_from_thim_and_a_bad_thim_falls_through_to_the_kds(
        template: EmulatorTemplate, thim: KdsServer) -> None:
    state = template.state
    port = _free_port()  # the KDS's: nothing listens there until phase 2
    kds_url = f"http://127.0.0.1:{port}"
    launcher = Launcher(template, types.SimpleNamespace(url=kds_url))
    started: Dict[str, Vtpm] = {}

    def paravisor(daemon: SnpdDaemon) -> None:
        started["vtpm"] = Vtpm(daemon)

    kds = KdsServer(kds_store(state), port=port)
    try:
        daemon = _start(_Configured(launcher, {"kds": {
            "url": kds_url, "thim": thim.url + THIM_PATH}}), paravisor)

        # 1. The KDS is unreachable: GetCertificates and GetEvidence (which needs the
        #    VCEK) are answered from THIM, on both transports; THIM is asked once.
        for transport in TRANSPORTS:
            certs = dict(call(daemon, transport, "get_certificates"))
            assert certs["vcek"] == state.vcek.der
            assert certs["ask"] == state.ask.der and certs["ark"] == state.ark.der
            _, evidence = call(daemon, transport, "get_evidence", "trustee", b"t" * 32)
            assert parse_azure_evidence(evidence).vcek == state.vcek.der
        assert thim.requests == [THIM_PATH]
        assert thim.request_headers[0].get("Metadata") == "true"
        scan = scan_cache(daemon.cache_dir, template)
        assert not scan.problems and len(scan.entries) == 3, scan

        # 2. THIM serves a VCEK the ASK did not sign; the KDS is back. The daemon
        #    falls through to the KDS, and the forged VCEK never reaches the cache.
        forged_chain = dataclasses.replace(state.chain, ask_key=pki.new_rsa_key(2048))
        _key, forged = pki.make_vcek(forged_chain, state.chip_id,
                                     state.config.tcb("reported"),
                                     now=datetime.datetime.now(datetime.timezone.utc))
        thim.put(THIM_PATH, JSON, thim_document(state, vcek=forged))
        kds.start()
        _empty(daemon.cache_dir)
        certs = dict(call(daemon, "varlink", "get_certificates"))
        assert certs["vcek"] == state.vcek.der
        assert thim.requests == [THIM_PATH] * 2
        vcek_path = urls.vcek_path(state.config.product, state.chip_id,
                                   state.config.tcb("reported"))
        assert urlsplit(kds.url + vcek_path).path in [urlsplit(r).path for r in kds.requests]
        scan = scan_cache(daemon.cache_dir, template, forbidden=[forged.der])
        assert not scan.problems and len(scan.entries) == 3, scan
        assert daemon.running()
    finally:
        kds.stop()
        thim.put(THIM_PATH, *thim_store(state)[THIM_PATH])
        launcher.close(lambda _daemon: {}, expect_running=True)
        if "vtpm" in started:
            assert started["vtpm"].close() == 0, "snpd-emu vtpm did not exit cleanly"
