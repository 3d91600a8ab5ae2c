"""A SharedMemoryManager feeding a Pool: workers fill shared rows, nothing is copied back.

Run:  python examples/manager_pool.py [posix|sysv|mmap]

The manager owns every segment it hands out: they are destroyed when the
``with`` block ends, when the program is killed, or when the manager's own
server process is killed. ``release()`` frees one early, ``segments()`` lists
them, and ``max_bytes=`` bounds the total.
"""

from __future__ import annotations

import multiprocessing
import sys

from mpshm import SharedMemory, SharedMemoryManager
from mpshm.managers import ManagerLimitError

ROWS, COLS = 8, 100_000  # 8 rows of 100,000 doubles: 6.4 MB


def fill_row(args: tuple[SharedMemory, int]) -> float:
    """Write row *row* of the matrix in place; return its sum (only the sum is sent back)."""
    shm, row = args
    values = shm.buf.cast("d")  # the segment as C doubles, no copy
    start = row * COLS
    for col in range(COLS):
        values[start + col] = row + col / COLS
    total = sum(values[start : start + COLS])
    values.release()
    shm.close()
    return total


def main() -> None:
    backend = sys.argv[1] if len(sys.argv) > 1 else "posix"
    with SharedMemoryManager(backend=backend, max_bytes=16 * 2**20) as smm:
        matrix = smm.SharedMemory(ROWS * COLS * 8)
        labels = smm.ShareableList([f"row {i}" for i in range(ROWS)])
        print(f"manager on {smm.backend}: matrix {matrix.name}, labels {labels.shm.name}")

        # The segment goes to the workers as a handle (about 100 bytes), not 6.4 MB.
        with multiprocessing.Pool(2) as pool:
            sums = pool.map(fill_row, [(matrix, row) for row in range(ROWS)])
        values = matrix.buf.cast("d")
        print(f"workers wrote {len(values):,} doubles; row 3 starts {values[3 * COLS]:.1f}")
        print("row sums:", ", ".join(f"{labels[i]}={s:,.0f}" for i, s in enumerate(sums)))
        values.release()

        scratch = smm.SharedMemory(1 << 20)
        print("held:", [(s.name, s.size) for s in smm.segments()])
        smm.release(scratch)  # destroyed now, not at the end of the block
        print(f"released {scratch.name}; {len(smm.segments())} segments held")

        try:
            smm.SharedMemory(16 * 2**20)
        except ManagerLimitError as exc:
            print("refused:", exc)
    # Every segment the manager made is gone here.
    print("done: the manager destroyed", matrix.name, "and", labels.shm.name)


if __name__ == "__main__":
    main()
