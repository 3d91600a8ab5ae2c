"""Pools and executors when processes die: nothing outlives them.

Each test measures how long cleanup took; with ``MPSHM_TIMINGS=<file>`` in
the environment it appends the figures there (one JSON line per test).
"""

from __future__ import annotations

import concurrent.futures
import json
import multiprocessing
import os
import signal
import time

import numpy as np
import pytest
from helpers import exists, park, popen_script, wait_until

import mpshm

pytestmark = pytest.mark.timeout(120)

MiB = 1 << 20
CLEANUP_LIMIT = 5.0


def _record(test: str, **figures: object) -> None:
    path = os.environ.get("MPSHM_TIMINGS")
    if path:
        with open(path, "a") as f:
            f.write(json.dumps({"test": test, **figures}) + "\n")


def _parked(path: str, timeout: float = 60) -> tuple[int, str]:
    """Wait for a parked worker's record: (pid, segment name)."""
    wait_until(lambda: os.path.exists(path), timeout)
    with open(path) as f:
        pid, name = f.read().split()
    return int(pid), name


def _gone(pid: int) -> bool:
    """Whether process *pid* has exited (a zombie waiting to be reaped has)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return True
    except OSError:  # no /proc: ask the kernel
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        return False
    return state in ("Z", "X")


@pytest.mark.parametrize("method", ["fork", "spawn", "forkserver"])
def test_worker_killed_mid_task_pool(backend, method, tmp_path):
    """The task's argument segment outlives the dead worker only until the
    pool ends."""
    ctx = multiprocessing.get_context(method)
    path = str(tmp_path / "parked")
    p = mpshm.Pool(1, context=ctx, backend=backend)
    try:
        p.apply_async(park, (np.ones(MiB // 8), path))
        pid, name = _parked(path)
        assert exists(name)
        os.kill(pid, signal.SIGKILL)
        wait_until(lambda: _gone(pid), 10)
        assert exists(name)  # the task never finished: its loan is still out
        start = time.monotonic()
        p.terminate()
        seconds = time.monotonic() - start
        assert not exists(name)  # destroyed before terminate() returned
        _record("worker-kill-pool", backend=backend, method=method, seconds=seconds)
    finally:
        p.terminate()


@pytest.mark.parametrize("method", ["fork", "spawn", "forkserver"])
def test_worker_killed_mid_task_executor(backend, method, tmp_path):
    ctx = multiprocessing.get_context(method)
    path = str(tmp_path / "parked")
    ex = mpshm.ProcessPoolExecutor(1, mp_context=ctx, backend=backend)
    try:
        future = ex.submit(park, np.ones(MiB // 8), path)
        pid, name = _parked(path)
        os.kill(pid, signal.SIGKILL)
        with pytest.raises(concurrent.futures.process.BrokenProcessPool):
            future.result(30)
        start = time.monotonic()
        ex.shutdown(wait=True)
        seconds = time.monotonic() - start
        assert not exists(name)  # destroyed before shutdown() returned
        _record("worker-kill-executor", backend=backend, method=method, seconds=seconds)
    finally:
        ex.shutdown(wait=True)


def test_executor_notices_the_death_of_a_worker_started_on_demand(tmp_path):
    """With spawn (and forkserver) the standard library starts a worker per
    submit while none is idle, after waking its manager thread: woken too
    early, that thread would wait without the new worker's sentinel, and a
    SIGKILL of that worker would hang the executor instead of breaking it
    (one round in about ten, here). mpshm's executor wakes it once more."""
    ctx = multiprocessing.get_context("spawn")
    for round_ in range(8):
        ex = mpshm.ProcessPoolExecutor(2, mp_context=ctx)
        try:
            paths = [str(tmp_path / f"parked{round_}-{i}") for i in range(2)]
            futures = [ex.submit(park, np.ones(MiB // 8), path) for path in paths]
            parked = {pid for pid, _ in (_parked(path) for path in paths)}
            later = list(ex._processes)[1]  # started by the second submit
            assert later in parked
            os.kill(later, signal.SIGKILL)
            for future in futures:
                with pytest.raises(concurrent.futures.process.BrokenProcessPool):
                    future.result(20)
        finally:
            ex.shutdown(wait=True)


PARENT = """
    import multiprocessing, sys, time
    import numpy as np
    import helpers, mpshm

    if __name__ == "__main__":
        ctx = multiprocessing.get_context({method!r})
        {make}
        arrays = [np.full(1 << 17, float(i)) for i in range(2)]
        paths = [{path!r} + str(i) for i in range(2)]
        {call}
        print("SUBMITTED", flush=True)
        {after}
"""


@pytest.mark.parametrize("kind", ["pool", "executor"])
@pytest.mark.parametrize("method", ["fork", "spawn", "forkserver"])
def test_parent_killed_mid_map(backend, method, kind, tmp_path):
    """SIGKILL of the parent: its segments are destroyed at once, and its
    workers exit instead of waiting for tasks forever."""
    path = str(tmp_path / "parked")
    if kind == "pool":
        make = f"p = mpshm.Pool(2, context=ctx, backend={backend!r})"
        call = "p.starmap_async(helpers.park, zip(arrays, paths))"
    else:
        make = f"p = mpshm.ProcessPoolExecutor(2, mp_context=ctx, backend={backend!r})"
        call = "list(map(p.submit, [helpers.park] * 2, arrays, paths))"
    proc = popen_script(PARENT.format(method=method, make=make, call=call, path=path,
                                      after="time.sleep(600)"))
    try:
        parked = [_parked(path + str(i)) for i in range(2)]
        assert all(exists(name) for _, name in parked)
        start = time.monotonic()
        proc.kill()
        proc.wait(10)
        segments = wait_until(lambda: not any(exists(n) for _, n in parked), CLEANUP_LIMIT)
        workers = wait_until(lambda: all(_gone(pid) for pid, _ in parked), CLEANUP_LIMIT)
        _record("parent-kill", kind=kind, backend=backend, method=method,
                segments=segments, workers=time.monotonic() - start)
        assert workers < CLEANUP_LIMIT
    finally:
        proc.kill()
        proc.wait(10)
        for pid, _ in (_parked(path + str(i), 0.1) for i in range(2)
                       if os.path.exists(path + str(i))):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


@pytest.mark.parametrize("kind", ["pool", "executor"])
def test_program_ends_without_closing(backend, kind, tmp_path):
    """A program that exits with tasks in flight and its pool never closed
    leaves nothing behind."""
    path = str(tmp_path / "parked")
    if kind == "pool":
        make = f"p = mpshm.Pool(2, context=ctx, backend={backend!r})"
        call = "p.starmap_async(helpers.park, zip(arrays, paths))"
        after = "import os; os.environ; sys.exit(0)"
    else:
        make = f"p = mpshm.ProcessPoolExecutor(2, mp_context=ctx, backend={backend!r})"
        call = "futures = list(map(p.submit, [helpers.park] * 2, arrays, paths))"
        # An executor waits for its tasks at exit: kill the workers to end them.
        after = ("import os, signal\n        for pid in list(p._processes):\n"
                 "            os.kill(pid, signal.SIGKILL)\n        sys.exit(0)")
    proc = popen_script(PARENT.format(method="spawn", make=make, call=call, path=path,
                                      after=f"helpers.wait_until(lambda: all("
                                      f"__import__('os').path.exists(q) for q in paths), 60)"
                                      f"\n        {after}"))
    try:
        _, err = proc.communicate(timeout=90)
        assert proc.returncode == 0, err
        names = [_parked(path + str(i))[1] for i in range(2)]
        took = wait_until(lambda: not any(exists(n) for n in names), CLEANUP_LIMIT)
        _record("exit-without-close", kind=kind, backend=backend, seconds_after_exit=took)
    finally:
        proc.kill()
        proc.wait(10)
