"""``mpshm list`` and ``mpshm gc``: the segments that exist, and cleaning up after crashes.

Both start from the same inventory (:func:`inventory`): every segment each
backend can list, joined with what the trackers' journals (see
:mod:`mpshm.tracking.journal`) say about it and with what ``/proc`` says about the
processes involved.

* **mpshm's own** segments are the ones a tracker journaled (tracked
  segments, any backend), POSIX objects with mpshm's generated names
  (``psm_`` and 16 hex digits; the standard library's have 8) and the files
  in the mmap backend's directory. An untracked System V segment carries no
  mark of its maker, so it counts as mpshm's only once named explicitly.
* **Mapped**: System V counts attachments in the kernel; for POSIX and mmap
  segments the processes that map one are found in ``/proc/<pid>/maps``
  (those of other users are unreadable unless you are root; segments are
  created 0600, so only you or root can map them anyway).
* **Dead program**: the tracker that journaled a segment has exited (or was
  killed), and so have the process that created the segment, the process
  that started the tracker, and every process whose environment names that
  tracker. Process ids are compared with start times, so a reused pid is
  not mistaken for the original process.

``gc`` destroys a segment only if it is yours, no living process maps it,
and either it was tracked and its program is dead, or ``--untracked`` (or
naming it) includes an untracked one whose creator, where known, is dead.
It never destroys a segment whose tracker is alive (that tracker will), nor
one whose storage object changed since it was journaled (a reused name).
"""

from __future__ import annotations

import argparse
import json
import os
import pwd
import re
import stat
import sys
import time
import warnings
from dataclasses import dataclass, field, fields
from typing import Any, Iterable, Optional, Sequence

from .. import backends
from .._paths import default_dir
from .._sysinfo import alive, carriers
from ..backends import Backend, SegmentInfo
from ..backends._base import format_size
from ..tracking import journal as _journal

__all__ = ["Segment", "add_parsers", "collect", "gc", "inventory"]

#: mpshm's generated POSIX names (the standard library's have 8 hex digits).
_MPSHM_POSIX = re.compile(r"psm_[0-9a-f]{16}")
#: mpshm's generated mmap file names.
_MPSHM_MMAP = re.compile(r"mpshm_[0-9a-f]{16}")


@dataclass
class Segment:
    """One segment as ``mpshm list`` reports it (the ``--json`` fields)."""

    #: The name as mpshm names it (``SharedMemory(name)`` attaches it).
    name: str
    #: The backend's registered name.
    backend: str
    #: Size in bytes.
    size: int
    #: Owner's numeric user id, and name where known.
    uid: int
    owner: str
    #: Permission bits, as an octal string (``"0600"``).
    mode: str
    #: Whether mpshm made it (see the module docstring).
    mpshm: bool
    #: Whether a tracker journaled it (``track=True``, a manager, a pool).
    tracked: bool
    #: Pid of the creating process where known (SysV: the kernel's; else the journal's).
    creator_pid: Optional[int]
    #: Whether that process is still alive (None: not known).
    creator_alive: Optional[bool]
    #: Processes that map it now (SysV: the kernel's attach count; None: not known).
    mapped: Optional[int]
    #: Pids of those processes where known (POSIX, mmap).
    mapped_by: list[int]
    #: Seconds since it was created (or last changed, where the storage only says that).
    age: Optional[float]
    #: The tracker that journaled it, whether that tracker is alive, and
    #: whether its program (tracker, creator, starter, children) is.
    tracker_pid: Optional[int] = None
    tracker_alive: Optional[bool] = None
    program_alive: Optional[bool] = None
    #: Internal: the backend identifier, identity now, and the journal entry.
    ident: str = field(default="", repr=False)
    identity: Optional[str] = field(default=None, repr=False)
    journal: Optional[_journal.Journal] = field(default=None, repr=False)
    #: Internal: who created it, where the storage records a creator apart
    #: from the owner (System V, whose creator keeps every right).
    creator_uid: Optional[int] = field(default=None, repr=False)
    #: Internal: the identity the journal recorded at creation (None: none
    #: recorded, so ``gc`` has no proof that this is the object mpshm made).
    recorded: Optional[str] = field(default=None, repr=False)

    def to_json(self) -> dict[str, Any]:
        """The public fields as a JSON-ready dict."""
        data = {f.name: getattr(self, f.name) for f in fields(self) if f.repr}
        data["mapped_by"] = list(self.mapped_by)
        if self.age is not None:
            data["age"] = round(self.age, 3)
        return data


# -- processes ------------------------------------------------------------------


def _pids() -> list[int]:
    try:
        return [int(p) for p in os.listdir("/proc") if p.isdigit()]
    except OSError:
        return []


def _mappers(paths: set[str]) -> dict[str, set[int]]:
    """For each of *paths*, the pids whose /proc/<pid>/maps map that file.

    Matched by device and inode, not by path: a segment made under a user's
    name is mapped by its creator under the random name it was made with
    (see :meth:`~mpshm.backends.Backend.sibling`), gone since, and any file
    may have several names."""
    found: dict[str, set[int]] = {path: set() for path in paths}
    files: dict[tuple[int, int], str] = {}
    for path in paths:
        try:
            st = os.lstat(path)
        except OSError:
            continue
        files[(st.st_dev, st.st_ino)] = path
    if not files:
        return found
    for pid in _pids():
        try:
            with open(f"/proc/{pid}/maps", "rb") as f:
                data = f.read()
        except OSError:
            continue
        for line in data.splitlines():
            # address perms offset dev inode path
            parts = line.split(None, 5)
            if len(parts) < 5 or parts[4] == b"0":
                continue
            try:
                major, minor = (int(part, 16) for part in parts[3].split(b":"))
                key = (os.makedev(major, minor), int(parts[4]))
            except ValueError:
                continue
            named = files.get(key)
            if named is not None:
                found[named].add(pid)
    return found


def _carriers(addresses: set[str]) -> set[str]:
    """Which of the tracker *addresses* some living process carries in its
    environment (``MPSHM_TRACKER=...``): its program is still running."""
    needles = {f"MPSHM_TRACKER={a}".encode(): a for a in addresses if a}
    return {needles[n] for n in carriers(needles)} if needles else set()


# -- the inventory --------------------------------------------------------------


def _owner(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def _ident(backend: Backend, name: str) -> str:
    prefix = backend.name + ":"
    return name[len(prefix) :] if name.startswith(prefix) else name


def _path_of(info: SegmentInfo) -> Optional[str]:
    """The file a POSIX or mmap segment is (what /proc/<pid>/maps shows)."""
    path = info.extra.get("path")
    return path if isinstance(path, str) else None


def _stat_file(backend: Backend, ident: str) -> Optional[SegmentInfo]:
    """A SegmentInfo for a journaled mmap file outside the backend's directory."""
    try:
        st = os.lstat(ident)
    except OSError:
        return None
    if not stat.S_ISREG(st.st_mode):
        return None
    return SegmentInfo(
        name=backend.qualified(ident), backend=backend.name, size=st.st_size, uid=st.st_uid,
        mode=stat.S_IMODE(st.st_mode), ctime=st.st_ctime, extra={"path": ident},
    )


def _is_mpshm(backend: str, ident: str, in_default_dir: bool) -> bool:
    """Whether an untracked segment bears mpshm's mark: a generated name (the
    mmap directory may be one others use too, ``MPSHM_DIR=/dev/shm`` say)."""
    if backend == "posix":
        return bool(_MPSHM_POSIX.fullmatch(ident))
    return (backend == "mmap" and in_default_dir
            and bool(_MPSHM_MMAP.fullmatch(os.path.basename(ident))))


def _backends(names: Optional[Sequence[str]]) -> list[Backend]:
    chosen = []
    for name in names or list(backends.registry):
        try:
            backend = backends.get(name)
        except (ImportError, TypeError):
            continue
        if backend.available() is None:
            chosen.append(backend)
    return chosen


def _identity(backend: Backend, ident: str, info: SegmentInfo) -> Optional[str]:
    listed = info.extra.get("identity")  # (SysV's listing knows it already)
    if isinstance(listed, str):
        return listed
    try:
        return backend.identity(ident)
    except Exception:
        return None


def inventory(backend_names: Optional[Sequence[str]] = None) -> list[Segment]:
    """Every segment visible on the chosen backends (default: all that work),
    with what the journals and /proc say about each. Sorted by backend, name."""
    chosen = _backends(backend_names)
    journals = _journal.read_all()
    # Keyed as the listings name segments (a System V name of the user's own
    # is journaled as given, listed by its key): (backend, listed ident) ->
    # (journal, the key it was journaled under).
    journaled: dict[tuple[str, str], tuple[_journal.Journal, tuple[str, str]]] = {}
    for journal in journals:  # a name in several journals: the latest registration's
        for key, record in journal.entries.items():
            listed = _listed(key)
            other = journaled.get(listed)
            if other is None or (_num(record.get("t")) or 0) >= (
                    _num(other[0].entries[other[1]].get("t")) or 0):
                journaled[listed] = (journal, key)
    found: dict[tuple[str, str], tuple[Backend, SegmentInfo]] = {}
    for backend in chosen:
        try:
            infos = backend.list()
        except OSError:
            infos = []
        for info in infos:
            found[(backend.name, _ident(backend, info.name))] = (backend, info)
    for (backend_name, ident) in journaled:
        if (backend_name, ident) in found or backend_name not in {b.name for b in chosen}:
            continue
        backend = backends.get(backend_name)
        if backend_name == "mmap":
            extra = _stat_file(backend, ident)
            if extra is not None:
                found[(backend_name, ident)] = (backend, extra)
    paths = {p for _, info in found.values() if (p := _path_of(info)) is not None}
    mapped_by = _mappers(paths)
    dead_addresses = set()
    tracker_alive: dict[str, Optional[bool]] = {}
    for journal in journals:
        header = journal.header
        tracker_alive[journal.path] = alive(journal.pid, _num(header.get("t")))
        if not tracker_alive[journal.path]:
            dead_addresses.add(str(header.get("address") or ""))
    carried = _carriers(dead_addresses)
    mmap_dir = default_dir()
    now = time.time()
    segments = []
    for (backend_name, ident), (backend, info) in sorted(found.items()):
        identity = _identity(backend, ident, info)
        found_in = journaled.get((backend_name, ident))
        owner = found_in[0] if found_in else None
        entry = found_in[0].entries[found_in[1]] if found_in else None
        recorded = entry.get("id") if entry is not None else None
        if not isinstance(recorded, str):
            recorded = None
        if recorded is not None and not backend.proves(recorded, identity):
            owner = entry = recorded = None  # the name now belongs to another object
        path = _path_of(info)
        pids = sorted(mapped_by.get(path, ())) if path else []
        mapped = info.attached if info.attached is not None else (len(pids) if path else None)
        created = _num(entry.get("t")) if entry else None
        creator = info.creator_pid if info.creator_pid else (
            entry.get("pid") if entry else None)
        creator_alive = alive(creator, created if info.creator_pid is None else None)
        in_dir = path is not None and os.path.dirname(path) == mmap_dir
        segment = Segment(
            name=info.name, backend=backend_name, size=info.size, uid=info.uid,
            owner=_owner(info.uid), mode=f"{info.mode:04o}",
            mpshm=owner is not None or _is_mpshm(backend_name, ident, in_dir),
            tracked=owner is not None, creator_pid=creator, creator_alive=creator_alive,
            mapped=mapped, mapped_by=pids,
            age=now - since if (since := created or info.ctime) else None,
            ident=ident, identity=identity, journal=owner, recorded=recorded,
            creator_uid=_int(info.extra.get("creator_uid")),
        )
        if owner is not None:
            header = owner.header
            segment.tracker_pid = owner.pid
            segment.tracker_alive = tracker_alive[owner.path]
            started = _num(header.get("t"))
            segment.program_alive = bool(
                segment.tracker_alive
                or creator_alive
                or alive(_int(header.get("starter")), started)
                or alive(_int(header.get("parent")), started)
                or str(header.get("address") or "") in carried
            )
        segments.append(segment)
    return segments


def _listed(key: tuple[str, str]) -> tuple[str, str]:
    """*key* (backend, ident) as that backend's listing names the segment."""
    try:
        return key[0], backends.get(key[0]).listed_ident(key[1])
    except Exception:  # an unknown backend, or an identifier it refuses
        return key


def _num(value: Any) -> Optional[float]:
    return float(value) if isinstance(value, (int, float)) else None


def _int(value: Any) -> Optional[int]:
    return value if isinstance(value, int) else None


def collect(all_segments: bool = False,
            backend_names: Optional[Sequence[str]] = None) -> list[Segment]:
    """What ``mpshm list`` shows: mpshm's own segments, or every one with *all_segments*."""
    return [s for s in inventory(backend_names) if all_segments or s.mpshm]


# -- gc -------------------------------------------------------------------------


@dataclass
class Verdict:
    """What ``gc`` does with one segment, and why."""

    segment: Segment
    #: ``"destroy"`` or ``"keep"``.
    action: str
    reason: str
    #: A short word for the reason (``mapped``, ``untracked``, ...), to group by.
    kind: str = "orphan"
    #: Whether it was destroyed (False in a dry run, or if destroying failed).
    destroyed: bool = False
    error: Optional[str] = None

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return {"name": self.segment.name, "backend": self.segment.backend,
                "size": self.segment.size, "action": self.action, "reason": self.reason,
                "kind": self.kind, "destroyed": self.destroyed, "error": self.error}


def judge(segment: Segment, untracked: bool, named: bool) -> Verdict:
    """Decide whether ``gc`` may destroy *segment* (see the module docstring)."""
    def keep(kind: str, reason: str) -> Verdict:
        return Verdict(segment, "keep", reason, kind)

    if segment.uid != os.getuid():
        return keep("other-user", f"it belongs to {segment.owner} (uid {segment.uid}), "
                    "not to you")
    if segment.creator_uid is not None and segment.creator_uid != os.getuid():
        return keep("other-user", f"it was created by uid {segment.creator_uid}, not by you "
                    "(its creator keeps every right over it, whoever owns it now)")
    if segment.mapped:
        who = ", ".join(map(str, segment.mapped_by)) or f"{segment.mapped} process(es)"
        return keep("mapped", f"a living process maps it ({who})")
    if segment.tracked:
        if segment.recorded is None:
            return keep("no-identity", "its journal entry records no storage identity, so "
                        "nothing proves it is the object mpshm made (remove it yourself if "
                        "it is yours)")
        if segment.tracker_alive:
            return keep("tracker-alive", f"its tracker (pid {segment.tracker_pid}) is alive "
                        "and destroys it when its program ends")
        if segment.program_alive:
            return keep("program-alive", "its program is still running (its creator, starter "
                        "or a process started with its tracker's address; tracker pid "
                        f"{segment.tracker_pid})")
        return Verdict(segment, "destroy",
                       f"tracked, its program is dead (tracker pid {segment.tracker_pid}, "
                       f"creator pid {segment.creator_pid}) and no process maps it")
    if not (segment.mpshm or named):
        return keep("foreign", "not made by mpshm: name it on the command line to include it")
    if not (untracked or named):
        return keep("untracked", "not tracked (made with track=False, so meant to outlive "
                    "its creator): pass --untracked or name it to include it")
    if segment.creator_alive:
        return keep("creator-alive",
                    f"untracked, and its creator (pid {segment.creator_pid}) is alive")
    return Verdict(segment, "destroy", "untracked, no living process maps it"
                   + (", its creator is dead" if segment.creator_alive is False else ""),
                   "untracked")


def _resolve_names(names: Sequence[str]) -> set[tuple[str, str]]:
    keys = set()
    for name in names:
        backend, ident = backends.resolve(name, None, {})
        assert ident is not None
        keys.add((backend.name, backend.listed_ident(ident)))
    return keys


def gc(dry_run: bool = False, untracked: bool = False, names: Sequence[str] = (),
       backend_names: Optional[Sequence[str]] = None) -> list[Verdict]:
    """Destroy what mpshm meant to clean up but could not; return a verdict
    for every segment considered (with *names*: only those).

    Journals of dead trackers are then rewritten to what is left of them, and
    removed once empty (not in a dry run).
    """
    wanted = _resolve_names(names)
    segments = inventory(backend_names)
    # Every name must exist before anything is destroyed: a misspelt one
    # stops the whole run, not just its own part.
    for key in sorted(wanted - {(s.backend, s.ident) for s in segments}):
        raise FileNotFoundError(f"no segment {backends.get(key[0]).qualified(key[1])!r} "
                                "exists (see `mpshm list --all`); nothing was destroyed")
    verdicts = []
    for segment in segments:
        key = (segment.backend, segment.ident)
        if wanted and key not in wanted:
            continue
        if not wanted and not segment.mpshm:
            continue
        verdict = judge(segment, untracked, named=key in wanted)
        if verdict.action == "destroy" and not dry_run:
            try:
                backend = backends.get(segment.backend)
                # A tracked segment is destroyed only as the object its journal
                # recorded at creation; an untracked one as gc found it.
                proof = segment.recorded if segment.tracked else segment.identity
                verdict.destroyed = backend.destroy(segment.ident, proof)
                if not verdict.destroyed:
                    verdict.error = "it was gone, or replaced, by the time gc got to it"
            except OSError as exc:
                verdict.error = str(exc)
        verdicts.append(verdict)
    if not dry_run:
        _prune(segments, verdicts, {b.name for b in _backends(backend_names)})
    return verdicts


def _prune(segments: list[Segment], verdicts: list[Verdict], looked_at: set[str]) -> None:
    """Rewrite dead trackers' journals to the entries whose segment still
    exists; entries of backends not *looked_at* (``--backend``, or not
    available now) are kept as they are."""
    existing = {(s.backend, s.ident) for s in segments}
    destroyed = {(v.segment.backend, v.segment.ident) for v in verdicts if v.destroyed}

    def kept(key: tuple[str, str]) -> bool:
        if key[0] not in looked_at:
            return True
        listed = _listed(key)
        return listed in existing and listed not in destroyed

    with warnings.catch_warnings():  # (inventory() already warned of the same)
        warnings.simplefilter("ignore", _journal.UntrustedJournalWarning)
        journals = _journal.read_all()
    for journal in journals:
        if alive(journal.pid, _num(journal.header.get("t"))):
            continue
        keep = {k: e for k, e in journal.entries.items() if kept(k)}
        if keep != journal.entries:
            try:
                _journal.rewrite(journal, keep)
            except OSError:
                pass


# -- output ---------------------------------------------------------------------


def _age(seconds: Optional[float]) -> str:
    if seconds is None:
        return "?"
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.0f}{unit}"
    return f"{seconds:.0f}s"


def _short_size(n: int) -> str:
    text = format_size(n)
    return text.split(" (")[0]


def _yes(value: Optional[bool]) -> str:
    return "?" if value is None else ("yes" if value else "no")


def printable(text: str) -> str:
    """*text* safe for a terminal: backslashes, control and other unprintable
    characters (escape sequences, newlines) written as Python escapes, so a
    hostile name can neither drive the terminal nor forge a row."""
    if text.isprintable() and "\\" not in text:
        return text
    out = []
    for ch in text:
        if ch == "\\":
            out.append("\\\\")
        elif ch.isprintable():
            out.append(ch)
        else:
            out.append(ch.encode("unicode_escape", "backslashreplace").decode("ascii"))
    return "".join(out)


def _table(rows: list[list[str]], out: Any) -> None:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip(), file=out)



def print_segments(segments: Iterable[Segment], out: Any = None) -> None:
    """The human form of ``mpshm list``."""
    out = out or sys.stdout
    rows = [["NAME", "BACKEND", "SIZE", "OWNER", "CREATOR", "ALIVE", "MAPPED", "AGE",
             "TRACKED"]]
    for s in segments:
        rows.append([
            printable(s.name), s.backend, _short_size(s.size), printable(s.owner),
            str(s.creator_pid) if s.creator_pid else "?", _yes(s.creator_alive),
            "?" if s.mapped is None else str(s.mapped), _age(s.age),
            (f"yes (tracker {s.tracker_pid}{'' if s.tracker_alive else ', dead'})"
             if s.tracked else ("no" if s.mpshm else "-")),
        ])
    if len(rows) == 1:
        print("no segments", file=out)
        return
    _table(rows, out)


def _list(args: argparse.Namespace) -> int:
    segments = collect(args.all, args.backend)
    if args.json:
        json.dump([s.to_json() for s in segments], sys.stdout, indent=2)
        print()
    else:
        print_segments(segments)
        total = sum(s.size for s in segments)
        print(f"\n{len(segments)} segment(s), {_short_size(total)} in all"
              + ("" if args.all else " (mpshm's own; --all for every segment)"))
    return 0


_KEPT = {
    "other-user": "another user's",
    "mapped": "a living process maps them",
    "tracker-alive": "their tracker is alive and destroys them when their program ends",
    "program-alive": "their program is still running",
    "foreign": "not made by mpshm; name one to include it",
    "untracked": "made with track=False; --untracked or a name includes them",
    "creator-alive": "untracked, and their creator is alive",
    "no-identity": "their journal entry records no identity: nothing proves they are "
                   "mpshm's (-v names them)",
}


def _gc(args: argparse.Namespace) -> int:
    try:
        verdicts = gc(args.dry_run, args.untracked, args.names, args.backend)
    except (ValueError, FileNotFoundError) as exc:
        print(f"mpshm gc: {exc}", file=sys.stderr)
        return 2
    failed = [v for v in verdicts if v.action == "destroy" and not args.dry_run
              and not v.destroyed]
    if args.json:
        json.dump({"dry_run": args.dry_run, "segments": [v.to_json() for v in verdicts]},
                  sys.stdout, indent=2)
        print()
    else:
        doomed = [v for v in verdicts if v.action == "destroy"]
        verb = "would destroy" if args.dry_run else "destroyed"
        for v in doomed:
            mark = verb if (args.dry_run or v.destroyed) else f"FAILED ({v.error})"
            print(f"{mark}: {printable(v.segment.name)} ({_short_size(v.segment.size)}): "
                  f"{printable(v.reason)}")
        kept = [v for v in verdicts if v.action == "keep"]
        if args.verbose:
            for v in kept:
                print(f"kept: {printable(v.segment.name)}: {printable(v.reason)}")
        else:
            kinds: dict[str, list[Verdict]] = {}
            for v in kept:
                kinds.setdefault(v.kind, []).append(v)
            for kind, group in sorted(kinds.items()):
                print(f"kept {len(group)} ({_KEPT[kind]})")
        total = sum(v.segment.size for v in doomed if args.dry_run or v.destroyed)
        count = sum(1 for v in doomed if args.dry_run or v.destroyed)
        print(f"{verb} {count} segment(s), {_short_size(total)}; kept "
              f"{len(verdicts) - len(doomed)}")
    return 1 if failed else 0


def add_parsers(subparsers: Any) -> None:
    """Register ``list`` and ``gc``."""
    names = sorted(backends.registry)
    parser = subparsers.add_parser(
        "list", help="list shared memory segments",
        description="List mpshm's shared memory segments on every backend (--all: every "
        "segment visible): name, backend, size, owner, creator pid and whether it is "
        "alive, how many processes map it, age, and whether a tracker destroys it.",
    )
    parser.add_argument("--all", action="store_true",
                        help="every segment visible, not only mpshm's")
    parser.add_argument("--backend", action="append", choices=names, metavar="NAME",
                        help=f"only this backend (repeatable; one of {', '.join(names)})")
    parser.add_argument("--json", action="store_true", help="print a JSON list")
    parser.set_defaults(func=_list)

    parser = subparsers.add_parser(
        "gc", help="destroy segments left behind by dead programs",
        description="Destroy the tracked segments whose program is dead and that no "
        "living process maps (left behind when the program and its tracker were killed "
        "together). Never touches a mapped segment, one whose tracker is alive, one of "
        "another user, an untracked one (unless --untracked), or one mpshm did not make "
        "(unless named).",
    )
    parser.add_argument("names", nargs="*", metavar="NAME",
                        help="consider only these segments (as `mpshm list` names them); "
                        "naming one includes it even if untracked or not mpshm's")
    parser.add_argument("--dry-run", "-n", action="store_true",
                        help="say what would be destroyed and why; destroy nothing")
    parser.add_argument("--untracked", action="store_true",
                        help="include mpshm segments made with track=False that no living "
                        "process maps")
    parser.add_argument("--backend", action="append", choices=names, metavar="NAME",
                        help=f"only this backend (repeatable; one of {', '.join(names)})")
    parser.add_argument("--verbose", "-v", action="store_true",
                        help="say why each kept segment is kept (default: counts by reason)")
    parser.add_argument("--json", action="store_true",
                        help="print every verdict as JSON (name, action, reason, kind, "
                        "destroyed, error)")
    parser.set_defaults(func=_gc)
