"""joblib's default backend (loky) against the ``"mpshm"`` backend, in one run.

    python benchmarks/joblib_backend.py [--sizes 1M 16M 256M 1G] [--repeat N]
                                        [--storages posix sysv mmap] [--quick]
                                        [--json FILE]

Every figure is a median of *N* timed calls (default 5) after three untimed
calls of the same kind, with ``Parallel(n_jobs=2)`` (workers kept between
calls by both backends, as they are by default), and is also given as a
ratio, because these machines are shared and noisy:

* **send**: one call whose one task sums a float64 array of the size and
  returns the sum (checked). Every timed call's array is a new object with
  content no earlier call had (one element changes, outside the timed
  region), so neither backend can reuse an earlier copy (loky would reuse
  its memory-mapped file of an array with the same content).
* **send-preshared** (mpshm only): the same with an array made by
  :func:`mpshm.numpy.empty`: only its handle travels.
* **return**: one call whose task returns an array of the size that the
  worker holds (made by the untimed call), and the parent sums it (the
  parent uses what it got).
* ``mpshm-<storage>-nocache`` (the first storage only): the same with
  ``cache_bytes=0``: no segment is kept warm between calls, so every copy
  goes to a fresh segment (the kernel's cost of new pages included).
* **small**: one call of 10,000 tasks of a trivial function (joblib batches
  them automatically): medians of 3 x *N* calls, alternating with loky's
  (calls take tens of milliseconds, in steps of joblib's 10 ms polling).

``x memcpy`` is memcpy's time for the size over the method's (1.0: as fast
as one copy); ``x loky`` is loky's time over the method's (above 1: faster
than joblib's default). The last lines check issue 19's targets at 256 MiB
(sending at least 2x faster than loky, returning at least 10x) and for the
small tasks (no more than 10% slower than loky), with PASS or FAIL.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from typing import Any, Callable

import joblib
import numpy as np

import mpshm.joblib
import mpshm.numpy
from mpshm.bench import MIB, label, parse_size

WORKERS = 2
SMALL_TASKS = 10_000
#: Untimed calls before the timed ones: each worker has run a task of the
#: kind (it holds its array to return; both backends' workers are started).
WARMUP = 3
_HELD: dict[int, np.ndarray] = {}


def _sum(arr: np.ndarray) -> float:
    return float(arr.sum())


def _give(nbytes: int) -> np.ndarray:
    arr = _HELD.get(nbytes)
    if arr is None:
        arr = _HELD[nbytes] = np.ones(nbytes // 8)
    return arr


def _noop(i: int) -> int:
    return i


def _median(fn: Callable[[int], Any], repeat: int) -> float:
    """Median seconds of fn(i) for i = WARMUP..WARMUP+repeat-1, after fn(i)
    for i < WARMUP untimed."""
    for i in range(WARMUP):
        fn(i)
    samples = []
    for i in range(WARMUP, WARMUP + repeat):
        start = time.perf_counter()
        fn(i)
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def _memcpy(nbytes: int, repeat: int) -> float:
    src = np.ones(nbytes // 8)
    dst = np.empty_like(src)
    return _median(lambda _i: np.copyto(dst, src), max(repeat, 5))


def _methods(storages: list[str]) -> dict[str, dict[str, Any]]:
    methods: dict[str, dict[str, Any]] = {"loky": {"backend": "loky"}}
    for storage in storages:
        methods[f"mpshm-{storage}"] = {"backend": "mpshm", "storage": storage}
    if storages:  # every copy in a fresh segment, destroyed when its tasks are done
        methods[f"mpshm-{storages[0]}-nocache"] = {
            "backend": "mpshm", "storage": storages[0], "cache_bytes": 0}
    return methods


def _send(config: dict[str, Any], nbytes: int, repeat: int, preshared: bool) -> float:
    n = nbytes // 8
    arrays: list[np.ndarray] = []
    for i in range(WARMUP + repeat):  # made (and made different) outside the timed region
        arr = mpshm.numpy.empty(n) if preshared else np.empty(n)
        arr.fill(1.0)
        arr[0] = i
        arrays.append(arr)
    with joblib.parallel_config(n_jobs=WORKERS, **config):
        def call(i: int) -> None:
            total = joblib.Parallel()([joblib.delayed(_sum)(arrays[i])])[0]
            assert total == n - 1 + i, (total, n, i)
        return _median(call, repeat)


def _return(config: dict[str, Any], nbytes: int, repeat: int) -> float:
    with joblib.parallel_config(n_jobs=WORKERS, **config):
        def call(_i: int) -> None:
            arr = joblib.Parallel()([joblib.delayed(_give)(nbytes)])[0]
            assert float(arr.sum()) == nbytes // 8
        return _median(call, repeat)


def _small(methods: dict[str, dict[str, Any]], repeat: int) -> dict[str, dict[str, float]]:
    """Per mpshm method: the median time of a call of SMALL_TASKS trivial
    tasks, and loky's, from alternating calls (3 x *repeat* each): a call
    takes tens of milliseconds, in steps of joblib's 10 ms polling, so
    only many samples taken side by side compare."""
    def call() -> float:
        start = time.perf_counter()
        out = joblib.Parallel()(joblib.delayed(_noop)(i) for i in range(SMALL_TASKS))
        took = time.perf_counter() - start
        assert out[-1] == SMALL_TASKS - 1
        return took

    figures = {}
    for name in methods:
        if name == "loky":
            continue
        samples: dict[str, list[float]] = {"loky": [], name: []}
        for round_ in range(WARMUP + 3 * repeat):
            for who in samples:
                with joblib.parallel_config(n_jobs=WORKERS, **methods[who]):
                    took = call()
                if round_ >= WARMUP:
                    samples[who].append(took)
        mine, loky = statistics.median(samples[name]), statistics.median(samples["loky"])
        figures[name] = {"ms": mine * 1e3, "loky_ms": loky * 1e3, "ratio": mine / loky}
    return figures


def run(sizes: list[int], repeat: int, storages: list[str]) -> dict[str, Any]:
    methods = _methods(storages)
    rows: list[dict[str, Any]] = []
    for nbytes in sizes:
        memcpy = _memcpy(nbytes, repeat)
        times: dict[tuple[str, str], float] = {}
        for name, config in methods.items():
            times[("send", name)] = _send(config, nbytes, repeat, preshared=False)
            times[("return", name)] = _return(config, nbytes, repeat)
            if name != "loky":
                times[("send-preshared", name)] = _send(config, nbytes, repeat, preshared=True)
        for (what, name), seconds in times.items():
            loky = times[("send" if what == "send-preshared" else what, "loky")]
            rows.append({"what": what, "size": nbytes, "method": name, "ms": seconds * 1e3,
                         "x_memcpy": memcpy / seconds, "x_loky": loky / seconds,
                         "memcpy_ms": memcpy * 1e3})
    small = _small(methods, repeat)
    mpshm.joblib.shutdown()
    return {"rows": rows, "small": small, "workers": WORKERS, "repeat": repeat}


def targets(figures: dict[str, Any]) -> list[tuple[str, float, float, bool]]:
    """(what, measured, goal, passed) for issue 19's targets."""
    out = []
    rows = [r for r in figures["rows"] if r["size"] == 256 * MIB and r["method"] != "loky"
            and not r["method"].endswith("-nocache")]  # (the default settings only)
    for what, goal in (("send", 2.0), ("return", 10.0)):
        for row in rows:
            if row["what"] == what:
                out.append((f"{what} 256 MiB {row['method']} x loky", row["x_loky"], goal,
                            row["x_loky"] >= goal))
    for name, small in figures["small"].items():
        if name.endswith("-nocache"):
            continue
        out.append((f"small {name} time / loky's", small["ratio"], 1.10,
                    small["ratio"] <= 1.10))
    return out


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", nargs="+", default=None)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--storages", nargs="+", default=["posix", "sysv", "mmap"])
    parser.add_argument("--quick", action="store_true",
                        help="sizes 1M 16M 256M, posix only")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    sizes = args.sizes or (["1M", "16M", "256M"] if args.quick else ["1M", "16M", "256M", "1G"])
    storages = ["posix"] if args.quick and args.storages == parser.get_default("storages") \
        else args.storages
    figures = run([parse_size(s) for s in sizes], args.repeat, storages)
    print(f"joblib {joblib.__version__}, Parallel(n_jobs={WORKERS}), medians of {args.repeat}")
    print(f"{'what':<15} {'size':>8}  {'method':<20} {'ms':>9} {'x memcpy':>9} {'x loky':>8}")
    for r in figures["rows"]:
        print(f"{r['what']:<15} {label(r['size']):>8}  {r['method']:<20} {r['ms']:9.2f} "
              f"{r['x_memcpy']:9.2f} {r['x_loky']:8.2f}")
    print(f"\nsmall: a call of {SMALL_TASKS:,} trivial tasks, medians of "
          f"{3 * args.repeat} calls alternating with loky's")
    for name, small in figures["small"].items():
        print(f"  {name:<20} {small['ms']:7.1f} ms   loky {small['loky_ms']:7.1f} ms   "
              f"{small['ratio']:.2f}x loky's time")
    checks = targets(figures)
    figures["targets"] = [list(check) for check in checks]
    if checks:
        print("\ntargets (issue 19)")
    for what, measured, goal, passed in checks:
        sign = "<=" if what.startswith("small") else ">="
        print(f"  {'PASS' if passed else 'FAIL'}  {what}: {measured:.2f} (goal {sign} {goal})")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(figures, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
