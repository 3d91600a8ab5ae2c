"""SharedMemoryManager costs, mpshm against the standard library, side by side.

    python benchmarks/manager.py [--repeat N] [--json FILE]

Times, in the same run: starting and shutting down a manager (fork start
method), and asking a running manager for a 4 KiB segment (``SharedMemory``)
and for a 10-item ``ShareableList``. mpshm is timed on each backend, the
standard library on POSIX shared memory (its only storage). Figures are
medians over rounds, given as ratios to the standard library's, since these
machines are shared and noisy.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import sys
from multiprocessing.managers import SharedMemoryManager as StdlibManager
from typing import Any, Callable

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import mpshm
from mpshm.bench import median_time

CTX = multiprocessing.get_context("fork")
ITEMS = [1, 2.5, True, None, "text", b"bytes", 7, 8, 9, 10]


def start_stop(make: Callable[[], Any]) -> Callable[[], None]:
    def run() -> None:
        manager = make()
        manager.start()
        manager.shutdown()

    return run


def measure(make: Callable[[], Any], repeat: int) -> dict[str, float]:
    """Seconds per start+shutdown, per SharedMemory(4096), per ShareableList(10 items)."""
    figures = {"start+shutdown": median_time(start_stop(make), 2, 3 * repeat)}
    manager = make()
    manager.start()
    try:
        made: list[Any] = []
        figures["SharedMemory"] = median_time(
            lambda: made.append(manager.SharedMemory(4096)), 100, 5 * repeat
        )
        figures["ShareableList"] = median_time(
            lambda: made.append(manager.ShareableList(ITEMS)), 100, 5 * repeat
        )
        for obj in made:
            (obj.shm if hasattr(obj, "shm") else obj).close()
    finally:
        manager.shutdown()
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=3, help="rounds multiplier (default 3)")
    parser.add_argument("--json", metavar="FILE", help="also write the figures as JSON")
    args = parser.parse_args()

    stdlib = measure(lambda: StdlibManager(ctx=CTX), args.repeat)
    rows = []
    print(f"{'operation':<16} {'manager':<14} {'time':>10} {'vs stdlib':>10}")
    for what, seconds in stdlib.items():
        print(f"{what:<16} {'stdlib posix':<14} {seconds * 1e3:8.3f} ms {1.0:9.2f}x")
        rows.append({"what": what, "manager": "stdlib", "ms": seconds * 1e3, "ratio": 1.0})
    for backend in ("posix", "sysv", "mmap"):
        ours = measure(
            lambda b=backend: mpshm.SharedMemoryManager(ctx=CTX, backend=b), args.repeat
        )
        for what, seconds in ours.items():
            ratio = seconds / stdlib[what]
            print(f"{what:<16} {'mpshm ' + backend:<14} {seconds * 1e3:8.3f} ms {ratio:9.2f}x")
            rows.append({"what": what, "manager": f"mpshm-{backend}", "ms": seconds * 1e3,
                         "ratio": ratio})
    print("(time per operation, median of rounds; ratio < 1 means faster than the stdlib)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
