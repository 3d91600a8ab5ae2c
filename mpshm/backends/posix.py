"""POSIX shared memory (``shm_open``) through ``posix_ipc``.

Names are bare, exactly like the standard library's: ``psm_<hex>`` for
generated ones, or the user's own. On Linux the objects are files in
``/dev/shm`` (a tmpfs), so a segment made here opens with
``multiprocessing.shared_memory.SharedMemory(name)`` and the other way round.

Space is reserved at creation with ``posix_fallocate``: a segment that the
tmpfs cannot hold fails there with ``OSError(ENOSPC)`` instead of killing the
process with SIGBUS on its first write to a missing page.
"""

from __future__ import annotations

import errno
import os
import sys
from typing import Any, Callable, Mapping, Optional

import posix_ipc

from ._base import (
    Attachment,
    Backend,
    MmapAttachment,
    SegmentInfo,
    fstat_identity,
    list_files,
    no_space,
    random_token,
    sized_stat,
)

__all__ = ["PosixBackend"]

#: Prefix of generated names, as in the standard library.
PREFIX = "psm_"
#: Where Linux keeps POSIX shared memory objects.
SHM_DIR = "/dev/shm"
#: Longest name the kernel takes (a file name in /dev/shm).
NAME_MAX = 255


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


def _encodable(ident: str) -> bool:
    """Whether *ident* is UTF-8 text, as posix_ipc needs (it crashes on a lone
    surrogate, and leaks an object whose name it cannot decode)."""
    try:
        ident.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _path(ident: str) -> str:
    """posix_ipc's name for *ident*, which must be a canonical identifier.

    Checked here too, not only by :meth:`PosixBackend.parse`: posix_ipc
    crashes the interpreter on a NUL byte or a lone surrogate, and other
    callers (a forged handle, a tracker message) skip parsing.
    """
    if "\0" in ident or "/" in ident or not _encodable(ident):
        raise ValueError(f"invalid POSIX shared memory name {ident!r}")
    return "/" + ident


class PosixBackend(Backend):
    """POSIX shared memory objects (``shm_open``), the default backend."""

    name = "posix"
    unique_names = True
    storage = "/dev/shm (POSIX shared memory)"

    def parse(self, ident: str, options: Mapping[str, Any]) -> str:
        self.check_options(options)
        canonical = ident.lstrip("/")
        problem = None
        if not canonical:
            problem = "it is empty"
        elif "\0" in canonical:
            problem = "it contains a NUL character"
        elif not _encodable(canonical):
            problem = "it contains a lone surrogate, which is not UTF-8 text"
        elif "/" in canonical:
            problem = "it contains '/' after the first character"
        elif canonical in (".", ".."):
            problem = "'.' and '..' are not object names"
        elif len(os.fsencode(canonical)) > NAME_MAX:
            problem = f"it is longer than {NAME_MAX} bytes"
        if problem:
            raise ValueError(
                f"invalid POSIX shared memory name {ident!r}: {problem}. Use a plain "
                "file name such as 'frames' (letters, digits, '_', '-', '.')."
            )
        return canonical

    def generate(self, options: Mapping[str, Any]) -> str:
        return PREFIX + random_token()

    def qualified(self, ident: str) -> str:
        return ident

    @staticmethod
    def _open(ident: str, flags: int = 0, read_only: bool = False) -> Any:
        """``shm_open`` through posix_ipc, with the standard library's exceptions."""
        try:
            return posix_ipc.SharedMemory(_path(ident), flags, mode=0o600, read_only=read_only)
        except posix_ipc.ExistentialError:
            if flags & posix_ipc.O_CREAT:
                raise FileExistsError(
                    errno.EEXIST, "A POSIX shared memory segment of that name exists", ident
                ) from None
            raise FileNotFoundError(
                errno.ENOENT, "No such POSIX shared memory segment", ident
            ) from None
        except posix_ipc.PermissionsError as exc:
            raise PermissionError(errno.EACCES, str(exc), ident) from None

    _REMEDY = (
        "Free space in /dev/shm, start the container with a larger "
        "--shm-size, or use backend='mmap' with dir= on a larger disk."
    )

    def _new(self, ident: str, fill: Callable[[int], Any]) -> Any:
        """Create *ident* exclusively and call *fill* with its descriptor;
        on any failure remove it again."""
        shm = self._open(ident, posix_ipc.O_CREX)
        try:
            return fill(shm.fd)
        except BaseException:
            try:
                posix_ipc.unlink_shared_memory("/" + ident)
            except posix_ipc.Error:
                pass
            raise
        finally:
            shm.close_fd()

    def create(self, ident: str, size: int, options: Mapping[str, Any]) -> Attachment:
        def fill(fd: int) -> Attachment:
            reserve(fd, size, self.storage, SHM_DIR, self._REMEDY)
            return MmapAttachment(fd, size, fstat_identity(fd))

        attachment: Attachment = self._new(ident, fill)
        return attachment

    def create_from(self, ident: str, data: memoryview, options: Mapping[str, Any]) -> str:
        def fill(fd: int) -> str:
            write_all(fd, data, self.storage, SHM_DIR, self._REMEDY)
            return fstat_identity(fd)

        identity: str = self._new(ident, fill)
        return identity

    def attach(self, ident: str, options: Mapping[str, Any]) -> Attachment:
        shm = self._open(ident)
        try:
            st = sized_stat(shm.fd)
            if st.st_size == 0:
                raise ValueError(
                    f"the POSIX shared memory segment {ident!r} has size 0: there is "
                    "nothing to map (was it created by something other than mpshm "
                    "or the standard library, and not sized yet?)"
                )
            return MmapAttachment(shm.fd, st.st_size, f"{st.st_dev}:{st.st_ino}", st)
        finally:
            shm.close_fd()

    def unlink(self, ident: str) -> None:
        try:
            posix_ipc.unlink_shared_memory(_path(ident))
        except posix_ipc.ExistentialError:
            raise FileNotFoundError(
                errno.ENOENT, "No such POSIX shared memory segment", ident
            ) from None
        except posix_ipc.PermissionsError as exc:
            raise PermissionError(errno.EACCES, str(exc), ident) from None

    def identity(self, ident: str) -> Optional[str]:
        try:
            shm = self._open(ident, read_only=True)
        except OSError:
            return None
        try:
            return fstat_identity(shm.fd)
        finally:
            shm.close_fd()

    def list(self) -> list[SegmentInfo]:
        if not sys.platform.startswith("linux"):
            return []
        # POSIX semaphores live in /dev/shm too, as sem.<name>.
        return list_files(
            SHM_DIR, self.name, lambda e: None if e.name.startswith("sem.") else e.name
        )

    def available(self) -> Optional[str]:
        if sys.platform.startswith("linux") and not os.path.isdir(SHM_DIR):
            return f"{SHM_DIR} does not exist: POSIX shared memory is not mounted"
        return None
