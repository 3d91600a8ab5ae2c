"""The private directories mpshm keeps files in, and the checks that make
them safe to use when another local user may have been there first.

The ``mmap`` backend's directory (:func:`default_dir`, checked by
:func:`check_dir`) lives here, below the backends, because the tracker and
the command line need it too.
"""

from __future__ import annotations

import errno
import os
import stat
import tempfile

__all__ = ["check_dir", "default_dir"]


def default_dir() -> str:
    """The directory new segments go to when no ``dir=`` is given."""
    env = os.environ.get("MPSHM_DIR")
    if env:
        return os.path.abspath(env)
    return os.path.join(tempfile.gettempdir(), f"mpshm-{os.getuid()}")


def check_dir(path: str, create: bool) -> None:
    """Make sure *path* is a directory it is safe to put segments in.

    Refuses a symbolic link, a directory owned by another user, and one that
    others may write to without the sticky bit. Creates it (mode 0700, and
    any missing parent too, whatever the umask) when *create* is true and
    it does not exist.
    """
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        if not create:
            raise FileNotFoundError(
                errno.ENOENT, "The mmap backend's directory does not exist", path
            ) from None
        try:
            _make_dirs(path)
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


def _make_dirs(path: str) -> None:
    """``os.makedirs(path)`` with mode 0700 for each directory it creates,
    exactly: a umask such as 0277 would leave them 0500, unusable."""
    parent = os.path.dirname(path)
    if parent != path and not os.path.lexists(parent):
        _make_dirs(parent)
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        return
    if stat.S_IMODE(os.lstat(path).st_mode) != 0o700:
        os.chmod(path, 0o700, follow_symlinks=False)
