"""Handles, not bytes: pickling shared memory by reference.

Two mechanisms live here.

**Handles** work with any pickler, plain :mod:`pickle` included.
:class:`~mpshm.SharedMemory`, :class:`~mpshm.ShareableList` and NumPy arrays
made by :mod:`mpshm.numpy` (whole, sliced, strided, any dtype) pickle as a
handle of a few hundred bytes: the segment's backend and name, its size, the
view's offset, shape, strides and dtype, and the machine it was made on.
Unpickling attaches the segment (or reuses this process's mapping of it) and
returns a zero-copy, writable view: a write on one side is visible on the
other. The view keeps its mapping alive for as long as it lives, whatever
happens to the object that made it. A handle unpickled on another machine
raises :class:`HandleError` naming both machines.

**The sharing pickler** (:class:`SharingPickler`, :func:`dumps`,
:func:`loads`) also moves large buffers that are *not* in a segment: every
pickle protocol 5 out-of-band buffer (NumPy arrays, ``memoryview``,
:class:`pickle.PickleBuffer` and objects built on them) of at least
``threshold`` bytes is copied once into a fresh segment and sent as a handle;
smaller ones travel inline. Receivers get such a copy as pickling gives it:
their own, writable (read-only if the sender's buffer was), and nobody
else sees their writes. It is a private (copy-on-write) mapping of the
segment where the storage has one (POSIX, mmap files): free until a page is
written; System V has none, so there the receiver copies the bytes out of
the segment. A buffer already inside a segment is sent by reference, never
copied. ``bytearray`` objects are the exception: CPython's pickler writes
them inline without asking any hook; wrap one in ``memoryview`` to share it.

Who destroys a copied buffer's segment: with :func:`dumps`, the receiver
(:func:`loads` unlinks its name once mapped; the memory goes with the last
view), or the tracker of the sender's program if nobody ever loads it.
:mod:`mpshm.pool` uses the same pickler with its own bookkeeping (a task's
arguments die with the task, results belong to the receiver).

Nothing is changed globally: importing mpshm leaves
:class:`multiprocessing.reduction.ForkingPickler`, :mod:`copyreg` and the
standard library's resource tracker as they were.
"""

from __future__ import annotations

import copyreg
import ctypes
import io
import marshal
import os
import pickle
import queue
import socket
import struct
import sys
import threading
import weakref
from typing import TYPE_CHECKING, Any, Callable, Mapping, NamedTuple, Optional

from . import _cache, backends, tracking

if TYPE_CHECKING:
    import numpy

    from .backends import Backend
    from .shared_memory import SharedMemory

__all__ = [
    "DEFAULT_THRESHOLD",
    "Carrier",
    "HandleError",
    "Segment",
    "SharingPickler",
    "dumps",
    "loads",
    "machine",
]

#: Buffers of at least this many bytes are moved into shared memory.
DEFAULT_THRESHOLD = 1 << 20

_ENVELOPE = b"MPSHM\x01"
#: The same for a pickle with a pool's note about it alone (see envelope).
_NOTE = b"MPSHM\x02"
_LENGTH = struct.Struct("!Q")


class HandleError(ValueError):
    """A pickled handle cannot be used where it was unpickled."""


def _boot_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return ""


_MACHINE = (socket.gethostname(), _boot_id())


def machine() -> tuple[str, str]:
    """This machine as handles record it: ``(host name, boot id)``.

    The boot id (Linux) tells two machines of the same name apart, and a
    machine from itself before a reboot, when no segment survives.
    """
    return _MACHINE


def check_machine(made_on: Optional[tuple[str, str]], name: str) -> None:
    """Raise :class:`HandleError` if a handle of segment *name* was made elsewhere."""
    if made_on is None or made_on == _MACHINE or (
        isinstance(made_on, (tuple, list)) and tuple(made_on) == _MACHINE
    ):
        return
    if not (isinstance(made_on, (tuple, list)) and len(made_on) == 2
            and all(isinstance(part, str) for part in made_on)):
        raise HandleError(
            f"invalid shared memory handle of {name!r}: its machine is {made_on!r}, "
            "not (host name, boot id)"
        )
    there, here = made_on[0], _MACHINE[0]
    if there == here:
        there, here = f"{there} (boot {made_on[1]})", f"{here} (boot {_MACHINE[1]})"
    raise HandleError(
        f"the shared memory segment {name!r} lives on machine {there!r}, but its "
        f"handle was unpickled on {here!r}: shared memory cannot cross machines. "
        "Send the data itself (pickle it without mpshm, or copy the array), or run "
        f"this code on {made_on[0]!r}."
    )


# --------------------------------------------------------------------------
# Where this process's segments are mapped

class _Py_buffer(ctypes.Structure):
    _fields_ = [
        ("buf", ctypes.c_void_p),
        ("obj", ctypes.c_void_p),
        ("len", ctypes.c_ssize_t),
        ("itemsize", ctypes.c_ssize_t),
        ("readonly", ctypes.c_int),
        ("ndim", ctypes.c_int),
        ("format", ctypes.c_char_p),
        ("shape", ctypes.c_void_p),
        ("strides", ctypes.c_void_p),
        ("suboffsets", ctypes.c_void_p),
        ("internal", ctypes.c_void_p),
    ]


_get_buffer = ctypes.pythonapi.PyObject_GetBuffer
_get_buffer.argtypes = [ctypes.py_object, ctypes.POINTER(_Py_buffer), ctypes.c_int]
_release_buffer = ctypes.pythonapi.PyBuffer_Release
_release_buffer.argtypes = [ctypes.POINTER(_Py_buffer)]
_PyBUF_FULL_RO = 0x0100 | 0x0010 | 0x0008 | 0x0004  # strides, format, nd (read-only ok)


def buffer_address(obj: Any) -> int:
    """Address of the first byte of *obj*'s buffer (read-only buffers too)."""
    view = _Py_buffer()
    if _get_buffer(obj, ctypes.byref(view), _PyBUF_FULL_RO) != 0:  # pragma: no cover
        raise BufferError("cannot get the buffer's address")
    try:
        return int(view.buf or 0)
    finally:
        _release_buffer(ctypes.byref(view))


class _Region:
    """One mapping of a segment in this process."""

    __slots__ = ("address", "backend", "ident", "name", "shareable", "size")

    def __init__(self, backend: str, ident: str, name: str, size: int, shareable: bool) -> None:
        self.backend = backend
        self.ident = ident
        self.name = name
        self.size = size
        # False for copies received through the sharing pickler: their names
        # go away while views live, so they are re-sent by copy, not by name.
        self.shareable = shareable
        self.address: Optional[int] = None


# Reentrant: weakref callbacks (a slab freed, say) may run while it is held.
_lock = threading.RLock()
# Mapping owner (an mmap, a SysV attachment) -> where it is and what it maps
# (private memory too: see _note_private).
_regions: weakref.WeakKeyDictionary[Any, _Region] = weakref.WeakKeyDictionary()
# (backend, ident) -> mapping owner, to reuse a live mapping on unpickling.
_owners: weakref.WeakValueDictionary[tuple[str, str], Any] = weakref.WeakValueDictionary()


def _mapped(owner: Any) -> bool:
    closed = getattr(owner, "closed", None)  # mmap
    if closed is not None:
        return not closed
    attached = getattr(owner, "attached", None)  # sysv_ipc
    return attached is None or bool(attached)


def note_mapping(
    owner: Any, backend: str, ident: str, name: str, size: int, shareable: bool = True
) -> None:
    """Record that *owner* (the object holding a mapping) maps segment *ident*."""
    region = _Region(backend, ident, name, size, shareable)
    with _lock:
        _regions[owner] = region
        if shareable or (backend, ident) not in _owners:
            _owners[(backend, ident)] = owner


def forget_mapping(owner: Any) -> None:
    """*owner*'s segment is being destroyed: stop sending it by name."""
    with _lock:
        region = _regions.get(owner)
        if region is not None:
            region.shareable = False


def find(address: int, nbytes: int) -> Optional[tuple[Any, _Region, int]]:
    """The live, shareable mapping holding ``[address, address + nbytes)``:
    ``(owner, region, offset)``, or None."""
    if not _regions:
        return None
    with _lock:
        items = list(_regions.items())
    for owner, region in items:
        if not region.shareable or not _mapped(owner):
            continue
        if region.address is None:
            try:
                region.address = buffer_address(owner)
            except (BufferError, ValueError, TypeError):
                continue
        offset = address - region.address
        if offset >= 0 and offset + nbytes <= region.size:
            return owner, region, offset
    return None


def attach_owner(
    backend: str, ident: str, name: str, size: int, made_on: Optional[tuple[str, str]],
    shareable: bool = True, cache: bool = False,
) -> Any:
    """The object holding a mapping of segment *ident*: this process's live
    one if there is one, else (with *cache*) one kept from an earlier
    message (see :class:`mpshm._cache.MappingCache`), else a new attachment's
    (kept for later with *cache*)."""
    check_machine(made_on, name)
    if not (isinstance(backend, str) and isinstance(ident, str)
            and backends.names_agree(backends.get(backend), ident, name)):
        raise HandleError(
            f"invalid shared memory handle: its name {name!r} does not name its segment "
            f"{ident!r} ({backend!r} backend); it was forged or damaged"
        )
    with _lock:
        owner = _owners.get((backend, ident))
    if owner is not None and _mapped(owner):
        region = _regions.get(owner)
        if region is not None and region.size == size:
            if not _cache.mappings.holds(owner):
                return owner
            # Kept alive by the cache, maybe past its name's reuse: check.
            if _cache.mappings.get(backend, ident, size) is owner:
                return owner
            with _lock:
                if _owners.get((backend, ident)) is owner:
                    del _owners[(backend, ident)]
    if cache:
        owner = _cache.mappings.get(backend, ident, size)
        if owner is not None:
            return owner
    from .shared_memory import SharedMemory

    shm = SharedMemory._from_handle(backend, ident, name, size)
    owner = shm._owner()
    identity = None if shm._attachment is None else shm._attachment.identity
    note_mapping(owner, backend, ident, name, size, shareable)
    shm._forget_attachment()  # the owner, referenced by the views, keeps the mapping
    if cache:
        _cache.mappings.put(backend, ident, size, owner, identity)
    return owner


# --------------------------------------------------------------------------
# NumPy arrays that live in a segment

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
    #: The receiver takes the segment over (see ``_Collector._hand_over``).
    given: bool = False


def _array_bounds(arr: numpy.ndarray) -> tuple[int, int, int]:
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


def locate_array(arr: numpy.ndarray) -> Optional[tuple[_ArrayHandle, Any]]:
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
        region.backend, region.ident, region.name, region.size, _MACHINE,
        low_offset + (data - low), tuple(arr.shape), tuple(arr.strides), arr.dtype,
        bool(arr.flags.writeable),
    )
    return handle, owner


def array_handle(arr: numpy.ndarray) -> Optional[_ArrayHandle]:
    """A handle for *arr* if its memory lies in a segment (else None)."""
    located = locate_array(arr)
    return None if located is None else located[0]


def destroy_name(backend: str, ident: str) -> None:
    """Destroy the name of a segment this process owns (or took over), and
    stop tracking it; a name already gone is fine."""
    try:
        backends.get(backend).unlink(ident)
    except (FileNotFoundError, PermissionError):
        pass
    tracking.unregister(backend, ident)


class _Reaper:
    """Destroys segments in a thread of its own: those this process took over
    (a pool's results) once its last view of each is gone, and those a pool
    lent to a task once the task is done.

    Why not at once, in the caller's thread: a segment's pages are freed when
    both its name and its last mapping are gone, whichever goes last, and
    freeing a large segment takes a while (about 0.2 s per GiB of /dev/shm
    here). Doing it in this thread keeps that off the path of the result the
    caller waits for. The segments stay registered with a tracker meanwhile,
    so a crash leaks nothing; :meth:`drain` does what is queued at once.
    """

    def __init__(self) -> None:
        self._reset()
        if hasattr(os, "register_at_fork"):
            os.register_at_fork(after_in_child=self._reset)

    def _reset(self) -> None:
        # A forked child starts without the thread and without the parent's
        # segments (they are the parent's to destroy).
        self._queue: queue.SimpleQueue[tuple[Callable[..., None], tuple[Any, ...]]] = (
            queue.SimpleQueue()
        )
        self._thread: Optional[threading.Thread] = None
        self._lock = threading.RLock()
        self._watched: set[tuple[str, str]] = set()
        self._idle = threading.Condition(threading.Lock())
        self._busy = 0  # jobs the thread is doing now

    def watch(self, owner: Any, backend: str, ident: str) -> None:
        """Destroy *ident*'s name once *owner* (this process's mapping) is gone."""
        with self._lock:
            if (backend, ident) in self._watched:
                return
            self._watched.add((backend, ident))
        finalizer = weakref.finalize(owner, self.later, self._unwatch, backend, ident)
        finalizer.atexit = False  # at exit the tracker takes care of it

    def _unwatch(self, backend: str, ident: str) -> None:
        with self._lock:
            self._watched.discard((backend, ident))
        destroy_name(backend, ident)

    def later(self, job: Callable[..., None], *args: Any) -> None:
        """Run ``job(*args)`` in the reaper's thread."""
        self._queue.put((job, args))
        with self._lock:
            if self._thread is not None:
                return
            thread = threading.Thread(target=self._run, name="mpshm-reaper", daemon=True)
            try:
                thread.start()
            except RuntimeError:  # interpreter shutting down: do it here
                self.drain()
                return
            self._thread = thread

    def pending(self) -> bool:
        """Whether something is queued or being done."""
        return self._busy > 0 or not self._queue.empty()

    def drain(self) -> None:
        """Run what is queued now, in this thread, and wait (a few seconds
        at most) for what the reaper's thread is doing."""
        while True:
            try:
                job, args = self._queue.get_nowait()
            except queue.Empty:
                break
            self._run_one(job, args)
        if threading.current_thread() is not self._thread:
            with self._idle:
                self._idle.wait_for(lambda: self._busy == 0, 5.0)

    @staticmethod
    def _run_one(job: Callable[..., None], args: tuple[Any, ...]) -> None:
        try:
            job(*args)
        except Exception:  # never let the thread die; the tracker is the backstop
            pass

    def _run(self) -> None:
        while True:
            job = self._queue.get()
            with self._idle:
                self._busy += 1
            try:
                self._run_one(*job)
            finally:
                with self._idle:
                    self._busy -= 1
                    self._idle.notify_all()
            del job


#: The process's reaper (see :class:`_Reaper`).
reaper = _Reaper()


def rebuild_array(handle: _ArrayHandle) -> numpy.ndarray:
    """Unpickle an array handle: a zero-copy view of the segment."""
    from .numpy import SharedArray

    if not (isinstance(handle.offset, int) and 0 <= handle.offset <= handle.size):
        raise HandleError(
            f"invalid array handle: offset {handle.offset!r} is not within the "
            f"{handle.size!r} bytes of segment {handle.name!r}"
        )
    owner = attach_owner(
        handle.backend, handle.ident, handle.name, handle.size, handle.machine,
        shareable=not handle.given, cache=_cache.receiving.active and not handle.given,
    )
    if handle.given:
        reaper.watch(owner, handle.backend, handle.ident)
    arr = SharedArray(
        handle.shape, handle.dtype, buffer=memoryview(owner), offset=handle.offset,
        strides=handle.strides,
    )
    if not handle.writable:
        arr.flags.writeable = False
    return arr


# --------------------------------------------------------------------------
# The sharing pickler

class _Descriptor(NamedTuple):
    """An out-of-band buffer: which segment holds it and who owns it."""

    backend: str
    ident: str
    name: str
    size: int
    machine: tuple[str, str]
    offset: int
    nbytes: int
    readonly: bool
    #: "ref": an existing segment; "give": the receiver owns it (unlinks its
    #: name once mapped); "loan": the sender destroys or reuses it (a pool,
    #: per task); "spare": the receiver's own segment, lent to the sender to
    #: write into (a pool's parent, for results).
    kind: str


class Segment(NamedTuple):
    """A segment a carrier made (not mapped by the sender)."""

    backend: Backend
    ident: str
    name: str
    size: int

    @classmethod
    def of(cls, shm: SharedMemory) -> Segment:
        """The segment *shm* maps."""
        assert shm._backend is not None and shm._ident is not None
        return cls(shm._backend, shm._ident, shm.name, shm.size)

    def descriptor(self, offset: int, nbytes: int, readonly: bool, kind: str) -> _Descriptor:
        """How a receiver finds *nbytes* at *offset* in this segment."""
        return _Descriptor(
            self.backend.name, self.ident, self.name, self.size, _MACHINE, offset, nbytes,
            readonly, kind,
        )


class Carrier:
    """Where :class:`SharingPickler` puts buffers it moves into shared memory.

    This one (used by :func:`dumps`) creates a fresh segment per buffer on
    *backend*, registered with the program's tracker, and hands it to the
    receiver. :mod:`mpshm.pool` subclasses it.
    """

    kind = "give"
    #: Whether arrays of :mod:`mpshm.numpy` that this process owns are handed
    #: over to the receiver (a pool worker's results) or sent by reference.
    hands_over = False

    def __init__(
        self, backend: Optional[str] = None, threshold: int = DEFAULT_THRESHOLD,
        **options: Any,
    ) -> None:
        from .shared_memory import _check_size

        self.threshold = _check_size(threshold)
        self.backend, _ = backends.resolve(None, backend, options)
        self.backend.check_options(options)
        self.options = options

    def registry(self) -> Any:
        """Where new segments are registered (see ``shared_memory._generate``)."""
        return tracking

    def kind_of(self, segment: Segment) -> str:
        """Who destroys *segment* (returned by :meth:`carry`): ``"give"``,
        ``"loan"``, or ``"spare"`` for a segment the receiver lent to this
        process to write into (not this carrier's to destroy)."""
        return self.kind

    def new_segment(self, nbytes: int) -> SharedMemory:
        """A fresh, mapped segment of *nbytes* bytes, registered with :meth:`registry`."""
        from .shared_memory import SharedMemory

        shm = SharedMemory._create_in(self.registry(), nbytes, self.backend, self.options)
        shm._note()
        return shm

    def carry(self, raw: memoryview, address: int) -> tuple[Segment, int]:
        """Copy *raw* (whose first byte is at *address*) into a fresh segment
        (written, not mapped: see :meth:`~mpshm.backends.Backend.create_from`);
        return it and the offset there."""
        from .shared_memory import _generate

        backend, options = self.backend, self.options

        def make(ident: str) -> tuple[None, Optional[str]]:
            return None, backend.create_from(ident, raw, options)

        _, ident = _generate(backend, options, self.registry(), make)
        return Segment(backend, ident, backend.qualified(ident), raw.nbytes), 0


_SharedMemory: Optional[type] = None


def _shared_memory_type() -> type:
    """:class:`mpshm.SharedMemory` (imported on first use: it imports this module)."""
    global _SharedMemory
    if _SharedMemory is None:
        from .shared_memory import SharedMemory

        _SharedMemory = SharedMemory
    return _SharedMemory


class _Collector:
    """What a :class:`SharingPickler` adds to pickling: the out-of-band
    buffer callback and the reducers of the types it handles itself.

    A separate object, so that the pickler is not in a reference cycle with
    its own bound methods (the garbage collector clearing memoryviews with
    exports in such a cycle can crash CPython).
    """

    def __init__(self, carrier: Carrier) -> None:
        self.carrier = carrier
        self.descriptors: list[_Descriptor] = []
        self.made: list[Segment] = []
        #: Objects whose segments were sent by reference: a pool keeps them
        #: alive until the task is done (an owned array would destroy its
        #: segment when collected).
        self.kept: list[Any] = []

    def reducers(self) -> dict[type, Callable[[Any], Any]]:
        """Reducers by exact type, for the pickler's dispatch table. (A table
        rather than ``reducer_override``, which CPython would call for every
        object of every other non-builtin type too: 3-4x slower pickling of
        many small objects.) NumPy counts only if something imported it."""
        table: dict[type, Callable[[Any], Any]] = {
            memoryview: self._reduce_memoryview,
            _shared_memory_type(): self._reduce_shared_memory,
        }
        np = sys.modules.get("numpy")
        if np is not None:
            table[np.ndarray] = self._reduce_array
        shared = sys.modules.get("mpshm.numpy")
        if shared is not None:  # its own __reduce_ex__ would not keep it alive
            table[shared.SharedArray] = self._reduce_array
        return table

    @staticmethod
    def _reduce_memoryview(view: memoryview) -> Any:
        return _rebuild_memoryview, (pickle.PickleBuffer(view), view.format, view.shape)

    def _reduce_shared_memory(self, shm: SharedMemory) -> Any:
        self.kept.append(shm)
        return shm.__reduce__()

    def _reduce_array(self, arr: numpy.ndarray) -> Any:
        """A handle for an array in a segment; a large non-contiguous one is
        copied straight into a segment; the rest as NumPy pickles it."""
        located = locate_array(arr)
        if located is not None:
            handle, owner = located
            if self.carrier.hands_over:
                copied = self._copy_from_slab(arr, owner)
                if copied is not None:
                    return copied
            self.kept.append(arr)
            if self.carrier.hands_over and self._hand_over(owner, handle):
                handle = handle._replace(given=True)
            return rebuild_array, (handle,)
        if (
            arr.nbytes >= self.carrier.threshold
            and not arr.dtype.hasobject
            and not (arr.flags.c_contiguous or arr.flags.f_contiguous)
        ):
            # NumPy would copy it into the pickle with tobytes(): copy it
            # once, straight into a segment, instead.
            import numpy as np

            shm = self.carrier.new_segment(arr.nbytes)
            self.made.append(Segment.of(shm))
            dst = np.ndarray(arr.shape, arr.dtype, buffer=shm._buf)
            np.copyto(dst, arr)
            dst.flags.writeable = bool(arr.flags.writeable)  # as the copy arrives
            shm._forget_attachment()  # dst keeps the mapping while pickled
            buffer = pickle.PickleBuffer(dst)  # type: ignore[arg-type]
            return _rebuild_contiguous, (buffer, arr.dtype, arr.shape)
        return arr.__reduce_ex__(5)

    def _hand_over(self, owner: Any, handle: _ArrayHandle) -> bool:
        """Give the receiver a segment this process owns (an array of
        :mod:`mpshm.numpy`, returned by a pool's task, say): it would
        otherwise be destroyed when the sender drops the array, maybe before
        the receiver attaches it."""
        numpy_module = sys.modules.get("mpshm.numpy")
        finalizer = None if numpy_module is None else numpy_module._owned.pop(owner, None)
        if finalizer is None:
            return False
        finalizer.detach()
        forget_mapping(owner)  # this process's later pickles copy it
        chosen = backends.get(handle.backend)  # (made here: a claim proves it on SysV)
        self.carrier.registry().register(chosen, handle.ident,
                                         chosen.claim_identity(handle.ident, os.getpid()))
        return True

    def _copy_from_slab(self, arr: numpy.ndarray, owner: Any) -> Any:
        """Reduce a small :mod:`mpshm.numpy` array that this process keeps in
        a slab shared with its other small arrays (a pool worker's result,
        say) by value: the slab cannot be handed over, and the chunk is reused
        once the sender drops the array. Below the threshold it goes inline;
        from it on, as a copy in a segment of its own, handed over. None if
        *owner* is not such a slab."""
        slabs = sys.modules.get("mpshm._slab")
        if slabs is None or not slabs.owns(owner):
            return None
        import numpy as np

        if arr.nbytes >= self.carrier.threshold:
            copy = sys.modules["mpshm.numpy"]._dedicated_copy(arr, owner)
            if copy is not None:
                return self._reduce_array(copy)
        return np.asarray(arr).view(np.ndarray).__reduce_ex__(5)

    def __call__(self, buffer: pickle.PickleBuffer) -> bool:
        raw = buffer.raw()
        nbytes = raw.nbytes
        if nbytes < self.carrier.threshold or nbytes == 0:
            return True  # inline
        address = buffer_address(raw)
        found = find(address, nbytes)
        if found is not None:
            _, region, offset = found
            kind = "ref"
            if any(seg.ident == region.ident and seg.backend.name == region.backend
                   for seg in self.made):
                kind = self.carrier.kind  # a copy made by _reduce_array
            else:
                self.kept.append(raw.obj)
            self.descriptors.append(_Descriptor(
                region.backend, region.ident, region.name, region.size, _MACHINE,
                offset, nbytes, raw.readonly, kind,
            ))
            return False
        segment, offset = self.carrier.carry(raw, address)
        kind = self.carrier.kind_of(segment)
        if kind != "spare" and segment not in self.made:
            self.made.append(segment)
        # A copy arrives writable if the buffer was (pickle protocol 5's rule).
        self.descriptors.append(segment.descriptor(offset, nbytes, raw.readonly, kind))
        return False


class SharingPickler(pickle.Pickler):
    """A pickler (protocol 5) that sends large buffers through shared memory.

    Use it like :class:`pickle.Pickler` with a :class:`Carrier` that says
    where copied buffers go; pass what it wrote and its :attr:`descriptors`
    to :func:`envelope`, and read the result with :func:`loads`.
    :func:`dumps` does all of it in one step. *dispatch_table* is the table
    of reducers to start from (default: :mod:`copyreg`'s); the pickler adds
    its own for ``memoryview``, ``SharedMemory`` and ``numpy.ndarray``.
    """

    def __init__(
        self, file: Any, carrier: Carrier,
        dispatch_table: Optional[Mapping[Any, Any]] = None,
    ) -> None:
        self._collector = _Collector(carrier)
        super().__init__(file, protocol=5, buffer_callback=self._collector)
        self.carrier = carrier
        table = dict(copyreg.dispatch_table if dispatch_table is None else dispatch_table)
        self._numpy = (sys.modules.get("numpy"), sys.modules.get("mpshm.numpy"))
        table.update(self._collector.reducers())
        self.dispatch_table = table

    def finish(self) -> None:
        """Let go of the message just pickled (the memo, the carrier and the
        lists hold its objects) so that this pickler can be kept for
        :meth:`reuse`; the caller empties the file."""
        self.clear_memo()
        collector = self._collector
        collector.carrier = self.carrier = None  # type: ignore[assignment]
        collector.descriptors = []
        collector.made = []
        collector.kept = []

    def reuse(self, carrier: Carrier) -> bool:
        """Make a pickler let go of by :meth:`finish` ready for another
        message carried by *carrier*; False if it cannot be (a type it has a
        reducer for was imported since: NumPy)."""
        if self._numpy != (sys.modules.get("numpy"), sys.modules.get("mpshm.numpy")):
            return False
        self._collector.carrier = self.carrier = carrier
        return True

    @property
    def descriptors(self) -> list[_Descriptor]:
        """One per out-of-band buffer, in order."""
        return self._collector.descriptors

    @property
    def made(self) -> list[Segment]:
        """Segments made for this pickle (the caller decides their fate)."""
        return self._collector.made

    @property
    def kept(self) -> list[Any]:
        """Objects whose memory was sent by reference, not copied."""
        return self._collector.kept


def _rebuild_memoryview(buffer: Any, fmt: str, shape: tuple[int, ...]) -> memoryview:
    view = memoryview(buffer)
    if view.format != fmt or view.shape != shape:
        view = view.cast("B").cast(fmt, shape)  # type: ignore[call-overload]
    return view


def _rebuild_contiguous(buffer: Any, dtype: Any, shape: tuple[int, ...]) -> Any:
    import numpy as np

    return np.frombuffer(buffer, dtype=dtype).reshape(shape)


def envelope(
    main: bytes, descriptors: list[_Descriptor], about: Any = None, extra: Any = None,
) -> bytes:
    """The bytes :func:`loads` reads: *main* alone if there are no descriptors
    and nothing said *about* the message (what a pool substitutes for it if
    it cannot be unpickled; see :func:`split`) and no *extra* (a pool's
    bookkeeping of warm segments; see :func:`split_message`)."""
    if not descriptors and extra is None:
        if about is None:
            return main
        try:  # (a pool's note alone, of strings and numbers: marshal is quicker)
            note = marshal.dumps(about)
        except ValueError:
            pass
        else:
            return b"".join((_NOTE, _LENGTH.pack(len(main)), main, note))
    parts = (descriptors, about) if extra is None else (descriptors, about, extra)
    table = pickle.dumps(parts, protocol=5)
    return b"".join((_ENVELOPE, _LENGTH.pack(len(main)), main, table))


def dumps(
    obj: Any, *, threshold: int = DEFAULT_THRESHOLD, backend: Optional[str] = None,
    **options: Any,
) -> bytes:
    """Pickle *obj*, moving buffers of *threshold* bytes or more into shared memory.

    Read the result with :func:`loads`, once, on this machine: it takes
    ownership of the segments made for it (unlinking their names; the memory
    lives as long as the views it returns). Segments nobody loads are
    destroyed when this program is over.
    """
    carrier = Carrier(backend, threshold, **options)
    file = io.BytesIO()
    pickler = SharingPickler(file, carrier)
    dump(pickler, obj, lambda failed: discard(failed.made, tracking))
    return envelope(file.getvalue(), pickler.descriptors)


def dump(pickler: SharingPickler, obj: Any, cleanup: Callable[[SharingPickler], None]) -> None:
    """``pickler.dump(obj)``; if it fails, call ``cleanup(pickler)`` and raise
    the error without the pickler's own frames and memo. Those hold
    memoryviews with exports, and an exception kept in a reference cycle
    (a pool keeps it in its result, which its traceback reaches) would put
    them in garbage the collector cannot clear safely (CPython crashes)."""
    try:
        pickler.dump(obj)
    except BaseException as exc:
        cleanup(pickler)
        pickler.clear_memo()
        _drop_tracebacks(exc)
        raise exc


def _drop_tracebacks(exc: BaseException) -> None:
    """Clear the tracebacks of *exc* and of the exceptions it chains to."""
    pending: list[Optional[BaseException]] = [exc]
    seen: set[int] = set()
    while pending:
        current = pending.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        current.__traceback__ = None
        pending += [current.__cause__, current.__context__]


def discard(made: list[Segment], registry: Any) -> None:
    """Destroy segments made for a pickle that will not be sent (or whose
    use is over), and unregister them from *registry*."""
    for segment in made:
        try:
            segment.backend.unlink(segment.ident)
        except FileNotFoundError:
            pass
        finally:
            registry.unregister(segment.backend.name, segment.ident)
    if made:
        _cache.destroyed()


def _take(descriptor: _Descriptor) -> memoryview:
    """Map an out-of-band buffer; take ownership of it if it is given."""
    offset, nbytes, size = descriptor.offset, descriptor.nbytes, descriptor.size
    if not (
        isinstance(offset, int) and isinstance(nbytes, int) and isinstance(size, int)
        and 0 <= offset <= offset + nbytes <= size
    ):
        # Slicing would silently clamp (or count from the end): refuse instead.
        raise HandleError(
            f"invalid shared memory handle: {nbytes!r} bytes at offset {offset!r} do not "
            f"lie within the {size!r} bytes of segment {descriptor.name!r}"
        )
    kind = descriptor.kind
    receiving = _cache.receiving
    warm = receiving.warm
    if warm is not None and kind in ("give", "spare"):
        # A pool's parent receiving a result: its segment joins the pool's
        # warm segments once the result's last view is gone.
        check_machine(descriptor.machine, descriptor.name)
        entry = warm.find(descriptor.backend, descriptor.ident)
        if entry is None:
            if kind == "spare":
                raise HandleError(
                    f"invalid shared memory handle: {descriptor.name!r} is not a segment "
                    "this pool lent"
                )
            owner = attach_owner(
                descriptor.backend, descriptor.ident, descriptor.name, descriptor.size,
                descriptor.machine, shareable=False,
            )
            entry = warm.add(
                Segment(backends.get(descriptor.backend), descriptor.ident,
                        descriptor.name, descriptor.size),
                owner,
            )
        warm.result_size(nbytes)
        return warm.lease(entry, offset, nbytes, descriptor.readonly)
    if kind == "spare":
        raise HandleError(
            f"invalid shared memory handle: {descriptor.name!r} was lent by a pool to "
            "its workers and cannot be read here"
        )
    if kind != "ref" and not descriptor.readonly:
        return _private(descriptor, receiving.leases if kind == "loan" else None)
    cache = receiving.active and kind != "give"
    owner = attach_owner(
        descriptor.backend, descriptor.ident, descriptor.name, descriptor.size,
        descriptor.machine, shareable=kind == "ref", cache=cache,
    )
    if kind == "give":
        reaper.watch(owner, descriptor.backend, descriptor.ident)
    leases = receiving.leases
    if kind == "loan" and leases is not None:
        # The sender reuses the segment once this process reports the lease gone.
        owned = _cache.lease(owner, offset, nbytes)
        leases.append((descriptor.backend, descriptor.ident, weakref.ref(owned)))
        return _cache.lease_view(owned, descriptor.readonly)
    view = memoryview(owner)[offset : offset + nbytes]
    return view.toreadonly() if descriptor.readonly else view


def _note_private(owner: Any, backend: str, ident: str, name: str, size: int) -> None:
    """Record that private memory *owner* (a private mapping, or a copy of
    *size* bytes) came from segment *ident*: never sent by reference, never
    reused for another message naming the segment."""
    with _lock:
        _regions[owner] = _Region(backend, ident, name, size, False)


def _gone() -> None:
    """A lease that is already gone (see :func:`_private`)."""
    return None


def _private(
    descriptor: _Descriptor, leases: Optional[list[tuple[str, str, Any]]],
) -> memoryview:
    """A writable view of a buffer the sender copied (kinds give and loan),
    as pickling gives it: the receiver's own memory, whose changes nobody
    else sees. A private (copy-on-write) mapping of the segment where the
    storage can map one, else a copy. With *leases* (a pool's worker receiving
    task arguments), the private memory is kept for the next message (see
    :class:`mpshm._cache.PrivateCopies`) and the segment's lease recorded there."""
    backend, ident, name, size = (
        descriptor.backend, descriptor.ident, descriptor.name, descriptor.size)
    offset, nbytes = descriptor.offset, descriptor.nbytes
    give = descriptor.kind == "give"
    check_machine(descriptor.machine, name)
    kept = None if leases is None else _cache.private.take(backend, ident, size)
    if kept is None:
        from .shared_memory import SharedMemory

        try:
            shm = SharedMemory._from_handle(backend, ident, name, size, private=True)
        except NotImplementedError:
            return _private_copy(descriptor, leases)
        kept = shm._owner(), None if shm._attachment is None else shm._attachment.identity
        shm._forget_attachment()  # the owner, referenced by the views, keeps the mapping
        _note_private(kept[0], backend, ident, name, size)
    owner, identity = kept
    if give:
        reaper.watch(owner, backend, ident)
    if leases is None:
        return memoryview(owner)[offset : offset + nbytes]
    owned = _cache.private.lease(owner, offset, nbytes, backend, ident, size, identity)
    leases.append((backend, ident, weakref.ref(owned)))
    return _cache.lease_view(owned, False)


def _private_copy(
    descriptor: _Descriptor, leases: Optional[list[tuple[str, str, Any]]],
) -> memoryview:
    """:func:`_private` for a storage that cannot map privately (System V):
    the bytes copied out of the segment into private memory."""
    backend, ident, offset, nbytes = (
        descriptor.backend, descriptor.ident, descriptor.offset, descriptor.nbytes)
    source = attach_owner(
        backend, ident, descriptor.name, descriptor.size, descriptor.machine,
        shareable=False, cache=leases is not None,
    )
    if descriptor.kind == "give":
        reaper.watch(source, backend, ident)
    if nbytes == 0:
        return memoryview(bytearray())
    kept = None if leases is None else _cache.private.take("", "", nbytes)
    copy = _cache.anonymous(nbytes) if kept is None else kept[0]
    memoryview(copy)[:nbytes] = memoryview(source)[offset : offset + nbytes]
    del source
    _note_private(copy, backend, ident, descriptor.name, nbytes)
    if leases is None:
        return memoryview(copy)
    owned = _cache.private.lease(copy, 0, nbytes, "", "", nbytes, None)
    leases.append((backend, ident, _gone))  # the segment is not looked at any more
    return _cache.lease_view(owned, False)


def split(data: bytes) -> tuple[memoryview, list[_Descriptor], Any]:
    """The pickle, the out-of-band descriptors and the *about* note of *data*
    (see :func:`envelope`)."""
    main, descriptors, about, _ = split_message(data)
    return main, descriptors, about


def split_message(data: bytes) -> tuple[memoryview, list[_Descriptor], Any, Any]:
    """:func:`split`, and the *extra* of :func:`envelope` (or None)."""
    view = memoryview(data)
    head = view[: len(_ENVELOPE)]
    if head != _ENVELOPE:
        if head != _NOTE:
            return view, [], None, None
        start = len(_NOTE) + _LENGTH.size
        (length,) = _LENGTH.unpack_from(view, len(_NOTE))
        return view[start : start + length], [], marshal.loads(view[start + length :]), None
    start = len(_ENVELOPE) + _LENGTH.size
    (length,) = _LENGTH.unpack_from(view, len(_ENVELOPE))
    table = pickle.loads(view[start + length :])
    descriptors, about = table[0], table[1]
    extra = table[2] if len(table) > 2 else None
    return view[start : start + length], descriptors, about, extra


def load_parts(main: Any, descriptors: list[_Descriptor]) -> Any:
    """Unpickle *main*, mapping the out-of-band buffers *descriptors* name."""
    if not descriptors:
        return pickle.loads(main)
    return pickle.loads(main, buffers=[_take(descriptor) for descriptor in descriptors])


def loads(data: bytes) -> Any:
    """Unpickle what :func:`dumps` (or a pool's pickler) made.

    Buffers that travelled by handle come back as zero-copy views of their
    segments; those the sender copied as the receiver's own private copies,
    writable if the sender's buffer was (see the module docstring).
    """
    main, descriptors, _ = split(data)
    return load_parts(main, descriptors)
