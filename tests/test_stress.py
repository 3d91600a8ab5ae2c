"""Stress (issue 7): many processes at once on every backend, every byte checked.

Each test runs a separate program (see ``reliability.py``) under ``ulimit -n
256``, prints its figures on one ``STRESS`` line (``pytest -s`` or ``-rA``
shows them) and fails on any byte that reads back wrong or any segment left
behind. ``MPSHM_STRESS_SCALE=<n>`` multiplies the figures;
``MPSHM_STRESS_SEED=<n>`` replays a run.
"""

from __future__ import annotations

import os

import pytest
from reliability import SCALE, exists, line, run

pytestmark = [pytest.mark.stress, pytest.mark.timeout(180 * SCALE)]

SEED = int(os.environ.get("MPSHM_STRESS_SEED") or int.from_bytes(os.urandom(3), "big"))
TIMEOUT = 150 * SCALE


def _left(names: list[str], directory: str | None = None) -> list[str]:
    left = [name for name in names if exists(name)]
    if directory and os.path.isdir(directory):
        left += os.listdir(directory)
    return left


def test_segments_created_attached_verified_unlinked_concurrently(backend, tmp_path):
    """Four processes in a ring: each creates a segment, fills it, hands it to
    the next, which attaches, checks every byte and answers in it; the
    creator checks the answer and unlinks. Sizes from 1 byte to 1 MiB."""
    names = tmp_path / "names"
    directory = str(tmp_path / "segments") if backend == "mmap" else None
    workers, rounds = 4, 40 * SCALE
    figures = run("stress_segments", TIMEOUT, backend=backend, workers=workers, rounds=rounds,
                  seed=SEED, names=str(names), dir=directory)
    created = names.read_text().split()
    assert len(created) == len(set(created)) == figures["segments"] == workers * rounds
    left = _left(created, directory)
    print(line("STRESS", f"segments[{backend}]", {**figures, "seed": SEED,
                                                   "segments_left": len(left)}))
    assert not left


def test_pool_of_a_thousand_mixed_tasks(backend):
    """A Pool runs 1000 tasks (300 on the other backends, to keep the default
    run short) whose payloads (bytes, memoryview, NumPy; 0 bytes to 640 KiB)
    go through the sharing pickler; each worker checks every byte it gets and
    answers with a payload the parent checks."""
    tasks = (1000 if backend == "posix" else 300) * SCALE
    figures = run("stress_pool", TIMEOUT, backend=backend, tasks=tasks, seed=SEED,
                  threshold=32 << 10)
    assert figures["tasks"] == tasks and figures["buffers_through_segments"] > tasks // 4
    print(line("STRESS", f"pool[{backend}]", {**figures, "seed": SEED, "segments_left": 0}))


def test_shareable_list_under_concurrent_writers(backend):
    """Four processes write values of every type into their own slots of one
    ShareableList, each reading back every write; the final list is checked."""
    figures = run("stress_lists", TIMEOUT, backend=backend, writers=4, slots=8,
                  rounds=1500 * SCALE, seed=SEED)
    print(line("STRESS", f"shareable_list[{backend}]", {**figures, "seed": SEED,
                                                         "segments_left": 0}))


def test_manager_segments_under_concurrent_clients(backend, tmp_path):
    """Three processes ask one manager for segments and lists at once, fill
    and check them, release half; what they kept is checked byte for byte,
    and is gone once the manager shuts down."""
    names = tmp_path / "names"
    figures = run("stress_manager", TIMEOUT, backend=backend, clients=3, rounds=100 * SCALE,
                  seed=SEED, names=str(names))
    held = names.read_text().split()
    assert len(held) == figures["segments"] > 0
    left = _left(held)
    print(line("STRESS", f"manager[{backend}]", {**figures, "seed": SEED,
                                                  "segments_left": len(left)}))
    assert not left
