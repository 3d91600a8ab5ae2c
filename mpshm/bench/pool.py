"""The measuring of ``mpshm bench``: :class:`mpshm.pool.Pool` against pickling
and the standard library's SharedMemory, side by side, sending float64 arrays
to a 2-worker pool (spawn) and back, one task at a time. What each direction
and method means and how figures are taken: ``docs/cli.md`` (mpshm bench).
The development targets for these figures are checked in
``benchmarks/pool.py``, not here.

The worker functions are module-level here so that spawned workers import
them from the installed package. This module imports NumPy: the command line
(:mod:`mpshm.cli.bench`) imports it only once it knows NumPy is there.
"""

from __future__ import annotations

import functools
import gc
import multiprocessing
import os
import signal
import statistics
import sys
import time
from multiprocessing import shared_memory
from typing import Any, Callable, Optional, Protocol, Sequence

import numpy as np
import numpy.typing as npt

from .. import numpy as shared_numpy
from .. import pool as mpshm_pool
from . import DIRECTIONS, MIB, label, median_time

__all__ = [
    "Reporter",
    "add_ratios",
    "measure",
    "median_time",
    "memcpy_gbps",
    "methods_for",
    "per_task",
    "rounds_for",
]

Array = npt.NDArray[np.float64]

WORKERS = 2
START_METHOD = "spawn"
MEMCPY_BYTES = 256 * MIB
ARG_FILL = 1.0  # sums of such arrays are exact, so every task checks what arrived
RESULT_FILL = 2.0
# A median needs samples: one or two rounds let a single slow one (another
# program on a shared machine) be the figure.
MIN_ROUNDS = 3
ROUND_SECONDS = 0.01  # short tasks: enough calls per round to last about this long
LONG_TASK = 1.0  # seconds: a task this long needs no separate warm-up call
# A multiprocessing pool waits forever for a task whose worker died (killed from
# outside, say): every wait here has a limit, and the run fails instead of hanging.
TASK_TIMEOUT = 600.0
BARRIER_TIMEOUT = 120.0


class Reporter(Protocol):
    """What :func:`measure` tells about its progress (the command line shows it)."""

    def phase(self, text: str) -> None:
        """A step before the measurements starts (*text* says which)."""

    def note(self, text: str) -> None:
        """That step is over (*text* says its result)."""

    def begin(self, direction: str, nbytes: int, method: str) -> None:
        """The measurement of *method* in *direction* at *nbytes* starts."""

    def end(self, direction: str, nbytes: int, method: str, seconds: float) -> None:
        """That measurement is over: *seconds* per task."""


def methods_for(backends: Sequence[str]) -> tuple[str, ...]:
    """The methods measured with the mpshm *backends*, in table order."""
    return ("pickle", "stdlib-shm", *(f"mpshm-{b}" for b in backends), "preshared")


# -- in the workers --------------------------------------------------------------

_barrier: Any = None
_cache: dict[int, Array] = {}


def _init(barrier: Any) -> None:
    global _barrier
    _barrier = barrier
    # Ctrl-C reaches the whole process group: only the parent acts on it (it ends
    # the pools). A worker interrupted in the middle of taking a task would leave
    # the pool's queue locked, and the parent waiting for it forever.
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _source(n: int) -> Array:
    """The array this worker returns for *n* items: made (and faulted in) once."""
    arr = _cache.get(n)
    if arr is None:
        _cache.clear()
        arr = _cache[n] = np.full(n, RESULT_FILL)
    return arr


def _each(op: str, n: int) -> None:
    """Run once in every worker (WORKERS calls in one starmap; the barrier keeps
    a worker from taking two): "prepare" the array returned for *n* items, or
    "clear" the cache."""
    _cache.clear()
    if op == "prepare":
        _source(n)
    _barrier.wait(BARRIER_TIMEOUT)


def _warm(arr: Array) -> Array:
    """Both workers: receive an array, read it, return one."""
    float(arr.sum())
    _barrier.wait(BARRIER_TIMEOUT)
    return np.full(len(arr), RESULT_FILL)


def _noop() -> None:
    return None


def _length(arr: Array) -> int:
    return len(arr)


def _sum(arr: Array) -> float:
    return float(arr.sum())


def _stdlib_attach(name: str, n: int, read: bool) -> float:
    shm = shared_memory.SharedMemory(name)
    try:
        arr: Array = np.ndarray((n,), np.float64, buffer=shm.buf)
        result = float(arr.sum()) if read else float(len(arr))
        del arr
    finally:
        shm.close()
    return result


def _give(n: int) -> Array:
    return _source(n)


def _stdlib_give(n: int) -> str:
    src = _source(n)
    shm = shared_memory.SharedMemory(create=True, size=src.nbytes)
    try:
        view: Array = np.ndarray(src.shape, src.dtype, buffer=shm.buf)
        np.copyto(view, src)
        del view
    except BaseException:
        shm.close()
        shm.unlink()
        raise
    shm.close()
    return shm.name


def _fill(out: Array) -> None:
    np.copyto(out, _source(len(out)))


# -- timing ----------------------------------------------------------------------


def rounds_for(nbytes: int, repeat: int) -> int:
    """Median of this many rounds: fewer for large sizes (*repeat* at 1 GiB),
    never fewer than :data:`MIN_ROUNDS`."""
    for limit, factor in ((4 * MIB, 5), (16 * MIB, 3), (64 * MIB, 2), (256 * MIB, 5 / 3)):
        if nbytes <= limit:
            return max(MIN_ROUNDS, round(factor * repeat))
    return max(MIN_ROUNDS, repeat)


def per_task(fn: Callable[[], Any], nbytes: int, repeat: int) -> tuple[float, int, int]:
    """(median seconds per task, rounds, tasks per round). The first call is a
    warm-up; it also says how many tasks a round needs to last ROUND_SECONDS.
    A task of LONG_TASK seconds or more is its own warm-up: the first call
    counts as a round (the median copes with one slow first call)."""
    rounds = rounds_for(nbytes, repeat)
    start = time.perf_counter()
    fn()
    first = time.perf_counter() - start
    if first < ROUND_SECONDS:
        number = min(100, int(ROUND_SECONDS / max(first, 1e-6)))
        return median_time(fn, number, rounds), rounds, number
    samples = [first] if first >= LONG_TASK and rounds >= 3 else []
    while len(samples) < rounds:
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples), rounds, 1


def memcpy_gbps(repeat: int) -> float:
    """Single-thread copy bandwidth: np.copyto between two pre-faulted arrays."""
    src = np.full(MEMCPY_BYTES // 8, 1.0)
    dst = np.zeros_like(src)
    dst.fill(0.0)
    seconds = median_time(lambda: np.copyto(dst, src), 1, 3 + 2 * repeat)
    return MEMCPY_BYTES / seconds / 1e9


# -- pools -----------------------------------------------------------------------


def make_pools(methods: Sequence[str], preshared_backend: str) -> dict[str, Any]:
    """One 2-worker pool per method (workers start in the background)."""
    ctx = multiprocessing.get_context(START_METHOD)
    pools: dict[str, Any] = {}
    try:
        for method in methods:
            initargs = (ctx.Barrier(WORKERS),)
            if method in ("pickle", "stdlib-shm"):
                pools[method] = ctx.Pool(WORKERS, _init, initargs)
            else:
                backend = preshared_backend if method == "preshared" else method[len("mpshm-"):]
                pools[method] = mpshm_pool.Pool(WORKERS, _init, initargs, context=ctx,
                                                backend=backend)
    except BaseException:
        end_pools(pools, ok=False)
        raise
    return pools


def end_pools(pools: dict[str, Any], ok: bool) -> None:
    """Close the pools (or terminate them, when the run failed) and wait for them."""
    for pool in pools.values():
        if ok:
            pool.close()
        else:
            pool.terminate()
    for pool in pools.values():
        pool.join()


def call(pool: Any, fn: Callable[..., Any], *args: Any) -> Any:
    """``pool.apply(fn, args)``, with a time limit."""
    return pool.apply_async(fn, args).get(TASK_TIMEOUT)


def on_each_worker(pool: Any, op: str, n: int = 0) -> None:
    """Run ``_each(op, n)`` once in each worker of *pool*."""
    pool.starmap_async(_each, [(op, n)] * WORKERS, chunksize=1).get(TASK_TIMEOUT)


def warm_up(pool: Any) -> None:
    """Start both workers, and send arrays both ways through each of them."""
    arr = np.full(MIB // 8, ARG_FILL)
    for _ in range(2):
        for result in pool.map_async(_warm, [arr] * WORKERS, chunksize=1).get(TASK_TIMEOUT):
            float(result.sum())
        for _ in range(3):
            call(pool, _sum, arr)
            call(pool, _noop)


# -- the timed tasks -------------------------------------------------------------


class _Check:
    """Compares what a task got with what it should have got."""

    def __init__(self, direction: str, method: str, n: int) -> None:
        self.what = f"{method} {direction} {label(n * 8)}"
        self.expected = {"send": n, "args": n * ARG_FILL, "results": n * RESULT_FILL}[direction]

    def __call__(self, value: Any) -> None:
        if value != self.expected:
            raise RuntimeError(f"{self.what}: got {value!r}, expected {self.expected!r}")


def _stdlib_to_worker(pool: Any, arr: Array, read: bool, check: _Check) -> Callable[[], None]:
    n = len(arr)

    def run() -> None:
        shm = shared_memory.SharedMemory(create=True, size=arr.nbytes)
        try:
            view: Array = np.ndarray((n,), np.float64, buffer=shm.buf)
            np.copyto(view, arr)
            del view
            value = call(pool, _stdlib_attach, shm.name, n, read)
        finally:
            shm.close()
            shm.unlink()
        check(value)

    return run


def _stdlib_from_worker(pool: Any, n: int, check: _Check) -> Callable[[], None]:
    def run() -> None:
        name = call(pool, _stdlib_give, n)
        shm = shared_memory.SharedMemory(name)
        try:
            view: Array = np.ndarray((n,), np.float64, buffer=shm.buf)
            value = float(view.sum())
            del view
        finally:
            shm.close()
            shm.unlink()
        check(value)

    return run


def _into_shared(pool: Any, out: Array, check: _Check) -> Callable[[], None]:
    def run() -> None:
        call(pool, _fill, out)
        check(float(out.sum()))

    return run


def _from_worker(pool: Any, n: int, check: _Check) -> Callable[[], None]:
    def run() -> None:
        result = call(pool, _give, n)
        check(float(result.sum()))

    return run


def _to_worker(pool: Any, sent: Array, direction: str, check: _Check) -> Callable[[], None]:
    fn = _length if direction == "send" else _sum

    def run() -> None:
        check(call(pool, fn, sent))

    return run


def task(direction: str, method: str, pool: Any, arr: Optional[Array],
         shared: Optional[Array], n: int) -> Callable[[], None]:
    """One timed task: moves *n* float64 items in *direction* by *method*."""
    check = _Check(direction, method, n)
    if direction in ("send", "args"):
        assert arr is not None
        if method == "stdlib-shm":
            return _stdlib_to_worker(pool, arr, direction == "args", check)
        if method == "preshared":
            assert shared is not None
            return _to_worker(pool, shared, direction, check)
        return _to_worker(pool, arr, direction, check)
    if method == "stdlib-shm":
        return _stdlib_from_worker(pool, n, check)
    if method == "preshared":
        assert shared is not None
        return _into_shared(pool, shared, check)
    return _from_worker(pool, n, check)


def measure_size(pools: dict[str, Any], nbytes: int, repeat: int, preshared_backend: str,
                 reporter: Reporter) -> list[dict[str, Any]]:
    """Every direction and method at one size; frees its arrays before returning."""
    n = nbytes // 8
    rows = []
    empty: dict[str, float] = {}
    arr: Optional[Array] = np.full(n, ARG_FILL)
    shared: Optional[Array] = None
    try:
        for direction in DIRECTIONS:
            if direction == "results":
                arr = None  # the parent's array is not needed any more
            for method, pool in pools.items():
                reporter.begin(direction, nbytes, method)
                if method == "preshared":
                    shared = shared_numpy.empty(n, backend=preshared_backend)
                    if arr is not None:
                        np.copyto(shared, arr)
                if direction == "send":  # this pool's empty task, next to its figures
                    noop = functools.partial(call, pool, _noop)
                    empty[method] = median_time(noop, 20, 3 * repeat)
                if direction == "results":
                    on_each_worker(pool, "prepare", n)
                seconds, rounds, number = per_task(
                    task(direction, method, pool, arr, shared, n), nbytes, repeat)
                if direction == "results":
                    on_each_worker(pool, "clear")
                if shared is not None:
                    shared_numpy.release(shared)
                    shared = None
                rows.append({"direction": direction, "size": nbytes, "size_label": label(nbytes),
                             "method": method, "ms": seconds * 1e3,
                             "empty_task_ms": empty[method] * 1e3,
                             "overhead_ms": (seconds - empty[method]) * 1e3,
                             "rounds": rounds, "tasks_per_round": number})
                reporter.end(direction, nbytes, method, seconds)
    finally:
        if shared is not None:
            shared_numpy.release(shared)
        del arr, shared
        gc.collect()
    return rows


# -- figures ---------------------------------------------------------------------


def add_ratios(rows: list[dict[str, Any]], memcpy: float) -> None:
    """Add GB/s, the ratio to pickle and the time in memcpys to every row: how
    many copies of the array (at *memcpy* GB/s) the time per task would pay
    for (below 1 when the task costs less than one copy: nothing was copied)."""
    pickle_ms = {(r["direction"], r["size"]): r["ms"] for r in rows if r["method"] == "pickle"}
    for r in rows:
        r["gbps"] = r["size"] / (r["ms"] / 1e3) / 1e9
        r["x_vs_pickle"] = pickle_ms[r["direction"], r["size"]] / r["ms"]
        r["memcpys"] = r["ms"] / 1e3 / (r["size"] / (memcpy * 1e9))


def measure(sizes: Sequence[int], repeat: int, backends: Sequence[str],
            preshared_backend: str, reporter: Reporter) -> dict[str, Any]:
    """The whole benchmark: memcpy, then every direction, method and size.

    Returns the figures as a JSON-ready dict: the machine (``python``, ``numpy``,
    ``cores``, ``workers``, ``start_method``), ``memcpy_gbps``, ``empty_task_ms_at_start``
    (per method), ``rows`` (one per direction, method and size), and the
    settings of the run.
    """
    methods = methods_for(backends)
    reporter.phase("measuring memcpy")
    memcpy = memcpy_gbps(repeat)
    reporter.note(f"memcpy {memcpy:.2f} GB/s (np.copyto, {label(MEMCPY_BYTES)}, one thread)")

    started = time.perf_counter()
    reporter.phase(f"starting {len(methods)} pools")
    pools = make_pools(methods, preshared_backend)
    ok = False
    try:
        empty = {}
        for method, pool in pools.items():
            warm_up(pool)
            empty[method] = median_time(functools.partial(call, pool, _noop), 20, 5 * repeat) * 1e3
        reporter.note(f"{len(pools)} pools ready in {time.perf_counter() - started:.1f} s "
                      f"({WORKERS} {START_METHOD} workers each, warmed up)")
        rows = []
        for nbytes in sizes:
            rows += measure_size(pools, nbytes, repeat, preshared_backend, reporter)
        ok = True
    finally:
        end_pools(pools, ok)
    elapsed = time.perf_counter() - started

    add_ratios(rows, memcpy)
    return {
        "python": sys.version.split()[0], "numpy": np.__version__,
        "cores": os.cpu_count(), "workers": WORKERS, "start_method": START_METHOD,
        "memcpy_gbps": memcpy, "memcpy_bytes": MEMCPY_BYTES,
        "backends": list(backends), "preshared_backend": preshared_backend,
        "sizes": list(sizes), "repeat": repeat, "measuring_seconds": elapsed,
        "empty_task_ms_at_start": empty, "rows": rows,
    }
