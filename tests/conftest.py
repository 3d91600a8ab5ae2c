"""Shared fixtures. The leak checks live in leakcheck.py (loaded below)."""

from __future__ import annotations

import faulthandler
import multiprocessing
import os
import sys
from typing import Any, Callable, Generator, Iterator

import pytest
from helpers import BACKENDS, START_METHODS

import mpshm

pytest_plugins = ["leakcheck"]


def pytest_configure(config: pytest.Config) -> None:
    # Capture is suspended now: fd 2 is the terminal's (see _stderr()).
    config.stash[_STDERR] = os.fdopen(os.dup(2), "w")
    # The reliability groups of issue 7 (tests/test_stress.py, test_limits.py,
    # test_faults.py): part of the normal run; select them with -m.
    config.addinivalue_line(
        "markers", "stress: many processes at once, every byte checked (MPSHM_STRESS_SCALE)"
    )
    config.addinivalue_line(
        "markers", "faults: SIGKILL at random moments, storage removed or full"
    )


# --------------------------------------------------------------------------
# No hang past pytest-timeout
#
# pytest-timeout's signal method raises in the main thread once, when the time
# is up: a test whose cleanup then blocks (a join in a finally, an executor's
# shutdown waiting for a parked worker), or that is blocked where the alarm's
# exception is swallowed (a finalizer), hangs for good. faulthandler's
# watchdog thread (C code) needs no cooperation: GRACE seconds past a test's
# timeout it prints every thread's stack and ends the process (pytest-xdist
# reports the worker as crashed and goes on).
#
# And after the last test nothing bounds the run: a forked child that a test
# left running holds the xdist worker's channel to the controller open, and
# the controller waits for it (a parked pool worker sleeps 600 s). So a
# worker kills the multiprocessing children still alive at its end, and says so.

GRACE = 60.0


def _timeout_of(item: pytest.Item) -> float:
    marker = item.get_closest_marker("timeout")
    value: Any = None
    if marker is not None:
        value = marker.args[0] if marker.args else marker.kwargs.get("timeout")
    if value is None:
        try:
            value = item.config.getoption("timeout") or item.config.getini("timeout")
        except ValueError:  # pytest-timeout not installed
            return 0.0
    try:
        return float(value or 0)
    except (TypeError, ValueError):
        return 0.0


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item: pytest.Item) -> Generator[None, None, None]:
    timeout = _timeout_of(item)
    # faulthandler has one timer: leave it to pytest's faulthandler_timeout if set.
    armed = timeout > 0 and not float(item.config.getini("faulthandler_timeout") or 0)
    if armed:
        faulthandler.dump_traceback_later(timeout + GRACE, exit=True, file=_stderr(item.config))
    try:
        yield
    finally:
        if armed:
            faulthandler.cancel_dump_traceback_later()


_STDERR = pytest.StashKey[Any]()


def _stderr(config: pytest.Config) -> Any:
    """The terminal's stderr (fd 2 is pytest's capture file during a test)."""
    return config.stash.get(_STDERR, sys.__stderr__)


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config: pytest.Config) -> None:
    if not hasattr(config, "workerinput"):
        return
    left = [p for p in multiprocessing.active_children() if p.is_alive()]
    for proc in left:
        proc.kill()
    for proc in left:
        proc.join(5)
    if left:
        print(f"mpshm tests: killed {len(left)} child process(es) a test left running: "
              + ", ".join(f"{p.name} (pid {p.pid})" for p in left), file=_stderr(config))


# --------------------------------------------------------------------------
# Fixtures


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    """Each backend in turn."""
    return str(request.param)


@pytest.fixture(params=START_METHODS)
def ctx(request: pytest.FixtureRequest) -> Any:
    """A multiprocessing context for each start method."""
    return multiprocessing.get_context(request.param)


def _factory(default_backend: str | None) -> Iterator[Callable[..., mpshm.SharedMemory]]:
    made: list[mpshm.SharedMemory] = []

    def factory(*args: Any, **kwargs: Any) -> mpshm.SharedMemory:
        if default_backend is not None:
            kwargs.setdefault("backend", default_backend)
        kwargs.setdefault("create", True)
        shm = mpshm.SharedMemory(*args, **kwargs)
        made.append(shm)
        return shm

    yield factory
    for shm in made:
        shm.close()
        try:
            shm.unlink()
        except FileNotFoundError:
            pass


@pytest.fixture
def make_shm(backend: str) -> Iterator[Callable[..., mpshm.SharedMemory]]:
    """Create segments on the current backend; unlinks them after the test."""
    yield from _factory(backend)


@pytest.fixture
def make_segment() -> Iterator[Callable[..., mpshm.SharedMemory]]:
    """Create segments (backend as given); unlinks them after the test."""
    yield from _factory(None)
