"""Received copies are writable, and the receiver's own (issue 16, case 4).

An array that travels as a copy (the pool, or :func:`mpshm.reduction.dumps`,
moved it into a segment) arrives as ``multiprocessing.Pool`` would deliver
it: writable, and private: a write changes neither the sender's array, nor
what another task that got the same copied buffer sees, nor anything a later
task (reusing a warm segment) gets; and nothing a later task does changes a
copy someone kept. Arrays the user put in shared memory (:mod:`mpshm.numpy`)
still arrive shared.
"""

from __future__ import annotations

import contextlib
import importlib.util
import multiprocessing
from typing import Any, Callable, Iterable, Iterator

import numpy as np
import pytest
from helpers import START_METHODS, make_array, segment_of, wait_until

import mpshm
import mpshm._mappings
import mpshm.numpy as mnp
from mpshm import reduction

pytestmark = pytest.mark.timeout(120)

N = (2 << 20) // 8  # 2 MiB of float64: above the default threshold, so shared
APIS = ["pool", "executor"]
# The DataFrame case runs where pandas is installed (no skipped test elsewhere).
RESULTS = ["array"] + (["dataframe"] if importlib.util.find_spec("pandas") else [])


@pytest.fixture(params=START_METHODS)
def method(request):
    return request.param


class Runner:
    """One interface to a Pool and a ProcessPoolExecutor."""

    def __init__(self, pool: Any) -> None:
        self.pool = pool

    def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        if isinstance(self.pool, mpshm.Pool):
            return self.pool.apply(fn, args)
        return self.pool.submit(fn, *args).result(60)

    def map(self, fn: Callable[..., Any], *items: Iterable[Any]) -> list[Any]:
        if isinstance(self.pool, mpshm.Pool):
            return self.pool.starmap(fn, zip(*items))
        return list(self.pool.map(fn, *items))


@contextlib.contextmanager
def running(api: str, backend: str, method: str = "spawn", workers: int = 2) -> Iterator[Runner]:
    ctx = multiprocessing.get_context(method)
    if api == "pool":
        with mpshm.Pool(workers, context=ctx, backend=backend) as pool:
            yield Runner(pool)
    else:
        with mpshm.ProcessPoolExecutor(workers, mp_context=ctx, backend=backend) as ex:
            yield Runner(ex)


# --------------------------------------------------------------------------
# What workers run


def bump(arr):
    """Change the argument in place; return its new sum."""
    arr += 1
    return float(arr.sum())


def assign(arr, i, value):
    """Assign into the argument; return what is there now, and its sum."""
    arr[i] = value
    return float(arr[i]), float(arr.sum())


def scribble(arr):
    """The sum the argument had, and its segment; then overwrite all of it."""
    seen = float(arr.sum())
    name = segment_of(arr)
    arr[:] = -1.0
    return seen, name


_kept: list = []


def keep_and_write(arr):
    """Write into the argument and keep it beyond the task."""
    arr[0] -= 1.0
    _kept.append(arr)
    return float(arr.sum())


def kept_sums():
    return [float(a.sum()) for a in _kept]


def fill_both(shared, plain, value):
    """Write into a shared array and a copied one; return the copy."""
    shared[:] = value
    plain[:] = value
    return plain


def make_frame(n, value):
    import pandas as pd

    return pd.DataFrame({"a": np.full(n, value), "b": np.arange(n, dtype="float64")})


# --------------------------------------------------------------------------
# The four cases of the issue, on both APIs and every backend


@pytest.mark.parametrize("api", APIS)
def test_a_result_can_be_changed_in_place(backend, api):
    with running(api, backend) as run:
        result = run.call(make_array, N, 1.0)
        result += 1  # ValueError: output array is read-only, before
        assert result.flags.writeable and (result == 2.0).all()
        again = run.call(make_array, N, 1.0)
        assert (again == 1.0).all()
        again *= 3
        assert (again == 3.0).all() and (result == 2.0).all()


@pytest.mark.parametrize("api", APIS)
def test_a_worker_changes_its_argument_in_place(backend, api):
    arr = np.ones(N)
    with running(api, backend) as run:
        assert [run.call(bump, arr) for _ in range(3)] == [2.0 * N] * 3
        # One copy for the whole map: no task sees what another one did to it.
        assert run.map(bump, [arr] * 6) == [2.0 * N] * 6
    assert (arr == 1.0).all()  # the sender's array is untouched


@pytest.mark.parametrize("kind", RESULTS)
@pytest.mark.parametrize("api", APIS)
def test_the_parent_assigns_into_a_result(backend, api, kind):
    with running(api, backend) as run:
        if kind == "dataframe":
            frame = run.call(make_frame, N, 1.0)
            frame.iloc[0, 0] = 5.0
            frame.loc[1, "b"] = -1.0
            assert frame.iloc[0, 0] == 5.0 and frame.loc[1, "b"] == -1.0
            assert frame["a"].sum() == N + 4.0
            return
        result = run.call(make_array, N, 1.0)
        result[0] = 5.0
        result[10:20] = -1.0
        assert result[0] == 5.0 and (result[10:20] == -1.0).all()
        assert result.sum() == N + 4.0 - 20.0


@pytest.mark.parametrize("api", APIS)
def test_a_worker_assigns_into_its_argument(backend, api):
    arr = np.zeros(N)
    with running(api, backend) as run:
        assert run.call(assign, arr, 3, 7.0) == (7.0, 7.0)
        assert run.call(assign, arr, 4, 1.0) == (1.0, 1.0)  # not 8: a fresh copy
        assert run.map(assign, [arr] * 4, [5] * 4, [2.0] * 4) == [(2.0, 2.0)] * 4
    assert not arr.any()


# --------------------------------------------------------------------------
# Nobody else sees a write; nothing changes a copy someone kept


@pytest.mark.parametrize("api", APIS)
def test_writes_are_not_seen_by_other_tasks(backend, method, api):
    """The same array in many tasks of one map is copied once; each task
    overwrites its argument: every task still sees the original. Then tasks
    whose arguments reuse one warm segment (one worker): each sees its own
    values, never what the task before wrote into its private pages."""
    arr = np.full(N, 1.0)
    with running(api, backend, method) as run:
        seen = run.map(scribble, [arr] * 8)
        assert [s for s, _ in seen] == [float(N)] * 8
        assert len({name for _, name in seen}) == 1 and seen[0][1] is not None
    assert (arr == 1.0).all()
    with running(api, backend, method, workers=1) as run:
        seen = [run.call(scribble, np.full(N, float(v))) for v in range(2, 10)]
        assert [s for s, _ in seen] == [v * float(N) for v in range(2, 10)]
        names = [name for _, name in seen]
        assert None not in names and len(set(names)) < len(names)  # warm reuse happened


def test_kept_copies_never_change(backend, method):
    """The parent keeps (and writes into) a result while later results
    reuse warm segments; a worker keeps (and wrote into) an argument while
    later tasks' arguments are copied into reused segments and written."""
    ctx = multiprocessing.get_context(method)
    with mpshm.Pool(1, context=ctx, backend=backend) as p:
        kept = p.apply(make_array, (N, 1.0))
        kept[0] = -5.0
        snapshot = kept.copy()
        names = []
        for value in range(2, 10):
            result = p.apply(make_array, (N, float(value)))
            assert (result == value).all()
            result += 1  # into a warm segment's lease, given back below
            names.append(segment_of(result))
            del result
        assert None not in names and len(set(names)) < len(names)  # reused meanwhile
        assert (kept == snapshot).all()

        assert p.apply(keep_and_write, (np.full(N, 1.0),)) == N - 1.0
        for value in range(2, 8):  # same size: candidates for reuse
            assert p.apply(scribble, (np.full(N, float(value)),))[0] == value * N
        assert p.apply(kept_sums) == [N - 1.0]
    assert (kept == snapshot).all()


# --------------------------------------------------------------------------
# Shared arrays stay shared


def test_shared_arrays_stay_shared_and_copies_private(backend, method):
    """An mpshm.numpy array is sent by reference: the worker's writes are
    the parent's. A plain array next to it is a private copy."""
    shared = mnp.zeros(N, backend=backend)
    plain = np.zeros(N)
    try:
        ctx = multiprocessing.get_context(method)
        with mpshm.Pool(2, context=ctx, backend=backend) as p:
            back = p.apply(fill_both, (shared, plain, 3.0))
            assert (shared == 3.0).all() and not plain.any()
            assert (back == 3.0).all() and back.flags.writeable
            back[:] = 4.0
            assert (shared == 3.0).all()
        with mpshm.ProcessPoolExecutor(1, mp_context=ctx, backend=backend) as ex:
            ex.submit(fill_both, shared, plain, 6.0).result(60)
            assert (shared == 6.0).all() and not plain.any()
    finally:
        mnp.release(shared)


# --------------------------------------------------------------------------
# A worker's kept private memory


def test_kept_private_mappings_drop_what_their_copy_wrote(backend):
    """A private mapping comes back to the cache once its copy is gone, and
    then shows the segment again where that copy wrote (System V cannot map
    privately: its receivers copy instead)."""
    shm = mpshm.SharedMemory(create=True, size=N * 8, backend=backend)
    try:
        arr = np.ndarray(N, buffer=shm.buf)
        arr[:] = 1.0
        chosen = mpshm.backends.get(shm.backend)
        if backend == "sysv":
            assert chosen.attach_private(shm._ident, {}) is None
            return
        private = mpshm.SharedMemory._from_handle(
            shm.backend, shm._ident, shm.name, shm.size, private=True)
        owner, identity = private._owner(), private._attachment.identity
        private._forget_attachment()
        copies = mpshm._mappings.PrivateCopies()
        owned = copies.lease(owner, 8, N * 8 - 8, shm.backend, shm._ident, shm.size, identity)
        view = np.frombuffer(mpshm._mappings.lease_view(owned, False))
        assert copies.take(shm.backend, shm._ident, shm.size) is None  # out while in use
        view[:1000] = -1.0
        view[-1] = -1.0
        assert (arr == 1.0).all()  # the segment never sees the copy's writes
        del view, owned, owner
        kept = copies.take(shm.backend, shm._ident, shm.size)
        assert kept is not None and kept[1] == identity
        arr[:] = 2.0  # a later message's data, written by the sender
        assert (np.frombuffer(memoryview(kept[0])) == 2.0).all()
    finally:
        shm.close()
        shm.unlink()


# --------------------------------------------------------------------------
# Outside a pool: reduction.dumps / loads


def test_loads_gives_writable_private_copies(backend):
    arr = np.arange(float(N))
    payload = {"a": arr, "view": memoryview(bytearray(2 << 20)),
               "strided": np.ones((512, 1024))[:, ::2]}
    out = reduction.loads(reduction.dumps(payload, backend=backend))
    out["a"] += 1
    out["view"][:4] = b"abcd"
    out["strided"][:] = 2.0
    assert out["a"][0] == 1.0 and out["view"][:4] == b"abcd"
    assert out["strided"].sum() == 2.0 * 512 * 512
    assert (arr == np.arange(float(N))).all() and payload["view"][:4] == bytes(4)
    # pickle protocol 5's rule: a read-only buffer arrives read-only
    frozen = np.ones(N)
    frozen.flags.writeable = False
    received = reduction.loads(reduction.dumps(frozen, backend=backend))
    assert not received.flags.writeable and received.sum() == N
    del out, received
    wait_until(lambda: not mpshm.tracking.tracked(), 5)
