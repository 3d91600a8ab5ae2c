"""Regular files mapped with ``mmap(MAP_SHARED)``.

Names are ``mmap:<absolute path>``. New segments are files in a private
directory: the ``dir=`` option, else ``$MPSHM_DIR``, else
``<tempdir>/mpshm-<uid>``, created with mode 0700. Files are created with
``O_CREAT|O_EXCL|O_NOFOLLOW`` and mode 0600, and opened with ``O_NOFOLLOW``,
so a symbolic link planted at a segment's path is never followed. Attaching
``mmap:/some/existing/file`` maps that file (a data set on disk, say).

A bare name (``"frames"``) under this backend is a file of that name in the
directory above. Space is reserved at creation (``posix_fallocate``), so a
full disk fails there with ``OSError(ENOSPC)``, never with SIGBUS later.

This backend works wherever files and ``mmap`` do; point ``dir=`` at a tmpfs
for memory speed, or at a disk when ``/dev/shm`` is too small (containers).
"""

from __future__ import annotations

import errno
import mmap
import os
import stat
from typing import Any, Callable, Mapping, Optional

from .._paths import check_dir, default_dir
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
from ._util import random_token, sized_stat

__all__ = ["MmapBackend", "default_dir"]

PREFIX = "mpshm_"
_O_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_O_CLOEXEC = getattr(os, "O_CLOEXEC", 0)


def _safe_parent(st: os.stat_result) -> bool:
    """Whether a directory (its ``fstat``) is one only this user can change
    the files of: its own (not writable by others without the sticky bit),
    or root's with the sticky bit (/tmp)."""
    if not stat.S_ISDIR(st.st_mode):
        return False
    if st.st_uid == os.geteuid():
        return not st.st_mode & stat.S_IWOTH or bool(st.st_mode & stat.S_ISVTX)
    return st.st_uid == 0 and bool(st.st_mode & stat.S_ISVTX)


class MmapBackend(FileBackend):
    """Regular files mapped with ``mmap``."""

    name = "mmap"
    option_names = frozenset({"dir"}) | _huge.OPTIONS
    checked_flags = _huge.OPTIONS
    unique_names = True
    storage = "the mmap backend's filesystem"

    # -- names

    def _dir(self, options: Mapping[str, Any]) -> str:
        given = options.get("dir")
        if given is None:
            return default_dir()
        if not isinstance(given, (str, os.PathLike)):
            raise TypeError(f"dir= must be a path, not {type(given).__name__}")
        return os.path.abspath(os.fspath(given))

    def parse(self, ident: str, options: Mapping[str, Any]) -> str:
        self.check_options(options)
        if "\0" in ident:
            raise ValueError(f"invalid mmap name {ident!r}: it contains a NUL character")
        try:
            os.fsencode(ident)
        except UnicodeEncodeError:
            raise ValueError(
                f"invalid mmap name {ident!r}: it contains a lone surrogate that no file "
                "name can hold"
            ) from None
        if ident.startswith("/"):
            return os.path.normpath(ident)
        problem = None
        if not ident:
            problem = "it is empty"
        elif "/" in ident:
            problem = "a relative path is ambiguous; give an absolute path or a plain file name"
        elif ident in (".", ".."):
            problem = "'.' and '..' are not file names"
        elif len(os.fsencode(ident)) > 255:
            problem = "it is longer than 255 bytes"
        if problem:
            raise ValueError(
                f"invalid mmap name {ident!r}: {problem}. Use 'mmap:/absolute/path' "
                "or a plain file name, which goes into the backend's directory."
            )
        return os.path.join(self._dir(options), ident)

    def generate(self, options: Mapping[str, Any]) -> str:
        return os.path.join(self._dir(options), PREFIX + random_token())

    def qualified(self, ident: str) -> str:
        return f"{self.name}:{ident}"

    def sibling(self, ident: str) -> Optional[str]:
        return os.path.join(os.path.dirname(ident), PREFIX + random_token())

    def link(self, ident: str, name: str) -> None:
        try:
            os.link(ident, name, follow_symlinks=False)
        except FileExistsError:
            raise FileExistsError(
                errno.EEXIST, "A file of that name exists", self.qualified(name)
            ) from None
        except OSError as exc:
            if exc.errno in (errno.EPERM, errno.EOPNOTSUPP, errno.ENOSYS, errno.EMLINK,
                             errno.ENOSPC, errno.EDQUOT):
                # A filesystem without hard links (vfat, some FUSE ones), or
                # without room for one more name.
                raise NotImplementedError(
                    f"{os.path.dirname(name)} cannot hold hard links") from None
            raise

    _REMEDY = "Free space there, or pass dir= (or set MPSHM_DIR) to a larger filesystem."

    # -- creating

    def _new(self, ident: str, options: Mapping[str, Any], fill: Callable[[int, str], Any]) -> Any:
        """Create file *ident* exclusively and call *fill* with its descriptor
        and the storage's description; on any failure remove it again."""
        parent = os.path.dirname(ident)
        check_dir(parent, create=parent == self._dir(options))
        try:
            fd = os.open(
                ident, os.O_RDWR | os.O_CREAT | os.O_EXCL | _O_NOFOLLOW | _O_CLOEXEC, 0o600
            )
        except FileExistsError:
            raise FileExistsError(
                errno.EEXIST, "A file of that name exists", self.qualified(ident)
            ) from None
        try:
            return fill(fd, f"{parent} (mmap backend)")
        except BaseException:
            try:
                os.unlink(ident)
            except OSError:
                pass
            raise
        finally:
            os.close(fd)

    def create(self, ident: str, size: int, options: Mapping[str, Any]) -> Attachment:
        where = os.path.dirname(ident)
        huge = _huge.tmpfs_huge(where) if _huge.wants_huge(options, size) else None

        def fill(fd: int, storage: str) -> Attachment:
            # (On hugetlbfs, create_mapped rounds the size up to whole huge pages.)
            return create_mapped(fd, size, storage, where, self._REMEDY, huge)

        attachment: Attachment = self._new(ident, options, fill)
        return attachment

    def create_unnamed(
        self, ident: str, size: int, options: Mapping[str, Any]
    ) -> Optional[Unnamed]:
        parent = os.path.dirname(ident)
        check_dir(parent, create=parent == self._dir(options))
        huge = _huge.tmpfs_huge(parent) if _huge.wants_huge(options, size) else None
        return create_unnamed(parent, ident, size, f"{parent} (mmap backend)", self._REMEDY,
                              huge, ("A file of that name exists", self.qualified(ident)))

    def exists(self, ident: str) -> bool:
        # Anything there, a symbolic link too, makes the creation (O_EXCL) fail.
        return os.access(ident, os.F_OK, follow_symlinks=False)

    def create_from(self, ident: str, data: memoryview, options: Mapping[str, Any]) -> str:
        def fill(fd: int, storage: str) -> str:
            return create_written(fd, data, storage, os.path.dirname(ident), self._REMEDY)

        identity: str = self._new(ident, options, fill)
        return identity

    # -- attaching

    def _attach(
        self, ident: str, options: Mapping[str, Any], private: bool
    ) -> Optional[Attachment]:
        try:
            fd = os.open(ident, os.O_RDWR | _O_NOFOLLOW | _O_CLOEXEC)
        except FileNotFoundError:
            raise FileNotFoundError(
                errno.ENOENT, "No such mmap segment (file)", self.qualified(ident)
            ) from None
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise PermissionError(
                    errno.ELOOP,
                    "Refusing to follow a symbolic link: mmap segments must be regular files",
                    self.qualified(ident),
                ) from None
            raise
        try:
            st = sized_stat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise ValueError(f"{self.qualified(ident)!r} is not a regular file")
            if st.st_size == 0:
                raise ValueError(f"the file {ident!r} is empty (size 0): there is nothing to map")
            if private and st.st_blksize > mmap.PAGESIZE:
                return None  # hugetlbfs: copy-on-write would take huge pages of the pool
            huge = None
            if _huge.wants_huge(options, st.st_size):
                huge = _huge.tmpfs_huge(os.path.dirname(ident))
            attachment = MmapAttachment(fd, st.st_size, file_identity(fd, st), st,
                                        kernel_address=huge in _huge.ALIGNED, private=private)
        finally:
            os.close(fd)
        after_attach(attachment, huge, _huge.flag(options, "prefault"))
        return attachment

    # -- removing, and proving what a name holds

    def unlink(self, ident: str) -> None:
        try:
            os.unlink(ident)
        except FileNotFoundError:
            raise FileNotFoundError(
                errno.ENOENT, "No such mmap segment (file)", self.qualified(ident)
            ) from None
        except PermissionError as exc:
            if exc.errno == errno.EPERM:  # a directory with the sticky bit
                reason = "only the owner of this file (or of its directory, or root) may remove it"
            else:
                reason = "you may not change its directory"
            raise PermissionError(
                exc.errno, f"Cannot remove this mmap segment (file): {reason}",
                self.qualified(ident),
            ) from None

    def identity(self, ident: str) -> Optional[str]:
        found = lstat_identity(ident)
        return None if found is None else found[1]

    def destroy(self, ident: str, identity: Optional[str]) -> bool:
        """Unlink *ident* if it is still the file with *identity* (see
        :meth:`Backend.destroy`): a regular file owned by this user, in a
        directory only this user can change the files of (see :func:`_safe_parent`)."""
        if identity is None:
            return False
        parent, base = os.path.split(ident)
        try:
            # The directory checked is the one the file is removed from,
            # whatever happens to the path leading to it meanwhile.
            dir_fd = os.open(parent, os.O_RDONLY | os.O_DIRECTORY | _O_NOFOLLOW | _O_CLOEXEC)
        except OSError:
            return False
        try:
            if not _safe_parent(os.fstat(dir_fd)):
                return False
            found = lstat_identity(ident)
            if found is None:
                return False
            st, now = found
            if (not self.proves(identity, now) or not stat.S_ISREG(st.st_mode)
                    or st.st_uid != os.geteuid()):
                return False
            try:
                there = os.stat(base, dir_fd=dir_fd, follow_symlinks=False)
            except OSError:
                return False
            if (there.st_dev, there.st_ino) != (st.st_dev, st.st_ino):
                return False
            try:
                os.unlink(base, dir_fd=dir_fd)
            except FileNotFoundError:
                return False
        finally:
            os.close(dir_fd)
        return True

    # -- what exists, and where

    def list(self) -> list[SegmentInfo]:
        return list_files(default_dir(), self.name, lambda e: self.qualified(e.path))

    def where(self, options: Mapping[str, Any]) -> Optional[str]:
        return self._dir(options)

    def available(self) -> Optional[str]:
        """None if the default directory is one, or can be made (its nearest
        existing ancestor is a directory this user may write to), else why
        not. Creates nothing. The safety checks (a symbolic link, a directory
        of another user, or one writable by all without the sticky bit) are
        left to creation, whose error says what to do."""
        path = default_dir()
        try:
            st = os.stat(path)
        except FileNotFoundError:
            parent = os.path.dirname(path)
            while parent != os.path.dirname(parent) and not os.path.lexists(parent):
                parent = os.path.dirname(parent)
            if not os.path.isdir(parent):
                return f"cannot create the directory {path}: {parent} is not a directory"
            if not os.access(parent, os.W_OK | os.X_OK):
                return f"cannot create the directory {path}: {parent} is not writable"
            return None
        except OSError as exc:
            return f"cannot use the directory {path}: {exc.strerror or exc}"
        if not stat.S_ISDIR(st.st_mode):
            return f"{path} is not a directory"
        if not os.access(path, os.W_OK | os.X_OK):
            return f"the directory {path} is not writable"
        return None
