"""Timing helpers shared by the benchmarks: medians after a warm-up."""

from __future__ import annotations

import statistics
import time
from typing import Callable, List


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
