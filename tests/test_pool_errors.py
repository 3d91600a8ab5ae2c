"""Issue 16: errors while preparing a task or sending its result fail that
task alone (cases 1), and a pool's ``initargs`` travel through shared
memory, copied once per pool (case 5)."""

from __future__ import annotations

import concurrent.futures
import concurrent.futures.process
import errno
import gc
import json
import multiprocessing
import multiprocessing.pool
import os
import pickle
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time
from typing import Any, Optional

import numpy as np
import pytest
from helpers import START_METHODS, exists, finish, popen_script, segment_of, wait_until

import mpshm
import mpshm.numpy as mnp

MiB = 1 << 20
BACKENDS = ["posix", "sysv"]  # where copies are made differently (file / System V)


@pytest.fixture(params=START_METHODS)
def method(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture(params=BACKENDS)
def shared_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def executor(kind: str, method: str, backend: str, workers: int = 1, **kwargs: Any) -> Any:
    """An executor of *kind*: ours, or the standard class given a sharing context."""
    if kind == "mpshm":
        return mpshm.ProcessPoolExecutor(
            workers, mp_context=multiprocessing.get_context(method), backend=backend, **kwargs)
    return concurrent.futures.ProcessPoolExecutor(
        workers, mp_context=mpshm.get_context(method, backend=backend), **kwargs)


def pool(kind: str, method: str, backend: str, workers: int = 1, **kwargs: Any) -> Any:
    """A pool of *kind*: ours, or the standard class given a sharing context."""
    if kind == "mpshm":
        return mpshm.Pool(workers, context=multiprocessing.get_context(method),
                          backend=backend, **kwargs)
    return multiprocessing.pool.Pool(
        workers, context=mpshm.get_context(method, backend=backend), **kwargs)


# -- tasks (module level: spawned workers import them) --


def total(*arrays: Any) -> float:
    return float(sum(float(np.asarray(a).sum()) for a in arrays))


def unsendable(n: int) -> tuple[Any, Any]:
    """A result with a large buffer (copied out first) and a lock (unpicklable)."""
    return np.ones(n), threading.Lock()


# --------------------------------------------------------------------------
# Case 1: an argument or a result that cannot be sent fails its task alone


@pytest.mark.timeout(120)
@pytest.mark.parametrize("kind", ["mpshm", "standard"])
def test_executor_unpicklable_argument_fails_only_its_future(kind, method, shared_backend):
    arr = np.ones(2 * MiB // 8)  # copied into shared memory before the lock fails
    with executor(kind, method, shared_backend) as ex:
        future = ex.submit(total, arr, threading.Lock())
        exc = future.exception(30)
        assert isinstance(exc, TypeError) and "lock" in str(exc), repr(exc)
        # As the standard library's: the pickling traceback as the cause.
        assert isinstance(exc.__cause__, concurrent.futures.process._RemoteTraceback)
        assert ex.submit(total, arr).result(30) == arr.size  # still working
        # map: the results before the failed call, then its error.
        results = ex.map(total, [arr, threading.Lock(), arr])
        assert next(results) == arr.size
        with pytest.raises(TypeError):
            next(results)
        # Many failed calls at once, then a good one.
        failed = [ex.submit(total, threading.Lock()) for _ in range(50)]
        assert all(isinstance(f.exception(30), TypeError) for f in failed)
        assert ex.submit(total, arr, arr).result(30) == 2 * arr.size
        # A result that cannot be sent (its array copied out first) fails its
        # future, as with the standard library.
        exc = ex.submit(unsendable, 2 * MiB // 8).exception(30)
        assert isinstance(exc, TypeError) and "lock" in str(exc), repr(exc)
        assert ex.submit(total, arr).result(30) == arr.size


def scaled(x: float, *, by: float = 1.0) -> float:
    return x * by


def echo(*args: Any, **kwargs: Any) -> Any:
    return args, kwargs


def fill_with(arr: Any, value: float) -> None:
    arr[:] = value


def ones(n: int) -> Any:
    return np.ones(n)


def fails(message: str) -> None:
    raise KeyError(message)


class Tagged(str):
    """A str subclass that carries an array: not a plain argument."""

    payload: Any = None

    def __reduce__(self) -> tuple[Any, ...]:
        return _tagged, (str(self), self.payload)


def _tagged(text: str, payload: Any) -> Tagged:
    tagged = Tagged(text)
    tagged.payload = payload
    return tagged


def length_of_payload(tag: Tagged) -> int:
    return int(tag.payload.size)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("kind", ["mpshm", "standard"])
def test_plain_calls_behave_as_the_standard_librarys(kind, method):
    """Calls of a plain function with scalar arguments skip the sharing
    pickler (nothing in them can be shared): they must still give the
    standard library's results and errors, and anything else (a result with
    a large array, an argument of a subclass) must still arrive intact."""
    with executor(kind, method, "posix") as ex:
        assert ex.submit(pow, 2, 10).result(30) == 1024  # a builtin
        assert ex.submit(scaled, 3, by=0.5).result(30) == 1.5
        exc = ex.submit(fails, "no such key").exception(30)
        assert isinstance(exc, KeyError) and "no such key" in str(exc)
        assert isinstance(exc.__cause__, concurrent.futures.process._RemoteTraceback)
        # A function that cannot be pickled fails its own future, as the
        # standard library's (an error of its feeder thread).
        exc = ex.submit(lambda: 1).exception(30)
        assert isinstance(exc, (AttributeError, TypeError, pickle.PicklingError)), repr(exc)
        # A large result still travels through shared memory, and is the
        # receiver's own.
        big = ex.submit(ones, 2 * MiB // 8).result(30)
        assert big.sum() == 2 * MiB // 8 and big.flags.writeable
        tag = Tagged("tag")
        tag.payload = np.ones(2 * MiB // 8)
        assert ex.submit(length_of_payload, tag).result(30) == 2 * MiB // 8
        assert ex.submit(scaled, 2).result(30) == 2  # still working
        # Collections of such values (any size, nested, self-referential),
        # and collections that hold an array.
        assert ex.submit(echo, [1, "a", (b"b", None)], key={"k": [2.5]}).result(30) == (
            ([1, "a", (b"b", None)],), {"key": {"k": [2.5]}})
        assert ex.submit(echo, list(range(1000))).result(30) == ((list(range(1000)),), {})
        loop: list[Any] = [1]
        loop.append(loop)
        back = ex.submit(echo, loop).result(30)[0][0]
        assert back[0] == 1 and back[1] is back
        held = ex.submit(echo, [np.ones(2 * MiB // 8)]).result(30)[0][0]
        assert held[0].sum() == 2 * MiB // 8 and held[0].flags.writeable
        # Small arrays and NumPy scalars; but an array in a segment, even a
        # small plain ndarray view of one, still goes by handle: the
        # worker's write is seen here.
        assert ex.submit(echo, np.arange(4.0), np.float32(2)).result(30)[0][1] == 2
        shared = mnp.zeros(4)
        view = shared.view(np.ndarray)
        assert type(view) is np.ndarray
        ex.submit(fill_with, view, 7.0).result(30)
        assert list(shared) == [7.0] * 4
        # A bound method of a builtin object is no module's function: its
        # object goes by the sharing pickler (a memoryview cannot be pickled
        # otherwise).
        view = memoryview(bytearray(2 * MiB))
        assert ex.submit(view.tobytes).result(30) == bytes(2 * MiB)


def test_a_function_the_workers_cannot_find_fails_its_call_only(method, monkeypatch):
    """A function the parent pickles by name but a spawned worker cannot find
    (one defined under ``if __name__ == "__main__":``) fails its call alone,
    with an error that says what to do, as other tasks that cannot be
    unpickled do; with fork the worker has it."""
    def vanishing(x: int) -> int:
        return x * 2

    vanishing.__qualname__ = vanishing.__name__ = "_defined_only_in_the_parent"
    monkeypatch.setattr(sys.modules[__name__], "_defined_only_in_the_parent", vanishing,
                        raising=False)
    with executor("mpshm", method, "posix") as ex:
        future = ex.submit(vanishing, 21)
        if method == "fork":
            assert future.result(30) == 42
        else:
            exc = future.exception(30)
            assert isinstance(exc, AttributeError), repr(exc)
            assert "_defined_only_in_the_parent" in str(exc) and "top level" in str(exc)
        assert ex.submit(scaled, 2, by=3).result(30) == 6  # the pool is intact


@pytest.mark.timeout(60)
@pytest.mark.parametrize("kind", ["mpshm", "standard"])
def test_executor_shuts_down_after_a_failed_last_call(kind, method):
    """The failed call was the only one pending when shutdown was asked
    for: the executor must not wait for it (nor the ``with`` block)."""
    ex = executor(kind, method, "posix")
    assert ex.submit(total, np.ones(8)).result(30) == 8  # workers are up
    future = ex.submit(total, threading.Lock())
    start = time.monotonic()
    ex.shutdown(wait=True)
    assert time.monotonic() - start < 30
    assert isinstance(future.exception(0), TypeError)


def _pool_outcomes(p: Any, arr: Any) -> list[Any]:
    """What each way of sending an unpicklable argument or result gives."""
    lock = threading.Lock()
    attempts = {
        "apply_async": lambda: p.apply_async(total, (arr, lock)).get(30),
        "map": lambda: p.map(total, [arr, lock, arr], chunksize=1),
        "map chunked": lambda: p.map(total, [arr, lock, arr]),
        "imap": lambda: list(p.imap(total, [arr, lock, arr])),
        "imap_unordered": lambda: list(p.imap_unordered(total, [arr, lock])),
        "starmap": lambda: p.starmap(total, [(arr, lock)]),
        "result": lambda: p.apply_async(unsendable, (2 * MiB // 8,)).get(30),
        "results of map": lambda: p.map(unsendable, [8, 8]),
        "later": lambda: p.apply(total, (arr,)),
    }
    outcomes = []
    for name, attempt in attempts.items():
        try:
            outcomes.append((name, "returned", attempt()))
        except Exception as exc:
            cause = str(getattr(exc, "exc", ""))  # a MaybeEncodingError's: a repr
            outcomes.append((name, type(exc).__name__, cause.partition("(")[0]))
    return outcomes


@pytest.mark.timeout(120)
@pytest.mark.parametrize("kind", ["mpshm", "standard"])
def test_pool_unpicklable_argument_or_result_as_the_standard_pool(kind, method, shared_backend):
    """(Already so before issue 16: a guard.) ``MaybeEncodingError`` for a
    result, the pickling error for an argument, and the pool goes on."""
    arr = np.ones(2 * MiB // 8)
    with multiprocessing.get_context(method).Pool(1) as p:
        expected = _pool_outcomes(p, arr)
    with pool(kind, method, shared_backend) as p:
        assert _pool_outcomes(p, arr) == expected


NAMESPACE_SHELL = (
    "mount -t tmpfs -o size=64m,mode=1777 tmpfs /dev/shm && "
    "mkdir -m 0700 /dev/shm/mmap /dev/shm/state && "
    "echo NAMESPACE-READY && "
    'exec "$0" "$@"'
)

ENOSPC_PROGRAM = '''
import concurrent.futures, json, multiprocessing, os, sys
import numpy as np
import mpshm

MiB = 1 << 20


def size(arr):
    return arr.nbytes


def big(nbytes):
    return np.ones(nbytes // 8)


def failure(exc):
    if getattr(exc, "errno", None) == 28 or "OSError(28," in str(exc):
        # (a MaybeEncodingError holds the repr of its cause)
        return [type(exc).__name__, getattr(exc, "errno", 28)]
    return [type(exc).__name__, getattr(exc, "errno", None), str(exc)]


def left():
    names = [n for n in os.listdir("/dev/shm") if n not in ("mmap", "state")
             and not n.startswith("sem.")]
    return names + os.listdir("/dev/shm/mmap")


if __name__ == "__main__":
    backend, method = sys.argv[1:3]
    huge = np.ones(128 * MiB // 8)  # twice the storage
    out = {}
    executors = {
        "mpshm": lambda: mpshm.ProcessPoolExecutor(
            1, mp_context=multiprocessing.get_context(method), backend=backend),
        "standard": lambda: concurrent.futures.ProcessPoolExecutor(
            1, mp_context=mpshm.get_context(method, backend=backend)),
    }
    for kind, make in executors.items():
        with make() as ex:
            out[kind + " argument"] = failure(ex.submit(size, huge).exception(60))
            out[kind + " result"] = failure(ex.submit(big, 128 * MiB).exception(60))
            out[kind + " later"] = ex.submit(size, np.ones(4 * MiB // 8)).result(60)
    with mpshm.Pool(1, context=multiprocessing.get_context(method), backend=backend) as pool:
        for name, args in (("argument", (size, (huge,))), ("result", (big, (128 * MiB,)))):
            try:
                pool.apply(*args)
            except Exception as exc:
                out["pool " + name] = failure(exc)
        out["pool later"] = pool.apply(size, (np.ones(4 * MiB // 8),))
    mpshm._mappings.reaper.drain()
    out["left"] = left()
    print("RESULT " + json.dumps(out))
'''


@pytest.mark.timeout(240)
@pytest.mark.parametrize("backend", ["posix", "mmap"])
def test_storage_full_fails_only_the_task(backend, method, tmp_path):
    """ENOSPC while copying an argument in (or a result out): that task fails
    with it, the executor or pool goes on; in a private 64 MiB /dev/shm."""
    if not shutil.which("unshare"):
        pytest.skip("util-linux unshare is needed for this test")
    user = [] if os.geteuid() == 0 else ["--map-root-user"]
    program = tmp_path / "enospc_program.py"
    program.write_text(ENOSPC_PROGRAM)
    env = dict(os.environ, MPSHM_DIR="/dev/shm/mmap", MPSHM_STATE_DIR="/dev/shm/state",
               PYTHONUNBUFFERED="1")
    env.pop("MPSHM_TRACKER", None)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    try:
        result = subprocess.run(
            ["unshare", "--mount", "--ipc", *user, "sh", "-c", NAMESPACE_SHELL,
             sys.executable, str(program), backend, method],
            capture_output=True, text=True, timeout=200, env=env,
        )
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"the program hangs:\n{exc.stdout!r}\n{exc.stderr!r}")
    if "NAMESPACE-READY" not in result.stdout:
        pytest.skip(f"cannot build private namespaces here: {result.stderr.strip()}")
    assert result.returncode == 0, f"{result.stdout}\n{result.stderr}"
    line = next(ln for ln in result.stdout.splitlines() if ln.startswith("RESULT "))
    out = json.loads(line[len("RESULT "):])
    enospc = ["OSError", errno.ENOSPC]
    for kind in ("mpshm", "standard"):
        assert out[kind + " argument"] == enospc, out
        assert out[kind + " result"] == enospc, out
        assert out[kind + " later"] == 4 * MiB, out
    assert out["pool argument"] == enospc, out
    assert out["pool result"] == ["MaybeEncodingError", errno.ENOSPC], out  # as the stdlib's
    assert out["pool later"] == 4 * MiB, out
    assert out["left"] == [], out


# --------------------------------------------------------------------------
# Case 5: initargs travel through shared memory, copied once per pool

_initargs: Any = None


def keep_initargs(arr: Any, tag: str, queue: Any) -> None:
    """Pool initializer: keep the arguments; say so through *queue* (a
    queue in initargs is passed to each worker process of its own)."""
    global _initargs
    _initargs = (arr, tag)
    queue.put((os.getpid(), tag))


def initargs_seen(_: Any = None) -> tuple[float, str, Optional[str], int]:
    """(sum, tag, segment holding the array, pid) in this worker."""
    arr, tag = _initargs
    return float(arr.sum()), tag, segment_of(arr), os.getpid()


def _check_initargs(seen: list[Any], arr: Any, method: str) -> Optional[str]:
    """Every worker got the right values; under spawn and forkserver, from
    one segment (one copy per pool). Returns its name."""
    assert {(s[0], s[1]) for s in seen} == {(float(arr.sum()), "tag")}, seen
    names = {s[2] for s in seen}
    if method == "fork":  # inherited, nothing pickled
        return None
    assert len(names) == 1 and None not in names, seen
    return names.pop()


@pytest.mark.timeout(180)
@pytest.mark.parametrize("kind", ["mpshm", "standard"])
def test_pool_initargs_travel_through_shared_memory(kind, method, shared_backend):
    arr = np.arange(4 * MiB // 8, dtype="float64")
    queue = multiprocessing.get_context(method).Queue()
    with pool(kind, method, shared_backend, 2, initializer=keep_initargs,
              initargs=(arr, "tag", queue), maxtasksperchild=1) as p:
        # maxtasksperchild=1: every task in a new worker, the same copy.
        seen = p.map(initargs_seen, range(5), chunksize=1)
        name = _check_initargs(seen, arr, method)
        assert len({s[3] for s in seen}) == 5
        p.close()
        p.join()
    started = set()  # every worker (replacements too) said so, through its own queue
    while not {s[3] for s in seen} <= {pid for pid, _ in started}:
        started.add(queue.get(timeout=30))
    del p
    gc.collect()  # the standard class: with the pool object
    if name is not None:
        wait_until(lambda: not exists(name), 10)  # it ended with the pool
    queue.close()
    queue.join_thread()


@pytest.mark.timeout(180)
@pytest.mark.parametrize("kind", ["mpshm", "standard"])
def test_executor_initargs_travel_through_shared_memory(kind, method, shared_backend):
    arr = np.arange(4 * MiB // 8, dtype="float64")
    queue = multiprocessing.get_context(method).Queue()
    with executor(kind, method, shared_backend, 2, initializer=keep_initargs,
                  initargs=(arr, "tag", queue)) as ex:
        seen = [f.result(60) for f in [ex.submit(initargs_seen) for _ in range(4)]]
        name = _check_initargs(seen, arr, method)
        assert queue.get(timeout=30)[1] == "tag"
    del ex
    gc.collect()  # the standard class: with the executor's queue
    if name is not None:
        wait_until(lambda: not exists(name), 10)
    queue.close()
    queue.join_thread()


@pytest.mark.timeout(120)
@pytest.mark.parametrize("pickling_method", [m for m in START_METHODS if m != "fork"])
def test_initargs_copies_end_with_a_shared_context(pickling_method):
    """Two pools of one context: each pool's copy ends with the pool (the
    context lives on), and a pool whose array changed gets the new values.
    (Under fork nothing is pickled.)"""
    method = pickling_method
    ctx = mpshm.get_context(method)
    arr = np.ones(2 * MiB // 8)
    queue = multiprocessing.get_context(method).Queue()
    try:
        names = []
        for value in (1.0, 2.0):
            arr[:] = value
            p = multiprocessing.pool.Pool(1, keep_initargs, (arr, "tag", queue), context=ctx)
            total_seen, _, name, _ = p.apply(initargs_seen)
            assert total_seen == value * arr.size and name is not None
            names.append(name)
            p.close()
            p.join()
            del p
            gc.collect()  # (a pool object is in reference cycles)
            wait_until(lambda name=name: not exists(name), 10)
        assert names[0] != names[1]
    finally:
        ctx.close()
        queue.close()
        queue.join_thread()


PARENT_KILLED = '''
import multiprocessing, sys, time
import numpy as np
import mpshm
from test_pool_errors import initargs_seen, keep_initargs

if __name__ == "__main__":
    queue = multiprocessing.get_context(sys.argv[1]).Queue()
    pool = mpshm.Pool(2, keep_initargs, (np.ones((4 << 20) // 8), "tag", queue),
                      context=multiprocessing.get_context(sys.argv[1]), backend=sys.argv[2])
    print(pool.apply(initargs_seen)[2], flush=True)
    time.sleep(600)
'''


@pytest.mark.timeout(120)
@pytest.mark.parametrize("method", [m for m in START_METHODS if m != "fork"])
def test_initargs_copy_ends_when_the_parent_is_killed(method, shared_backend, tmp_path):
    program = tmp_path / "parent_killed.py"
    program.write_text(textwrap.dedent(PARENT_KILLED))
    here = os.path.dirname(os.path.abspath(__file__))
    proc = popen_script(
        f"import runpy, sys; sys.argv = [{str(program)!r}, {method!r}, {shared_backend!r}]; "
        f"sys.path.insert(0, {here!r}); runpy.run_path({str(program)!r}, run_name='__main__')",
        new_group=True)
    try:
        assert proc.stdout is not None
        name = proc.stdout.readline().strip()
        assert name and name != "None", (name, proc.stderr.read() if proc.poll() else "")
        assert exists(name)
        # The parent alone (its workers exit when it dies, and the standard
        # library's resource tracker, in the same group, removes the pool's
        # semaphores: killing the group would leave them behind).
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(30)
        wait_until(lambda: not exists(name), 30)
        wait_until(lambda: not _group_alive(proc.pid), 30)
    finally:
        if _group_alive(proc.pid):
            os.killpg(proc.pid, signal.SIGKILL)
        finish(proc)


def _group_alive(pgid: int) -> bool:
    """Whether any process of group *pgid* (one this test started) is left."""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True
