"""A Pool computing per-chunk statistics of a large NumPy array, with no copy per task.

Run:  python examples/pool_numpy.py [--backend posix|sysv|mmap]

``mpshm.numpy.empty`` puts a 128 MiB array in a shared memory segment. Each
task receives the *whole* array plus the range of rows to summarise; the array
travels as a handle of a few hundred bytes, and the worker gets a writable,
zero-copy view of the same memory. A plain NumPy array passed to the same
pool is shared too: the pool copies it once into a segment for the whole
``map`` (each worker gets a private, writable copy-on-write view of it, as
pickling would give) and destroys that copy when the tasks are done.
"""

from __future__ import annotations

import argparse
import pickle
import time

import numpy as np

import mpshm
import mpshm.numpy

N = 16 * 2**20  # 16 Mi doubles: 128 MiB
CHUNKS = 16


def chunk_stats(args: tuple[np.ndarray, int, int]) -> tuple[float, float, float, bool]:
    """Summarise items [start, stop) of *data*: (min, max, mean, writable).

    *data* is the whole array, as a view of the segment: nothing was copied.
    Only these four small values are sent back.
    """
    data, start, stop = args
    part = data[start:stop]
    return float(part.min()), float(part.max()), float(part.mean()), data.flags.writeable


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", default="posix", help="posix (default), sysv or mmap")
    backend = parser.parse_args().backend

    # 1. A large array in shared memory, filled in place by the parent.
    data = mpshm.numpy.empty(N, dtype=np.float64, backend=backend)
    np.random.default_rng(42).standard_normal(out=data)
    name = mpshm.numpy.segment_name(data)  # what SharedMemory(name) would attach
    print(f"shared array: {data.nbytes / 2**20:.0f} MiB in {name} ({backend})")

    bounds = np.linspace(0, N, CHUNKS + 1, dtype=np.int64)
    tasks = [(data, int(lo), int(hi)) for lo, hi in zip(bounds[:-1], bounds[1:])]
    # The array pickles as a handle, with any pickler: this is what each task carries.
    print(f"one task pickles to {len(pickle.dumps(tasks[0]))} bytes")

    # backend= here says where the pool puts the copies it makes (step 2).
    with mpshm.Pool(2, backend=backend) as pool:
        began = time.perf_counter()
        stats = pool.map(chunk_stats, tasks)
        print(f"{CHUNKS} chunks summarised in {time.perf_counter() - began:.2f} s; "
              f"workers got writable views: {all(s[3] for s in stats)}")

        # 2. A plain (private) NumPy array: the pool copies it into a segment
        #    once for this map (not once per task); workers get private, writable
        #    views of it (their writes are their own, as with pickling).
        plain = np.arange(N // 4, dtype=np.float64)  # 32 MiB
        halves = [(plain, 0, N // 8), (plain, N // 8, N // 4)]
        plain_stats = pool.map(chunk_stats, halves)
        print(f"plain array: 2 halves summarised; "
              f"workers got private writable copies: {all(s[3] for s in plain_stats)}")
    # The pool's copy of `plain` was destroyed when its tasks were done.

    # 3. Check the workers' figures against NumPy in this process.
    for (array, start, stop), (low, high, mean, _) in zip(tasks + halves, stats + plain_stats):
        part = array[start:stop]
        assert (low, high) == (part.min(), part.max()), (start, stop)
        assert np.isclose(mean, part.mean()), (start, stop)
    print(f"checked against NumPy: ok (overall mean {data.mean():+.5f}, "
          f"max {data.max():.3f})")

    # 4. Destroy the segment now (also happens when the last view of `data` goes).
    mpshm.numpy.release(data)
    print(f"released {name}")


if __name__ == "__main__":
    main()
