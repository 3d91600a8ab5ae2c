"""``Pool``, ``ProcessPoolExecutor`` and ``get_context``: task arguments and
results travel through shared memory.

:func:`get_context` returns a :mod:`multiprocessing` context whose queues
pickle with :class:`mpshm.reduction.SharingPickler`. Give it to the standard
library's classes (``multiprocessing.Pool(context=ctx)``,
``concurrent.futures.ProcessPoolExecutor(mp_context=ctx)``) or use
:class:`Pool` and :class:`ProcessPoolExecutor`, which build one for
themselves and also end its bookkeeping when they end. Nothing global
changes: other pools, :class:`multiprocessing.reduction.ForkingPickler` and
the standard library's resource tracker are left as they were.

What travels how: buffers of ``share_threshold`` bytes or more (NumPy
arrays, ``memoryview``, pickle protocol 5 buffers) are copied once into a
fresh segment and sent as a handle; arrays already in a segment (see
:mod:`mpshm.numpy`), :class:`~mpshm.SharedMemory` and
:class:`~mpshm.ShareableList` are sent by handle without copying; the rest
is pickled as usual. The same buffer sent in many tasks of one ``map`` is
copied once. A receiver gets a copy as :class:`multiprocessing.pool.Pool`
would deliver it: writable, its own (a private mapping of the segment, or,
on System V, a copy out of it; see :mod:`mpshm.reduction`).

Lifetimes:

* a segment made to carry a task's arguments is the pool's: once the task's
  result is back it is kept warm and reused for a later task's arguments,
  but only after the worker has reported that no view of it is left there
  (a worker that keeps its argument beyond the task keeps valid, unchanging
  data; that segment is never reused); arrays sent by reference are kept
  alive by the pool until the task is done;
* a result's segment belongs to the receiver while it has a view of it;
  then it too is kept warm, and offered to workers to write later results
  into (copying into a warm segment runs at memcpy speed, into a fresh one
  at the speed the kernel allocates pages);
* warm segments are bounded by ``cache_bytes`` (see :func:`get_context`) and
  destroyed after 5 idle seconds (``MPSHM_CACHE_IDLE``) or when the pool
  ends; each worker likewise keeps its mappings of segments it was sent, so
  that a segment sent again is not mapped again (an identity check makes
  sure a name reused by a new segment is never read as the old one). With
  ``cache_bytes=0`` every copy goes to a fresh segment, destroyed as soon as
  its task's result is back (by :data:`mpshm.reduction.reaper`'s thread),
  and a result's name is destroyed once the receiver's last view is gone;
* whatever is still in flight when the pool ends (``terminate()``, ``join()``,
  the end of a ``with`` block, ``shutdown()``, or the pool being garbage
  collected) is destroyed then; if the parent process is killed (SIGKILL
  included), at once, and its workers exit instead of waiting forever.

The bookkeeping is a :class:`mpshm.tracking.Scope` per context: the
program's tracker destroys what it holds when the scope closes or the
process that owns it dies.
"""

from __future__ import annotations

import concurrent.futures
import concurrent.futures.process
import errno
import functools
import importlib
import io
import itertools
import multiprocessing
import multiprocessing.pool
import multiprocessing.queues
import os
import pickle
import sys
import threading
import time
import traceback
import types
import weakref
from multiprocessing import connection, context, util
from multiprocessing.reduction import ForkingPickler
from typing import Any, Callable, Iterable, Iterator, Optional

from . import _cache, reduction, tracking
from .reduction import DEFAULT_THRESHOLD, Carrier, SharingPickler

__all__ = ["Pool", "ProcessPoolExecutor", "SharingContext", "get_context"]


# --------------------------------------------------------------------------
# Which task a message belongs to


def _task_key(obj: Any) -> Optional[tuple[Any, ...]]:
    """(key, batch) of a task message, or None for other messages."""
    if type(obj) is tuple and len(obj) == 5 and type(obj[0]) is int:
        return ("p", obj[0], obj[1]), obj[0]  # Pool: (job, i, func, args, kwds)
    if type(obj).__name__ == "_CallItem" and hasattr(obj, "work_id"):
        fn = obj.fn
        batch = None
        if isinstance(fn, functools.partial) and fn.args and isinstance(fn.args[0], _Batch):
            batch = fn.args[0].batch  # a chunk of ProcessPoolExecutor.map
        elif isinstance(fn, _Batch):
            batch = fn.batch
        return ("e", obj.work_id), batch
    return None


def _fail(exc: BaseException) -> None:
    """A task that raises *exc* (in place of one whose arguments could not
    be unpickled)."""
    raise exc


def _substitute(about: tuple[Any, ...], exc: Exception) -> Any:
    """A message that makes the pool report *exc* for the task or result
    *about* describes, instead of a pool thread dying on it (and the pool
    hanging)."""
    *key, what = about
    if key[0] == "p":
        job, i = key[1:]
        return (job, i, _fail, (exc,), {}) if what == "task" else (job, i, (False, exc))
    from concurrent.futures import process

    if what == "task":
        return process._CallItem(key[1], _fail, (exc,), {})
    return process._ResultItem(key[1], exception=exc)


def _result_key(obj: Any) -> Optional[tuple[Any, ...]]:
    if type(obj) is tuple and len(obj) == 3 and type(obj[0]) is int:
        return ("p", obj[0], obj[1])  # Pool: (job, i, (success, value))
    if type(obj).__name__ == "_ResultItem" and hasattr(obj, "work_id"):
        return ("e", obj.work_id)
    return None


class _Batch:
    """A function tagged with the ``map`` call it belongs to; pickles as the
    function itself."""

    def __init__(self, fn: Callable[..., Any], batch: int) -> None:
        self.fn = fn
        self.batch = batch

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.fn(*args, **kwargs)

    def __reduce__(self) -> tuple[Any, ...]:
        return _unwrap, (self.fn,)


def _unwrap(fn: Callable[..., Any]) -> Callable[..., Any]:
    return fn


class _Deferred:
    """(A worker) a task's function with its arguments, which it lets go of
    when called: the standard library's worker holds its task until the
    result is sent, so without this a task's argument segments would stay
    in use (leased, see :class:`~mpshm._cache.MappingCache`) until the next
    result, and the parent could reuse them one task later."""

    __slots__ = ("args", "fn", "kwargs")

    def __init__(self, fn: Callable[..., Any], args: Any, kwargs: Any) -> None:
        self.fn = fn
        self.args = args
        self.kwargs = kwargs

    def __call__(self) -> Any:
        fn, args, kwargs = self.fn, self.args, self.kwargs
        self.args = self.kwargs = None
        return fn(*args, **kwargs)


def _defer_arguments(obj: Any) -> Any:
    """*obj*, a task just unpickled in a worker (see :func:`_task_key`),
    with its function and arguments wrapped in a :class:`_Deferred`."""
    found = _task_key(obj)
    if found is None:
        return obj
    if found[0][0] == "p":  # Pool: (job, i, func, args, kwds)
        job, i, fn, args, kwargs = obj
        return (job, i, _Deferred(fn, args, kwargs), (), {})
    obj.fn = _Deferred(obj.fn, obj.args, obj.kwargs)  # an executor's _CallItem
    obj.args, obj.kwargs = (), {}
    return obj


_batches = itertools.count(1)


def _when_all_done(futures: list[Any], callback: Callable[[], None]) -> None:
    """Call *callback* once every future in *futures* is done."""
    remaining = [len(futures)]
    lock = threading.Lock()

    def done(_: Any) -> None:
        with lock:
            remaining[0] -= 1
            last = remaining[0] == 0
        if last:
            callback()

    if not futures:
        callback()
    for future in futures:
        future.add_done_callback(done)


# --------------------------------------------------------------------------
# Segments lent to tasks


class _Loan:
    """A segment carrying one buffer for the tasks that use it."""

    __slots__ = ("charged", "key", "segment", "source", "users", "warm")

    def __init__(
        self, segment: Optional[reduction.Segment], source: Any, key: Any,
        warm: Optional[_cache.Warm] = None,
    ) -> None:
        self.segment = segment
        self.source = source  # keeps the buffer's address from being reused
        self.users = 0
        self.key = key
        self.warm = warm  # its entry in the pool's warm segments, if kept there
        self.charged = 0  # bytes of the copy budget it holds (see _Budget)


#: Fraction of the storage's room (its free space plus the pool's own copies
#: in flight) that a pool's copies of task arguments may take by default.
BUDGET_FRACTION = 0.5


def _terminating() -> bool:
    """Whether this thread is a Pool's task handler told to stop."""
    state = getattr(threading.current_thread(), "_state", None)
    return bool(state == multiprocessing.pool.TERMINATE)


def _manager_thread() -> bool:
    """Whether this thread is a ProcessPoolExecutor's manager thread, which
    must never wait for room: it is the thread that reads the results that
    would make room (the executor waits instead; see :meth:`_Budget.spent`)."""
    kind = getattr(concurrent.futures.process, "_ExecutorManagerThread", None)
    return kind is not None and isinstance(threading.current_thread(), kind)


#: Times a copy that found the storage full is tried again (see
#: :meth:`_Budget.after_full`) before its task fails with ENOSPC.
FULL_TRIES = 4


class _Budget:
    """The bytes of task arguments a pool's parent may hold copied into
    segments at once (``copy_budget`` of :func:`get_context`): *limit*, or
    by default :data:`BUDGET_FRACTION` of the room of the storage (its
    ``free()`` space; see :class:`mpshm._cache.Room`), or a quarter of
    physical memory, at most 4 GiB, where that is unknown. A copy that would overrun it waits until
    tasks in flight are done; one larger than the whole budget goes when
    nothing else is in flight (then it succeeds or fails alone), and so does
    a message (a chunk of tasks) whose copies together are."""

    def __init__(self, limit: Optional[int], free: Optional[_cache.FreeSpace]) -> None:
        self.limit = limit
        self.used = 0
        self.last = 0  # the latest copy's size (what the next is expected to need)
        self.closed = False
        # Whether room is given back as soon as a task is done, rather than
        # once its copies are destroyed: an executor's manager thread learns
        # of room only when results arrive (see spent()).
        self.prompt = False
        self._cond = threading.Condition(threading.Lock())
        self._room = _cache.Room(free, lambda: self.used)

    def allowance(self) -> int:
        """Bytes the copies in flight may take now."""
        if self.limit is not None:
            return self.limit
        room = self._room()
        return _cache.default_limit() if room is None else int(room * BUDGET_FRACTION)

    def _fits(self, nbytes: int, own: int = 0) -> bool:  # (lock held)
        return (self.closed or self.used <= own
                or self.used + nbytes <= self.allowance())

    def acquire(self, nbytes: int, evict: Callable[[], bool], own: int = 0) -> None:
        """Take *nbytes* of the budget, first waiting for room (after
        ``evict()`` let go of what it could) unless this is an executor's
        manager thread; *own* bytes of it are the same message's copies
        (which must not wait for themselves)."""
        wait = not _manager_thread()
        while True:
            with self._cond:
                if not wait or self._fits(nbytes, own):
                    if self.closed:
                        raise RuntimeError("the pool has ended")
                    self.used += nbytes
                    self.last = nbytes
                    return
            if evict():
                continue
            if _terminating():
                raise RuntimeError("the pool was terminated before this task could be sent")
            with self._cond:
                if not self._fits(nbytes, own):
                    self._cond.wait(0.1)

    def after_full(self, own: int, tries: int, evict: Callable[[], bool]) -> bool:
        """A copy found the storage full (after the caches gave back what
        they held); *own* bytes of the budget are its message's. Whether to
        try again (at most :data:`FULL_TRIES` times): once ``evict()`` let go
        of copies no task uses, or other copies in flight are done (waited
        for here, a second at most), or, alone, once after workers have
        dropped their mappings of segments destroyed meanwhile (which hold
        their memory: see :data:`mpshm._cache.SWEEP_INTERVAL`). An executor's
        manager thread only tries that last."""
        if tries >= FULL_TRIES or _terminating():
            return False
        if not _manager_thread():
            if evict():
                return True
            with self._cond:
                if self.used > own and not self.closed:
                    before = self.used
                    if self._cond.wait_for(lambda: self.used < before or self.closed, 1.0):
                        return not self.closed
        if tries >= 2:
            return False
        time.sleep(_cache.SWEEP_INTERVAL * 1.5)
        return True

    def release(self, nbytes: int) -> None:
        """Copies of *nbytes* bytes are done with."""
        if nbytes:
            with self._cond:
                self.used = max(0, self.used - nbytes)
                self._cond.notify_all()

    def spent(self, evict: Callable[[], bool]) -> bool:
        """Whether a copy as large as the latest would overrun the budget now
        (after ``evict()`` let go of what it could): an executor then sends
        no more tasks until results come back."""
        if not self.used:  # nothing copied in flight (what the lock would say too)
            return False
        while True:
            with self._cond:
                if self._fits(self.last):
                    return False
            if not evict():
                return True

    def close(self) -> None:
        """The pool has ended: nobody waits any more."""
        with self._cond:
            self.closed = True
            self.used = 0
            self._cond.notify_all()


class _PoolCarrier(Carrier):
    """A carrier with a context's settings (checked once, by the context)."""

    def __init__(self, sharing: _Sharing) -> None:  # settings already checked
        self.threshold = sharing.threshold
        self.backend = sharing.backend
        self.options = sharing.options


class _LoanCarrier(_PoolCarrier):
    """Copies buffers into segments the sending process keeps until the
    tasks that use them are done (one copy per buffer and batch)."""

    kind = "loan"

    def __init__(self, sharing: _Sharing, batch: Any) -> None:
        super().__init__(sharing)
        self.sharing = sharing
        self.batch = batch
        self.used: list[_Loan] = []
        self.charged = 0  # bytes of the copy budget this message took
        self.reused = 0  # bytes of the budget held by copies it shares with its batch

    def registry(self) -> Any:
        return self.sharing.scope

    def carry(self, raw: memoryview, address: int) -> tuple[reduction.Segment, int]:
        sharing = self.sharing
        key = None
        # A buffer is copied once per batch only in batches whose input was
        # all there before the first task went (a Pool's map, an executor's
        # map: the pool reports their ends): a generator of imap may refill
        # the same buffer between items, each of which must carry its value.
        if self.batch is not None and self.batch in sharing.open_batches:
            key = (self.batch, address, raw.nbytes)
            with sharing.lock:
                loan = sharing.memo.get(key)
                if loan is not None and loan.users > 0 and loan.segment is not None:
                    loan.users += 1
                    self.used.append(loan)
                    self.reused += loan.charged  # (this message's own: see _Budget)
                    if loan.warm is not None and sharing.warm is not None:
                        sharing.warm.delivered(loan.warm)
                    return loan.segment, 0
        budget = sharing.budget
        if budget is not None:
            budget.acquire(raw.nbytes, sharing.evict_idle, self.charged + self.reused)
        tries = 0
        while True:
            try:
                segment, warm = sharing.lend(
                    raw, lambda: super(_LoanCarrier, self).carry(raw, address))
                break
            except BaseException as exc:
                if (budget is not None and isinstance(exc, OSError)
                        and exc.errno == errno.ENOSPC
                        and budget.after_full(self.charged + self.reused + raw.nbytes, tries,
                                              sharing.evict_idle)):
                    tries += 1
                    continue
                if budget is not None:
                    budget.release(raw.nbytes)
                raise
        loan = _Loan(segment, raw.obj, key, warm)
        if budget is not None:
            loan.charged = raw.nbytes
            self.charged += raw.nbytes
        loan.users = 1
        self.used.append(loan)
        if key is not None:
            with sharing.lock:
                if self.batch in sharing.open_batches:
                    loan.users += 1  # held until the batch ends (end_batch)
                    sharing.held.setdefault(self.batch, []).append(loan)
                sharing.memo[key] = loan
        return segment, 0


class _GiveCarrier(_PoolCarrier):
    """Copies buffers into segments the receiver takes over; registered with
    *registry* (the pool's scope, or a worker's membership of it). In a
    worker, a result is written into a spare the parent offered with the
    task, if one fits (see :mod:`mpshm._cache`)."""

    def __init__(self, sharing: _Sharing, registry: Any) -> None:
        super().__init__(sharing)
        self.sharing = sharing
        self._registry = registry
        self._spares: set[reduction.Segment] = set()
        self._use_spares = False

    def registry(self) -> Any:
        return self._registry

    def begin(self, use_spares: bool) -> None:
        """A new message: may it use the spares of the task being run?"""
        self._spares.clear()
        self._use_spares = use_spares

    def carry(self, raw: memoryview, address: int) -> tuple[reduction.Segment, int]:
        spares = self.sharing.spares if self._use_spares else []
        for i, spare in enumerate(spares):
            if not _cache.fits(raw.nbytes, spare.size):
                continue
            del spares[i]
            try:
                owner = reduction.attach_owner(
                    spare.backend.name, spare.ident, spare.name, spare.size,
                    reduction.machine(), shareable=False, cache=True,
                )
                memoryview(owner)[: raw.nbytes] = raw
            except (OSError, ValueError, TypeError):
                break  # gone, say: a fresh segment instead
            self._spares.add(spare)
            return spare, 0
        return super().carry(raw, address)

    def kind_of(self, segment: reduction.Segment) -> str:
        return "spare" if segment in self._spares else self.kind


def _check_copy_budget(value: Optional[int]) -> Optional[int]:
    """*copy_budget* as given to :func:`get_context` (None: the default)."""
    if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                              or value < 0):
        raise ValueError(
            f"copy_budget must be a number of bytes >= 0 (None: half the storage's free "
            f"space), not {value!r}"
        )
    return value


def _check_cache_bytes(value: Optional[int]) -> int:
    """*cache_bytes* as given to :func:`get_context` (None: the default)."""
    if value is None:
        return _cache.default_limit()
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(
            f"cache_bytes must be a number of bytes >= 0 (0 turns the warm-segment cache "
            f"off, None means {_cache.default_limit()}), not {value!r}"
        )
    return value


class _Process:
    """This process's pid, without a system call per message (kept right
    across ``fork`` by the hook below; other children import afresh)."""

    pid = os.getpid()

    @classmethod
    def forked(cls) -> None:
        cls.pid = os.getpid()


_process = _Process
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_Process.forked)

#: What :meth:`_Sharing.dumps` makes of None (a pool's wake-up and stop
#: signals), as the standard library's pickler does.
_PICKLED_NONE = pickle.dumps(None, protocol=5)

#: This process's sharing objects, by their context's token: every message
#: that names one (an executor's call queue wraps each task with it; see
#: _Pickled) finds the same object instead of making a new one (a lock and
#: its tables) per message. Forked children inherit their parent's.
_sharings: weakref.WeakValueDictionary[str, _Sharing] = weakref.WeakValueDictionary()


def _sharing_of(token: str, pid: int, state: bytes) -> _Sharing:
    """The unpickled :class:`_Sharing` of context *token* made in process
    *pid*: the one this process has already, else a new one of the pickled
    *state*."""
    found = _sharings.get(token)
    if found is not None and found.pid == pid:
        return found
    sharing = _Sharing.__new__(_Sharing)
    sharing.__setstate__(pickle.loads(state))
    _sharings[sharing.token] = sharing
    return sharing


#: A worker's leases of task arguments, (backend, ident, weak reference)
#: each: one list per process, not per pool object, since an executor's
#: worker receives its tasks and sends its results through queues with
#: sharing objects of their own. A forked child starts without the leases
#: it inherited (they are its parent's to report).
_worker_leases: list[tuple[str, str, Any]] = []
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_worker_leases.clear)


class _Sharing:
    """The pickling policy and bookkeeping of one context, in every process.

    In the process that made it (the pool's parent) it owns a tracker scope:
    argument segments are lent per task and destroyed when the task's result
    arrives. In workers, results are given to the parent, registered with
    the parent's scope. Pickled (for spawned workers) it carries only its
    settings.
    """

    #: The parent's warm segments (None in workers, or with ``cache_bytes=0``).
    warm: Optional[_cache.WarmSegments]
    #: The copy budget (the parent's only).
    budget: Optional[_Budget]

    def __init__(
        self, backend: Optional[str], threshold: int, options: dict[str, Any],
        cache_bytes: Optional[int] = None, copy_budget: Optional[int] = None,
    ) -> None:
        probe = Carrier(backend, threshold, **options)  # validates all three
        self.backend = probe.backend
        self.threshold = probe.threshold
        self.options = options
        self.cache_bytes = _check_cache_bytes(cache_bytes)
        self.copy_budget = _check_copy_budget(copy_budget)
        self.scope = tracking.Scope()
        self.scope.connect()  # starts the tracker before any worker exists
        self.token = self.scope.token
        self.pid = os.getpid()  # the owner: the pool's parent
        self._setup()
        _sharings[self.token] = self
        free = functools.partial(self.backend.free_space, options)
        self.budget = _Budget(self.copy_budget, free)
        if self.cache_bytes != 0:
            self.warm = _cache.WarmSegments(self._destroy, self.cache_bytes, free=free)

    def _destroy(self, segments: list[reduction.Segment]) -> None:
        reduction.reaper.later(reduction.discard, segments, self.scope)

    def _setup(self) -> None:
        self.lock = threading.Lock()
        self.memo: dict[Any, _Loan] = {}
        self.inflight: dict[Any, list[_Loan]] = {}
        # Batches (a Pool job, an executor map) whose end the pool reports
        # (end_batch): their loans are kept until then, so that a buffer is
        # copied once per batch even when early tasks finish before later
        # ones are sent. Other batches share a copy among tasks in flight.
        self.open_batches: set[Any] = set()
        self.held: dict[Any, list[_Loan]] = {}
        self._member: Optional[_GiveCarrier] = None
        self._member_pid = 0
        self.warm = None
        # Spares offered with a task, by task key (the parent), and those of
        # the task being run (a worker).
        self.offered: dict[Any, list[_cache.Warm]] = {}
        self.spares: list[reduction.Segment] = []
        self.budget = None
        self._local = threading.local()  # each thread's pickler (see _pickler)

    def __getstate__(self) -> dict[str, Any]:
        return {
            "backend": self.backend.name, "threshold": self.threshold,
            "options": self.options, "token": self.token, "pid": self.pid,
            "cache_bytes": self.cache_bytes,
        }

    def __reduce__(self) -> tuple[Any, ...]:
        # Unpickled as the process's one object of this context (see
        # _sharing_of); an executor sends it with every task, so its state
        # goes pickled once, and is unpickled only where it is new.
        # (Its settings never change once made.)
        wire = self.__dict__.get("_wire")
        if wire is None:
            state = pickle.dumps(self.__getstate__(), protocol=5)
            wire = self._wire = (self.token, self.pid, state)
        return _sharing_of, wire

    def __setstate__(self, state: dict[str, Any]) -> None:
        from . import backends

        self.backend = backends.get(state["backend"])
        self.threshold = state["threshold"]
        self.options = state["options"]
        self.token = state["token"]
        self.pid = state["pid"]
        self.cache_bytes = state["cache_bytes"]
        self.scope = None  # type: ignore[assignment]
        self._setup()

    def lend(
        self, raw: memoryview, fresh: Callable[[], tuple[reduction.Segment, int]],
    ) -> tuple[reduction.Segment, Optional[_cache.Warm]]:
        """A segment holding a copy of *raw* for a task: a warm one if one
        fits, else ``fresh()``'s (kept warm afterwards if the cache can)."""
        warm = self.warm
        if warm is not None:
            entry = warm.take(raw.nbytes)
            if entry is not None:
                try:
                    memoryview(entry.owner)[: raw.nbytes] = raw
                except BaseException:
                    warm.done(entry)
                    raise
                warm.delivered(entry)
                return entry.segment, entry
        # (A full storage: the creation gives back what the caches hold and
        # tries once more; see shared_memory._reclaimed.)
        segment, _ = fresh()
        if warm is None or segment.size > warm.limit:
            return segment, None
        entry = warm.add(segment)
        warm.delivered(entry)
        return segment, entry

    # -- sending

    def _carrier(self, obj: Any) -> tuple[Carrier, Any, Optional[tuple[Any, ...]]]:
        """The carrier for message *obj*, its task key (tasks only), and what
        to substitute for it if it cannot be unpickled (see :func:`_substitute`)."""
        pid = _process.pid
        if pid != self.pid:  # a worker: results go to the parent
            if self._member is None or self._member_pid != pid:
                self._member = _GiveCarrier(self, tracking.Member(self.token))
                self._member.hands_over = True
                self._member_pid = pid
                self.spares = []
            result = _result_key(obj)
            self._member.begin(use_spares=result is not None)
            if result is None:
                return self._member, None, None
            return self._member, None, (*result, "result")
        found = _task_key(obj)
        if found is None:
            return _GiveCarrier(self, self.scope), None, None
        key, batch = found
        return _LoanCarrier(self, batch), key, (*key, "task")

    def dumps(self, obj: Any) -> bytes:
        """Pickle one message (see the module docstring for what goes how).

        Every task and result says what it is (*about*), whatever it holds:
        a handle the pickler did not see (inside an object's own
        ``__reduce__``, say) can fail to attach too, and the pool must hear
        of it rather than hang."""
        if obj is None:  # a pool's wake-up or stop signal: nothing to say or share
            return _PICKLED_NONE
        if _plain_result(obj, self.threshold) and not _worker_leases and not self.spares:
            # Nothing to share, to fail or to report: a plain pickle (as the
            # answer to a plain call, see _plain), which loads() reads.
            return pickle.dumps(obj, protocol=5)
        carrier, key, about = self._carrier(obj)
        # This thread's pickler from its last message, if it still fits (a
        # pickler costs more to make than a small message does to pickle).
        local = self._local
        table = _dispatch_table()
        kept = getattr(local, "pickler", None)
        local.pickler = None  # (a message pickled meanwhile gets a new one)
        if kept is not None and kept[2] is table and kept[0].reuse(carrier):
            pickler, file, _ = kept
        else:
            file = io.BytesIO()
            pickler = SharingPickler(file, carrier, table)
        reduction.dump(pickler, obj, functools.partial(self._cleanup, carrier))
        extra = None
        if key is not None:  # a task: its copies live until its result is back
            assert isinstance(carrier, _LoanCarrier)
            if pickler.kept:  # sent by reference: alive until the task is done
                keep = _Loan(None, pickler.kept, None)
                keep.users = 1
                carrier.used.append(keep)
            if carrier.used:
                with self.lock:
                    self.inflight.setdefault(key, []).extend(carrier.used)
            warm = self.warm
            if warm is not None:
                offered = warm.offer()
                if offered:
                    with self.lock:
                        self.offered.setdefault(key, []).extend(offered)
                    extra = {"spares": [entry.segment for entry in offered]}
        elif about is not None:  # a worker's result
            if self.spares:
                self.spares = []  # they were offered with its task only
            if _worker_leases:
                extra = self._released()
        data = reduction.envelope(file.getvalue(), pickler.descriptors, about, extra)
        # Kept for this thread's next message (after an error, never: a new one).
        pickler.finish()
        file.seek(0)
        file.truncate()
        local.pickler = (pickler, file, table)
        return data

    def _cleanup(self, carrier: Carrier, failed: SharingPickler) -> None:
        """What a message that could not be pickled had made or lent goes."""
        if isinstance(carrier, _LoanCarrier):
            self._release(carrier.used)
        else:
            reduction.discard(failed.made, carrier.registry())

    def _released(self) -> Optional[dict[str, Any]]:
        """(A worker) task arguments whose views are all gone, to report."""
        released: list[tuple[str, str, Any]] = []
        alive: list[tuple[str, str, Any]] = []
        for entry in _worker_leases:
            (alive if entry[2]() is not None else released).append(entry)
        if not released:
            return None
        _worker_leases[:] = alive
        return {"released": [(backend, ident) for backend, ident, _ in released]}

    # -- receiving

    def loads(self, data: bytes) -> Any:
        """Unpickle one message; a result ends its task's loans. A task or
        result that cannot be unpickled (its segment is gone, say) becomes
        one that reports the error."""
        if data == _PICKLED_NONE:
            return None
        main, descriptors, about, extra = reduction.split_message(data)
        owner = _process.pid == self.pid
        receiving = _cache.receiving
        if self.cache_bytes != 0:
            receiving.active = True
            if owner:
                receiving.warm = self.warm
            else:
                receiving.leases = _worker_leases
                if about is not None and about[-1] == "task":
                    spares = [] if extra is None else extra.get("spares", [])
                    self.spares = [spare for spare in spares
                                   if isinstance(spare, reduction.Segment)]
        try:
            obj = reduction.load_parts(main, descriptors)
        except Exception as exc:
            if about is None:
                raise
            obj = _substitute(about, exc)
        finally:
            receiving.active = False
            receiving.warm = None
            receiving.leases = None
        if not owner and about is not None and about[-1] == "task" and self.cache_bytes != 0:
            # Its argument segments are then reported free with its own result.
            obj = _defer_arguments(obj)
        if owner:
            if extra is not None and self.warm is not None:
                for backend, ident in extra.get("released", ()):
                    self.warm.released(backend, ident)
            if self.inflight or self.offered:
                key = _result_key(obj)
                if key is not None:
                    with self.lock:
                        loans = self.inflight.pop(key, None)
                        offered = self.offered.pop(key, None)
                    if loans:
                        self._release(loans)
                    if offered and self.warm is not None:
                        self.warm.returned(offered)
        return obj

    def _release(self, loans: list[_Loan]) -> None:
        done = []
        charged = later = 0  # of the copy budget: now, and once destroyed
        with self.lock:
            for loan in loans:
                loan.users -= 1
                if loan.users <= 0:
                    done.append(loan)
                    if loan.segment is not None and loan.warm is None and not (
                            self.budget is not None and self.budget.prompt):
                        later += loan.charged
                    else:
                        charged += loan.charged
                    loan.charged = 0
                    if loan.key is not None and self.memo.get(loan.key) is loan:
                        del self.memo[loan.key]
        budget = self.budget
        if charged and budget is not None:
            budget.release(charged)
        segments = [loan.segment for loan in done
                    if loan.segment is not None and loan.warm is None]
        for loan in done:
            loan.source = None
            if loan.warm is not None and self.warm is not None:
                self.warm.done(loan.warm)
        if segments and budget is not None and budget.prompt:
            # An executor's manager thread: it gave the budget back at once
            # (it learns of room only as results come), so the memory must
            # be back at once too, or the storage's use would run ahead of
            # the budget by whatever the reaper's thread has not done yet.
            reduction.discard(segments, self.scope)
        elif segments:  # off this thread: see reduction.reaper
            reduction.reaper.later(reduction.discard, segments, self.scope)
            if later and budget is not None:  # (its memory is back now)
                reduction.reaper.later(budget.release, later)

    def evict_idle(self) -> bool:
        """Let go of the copies kept for later tasks of a batch that no task
        in flight uses (to make room in the copy budget). True if any."""
        idle: list[_Loan] = []
        with self.lock:
            for loans in self.held.values():
                keep = [loan for loan in loans if loan.users > 1]
                if len(keep) < len(loans):
                    idle += [loan for loan in loans if loan.users <= 1]
                    loans[:] = keep
        if idle:
            self._release(idle)
        return bool(idle)

    def forget_jobs(self, jobs: list[int]) -> None:
        """A pool of this (shared) context was terminated with *jobs* (a
        Pool's job numbers) unfinished: their results will never come, so
        their copies (and the copy budget they hold) are let go now."""
        if not jobs:
            return
        wanted = set(jobs)
        with self.lock:
            keys = [key for key in (*self.inflight, *self.offered)
                    if key[0] == "p" and key[1] in wanted]
            loans = [loan for key in keys for loan in self.inflight.pop(key, ())]
            offered = [warm for key in keys for warm in self.offered.pop(key, ())]
        if loans:
            self._release(loans)
        if offered and self.warm is not None:
            self.warm.returned(offered)
        for job in wanted:
            self.end_batch(job)

    def begin_batch(self, batch: Any) -> None:
        """Keep the copies made for *batch* until :meth:`end_batch`."""
        with self.lock:
            self.open_batches.add(batch)

    def end_batch(self, batch: Any) -> None:
        """Every task of *batch* is done (or will never be sent)."""
        with self.lock:
            self.open_batches.discard(batch)
            loans = self.held.pop(batch, [])
        if loans:
            self._release(loans)

    def close(self) -> None:
        """End the bookkeeping: the tracker destroys everything still lent or
        in flight (the pool has ended)."""
        if self.budget is not None:
            self.budget.close()
        if self.scope is not None and self.scope.alive():
            with self.lock:
                loans = {id(loan): loan for loan in self.memo.values()}
                for group in (*self.inflight.values(), *self.held.values()):
                    loans.update((id(loan), loan) for loan in group)
                self.memo.clear()
                self.inflight.clear()
                self.held.clear()
                self.open_batches.clear()
            # What this process lent is destroyed before close() returns; the
            # tracker destroys the rest (results workers made and never sent).
            reduction.reaper.drain()
            held = {} if self.warm is None else {
                (seg.backend.name, seg.ident): seg for seg in self.warm.close()}
            for loan in loans.values():
                loan.source = None
                if loan.segment is not None:
                    held[(loan.segment.backend.name, loan.segment.ident)] = loan.segment
            reduction.discard(list(held.values()), self.scope)
            self.offered.clear()
            self.scope.close()


_dispatch_cache: tuple[int, dict[Any, Any]] = (-1, {})


def _dispatch_table() -> dict[Any, Any]:
    """The reducers multiprocessing's own pickler uses (connections, sockets,
    ...), read, never changed."""
    global _dispatch_cache
    extra: dict[Any, Any] = getattr(ForkingPickler, "_extra_reducers", {})
    base: dict[Any, Any] = getattr(ForkingPickler, "_copyreg_dispatch_table", {})
    size = len(extra) + len(base)
    if _dispatch_cache[0] != size:
        table = dict(base)
        table.update(extra)
        _dispatch_cache = (size, table)
    return _dispatch_cache[1]


# --------------------------------------------------------------------------
# Queues and connections that pickle with the sharing pickler


class _Connection:
    """A :class:`multiprocessing.connection.Connection` whose ``send`` and
    ``recv`` pickle with a context's sharing pickler."""

    def __init__(self, conn: Any, sharing: _Sharing) -> None:
        self._conn = conn
        self._sharing = sharing

    def send(self, obj: Any) -> None:
        """Send *obj*, large buffers by handle."""
        self._conn.send_bytes(self._sharing.dumps(obj))

    def recv(self) -> Any:
        """Receive an object sent by :meth:`send`."""
        return self._sharing.loads(self._conn.recv_bytes())

    def __getattr__(self, name: str) -> Any:
        return getattr(self._conn, name)

    def __reduce__(self) -> tuple[Any, ...]:
        return _Connection, (self._conn, self._sharing)


class SimpleQueue(multiprocessing.queues.SimpleQueue):  # type: ignore[type-arg]
    """:class:`multiprocessing.SimpleQueue` with the sharing pickler."""

    _reader: Any
    _writer: Any
    _rlock: Any
    _wlock: Any

    def __init__(self, *, ctx: Any, sharing: _Sharing) -> None:
        super().__init__(ctx=ctx)
        self._sharing = sharing
        self._reader = _Connection(self._reader, sharing)
        self._writer = _Connection(self._writer, sharing)
        self._poll = self._reader.poll

    def __getstate__(self) -> Any:
        return (super().__getstate__(), self._sharing)

    def __setstate__(self, state: Any) -> None:
        base, self._sharing = state
        super().__setstate__(base)

    def get(self) -> Any:
        """Remove and return an item."""
        with self._rlock:
            data = self._reader.recv_bytes()
        return self._sharing.loads(data)

    def put(self, obj: Any) -> None:
        """Put an item (large buffers by handle)."""
        data = self._sharing.dumps(obj)
        if self._wlock is None:
            self._writer.send_bytes(data)
        else:
            with self._wlock:
                self._writer.send_bytes(data)


class _Pickled:
    """A message already pickled by the sharing pickler, sent through a
    queue that pickles with the standard library's pickler."""

    __slots__ = ("data", "sharing")

    def __init__(self, data: bytes, sharing: _Sharing) -> None:
        self.data = data
        self.sharing = sharing

    def __reduce__(self) -> tuple[Any, ...]:
        return _unpickle, (self.data, self.sharing)


def _unpickle(data: bytes, sharing: _Sharing) -> Any:
    return sharing.loads(data)


#: Types the sharing pickler always pickles inline, as the standard library
#: does (exact types: a subclass may carry anything).
_INLINE = frozenset({int, float, complex, bool, str, bytes, bytearray, type(None)})
_COLLECTIONS = frozenset({list, tuple, set, frozenset})
#: Values looked at, at most, to find that a message holds only those.
_SCAN_LIMIT = 256


def _inline_only(values: Iterable[Any], threshold: int) -> bool:
    """Whether *values* are :data:`_INLINE` values, NumPy scalars, NumPy
    arrays smaller than *threshold* bytes that are in no segment, or lists,
    tuples, sets and dicts of them (at most :data:`_SCAN_LIMIT` values in
    all): nothing the sharing pickler would put in shared memory or send by
    handle."""
    numpy = sys.modules.get("numpy")
    ndarray = generic = void = None
    if numpy is not None:
        ndarray, generic, void = numpy.ndarray, numpy.generic, numpy.void
    pending = list(values)
    seen = len(pending)
    while pending:
        value = pending.pop()
        kind = type(value)
        if kind in _INLINE:
            continue
        if kind in _COLLECTIONS:
            seen += len(value)
            if seen > _SCAN_LIMIT:
                return False
            pending.extend(value)
        elif kind is dict:
            seen += 2 * len(value)
            if seen > _SCAN_LIMIT:
                return False
            pending.extend(value.keys())
            pending.extend(value.values())
        elif kind is ndarray:
            if (value.nbytes >= threshold or value.dtype.hasobject
                    or reduction.locate_array(value) is not None):
                return False
        elif generic is None or not issubclass(kind, generic) or kind is void:
            return False  # (a structured scalar may hold objects)
    return seen <= _SCAN_LIMIT


#: Functions pickled by reference (a module's attribute), so holding no buffer.
_BY_REFERENCE = frozenset({types.FunctionType, types.BuiltinFunctionType})


def _plain(obj: Any, threshold: int) -> Any:
    """The call to send in place of executor call *obj* if its function and
    arguments can hold no buffer (a module's function; arguments of
    :func:`_inline_only`), else None.

    Such a call has nothing to share: the standard library's pickling in the
    call queue's feeder thread does all of it, and the worker reads it as
    the standard library's does (the sharing pickler would add a second
    pickle around it: an empty task cost 1.26x the standard library's, now
    1.05x). Its function goes as a :class:`_Function`, so that a worker that
    cannot find it (one defined under ``if __name__ == "__main__":``, with
    spawn) fails that call only, as with any other task, instead of the pool
    breaking."""
    process = concurrent.futures.process
    if type(obj) is not process._CallItem:
        return None
    fn = obj.fn
    # (A bound method of a builtin object, arr.sum, is a BuiltinFunctionType
    # too, but no module's attribute: its object goes by value.)
    if type(fn) not in _BY_REFERENCE or getattr(
            sys.modules.get(fn.__module__), fn.__qualname__, None) is not fn:
        return None
    args, kwargs = obj.args, obj.kwargs
    if ((args and not _inline_only(args, threshold))
            or (kwargs and not _inline_only(kwargs.values(), threshold))):
        return None
    return process._CallItem(obj.work_id, _Function(fn), args, kwargs)


class _Function:
    """A module's function, pickled by name and found again by
    :func:`_find_function` (see :func:`_plain`)."""

    __slots__ = ("fn",)

    def __init__(self, fn: Callable[..., Any]) -> None:
        self.fn = fn

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.fn(*args, **kwargs)

    def __reduce__(self) -> tuple[Any, ...]:
        return _find_function, (self.fn.__module__, self.fn.__qualname__)


def _find_function(module: str, name: str) -> Callable[..., Any]:
    """Function *name* of *module*, or one that raises why it is not there."""
    try:
        found = sys.modules.get(module) or importlib.import_module(module)
        fn: Callable[..., Any] = getattr(found, name)
        return fn
    except Exception as exc:
        error = AttributeError(
            f"the worker cannot find the function {name!r} of module {module!r} "
            f"({type(exc).__name__}: {exc}): a task's function must be importable by "
            "the workers (defined at the top level of a module, not under "
            "`if __name__ == '__main__':`)")

        def missing(*_args: Any, **_kwargs: Any) -> Any:
            raise error

        return missing


def _plain_result(obj: Any, threshold: int) -> bool:
    """Whether *obj* is an executor's result that holds nothing to share
    (see :func:`_inline_only`)."""
    return (type(obj) is concurrent.futures.process._ResultItem
            and obj.exception is None
            and _inline_only((obj.result,), threshold))


def _share_queue(queue: Any, sharing: _Sharing) -> None:
    """Make *queue* (a :class:`multiprocessing.Queue` handed to a worker, as
    ProcessPoolExecutor's call queue is) send with the sharing pickler."""
    if getattr(queue, "_mpshm_sharing", None) is sharing:
        return
    original = type(queue).put

    def put(obj: Any, block: bool = True, timeout: Optional[float] = None) -> None:
        plain = _plain(obj, sharing.threshold)
        if plain is not None:
            original(queue, plain, block, timeout)
            return
        try:
            data = sharing.dumps(obj)
        except Exception as exc:  # (the standard library's feeder thread catches these)
            if not _fail_call(queue, exc, obj):
                raise
            return
        original(queue, _Pickled(data, sharing), block, timeout)

    queue.put = put
    queue._mpshm_sharing = sharing
    budget = sharing.budget
    if budget is not None and hasattr(queue, "full"):  # an executor's call queue
        full = type(queue).full
        budget.prompt = True

        def full_or_spent() -> bool:  # (the executor feeds it while not full)
            return bool(full(queue)) or budget.spent(sharing.evict_idle)

        queue.full = full_or_spent


def _fail_call(queue: Any, exc: Exception, obj: Any) -> bool:
    """Fail the future of an executor's call *obj* that could not be pickled
    (or copied into shared memory) with *exc*, as the standard library's
    feeder thread does (``_SafeQueue._on_queue_feeder_error``), instead of
    the executor's manager thread dying on it. False if *queue* is not an
    executor's call queue or *obj* not a call.

    Here the manager thread itself pickles (see :func:`_share_queue`): it is
    woken up (it may have been told to shut down, with this call the last
    one pending) only if no wake-up is pending already, since it is the one
    that empties that pipe (many failing calls must not fill it)."""
    process = concurrent.futures.process
    pending = getattr(queue, "pending_work_items", None)
    if pending is None or not isinstance(obj, process._CallItem):
        return False
    lines = traceback.format_exception(type(exc), exc, exc.__traceback__)
    remote: Any = process._RemoteTraceback
    exc.__cause__ = remote('\n"""\n{}"""'.format("".join(lines)))
    work_item = pending.pop(obj.work_id, None)
    wakeup = getattr(queue, "thread_wakeup", None)
    if wakeup is not None:
        with queue.shutdown_lock:
            reader = getattr(wakeup, "_reader", None)
            if getattr(wakeup, "_closed", False) is False and not (
                    reader is not None and reader.poll()):
                wakeup.wakeup()
    if work_item is not None:
        work_item.future.set_exception(exc)
    return True


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
        reduction.reaper.later(carrier.close)  # (called by the garbage collector)

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


# --------------------------------------------------------------------------
# Processes and the context


def _watch_parent() -> None:
    """Exit when the parent process dies (a pool's workers would otherwise
    wait for tasks forever, holding their mappings)."""
    parent = multiprocessing.parent_process()
    sentinel = getattr(parent, "_sentinel", None)
    if sentinel is None:  # pragma: no cover - Python without parent sentinels
        return

    def watch() -> None:
        connection.wait([sentinel])
        os._exit(1)

    threading.Thread(target=watch, name="mpshm-parent-watch", daemon=True).start()


class _Watched:
    """Mixin for worker processes: they exit when their parent dies."""

    _mpshm_watch = False

    def run(self) -> None:
        if self._mpshm_watch:
            _watch_parent()
        super().run()  # type: ignore[misc]


class _SpawnProcess(_Watched, context.SpawnProcess):
    pass


_PROCESSES: dict[str, type] = {"spawn": _SpawnProcess}
if sys.platform != "win32":

    class _ForkProcess(_Watched, context.ForkProcess):
        pass

    class _ForkServerProcess(_Watched, context.ForkServerProcess):
        pass

    _PROCESSES.update(fork=_ForkProcess, forkserver=_ForkServerProcess)

# The functions the standard library's pools run in their workers.
_WORKER_TARGETS = (
    multiprocessing.pool.worker,  # type: ignore[attr-defined]
    concurrent.futures.process._process_worker,
)


class SharingContext(context.BaseContext):
    """A :mod:`multiprocessing` context whose queues pickle with the sharing
    pickler; see :func:`get_context`."""

    def __init__(
        self, method: str, backend: Optional[str], share_threshold: int, options: dict[str, Any],
        cache_bytes: Optional[int] = None, copy_budget: Optional[int] = None,
    ) -> None:
        base = multiprocessing.get_context(method)
        self._name = base.get_start_method()
        self._base = base
        self._process_class = _PROCESSES[self._name]
        self._sharing = _Sharing(backend, share_threshold, options, cache_bytes, copy_budget)
        self._initargs = _PoolsInitargs(self._sharing)
        self._finalizer = weakref.finalize(self, _end_context, self._initargs, self._sharing)

    @property
    def backend(self) -> str:
        """The backend that carries shared buffers."""
        return self._sharing.backend.name

    @property
    def share_threshold(self) -> int:
        """Buffers of at least this many bytes travel through shared memory."""
        return self._sharing.threshold

    @property
    def cache_bytes(self) -> int:
        """Bytes of warm segments kept for reuse (0: none; see :func:`get_context`)."""
        return self._sharing.cache_bytes

    @property
    def copy_budget(self) -> int:
        """Bytes of task arguments that may be copied into segments at once
        now (see :func:`get_context`)."""
        budget = self._sharing.budget
        assert budget is not None
        return budget.allowance()

    def Process(self, *args: Any, **kwargs: Any) -> Any:
        """A process of this context's start method. A pool's or executor's
        worker exits if its parent dies, and the executor's task queue
        pickles with the sharing pickler. A spawned (or forkserver) worker
        gets the pool's ``initargs`` with their large buffers in shared
        memory, copied once per pool."""
        process = self._process_class(*args, **kwargs)
        target = getattr(process, "_target", None)
        if any(target is worker for worker in _WORKER_TARGETS):
            process._mpshm_watch = True
            args = getattr(process, "_args", ())
            for arg in args:
                if isinstance(arg, multiprocessing.queues.Queue):
                    _share_queue(arg, self._sharing)
            # Both targets: (task queue, result queue, initializer, initargs, ...).
            if (self._name != "fork" and len(args) > 3 and args[2] is not None
                    and type(args[3]) in (tuple, list) and args[3]):
                initargs = self._initargs.wrap(args[0], args[3])
                process._args = (*args[:3], initargs, *args[4:])
        return process

    def SimpleQueue(self) -> SimpleQueue:
        """A simple queue that sends large buffers by handle."""
        return SimpleQueue(ctx=self, sharing=self._sharing)

    def get_start_method(self, allow_none: bool = False) -> str:
        """This context's start method."""
        return self._name

    def set_start_method(self, method: Optional[str], force: bool = False) -> None:
        """Not possible: a sharing context has a fixed start method."""
        raise ValueError("cannot change a sharing context's start method; call get_context()")

    def close(self) -> None:
        """End the bookkeeping: destroy every segment still lent to a task or
        in flight. Call it once no pool uses this context any more (it also
        happens when the context is garbage-collected or the program ends)."""
        self._finalizer()

    def __reduce__(self) -> tuple[Any, ...]:
        raise TypeError("a sharing context cannot be pickled; pass its settings instead")


def get_context(
    method: Optional[str] = None,
    *,
    backend: Optional[str] = None,
    share_threshold: int = DEFAULT_THRESHOLD,
    cache_bytes: Optional[int] = None,
    copy_budget: Optional[int] = None,
    **options: Any,
) -> SharingContext:
    """A :mod:`multiprocessing` context (start method *method*, default as
    :func:`multiprocessing.get_context`) whose queues send buffers of
    *share_threshold* bytes or more through segments on *backend*.

    Usable as ``multiprocessing.Pool(context=ctx)`` and
    ``concurrent.futures.ProcessPoolExecutor(mp_context=ctx)``. Each call
    makes a new context with its own bookkeeping; :meth:`SharingContext.close`
    ends it.

    *cache_bytes* bounds the warm memory kept between tasks: segments the
    parent keeps to reuse for arguments and results, and each worker's
    mappings of segments it was sent. None (the default) is a quarter of
    physical memory, at most 4 GiB; 0 turns both caches off (every task's
    copy goes to a fresh segment, every segment is mapped afresh). What is
    cached and unused for 5 seconds (``MPSHM_CACHE_IDLE``) is given back to
    the system. The parent's warm segments also stay within a quarter of
    the storage's room (its free space plus what they hold; ``statvfs`` at
    most twice a second), and a creation in this process that finds the
    storage full gives back every warm segment and tries once more.

    *copy_budget* bounds the bytes of task arguments copied into segments
    and not yet done with (their tasks in flight), so that ``map`` over any
    number of inputs needs no more: the pool sends the next task once
    earlier ones are done. None (the default) is half the storage's room
    (its free space plus these copies; on ``sysv``, what kernel.shmall
    still allows; a quarter of physical memory, at most 4 GiB, where that
    is no limit). An
    input larger than the budget is sent when nothing else is in flight; one
    the storage cannot hold fails its own task with ``OSError(ENOSPC)``
    naming the storage, the size asked and the space free.
    ``ProcessPoolExecutor`` stops feeding its workers while a copy as large
    as the latest would overrun the budget.
    """
    if method is None:
        # The program's choice if it made one, else the platform's default
        # (the first listed); get_start_method() alone would fix the choice.
        method = (multiprocessing.get_start_method(allow_none=True)
                  or multiprocessing.get_all_start_methods()[0])
    if method not in _PROCESSES:
        raise ValueError(
            f"unknown start method {method!r}; choose one of {sorted(_PROCESSES)}"
        )
    return SharingContext(method, backend, share_threshold, options, cache_bytes, copy_budget)


def _context_for(
    context_or_method: Any, backend: Optional[str], share_threshold: int,
    options: dict[str, Any],
) -> SharingContext:
    cache_bytes = options.pop("cache_bytes", None)
    copy_budget = options.pop("copy_budget", None)
    if isinstance(context_or_method, SharingContext):
        if (backend is not None or share_threshold != DEFAULT_THRESHOLD or options
                or cache_bytes is not None or copy_budget is not None):
            raise ValueError(
                "give backend=, share_threshold=, cache_bytes= and copy_budget= to "
                "get_context(), not both"
            )
        return context_or_method
    method = None
    if context_or_method is not None:
        method = context_or_method.get_start_method()
    return get_context(method, backend=backend, share_threshold=share_threshold,
                       cache_bytes=cache_bytes, copy_budget=copy_budget, **options)


class _JobCache(multiprocessing.pool._PoolCache):  # type: ignore[name-defined,misc]
    """A Pool's table of running jobs that opens and ends their batches."""

    sharing: _Sharing

    def __setitem__(self, job: int, result: Any) -> None:
        # Jobs of many tasks whose input is all there before the first goes
        # (not imap's: its generator may refill a buffer between items).
        if isinstance(result, multiprocessing.pool.MapResult):
            self.sharing.begin_batch(job)
        super().__setitem__(job, result)

    def __delitem__(self, job: int) -> None:
        super().__delitem__(job)
        self.sharing.end_batch(job)


class Pool(multiprocessing.pool.Pool):
    """:class:`multiprocessing.pool.Pool` whose task arguments and results
    travel through shared memory (see :mod:`mpshm.pool`).

    Same signature as the standard library's, plus keyword-only *backend*
    (where shared buffers live) and *share_threshold* (the size in bytes from
    which a buffer is shared rather than pickled inline). *context* may be a
    standard context (its start method is used) or one from
    :func:`get_context`.
    """

    def __init__(
        self,
        processes: Optional[int] = None,
        initializer: Optional[Callable[..., object]] = None,
        initargs: Iterable[Any] = (),
        maxtasksperchild: Optional[int] = None,
        context: Any = None,
        *,
        backend: Optional[str] = None,
        share_threshold: int = DEFAULT_THRESHOLD,
        **options: Any,
    ) -> None:
        self._state = multiprocessing.pool.INIT  # for __del__ if the next line raises
        ctx = _context_for(context, backend, share_threshold, options)
        self._mpshm_context = ctx
        super().__init__(processes, initializer, initargs, maxtasksperchild, ctx)
        if ctx is not context:  # ours: its bookkeeping ends with the pool
            self._mpshm_end = util.Finalize(self, ctx.close, exitpriority=10)

    def _get_sentinels(self) -> list[Any]:
        # What the worker handler thread waits on besides its workers'
        # sentinels. The standard library's also waits on the result queue,
        # which that thread never reads: every result wakes it, again and
        # again until the result handler has taken it (four to five
        # wake-ups per task: about half the parent's CPU time on a small task).
        # It needs none of them: workers that exit wake it through their
        # sentinels, and a drained job table, close() and terminate()
        # through the change notifier.
        return [self._change_notifier._reader]  # type: ignore[attr-defined]

    def _repopulate_pool(self) -> Any:
        cache = self._cache  # type: ignore[attr-defined]
        if type(cache) is multiprocessing.pool._PoolCache:  # type: ignore[attr-defined]
            # Learn when a job is over, to keep its copies until then.
            cache.__class__ = _JobCache
            cache.sharing = self._mpshm_context._sharing
        return super()._repopulate_pool()  # type: ignore[misc]

    def terminate(self) -> None:
        """Stop the workers at once; destroy every segment still in flight."""
        jobs = list(getattr(self, "_cache", ()))
        super().terminate()
        self._end_sharing(jobs)

    def join(self) -> None:
        """Wait for the workers to exit; then destroy what is left."""
        super().join()
        self._end_sharing([])

    def _end_sharing(self, jobs: list[int]) -> None:
        end = getattr(self, "_mpshm_end", None)
        if end is not None:
            end()  # the context is this pool's: all of it ends
            return
        ctx = getattr(self, "_mpshm_context", None)
        if ctx is not None:  # a shared context lives on: this pool's part of it ends
            ctx._initargs.end(getattr(self, "_inqueue", None))
            ctx._sharing.forget_jobs(jobs)


class ProcessPoolExecutor(concurrent.futures.ProcessPoolExecutor):
    """:class:`concurrent.futures.ProcessPoolExecutor` whose task arguments
    and results travel through shared memory (see :mod:`mpshm.pool`).

    Same signature as the standard library's, plus keyword-only *backend*
    and *share_threshold* (as for :class:`Pool`). *mp_context* may be a
    standard context (its start method is used) or one from
    :func:`get_context`. The same buffer passed to many calls of one
    :meth:`map` is copied once.
    """

    def __init__(
        self,
        max_workers: Optional[int] = None,
        mp_context: Any = None,
        initializer: Optional[Callable[..., object]] = None,
        initargs: tuple[Any, ...] = (),
        *,
        backend: Optional[str] = None,
        share_threshold: int = DEFAULT_THRESHOLD,
        **kwargs: Any,
    ) -> None:
        options = {k: kwargs.pop(k) for k in list(kwargs) if k != "max_tasks_per_child"}
        ctx = _context_for(mp_context, backend, share_threshold, options)
        self._mpshm_context = ctx
        self._mpshm_owned = ctx is not mp_context
        self._mpshm_local = threading.local()
        super().__init__(max_workers, ctx, initializer, initargs, **kwargs)

    def map(  # type: ignore[override,unused-ignore]
        self, fn: Callable[..., Any], *iterables: Iterable[Any],
        timeout: Optional[float] = None, chunksize: int = 1,
    ) -> Iterator[Any]:
        """Like :meth:`concurrent.futures.Executor.map`; a buffer passed in
        many calls is copied into shared memory once."""
        batch = next(_batches)
        sharing = self._mpshm_context._sharing
        sharing.begin_batch(batch)
        futures: list[concurrent.futures.Future[Any]] = []
        self._mpshm_local.futures = futures
        try:
            results = super().map(_Batch(fn, batch), *iterables, timeout=timeout,
                                  chunksize=chunksize)
        except BaseException:
            sharing.end_batch(batch)
            raise
        finally:
            self._mpshm_local.futures = None
        _when_all_done(futures, functools.partial(sharing.end_batch, batch))
        return results

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Any:
        """Like the standard library's."""
        future = super().submit(fn, *args, **kwargs)
        futures = getattr(self._mpshm_local, "futures", None)
        if futures is not None:
            futures.append(future)
        return future

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Like the standard library's; with *wait*, every segment still in
        flight is destroyed once the workers are gone."""
        queue = getattr(self, "_call_queue", None)  # (None once shut down)
        super().shutdown(wait=wait, cancel_futures=cancel_futures)
        if wait and self._mpshm_owned:
            self._mpshm_context.close()
        elif wait and queue is not None:
            # A shared context lives on: this executor's initargs copies end.
            self._mpshm_context._initargs.end(queue)
