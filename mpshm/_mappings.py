"""What this process has mapped, and the mappings it keeps.

* The registry of mappings (:func:`note_mapping`, :func:`find`): which
  object holds a mapping of which segment, so that the pickler can send a
  buffer that lies in a segment by reference, and unpickling can reuse a
  mapping this process already has.
* The reaper (:data:`reaper`): destroys, in a thread of its own, segments
  this process took over once their last view is gone.
* The caches of mappings kept across messages, bounded in bytes and given
  back when idle (a background thread sweeps them every
  :data:`SWEEP_INTERVAL` seconds): :class:`MappingCache` (a segment sent
  again is not mapped again; a hit is checked against the storage object's
  identity, so a reused name is never mistaken for the old segment) and
  :class:`PrivateCopies` (a pool worker's private memory of writable
  arguments, scrubbed and reused, see :func:`scrub`).
* Leases (:func:`lease`): small objects exporting a range of a mapping,
  which every view keeps alive, so that a reused segment never changes
  under anyone who still looks at it.

The pool's warm segments, built on these, are in :mod:`mpshm.pool.warm`;
``docs/performance.md`` says what all of it buys.
"""

from __future__ import annotations

import collections
import ctypes
import mmap
import os
import queue
import re
import threading
import time
import weakref
from typing import Any, Callable, Optional

from . import backends, tracking
from ._sysinfo import buffer_address
from .backends._huge import madvise

#: Seconds between two sweeps of the caches.
SWEEP_INTERVAL = 0.5
def _idle_seconds() -> float:
    try:
        value = float(os.environ.get("MPSHM_CACHE_IDLE", "5"))
    except ValueError:
        return 5.0
    return value if value >= 0 else 5.0


#: Seconds a cached mapping or warm segment may stay unused before it is
#: released (environment variable ``MPSHM_CACHE_IDLE``, default 5).
IDLE_SECONDS = _idle_seconds()


def default_limit() -> int:
    """Bytes a cache may hold by default: a quarter of physical memory, at most 4 GiB."""
    try:
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # pragma: no cover
        ram = 4 << 30
    return int(min(ram // 4, 4 << 30))


#: Fraction of the storage's room (its free space plus what the cache itself
#: holds) that a pool's warm segments may hold, whatever *limit* allows.
CACHE_FRACTION = 0.25

#: Seconds a reading of a storage's free space is reused (one ``statvfs``).
SPACE_INTERVAL = 0.5


#: Free bytes of a storage now, or None where that cannot be told (see
#: :meth:`mpshm.backends.Backend.free_space`).
FreeSpace = Callable[[], Optional[int]]


def _unknown() -> Optional[int]:
    return None


class Room:
    """Bytes the storage would have free (``free()``) if its user gave back
    what it holds (``held()``), read at most every :data:`SPACE_INTERVAL`
    seconds; None where that is unknown."""

    def __init__(self, free: Optional[FreeSpace], held: Callable[[], int]) -> None:
        self.free: FreeSpace = _unknown if free is None else free
        self._held = held
        self._at = float("-inf")
        self._room: Optional[int] = None

    def __call__(self) -> Optional[int]:
        if self.free is _unknown:
            return None
        now = time.monotonic()
        if now - self._at >= SPACE_INTERVAL:
            self._at = now
            try:
                free = self.free()
            except Exception:
                free = None
            self._room = None if free is None else free + self._held()
        return self._room


#: Seconds a creation that found the storage full waits for workers to drop
#: their mappings of the warm segments given back (see WarmSegments.reclaim).
RECLAIM_WAIT = 2.0


# Caches that give back what they hold when a creation finds the storage full.
reclaimable: weakref.WeakSet[Any] = weakref.WeakSet()


_destroyed_at = float("-inf")


def destroyed() -> None:
    """This process has just destroyed segments it made for messages (see
    :func:`reclaim`)."""
    global _destroyed_at
    _destroyed_at = time.monotonic()


def reclaim() -> bool:
    """The storage is full: every cache of this process gives back what it
    holds (called by a creation that failed with ENOSPC, before it tries
    once more). True if any cache had something to give back, or if this
    process destroyed segments in the last :data:`RECLAIM_WAIT` seconds:
    then it waits until pool workers have swept their caches (a worker's
    kept mapping of a destroyed segment holds its memory until then)."""
    freed = False
    for cache in list(reclaimable):
        try:
            freed = bool(cache.reclaim()) or freed
        except Exception:
            pass
    if not freed and time.monotonic() - _destroyed_at < RECLAIM_WAIT:
        time.sleep(SWEEP_INTERVAL * 1.5)
        freed = True
    return freed


def fits(nbytes: int, size: int) -> bool:
    """Whether a segment of *size* bytes is worth reusing for *nbytes* bytes
    (big enough, and not wasting more than a quarter or 64 KiB)."""
    return nbytes <= size <= nbytes + max(nbytes // 4, 64 << 10)


# --------------------------------------------------------------------------
# Leases: weakly referenceable exporters of a range of a mapping

_lease_types: dict[int, type] = {}


def lease(owner: Any, offset: int, nbytes: int) -> Any:
    """An object exporting ``owner[offset:offset + nbytes]`` (writable), which
    supports weak references: views made from it keep it alive, so its death
    says that no view of the range is left."""
    kind = _lease_types.get(nbytes)
    if kind is None:
        if len(_lease_types) >= 256:
            _lease_types.clear()
        kind = type("Lease", (ctypes.c_char * nbytes,), {"__module__": __name__})
        _lease_types[nbytes] = kind
    return kind.from_buffer(owner, offset)  # type: ignore[attr-defined]


def lease_view(owned: Any, readonly: bool) -> memoryview:
    """A flat byte view of lease *owned* (read-only if asked)."""
    view = memoryview(owned).cast("B")
    return view.toreadonly() if readonly else view


def current_identity(backend: str, ident: str) -> Optional[str]:
    """The identity (see :meth:`mpshm.backends.Backend.identity`) of the
    object named *ident* now, or None if there is none or it cannot be
    told (one system call for the built-in backends)."""

    try:
        return backends.get(backend).identity(ident)
    except Exception:
        return None


# --------------------------------------------------------------------------
# The sweeper

class _Sweeper:
    """One daemon thread per process that sweeps the registered caches."""

    def __init__(self) -> None:
        self._reset()
        os.register_at_fork(after_in_child=self._reset)

    def _reset(self) -> None:
        self._lock = threading.RLock()
        self._caches: weakref.WeakSet[Any] = weakref.WeakSet()
        self._thread: Optional[threading.Thread] = None

    def add(self, cache: Any) -> None:
        """Sweep *cache* from now on (for as long as it lives)."""
        with self._lock:
            self._caches.add(cache)
            if self._thread is not None:
                return
            thread = threading.Thread(target=self._run, name="mpshm-cache-sweeper", daemon=True)
            try:
                thread.start()
            except RuntimeError:  # interpreter shutting down
                return
            self._thread = thread

    def _run(self) -> None:
        while True:
            time.sleep(SWEEP_INTERVAL)
            with self._lock:
                caches = list(self._caches)
            for cache in caches:
                try:
                    cache.sweep()
                except Exception:  # never let the thread die
                    pass
            del caches


sweeper = _Sweeper()


# --------------------------------------------------------------------------
# Receiving side: mappings kept across messages

class _Mapped:
    __slots__ = ("identity", "last", "owner", "size")

    def __init__(self, owner: Any, size: int, identity: Optional[str]) -> None:
        self.owner = owner
        self.size = size
        self.identity = identity
        self.last = time.monotonic()


class _Kept:
    """Mappings (or buffers) kept for later messages, by key: least recently
    kept first out, at most *limit* bytes, none unused for more than *idle*
    seconds and none whose segment's name is gone (swept by the sweeper, or
    at once by :meth:`reclaim`). Keys are ``(backend, ident)`` of a segment;
    a backend ``""`` marks an entry that names no segment."""

    def __init__(self, limit: Optional[int] = None, idle: Optional[float] = None) -> None:
        self.limit = default_limit() if limit is None else limit
        self.idle = IDLE_SECONDS if idle is None else idle
        self._reset()
        os.register_at_fork(after_in_child=self._reset)

    def _reset(self) -> None:
        self._lock = threading.RLock()
        self._entries: collections.OrderedDict[tuple[str, str], _Mapped] = (
            collections.OrderedDict()
        )
        self._bytes = 0
        self._ids: set[int] = set()  # id() of the kept owners
        self._registered = False
        reclaimable.add(self)

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def nbytes(self) -> int:
        """Bytes held."""
        return self._bytes

    def _keep(self, key: tuple[str, str], entry: _Mapped) -> None:
        """Keep *entry* under *key* (in place of any other), then let go of
        the least recently kept ones beyond :attr:`limit`."""
        dropped = []
        with self._lock:
            old = self._entries.pop(key, None)
            if old is not None:
                self._forget(old)
                dropped.append(old)
            self._entries[key] = entry
            self._ids.add(id(entry.owner))
            self._bytes += entry.size
            while self._bytes > self.limit and self._entries:
                _, victim = self._entries.popitem(last=False)
                self._forget(victim)
                dropped.append(victim)
            register = not self._registered
            self._registered = True
        if register:
            sweeper.add(self)
        del dropped  # unmapped here, outside the lock

    def _forget(self, entry: _Mapped) -> None:  # (lock held)
        self._bytes -= entry.size
        self._ids.discard(id(entry.owner))

    def _pop(self, key: tuple[str, str]) -> Optional[_Mapped]:
        """The entry under *key*, no longer kept."""
        with self._lock:
            entry = self._entries.pop(key, None)
            if entry is not None:
                self._forget(entry)
        return entry

    def _drop(self, key: tuple[str, str], entry: _Mapped) -> bool:
        """Let go of *entry* if it is still the one under *key*."""
        with self._lock:
            if self._entries.get(key) is not entry:
                return False
            del self._entries[key]
            self._forget(entry)
        return True

    def sweep(self, idle: Optional[float] = None) -> bool:
        """Drop entries unused for more than *idle* seconds (default
        :attr:`idle`), and mappings whose name is gone; True if any."""
        now = time.monotonic()
        idle = self.idle if idle is None else idle
        with self._lock:
            items = list(self._entries.items())
        dropped = False
        for (backend, ident), entry in items:
            if now - entry.last > idle or (
                backend and current_identity(backend, ident) != entry.identity
            ):
                dropped = self._drop((backend, ident), entry) or dropped
        return dropped

    def reclaim(self) -> bool:
        """The storage is full: drop the mappings of segments whose names are
        gone (a mapping keeps an unlinked segment's memory). True if any."""
        return self.sweep(idle=float("inf"))

class MappingCache(_Kept):
    """Mappings of segments this process received, kept for the next message
    that names them (see :class:`_Kept`)."""

    def holds(self, owner: Any) -> bool:
        """Whether *owner* is one of the cached mappings."""
        return id(owner) in self._ids

    def get(self, backend: str, ident: str, size: int) -> Any:
        """The cached mapping owner of *ident* if it is still the segment of
        that name and size, else None (and the stale entry is dropped)."""
        key = (backend, ident)
        with self._lock:
            entry = self._entries.get(key)
        if entry is None:
            return None
        if entry.size == size and current_identity(backend, ident) == entry.identity:
            with self._lock:
                if self._entries.get(key) is entry:
                    self._entries.move_to_end(key)
                    entry.last = time.monotonic()
            return entry.owner
        self._drop(key, entry)
        return None

    def put(self, backend: str, ident: str, size: int, owner: Any,
            identity: Optional[str]) -> None:
        """Keep *owner* (a mapping of *ident* with *identity*) for later."""
        if identity is None or size > self.limit:
            return
        self._keep((backend, ident), _Mapped(owner, size, identity))


#: This process's cache of received mappings.
mappings = MappingCache()


# --------------------------------------------------------------------------
# Receiving side: private memory of writable copies, kept across messages

# /proc/self/pagemap has 8 bytes per page; in the last one, bit 7 says
# "present", bit 6 "swapped" and bit 5 "a file's page" (or shared memory's).
# A page of a private file mapping that is present but not the file's, or
# swapped, was copied on write.
_WRITTEN = bytes(1 if (b & 0x80 and not b & 0x20) or b & 0x40 else 0 for b in range(256))
_RUNS = re.compile(b"\x01+")
_MADV_DONTNEED = 4


def scrub(owner: Any, offset: int, nbytes: int) -> bool:
    """Make bytes ``[offset, offset + nbytes)`` of private mapping *owner*
    (an :class:`mmap.mmap` nothing looks at any more) show its segment again:
    drop the pages there it copied on write (``madvise(MADV_DONTNEED)``;
    found in ``/proc/self/pagemap``). False if that cannot be done (no
    pagemap): the mapping must then not be reused."""


    page = mmap.PAGESIZE
    try:
        address = int(ctypes.addressof(ctypes.c_char.from_buffer(owner))) + offset
        fd = os.open("/proc/self/pagemap", os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    except (OSError, TypeError, ValueError, BufferError):
        return False
    address, nbytes = address - address % page, nbytes + address % page
    pages = -(-nbytes // page)
    try:
        table = os.pread(fd, pages * 8, address // page * 8)
    except OSError:
        return False
    finally:
        os.close(fd)
    if len(table) != pages * 8:
        return False
    for run in _RUNS.finditer(table[7::8].translate(_WRITTEN)):
        start, end = run.span()
        if madvise(address + start * page, (end - start) * page, _MADV_DONTNEED) != 0:
            return False
    return True


def anonymous(nbytes: int) -> mmap.mmap:
    """Private memory of *nbytes* bytes (> 0) for a copy, page-aligned."""
    return mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE)


class PrivateCopies(_Kept):
    """Private memory that writable copies received by a pool's worker (task
    arguments) lived in, kept for the next message: copy-on-write mappings
    of segments (by segment), and, for storages that cannot map privately
    (System V), buffers (by size) the bytes are copied into.

    A kept entry is taken out while a copy lives in it, and comes back once
    the last view of that copy is gone (:meth:`lease`); a mapping comes back
    only once :func:`scrub` has dropped what the copy wrote. So two copies
    never share memory, and a copy never shows what an earlier one wrote.
    Bounded and swept as :class:`_Kept`.
    """

    def take(self, backend: str, ident: str, size: int) -> Optional[tuple[Any, Optional[str]]]:
        """(owner, identity) of the kept private mapping of segment *ident*
        (backend ``""``: of the kept buffer of *size* bytes), if there is one
        and the name still names the segment it maps; it is no longer kept."""
        entry = self._pop((backend, ident if backend else str(size)))
        if entry is None:
            return None
        if entry.size != size or (
            backend and current_identity(backend, ident) != entry.identity
        ):
            return None
        return entry.owner, entry.identity

    def lease(
        self, owner: Any, offset: int, nbytes: int, backend: str, ident: str, size: int,
        identity: Optional[str],
    ) -> Any:
        """A lease (see :func:`lease`) of *owner*, which is kept again (see
        :meth:`take`) once the lease is gone."""
        owned = lease(owner, offset, nbytes)
        weakref.finalize(owned, self._put, owner, backend, ident, size, identity, offset,
                         nbytes).atexit = False
        return owned

    def _put(
        self, owner: Any, backend: str, ident: str, size: int, identity: Optional[str],
        offset: int, nbytes: int,
    ) -> None:
        if size > self.limit or (
            backend and (identity is None or not scrub(owner, offset, nbytes))
        ):
            return
        self._keep((backend, ident if backend else str(size)), _Mapped(owner, size, identity))


#: This process's kept private memory (see :class:`PrivateCopies`).
private = PrivateCopies()


# --------------------------------------------------------------------------
# Where this process's segments are mapped

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


def live_owner(backend: str, ident: str, size: int) -> Any:
    """This process's live mapping of segment *ident* (of *size* bytes) that a
    new message naming it may use, or None."""
    with _lock:
        owner = _owners.get((backend, ident))
    if owner is None or not _mapped(owner):
        return None
    region = _regions.get(owner)
    if region is None or region.size != size:
        return None
    if not mappings.holds(owner):
        return owner
    # Kept alive by the cache, maybe past its name's reuse: check.
    if mappings.get(backend, ident, size) is owner:
        return owner
    with _lock:
        if _owners.get((backend, ident)) is owner:
            del _owners[(backend, ident)]
    return None


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


def note_private(owner: Any, backend: str, ident: str, name: str, size: int) -> None:
    """Record that private memory *owner* (a private mapping, or a copy of
    *size* bytes) came from segment *ident*: never sent by reference, never
    reused for another message naming the segment."""
    with _lock:
        _regions[owner] = _Region(backend, ident, name, size, False)


# --------------------------------------------------------------------------
# The reaper

def destroy_name(backend: str, ident: str, registry: Any = tracking,
                 identity: Optional[str] = None) -> None:
    """Destroy the name of a segment this process owns (or took over), and
    stop tracking it in *registry* (the program's tracker, or a
    :class:`~mpshm.tracking.Scope`); a name already gone is fine."""
    try:
        backends.get(backend).unlink(ident)
    except (FileNotFoundError, PermissionError):
        pass
    registry.unregister(backend, ident, identity)


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
