"""Warm memory for pools: mappings kept across tasks, segments reused.

Two caches, both bounded in bytes and given back to the operating system
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

A reused segment must not change under anyone who still looks at it. The
receiving side of a reused segment gets its views through a *lease*
(:func:`lease`): a small object exporting the bytes, which every view keeps
alive. A worker reports which leases of task arguments are gone with its
next result; the parent reuses such a segment only once every delivery of
it has been reported gone. A result's lease in the parent hands its segment
back to the cache when the last view of the result dies. Unconfirmed
segments are never reused: they are destroyed (their names unlinked, which
is always safe) when idle, or when the pool ends.
"""

from __future__ import annotations

import collections
import ctypes
import os
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


class MappingCache:
    """Mappings of segments this process received, kept for the next message
    that names them (least recently used first out, at most *limit* bytes,
    none unused for more than *idle* seconds, none whose name is gone)."""

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
        self._ids: set[int] = set()  # id() of the cached owners
        self._registered = False

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def nbytes(self) -> int:
        """Bytes of the mappings held."""
        return self._bytes

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
        key = (backend, ident)
        dropped = []
        with self._lock:
            old = self._entries.pop(key, None)
            if old is not None:
                self._bytes -= old.size
                self._ids.discard(id(old.owner))
            self._entries[key] = _Mapped(owner, size, identity)
            self._ids.add(id(owner))
            self._bytes += size
            while self._bytes > self.limit and self._entries:
                _, victim = self._entries.popitem(last=False)
                self._bytes -= victim.size
                self._ids.discard(id(victim.owner))
                dropped.append(victim)
            register = not self._registered
            self._registered = True
        if register:
            _sweeper.add(self)
        del dropped  # unmapped here, outside the lock

    def _drop(self, key: tuple[str, str], entry: _Mapped) -> None:
        with self._lock:
            if self._entries.get(key) is entry:
                del self._entries[key]
                self._bytes -= entry.size
                self._ids.discard(id(entry.owner))

    def sweep(self) -> None:
        """Drop entries unused for too long or whose name is gone."""
        now = time.monotonic()
        with self._lock:
            items = list(self._entries.items())
        for key, entry in items:
            if now - entry.last > self.idle or current_identity(*key) != entry.identity:
                self._drop(key, entry)

    def clear(self) -> None:
        """Drop every entry."""
        with self._lock:
            self._entries.clear()
            self._ids.clear()
            self._bytes = 0


#: This process's cache of received mappings.
mappings = MappingCache()


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


class WarmSegments:
    """A pool parent's segments kept for reuse (see the module docstring).

    States: ``out`` (carrying a task's arguments, or offered as a spare),
    ``done`` (its task is over; waiting for workers to report their views
    gone), ``leased`` (holding a result the parent still looks at) and
    ``free`` (reusable). ``free`` and ``done`` segments count against
    *limit*; the rest are in use.
    """

    def __init__(
        self, destroy: Callable[[list[Segment]], None],
        limit: Optional[int] = None, idle: Optional[float] = None,
    ) -> None:
        self._destroy = destroy
        self.limit = default_limit() if limit is None else limit
        self.idle = IDLE_SECONDS if idle is None else idle
        self._lock = threading.RLock()
        self._entries: dict[tuple[str, str], Warm] = {}
        self._cached = 0  # bytes of free and done entries
        self._result_sizes: collections.deque[int] = collections.deque(maxlen=4)
        self._closed = False
        _sweeper.add(self)

    # -- bookkeeping helpers (lock held)

    def _set(self, warm: Warm, state: str) -> None:
        cached = (FREE, DONE)
        if warm.state in cached:
            self._cached -= warm.segment.size
        if state in cached:
            self._cached += warm.segment.size
        warm.state = state
        warm.last = time.monotonic()

    def _remove(self, warm: Warm) -> None:
        key = (warm.segment.backend.name, warm.segment.ident)
        if self._entries.get(key) is warm:
            del self._entries[key]
            self._set(warm, "gone")
        warm.owner = None

    def _settle(self, warm: Warm) -> list[Segment]:
        """A segment no longer used by its task: free if nobody can still see
        it, else done; destroyed if over the limit. Returns what to destroy."""
        if warm.state not in (OUT, DONE, LEASED):
            return []
        state = FREE if warm.pending <= 0 else DONE
        counted = warm.state == DONE  # already in _cached
        if self._closed or (
            not counted and self._cached + warm.segment.size > self.limit
        ):
            self._remove(warm)
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
        """Destroy segments idle for longer than :attr:`idle`."""
        now = time.monotonic()
        destroy = []
        with self._lock:
            for warm in list(self._entries.values()):
                if warm.state in (FREE, DONE) and now - warm.last > self.idle:
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

    def close(self) -> list[Segment]:
        """Stop caching; return every segment held (for the caller to destroy)."""
        with self._lock:
            self._closed = True
            held = [warm.segment for warm in self._entries.values()]
            for warm in list(self._entries.values()):
                self._remove(warm)
        return held
