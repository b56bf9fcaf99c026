"""vTPM figures (issue 14: the in-tree TPM 2.0 marshaller, measured), printed from one run.

    python bench/vtpm.py [--runs N]

swtpm as the vTPM, the emulated paravisor in front of it (snpd-emu vtpm's parts),
and snpd's Azure backend over the paravisor's socket:

1. marshalling alone: building a TPM2_Quote command and parsing a real response
   (pure Python, snpd.abi.tpm2_commands), per call;
2. reading the HCL report (NV_ReadPublic + two 1024-byte NV_Reads);
3. a quote over 24 SHA-256 PCRs with a 32-byte nonce, plus reading the 24 PCRs;
4. GetReport's device work with caller data: the user-data write, the paravisor's
   refresh (a new emulated SNP report, signed) and the read.

Medians; nothing asserts. The swtpm and socket round trips dominate 2-4; on Azure
the paravisor's own refresh takes what it takes, which no emulator measures.
"""

from __future__ import annotations

import argparse
import datetime
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from _timing import median_us  # noqa: E402

from snpd.abi import tpm2_commands as tc  # noqa: E402
from snpd.device.azure import AzureVtpmDevice  # noqa: E402
from snpd.device.base import QuoteRequest, ReportRequest  # noqa: E402
from snpd.emulator.firmware import Firmware  # noqa: E402
from snpd.emulator.launch import EmulatorConfig  # noqa: E402
from snpd.emulator.paravisor import Paravisor, provision  # noqa: E402
from snpd.emulator.state import EmulatorState  # noqa: E402
from snpd.emulator.swtpm import SocketChannel, SwtpmProcess  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=200)
    args = parser.parse_args()
    runs = args.runs
    with tempfile.TemporaryDirectory(prefix="snpd-bench-vtpm-") as tmp:
        base = Path(tmp)
        state = EmulatorState.load_or_create(
            base / "emulator", EmulatorConfig(),
            now=lambda: datetime.datetime.now(datetime.timezone.utc))
        firmware = Firmware(state)
        with SwtpmProcess(base / "swtpm") as swtpm, \
                SocketChannel(swtpm.socket_path) as upstream:
            provisioned = provision(upstream, firmware)
            with Paravisor(upstream, firmware, provisioned, base / "pv.sock") as paravisor:
                device = AzureVtpmDevice(f"unix:{paravisor.socket_path}")
                nonce = bytes(range(32))
                quote = device.quote(QuoteRequest(nonce))
                response = upstream.transact(tc.quote(tc.AZURE_AK_HANDLE, nonce, range(24)))
                marshal = median_us(lambda: tc.parse_quote(response) and tc.quote(
                    tc.AZURE_AK_HANDLE, nonce, range(24)), runs * 10)
                hcl = median_us(lambda: device.hcl_report(), runs)
                quoted = median_us(lambda: device.quote(QuoteRequest(nonce)), runs)
                report = median_us(lambda: device.report(ReportRequest(nonce)), runs)
                device.close()
    print(f"bench/vtpm.py — Python {sys.version.split()[0]}, {runs} runs, swtpm "
          f"{len(quote.hcl_report)}-byte HCL index")
    print(f"  Quote command built + response parsed (pure)   {marshal:10.1f} µs")
    print(f"  HCL report read (NV_ReadPublic + 2 NV_Read)    {hcl:10.1f} µs")
    print(f"  quote over 24 PCRs + PCR values (4 PCR_Read)   {quoted:10.1f} µs")
    print(f"  GetReport with user data (write, refresh, read){report:10.1f} µs")
    return 0


if __name__ == "__main__":
    sys.exit(main())
