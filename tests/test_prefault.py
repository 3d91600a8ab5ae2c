"""Prefaulting on attach (``prefault=True``, issue 8) and creation that
writes nothing.

* ``prefault=True`` maps the whole segment into the attaching process at
  once (``MADV_POPULATE_READ``), so its first read takes no page faults.
* No creation step writes the whole segment, on any backend: right after
  creation the creator's mapping has no page mapped in (a fill, such as
  sysv_ipc's, would have mapped them all).
"""

from __future__ import annotations

import errno
import re
from pathlib import Path
from typing import Any

import pytest
from helpers import BACKENDS

import mpshm
from mpshm.backends import _huge

pytestmark = pytest.mark.timeout(120)
MiB = 1 << 20


def rss_kib(address: int) -> int:
    """Resident KiB of this process's mapping that holds *address*."""
    inside = False
    with open("/proc/self/smaps") as f:
        for line in f:
            if re.match(r"^[0-9a-f]+-[0-9a-f]+ ", line):
                lo, hi = (int(x, 16) for x in line.split()[0].split("-"))
                inside = lo <= address < hi
            elif inside and line.startswith("Rss:"):
                return int(line.split()[1])
    raise AssertionError(f"no mapping at {address:#x}")


def options_for(backend: str, tmp_path: Path) -> dict[str, Any]:
    return {"dir": str(tmp_path)} if backend == "mmap" else {}


def populate_read_works() -> bool:
    import mmap

    m = mmap.mmap(-1, 4096)
    try:
        return _huge.madvise(_huge.address_of(memoryview(m)), 4096,
                             _huge.MADV_POPULATE_READ) == 0
    finally:
        m.close()


@pytest.mark.parametrize("backend", BACKENDS)
def test_creation_writes_nothing(backend: str, tmp_path: Path) -> None:
    size = 16 * MiB
    shm = mpshm.SharedMemory(create=True, size=size, backend=backend,
                             **options_for(backend, tmp_path))
    try:
        assert rss_kib(_huge.address_of(shm.buf)) < 1024
        assert not any(shm.buf[:: 1 << 16])  # reads as zeros
    finally:
        shm.close()
        shm.unlink()


@pytest.mark.parametrize("backend", BACKENDS)
def test_prefault_maps_the_whole_segment_on_attach(backend: str, tmp_path: Path) -> None:
    if not populate_read_works():
        pytest.skip("this kernel has no MADV_POPULATE_READ (Linux 5.14+)")
    size = 8 * MiB
    shm = mpshm.SharedMemory(create=True, size=size, backend=backend,
                             **options_for(backend, tmp_path))
    try:
        shm.buf[:: 4096] = b"\1" * (size // 4096)
        plain = mpshm.SharedMemory(shm.name)
        eager = mpshm.SharedMemory(shm.name, prefault=True)
        try:
            assert rss_kib(_huge.address_of(plain.buf)) < 1024
            assert rss_kib(_huge.address_of(eager.buf)) >= size // 1024
            assert bytes(eager.buf[size - 4096 : size - 4095]) == b"\1"
        finally:
            plain.close()
            eager.close()
    finally:
        shm.close()
        shm.unlink()


@pytest.mark.parametrize("backend", BACKENDS)
def test_prefault_is_an_attach_option_that_creation_accepts(
    backend: str, tmp_path: Path
) -> None:
    shm = mpshm.SharedMemory(create=True, size=4096, backend=backend, prefault=False,
                             **options_for(backend, tmp_path))
    try:
        mpshm.SharedMemory(shm.name, prefault=True).close()
        mpshm.SharedMemory(shm.name, prefault=None).close()
    finally:
        shm.close()
        shm.unlink()


def test_madvise_reports_errno() -> None:
    assert _huge.madvise(0, 4096, -1) == errno.EINVAL


def test_sysv_copy_in_faults_the_segment_in_first(monkeypatch: pytest.MonkeyPatch) -> None:
    """A System V copy (the sharing pickler's) asks the kernel to fault the
    new segment in at once, then copies; if the kernel says there is no
    memory for it, a clear error and no segment left, never an OOM copy."""
    from mpshm import backends

    sysv = backends.get("sysv")
    calls: list[tuple[int, int]] = []
    real = _huge.madvise

    def spy(address: int, length: int, advice: int) -> int:
        calls.append((length, advice))
        return real(address, length, advice)

    monkeypatch.setattr(_huge, "madvise", spy)
    data = memoryview(bytes(range(256)) * 4096)  # 1 MiB
    ident = sysv.generate({})
    sysv.create_from(ident, data, {})
    try:
        assert calls == [(MiB, _huge.MADV_POPULATE_WRITE)]
        shm = mpshm.SharedMemory(sysv.qualified(ident))
        assert bytes(shm.buf) == bytes(data)
        shm.close()
    finally:
        sysv.unlink(ident)
    calls.clear()
    small = memoryview(b"x" * (16 << 10))
    ident = sysv.generate({})
    sysv.create_from(ident, small, {})
    try:
        assert calls == []  # not worth a system call
    finally:
        sysv.unlink(ident)

    monkeypatch.setattr(_huge, "madvise", lambda address, length, advice: errno.ENOMEM)
    ident = sysv.generate({})
    with pytest.raises(OSError, match="Not enough memory to fill a new System V segment") as info:
        sysv.create_from(ident, data, {})
    assert info.value.errno == errno.ENOMEM
    assert sysv.identity(ident) is None  # removed
