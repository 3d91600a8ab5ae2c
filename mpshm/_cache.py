"""Warm memory for pools: mappings kept across tasks, segments reused.

Three caches, all bounded in bytes and given back to the operating system
when idle (a background thread sweeps them every :data:`SWEEP_INTERVAL`
seconds):

* :class:`MappingCache`, in every process that receives messages of a pool
  (its workers, and the parent for results): a segment sent again is not
  mapped again. A hit is checked against the storage object's identity (one
  ``stat``-like system call) so that a name reused by a newer segment is never
  mistaken for the old one; an entry whose name is gone is dropped at the
  next sweep (nobody can send it again by name).
* :class:`WarmSegments`, in a pool's parent: segments that carried a task's
  arguments, or a result the parent is done with, are kept (mapped, pages
  faulted in) and reused for the next task's arguments, and offered to
  workers as *spares* to write their results into. Copying into a warm
  segment runs at memcpy speed; into a fresh one, at the speed the kernel
  can allocate and zero pages.
* :class:`PrivateCopies`, in a pool's workers: the private memory that
  writable copies of task arguments were received in (copy-on-write
  mappings, or System V's copies), kept for the next task once the copy is
  gone and what it wrote is dropped (:func:`scrub`).

A reused segment must not change under anyone who still looks at it. The
receiving side of a reused segment gets its views through a *lease*
(:func:`lease`): a small object exporting the bytes, which every view keeps
alive. A worker reports which leases of task arguments are gone with its
next result; the parent reuses such a segment only once every delivery of
it has been reported gone (private mappings too: they still show later
writes to the pages they have not copied). A result's lease in the parent hands its segment
back to the cache when the last view of the result dies. Unconfirmed
segments are never reused: they are destroyed (their names unlinked, which
is always safe) when idle, or when the pool ends.
"""

from __future__ import annotations

import collections
import ctypes
import mmap
import os
import re
import threading
import time
import weakref
from typing import TYPE_CHECKING, Any, Callable, Optional

if TYPE_CHECKING:
    from .reduction import Segment

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
_reclaimable: weakref.WeakSet[Any] = weakref.WeakSet()


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
    for cache in list(_reclaimable):
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
    from . import backends

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
        if hasattr(os, "register_at_fork"):
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


_sweeper = _Sweeper()


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
        if hasattr(os, "register_at_fork"):
            os.register_at_fork(after_in_child=self._reset)

    def _reset(self) -> None:
        self._lock = threading.RLock()
        self._entries: collections.OrderedDict[tuple[str, str], _Mapped] = (
            collections.OrderedDict()
        )
        self._bytes = 0
        self._ids: set[int] = set()  # id() of the kept owners
        self._registered = False
        _reclaimable.add(self)

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
            _sweeper.add(self)
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

    def clear(self) -> None:
        """Drop every entry."""
        with self._lock:
            self._entries.clear()
            self._ids.clear()
            self._bytes = 0


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
    from .backends._huge import madvise

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


class Receiving(threading.local):
    """What the message being unpickled in this thread may use (set by a
    pool's ``loads``): the mapping cache, where leases of task arguments are
    recorded, and the parent's warm segments."""

    active = False
    leases: Optional[list[tuple[str, str, Any]]] = None
    warm: Optional[WarmSegments] = None


receiving = Receiving()


# --------------------------------------------------------------------------
# Sending side: a pool parent's warm segments

FREE, OUT, DONE, LEASED = "free", "out", "done", "leased"


class Warm:
    """One segment of a :class:`WarmSegments` cache."""

    __slots__ = ("last", "leases", "owner", "pending", "segment", "state")

    def __init__(self, segment: Segment, owner: Any, state: str) -> None:
        self.segment = segment
        self.owner = owner  # this process's mapping, made on first reuse
        self.state = state
        self.pending = 0  # deliveries to workers not yet reported released
        self.leases = 0  # leases of it alive in this process
        self.last = time.monotonic()


_MADV_REMOVE = 9


def _empty(unseen: list[tuple[Segment, Any]]) -> None:
    """Give back the memory of warm segments that nobody looks at any more
    (``madvise(MADV_REMOVE)`` through this process's mapping), just before
    their names go: a worker's kept mapping (see :class:`MappingCache`)
    would otherwise keep an unlinked segment's memory until its next sweep."""
    from .backends._huge import madvise
    from .reduction import buffer_address

    for segment, owner in unseen:
        try:
            if owner is None:
                owner = WarmSegments._map(segment)
            madvise(buffer_address(owner), segment.size, _MADV_REMOVE)
        except Exception:  # (then the memory goes when the last mapping does)
            pass
        owner = None


class WarmSegments:
    """A pool parent's segments kept for reuse (see the module docstring).

    States: ``out`` (carrying a task's arguments, or offered as a spare),
    ``done`` (its task is over; waiting for workers to report their views
    gone), ``leased`` (holding a result the parent still looks at) and
    ``free`` (reusable). ``free`` and ``done`` segments count against
    *limit*, and against :data:`CACHE_FRACTION` of the room of the storage
    (its ``free()`` space; see :class:`Room`); the rest are in use.
    """

    def __init__(
        self, destroy: Callable[[list[Segment]], None],
        limit: Optional[int] = None, idle: Optional[float] = None,
        free: Optional[FreeSpace] = None,
    ) -> None:
        self._destroy_segments = destroy
        self._unseen: list[tuple[Segment, Any]] = []  # (see _remove)
        self.limit = default_limit() if limit is None else limit
        self.idle = IDLE_SECONDS if idle is None else idle
        self._lock = threading.RLock()
        self._entries: dict[tuple[str, str], Warm] = {}
        self._cached = 0  # bytes of free and done entries
        self._result_sizes: collections.deque[int] = collections.deque(maxlen=4)
        self._closed = False
        self._room = Room(free, lambda: self._cached)
        _sweeper.add(self)
        _reclaimable.add(self)

    def bound(self) -> int:
        """Bytes the cache may hold now: *limit*, and at most
        :data:`CACHE_FRACTION` of the storage's room."""
        room = self._room()
        return self.limit if room is None else min(self.limit, int(room * CACHE_FRACTION))

    # -- bookkeeping helpers (lock held)

    def _set(self, warm: Warm, state: str) -> None:
        cached = (FREE, DONE)
        if warm.state in cached:
            self._cached -= warm.segment.size
        if state in cached:
            self._cached += warm.segment.size
        warm.state = state
        warm.last = time.monotonic()

    def _remove(self, warm: Warm, unseen: bool = False) -> None:
        key = (warm.segment.backend.name, warm.segment.ident)
        if self._entries.get(key) is warm:
            if (unseen or warm.state == FREE) and not self._closed:
                # Nobody looks at it: its memory is given back before its name
                # goes, whoever still maps it (see _empty).
                self._unseen.append((warm.segment, warm.owner))
            del self._entries[key]
            self._set(warm, "gone")
        warm.owner = None

    def _destroy(self, segments: list[Segment]) -> None:
        with self._lock:
            unseen, self._unseen = self._unseen, []
        if unseen:
            from .reduction import reaper

            reaper.later(self._empty_then_destroy, unseen, segments)
        else:
            self._destroy_segments(segments)

    def _empty_then_destroy(self, unseen: list[tuple[Segment, Any]],
                            segments: list[Segment]) -> None:
        _empty(unseen)  # (through a mapping found by name: before the name goes)
        self._destroy_segments(segments)

    def _settle(self, warm: Warm) -> list[Segment]:
        """A segment no longer used by its task: free if nobody can still see
        it, else done; destroyed if over the limit. Returns what to destroy."""
        if warm.state not in (OUT, DONE, LEASED):
            return []
        state = FREE if warm.pending <= 0 else DONE
        counted = warm.state == DONE  # already in _cached
        if self._closed or (
            not counted and self._cached + warm.segment.size > self.bound()
        ):
            self._remove(warm, unseen=state == FREE)
            return [warm.segment]
        self._set(warm, state)
        return []

    # -- the parent's use

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def cached_bytes(self) -> int:
        """Bytes of segments kept for reuse (free and done)."""
        return self._cached

    def take(self, nbytes: int) -> Optional[Warm]:
        """A free segment that fits *nbytes* (see :func:`fits`), now ``out``
        and mapped in this process; or None."""
        with self._lock:
            best = None
            for warm in self._entries.values():
                if warm.state == FREE and fits(nbytes, warm.segment.size) and (
                    best is None or warm.segment.size < best.segment.size
                ):
                    best = warm
            if best is None:
                return None
            self._set(best, OUT)
        if best.owner is None:
            try:
                best.owner = self._map(best.segment)
            except (OSError, ValueError):
                with self._lock:
                    self._remove(best)
                self._destroy([best.segment])
                return None
        return best

    @staticmethod
    def _map(segment: Segment) -> Any:
        from .reduction import attach_owner, machine

        return attach_owner(segment.backend.name, segment.ident, segment.name, segment.size,
                            machine(), shareable=False)

    def add(self, segment: Segment, owner: Any = None, state: str = OUT) -> Warm:
        """Start tracking *segment* (registered with the pool's scope), in *state*."""
        warm = Warm(segment, owner, "new")
        with self._lock:
            self._entries[(segment.backend.name, segment.ident)] = warm
            self._set(warm, state)
        return warm

    def find(self, backend: str, ident: str) -> Optional[Warm]:
        """The entry of segment *ident*, if this cache holds it."""
        return self._entries.get((backend, ident))

    def delivered(self, warm: Warm) -> None:
        """*warm* was sent to a worker, who will report when its views are gone."""
        with self._lock:
            warm.pending += 1

    def released(self, backend: str, ident: str) -> None:
        """A worker reports its views of *ident* gone."""
        destroy: list[Segment] = []
        with self._lock:
            warm = self._entries.get((backend, ident))
            if warm is None:
                return
            warm.pending -= 1
            if warm.state == DONE and warm.pending <= 0:
                destroy = self._settle(warm)
        if destroy:
            self._destroy(destroy)

    def done(self, warm: Warm) -> None:
        """The tasks *warm* carried arguments for are over."""
        with self._lock:
            destroy = self._settle(warm)
        if destroy:
            self._destroy(destroy)

    def offer(self, limit: int = 2) -> list[Warm]:
        """Free segments of the sizes recent results had, for a worker to
        write its result into; now ``out`` (give them back with
        :meth:`returned` or by leasing them)."""
        if not self._result_sizes:
            return []
        sizes = set(self._result_sizes)
        offered: list[Warm] = []
        with self._lock:
            for warm in self._entries.values():
                if len(offered) >= limit:
                    break
                if warm.state == FREE and any(fits(n, warm.segment.size) for n in sizes):
                    self._set(warm, OUT)
                    offered.append(warm)
        return offered

    def returned(self, offered: list[Warm]) -> None:
        """Spares a worker did not use (or whose result could not be read)."""
        destroy: list[Segment] = []
        with self._lock:
            for warm in offered:
                if warm.state == OUT:
                    destroy += self._settle(warm)
        if destroy:
            self._destroy(destroy)

    def result_size(self, nbytes: int) -> None:
        """A result of *nbytes* bytes arrived: offer spares of that size."""
        self._result_sizes.append(nbytes)

    def lease(self, warm: Warm, offset: int, nbytes: int, readonly: bool) -> memoryview:
        """A view of *warm*'s bytes that hands the segment back to the cache
        when the last view made from it is gone."""
        if warm.owner is None:
            warm.owner = self._map(warm.segment)
        owned = lease(warm.owner, offset, nbytes)
        with self._lock:
            warm.leases += 1
            if warm.state != "gone":
                self._set(warm, LEASED)
        weakref.finalize(owned, self._unlease, warm).atexit = False
        return lease_view(owned, readonly)

    def _unlease(self, warm: Warm) -> None:
        with self._lock:
            warm.leases -= 1
            destroy = self._settle(warm) if warm.leases <= 0 else []
        if destroy:
            self._destroy(destroy)

    def sweep(self) -> None:
        """Destroy segments idle for longer than :attr:`idle`, and the least
        recently used ones beyond :meth:`bound` (the storage filled up)."""
        now = time.monotonic()
        destroy = []
        with self._lock:
            for warm in list(self._entries.values()):
                if warm.state in (FREE, DONE) and now - warm.last > self.idle:
                    self._remove(warm)
                    destroy.append(warm.segment)
            if self._cached > self.bound():
                cached = sorted((warm for warm in self._entries.values()
                                 if warm.state in (FREE, DONE)), key=lambda warm: warm.last)
                for warm in cached:
                    if self._cached <= self.bound():
                        break
                    self._remove(warm)
                    destroy.append(warm.segment)
        if destroy:
            self._destroy(destroy)

    def trim(self) -> None:
        """Destroy every free and done segment now (the storage is full, say)."""
        destroy = []
        with self._lock:
            for warm in list(self._entries.values()):
                if warm.state in (FREE, DONE):
                    self._remove(warm)
                    destroy.append(warm.segment)
        if destroy:
            self._destroy(destroy)

    def reclaim(self) -> bool:
        """The storage is full: :meth:`trim`, and wait until the memory is
        back (at most :data:`RECLAIM_WAIT` seconds: destruction runs in the
        reaper's thread, and a segment still reported seen by a worker may
        be mapped in its cache until its next sweep). True if anything was
        held."""
        with self._lock:
            held = self._cached
        if not held:
            return False
        free = self._room.free
        before = free()
        self.trim()
        from .reduction import reaper

        reaper.drain()  # (destruction is queued there)
        if before is not None:
            deadline = time.monotonic() + RECLAIM_WAIT
            while time.monotonic() < deadline:
                now = free()
                if now is None or now >= before + held:
                    break
                time.sleep(0.01)
        return True

    def close(self) -> list[Segment]:
        """Stop caching; return every segment held (for the caller to destroy)."""
        with self._lock:
            self._closed = True
            held = [warm.segment for warm in self._entries.values()]
            for warm in list(self._entries.values()):
                self._remove(warm)
        return held
