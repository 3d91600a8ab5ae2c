"""A pool parent's warm segments: segments kept mapped and reused.

Segments that carried a task's arguments, or a result the parent is done
with, are kept (mapped, pages faulted in) and reused for the next task's
arguments, and offered to workers as *spares* to write their results into:
copying into a warm segment runs at memcpy speed, into a fresh one at the
speed the kernel can allocate and zero pages.

A reused segment must not change under anyone who still looks at it. A
worker reports which deliveries of a segment are gone with its next result;
the parent reuses a segment only once every delivery has been reported gone
(private mappings too: they still show later writes to the pages they have
not copied). A result's lease in the parent hands its segment back when the
last view of the result dies. Unconfirmed segments are never reused: they
are destroyed (their names unlinked, which is always safe) when idle, or
when the pool ends.
"""

from __future__ import annotations

import collections
import threading
import time
import weakref
from typing import Any, Callable, Optional

from .. import _mappings
from .._mappings import (
    CACHE_FRACTION,
    RECLAIM_WAIT,
    FreeSpace,
    Room,
    default_limit,
    fits,
    lease,
    lease_view,
    reaper,
    reclaimable,
    sweeper,
)
from .._sysinfo import buffer_address, machine
from ..backends._huge import madvise
from ..reduction import Segment, attach_owner

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
        self.idle = _mappings.IDLE_SECONDS if idle is None else idle
        self._lock = threading.RLock()
        self._entries: dict[tuple[str, str], Warm] = {}
        self._cached = 0  # bytes of free and done entries
        self._result_sizes: collections.deque[int] = collections.deque(maxlen=4)
        self._closed = False
        self._room = Room(free, lambda: self._cached)
        sweeper.add(self)
        reclaimable.add(self)

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
