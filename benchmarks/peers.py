"""Moving arrays between processes: mpshm against every alternative, in one run.

    python benchmarks/peers.py [--sizes 1M 16M 64M 256M] [--repeat N] [--quick]
                               [--json FILE] [--plot FILE.svg]

One command, one process tree, five parts (each figure a median, after a
few untimed tasks of the same kind, and each also given as a ratio, because
these machines are shared and noisy):

1. **lifecycle**: create+destroy and attach+detach of a 4 KiB segment, and
   create + first fill of a 64 MiB one, mpshm against the raw posix_ipc /
   sysv_ipc / mmap calls (``benchmarks/lifecycle.py``).
2. **copy-in**: copying an array into a fresh segment and into a reused
   (warm) one, as ratios to memcpy of the same size.
3. **send**: the parent sends a float64 array to a 2-worker pool (spawn),
   which sums it and returns the sum (checked); every task's array has
   content no earlier task had (one element changes, outside the timed
   region: a new array object), so no method can reuse an earlier copy. **return**: the worker
   returns an array it holds (made once per worker, as the parent's array
   is made once for send), and the parent sums it. Methods:

   * ``pool-pickle`` / ``executor-pickle``: ``multiprocessing.Pool`` and
     ``concurrent.futures.ProcessPoolExecutor``, pickled through the pipe;
   * ``stdlib-shm``: the standard library's SharedMemory, created and copied
     into per task, passed by name, unlinked after the task;
   * ``joblib``: ``joblib.Parallel`` (loky, its automatic memmapping of large
     arrays), if installed (``pip install 'mpshm[bench]'``);
   * ``torch``: ``torch.multiprocessing`` with a tensor per task (torch moves
     its storage into shared memory when it is sent), if installed
     (``pip install torch==2.13.0``);
   * ``mpshm-<backend>``: :class:`mpshm.pool.Pool` given the plain array;
   * ``preshared`` (send only): an array made with :func:`mpshm.numpy.empty`:
     only its handle travels;
   * ``in-process``: the same sum in the parent, on its own memory, the floor;
   * ``in-process-shared`` (send only): the sum in the parent of the
     preshared array itself; ``preshared`` against it is what the handle and
     the mapping cost (the target), against ``in-process`` that plus the
     difference between shared and private memory (where the parent's own
     gets transparent huge pages and shared memory does not, shared memory
     is slower to read).

   ``x memcpy`` = memcpy time of that size / the method's time (1.0: as fast
   as one copy); ``x best peer`` = the best non-mpshm alternative's time /
   the method's time (above 1: faster than every alternative).
4. **small arrays**: 10,000 live 1 KiB arrays of :mod:`mpshm.numpy` passed
   through a pool, and the number of segments they took.
5. **targets**: the ratios issue 8 asks for, each with PASS or FAIL.

Peers that are not installed are skipped with a note on stderr.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import itertools
import json
import multiprocessing
import os
import statistics
import sys
import time
from multiprocessing import shared_memory
from typing import Any, Callable, Optional

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

import lifecycle  # noqa: E402

import mpshm.numpy as shared_numpy  # noqa: E402
from mpshm import _mappings, _sysinfo, reduction, tracking  # noqa: E402
from mpshm import pool as mpshm_pool  # noqa: E402
from mpshm.bench.pool import _give, _stdlib_attach, _stdlib_give, _sum  # noqa: E402
from mpshm.cli.bench import MIB, label, parse_size  # noqa: E402
from mpshm.pool import sharing as mpshm_pool_sharing  # noqa: E402

WORKERS = 2
FILL = 1.0  # what the parent's arrays hold
RESULT_FILL = 2.0  # what the workers' arrays hold (mpshm.bench.pool)
PEERS = ("pool-pickle", "executor-pickle", "stdlib-shm", "joblib", "torch")
SMALL_ARRAYS = 10_000
#: Warm-up tasks per method and size: a pool reaches its steady state (warm
#: segments reused, workers' mappings kept) after a few tasks, as any
#: long-running program would; capped by WARMUP_SECONDS for slow methods.
WARMUP = 6
WARMUP_SECONDS = 4.0


def _timed(setup: Callable[[], Any], run: Callable[[Any], Any], rounds: int,
           warmup: int = 1) -> float:
    """Median seconds of ``run(setup())`` over *rounds* rounds, after
    *warmup* untimed ones (fewer if they take over :data:`WARMUP_SECONDS`);
    only ``run`` is timed."""
    deadline = time.perf_counter() + WARMUP_SECONDS
    for i in range(warmup):
        run(setup())
        if i and time.perf_counter() > deadline:
            break
    samples = []
    for _ in range(rounds):
        arg = setup()
        start = time.perf_counter()
        run(arg)
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


# -- functions the workers run (module level: spawn finds them) --------------


def _torch_give(n: int) -> Any:
    import torch

    return torch.from_numpy(_give(n))


def _torch_sum(t: Any) -> float:
    return float(t.sum())


# -- the methods ---------------------------------------------------------------


class Method:
    """A way of moving arrays: ``send(arr) -> worker's sum``, ``give(n) -> array``."""

    def __init__(self, name: str, start: Callable[[], Any],
                 send: Callable[[Any, np.ndarray], float],
                 give: Optional[Callable[[Any, int], float]],
                 stop: Callable[[Any], None]) -> None:
        self.name = name
        self._start, self._send, self._give, self._stop = start, send, give, stop
        self.state: Any = None

    def start(self) -> None:
        self.state = self._start()
        self.send(np.full(MIB // 8, FILL))  # workers up, modules imported

    def send(self, arr: np.ndarray) -> float:
        return self._send(self.state, arr)

    def give(self, n: int) -> Optional[float]:
        """The parent's sum of an *n*-item array the worker returned."""
        return None if self._give is None else self._give(self.state, n)

    def stop(self) -> None:
        if self.state is not None:
            self._stop(self.state)
            self.state = None


def _end_pool(p: Any) -> None:
    p.close()
    p.join()


def _methods(backends: list[str]) -> list[Method]:
    ctx = multiprocessing.get_context("spawn")
    methods = [
        Method("pool-pickle", lambda: ctx.Pool(WORKERS),
               lambda p, a: p.apply(_sum, (a,)),
               lambda p, n: float(p.apply(_give, (n,)).sum()), _end_pool),
        Method("executor-pickle",
               lambda: concurrent.futures.ProcessPoolExecutor(WORKERS, mp_context=ctx),
               lambda e, a: e.submit(_sum, a).result(),
               lambda e, n: float(e.submit(_give, n).result().sum()),
               lambda e: e.shutdown()),
    ]

    def stdlib_send(p: Any, a: np.ndarray) -> float:
        shm = shared_memory.SharedMemory(create=True, size=a.nbytes)
        try:
            view = np.ndarray(a.shape, a.dtype, buffer=shm.buf)
            np.copyto(view, a)
            del view
            return float(p.apply(_stdlib_attach, (shm.name, len(a), True)))
        finally:
            shm.close()
            shm.unlink()

    def stdlib_give(p: Any, n: int) -> float:
        shm = shared_memory.SharedMemory(p.apply(_stdlib_give, (n,)))
        try:
            view = np.ndarray((n,), np.float64, buffer=shm.buf)
            total = float(view.sum())
            del view
            return total
        finally:
            shm.close()
            shm.unlink()

    methods.append(Method("stdlib-shm", lambda: ctx.Pool(WORKERS), stdlib_send, stdlib_give,
                          _end_pool))
    try:
        import joblib

        def joblib_start() -> Any:
            par = joblib.Parallel(n_jobs=WORKERS, backend="loky")
            par.__enter__()
            return par

        methods.append(Method(
            "joblib", joblib_start,
            lambda par, a: float(par([joblib.delayed(_sum)(a)])[0]),
            lambda par, n: float(par([joblib.delayed(_give)(n)])[0].sum()),
            lambda par: par.__exit__(None, None, None)))
    except ImportError:
        print("peers: joblib is not installed: skipped (pip install 'mpshm[bench]')",
              file=sys.stderr)
    try:
        import torch
        import torch.multiprocessing as tmp

        methods.append(Method(
            "torch", lambda: tmp.get_context("spawn").Pool(WORKERS),
            lambda p, a: float(p.apply(_torch_sum, (torch.from_numpy(a),))),
            lambda p, n: float(p.apply(_torch_give, (n,)).sum()), _end_pool))
    except ImportError:
        print("peers: torch is not installed: skipped (pip install torch==2.13.0)",
              file=sys.stderr)
    for backend in backends:
        methods.append(Method(
            f"mpshm-{backend}",
            lambda backend=backend: mpshm_pool.Pool(WORKERS, context=ctx, backend=backend),
            lambda p, a: p.apply(_sum, (a,)),
            lambda p, n: float(p.apply(_give, (n,)).sum()), _end_pool))
    return methods


# -- copy-in -------------------------------------------------------------------


def copy_in(nbytes: int, backend: str, rounds: int) -> dict[str, float]:
    """Seconds to copy *nbytes* with memcpy, into a fresh segment (what
    :class:`mpshm.reduction.Carrier` does), and into a reused one (what a
    pool does with its warm segments)."""
    src = np.full(nbytes // 8, FILL)
    raw = memoryview(src).cast("B")
    address = _sysinfo.buffer_address(src)
    dst = np.empty_like(src)
    memcpy = _timed(lambda: None, lambda _: np.copyto(dst, src), rounds)
    carrier = reduction.Carrier(backend)
    made: list[reduction.Segment] = []

    def fresh(_: Any) -> None:
        made.append(carrier.carry(raw, address)[0])

    def drop() -> None:
        reduction.discard(made, tracking)
        made.clear()

    fresh_s = _timed(drop, fresh, rounds)
    drop()
    sharing = mpshm_pool_sharing._Sharing(backend, reduction.DEFAULT_THRESHOLD, {})
    try:
        lender = mpshm_pool_sharing._LoanCarrier(sharing, None)  # what a pool copies tasks with

        def give_back() -> None:  # the task is over and its worker let go
            warm = sharing.warm
            assert warm is not None
            for loan in lender.used:
                warm.done(loan.warm)
                warm.released(loan.segment.backend.name, loan.segment.ident)
            lender.used.clear()

        lender.carry(raw, address)  # made fresh; the next one maps it in this process
        give_back()
        reused = _timed(give_back, lambda _: lender.carry(raw, address), rounds)
        give_back()
        assert sharing.warm is not None and len(sharing.warm) == 1, "the segment was not reused"
    finally:
        sharing.close()
    return {"memcpy": memcpy, "fresh": fresh_s, "reused": reused}


# -- small arrays ----------------------------------------------------------------


def _segments(backend: str) -> set[str]:
    from mpshm import backends

    return {info.name for info in backends.get(backend).list()}


def small_arrays(backend: str) -> dict[str, Any]:
    """10,000 live 1 KiB arrays through a pool: the segments they took."""
    before = _segments(backend)
    arrays = [shared_numpy.zeros(128, backend=backend) for _ in range(SMALL_ARRAYS)]
    for i, arr in enumerate(arrays):
        arr[:] = i
    ctx = multiprocessing.get_context("spawn")
    with mpshm_pool.Pool(WORKERS, context=ctx, backend=backend) as p:
        sums = p.map(_sum, arrays, chunksize=500)
        during = _segments(backend) - before
    assert sums == [128.0 * i for i in range(SMALL_ARRAYS)]
    del arrays
    return {"arrays": SMALL_ARRAYS, "segments": len(during)}


# -- the run -------------------------------------------------------------------


def measure_size(methods: list[Method], preshared: Any, backend: str, nbytes: int,
                 rounds: int) -> list[dict[str, Any]]:
    n = nbytes // 8
    arr = np.full(n, FILL)
    dst = np.zeros_like(arr)
    memcpy = _timed(lambda: None, lambda _: np.copyto(dst, arr), rounds + 2)
    counter = itertools.count(2)
    times: dict[tuple[str, str], float] = {}

    def fresh_content() -> tuple[np.ndarray, float]:
        # A new array with new content: no method can reuse an earlier copy
        # (joblib keeps the memmap of an array object it has seen).
        fresh = arr.copy()
        fresh[0] = next(counter)
        return fresh, float(fresh[0]) + (n - 1) * FILL

    times[("send", "in-process")] = _timed(lambda: None, lambda _: _sum(arr), rounds + 2)
    for m in methods:
        fresh, expected = fresh_content()
        assert m.send(fresh) == expected, m.name
        del fresh

        def send(task: tuple[np.ndarray, float], m: Method = m) -> None:
            assert m.send(task[0]) == task[1], m.name

        times[("send", m.name)] = _timed(fresh_content, send, rounds, WARMUP)
        if m.give(n) is not None:
            times[("return", m.name)] = _timed(
                lambda: None, lambda _, m=m: m.give(n) == n * RESULT_FILL or _fail(m), rounds,
                WARMUP)
    shared = shared_numpy.empty(n, backend=backend)
    shared[:] = FILL
    times[("send", "preshared")] = _timed(
        lambda: None, lambda _: preshared.apply(_sum, (shared,)) == n * FILL or _fail(None),
        rounds, WARMUP)
    # The same sum on that same shared array, in the parent: what preshared
    # costs beyond it is the handle and the mapping (shared memory may be
    # slower to read than the parent's own, which gets transparent huge pages).
    times[("send", "in-process-shared")] = _timed(lambda: None, lambda _: _sum(shared),
                                                  rounds + 2)
    times[("return", "in-process")] = _timed(lambda: None, lambda _: _sum(arr), rounds + 2)
    rows = []
    for direction in ("send", "return"):
        mine = {k[1]: t for k, t in times.items() if k[0] == direction}
        best = min((t for name, t in mine.items() if name in PEERS), default=None)
        for name, seconds in mine.items():
            rows.append({
                "direction": direction, "size": nbytes, "method": name, "ms": seconds * 1e3,
                "x_memcpy": memcpy / seconds,
                "x_best_peer": None if best is None else best / seconds,
                "memcpy_ms": memcpy * 1e3,
            })
    return rows


def _fail(m: Optional[Method]) -> None:
    raise AssertionError(f"{'preshared' if m is None else m.name}: wrong result")


def targets(lifecycle_rows: list[dict[str, Any]], copy: dict[str, float],
            rows: list[dict[str, Any]], small: dict[str, Any], size: int,
            backend: str) -> list[dict[str, Any]]:
    """Issue 8's targets, each with the measured ratio and whether it holds."""
    out: list[dict[str, Any]] = []

    def check(what: str, value: Optional[float], goal: str, ok: Optional[bool]) -> None:
        out.append({"target": what, "value": value, "goal": goal,
                    "verdict": "n/a" if ok is None else ("PASS" if ok else "FAIL")})

    for row in lifecycle_rows:
        limit = 1.3
        check(f"lifecycle {row['what']} (x raw)", row["mpshm_ratio"], f"<= {limit}",
              row["mpshm_ratio"] <= limit)
    check("copy-in, reused segment (x memcpy)", copy["memcpy"] / copy["reused"], ">= 0.85",
          copy["memcpy"] / copy["reused"] >= 0.85)
    check("copy-in, fresh segment (x memcpy)", copy["memcpy"] / copy["fresh"], ">= 0.28",
          copy["memcpy"] / copy["fresh"] >= 0.28)
    ms = {(r["direction"], r["method"]): r["ms"] for r in rows if r["size"] == size}
    ours = ms.get(("send", f"mpshm-{backend}"))
    for peer, goal in (("torch", 3.0), ("joblib", 3.0), ("pool-pickle", 20.0)):
        theirs = ms.get(("send", peer))
        value = None if theirs is None or ours is None else theirs / ours
        check(f"send {label(size)} not yet shared: {peer} time / mpshm-{backend} time", value,
              f">= {goal}", None if value is None else value >= goal)
    pre = ms.get(("send", "preshared"))
    for baseline in ("in-process-shared", "in-process"):
        inproc = ms.get(("send", baseline))
        value = None if pre is None or inproc is None else pre / inproc
        check(f"send {label(size)} preshared / {baseline}", value, "<= 1.3",
              None if value is None else value <= 1.3)
    back = ms.get(("return", f"mpshm-{backend}"))
    value = None if back is None or ours is None else back / ours
    check(f"return {label(size)} / send {label(size)} (mpshm-{backend})", value, "<= 1.5",
          None if value is None else value <= 1.5)
    check(f"{small['arrays']} live 1 KiB arrays through a pool: segments",
          small["segments"], "< 100", small["segments"] < 100)
    return out


def plot(rows: list[dict[str, Any]], path: str) -> None:
    """Throughput per method and size, one panel per direction."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    for ax, direction in zip(axes, ("send", "return")):
        mine = [r for r in rows if r["direction"] == direction]
        names = list(dict.fromkeys(r["method"] for r in mine))
        for name in names:
            points = [(r["size"], r["size"] / (r["ms"] / 1e3) / 1e9) for r in mine
                      if r["method"] == name]
            xs, ys = zip(*points)
            style = "-" if name.startswith("mpshm") or name == "preshared" else "--"
            ax.plot(xs, ys, style, marker="o", label=name)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xticks(sorted({r["size"] for r in mine}))
        ax.set_xticklabels([label(s) for s in sorted({r["size"] for r in mine})])
        ax.set_title(f"{direction}: parent {'to' if direction == 'send' else 'from'} worker")
        ax.set_xlabel("array size")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel("GB/s, end to end (higher is better)")
    axes[1].legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path)


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", type=parse_size,
                        help="array sizes (default 1M 16M 64M 256M; 1G needs ~6 GiB of RAM)")
    parser.add_argument("--backends", nargs="+", default=["posix", "sysv", "mmap"])
    parser.add_argument("--repeat", type=int, default=5, help="rounds per figure (median)")
    parser.add_argument("--quick", action="store_true",
                        help="a short run: sizes 1M 16M, fewer rounds, a brief lifecycle part")
    parser.add_argument("--json", metavar="FILE", help="also write every figure to FILE")
    parser.add_argument("--plot", metavar="FILE", help="draw the send/return figures (SVG, PNG)")
    args = parser.parse_args(argv)
    sizes: list[int] = args.sizes or ([MIB, 16 * MIB] if args.quick else
                                      [MIB, 16 * MIB, 64 * MIB, 256 * MIB])
    backend = args.backends[0]
    print(f"python {sys.version.split()[0]}, {os.cpu_count()} cores, "
          f"{_mappings.default_limit() >> 20} MiB warm-segment limit; medians of "
          f"{args.repeat} rounds\n")
    print("== lifecycle (mpshm against the raw library calls)")
    life = lifecycle.measure(args.repeat, calls=30 if args.quick else 300)
    copy_size = max(sizes)
    print(f"\n== copy-in of {label(copy_size)} (the targets: {backend})")
    copies = {}
    for each in args.backends:
        copies[each] = copy_in(copy_size, each, args.repeat)
        c = copies[each]
        print(f"{each + ':':<7} memcpy {c['memcpy'] * 1e3:.2f} ms; fresh segment "
              f"{c['fresh'] * 1e3:.2f} ms ({c['memcpy'] / c['fresh']:.2f}x memcpy); reused "
              f"segment {c['reused'] * 1e3:.2f} ms ({c['memcpy'] / c['reused']:.2f}x memcpy)")
    copy = copies[backend]
    methods = _methods(args.backends)
    ctx = multiprocessing.get_context("spawn")
    preshared = mpshm_pool.Pool(WORKERS, context=ctx, backend=backend)
    rows: list[dict[str, Any]] = []
    try:
        for m in methods:
            m.start()
        preshared.apply(_sum, (np.full(MIB // 8, FILL),))
        for nbytes in sizes:
            rows += measure_size(methods, preshared, backend, nbytes, args.repeat)
    finally:
        for m in methods:
            m.stop()
        preshared.close()
        preshared.join()
    print("\n== send and return (median ms per task; x memcpy = memcpy time / time; "
          "x best peer = best alternative's time / time)")
    print(f"{'dir':<7}{'size':>8}  {'method':<16}{'ms':>10}{'x memcpy':>10}{'x best peer':>13}")
    for row in rows:
        peer = "" if row["x_best_peer"] is None else f"{row['x_best_peer']:.2f}x"
        print(f"{row['direction']:<7}{label(row['size']):>8}  {row['method']:<16}"
              f"{row['ms']:>10.2f}{row['x_memcpy']:>10.2f}{peer:>13}")
    print(f"\n== small arrays ({backend})")
    small = small_arrays(backend)
    print(f"{small['arrays']} live 1 KiB arrays through a pool: {small['segments']} segments")
    goal_size = 256 * MIB if 256 * MIB in sizes else max(sizes)
    verdicts = targets(life, copy, rows, small, goal_size, backend)
    print("\n== targets (issue 8)")
    for v in verdicts:
        value = "-" if v["value"] is None else f"{v['value']:.2f}"
        print(f"{v['verdict']:<5} {v['target']:<62} {value:>8}  (goal {v['goal']})")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"lifecycle": life, "copy_in": copies, "rows": rows, "small": small,
                       "targets": verdicts}, f, indent=1)
    if args.plot:
        plot(rows, args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
