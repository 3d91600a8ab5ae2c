"""Pool, ProcessPoolExecutor and get_context: handles, not bytes, and lifetimes."""

from __future__ import annotations

import concurrent.futures
import gc
import multiprocessing
import multiprocessing.pool
import os
import pickle

import numpy as np
import pytest
from helpers import (
    START_METHODS,
    describe,
    exists,
    fill,
    make_array,
    make_shared,
    nap,
    vanishing,
    wait_until,
)

import mpshm
import mpshm.numpy as mnp

pytestmark = pytest.mark.timeout(120)

MiB = 1 << 20


@pytest.fixture(params=START_METHODS)
def method(request):
    return request.param


def test_pool_sends_arguments_by_handle_and_ends_their_segments(backend, method):
    arr = np.arange(MiB // 8, dtype="float64")  # 1 MiB: at the threshold
    # Without the warm-segment cache (see test_pool_cache.py for it).
    with mpshm.Pool(2, context=multiprocessing.get_context(method), backend=backend,
                    cache_bytes=0) as p:
        total, writable, name, pid = p.apply(describe, (arr,))
        assert pid != os.getpid()
        assert total == arr.sum()
        assert writable  # auto-shared: a private copy, as pickling gives
        assert name is not None  # it came through a segment...
        wait_until(lambda: not exists(name), 5)  # ...destroyed once the task was done
        small = np.arange(10.0)
        assert p.apply(describe, (small,))[2] is None  # inline


def test_results_come_back_by_handle_and_belong_to_the_receiver(backend, method):
    from helpers import segment_of

    with mpshm.Pool(2, context=multiprocessing.get_context(method), backend=backend,
                    cache_bytes=0) as p:
        results = p.starmap(make_array, [(MiB // 8, 1.0), (3 * MiB // 8, 2.0)])
        names = [segment_of(r) for r in results]
        assert None not in names
        dropped = p.apply(make_array, (MiB // 8, 3.0))
        name = segment_of(dropped)
        del dropped  # the last view: its name goes now, the pool still running
        wait_until(lambda: not exists(name), 5)
    # The pool is gone, and with it the names; the results are still valid views.
    wait_until(lambda: not any(exists(n) for n in names), 5)
    assert [r.sum() for r in results] == [MiB // 8, 3 * MiB // 4]
    assert results[0].flags.writeable


def test_preshared_arrays_are_writable_in_workers(backend, method):
    arr = mnp.zeros((256, 256), backend=backend)
    try:
        ctx = multiprocessing.get_context(method)
        with mpshm.Pool(2, context=ctx, backend=backend) as p:
            names = p.starmap(fill, [(arr[:128], 1.0), (arr[128:], 2.0)])
        assert arr[:128].sum() == 128 * 256 and arr[128:].sum() == 2 * 128 * 256
        assert len(set(names)) == 1  # both workers wrote into the parent's segment
    finally:
        mnp.release(arr)


def test_same_buffer_in_one_map_is_copied_once(backend):
    arr = np.ones(MiB // 8)
    with mpshm.Pool(2, backend=backend, cache_bytes=0) as p:
        (name,) = {r[2] for r in p.map(describe, [arr] * 8)}  # one segment for all
        # Gone once the map is over (the pool learns it just after map returns).
        wait_until(lambda: not exists(name), 5)


def test_executor_map_copies_a_buffer_once_and_submit_sees_new_values(backend, method):
    arr = np.ones(MiB // 8)
    ctx = multiprocessing.get_context(method)
    with mpshm.ProcessPoolExecutor(2, mp_context=ctx, backend=backend, cache_bytes=0) as ex:
        results = list(ex.map(describe, [arr] * 6))
        assert {r[2] for r in results} == {results[0][2]}
        assert all(r[0] == arr.sum() for r in results)
        assert ex.submit(describe, arr).result()[0] == arr.size
        arr[:] = 2.0  # a later task sees the new values, not a stale copy
        assert ex.submit(describe, arr).result()[0] == 2 * arr.size
        back = ex.submit(make_array, MiB // 8, 3.0).result()
        assert back.sum() == 3.0 * (MiB // 8)
        wait_until(lambda: not exists(results[0][2]), 5)


def test_stdlib_classes_with_a_sharing_context(backend, method):
    ctx = mpshm.get_context(method, backend=backend, share_threshold=4096)
    try:
        arr = np.arange(1024.0)  # 8 KiB: above this context's threshold
        with concurrent.futures.ProcessPoolExecutor(2, mp_context=ctx) as ex:
            total, writable, name, _ = ex.submit(describe, arr).result()
            assert total == arr.sum() and name is not None and writable
        with multiprocessing.pool.Pool(2, context=ctx) as p:
            assert p.apply(describe, (arr,))[2] is not None
        with ctx.Pool(2) as p:
            assert p.apply(describe, (arr,))[0] == arr.sum()
    finally:
        ctx.close()


def test_context_settings_and_bad_input():
    ctx = mpshm.get_context("spawn", backend="sysv", share_threshold=123)
    try:
        assert ctx.get_start_method() == "spawn"
        assert (ctx.backend, ctx.share_threshold) == ("sysv", 123)
        with pytest.raises(ValueError, match="unknown start method 'nope'"):
            mpshm.get_context("nope")
        with pytest.raises(ValueError, match="unknown mpshm backend"):
            mpshm.get_context(backend="nope")
        with pytest.raises(ValueError, match="positive"):
            mpshm.get_context(share_threshold=-1)
        with pytest.raises(TypeError):
            mpshm.get_context(share_threshold="big")
        with pytest.raises(TypeError, match="dir"):
            mpshm.get_context(backend="posix", dir="/tmp")
        with pytest.raises(ValueError, match="not both"):
            mpshm.Pool(1, context=ctx, backend="posix")
        with pytest.raises(ValueError, match="cannot change"):
            ctx.set_start_method("fork")
    finally:
        ctx.close()


def test_unpicklable_task_leaves_nothing(backend):
    arr = np.ones(MiB // 8)
    with mpshm.Pool(1, backend=backend) as p:
        with pytest.raises((pickle.PicklingError, AttributeError, TypeError)):
            p.apply(describe, (arr, lambda: None))
        assert p.apply(describe, (arr,))[0] == arr.sum()  # still works


def test_pool_left_without_close_ends_its_segments(backend):
    """A pool that is simply dropped destroys what is in flight."""
    arr = np.ones(MiB // 8)
    p = mpshm.Pool(1, backend=backend)
    result = p.apply_async(describe, (arr,))
    name = result.get(30)[2]
    pending = p.apply_async(describe, (arr,))  # maybe in flight when dropped
    del p, pending
    gc.collect()
    wait_until(lambda: not exists(name), 5)


def test_worker_exception_releases_arguments(backend):
    arr = np.ones(MiB // 8)
    with mpshm.Pool(1, backend=backend) as p:
        with pytest.raises(ValueError, match="could not convert"):
            p.apply(fill, (arr, "x"))
        ctx = p._mpshm_context
        assert not ctx._sharing.inflight and not ctx._sharing.memo


def test_temporary_shared_arrays_live_until_their_task_is_done(backend, method):
    """An mpshm.numpy array made for one call (and dropped by the caller at
    once) is kept alive by the pool until the task has run."""
    ctx = multiprocessing.get_context(method)
    with mpshm.Pool(2, context=ctx, backend=backend) as p:
        results = [p.apply_async(describe, (mnp.zeros(1000, backend=backend) + 0 + i,))
                   for i in range(3)]  # + 0: a private array, auto-shared
        shared = [p.apply_async(describe, (mnp.asshared(np.full(1000, float(i)),
                                                        backend=backend),))
                  for i in range(3)]
        gc.collect()
        assert [r.get(30)[0] for r in results] == [0.0, 1000.0, 2000.0]
        got = [r.get(30) for r in shared]
        assert [g[0] for g in got] == [0.0, 1000.0, 2000.0]
        assert all(g[1] for g in got)  # by reference: writable
        wait_until(lambda: not any(exists(g[2]) for g in got), 5)  # then destroyed


def test_arrays_made_by_workers_are_handed_over(backend, method):
    """A worker returns an mpshm.numpy array it made: the parent takes the
    segment over (no copy, and the worker dropping it destroys nothing)."""
    ctx = multiprocessing.get_context(method)
    with mpshm.Pool(1, context=ctx, backend=backend) as p:
        arr = p.apply(make_shared, (1 << 16, 5.0, backend))
        assert isinstance(arr, mnp.SharedArray) and arr.flags.writeable
        assert arr.sum() == 5.0 * (1 << 16)
        p.apply(gc.collect)
    from helpers import segment_of

    name = segment_of(arr)
    assert name is not None
    wait_until(lambda: not exists(name), 5)  # the pool ended: so did the name
    arr[:] = 1.0  # the memory is ours for as long as we hold it
    assert arr.sum() == 1 << 16


@pytest.mark.parametrize("kind", ["pool", "executor"])
def test_a_handle_whose_segment_is_gone_fails_the_task_not_the_pool(backend, method, kind):
    """Arguments or a result that cannot be attached any more raise in the
    caller (naming the segment); the pool keeps working."""
    ctx = multiprocessing.get_context(method)
    if kind == "pool":
        p = mpshm.Pool(1, context=ctx, backend=backend)
        submit = p.apply_async
        get = lambda r: r.get(30)  # noqa: E731
    else:
        p = mpshm.ProcessPoolExecutor(1, mp_context=ctx, backend=backend)
        submit = lambda f, args: p.submit(f, *args)  # noqa: E731
        get = lambda r: r.result(30)  # noqa: E731
    get(submit(nap, (0,)))  # the worker exists before the array (no fork-inherited mapping)
    arr = mnp.zeros(1000, backend=backend)
    name = mnp.segment_name(arr)
    try:
        busy = submit(nap, (0.5,))  # the worker attaches only after this
        doomed = submit(describe, (arr,))
        mpshm.SharedMemory(name).unlink()
        get(busy)
        with pytest.raises(FileNotFoundError, match="no longer exists"):
            get(doomed)
        with pytest.raises(FileNotFoundError, match="no longer exists"):
            get(submit(vanishing, (backend,)))
        assert get(submit(describe, (np.ones(MiB // 8),)))[0] == MiB // 8  # still working
    finally:
        p.terminate() if kind == "pool" else p.shutdown()
        mnp.release(arr) if exists(name) else None


def test_get_context_leaves_the_start_method_unset():
    from helpers import run_script

    result = run_script("""
        import multiprocessing, mpshm
        ctx = mpshm.get_context()
        assert ctx.get_start_method() == multiprocessing.get_all_start_methods()[0]
        assert multiprocessing.get_start_method(allow_none=True) is None
        multiprocessing.set_start_method("spawn")  # still the program's to choose
        assert mpshm.get_context().get_start_method() == "spawn"
        ctx.close()
        print("ok")
    """)
    assert result.stdout.strip() == "ok", result.stderr


def _pid() -> int:
    return os.getpid()


def test_worker_handler_wakes_only_for_changes(method, monkeypatch):
    """The standard library's worker handler thread also waits on the result
    queue, which it never reads, so every result woke it four to five times
    (until the result handler had taken it): about half the parent's CPU
    time on a small task. mpshm.Pool's wakes for what it acts on: a drained job
    table (once per ``apply`` here), close, terminate, a worker's exit. Workers
    that exit (``maxtasksperchild=1``: after every task) are still replaced."""
    wakes = [0]
    original = multiprocessing.pool.Pool._wait_for_updates

    def counted(sentinels, change_notifier, timeout=None):
        wakes[0] += 1
        return original(sentinels, change_notifier, timeout)

    # (The handler thread runs multiprocessing.pool.Pool._handle_workers.)
    monkeypatch.setattr(multiprocessing.pool.Pool, "_wait_for_updates", staticmethod(counted))
    with mpshm.Pool(2, context=multiprocessing.get_context(method)) as pool:
        for _ in range(20):
            pool.apply(nap, (0,))
        before = wakes[0]
        for _ in range(200):
            pool.apply(nap, (0,))
        assert wakes[0] - before <= 200 + 10, wakes[0] - before
    with mpshm.Pool(2, context=multiprocessing.get_context(method),
                    maxtasksperchild=1) as pool:
        pids = {pool.apply(_pid) for _ in range(12)}
        assert len(pids) == 12  # each task in a new worker: the exits were seen
