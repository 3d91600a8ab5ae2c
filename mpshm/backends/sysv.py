"""System V shared memory (``shmget``/``shmat``) through ``sysv_ipc``.

Names are ``sysv:<key>``. Generated keys are random over the whole 32-bit
key range (retried on collision) and written as ``sysv:0x%08x``; a key may
also be given in decimal. Any other identifier (a user's own name such as
``"frames"``, or ``shm.name + "_suffix"``) maps to a key by this stable,
documented rule:

    key = first 4 bytes of SHA-256(identifier encoded as UTF-8), big-endian,
          read as an unsigned 32-bit number; 0 (IPC_PRIVATE) becomes 1.

The kernel zero-fills new SysV segments. ``sysv_ipc`` would then overwrite a
new segment with spaces (a write of the whole segment); mpshm avoids that by
making the segment with libc's ``shmget`` itself (through ctypes) and only
attaching it with ``sysv_ipc``. Where libc cannot be loaded, it creates the
segment read-only with ``sysv_ipc`` (which only fills writable attachments),
then grants itself write permission and re-attaches.

A segment's identity is ``<shmid>:<creator pid>:<creator uid>:<size>``: what
the kernel records at creation and never changes (a later segment may get
the same id, but not from the same process of the same user with the same
size, short of the pid being reused too).
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import os
import re
import sys
from typing import Any, Callable, Mapping, NamedTuple, Optional

import sysv_ipc

from .. import _sysinfo
from . import _huge
from ._base import Attachment, Backend, SegmentInfo
from ._util import format_size, is_utf8, no_space, release_view

__all__ = ["SysVBackend", "key_for"]

PROC_SHM = "/proc/sysvipc/shm"
#: A record made before a segment exists (see :meth:`SysVBackend.claim_identity`):
#: ``claim:<creator pid>:<creator uid>``.
_CLAIM = "claim:"
_NUMBER = re.compile(r"-?[0-9]+|0[xX][0-9a-fA-F]+")
#: From this many bytes on, a limit (kernel.shmmax, shmall) is no limit: the
#: kernel's defaults are near 2**64.
_NO_LIMIT = 1 << 62
_REMEDY = (
    "Raise the kernel limits (sysctl kernel.shmmax / kernel.shmall / kernel.shmmni), "
    "unlink unused segments (ipcs -m), or use the posix or mmap backend."
)


def key_for(ident: str) -> int:
    """Return the SysV key (unsigned 32-bit) that identifier *ident* names."""
    if _NUMBER.fullmatch(ident):
        value = int(ident, 16) if ident[:2].lower() == "0x" else int(ident, 10)
        if -(2**31) <= value < 2**32:
            if value == 0:
                raise ValueError(
                    "invalid System V name 'sysv:0': key 0 is IPC_PRIVATE, which cannot "
                    "be attached by name. Use another key, or no name to get a random one."
                )
            return value & 0xFFFFFFFF
        raise ValueError(
            f"invalid System V key {ident!r}: keys are 32-bit numbers "
            "(-2147483648 to 4294967295, or 0x1 to 0xffffffff)"
        )
    digest = hashlib.sha256(ident.encode("utf-8", "surrogatepass")).digest()
    return int.from_bytes(digest[:4], "big") or 1


def _signed(key: int) -> int:
    return key - 2**32 if key >= 2**31 else key


class _ProcEntry(NamedTuple):
    key: int
    shmid: int
    mode: int
    size: int
    cpid: int
    nattch: int
    uid: int
    ctime: int
    gid: int = 0
    cuid: int = 0
    cgid: int = 0


def _proc_segments() -> Optional[list[_ProcEntry]]:
    """Parse /proc/sysvipc/shm, or return None where it does not exist."""
    try:
        with open(PROC_SHM) as f:
            lines = f.read().splitlines()[1:]
    except OSError:
        return None
    entries = []
    for line in lines:
        fields = line.split()
        if len(fields) < 14:
            continue
        entries.append(
            _ProcEntry(
                key=int(fields[0]) & 0xFFFFFFFF,
                shmid=int(fields[1]),
                mode=int(fields[2], 8),
                size=int(fields[3]),
                cpid=int(fields[4]),
                nattch=int(fields[6]),
                uid=int(fields[7]),
                ctime=int(fields[13]),
                gid=int(fields[8]),
                cuid=int(fields[9]),
                cgid=int(fields[10]),
            )
        )
    return entries


def _meminfo(field: str) -> Optional[int]:
    """A /proc/meminfo figure, in bytes."""
    return _sysinfo.meminfo().get(field)


class _ShmidDs(ctypes.Structure):
    """``struct shmid_ds`` of 64-bit Linux with glibc (x86-64 and arm64)."""

    _fields_ = [
        ("key", ctypes.c_int), ("uid", ctypes.c_uint), ("gid", ctypes.c_uint),
        ("cuid", ctypes.c_uint), ("cgid", ctypes.c_uint), ("mode", ctypes.c_uint),
        ("seq", ctypes.c_ushort), ("pad", ctypes.c_ushort),
        ("reserved1", ctypes.c_ulong), ("reserved2", ctypes.c_ulong),
        ("segsz", ctypes.c_size_t), ("atime", ctypes.c_long), ("dtime", ctypes.c_long),
        ("ctime", ctypes.c_long), ("cpid", ctypes.c_int), ("lpid", ctypes.c_int),
        ("nattch", ctypes.c_ulong), ("reserved4", ctypes.c_ulong), ("reserved5", ctypes.c_ulong),
    ]


#: Whether :class:`_ShmidDs` is this machine's layout; elsewhere
#: /proc/sysvipc/shm tells the same (slower).
_STAT_LAYOUT = (
    sys.platform.startswith("linux") and os.uname().machine in ("x86_64", "aarch64")
    and ctypes.sizeof(_ShmidDs) == 112
)


class _Stat(NamedTuple):
    """What the kernel records of a segment (``IPC_STAT``)."""

    key: int  # unsigned; 0 once removed (while still attached somewhere)
    uid: int
    gid: int
    cuid: int
    cgid: int
    mode: int  # permission bits only
    size: int
    cpid: int

    def identity(self, shmid: int) -> str:
        """The segment's identity (see the module's docstring)."""
        return _identity(shmid, self.cpid, self.cuid, self.size)


def _identity(shmid: int, cpid: int, cuid: int, size: int) -> str:
    return f"{shmid}:{cpid}:{cuid}:{size}"


class _Libc:
    """libc's ``shmget`` and ``shmctl`` through ctypes (one system call each,
    where sysv_ipc needs an attach to find or remove a segment by key, and
    an ``IPC_STAT`` per field it reports)."""

    IPC_RMID = 0
    IPC_STAT = 2

    def __init__(self) -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        self.shmget: Callable[..., int] = libc.shmget
        libc.shmget.argtypes = [ctypes.c_int, ctypes.c_size_t, ctypes.c_int]
        libc.shmget.restype = ctypes.c_int
        self.shmctl: Callable[..., int] = libc.shmctl
        libc.shmctl.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_void_p]
        libc.shmctl.restype = ctypes.c_int

    @staticmethod
    def errno() -> int:
        """errno of this thread's last call."""
        return ctypes.get_errno() or errno.EINVAL


def _load_libc() -> Optional[_Libc]:
    try:
        return _Libc()
    except (OSError, AttributeError):  # pragma: no cover (no such libc)
        return None


_libc = _load_libc()


def _stat(shmid: int) -> Optional[_Stat]:
    """What the kernel records of segment *shmid*, None if there is none:
    one ``IPC_STAT``, else (no permission to read it, or another layout of
    ``struct shmid_ds``) /proc/sysvipc/shm."""
    if _libc is not None and _STAT_LAYOUT:
        ds = _ShmidDs()
        if _libc.shmctl(shmid, _Libc.IPC_STAT, ctypes.byref(ds)) == 0:
            return _Stat(key=ds.key & 0xFFFFFFFF, uid=ds.uid, gid=ds.gid, cuid=ds.cuid,
                         cgid=ds.cgid, mode=ds.mode & 0o777, size=ds.segsz, cpid=ds.cpid)
        if _libc.errno() in (errno.EINVAL, errno.EIDRM):
            return None
    for e in _proc_segments() or []:
        if e.shmid == shmid:
            return _Stat(key=e.key, uid=e.uid, gid=e.gid, cuid=e.cuid, cgid=e.cgid,
                         mode=e.mode & 0o777, size=e.size, cpid=e.cpid)
    return None


class _Segment(sysv_ipc.SharedMemory):  # type: ignore[misc]
    """A sysv_ipc attachment that detaches itself when garbage-collected.

    ``memoryview(segment)`` keeps the segment object alive, so the memory
    stays attached for exactly as long as any view of it exists.
    """

    def __del__(self) -> None:
        try:
            self.detach()
        except Exception:
            pass


class SysVAttachment(Attachment):
    """A System V segment attached to this process.

    *found* is what an attach found of the segment (its owner, mode and
    creator, for ``owner_check=``); None for one this process created.
    """

    def __init__(self, segment: _Segment, found: Optional[_Stat] = None) -> None:
        self._segment: Optional[_Segment] = segment
        self.buf = memoryview(segment)  # sized by the kernel's shm_segsz
        self.size = len(self.buf)
        shmid = segment.id
        if found is None:  # created here, now: the kernel recorded this process
            self.identity = _identity(shmid, os.getpid(), os.geteuid(), self.size)
        else:
            self.identity = found.identity(shmid)
            self.uid, self.gid, self.mode = found.uid, found.gid, found.mode
            self.creator_uid, self.creator_gid = found.cuid, found.cgid

    def close(self) -> None:
        buf, self.buf = self.buf, None
        self._segment = None  # detached by _Segment.__del__ once no view is left
        if buf is not None:
            release_view(buf)


def _advise_huge(segment: _Segment, size: int) -> None:
    """``huge_pages=``: ask for transparent huge pages on this attachment where
    ``shmem_enabled`` is ``advise`` (``always``/``within_size`` need nothing)."""
    if _huge.shmem_thp() == "advise":
        _huge.madvise(segment.address, size, _huge.MADV_HUGEPAGE)


class SysVBackend(Backend):
    """System V shared memory segments."""

    name = "sysv"
    option_names = _huge.OPTIONS
    checked_flags = _huge.OPTIONS
    storage = "System V shared memory"

    # -- names

    def parse(self, ident: str, options: Mapping[str, Any]) -> str:
        self.check_options(options)
        problem = None
        if not ident:
            problem = "it is empty"
        elif "\0" in ident:
            problem = "it contains a NUL character"
        elif not is_utf8(ident):  # (the tracker could not be told about it)
            problem = "it contains a lone surrogate, which is not UTF-8 text"
        elif len(ident.encode("utf-8", "surrogatepass")) > 255:
            problem = "it is longer than 255 bytes"
        if problem:
            raise ValueError(
                f"invalid System V name {ident!r}: {problem}. Use a key "
                "('sysv:0x1234abcd') or a short name ('frames')."
            )
        key_for(ident)  # raises for a number outside the key range
        return ident

    def generate(self, options: Mapping[str, Any]) -> str:
        while True:
            key = int.from_bytes(os.urandom(4), "big")
            if key:
                return f"0x{key:08x}"

    def qualified(self, ident: str) -> str:
        return f"{self.name}:{ident}"

    def listed_ident(self, ident: str) -> str:
        return f"0x{key_for(ident):08x}"  # a name of the user's own is listed by its key

    # -- creating

    def _shmget_new(self, key: int, size: int, huge: bool) -> int:
        """A new segment's id (libc's shmget, mode 0600); with *huge*, made with
        SHM_HUGETLB when enough huge pages are free, else with normal pages."""
        assert _libc is not None
        flags = sysv_ipc.IPC_CREX | 0o600
        if huge:
            page, free = _huge.hugetlb_pages()
            if page and free * page >= size:
                shmid = _libc.shmget(key, size, flags | sysv_ipc.SHM_HUGETLB)
                if shmid >= 0:
                    return shmid
                if _libc.errno() == errno.EEXIST:
                    raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST))
        shmid = _libc.shmget(key, size, flags)
        if shmid < 0:
            error = _libc.errno()
            raise OSError(error, os.strerror(error))
        return shmid

    def _no_space(self, ident: str, size: int, refusal: BaseException) -> OSError:
        """The ENOSPC error for a refused creation, with the limit that applies."""
        entries = _proc_segments()
        shmmni = _sysinfo.read_int("/proc/sys/kernel/shmmni")
        if (entries is not None and shmmni is not None and len(entries) >= shmmni
                and getattr(refusal, "errno", None) == errno.ENOSPC):
            return OSError(
                errno.ENOSPC,
                "Cannot create another System V shared memory segment: the limit on "
                f"their number is reached (kernel.shmmni = {shmmni}, and {len(entries)} "
                "segments exist). Unlink unused segments (ipcs -m), raise kernel.shmmni, "
                "or use the posix or mmap backend.",
                self.qualified(ident),
            )
        shmmax = _sysinfo.read_int("/proc/sys/kernel/shmmax")
        shmall = _sysinfo.read_int("/proc/sys/kernel/shmall")
        page = os.sysconf("SC_PAGE_SIZE")
        free: Optional[int] = None
        if shmall is not None and shmall * page < _NO_LIMIT:
            used = sum(-(-e.size // page) for e in (entries or []))
            free = max(0, shmall - used) * page
        if shmmax is not None and shmmax < _NO_LIMIT:
            free = shmmax if free is None else min(free, shmmax)
        limits = f"kernel.shmmax = {shmmax}, kernel.shmall = {shmall} pages"
        if getattr(refusal, "errno", None) == errno.ENOMEM:
            # The kernel would not commit memory for it: what it has is the limit.
            available = _meminfo("MemAvailable")
            free = available if free is None or available is None else min(free, available)
            limits += (", the kernel would not commit that much memory (vm.overcommit_memory"
                       f" = {_sysinfo.read_int('/proc/sys/vm/overcommit_memory')})")
        return no_space(f"{self.storage} ({limits}; {refusal})", size, free, _REMEDY)

    def _no_memory(self, ident: str, size: Optional[int]) -> OSError:
        """The ENOMEM error for a segment that could not be made or mapped
        for want of memory or address space (what sysv_ipc reports as
        MemoryError), with the other backends' errno."""
        what = f" of {format_size(size)}" if size is not None else ""
        return OSError(
            errno.ENOMEM,
            f"Not enough memory or address space for the System V segment{what} (the "
            "process's address space limit, ulimit -v, or the memory the system commits)",
            self.qualified(ident),
        )

    def _refused(self, ident: str, size: int, exc: BaseException) -> BaseException:
        """The exception for a creation that shmget refused with *exc*."""
        if isinstance(exc, sysv_ipc.ExistentialError) or (
                isinstance(exc, OSError) and exc.errno == errno.EEXIST):
            return FileExistsError(
                errno.EEXIST,
                "A System V shared memory segment with that key exists",
                self.qualified(ident),
            )
        if isinstance(exc, sysv_ipc.PermissionsError) or (
                isinstance(exc, OSError) and exc.errno in (errno.EACCES, errno.EPERM)):
            return PermissionError(errno.EACCES, str(exc), self.qualified(ident))
        # sysv_ipc reports EINVAL (size above kernel.shmmax) as ValueError,
        # ENOMEM as MemoryError and ENOSPC (kernel.shmall, shmmni) as OSError.
        # shmget's ENOMEM (libc's, an OSError) is the kernel refusing to
        # commit memory for the segment: like a full tmpfs, no space for it.
        if isinstance(exc, MemoryError):
            return self._no_memory(ident, size)
        if isinstance(exc, OSError) and exc.errno not in (
                errno.ENOSPC, errno.ENOMEM, errno.EINVAL, None):
            return exc
        return self._no_space(ident, size, exc)

    def create(self, ident: str, size: int, options: Mapping[str, Any]) -> Attachment:
        if not 0 < size <= sys.maxsize:  # sysv_ipc would wrap it modulo 2**64
            raise ValueError(f"invalid System V segment size {size}")
        key = _signed(key_for(ident))
        huge = _huge.wants_huge(options, size)
        if _libc is None:
            segment = self._create_readonly(ident, key, size)
            shmid = segment.id
        else:
            try:
                shmid = self._shmget_new(key, size, huge)
            except OSError as exc:
                raise self._refused(ident, size, exc) from None
            segment = None
        try:
            if segment is None:
                # Attached by key (sysv_ipc has no attach by id): a segment that
                # replaced ours meanwhile is told apart by its id.
                try:
                    segment = _Segment(key, 0, mode=0o600)
                except MemoryError:
                    raise self._no_memory(ident, size) from None
                if segment.id != shmid:
                    segment.detach()
                    raise FileNotFoundError(
                        errno.ENOENT, "The new System V segment was removed by someone else",
                        self.qualified(ident))
            attachment = SysVAttachment(segment)
            if huge:
                _advise_huge(segment, size)
        except BaseException:
            try:
                sysv_ipc.remove_shared_memory(shmid)
            except sysv_ipc.Error:
                pass
            raise
        return attachment

    #: From this size on, :meth:`create_from` faults the new segment in with
    #: one ``madvise(MADV_POPULATE_WRITE)`` before copying.
    _POPULATE_FROM = 64 << 10

    def before_copy(self, ident: str, attachment: Attachment) -> None:
        """A System V segment has no file descriptor to write through, and
        copying into its fresh mapping takes a page fault per page: asking
        the kernel to fault the whole mapping in first (Linux 5.14+) makes
        :meth:`create_from` copy a large array about 1.6x as fast. Where it
        cannot, the plain copy; where memory is short, a clear error."""
        if attachment.size < self._POPULATE_FROM or attachment.buf is None:
            return
        error = _huge.madvise(_huge.address_of(attachment.buf), attachment.size,
                              _huge.MADV_POPULATE_WRITE)
        if error == errno.ENOMEM:  # the copy would meet the OOM killer
            raise OSError(errno.ENOMEM, "Not enough memory to fill a new System V segment "
                          f"of {format_size(attachment.size)}", self.qualified(ident))

    def _create_readonly(self, ident: str, key: int, size: int) -> _Segment:
        """Create with sysv_ipc alone: read-only, so that it does not fill the
        segment with spaces, then writable (the way without libc's shmget)."""
        try:
            segment = _Segment(key, sysv_ipc.IPC_CREX, mode=0o400, size=size)
        except (sysv_ipc.Error, ValueError, MemoryError, OSError) as exc:
            raise self._refused(ident, size, exc) from None
        try:
            segment.mode = 0o600
            segment.detach()
            segment.attach()
        except BaseException:
            try:
                segment.remove()
            except sysv_ipc.Error:
                pass
            raise
        return segment

    # -- attaching

    def _open(self, ident: str, writable: bool) -> _Segment:
        key = _signed(key_for(ident))
        denied: Optional[sysv_ipc.PermissionsError] = None
        # Races with another process, each settled by looking the key up again:
        # a segment destroyed between shmget and shmat makes shmat fail with
        # EINVAL (ValueError from sysv_ipc) or EIDRM, and a segment being
        # created is read-only to its owner for a moment (see create()).
        for _ in range(3):
            try:
                return _Segment(key, 0, mode=0o600 if writable else 0o400)
            except sysv_ipc.ExistentialError:
                break
            except ValueError:
                continue
            except MemoryError:
                found = self._find(ident)
                raise self._no_memory(ident, found[1].size if found else None) from None
            except sysv_ipc.PermissionsError as exc:
                denied = exc
            except OSError as exc:
                if exc.errno != errno.EIDRM:
                    raise
        else:
            if denied is not None:
                # sysv_ipc's own text leaves a "%o" unformatted: say it here.
                access = "read-write" if writable else "read"
                raise PermissionError(
                    errno.EACCES,
                    f"No permission to attach this System V segment {access} (its owner or "
                    "mode does not allow you; mpshm creates segments 0600, for their owner only)",
                    self.qualified(ident),
                )
        raise FileNotFoundError(
            errno.ENOENT, "No such System V shared memory segment", self.qualified(ident)
        )

    def attach(self, ident: str, options: Mapping[str, Any]) -> Attachment:
        segment = self._open(ident, writable=True)
        # One more IPC_STAT: the owner check needs the segment's owner, creator
        # and mode, and its identity the creator and size; shmget gives none.
        found = _stat(segment.id)
        if found is None:  # (attached, so it exists; without /proc and ctypes, ask sysv_ipc)
            found = _Stat(key=key_for(ident), uid=segment.uid, gid=segment.gid,
                          cuid=segment.cuid, cgid=segment.cgid, mode=segment.mode & 0o777,
                          size=segment.size, cpid=segment.creator_pid)
        attachment = SysVAttachment(segment, found)
        if _huge.wants_huge(options, attachment.size):
            _advise_huge(segment, attachment.size)
        if _huge.flag(options, "prefault"):
            _huge.madvise(segment.address, attachment.size, _huge.MADV_POPULATE_READ)
        return attachment

    # -- removing, and proving what a name holds

    def unlink(self, ident: str) -> None:
        if _libc is not None:
            # shmget with no flags finds a segment whatever its mode; IPC_RMID
            # then checks that we own it. Two system calls, no attach.
            shmid = _libc.shmget(_signed(key_for(ident)), 0, 0)
            if shmid >= 0 and _libc.shmctl(shmid, _Libc.IPC_RMID, None) == 0:
                return
            error = _libc.errno()
            if error in (errno.ENOENT, errno.EIDRM, errno.EINVAL):
                raise FileNotFoundError(
                    errno.ENOENT, "No such System V shared memory segment", self.qualified(ident)
                )
            if error in (errno.EPERM, errno.EACCES):
                raise self._not_yours(ident)
            raise OSError(error, os.strerror(error), self.qualified(ident))
        segment = self._open(ident, writable=False)
        try:
            segment.remove()
        except sysv_ipc.PermissionsError:
            raise self._not_yours(ident) from None
        finally:
            segment.detach()

    def _not_yours(self, ident: str) -> PermissionError:
        return PermissionError(
            errno.EPERM, "Only the owner or the creator of a System V shared memory segment "
            "(or root) may remove it", self.qualified(ident))

    def _find(self, ident: str) -> Optional[tuple[int, _Stat]]:
        """The id of segment *ident* and what the kernel records of it, or None."""
        key = key_for(ident)
        if _libc is not None:  # one shmget (it needs no permission), one IPC_STAT
            shmid = _libc.shmget(_signed(key), 0, 0)
            if shmid >= 0:
                found = _stat(shmid)
                return None if found is None or found.key != key else (shmid, found)
            if _libc.errno() == errno.ENOENT:
                return None
        entries = _proc_segments()
        if entries is not None:
            for e in entries:
                if e.key == key:
                    return e.shmid, _Stat(key=e.key, uid=e.uid, gid=e.gid, cuid=e.cuid,
                                          cgid=e.cgid, mode=e.mode & 0o777, size=e.size,
                                          cpid=e.cpid)
            return None
        try:
            segment = self._open(ident, writable=False)
        except (FileNotFoundError, PermissionError):
            return None
        try:
            return segment.id, _Stat(key=key, uid=segment.uid, gid=segment.gid,
                                     cuid=segment.cuid, cgid=segment.cgid,
                                     mode=segment.mode & 0o777, size=segment.size,
                                     cpid=segment.creator_pid)
        finally:
            segment.detach()

    def identity(self, ident: str) -> Optional[str]:
        found = self._find(ident)
        return None if found is None else found[1].identity(found[0])

    def claim_identity(self, ident: str, pid: int) -> Optional[str]:
        # The kernel records who created a segment (cpid, cuid): a claim names
        # them before the segment exists.
        return f"{_CLAIM}{pid}:{os.geteuid()}"

    def proves(self, recorded: Optional[str], current: Optional[str]) -> bool:
        if recorded is None or current is None or not recorded.startswith(_CLAIM):
            return super().proves(recorded, current)
        claimed = recorded[len(_CLAIM):].split(":")
        found = current.split(":")
        return len(claimed) == 2 and len(found) == 4 and found[1:3] == claimed

    def destroy(self, ident: str, identity: Optional[str]) -> bool:
        """Remove segment *ident* if it is still the one with *identity* (see
        :meth:`Backend.destroy`): same key, id, creator pid and size, created
        by this user. Removed by id, so that a segment made meanwhile under
        the same key is never the one removed."""
        if identity is not None and identity.startswith(_CLAIM):
            current = self.identity(ident)
            if current is None or not self.proves(identity, current):
                return False
            identity = current
        if identity is None:
            return False
        try:
            shmid = int(identity.split(":", 1)[0])
        except ValueError:
            return False
        found = _stat(shmid)
        if (found is None or found.key != key_for(ident) or found.identity(shmid) != identity
                or found.cuid != os.geteuid()):
            return False
        if _libc is not None:
            return _libc.shmctl(shmid, _Libc.IPC_RMID, None) == 0
        try:
            sysv_ipc.remove_shared_memory(shmid)
        except sysv_ipc.Error:
            return False
        return True

    # -- what exists, and where

    def list(self) -> list[SegmentInfo]:
        found = []
        for e in _proc_segments() or []:
            if e.key == 0:  # IPC_PRIVATE, or already removed: not nameable
                continue
            found.append(
                SegmentInfo(
                    name=f"{self.name}:0x{e.key:08x}",
                    backend=self.name,
                    size=e.size,
                    uid=e.uid,
                    mode=e.mode & 0o777,
                    creator_pid=e.cpid,
                    attached=e.nattch,
                    ctime=float(e.ctime),
                    extra={"shmid": e.shmid, "creator_uid": e.cuid,
                           "identity": _identity(e.shmid, e.cpid, e.cuid, e.size)},
                )
            )
        return found

    def free_space(self, options: Mapping[str, Any]) -> Optional[int]:
        """Pages kernel.shmall still allows (segments marked for removal but
        still attached count until their last detach), or None where it is
        no limit."""
        shmall = _sysinfo.read_int("/proc/sys/kernel/shmall")
        page = os.sysconf("SC_PAGE_SIZE")
        if shmall is None or shmall * page >= _NO_LIMIT:
            return None
        entries = _proc_segments()
        if entries is None:
            return None
        return max(0, shmall - sum(-(-e.size // page) for e in entries)) * page

    def available(self) -> Optional[str]:
        if not sys.platform.startswith(("linux", "freebsd", "darwin")):
            return f"System V shared memory is not supported on {sys.platform}"
        shmmax = _sysinfo.read_int("/proc/sys/kernel/shmmax")
        if shmmax is not None and shmmax < 4096:
            return f"kernel.shmmax is {format_size(shmmax)}: too small for any segment"
        return None
