"""A joblib backend: ``parallel_config(backend="mpshm")`` runs tasks on an
:class:`mpshm.pool.ProcessPoolExecutor`, so task arguments *and results*
travel through shared memory.

Turn it on with one import, then pick it like any joblib backend::

    import joblib
    import mpshm.joblib  # registers the "mpshm" backend with joblib

    with joblib.parallel_config(backend="mpshm", n_jobs=4):
        parts = joblib.Parallel()(joblib.delayed(make_part)(i) for i in range(8))

    # or a storage of your choice (mpshm's backend=, under another name,
    # since joblib's parallel_config already has a backend= parameter):
    with joblib.parallel_config(backend="mpshm", storage="mmap", dir="/scratch/me"):
        ...

Built on joblib's public extension points only: a
:class:`joblib.parallel.ParallelBackendBase` subclass (with joblib's
``AutoBatchingMixin``, as joblib's own process backends) registered with
:func:`joblib.register_parallel_backend`. It needs no loky reducer: the
executor's queues pickle with :class:`mpshm.reduction.SharingPickler`
(see :mod:`mpshm.pool`). ``docs/joblib.md`` says what travels how, and what
this backend does differently from loky.

Workers are kept between ``Parallel`` calls with the same settings (as
loky keeps its own), and so are the segments a call copied arguments into
(warm, for the next call: a fresh segment costs the kernel about four
times a copy into a warm one); they are destroyed after 5 seconds unused,
by :func:`shutdown` and at exit (with ``cache_bytes=0``: as soon as their
tasks are done). An array a task returns arrives as the parent's own
writable array, valid for as long as the parent holds it.
"""

from __future__ import annotations

import multiprocessing
import multiprocessing.util
import operator
import os
import signal
import threading
import warnings
from concurrent.futures import Future
from concurrent.futures.process import BrokenProcessPool
from typing import Any, Callable, Optional

from joblib import register_parallel_backend
from joblib.parallel import (
    AutoBatchingMixin,
    FallbackToBackend,
    ParallelBackendBase,
    SequentialBackend,
)

try:  # joblib vendored it before 1.6; loky uses it when it is installed
    import cloudpickle
except ImportError:  # pragma: no cover (the joblib extra installs it)
    from joblib.externals import cloudpickle

from .pool import ProcessPoolExecutor, SharingContext, get_context
from .pool.sharing import _check_cache_bytes, _check_copy_budget
from .reduction import DEFAULT_THRESHOLD, Carrier

__all__ = ["NAME", "MpshmBackend", "shutdown"]

#: The name this module registers the backend under.
NAME = "mpshm"

# joblib passes these to every backend's configure(); they are loky's
# memmapping settings, which this backend has no use for.
_LOKY_ONLY = ("max_nbytes", "temp_folder", "mmap_mode", "verbose", "prefer", "require")


class _Workers:
    """An executor kept between calls, the settings it was made with, and
    how many calls use it now."""

    def __init__(self, key: tuple[Any, ...], context: SharingContext, n_jobs: int) -> None:
        self.key = key
        self.context = context
        self.executor = ProcessPoolExecutor(n_jobs, mp_context=context)
        self.calls = 0
        # Also at exit, before multiprocessing waits for this process's
        # children (its workers: in a worker whose task made a nested call,
        # say, where atexit would never run and the finalizers of the parent
        # it was forked from are gone).
        self._end = multiprocessing.util.Finalize(
            self, _end, args=(self.executor, context, os.getpid()), exitpriority=20)

    def usable(self) -> bool:
        return not getattr(self.executor, "_broken", False) and not getattr(
            self.executor, "_shutdown_thread", False)

    def kill(self) -> None:
        """Stop the workers at once (SIGKILL, by PID: they are ours) and end
        the executor; whatever was in flight is destroyed."""
        processes = dict(getattr(self.executor, "_processes", None) or {})
        for pid in processes:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.close()

    def close(self) -> None:
        self._end()


def _end(executor: ProcessPoolExecutor, context: SharingContext, pid: int) -> None:
    if os.getpid() != pid:  # (a child forked with os.fork(): not its workers)
        return
    executor.shutdown(wait=True, cancel_futures=True)
    context.close()


_lock = threading.Lock()
#: The kept executors by settings: those calls use now, and the one used
#: last (so that calls one after the other, with the same settings, reuse
#: their workers; threads that run calls with other settings at the same
#: time each get their own).
_kept: dict[tuple[Any, ...], _Workers] = {}
_last: Optional[tuple[Any, ...]] = None


def _idle() -> list[_Workers]:
    """(Lock held) remove and return the kept executors no call uses, but
    the last one used."""
    idle = [w for key, w in _kept.items() if w.calls <= 0 and key != _last]
    for workers in idle:
        del _kept[workers.key]
    return idle


def _acquire(key: tuple[Any, ...], make: Callable[[], SharingContext], n_jobs: int) -> _Workers:
    """Workers for a call with settings *key*: the kept ones while they
    work, else new ones. Give them back with :func:`_release`."""
    ended: list[_Workers] = []

    def take(workers: _Workers) -> _Workers:  # (lock held)
        global _last
        workers.calls += 1
        _last = key
        ended.extend(_idle())
        return workers

    def unbroken() -> Optional[_Workers]:  # (lock held)
        workers = _kept.get(key)
        if workers is not None and not workers.usable():
            del _kept[key]  # (broken: calls that still hold it end it, see _release)
            if workers.calls <= 0:
                ended.append(workers)
            return None
        return workers

    with _lock:
        workers = unbroken()
        if workers is not None:
            workers = take(workers)
    if workers is None:
        made = _Workers(key, make(), n_jobs)
        with _lock:
            workers = unbroken()
            if workers is None:
                _kept[key] = workers = made
            else:  # another thread made them meanwhile
                ended.append(made)
            workers = take(workers)
    for old in ended:
        old.close()
    return workers


def _release(workers: _Workers) -> None:
    """A call is done with *workers*."""
    with _lock:
        workers.calls -= 1
        ended = _idle()
        if workers.calls <= 0 and _kept.get(workers.key) is not workers:
            ended.append(workers)  # (replaced or dropped: nobody else ends them)
    for old in ended:
        old.close()


def _drop(workers: _Workers) -> None:
    """*workers* are ended (killed): no call gets them any more."""
    with _lock:
        if _kept.get(workers.key) is workers:
            del _kept[workers.key]


def shutdown() -> None:
    """End the workers this module keeps between calls (and everything they
    still hold in shared memory). It also happens at exit; the next call
    starts new workers. Calls that run now (in other threads) fail."""
    with _lock:
        ended = list(_kept.values())
        _kept.clear()
    for workers in ended:
        workers.close()


def _forget() -> None:
    """(A forked child) the parent's workers are not this process's."""
    global _lock, _kept, _last
    _lock = threading.Lock()
    _kept = {}
    _last = None


os.register_at_fork(after_in_child=_forget)


def _portable(fn: Any, by_value: bool) -> Any:
    """*fn*, or *fn* pickled by value (with cloudpickle, as loky does) if a
    worker could not find it by name: a lambda, a nested function, or (in a
    worker that does not fork) one defined in ``__main__``."""
    if isinstance(fn, _ByValue) or not callable(fn):
        return fn
    qualname = getattr(fn, "__qualname__", None)
    module = getattr(fn, "__module__", None)
    if not isinstance(qualname, str) or not isinstance(module, str):
        return fn  # (an object: pickled as it says)
    if "<" in qualname or (by_value and module == "__main__"):
        return _ByValue(fn)
    return fn


_first = operator.itemgetter(0)


def _make_portable(items: list[Any], by_value: bool) -> None:
    """Make the functions of a batch's (function, args, kwargs) items
    portable (see :func:`_portable`), in place. A batch holds thousands of
    calls of a few functions: each distinct function is looked at once."""
    try:
        distinct = list(set(map(_first, items)))
    except TypeError:  # an unhashable callable object: look at each
        distinct = list(map(_first, items))
    changed = {id(fn): new for fn in distinct if (new := _portable(fn, by_value)) is not fn}
    if changed:
        items[:] = [(changed.get(id(fn), fn), args, kwargs) for fn, args, kwargs in items]


class _ByValue:
    """A function that pickles by value (see :func:`_portable`)."""

    __slots__ = ("fn",)

    def __init__(self, fn: Callable[..., Any]) -> None:
        self.fn = fn

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.fn(*args, **kwargs)

    def __reduce__(self) -> tuple[Any, ...]:
        return _load_by_value, (cloudpickle.dumps(self.fn),)


def _load_by_value(data: bytes) -> _ByValue:
    return _ByValue(cloudpickle.loads(data))


class MpshmBackend(AutoBatchingMixin, ParallelBackendBase):  # type: ignore[misc]
    """joblib's ``"mpshm"`` backend: process workers whose arguments and
    results travel through shared memory.

    Keyword arguments (give them to ``parallel_config(backend="mpshm",
    ...)`` or ``parallel_backend("mpshm", ...)``, or make an instance and
    pass it as the backend):

    - *storage*: the mpshm backend that holds the shared buffers
      (``"posix"``, ``"sysv"``, ``"mmap"`` or a registered one; default:
      mpshm's default, see :func:`mpshm.set_default_backend`). It is
      mpshm's ``backend=``, renamed since joblib's ``backend=`` names this
      class.
    - *start_method*: ``"fork"``, ``"spawn"`` or ``"forkserver"``; default:
      the start method joblib passes (:mod:`multiprocessing`'s default).
    - *share_threshold*, *cache_bytes*, *copy_budget*, and storage options
      such as ``dir=`` (mmap) or ``huge_pages=``: as for
      :func:`mpshm.pool.get_context`.
    """

    supports_retrieve_callback = True
    supports_inner_max_num_threads = False
    default_n_jobs = 1

    def __init__(
        self,
        nesting_level: Optional[int] = None,
        inner_max_num_threads: Optional[int] = None,
        *,
        storage: Optional[str] = None,
        start_method: Optional[str] = None,
        share_threshold: int = DEFAULT_THRESHOLD,
        cache_bytes: Optional[int] = None,
        copy_budget: Optional[int] = None,
        **options: Any,
    ) -> None:
        super().__init__(nesting_level=nesting_level,
                         inner_max_num_threads=inner_max_num_threads)
        if "backend" in options:
            raise TypeError(
                "MpshmBackend takes the mpshm storage as storage=, not backend= "
                "(joblib's backend= names the joblib backend): "
                f"parallel_config(backend={NAME!r}, storage={options['backend']!r})"
            )
        if start_method is not None and start_method not in multiprocessing.get_all_start_methods():
            raise ValueError(
                f"unknown start_method {start_method!r}; choose one of "
                f"{multiprocessing.get_all_start_methods()}"
            )
        self.storage = storage
        self.start_method = start_method
        self.share_threshold = share_threshold
        self.cache_bytes = cache_bytes
        self.copy_budget = copy_budget
        self.options = options
        self._workers: Optional[_Workers] = None
        self._running: set[Future[Any]] = set()
        self._by_value = True
        # Checked now, not at the first call: a bad storage name or option
        # fails where it was given.
        try:
            Carrier(storage, share_threshold, **options)
        except (TypeError, ValueError) as exc:
            raise type(exc)(
                f"{exc} (in the settings of the mpshm joblib backend: storage=, "
                "start_method=, share_threshold=, cache_bytes=, copy_budget= and the "
                "storage's options such as dir=; joblib's own settings go to Parallel)"
            ) from exc
        _check_cache_bytes(cache_bytes)  # (the pool's own checks, and messages)
        _check_copy_budget(copy_budget)

    def effective_n_jobs(self, n_jobs: Optional[int]) -> int:
        """The number of workers for *n_jobs* (negative: counted back from
        the number of CPUs, as joblib does). 1 in a daemonic process (a
        :class:`multiprocessing.Pool`'s worker), which may not start
        processes: joblib then runs the call in this process."""
        if n_jobs == 0:
            raise ValueError("n_jobs == 0 in Parallel has no meaning")
        if n_jobs is None:
            return 1
        if multiprocessing.current_process().daemon:
            if n_jobs != 1:
                warnings.warn(
                    "the mpshm joblib backend cannot start workers in a daemonic "
                    "process (a multiprocessing.Pool's worker): n_jobs=1", stacklevel=3)
            return 1
        if n_jobs < 0:
            return max((os.cpu_count() or 1) + 1 + n_jobs, 1)
        return int(n_jobs)

    def configure(
        self, n_jobs: int = 1, parallel: Any = None, context: Any = None,
        **backend_kwargs: Any,
    ) -> int:
        """Start (or reuse) the workers for a ``Parallel`` call; the number
        of workers."""
        unknown = sorted(set(backend_kwargs) - set(_LOKY_ONLY))
        if unknown:
            raise TypeError(f"the mpshm joblib backend takes no {', '.join(unknown)}")
        n_jobs = self.effective_n_jobs(n_jobs)
        if n_jobs == 1:  # as joblib's own process backends: no worker at all
            raise FallbackToBackend(SequentialBackend(nesting_level=self.nesting_level))
        self.parallel = parallel
        method = self.start_method
        if method is None:
            method = (context.get_start_method() if context is not None
                      else multiprocessing.get_start_method())
        key = (n_jobs, method, self.storage, self.share_threshold, self.cache_bytes,
               self.copy_budget, tuple(sorted(self.options.items())))

        def make() -> SharingContext:
            return get_context(method, backend=self.storage,
                               share_threshold=self.share_threshold,
                               cache_bytes=self.cache_bytes, copy_budget=self.copy_budget,
                               **self.options)

        if self._workers is not None:  # (configured again without terminate)
            _release(self._workers)
        self._workers = _acquire(key, make, n_jobs)
        self._by_value = method != "fork"
        return n_jobs

    def submit(self, func: Any, callback: Optional[Callable[..., Any]] = None) -> Any:
        """Run *func* (a batch of calls) on a worker; *callback* gets its future."""
        workers = self._workers
        if workers is None:
            raise RuntimeError("the mpshm joblib backend was not configured (or was terminated)")
        items = getattr(func, "items", None)  # joblib's BatchedCalls
        if isinstance(items, list):
            _make_portable(items, self._by_value)
        future = workers.executor.submit(func)
        running = self._running
        running.add(future)
        future.add_done_callback(running.discard)
        if callback is not None:
            future.add_done_callback(callback)
        return future

    def retrieve_result_callback(self, out: Future[Any]) -> Any:
        """The batch's result, or its exception raised."""
        try:
            return out.result()
        except BrokenProcessPool as exc:
            raise BrokenProcessPool(
                f"{exc} (a worker of the mpshm joblib backend ended: it was killed, ran "
                "out of memory, or could not start; what the call had in shared memory "
                "is destroyed, and the next call starts new workers)"
            ) from exc

    def terminate(self) -> None:
        """Leave the workers, and the segments they keep warm, for the next
        call (see :func:`shutdown`)."""
        workers, self._workers = self._workers, None
        if workers is not None:
            _release(workers)
        self.reset_batch_stats()

    def abort_everything(self, ensure_ready: bool = True) -> None:
        """A task failed: cancel the call's tasks not yet started; if some
        still run, kill the workers (by PID) so that they stop, and start
        new ones if joblib asks for them."""
        workers, self._workers = self._workers, None
        running = [future for future in list(self._running) if not future.cancel()]
        if workers is not None:
            if not workers.usable() or any(not future.done() for future in running):
                # (A broken executor too: a worker died, and what its tasks
                # had in shared memory is destroyed now, not at the next call.)
                _drop(workers)
                workers.kill()
            _release(workers)
        if ensure_ready and self.parallel is not None:
            self.configure(n_jobs=self.parallel.n_jobs, parallel=self.parallel,
                           **self.parallel._backend_kwargs)


register_parallel_backend(NAME, MpshmBackend)
