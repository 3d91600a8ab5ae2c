"""The sharing context of a pool, in every process: how its messages are
pickled (carriers that lend task arguments and give results, the copy
budget, the plain-call fast path), how they are unpickled (the parent's and
the workers' receivers), and the queues that carry them. :mod:`mpshm.pool`
builds pools and contexts on it.
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
from multiprocessing.reduction import ForkingPickler
from typing import Any, Callable, Iterable, Optional

from .. import _mappings, backends, reduction, tracking
from .._mappings import FreeSpace, Room, default_limit, fits
from .._sysinfo import check_machine
from ..errors import HandleError
from ..reduction import Carrier, SharingPickler
from .warm import Warm, WarmSegments

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
    (both) when called: the standard library's worker holds its task until the
    result is sent, so without this a task's argument segments would stay
    in use (leased, see :class:`~mpshm._mappings.MappingCache`) until the next
    result, and the parent could reuse them one task later."""

    __slots__ = ("args", "fn", "kwargs")

    def __init__(self, fn: Callable[..., Any], args: Any, kwargs: Any) -> None:
        self.fn: Optional[Callable[..., Any]] = fn
        self.args = args
        self.kwargs = kwargs

    def __call__(self) -> Any:
        fn, args, kwargs = self.fn, self.args, self.kwargs
        # The function too: it may hold arguments of its own (joblib's
        # batch of calls, a functools.partial).
        self.fn = self.args = self.kwargs = None
        assert fn is not None, "a task is called once"
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
        warm: Optional[Warm] = None,
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
    ``free()`` space; see :class:`mpshm._mappings.Room`), or a quarter of
    physical memory, at most 4 GiB, where that is unknown. A copy that would overrun it waits until
    tasks in flight are done; one larger than the whole budget goes when
    nothing else is in flight (then it succeeds or fails alone), and so does
    a message (a chunk of tasks) whose copies together are."""

    def __init__(self, limit: Optional[int], free: Optional[FreeSpace]) -> None:
        self.limit = limit
        self.used = 0
        self.last = 0  # the latest copy's size (what the next is expected to need)
        self.closed = False
        # Whether room is given back as soon as a task is done, rather than
        # once its copies are destroyed: an executor's manager thread learns
        # of room only when results arrive (see spent()).
        self.prompt = False
        self._cond = threading.Condition(threading.Lock())
        self._room = Room(free, lambda: self.used)

    def allowance(self) -> int:
        """Bytes the copies in flight may take now."""
        if self.limit is not None:
            return self.limit
        room = self._room()
        return default_limit() if room is None else int(room * BUDGET_FRACTION)

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
        their memory: see :data:`mpshm._mappings.SWEEP_INTERVAL`). An executor's
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
        time.sleep(_mappings.SWEEP_INTERVAL * 1.5)
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

    def abandon(self, pickler: SharingPickler) -> None:
        """What this message had lent goes (copies shared with its batch stay)."""
        self.sharing._release(self.used)

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
    task, if one fits (see :mod:`mpshm.pool.warm`)."""

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
            if not fits(raw.nbytes, spare.size):
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
        return default_limit()
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(
            f"cache_bytes must be a number of bytes >= 0 (0 turns the warm-segment cache "
            f"off, None means {default_limit()}), not {value!r}"
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
os.register_at_fork(after_in_child=_worker_leases.clear)


class _WorkerReceiver(reduction.Receiver):
    """How a pool's worker takes its tasks' buffers: mappings are kept for
    the next task, and the leases of arguments recorded (in
    :data:`_worker_leases`) to be reported gone with a later result."""

    cache = True
    leases = _worker_leases


_worker_receiver = _WorkerReceiver()


class _ParentReceiver(reduction.Receiver):
    """How a pool's parent takes its results' buffers: their segments join
    the pool's warm segments once the result's last view is gone."""

    cache = True

    def __init__(self, warm: WarmSegments) -> None:
        self.warm = warm

    def adopt(self, descriptor: reduction.Descriptor) -> Optional[memoryview]:
        warm = self.warm
        check_machine(descriptor.machine, descriptor.name)
        entry = warm.find(descriptor.backend, descriptor.ident)
        if entry is None:
            if descriptor.kind == "spare":
                raise HandleError(
                    f"invalid shared memory handle: {descriptor.name!r} is not a segment "
                    "this pool lent"
                )
            owner = reduction.attach_owner(
                descriptor.backend, descriptor.ident, descriptor.name, descriptor.size,
                descriptor.machine, shareable=False,
            )
            entry = warm.add(
                reduction.Segment(backends.get(descriptor.backend), descriptor.ident,
                                  descriptor.name, descriptor.size),
                owner,
            )
        warm.result_size(descriptor.nbytes)
        return warm.lease(entry, descriptor.offset, descriptor.nbytes, descriptor.readonly)


class _Sharing:
    """The pickling policy and bookkeeping of one context, in every process.

    In the process that made it (the pool's parent) it owns a tracker scope:
    argument segments are lent per task and destroyed when the task's result
    arrives. In workers, results are given to the parent, registered with
    the parent's scope. Pickled (for spawned workers) it carries only its
    settings.
    """

    #: The parent's warm segments (None in workers, or with ``cache_bytes=0``).
    warm: Optional[WarmSegments]
    _receiver: Optional[_ParentReceiver]
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
            self.warm = WarmSegments(self._destroy, self.cache_bytes, free=free)
            self._receiver = _ParentReceiver(self.warm)

    def _destroy(self, segments: list[reduction.Segment]) -> None:
        _mappings.reaper.later(reduction.discard, segments, self.scope)

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
        self._receiver = None
        # Spares offered with a task, by task key (the parent), and those of
        # the task being run (a worker).
        self.offered: dict[Any, list[Warm]] = {}
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
    ) -> tuple[reduction.Segment, Optional[Warm]]:
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
        reduction.dump(pickler, obj, carrier.abandon)
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
        receiver: Optional[reduction.Receiver] = None
        if self.cache_bytes != 0:
            if owner:
                receiver = self._receiver
            else:
                receiver = _worker_receiver
                if about is not None and about[-1] == "task":
                    spares = [] if extra is None else extra.get("spares", [])
                    self.spares = [spare for spare in spares
                                   if isinstance(spare, reduction.Segment)]
        try:
            obj = reduction.load_parts(main, descriptors, receiver)
        except Exception as exc:
            if about is None:
                raise
            obj = _substitute(about, exc)
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
            _mappings.reaper.later(reduction.discard, segments, self.scope)
            if later and budget is not None:  # (its memory is back now)
                _mappings.reaper.later(budget.release, later)

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
            _mappings.reaper.drain()
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


_locate_array: Optional[Callable[[Any], Any]] = None


def _in_segment(arr: Any) -> bool:
    """Whether NumPy array *arr* lies in a segment (it is sent by handle).
    True (it may: the sharing pickler decides) while :mod:`mpshm.numpy` is
    being imported: by another thread, or, in a child forked meanwhile, by
    a thread of the parent that will never finish here (waiting for its
    import would hang the child for good)."""
    global _locate_array
    if _locate_array is None:
        module = sys.modules.get(f"{reduction.__package__}.numpy")
        if module is not None and reduction.initializing(module):
            return True
        from ..numpy import locate_array

        _locate_array = locate_array
    return _locate_array(arr) is not None


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
                    or _in_segment(value)):
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
