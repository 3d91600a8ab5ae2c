"""Trackers' journals: what each tracker holds, on disk, for ``mpshm list`` and ``mpshm gc``.

A tracker (see :mod:`mpshm.tracking`) keeps its registry in memory and
destroys what is left when its program is over. When the tracker itself is
killed along with the program (``kill -9 -1``, a container stopped, the OOM
killer), that registry is gone, and with it the knowledge of which segments
were meant to be destroyed. So each tracker also appends what it holds to a
journal file of its own, and removes the file when it has cleaned up. A
journal left behind names exactly the tracked segments of a program whose
cleanup did not run; ``mpshm gc`` reads it.

The journals live in the *state directory* (see :func:`state_dir`), a
private directory nobody else can plant files in: mode 0700, owned by this
user, never a symbolic link. One file per tracker,
``tracker-<pid>-<token>.log``, mode 0600, one JSON object per line:

* first a header: ``{"journal": 1, "pid": ..., "t": ..., "address": ...,
  "starter": ...}`` (the tracker's pid, its start as seconds since the epoch,
  its ``MPSHM_TRACKER`` address, the pid of the process that started it);
* ``{"put": [backend, ident], "op": ..., "id": ..., "pid": ..., "t": ...}``
  for a registration (``op`` is ``reg``, ``own`` or ``join``; ``id`` the
  storage identity if known; ``pid`` the registering process; ``t`` when
  the tracker read it, seconds since the epoch), plus ``m``/``s`` for a third-party backend's
  import spec and a scope token;
* ``{"drop": [backend, ident]}`` once the tracker forgot it (unlinked,
  destroyed).

The tracker appends after each batch of messages it reads (every few
milliseconds while messages flow), so a tracker killed within that time of
a registration may not have journaled it. The file is compacted when it
grows to several times what it holds. Writing is best-effort: a journal
that cannot be written (full disk) never stops the tracker.

Another local user is part of the threat model: a journal tells ``mpshm gc``
what it may destroy, so a journal is trusted only if it is a regular file
owned by this user that nobody else may write, in a directory that passes
the same test (:func:`check_private_dir`). Anything else is ignored, with a
:class:`UntrustedJournalWarning` naming it. When the usual state directory
is taken by someone else (squatted), the tracker journals into a fresh
private directory beside it (``<tempdir>/mpshm-<uid>-trackers-<random>``),
which :func:`read_all` also reads: journaling never silently stops.
"""

from __future__ import annotations

import glob
import json
import os
import secrets
import stat
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Optional

__all__ = [
    "Journal",
    "UntrustedJournalWarning",
    "Writer",
    "check_private_dir",
    "read",
    "read_all",
    "rewrite",
    "state_dir",
    "state_dirs",
]

_O_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_O_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
_O_DIRECTORY = getattr(os, "O_DIRECTORY", 0)
_O_NONBLOCK = getattr(os, "O_NONBLOCK", 0)
#: Lines written before a journal is considered for compaction.
_COMPACT_MIN = 2000
#: A journal is compacted once it has this many lines per entry it holds.
_COMPACT_RATIO = 4

Key = tuple[str, str]


class UntrustedJournalWarning(RuntimeWarning):
    """A state directory or journal that another user owns, or that others
    may write to, was ignored (see :mod:`mpshm.tracking.journal`)."""


def _xdg_runtime_dir() -> Optional[str]:
    """``$XDG_RUNTIME_DIR`` if it is what the system makes it: an absolute
    path to a directory of this user's, mode 0700 (else None)."""
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    if not xdg or not os.path.isabs(xdg):
        return None
    try:
        st = os.lstat(xdg)
    except OSError:
        return None
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & 0o077:
        return None
    return xdg


def state_dir() -> str:
    """The directory that holds the trackers' journals: ``$MPSHM_STATE_DIR``,
    else ``$XDG_RUNTIME_DIR/mpshm`` (a per-user directory the system makes),
    else ``<tempdir>/mpshm-<uid>-trackers``."""
    env = os.environ.get("MPSHM_STATE_DIR")
    if env:
        return os.path.abspath(env)
    xdg = _xdg_runtime_dir()
    if xdg is not None:
        return os.path.join(xdg, "mpshm")
    return os.path.join(tempfile.gettempdir(), f"mpshm-{os.getuid()}-trackers")


def _fallback_pattern() -> str:
    return os.path.join(glob.escape(tempfile.gettempdir()), f"mpshm-{os.getuid()}-trackers-*")


def state_dirs() -> list[str]:
    """Every directory journals may be in: :func:`state_dir`, then the private
    directories made when that one was unusable (see :class:`Writer`)."""
    found = [state_dir()]
    found += [path for path in sorted(glob.glob(_fallback_pattern())) if path not in found]
    return found


def _untrusted(path: str, st: os.stat_result, what: str) -> Optional[str]:
    """Why *path* (of lstat/fstat *st*) cannot be trusted as *what*, or None."""
    me = os.geteuid()
    if st.st_uid != me:
        return f"{what} is owned by uid {st.st_uid}, not by you (uid {me})"
    if st.st_mode & 0o022:
        return f"{what} has mode {stat.S_IMODE(st.st_mode):04o}: others may write to it"
    return None


def check_private_dir(path: str, create: bool = False) -> None:
    """Make sure *path* is a directory only this user may change: not a
    symbolic link, owned by the effective uid, writable by nobody else.

    With *create*, a missing directory is made with mode 0700 whatever the
    umask (its parents as ``os.makedirs`` would). Raises PermissionError (or
    NotADirectoryError) naming what is wrong and how to fix it.
    """
    if create:
        parent = os.path.dirname(path)
        if parent and not os.path.isdir(parent):
            os.makedirs(parent, mode=0o700, exist_ok=True)
        try:
            os.mkdir(path, 0o700)
        except FileExistsError:
            pass
        else:
            # mkdir applies the umask; nobody else can replace our new entry
            # (a sticky temp directory keeps it ours), so fix the mode through
            # a descriptor that refuses to follow a link.
            fd = os.open(path, os.O_RDONLY | _O_DIRECTORY | _O_NOFOLLOW | _O_CLOEXEC)
            try:
                os.fchmod(fd, 0o700)
            finally:
                os.close(fd)
    st = os.lstat(path)
    if stat.S_ISLNK(st.st_mode):
        raise PermissionError(
            f"refusing the state directory {path!r}: it is a symbolic link (set "
            "MPSHM_STATE_DIR to a real directory of your own)")
    if not stat.S_ISDIR(st.st_mode):
        raise NotADirectoryError(f"the state directory {path!r} is not a directory")
    problem = _untrusted(path, st, "it")
    if problem:
        raise PermissionError(
            f"refusing the state directory {path!r}: {problem}. Someone else may have made "
            "it to plant or hide journals: remove it, or set MPSHM_STATE_DIR to a private "
            "directory of your own")


def _fallback_dir() -> str:
    """A private directory for journals when :func:`state_dir` is unusable:
    an existing one of ours (see :func:`state_dirs`), else a new one."""
    for path in sorted(glob.glob(_fallback_pattern())):
        try:
            check_private_dir(path)
            return path
        except OSError:
            continue
    return tempfile.mkdtemp(prefix=f"mpshm-{os.getuid()}-trackers-")


def _warn(message: str) -> None:
    warnings.warn(message, UntrustedJournalWarning, stacklevel=3)


def _line(obj: dict[str, Any]) -> bytes:
    return (json.dumps(obj, separators=(",", ":")) + "\n").encode("utf-8", "surrogateescape")


def _write_all(fd: int, data: bytes) -> None:
    while data:
        data = data[os.write(fd, data) :]


def _put_line(key: Key, msg: dict[str, Any]) -> bytes:
    when = msg.get("t")
    when = round(when if isinstance(when, float) else time.time(), 3)
    obj: dict[str, Any] = {"put": list(key), "op": msg.get("op"), "t": when}
    for name in ("id", "pid", "m", "p", "s"):
        if msg.get(name) is not None:
            obj[name] = msg[name]
    return _line(obj)


class Writer:
    """The journal of the running tracker (used by :mod:`mpshm.tracking.server` only).

    Every method swallows OSError: once the journal fails, it is switched off
    and the tracker goes on without it.
    """

    def __init__(self, header: dict[str, Any]) -> None:
        self._fd: Optional[int] = None
        self._pending: list[bytes] = []
        self._lines = 0
        self._header = {"journal": 1, **header}
        self.path = ""
        for attempt in range(2):
            try:
                if attempt == 0:
                    directory = state_dir()
                    check_private_dir(directory, create=True)
                else:  # squatted, or unusable: journal elsewhere, never not at all
                    directory = _fallback_dir()
                self.path = os.path.join(
                    directory, f"tracker-{os.getpid()}-{secrets.token_hex(4)}.log")
                self._fd = os.open(
                    self.path,
                    os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND | _O_NOFOLLOW | _O_CLOEXEC,
                    0o600,
                )
                os.fchmod(self._fd, 0o600)  # whatever the umask
                break
            except OSError:
                continue
        if self._fd is not None:
            self._write([_line(self._header)])

    def put(self, key: Key, msg: dict[str, Any]) -> None:
        """Record that the tracker holds *key* as registered by *msg*."""
        if self._fd is not None:
            self._pending.append(_put_line(key, msg))

    def drop(self, key: Key) -> None:
        """Record that the tracker no longer holds *key*."""
        if self._fd is not None:
            self._pending.append(_line({"drop": list(key)}))

    def flush(self, entries: dict[Key, dict[str, Any]]) -> None:
        """Write what was recorded since the last flush; *entries* is
        everything the tracker holds now (for compaction)."""
        if self._fd is None or not self._pending:
            return
        pending, self._pending = self._pending, []
        self._write(pending)
        if self._lines > max(_COMPACT_MIN, _COMPACT_RATIO * len(entries)):
            self._compact(entries)

    def _write(self, lines: list[bytes]) -> None:
        assert self._fd is not None
        try:
            _write_all(self._fd, b"".join(lines))
            self._lines += len(lines)
        except OSError:
            self._off()

    def _compact(self, entries: dict[Key, dict[str, Any]]) -> None:
        """Rewrite the journal as its header and what is held now."""
        lines = [_line(self._header)]
        lines += [_put_line(key, msg) for key, msg in entries.items()]
        try:
            _replace(self.path, lines)
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | _O_NOFOLLOW | _O_CLOEXEC)
        except OSError:
            return  # the old file is still complete: keep appending to it
        assert self._fd is not None
        os.close(self._fd)
        self._fd = fd
        self._lines = len(lines)

    def _off(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        self._pending = []

    def close(self, remove: bool) -> None:
        """Stop journaling; with *remove*, delete the file (all cleaned up).
        The directory stays: removing it would let another user make it."""
        self._off()
        if remove and self.path:
            try:
                os.unlink(self.path)
            except OSError:
                pass


@dataclass
class Journal:
    """One tracker's journal as read from disk."""

    #: Path of the journal file.
    path: str
    #: The header: tracker ``pid``, its start ``t``, ``address``, ``starter`` pid.
    header: dict[str, Any]
    #: What the tracker held at its last write: (backend, ident) -> the put record.
    entries: dict[Key, dict[str, Any]] = field(default_factory=dict)

    @property
    def pid(self) -> Optional[int]:
        """The tracker's pid."""
        pid = self.header.get("pid")
        return pid if isinstance(pid, int) else None


def read(path: str, warn: bool = True) -> Optional[Journal]:
    """Read the journal at *path*; None if it is not one, is unreadable, or
    cannot be trusted (not a regular file of this user's that nobody else may
    write: then, with *warn*, an :class:`UntrustedJournalWarning` names it).

    A last line cut short (the tracker killed mid-write) is ignored.
    """
    try:
        # O_NONBLOCK: a FIFO planted in its place must not block the reader.
        fd = os.open(path, os.O_RDONLY | _O_NOFOLLOW | _O_CLOEXEC | _O_NONBLOCK)
    except OSError:
        return None
    try:
        st = os.fstat(fd)
        problem = "it is not a regular file" if not stat.S_ISREG(st.st_mode) else (
            _untrusted(path, st, "it"))
        if problem:
            os.close(fd)
            if warn:
                _warn(f"ignoring the tracker journal {path!r}: {problem}")
            return None
        with os.fdopen(fd, "rb") as f:
            data = f.read()
    except OSError:
        return None
    journal: Optional[Journal] = None
    for raw in data.split(b"\n"):
        if not raw:
            continue
        try:
            obj = json.loads(raw.decode("utf-8", "surrogateescape"))
        except ValueError:
            continue
        if not isinstance(obj, dict):
            continue
        if journal is None:
            if obj.get("journal") != 1:
                return None
            journal = Journal(path=path, header=obj)
            continue
        for op in ("put", "drop"):
            key = obj.get(op)
            if isinstance(key, list) and len(key) == 2 and all(isinstance(k, str) for k in key):
                if op == "put":
                    journal.entries[(key[0], key[1])] = obj
                else:
                    journal.entries.pop((key[0], key[1]), None)
    return journal


def read_all(directory: Optional[str] = None) -> list[Journal]:
    """Every trusted journal in *directory*, or (default) in every state
    directory (:func:`state_dirs`). A directory that another user owns or
    may write to is skipped with an :class:`UntrustedJournalWarning`."""
    journals = []
    for path in [directory] if directory else state_dirs():
        try:
            check_private_dir(path)
            names = sorted(os.listdir(path))
        except FileNotFoundError:
            continue
        except OSError as exc:
            _warn(f"ignoring the journals in {path!r}: {exc}")
            continue
        for name in names:
            if name.startswith("tracker-") and name.endswith(".log"):
                journal = read(os.path.join(path, name))
                if journal is not None:
                    journals.append(journal)
    return journals


def rewrite(journal: Journal, keep: dict[Key, dict[str, Any]]) -> None:
    """Replace a dead tracker's journal by its header and *keep*, or remove
    it when *keep* is empty (used by ``mpshm gc``)."""
    if not keep:
        try:
            os.unlink(journal.path)
        except FileNotFoundError:
            pass
        return
    _replace(journal.path, [_line(journal.header)] + [_line(obj) for obj in keep.values()])


def _replace(path: str, lines: list[bytes]) -> None:
    """Replace the file *path* by one (mode 0600) holding *lines*, atomically:
    a reader sees the old file or the new one, never a part. Raises OSError,
    leaving the old file and no temporary one."""
    tmp = f"{path}.{secrets.token_hex(4)}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _O_NOFOLLOW | _O_CLOEXEC, 0o600)
    try:
        try:
            os.fchmod(fd, 0o600)
            _write_all(fd, b"".join(lines))
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except OSError:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
