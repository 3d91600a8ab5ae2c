"""Resource limits (issue 7): live segments cost no file descriptor.

CPython's mmap keeps a duplicate of the descriptor of every mapping; mpshm
maps without keeping one (see ``mpshm.backends._base.map_shared``), so a
process may hold thousands of segments under ``ulimit -n 256``.
"""

from __future__ import annotations

import mmap
import os

import pytest
from reliability import SCALE, line, run

import mpshm
from mpshm.backends import _base
from mpshm.backends.sysv import _proc_segments

SEED = int.from_bytes(os.urandom(3), "big")


def _fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def _sysv_room() -> int:
    """Segments we may still create without nearing kernel.shmmni."""
    with open("/proc/sys/kernel/shmmni") as f:
        shmmni = int(f.read())
    return shmmni - len(_proc_segments() or []) - 500


@pytest.mark.stress
@pytest.mark.timeout(300 * SCALE)
def test_thousands_of_live_segments_under_ulimit_256(backend, tmp_path):
    """2000 tracked segments, all mapped at once (and each attached once more),
    checked byte for byte and unlinked, by a program limited to 256 file
    descriptors."""
    count = 2000 * SCALE
    if backend == "sysv":
        count = min(count, _sysv_room())
    directory = str(tmp_path / "segments") if backend == "mmap" else None
    figures = run("many_segments", 240 * SCALE, backend=backend, count=count, seed=SEED,
                  dir=directory)
    print(line("STRESS", f"live_segments[{backend}]", figures))
    assert figures["fd_limit"] == 256
    assert figures["live_segments"] == count and figures["segments_left"] == 0
    assert figures["fds_with_all_mapped"] <= figures["fds_before"] + 2  # (the tracker's socket)
    if directory:
        assert os.listdir(directory) == []


@pytest.mark.parametrize("backend", ["posix", "mmap"])
def test_a_mapping_keeps_no_file_descriptor(backend, make_shm, tmp_path):
    options = {"dir": str(tmp_path)} if backend == "mmap" else {}
    first = make_shm(size=4096, **options)  # the tracker's connection is made now
    before = _fds()
    made = [make_shm(size=4096 * (i + 1), **options) for i in range(40)]
    attached = [mpshm.SharedMemory(shm.name) for shm in made]
    # CPython's own mmap would hold 80 more here. (Not "==": other tests'
    # leftovers may be closed by the garbage collector meanwhile.)
    assert _fds() < before + 5
    for shm in attached:
        shm.buf[0] = 1
        shm.close()
    assert all(shm.buf[0] == 1 for shm in made) and first.buf[0] == 0


def test_a_failed_mapping_fails_like_cpythons():
    """A descriptor that cannot be mapped (a pipe) fails as CPython's mmap
    does; the placeholder is unmapped, or (when it cannot be told from a
    mapping someone else made meanwhile) left mapped, never unmapped under
    anyone; mapping goes on working."""
    read_fd, write_fd = os.pipe()
    try:
        with pytest.raises(OSError) as plain:
            mmap.mmap(read_fd, 4096)
        stranded = len(_base._stranded)
        with pytest.raises(OSError) as ours:
            _base.map_shared(read_fd, 4096)
        assert ours.value.errno == plain.value.errno
        assert len(_base._stranded) <= stranded + 1
    finally:
        os.close(read_fd)
        os.close(write_fd)
    shm = mpshm.SharedMemory(create=True, size=4096)
    shm.buf[:3] = b"abc"
    assert bytes(shm.buf[:3]) == b"abc"
    shm.close()
    shm.unlink()
