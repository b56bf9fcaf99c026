"""Verification figures, printed from one run (docs/contracts.md, "Performance budget").

    python bench/verify.py [--vectors DIR] [--runs N] [--process-runs N]

1. verify a real report with its chain already verified (a warm ``Verifier``),
   next to one bare ECDSA P-384 verify of the same report, and their ratio
   (budget ≤ 1.15);
2. the cost of a full verification with a cold chain (three RSA-4096 PSS
   signatures, the report signature and every binding);
3. the whole-process time of ``snpctl verify attestation`` next to
   ``python -c "import cryptography.x509"`` (budget ≤ 1.5 times), the children
   keeping bytecode in a private cache as an installed package has it.

Medians over many runs; nothing here asserts, it prints.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import List

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from _timing import median_us, private_bytecode  # noqa: E402

from snpd.abi.report import AttestationReport  # noqa: E402
from snpd.certsdir import load_certs_dir  # noqa: E402
from snpd.trust import signature  # noqa: E402
from snpd.trust.verify import Verifier  # noqa: E402


def median_process_ms(argv: List[str], runs: int) -> float:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    samples: List[float] = []
    for i in range(runs + 3):
        start = time.perf_counter()
        done = subprocess.run(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                              check=False)
        elapsed = time.perf_counter() - start
        if done.returncode != 0:
            raise SystemExit(f"{' '.join(argv)} failed: {done.stderr.decode()}")
        if i >= 3:  # warm-up runs fill the page cache
            samples.append(elapsed)
    return statistics.median(samples) * 1e3


def main() -> int:
    default_vectors = os.environ.get("SNPD_VECTORS", str(REPO.parent / "shared" / "vectors"))
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vectors", default=default_vectors)
    parser.add_argument("--case", default="genoa-v5-vcek")
    parser.add_argument("--runs", type=int, default=2000)
    parser.add_argument("--process-runs", type=int, default=30)
    args = parser.parse_args()

    case = Path(args.vectors) / "cases" / args.case
    if not case.is_dir():
        print(f"bench/verify.py: no vectors at {case} (set SNPD_VECTORS)", file=sys.stderr)
        return 2
    raw = (case / "report.bin").read_bytes()
    certs = load_certs_dir(case)
    report = AttestationReport.from_bytes(raw)
    assert certs.vcek is not None
    key = certs.vcek.public_key

    warm = Verifier()
    assert warm.verify(raw, certs), "the benchmark case must verify"
    bare = median_us(lambda: signature.verify_report(report, key), args.runs)
    full_warm = median_us(lambda: warm.verify(raw, certs), args.runs)
    cold = median_us(lambda: Verifier().verify(raw, certs), max(100, args.runs // 10))

    py = sys.executable
    snpctl = [py, "-m", "snpd.cli.snpctl", "verify", "attestation", str(case),
              str(case / "report.bin"), "-q"]
    with tempfile.TemporaryDirectory(prefix="snpd-bench-") as tmp:
        private_bytecode(Path(tmp) / "pycache")  # as an installed, byte-compiled package
        floor = median_process_ms([py, "-c", "import cryptography.x509"], args.process_runs)
        whole = median_process_ms(snpctl, args.process_runs)

    print(f"bench/verify.py — case {args.case}, Python {sys.version.split()[0]}, "
          f"{args.runs} runs (process: {args.process_runs})")
    print(f"  bare ECDSA P-384 verify of the report       {bare:8.1f} µs")
    print(f"  verify report, chain already verified       {full_warm:8.1f} µs")
    print(f"  ratio (budget <= 1.15)                      {full_warm / bare:8.2f}")
    print(f"  full verification, cold chain               {cold:8.1f} µs")
    print(f"  python -c 'import cryptography.x509'        {floor:8.1f} ms")
    print(f"  snpctl verify attestation (whole process)   {whole:8.1f} ms")
    print(f"  ratio (budget <= 1.5)                       {whole / floor:8.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
