"""SharedMemoryManager: the drop-in API, its extras (release, segments, max_bytes), its errors.

The kill scenarios (starter or server SIGKILLed) live in test_manager_crash.py.
Worker functions are module-level so that spawn and forkserver children find them
(tests/ is on sys.path in every child, see test_children.py).
"""

from __future__ import annotations

import concurrent.futures
import multiprocessing
import os
import signal
import threading
from multiprocessing import ProcessError
from multiprocessing.managers import dispatch
from typing import Any

import pytest
from helpers import exists, run_script, unique

import mpshm
from mpshm.managers import ManagedSegment, ManagerLimitError, SharedMemoryManager

pytestmark = pytest.mark.timeout(60)

JOIN = 60
VALUES = [7, -(2**62), 2.5, True, False, "text", "näïve ✓", b"by\x00tes", b"", "", None]


def all_gone(names: list[str]) -> list[str]:
    """The names in *names* that still exist (empty when everything was destroyed)."""
    return [name for name in names if exists(name)]


def segment_names(smm: SharedMemoryManager) -> set[str]:
    return {seg.name for seg in smm.segments()}


# -- child-process targets (module level, so spawn and forkserver find them) -----------


def _fill(args: tuple[mpshm.SharedMemory, int, int]) -> tuple[str, int, int]:
    """Pool task: write *value* into slot *slot* (512 bytes) of a manager segment."""
    shm, slot, value = args
    shm.buf[slot * 512:(slot + 1) * 512] = bytes([value]) * 512
    result = (shm.name, shm.size, os.getpid())
    shm.close()
    return result


def _square_item(args: tuple[mpshm.ShareableList, int]) -> int:
    """Pool task: square item *i* of a ShareableList in place."""
    sl, i = args
    sl[i] = sl[i] * sl[i]
    value = sl[i]
    sl.shm.close()
    return int(value)


def _do_work(sl: Any, start: int, stop: int) -> None:
    """The docs' do_work: store partial results in the list."""
    for i in range(start, stop):
        sl[i] = sl[i] * 2


def _connect_and_create(address: Any, authkey: bytes, queue: Any) -> None:
    """Connect to a running manager, make two segments, release one, report."""
    try:
        smm = SharedMemoryManager(address=address, authkey=authkey)
        smm.connect()
        shm = smm.SharedMemory(1000)
        shm.buf[:14] = b"from the child"
        sl = smm.ShareableList(["child", 42])
        dropped = smm.SharedMemory(10)
        dropped_name = dropped.name
        smm.release(dropped)
        queue.put(("ok", shm.name, shm.size, shm.backend, sl.shm.name, dropped_name,
                   sorted(seg.name for seg in smm.segments())))
        shm.close()
        sl.shm.close()
    except BaseException as exc:  # reported to the parent
        queue.put(("error", repr(exc)))


def _serve(backend: str, authkey: bytes, queue: Any) -> None:
    """Run a manager's server in this process (get_server().serve_forever())."""
    smm = SharedMemoryManager(address=("127.0.0.1", 0), authkey=authkey, backend=backend)
    server = smm.get_server()
    queue.put(server.address)
    server.serve_forever()  # exits the process (sys.exit) once shut down


# -- 1. drop-in use --------------------------------------------------------------------


def test_with_block_makes_segments_and_destroys_them(backend: str) -> None:
    with SharedMemoryManager(backend=backend) as smm:
        assert smm.backend == backend
        shm = smm.SharedMemory(3000)
        assert isinstance(shm, mpshm.SharedMemory)
        assert shm.size == 3000 and len(shm.buf) == 3000
        assert shm.backend == backend
        shm.buf[:5] = b"hello"
        shm.buf[-1] = 255
        other = mpshm.SharedMemory(shm.name)  # another attachment sees the data
        assert bytes(other.buf[:5]) == b"hello" and other.buf[2999] == 255
        other.close()

        sl = smm.ShareableList(VALUES)
        assert isinstance(sl, mpshm.ShareableList)
        assert sl.shm.backend == backend
        assert list(sl) == VALUES
        assert [type(v) for v in sl] == [type(v) for v in VALUES]
        sl[0] = 8
        sl[5] = "TEXT"
        again = mpshm.ShareableList(name=sl.shm.name)
        assert again[0] == 8 and again[5] == "TEXT" and again[10] is None
        again.shm.close()

        names = [shm.name, sl.shm.name]
        assert len(set(names)) == 2
        assert all(exists(n) for n in names)
    assert all_gone(names) == []


def test_start_and_shutdown_under_each_start_method(ctx: Any, backend: str) -> None:
    smm = SharedMemoryManager(ctx=ctx, backend=backend)
    smm.start()
    try:
        assert smm._process.is_alive()
        shms = [smm.SharedMemory(size) for size in (1, 4096, 100_001)]
        assert [s.size for s in shms] == [1, 4096, 100_001]
        assert {s.backend for s in shms} == {backend}
        for i, shm in enumerate(shms):
            shm.buf[0] = i + 1
        assert [s.buf[0] for s in shms] == [1, 2, 3]
        sl = smm.ShareableList(VALUES)
        assert list(sl) == VALUES
        names = [s.name for s in shms] + [sl.shm.name]
        assert all(exists(n) for n in names)
    finally:
        smm.shutdown()
    assert smm._process.exitcode == 0
    assert all_gone(names) == []


def test_stdlib_docs_basic_example() -> None:
    """The first SharedMemoryManager example of the Python docs, unchanged."""
    smm = SharedMemoryManager()
    smm.start()  # Start the process that manages the shared memory blocks
    sl = smm.ShareableList(range(4))
    assert list(sl) == [0, 1, 2, 3]
    assert repr(sl).startswith("ShareableList([0, 1, 2, 3], name=")
    raw_shm = smm.SharedMemory(size=128)
    another_sl = smm.ShareableList("alpha")
    assert list(another_sl) == ["a", "l", "p", "h", "a"]
    names = [sl.shm.name, raw_shm.name, another_sl.shm.name]
    assert all(exists(n) for n in names)
    smm.shutdown()  # Calls unlink() on sl, raw_shm, and another_sl
    assert all_gone(names) == []


def test_stdlib_docs_with_block_example(ctx: Any) -> None:
    """The docs' second example: ShareableList(range(2000)) split between two Processes."""
    with SharedMemoryManager(ctx=ctx) as smm:
        sl = smm.ShareableList(range(2000))
        # Divide the work among two processes, storing partial results in sl
        p1 = ctx.Process(target=_do_work, args=(sl, 0, 1000))
        p2 = ctx.Process(target=_do_work, args=(sl, 1000, 2000))
        p1.start()
        p2.start()  # A multiprocessing.Pool might be more efficient
        p1.join(JOIN)
        p2.join(JOIN)  # Wait for all work to complete in both processes
        assert (p1.exitcode, p2.exitcode) == (0, 0)
        total_result = sum(sl)  # Consolidate the partial results now in sl
        name = sl.shm.name
    assert total_result == 2 * sum(range(2000))
    assert not exists(name)


def test_stdlib_style_process_pool_executor(ctx: Any) -> None:
    """The same pattern through concurrent.futures.ProcessPoolExecutor."""
    with SharedMemoryManager() as smm:
        sl = smm.ShareableList(list(range(10)))
        with concurrent.futures.ProcessPoolExecutor(2, mp_context=ctx) as pool:
            results = list(pool.map(_square_item, [(sl, i) for i in range(10)]))
        assert results == [i * i for i in range(10)]
        assert list(sl) == [i * i for i in range(10)]
        name = sl.shm.name
    assert not exists(name)


class Counter:
    """A custom type registered on a SharedMemoryManager subclass."""

    def __init__(self, start: int = 0) -> None:
        self.value = start

    def increment(self) -> int:
        self.value += 1
        return self.value


class CountingManager(SharedMemoryManager):
    pass


CountingManager.register("Counter", Counter)


def test_register_custom_types_on_a_subclass() -> None:
    """register() works as on any BaseManager, next to the shared memory requests."""
    with CountingManager() as smm:
        counter = smm.Counter(10)
        assert counter.increment() == 11
        assert counter.increment() == 12
        shm = smm.SharedMemory(32)
        assert isinstance(shm, mpshm.SharedMemory)
        assert segment_names(smm) == {shm.name}
        name = shm.name
    assert not exists(name)
    assert not hasattr(SharedMemoryManager, "Counter")


# -- 2. exceptions in the with block ---------------------------------------------------


class _Boom(Exception):
    pass


def test_exception_in_with_block_propagates_and_segments_are_destroyed(backend: str) -> None:
    boom = _Boom("raised in the with block")
    names: list[str] = []
    with pytest.raises(_Boom) as info, SharedMemoryManager(backend=backend) as smm:
        names.append(smm.SharedMemory(64).name)
        names.append(smm.ShareableList([1, "two"]).shm.name)
        assert all(exists(n) for n in names)
        raise boom
    assert info.value is boom
    assert len(names) == 2
    assert all_gone(names) == []
    assert smm._process.exitcode == 0


def test_keyboard_interrupt_in_with_block(backend: str) -> None:
    names: list[str] = []
    with pytest.raises(KeyboardInterrupt), SharedMemoryManager(backend=backend) as smm:
        names.append(smm.SharedMemory(64).name)
        raise KeyboardInterrupt
    assert all_gone(names) == []


# -- 3. clients that unlinked some segments themselves ---------------------------------


def test_shutdown_after_client_unlinked_some(backend: str) -> None:
    smm = SharedMemoryManager(backend=backend)
    smm.start()
    shms = [smm.SharedMemory(256 * (i + 1)) for i in range(5)]
    sl = smm.ShareableList(["a", 1])
    shms[0].unlink()
    shms[3].unlink()
    sl.shm.unlink()
    # Another attachment unlinking is just as good.
    other = mpshm.SharedMemory(shms[4].name)
    other.unlink()
    other.close()
    remaining = [shms[1].name, shms[2].name]
    assert all(exists(n) for n in remaining)
    smm.shutdown()  # must not raise
    assert smm._process.exitcode == 0
    assert all_gone([s.name for s in shms] + [sl.shm.name]) == []


def test_with_block_after_client_unlinked_everything(backend: str) -> None:
    with SharedMemoryManager(backend=backend) as smm:
        shm = smm.SharedMemory(100)
        shm.unlink()
        with pytest.raises(FileNotFoundError):
            shm.unlink()
    assert not exists(shm.name)


# -- 4. Pool workers write into manager segments ---------------------------------------


def test_pool_workers_write_into_segments(ctx: Any, backend: str) -> None:
    with SharedMemoryManager(backend=backend) as smm:
        segs = [smm.SharedMemory(8 * 512) for _ in range(3)]
        tasks = [(seg, slot, (i * 8 + slot) % 255 + 1) for i, seg in enumerate(segs)
                 for slot in range(8)]
        with ctx.Pool(2) as pool:
            results = pool.map(_fill, tasks, chunksize=1)
            pool.close()
            pool.join()
        assert [(name, size) for name, size, _ in results] == [
            (seg.name, seg.size) for seg, _, _ in tasks
        ]
        assert all(pid != os.getpid() for _, _, pid in results)
        for seg, slot, value in tasks:
            assert bytes(seg.buf[slot * 512:(slot + 1) * 512]) == bytes([value]) * 512
        names = [s.name for s in segs]
    assert all_gone(names) == []


def test_pool_workers_update_shareable_list(ctx: Any) -> None:
    with SharedMemoryManager() as smm:
        sl = smm.ShareableList(list(range(12)))
        with ctx.Pool(2) as pool:
            results = pool.map(_square_item, [(sl, i) for i in range(12)], chunksize=1)
            pool.close()
            pool.join()
        assert results == [i * i for i in range(12)]
        assert list(sl) == [i * i for i in range(12)]
        name = sl.shm.name
    assert not exists(name)


# -- 5. other processes: connect(), get_server() ---------------------------------------


@pytest.mark.parametrize("tcp", [True, False], ids=["tcp", "default-address"])
def test_client_in_another_process_connects(ctx: Any, tcp: bool) -> None:
    authkey = os.urandom(16)
    address = ("127.0.0.1", 0) if tcp else None
    smm = SharedMemoryManager(address=address, authkey=authkey, ctx=ctx)
    smm.start()
    try:
        if tcp:
            assert smm.address[0] == "127.0.0.1" and smm.address[1] != 0
        queue = ctx.Queue()
        proc = ctx.Process(target=_connect_and_create, args=(smm.address, authkey, queue))
        proc.start()
        reply = queue.get(timeout=JOIN)
        proc.join(JOIN)
        assert reply[0] == "ok", reply
        assert proc.exitcode == 0
        _, name, size, backend, list_name, dropped, listed = reply
        assert (size, backend) == (1000, mpshm.get_default_backend())
        assert listed == sorted([name, list_name])
        assert segment_names(smm) == {name, list_name}
        assert not exists(dropped)
        shm = mpshm.SharedMemory(name)
        assert bytes(shm.buf[:14]) == b"from the child"
        shm.close()
        sl = mpshm.ShareableList(name=list_name)
        assert list(sl) == ["child", 42]
        sl.shm.close()
    finally:
        smm.shutdown()
    assert all_gone([name, list_name]) == []


def test_wrong_authkey_is_refused() -> None:
    with SharedMemoryManager(authkey=b"right key") as smm:
        other = SharedMemoryManager(address=smm.address, authkey=b"wrong key")
        with pytest.raises(multiprocessing.AuthenticationError):
            other.connect()
        assert smm.segments() == []


def test_get_server_serve_forever_in_child(ctx: Any, backend: str) -> None:
    authkey = os.urandom(16)
    queue = ctx.Queue()
    proc = ctx.Process(target=_serve, args=(backend, authkey, queue))
    proc.start()
    try:
        address = tuple(queue.get(timeout=JOIN))
        client = SharedMemoryManager(address=address, authkey=authkey)
        client.connect()
        shm = client.SharedMemory(333)
        assert (shm.size, shm.backend) == (333, backend)
        shm.buf[:3] = b"abc"
        sl = client.ShareableList([1.5, "x"])
        names = [shm.name, sl.shm.name]
        assert segment_names(client) == set(names)
        assert all(exists(n) for n in names)
        shm.close()
        sl.shm.close()
        with client._Client(address, authkey=authkey) as conn:
            assert dispatch(conn, None, "shutdown") is None
        proc.join(JOIN)
        assert proc.exitcode == 0
    finally:
        if proc.is_alive():
            proc.kill()
            proc.join(JOIN)
    assert all_gone(names) == []


def test_get_server_refused_after_start() -> None:
    with SharedMemoryManager() as smm, pytest.raises(ProcessError, match="Already started"):
        smm.get_server()
    with pytest.raises(ProcessError):
        smm.get_server()


# -- 6. release() ----------------------------------------------------------------------


def test_release_by_object(backend: str) -> None:
    with SharedMemoryManager(backend=backend) as smm:
        shm = smm.SharedMemory(64)
        keep = smm.SharedMemory(64)
        name = shm.name
        view = shm.buf[8:16]
        view[:] = b"12345678"
        smm.release(shm)
        assert not exists(name)
        assert shm.buf is None  # release() closes the object
        assert bytes(view) == b"12345678"  # a view made before stays valid
        view[0] = ord("X")
        assert bytes(view) == b"X2345678"
        view.release()
        assert segment_names(smm) == {keep.name}
        assert exists(keep.name)
        with pytest.raises(ValueError, match=name):
            smm.release(shm)
        with pytest.raises(ValueError, match=name):
            smm.release(name)
        assert exists(keep.name)
    assert not exists(keep.name)


NUMPY_AFTER_RELEASE = """
import numpy as np
import mpshm

with mpshm.SharedMemoryManager(backend=backend) as smm:
    shm = smm.SharedMemory(8 * 100)
    if how == "ndarray":
        arr = np.ndarray((100,), dtype=np.int64, buffer=shm.buf)
    else:
        arr = np.frombuffer(shm.buf, dtype=np.int64)
    arr[:] = np.arange(100)
    smm.release(shm)
    print("released", shm.buf is None, smm.segments(), flush=True)
    print("sum", int(arr.sum()), flush=True)
    arr[5] = -1
    print("item", int(arr[5]), flush=True)
"""


# np.ndarray(buffer=shm.buf) keeps the mmap as its base without exporting its buffer
# (numpy#23305): closing must not unmap it. Run as a separate program, so that a crash
# fails this test rather than killing the pytest worker.
@pytest.mark.parametrize("how", ["frombuffer", "ndarray"])
def test_release_keeps_numpy_views_valid(backend: str, how: str) -> None:
    pytest.importorskip("numpy")
    result = run_script(f"backend, how = {backend!r}, {how!r}\n" + NUMPY_AFTER_RELEASE, JOIN)
    assert result.returncode == 0, (result.returncode, result.stdout, result.stderr)
    assert result.stdout.splitlines() == ["released True []", f"sum {sum(range(100))}", "item -1"]


def test_release_by_shareable_list(backend: str) -> None:
    with SharedMemoryManager(backend=backend) as smm:
        sl = smm.ShareableList([1, 2, 3])
        name = sl.shm.name
        smm.release(sl)
        assert not exists(name)
        assert sl.shm.buf is None
        assert smm.segments() == []
        with pytest.raises(ValueError, match=name):
            smm.release(sl)


def test_release_by_name(backend: str) -> None:
    with SharedMemoryManager(backend=backend) as smm:
        shm = smm.SharedMemory(64)
        shm.buf[0] = 9
        smm.release(shm.name)
        assert not exists(shm.name)
        assert shm.buf[0] == 9  # releasing by name leaves the object open
        assert smm.segments() == []
        with pytest.raises(ValueError, match=shm.name):
            smm.release(shm.name)
        shm.close()


def test_release_unknown_name_and_foreign_segment(make_shm: Any) -> None:
    foreign = make_shm(size=64)  # made outside the manager: never destroyed by it
    with SharedMemoryManager() as smm:
        held = smm.SharedMemory(64)
        unknown = unique("never_made")
        with pytest.raises(ValueError, match=unknown):
            smm.release(unknown)
        with pytest.raises(ValueError, match=foreign.name):
            smm.release(foreign)
        assert exists(foreign.name)
        assert foreign.buf is not None  # not closed either
        assert segment_names(smm) == {held.name}
    assert exists(foreign.name)
    assert not exists(held.name)


@pytest.mark.parametrize("wrong", [42, None, b"psm_bytes", 1.5, ["psm_x"]])
def test_release_of_wrong_type_is_type_error(wrong: Any) -> None:
    with SharedMemoryManager() as smm:
        held = smm.SharedMemory(64)
        with pytest.raises(TypeError, match=type(wrong).__name__):
            smm.release(wrong)
        assert segment_names(smm) == {held.name}


# -- 7. segments() ---------------------------------------------------------------------


def test_segments_lists_what_the_manager_holds(backend: str) -> None:
    with SharedMemoryManager(backend=backend) as smm:
        assert smm.segments() == []
        a = smm.SharedMemory(100)
        b = smm.SharedMemory(70_000)
        sl = smm.ShareableList(["x", 2])
        listed = smm.segments()
        assert all(isinstance(seg, ManagedSegment) for seg in listed)
        assert sorted(listed) == sorted([
            (a.name, backend, 100), (b.name, backend, 70_000), (sl.shm.name, backend, sl.shm.size),
        ])
        seg = next(s for s in listed if s.name == b.name)
        assert (seg.name, seg.backend, seg.size) == (b.name, backend, 70_000)

        a.unlink()  # the client destroyed it itself
        assert segment_names(smm) == {b.name, sl.shm.name}
        other = mpshm.SharedMemory(sl.shm.name)
        other.unlink()  # so did another attachment
        other.close()
        assert segment_names(smm) == {b.name}
    with pytest.raises(ProcessError):
        smm.segments()


# -- 8. max_bytes ----------------------------------------------------------------------


def test_max_bytes_limit(backend: str) -> None:
    with SharedMemoryManager(backend=backend, max_bytes=10_000) as smm:
        assert smm.max_bytes == 10_000
        a = smm.SharedMemory(6000)
        b = smm.SharedMemory(4000)  # exactly up to the limit is fine
        with pytest.raises(ManagerLimitError) as info:
            smm.SharedMemory(1)
        err = info.value
        assert isinstance(err, MemoryError)
        assert (err.limit, err.held, err.requested) == (10_000, 10_000, 1)
        assert "10000" in str(err) and "max_bytes" in str(err)
        assert segment_names(smm) == {a.name, b.name}  # the failed call left nothing

        smm.release(a)
        c = smm.SharedMemory(5000)
        with pytest.raises(ManagerLimitError) as info:
            smm.SharedMemory(1001)
        assert (info.value.held, info.value.requested) == (9000, 1001)

        b.unlink()  # a segment the client destroyed itself frees its room
        d = smm.SharedMemory(5000)
        assert segment_names(smm) == {c.name, d.name}
        with pytest.raises(ManagerLimitError) as info:
            smm.SharedMemory(1)
        assert info.value.held == 10_000


def test_max_bytes_applies_to_shareable_list(backend: str) -> None:
    with SharedMemoryManager(backend=backend, max_bytes=4096) as smm:
        small = smm.ShareableList([1, 2, 3])
        before = smm.segments()
        with pytest.raises(ManagerLimitError) as info:
            smm.ShareableList(["x" * 5000])
        assert info.value.limit == 4096
        assert info.value.held == small.shm.size
        assert info.value.requested > 5000
        assert smm.segments() == before
        smm.release(small)
        big = smm.ShareableList(["x" * 4000])
        assert big[0] == "x" * 4000


@pytest.mark.parametrize(("value", "error"), [
    (-1, ValueError), (-(2**40), ValueError), ("100", TypeError), (1.5, TypeError),
    ([100], TypeError),
])
def test_invalid_max_bytes(value: Any, error: type[Exception]) -> None:
    with pytest.raises(error):
        SharedMemoryManager(max_bytes=value)


def test_max_bytes_under_concurrent_requests(backend: str) -> None:
    """Threads racing for room: exactly max_bytes // size creations succeed."""
    size, room, threads, tries = 4096, 10, 6, 4
    results: list[Any] = []
    lock = threading.Lock()
    with SharedMemoryManager(backend=backend, max_bytes=room * size) as smm:
        barrier = threading.Barrier(threads)

        def grab() -> None:
            barrier.wait()
            for _ in range(tries):
                try:
                    outcome: Any = smm.SharedMemory(size)
                except ManagerLimitError as exc:
                    outcome = exc
                with lock:
                    results.append(outcome)

        workers = [threading.Thread(target=grab) for _ in range(threads)]
        for t in workers:
            t.start()
        for t in workers:
            t.join(JOIN)
        made = [r for r in results if isinstance(r, mpshm.SharedMemory)]
        refused = [r for r in results if isinstance(r, ManagerLimitError)]
        assert len(results) == threads * tries
        assert len(made) == room and len(refused) == threads * tries - room
        assert segment_names(smm) == {s.name for s in made}
        assert sum(seg.size for seg in smm.segments()) == room * size
        names = [s.name for s in made]
    assert all_gone(names) == []


# -- 9. errors -------------------------------------------------------------------------


@pytest.mark.parametrize(("size", "error"), [
    (0, ValueError), (-1, ValueError), ("x", TypeError), (1.5, TypeError), (None, TypeError),
])
def test_invalid_sizes(size: Any, error: type[Exception]) -> None:
    with SharedMemoryManager() as smm:
        with pytest.raises(error):
            smm.SharedMemory(size)
        assert smm.segments() == []


def test_use_before_start_raises_process_error() -> None:
    smm = SharedMemoryManager()
    with pytest.raises(ProcessError, match=r"start\(\)"):
        smm.SharedMemory(64)
    with pytest.raises(ProcessError, match=r"start\(\)"):
        smm.ShareableList([1, 2])
    with pytest.raises(ProcessError, match=r"start\(\)"):
        smm.segments()
    with pytest.raises(ProcessError, match=r"start\(\)"):
        smm.release("psm_nothing")


def test_use_after_shutdown_raises_process_error() -> None:
    with SharedMemoryManager() as smm:
        smm.SharedMemory(10)
    with pytest.raises(ProcessError):
        smm.SharedMemory(64)


def test_unknown_backend() -> None:
    name = unique("nosuchbackend")
    with pytest.raises(ValueError, match=name):
        SharedMemoryManager(backend=name)
    with pytest.raises(TypeError):
        SharedMemoryManager(backend=3)  # type: ignore[arg-type]


@pytest.mark.parametrize(("backend", "option"), [
    ("posix", {"dir": "/tmp"}), ("sysv", {"dir": "/tmp"}), ("mmap", {"directory": "/tmp"}),
    ("posix", {"mode": 0o600}),
])
def test_option_the_backend_refuses(backend: str, option: dict[str, Any]) -> None:
    (key,) = option
    with pytest.raises(TypeError, match=key):
        SharedMemoryManager(backend=backend, **option)


def test_mmap_dir_option(tmp_path: Any) -> None:
    directory = tmp_path / "segments"
    with SharedMemoryManager(backend="mmap", dir=str(directory)) as smm:
        shm = smm.SharedMemory(5000)
        sl = smm.ShareableList([1, "in dir"])
        for name in (shm.name, sl.shm.name):
            assert name.startswith("mmap:")
            assert os.path.dirname(name[len("mmap:"):]) == str(directory)
        assert sorted(os.listdir(directory)) == sorted(
            os.path.basename(n) for n in (shm.name, sl.shm.name)
        )
        shm.buf[:2] = b"ok"
        with open(shm.name[len("mmap:"):], "rb") as f:
            assert f.read(2) == b"ok"
    assert os.listdir(directory) == []


def test_initializer_must_be_callable() -> None:
    smm = SharedMemoryManager()
    with pytest.raises(TypeError):
        smm.start(initializer=42)  # type: ignore[arg-type]


# -- 10. the standard library's protocol -----------------------------------------------


def _request(smm: SharedMemoryManager, method: str, *args: Any) -> Any:
    """One request of the standard library's protocol (the server answers one per connection)."""
    with smm._Client(smm.address, authkey=smm._authkey) as conn:
        return dispatch(conn, None, method, args)


def test_track_segment_release_segment_list_segments(backend: str) -> None:
    with SharedMemoryManager(backend=backend) as smm:
        made = smm.SharedMemory(64)
        # Segments made by a client, handed over the way the stdlib's client does
        # (untracked here: the manager, not this process, is to destroy them).
        mine = mpshm.SharedMemory(create=True, size=256, backend=backend, track=False)
        dropped = mpshm.SharedMemory(create=True, size=32, backend=backend, track=False)
        try:
            assert _request(smm, "track_segment", mine.name) is None
            assert _request(smm, "track_segment", dropped.name) is None
            listed = _request(smm, "list_segments")
            assert sorted(listed) == sorted([made.name, mine.name, dropped.name])
            assert sorted(smm.segments()) == sorted([
                (made.name, backend, 64), (mine.name, backend, 256), (dropped.name, backend, 32),
            ])
            assert _request(smm, "release_segment", dropped.name) is None
            assert not exists(dropped.name)
            assert sorted(_request(smm, "list_segments")) == sorted([made.name, mine.name])
            assert exists(mine.name)
        except BaseException:
            for shm in (mine, dropped):
                try:
                    shm.unlink()
                except FileNotFoundError:
                    pass
            raise
        finally:
            mine.close()
            dropped.close()
    assert all_gone([made.name, mine.name, dropped.name]) == []


def test_track_segment_counts_against_max_bytes() -> None:
    with SharedMemoryManager(max_bytes=1000) as smm:
        mine = mpshm.SharedMemory(create=True, size=600, track=False)
        try:
            _request(smm, "track_segment", mine.name)
        except BaseException:
            mine.unlink()
            raise
        finally:
            mine.close()
        with pytest.raises(ManagerLimitError) as info:
            smm.SharedMemory(500)
        assert (info.value.held, info.value.requested) == (600, 500)
    assert not exists(mine.name)


# Tracking a name the manager already holds must not count its bytes twice.
def test_track_segment_of_held_segment_keeps_accounting() -> None:
    with SharedMemoryManager(max_bytes=2000) as smm:
        shm = smm.SharedMemory(600)
        try:
            _request(smm, "track_segment", shm.name)
        except Exception:
            pass  # refusing it would be fine too; miscounting is not
        assert smm.segments() == [(shm.name, smm.backend, 600)]
        with pytest.raises(ManagerLimitError) as info:
            smm.SharedMemory(1401)
        assert info.value.held == 600
        smm.release(shm)
        assert smm.segments() == []
        big = smm.SharedMemory(2000)  # all the room is back
        assert big.size == 2000


def test_stdlib_client_connected_to_mpshm_server() -> None:
    """The standard library's own SharedMemoryManager client, against an mpshm server."""
    from multiprocessing import managers, resource_tracker

    authkey = os.urandom(16)
    with SharedMemoryManager(authkey=authkey, backend="posix") as smm:
        client = managers.SharedMemoryManager(address=smm.address, authkey=authkey)
        client.connect()
        stdlib_shm = client.SharedMemory(128)  # made by the client, tracked by our server
        # The manager owns it now, not the client's resource tracker.
        resource_tracker.unregister(stdlib_shm._name, "shared_memory")  # type: ignore[attr-defined]
        stdlib_shm.buf[:3] = b"std"
        ours = mpshm.SharedMemory(stdlib_shm.name)
        assert bytes(ours.buf[:3]) == b"std"
        ours.close()
        assert stdlib_shm.name in segment_names(smm)
        stdlib_shm.close()
        name = stdlib_shm.name
    assert not exists(name)


# -- 11. Ctrl-C ------------------------------------------------------------------------


def _sigint_ignored(pid: int) -> bool:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("SigIgn:"):
                return bool(int(line.split()[1], 16) & (1 << (signal.SIGINT - 1)))
    raise AssertionError("no SigIgn line")


def test_sigint_to_server_does_not_stop_it(ctx: Any) -> None:
    """gh-80549: Ctrl-C in a terminal reaches the server too; it must keep serving."""
    with SharedMemoryManager(ctx=ctx) as smm:
        before = smm.SharedMemory(64)
        pid = smm._process.pid
        if os.path.exists(f"/proc/{pid}/status"):
            assert _sigint_ignored(pid)
        for _ in range(3):
            os.kill(pid, signal.SIGINT)
        # A server that did not ignore it would exit within milliseconds.
        smm._process.join(0.3)
        assert smm._process.exitcode is None
        after = smm.SharedMemory(64)
        after.buf[0] = 1
        assert segment_names(smm) == {before.name, after.name}
    assert all_gone([before.name, after.name]) == []


# -- 12. threads -----------------------------------------------------------------------


def test_threads_create_and_release_concurrently(backend: str) -> None:
    threads, rounds = 6, 8
    kept: list[mpshm.SharedMemory] = []
    released: list[str] = []
    errors: list[BaseException] = []
    lock = threading.Lock()
    with SharedMemoryManager(backend=backend) as smm:
        barrier = threading.Barrier(threads)

        def work(index: int) -> None:
            try:
                barrier.wait()
                for i in range(rounds):
                    shm = smm.SharedMemory(100 + index)
                    shm.buf[0] = index
                    if i % 2:
                        name = shm.name
                        smm.release(shm if i % 4 == 1 else name)
                        if i % 4 != 1:
                            shm.close()
                        with lock:
                            released.append(name)
                    else:
                        with lock:
                            kept.append(shm)
            except BaseException as exc:
                with lock:
                    errors.append(exc)

        workers = [threading.Thread(target=work, args=(i,)) for i in range(threads)]
        for t in workers:
            t.start()
        for t in workers:
            t.join(JOIN)
        assert errors == []
        all_names = [s.name for s in kept] + released
        assert len(all_names) == threads * rounds
        assert len(set(all_names)) == len(all_names)  # every name distinct
        listed = smm.segments()
        assert sorted(listed) == sorted((s.name, backend, s.size) for s in kept)
        assert sum(seg.size for seg in listed) == sum(s.size for s in kept)
        assert all_gone(released) == []
        for shm in kept:
            assert shm.buf[0] == shm.size - 100
    assert all_gone(all_names) == []



# -- sessions: one connection per thread and process ------------------------------------


def _create_in_forked_child(smm: SharedMemoryManager, queue: Any) -> None:
    """Use the parent's manager object (inherited through fork) from the child."""
    made = [smm.SharedMemory(100) for _ in range(30)]
    queue.put([(shm.name, shm.size) for shm in made])
    for shm in made:
        shm.close()


def test_forked_child_uses_the_inherited_manager_object(backend: str) -> None:
    """A child forked after the parent opened its session must not share that
    connection (the answers would go to the wrong process)."""
    ctx = multiprocessing.get_context("fork")
    with SharedMemoryManager(backend=backend) as smm:
        first = smm.SharedMemory(10)  # the parent's session is open now
        queue = ctx.Queue()
        child = ctx.Process(target=_create_in_forked_child, args=(smm, queue))
        child.start()
        ours = [smm.SharedMemory(10) for _ in range(30)]  # meanwhile, in the parent
        theirs = queue.get(timeout=JOIN)
        child.join(JOIN)
        assert child.exitcode == 0
        assert {size for _, size in theirs} == {100}
        assert {shm.size for shm in ours} == {10}
        names = [first.name] + [shm.name for shm in ours] + [name for name, _ in theirs]
        assert segment_names(smm) == set(names) and len(set(names)) == 61
        for shm in ours:
            shm.close()
    assert all_gone(names) == []


def test_interrupted_request_does_not_desynchronize_the_session(monkeypatch: Any) -> None:
    """Ctrl-C between sending a request and reading its answer: the next
    request must get its own answer, not the one left unread."""
    with SharedMemoryManager() as smm:
        smm.SharedMemory(10)
        conn = smm._sessions.conn
        real_recv = conn.recv

        def interrupted() -> Any:
            raise KeyboardInterrupt

        monkeypatch.setattr(conn, "recv", interrupted)
        with pytest.raises(KeyboardInterrupt):
            smm.segments()
        monkeypatch.setattr(conn, "recv", real_recv)
        shm = smm.SharedMemory(64)  # would read the unread segments() answer if desynced
        assert isinstance(shm, mpshm.SharedMemory) and shm.size == 64
        assert len(smm.segments()) == 2
