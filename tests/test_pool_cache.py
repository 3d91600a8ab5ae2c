"""Warm memory in pools: reused argument and result segments, cached mappings.

What a user relies on: data is never wrong (a reused segment never changes
under a view someone still holds, a reused name is never mistaken for the
old segment), the reuse actually happens, and nothing outlives the pool,
its idle time, or a SIGKILL of the parent.
"""

from __future__ import annotations

import multiprocessing
import os
import signal

import numpy as np
import pytest
from helpers import (
    START_METHODS,
    describe,
    exists,
    make_array,
    popen_script,
    segment_of,
    unique,
    wait_until,
)

import mpshm
import mpshm._mappings
import mpshm.numpy as mnp

pytestmark = pytest.mark.timeout(120)

N = (1 << 20) // 8  # 1 MiB of float64: at the default threshold


@pytest.fixture(params=START_METHODS)
def method(request):
    return request.param


_kept: list = []


def keep(arr):
    """Keep the received argument beyond the task (a memo, say)."""
    _kept.append(arr)
    return float(arr.sum())


def kept_sums():
    return [float(a.sum()) for a in _kept]


def total(arr):
    return float(arr.sum())


def warm_names(pool):
    warm = pool._mpshm_context._sharing.warm
    return {entry.segment.name for entry in list(warm._entries.values())}


def test_argument_segments_are_reused_and_gone_with_the_pool(backend, method):
    ctx = multiprocessing.get_context(method)
    with mpshm.Pool(1, context=ctx, backend=backend) as p:
        names = []
        for value in range(1, 9):
            arr = np.full(N, float(value))
            got, writable, name, _ = p.apply(describe, (arr,))
            assert got == value * N and writable
            names.append(name)
        # The worker lets go of a task's arguments before it sends the result,
        # which says so: every later task reuses the first one's segment.
        assert len(set(names)) == 1 < len(names), names
        assert all(exists(name) for name in set(names))  # kept warm meanwhile
    wait_until(lambda: not any(exists(name) for name in set(names)), 5)


def test_a_worker_keeping_its_argument_never_sees_it_change(backend, method):
    ctx = multiprocessing.get_context(method)
    with mpshm.Pool(1, context=ctx, backend=backend) as p:
        assert p.apply(keep, (np.full(N, 1.0),)) == N
        for value in range(2, 8):  # same size: candidates for reuse
            assert p.apply(total, (np.full(N, float(value)),)) == value * N
        assert p.apply(kept_sums) == [float(N)]


def test_results_reuse_segments_and_results_kept_stay_intact(backend, method):
    ctx = multiprocessing.get_context(method)
    with mpshm.Pool(2, context=ctx, backend=backend) as p:
        kept = [p.apply(make_array, (N, float(v))) for v in range(1, 4)]
        names = []
        for value in range(10, 20):
            result = p.apply(make_array, (N, float(value)))
            assert result.sum() == value * N and result.flags.writeable
            names.append(segment_of(result))
            del result  # its segment goes back to the pool
        assert None not in names and len(set(names)) < len(names)
        assert [r.sum() for r in kept] == [v * N for v in (1.0, 2.0, 3.0)]
        everything = set(names) | {segment_of(r) for r in kept}
    wait_until(lambda: not any(exists(name) for name in everything), 5)
    assert [r.sum() for r in kept] == [v * N for v in (1.0, 2.0, 3.0)]  # still valid


def test_executor_reuses_segments_with_correct_values(backend, method):
    ctx = multiprocessing.get_context(method)
    with mpshm.ProcessPoolExecutor(2, mp_context=ctx, backend=backend) as ex:
        for value in range(1, 8):
            assert ex.submit(total, np.full(N, float(value))).result() == value * N
            back = ex.submit(make_array, N, float(value)).result()
            assert back.sum() == value * N
            del back
        names = warm_names(ex)
        assert names
    wait_until(lambda: not any(exists(name) for name in names), 5)


def test_a_reused_name_is_not_mistaken_for_the_old_segment(backend, method):
    """The worker keeps its mapping of a segment it was sent; the user then
    destroys it and makes a new one of the same name and size."""
    name = unique("reuse")
    if backend == "sysv":
        name = f"sysv:{name}"
    elif backend == "mmap":
        name = f"mmap:{name}"
    ctx = multiprocessing.get_context(method)
    with mpshm.Pool(1, context=ctx, backend=backend) as p:
        for value in (1.0, 2.0, 3.0):
            shm = mpshm.SharedMemory(name, create=True, size=N * 8)
            try:
                arr = mnp.ndarray_from(shm, "float64", (N,))
                arr[:] = value
                assert p.apply(total, (arr,)) == value * N
                del arr
            finally:
                shm.close()
                shm.unlink()


def test_idle_warm_segments_are_given_back(backend, monkeypatch):
    monkeypatch.setattr(mpshm._mappings, "IDLE_SECONDS", 0.3)
    with mpshm.Pool(1, backend=backend) as p:
        for value in range(1, 6):
            assert p.apply(total, (np.full(N, float(value)),)) == value * N
            result = p.apply(make_array, (N, float(value)))
            del result
        names = warm_names(p)
        assert names
        wait_until(lambda: not any(exists(name) for name in names), 10)  # pool still running
        assert not warm_names(p)


def test_cache_bytes_bounds_the_warm_segments(backend):
    with mpshm.Pool(1, backend=backend, cache_bytes=3 * N * 8 // 2) as p:
        warm = p._mpshm_context._sharing.warm
        seen = 0
        for value in range(1, 8):
            assert p.apply(total, (np.full(N, float(value)),)) == value * N
            assert warm.cached_bytes <= 3 * N * 8 // 2
            seen = max(seen, warm.cached_bytes)
        assert seen == N * 8  # one segment kept (two would not fit), not none


def test_cache_bytes_bad_input():
    for bad in (-1, "1G", 1.5, True):
        with pytest.raises(ValueError, match="cache_bytes"):
            mpshm.get_context(cache_bytes=bad)
    ctx = mpshm.get_context(cache_bytes=0)
    try:
        assert ctx.cache_bytes == 0
        with pytest.raises(ValueError, match="cache_bytes"):
            mpshm.Pool(1, context=ctx, cache_bytes=1 << 20)
    finally:
        ctx.close()


PARENT = """
    import multiprocessing, os, sys, time
    import numpy as np
    import mpshm

    if __name__ == "__main__":
        p = mpshm.Pool(1, context=multiprocessing.get_context({method!r}), backend={backend!r})
        kept = []
        for value in range(1, 6):
            p.apply(sum, (np.full(1 << 17, float(value)),))
            kept.append(p.apply(np.ones, (1 << 17,)))
        warm = p._mpshm_context._sharing.warm
        for entry in list(warm._entries.values()):
            print(entry.segment.name, flush=True)
        print("READY", flush=True)
        time.sleep(600)
"""


@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_parent_killed_with_warm_segments_leaves_nothing(backend, method):
    proc = popen_script(PARENT.format(method=method, backend=backend))
    try:
        names = []
        for line in proc.stdout:
            line = line.strip()
            if line == "READY":
                break
            names.append(line)
        assert names and all(exists(name) for name in names)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
        wait_until(lambda: not any(exists(name) for name in names), 20)
    finally:
        proc.kill()
        proc.wait(10)


def test_a_slab_freed_while_the_pickler_searches_does_not_deadlock(backend):
    """A weakref callback can free a small array's slab (destroying it) in the
    middle of the pickler's search of this process's mappings, in the same
    thread: that once deadlocked a pool's task thread."""
    import threading

    from mpshm import _mappings

    arr = mnp.zeros(16, backend=backend)  # the only chunk of its slab
    name = mnp.segment_name(arr)
    done = threading.Event()

    def free_while_searching():
        with _mappings._lock:  # as find() holds it while weakrefs are committed
            nonlocal arr
            del arr  # frees the chunk, destroys the slab: takes the lock again
        done.set()

    thread = threading.Thread(target=free_while_searching, daemon=True)
    thread.start()
    assert done.wait(10), "freeing a slab under the mapping lock deadlocked"
    wait_until(lambda: not exists(name), 5)


def test_executor_tasks_reuse_the_first_argument_segment(backend, method):
    """As in a Pool: the worker lets go of the arguments before it answers,
    so each later task's argument goes into the first task's segment."""
    ctx = multiprocessing.get_context(method)
    with mpshm.ProcessPoolExecutor(1, mp_context=ctx, backend=backend) as ex:
        names = set()
        for value in range(1, 7):
            got, writable, name, _ = ex.submit(describe, np.full(N, float(value))).result()
            assert got == value * N and writable
            names.add(name)
        assert len(names) == 1, names
    wait_until(lambda: not any(exists(name) for name in names), 5)
