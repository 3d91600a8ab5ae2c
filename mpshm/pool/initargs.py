"""A pool's ``initargs``: their buffers are copied into segments once per
pool (or context), however many workers are started, and live as long as it.
"""

from __future__ import annotations

import io
import threading
import weakref
from typing import Any, Iterable

from .. import _mappings, reduction
from ..reduction import SharingPickler
from .sharing import _dispatch_table, _PoolCarrier, _Sharing

# --------------------------------------------------------------------------
# A pool's initializer arguments


class _InitargsCarrier(_PoolCarrier):
    """Copies the buffers of one pool's ``initargs`` into segments that live
    as long as the pool (or its context): each buffer once, however many
    workers are started (and replaced, with ``maxtasksperchild``)."""

    kind = "loan"  # the parent's: workers map it and never destroy it

    def __init__(self, sharing: _Sharing) -> None:
        super().__init__(sharing)
        self.sharing = sharing
        self.lock = threading.Lock()
        # (address, size) -> the copy, and the buffer's exporter (kept alive
        # so that no other buffer takes its address).
        self.copies: dict[tuple[int, int], tuple[reduction.Segment, Any]] = {}
        self.segments: dict[tuple[str, str], reduction.Segment] = {}

    def registry(self) -> Any:
        return self.sharing.scope

    def carry(self, raw: memoryview, address: int) -> tuple[reduction.Segment, int]:
        key = (address, raw.nbytes)
        with self.lock:
            found = self.copies.get(key)
            if found is None:
                segment, _ = super().carry(raw, address)
                self.segments[(segment.backend.name, segment.ident)] = segment
                found = self.copies[key] = (segment, raw.obj)
        return found[0], 0

    def dumps(self, initargs: tuple[Any, ...]) -> bytes:
        """*initargs* pickled for one worker: what is pickled is the
        worker's own (connections, say, are passed to that process alone);
        large buffers are in this pool's segments."""
        file = io.BytesIO()
        pickler = SharingPickler(file, self, _dispatch_table())
        reduction.dump(pickler, initargs, self._keep)
        self._keep(pickler)
        return reduction.envelope(file.getvalue(), pickler.descriptors)

    def _keep(self, pickler: SharingPickler) -> None:
        """Segments *pickler* made (copies of non-contiguous arrays are made
        per pickle) end with the pool too."""
        with self.lock:
            for segment in pickler.made:
                self.segments[(segment.backend.name, segment.ident)] = segment

    def close(self) -> None:
        """The pool has ended: destroy its copies."""
        with self.lock:
            segments = list(self.segments.values())
            self.segments.clear()
            self.copies.clear()
        scope = self.sharing.scope
        if segments and scope is not None and scope.alive():
            reduction.discard(segments, scope)


class _Initargs(tuple):  # type: ignore[type-arg]
    """A pool's ``initargs`` as its workers' processes are given them: a
    spawned (or forkserver) worker receives them with their large buffers
    in shared memory (see :class:`_InitargsCarrier`)."""

    source: Any
    carrier: _InitargsCarrier

    def __new__(cls, source: Iterable[Any], carrier: _InitargsCarrier) -> _Initargs:
        self = super().__new__(cls, source)
        self.source = source  # the pool's own object, to recognise it
        self.carrier = carrier
        return self

    def __reduce__(self) -> tuple[Any, ...]:
        return _load_initargs, (self.carrier.dumps(tuple(self)),)


def _load_initargs(data: bytes) -> tuple[Any, ...]:
    return tuple(reduction.loads(data))


class _PoolsInitargs:
    """A context's pools' initargs, by pool (the queue its workers get
    tasks from, a pool's own): their copies end when the pool does, or
    with the context."""

    def __init__(self, sharing: _Sharing) -> None:
        self.sharing = sharing
        self.lock = threading.Lock()
        self.pools: weakref.WeakKeyDictionary[Any, _Initargs] = weakref.WeakKeyDictionary()
        self.carriers: set[_InitargsCarrier] = set()

    def wrap(self, queue: Any, initargs: Any) -> _Initargs:
        """The initargs to give the worker of the pool whose task queue is
        *queue*: the same object for all its workers."""
        with self.lock:
            wrapped = self.pools.get(queue)
            if wrapped is not None and wrapped.source is initargs:
                return wrapped
            carrier = _InitargsCarrier(self.sharing)
            self.carriers.add(carrier)
            wrapped = self.pools[queue] = _Initargs(initargs, carrier)
        weakref.finalize(queue, self._ended, carrier).atexit = False
        return wrapped

    def _ended(self, carrier: _InitargsCarrier) -> None:
        with self.lock:
            if carrier not in self.carriers:
                return
            self.carriers.discard(carrier)
        _mappings.reaper.later(carrier.close)  # (called by the garbage collector)

    def end(self, queue: Any) -> None:
        """The pool whose task queue is *queue* has ended: its copies go now."""
        if queue is None:
            return
        with self.lock:
            wrapped = self.pools.pop(queue, None)
            if wrapped is None or wrapped.carrier not in self.carriers:
                return
            self.carriers.discard(wrapped.carrier)
        wrapped.carrier.close()

    def close(self) -> None:
        """The context has ended."""
        with self.lock:
            carriers = list(self.carriers)
            self.carriers.clear()
        for carrier in carriers:
            carrier.close()


def _end_context(initargs: _PoolsInitargs, sharing: _Sharing) -> None:
    initargs.close()
    sharing.close()
