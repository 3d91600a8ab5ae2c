"""Timing shared by the benchmarks (``mpshm bench`` and the scripts in benchmarks/)."""

from __future__ import annotations

import statistics
import time
from typing import Any, Callable

__all__ = ["median_time"]


def median_time(fn: Callable[[], Any], number: int, rounds: int) -> float:
    """Median seconds per call over *rounds* rounds of *number* calls (after one warm-up)."""
    fn()
    samples = []
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(number):
            fn()
        samples.append((time.perf_counter() - start) / number)
    return statistics.median(samples)
