"""Dask distributed on shared memory: ``preload=["mpshm.dask"]``.

Run:  python examples/dask_cluster.py [--storage posix|sysv|mmap]
Needs: pip install 'mpshm[dask]'

A ``LocalCluster`` of two process workers that preload ``mpshm.dask``, and
a client that imports it and talks to the workers directly:

1. A task on one worker makes a 64 MiB array; a task on the other sums it:
   the array crosses as a handle (one copy into shared memory, no socket).
2. The client sends an array to a worker and gets one back, the same way.
3. An array made with ``mpshm.numpy`` is already shared memory: it crosses
   with no copy at all (the receiver maps the very same segment).

Every transfer is counted by ``mpshm.dask.stats()`` in the sending process.
"""

from __future__ import annotations

import argparse
import logging

import numpy as np
from distributed import Client

import mpshm.dask  # in the client's process: registers the serializers
import mpshm.numpy

N = 64 << 17  # float64 items: 64 MiB


def make(n: int, value: float) -> np.ndarray:
    """A plain array, made in a worker."""
    return np.full(n, value)


def make_shared(n: int, value: float) -> np.ndarray:
    """An array in shared memory, made in a worker."""
    arr = mpshm.numpy.empty(n)
    arr[:] = value
    return arr


def where(x: np.ndarray) -> tuple[float, str | None]:
    """The sum of *x* and the mpshm segment its memory lies in."""
    return float(x.sum()), mpshm.numpy.segment_name(x)


def sent() -> int:
    return mpshm.dask.stats()["handles"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--storage", default=None, help="posix, sysv or mmap (default: posix)")
    args = parser.parse_args()

    # The same as LocalCluster(..., preload=["mpshm.dask"], preload_argv=[...]):
    cluster = mpshm.dask.local_cluster(backend=args.storage, n_workers=2,
                                       threads_per_worker=1, dashboard_address=":0",
                                       silence_logs=logging.CRITICAL)
    with cluster, Client(cluster, direct_to_workers=True) as client:
        a, b = sorted(client.scheduler_info()["workers"])

        x = client.submit(make, N, 1.0, workers=[a])
        total, _ = client.submit(where, x, workers=[b]).result()
        print(f"1. {N * 8 >> 20} MiB from worker to worker: sum {total:.0f}; "
              f"handles sent by the workers: {sum(client.run(sent).values())}")

        y = client.scatter(np.arange(N, dtype=np.float64), workers=[a])
        back = client.submit(np.negative, y, workers=[a]).result()
        assert back[-1] == -(N - 1) and back.flags.writeable
        print(f"2. client to worker and back: {back.nbytes >> 20} MiB, last item {back[-1]:.0f}; "
              f"handles sent by the client: {mpshm.dask.stats()['handles']}")

        z = client.submit(make_shared, N, 2.0, workers=[a])
        made_in = client.submit(mpshm.numpy.segment_name, z, workers=[a]).result()
        total, seen_in = client.submit(where, z, workers=[b]).result()
        assert seen_in == made_in
        print(f"3. an mpshm.numpy array crossed with no copy: both workers see "
              f"segment {made_in}; sum {total:.0f}")
        del x, y, z, back
    mpshm.dask.dask_teardown(None)  # (Client.close() does it too)
    print("done: nothing is left in shared memory once the cluster is closed")


if __name__ == "__main__":
    main()
