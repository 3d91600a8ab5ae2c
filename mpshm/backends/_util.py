"""Helpers the storage backends share: names, sizes and messages, and
mapping a file descriptor without keeping it open.

Nothing here is part of the contract (that is :mod:`mpshm.backends._base`);
what only file-backed backends need is in :mod:`mpshm.backends._files`.
"""

from __future__ import annotations

import errno
import mmap
import os
import secrets
import sys
import time
from typing import Callable, Optional

__all__ = [
    "SIZING_WAIT",
    "TOKEN_BYTES",
    "format_size",
    "is_utf8",
    "map_shared",
    "no_space",
    "random_token",
    "release_view",
    "sized_stat",
]

#: Random bits in generated names: at least 64, so that nobody can guess one.
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


#: How long attach waits for a creator to size a segment it just made (a
#: creator descheduled on a loaded machine can take tens of milliseconds).
SIZING_WAIT = 1.0


def sized_stat(fd: int) -> os.stat_result:
    """``fstat`` of a segment being attached, waiting briefly while it has size 0.

    Creation is open-then-size, so an attach racing a creator can find the
    object empty for a few microseconds; an object still empty after
    :data:`SIZING_WAIT` seconds is returned as it is (the caller reports it).
    One whose name is gone meanwhile (destroyed before it was sized) raises
    FileNotFoundError: attaching it lost the race to its destruction.
    """
    st = os.fstat(fd)
    deadline = None
    while st.st_size == 0:
        if st.st_nlink == 0:
            raise FileNotFoundError(
                errno.ENOENT, "the segment was destroyed before its creator sized it")
        now = time.monotonic()
        if deadline is None:
            deadline = now + SIZING_WAIT
        elif now > deadline:
            break
        time.sleep(0.001)
        st = os.fstat(fd)
    return st
