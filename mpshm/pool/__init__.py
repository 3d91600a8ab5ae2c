"""``Pool``, ``ProcessPoolExecutor`` and ``get_context``: task arguments and
results travel through shared memory.

:func:`get_context` returns a :mod:`multiprocessing` context whose queues
pickle with :class:`mpshm.reduction.SharingPickler`. Give it to the standard
library's classes (``multiprocessing.Pool(context=ctx)``,
``concurrent.futures.ProcessPoolExecutor(mp_context=ctx)``) or use
:class:`Pool` and :class:`ProcessPoolExecutor`, which build one for
themselves and also end its bookkeeping when they end. Nothing global
changes.

Buffers of ``share_threshold`` bytes or more are copied once into a segment
and sent as a handle; arrays already in a segment, ``SharedMemory`` and
``ShareableList`` go by handle without a copy; receivers get copies as
:class:`multiprocessing.pool.Pool` would deliver them (writable, their own).
Segments are reused while warm (:mod:`mpshm.pool.warm`), and nothing a pool
made outlives it, even when its parent is killed: its
:class:`mpshm.tracking.Scope` sees to that. ``docs/pool.md`` says what
travels how and for how long; ``docs/architecture.md`` follows one array
through the layers.
"""

from __future__ import annotations

import concurrent.futures
import concurrent.futures.process
import functools
import multiprocessing
import multiprocessing.pool
import multiprocessing.queues
import os
import sys
import threading
import weakref
from multiprocessing import connection, context, util
from typing import Any, Callable, Iterable, Iterator, Optional

from .. import tracking
from ..reduction import DEFAULT_THRESHOLD
from .initargs import _end_context, _PoolsInitargs
from .sharing import SimpleQueue, _Batch, _batches, _share_queue, _Sharing, _when_all_done

__all__ = ["Pool", "ProcessPoolExecutor", "SharingContext", "get_context"]


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
        def start(self) -> None:
            """Fork, never while this process starts a program (see
            :data:`mpshm.tracking.fork_lock`)."""
            with tracking.fork_lock:
                super().start()

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
        processes = self._processes
        before = len(processes) if processes is not None else 0
        future = super().submit(fn, *args, **kwargs)
        if processes is not None and len(processes) != before:
            # The standard library wakes its manager thread before it starts
            # a worker on demand (spawn, forkserver): a thread that woke up
            # too early waits without that worker's sentinel, and would
            # never notice its death (SIGKILL: the executor would hang
            # instead of breaking). Woken once more, it sees every worker.
            self._executor_manager_thread_wakeup.wakeup()
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
