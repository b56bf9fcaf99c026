"""KBS fetch latency: snpd.kbs.client against the loopback Trustee KBS.

Run: python bench/kbs.py [--runs N]. Prints the median latency of a resource fetch
that starts a session (challenge, a new TEE key, the emulator's report and evidence,
attestation, which the KBS verifies with snpd's verifier, then the fetch and the JWE
decryption), and of one that reuses the session (GET and decryption only), for each
TEE key kind; then the same through the daemon (emulator backend, varlink), where
the first fetch follows a session the KBS expired (a 401, then the attestation).

The KBS is tests/harness/kbs.py over HTTPS on 127.0.0.1 (jwcrypto, a test
dependency); the firmware is the emulator (signing, no latency). The KBS runs in this
process, so the figures hold its share too: a real KBS adds its network round trips
and its Attestation Service.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))
sys.path.insert(0, str(REPO / "tests"))

from _daemonproc import Daemon, write_config  # noqa: E402
from _timing import median_us  # noqa: E402
from harness.kbs import KbsServer  # type: ignore[import-not-found]  # noqa: E402

from snpd.abi.report import AttestationReport  # noqa: E402
from snpd.client import SnpdClient  # noqa: E402
from snpd.device.base import Device, ExtendedReportRequest  # noqa: E402
from snpd.device.select import open_device  # noqa: E402
from snpd.emulator.launch import EmulatorConfig  # noqa: E402
from snpd.emulator.state import EmulatorState  # noqa: E402
from snpd.evidence import trustee_evidence  # noqa: E402
from snpd.kbs import protocol  # noqa: E402
from snpd.kbs.client import KbsClient  # noqa: E402
from snpd.trust.certset import CertificateSet  # noqa: E402
from snpd.trust.roots import TrustRoots  # noqa: E402
from snpd.trust.verify import Verifier  # noqa: E402

RESOURCE = "default/key/disk"


class EmulatorAttester:
    tee = "snp"

    def __init__(self, device: Device) -> None:
        self.device = device

    def evidence(self, binding: bytes) -> object:
        extended = self.device.extended_report(
            ExtendedReportRequest(protocol.report_data(binding), 0))
        report = AttestationReport.from_bytes(extended.report)
        assert report.cpuid_product is not None
        certs = CertificateSet.from_table(extended.certificates)
        assert certs.vcek is not None
        return json.loads(trustee_evidence(report, report.cpuid_product,
                                           [("vcek", certs.vcek.der)]))


def _through_daemon(base: Path, server: KbsServer, runs: int) -> tuple:  # type: ignore[type-arg]
    """(first fetch after the KBS expired the session, reused fetch, runs) in µs,
    through SnpdClient on varlink to a daemon configured with [kbs.bench]."""
    config = base / "snpd.toml"
    socket_path = base / "snpd.varlink"
    write_config(config, state_dir=base / "emulator", cache_dir=base / "cache",
                 socket_path=socket_path, bus_address=None, report_group=None,
                 max_pending=64, per_client=8)
    with config.open("a", encoding="utf-8") as f:
        f.write(f'\n[kbs.bench]\nurl = "{server.url}"\nca_cert = "{server.ca_pem}"\n'
                f'allow = [{{ uids = [{os.getuid()}], resources = ["*/*/*"] }}]\n')
    daemon = Daemon(config, base, timeout=30.0, number=1)
    try:
        with SnpdClient(socket=str(socket_path)) as client:
            def first() -> None:
                server.expire_sessions()
                assert client.get_resource("bench", RESOURCE) == bytes(32)

            cold = median_us(first, runs)
            reused = median_us(lambda: client.get_resource("bench", RESOURCE), runs * 5)
    finally:
        daemon.stop()
    return cold, reused, runs


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=40)
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="snpd-bench-kbs-") as tmp:
        base = Path(tmp)
        state = EmulatorState.load_or_create(
            base / "emulator", EmulatorConfig(),
            now=lambda: datetime.datetime.now(datetime.timezone.utc))
        device = open_device("emulator", emulator_dir=base / "emulator")
        attester = EmulatorAttester(device)
        chain = state.chain
        server = KbsServer(base / "kbs", verifier=Verifier(TrustRoots(explicit=(chain.ark,))),
                           certificates=CertificateSet(ark=chain.ark, ask=chain.ask),
                           resources={RESOURCE: bytes(32)})
        with server:
            for kind in ("ec-p256", "ec-p521", "rsa"):
                def first(kind: str = kind) -> None:
                    with KbsClient("bench", server.url, ca_cert=server.ca_pem,
                                   tee_key=kind) as fresh:
                        assert fresh.resource(RESOURCE, attester) == bytes(32)

                runs = args.runs if kind != "rsa" else max(5, args.runs // 4)
                cold = median_us(first, runs)
                with KbsClient("bench", server.url, ca_cert=server.ca_pem,
                               tee_key=kind) as warm:
                    warm.resource(RESOURCE, attester)
                    reused = median_us(lambda: warm.resource(RESOURCE, attester),
                                       args.runs * 5)
                    assert warm.attestations == 1
                rows.append((kind, cold, reused, runs))
            rows.append(("daemon", *_through_daemon(base, server, args.runs)))
        device.close()
    print(f"bench/kbs.py — Python {sys.version.split()[0]}, loopback KBS over HTTPS, "
          "emulator firmware")
    print(f"  {'TEE key':10} {'first fetch (attests)':>24} {'session reused':>16}")
    for kind, cold, reused, runs in rows:
        print(f"  {kind:10} {cold / 1000:20.1f} ms   {reused / 1000:12.2f} ms"
              f"   ({runs} / {args.runs * 5} runs)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
