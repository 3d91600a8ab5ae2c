"""Sending an array to a pool worker: mpshm against every alternative, in one run.

    python benchmarks/peers.py [--sizes 1M 64M 256M] [--repeat N] [--json FILE]

A float64 array of each size goes from the parent to a 2-worker pool
(spawn start method), one task at a time; the worker sums it and returns
the sum (checked). Each method has its own pool, started and warmed up
before anything is timed:

* ``pool-pickle``: ``multiprocessing.Pool``, the array pickled through the pipe;
* ``executor-pickle``: ``concurrent.futures.ProcessPoolExecutor``, the same;
* ``stdlib-shm``: the standard library's SharedMemory, created and filled
  per task, passed by name, unlinked after the task;
* ``joblib``: ``joblib.Parallel`` (loky backend, its automatic memmapping of
  large arrays), if joblib is installed;
* ``torch``: ``torch.multiprocessing`` with a fresh tensor per task (torch
  moves its storage into shared memory when it is sent), if torch is installed;
* ``mpshm-<backend>``: :class:`mpshm.pool.Pool` given the plain array;
* ``preshared``: an array made with :func:`mpshm.numpy.empty`: only its handle
  travels.

``in-process`` is the sum computed in the parent (the floor for any method).
Every figure is the median time per task, and is also given as a ratio to
the same run's memcpy of that size (memcpy time / method time: 1.0 means
"as fast as one copy") and to the best peer (best peer time / method time).
Peers that are not installed are skipped with a note on stderr.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import functools
import json
import multiprocessing
import os
import sys
from multiprocessing import shared_memory
from typing import Any, Callable

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import mpshm.numpy as shared_numpy
from mpshm import pool as mpshm_pool
from mpshm._poolbench import _stdlib_attach, _sum
from mpshm._timing import median_time
from mpshm.cli.bench import MIB, label, parse_size

WORKERS = 2
FILL = 1.0
PEERS = ("pool-pickle", "executor-pickle", "stdlib-shm", "joblib", "torch")


class Method:
    """A way of sending an array: ``start()``, then ``run(arr)`` per task."""

    def __init__(self, name: str, start: Callable[[], Any],
                 task: Callable[[Any, np.ndarray], float], stop: Callable[[Any], None]) -> None:
        self.name = name
        self._start, self._task, self._stop = start, task, stop
        self.state: Any = None

    def start(self) -> None:
        self.state = self._start()
        self.run(np.full(MIB // 8, FILL))  # workers up, modules imported

    def run(self, arr: np.ndarray) -> float:
        return self._task(self.state, arr)

    def stop(self) -> None:
        if self.state is not None:
            self._stop(self.state)
            self.state = None


def _methods(backends: list[str]) -> list[Method]:
    ctx = multiprocessing.get_context("spawn")
    methods = [
        Method("pool-pickle", lambda: ctx.Pool(WORKERS),
               lambda p, a: p.apply(_sum, (a,)), lambda p: (p.close(), p.join())),
        Method("executor-pickle",
               lambda: concurrent.futures.ProcessPoolExecutor(WORKERS, mp_context=ctx),
               lambda e, a: e.submit(_sum, a).result(), lambda e: e.shutdown()),
    ]

    def stdlib_task(p: Any, a: np.ndarray) -> float:
        shm = shared_memory.SharedMemory(create=True, size=a.nbytes)
        try:
            view = np.ndarray(a.shape, a.dtype, buffer=shm.buf)
            np.copyto(view, a)
            del view
            return float(p.apply(_stdlib_attach, (shm.name, len(a), True)))
        finally:
            shm.close()
            shm.unlink()

    methods.append(Method("stdlib-shm", lambda: ctx.Pool(WORKERS), stdlib_task,
                          lambda p: (p.close(), p.join())))
    try:
        import joblib

        def joblib_task(par: Any, a: np.ndarray) -> float:
            return float(par([joblib.delayed(_sum)(a)])[0])

        def joblib_start() -> Any:
            par = joblib.Parallel(n_jobs=WORKERS, backend="loky")
            par.__enter__()
            return par

        methods.append(Method("joblib", joblib_start, joblib_task,
                              lambda par: par.__exit__(None, None, None)))
    except ImportError:
        print("peers: joblib is not installed: skipped (pip install 'mpshm[bench]' "
              "or pip install joblib)", file=sys.stderr)
    try:
        import torch
        import torch.multiprocessing as tmp

        def torch_task(p: Any, a: np.ndarray) -> float:
            return float(p.apply(_sum, (torch.from_numpy(a),)))

        methods.append(Method("torch", lambda: tmp.get_context("spawn").Pool(WORKERS),
                              torch_task, lambda p: (p.close(), p.join())))
    except ImportError:
        print("peers: torch is not installed: skipped (pip install torch; on these "
              "machines pip install torch==2.13.0 takes the CPU build on disk)",
              file=sys.stderr)
    for backend in backends:
        methods.append(Method(
            f"mpshm-{backend}",
            lambda backend=backend: mpshm_pool.Pool(WORKERS, context=ctx, backend=backend),
            lambda p, a: p.apply(_sum, (a,)), lambda p: (p.close(), p.join())))
    return methods


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", type=parse_size,
                        default=[MIB, 16 * MIB, 64 * MIB, 256 * MIB])
    parser.add_argument("--backends", nargs="+", default=["posix", "sysv", "mmap"])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--json", metavar="FILE")
    args = parser.parse_args(argv)
    sizes: list[int] = args.sizes
    methods = _methods(args.backends)
    preshared = mpshm_pool.Pool(WORKERS, context=multiprocessing.get_context("spawn"),
                                backend=args.backends[0])
    rows: list[dict[str, Any]] = []
    try:
        for m in methods:
            m.start()
        preshared.apply(_sum, (np.full(MIB // 8, FILL),))
        for nbytes in sizes:
            n = nbytes // 8
            arr = np.full(n, FILL)
            dst = np.zeros_like(arr)
            memcpy = median_time(functools.partial(np.copyto, dst, arr), 1, 3 + args.repeat)
            del dst
            times: dict[str, float] = {}
            times["in-process"] = median_time(functools.partial(_sum, arr), 1, 3 + args.repeat)
            for m in methods:
                assert m.run(arr) == n * FILL, m.name
                times[m.name] = median_time(functools.partial(m.run, arr), 1, args.repeat)
            shared = shared_numpy.empty(n, backend=args.backends[0])
            shared[:] = FILL
            assert preshared.apply(_sum, (shared,)) == n * FILL
            times["preshared"] = median_time(
                functools.partial(preshared.apply, _sum, (shared,)), 1, args.repeat)
            del shared
            best_peer = min(t for k, t in times.items() if k in PEERS)
            for name, seconds in times.items():
                rows.append({
                    "size": nbytes, "method": name, "ms": seconds * 1e3,
                    "x_memcpy": memcpy / seconds, "x_best_peer": best_peer / seconds,
                    "memcpy_ms": memcpy * 1e3,
                })
    finally:
        for m in methods:
            m.stop()
        preshared.close()
        preshared.join()
    print(f"python {sys.version.split()[0]}, {os.cpu_count()} cores; median ms per task; "
          "x memcpy = memcpy time / time; x best peer = best peer's time / time")
    print(f"{'size':>9}  {'method':<16}{'ms':>10}{'x memcpy':>10}{'x best peer':>13}")
    for row in rows:
        print(f"{label(row['size']):>9}  {row['method']:<16}{row['ms']:>10.2f}"
              f"{row['x_memcpy']:>10.2f}{row['x_best_peer']:>12.2f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
