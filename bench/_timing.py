"""Timing helpers shared by the benchmarks: medians after a warm-up."""

from __future__ import annotations

import os
import statistics
import time
from pathlib import Path
from typing import Callable, List


def private_bytecode(prefix: Path) -> None:
    """Let the child processes a benchmark times keep bytecode in ``prefix``.

    With PYTHONDONTWRITEBYTECODE set (as in some CI and developer shells) every child
    would compile snpd from source at each start, which an installed package
    (byte-compiled at install) never does. A prefix in the run's own directory
    leaves the work tree untouched; the untimed warm-up runs fill it."""
    os.environ.pop("PYTHONDONTWRITEBYTECODE", None)
    os.environ["PYTHONPYCACHEPREFIX"] = str(prefix)


def median_us(func: Callable[[], object], runs: int) -> float:
    """Median wall time of ``func`` in µs, after up to 50 untimed warm-up calls."""
    for _ in range(min(50, runs)):
        func()
    samples: List[float] = []
    for _ in range(runs):
        start = time.perf_counter()
        func()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples) * 1e6
