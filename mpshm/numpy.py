"""NumPy arrays whose memory is a shared memory segment.

NumPy is imported when this module is; the rest of mpshm works without it
(install it with ``pip install mpshm[numpy]``).

Arrays made here are :class:`SharedArray` objects (an ``ndarray`` subclass
with no other difference): they, and every slice, view or transpose of them,
pickle as a handle with any pickler, plain :mod:`pickle` included, and
unpickle in another process as a writable, zero-copy view of the same memory.

Lifetime: an array from :func:`empty`, :func:`zeros` or :func:`asshared` owns
its segment. The segment's name is destroyed when the last view of it in the
creating process is gone, or at once by :func:`release`; processes that
already mapped it keep valid views, and the memory goes with the last view in
the last process. A crash cannot leak it: it is tracked like any
``track=True`` segment. Send a handle only while the creator keeps the array
(mpshm's pools keep it alive for you until the task is done).
"""

from __future__ import annotations

import weakref
from typing import Any, Optional

import numpy as np

from . import reduction
from .shared_memory import SharedMemory

__all__ = [
    "SharedArray",
    "asshared",
    "empty",
    "ndarray_from",
    "release",
    "segment_name",
    "zeros",
]


class SharedArray(np.ndarray):  # type: ignore[type-arg,unused-ignore]
    """An ``ndarray`` whose memory lies in a shared memory segment.

    Pickles as a handle (a few hundred bytes) instead of its data, as long as
    its memory is in a segment; results of arithmetic on it are ordinary
    arrays in private memory (and pickle as such).
    """

    def __reduce_ex__(self, protocol: Any) -> Any:
        handle = reduction.array_handle(self)
        if handle is not None:
            return reduction.rebuild_array, (handle,)
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


# Finalizers of the segments this process owns, by mapping owner.
_owned: weakref.WeakKeyDictionary[Any, weakref.finalize[Any, Any]] = weakref.WeakKeyDictionary()


def _owned_array(
    shape: Any, dtype: Any, order: str, backend: Optional[str], options: dict[str, Any]
) -> SharedArray:
    dtype = np.dtype(dtype)
    if dtype.hasobject:
        raise TypeError(
            f"dtype {dtype} holds Python objects, which cannot live in shared memory; "
            "use a numeric, bytes or structured dtype without objects"
        )
    shape = (shape,) if np.ndim(shape) == 0 else tuple(shape)
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    shm = SharedMemory(create=True, size=max(nbytes, 1), backend=backend, **options)
    shm._note()
    owner = shm._owner()
    assert shm._backend is not None and shm._ident is not None
    arr = SharedArray(shape, dtype, buffer=memoryview(owner), order=order,  # type: ignore[arg-type]
    )
    _owned[owner] = weakref.finalize(owner, reduction.destroy_name, shm._backend.name, shm._ident)
    shm._forget_attachment()
    return arr


def empty(
    shape: Any, dtype: Any = float, order: str = "C", *, backend: Optional[str] = None,
    **options: Any,
) -> SharedArray:
    """A new array in a fresh segment, like :func:`numpy.empty` (the memory
    is zero-filled by the operating system)."""
    return _owned_array(shape, dtype, order, backend, options)


def zeros(
    shape: Any, dtype: Any = float, order: str = "C", *, backend: Optional[str] = None,
    **options: Any,
) -> SharedArray:
    """A new zero-filled array in a fresh segment, like :func:`numpy.zeros`."""
    return _owned_array(shape, dtype, order, backend, options)


def asshared(array: Any, *, backend: Optional[str] = None, **options: Any) -> SharedArray:
    """A copy of *array* (anything :func:`numpy.asarray` takes) in a fresh
    segment, made with one copy. An array already in a segment is returned
    as a :class:`SharedArray` view, without copying."""
    source = np.asarray(array)
    if reduction.array_handle(source) is not None:
        return source.view(SharedArray)
    order = "F" if source.flags.f_contiguous and not source.flags.c_contiguous else "C"
    arr = _owned_array(source.shape, source.dtype, order, backend, options)
    np.copyto(arr, source)
    return arr


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
    name (private memory, or a read-only copy a pool received)."""
    handle = reduction.array_handle(arr)
    return None if handle is None else handle.name


def release(arr: np.ndarray) -> None:
    """Destroy the segment holding *arr* now (its name; views stay valid
    until they are gone). Raises ValueError if *arr* is not in a segment."""
    _, low, extent = reduction._array_bounds(arr)
    found = reduction.find(low, max(extent, 1))
    if found is None:
        raise ValueError(
            "this array's memory is not in a shared memory segment that this process "
            "maps (was it made by mpshm.numpy, or already released?)"
        )
    owner, region, _ = found
    reduction.forget_mapping(owner)
    finalizer = _owned.pop(owner, None)
    if finalizer is not None:
        finalizer()
    else:
        reduction.destroy_name(region.backend, region.ident)
