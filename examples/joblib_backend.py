"""joblib on shared memory: ``parallel_config(backend="mpshm")``.

Run:  python examples/joblib_backend.py [--storage posix|sysv|mmap]
Needs: pip install 'mpshm[joblib,numpy]'

Three ``Parallel`` calls, as a scikit-learn-style program makes them:

1. Workers make large arrays and return them: they arrive in the parent
   through shared memory (no pickle of their bytes), as the parent's own
   writable arrays, valid after the call and after the workers are gone.
2. A large plain array is sent to every task: it is copied into shared
   memory once per call, not pickled per task.
3. Workers write into one shared output array (``mpshm.numpy.zeros``): it
   is passed by handle, and the parent sees every write.
"""

from __future__ import annotations

import argparse
import time

import joblib
import numpy as np

import mpshm.joblib  # registers joblib's "mpshm" backend
import mpshm.numpy

ROWS, COLS = 2048, 4096  # float64: 64 MiB per block


def make_block(seed: int) -> np.ndarray:
    """A block of random numbers (made in a worker, returned to the parent)."""
    return np.random.default_rng(seed).random((ROWS, COLS))


def column_means(data: np.ndarray, start: int, stop: int) -> np.ndarray:
    """Means of columns start..stop of *data* (a shared argument)."""
    return data[:, start:stop].mean(axis=0)


def scale_rows(out: np.ndarray, data: np.ndarray, start: int, stop: int) -> None:
    """Write data[start:stop] * 2 into out[start:stop] (a shared output)."""
    np.multiply(data[start:stop], 2.0, out=out[start:stop])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--storage", default=None, help="posix, sysv or mmap (default: posix)")
    args = parser.parse_args()

    with joblib.parallel_config(backend="mpshm", n_jobs=2, storage=args.storage):
        start = time.perf_counter()
        blocks = joblib.Parallel()(joblib.delayed(make_block)(seed) for seed in range(4))
        took = time.perf_counter() - start
        print(f"1. {len(blocks)} blocks of {blocks[0].nbytes >> 20} MiB made by workers "
              f"and returned in {took:.2f} s; writable: {blocks[0].flags.writeable}")
        data = np.concatenate(blocks[:2])  # a plain 128 MiB array
        blocks[0][:] = 0.0  # the parent's own: nobody else sees this

        edges = np.linspace(0, COLS, 9).astype(int)
        parts = joblib.Parallel()(joblib.delayed(column_means)(data, a, b)
                                  for a, b in zip(edges[:-1], edges[1:]))
        means = np.concatenate(parts)
        assert np.allclose(means, data.mean(axis=0))
        print(f"2. column means of a {data.nbytes >> 20} MiB array from 8 tasks: "
              f"they match the parent's own ({means[:3].round(4)} ...)")

        out = mpshm.numpy.zeros(data.shape, backend=args.storage)  # passed by handle
        rows = np.linspace(0, len(data), 5).astype(int)
        joblib.Parallel()(joblib.delayed(scale_rows)(out, data, a, b)
                          for a, b in zip(rows[:-1], rows[1:]))
        assert np.array_equal(out, data * 2.0)
        print(f"3. 4 workers wrote into one shared output array "
              f"({mpshm.numpy.segment_name(out)}); the parent sees it all")

    mpshm.joblib.shutdown()  # the workers end (they would at exit anyway)
    assert float(blocks[3].sum()) > 0  # results outlive the workers
    mpshm.numpy.release(out)
    print("done: nothing is left in shared memory once the program ends")


if __name__ == "__main__":
    main()
