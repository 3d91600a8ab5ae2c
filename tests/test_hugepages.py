"""Huge pages (issue 8): the ``huge_pages=`` option and ``$MPSHM_HUGE_PAGES``.

Opt-in with a silent fallback: on this machine's settings, whatever they are,
``huge_pages=True`` works on every backend; where a private tmpfs with
``huge=advise`` can be mounted (root), the segment really gets huge pages and
a full filesystem still fails at creation with ENOSPC, never SIGBUS.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import subprocess
import time
from pathlib import Path
from typing import Any, Iterator

import pytest
from helpers import BACKENDS, run_script

import mpshm
from mpshm.backends import _huge

pytestmark = pytest.mark.timeout(120)
MiB = 1 << 20


def pmd_mapped_kib(address: int) -> int:
    """Huge-page-mapped KiB of this process's mapping that holds *address*."""
    inside = False
    total = 0
    with open("/proc/self/smaps") as f:
        for line in f:
            if re.match(r"^[0-9a-f]+-[0-9a-f]+ ", line):
                lo, hi = (int(x, 16) for x in line.split()[0].split("-"))
                inside = lo <= address < hi
            elif inside and line.startswith(("ShmemPmdMapped:", "FilePmdMapped:")):
                total += int(line.split()[1])
    return total


def options_for(backend: str, tmp_path: Path) -> dict[str, Any]:
    return {"dir": str(tmp_path)} if backend == "mmap" else {}


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_values_are_refused(backend: str, tmp_path: Path) -> None:
    for option in ("huge_pages", "prefault"):
        with pytest.raises(TypeError, match=option):
            mpshm.SharedMemory(create=True, size=4096, backend=backend,
                               **{option: "yes"}, **options_for(backend, tmp_path))
    with pytest.raises(TypeError, match="huge_pages"):
        mpshm.SharedMemory(create=True, size=4096, backend=backend, huge_page=True)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("size", [4096, 4 * MiB + 5])
def test_huge_pages_fall_back_silently(backend: str, size: int, tmp_path: Path) -> None:
    """Whatever this machine allows, the segment works, with its exact size."""
    shm = mpshm.SharedMemory(create=True, size=size, backend=backend, huge_pages=True,
                             **options_for(backend, tmp_path))
    try:
        assert shm.size == size and len(shm.buf) == size
        shm.buf[-3:] = b"end"
        other = mpshm.SharedMemory(shm.name, huge_pages=True)
        assert bytes(other.buf[-3:]) == b"end" and other.size == size
        other.close()
    finally:
        shm.close()
        shm.unlink()


@pytest.mark.parametrize("backend", BACKENDS)
def test_environment_variable_turns_it_on(
    backend: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[int] = []
    real = _huge.madvise

    def spy(address: int, length: int, advice: int) -> int:
        calls.append(advice)
        return real(address, length, advice)

    monkeypatch.setattr(_huge, "madvise", spy)
    monkeypatch.setattr(_huge, "shmem_thp", lambda path=None: "advise")
    monkeypatch.setattr(_huge, "tmpfs_huge", lambda path: "advise")
    for value, expected in (("0", False), ("1", True)):
        monkeypatch.setenv("MPSHM_HUGE_PAGES", value)
        calls.clear()
        shm = mpshm.SharedMemory(create=True, size=4 * MiB, backend=backend,
                                 **options_for(backend, tmp_path))
        shm.close()
        shm.unlink()
        assert (_huge.MADV_HUGEPAGE in calls) is expected, (value, calls)
    # An explicit option wins over the environment.
    calls.clear()
    shm = mpshm.SharedMemory(create=True, size=4 * MiB, backend=backend, huge_pages=False,
                             **options_for(backend, tmp_path))
    shm.close()
    shm.unlink()
    assert _huge.MADV_HUGEPAGE not in calls


@contextlib.contextmanager
def tmpfs_at(point: Path, size: str) -> Iterator[Path]:
    """A private tmpfs of *size* with huge=advise mounted at *point* (root
    only; the test skips where it cannot be mounted)."""
    point.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},huge=advise,mode=0700",
                           "tmpfs", str(point)], capture_output=True, timeout=30)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    try:
        yield point
    finally:
        subprocess.run(["umount", "-l", str(point)], capture_output=True, timeout=30)


@pytest.fixture
def huge_tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A private 8 MiB tmpfs mounted with huge=advise (root only)."""
    with tmpfs_at(tmp_path / "huge", "8m") as point:
        yield point


def test_tmpfs_with_huge_advise_gives_huge_pages(huge_tmpfs: Path) -> None:
    assert _huge.tmpfs_huge(str(huge_tmpfs)) in ("advise", "always", "never")
    if _huge.tmpfs_huge(str(huge_tmpfs)) != "advise":
        pytest.skip("shmem_enabled overrides the mount's huge= option here")
    for huge in (False, True):
        shm = mpshm.SharedMemory(create=True, size=4 * MiB, backend="mmap",
                                 dir=str(huge_tmpfs), huge_pages=huge)
        try:
            shm.buf[::4096] = bytes(len(shm.buf[::4096]))
            mapped = pmd_mapped_kib(_huge.address_of(shm.buf))
            if huge:
                assert mapped > 0, "no huge page mapped"
            else:
                assert mapped == 0
        finally:
            shm.close()
            shm.unlink()
    assert os.listdir(huge_tmpfs) == []


def test_doctor_and_the_backends_read_a_mount_alike(tmp_path: Path) -> None:
    """/proc/mounts writes a tab, a newline or a backslash in a mount point as
    an octal escape. The backends decoded only spaces, so for such a
    directory they fell back to the mount above it (no huge pages) while
    ``mpshm doctor`` reported the tmpfs's ``huge=advise``: both now read the
    mounts one way (mpshm._sysinfo)."""
    from mpshm.cli import doctor

    with tmpfs_at(tmp_path / "odd\\name\twith tab", "4m") as point:
        with open("/proc/self/mounts") as f:
            assert "\\134" in f.read()  # the kernel escaped the backslash
        reported = doctor.check_thp_shmem(shm_dir=str(point)).detail["shm_dir_huge"]
        assert reported == "advise"
        if _huge.shmem_thp() not in ("deny", "force"):
            assert _huge.tmpfs_huge(str(point)) == reported


def test_full_tmpfs_with_huge_pages_fails_at_creation(huge_tmpfs: Path) -> None:
    """Prefaulting for huge pages replaces posix_fallocate: a segment larger than
    the filesystem (the free-space check skipped, as when another process
    fills it meanwhile) still fails with ENOSPC at creation, never SIGBUS."""
    done = run_script(f"""
        import errno, os, mpshm
        from mpshm.backends import _files
        _files.check_free = lambda *args: None
        try:
            mpshm.SharedMemory(create=True, size=16 << 20, backend="mmap",
                               dir={str(huge_tmpfs)!r}, huge_pages=True)
        except OSError as exc:
            assert exc.errno == errno.ENOSPC, exc
            print("ENOSPC", exc)
        print(os.listdir({str(huge_tmpfs)!r}))
    """)
    assert done.returncode == 0, done.stderr
    assert "ENOSPC" in done.stdout and "[]" in done.stdout


def test_sysv_asks_for_huge_pages_where_shmem_advises(monkeypatch: pytest.MonkeyPatch) -> None:
    advised: list[tuple[int, int]] = []
    real = _huge.madvise

    def spy(address: int, length: int, advice: int) -> int:
        if advice == _huge.MADV_HUGEPAGE:
            advised.append((address, length))
        return real(address, length, advice)

    monkeypatch.setattr(_huge, "madvise", spy)
    monkeypatch.setattr(_huge, "shmem_thp", lambda path=None: "advise")
    shm = mpshm.SharedMemory(create=True, size=4 * MiB, backend="sysv", huge_pages=True)
    try:
        other = mpshm.SharedMemory(shm.name, huge_pages=True)
        assert [n for _, n in advised] == [4 * MiB, 4 * MiB]
        other.close()
        monkeypatch.setattr(_huge, "shmem_thp", lambda path=None: "never")
        advised.clear()
        mpshm.SharedMemory(shm.name, huge_pages=True).close()
        assert advised == []
    finally:
        shm.close()
        shm.unlink()


def hugetlbfs_mount() -> str:
    with open("/proc/self/mounts") as f:
        for line in f:
            fields = line.split()
            if fields[2] == "hugetlbfs" and os.access(fields[1], os.W_OK):
                return fields[1]
    return ""


HUGETLBFS_CHECK = """
import os
import mpshm

directory, page = DIRECTORY, PAGE
total = os.statvfs(directory).f_blocks
for size in (page + 1, 1, 2 * page) * 10:
    shm = mpshm.SharedMemory(create=True, size=size, backend="mmap", dir=directory)
    try:
        assert shm.size == -(-size // page) * page, (shm.size, size)
        shm.buf[-1:] = b"x"
        other = mpshm.SharedMemory(shm.name)
        assert other.size == shm.size and bytes(other.buf[-1:]) == b"x"
        other.close()
    finally:
        shm.close()
        shm.unlink()
    # Closed and unlinked: its huge pages are free again, nothing still maps it.
    assert os.statvfs(directory).f_bfree == total, (size, os.statvfs(directory), total)
    with open("/proc/self/maps") as f:
        assert directory not in f.read(), size
print("ok")
"""

NR_HUGEPAGES = "/proc/sys/vm/nr_hugepages"


@pytest.fixture
def hugetlbfs(tmp_path: Path) -> Iterator[tuple[Path, int]]:
    """A private hugetlbfs mount with 4 huge pages reserved for it alone
    (``min_size``, so that no other test's ``SHM_HUGETLB`` takes them), made
    as root by raising ``vm.nr_hugepages`` for the test's time; and its page
    size. Where neither that nor an existing mount with free pages is
    available, the test skips (CI, with ``MPSHM_REQUIRE_UNSHARE``, fails)."""
    page = _huge.hugetlb_pages()[0]
    required = bool(os.environ.get("MPSHM_REQUIRE_UNSHARE"))
    if not page or os.geteuid() != 0 or not os.access(NR_HUGEPAGES, os.W_OK):
        existing = hugetlbfs_mount()
        if existing and _huge.hugetlb_pages()[1] >= 4:
            directory = Path(existing) / f"mpshm-test-{os.getpid()}-{os.urandom(4).hex()}"
            directory.mkdir(mode=0o700)
            try:
                yield directory, page
            finally:
                directory.rmdir()
            return
        if required:
            pytest.fail("no hugetlbfs mount with free huge pages, and no root to make one")
        pytest.skip("no hugetlbfs mount with free huge pages, and no root to make one")
    point = tmp_path / "hugetlbfs"
    point.mkdir()
    with open(NR_HUGEPAGES) as f:
        before = int(f.read())
    mounted = False
    try:
        # Other tests may take free huge pages meanwhile: retry a little.
        for _ in range(20):
            with open(NR_HUGEPAGES, "w") as f:
                f.write(str(before + 4))
            done = subprocess.run(
                ["mount", "-t", "hugetlbfs", "-o",
                 f"mode=0700,pagesize={page},size={4 * page},min_size={4 * page}",
                 "none", str(point)], capture_output=True, text=True, timeout=30)
            if done.returncode == 0:
                mounted = True
                break
            time.sleep(0.1)
        if not mounted:
            if required:
                pytest.fail(f"cannot mount hugetlbfs with 4 huge pages: {done.stderr.strip()}")
            pytest.skip(f"cannot mount hugetlbfs with 4 huge pages: {done.stderr.strip()}")
        yield point, page
    finally:
        if mounted:
            subprocess.run(["umount", str(point)], capture_output=True, timeout=30)
        with open(NR_HUGEPAGES, "w") as f:
            f.write(str(before))


def test_mmap_on_hugetlbfs_rounds_the_size(hugetlbfs: tuple[Path, int]) -> None:
    """On hugetlbfs a segment's size is rounded up to whole huge pages, and
    closing and unlinking it gives them all back, again and again. (Mapping
    a hugetlbfs file over a placeholder of the unrounded size could map over
    whatever followed it, a crash; a mapping of the unrounded size could
    never be unmapped, its huge pages held until the process ended.)"""
    directory, page = hugetlbfs
    result = run_script(HUGETLBFS_CHECK.replace("PAGE", str(page))
                        .replace("DIRECTORY", repr(str(directory))))
    assert result.returncode == 0 and result.stdout == "ok\n", (result.returncode,
                                                                 result.stderr)


def test_helpers_read_the_settings(tmp_path: Path) -> None:
    path = tmp_path / "shmem_enabled"
    path.write_text("always within_size [advise] never deny force\n")
    assert _huge.shmem_thp(str(path)) == "advise"
    assert _huge.shmem_thp(str(tmp_path / "missing")) == "never"
    assert _huge.tmpfs_huge("/proc") is None  # not a tmpfs
    size, free = _huge.hugetlb_pages()
    assert size >= 0 and free >= 0
    assert _huge.madvise(0, 4096, 12345) == errno.EINVAL
