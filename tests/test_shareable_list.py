"""Tests for ``mpshm.ShareableList``.

What a user relies on: the standard library's ``ShareableList`` behaviour on
every backend (mirroring CPython's own tests), pickling as a handle to the
same segment (also into child processes under every start method), the
standard library's bugs fixed (trailing NULs, multi-byte UTF-8, unsupported
types, huge items), property-based round trips, and the byte layout shared
with :mod:`multiprocessing.shared_memory` on POSIX, in both directions.

Every list made here is closed and unlinked in a ``finally`` block; lists
made by the standard library are unlinked through it, and its attachments to
our segments are unregistered from its resource tracker.
"""

from __future__ import annotations

import contextlib
import math
import os
import pickle
import struct
import time
import types
from multiprocessing import resource_tracker, shared_memory
from queue import Empty
from typing import Any, Iterator, Optional

import pytest
from helpers import child_list_read, unique
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import mpshm
from mpshm import ShareableList, tracking

# --------------------------------------------------------------------------
# Helpers


@contextlib.contextmanager
def owned(sl: Any) -> Iterator[Any]:
    """Use a list just created (by either library); close and unlink it afterwards."""
    try:
        yield sl
    finally:
        sl.shm.close()
        sl.shm.unlink()


def shareable(sequence: Any = None, **kwargs: Any) -> Any:
    """Create an mpshm list; close and unlink its segment afterwards."""
    return owned(ShareableList(sequence, **kwargs))


@contextlib.contextmanager
def attached(name: str, **kwargs: Any) -> Iterator[ShareableList]:
    """Attach an mpshm list by name; close (not unlink) afterwards."""
    sl = ShareableList(name=name, **kwargs)
    try:
        yield sl
    finally:
        sl.shm.close()


def stdlib_list(sequence: Any) -> Any:
    """Create a list with the standard library; close and unlink it afterwards."""
    return owned(shared_memory.ShareableList(sequence))


@contextlib.contextmanager
def stdlib_attached(name: str) -> Iterator[shared_memory.ShareableList]:
    """Attach the standard library to a segment mpshm owns; close afterwards.

    The standard library registers a segment it merely attaches to with its
    resource tracker, which would destroy it (and warn) when this process
    ends: on 3.8-3.12 always, on 3.13+ too, since ``ShareableList`` passes no
    ``track=`` and ``SharedMemory`` defaults to ``track=True``. Undo that.
    """
    sl = shared_memory.ShareableList(name=name)
    try:
        if getattr(sl.shm, "_track", True):
            resource_tracker.unregister(sl.shm._name, "shared_memory")  # type: ignore[attr-defined]
        yield sl
    finally:
        sl.shm.close()


def key(value: Any) -> tuple[str, Any]:
    """A comparable form of *value* that tells types apart (True from 1, 1.0
    from 1), -0.0 from 0.0, and makes any NaN equal to any NaN."""
    if isinstance(value, float):
        return ("float", "nan" if math.isnan(value) else struct.pack("<d", value))
    return (type(value).__name__, value)


def keys(values: Any) -> list[tuple[str, Any]]:
    return [key(v) for v in values]


def slot_size(value: Any) -> int:
    """Bytes the layout reserves for *value* (the standard library's rule,
    counted in encoded bytes rather than characters)."""
    if isinstance(value, str):
        value = value.encode("utf8")
    if isinstance(value, bytes):
        return 8 * (len(value) // 8 + 1)
    return 8


def fits(value: Any, slot: int) -> bool:
    """Whether assigning *value* to a slot of *slot* bytes must succeed."""
    if isinstance(value, str):
        value = value.encode("utf8")
    if isinstance(value, bytes):
        return len(value) < slot or (len(value) == slot and not value.endswith(b"\x00"))
    return True


BASICS = ["howdy", b"HoWdY", -273.154, 100, None, True, 42]

EXACT_VALUES = [
    b"ab\x00\x00",
    "x\x00",
    "\x00",
    b"\x00" * 8,
    "\x00abc\x00\x00",
    "€€€€",
    "日本語テキスト",
    "🐍🎉👍🏽",
    "a\x00€\x00",
    "",
    b"",
    "1234567",
    "12345678",
    "123456789",
    "1234567\x00",
    b"123456789012345",
    b"1234567890123456",
    b"123456789012345\x00",
    "é" * 8,
]


# --------------------------------------------------------------------------
# 1. Basic behaviour, mirroring CPython's test_shared_memory_ShareableList_*


def test_basics(backend: str) -> None:
    with shareable(BASICS, backend=backend) as sl:
        assert sl.shm.backend == backend
        assert len(sl) == 7
        assert list(sl) == BASICS
        assert tuple(sl) == tuple(BASICS)
        assert keys(sl) == keys(BASICS)
        assert sl[0] == "howdy"
        assert sl[1] == b"HoWdY"
        assert sl[2] == -273.154
        assert sl[-1] == 42
        assert sl[-2] is True
        assert sl[-3] is None
        assert sl[-7] == "howdy"

        assert sl.shm.name in repr(sl)
        assert str(list(sl)) in str(sl)
        assert repr(sl).startswith("ShareableList(")

        # Non-string items use exactly the standard library's formats.
        assert sl.format.endswith("dqxxxxxx?xxxxxxxx?q")
        assert sl.format == "".join(sl._get_packing_format(i) for i in range(7))

        with pytest.raises(ValueError):
            sl.index("100")
        with pytest.raises(ValueError):
            sl.index(100.1)
        assert sl.index(100) == 3
        assert sl.index("howdy") == 0
        assert sl.index(b"HoWdY") == 1
        assert sl.index(None) == 4
        assert sl.index(42) == 6

        assert sl.count(42) == 1
        assert sl.count(b"HoWdY") == 1
        assert sl.count(b"adios") == 0
        assert sl.count(None) == 1


def test_index_errors(backend: str) -> None:
    with shareable(BASICS, backend=backend) as sl:
        for position in (7, 8, 100, -8, -100):
            with pytest.raises(IndexError, match=r"^index out of range$"):
                sl[position]
            with pytest.raises(IndexError, match=r"^assignment index out of range$"):
                sl[position] = 2
        assert list(sl) == BASICS
        with pytest.raises(TypeError):
            sl["0"]  # type: ignore[index]


def test_assignments_like_cpython(backend: str) -> None:
    with shareable(BASICS, backend=backend) as sl:
        current_format = sl._get_packing_format(0)
        sl[0] = "howdy"
        assert sl._get_packing_format(0) == current_format
        assert sl[0] == "howdy"

        sl[3] = 42
        assert sl[3] == 42
        assert sl.count(42) == 2
        sl[4] = "some"  # change of type at a given position
        assert sl[4] == "some"
        assert sl[5] is True  # no spillage
        with pytest.raises(ValueError, match="exceeds available storage"):
            sl[4] = "far too many"
        assert sl[4] == "some"

        sl[0] = "encodés"  # exactly 8 bytes of UTF-8 data
        assert sl[0] == "encodés"
        assert sl[1] == b"HoWdY"  # no spillage
        with pytest.raises(ValueError, match="exceeds available storage"):
            sl[0] = "encodées"  # exactly 9 bytes of UTF-8 data
        assert sl[0] == "encodés"
        assert sl[1] == b"HoWdY"
        with pytest.raises(ValueError, match="exceeds available storage"):
            sl[1] = b"123456789"
        assert sl[1] == b"HoWdY"
        assert list(sl) == ["encodés", b"HoWdY", -273.154, 42, "some", True, 42]


def test_type_changes_in_one_slot(backend: str) -> None:
    with shareable([7, "end"], backend=backend) as sl:
        steps: list[tuple[Any, Optional[str]]] = [
            ("str", None),
            (None, "xxxxxx?x"),
            (2.5, "d"),
            (False, "xxxxxxx?"),
            (b"bytes", None),
            (-(2**63), "q"),
            ("12345678", None),  # fills the 8-byte slot exactly
            (2**63 - 1, "q"),
            (True, "xxxxxxx?"),
            (None, "xxxxxx?x"),
            ("", None),
            (float("inf"), "d"),
        ]
        for value, fmt in steps:
            sl[0] = value
            assert key(sl[0]) == key(value)
            assert sl[1] == "end"
            if fmt is not None:
                assert sl._get_packing_format(0) == fmt
        nan = float("nan")
        sl[0] = nan
        assert math.isnan(sl[0])
        with attached(sl.shm.name) as other:
            assert math.isnan(other[0])
            other[0] = "from oth"
            assert sl[0] == "from oth"


def test_copy_and_attach(backend: str) -> None:
    with shareable(BASICS, backend=backend) as sl:
        name = unique("slcopy")
        with shareable(sl, name=name, backend=backend) as copy:
            assert copy.shm.name == name
            assert copy.shm.name != sl.shm.name
            assert list(copy) == list(sl)
            assert copy.format == sl.format
            copy[-1] = 77
            assert copy[-1] == 77
            assert sl[-1] == 42
            with attached(name, backend=backend) as again:
                assert list(again) == list(copy)
            with pytest.raises(FileExistsError):
                ShareableList([1], name=name, backend=backend)
            assert list(copy) == [*BASICS[:-1], 77]

        # A second handle on the same list, by its self-describing name.
        with attached(sl.shm.name) as tethered:
            assert tethered.shm.name == sl.shm.name
            assert tethered.shm.backend == backend
            assert list(tethered) == BASICS
            tethered[-1] = 880
            assert sl[-1] == 880
            sl[0] = "hi"
            assert tethered[0] == "hi"
            tethered[2] = None
            assert sl[2] is None


def test_backend_options(tmp_path: Any) -> None:
    with shareable([1, "two"], backend="mmap", dir=tmp_path) as sl:
        assert sl.shm.name.startswith("mmap:")
        path = sl.shm.name[len("mmap:") :]
        assert os.path.dirname(path) == str(tmp_path)
        assert os.path.isfile(path)
        with attached(sl.shm.name) as other:
            assert list(other) == [1, "two"]
        name = unique("opt")
        with shareable([3.5], name=name, backend="mmap", dir=tmp_path) as named:
            assert (tmp_path / name).exists()
            with attached(name, backend="mmap", dir=tmp_path) as other:
                assert list(other) == [3.5]
            assert named[0] == 3.5
    assert os.listdir(tmp_path) == []
    with pytest.raises(TypeError):
        ShareableList([1], backend="posix", dir=tmp_path)


def test_attach_absent_name(backend: str) -> None:
    with pytest.raises(FileNotFoundError):
        ShareableList(name=unique("absent"), backend=backend)


def test_attach_to_a_segment_that_is_not_a_list(backend: str, make_shm: Any) -> None:
    shm = make_shm(size=64)
    struct.pack_into("q", shm.buf, 0, 2**40)
    with pytest.raises(ValueError):
        ShareableList(name=shm.name)


def test_empty_list(backend: str) -> None:
    with shareable(backend=backend) as empty:
        assert len(empty) == 0
        assert list(empty) == []
        assert empty.format == ""
        assert empty.count("any") == 0
        with pytest.raises(ValueError):
            empty.index(None)
        with pytest.raises(IndexError):
            empty[0]
        with pytest.raises(IndexError):
            empty[-1] = 1
        with attached(empty.shm.name) as again:
            assert len(again) == 0
        clone = pickle.loads(pickle.dumps(empty))
        assert list(clone) == []
        clone.shm.close()
    with shareable([], backend=backend) as empty:
        assert len(empty) == 0


def test_any_iterable(backend: str) -> None:
    with shareable((x * x for x in range(5)), backend=backend) as sl:
        assert list(sl) == [0, 1, 4, 9, 16]
    with shareable(range(3), backend=backend) as sl:
        assert list(sl) == [0, 1, 2]
    with shareable("abc", backend=backend) as sl:
        assert list(sl) == ["a", "b", "c"]


def test_generic_alias(backend: str) -> None:
    alias = ShareableList[int]
    assert isinstance(alias, types.GenericAlias)
    assert alias.__origin__ is ShareableList
    assert alias.__args__ == (int,)
    sl = alias([1, 2, 3], backend=backend)
    try:
        assert isinstance(sl, ShareableList)
        assert list(sl) == [1, 2, 3]
    finally:
        sl.shm.close()
        sl.shm.unlink()


def test_default_backend_is_posix_and_name_is_bare() -> None:
    with shareable([1]) as sl:
        assert sl.shm.backend == mpshm.get_default_backend()
        if sl.shm.backend == "posix":
            assert ":" not in sl.shm.name


@pytest.mark.parametrize(
    "values",
    [
        [1, 2.5, True, None],
        [-(2**63), 2**63 - 1, 0, -1],
        [0.0, -0.0, 1e308, -1e-308, float("inf"), float("-inf")],
        [False, True, None, None, False],
    ],
)
def test_same_bytes_as_stdlib(backend: str, values: list[Any]) -> None:
    """Without strings the whole segment is byte-for-byte the stdlib's."""
    with shareable(values, backend=backend) as ours, stdlib_list(values) as theirs:
        assert ours.shm.size == theirs.shm.size
        assert bytes(ours.shm.buf) == bytes(theirs.shm.buf[: theirs.shm.size])
        assert ours.format == theirs.format


def test_same_offsets_as_stdlib_for_ascii(backend: str) -> None:
    values = ["", "a", "1234567", "12345678", b"x" * 17, 5, None]
    with shareable(values, backend=backend) as ours, stdlib_list(values) as theirs:
        assert ours.shm.size == theirs.shm.size
        header = 8 * (len(values) + 2)
        assert bytes(ours.shm.buf[:header]) == bytes(theirs.shm.buf[:header])


# --------------------------------------------------------------------------
# 2. Pickling


@pytest.mark.parametrize("protocol", range(pickle.HIGHEST_PROTOCOL + 1))
def test_pickling(backend: str, protocol: int) -> None:
    with shareable(range(10), backend=backend) as sl:
        clone = pickle.loads(pickle.dumps(sl, protocol=protocol))
        try:
            assert isinstance(clone, ShareableList)
            assert clone is not sl
            assert clone.shm.name == sl.shm.name
            assert clone.shm.backend == backend
            assert clone[-1] == 9
            assert list(clone) == list(range(10))
            clone[4] = "changed"
            assert sl[4] == "changed"
            sl[3] = "newvalue"
            assert clone[3] == "newvalue"
            assert clone.format == sl.format
        finally:
            clone.shm.close()
        assert sl[4] == "changed"  # closing the clone leaves the segment alone


def test_pickle_is_a_handle(backend: str) -> None:
    many = ["x" * 1000] * 50
    with shareable(range(10), backend=backend) as small, shareable(many, backend=backend) as large:
        assert large.shm.size > 50_000
        assert len(pickle.dumps(large)) < 1000
        assert abs(len(pickle.dumps(large)) - len(pickle.dumps(small))) < 16


def answer(proc: Any, queue: Any, timeout: float) -> Any:
    """What *proc* puts on *queue*; fails early if it dies without answering."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            return queue.get(timeout=0.2)
        except Empty:
            if not proc.is_alive():
                try:
                    return queue.get(timeout=2)
                except Empty:
                    pytest.fail(f"child exited with code {proc.exitcode} without answering")
    pytest.fail(f"no answer from the child within {timeout} s")


def test_child_process(backend: str, ctx: Any) -> None:
    values = ["first", 2, b"ab\x00\x00", None, -4.5, True, "€€€€", "x\x00"]
    with shareable(values, backend=backend) as sl:
        queue = ctx.Queue()
        proc = ctx.Process(target=child_list_read, args=(sl, queue))
        proc.start()
        try:
            seen = answer(proc, queue, timeout=60)
        finally:
            proc.join(timeout=60)
            if proc.is_alive():
                proc.kill()
                proc.join(timeout=10)
            queue.close()
            queue.join_thread()
        assert proc.exitcode == 0
        assert keys(seen) == keys(values)
        assert sl[0] == "changed"
        assert keys(list(sl)[1:]) == keys(values[1:])


# --------------------------------------------------------------------------
# 3. The standard library's bugs, fixed


@pytest.mark.parametrize("value", EXACT_VALUES, ids=repr)
def test_exact_round_trip(backend: str, value: Any) -> None:
    with shareable([value, 1, value], backend=backend) as sl:
        assert key(sl[0]) == key(value)
        assert key(sl[2]) == key(value)
        assert sl[1] == 1
        with attached(sl.shm.name) as other:
            assert key(other[0]) == key(value)
        clone = pickle.loads(pickle.dumps(sl))
        try:
            assert key(clone[2]) == key(value)
        finally:
            clone.shm.close()
        assert sl.count(value) == 2
        assert sl.index(value) == 0


@pytest.mark.parametrize("length", [0, 1, 7, 8, 9, 15, 16, 17])
@pytest.mark.parametrize("kind", [bytes, str])
def test_lengths_around_the_alignment(backend: str, length: int, kind: type) -> None:
    raw = bytes(range(65, 65 + length))
    nul = b"Q" * (length - 1) + b"\x00" if length else b""
    values = [raw, nul]
    if kind is str:
        values = [v.decode("ascii") for v in values]
    with shareable([*values, "after"], backend=backend) as sl:
        assert keys(sl) == keys([*values, "after"])


@pytest.mark.parametrize("kind", [bytes, str])
def test_assignment_within_slot(backend: str, kind: type) -> None:
    def conv(b: bytes) -> Any:
        return b if kind is bytes else b.decode("ascii")

    # Slots: a 7-byte value gets 8 bytes, an 8-byte value 16, a 15-byte one 16.
    values = [conv(b"a" * 7), conv(b"b" * 8), conv(b"c" * 15), "end"]
    with shareable(values, backend=backend) as sl:
        for position, slot in ((0, 8), (1, 16), (2, 16)):
            for length in range(slot + 1):
                good = conv(b"z" * length)
                sl[position] = good
                assert key(sl[position]) == key(good)
                if length:
                    with_nul = conv(b"y" * (length - 1) + b"\x00")
                    if length < slot:
                        sl[position] = with_nul
                        assert key(sl[position]) == key(with_nul)
                    else:
                        before = sl[position]
                        with pytest.raises(ValueError):
                            sl[position] = with_nul
                        assert key(sl[position]) == key(before)
            before = sl[position]
            with pytest.raises(ValueError, match="exceeds available storage"):
                sl[position] = conv(b"w" * (slot + 1))
            assert key(sl[position]) == key(before)
            assert sl[3] == "end"
        sl[0] = conv(b"")
        assert key(sl[0]) == key(conv(b""))
        sl[0] = conv(b"\x00" * 7)
        assert key(sl[0]) == key(conv(b"\x00" * 7))


def test_multibyte_assignment_counts_bytes(backend: str) -> None:
    with shareable(["abc", "€€€€", "end"], backend=backend) as sl:
        # Slot 0 has 8 bytes: three characters, nine bytes, do not fit.
        with pytest.raises(ValueError, match="exceeds available storage"):
            sl[0] = "€€€"
        assert sl[0] == "abc"
        sl[0] = "€é"  # 5 bytes
        assert sl[0] == "€é"
        sl[0] = "日本a"  # 7 bytes
        assert sl[0] == "日本a"
        sl[0] = "🐍🐍"  # 8 bytes, fills the slot
        assert sl[0] == "🐍🐍"
        # Slot 1 has 16 bytes.
        sl[1] = "日本語テ"  # 12 bytes
        assert sl[1] == "日本語テ"
        with pytest.raises(ValueError, match="exceeds available storage"):
            sl[1] = "日本語テキス"  # 18 bytes
        assert sl[1] == "日本語テ"
        assert sl[2] == "end"
        with attached(sl.shm.name) as other:
            assert list(other) == ["🐍🐍", "日本語テ", "end"]


@pytest.mark.parametrize(
    "bad",
    [[1, 2], {"a": 1}, 1j, {1}, (1,), object(), bytearray(b"x")],
    ids=lambda bad: type(bad).__name__,
)
def test_unsupported_type(backend: str, bad: Any) -> None:
    before = set(tracking.tracked())
    with pytest.raises(TypeError) as info:
        ShareableList([1, bad], backend=backend)
    assert isinstance(info.value, KeyError)
    assert type(bad).__name__ in str(info.value)
    with pytest.raises(KeyError):
        ShareableList([bad], backend=backend)
    assert set(tracking.tracked()) == before  # nothing was created

    with shareable([1, "abcdefg"], backend=backend) as sl:
        for position in (0, 1):
            with pytest.raises(TypeError):
                sl[position] = bad
            with pytest.raises(KeyError):
                sl[position] = bad
        assert list(sl) == [1, "abcdefg"]


@pytest.mark.parametrize(
    "big",
    [
        "x" * 10_000_000,
        b"\x00" * 10_000_000,
        "€" * 3_333_334,  # fewer than 10 M characters, more than 10 MB
        b"y" * 12_000_000,
        b"z" * 9_999_992,  # one byte more than the layout can describe
    ],
    ids=["str", "bytes-nul", "multibyte", "bytes-12M", "bytes-9999992"],
)
def test_too_large_item(backend: str, big: Any) -> None:
    before = set(tracking.tracked())
    with pytest.raises(ValueError):
        ShareableList([1, big], backend=backend)
    assert set(tracking.tracked()) == before


def test_largest_item(backend: str) -> None:
    # 9_999_991 bytes: the largest value whose slot (9_999_992 bytes) the
    # layout's 8-character format can describe.
    value = b"m" * 9_999_991
    with shareable([value, "end"], backend=backend) as sl:
        assert sl[0] == value
        assert sl[1] == "end"
        smaller = b"s" * 1_500_000
        sl[0] = smaller
        assert sl[0] == smaller
        sl[0] = "€" * 3_333_330  # 9_999_990 bytes
        assert sl[0] == "€" * 3_333_330
        with pytest.raises(ValueError):
            sl[0] = b"f" * 10_000_000
        assert sl[0] == "€" * 3_333_330
        assert sl[1] == "end"


def test_large_items_round_trip(backend: str) -> None:
    values = [b"a" * 1_000_000, "b" * 2_000_000, "c" * 999_998 + "\x00", b"d" * 999_999, 5]
    with shareable(values, backend=backend) as sl:
        assert keys(sl) == keys(values)
        with attached(sl.shm.name) as other:
            assert keys(other) == keys(values)


@pytest.mark.parametrize(
    "value",
    [b"a" * 1_000_000 + b"\x00\x00", "b" * 2_000_000 + "\x00", b"\x00" * 1_000_000],
    ids=["bytes", "str", "all-nul"],
)
def test_large_item_ending_with_nul_is_refused(backend: str, value: Any) -> None:
    """From a million bytes the layout cannot record an exact length, so a
    value ending with NUL is refused rather than read back without its NULs."""
    before = set(tracking.tracked())
    with pytest.raises(ValueError):
        ShareableList([1, value], backend=backend)
    assert set(tracking.tracked()) == before


def test_large_assignment_ending_with_nul_is_refused(backend: str) -> None:
    with shareable([b"a" * 1_000_007, "end"], backend=backend) as sl:  # slot: 1_000_008
        for new in (b"b" * 1_000_007 + b"\x00", b"c" * 1_000_000 + b"\x00", "d" * 999_999 + "\x00"):
            with pytest.raises(ValueError):
                sl[0] = new
            assert sl[0] == b"a" * 1_000_007
        sl[0] = b"e" * 1_000_008  # fills the slot, no NUL at the end: fine
        assert sl[0] == b"e" * 1_000_008
        sl[0] = b"f" * 999_998 + b"\x00"  # under a million bytes: exact again
        assert sl[0] == b"f" * 999_998 + b"\x00"
        assert sl[1] == "end"


# --------------------------------------------------------------------------
# 4. Properties

ints = st.integers(min_value=-(2**63), max_value=2**63 - 1)
floats = st.floats(allow_nan=True, allow_infinity=True)
texts = st.one_of(
    st.text(max_size=30),
    st.builds(lambda s, n: s + "\x00" * n, st.text(max_size=12), st.integers(1, 9)),
)
binaries = st.one_of(
    st.binary(max_size=30),
    st.builds(lambda b, n: b + b"\x00" * n, st.binary(max_size=12), st.integers(1, 9)),
)
items = st.one_of(ints, floats, st.booleans(), st.none(), texts, binaries)

PROPERTY_SETTINGS = settings(
    max_examples=50,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


@PROPERTY_SETTINGS
@given(values=st.lists(items, max_size=12))
def test_round_trip_property(backend: str, values: list[Any]) -> None:
    with shareable(values, backend=backend) as sl:
        assert len(sl) == len(values)
        assert keys(sl) == keys(values)
        with attached(sl.shm.name) as other:
            assert keys(other) == keys(values)


def replacement(slot: int) -> st.SearchStrategy[Any]:
    """Values to assign to a slot of *slot* bytes: fitting, exactly filling
    (with and without a final NUL) and too long."""
    sized_bytes = st.integers(0, slot + 2).flatmap(lambda n: st.binary(min_size=n, max_size=n))
    exact_nul = st.binary(min_size=slot - 1, max_size=slot - 1).map(lambda b: b + b"\x00")
    sized_ascii = st.integers(0, slot + 2).flatmap(
        lambda n: st.text(alphabet="abc\x00", min_size=n, max_size=n)
    )
    return st.one_of(
        ints,
        floats,
        st.booleans(),
        st.none(),
        sized_bytes,
        exact_nul,
        sized_ascii,
        st.text(max_size=slot),
    )


@PROPERTY_SETTINGS
@given(initial=st.lists(items, min_size=1, max_size=8), data=st.data())
def test_assignment_property(backend: str, initial: list[Any], data: Any) -> None:
    with shareable(initial, backend=backend) as sl:
        model = list(initial)
        slots = [slot_size(v) for v in initial]
        for _ in range(data.draw(st.integers(1, 12), label="steps")):
            position = data.draw(st.integers(-len(model), len(model) - 1), label="position")
            value = data.draw(replacement(slots[position]), label="value")
            if fits(value, slots[position]):
                sl[position] = value
                model[position] = value
            else:
                with pytest.raises(ValueError):
                    sl[position] = value
            assert keys(sl) == keys(model)
        with attached(sl.shm.name) as other:
            assert keys(other) == keys(model)


# --------------------------------------------------------------------------
# 5. Interoperability with multiprocessing.shared_memory (posix backend)

STDLIB_VALUES = [42, -1.5, True, None, "hello", b"bytes", "ab€", "12345678", b"", ""]


def stdlib_reading(value: Any) -> Any:
    """What the standard library reads back for *value* (trailing NULs stripped)."""
    if isinstance(value, bytes):
        return value.rstrip(b"\x00")
    if isinstance(value, str):
        return value.rstrip("\x00")
    return value


def test_stdlib_list_read_by_mpshm() -> None:
    values = [*STDLIB_VALUES, "x\x00", b"ab\x00\x00", "é"]
    with stdlib_list(values) as theirs, attached(theirs.shm.name, backend="posix") as ours:
        assert len(ours) == len(theirs) == len(values)
        assert keys(ours) == keys(theirs)
        assert keys(ours) == keys(stdlib_reading(v) for v in values)
        assert ours.format == theirs.format
        assert ours[-1] == "é"
        assert ours.count(42) == theirs.count(42)
        assert ours.index("hello") == theirs.index("hello")


def test_stdlib_written_values_in_stdlib_list() -> None:
    with (
        stdlib_list(["abcdefghij", 1, "xy"]) as theirs,
        attached(theirs.shm.name, backend="posix") as ours,
    ):
        theirs[0] = "short"
        theirs[1] = b"by"
        theirs[2] = 2.25
        assert list(ours) == ["short", b"by", 2.25]
        theirs[0] = b"n\x00"
        assert ours[0] == theirs[0] == b"n"
        theirs[1] = "12345678"
        assert ours[1] == "12345678"


def test_mpshm_list_read_by_stdlib() -> None:
    values = [*STDLIB_VALUES, "€€€€", "日本語テキスト", "🐍", b"1234567890123456"]
    with shareable(values, backend="posix") as ours, stdlib_attached(ours.shm.name) as theirs:
        assert len(theirs) == len(values)
        assert keys(theirs) == keys(values)
        assert theirs.count("hello") == 1
        assert theirs.index(b"bytes") == 5


def test_mpshm_nul_values_read_by_stdlib() -> None:
    values = ["x\x00", b"ab\x00\x00", "\x00", b"\x00" * 8]
    with shareable(values, backend="posix") as ours, stdlib_attached(ours.shm.name) as theirs:
        assert keys(theirs) == keys(stdlib_reading(v) for v in values)
        assert keys(ours) == keys(values)


def test_stdlib_writes_into_mpshm_list() -> None:
    values = ["abc", "€€€€", 7, b"bytes", None, "end"]
    with shareable(values, backend="posix") as ours, stdlib_attached(ours.shm.name) as theirs:
        theirs[0] = "xyz"
        theirs[1] = "日本語"  # 9 bytes in a 16-byte slot
        theirs[2] = "str"  # type change int -> str
        theirs[3] = 99  # bytes -> int
        theirs[4] = -0.5
        assert list(ours) == ["xyz", "日本語", "str", 99, -0.5, "end"]
        theirs[0] = "12345678"  # fills the slot
        theirs[2] = b"q\x00"
        theirs[3] = None
        theirs[4] = False
        assert keys(ours) == keys(["12345678", "日本語", b"q", None, False, "end"])
        assert keys(ours) == keys(theirs)
        theirs[0] = "a"  # shorter again, padded by the standard library
        assert ours[0] == "a"


def test_mpshm_writes_into_stdlib_list() -> None:
    with (
        stdlib_list(["abcdefg", "abcdefghijk", 1, b"x", None]) as theirs,
        attached(theirs.shm.name, backend="posix") as ours,
    ):
        ours[0] = "€€"  # 6 bytes in an 8-byte slot
        ours[1] = b"0123456789abcdef"  # fills a 16-byte slot
        ours[2] = "int->s"
        ours[3] = 3.75
        ours[4] = True
        expected = ["€€", b"0123456789abcdef", "int->s", 3.75, True]
        assert keys(theirs) == keys(expected)
        assert keys(ours) == keys(expected)
        ours[0] = "x\x00"
        assert theirs[0] == "x"  # the standard library strips, as always
        assert ours[0] == "x\x00"  # mpshm's own write keeps its exact length
        theirs[0] = "again"  # and the standard library can still write there
        assert ours[0] == theirs[0] == "again"
        with pytest.raises(ValueError, match="exceeds available storage"):
            ours[0] = "123456789"
        assert theirs[0] == "again"


def test_both_write_alternately() -> None:
    with (
        shareable(["0" * 15, 0], backend="posix") as ours,
        stdlib_attached(ours.shm.name) as theirs,
    ):
        for i in range(1, 20):
            writer, reader = (ours, theirs) if i % 2 else (theirs, ours)
            text = str(i) * (i % 8)
            writer[0] = text
            writer[1] = i
            assert reader[0] == text
            assert reader[1] == i


def test_stdlib_writes_into_large_mpshm_item() -> None:
    with (
        shareable([b"x" * 1_000_000], backend="posix") as ours,
        stdlib_attached(ours.shm.name) as theirs,
    ):
        theirs[0] = b"abc"  # the standard library pads to the slot
        assert theirs[0] == b"abc"
        assert ours[0] == b"abc"
        ours[0] = b"x" * 1_000_001
        assert theirs[0] == b"x" * 1_000_001
