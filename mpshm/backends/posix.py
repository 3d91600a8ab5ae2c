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
import mmap
import os
import stat
import sys
from typing import Any, Callable, Mapping, Optional

import posix_ipc

from . import _huge
from ._base import Attachment, SegmentInfo, Unnamed
from ._files import (
    FileBackend,
    MmapAttachment,
    after_attach,
    create_mapped,
    create_unnamed,
    create_written,
    file_identity,
    list_files,
    lstat_identity,
)
from ._util import is_utf8, random_token, sized_stat

__all__ = ["PosixBackend"]

#: Prefix of generated names, as in the standard library.
PREFIX = "psm_"
#: Where Linux keeps POSIX shared memory objects.
SHM_DIR = "/dev/shm"
#: Longest name the kernel takes (a file name in /dev/shm).
NAME_MAX = 255


#: Open and unlink in /dev/shm directly (Linux, where that is all shm_open does).
_DIRECT = sys.platform.startswith("linux") and os.path.isdir(SHM_DIR)
_O_SHM = os.O_NOFOLLOW | os.O_CLOEXEC if _DIRECT else 0


class _Fd:
    """An open shared memory object, as posix_ipc's (``fd``, ``close_fd()``)."""

    __slots__ = ("fd",)

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def close_fd(self) -> None:
        """Close the descriptor."""
        os.close(self.fd)


def _path(ident: str) -> str:
    """posix_ipc's name for *ident*, which must be a canonical identifier.

    Checked here too, not only by :meth:`PosixBackend.parse`: posix_ipc
    crashes the interpreter on a NUL byte or a lone surrogate, and other
    callers (a forged handle, a tracker message) skip parsing.
    """
    if ("\0" in ident or "/" in ident or ident in ("", ".", "..")
            or not (ident.isascii() or is_utf8(ident))):
        raise ValueError(f"invalid POSIX shared memory name {ident!r}")
    return "/" + ident


class PosixBackend(FileBackend):
    """POSIX shared memory objects (``shm_open``), the default backend."""

    name = "posix"
    option_names = _huge.OPTIONS
    checked_flags = _huge.OPTIONS
    unique_names = True
    storage = "/dev/shm (POSIX shared memory)"

    # -- names

    def parse(self, ident: str, options: Mapping[str, Any]) -> str:
        if options:  # (none: nothing to check)
            self.check_options(options)
        canonical = ident.lstrip("/")
        problem = None
        if not canonical:
            problem = "it is empty"
        elif "\0" in canonical:
            problem = "it contains a NUL character"
        elif not (canonical.isascii() or is_utf8(canonical)):
            problem = "it contains a lone surrogate, which is not UTF-8 text"
        elif "/" in canonical:
            problem = "it contains '/' after the first character"
        elif canonical in (".", ".."):
            problem = "'.' and '..' are not object names"
        elif len(canonical) > NAME_MAX // 4 and len(os.fsencode(canonical)) > NAME_MAX:
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

    def sibling(self, ident: str) -> Optional[str]:
        # Only where objects are files in /dev/shm, which can be hard-linked.
        return PREFIX + random_token() if _DIRECT else None

    def link(self, ident: str, name: str) -> None:
        try:
            os.link(SHM_DIR + _path(ident), SHM_DIR + _path(name), follow_symlinks=False)
        except FileExistsError:
            raise FileExistsError(
                errno.EEXIST, "A POSIX shared memory segment of that name exists", name
            ) from None
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EMLINK):
                # No room for the second name (tmpfs counts it against its
                # inodes): the caller creates under the name itself instead.
                raise NotImplementedError(f"{SHM_DIR} has no room for a link") from None
            raise

    # -- creating

    def _new(self, ident: str, fill: Callable[[int], Any]) -> Any:
        """Create *ident* exclusively and call *fill* with its descriptor;
        on any failure remove it again."""
        shm = self._open(ident, posix_ipc.O_CREX)
        try:
            return fill(shm.fd)
        except BaseException:
            try:
                self._unlink(ident)
            except (OSError, posix_ipc.Error):
                pass
            raise
        finally:
            shm.close_fd()

    def create(self, ident: str, size: int, options: Mapping[str, Any]) -> Attachment:
        huge = _huge.tmpfs_huge(SHM_DIR) if _huge.wants_huge(options, size) else None

        def fill(fd: int) -> Attachment:
            return create_mapped(fd, size, self.storage, SHM_DIR, self._REMEDY, huge)

        attachment: Attachment = self._new(ident, fill)
        return attachment

    def create_unnamed(
        self, ident: str, size: int, options: Mapping[str, Any]
    ) -> Optional[Unnamed]:
        if not _DIRECT:
            return None
        path = SHM_DIR + _path(ident)
        huge = _huge.tmpfs_huge(SHM_DIR) if _huge.wants_huge(options, size) else None
        return create_unnamed(SHM_DIR, path, size, self.storage, self._REMEDY, huge,
                              ("A POSIX shared memory segment of that name exists", ident))

    def exists(self, ident: str) -> bool:
        if not _DIRECT:
            return super().exists(ident)
        # Anything there, a symbolic link too, makes shm_open(O_EXCL) fail.
        return os.access(SHM_DIR + _path(ident), os.F_OK, follow_symlinks=False)

    def create_from(self, ident: str, data: memoryview, options: Mapping[str, Any]) -> str:
        def fill(fd: int) -> str:
            return create_written(fd, data, self.storage, SHM_DIR, self._REMEDY)

        identity: str = self._new(ident, fill)
        return identity

    # -- attaching

    @staticmethod
    def _open(ident: str, flags: int = 0, read_only: bool = False) -> Any:
        """``shm_open``, with the standard library's exceptions.

        On Linux, ``shm_open`` is an ``open`` in /dev/shm with ``O_NOFOLLOW |
        O_CLOEXEC`` (glibc's own code): mpshm makes that call itself, which
        costs a fraction of creating a posix_ipc object. Elsewhere, posix_ipc.
        """
        path = _path(ident)
        if _DIRECT:
            oflags = (os.O_RDONLY if read_only else os.O_RDWR) | _O_SHM
            if flags & posix_ipc.O_CREAT:
                oflags |= os.O_CREAT | (os.O_EXCL if flags & posix_ipc.O_EXCL else 0)
            try:
                return _Fd(os.open(SHM_DIR + path, oflags, 0o600))
            except FileExistsError:
                raise FileExistsError(
                    errno.EEXIST, "A POSIX shared memory segment of that name exists", ident
                ) from None
            except FileNotFoundError:
                raise FileNotFoundError(
                    errno.ENOENT, "No such POSIX shared memory segment", ident
                ) from None
            except PermissionError as exc:
                raise PermissionError(errno.EACCES, exc.strerror, ident) from None
        try:
            return posix_ipc.SharedMemory(path, flags, mode=0o600, read_only=read_only)
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

    def _attach(
        self, ident: str, options: Mapping[str, Any], private: bool
    ) -> Optional[Attachment]:
        shm = self._open(ident)
        try:
            st = sized_stat(shm.fd)
            if st.st_size == 0:
                raise ValueError(
                    f"the POSIX shared memory segment {ident!r} has size 0: there is "
                    "nothing to map (was it created by something other than mpshm "
                    "or the standard library, and not sized yet?)"
                )
            if private and st.st_blksize > mmap.PAGESIZE:
                return None  # hugetlbfs: copy-on-write would take huge pages of the pool
            huge = _huge.tmpfs_huge(SHM_DIR) if _huge.wants_huge(options, st.st_size) else None
            attachment = MmapAttachment(shm.fd, st.st_size, file_identity(shm.fd, st), st,
                                        kernel_address=huge in _huge.ALIGNED, private=private)
        finally:
            shm.close_fd()
        after_attach(attachment, huge, _huge.flag(options, "prefault"))
        return attachment

    # -- removing, and proving what a name holds

    @staticmethod
    def _unlink(ident: str) -> None:
        """``shm_unlink`` (an ``unlink`` in /dev/shm on Linux), posix_ipc's exceptions."""
        path = _path(ident)
        if _DIRECT:
            os.unlink(SHM_DIR + path)
        else:
            posix_ipc.unlink_shared_memory(path)

    _REMEDY = (
        "Free space in /dev/shm, start the container with a larger "
        "--shm-size, or use backend='mmap' with dir= on a larger disk."
    )

    def unlink(self, ident: str) -> None:
        try:
            self._unlink(ident)
        except (FileNotFoundError, posix_ipc.ExistentialError):
            raise FileNotFoundError(
                errno.ENOENT, "No such POSIX shared memory segment", ident
            ) from None
        except (PermissionError, posix_ipc.PermissionsError) as exc:
            raise PermissionError(
                getattr(exc, "errno", None) or errno.EPERM,
                "Only the owner of a POSIX shared memory segment (or root) may remove it",
                ident,
            ) from None

    def identity(self, ident: str) -> Optional[str]:
        if _DIRECT:  # (a symlink is not a segment: shm_open does not follow it)
            found = lstat_identity(SHM_DIR + _path(ident))
            if found is None or not stat.S_ISREG(found[0].st_mode):
                return None
            return found[1]
        try:
            shm = self._open(ident, read_only=True)
        except OSError:
            return None
        try:
            return file_identity(shm.fd, os.fstat(shm.fd))
        finally:
            shm.close_fd()

    def destroy(self, ident: str, identity: Optional[str]) -> bool:
        """Unlink *ident* if it is still the object with *identity*, a regular
        file in /dev/shm owned by this user (see :meth:`Backend.destroy`)."""
        if identity is None:
            return False
        if not _DIRECT:
            return super().destroy(ident, identity)
        path = SHM_DIR + _path(ident)
        found = lstat_identity(path)
        if found is None:
            return False
        st, now = found
        if (not self.proves(identity, now) or not stat.S_ISREG(st.st_mode)
                or st.st_uid != os.geteuid()):
            return False
        # /dev/shm is sticky: nobody but this user (and root) can replace the
        # file between the check and the unlink.
        try:
            os.unlink(path)
        except FileNotFoundError:
            return False
        return True

    # -- what exists, and where

    def list(self) -> list[SegmentInfo]:
        if not sys.platform.startswith("linux"):
            return []
        # POSIX semaphores live in /dev/shm too, as sem.<name>.
        return list_files(
            SHM_DIR, self.name, lambda e: None if e.name.startswith("sem.") else e.name
        )

    def where(self, options: Mapping[str, Any]) -> Optional[str]:
        return SHM_DIR if _DIRECT else None

    def available(self) -> Optional[str]:
        if sys.platform.startswith("linux") and not os.path.isdir(SHM_DIR):
            return f"{SHM_DIR} does not exist: POSIX shared memory is not mounted"
        return None
