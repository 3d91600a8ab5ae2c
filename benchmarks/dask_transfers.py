"""Dask distributed's own transfers against mpshm.dask's, in one run.

    python benchmarks/dask_transfers.py [--sizes 1M 16M 256M 1G] [--repeat N]
                                        [--storage posix] [--json FILE] [--progress]

Two ``LocalCluster``\\ s of ``n_workers=2, threads_per_worker=1,
processes=True``, one after the other: one as Dask ships (no preload), one
whose workers preload ``mpshm.dask``. Every figure is a median of *N* timed
rounds (default 5) after two untimed ones, in milliseconds, also as ratios
(these machines are shared and noisy): ``x memcpy`` is memcpy's time for the
size over the method's, ``x dask`` is Dask's default time over the method's.

Paths, for a float64 array of each size (a new array, and a new key, every
round):

* **w2w** (worker to worker): a task on worker A makes the array; a task on
  B sums it, minus the time of the same sum on A (both timed in the round:
  what is left is the transfer, Dask's fetch included).
* **c2w** (client to worker): ``client.scatter(array, workers=[A],
  hash=False)`` and a sum there. ``hash=False`` on both sides: the default
  hashes the array's bytes to name it (about 0.15 s per 256 MiB here), the
  same work with or without mpshm, and no part of a transfer.
* **w2c** (worker to client): ``future.result()`` of an array a task made.
* **-preshared**: the same with arrays already in mpshm memory
  (:func:`mpshm.numpy.empty`, made by the task on A, or by the client for
  c2w): no copy, the receiver maps the same memory.

Methods: ``dask`` (Dask's defaults: the client's data goes through the
scheduler), ``dask-direct`` (Dask with ``direct_to_workers=True``, what
mpshm's client uses: it shows what the scheduler's relay costs), ``mpshm``;
and, as root, ``fallback``: w2w and c2w between this cluster's worker (or
the client) and a worker started inside ``unshare --ipc --mount`` with its
own tmpfs on /dev/shm (mpshm.dask preloaded, so the check runs and decides
"bytes"), in rounds alternating with ``dask-same``: the same processes with
mpshm.dask off on the sender (Dask's own path), so that only the check's
cost differs. ``dask-ns``: the namespaced worker in Dask's own cluster, no
mpshm anywhere (for scale: such a worker is slower than LocalCluster's own).
The last lines check issue 18's targets at 256 MiB with PASS or FAIL.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
from typing import Any, Callable, Iterator, Optional

import numpy as np
from distributed import Client, LocalCluster, wait

import mpshm.dask
import mpshm.numpy
from mpshm.bench import MIB, label, parse_size

WARMUP = 2


def _made(n: int, value: float) -> np.ndarray:
    arr = np.empty(n)
    arr.fill(value)
    return arr


def _made_shared(n: int, value: float) -> np.ndarray:
    arr = mpshm.numpy.empty(n)
    arr.fill(value)
    return arr


def _sum(x: np.ndarray) -> float:
    return float(x.sum())


def _rounds(fn: Callable[[int], float], repeat: int, warmup: int = WARMUP) -> float:
    for i in range(warmup):
        fn(i)
    return statistics.median(fn(i) for i in range(warmup, warmup + repeat))


def _memcpy(nbytes: int, repeat: int) -> float:
    src = np.ones(nbytes // 8)
    dst = np.empty_like(src)

    def one(_i: int) -> float:
        start = time.perf_counter()
        np.copyto(dst, src)
        return time.perf_counter() - start

    return _rounds(one, max(repeat, 5))


def _settle(client: Client) -> None:
    """Let the released keys of the last round be forgotten everywhere."""
    time.sleep(0.05)


def w2w(client: Client, a: str, b: str, n: int, repeat: int, shared: bool,
        warmup: int = WARMUP) -> float:
    make = _made_shared if shared else _made

    def one(i: int) -> float:
        x = client.submit(make, n, float(i), workers=[a], pure=False)
        wait(x)
        start = time.perf_counter()
        here = client.submit(_sum, x, workers=[a], pure=False).result()
        mid = time.perf_counter()
        there = client.submit(_sum, x, workers=[b], pure=False).result()
        end = time.perf_counter()
        assert here == there == n * float(i), (here, there, n, i)
        del x
        _settle(client)
        return (end - mid) - (mid - start)

    return _rounds(one, repeat, warmup)


def _engage(on: bool, storage: str) -> None:
    """mpshm.dask in this process: on (its settings), or off (a threshold no
    array reaches: Dask's own path, through the same serializer entry)."""
    mpshm.dask.configure(storage, mpshm.dask.DEFAULT_THRESHOLD if on else 1 << 62)


def fallback_pair(client: Client, sender: Optional[str], receiver: str, n: int, repeat: int,
                  storage: str) -> tuple[float, float]:
    """Medians of w2w (*sender* a worker) or c2w (*sender* None: this client)
    to *receiver*, which cannot map our memory: rounds alternate between
    mpshm.dask engaged on the sender (its check runs and says "bytes") and
    off, in the same processes, so that only the check's cost differs."""
    samples: dict[bool, list[float]] = {True: [], False: []}
    for i in range(2 * (WARMUP + repeat)):
        on = i % 2 == 0
        if sender is None:
            _engage(on, storage)
            t = c2w(client, receiver, n, 1, False, warmup=0)
        else:
            client.run(_engage, on, storage, workers=[sender])
            t = w2w(client, sender, receiver, n, 1, False, warmup=0)
        if i >= 2 * WARMUP:
            samples[on].append(t)
    if sender is None:
        _engage(True, storage)
    else:
        client.run(_engage, True, storage, workers=[sender])
    return statistics.median(samples[True]), statistics.median(samples[False])


def c2w(client: Client, a: str, n: int, repeat: int, shared: bool,
        warmup: int = WARMUP) -> float:
    def one(i: int) -> float:
        y = _made_shared(n, float(i)) if shared else _made(n, float(i))
        start = time.perf_counter()
        f = client.scatter(y, workers=[a], hash=False)
        total = client.submit(_sum, f, workers=[a], pure=False).result()
        end = time.perf_counter()
        assert total == n * float(i)
        del f
        if shared:
            mpshm.numpy.release(y)
        del y
        _settle(client)
        return end - start

    return _rounds(one, repeat, warmup)


def w2c(client: Client, a: str, n: int, repeat: int, shared: bool) -> float:
    make = _made_shared if shared else _made

    def one(i: int) -> float:
        x = client.submit(make, n, float(i), workers=[a], pure=False)
        wait(x)
        start = time.perf_counter()
        arr = x.result()
        end = time.perf_counter()
        assert arr.shape == (n,) and float(arr[-1]) == float(i)
        del x, arr
        _settle(client)
        return end - start

    return _rounds(one, repeat)


def _namespaced_worker(address: str, preload: bool) -> Optional[subprocess.Popen[bytes]]:
    """A worker (with its nanny, as LocalCluster's) in private IPC and mount
    namespaces with its own /dev/shm, listening on 127.0.0.1 as LocalCluster's
    workers do; or None (not root, or no unshare)."""
    if os.geteuid() != 0 or not shutil.which("unshare"):
        return None
    shell = ('mount -t tmpfs tmpfs /dev/shm && exec "$0" -m distributed.cli.dask_worker "$1" '
             '--host 127.0.0.1 --nthreads 1 --no-dashboard --name namespaced'
             + (' --preload mpshm.dask' if preload else ''))
    env = dict(os.environ)
    env.pop("MPSHM_TRACKER", None)
    here = os.path.dirname(os.path.abspath(__file__))
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (here, os.path.dirname(here), env.get("PYTHONPATH")) if p)
    return subprocess.Popen(["unshare", "--mount", "--ipc", "sh", "-c", shell,
                             sys.executable, address], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)


@contextlib.contextmanager
def _namespaced(client: Client, address: str, preload: bool) -> Iterator[Optional[str]]:
    """The address of a namespaced worker joined to the cluster at *address*
    (None if none can be started); stopped (by its PID) on exit."""
    proc = _namespaced_worker(address, preload)
    if proc is None:
        yield None
        return
    try:
        client.wait_for_workers(3, timeout=60)
        info = client.scheduler_info()["workers"]
        yield next(w for w, d in info.items() if d.get("name") == "namespaced")
    finally:
        os.kill(proc.pid, signal.SIGTERM)  # our own child, by PID
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", nargs="+", default=["1M", "16M", "256M", "1G"])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--storage", default="posix", choices=["posix", "sysv", "mmap"])
    parser.add_argument("--no-fallback", action="store_true",
                        help="skip the namespaced worker (root only anyway)")
    parser.add_argument("--json", help="also write the figures to this file")
    parser.add_argument("--progress", action="store_true",
                        help="print each figure to stderr as it is measured")
    args = parser.parse_args(argv)
    sizes = [parse_size(s) for s in args.sizes]
    import distributed

    print(f"distributed {distributed.__version__}, LocalCluster(n_workers=2, "
          f"threads_per_worker=1), medians of {args.repeat}, mpshm storage {args.storage}")
    memcpy = {n: _memcpy(n, args.repeat) for n in sizes}
    times: dict[tuple[str, int, str], float] = {}
    common = {"n_workers": 2, "threads_per_worker": 1, "dashboard_address": ":0",
              "processes": True, "silence_logs": logging.CRITICAL}

    def run(method: str, client: Client, a: str, b: str, paths: list[str]) -> None:
        for nbytes in sizes:
            n = nbytes // 8
            for path in paths:
                shared = path.endswith("-preshared")
                kind = path.removesuffix("-preshared")
                if kind == "w2w":
                    t = w2w(client, a, b, n, args.repeat, shared)
                elif kind == "c2w":
                    t = c2w(client, a, n, args.repeat, shared)
                else:
                    t = w2c(client, a, n, args.repeat, shared)
                times[(path, nbytes, method)] = t
                if args.progress:
                    print(f"  {path:14} {label(nbytes):>8} {method:12} {t * 1e3:9.2f} ms",
                          file=sys.stderr, flush=True)

    with LocalCluster(**common) as cluster:  # Dask as it ships
        a, b = sorted(cluster.scheduler_info["workers"])
        with Client(cluster) as client:
            run("dask", client, a, b, ["w2w", "c2w", "w2c"])
        with Client(cluster, direct_to_workers=True) as client:
            run("dask-direct", client, a, b, ["c2w", "w2c"])
            if not args.no_fallback:
                with _namespaced(client, cluster.scheduler_address, False) as inside:
                    if inside is not None:
                        run("dask-ns", client, a, inside, ["w2w"])
                        run("dask-ns", client, inside, a, ["c2w"])
    with mpshm.dask.local_cluster(backend=args.storage, **common) as cluster:
        a, b = sorted(cluster.scheduler_info["workers"])
        with Client(cluster, direct_to_workers=True) as client:
            run("mpshm", client, a, b, ["w2w", "c2w", "w2c", "w2w-preshared",
                                         "c2w-preshared", "w2c-preshared"])
            if not args.no_fallback:
                with _namespaced(client, cluster.scheduler_address, True) as inside:
                    if inside is not None:
                        for nbytes in sizes:
                            for path, sender, receiver in (("w2w", a, inside),
                                                           ("c2w", None, inside)):
                                on, off = fallback_pair(client, sender, receiver, nbytes // 8,
                                                        args.repeat, args.storage)
                                times[(path, nbytes, "fallback")] = on
                                times[(path, nbytes, "dask-same")] = off
    mpshm.dask.dask_teardown(None)

    rows = []
    print(f"{'path':16} {'size':>8}  {'method':12} {'ms':>9} {'x memcpy':>9} {'x dask':>8}")
    for (path, nbytes, method), t in times.items():
        base = times.get((path.removesuffix("-preshared"), nbytes, "dask"))
        x_dask = base / t if base and t > 0 else float("nan")
        x_memcpy = memcpy[nbytes] / t if t > 0 else float("nan")
        rows.append({"path": path, "size": nbytes, "method": method, "ms": t * 1e3,
                     "x_memcpy": x_memcpy, "x_dask": x_dask})
        print(f"{path:16} {label(nbytes):>8}  {method:12} {t * 1e3:9.2f} {x_memcpy:9.2f} "
              f"{x_dask:8.2f}")
    print("memcpy: " + ", ".join(f"{label(n)} {t * 1e3:.2f} ms" for n, t in memcpy.items()))

    targets = []
    size = 256 * MIB
    if size in sizes:
        def ratio(path: str, method: str) -> float:
            t = times.get((path, size, method))
            base = times.get((path.removesuffix("-preshared"), size, "dask"))
            return base / t if t and base else float("nan")

        for path, method, goal in (("w2w", "mpshm", 4.0), ("w2w-preshared", "mpshm", 20.0),
                                   ("c2w", "mpshm", 8.0), ("w2c", "mpshm", 5.0)):
            r = ratio(path, method)
            targets.append((f"{path} 256 MiB {method} x dask", r, goal, r >= goal))
        for path in ("w2w", "c2w"):  # against Dask in the same processes
            t, base = times.get((path, size, "fallback")), times.get((path, size, "dask-same"))
            if t and base:
                targets.append((f"{path} 256 MiB fallback x dask-same", base / t, 0.95,
                                base / t >= 0.95))
    print("\ntargets (issue 18)")
    for what, r, goal, ok in targets:
        print(f"  {'PASS' if ok else 'FAIL'}  {what}: {r:.2f} (goal >= {goal})")
    figures = {"rows": rows, "memcpy_ms": {str(n): t * 1e3 for n, t in memcpy.items()},
               "targets": targets}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(figures, f, indent=1)
    return figures


if __name__ == "__main__":
    main()
