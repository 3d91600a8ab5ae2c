"""Shared fixtures. The leak checks live in leakcheck.py (loaded below)."""

from __future__ import annotations

import multiprocessing
from typing import Any, Callable, Iterator

import pytest
from helpers import BACKENDS, START_METHODS

import mpshm

pytest_plugins = ["leakcheck"]


def pytest_configure(config: pytest.Config) -> None:
    # The reliability groups of issue 7 (tests/test_stress.py, test_limits.py,
    # test_faults.py): part of the normal run; select them with -m.
    config.addinivalue_line(
        "markers", "stress: many processes at once, every byte checked (MPSHM_STRESS_SCALE)"
    )
    config.addinivalue_line(
        "markers", "faults: SIGKILL at random moments, storage removed or full"
    )


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
