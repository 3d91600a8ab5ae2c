"""NumPy arrays whose memory is a shared memory segment.

NumPy is imported when this module is; the rest of mpshm works without it
(install it with ``pip install mpshm[numpy]``).

Arrays made here are :class:`SharedArray` objects (an ``ndarray`` subclass
with no other difference): they, and every slice, view or transpose of them,
pickle as a handle with any pickler, plain :mod:`pickle` included, and
unpickle in another process as a writable, zero-copy view of the same memory.
(One exception: returned by a task of the standard library's pools or of
loky, joblib's default backend, they pickle by value, as those pools pickle
every result: a handle would outlive its segment.)

Lifetime: an array from :func:`empty`, :func:`zeros` or :func:`asshared` owns
its memory. A *dedicated* array (larger than :data:`slab_limit` bytes, or made
with ``dedicated=True``) owns a segment of its own: the segment's name is
destroyed when the last view of it in the creating process is gone, or at
once by :func:`release`; processes that already mapped it keep valid views,
and the memory goes with the last view in the last process. A *small* array
(at most :data:`slab_limit` bytes, 64 KiB by default) is a chunk of a
*slab*, a segment shared with other small arrays of this process (so
:func:`segment_name` gives the slab's name, the same for all of them): the
chunk is reused once the array's last view in this process is gone, and the
slab's name is destroyed when all of its arrays are gone or released (see
:func:`release`, and the user guide's page on lifetimes). A crash cannot leak either: both
are tracked like any ``track=True`` segment. Send a handle only while the
creator keeps the array (mpshm's pools keep it alive for you until the task
is done); for a small array this is a must, since another process's view of
a reused chunk sees the new owner's data.
"""

from __future__ import annotations

import math
import operator
import os
import pickle
import sys
import types
import weakref
from typing import Any, NamedTuple, Optional

import numpy as np

from .. import backends, reduction, tracking
from .._mappings import destroy_name, find, forget_mapping, reaper
from .._sysinfo import machine
from ..errors import HandleError
from ..shared_memory import SharedMemory, create_mapping
from . import _slab

__all__ = [
    "SharedArray",
    "asshared",
    "empty",
    "ndarray_from",
    "release",
    "segment_name",
    "slab_limit",
    "zeros",
]

#: Arrays of at most this many bytes made by :func:`empty`, :func:`zeros` and
#: :func:`asshared` share slabs (segments of 1 MiB or more) instead of having
#: a segment each; set it to 0 for a segment per array everywhere (or pass
#: ``dedicated=True`` for one array). Values above 64 KiB count as 64 KiB.
slab_limit: int = _slab.SLAB_LIMIT


class SharedArray(np.ndarray):  # type: ignore[type-arg,unused-ignore]
    """An ``ndarray`` whose memory lies in a shared memory segment.

    Pickles as a handle (a few hundred bytes) instead of its data, as long as
    its memory is in a segment; results of arithmetic on it are ordinary
    arrays in private memory (and pickle as such).
    """

    def __reduce_ex__(self, protocol: Any) -> Any:
        handle = array_handle(self)
        if handle is not None and not _sends_results_by_value():
            return rebuild_array, (handle,)
        return np.asarray(self).view(np.ndarray).__reduce_ex__(protocol)

    def __array_wrap__(self, obj: Any, *args: Any, **kwargs: Any) -> Any:
        result = super().__array_wrap__(obj, *args, **kwargs)
        if isinstance(result, SharedArray) and not np.may_share_memory(result, self):
            result = result.view(np.ndarray)
            # NumPy 2 asks for a scalar where a plain array would give one
            # (a.sum(), np.mean(a)); the view above would be a 0-d array.
            scalar = args[1] if len(args) > 1 else kwargs.get("return_scalar", False)
            if scalar and result.ndim == 0:
                return result[()]
        return result


#: Where pools that pickle a task's result with a plain pickler, and then
#: drop it, do so (so that the segment of a handle would be gone before the
#: parent attaches it): the standard library's ``concurrent.futures`` and
#: loky's (joblib's default backend) in a function of their own, (module,
#: function) pairs; and ``multiprocessing.Pool``'s worker (also joblib's
#: "multiprocessing" backend), by calling its result queue's ``put``.
_RESULT_SENDERS = frozenset({
    ("concurrent.futures.process", "_sendback_result"),
    # Dask distributed's pickling: what it pickles may be spilled to disk and
    # loaded after the array is gone, or relayed by a scheduler to another
    # machine (mpshm.dask sends arrays by handle itself, only where they map).
    ("distributed.protocol.pickle", "dumps"),
    ("joblib.externals.loky.process_executor", "_sendback_result"),
    ("loky.process_executor", "_sendback_result"),
})
_POOL_WORKER = ("multiprocessing.pool", "worker")


def _sends_results_by_value() -> bool:
    """Whether this pickling is such a pool's worker pickling a task's
    result (see :data:`_RESULT_SENDERS`): an array then pickles by value, as
    the pool pickles every result, instead of as a handle that would
    outlive its segment. Anything else the worker pickles (a helper
    process's arguments, say) still goes by handle. mpshm's own pools (and
    its joblib backend) pickle arrays with the sharing pickler, which hands
    their segments over and never asks this."""
    frame: Optional[types.FrameType] = sys._getframe(2)
    callee: Optional[types.FrameType] = None
    while frame is not None:
        where = (frame.f_globals.get("__name__"), frame.f_code.co_name)
        if where in _RESULT_SENDERS:
            return True
        if where == _POOL_WORKER:  # (it also runs the task, which may pickle)
            # Its queue's put (the standard library's, or a subclass's:
            # joblib's), not the task's function.
            return callee is not None and callee.f_code.co_name == "put"
        callee, frame = frame, frame.f_back
    return False


# Finalizers of the segments this process owns, by mapping owner.
_owned: weakref.WeakKeyDictionary[Any, weakref.finalize[Any, Any]] = weakref.WeakKeyDictionary()


def _after_fork_in_child() -> None:
    # The parent's segments stay the parent's: a forked child dropping (or
    # exiting with) its inherited copies of the parent's arrays destroys nothing.
    for finalizer in list(_owned.values()):
        finalizer.detach()
    _owned.clear()


os.register_at_fork(after_in_child=_after_fork_in_child)


def _owned_array(
    shape: Any, dtype: Any, order: str, backend: Optional[str], options: dict[str, Any],
    zero: bool, dedicated: bool,
) -> SharedArray:
    dtype = np.dtype(dtype)
    if dtype.hasobject:
        raise TypeError(
            f"dtype {dtype} holds Python objects, which cannot live in shared memory; "
            "use a numeric, bytes or structured dtype without objects"
        )
    try:
        shape = (operator.index(shape),)
    except TypeError:
        shape = tuple(operator.index(n) for n in shape)
    if any(n < 0 for n in shape):
        raise ValueError(f"negative dimensions are not allowed: {shape}")
    nbytes = math.prod(shape) * dtype.itemsize
    if not dedicated and nbytes <= min(slab_limit, _slab.SLAB_LIMIT):
        chosen, _ = backends.resolve(None, backend, options)
        view = _slab.allocate(nbytes, chosen, options, zero)
        if view is not None:
            return SharedArray(shape, dtype, buffer=view, order=order)  # type: ignore[arg-type]
    chosen, _ = backends.resolve(None, backend, options)
    mapped = create_mapping(max(nbytes, 1), chosen, options, tracking)
    arr = SharedArray(shape, dtype, buffer=memoryview(mapped.owner),
                      order=order)  # type: ignore[arg-type]
    _owned[mapped.owner] = weakref.finalize(mapped.owner, destroy_name, mapped.backend.name,
                                            mapped.ident)
    return arr


def empty(
    shape: Any, dtype: Any = float, order: str = "C", *, backend: Optional[str] = None,
    dedicated: bool = False, **options: Any,
) -> SharedArray:
    """A new array in shared memory, like :func:`numpy.empty`.

    Arrays of at most :data:`slab_limit` bytes are chunks of a shared slab
    (a reused chunk holds old data, as :func:`numpy.empty`'s memory may);
    larger ones, or any with *dedicated* true, get a segment of their own
    (zero-filled by the operating system). *backend* and *options* say where
    the segment (or slab) is made, as for :class:`~mpshm.SharedMemory`.
    """
    return _owned_array(shape, dtype, order, backend, options, False, dedicated)


def zeros(
    shape: Any, dtype: Any = float, order: str = "C", *, backend: Optional[str] = None,
    dedicated: bool = False, **options: Any,
) -> SharedArray:
    """A new zero-filled array in shared memory, like :func:`numpy.zeros`
    (slab or dedicated segment as for :func:`empty`)."""
    return _owned_array(shape, dtype, order, backend, options, True, dedicated)


def asshared(
    array: Any, *, backend: Optional[str] = None, dedicated: bool = False, **options: Any
) -> SharedArray:
    """A copy of *array* (anything :func:`numpy.asarray` takes) in shared
    memory, made with one copy (slab or dedicated segment as for
    :func:`empty`). An array already in a segment is returned as a
    :class:`SharedArray` view, without copying."""
    source = np.asarray(array)
    if array_handle(source) is not None:
        return source.view(SharedArray)
    order = "F" if source.flags.f_contiguous and not source.flags.c_contiguous else "C"
    arr = _owned_array(source.shape, source.dtype, order, backend, options, False, dedicated)
    np.copyto(arr, source)
    return arr


def _dedicated_copy(arr: np.ndarray, owner: Any) -> Optional[SharedArray]:
    """A copy of *arr*, an array in the slab of this process that *owner*
    maps, in a segment of its own on the slab's backend and options (what a
    pool worker hands over instead of a chunk of a slab it goes on using:
    see :func:`_copy_from_slab`); None if *owner* is no such slab."""
    found = _slab.origin(owner)
    if found is None:
        return None
    backend, options = found
    source = np.asarray(arr).view(np.ndarray)
    copy = _owned_array(source.shape, source.dtype, "C", backend, options, False, True)
    np.copyto(copy, source)
    return copy


def ndarray_from(
    shm: SharedMemory, dtype: Any, shape: Any, offset: int = 0
) -> SharedArray:
    """A view of *shm*'s memory as an array (no copy). The segment stays
    *shm*'s: the view keeps the mapping alive, not the segment's name."""
    dtype = np.dtype(dtype)
    if shm.buf is None:
        raise ValueError(f"{shm!r} is closed: attach it again to view its memory")
    if offset < 0:
        raise ValueError(f"offset must be >= 0, got {offset}")
    shape = (shape,) if np.ndim(shape) == 0 else tuple(shape)
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if offset + nbytes > shm.size:
        raise ValueError(
            f"an array of shape {shape} and dtype {dtype} at offset {offset} needs "
            f"{offset + nbytes} bytes, but {shm.name!r} has {shm.size}"
        )
    return SharedArray(shape, dtype, buffer=memoryview(shm._owner()), offset=offset)


def segment_name(arr: np.ndarray) -> Optional[str]:
    """The name of the segment holding *arr*'s memory (``SharedMemory(name)``
    attaches it), or None if *arr* is not in a segment that can be shared by
    name (private memory, or a read-only copy a pool received).

    Small arrays share slabs: this is the slab's name, the same for many
    arrays, and the segment is larger than the array (find the array in it
    with a pickled handle, or make it with ``dedicated=True``)."""
    handle = array_handle(arr)
    return None if handle is None else handle.name


def release(arr: np.ndarray) -> None:
    """Destroy the segment holding *arr* now (its name; views stay valid
    until they are gone). Raises ValueError if *arr* is not in a segment.

    For a small array, which shares a slab with others, only the creating
    process can release it, and the slab's name is destroyed once every array
    in it is released or gone (a name others use cannot be destroyed for one
    of them); the chunk's memory is reused only when the array's last view
    in this process is gone, released or not. Released or not, the array
    stays sendable by handle as long as the slab's name exists.
    """
    _, low, extent = _array_bounds(arr)
    found = find(low, max(extent, 1))
    if found is None:
        raise ValueError(
            "this array's memory is not in a shared memory segment that this process "
            "maps (was it made by mpshm.numpy, or already released?)"
        )
    owner, region, offset = found
    if _slab.release(owner, offset):
        return
    if _slab.inherited(owner):
        raise ValueError(
            f"this array lives in {region.name!r}, a slab of small arrays that the parent "
            "of this forked process made: only the parent can release it"
        )
    forget_mapping(owner)
    finalizer = _owned.pop(owner, None)
    if finalizer is not None:
        finalizer()
    else:
        destroy_name(region.backend, region.ident)


# --------------------------------------------------------------------------
# Pickling: arrays that live in a segment travel as handles

class _ArrayHandle(NamedTuple):
    backend: str
    ident: str
    name: str
    size: int
    machine: tuple[str, str]
    offset: int
    shape: tuple[int, ...]
    strides: tuple[int, ...]
    dtype: Any
    writable: bool
    #: The receiver takes the segment over (see :func:`_hand_over`).
    given: bool = False


def _array_bounds(arr: np.ndarray) -> tuple[int, int, int]:
    """(data address, lowest byte, extent in bytes) of *arr*."""
    data = int(arr.__array_interface__["data"][0])
    low = high = 0
    for n, stride in zip(arr.shape, arr.strides):
        if n == 0:
            return data, data, 0
        if stride < 0:
            low += (n - 1) * stride
        else:
            high += (n - 1) * stride
    return data, data + low, high - low + arr.itemsize


def locate_array(arr: np.ndarray) -> Optional[tuple[_ArrayHandle, Any]]:
    """A handle for *arr* and the owner of its mapping, if its memory lies
    in a segment (else None)."""
    if arr.dtype.hasobject:
        return None
    data, low, extent = _array_bounds(arr)
    if extent == 0:
        return None
    found = find(low, extent)
    if found is None:
        return None
    owner, region, low_offset = found
    handle = _ArrayHandle(
        region.backend, region.ident, region.name, region.size, machine(),
        low_offset + (data - low), tuple(arr.shape), tuple(arr.strides), arr.dtype,
        bool(arr.flags.writeable),
    )
    return handle, owner


def array_handle(arr: np.ndarray) -> Optional[_ArrayHandle]:
    """A handle for *arr* if its memory lies in a segment (else None)."""
    located = locate_array(arr)
    return None if located is None else located[0]


def owned_handle(arr: np.ndarray) -> Optional[dict[str, Any]]:
    """The fields of a handle for *arr* (msgpack-safe: no dtype object, see
    :func:`rebuild_from_fields`) if its memory is a *dedicated* segment this
    process made and still owns (so its name exists for as long as the
    array does): not a slab's chunk, which is reused once the array is
    gone, nor a segment received from another process, whose name its
    maker may destroy at any time. None otherwise."""
    located = locate_array(arr)
    if located is None or located[1] not in _owned:
        return None
    handle = located[0]
    if handle.dtype.fields is not None or handle.dtype.hasobject:
        return None
    return {"backend": handle.backend, "ident": handle.ident, "name": handle.name,
            "size": handle.size, "machine": list(handle.machine), "offset": handle.offset,
            "shape": list(handle.shape), "strides": list(handle.strides),
            "dtype": handle.dtype.str, "writable": handle.writable}


def rebuild_from_fields(fields: dict[str, Any]) -> np.ndarray:
    """The array of handle *fields* (from :func:`owned_handle`): a zero-copy
    view of the segment. Raises HandleError for fields that make no handle."""
    try:
        handle = _ArrayHandle(
            str(fields["backend"]), str(fields["ident"]), str(fields["name"]),
            int(fields["size"]), tuple(fields["machine"]),
            int(fields["offset"]), tuple(int(n) for n in fields["shape"]),
            tuple(int(n) for n in fields["strides"]), np.dtype(str(fields["dtype"])),
            bool(fields["writable"]),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise HandleError(f"invalid array handle fields {fields!r}: {exc}") from None
    return rebuild_array(handle)


def rebuild_array(handle: _ArrayHandle) -> np.ndarray:
    """Unpickle an array handle: a zero-copy view of the segment."""
    if not (isinstance(handle.offset, int) and 0 <= handle.offset <= handle.size):
        raise HandleError(
            f"invalid array handle: offset {handle.offset!r} is not within the "
            f"{handle.size!r} bytes of segment {handle.name!r}"
        )
    try:
        owner = reduction.attach_owner(
            handle.backend, handle.ident, handle.name, handle.size, handle.machine,
            shareable=not handle.given, cache=reduction.receiver().cache and not handle.given,
        )
    except FileNotFoundError as exc:
        raise FileNotFoundError(
            exc.errno,
            f"{exc.strerror or exc} (it held a pickled mpshm.numpy array: the process "
            "that made the array may have dropped it, or ended, before this one unpickled "
            "the handle). Keep the array alive until it is received; to return one from a "
            "task, use mpshm's pools or its joblib backend (they hand the segment over), "
            "or return a copy (numpy.array(arr))",
        ) from exc
    if handle.given:
        reaper.watch(owner, handle.backend, handle.ident)
    arr = SharedArray(
        handle.shape, handle.dtype, buffer=memoryview(owner), offset=handle.offset,
        strides=handle.strides,
    )
    if not handle.writable:
        arr.flags.writeable = False
    return arr


def _reduce_array(collector: reduction.Collector, arr: np.ndarray) -> Any:
    """A handle for an array in a segment; a large non-contiguous one is
    copied straight into a segment; the rest as NumPy pickles it."""
    located = locate_array(arr)
    if located is not None:
        handle, owner = located
        if collector.carrier.hands_over:
            copied = _copy_from_slab(collector, arr, owner)
            if copied is not None:
                return copied
        collector.kept.append(arr)
        if collector.carrier.hands_over and _hand_over(collector, owner, handle):
            handle = handle._replace(given=True)
        return rebuild_array, (handle,)
    if (
        arr.nbytes >= collector.carrier.threshold
        and not arr.dtype.hasobject
        and not (arr.flags.c_contiguous or arr.flags.f_contiguous)
    ):
        # NumPy would copy it into the pickle with tobytes(): copy it
        # once, straight into a segment, instead.
        mapped = collector.carrier.new_segment(arr.nbytes)
        collector.made.append(reduction.Segment.of(mapped))
        dst = np.ndarray(arr.shape, arr.dtype, buffer=mapped.buf)
        np.copyto(dst, arr)
        dst.flags.writeable = bool(arr.flags.writeable)  # as the copy arrives
        del mapped  # dst keeps the mapping while pickled
        buffer = pickle.PickleBuffer(dst)  # type: ignore[arg-type]
        return _rebuild_contiguous, (buffer, arr.dtype, arr.shape)
    return arr.__reduce_ex__(5)


def _hand_over(collector: reduction.Collector, owner: Any, handle: _ArrayHandle) -> bool:
    """Give the receiver a segment this process owns (an array of
    :mod:`mpshm.numpy`, returned by a pool's task, say): it would
    otherwise be destroyed when the sender drops the array, maybe before
    the receiver attaches it."""
    finalizer = _owned.pop(owner, None)
    if finalizer is None:
        return False
    finalizer.detach()
    forget_mapping(owner)  # this process's later pickles copy it
    chosen = backends.get(handle.backend)  # (made here: a claim proves it on SysV)
    collector.carrier.registry().register(chosen, handle.ident,
                                          chosen.claim_identity(handle.ident, os.getpid()))
    return True


def _copy_from_slab(collector: reduction.Collector, arr: np.ndarray, owner: Any) -> Any:
    """Reduce a small :mod:`mpshm.numpy` array that this process keeps in
    a slab shared with its other small arrays (a pool worker's result,
    say) by value: the slab cannot be handed over, and the chunk is reused
    once the sender drops the array. Below the threshold it goes inline;
    from it on, as a copy in a segment of its own, handed over. None if
    *owner* is not such a slab."""
    if not _slab.owns(owner):
        return None
    if arr.nbytes >= collector.carrier.threshold:
        copy = _dedicated_copy(arr, owner)
        if copy is not None:
            return _reduce_array(collector, copy)
    return np.asarray(arr).view(np.ndarray).__reduce_ex__(5)



def _rebuild_contiguous(buffer: Any, dtype: Any, shape: tuple[int, ...]) -> Any:
    return np.frombuffer(buffer, dtype=dtype).reshape(shape)


# Plain ndarrays too: one that lies in a segment (a view of a SharedMemory's
# buffer, say) is sent by handle; a SharedArray's own __reduce_ex__ would not
# keep it alive while a pool's task runs.
reduction.register(np.ndarray, _reduce_array)
reduction.register(SharedArray, _reduce_array)
