"""Handles with any pickler, the sharing pickler, and mpshm.numpy."""

from __future__ import annotations

import gc
import pickle
import sys

import numpy as np
import pytest
from helpers import exists, run_script, segment_of, wait_until

import mpshm
import mpshm.numpy as mnp
from mpshm import _sysinfo, reduction

VIEWS = {
    "whole": lambda a: a,
    "slice": lambda a: a[3:17],
    "strided": lambda a: a[::3, 1::2],
    "reversed": lambda a: a[::-1, ::-2],
    "transposed": lambda a: a.T,
    "column": lambda a: a[:, 5],
    "empty": lambda a: a[:0],
}
DTYPES = ["float64", "int16", "complex64", "uint8", [("x", "i4"), ("y", "f8")]]


@pytest.mark.parametrize("view", sorted(VIEWS))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("order", ["C", "F"])
def test_array_views_pickle_as_small_zero_copy_handles(backend, view, dtype, order):
    arr = mnp.zeros((40, 30), dtype=dtype, order=order, backend=backend)
    try:
        original = VIEWS[view](arr)
        data = pickle.dumps(original)
        assert len(data) < 1024
        copy = pickle.loads(data)
        # An empty view has no memory to share: it is pickled by value.
        assert isinstance(copy, mnp.SharedArray) == (original.size > 0)
        assert copy.shape == original.shape and copy.dtype == original.dtype
        if copy.size:
            assert copy.strides == original.strides
            flat = copy.reshape(-1) if copy.flags.c_contiguous else copy
            flat.flat[-1] = np.ones(1, dtype=copy.dtype)[0]
            assert original.flat[-1] == copy.flat[-1]  # same memory
            assert np.array_equal(np.asarray(copy), np.asarray(original))
    finally:
        mnp.release(arr)


def test_handles_work_with_every_protocol(backend):
    arr = mnp.empty(1000, dtype="int64", backend=backend)
    arr[:] = np.arange(1000)
    try:
        for protocol in range(2, pickle.HIGHEST_PROTOCOL + 1):
            copy = pickle.loads(pickle.dumps(arr[10:20], protocol=protocol))
            assert list(copy) == list(range(10, 20))
    finally:
        mnp.release(arr)


def test_arithmetic_results_are_private_arrays(backend):
    arr = mnp.zeros(4096, backend=backend)
    try:
        result = arr + 1
        assert type(result) is np.ndarray
        assert len(pickle.dumps(result)) > 4096 * 8  # pickled by value
    finally:
        mnp.release(arr)


def test_view_outlives_the_shared_memory_object(backend, make_shm):
    """numpy#18294/#23305: the view keeps its mapping; no BufferError, no
    segfault when the SharedMemory that made it is closed and collected."""
    shm = make_shm(size=8 * 100)
    arr = mnp.ndarray_from(shm, "float64", (100,))
    arr[:] = 7.0
    shm.close()
    del shm
    gc.collect()
    assert arr.sum() == 700.0
    copy = pickle.loads(pickle.dumps(arr[50:]))
    copy[:] = 1.0
    assert arr[:50].sum() == 350 and arr[50:].sum() == 50


def test_ndarray_from_checks_its_arguments(make_shm):
    shm = make_shm(size=64)
    with pytest.raises(ValueError, match=r"needs 72 bytes.*has 64"):
        mnp.ndarray_from(shm, "float64", 9)
    with pytest.raises(ValueError, match="offset must be >= 0"):
        mnp.ndarray_from(shm, "uint8", 1, offset=-1)
    view = mnp.ndarray_from(shm, "uint8", 16, offset=48)
    view[:] = 5
    assert bytes(shm.buf[48:64]) == b"\x05" * 16


def test_owned_array_dies_with_its_last_view(backend):
    arr = mnp.empty((64, 64), backend=backend)
    name = segment_of(arr)
    assert name is not None and exists(name)
    view = arr[1:3]
    del arr
    gc.collect()
    assert exists(name)  # a view is alive
    del view
    gc.collect()
    assert not exists(name)


def test_release_destroys_now_and_keeps_views_valid(backend):
    arr = mnp.zeros(1000, dtype="int32", backend=backend)
    name = segment_of(arr)
    view = arr[10:]
    mnp.release(view)
    assert not exists(name)
    view[:] = 3
    assert arr.sum() == 3 * 990
    with pytest.raises(ValueError, match="not in a shared memory segment"):
        mnp.release(np.zeros(3))


def test_asshared_copies_once_and_keeps_order(backend):
    source = np.asfortranarray(np.arange(600.0).reshape(20, 30))
    arr = mnp.asshared(source, backend=backend)
    try:
        assert arr.flags.f_contiguous and np.array_equal(arr, source)
        assert not np.shares_memory(arr, source)
        again = mnp.asshared(arr[2:])
        assert np.shares_memory(again, arr)  # already shared: no copy
    finally:
        mnp.release(arr)


def test_object_arrays_are_refused():
    with pytest.raises(TypeError, match="Python objects"):
        mnp.empty(3, dtype=object)


def test_handle_from_another_machine_names_both(backend, make_shm, monkeypatch):
    arr = mnp.zeros(10, backend=backend)
    shm = make_shm(size=10)
    try:
        data = pickle.dumps(arr)
        shm_data = pickle.dumps(shm)
        monkeypatch.setattr(_sysinfo, "_MACHINE", ("elsewhere", "boot-2"))
        for payload in (data, shm_data):
            with pytest.raises(reduction.HandleError) as info:
                pickle.loads(payload)
            message = str(info.value)
            assert "elsewhere" in message
            assert reduction.machine()[0] in message or "boot" in message
    finally:
        monkeypatch.undo()
        mnp.release(arr)


# --------------------------------------------------------------------------
# The sharing pickler


def test_dumps_moves_large_buffers_and_loads_takes_them(backend):
    big = np.arange(1 << 18, dtype="float64")  # 2 MiB
    payload = {"big": big, "small": np.arange(10), "view": memoryview(bytes(3 << 20)),
               "strided": np.ones((512, 1024))[:, ::2], "text": "x"}
    data = reduction.dumps(payload, backend=backend)
    assert len(data) < 4096  # the big buffers are not in the bytes
    out = reduction.loads(data)
    assert np.array_equal(out["big"], big) and out["big"].flags.writeable  # a copy: its own
    assert out["small"].flags.writeable  # inline: an ordinary array
    assert isinstance(out["view"], memoryview) and out["view"].readonly
    assert len(out["view"]) == 3 << 20
    assert out["strided"].shape == (512, 512) and out["strided"].sum() == 512 * 512
    # The receiver took the segments over: their names go with its last view
    # (in a thread of their own, so that freeing the pages costs the caller nothing).
    names = {segment_of(out["big"]), segment_of(out["strided"])}
    assert None not in names
    if backend != "sysv":  # (System V: copied out of the segment, gone at once)
        assert all(exists(name) for name in names)
    del out
    wait_until(lambda: not any(exists(name) for name in names), 5)
    wait_until(lambda: not mpshm.tracking.tracked(), 5)  # unregistered after the unlink


def test_threshold_decides_inline_or_shared(backend):
    arr = np.zeros(1000)
    shared = reduction.dumps(arr, threshold=8000, backend=backend)
    inline = reduction.dumps(arr, threshold=8001, backend=backend)
    assert len(shared) < 1000 and len(inline) > 8000
    assert reduction.loads(inline).flags.writeable
    received = reduction.loads(shared)
    assert received.flags.writeable
    del received  # the name goes in the reaper's thread
    wait_until(lambda: not mpshm.tracking.tracked(), 5)
    with pytest.raises(ValueError):
        reduction.dumps(arr, threshold=-1)
    with pytest.raises(ValueError, match="unknown mpshm backend 'nope'"):
        reduction.dumps(arr, backend="nope")


def test_buffers_already_shared_go_by_reference(backend):
    arr = mnp.zeros(1 << 18, backend=backend)
    try:
        out = reduction.loads(reduction.dumps({"a": np.asarray(arr).view(np.ndarray)}))
        out["a"][0] = 5.0  # same memory, still writable
        assert arr[0] == 5.0
    finally:
        mnp.release(arr)


def test_failed_dumps_leaves_nothing(backend, monkeypatch):
    class Bad:
        def __reduce__(self):
            raise RuntimeError("no")

    made = []
    original = reduction.Carrier.carry

    def recording(self, raw, address):
        segment, offset = original(self, raw, address)
        made.append(segment.name)
        return segment, offset

    monkeypatch.setattr(reduction.Carrier, "carry", recording)
    with pytest.raises(RuntimeError):
        reduction.dumps([np.zeros(1 << 18), Bad()], backend=backend)
    assert len(made) == 1 and not exists(made[0])


def test_unloaded_dumps_are_destroyed_with_the_program(backend):
    result = run_script(f"""
        import numpy as np
        from mpshm import reduction
        data = reduction.dumps(np.zeros(1 << 18), backend={backend!r})
        print(reduction.split_message(data)[1][0].name)
    """)
    assert result.returncode == 0, result.stderr
    wait_until(lambda: not exists(result.stdout.strip()), 5)


def test_importing_mpshm_changes_nothing_global():
    result = run_script("""
        import copyreg, multiprocessing.reduction as r, sys
        # The standard library and NumPy register their reducers on import.
        import concurrent.futures.process, multiprocessing.connection, numpy
        import multiprocessing.managers, multiprocessing.pool, multiprocessing.queues
        import multiprocessing.context as context
        before = (dict(r.ForkingPickler._extra_reducers), dict(copyreg.dispatch_table))
        import mpshm, mpshm.numpy, mpshm.pool, mpshm.reduction
        after = (dict(r.ForkingPickler._extra_reducers), dict(copyreg.dispatch_table))
        assert before == after, "reducers changed"
        assert context.reduction is r and r.ForkingPickler is r.AbstractReducer.ForkingPickler
        assert "multiprocessing.resource_tracker" not in sys.modules or \\
            sys.modules["multiprocessing.resource_tracker"]._resource_tracker._pid is None
        print("ok")
    """)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


def test_numpy_is_optional():
    result = run_script("""
        import sys
        sys.modules["numpy"] = None  # import numpy fails
        import mpshm, mpshm.pool, pickle
        from mpshm import reduction
        data = reduction.dumps(memoryview(bytearray(2 << 20)))
        assert len(reduction.loads(data)) == 2 << 20
        shm = mpshm.SharedMemory(create=True, size=10)
        shm.close(); shm.unlink()
        try:
            import mpshm.numpy
        except ImportError:
            print("ok")
    """)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


@pytest.mark.skipif(sys.platform != "linux", reason="boot id")
def test_machine_identity_is_host_and_boot():
    host, boot = reduction.machine()
    assert host and len(boot) >= 32


def test_reductions_give_scalars_and_segment_name_is_public(backend):
    arr = mnp.asshared(np.arange(10.0), backend=backend)
    try:
        assert type(arr.sum()) is np.float64 and arr.sum() == 45.0
        assert type(np.mean(arr)) is np.float64
        name = mnp.segment_name(arr[2:])
        # A small array lives in a slab shared with others (see test_slab.py).
        assert name is not None and mpshm.SharedMemory(name).size >= 80
        alone = mnp.asshared(np.arange(10.0), backend=backend, dedicated=True)
        try:
            assert mpshm.SharedMemory(mnp.segment_name(alone)).size == 80
        finally:
            mnp.release(alone)
        assert mnp.segment_name(np.zeros(3)) is None
    finally:
        mnp.release(arr)
