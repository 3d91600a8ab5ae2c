"""Hostile input (issue 7): names, sizes, handles and ShareableList values.

Hypothesis throws each class of bad input at mpshm on every backend. Each
must get a clear exception (a ValueError, TypeError, FileNotFoundError, ...
whose message says what was wrong): never a crash (posix_ipc segfaulted on a
NUL or a lone surrogate in a name), a hang, a leaked segment, or damage to
an existing one: "canary" segments with known contents exist throughout,
and are checked after every example.
"""

from __future__ import annotations

import errno
import math
import operator
import os
import pickle
import struct
import sys
from typing import Any

import pytest
from helpers import BACKENDS
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from reliability import exists, pattern

import mpshm
from mpshm import _sysinfo, reduction, tracking
from mpshm.shared_memory import SharedMemory, _rebuild

pytestmark = pytest.mark.timeout(300)

SETTINGS = settings(
    max_examples=60, deadline=None, database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

#: Exceptions that are an answer (the message is checked too).
CLEAR = (ValueError, TypeError, FileNotFoundError, FileExistsError, PermissionError,
         IsADirectoryError, NotADirectoryError)


class Canaries:
    """One segment per backend with known contents, checked after each example."""

    def __init__(self) -> None:
        self.shms = [mpshm.SharedMemory(create=True, size=4096 + i, backend=backend)
                     for i, backend in enumerate(BACKENDS)]
        for shm in self.shms:
            shm.buf[:] = pattern(shm.name, shm.size)

    def check(self) -> None:
        for shm in self.shms:
            assert bytes(shm.buf) == pattern(shm.name, shm.size), f"{shm.name} changed"
            again = mpshm.SharedMemory(shm.name)
            assert again.size == shm.size and bytes(again.buf) == bytes(shm.buf)
            again.close()

    def destroy(self) -> None:
        for shm in self.shms:
            shm.close()
            shm.unlink()


@pytest.fixture
def canaries():
    made = Canaries()
    yield made
    made.check()
    made.destroy()


def assert_clear(exc: BaseException) -> None:
    """*exc* says what was wrong, in words of mpshm's (not a library's bare code)."""
    text = str(exc)
    assert len(text) > 12, repr(exc)
    for unclear in ("Invalid parameter(s)", "codec can't", "int too large to convert",
                    "can only concatenate"):
        assert unclear not in text, repr(exc)


# --------------------------------------------------------------------------
# Names

PIECES = st.sampled_from([
    "", "/", "//", ".", "..", "../", "/..", "\0", ":", "::", "posix:", "sysv:", "mmap:",
    "nosuch:", "http://", "file:///", "C:\\", "\ud800", "\udc80", "é", "€", "\n", " ", "\t",
    "0x", "0x0", "-0", "-1", "0", "4294967296", "-2147483649", "psm_", "~", "*", "%s", "$HOME",
])
NAMES = st.one_of(
    st.lists(st.one_of(PIECES, st.text(max_size=20)), max_size=6).map("".join),
    st.text(min_size=200, max_size=600),
    st.tuples(PIECES, st.integers(1, 300)).map(lambda p: p[0] * p[1]),
)


def _attach(name: str) -> None:
    try:
        shm = mpshm.SharedMemory(name)
    except CLEAR as exc:
        assert_clear(exc)
    except OSError as exc:  # a path the kernel refuses (too long, ...)
        assert exc.errno in (errno.ENAMETOOLONG, errno.ENODEV, errno.EINVAL), repr(exc)
        assert_clear(exc)
    else:  # a name that happens to exist: attaching changes nothing
        shm.close()


@SETTINGS
@given(name=NAMES)
def test_hostile_names_to_attach(canaries, name):
    _attach(name)
    for backend in BACKENDS:
        try:
            mpshm.SharedMemory(name, backend=backend)
        except CLEAR as exc:
            assert_clear(exc)
        except OSError as exc:
            assert exc.errno in (errno.ENAMETOOLONG, errno.EINVAL), repr(exc)
    canaries.check()


@SETTINGS
@given(scheme=st.sampled_from(["", "posix:", "sysv:", "mmap:", "mmap-dir"]), body=NAMES)
def test_hostile_names_to_create(canaries, tmp_path, scheme, body):
    """Creating under a hostile name either works (and the segment is then
    whole, attachable by that name and destroyed) or is refused, leaving
    nothing. mmap names are kept inside a temporary directory."""
    options: dict[str, Any] = {}
    if scheme == "mmap-dir":
        name = f"mmap:{tmp_path}/{body}"
    else:
        name = scheme + body
        if scheme == "mmap:" and body.startswith("/"):
            name = f"mmap:{tmp_path}{body}"
        if scheme == "mmap:":
            options["dir"] = str(tmp_path)
    before = set(tracking.tracked())
    try:
        shm = mpshm.SharedMemory(name, create=True, size=64, **options)
    except CLEAR as exc:
        assert_clear(exc)
    except OSError as exc:
        assert exc.errno in (errno.ENAMETOOLONG, errno.EINVAL), repr(exc)
    else:
        try:
            assert shm.name == name and bytes(shm.buf) == bytes(64)
            shm.buf[:4] = b"\x01\x02\x03\x04"
            other = mpshm.SharedMemory(name, **options)
            assert bytes(other.buf[:4]) == b"\x01\x02\x03\x04"
            other.close()
        finally:
            shm.close()
            shm.unlink()
        assert not exists(shm.name) or scheme.startswith("mmap")  # (bare mmap: by dir=)
    assert set(tracking.tracked()) == before
    canaries.check()


# --------------------------------------------------------------------------
# Sizes

SIZES = st.one_of(
    st.integers(-(2**70), -1), st.integers(0, 1 << 16),
    st.integers(2**47, 2**70),  # more than any storage here: refused at once
    st.sampled_from([0, -1, 2**63 - 1, 2**63, 2**64, 2**64 + 4096, True, False]),
    st.floats(), st.text(max_size=4), st.binary(max_size=4), st.none(),
    st.decimals(allow_nan=True), st.fractions(), st.complex_numbers(),
    st.lists(st.integers(0, 10), max_size=2),
)


def _as_size(size: Any) -> Any:
    try:
        return operator.index(size)
    except TypeError:
        return None


@SETTINGS
@given(size=SIZES, backend=st.sampled_from(BACKENDS))
def test_hostile_sizes(canaries, tmp_path, size, backend):
    options = {"dir": str(tmp_path)} if backend == "mmap" else {}
    value = _as_size(size)
    try:
        shm = mpshm.SharedMemory(create=True, size=size, backend=backend, **options)
    except TypeError as exc:
        assert value is None, repr(exc)
        assert "'size' must be an integer" in str(exc)
    except ValueError as exc:
        assert value is not None and (value <= 0 or value > sys.maxsize), repr(exc)
        assert_clear(exc)
    except OSError as exc:
        assert exc.errno == errno.ENOSPC and value is not None and value >= 2**47, repr(exc)
        assert "No space left" in str(exc) and "free" in str(exc)
    else:
        try:
            assert 0 < value <= 1 << 16 and shm.size == len(shm.buf) == value
            assert bytes(shm.buf) == bytes(value)
        finally:
            shm.close()
            shm.unlink()
    # Attaching ignores the size, as the standard library does, but checks it.
    name = canaries.shms[BACKENDS.index(backend)].name
    try:
        mpshm.SharedMemory(name, size=size).close()
    except (TypeError, ValueError) as exc:
        assert value is None or value < 0, repr(exc)
    canaries.check()


# --------------------------------------------------------------------------
# Handles


class _Forged:
    """Pickles as the handle of a SharedMemory with the given fields."""

    def __init__(self, *fields: Any) -> None:
        self.fields = fields

    def __reduce__(self) -> tuple[Any, ...]:
        return _rebuild, (SharedMemory, *self.fields)


@SETTINGS
@given(data=st.data())
def test_forged_shared_memory_handles(canaries, data):
    """Every field of a handle forged: backend, identifier (hostile names, a
    canary's, a gone segment's), size (the wrong segment's) and machine."""
    target = data.draw(st.sampled_from(canaries.shms))
    gone = mpshm.SharedMemory(create=True, size=64, backend=target.backend)
    gone.unlink()
    gone.close()
    _, (_, backend, ident, name, size, made_on) = target.__reduce__()
    backend = data.draw(st.one_of(st.just(backend), st.sampled_from(BACKENDS),
                                  st.sampled_from(["nosuch", "", 5, None])))
    ident = data.draw(st.one_of(st.just(ident), NAMES, st.sampled_from(
        [gone._ident, *(shm._ident for shm in canaries.shms), 5, None, b"psm_x"])))
    size = data.draw(st.one_of(st.just(size), st.integers(-5, 1 << 20), st.just(64),
                               st.sampled_from([None, "4096", 2**70])))
    made_on = data.draw(st.one_of(st.just(made_on), st.none(),
                                  st.sampled_from([("elsewhere", "x"), ("vm",), 5, "ab"])))
    blob = pickle.dumps(_Forged(backend, ident, name, size, made_on))
    try:
        shm = pickle.loads(blob)
    except CLEAR as exc:
        assert_clear(exc)
    else:  # forged into a true handle: the right segment, read-only use here
        try:
            assert shm.size == len(shm.buf) and bytes(shm.buf) == pattern(
                next(c.name for c in canaries.shms if c._ident == shm._ident), shm.size)
        finally:
            shm.close()
    canaries.check()


def test_truncated_handles(canaries):
    """Every prefix of every kind of handle: an exception, nothing else."""
    import numpy as np

    import mpshm.numpy as mnp

    arr = mnp.empty(1000, dtype=np.int32)
    arr[:] = np.arange(1000)
    sl = mpshm.ShareableList([1, "two", b"three"])
    try:
        blobs = [pickle.dumps(shm) for shm in canaries.shms]
        blobs += [pickle.dumps(arr[::3]), pickle.dumps(sl),
                  reduction.dumps(memoryview(bytearray(pattern("x", 1 << 16))), threshold=1024)]
        for blob in blobs:
            for cut in range(len(blob)):
                with pytest.raises(Exception):  # noqa: B017  (pickle's own, mostly)
                    reduction.loads(blob[:cut])
        # (the last blob's segment is given to its first full load: load it once)
        assert bytes(reduction.loads(blobs[-1])) == pattern("x", 1 << 16)
    finally:
        sl.shm.close()
        sl.shm.unlink()
        mnp.release(arr)
    canaries.check()


@SETTINGS
@given(offset=st.integers(-(2**65), 2**65) | st.integers(-16, 5000),
       shape=st.lists(st.integers(-3, 3000), max_size=3),
       strides=st.lists(st.integers(-(2**40), 2**40) | st.integers(-16, 16), max_size=3),
       dtype=st.sampled_from(["u1", "i4", "f8", "V16", "O", "U3"]),
       writable=st.booleans())
def test_forged_array_handles(canaries, offset, shape, strides, dtype, writable):
    """An array handle pointing anywhere in (or out of) a segment: NumPy's
    bounds checks refuse what does not lie inside it."""
    import numpy as np

    import mpshm.numpy

    shm = canaries.shms[0]
    handle = mpshm.numpy._ArrayHandle(
        shm.backend, shm._ident, shm.name, shm.size, reduction.machine(), offset,
        tuple(shape), tuple(strides), np.dtype(dtype), writable)
    try:
        arr = mpshm.numpy.rebuild_array(handle)
    except (ValueError, TypeError) as exc:
        assert str(exc)
    else:
        low, high = np.byte_bounds(arr) if hasattr(np, "byte_bounds") else (
            np.lib.array_utils.byte_bounds(arr))
        base = _sysinfo.buffer_address(reduction.attach_owner(
            shm.backend, shm._ident, shm.name, shm.size, None))
        assert base <= low <= high <= base + shm.size
        del arr
    canaries.check()


@SETTINGS
@given(offset=st.integers(-(2**64), 2**64) | st.integers(-8, 5000),
       nbytes=st.integers(-(2**64), 2**64) | st.integers(-8, 5000),
       size=st.integers(-8, 5000) | st.just(None), kind=st.sampled_from(["ref", "loan"]))
def test_forged_out_of_band_descriptors(canaries, offset, nbytes, size, kind):
    """The sharing pickler's descriptors with forged bounds: refused unless
    they lie inside the segment (slicing would clamp them silently)."""
    shm = canaries.shms[1]
    blob = reduction.dumps(shm.buf[:2048], threshold=1024)  # by reference
    main, [descriptor], about, _ = reduction.split_message(blob)
    assert descriptor.kind == "ref"
    forged = descriptor._replace(offset=offset, nbytes=nbytes, kind=kind,
                                 size=descriptor.size if size is None else size)
    try:
        view = reduction.loads(reduction.envelope(bytes(main), [forged], about))
    except CLEAR as exc:
        assert_clear(exc)
    else:
        assert forged.size == shm.size and 0 <= offset <= offset + nbytes <= shm.size
        assert bytes(view) == pattern(shm.name, shm.size)[offset:offset + nbytes]
        del view
    canaries.check()


# --------------------------------------------------------------------------
# ShareableList values

VALUES = st.one_of(
    st.integers(-(2**80), 2**80), st.integers(-(2**63), 2**63 - 1), st.floats(),
    st.text(max_size=30), st.sampled_from(["\ud800", "a\udc80", "\0", "é" * 9, "\0\0"]),
    st.binary(max_size=40), st.none(), st.booleans(),
    st.lists(st.integers(), max_size=2), st.dictionaries(st.text(max_size=2), st.none()),
    st.complex_numbers(), st.decimals(allow_nan=False), st.fractions(), st.just(object()),
    st.sampled_from([int, 2.5j, bytearray(b"x"), memoryview(b"y")]),
)


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a):
        return math.isnan(b)
    return type(a) is type(b) and a == b


def _storable(value: Any) -> bool:
    """Whether a ShareableList must accept *value*."""
    if type(value) is int:
        return -(2**63) <= value < 2**63
    if type(value) is str:
        try:
            value.encode()
        except UnicodeEncodeError:
            return False
        return True
    return type(value) in (float, bool, bytes, type(None))


@SETTINGS
@given(values=st.lists(VALUES, max_size=8), backend=st.sampled_from(BACKENDS))
def test_hostile_shareable_list_values(canaries, values, backend):
    before = set(tracking.tracked())
    try:
        sl = mpshm.ShareableList(values, backend=backend)
    except (TypeError, ValueError, OverflowError, struct.error) as exc:
        assert not all(_storable(v) for v in values), repr(exc)
        if not isinstance(exc, UnicodeEncodeError):  # (which names the character)
            assert_clear(exc)
    else:
        try:
            assert all(_same(a, b) for a, b in zip(values, sl)) and len(sl) == len(values)
        finally:
            sl.shm.close()
            sl.shm.unlink()
    assert set(tracking.tracked()) == before  # a refused list leaves no segment
    canaries.check()


@pytest.fixture
def a_list(backend):
    original = ["abcdefgh" * 4, 12, 3.5, b"bytes" * 5, None, True, ""]
    sl = mpshm.ShareableList(original, backend=backend)
    yield sl, original
    assert all(_same(a, b) for a, b in zip(original, sl))
    sl.shm.close()
    sl.shm.unlink()


@SETTINGS
@given(position=st.integers(-10, 10) | st.sampled_from([2**70, "1", None, 1.0]), value=VALUES)
def test_hostile_shareable_list_assignments(a_list, canaries, position, value):
    """A refused assignment changes no byte of the list; an accepted one
    changes that item only."""
    sl, original = a_list
    snapshot = bytes(sl.shm.buf)
    try:
        sl[position] = value
    except (IndexError, TypeError, ValueError, OverflowError, struct.error) as exc:
        assert bytes(sl.shm.buf) == snapshot, f"{exc!r} left the list changed"
        assert str(exc)
    else:
        index = operator.index(position) % len(original)
        assert _same(sl[index], value)
        for other, expected in enumerate(original):
            if other != index:
                assert _same(sl[other], expected)
        sl[index] = original[index]
    canaries.check()


@SETTINGS
@given(contents=st.binary(min_size=16, max_size=400))
def test_shareable_list_over_garbage(canaries, contents):
    """A segment that holds no list: reading it as one raises, never crashes."""
    shm = mpshm.SharedMemory(create=True, size=len(contents))
    try:
        shm.buf[:] = contents
        try:
            sl = mpshm.ShareableList(name=shm.name)
            try:
                list(sl)
                sl.format  # noqa: B018
                repr(sl)
            finally:
                sl.shm.close()
        except (ValueError, struct.error, IndexError, TypeError, OverflowError, KeyError):
            pass
        assert bytes(shm.buf) == contents
    finally:
        shm.close()
        shm.unlink()
    canaries.check()


def test_posix_names_that_crashed_posix_ipc(canaries):
    """posix_ipc dies of SIGSEGV on a NUL or a lone surrogate, and leaks the
    object of a name it cannot decode: mpshm refuses them, by name and in
    handles, before posix_ipc sees them."""
    for bad in ["a\0b", "\ud800", "x\udc80", "/a\0"]:
        for create in (False, True):
            with pytest.raises(ValueError, match="invalid POSIX shared memory name"):
                mpshm.SharedMemory(bad, create=create, size=8, backend="posix")
        with pytest.raises(ValueError, match="invalid POSIX shared memory name"):
            pickle.loads(pickle.dumps(_Forged("posix", bad, bad, 8, None)))
    assert not any(os.fsencode(entry).endswith(b"\x80") for entry in os.listdir("/dev/shm"))
    canaries.check()
