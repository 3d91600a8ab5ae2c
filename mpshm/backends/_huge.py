"""Huge pages and prefaulting: the ``huge_pages=`` and ``prefault=`` options.

Both are opt-in and never fail a creation or an attach by themselves: where
the machine does not allow huge pages (or the kernel lacks an ``madvise``
advice), segments silently get normal pages. What the machine allows:

* System V segments live on the kernel's internal shmem mount, governed by
  ``/sys/kernel/mm/transparent_hugepage/shmem_enabled``: ``always`` and
  ``within_size`` give huge pages by themselves, ``advise`` gives them where
  ``madvise(MADV_HUGEPAGE)`` asks (mpshm asks, on the mapping). With huge
  pages reserved (``vm.nr_hugepages``), a segment is made with
  ``SHM_HUGETLB`` instead (reserved at creation, so no SIGBUS later).
* POSIX segments (``/dev/shm``) and ``mmap`` files on a tmpfs follow that
  tmpfs's ``huge=`` mount option in the same way (``shmem_enabled=force``
  forces them, ``deny`` forbids them).
* ``mmap`` files on a hugetlbfs mount always use its huge pages (that is what
  the mount is for); their size is rounded up to the huge page size.

``prefault=True`` populates the page tables of an attached segment at once
(``madvise(MADV_POPULATE_READ)``, Linux 5.14+), which halves the cost of a
first read of a whole System V segment, which gets no fault-around.
"""

from __future__ import annotations

import ctypes
import errno
import os
import sys
from typing import Any, Mapping, Optional

from .. import _sysinfo

__all__ = [
    "HUGE_FROM",
    "MADV_HUGEPAGE",
    "MADV_POPULATE_READ",
    "MADV_POPULATE_WRITE",
    "address_of",
    "check",
    "flag",
    "hugetlb_pages",
    "hugetlbfs_page_size",
    "madvise",
    "shmem_thp",
    "tmpfs_huge",
    "wants_huge",
]

MADV_HUGEPAGE = 14
MADV_POPULATE_READ = 22  # Linux 5.14+
MADV_POPULATE_WRITE = 23  # Linux 5.14+
#: Environment variable that turns ``huge_pages=`` on by default (``1``).
ENV_VAR = "MPSHM_HUGE_PAGES"
#: Below this size no huge page can be used (one PMD on x86-64 and arm64
#: with 4 KiB pages): the options cost nothing there.
HUGE_FROM = 2 << 20
SHMEM_ENABLED = "/sys/kernel/mm/transparent_hugepage/shmem_enabled"

#: The options every built-in backend accepts for this.
OPTIONS = frozenset({"huge_pages", "prefault"})
#: Huge page modes (see :func:`tmpfs_huge`) that need a kernel-chosen address.
ALIGNED = frozenset({"always", "within_size", "advise", "hugetlbfs"})

_madvise: Any = None
_LINUX = sys.platform.startswith("linux")


def madvise(address: int, length: int, advice: int) -> int:
    """``madvise(2)`` on *length* bytes from *address*; return 0 or the errno."""
    global _madvise
    if _madvise is None:
        try:
            function = ctypes.CDLL(None, use_errno=True).madvise
        except (OSError, AttributeError):  # pragma: no cover (not Linux)
            return errno.ENOSYS
        function.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        function.restype = ctypes.c_int
        _madvise = function
    page = os.sysconf("SC_PAGE_SIZE")
    start = address & ~(page - 1)
    if _madvise(start, length + (address - start), advice) == 0:
        return 0
    return ctypes.get_errno() or errno.EINVAL


def address_of(buf: memoryview) -> int:
    """Address of the first byte of writable *buf* (keeps no export)."""
    return int(ctypes.addressof(ctypes.c_char.from_buffer(buf)))


def flag(options: Mapping[str, Any], name: str, env: Optional[str] = None) -> bool:
    """The boolean option *name* (TypeError unless a bool or None); when absent
    or None, whether environment variable *env* is ``1``/``true``/``yes``."""
    value = options.get(name)
    if value is None:
        if env is None:
            return False
        return os.environ.get(env, "").strip().lower() in ("1", "true", "yes", "on")
    if not isinstance(value, bool):
        raise TypeError(f"{name}= must be True or False, not {value!r}")
    return value


def check(options: Mapping[str, Any]) -> None:
    """Raise TypeError if ``huge_pages=`` or ``prefault=`` is not a bool (or None)."""
    if options:
        for name in OPTIONS:
            flag(options, name)


def wants_huge(options: Mapping[str, Any], size: int) -> bool:
    """Whether a segment of *size* bytes should try huge pages (``huge_pages=``,
    else ``$MPSHM_HUGE_PAGES``; never below :data:`HUGE_FROM`)."""
    return size >= HUGE_FROM and _LINUX and flag(options, "huge_pages", ENV_VAR)


def shmem_thp(path: str = SHMEM_ENABLED) -> str:
    """The selected value of ``shmem_enabled`` (``never`` if unknown)."""
    return _sysinfo.selected(_sysinfo.read_text(path) or "") or "never"


def _mount_of(path: str) -> Optional[_sysinfo.Mount]:
    """The mount holding *path*."""
    return _sysinfo.mount_of(os.path.realpath(path), _sysinfo.mounts())


def tmpfs_huge(path: str) -> Optional[str]:
    """How the tmpfs holding *path* gives huge pages: its ``huge=`` option
    (``never`` when not given), overridden by ``shmem_enabled`` ``force``
    (``always``) or ``deny`` (``never``). None if *path* is not on a tmpfs."""
    mount = _mount_of(path)
    if mount is None or mount.fstype != "tmpfs":
        return None
    global_value = shmem_thp()
    if global_value == "force":
        return "always"
    if global_value == "deny":
        return "never"
    return mount.option("huge") or "never"


def hugetlbfs_page_size(path: str) -> Optional[int]:
    """The huge page size of the hugetlbfs holding *path*, None if it is not one."""
    mount = _mount_of(path)
    if mount is None or mount.fstype != "hugetlbfs":
        return None
    try:
        return os.statvfs(path).f_bsize
    except OSError:
        return None


def hugetlb_pages() -> tuple[int, int]:
    """(size of a default huge page, how many are free) from /proc/meminfo."""
    info = _sysinfo.meminfo()
    return info.get("Hugepagesize", 0), info.get("HugePages_Free", 0)
