"""Trackers' journals: what each tracker holds, on disk, for ``mpshm list`` and ``mpshm gc``.

A tracker (see :mod:`mpshm.tracking`) keeps its registry in memory and
destroys what is left when its program is over. When the tracker itself is
killed along with the program (``kill -9 -1``, a container stopped, the OOM
killer), that registry is gone, and with it the knowledge of which segments
were meant to be destroyed. So each tracker also appends what it holds to a
journal file of its own, and removes the file when it has cleaned up. A
journal left behind names exactly the tracked segments of a program whose
cleanup did not run; ``mpshm gc`` reads it.

The journals live in the *state directory*: ``$MPSHM_STATE_DIR``, else
``<tempdir>/mpshm-<uid>-trackers``, a private directory (mode 0700, checked
like the mmap backend's). One file per tracker,
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
"""

from __future__ import annotations

import json
import os
import secrets
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any, Optional

__all__ = ["Journal", "Writer", "read", "read_all", "rewrite", "state_dir"]

_O_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_O_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
#: Lines written before a journal is considered for compaction.
_COMPACT_MIN = 2000
#: A journal is compacted once it has this many lines per entry it holds.
_COMPACT_RATIO = 4

Key = tuple[str, str]


def state_dir() -> str:
    """The directory that holds the trackers' journals."""
    env = os.environ.get("MPSHM_STATE_DIR")
    if env:
        return os.path.abspath(env)
    return os.path.join(tempfile.gettempdir(), f"mpshm-{os.getuid()}-trackers")


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
    """The journal of the running tracker (used by :mod:`mpshm._tracker` only).

    Every method swallows OSError: once the journal fails, it is switched off
    and the tracker goes on without it.
    """

    def __init__(self, header: dict[str, Any]) -> None:
        self._fd: Optional[int] = None
        self._pending: list[bytes] = []
        self._lines = 0
        self._header = {"journal": 1, **header}
        directory = state_dir()
        self.path = os.path.join(
            directory, f"tracker-{os.getpid()}-{secrets.token_hex(4)}.log"
        )
        try:
            from .backends.mmapfile import check_dir
        except Exception:  # a broken install: no journal, the tracker goes on
            return
        for _ in range(3):  # another tracker may remove the empty directory meanwhile
            try:
                check_dir(directory, create=True)
                self._fd = os.open(
                    self.path,
                    os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND | _O_NOFOLLOW | _O_CLOEXEC,
                    0o600,
                )
                break
            except FileNotFoundError:
                continue
            except OSError:
                return
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
        tmp = f"{self.path}.{secrets.token_hex(4)}.tmp"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _O_NOFOLLOW | _O_CLOEXEC,
                         0o600)
            try:
                _write_all(fd, b"".join(lines))
            finally:
                os.close(fd)
            os.replace(tmp, self.path)
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | _O_NOFOLLOW | _O_CLOEXEC)
        except OSError:
            try:
                os.unlink(tmp)
            except OSError:
                pass
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
        """Stop journaling; with *remove*, delete the file (all cleaned up)
        and the state directory if that leaves it empty."""
        self._off()
        if remove:
            try:
                os.unlink(self.path)
                os.rmdir(os.path.dirname(self.path))
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


def read(path: str) -> Optional[Journal]:
    """Read the journal at *path*; None if it is not one (or unreadable).

    A last line cut short (the tracker killed mid-write) is ignored.
    """
    try:
        fd = os.open(path, os.O_RDONLY | _O_NOFOLLOW | _O_CLOEXEC)
    except OSError:
        return None
    try:
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
    """Every journal in the state directory (default :func:`state_dir`)."""
    directory = directory or state_dir()
    try:
        names = sorted(os.listdir(directory))
    except OSError:
        return []
    journals = []
    for name in names:
        if name.startswith("tracker-") and name.endswith(".log"):
            journal = read(os.path.join(directory, name))
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
    lines = [_line(journal.header)] + [_line(obj) for obj in keep.values()]
    tmp = f"{journal.path}.{secrets.token_hex(4)}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _O_NOFOLLOW | _O_CLOEXEC, 0o600)
    try:
        _write_all(fd, b"".join(lines))
    finally:
        os.close(fd)
    os.replace(tmp, journal.path)
