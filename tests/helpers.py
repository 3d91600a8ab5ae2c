"""Helpers for the tests, importable by child processes under every start method."""

from __future__ import annotations

import multiprocessing
import os
import signal
import subprocess
import sys
import textwrap
import time
from typing import Any, Callable, Optional

import mpshm

BACKENDS = ["posix", "sysv", "mmap"]
START_METHODS = [
    m for m in ("fork", "spawn", "forkserver") if m in multiprocessing.get_all_start_methods()
]
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def unique(prefix: str = "t") -> str:
    """A name no other test uses."""
    return f"{prefix}_{os.urandom(8).hex()}"


def exists(name: str) -> bool:
    """Whether the segment called *name* can be attached (whoever owns it)."""
    try:
        shm = mpshm.SharedMemory(name, owner_check="ignore")
    except FileNotFoundError:
        return False
    shm.close()
    return True


def wait_until(predicate: Callable[[], bool], timeout: float, step: float = 0.02) -> float:
    """Poll *predicate* until true; return the seconds it took, or raise."""
    start = time.monotonic()
    while not predicate():
        if time.monotonic() - start > timeout:
            raise AssertionError(f"condition not met within {timeout} s")
        time.sleep(step)
    return time.monotonic() - start


def _program_env(env: Optional[dict[str, str]]) -> dict[str, str]:
    """Environment of a separate program: its own tracker, mpshm and helpers importable."""
    full_env = dict(os.environ)
    full_env.pop("MPSHM_TRACKER", None)
    full_env["PYTHONPATH"] = os.pathsep.join(
        p for p in (ROOT, os.path.join(ROOT, "tests"), full_env.get("PYTHONPATH")) if p
    )
    full_env["PYTHONUNBUFFERED"] = "1"
    full_env.update(env or {})
    return full_env


def _default_sigint() -> None:
    """In a child before exec: SIGINT back to its default. A test run started in
    the background by a shell inherits SIGINT ignored, and Python then installs
    no KeyboardInterrupt handler; the programs must react to Ctrl-C as a
    user's would."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def run_script(code: str, timeout: float = 60, env: Optional[dict[str, str]] = None,
               **kwargs: Any) -> subprocess.CompletedProcess[str]:
    """Run *code* in a fresh interpreter (a separate program), capture output."""
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True, text=True, timeout=timeout, env=_program_env(env),
        preexec_fn=_default_sigint, **kwargs,
    )


def popen_script(code: str, env: Optional[dict[str, str]] = None,
                 new_group: bool = False) -> subprocess.Popen[str]:
    """Start *code* in a fresh interpreter with stdin, stdout and stderr piped;
    with *new_group*, in a process group of its own (to kill it whole)."""
    return subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(code)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env=_program_env(env), start_new_session=new_group, preexec_fn=_default_sigint,
    )


def finish(*procs: Optional[subprocess.Popen[str]]) -> None:
    """End programs a test started (kill if still running, by their Popen)
    and close their pipes."""
    for proc in procs:
        if proc is None:
            continue
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)
        for stream in (proc.stdin, proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()


# -- child-process targets (module level, so spawn and forkserver find them) --


def child_write(name: str, data: bytes, offset: int = 0) -> None:
    shm = mpshm.SharedMemory(name)
    shm.buf[offset:offset + len(data)] = data
    shm.close()


def child_read(name: str, length: int, queue: Any) -> None:
    shm = mpshm.SharedMemory(name)
    queue.put((bytes(shm.buf[:length]), shm.size, len(shm.buf)))
    shm.close()


def child_attach_and_exit(name: str) -> None:
    """Attach and exit without closing: must never destroy the segment."""
    shm = mpshm.SharedMemory(name, track=True)
    shm.buf[0] = 7


def child_create(backend: str, size: int, track: bool, queue: Any) -> None:
    shm = mpshm.SharedMemory(create=True, size=size, backend=backend, track=track)
    shm.buf[:3] = b"abc"
    queue.put(shm.name)
    shm.close()


def child_unpickle(shm: mpshm.SharedMemory, queue: Any) -> None:
    shm.buf[1] = 42
    queue.put((shm.name, shm.size, bytes(shm.buf[:4])))
    shm.close()


def child_unlink(name: str) -> None:
    mpshm.SharedMemory(name).unlink()


def child_list_read(sl: mpshm.ShareableList, queue: Any) -> None:
    queue.put(list(sl))
    sl[0] = "changed"
    sl.shm.close()


def spin_write(args: tuple[mpshm.SharedMemory, int]) -> None:
    """Pool task: keep incrementing one byte of a segment until killed."""
    shm, slot = args
    while True:
        shm.buf[slot] = (shm.buf[slot] + 1) % 256


def hold_segment(name: str, ready: Any) -> None:
    """Attach, signal readiness, and keep the segment mapped for a long time."""
    shm = mpshm.SharedMemory(name)
    ready.set()
    time.sleep(120)
    shm.close()


def churn(backend: str, count: int) -> None:
    """Create *count* tracked segments, unlink every other one, print the rest.

    Prints rather than using a multiprocessing Queue: the test kills the
    whole process group, and a Queue's named semaphores (spawn, forkserver)
    would be left behind with the standard library's resource tracker dead.
    """
    kept = []
    for i in range(count):
        shm = mpshm.SharedMemory(create=True, size=4096, backend=backend)
        shm.buf[0] = i % 256
        if i % 2:
            shm.unlink()
        else:
            kept.append(shm.name)
        shm.close()
    for name in kept:  # one write per line: atomic on a pipe, never interleaved
        os.write(1, f"{name}\n".encode())


def recreate(name: str, backend: str, stop: Any, rounds: Any) -> None:
    """Pool/Process target: create and destroy segment *name* until *stop* is set."""
    while not stop.is_set():
        shm = mpshm.SharedMemory(name, create=True, size=4096, backend=backend, track=False)
        shm.close()
        shm.unlink()
        with rounds.get_lock():
            rounds.value += 1


# --------------------------------------------------------------------------
# Pool tasks (importable by spawned workers)


def segment_of(arr: Any) -> Optional[str]:
    """Name of the segment this process maps that holds *arr*'s memory, or None."""
    from mpshm import _mappings, _sysinfo

    address = _sysinfo.buffer_address(arr if arr.flags.c_contiguous else arr.base)
    for owner, region in list(_mappings._regions.items()):
        if not _mappings._mapped(owner):
            continue
        start = _sysinfo.buffer_address(owner)
        if start <= address < start + region.size:
            return region.name
    return None


def describe(arr: Any) -> tuple[float, bool, Optional[str], int]:
    """(sum, writable, segment name, pid) of a received array."""
    return float(arr.sum()), bool(arr.flags.writeable), segment_of(arr), os.getpid()


def fill(arr: Any, value: float) -> Optional[str]:
    """Write *value* everywhere in *arr* (a writable shared array)."""
    arr[...] = value
    return segment_of(arr)


def make_array(n: int, value: float) -> Any:
    """A new float64 array of *n* items, all *value*."""
    import numpy as np

    return np.full(n, value)


def park(arr: Any, path: str) -> None:
    """Record the received array's segment and pid in *path*, then wait forever."""
    with open(path + ".tmp", "w") as f:
        f.write(f"{os.getpid()} {segment_of(arr)}\n")
    os.replace(path + ".tmp", path)
    time.sleep(600)


def make_shared(n: int, value: float, backend: str) -> Any:
    """A new mpshm.numpy array of *n* items, all *value* (made in a worker)."""
    import mpshm.numpy as mnp

    arr = mnp.empty(n, backend=backend)
    arr[:] = value
    return arr


def vanishing(backend: str) -> mpshm.SharedMemory:
    """A pool task returning a handle whose segment it has already destroyed."""
    shm = mpshm.SharedMemory(create=True, size=64, backend=backend, track=False)
    shm.unlink()
    return shm


def nap(seconds: float) -> None:
    """A pool task that sleeps."""
    time.sleep(seconds)


# -- another local user (as root: a forked child that drops to an unused uid) --

#: Unused uids that play other local users (no passwd entry is needed).
OTHER_UIDS = (65534, 65533)


def require_root() -> None:
    """Skip (or, in CI with ``MPSHM_REQUIRE_UNSHARE``, fail) unless running as
    root, which playing another user with ``setuid`` needs."""
    import pytest

    if os.geteuid() != 0:
        if os.environ.get("MPSHM_REQUIRE_UNSHARE"):
            pytest.fail("this test plays another user with setuid: it must run as root")
        pytest.skip("this test plays another user with setuid: run it as root")


def as_other_user(action: Callable[[], Any], uid: int = OTHER_UIDS[0], umask: int = 0o022,
                  timeout: float = 30) -> Any:
    """Run *action* in a forked child with uid and gid *uid* (and no other
    group) and *umask*; return what it returned, or the exception it raised
    as ``("raised", type name, errno, str)``. Root only.

    Forked, not started afresh: the other user may not read this
    interpreter's files. Whatever *action* needs must be imported already.
    """
    import pickle

    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover (the child)
        code = 1
        try:
            os.close(read)
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)
            os.umask(umask)
            try:
                result: Any = ("returned", action())
            except BaseException as exc:  # (reported to the parent)
                result = ("raised", type(exc).__name__, getattr(exc, "errno", None), str(exc))
            os.write(write, pickle.dumps(result))
            code = 0
        finally:
            os._exit(code)
    os.close(write)
    chunks = []
    deadline = time.monotonic() + timeout
    while True:
        chunk = os.read(read, 1 << 16)
        if not chunk:
            break
        chunks.append(chunk)
        assert time.monotonic() < deadline, "the other user's process hangs"
    os.close(read)
    _, status = os.waitpid(pid, 0)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0 and chunks, (
        "the other user's process failed")
    outcome = pickle.loads(b"".join(chunks))
    return outcome[1] if outcome[0] == "returned" else outcome
