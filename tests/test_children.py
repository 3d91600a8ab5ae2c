"""SharedMemory across processes: every backend under fork, spawn and forkserver."""

from __future__ import annotations

import pickle

import helpers
import pytest
from helpers import exists, unique

import mpshm

JOIN = 60


def run(ctx, target, *args):
    proc = ctx.Process(target=target, args=args)
    proc.start()
    proc.join(JOIN)
    assert proc.exitcode == 0, f"child exited with {proc.exitcode}"


def test_child_attaches_by_name_and_writes(ctx, make_shm):
    shm = make_shm(size=1 << 16)
    run(ctx, helpers.child_write, shm.name, b"from the child", 100)
    assert bytes(shm.buf[100:114]) == b"from the child"


def test_child_reads_what_parent_wrote(ctx, make_shm):
    shm = make_shm(size=5000)
    shm.buf[:6] = b"parent"
    queue = ctx.Queue()
    run(ctx, helpers.child_read, shm.name, 6, queue)
    data, size, length = queue.get(timeout=JOIN)
    assert data == b"parent" and size == 5000 and length == 5000


def test_handle_passed_as_argument(ctx, make_shm, backend):
    shm = make_shm(size=64)
    shm.buf[:4] = b"\x01\x02\x03\x04"
    queue = ctx.Queue()
    run(ctx, helpers.child_unpickle, shm, queue)
    name, size, head = queue.get(timeout=JOIN)
    assert (name, size) == (shm.name, 64)
    assert head == b"\x01\x2a\x03\x04"
    assert shm.buf[1] == 42


def test_attach_only_child_never_destroys(ctx, make_shm):
    """CPython gh-82300: a process that only attached destroyed the segment at exit."""
    shm = make_shm(size=64)
    run(ctx, helpers.child_attach_and_exit, shm.name)
    assert exists(shm.name)
    assert shm.buf[0] == 7
    run(ctx, helpers.child_attach_and_exit, shm.name)  # and again, with a later child
    assert exists(shm.name)


@pytest.mark.parametrize("track", [True, False])
def test_segment_created_by_child_outlives_child(ctx, backend, track):
    """Tracked segments belong to the program, not to the child that made them."""
    queue = ctx.Queue()
    run(ctx, helpers.child_create, backend, 4096, track, queue)
    name = queue.get(timeout=JOIN)
    shm = mpshm.SharedMemory(name)
    try:
        assert bytes(shm.buf[:3]) == b"abc"
    finally:
        shm.close()
        shm.unlink()


def test_child_unlinks_parent_segment(ctx, backend):
    shm = mpshm.SharedMemory(create=True, size=64, backend=backend)
    try:
        run(ctx, helpers.child_unlink, shm.name)
        assert not exists(shm.name)
        shm.buf[0] = 1  # the mapping stays valid
        assert shm.buf[0] == 1
    finally:
        shm.close()
        with pytest.raises(FileNotFoundError):
            shm.unlink()


def test_user_named_segment_across_processes(ctx, make_shm, backend):
    name = unique("frames")
    shm = make_shm(name, size=32)
    run(ctx, helpers.child_write, name if backend == "posix" else f"{backend}:{name}", b"ok")
    assert bytes(shm.buf[:2]) == b"ok"


def test_pickled_handle_unpickled_after_unlink_in_child(ctx, backend):
    shm = mpshm.SharedMemory(create=True, size=64, backend=backend)
    data = pickle.dumps(shm)
    shm.close()
    shm.unlink()
    queue = ctx.Queue()
    proc = ctx.Process(target=_unpickle_expecting_error, args=(data, queue))
    proc.start()
    proc.join(JOIN)
    assert proc.exitcode == 0
    kind, message = queue.get(timeout=JOIN)
    assert kind == "FileNotFoundError" and shm.name in message


def _unpickle_expecting_error(data: bytes, queue) -> None:
    try:
        pickle.loads(data)
    except Exception as exc:  # reported to the parent
        queue.put((type(exc).__name__, str(exc)))
    else:
        queue.put(("no error", ""))
