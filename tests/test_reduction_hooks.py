"""The pickler's extension points: register(), register_lazy() and receivers."""

from __future__ import annotations

import pickle
import sys
import types
import uuid

import numpy as np
import pytest
from helpers import run_script

import mpshm
from mpshm import reduction

pytestmark = pytest.mark.timeout(120)


class Frame:
    """A type of a user's own whose pixels are a large buffer."""

    def __init__(self, pixels: bytearray, label: str) -> None:
        self.pixels = pixels
        self.label = label


def _rebuild_frame(pixels: memoryview, label: str) -> Frame:
    return Frame(bytearray(pixels), label)


@pytest.fixture
def registered_frame():
    """Frame registered with a reducer that hands its pixels to the pickler
    as an out-of-band buffer (a bytearray alone would be pickled inline)."""
    calls: list[object] = []

    def reduce_frame(collector: reduction.Collector, frame: Frame) -> object:
        calls.append(collector)
        return _rebuild_frame, (pickle.PickleBuffer(frame.pixels), frame.label)

    reduction.register(Frame, reduce_frame)
    try:
        yield calls
    finally:
        del reduction._reducers[Frame]


def test_a_registered_reducer_sends_a_users_type_through_shared_memory(backend,
                                                                      registered_frame):
    frame = Frame(bytearray(b"\x07" * (2 << 20)), "first")
    data = reduction.dumps(frame, backend=backend, threshold=1 << 20)
    assert len(data) < 4096  # the pixels went into a segment, not the pickle
    _, descriptors, _, _ = reduction.split_message(data)
    assert [d.backend for d in descriptors] == [backend]
    copy = reduction.loads(data)
    assert isinstance(copy, Frame) and copy.label == "first"
    assert copy.pixels == frame.pixels
    assert len(registered_frame) == 1
    assert isinstance(registered_frame[0], reduction.Collector)


def test_registering_again_replaces_the_reducer(registered_frame):
    def inline(collector: reduction.Collector, frame: Frame) -> object:
        return _rebuild_frame, (bytes(frame.pixels), frame.label + "!")

    reduction.register(Frame, inline)
    copy = reduction.loads(reduction.dumps(Frame(bytearray(b"ab"), "x")))
    assert copy.label == "x!" and registered_frame == []


def test_a_lazy_loader_runs_once_its_module_is_imported():
    name = f"mpshm_test_module_{uuid.uuid4().hex}"
    loaded: list[str] = []
    reduction.register_lazy(name, lambda: loaded.append(name))
    try:
        reduction.loads(reduction.dumps([1, 2]))
        assert loaded == []  # nobody imported it: nothing to load
        sys.modules[name] = types.ModuleType(name)
        reduction.loads(reduction.dumps([1, 2]))
        reduction.loads(reduction.dumps([3]))
        assert loaded == [name]  # once
    finally:
        sys.modules.pop(name, None)
        reduction._lazy.pop(name, None)


def test_a_failing_lazy_loader_warns_and_pickling_goes_on():
    name = f"mpshm_test_module_{uuid.uuid4().hex}"

    def broken() -> None:
        raise ImportError("a broken build of the optional library")

    reduction.register_lazy(name, broken)
    sys.modules[name] = types.ModuleType(name)
    try:
        with pytest.warns(RuntimeWarning, match="broken build"):
            assert reduction.loads(reduction.dumps({"a": 1})) == {"a": 1}
        assert reduction.loads(reduction.dumps({"b": 2})) == {"b": 2}  # once only
    finally:
        sys.modules.pop(name, None)
        reduction._lazy.pop(name, None)


@pytest.mark.parametrize("start_method", ["fork", "spawn"])
def test_numpy_reducers_load_without_importing_mpshm_numpy(start_method):
    """A plain ndarray view of a SharedMemory's buffer (a strided one, which
    only the array reducer can send by handle) goes by handle from a program
    that never imports mpshm.numpy, to a pool's worker too."""
    result = run_script(f"""
        import sys
        import numpy as np
        import mpshm
        from mpshm import reduction

        if __name__ == "__main__":
            assert "mpshm.numpy" not in sys.modules
            shm = mpshm.SharedMemory(create=True, size=8 * 4096)
            try:
                base = np.ndarray(4096, dtype="float64", buffer=shm.buf)
                base[:] = np.arange(4096)
                view = base[::2]
                data = reduction.dumps(view)
                assert len(data) < 1024, len(data)
                assert "mpshm.numpy" in sys.modules  # loaded by the first pickler
                copy = reduction.loads(data)
                copy[0] = -1.0
                assert base[0] == -1.0  # the same memory
                del copy
                with mpshm.Pool(1, context=mpshm.get_context({start_method!r})) as pool:
                    print(float(pool.apply(np.sum, (view,))),
                          pool.apply(type, (view,)).__name__)
                del view, base
            finally:
                shm.close()
                shm.unlink()
    """, timeout=90)
    assert result.returncode == 0, result.stderr
    expected = float(np.arange(0, 4096, 2).sum()) - 1.0  # base[0] became -1
    assert result.stdout.split() == [str(expected), "SharedArray"]


def test_a_receiver_decides_how_buffers_are_taken():
    class Counting(reduction.Receiver):
        def __init__(self) -> None:
            self.taken: list[str] = []

        def take(self, descriptor: reduction.Descriptor) -> memoryview:
            self.taken.append(descriptor.kind)
            assert reduction.receiver() is self  # what rebuild functions see
            return super().take(descriptor)

    data = reduction.dumps(np.ones(1 << 18))
    main, descriptors, _, _ = reduction.split_message(data)
    receiver = Counting()
    arr = reduction.load_parts(main, descriptors, receiver)
    assert receiver.taken == ["give"] and float(arr.sum()) == float(1 << 18)
    assert reduction.receiver() is not receiver  # restored after the message
    del arr
    mpshm._mappings.reaper.drain()


def test_first_picklers_in_two_threads_both_get_numpys_reducers():
    """Two pools made before NumPy is imported, each given a strided view of
    a SharedMemory at once: both views go by handle (a copy would lose the
    worker's write), whichever thread loads the reducers."""
    result = run_script("""
        import multiprocessing
        import mpshm

        def fill(view, value):
            view[...] = value
            return view.size

        if __name__ == "__main__":
            ctx = multiprocessing.get_context("fork")
            pools = [mpshm.Pool(1, context=ctx) for _ in range(2)]
            for pool in pools:
                pool.apply(int, (1,))
            import numpy as np
            shm = mpshm.SharedMemory(create=True, size=8 << 20)
            try:
                full = np.ndarray((2, 1 << 19), dtype=np.float64, buffer=shm.buf)
                full[:] = 0
                views = [full[0, ::2], full[1, ::2]]
                pending = [pools[i].apply_async(fill, (views[i], i + 1)) for i in range(2)]
                print([p.get(30) for p in pending], full[0, 0], full[1, 0])
                del full, views
            finally:
                for pool in pools:
                    pool.close()
                    pool.join()
                shm.close()
                shm.unlink()
    """, timeout=90)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["[262144,", "262144]", "1.0", "2.0"]


def test_a_child_forked_while_the_reducers_load_can_still_pickle():
    """fork() while another thread holds the lock of the lazy reducers (it
    is importing mpshm.numpy): the child pickles, it does not wait forever."""
    result = run_script("""
        import os, signal, threading
        from mpshm import reduction

        def load():
            import numpy  # noqa: F401
            reduction.dumps(1)  # loads mpshm.numpy under the lock

        thread = threading.Thread(target=load)
        thread.start()
        while reduction._lazy_lock.acquire(blocking=False):  # until the thread holds it
            reduction._lazy_lock.release()
            if not thread.is_alive():
                break
        pid = os.fork()
        if pid == 0:
            signal.alarm(10)
            reduction.loads(reduction.dumps([1, 2, 3]))
            os._exit(7)
        _, status = os.waitpid(pid, 0)
        thread.join()
        print(os.waitstatus_to_exitcode(status))
    """, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "7"
