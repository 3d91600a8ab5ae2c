"""The interface every storage backend implements, and helpers they share.

A backend is a small object with no per-segment state: it turns an
*identifier* (the part of a name after ``scheme:``) into a mapping of the
segment in this process. Every backend raises the same exceptions for the
same situations, so nothing backend-specific leaks into
:mod:`mpshm.shared_memory`:

* ``ValueError`` for an identifier the storage cannot use;
* ``TypeError`` for an option the backend does not accept;
* ``FileExistsError`` when creating a name that is taken;
* ``FileNotFoundError`` when attaching or unlinking a name that is absent;
* ``OSError(ENOSPC)`` when the storage cannot hold the size asked for.
"""

from __future__ import annotations

import abc
import errno
import mmap
import os
import secrets
import stat
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Mapping, Optional

__all__ = [
    "Attachment",
    "Backend",
    "MmapAttachment",
    "SegmentInfo",
    "Unnamed",
    "is_utf8",
    "list_files",
    "no_space",
    "random_token",
    "release_view",
]

#: Random bits in generated names (issue 7 asks for at least 64).
TOKEN_BYTES = 8


def is_utf8(text: str) -> bool:
    """Whether *text* encodes as UTF-8 (no lone surrogates): what posix_ipc
    needs of a name (it crashes on a lone surrogate, and leaks an object whose
    name it cannot decode) and what the tracker's messages carry."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def random_token() -> str:
    """Return a fresh random hex string for generated names."""
    return secrets.token_hex(TOKEN_BYTES)


def format_size(n: int) -> str:
    """Format a byte count for error messages: ``'16 MiB (16777216 bytes)'``."""
    units = ["bytes", "KiB", "MiB", "GiB", "TiB", "PiB"]
    value = float(n)
    for unit in units:
        if value < 1024 or unit == units[-1]:
            if unit == "bytes":
                return f"{n} bytes"
            return f"{value:.1f} {unit} ({n} bytes)"
        value /= 1024
    raise AssertionError("unreachable")  # pragma: no cover


def no_space(storage: str, size: int, free: Optional[int], remedy: str) -> OSError:
    """Build the ``OSError(ENOSPC)`` raised when *storage* cannot hold *size* bytes."""
    free_text = format_size(free) if free is not None else "unknown"
    return OSError(
        errno.ENOSPC,
        f"No space left on {storage} for a shared memory segment of "
        f"{format_size(size)}: {free_text} free. {remedy}",
    )


@dataclass(frozen=True)
class SegmentInfo:
    """One segment that exists on a backend, as listed by :meth:`Backend.list`."""

    #: The name as mpshm names it (what ``SharedMemory.name`` would return).
    name: str
    #: The backend's registered name.
    backend: str
    #: Size in bytes.
    size: int
    #: Numeric user id of the owner.
    uid: int
    #: Permission bits.
    mode: int
    #: Creator's process id where the storage records it (SysV), else None.
    creator_pid: Optional[int] = None
    #: Number of attachments where the storage counts them (SysV), else None.
    attached: Optional[int] = None
    #: Time of creation or last change, seconds since the epoch.
    ctime: Optional[float] = None
    #: Anything else the backend knows.
    extra: Mapping[str, Any] = field(default_factory=dict)


def release_view(buf: memoryview) -> bool:
    """Release *buf* if nothing else uses it; return whether it was released.

    A memoryview cannot be released while views made from it export its
    buffer (BufferError); one that something else still references (a
    variable holding ``shm.buf``) is left alone too, so that closing never
    pulls memory from under a user. The memory goes with its last user.
    """
    # References: the caller's variable, our argument, getrefcount's own.
    if sys.getrefcount(buf) > 3:
        return False
    try:
        buf.release()
    except BufferError:
        return False
    return True


_MAP_FIXED = 0x10  # Linux (all architectures)
_MAP_FIXED_NOREPLACE = 0x100000  # Linux 4.17+
_MAP_NORESERVE = getattr(mmap, "MAP_NORESERVE", 0x4000)
_PROT_RW = mmap.PROT_READ | mmap.PROT_WRITE
#: Placeholders left in doubt by a failed map (see :func:`map_shared`): kept
#: alive for good, so that they never unmap what may be someone else's.
_stranded: list[mmap.mmap] = []


class _LibcMmap:
    """libc's ``mmap`` through ctypes (64-bit Linux: off_t is 64 bits there)."""

    def __init__(self) -> None:
        import ctypes

        self._ctypes = ctypes
        function = ctypes.CDLL(None, use_errno=True).mmap
        function.restype = ctypes.c_void_p
        function.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                             ctypes.c_int, ctypes.c_int64]
        self.call: Callable[..., Optional[int]] = function

    def address(self, mm: mmap.mmap) -> int:
        """Where *mm* is mapped."""
        ctypes = self._ctypes
        return int(ctypes.addressof(ctypes.c_char.from_buffer(mm)))  # no export kept

    def errno(self) -> int:
        """errno of this thread's last call."""
        return int(self._ctypes.get_errno())


def _libc_mmap() -> Optional[_LibcMmap]:
    """What :func:`map_shared` maps with before Python 3.13 (64-bit Linux), else None."""
    if not sys.platform.startswith("linux") or sys.maxsize < 2**32 or sys.version_info >= (3, 13):
        return None
    try:
        return _LibcMmap()
    except (ImportError, OSError, AttributeError):  # pragma: no cover
        return None


_libc = _libc_mmap()


def map_shared(
    fd: int, size: int, kernel_address: bool = False, private: bool = False,
) -> mmap.mmap:
    """A shared, writable :class:`mmap.mmap` of the first *size* bytes of *fd*
    that keeps no file descriptor open. With *private*, a private
    (copy-on-write) one instead: writes through it are this mapping's own,
    while the pages it has not written still show the file's later changes.

    With *kernel_address*, the kernel chooses the address for the file
    itself (aligned for huge pages; hugetlbfs needs it): before Python 3.13
    that mapping keeps a duplicate descriptor. Callers must pass it for a
    file whose block size is larger than a page (hugetlbfs): the kernel
    rounds such a mapping's length up to a whole huge page, so mapping it
    over a placeholder of *size* bytes (see below) would map over whatever
    follows the placeholder, whenever the placeholder happens to be aligned.

    CPython's mmap keeps a duplicate of the descriptor for as long as the
    mapping lives: one descriptor per live segment, so a few thousand
    segments would exhaust ``RLIMIT_NOFILE``. Python 3.13 can be told not to
    (``trackfd=False``). Before that, on 64-bit Linux, mmap makes an
    anonymous mapping of the same size (no descriptor), and the file is
    mapped over it in place (``MAP_FIXED``): the mmap object owns the result
    and unmaps it as usual. Elsewhere, or if the placeholder cannot be made,
    the plain mapping (which keeps a descriptor).
    """
    share = mmap.MAP_PRIVATE if private else mmap.MAP_SHARED
    if sys.version_info >= (3, 13):
        return mmap.mmap(fd, size, flags=share, prot=_PROT_RW, trackfd=False)
    libc = _libc
    if libc is None or kernel_address:
        return mmap.mmap(fd, size, flags=share, prot=_PROT_RW)
    try:
        # Never touched, so it costs address space only (and no commit charge).
        mm = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | _MAP_NORESERVE)
    except OSError:
        return mmap.mmap(fd, size, flags=share, prot=_PROT_RW)
    address = libc.address(mm)
    if libc.call(address, size, _PROT_RW, share | _MAP_FIXED, fd, 0) == address:
        return mm
    error = libc.errno()
    # Kernels before 6.12 may have unmapped the placeholder before failing:
    # take the range back, unless something else took it meanwhile. If in
    # doubt (it is still there, or is someone else's), leave it mapped.
    flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | _MAP_NORESERVE | _MAP_FIXED_NOREPLACE
    if libc.call(address, size, _PROT_RW, flags, -1, 0) == address:
        mm.close()
    else:
        _stranded.append(mm)
    if error == errno.EINVAL:
        # A file that needs an aligned address (hugetlbfs): let the kernel choose.
        return mmap.mmap(fd, size, flags=share, prot=_PROT_RW)
    raise OSError(error, os.strerror(error))


class Attachment(abc.ABC):
    """A segment mapped into this process.

    ``buf`` is a writable memoryview of exactly ``size`` bytes. ``close()``
    drops this attachment's hold on the mapping; the memory stays mapped for
    as long as any view made from ``buf`` is alive, so closing never
    invalidates memory someone still uses (and never raises BufferError).
    """

    #: Exactly the segment's size.
    size: int
    #: Writable view of the whole segment, ``None`` once closed.
    buf: Optional[memoryview]
    #: Identity of the storage object (see :meth:`Backend.identity`), if known.
    identity: Optional[str] = None
    #: Owner (numeric user and group ids) and permission bits of the storage
    #: object, as an attach found them (None: not known, or created by this
    #: process). :class:`~mpshm.SharedMemory` checks them (its ``owner_check=``).
    uid: Optional[int] = None
    gid: Optional[int] = None
    mode: Optional[int] = None
    #: Who created it, where the storage records a creator apart from the
    #: owner (System V: the kernel grants its creator every right the owner
    #: has, and the creator may hand ownership to anyone); None elsewhere.
    creator_uid: Optional[int] = None
    creator_gid: Optional[int] = None

    @abc.abstractmethod
    def close(self) -> None:
        """Release this attachment; safe to call more than once."""


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


class Unnamed(abc.ABC):
    """A new segment without a name yet (see :meth:`Backend.create_unnamed`)."""

    #: The segment, mapped; its identity is known.
    attachment: Attachment

    @abc.abstractmethod
    def name(self) -> None:
        """Give the segment the name it was made for, atomically:
        FileExistsError if that name is taken, NotImplementedError where the
        storage turns out unable to (nothing changed, either way)."""

    @abc.abstractmethod
    def release(self) -> None:
        """Let go of what keeps the segment alive besides :attr:`attachment`
        (an unnamed one then lives as long as its mapping); safe to call twice."""


class Backend(abc.ABC):
    """A storage for shared memory segments.

    Subclasses set :attr:`name` (the scheme in ``scheme:identifier`` names)
    and implement the abstract methods. ``options`` are the backend-specific
    keyword arguments a user passed to ``SharedMemory(...)``; a backend
    rejects the ones it does not know in :meth:`check_options`.
    """

    #: The registered name, also the scheme of qualified names.
    name: ClassVar[str]
    #: Keyword options this backend accepts.
    option_names: ClassVar[frozenset[str]] = frozenset()
    #: Human description of the storage, for messages.
    storage: ClassVar[str] = "shared memory"
    #: Whether :meth:`generate` makes names nobody else will ever make (64
    #: random bits or more). Then the tracker needs no identity to destroy
    #: them safely, which saves a message per creation.
    unique_names: ClassVar[bool] = False

    def check_options(self, options: Mapping[str, Any]) -> None:
        """Raise TypeError naming any option this backend does not accept."""
        unknown = sorted(set(options) - self.option_names)
        if unknown:
            accepted = ", ".join(sorted(self.option_names)) or "none"
            raise TypeError(
                f"the {self.name!r} backend does not accept the option(s) "
                f"{', '.join(unknown)}; it accepts: {accepted}"
            )

    @abc.abstractmethod
    def parse(self, ident: str, options: Mapping[str, Any]) -> str:
        """Validate a user-given identifier and return its canonical form.

        The canonical form is what the other methods take; it must not depend
        on this process's settings (the mmap backend turns a bare file name
        into an absolute path here). Raise ValueError, naming what is wrong
        and how to fix it, for an identifier the storage cannot use.
        """

    @abc.abstractmethod
    def generate(self, options: Mapping[str, Any]) -> str:
        """Return a fresh, random, canonical identifier for a new segment."""

    @abc.abstractmethod
    def qualified(self, ident: str) -> str:
        """Return the self-describing name of canonical *ident*."""

    @abc.abstractmethod
    def create(self, ident: str, size: int, options: Mapping[str, Any]) -> Attachment:
        """Create the segment exclusively (mode 0600), reserve its space, map it.

        Raise FileExistsError if it exists; OSError(ENOSPC) if the storage
        cannot hold it, leaving nothing behind. The segment reads as zeros.
        """

    def create_from(
        self, ident: str, data: memoryview, options: Mapping[str, Any]
    ) -> Optional[str]:
        """Create the segment exclusively, holding a copy of *data* (its size
        is ``data.nbytes``), without keeping it mapped; return its identity.

        The sharing pickler's copies are made this way. This default maps
        the new segment and copies; backends with a file descriptor write
        through it instead, which is faster for a fresh segment.
        """
        attachment = self.create(ident, data.nbytes, options)
        try:
            assert attachment.buf is not None
            self._before_copy(ident, attachment)
            attachment.buf[: data.nbytes] = data
        except BaseException:
            try:
                self.unlink(ident)
            except OSError:
                pass
            raise
        finally:
            attachment.close()
        return attachment.identity

    def _before_copy(self, ident: str, attachment: Attachment) -> None:
        """Called by the default :meth:`create_from` between creating the
        segment and copying into it (to fault it in at once, say); by
        default nothing."""
        return None

    @abc.abstractmethod
    def attach(self, ident: str, options: Mapping[str, Any]) -> Attachment:
        """Map an existing segment. Never changes or removes anything."""

    def attach_private(self, ident: str, options: Mapping[str, Any]) -> Optional[Attachment]:
        """Map an existing segment privately (copy-on-write): writes through
        ``buf`` are this mapping's own, never the segment's; pages not yet
        written still show later changes to the segment. None where the
        storage cannot (the default; System V, hugetlbfs): receivers of
        private copies then copy the bytes instead."""
        return None

    @abc.abstractmethod
    def unlink(self, ident: str) -> None:
        """Remove the segment's name; mappings stay valid until closed."""

    @abc.abstractmethod
    def identity(self, ident: str) -> Optional[str]:
        """Return a string that tells this storage object from any later one
        of the same name, or None if *ident* is absent.

        It must hold something a new object cannot share with the old one
        (an inode number alone is reused at once on ext4): the built-in
        backends use what the kernel records at creation and never changes,
        or a random token written at creation. Attaching gives the same
        string for the same object (``Attachment.identity``).
        """

    def destroy(self, ident: str, identity: Optional[str]) -> bool:
        """Unlink *ident* if it is still the object with *identity*.

        Used by the tracker at cleanup time and by ``mpshm gc``, so that a
        name reused in the meantime, by anyone, is left alone. Without an
        identity (None) nothing is destroyed: a name is no proof. Returns
        True if removed.
        """
        if not self.proves(identity, self.identity(ident)):
            return False
        try:
            self.unlink(ident)
        except FileNotFoundError:
            return False
        return True

    def proves(self, recorded: Optional[str], current: Optional[str]) -> bool:
        """Whether *current* (what :meth:`identity` says now) is the object
        that *recorded* (what a registration recorded: an identity, or a
        claim of :meth:`claim_identity`) names. Nothing proves an absent
        object, nor anything with no record."""
        return recorded is not None and current is not None and recorded == current

    def listed_ident(self, ident: str) -> str:
        """The identifier under which :meth:`list` reports segment *ident*
        (canonical); by default *ident* itself."""
        return ident

    def sibling(self, ident: str) -> Optional[str]:
        """A fresh random identifier for a segment that :meth:`link` can then
        give the name *ident*, or None where the storage cannot (the default).

        Creating under a user's name goes through it when it can, so that
        the name is registered with its identity before it exists."""
        return None

    def link(self, ident: str, name: str) -> None:
        """Give existing segment *ident* the further name *name* (canonical),
        atomically; FileExistsError if *name* is taken, NotImplementedError
        where the storage turns out unable to (the caller then creates under
        *name* directly). Only called for an *ident* that :meth:`sibling` gave."""
        raise NotImplementedError(f"the {self.name!r} backend cannot link segments")

    def create_unnamed(
        self, ident: str, size: int, options: Mapping[str, Any]
    ) -> Optional[Unnamed]:
        """A new segment of *size* bytes, mapped, that has no name yet and
        that :meth:`Unnamed.name` can then give the name *ident*; None where
        the storage cannot (the default: creating under a user's name then
        goes through :meth:`sibling` and :meth:`link`).

        Until it is named, the segment lives only as long as this process
        holds it: a kill leaves nothing behind, and the name can be
        registered with the segment's identity (``attachment.identity``)
        before it exists."""
        return None

    def exists(self, ident: str) -> bool:
        """Whether something holds the name *ident* (a creation of it would
        fail with FileExistsError); by default, whether it has an identity."""
        return self.identity(ident) is not None

    def claim_identity(self, ident: str, pid: int) -> Optional[str]:
        """A record, made before segment *ident* exists, that :meth:`proves`
        accepts for the segment process *pid* then creates there, where the
        storage records each segment's creator; None elsewhere (the default)."""
        return None

    @abc.abstractmethod
    def list(self) -> list[SegmentInfo]:
        """List the segments that exist on this storage (readable by us)."""

    def import_spec(self) -> Optional[str]:
        """``"module:Class"`` for a backend defined outside mpshm (so that another
        process can import and register it), None for a built-in one."""
        kind = type(self)
        if kind.__module__.startswith("mpshm.backends."):
            return None
        return f"{kind.__module__}:{kind.__qualname__}"

    def available(self) -> Optional[str]:
        """Return None if the backend works here, else the reason it does not."""
        return None

    def where(self, options: Mapping[str, Any]) -> Optional[str]:
        """The directory of the filesystem that holds new segments made with
        *options* (for its free space: ``os.statvfs``), or None where the
        storage is not a filesystem (the default)."""
        return None

    def free_space(self, options: Mapping[str, Any]) -> Optional[int]:
        """Bytes new segments made with *options* could still take, or None
        where that cannot be told: by default the free space of the
        filesystem at :meth:`where` (one ``statvfs``)."""
        where = self.where(options)
        if where is None:
            return None
        try:
            st = os.statvfs(where)
        except OSError:
            return None
        return st.f_bavail * st.f_frsize if st.f_blocks else None

    def __repr__(self) -> str:
        return f"<mpshm backend {self.name!r}>"


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


#: How long attach waits for a creator to size a segment it just made.
SIZING_WAIT = 0.05


def sized_stat(fd: int) -> os.stat_result:
    """``fstat`` of a segment being attached, waiting briefly while it has size 0.

    Creation is open-then-size, so an attach racing a creator can find the
    object empty for a few microseconds; an object still empty after
    :data:`SIZING_WAIT` seconds is returned as it is (the caller reports it).
    """
    st = os.fstat(fd)
    deadline = None
    while st.st_size == 0:
        now = time.monotonic()
        if deadline is None:
            deadline = now + SIZING_WAIT
        elif now > deadline:
            break
        time.sleep(0.001)
        st = os.fstat(fd)
    return st
