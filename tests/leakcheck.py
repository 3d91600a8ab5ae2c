"""The leak checks of the test suite, as a pytest plugin (``-p leakcheck``).

Two levels of checking:

* every test: a segment this test process registered with its tracker and
  did not unlink fails that test (and is then destroyed);
* the whole session: what exists in /dev/shm, in ``ipcs -m`` and in the
  mmap backend's directory after every worker has exited (and its tracker
  has run) is compared with what existed before the session; anything new
  fails the run, named.
"""

from __future__ import annotations

import os
import time
from typing import Iterator

import pytest

from mpshm import _mappings, tracking
from mpshm.backends import get
from mpshm.backends.mmapfile import default_dir

# --------------------------------------------------------------------------
# Leak snapshots


def snapshot() -> set[str]:
    """Every segment visible on every backend (and every POSIX semaphore),
    as ``backend:name`` strings."""
    found: set[str] = set()
    if os.path.isdir("/dev/shm"):
        for entry in os.listdir("/dev/shm"):
            # sem.* are POSIX semaphores (multiprocessing's locks and queues):
            # not segments, but the suite must not leak those either.
            kind = "posix-semaphore" if entry.startswith("sem.") else "posix"
            found.add(f"{kind}:{entry}")
    try:
        with open("/proc/sysvipc/shm") as f:
            for line in f.read().splitlines()[1:]:
                fields = line.split()
                found.add(f"sysv:key={int(fields[0]) & 0xFFFFFFFF:#010x},id={fields[1]}")
    except OSError:
        pass
    directory = default_dir()
    if os.path.isdir(directory):
        for entry in os.listdir(directory):
            found.add(f"mmap:{os.path.join(directory, entry)}")
    return found


def leaked_since(before: set[str], wait: float) -> set[str]:
    """New segments since *before*, waiting up to *wait* s for trackers."""
    deadline = time.monotonic() + wait
    while True:
        new = snapshot() - before
        if not new or time.monotonic() > deadline:
            return new
        time.sleep(0.1)


def _is_controller(config: pytest.Config) -> bool:
    return not hasattr(config, "workerinput")


def pytest_sessionstart(session: pytest.Session) -> None:
    if _is_controller(session.config):
        session.config._mpshm_before = snapshot()  # type: ignore[attr-defined]


@pytest.hookimpl(trylast=True)
def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if not _is_controller(session.config):
        return
    before = getattr(session.config, "_mpshm_before", None)
    if before is None:
        return
    new = leaked_since(before, wait=float(os.environ.get("MPSHM_LEAKCHECK_WAIT", "15")))
    if new:
        reporter = session.config.pluginmanager.get_plugin("terminalreporter")
        lines = "\n".join(f"  {name}" for name in sorted(new))
        message = f"\nLEAKED SEGMENTS: the test session left {len(new)} segment(s):\n{lines}\n"
        if reporter is not None:
            reporter.write_line(message, red=True, bold=True)
        else:
            print(message)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


@pytest.fixture(autouse=True)
def _no_tracked_leak() -> Iterator[None]:
    """Fail a test that leaves a tracked segment of this process behind."""
    before = set(tracking.tracked())
    yield
    left = set(tracking.tracked()) - before
    if left:
        # Segments this process took over are destroyed by the reaper's
        # thread once their last view is gone (see mpshm._mappings._Reaper):
        # let it finish what the test's end queued before calling anything
        # a leak.
        _mappings.reaper.drain()
        deadline = time.monotonic() + 2
        while left and time.monotonic() < deadline:
            time.sleep(0.01)
            left = set(tracking.tracked()) - before
    for backend, ident in left:
        try:
            get(backend).unlink(ident)
        except FileNotFoundError:
            pass
        tracking.unregister(backend, ident)
    if left:
        pytest.fail(f"test left tracked segment(s) behind: {sorted(left)}")
