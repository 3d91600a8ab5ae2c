"""POSIX segments are the standard library's: each opens the other's by name."""

from __future__ import annotations

import pickle
import sys
from multiprocessing import resource_tracker, shared_memory

import pytest
from helpers import exists, unique

import mpshm


def _stdlib_attach(name: str) -> shared_memory.SharedMemory:
    """Attach with the stdlib without letting its resource tracker adopt it."""
    if sys.version_info >= (3, 13):
        return shared_memory.SharedMemory(name, track=False)
    shm = shared_memory.SharedMemory(name)
    resource_tracker.unregister(shm._name, "shared_memory")  # gh-82300
    return shm


def test_stdlib_opens_mpshm_segment(make_segment):
    ours = make_segment(size=10_000, backend="posix")
    ours.buf[:5] = b"mpshm"
    theirs = _stdlib_attach(ours.name)
    try:
        assert theirs.name == ours.name
        assert bytes(theirs.buf[:5]) == b"mpshm"
        assert theirs.size == ours.size
        theirs.buf[5:8] = b"std"
        assert bytes(ours.buf[5:8]) == b"std"
    finally:
        theirs.close()


def test_mpshm_opens_stdlib_segment():
    theirs = shared_memory.SharedMemory(create=True, size=5000)
    try:
        theirs.buf[:3] = b"std"
        ours = mpshm.SharedMemory(theirs.name)
        assert ours.name == theirs.name and ours.backend == "posix"
        assert bytes(ours.buf[:3]) == b"std"
        ours.buf[3] = 33
        assert theirs.buf[3] == 33
        ours.close()
        assert exists(theirs.name)  # attaching never destroys
    finally:
        theirs.close()
        theirs.unlink()


def test_user_names_are_shared_with_stdlib(make_segment):
    name = unique("frames")
    ours = make_segment(name, size=100, backend="posix")
    theirs = _stdlib_attach(name)
    try:
        assert theirs.name == ours.name == name
    finally:
        theirs.close()
    with pytest.raises(FileExistsError):
        shared_memory.SharedMemory(name, create=True, size=100)


def test_stdlib_pickle_of_a_stdlib_segment_is_not_ours():
    """A stdlib handle unpickles as a stdlib object; ours as ours."""
    theirs = shared_memory.SharedMemory(create=True, size=64)
    try:
        ours = mpshm.SharedMemory(theirs.name)
        clone = pickle.loads(pickle.dumps(ours))
        assert type(clone) is mpshm.SharedMemory and clone.name == theirs.name
        clone.close()
        ours.close()
    finally:
        theirs.close()
        theirs.unlink()
