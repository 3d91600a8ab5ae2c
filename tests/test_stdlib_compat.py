"""What CPython's own tests of ``multiprocessing.shared_memory`` assert, run on mpshm.

Mirrors ``test_shared_memory_SharedMemoryManager_basics`` (a manager used
before ``start()`` raises ValueError), ``test_shared_memory_ShareableList_pickling``
and ``test_shared_memory_pickle_unpickle`` (a pickle's length does not depend
on the segment's size, under every protocol; the unpickled object shares the
memory) and their ``_dead_object`` variants (FileNotFoundError), on every
backend. Also: handles stay validated when their size field is damaged.
"""

from __future__ import annotations

import pickle
from multiprocessing import ProcessError
from typing import Any, Callable

import pytest
from helpers import BACKENDS, unique

import mpshm
from mpshm import ShareableList, SharedMemoryManager, reduction
from mpshm.shared_memory import SharedMemory, _rebuild

pytestmark = pytest.mark.timeout(120)

PROTOCOLS = range(pickle.HIGHEST_PROTOCOL + 1)


# --------------------------------------------------------------------------
# SharedMemoryManager used when it is not running


UNSTARTED_CALLS: dict[str, Callable[[SharedMemoryManager], Any]] = {
    "SharedMemory(9)": lambda smm: smm.SharedMemory(9),
    "SharedMemory(size=9)": lambda smm: smm.SharedMemory(size=9),
    "ShareableList(range(5))": lambda smm: smm.ShareableList(range(5)),
    "ShareableList('howdy')": lambda smm: smm.ShareableList("howdy"),
    "ShareableList(None)": lambda smm: smm.ShareableList(None),
    "segments()": lambda smm: smm.segments(),
    "release(name)": lambda smm: smm.release(unique("psm")),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("call", list(UNSTARTED_CALLS))
def test_manager_before_start_raises_value_error(backend: str, call: str) -> None:
    """As the standard library's (CPython asserts ValueError), still a
    ProcessError (mpshm's earlier type), with a message saying what to do."""
    smm = SharedMemoryManager(backend=backend)
    with pytest.raises(ValueError, match=r"call start\(\)") as info:
        UNSTARTED_CALLS[call](smm)
    assert isinstance(info.value, ProcessError)
    assert type(info.value).__name__ == "ManagerNotRunningError"


@pytest.mark.parametrize("call", ["SharedMemory(9)", "ShareableList(range(5))", "segments()"])
def test_manager_after_shutdown_raises_value_error(call: str) -> None:
    with SharedMemoryManager() as smm:
        smm.SharedMemory(16)
    with pytest.raises(ValueError, match="not running") as info:
        UNSTARTED_CALLS[call](smm)
    assert isinstance(info.value, ProcessError)


@pytest.mark.parametrize("backend", BACKENDS)
def test_cpython_shared_memory_manager_basics(backend: str) -> None:
    """CPython's test_shared_memory_SharedMemoryManager_basics, with mpshm's classes."""
    smm1 = SharedMemoryManager(backend=backend)
    with pytest.raises(ValueError):
        smm1.SharedMemory(size=9)  # fails if the server was not started
    smm1.start()
    try:
        lol = [smm1.ShareableList(range(i)) for i in range(5, 10)]
        lom = [smm1.SharedMemory(size=j) for j in range(32, 128, 16)]
        doppleganger_list0 = ShareableList(name=lol[0].shm.name)
        assert len(doppleganger_list0) == 5
        doppleganger_shm0 = SharedMemory(name=lom[0].name)
        assert len(doppleganger_shm0.buf) >= 32
        doppleganger_list0.shm.close()
        doppleganger_shm0.close()
        held_name = lom[0].name
    finally:
        smm1.shutdown()
    with pytest.raises(FileNotFoundError):
        SharedMemory(name=held_name)

    with SharedMemoryManager(backend=backend) as smm2:
        sl = smm2.ShareableList("howdy")
        smm2.SharedMemory(size=128)
        held_name = sl.shm.name
    with pytest.raises(FileNotFoundError):
        ShareableList(name=held_name)


# --------------------------------------------------------------------------
# Pickles: a handle's length does not depend on the segment's size


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("proto", PROTOCOLS)
def test_shareable_list_pickle_length_independent_of_size(backend: str, proto: int) -> None:
    """CPython's test_shared_memory_ShareableList_pickling, on every backend."""
    sl = ShareableList(range(10), backend=backend)
    larger_sl = ShareableList(range(400), backend=backend)
    try:
        serialized_sl = pickle.dumps(sl, protocol=proto)
        deserialized_sl = pickle.loads(serialized_sl)
        try:
            assert isinstance(deserialized_sl, ShareableList)
            assert deserialized_sl[-1] == 9
            assert sl is not deserialized_sl
            deserialized_sl[4] = "changed"
            assert sl[4] == "changed"
            sl[3] = "newvalue"
            assert deserialized_sl[3] == "newvalue"
        finally:
            deserialized_sl.shm.close()
        serialized_larger_sl = pickle.dumps(larger_sl, protocol=proto)
        assert len(serialized_sl) == len(serialized_larger_sl)
    finally:
        for each in (sl, larger_sl):
            each.shm.close()
            each.shm.unlink()


# Sizes on each side of the pickle opcodes' boundaries (one, two, four bytes).
SIZES = [1, 255, 256, 512, 65_535, 65_536, 1 << 20, (1 << 20) + 1]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("proto", PROTOCOLS)
def test_shared_memory_pickle_length_independent_of_size(
    make_segment: Callable[..., SharedMemory], backend: str, proto: int,
) -> None:
    lengths = set()
    for size in SIZES:
        shm = make_segment(size=size, backend=backend)
        blob = pickle.dumps(shm, protocol=proto)
        lengths.add(len(blob))
        again = pickle.loads(blob)
        assert (again.name, again.size) == (shm.name, size)
        again.close()
    assert len(lengths) == 1, lengths


@pytest.mark.parametrize("backend", ["posix", "sysv"])
@pytest.mark.parametrize("proto", PROTOCOLS)
def test_named_segment_pickle_length_independent_of_size(
    make_segment: Callable[..., SharedMemory], backend: str, proto: int,
) -> None:
    """A name of the user's own: names of one length, sizes far apart, one length."""
    small = make_segment(unique("n"), size=7, backend=backend)
    large = make_segment(unique("n"), size=300_000, backend=backend)
    assert len(small.name) == len(large.name)
    assert len(pickle.dumps(small, protocol=proto)) == len(pickle.dumps(large, protocol=proto))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("proto", PROTOCOLS)
def test_cpython_shared_memory_pickle_unpickle(
    make_segment: Callable[..., SharedMemory], backend: str, proto: int,
) -> None:
    """CPython's test_shared_memory_pickle_unpickle, on every backend."""
    sms = make_segment(size=512, backend=backend)
    sms.buf[0:6] = b"pickle"
    sms2 = pickle.loads(pickle.dumps(sms, protocol=proto))
    try:
        assert isinstance(sms2, SharedMemory)
        assert sms.name == sms2.name
        assert bytes(sms.buf[0:6]) == bytes(sms2.buf[0:6]) == b"pickle"
        sms.buf[0:6] = b"newval"
        assert bytes(sms2.buf[0:6]) == b"newval"
        sms2.buf[0:6] = b"oldval"
        assert bytes(sms.buf[0:6]) == b"oldval"
    finally:
        sms2.close()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("proto", PROTOCOLS)
def test_cpython_pickle_unpickle_dead_object(backend: str, proto: int) -> None:
    """CPython's test_shared_memory_pickle_unpickle_dead_object and
    test_shared_memory_ShareableList_pickling_dead_object."""
    sms = mpshm.SharedMemory(create=True, size=512, backend=backend)
    pickled_sms = pickle.dumps(sms, protocol=proto)
    sms.close()
    sms.unlink()
    with pytest.raises(FileNotFoundError):
        pickle.loads(pickled_sms)

    sl = ShareableList(range(10), backend=backend)
    serialized_sl = pickle.dumps(sl, protocol=proto)
    sl.shm.close()
    sl.shm.unlink()
    with pytest.raises(FileNotFoundError):
        pickle.loads(serialized_sl)


# --------------------------------------------------------------------------
# The size field of a handle is still checked


class _Handle:
    """Pickles as a SharedMemory handle whose size field is *size*."""

    def __init__(self, shm: SharedMemory, size: Any) -> None:
        self.fields = (shm.backend, shm._ident, shm.name, size, reduction.machine())

    def __reduce__(self) -> tuple[Any, ...]:
        return _rebuild, (SharedMemory, *self.fields)


@pytest.mark.parametrize("size", [
    "4096", "0x0000000000001000", " 000000000001000", "000000000000_100", "00000000000010000",
    "000000000000100G", "000000000000100A", 4096.0, None, b"0000000000001000", True,
])
def test_damaged_size_field_is_refused(make_segment: Callable[..., SharedMemory],
                                       size: Any) -> None:
    shm = make_segment(size=4096)
    with pytest.raises(reduction.HandleError):
        pickle.loads(pickle.dumps(_Handle(shm, size)))


@pytest.mark.parametrize("size", ["0000000000002000", 8192, "0000000000000fff"])
def test_size_field_of_another_segment_is_refused(make_segment: Callable[..., SharedMemory],
                                                  size: Any) -> None:
    """A well-formed size that is not the segment's: the name was reused."""
    shm = make_segment(size=4096)
    with pytest.raises(ValueError, match="pickled handle says"):
        pickle.loads(pickle.dumps(_Handle(shm, size)))


@pytest.mark.parametrize("size", ["0000000000001000", 4096])
def test_size_field_as_written_and_as_int_loads(make_segment: Callable[..., SharedMemory],
                                                size: Any) -> None:
    """The fixed-width form, and the int of handles pickled by earlier versions."""
    shm = make_segment(size=4096)
    shm.buf[:2] = b"ok"
    again = pickle.loads(pickle.dumps(_Handle(shm, size)))
    try:
        assert (again.name, again.size, bytes(again.buf[:2])) == (shm.name, 4096, b"ok")
    finally:
        again.close()
