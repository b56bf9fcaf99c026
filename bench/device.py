"""Device figures, printed from one run.

    python bench/device.py [--runs N]

1. one emulated report through the ioctl path: IoctlDevice marshalling (ctypes
   structs, pointers), the emulated sev-guest driver and firmware, signing included;
2. the emulator's signing alone (ECDSA P-384 over the 0x2A0-byte body);
3. the firmware model's report without the driver (report assembly and signing);
4. one derived key through the ioctl path.

Medians; nothing asserts.
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

from snpd.abi.uapi import DerivedKeyRequest  # noqa: E402
from snpd.device.base import ReportRequest  # noqa: E402
from snpd.device.ioctl import IoctlDevice  # noqa: E402
from snpd.emulator.kernel import EmulatedSevGuest  # noqa: E402
from snpd.emulator.launch import EmulatorConfig  # noqa: E402
from snpd.emulator.sign import sign_report  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=2000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        guest = EmulatedSevGuest.for_state_dir(
            Path(tmp), EmulatorConfig(),
            now=lambda: datetime.datetime.now(datetime.timezone.utc))
        device = IoctlDevice(ops=guest)
        data = bytes(range(64))
        raw = device.report(ReportRequest(data, 0))
        key = guest.firmware.state.signing_key
        through_ioctl = median_us(lambda: device.report(ReportRequest(data, 0)), args.runs)
        signing = median_us(lambda: sign_report(raw, key), args.runs)
        firmware = median_us(lambda: guest.firmware.report(data, 0), args.runs)
        derived = median_us(lambda: device.derived_key(DerivedKeyRequest()), args.runs)
        device.close()
    print(f"bench/device.py — Python {sys.version.split()[0]}, {args.runs} runs")
    print(f"  emulated report through the ioctl path        {through_ioctl:8.1f} µs")
    print(f"  emulator signing alone (ECDSA P-384)          {signing:8.1f} µs")
    print(f"  firmware model report (no driver, no ioctl)   {firmware:8.1f} µs")
    print(f"  marshalling + driver model overhead           {through_ioctl - firmware:8.1f} µs")
    print(f"  derived key through the ioctl path            {derived:8.1f} µs")
    return 0


if __name__ == "__main__":
    sys.exit(main())
