"""The shared base of the file-backed posix and mmap backends
(:class:`FileBackend`, the mapping and the listing they share), and the
sizing and filling of their files.

Both store a segment as a file (in /dev/shm, or anywhere): space is reserved
at creation, so that a full filesystem fails there with ``OSError(ENOSPC)``
instead of a SIGBUS at a later write. This module needs no ``posix_ipc``, so
the mmap backend works where that package is not installed.
"""

from __future__ import annotations

import abc
import errno
import fcntl
import hashlib
import mmap
import os
import random
import stat
import sys
from typing import Any, Callable, Mapping, Optional

from . import _huge
from ._base import Attachment, Backend, SegmentInfo, Unnamed
from ._util import map_shared, no_space, release_view

__all__ = [
    "FileBackend",
    "MmapAttachment",
    "after_attach",
    "check_free",
    "create_mapped",
    "create_unnamed",
    "create_written",
    "file_identity",
    "list_files",
    "lstat_identity",
    "new_file",
    "reserve",
    "write_all",
]


# -- Mappings and listings -----------------------------------------------------


class MmapAttachment(Attachment):
    """An attachment backed by an :class:`mmap.mmap` of a file descriptor
    (a copy-on-write one with *private*: see :func:`map_shared`)."""

    def __init__(
        self, fd: int, size: int, identity: Optional[str] = None,
        st: Optional[os.stat_result] = None, kernel_address: bool = False,
        private: bool = False,
    ) -> None:
        if st is not None and st.st_blksize > mmap.PAGESIZE:
            kernel_address = True  # hugetlbfs (see map_shared)
        self._mmap: Optional[mmap.mmap] = map_shared(fd, size, kernel_address, private)
        self.size = size
        self.buf = memoryview(self._mmap)
        self.identity = identity
        if st is not None:  # what an attach's fstat found
            self.uid = st.st_uid
            self.gid = st.st_gid
            self.mode = stat.S_IMODE(st.st_mode)

    def close(self) -> None:
        buf, self.buf = self.buf, None
        mm, self._mmap = self._mmap, None
        if buf is not None and not release_view(buf):
            # ``buf`` is still in use; it keeps the mmap alive and unmaps it
            # when the last user lets go.
            return
        # References besides ours and getrefcount's: someone uses the mmap
        # itself without exporting it. NumPy's np.ndarray(..., buffer=shm.buf)
        # does (the array's base is the mmap); closing would unmap its memory.
        if mm is not None and sys.getrefcount(mm) <= 2:
            try:
                mm.close()
            except BufferError:
                # Views made with memoryview(buf) still export the mmap;
                # it is unmapped when the last of them is released.
                pass


def list_files(
    directory: str, backend: str, name_of: Callable[[os.DirEntry[str]], Optional[str]]
) -> list[SegmentInfo]:
    """List the regular files in *directory* as segments of *backend*.

    ``name_of(entry)`` gives a file's segment name, or None to skip it.
    """
    try:
        entries = list(os.scandir(directory))
    except OSError:
        return []
    found = []
    for entry in entries:
        name = name_of(entry)
        if name is None:
            continue
        try:
            st = entry.stat(follow_symlinks=False)
        except OSError:
            continue
        if not stat.S_ISREG(st.st_mode):
            continue
        found.append(
            SegmentInfo(
                name=name,
                backend=backend,
                size=st.st_size,
                uid=st.st_uid,
                mode=stat.S_IMODE(st.st_mode),
                ctime=st.st_ctime,
                extra={"path": entry.path},
            )
        )
    return found


# -- Identity ------------------------------------------------------------------
#
# A file's identity is ``<st_dev>:<st_ino>:<size>`` plus something a later
# file cannot share with it: device and inode alone are no proof, as ext4
# hands a freed inode number to the very next file created. Where the
# filesystem keeps an inode generation (ext4, XFS, btrfs: a number it changes
# whenever it reuses an inode), ``:g<generation>``; elsewhere (tmpfs, so every
# POSIX segment) a random token mpshm writes into a new file's ``user.mpshm``
# extended attribute, ``:x<token>``. Where the filesystem has neither
# (hugetlbfs), or for a file not made by mpshm on a filesystem without
# generations, the identity is ``<st_dev>:<st_ino>:<size>`` alone.

#: ``FS_IOC_GETVERSION`` (``_IOR('v', 1, long)``): the inode generation.
_FS_IOC_GETVERSION = 0x80087601
#: The extended attribute holding the token of a file mpshm created.
XATTR = "user.mpshm"
#: What tells files apart on a device: the generation, the token, or neither.
_GENERATION, _TOKEN, _NEITHER = "g", "x", ""
#: The way found to work on each device (``st_dev``), so that creating and
#: identifying files there does not pay for a failing call each time.
_ways: dict[int, str] = {}
#: Errors of a filesystem without generations or extended attributes.
_UNSUPPORTED = frozenset({errno.ENOTTY, errno.EINVAL, errno.EOPNOTSUPP, errno.ENOSYS})
_O_IDENTIFY = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC


def _plain(st: os.stat_result, size: Optional[int] = None) -> str:
    """The identity without the part a later file cannot share."""
    return f"{st.st_dev}:{st.st_ino}:{st.st_size if size is None else size}"


def _token(value: bytes) -> str:
    """The token a ``user.mpshm`` attribute holds, safe for any message
    (one written by someone else may hold anything)."""
    if 0 < len(value) <= 64 and value.isascii() and value.isalnum():
        return value.decode("ascii")
    return "h" + hashlib.sha256(value).hexdigest()[:32]


def file_identity(fd: int, st: os.stat_result, size: Optional[int] = None,
                  mark: bool = False) -> str:
    """The identity of open regular file *fd* (see above), whose ``fstat``
    is *st* and whose size is *size* (default: ``st.st_size``).

    With *mark* (a file this process has just created and sized), a token is
    written into it first where the filesystem has no generation.
    """
    dev = st.st_dev
    base = _plain(st, size)
    way = _ways.get(dev)
    if way is None or way == _GENERATION:
        try:
            generation = fcntl.ioctl(fd, _FS_IOC_GETVERSION, bytes(8))
        except OSError as exc:
            if exc.errno not in _UNSUPPORTED:
                return base
        else:
            _ways[dev] = _GENERATION
            return f"{base}:g{int.from_bytes(generation, sys.byteorder)}"
    if way == _NEITHER:
        return base
    try:
        if mark:
            # Unique is enough (it is no secret, and nobody else may write our
            # files): the random module's generator, reseeded in forked
            # children, costs a tenth of reading the kernel's randomness.
            token = f"{random.getrandbits(64):016x}"
            os.setxattr(fd, XATTR, token.encode("ascii"), os.XATTR_CREATE)
        else:
            token = _token(os.getxattr(fd, XATTR))
    except OSError as exc:
        if exc.errno in _UNSUPPORTED:
            _ways[dev] = _NEITHER
        elif exc.errno == errno.ENODATA:
            _ways[dev] = _TOKEN
        return base
    _ways[dev] = _TOKEN
    return f"{base}:x{token}"


def lstat_identity(path: str) -> Optional[tuple[os.stat_result, str]]:
    """The ``lstat`` of *path* and the identity of what is there (see
    :func:`file_identity`), or None if nothing is. Something other than a
    regular file (a symbolic link, say) gets ``<st_dev>:<st_ino>:<size>``:
    never the identity of a file mpshm made, and never opened."""
    try:
        st = os.lstat(path)
    except OSError:
        return None
    base = _plain(st)
    if not stat.S_ISREG(st.st_mode):
        return st, base
    way = _ways.get(st.st_dev)
    if way == _NEITHER:
        return st, base
    if way == _TOKEN:  # no need to open it: lstat and getxattr
        try:
            value = os.getxattr(path, XATTR, follow_symlinks=False)
        except OSError as exc:
            if exc.errno in _UNSUPPORTED:
                _ways[st.st_dev] = _NEITHER
            return st, base
        return st, f"{base}:x{_token(value)}"
    # The generation needs an open file (O_NONBLOCK, O_NOFOLLOW: whatever
    # replaced the file meanwhile, the open neither blocks nor follows).
    try:
        fd = os.open(path, _O_IDENTIFY)
    except OSError:
        return st, base
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            return st, _plain(st)
        return st, file_identity(fd, st)
    finally:
        os.close(fd)


def new_file(fd: int) -> os.stat_result:
    """``fstat`` of a file this process has just created, with mode 0600
    whatever the umask took from the mode it was created with."""
    st = os.fstat(fd)
    if stat.S_IMODE(st.st_mode) != 0o600:
        os.fchmod(fd, 0o600)
        st = os.fstat(fd)
    return st


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


#: Whether posix_fallocate also sizes a new file: on Linux it does (the
#: fallocate system call's default mode extends the file, and so does glibc's
#: emulation where a filesystem cannot preallocate).
_FALLOCATE_SIZES = sys.platform.startswith("linux") and hasattr(os, "posix_fallocate")


#: Up to this size a new file is reserved by writing zeros into it: one
#: ``pwrite`` sizes it and takes its space (filesystems that allocate on
#: write, ext4, XFS and btrfs among them, reserve the blocks then, and fail
#: with ENOSPC there), several times cheaper than ``posix_fallocate`` on a
#: disk (70 us against 9 us for 4 KiB on ext4), as cheap on tmpfs. Larger
#: files are preallocated, which writes no data.
_ZEROS_UP_TO = 64 << 10
_ZEROS = bytes(_ZEROS_UP_TO)


def _write_zeros(fd: int, size: int, storage: str, where: Optional[str],
                 remedy: str) -> bool:
    """Write *size* zero bytes at the start of new file *fd*; False where the
    filesystem takes no ``write`` (hugetlbfs): reserve it another way."""
    zeros = memoryview(_ZEROS)
    done = 0
    try:
        while done < size:
            done += os.pwrite(fd, zeros[done:size], done)
    except OSError as exc:
        if _is_space_error(exc):
            raise _space_error(size, storage, where, remedy) from None
        if exc.errno in (errno.EINVAL, errno.EOPNOTSUPP, errno.ENODEV, errno.ENOSYS):
            return False
        raise
    return True


def reserve(fd: int, size: int, storage: str, where: Optional[str], remedy: str) -> None:
    """Size *fd* to *size* bytes and allocate them now, so a later write cannot SIGBUS.

    Raises the ENOSPC error of :func:`no_space` when the filesystem is full
    or cannot hold a file that large. Filesystems that cannot preallocate are
    only sized.
    """
    check_free(size, storage, where, remedy)
    if size <= _ZEROS_UP_TO and _write_zeros(fd, size, storage, where, remedy):
        return
    if _FALLOCATE_SIZES:
        # A new file is empty: posix_fallocate alone sizes it too (one system
        # call instead of ftruncate's and its own), on the filesystems that
        # can preallocate. The others fail without changing anything.
        try:
            os.posix_fallocate(fd, 0, size)
            return
        except OSError as exc:
            if _is_space_error(exc) or exc.errno == errno.ENOMEM:
                raise _space_error(size, storage, where, remedy) from None
            if exc.errno not in (errno.EINVAL, errno.EOPNOTSUPP, errno.ENODEV, errno.ENOSYS):
                raise
    _truncate(fd, size, storage, where, remedy)
    if not _FALLOCATE_SIZES:
        _fallocate(fd, size, storage, where, remedy)


def _truncate(fd: int, size: int, storage: str, where: Optional[str], remedy: str) -> None:
    """``ftruncate(fd, size)``, with the detailed ENOSPC error of this module."""
    try:
        os.ftruncate(fd, size)
    except OSError as exc:
        if _is_space_error(exc):
            raise _space_error(size, storage, where, remedy) from None
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


def create_written(fd: int, data: memoryview, storage: str, where: Optional[str],
                   remedy: str) -> str:
    """Fill new file *fd* with *data* (see :func:`write_all`), mode 0600;
    return its identity."""
    st = new_file(fd)
    write_all(fd, data, storage, where, remedy)
    return file_identity(fd, st, data.nbytes, mark=True)


def _fallocate(fd: int, size: int, storage: str, where: Optional[str], remedy: str) -> None:
    """``posix_fallocate`` of an already sized file, with :func:`reserve`'s errors."""
    try:
        if hasattr(os, "posix_fallocate"):
            os.posix_fallocate(fd, 0, size)
    except OSError as exc:
        if _is_space_error(exc) or exc.errno == errno.ENOMEM:
            raise _space_error(size, storage, where, remedy) from None
        if exc.errno in (errno.EINVAL, errno.EOPNOTSUPP, errno.ENODEV, errno.ENOSYS):
            return
        raise


def create_mapped(
    fd: int, size: int, storage: str, where: Optional[str], remedy: str,
    huge: Optional[str] = None,
) -> MmapAttachment:
    """Reserve *size* bytes for new file *fd* (see :func:`reserve`) and map it.

    *huge* is how the file's filesystem gives huge pages (see
    :func:`~mpshm.backends._huge.tmpfs_huge`), when the caller asked for
    them: ``"always"``/``"within_size"`` (mapped where the kernel aligns it
    for them), ``"hugetlbfs"`` (same; *size* must be a multiple of its page
    size), ``"advise"`` (also ``madvise(MADV_HUGEPAGE)``, and the space is
    reserved by prefaulting the mapping for writing, which allocates huge
    pages where ``posix_fallocate`` would allocate small ones; a full
    filesystem fails there with ENOSPC, never a SIGBUS later). Anything else:
    normal pages.
    """
    st = new_file(fd)
    if huge == "advise":
        check_free(size, storage, where, remedy)
        _truncate(fd, size, storage, where, remedy)
        identity = file_identity(fd, st, size, mark=True)
        attachment = MmapAttachment(fd, size, identity, kernel_address=True)
        try:
            assert attachment.buf is not None
            address = _huge.address_of(attachment.buf)
            _huge.madvise(address, size, _huge.MADV_HUGEPAGE)
            error = _huge.madvise(address, size, _huge.MADV_POPULATE_WRITE)
            if error in (errno.EFAULT, errno.ENOMEM, errno.ENOSPC):
                taken = os.fstat(fd).st_blocks * 512  # given back when the caller removes it
                raise _space_error(size, storage, where, remedy, taken)
            if error:  # an older kernel (EINVAL): reserve as usual
                _fallocate(fd, size, storage, where, remedy)
        except BaseException:
            attachment.close()
            raise
        return attachment
    if st.st_blksize > mmap.PAGESIZE and where is not None:
        page = _huge.hugetlbfs_page_size(where)
        if page:
            # A hugetlbfs file is a whole number of huge pages, mapped whole:
            # the segment gets the size rounded up (its ``size`` says so, as
            # an attach finds it). Mapped at the unrounded size, it could
            # never be unmapped (a hugetlb mapping cannot be split inside a
            # huge page), and ftruncate refuses any other size.
            size = -(-size // page) * page
            huge = "hugetlbfs"
    reserve(fd, size, storage, where, remedy)
    identity = file_identity(fd, st, size, mark=True)  # sized (and rounded) first
    aligned = huge in ("always", "within_size", "hugetlbfs")
    return MmapAttachment(fd, size, identity, st, kernel_address=aligned)


def after_attach(attachment: MmapAttachment, huge: Optional[str], prefault: bool) -> None:
    """Apply ``huge_pages=`` (*huge* as for :func:`create_mapped`) and
    ``prefault=`` to a new attachment; failures are ignored."""
    if attachment.buf is None or (huge != "advise" and not prefault):
        return
    address = _huge.address_of(attachment.buf)
    if huge == "advise":
        _huge.madvise(address, attachment.size, _huge.MADV_HUGEPAGE)
    if prefault:
        _huge.madvise(address, attachment.size, _huge.MADV_POPULATE_READ)


# -- Files without a name yet ---------------------------------------------------
#
# A file opened with O_TMPFILE (without O_EXCL) has no name: it lives as long
# as a descriptor or a mapping of it does, so a kill leaves nothing behind.
# linkat() through /proc/self/fd (AT_SYMLINK_FOLLOW: no capability needed,
# unlike AT_EMPTY_PATH) then gives it a name atomically, failing with EEXIST
# if the name is taken.
# Where either is missing (no /proc, a filesystem without O_TMPFILE), None:
# the caller creates another way.

#: Whether this system can make unnamed files and name them later.
_TMPFILE = hasattr(os, "O_TMPFILE") and os.path.isdir("/proc/self/fd")
#: Directories found unable to hold unnamed files: not tried again.
_no_tmpfile: set[str] = set()
#: Errors of a filesystem (or kernel) without O_TMPFILE.
_NO_TMPFILE = frozenset({errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL, errno.ENOSYS})
#: Errors of a link that cannot be made (no /proc after all, no hard links,
#: no room for a name), where a creation under the name itself may still work.
_NO_LINK = frozenset({errno.ENOENT, errno.EPERM, errno.EOPNOTSUPP, errno.ENOSYS,
                      errno.EMLINK, errno.ENOSPC, errno.EDQUOT, errno.EXDEV})


class UnnamedFile(Unnamed):
    """A new file without a name (O_TMPFILE), sized, marked and mapped, to be
    named *path* (see :meth:`~mpshm.backends.Backend.create_unnamed`).
    *taken* is the FileExistsError's message and file name if it is."""

    def __init__(self, fd: int, attachment: MmapAttachment, path: str,
                 taken: tuple[str, str]) -> None:
        self._fd = fd
        self.attachment = attachment
        self._path = path
        self._taken = taken

    def name(self) -> None:
        fd = self._fd
        try:
            # linkat(..., AT_SYMLINK_FOLLOW). A dir_fd makes CPython call linkat
            # (else link(), which would link the /proc symlink itself: EXDEV);
            # the source path is absolute, so the kernel ignores that fd.
            os.link(f"/proc/self/fd/{fd}", self._path, src_dir_fd=fd, follow_symlinks=True)
        except FileExistsError:
            raise FileExistsError(errno.EEXIST, *self._taken) from None
        except OSError as exc:
            if exc.errno in _NO_LINK:
                raise NotImplementedError(f"cannot link an unnamed file to {self._path}: "
                                          f"{exc.strerror}") from None
            raise

    def release(self) -> None:
        fd, self._fd = self._fd, -1
        if fd >= 0:
            os.close(fd)


def create_unnamed(
    directory: str, path: str, size: int, storage: str, remedy: str,
    huge: Optional[str], taken: tuple[str, str],
) -> Optional[UnnamedFile]:
    """A new unnamed file in *directory*, reserved and mapped as
    :func:`create_mapped` does, to be named *path* (in *directory*) by
    :meth:`UnnamedFile.name`; None where the system or the filesystem
    cannot make one (see above)."""
    if not _TMPFILE or directory in _no_tmpfile:
        return None
    try:
        fd = os.open(directory, os.O_TMPFILE | os.O_RDWR | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        if exc.errno in _NO_TMPFILE:
            _no_tmpfile.add(directory)
        return None  # (whatever it was, a creation under the name says it better)
    try:
        attachment = create_mapped(fd, size, storage, directory, remedy, huge)
    except BaseException:
        os.close(fd)
        raise
    return UnnamedFile(fd, attachment, path, taken)


class FileBackend(Backend):
    """What the file-backed backends (posix, mmap) share: a segment is a
    file mapped from its descriptor, so it can be mapped privately too
    (copy-on-write, see :meth:`Backend.attach_private`) by one
    :meth:`_attach` with a flag."""

    def attach(self, ident: str, options: Mapping[str, Any]) -> Attachment:
        attachment = self._attach(ident, options, private=False)
        assert attachment is not None
        return attachment

    def attach_private(self, ident: str, options: Mapping[str, Any]) -> Optional[Attachment]:
        return self._attach(ident, options, private=True)

    @abc.abstractmethod
    def _attach(
        self, ident: str, options: Mapping[str, Any], private: bool
    ) -> Optional[Attachment]:
        """Map segment *ident*, shared or (*private*) copy-on-write; None if
        it cannot be mapped privately (hugetlbfs)."""
