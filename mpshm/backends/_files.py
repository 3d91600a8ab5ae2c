"""Sizing and filling the files behind the posix and mmap backends.

Both store a segment as a file (in /dev/shm, or anywhere): space is reserved
at creation, so that a full filesystem fails there with ``OSError(ENOSPC)``
instead of a SIGBUS at a later write. This module needs no ``posix_ipc``, so
the mmap backend works where that package is not installed.
"""

from __future__ import annotations

import errno
import os
from typing import Optional

from ._base import no_space

__all__ = ["check_free", "reserve", "write_all"]


def _is_space_error(exc: OSError) -> bool:
    return exc.errno in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)


def _space_error(
    size: int, storage: str, where: Optional[str], remedy: str, taken: int = 0
) -> OSError:
    """The ENOSPC error of :func:`no_space`, with the free space of *where*
    (plus *taken* bytes that a failed write used and will give back)."""
    free = None
    if where is not None:
        try:
            st = os.statvfs(where)
            free = st.f_bavail * st.f_frsize + taken
        except OSError:
            pass
    return no_space(storage, size, free, remedy)


#: From this size on, a new segment's size is checked against the free space
#: first (one statvfs): one that cannot fit then fails at once, instead of
#: filling the storage on its way to ENOSPC and failing others meanwhile.
CHECK_FREE_FROM = 1 << 20


def check_free(size: int, storage: str, where: Optional[str], remedy: str) -> None:
    """Raise the ENOSPC error of :func:`no_space` if *where* has less than
    *size* bytes free (for sizes of :data:`CHECK_FREE_FROM` or more)."""
    if size < CHECK_FREE_FROM or where is None:
        return
    try:
        st = os.statvfs(where)
    except OSError:
        return
    free = st.f_bavail * st.f_frsize
    if st.f_blocks and size > free:  # (a filesystem reporting no blocks at all: unknown)
        raise no_space(storage, size, free, remedy)


def reserve(fd: int, size: int, storage: str, where: Optional[str], remedy: str) -> None:
    """Size *fd* to *size* bytes and allocate them now, so a later write cannot SIGBUS.

    Raises the ENOSPC error of :func:`no_space` when the filesystem is full
    or cannot hold a file that large. Filesystems that cannot preallocate are
    only sized.
    """
    check_free(size, storage, where, remedy)
    try:
        os.ftruncate(fd, size)
        if hasattr(os, "posix_fallocate"):  # not on macOS: nothing to reserve with
            os.posix_fallocate(fd, 0, size)
    except OSError as exc:
        if _is_space_error(exc):
            raise _space_error(size, storage, where, remedy) from None
        if exc.errno in (errno.EINVAL, errno.EOPNOTSUPP, errno.ENODEV, errno.ENOSYS):
            return
        raise


_PWRITE_MAX = 1 << 30  # bytes per pwrite call (Linux caps a call near 2 GiB)


def write_all(fd: int, data: memoryview, storage: str, where: Optional[str],
              remedy: str) -> None:
    """Size *fd* to ``len(data)`` and write *data* into it with ``pwrite``.

    Writing through the file descriptor fills a new file about twice as fast
    as copying into a fresh mapping (which takes a page fault per page), and
    allocates exactly what is written: a full storage raises the ENOSPC error
    of :func:`no_space` here, never a SIGBUS later.
    """
    size = data.nbytes
    offset = 0
    check_free(size, storage, where, remedy)
    try:
        os.ftruncate(fd, size)
        while offset < size:
            offset += os.pwrite(fd, data[offset : offset + _PWRITE_MAX], offset)
    except OSError as exc:
        # No local may hold the new exception: its traceback holds this frame,
        # whose *data* is a memoryview, and a reference cycle through an
        # exported memoryview can crash CPython when the collector clears it.
        if _is_space_error(exc):
            # What this write took is given back when the caller removes the file.
            raise _space_error(size, storage, where, remedy, offset) from None
        raise
