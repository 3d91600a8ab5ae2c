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
import os
import stat
import tempfile
from typing import Any, Callable, Mapping, Optional

from . import _huge
from ._base import (
    Attachment,
    Backend,
    MmapAttachment,
    SegmentInfo,
    fstat_identity,
    list_files,
    random_token,
    sized_stat,
)
from ._files import after_attach, create_mapped, write_all

__all__ = ["MmapBackend", "default_dir"]

PREFIX = "mpshm_"
_O_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_O_CLOEXEC = getattr(os, "O_CLOEXEC", 0)


def default_dir() -> str:
    """The directory new segments go to when no ``dir=`` is given."""
    env = os.environ.get("MPSHM_DIR")
    if env:
        return os.path.abspath(env)
    return os.path.join(tempfile.gettempdir(), f"mpshm-{os.getuid()}")


def check_dir(path: str, create: bool) -> None:
    """Make sure *path* is a directory it is safe to put segments in.

    Refuses a symbolic link, a directory owned by another user, and one that
    others may write to without the sticky bit. Creates it (mode 0700) when
    *create* is true and it does not exist.
    """
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        if not create:
            raise FileNotFoundError(
                errno.ENOENT, "The mmap backend's directory does not exist", path
            ) from None
        try:
            os.makedirs(path, mode=0o700, exist_ok=True)
            st = os.lstat(path)
        except OSError as exc:
            raise OSError(
                exc.errno, f"cannot create the mmap backend's directory: {exc.strerror}", path
            ) from None
    if stat.S_ISLNK(st.st_mode):
        raise PermissionError(
            errno.EPERM,
            "Refusing to use a symbolic link as the mmap backend's directory "
            "(pass the real path as dir= or MPSHM_DIR)",
            path,
        )
    if not stat.S_ISDIR(st.st_mode):
        raise NotADirectoryError(errno.ENOTDIR, "Not a directory", path)
    if st.st_uid != os.getuid():
        raise PermissionError(
            errno.EPERM,
            f"Refusing to use a directory owned by uid {st.st_uid} (you are uid "
            f"{os.getuid()}) for the mmap backend: choose a directory of your own",
            path,
        )
    if st.st_mode & stat.S_IWOTH and not st.st_mode & stat.S_ISVTX:
        raise PermissionError(
            errno.EPERM,
            "Refusing a world-writable directory without the sticky bit for the mmap "
            "backend: anyone could replace its files",
            path,
        )


class MmapBackend(Backend):
    """Regular files mapped with ``mmap``."""

    name = "mmap"
    option_names = frozenset({"dir"}) | _huge.OPTIONS
    unique_names = True
    storage = "the mmap backend's filesystem"

    def check_options(self, options: Mapping[str, Any]) -> None:
        super().check_options(options)
        _huge.check(options)

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

    _REMEDY = "Free space there, or pass dir= (or set MPSHM_DIR) to a larger filesystem."

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

    def create_from(self, ident: str, data: memoryview, options: Mapping[str, Any]) -> str:
        def fill(fd: int, storage: str) -> str:
            write_all(fd, data, storage, os.path.dirname(ident), self._REMEDY)
            return fstat_identity(fd)

        identity: str = self._new(ident, options, fill)
        return identity

    def attach(self, ident: str, options: Mapping[str, Any]) -> Attachment:
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
            huge = None
            if _huge.wants_huge(options, st.st_size):
                huge = _huge.tmpfs_huge(os.path.dirname(ident))
            attachment = MmapAttachment(fd, st.st_size, f"{st.st_dev}:{st.st_ino}", st,
                                        kernel_address=huge in _huge.ALIGNED)
        finally:
            os.close(fd)
        after_attach(attachment, huge, _huge.flag(options, "prefault"))
        return attachment

    def unlink(self, ident: str) -> None:
        try:
            os.unlink(ident)
        except FileNotFoundError:
            raise FileNotFoundError(
                errno.ENOENT, "No such mmap segment (file)", self.qualified(ident)
            ) from None

    def identity(self, ident: str) -> Optional[str]:
        try:
            st = os.lstat(ident)
        except OSError:
            return None
        return f"{st.st_dev}:{st.st_ino}"

    def list(self) -> list[SegmentInfo]:
        return list_files(default_dir(), self.name, lambda e: self.qualified(e.path))
