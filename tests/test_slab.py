"""Small arrays of mpshm.numpy share slabs (sub-allocation, issue 8).

Many small arrays, few segments; chunks reused, never overlapping; slabs
destroyed with their last array, after a SIGKILL too; fork and pool workers
never spoil the allocator of the process that made a slab.
"""

from __future__ import annotations

import gc
import multiprocessing
import os
import pickle
import signal
from typing import Any, Optional

import numpy as np
import pytest
from helpers import exists, popen_script, segment_of, wait_until
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from leakcheck import snapshot

import mpshm
import mpshm.numpy as mnp
from mpshm import _mappings, reduction
from mpshm.numpy import _slab

CLEANUP_LIMIT = 5.0
KiB = 1 << 10


def address(arr: Any) -> int:
    return int(arr.__array_interface__["data"][0])


def new_segments(before: set[str], backend: str) -> set[str]:
    """Segments of *backend* that appeared since *before* (any process's)."""
    prefix = {"posix": "posix:", "sysv": "sysv:", "mmap": "mmap:"}[backend]
    return {name for name in snapshot() - before if name.startswith(prefix)}


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


# --------------------------------------------------------------------------
# Pool tasks (module level: spawned workers import this module)


def bump_and_sum(arr: Any) -> float:
    """Add 1 to every item in place (the parent sees it); the new sum."""
    arr += 1
    return float(arr.sum())


_KEPT: list[Any] = []


def make_small_and_keep(n: int, value: float, backend: str) -> tuple[Any, Optional[str], str]:
    """Return a new small array; keep another one from the same slab."""
    kept = mnp.zeros(n, backend=backend)
    _KEPT.append(kept)
    arr = mnp.empty(n, backend=backend)
    arr[:] = value
    assert mnp.segment_name(arr) == mnp.segment_name(kept)  # the same slab
    return arr, mnp.segment_name(kept), type(arr).__name__


def kept_is_intact() -> tuple[bool, float]:
    """Whether the worker's kept arrays are still in a named segment, and their sum."""
    return (all(exists(mnp.segment_name(a) or "") for a in _KEPT),
            float(sum(a.sum() for a in _KEPT)))


def drop_kept() -> None:
    _KEPT.clear()
    gc.collect()


# --------------------------------------------------------------------------
# Many arrays, few segments


@pytest.mark.timeout(300)
@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_ten_thousand_small_arrays_through_a_pool_use_few_segments(backend, method):
    before = snapshot()
    fds = open_fds()
    arrays = [mnp.zeros(128, backend=backend) for _ in range(10_000)]  # 1 KiB each
    for i, arr in enumerate(arrays):
        arr[:] = i
    names = {mnp.segment_name(a) for a in arrays}
    assert None not in names and len(names) < 100
    assert len(new_segments(before, backend)) < 100
    assert open_fds() - fds < 10  # no descriptor per array (nor per slab)
    ctx = multiprocessing.get_context(method)
    with mpshm.Pool(2, context=ctx, backend=backend) as pool:
        sums = pool.map(bump_and_sum, arrays, chunksize=250)
        during = new_segments(before, backend)
    assert sums == [128.0 * (i + 1) for i in range(10_000)]
    assert all(arr[0] == i + 1 and arr[-1] == i + 1 for i, arr in enumerate(arrays))
    assert len(during) < 100, sorted(during)[:10]
    print(f"{backend}/{method}: {len(names)} slabs for 10000 arrays, "
          f"{len(during)} new segments while the pool ran")
    del arrays, arr
    gc.collect()
    assert not any(exists(name) for name in names)


def test_arrays_pickle_as_handles_into_their_slab(backend):
    arrays = [mnp.zeros(100, dtype="int32", backend=backend) for _ in range(8)]
    try:
        name = mnp.segment_name(arrays[0])
        assert all(mnp.segment_name(a) == name for a in arrays)
        shm = mpshm.SharedMemory(name)
        assert shm.size >= 8 * 400
        shm.close()
        arrays[3][:] = np.arange(100)
        data = pickle.dumps(arrays[3][10:20])
        assert len(data) < 1024
        copy = pickle.loads(data)
        assert isinstance(copy, mnp.SharedArray) and list(copy) == list(range(10, 20))
        copy[:] = -1
        assert (arrays[3][10:20] == -1).all() and arrays[2].sum() == 0
        assert np.shares_memory(copy, arrays[3])
    finally:
        for arr in arrays:
            mnp.release(arr)


def test_chunks_are_aligned_and_classes_bounded():
    assert all(size % _slab.ALIGNMENT == 0 for size in _slab._CLASSES)
    for nbytes in [1, 63, 64, 65, 1000, 1024, 1025, 4097, 50_000, _slab.SLAB_LIMIT]:
        chunk = _slab.chunk_size(nbytes)
        assert nbytes <= chunk <= max(-(-nbytes // 64) * 64, nbytes * 5 // 4 + 1)
    keep = [mnp.empty(n, dtype="u1") for n in (1, 100, 1000, 10_000)]
    assert all(address(a) % 64 == 0 for a in keep)


def test_dedicated_and_large_arrays_get_a_segment_each(backend, monkeypatch):
    a = mnp.zeros(10, backend=backend, dedicated=True)
    b = mnp.asshared(np.arange(10.0), backend=backend, dedicated=True)
    big = mnp.empty(_slab.SLAB_LIMIT // 8 + 1, backend=backend)
    monkeypatch.setattr(mnp, "slab_limit", 0)
    c = mnp.zeros(10, backend=backend)
    names = [mnp.segment_name(x) for x in (a, b, big, c)]
    try:
        assert len(set(names)) == 4
        assert mpshm.SharedMemory(names[0]).size == 80 and b.sum() == 45.0
        assert mpshm.SharedMemory(names[3]).size == 80
    finally:
        for x in (a, b, big, c):
            mnp.release(x)
    assert not any(exists(n) for n in names)


# --------------------------------------------------------------------------
# Reuse, zeroing, destruction


def test_a_freed_chunk_is_reused_and_zeros_are_zeros(backend):
    keeper = mnp.zeros(128, backend=backend)  # keeps the slab alive
    a = mnp.empty(128, backend=backend)
    where = address(a)
    a[:] = 5.0
    del a
    b = mnp.empty(128, backend=backend)
    assert address(b) == where  # the same chunk, dirty: empty() may show old data
    b[:] = 7.0
    del b
    z = mnp.zeros(128, backend=backend)
    assert address(z) == where and not z.any()
    z2 = mnp.zeros((4, 4), dtype="int8", order="F", backend=backend)
    assert not z2.any() and keeper.sum() == 0


def test_an_array_unpickled_in_its_own_process_keeps_its_chunk(backend):
    """The same process's copy from a handle is a view of the whole slab: while
    it lives, freed chunks of that slab are not reused."""
    keeper = mnp.zeros(128, backend=backend)
    a = mnp.zeros(128, backend=backend)
    a[:] = 3.0
    copy = pickle.loads(pickle.dumps(a))
    del a
    b = mnp.zeros(128, backend=backend)
    b[:] = 9.0
    assert (copy == 3.0).all() and not np.shares_memory(b, copy)
    where = address(copy)
    del copy, b
    gc.collect()
    later = [mnp.empty(128, backend=backend) for _ in range(3)]  # quarantine is over
    assert where in {address(x) for x in later}
    assert keeper.sum() == 0


def test_a_slab_is_destroyed_with_its_last_array(backend):
    arrays = [mnp.empty(n, backend=backend) for n in (8, 100, 1000, 4000) for _ in range(3)]
    names = {mnp.segment_name(a) for a in arrays}
    assert len(names) <= 4 and all(exists(n) for n in names)
    view = arrays[0][1:3]
    del arrays
    gc.collect()
    survivor = mnp.segment_name(view)
    assert exists(survivor)
    assert not any(exists(n) for n in names - {survivor})
    del view
    gc.collect()
    assert not exists(survivor)


def test_release_destroys_the_slab_once_all_are_released(backend):
    a = mnp.zeros(100, backend=backend)
    b = mnp.zeros(100, backend=backend)
    name = mnp.segment_name(a)
    assert mnp.segment_name(b) == name
    mnp.release(a[10:])
    assert exists(name)  # b still uses it
    mnp.release(b)
    assert not exists(name)
    a[:] = 1.0  # the memory stays valid, and is not reused
    c = mnp.zeros(100, backend=backend)
    assert mnp.segment_name(c) != name and not np.shares_memory(c, a)
    assert a.sum() == 100.0 and b.sum() == 0.0
    with pytest.raises(ValueError, match="not in a shared memory segment"):
        mnp.release(a)  # already destroyed


def test_a_slab_whose_name_someone_unlinked_is_retired(backend, monkeypatch):
    monkeypatch.setattr(_slab, "CHECK_EVERY", 0.0)
    a = mnp.zeros(100, backend=backend)
    name = mnp.segment_name(a)
    mpshm.SharedMemory(name).unlink()
    b = mnp.zeros(100, backend=backend)
    assert mnp.segment_name(b) not in (name, None)
    assert (backend, mpshm.SharedMemory(mnp.segment_name(b))._ident) in reduction.tracking.tracked()


@settings(max_examples=40, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=st.lists(st.tuples(st.booleans(), st.integers(1, 20_000), st.integers(0, 10**6)),
                    max_size=120))
def test_random_allocations_never_overlap(ops):
    live: list[tuple[Any, int]] = []
    stamp = 0
    for allocate, nbytes, pick in ops:
        if allocate or not live:
            stamp += 1
            arr = (mnp.zeros if stamp % 2 else mnp.empty)(nbytes, dtype="u1")
            if stamp % 2:
                assert not arr.any()
            arr[:] = stamp % 251
            live.append((arr, stamp % 251))
        else:
            live.pop(pick % len(live))
        spans = sorted((address(a), address(a) + a.nbytes) for a, _ in live)
        assert all(end <= start for (_, end), (start, _) in zip(spans, spans[1:]))
        assert all(start % 64 == 0 for start, _ in spans)
    assert all((a == value).all() for a, value in live)


@pytest.mark.timeout(60)
def test_threads_allocate_and_free_at_once():
    import threading

    kept: list[list[Any]] = [[] for _ in range(4)]

    def work(index: int) -> None:
        for i in range(2000):
            arr = mnp.zeros(16 + (i * 7 + index) % 300, dtype="u1")
            assert not arr.any()
            arr[:] = index + 1
            if i % 3 == 0:
                kept[index].append(arr)
            if i % 50 == 0:
                gc.collect()  # frees from inside other threads' allocations

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(50)
    live = [(arr, i + 1) for i, arrays in enumerate(kept) for arr in arrays]
    spans = sorted((address(a), address(a) + a.nbytes) for a, _ in live)
    assert all(end <= start for (_, end), (start, _) in zip(spans, spans[1:]))
    assert all((a == value).all() for a, value in live)
    names = {mnp.segment_name(a) for a, _ in live}
    del live
    kept.clear()
    gc.collect()
    assert not any(exists(n) for n in names)


# --------------------------------------------------------------------------
# Other processes


def _child_allocates(queue: Any, inherited: Any) -> None:
    arrays = [mnp.zeros(128) for _ in range(50)]
    for arr in arrays:
        arr[:] = 9.0
    inherited_name = mnp.segment_name(inherited)
    try:
        mnp.release(inherited)
        released = "released"
    except ValueError as exc:
        released = str(exc)
    del inherited
    gc.collect()
    queue.put(([address(a) for a in arrays], sorted({mnp.segment_name(a) for a in arrays}),
               inherited_name, released))
    del arrays
    gc.collect()


@pytest.mark.timeout(60)
def test_a_forked_child_allocates_from_slabs_of_its_own():
    keeper = mnp.zeros(128)
    keeper[:] = 1.0
    other = mnp.zeros(128)
    name = mnp.segment_name(keeper)
    slab = _slab.heap().slabs[id(_mappings.find(address(keeper), 8)[0])]  # type: ignore[index]
    state = (slab.bump, list(slab.free), len(slab.live))
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    proc = ctx.Process(target=_child_allocates, args=(queue, other))
    proc.start()
    addresses, names, inherited_name, released = queue.get(timeout=30)
    proc.join(30)
    assert proc.exitcode == 0
    assert name not in names and inherited_name == name
    assert not any(slab.address <= a < slab.address + slab.size for a in addresses)
    assert "parent" in released  # the child cannot release the parent's array
    assert (slab.bump, list(slab.free), len(slab.live)) == state
    assert exists(name) and (keeper == 1.0).all() and not other.any()
    fresh = mnp.zeros(128)
    assert mnp.segment_name(fresh) == name and not fresh.any()
    wait_until(lambda: not any(exists(n) for n in names), CLEANUP_LIMIT)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_a_worker_returns_a_slab_array_by_value(backend, method):
    """A small array a worker made comes back by value (its slab is the
    worker's, shared with other arrays): inline below the threshold, in a
    dedicated segment handed over above it. The worker's slab is untouched."""
    ctx = multiprocessing.get_context(method)
    with mpshm.Pool(1, context=ctx, backend=backend, share_threshold=4 * KiB) as pool:
        small, slab_name, _ = pool.apply(make_small_and_keep, (100, 2.0, backend))
        big, slab_name2, _ = pool.apply(make_small_and_keep, (1000, 3.0, backend))
        assert type(small) is np.ndarray and (small == 2.0).all() and small.flags.writeable
        assert isinstance(big, mnp.SharedArray) and (big == 3.0).all() and big.flags.writeable
        given = segment_of(big)  # (handed over: not re-sent by name)
        assert given not in (None, slab_name, slab_name2)
        shm = mpshm.SharedMemory(given)
        assert shm.size == 8000  # its own segment
        shm.close()
        big[:] = 4.0  # ours now
        gc.collect()
        assert pool.apply(kept_is_intact) == (True, 0.0)
        assert exists(slab_name) and exists(slab_name2)
        pool.apply(drop_kept)
        wait_until(lambda: not exists(slab_name) and not exists(slab_name2), CLEANUP_LIMIT)
    assert big.sum() == 4000.0


def test_sigkill_of_the_creator_leaves_no_slab(backend):
    proc = popen_script(
        f"""
        import time
        import mpshm.numpy as mnp
        arrays = [mnp.zeros(n, backend={backend!r}) for n in (16, 128, 1000) for _ in range(300)]
        print(" ".join(sorted({{mnp.segment_name(a) for a in arrays}})), flush=True)
        time.sleep(120)
        """
    )
    try:
        line = proc.stdout.readline().strip()
        assert line, proc.stderr.read()
        names = line.split()
        assert 3 <= len(names) < 40 and all(exists(n) for n in names)
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        wait_until(lambda: not any(exists(n) for n in names), CLEANUP_LIMIT)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)
        proc.stdout.close()
        proc.stderr.close()
