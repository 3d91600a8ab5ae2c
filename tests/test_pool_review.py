"""Issue 16, defects an adversarial review found in the pools' copy budget,
batches and initargs (each failed before its fix)."""

from __future__ import annotations

import multiprocessing
import time
from typing import Any, Iterator

import pytest
from helpers import START_METHODS, exists, wait_until
from test_pool_errors import initargs_seen, keep_initargs

import mpshm

np = pytest.importorskip("numpy")

MiB = 1 << 20


def first(arr: Any) -> float:
    """The first element of *arr* (after a short nap, so tasks overlap)."""
    time.sleep(0.005)
    return float(arr[0])


def first_of_two(a: Any, b: Any) -> float:
    """Sum of the first elements of *a* and *b*."""
    return float(a[0] + b[0])


def refilled(n: int) -> Iterator[Any]:
    """One buffer, refilled with the item's number before each item (a
    frame reader's pattern)."""
    buf = np.empty(MiB // 8)
    for i in range(n):
        buf[:] = i
        yield buf


@pytest.mark.timeout(90)
@pytest.mark.parametrize("kind", ["mpshm", "standard"])
@pytest.mark.parametrize("method", START_METHODS)
def test_imap_over_a_refilled_buffer_sends_each_value(kind, method):
    """imap pickles each item when it is pulled, as the standard library
    does: a buffer refilled between items carries each item's value (it was
    copied once per batch and every task got the first value)."""
    ctx = mpshm.get_context(method, share_threshold=64 << 10)
    try:
        pool = (mpshm.Pool(2, context=ctx) if kind == "mpshm"
                else multiprocessing.pool.Pool(2, context=ctx))
        with pool:
            assert list(pool.imap(first, refilled(12))) == [float(i) for i in range(12)]
            got = sorted(pool.imap_unordered(first, refilled(12)))
            assert got == [float(i) for i in range(12)]
    finally:
        ctx.close()


@pytest.mark.timeout(90)
@pytest.mark.parametrize("budget", [0, 1 * MiB, 4 * MiB])
def test_a_buffer_repeated_in_a_map_fits_any_budget(budget):
    """One array in every task of a map (copied once, held for the map) plus
    one of each task's own, over a budget smaller than both: each message
    goes once nothing else is in flight (it waited for itself forever)."""
    ctx = mpshm.get_context("fork", copy_budget=budget, share_threshold=64 << 10)
    shared = np.ones(3 * MiB // 8)
    own = [np.full(MiB // 4, i) for i in range(8)]
    try:
        with mpshm.Pool(2, context=ctx) as pool:
            result = pool.starmap_async(first_of_two, [(shared, own[i]) for i in range(8)],
                                        chunksize=1)
            assert result.get(60) == [1.0 + i for i in range(8)]
    finally:
        ctx.close()


@pytest.mark.timeout(90)
def test_a_terminated_pool_gives_back_a_shared_contexts_budget():
    """A pool terminated with copies in flight lets go of them: the next
    pool on the same context is not left waiting for room that never comes."""
    ctx = mpshm.get_context("fork", copy_budget=1 * MiB, share_threshold=64 << 10)
    arrays = [np.full(3 * MiB // 8, i, dtype=np.float64) for i in range(12)]
    try:
        with mpshm.Pool(2, context=ctx) as pool:
            pool.map_async(first, arrays * 3)
            time.sleep(0.05)
            pool.terminate()
        budget = ctx._sharing.budget
        assert budget is not None
        wait_until(lambda: budget.used == 0, 10)
        assert budget.used == 0
        with mpshm.Pool(2, context=ctx) as pool:
            assert pool.map_async(first, arrays).get(30) == [float(i) for i in range(12)]
    finally:
        ctx.close()


@pytest.mark.timeout(120)
@pytest.mark.parametrize("kind", ["pool", "executor"])
@pytest.mark.parametrize("method", [m for m in START_METHODS if m != "fork"])
def test_initargs_copy_ends_with_its_pool_on_a_shared_context(kind, method):
    """With a context shared by several pools, a pool's initargs copy goes
    when that pool ends (it stayed until the pool object was collected)."""
    ctx = mpshm.get_context(method)
    arr = np.ones(2 * MiB // 8)
    queue = multiprocessing.get_context(method).Queue()
    try:
        if kind == "pool":
            with mpshm.Pool(1, keep_initargs, (arr, "tag", queue), context=ctx) as pool:
                name = pool.apply(initargs_seen)[2]
                pool.close()
                pool.join()
            kept: Any = pool
        else:
            with mpshm.ProcessPoolExecutor(1, ctx, keep_initargs, (arr, "tag", queue)) as ex:
                name = ex.submit(initargs_seen).result(60)[2]
            kept = ex
        assert name is not None
        wait_until(lambda: not exists(name), 10)
        assert not exists(name), "the initargs copy outlived its pool"
        del kept
    finally:
        ctx.close()
        queue.close()
        queue.join_thread()
