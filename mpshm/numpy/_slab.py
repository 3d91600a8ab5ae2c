"""Small arrays carved out of shared slabs (used by :mod:`mpshm.numpy`).

A segment per small array costs a name, a mapping, a message to the tracker
and some 50-250 microseconds; ten thousand of them mean ten thousand entries
in ``/dev/shm`` (or SysV identifiers, or files) and mappings. Instead,
allocations of at most :data:`SLAB_LIMIT` bytes are chunks of *slabs*:
ordinary tracked segments of 4 KiB to 4 MiB, made on the requested backend
(with its options), mapped once in the creating process and once in each
process that receives a handle into them.

The allocator is a segregated-fit one: sizes are rounded up to a size class
(multiples of 64 bytes up to 512, then four classes per doubling up to
:data:`SLAB_LIMIT`, so at most 63 bytes or 25 % is lost to rounding), and each slab
serves one class (and one backend with its options), which makes chunks
64-byte aligned and never overlapping by construction. A slab hands out
fresh chunks by bumping an offset (fresh memory reads as zeros), then the
chunks freed before (a free list, dirty). A chunk is freed when its array
and every view of it are gone (a weak reference to the chunk's buffer
object, the base that every view keeps alive); a slab whose chunks are all free is destroyed
at once, like a dedicated segment whose array is gone.

A chunk is not reused while this process may still reach it other than
through its own buffer object: an array unpickled from a handle in the process
that made it is a view of the slab's whole mapping, and keeps only the
mapping alive. So while anything but the slab itself references the mapping
(counted with :func:`sys.getrefcount`, which only errs on the safe side),
freed chunks of that slab wait in a quarantine.

Threads: one lock per process. Frees come from weak reference callbacks,
which can run anywhere (the garbage collector, inside an allocation): they
are queued and done by whoever holds the lock, never waited for.

Fork: the child starts with an empty allocator (:func:`os.register_at_fork`):
the slabs it inherited stay the parent's (their names, their chunks); what
the child allocates goes to slabs of its own.
"""

from __future__ import annotations

import atexit
import bisect
import collections
import ctypes
import os
import sys
import threading
import time
import weakref
from typing import TYPE_CHECKING, Any, Mapping, Optional

from .. import tracking
from .._mappings import destroy_name, forget_mapping
from .._sysinfo import buffer_address
from ..shared_memory import create_mapping

if TYPE_CHECKING:
    from ..backends import Backend

__all__ = [
    "ALIGNMENT", "SLAB_LIMIT", "SLAB_MAX", "SLAB_SIZE", "Slab", "allocate", "chunk_size", "heap",
    "inherited", "origin", "owns", "release",
]

#: Allocations of at most this many bytes come from slabs. Above it, a
#: dedicated segment's fixed costs (a name, a mapping, a tracker message,
#: tens of microseconds) are small next to writing the data itself, and its
#: page rounding wastes at most 6 %; below it, they dominate.
SLAB_LIMIT = 64 * 1024
#: Chunks start at multiples of this (a cache line; slabs are page-aligned).
ALIGNMENT = 64
#: The first slab of a size class: this size, or four chunks if larger. Each
#: further live slab of the class is twice the size of the one before, up to
#: :data:`SLAB_MAX`. Small first slabs keep the cost of a program that makes
#: and drops one small array at a time (a slab made and destroyed each time)
#: close to that of a dedicated segment; doubling keeps the segment count
#: logarithmic in the number of live arrays up to :data:`SLAB_MAX`, linear
#: (a slab per 4 MiB) beyond.
SLAB_SIZE = 4096
#: The largest slab (slabs are reserved whole at creation: see
#: :func:`mpshm.backends._files.reserve`).
SLAB_MAX = 4 << 20
#: Seconds between checks that a slab in use still has its name.
CHECK_EVERY = 0.05


def _size_classes() -> list[int]:
    sizes = list(range(ALIGNMENT, 513, ALIGNMENT))
    while sizes[-1] < SLAB_LIMIT:
        base = sizes[-1]
        sizes += [base + base * k // 4 for k in range(1, 5)]
    return sizes


_CLASSES = _size_classes()


def chunk_size(nbytes: int) -> int:
    """The size of the chunk an allocation of *nbytes* (at most
    :data:`SLAB_LIMIT`) takes: its size class."""
    return _CLASSES[bisect.bisect_left(_CLASSES, max(nbytes, 1))]


_chunk_types: dict[int, Any] = {}


def _chunk_type(chunk: int) -> Any:
    """The ctypes array type of a chunk: NumPy keeps such an object as the
    base of an array made on it (a memoryview it would see through, keeping
    the mapping's owner instead), so its life is that of the array's views.
    Made from the slab's memoryview, it does not reference the owner itself."""
    found = _chunk_types.get(chunk)
    if found is None:
        found = _chunk_types[chunk] = ctypes.c_char * chunk
    return found


class _Chunk(weakref.ref):  # type: ignore[type-arg]
    """The weak reference that frees a chunk when its buffer object dies."""

    __slots__ = ("offset", "slab")

    slab: Slab
    offset: int


def _dead(ref: _Chunk) -> None:
    try:
        slab = ref.slab
        slab.heap.free(slab, ref.offset)
    except Exception:  # pragma: no cover  (interpreter shutdown: the tracker cleans up)
        pass


class Slab:
    """One segment cut into chunks of one size."""

    __slots__ = (
        "address", "backend", "bump", "checked", "chosen", "chunk", "free", "heap", "ident",
        "identity", "key", "listed", "live", "name", "owner", "quarantine", "references",
        "released", "retired", "size", "vanished", "view",
    )

    def __init__(
        self, heap: _Heap, key: tuple[Any, ...], chunk: int, size: int, chosen: Backend,
        options: Mapping[str, Any],
    ) -> None:
        # Noted: arrays in it are found by address, and pickle as handles.
        mapped = create_mapping(size, chosen, options, tracking)
        self.heap = heap
        self.key = key
        self.chunk = chunk
        self.size = mapped.size
        self.backend = mapped.backend.name
        self.ident = mapped.ident
        self.name = mapped.name
        self.chosen = chosen
        self.identity = mapped.identity
        self.checked = time.monotonic()
        self.vanished = False
        self.owner = mapped.owner
        _made[self.owner] = os.getpid()
        del mapped
        self.view: memoryview = memoryview(self.owner)
        self.address = buffer_address(self.owner)
        self.bump = 0  # chunks from here on were never handed out: zeros
        self.free: list[int] = []  # offsets of freed chunks (dirty)
        self.quarantine: list[int] = []  # freed while the mapping was referenced
        self.live: dict[int, _Chunk] = {}
        self.released: set[int] = set()  # live chunks whose arrays were released
        self.listed = False  # in its class's list of slabs with room
        self.retired = False
        self.references = 0
        self.references = self._references()  # the slab's own: the baseline

    def _references(self) -> int:
        return sys.getrefcount(self.owner)

    def referenced(self) -> bool:
        """Whether something besides the slab references its mapping (an
        array unpickled in this process, a ``memoryview(owner)``, or a
        moment's reference from :func:`mpshm._mappings.find`)."""
        return self._references() > self.references

    def present(self) -> bool:
        """Whether the slab's name still refers to it (someone else may have
        unlinked it: ``SharedMemory(name).unlink()``); checked at most every
        :data:`CHECK_EVERY` seconds, when a chunk is taken from it."""
        now = time.monotonic()
        if now - self.checked < CHECK_EVERY or self.identity is None:
            return True
        self.checked = now
        try:
            return self.chosen.identity(self.ident) == self.identity
        except OSError:
            return True  # cannot tell: keep using it

    def __repr__(self) -> str:
        return (f"<Slab {self.name!r} chunk={self.chunk} size={self.size} "
                f"live={len(self.live)} free={len(self.free)} bump={self.bump}>")


class _Heap:
    """The allocator of one process (see the module docstring)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.pending: collections.deque[tuple[Slab, int]] = collections.deque()
        #: (backend, options, chunk) -> slabs of that class with room, and all of them.
        self.room: dict[tuple[Any, ...], list[Slab]] = {}
        self.count: dict[tuple[Any, ...], int] = {}
        #: id(owner) -> slab, for the slabs this process made and not retired.
        self.slabs: dict[int, Slab] = {}

    # -- the lock, and the frees queued while someone held it

    def _leave(self, doomed: list[Slab]) -> None:
        """Do the queued frees, release the lock, destroy *doomed* slabs."""
        try:
            self._do_pending(doomed)
        finally:
            self.lock.release()
        if self.pending:
            self._drain(doomed)
        for slab in doomed:
            _destroy(slab)
        doomed.clear()

    def _drain(self, doomed: list[Slab]) -> None:
        while self.pending:
            if not self.lock.acquire(blocking=False):
                return  # the holder does them before it lets go
            try:
                self._do_pending(doomed)
            finally:
                self.lock.release()

    def _do_pending(self, doomed: list[Slab]) -> None:
        pending = self.pending
        while pending:
            slab, offset = pending.popleft()
            self._free(slab, offset, doomed)

    # -- allocating

    def allocate(
        self, nbytes: int, chosen: Backend, options: Mapping[str, Any], optkey: Any,
        zero: bool,
    ) -> tuple[Any, Slab, int]:
        """A chunk of at least *nbytes* bytes: ``(its buffer, slab, offset)``.
        The buffer's lifetime is the chunk's; *zero* clears a reused chunk."""
        chunk = chunk_size(nbytes)
        key = (chosen.name, optkey, chunk)
        doomed: list[Slab] = []
        self.lock.acquire()
        try:
            found = self._take(key, doomed)
            if found is None:
                count = self.count.get(key, 0)
                size = min(SLAB_MAX, max(SLAB_SIZE, 4 * chunk) << min(count, 16))
                slab = Slab(self, key, chunk, size, chosen, options)
                self.count[key] = count + 1
                self.slabs[id(slab.owner)] = slab
                slab.listed = True
                self.room.setdefault(key, []).append(slab)
                found = self._take(key, doomed)
                assert found is not None
            slab, offset, dirty = found
            view = _chunk_type(chunk).from_buffer(slab.view, offset)
            ref = _Chunk(view, _dead)
            ref.slab = slab
            ref.offset = offset
            slab.live[offset] = ref
        finally:
            self._leave(doomed)
        if dirty and zero:
            ctypes.memset(slab.address + offset, 0, chunk)
        return view, slab, offset

    def _take(
        self, key: tuple[Any, ...], doomed: list[Slab]
    ) -> Optional[tuple[Slab, int, bool]]:
        """A chunk of class *key* from a slab that has room: (slab, offset, dirty)."""
        room = self.room.get(key)
        while room:
            slab = room[-1]
            if not slab.present():
                # Its name is gone: new arrays there could not be sent by handle.
                slab.vanished = True
                self._retire(slab, doomed)
                continue
            if slab.quarantine and not slab.referenced():
                slab.free += slab.quarantine
                slab.quarantine = []
            if slab.free:
                return slab, slab.free.pop(), True
            if slab.bump + slab.chunk <= slab.size:
                offset = slab.bump
                slab.bump += slab.chunk
                return slab, offset, False
            room.pop()
            slab.listed = False
        return None

    # -- freeing

    def free(self, slab: Slab, offset: int) -> None:
        """Free a chunk (from its weak reference's callback, any thread)."""
        if slab.heap is not _heap:
            return  # a slab of the parent, inherited by fork: not ours
        self.pending.append((slab, offset))
        doomed: list[Slab] = []
        self._drain(doomed)
        for doomed_slab in doomed:
            _destroy(doomed_slab)

    def _free(self, slab: Slab, offset: int, doomed: list[Slab]) -> None:
        if slab.live.pop(offset, None) is None:
            return
        slab.released.discard(offset)
        if slab.retired:
            return
        if slab.referenced():
            slab.quarantine.append(offset)
        else:
            slab.free.append(offset)
        if not slab.live or (slab.released and len(slab.released) == len(slab.live)):
            self._retire(slab, doomed)
        elif not slab.listed:
            slab.listed = True
            self.room.setdefault(slab.key, []).append(slab)

    def _retire(self, slab: Slab, doomed: list[Slab]) -> None:
        """Take *slab* out of service; its name is destroyed by the caller."""
        slab.retired = True
        self.slabs.pop(id(slab.owner), None)
        self.count[slab.key] -= 1
        if slab.listed:
            slab.listed = False
            self.room[slab.key].remove(slab)
        doomed.append(slab)

    def release(self, owner: Any, offset: int) -> bool:
        """``mpshm.numpy.release()`` of an array at *offset* in *owner*'s
        mapping: False if *owner* is not a slab of this process. Else the
        chunk is marked released, and the slab's name destroyed if every
        live chunk in it is."""
        doomed: list[Slab] = []
        self.lock.acquire()
        try:
            slab = self.slabs.get(id(owner))
            if slab is None or slab.owner is not owner:
                return False
            start = offset - offset % slab.chunk
            if start in slab.live:
                slab.released.add(start)
            if len(slab.released) == len(slab.live):
                self._retire(slab, doomed)
            return True
        finally:
            self._leave(doomed)

    def owns(self, owner: Any) -> bool:
        """Whether *owner* is the mapping of a slab this process made (and
        has not destroyed)."""
        slab = self.slabs.get(id(owner))
        return slab is not None and slab.owner is owner

    def destroy_all(self) -> None:
        """Destroy every slab's name (at exit: the views stay valid)."""
        doomed: list[Slab] = []
        self.lock.acquire()
        try:
            for slab in list(self.slabs.values()):
                self._retire(slab, doomed)
        finally:
            self._leave(doomed)


def _destroy(slab: Slab) -> None:
    forget_mapping(slab.owner)  # this process's later pickles copy
    if slab.vanished:  # (the name may be someone else's by now)
        tracking.unregister(slab.backend, slab.ident)
    else:
        destroy_name(slab.backend, slab.ident)


_heap = _Heap()
#: The mapping owner of every slab this process (or a parent it was forked
#: from) made -> the pid of the maker.
_made: weakref.WeakKeyDictionary[Any, int] = weakref.WeakKeyDictionary()


def heap() -> _Heap:
    """This process's allocator."""
    return _heap


def _after_fork_in_child() -> None:
    global _heap
    _heap = _Heap()


os.register_at_fork(after_in_child=_after_fork_in_child)


@atexit.register
def _at_exit() -> None:
    # Like the finalizers of dedicated segments: names go at exit (the
    # tracker would destroy them a little later anyway).
    try:
        _heap.destroy_all()
    except Exception:  # pragma: no cover
        pass


def allocate(
    nbytes: int, chosen: Backend, options: Mapping[str, Any], zero: bool
) -> Any:
    """A buffer (a ctypes array) of a chunk of at least *nbytes* bytes in a slab on
    *chosen* (made with *options*), or None if *options* cannot key a slab
    (unhashable values). *zero* clears a reused chunk (a fresh one is zeros)."""
    try:
        optkey = tuple(sorted(options.items())) if options else ()
        hash(optkey)
    except TypeError:
        return None
    return _heap.allocate(nbytes, chosen, options, optkey, zero)[0]


def owns(owner: Any) -> bool:
    """Whether *owner* (a mapping owner, see :func:`mpshm._mappings.find`)
    is a slab this process made."""
    return _heap.owns(owner)


def release(owner: Any, offset: int) -> bool:
    """See :meth:`_Heap.release`."""
    return _heap.release(owner, offset)


def inherited(owner: Any) -> bool:
    """Whether *owner* is the mapping of a slab made by another process
    (the parent of this forked one)."""
    return _made.get(owner, os.getpid()) != os.getpid()


def origin(owner: Any) -> Optional[tuple[str, dict[str, Any]]]:
    """The backend and options of this process's slab mapped by *owner*."""
    slab = _heap.slabs.get(id(owner))
    if slab is None or slab.owner is not owner:
        return None
    return slab.backend, dict(slab.key[1])
