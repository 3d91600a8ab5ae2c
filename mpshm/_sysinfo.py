"""Facts about this machine and its processes, read one way for everyone
who needs them, so that what ``mpshm doctor`` reports is what the backends
act on and the tracker and ``mpshm gc`` agree on who is alive.

- /proc and /sys readers: :func:`read_text`, :func:`read_int`,
  :func:`meminfo`, :func:`mounts`, :func:`mount_of`. Each takes the root of
  /proc where it reads from it (tests point it at a fake one) and returns
  None, or an empty result, where a file is missing or unreadable.
- Processes: :func:`start_time`, :func:`started_at`, :func:`alive`,
  :func:`carriers`.
- This machine as handles record it: :func:`machine`, :func:`check_machine`.
- Memory: :func:`buffer_address`.

Hand-written rather than psutil: mpshm needs five small facts, and what it
needs most (a process's real and effective uid together, and the tracker's
address in the environments of only this user's processes) psutil would
give only through several calls per process.
"""

from __future__ import annotations

import ctypes
import os
import re
import socket
from dataclasses import dataclass
from typing import Any, Iterable, Optional, Sequence

from .errors import HandleError

__all__ = [
    "Mount", "alive", "buffer_address", "carriers", "check_machine", "machine", "meminfo",
    "mount_of", "mounts", "read_int", "read_text", "selected", "start_time", "started_at",
]


def read_text(path: str) -> Optional[str]:
    """The text of *path*, or None."""
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.read()
    except OSError:
        return None


def read_int(path: str) -> Optional[int]:
    """The integer *path* starts with (a sysctl, say), or None."""
    text = read_text(path)
    if text is None:
        return None
    try:
        return int(text.split()[0])
    except (ValueError, IndexError):
        return None


def selected(text: str) -> Optional[str]:
    """The value a kernel choice list selects: ``always [advise] never`` gives
    ``advise``; a list of one word, that word; None if nothing is selected."""
    match = re.search(r"\[([^\]]+)\]", text)
    if match:
        return match.group(1)
    words = text.split()
    return words[0] if len(words) == 1 else None


def meminfo(proc: str = "/proc") -> dict[str, int]:
    """``/proc/meminfo`` as numbers: sizes in bytes (its ``kB`` lines),
    counts (``HugePages_Free``) as they are."""
    values: dict[str, int] = {}
    for line in (read_text(os.path.join(proc, "meminfo")) or "").splitlines():
        name, _, rest = line.partition(":")
        parts = rest.split()
        if not parts:
            continue
        try:
            number = int(parts[0])
        except ValueError:
            continue
        values[name.strip()] = number * 1024 if parts[1:2] == ["kB"] else number
    return values


@dataclass(frozen=True)
class Mount:
    """One line of ``/proc/mounts``."""

    device: str
    point: str
    fstype: str
    options: tuple[str, ...]

    def option(self, key: str) -> Optional[str]:
        """The value of mount option *key* (``huge``, ``size``), or None."""
        for option in self.options:
            name, _, value = option.partition("=")
            if name == key:
                return value
        return None


def _unescape(field: str) -> str:
    # /proc/mounts writes space, tab, newline and backslash as octal escapes.
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def mounts(proc: str = "/proc") -> list[Mount]:
    """This process's mounts, in the kernel's order."""
    found = []
    for line in (read_text(os.path.join(proc, "mounts")) or "").splitlines():
        fields = line.split()
        if len(fields) >= 4:
            found.append(Mount(_unescape(fields[0]), _unescape(fields[1]), fields[2],
                               tuple(fields[3].split(","))))
    return found


def mount_of(path: str, among: Sequence[Mount]) -> Optional[Mount]:
    """The mount of *among* that holds *path* (already resolved): the
    longest mount point above it, the last listed (the topmost) of several
    mounts on the same point."""
    best: Optional[Mount] = None
    best_length = -1
    for mount in among:
        point = mount.point.rstrip("/") or "/"
        inside = point == "/" or path == point or path.startswith(point + "/")
        if inside and len(point) >= best_length:
            best, best_length = mount, len(point)
    return best


# --------------------------------------------------------------------------
# Processes

def start_time(pid: int) -> Optional[str]:
    """Start time of *pid* (to tell it from a later process with the same
    pid), or None if it is gone or a zombie. Without /proc: "?" if alive."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except FileNotFoundError:
        return None
    except OSError:
        data = b""
    if data:
        fields = data[data.rindex(b")") + 2 :].split()
        if fields[0] in (b"Z", b"X"):
            return None
        return fields[19].decode()
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        pass
    return "?"


def _uids(pid: int) -> Optional[tuple[int, int]]:
    """(real, effective) uid of *pid*, from the ``Uid:`` line of
    /proc/<pid>/status; None if unknown."""
    try:
        with open(f"/proc/{pid}/status", "rb") as f:
            for line in f:
                if line.startswith(b"Uid:"):
                    fields = line.split()
                    return int(fields[1]), int(fields[2])
    except (OSError, ValueError, IndexError):
        pass
    return None


def carriers(
    needles: Iterable[bytes], uid: Optional[int] = None
) -> dict[bytes, dict[int, str]]:
    """For each of *needles* (``MPSHM_TRACKER=<address>``), the living processes
    whose environment carries it, as pid -> start time (one pass over /proc).

    Only processes that run as user *uid* (default: this process's effective
    uid) count, real and effective uid both: anyone can put a tracker's
    address in the environment of a process of their own (the addresses are
    in /proc/net/unix), and root can read every process's environment, so
    without this another user could keep a tracker waiting, and ``mpshm gc``
    holding back, for as long as they like. The uids come from
    /proc/<pid>/status, not from the owner of /proc/<pid>: that is root for
    any process that made itself non-dumpable (prctl), and it is only the
    effective uid (a set-user-ID program started by someone else has ours).
    """
    wanted = set(needles)
    found: dict[bytes, dict[int, str]] = {}
    me = os.getpid()
    user = os.geteuid() if uid is None else uid
    try:
        pids = [int(p) for p in os.listdir("/proc") if p.isdigit()]
    except OSError:
        return found
    for pid in pids:
        if pid == me:
            continue
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                env = set(f.read().split(b"\0"))
        except OSError:
            continue
        matched = wanted & env
        if not matched or _uids(pid) != (user, user):
            continue
        start = start_time(pid)
        if start is None:
            continue
        for needle in matched:
            found.setdefault(needle, {})[pid] = start
    return found


def alive(pid: Optional[int], started_by: Optional[float] = None) -> Optional[bool]:
    """Whether process *pid* is alive (not a zombie) and, given *started_by*
    (seconds since the epoch), started no later than that (give or take 2 s):
    a later process with the same pid is not the one meant. None for no pid."""
    if pid is None or pid <= 0:
        return None
    if start_time(pid) is None:
        return False
    if started_by is not None:
        started = started_at(pid)
        if started is not None and started > started_by + 2.0:
            return False
    return True


def started_at(pid: int) -> Optional[float]:
    """When *pid* started, in seconds since the epoch (None if it is gone, a
    zombie, or /proc does not say)."""
    start = start_time(pid)
    if start is None or not start.isdigit():
        return None
    try:
        with open("/proc/stat", "rb") as f:
            boot = next(int(line.split()[1]) for line in f if line.startswith(b"btime "))
    except (OSError, StopIteration, ValueError):
        return None
    return boot + int(start) / os.sysconf("SC_CLK_TCK")


# --------------------------------------------------------------------------
# This machine, as handles record it

def _boot_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return ""


_MACHINE = (socket.gethostname(), _boot_id())


def machine() -> tuple[str, str]:
    """This machine as handles record it: ``(host name, boot id)``.

    The boot id (Linux) tells two machines of the same name apart, and a
    machine from itself before a reboot, when no segment survives.
    """
    return _MACHINE


def check_machine(made_on: Optional[tuple[str, str]], name: str) -> None:
    """Raise :class:`HandleError` if a handle of segment *name* was made elsewhere."""
    if made_on is None or made_on == _MACHINE or (
        isinstance(made_on, (tuple, list)) and tuple(made_on) == _MACHINE
    ):
        return
    if not (isinstance(made_on, (tuple, list)) and len(made_on) == 2
            and all(isinstance(part, str) for part in made_on)):
        raise HandleError(
            f"invalid shared memory handle of {name!r}: its machine is {made_on!r}, "
            "not (host name, boot id)"
        )
    there, here = made_on[0], _MACHINE[0]
    if there == here:
        there, here = f"{there} (boot {made_on[1]})", f"{here} (boot {_MACHINE[1]})"
    raise HandleError(
        f"the shared memory segment {name!r} lives on machine {there!r}, but its "
        f"handle was unpickled on {here!r}: shared memory cannot cross machines. "
        "Send the data itself (pickle it without mpshm, or copy the array), or run "
        f"this code on {made_on[0]!r}."
    )


# --------------------------------------------------------------------------
# Memory

class _Py_buffer(ctypes.Structure):
    _fields_ = [
        ("buf", ctypes.c_void_p),
        ("obj", ctypes.c_void_p),
        ("len", ctypes.c_ssize_t),
        ("itemsize", ctypes.c_ssize_t),
        ("readonly", ctypes.c_int),
        ("ndim", ctypes.c_int),
        ("format", ctypes.c_char_p),
        ("shape", ctypes.c_void_p),
        ("strides", ctypes.c_void_p),
        ("suboffsets", ctypes.c_void_p),
        ("internal", ctypes.c_void_p),
    ]


_get_buffer = ctypes.pythonapi.PyObject_GetBuffer
_get_buffer.argtypes = [ctypes.py_object, ctypes.POINTER(_Py_buffer), ctypes.c_int]
_release_buffer = ctypes.pythonapi.PyBuffer_Release
_release_buffer.argtypes = [ctypes.POINTER(_Py_buffer)]
_PyBUF_FULL_RO = 0x0100 | 0x0010 | 0x0008 | 0x0004  # strides, format, nd (read-only ok)


def buffer_address(obj: Any) -> int:
    """Address of the first byte of *obj*'s buffer (read-only buffers too)."""
    view = _Py_buffer()
    if _get_buffer(obj, ctypes.byref(view), _PyBUF_FULL_RO) != 0:  # pragma: no cover
        raise BufferError("cannot get the buffer's address")
    try:
        return int(view.buf or 0)
    finally:
        _release_buffer(ctypes.byref(view))
