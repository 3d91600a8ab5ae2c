"""The joblib backend (``parallel_config(backend="mpshm")``), against real joblib.

Arguments and results through each storage and start method, generators,
errors in tasks, shared output arrays, settings, and SIGKILL of a worker
and of the parent; and mpshm arrays returned under joblib's default
backend (loky), which must work rather than break its pool.
"""

from __future__ import annotations

import concurrent.futures
import multiprocessing
import os
import signal
import threading

import numpy as np
import pytest
from helpers import (
    BACKENDS,
    START_METHODS,
    exists,
    park,
    popen_script,
    run_script,
    segment_of,
    wait_until,
)

joblib = pytest.importorskip("joblib", minversion="1.5", reason="pip install 'mpshm[joblib]'")

import mpshm.joblib  # noqa: E402
import mpshm.numpy as mnp  # noqa: E402

pytestmark = pytest.mark.timeout(120)

MiB = 1 << 20
N = MiB // 8  # float64 items of a 1 MiB array: above the share threshold


@pytest.fixture(autouse=True)
def _end_workers():
    """Each test ends the workers the backend keeps between calls (and what
    they keep warm), so no test sees another's."""
    yield
    mpshm.joblib.shutdown()


def parallel(**config):
    """A ``Parallel`` on the mpshm backend with 2 workers and *config*."""
    return joblib.Parallel(backend=mpshm.joblib.MpshmBackend(**config), n_jobs=2)


# -- tasks (module level: spawned workers import them) --

def made(i: int) -> np.ndarray:
    return np.full(N, float(i))


def where(arr: np.ndarray) -> tuple[float, bool, str | None, int]:
    """(sum, writable, segment holding it, pid) of an argument."""
    return float(arr.sum()), bool(arr.flags.writeable), segment_of(arr), os.getpid()


def write_part(out: np.ndarray, i: int, parts: int) -> None:
    step = len(out) // parts
    out[i * step:(i + 1) * step] = i + 1


def made_shared(i: int) -> np.ndarray:
    arr = mnp.empty(N)
    arr[:] = i
    return arr


def fails_on(i: int, bad: int, payload: object = None) -> int:
    if i == bad:
        raise ValueError(f"task {i} refuses")
    return i


def _parked(path: str, timeout: float = 60) -> tuple[int, str]:
    wait_until(lambda: os.path.exists(path), timeout)
    with open(path) as f:
        pid, name = f.read().split()
    return int(pid), name


# -- results and arguments --

@pytest.mark.parametrize("method", START_METHODS)
@pytest.mark.parametrize("storage", BACKENDS)
def test_results_arrive_through_shared_memory_as_the_parents_own(storage, method):
    with joblib.parallel_config(backend="mpshm", n_jobs=2, storage=storage,
                                start_method=method):
        results = joblib.Parallel()(joblib.delayed(made)(i) for i in range(4))
    assert [float(r[0]) for r in results] == [0.0, 1.0, 2.0, 3.0]
    assert all(r.shape == (N,) and float(r.sum()) == i * N for i, r in enumerate(results))
    names = [segment_of(r) for r in results]
    assert all(names), "a result was copied out of its segment (pickled, not shared)"
    # Writable, and the parent's own: its writes reach nobody else, and the
    # workers' next results are not the arrays the parent holds.
    assert all(r.flags.writeable for r in results)
    results[0][:] = 7.0
    again = parallel(storage=storage, start_method=method)(
        joblib.delayed(made)(i) for i in range(4))
    assert [float(r[-1]) for r in again] == [0.0, 1.0, 2.0, 3.0]
    assert float(results[0].sum()) == 7.0 * N
    # Valid after the call and after the backend is gone; destroyed when dropped.
    mpshm.joblib.shutdown()
    assert float(results[3].sum()) == 3.0 * N
    results[3][0] = -1.0
    assert results[3][0] == -1.0
    del results, again
    assert wait_until(lambda: not any(exists(name) for name in names), 10) < 10


@pytest.mark.parametrize("storage", BACKENDS)
def test_arguments_go_by_handle_and_workers_write_into_a_shared_output(storage):
    big = np.arange(4 * N, dtype=np.float64)
    out = mnp.zeros(4 * N, backend=storage)
    par = parallel(storage=storage)
    seen = par(joblib.delayed(where)(big) for _ in range(2))
    assert all(s == float(big.sum()) and name for s, _, name, _ in seen)
    assert all(writable for _, writable, _, _ in seen)  # as a pickled copy would be
    par(joblib.delayed(write_part)(out, i, 4) for i in range(4))
    assert [float(out[i * N]) for i in range(4)] == [1.0, 2.0, 3.0, 4.0]
    # The preshared array went by handle: the workers saw its own segment.
    seen = par(joblib.delayed(where)(out) for _ in range(2))
    assert {name for _, _, name, _ in seen} == {mnp.segment_name(out)}
    mnp.release(out)


def test_mmap_storage_in_a_directory_of_ones_choice(tmp_path):
    directory = tmp_path / "segments"
    directory.mkdir(mode=0o700)
    with joblib.parallel_config(backend="mpshm", n_jobs=2, storage="mmap", dir=str(directory)):
        seen = joblib.Parallel()(joblib.delayed(where)(np.ones(2 * N)) for _ in range(2))
        results = joblib.Parallel()(joblib.delayed(made)(i) for i in range(2))
    assert all(name and name.startswith(f"mmap:{directory}{os.sep}") for _, _, name, _ in seen)
    assert float(results[1].sum()) == N
    del results
    mpshm.joblib.shutdown()
    assert wait_until(lambda: not os.listdir(directory), 10) < 10


@pytest.mark.parametrize("return_as", ["generator", "generator_unordered"])
def test_generators_yield_results_as_they_come(return_as):
    gen = parallel()(joblib.delayed(made)(i) for i in range(6))
    assert isinstance(gen, list)
    out = joblib.Parallel(backend=mpshm.joblib.MpshmBackend(), n_jobs=2, return_as=return_as)(
        joblib.delayed(made)(i) for i in range(6))
    assert not isinstance(out, list)
    firsts = sorted(float(r[0]) for r in out)
    assert firsts == [float(i) for i in range(6)]


def test_many_small_tasks_are_batched_and_all_answered():
    out = parallel()(joblib.delayed(abs)(-i) for i in range(3000))
    assert out == list(range(3000))


@pytest.mark.parametrize("method", ["spawn", "fork"])
def test_lambdas_and_nested_functions_run_as_under_loky(method):
    offset = 10

    def nested(x):
        return x + offset

    par = parallel(start_method=method)
    assert par(joblib.delayed(lambda x: x * 2)(i) for i in range(3)) == [0, 2, 4]
    assert par(joblib.delayed(nested)(i) for i in range(3)) == [10, 11, 12]


def test_n_jobs_1_runs_in_this_process():
    with joblib.parallel_config(backend="mpshm", n_jobs=1):
        assert joblib.Parallel()(joblib.delayed(os.getpid)() for _ in range(2)) == [
            os.getpid()] * 2


NESTED = """
    import joblib, mpshm.joblib, test_joblib

    if __name__ == "__main__":
        with joblib.parallel_config(backend="mpshm", n_jobs=2):
            print(joblib.Parallel()(joblib.delayed(test_joblib.nested_sum)(i) for i in range(2)))
"""


def nested_sum(i: int) -> int:
    with joblib.parallel_config(backend="mpshm", n_jobs=2):
        return sum(joblib.Parallel()(joblib.delayed(abs)(-j) for j in range(4))) + i


def test_a_nested_call_runs_and_the_program_ends():
    """A task's own call on the backend starts workers in the worker; they
    end with it (else the worker, and the program, would wait forever)."""
    result = run_script(NESTED, timeout=90)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[6, 7]"


THREADS = """
    import threading, joblib, mpshm.joblib, test_joblib

    if __name__ == "__main__":
        outcome = {}
        threads = [threading.Thread(target=test_joblib.calls, args=(n, outcome), daemon=True)
                   for n in (2, 3)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        print(sorted(outcome.items()))
"""


def calls(n_jobs: int, outcome: dict[int, object]) -> None:
    """Three calls with *n_jobs* workers (a thread's part of the test below)."""
    try:
        for _ in range(3):
            with joblib.parallel_config(backend="mpshm", n_jobs=n_jobs):
                got = joblib.Parallel()(joblib.delayed(made)(i) for i in range(6))
            assert [float(r[0]) for r in got] == [float(i) for i in range(6)]
        outcome[n_jobs] = "ok"
    except BaseException as exc:  # (reported by the program)
        outcome[n_jobs] = repr(exc)


@pytest.mark.parametrize("attempt", range(3))
def test_threads_with_different_settings_run_calls_at_once(attempt):
    """Two threads, two sets of workers (forked: the program's first calls,
    while mpshm.numpy is being imported; a worker forked then once waited
    for that import for ever)."""
    result = run_script(THREADS, timeout=90)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[(2, 'ok'), (3, 'ok')]", result.stdout + result.stderr


# -- errors --

def test_an_error_in_a_task_is_raised_and_the_backend_goes_on(tmp_path):
    directory = tmp_path / "segments"  # (this test's segments, and no other's)
    directory.mkdir(mode=0o700)
    with joblib.parallel_config(backend="mpshm", n_jobs=2, storage="mmap", dir=str(directory)):
        with pytest.raises(ValueError, match="task 3 refuses"):
            joblib.Parallel()(joblib.delayed(fails_on)(i, 3) for i in range(8))
        assert joblib.Parallel()(joblib.delayed(fails_on)(i, -1) for i in range(4)) == [
            0, 1, 2, 3]
        big = np.ones(2 * N)
        with pytest.raises(ValueError, match="task 1 refuses"):
            joblib.Parallel()(joblib.delayed(fails_on)(i, 1, big) for i in range(3))
        assert float(joblib.Parallel()(joblib.delayed(np.sum)(big) for _ in range(2))[1]) == (
            2 * N)
    mpshm.joblib.shutdown()
    # (What killed workers made, the tracker destroys: at once, in its process.)
    assert wait_until(lambda: not os.listdir(directory), 10) < 10, os.listdir(directory)


def test_bad_settings_fail_where_they_are_given():
    with pytest.raises(ValueError, match="nope"):
        joblib.parallel_config(backend="mpshm", storage="nope")
    with pytest.raises(TypeError, match="storage="):
        mpshm.joblib.MpshmBackend(backend="sysv")
    with pytest.raises(ValueError, match="start_method"):
        mpshm.joblib.MpshmBackend(start_method="vfork")
    with pytest.raises(ValueError, match="cache_bytes"):
        mpshm.joblib.MpshmBackend(cache_bytes=-1)
    with pytest.raises(ValueError, match="n_jobs == 0"):
        joblib.Parallel(backend="mpshm", n_jobs=0)(joblib.delayed(abs)(1) for _ in range(1))


def test_the_backend_is_registered_under_its_name():
    from joblib.parallel import BACKENDS

    assert BACKENDS[mpshm.joblib.NAME] is mpshm.joblib.MpshmBackend
    with joblib.parallel_backend("mpshm", n_jobs=2, storage="sysv"):
        assert joblib.Parallel()(joblib.delayed(abs)(-i) for i in range(3)) == [0, 1, 2]


# -- mpshm arrays returned by tasks, under every backend --

@pytest.mark.parametrize("joblib_backend", ["loky", "mpshm", "multiprocessing"])
def test_an_mpshm_array_returned_by_a_task_arrives(joblib_backend):
    with joblib.parallel_config(backend=joblib_backend, n_jobs=2):
        out = joblib.Parallel()(joblib.delayed(made_shared)(i) for i in range(4))
        assert [float(a.sum()) for a in out] == [float(i * N) for i in range(4)]
        # The pool is not broken: it takes the next call.
        assert joblib.Parallel()(joblib.delayed(abs)(-i) for i in range(3)) == [0, 1, 2]


@pytest.mark.parametrize("method", ["fork", "spawn"])
@pytest.mark.parametrize("kind", ["pool", "executor"])
def test_an_mpshm_array_returned_by_a_standard_library_pool_arrives(kind, method):
    """The standard library's workers pickle a result, then drop it: an
    mpshm array goes by value there (a handle would outlive its segment
    and break the pool's result handling)."""
    ctx = multiprocessing.get_context(method)
    if kind == "pool":
        with ctx.Pool(2) as pool:
            out = pool.map(made_shared, range(3))
            assert pool.apply(abs, (-1,)) == 1
    else:
        with concurrent.futures.ProcessPoolExecutor(2, mp_context=ctx) as ex:
            out = list(ex.map(made_shared, range(3)))
            assert ex.submit(abs, -1).result(30) == 1
    assert [float(a.sum()) for a in out] == [0.0, float(N), float(2 * N)]


def pickled_by_handle(_: int) -> bool:
    """Whether an mpshm array this task pickles itself (for a helper
    process, say) still goes by handle: unpickled, it is the same memory."""
    import pickle

    arr = mnp.zeros(N)
    return bool(np.shares_memory(arr, pickle.loads(pickle.dumps(arr))))


@pytest.mark.parametrize("joblib_backend", ["loky", "mpshm", "multiprocessing"])
def test_an_mpshm_array_pickled_by_a_task_itself_goes_by_handle(joblib_backend):
    """Only the pool's own pickling of a result goes by value."""
    assert pickled_by_handle(0)
    with joblib.parallel_config(backend=joblib_backend, n_jobs=2):
        assert joblib.Parallel()(joblib.delayed(pickled_by_handle)(i) for i in range(2)) == [
            True, True]


# -- crashes --

def _run_parked(par, arrays, paths, outcome):
    try:
        par(joblib.delayed(park)(a, p) for a, p in zip(arrays, paths))
    except BaseException as exc:  # (reported to the test's thread)
        outcome.append(exc)


@pytest.mark.parametrize("storage", BACKENDS)
def test_a_worker_killed_mid_task_fails_the_call_and_leaves_nothing(storage, tmp_path):
    paths = [str(tmp_path / f"parked{i}") for i in range(2)]
    outcome: list[BaseException] = []
    par = parallel(storage=storage, start_method="spawn")
    caller = threading.Thread(target=_run_parked,
                              args=(par, [np.full(N, 1.0), np.full(N, 2.0)], paths, outcome))
    caller.start()
    parked = [_parked(p) for p in paths]
    names = [name for _, name in parked]
    assert all(exists(name) for name in names)
    os.kill(parked[0][0], signal.SIGKILL)  # (a worker this test's backend started)
    caller.join(60)
    assert not caller.is_alive()
    assert len(outcome) == 1 and isinstance(
        outcome[0], concurrent.futures.process.BrokenProcessPool), outcome
    assert "mpshm joblib backend" in str(outcome[0])
    # The call is over: its copies are destroyed, the other worker stopped.
    assert wait_until(lambda: not any(exists(name) for name in names), 10) < 10
    assert wait_until(lambda: not os.path.exists(f"/proc/{parked[1][0]}"), 10) < 10
    # The next call starts new workers.
    assert parallel(storage=storage)(joblib.delayed(abs)(-i) for i in range(3)) == [0, 1, 2]


PARENT = """
    import numpy as np, joblib, mpshm.joblib, helpers

    if __name__ == "__main__":
        arrays = [np.full(1 << 17, float(i)) for i in range(2)]
        with joblib.parallel_config(backend="mpshm", n_jobs=2, storage={storage!r},
                                    start_method={method!r}):
            joblib.Parallel()(joblib.delayed(helpers.park)(a, p)
                              for a, p in zip(arrays, {paths!r}))
"""


@pytest.mark.parametrize("method", START_METHODS)
@pytest.mark.parametrize("storage", BACKENDS)
def test_the_parent_killed_mid_call_leaves_nothing(storage, method, tmp_path):
    paths = [str(tmp_path / f"parked{i}") for i in range(2)]
    proc = popen_script(PARENT.format(storage=storage, method=method, paths=paths))
    try:
        parked = [_parked(p) for p in paths]
        names = [name for _, name in parked]
        assert all(exists(name) for name in names)
        proc.kill()  # SIGKILL, by PID: the process this test started
        proc.wait(10)
        assert wait_until(lambda: not any(exists(name) for name in names), 5) < 5
        assert wait_until(lambda: not any(os.path.exists(f"/proc/{pid}")
                                          for pid, _ in parked), 5) < 5
    finally:
        proc.kill()
        proc.wait(10)
        for path in paths:
            if os.path.exists(path):
                pid, _ = _parked(path, 0.1)
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
