"""Measuring for the benchmark: what ``mpshm bench`` and the scripts in
``benchmarks/`` share. This package imports no NumPy; :mod:`mpshm.bench.pool`
(the measurements of pools) does.
"""

from __future__ import annotations

import statistics
import time
from typing import Any, Callable

__all__ = ["DIRECTIONS", "GIB", "KIB", "MIB", "label", "median_time", "parse_size"]

KIB, MIB, GIB = 1 << 10, 1 << 20, 1 << 30
#: What the pool benchmark measures: sending an array to a worker that takes
#: its length, to one that sums it, and a result from a worker.
DIRECTIONS = ("send", "args", "results")


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


def label(nbytes: int) -> str:
    """Bytes as people read them: 1048576 -> '1 MiB' (exact units only)."""
    for unit, name in ((GIB, "GiB"), (MIB, "MiB"), (KIB, "KiB")):
        if nbytes >= unit and nbytes % unit == 0:
            return f"{nbytes // unit} {name}"
    return f"{nbytes} B"


def parse_size(text: str) -> int:
    """A size as people write it: '256M', '1GiB', '4k', '1048576' -> bytes."""
    units = {"K": KIB, "M": MIB, "G": GIB}
    text = text.strip().upper().rstrip("B").rstrip("I")
    if text and text[-1] in units:
        return int(float(text[:-1]) * units[text[-1]])
    return int(text)
