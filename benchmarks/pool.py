"""mpshm.pool.Pool against pickling and the standard library's SharedMemory, side by side.

    python benchmarks/pool.py [--quick] [--sizes 1M 16M 256M 1G] [--repeat N] [--json FILE]

A float64 array of each size goes between the parent and a 2-worker pool
(spawn start method), one task at a time (``pool.apply``: one array per task,
so nothing is deduplicated as it would be inside one ``map``). Directions:

* ``send``: parent -> worker; the worker takes the array's length only (does
  not read its data): the cost of getting the array there;
* ``args``: parent -> worker; the worker returns the array's sum: getting it
  there, plus reading every byte on the other side;
* ``results``: worker -> parent; the worker returns an array of the size (the
  same array every time, made once per worker and size, outside the timed
  region), the parent sums it.

Methods, each with its own pool (warmed up, kept for all sizes):

* ``pickle``: ``multiprocessing.Pool``; the array is pickled through the pipe;
* ``stdlib-shm``: ``multiprocessing.shared_memory.SharedMemory`` passed by
  name: the sender creates a segment per task and copies the array in, the
  receiver attaches (and, for args and results, sums); the parent unlinks once
  the task is over. All of it is inside the timed region;
* ``mpshm-<backend>``: ``mpshm.pool.Pool(2, backend=...)`` given the plain
  numpy array (its sharing pickler copies it once into a fresh segment);
* ``preshared``: an array made with ``mpshm.numpy.empty`` (posix backend,
  filled outside the timed region) sent to an ``mpshm.pool.Pool``: only its
  handle travels. For results, the parent gives the worker such an array and
  the worker copies its array into it (returning None): one copy, as for the
  other methods, but into memory that already exists.

Figures are the median time per task over several rounds (fewer rounds for
large sizes), also as GB/s (10^9 bytes of the array per second), as a ratio
to ``pickle`` in the same direction and size (pickle time / method time) and
as a fraction of this machine's single-thread memcpy bandwidth (np.copyto of
256 MiB between two pre-faulted arrays, measured in the same run). The time
of an empty task (``pool.apply(noop)``) is measured on each pool, at the start
and again next to each size's figures; a row's ``overhead_ms`` (in the JSON)
is its time per task minus the latter. A summary checks
the targets and prints PASS or FAIL for each; these machines are shared and
noisy, so one FAIL is a reason to rerun, not a verdict.
"""

from __future__ import annotations

import argparse
import gc
import json
import multiprocessing
import os
import re
import statistics
import sys
import time
from multiprocessing import shared_memory
from typing import Any, Callable, Optional

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from _timing import median_time

import mpshm
import mpshm.numpy
import mpshm.pool

KIB, MIB, GIB = 1 << 10, 1 << 20, 1 << 30
DEFAULT_SIZES = ["1M", "16M", "256M", "1G"]
QUICK_SIZES = ["1M", "16M", "64M"]
WORKERS = 2
START_METHOD = "spawn"
BACKENDS = ("posix", "sysv", "mmap")
PRESHARED_BACKEND = "posix"
METHODS = ("pickle", "stdlib-shm", *(f"mpshm-{b}" for b in BACKENDS), "preshared")
DIRECTIONS = ("send", "args", "results")
MEMCPY_BYTES = 256 * MIB
ARG_FILL = 1.0  # sums of such arrays are exact, so every task checks what arrived
RESULT_FILL = 2.0
ROUND_SECONDS = 0.01  # short tasks: enough calls per round to last about this long
LONG_TASK = 1.0  # seconds: a task this long needs no separate warm-up call
# A multiprocessing pool waits forever for a task whose worker died (killed from
# outside, say): every wait here has a limit, and the run fails instead of hanging.
TASK_TIMEOUT = 600.0


# -- in the workers --------------------------------------------------------------

_barrier: Any = None
_cache: dict[int, np.ndarray] = {}


def _init(barrier: Any) -> None:
    global _barrier
    _barrier = barrier


def _source(n: int) -> np.ndarray:
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
    _barrier.wait(120)


def _warm(arr: np.ndarray) -> np.ndarray:
    """Both workers: receive an array, read it, return one."""
    float(arr.sum())
    _barrier.wait(120)
    return np.full(len(arr), RESULT_FILL)


def _noop() -> None:
    return None


def _length(arr: np.ndarray) -> int:
    return len(arr)


def _sum(arr: np.ndarray) -> float:
    return float(arr.sum())


def _stdlib_attach(name: str, n: int, read: bool) -> Any:
    shm = shared_memory.SharedMemory(name)
    try:
        arr = np.ndarray((n,), np.float64, buffer=shm.buf)
        result = float(arr.sum()) if read else len(arr)
        del arr
    finally:
        shm.close()
    return result


def _give(n: int) -> np.ndarray:
    return _source(n)


def _stdlib_give(n: int) -> str:
    src = _source(n)
    shm = shared_memory.SharedMemory(create=True, size=src.nbytes)
    try:
        view = np.ndarray(src.shape, src.dtype, buffer=shm.buf)
        np.copyto(view, src)
        del view
    except BaseException:
        shm.close()
        shm.unlink()
        raise
    shm.close()
    return shm.name


def _fill(out: np.ndarray) -> None:
    np.copyto(out, _source(len(out)))


# -- in the parent ---------------------------------------------------------------


def parse_size(text: str) -> int:
    """'1M', '16MiB', '1G', '4096' -> bytes (a multiple of 8, for float64)."""
    match = re.fullmatch(r"\s*(\d+)\s*([kmg]?)(?:i?b)?\s*", text, re.IGNORECASE)
    if match is None:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (try 1M, 256M, 1G)")
    nbytes = int(match.group(1)) * {"": 1, "k": KIB, "m": MIB, "g": GIB}[match.group(2).lower()]
    nbytes -= nbytes % 8
    if nbytes < 8:
        raise argparse.ArgumentTypeError(f"size {text!r} is below one float64")
    return nbytes


def label(nbytes: int) -> str:
    for unit, name in ((GIB, "GiB"), (MIB, "MiB"), (KIB, "KiB")):
        if nbytes >= unit and nbytes % unit == 0:
            return f"{nbytes // unit} {name}"
    return f"{nbytes} B"


def rounds_for(nbytes: int, repeat: int) -> int:
    """Median of this many rounds: fewer for large sizes (*repeat* at 1 GiB)."""
    for limit, factor in ((4 * MIB, 5), (16 * MIB, 3), (64 * MIB, 2), (256 * MIB, 5 / 3)):
        if nbytes <= limit:
            return max(1, round(factor * repeat))
    return repeat


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


def make_pools() -> dict[str, Any]:
    ctx = multiprocessing.get_context(START_METHOD)
    pools: dict[str, Any] = {}
    try:
        for method in METHODS:
            initargs = (ctx.Barrier(WORKERS),)
            if method in ("pickle", "stdlib-shm"):
                pools[method] = ctx.Pool(WORKERS, _init, initargs)
            else:
                backend = PRESHARED_BACKEND if method == "preshared" else method[len("mpshm-"):]
                pools[method] = mpshm.pool.Pool(WORKERS, _init, initargs, context=ctx,
                                                backend=backend)
    except BaseException:
        for pool in pools.values():
            pool.terminate()
            pool.join()
        raise
    return pools


def call(pool: Any, fn: Callable[..., Any], *args: Any) -> Any:
    """``pool.apply(fn, args)``, with a time limit."""
    return pool.apply_async(fn, args).get(TASK_TIMEOUT)


def on_each_worker(pool: Any, op: str, n: int = 0) -> None:
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


def task(direction: str, method: str, pool: Any, arr: Optional[np.ndarray],
         shared: Optional[np.ndarray], n: int) -> Callable[[], None]:
    """One timed task: moves n float64 items in *direction* by *method*."""
    nbytes = n * 8
    expected = {"send": n, "args": n * ARG_FILL, "results": n * RESULT_FILL}[direction]

    def check(value: Any) -> None:
        if value != expected:
            raise RuntimeError(f"{method} {direction} {label(nbytes)}: got {value!r}, "
                               f"expected {expected!r}")

    if direction in ("send", "args"):
        if method == "stdlib-shm":
            read = direction == "args"

            def run() -> None:
                shm = shared_memory.SharedMemory(create=True, size=nbytes)
                try:
                    view = np.ndarray((n,), np.float64, buffer=shm.buf)
                    np.copyto(view, arr)
                    del view
                    value = call(pool, _stdlib_attach, shm.name, n, read)
                finally:
                    shm.close()
                    shm.unlink()
                check(value)

            return run
        fn = _length if direction == "send" else _sum
        sent = shared if method == "preshared" else arr
        return lambda: check(call(pool, fn, sent))

    if method == "stdlib-shm":

        def run() -> None:
            name = call(pool, _stdlib_give, n)
            shm = shared_memory.SharedMemory(name)
            try:
                view = np.ndarray((n,), np.float64, buffer=shm.buf)
                value = float(view.sum())
                del view
            finally:
                shm.close()
                shm.unlink()
            check(value)

        return run
    if method == "preshared":
        out = shared

        def run() -> None:
            call(pool, _fill, out)
            check(float(out.sum()))

        return run

    def run() -> None:
        result = call(pool, _give, n)
        check(float(result.sum()))

    return run


def measure_size(pools: dict[str, Any], nbytes: int, repeat: int) -> list[dict[str, Any]]:
    """Every direction and method at one size; frees its arrays before returning."""
    n = nbytes // 8
    rows = []
    empty: dict[str, float] = {}
    arr: Optional[np.ndarray] = np.full(n, ARG_FILL)
    shared: Optional[np.ndarray] = None
    try:
        for direction in DIRECTIONS:
            if direction == "results":
                arr = None  # the parent's array is not needed any more
            for method in METHODS:
                pool = pools[method]
                if method == "preshared":
                    shared = mpshm.numpy.empty(n, backend=PRESHARED_BACKEND)
                    if direction != "results":
                        np.copyto(shared, arr)
                if direction == "send":  # this pool's empty task, next to its figures
                    empty[method] = median_time(lambda p=pool: call(p, _noop), 20, 3 * repeat)
                if direction == "results":
                    on_each_worker(pool, "prepare", n)
                seconds, rounds, number = per_task(
                    task(direction, method, pool, arr, shared, n), nbytes, repeat)
                if direction == "results":
                    on_each_worker(pool, "clear")
                if shared is not None:
                    mpshm.numpy.release(shared)
                    shared = None
                rows.append({"direction": direction, "size": nbytes, "size_label": label(nbytes),
                             "method": method, "ms": seconds * 1e3,
                             "empty_task_ms": empty[method] * 1e3,
                             "overhead_ms": (seconds - empty[method]) * 1e3,
                             "rounds": rounds, "tasks_per_round": number})
                print(f"  {direction:<8} {method:<12} {seconds * 1e3:10.3f} ms/task", flush=True)
    finally:
        if shared is not None:
            mpshm.numpy.release(shared)
        del arr, shared
        gc.collect()
    return rows


def add_ratios(rows: list[dict[str, Any]], memcpy: float) -> None:
    pickle_ms = {(r["direction"], r["size"]): r["ms"] for r in rows if r["method"] == "pickle"}
    for r in rows:
        r["gbps"] = r["size"] / (r["ms"] / 1e3) / 1e9
        r["x_vs_pickle"] = pickle_ms[r["direction"], r["size"]] / r["ms"]
        r["pct_memcpy"] = 100 * r["gbps"] / memcpy


def check_targets(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The verdicts: pass is True, False, or None (not measured in this run)."""
    ms = {(r["direction"], r["size"], r["method"]): r["ms"] for r in rows}
    sizes = sorted({r["size"] for r in rows})
    mpshm_methods = [f"mpshm-{b}" for b in BACKENDS]
    targets: dict[str, dict[str, Any]] = {}

    small, large = sizes[0], sizes[-1]
    if small == large:
        targets["a_preshared_flat"] = {"pass": None, "detail": "needs two sizes"}
    else:
        t_small, t_large = ms["send", small, "preshared"], ms["send", large, "preshared"]
        targets["a_preshared_flat"] = {
            "pass": t_large <= 2 * t_small,
            "detail": f"preshared send {label(large)} {t_large:.3f} ms vs {label(small)} "
                      f"{t_small:.3f} ms: {t_large / t_small:.2f}x (limit 2x)",
        }
    overheads = {r["size"]: r["overhead_ms"] for r in rows
                 if r["direction"] == "send" and r["method"] == "preshared"}
    worst = max(overheads, key=lambda s: overheads[s])
    targets["a_preshared_overhead"] = {
        "pass": all(v < 1.0 for v in overheads.values()),
        "detail": "preshared send minus an empty task on its pool: " + ", ".join(
            f"{label(s)} {v:.3f} ms" for s, v in sorted(overheads.items()))
        + f" (worst {label(worst)}; limit 1 ms)",
    }

    if 256 * MIB in sizes:
        parts, ok = [], True
        for direction in ("args", "results"):
            best = min(mpshm_methods, key=lambda m: ms[direction, 256 * MIB, m])
            x = ms[direction, 256 * MIB, "pickle"] / ms[direction, 256 * MIB, best]
            ok = ok and x >= 10
            parts.append(f"{direction}: {best} {x:.1f}x")
        targets["b_mpshm_vs_pickle_256M"] = {
            "pass": ok, "detail": "best mpshm backend vs pickle at 256 MiB, " + ", ".join(parts)
            + " (limit 10x)"}
    else:
        targets["b_mpshm_vs_pickle_256M"] = {"pass": None, "detail": "256 MiB not measured"}

    worst_ratio, where, failed = 0.0, "", []
    for method in mpshm_methods:
        for size in sizes:
            ratio = ms["results", size, method] / ms["args", size, method]
            if ratio > worst_ratio:
                worst_ratio, where = ratio, f"{method} {label(size)}"
            if ratio > 1.5:
                failed.append(f"{method} {label(size)} {ratio:.2f}x")
    targets["c_results_vs_args"] = {
        "pass": not failed,
        "detail": (f"results/args time, worst {worst_ratio:.2f}x ({where}); limit 1.5x"
                   + (": over it: " + ", ".join(failed) if failed else "")),
    }
    return targets


def print_table(rows: list[dict[str, Any]]) -> None:
    order = {m: i for i, m in enumerate(METHODS)}
    ranked = sorted(rows, key=lambda r: (DIRECTIONS.index(r["direction"]), r["size"],
                                         order[r["method"]]))
    print(f"{'direction':<9} {'size':>8}  {'method':<12} {'ms/task':>10} {'GB/s':>8} "
          f"{'x vs pickle':>11} {'% memcpy':>9}")
    previous = None
    for r in ranked:
        if previous is not None and (r["direction"], r["size"]) != previous:
            print()
        previous = (r["direction"], r["size"])
        print(f"{r['direction']:<9} {r['size_label']:>8}  {r['method']:<12} {r['ms']:10.3f} "
              f"{r['gbps']:8.2f} {r['x_vs_pickle']:10.2f}x {r['pct_memcpy']:8.1f}%")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help=f"sizes {' '.join(QUICK_SIZES)} (unless --sizes is given)")
    parser.add_argument("--sizes", nargs="+", type=parse_size, metavar="SIZE",
                        help=f"array sizes, e.g. 1M 16M 256M 1G (default "
                             f"{' '.join(DEFAULT_SIZES)})")
    parser.add_argument("--repeat", type=int, default=3,
                        help="rounds per figure at the largest sizes; smaller sizes get "
                             "more (default 3)")
    parser.add_argument("--json", metavar="FILE", help="also write the figures as JSON")
    args = parser.parse_args()
    if args.repeat < 1:
        parser.error("--repeat must be at least 1")
    sizes = args.sizes or [parse_size(s) for s in (QUICK_SIZES if args.quick else DEFAULT_SIZES)]
    sizes = sorted(set(sizes))

    print(f"python {sys.version.split()[0]}, numpy {np.__version__}, {os.cpu_count()} cores; "
          f"{WORKERS} workers ({START_METHOD}); sizes {', '.join(label(s) for s in sizes)}")
    memcpy = memcpy_gbps(args.repeat)
    print(f"memcpy (np.copyto, {label(MEMCPY_BYTES)}, one thread): {memcpy:.2f} GB/s", flush=True)

    started = time.perf_counter()
    pools = make_pools()
    ok = False
    try:
        empty = {}
        for method, pool in pools.items():
            warm_up(pool)
            empty[method] = median_time(lambda p=pool: call(p, _noop), 20, 5 * args.repeat) * 1e3
        print("empty task (pool.apply(noop)): "
              + ", ".join(f"{m} {v:.3f} ms" for m, v in empty.items()), flush=True)
        rows = []
        for nbytes in sizes:
            print(f"{label(nbytes)}:", flush=True)
            rows += measure_size(pools, nbytes, args.repeat)
        ok = True
    finally:
        for pool in pools.values():
            if ok:
                pool.close()
            else:
                pool.terminate()
            pool.join()
    elapsed = time.perf_counter() - started

    add_ratios(rows, memcpy)
    targets = check_targets(rows)
    print()
    print_table(rows)
    print("(median time per task; GB/s = array bytes / time; x vs pickle = pickle time / time;")
    print(" % memcpy = GB/s / single-thread memcpy GB/s. send: the worker does not read the array;")
    print(" args: the worker sums it; results: the worker returns one, the parent sums it)")
    print()
    print(f"targets ({elapsed:.0f} s of measuring):")
    names = {
        "a_preshared_flat": "(a) preshared send, largest size within 2x of smallest",
        "a_preshared_overhead": "(a) preshared send over an empty task < 1 ms",
        "b_mpshm_vs_pickle_256M": "(b) best mpshm backend >= 10x pickle at 256 MiB",
        "c_results_vs_args": "(c) mpshm results <= 1.5x args, every backend and size",
    }
    for key, verdict in targets.items():
        word = {True: "PASS", False: "FAIL", None: "SKIP"}[verdict["pass"]]
        print(f"  {word}  {names[key]}\n        {verdict['detail']}")

    if args.json:
        with open(args.json, "w") as f:
            json.dump({
                "python": sys.version.split()[0], "numpy": np.__version__,
                "cores": os.cpu_count(), "workers": WORKERS, "start_method": START_METHOD,
                "memcpy_gbps": memcpy, "memcpy_bytes": MEMCPY_BYTES,
                "empty_task_ms_at_start": empty, "rows": rows, "targets": targets,
            }, f, indent=1)


if __name__ == "__main__":
    main()
