"""The tracker process:
``python -m mpshm.tracking.server CONN_FD LISTEN_FD [PARENT_PID] [OPTIONS]``.

Started by :mod:`mpshm.tracking`; not meant to be run by hand. It reads
register/unregister messages, waits until the program that started it is
over (see :mod:`mpshm.tracking` for how it tells), destroys what is still
registered, and exits. It writes nothing to stdout or stderr.

The one option, ``--adopt ADDRESS`` (repeatable), makes it a replacement:
the tracker at ``ADDRESS`` (its ``MPSHM_TRACKER`` value) died, and this one
takes over what that one's journal holds (see :class:`Tracker`).

``python -m mpshm.tracking.server deliver SOCK_FD PIPE_FD`` is the other use of this
module: a process that ends while its tracker is stalled hands what it could
not send to such a helper, which waits for the tracker (see
:mod:`mpshm.tracking`).
"""

from __future__ import annotations

import collections
import fcntl
import importlib
import os
import selectors
import signal
import socket
import sys
import time
from typing import Any, Optional, Sequence

from .._sysinfo import alive, carriers, start_time, started_at
from . import journal as _journal
from . import protocol as _protocol

_POLL = 0.05  # seconds between checks of watched processes
_BATCH = 0.005  # seconds between reads while messages flow (at most)
_BATCH_MIN = 0.0002  # ... and at least (see Tracker.run)
#: Messages a read should find at most: a Unix socket queues a few hundred
#: small packets (its send buffer counts each at about 1 KiB) before the
#: sender blocks, so the pause between reads shrinks as messages come faster.
_BATCH_TARGET = 64
_IDLE = 0.5  # seconds without messages before waiting for the next one
_GONE = 4096  # unregistrations of unknown keys remembered (see Tracker.gone)
_SETTLE_ROUNDS = 100  # reads of whatever is pending before applying ended connections
#: Seconds after which an identity looked up for the journal is looked up
#: again (see Tracker._verify): a segment can take long to make (reserving
#: gigabytes), and its identity may change until it is made.
_VERIFY_AFTER = (0.1, 1.0, 10.0)


Key = tuple[str, str]


class Tracker:
    """The registry of one program's tracked segments.

    *adopt* names the addresses (``MPSHM_TRACKER`` values) of dead trackers
    this one replaces: it takes over what their journals hold (see
    :meth:`_claim` and :meth:`_take_over`).
    """

    def __init__(
        self,
        conn: socket.socket,
        listener: socket.socket,
        parent: Optional[int],
        adopt: Sequence[str] = (),
    ) -> None:
        self.listener = listener
        self.conns: dict[socket.socket, _protocol.Decoder] = {conn: _protocol.Decoder()}
        # Senders whose messages count (see _receive): the kernel gives a
        # sender's real uid; ours is the effective one we act with, and the
        # real one is the same user in all but set-user-ID programs.
        self.uids = {os.geteuid(), os.getuid()}
        for sock in (conn, listener):
            try:
                _protocol.pass_credentials(sock)
            except OSError:
                pass
        self.entries: dict[Key, dict[str, Any]] = {}
        # Entries registered with "own": destroyed when that connection closes.
        self.owners: dict[Key, socket.socket] = {}
        # Scope tokens announced with "scope": the connection that owns each.
        self.scopes: dict[str, socket.socket] = {}
        # Keys unregistered before they were registered: a "join" (always a
        # fresh random name) sent on one connection can be read after the
        # "unreg" of the process that took the segment over, sent on another.
        self.gone: collections.OrderedDict[Key, None] = collections.OrderedDict()
        # Registrations of a name that another process's registration of the
        # same name replaced: (key) -> identity -> registration. Two processes
        # of a program creating one name at once both register it (with their
        # identities) before one of them wins; the loser withdraws its own
        # registration by identity, and the winner's comes back.
        self.shadowed: dict[Key, dict[str, dict[str, Any]]] = {}
        # Connections that ended, to apply once what came before is read (_settle).
        self.ended: list[socket.socket] = []
        # Identities looked up for the journal, to check again (see _verify):
        # one queue per check, of (when, key, identity), soonest first.
        self.recent: list[collections.deque[tuple[float, Key, Optional[str]]]] = [
            collections.deque() for _ in _VERIFY_AFTER
        ]
        self.address = os.environ.get("MPSHM_TRACKER", "")
        # Environment entries that make a process part of the program: ours,
        # and those of the trackers this one replaces (see _take_over).
        self.needles = [f"MPSHM_TRACKER={self.address}".encode()]
        self.watched: dict[int, str] = {}
        #: Messages read in the current round (see :meth:`run`).
        self.received = 0
        if parent is not None:
            start = start_time(parent)
            if start is not None:
                self.watched[parent] = start
        # The process that made the socket pair is watched too: end-of-file on
        # the pair says every process sharing it is gone, unless one of them
        # shut it down (shutdown() acts for all holders) while the rest run on.
        self.starter = _protocol.peer(conn)[0]
        self.starter_start = start_time(self.starter) if self.starter else None
        claimed = self._claim(adopt)  # before the header, which lists them
        adopted = sorted({str(a) for j, _ in claimed for a in self._addresses(j)})
        me = os.getpid()
        header: dict[str, Any] = {
            "pid": me, "t": started_at(me) or time.time(), "address": self.address,
            "starter": self.starter, "parent": parent,
        }
        if adopted:
            header["adopted"] = adopted
        self.journal = _journal.Writer(header)
        self._take_over(claimed)

    # -- taking over from a dead tracker -------------------------------------

    @staticmethod
    def _addresses(journal: _journal.Journal) -> list[str]:
        """The address of *journal*'s tracker and of those it had replaced."""
        found = [journal.header.get("address")]
        earlier = journal.header.get("adopted")
        if isinstance(earlier, list):
            found += earlier
        return [a for a in found if isinstance(a, str) and a]

    def _claim(self, addresses: Sequence[str]) -> list[tuple[_journal.Journal, int]]:
        """The journals to take over, each locked (an open fd holding an
        exclusive flock) so that of several replacements started at once
        (forked processes that each found the tracker gone) one takes each.

        A journal qualifies only if :func:`mpshm.tracking.journal.read_all` returns it
        (it checks who owns the file and the directory), its header names one
        of *addresses* exactly, and its tracker is dead: pid gone, or taken by
        a process that started after that tracker did."""
        wanted = {a for a in addresses if a and a != self.address}
        if not wanted:
            return []
        claimed: list[tuple[_journal.Journal, int]] = []
        for journal in _journal.read_all():
            started = journal.header.get("t")
            if (
                journal.header.get("address") not in wanted
                or journal.pid is None
                or journal.pid == os.getpid()
                or not isinstance(started, (int, float))
                or isinstance(started, bool)
                or alive(journal.pid, float(started)) is not False
            ):
                continue
            try:
                fd = os.open(journal.path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0)
                             | getattr(os, "O_CLOEXEC", 0))
            except OSError:
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                # Still the file read? (Another replacement may have taken it
                # over and removed it before we got the lock.)
                same = os.fstat(fd)
                now = os.lstat(journal.path)
                if same.st_nlink == 0 or (same.st_dev, same.st_ino) != (now.st_dev, now.st_ino):
                    raise OSError("taken over already")
            except OSError:
                os.close(fd)
                continue
            claimed.append((journal, fd))
        return claimed

    def _take_over(self, claimed: list[tuple[_journal.Journal, int]]) -> None:
        """Hold what the dead trackers of *claimed* held, as registrations
        of this program ("reg"), with their recorded identity; wait for their
        programs' processes too; remove their journals once ours has it all."""
        if not claimed:
            return
        taken: set[Key] = set()
        for journal, _fd in claimed:
            for address in self._addresses(journal):
                needle = f"MPSHM_TRACKER={address}".encode()
                if needle not in self.needles:
                    self.needles.append(needle)
            started = journal.header.get("t")
            by = float(started) if isinstance(started, (int, float)) else None
            # Who may still run of that program: its tracker's starter and
            # parent, and the processes that registered what it held (each
            # started before its last registration, by when it was read).
            pids: dict[Any, Optional[float]] = {journal.header.get(k): by
                                                for k in ("starter", "parent")}
            for key, record in journal.entries.items():
                when = record.get("t")
                if isinstance(when, (int, float)):
                    pid = record.get("pid")
                    pids[pid] = max(float(when), pids.get(pid) or 0.0)
                if key in self.entries:
                    continue
                msg: dict[str, Any] = {"op": "reg", "b": key[0], "i": key[1],
                                       "id": record.get("id"), "adopted": True}
                for name in ("pid", "t", "m", "p"):
                    if record.get(name) is not None:
                        msg[name] = record[name]
                self.entries[key] = msg
                self.journal.put(key, msg)
                taken.add(key)
            for pid, by_time in pids.items():
                if (
                    isinstance(pid, int)
                    and not isinstance(pid, bool)
                    and pid > 0
                    and pid not in self.watched
                    and alive(pid, by_time)
                ):
                    start = start_time(pid)
                    if start is not None:
                        self.watched[pid] = start
        self.journal.flush(self.entries)
        mine = _journal.read(self.journal.path)
        safe = mine is not None and taken <= set(mine.entries)
        for journal, fd in claimed:
            if safe:  # else left for ``mpshm gc`` (and prune_journals) to find
                try:
                    os.unlink(journal.path)
                except OSError:
                    pass
            os.close(fd)

    def handle(
        self, messages: list[_protocol.Message], conn: Optional[socket.socket] = None
    ) -> None:
        """Apply the register/unregister messages that came on *conn*.

        A segment registered and unregistered within the same batch (created
        and unlinked between two reads) is never journaled: that saves the
        identity lookup and two journal lines per short-lived segment."""
        self.received += len(messages)
        last_unreg = {m.key: n for n, m in enumerate(messages) if m.op == "unreg"}
        unjournaled: set[Key] = set()
        for n, msg in enumerate(messages):
            if msg.op == "scope":
                self._scope(msg, conn)
            elif msg.op in ("reg", "own", "join"):
                self._register(msg, conn, last_unreg.get(msg.key, -1) > n, unjournaled)
            elif msg.op == "unreg":
                self._unregister(msg, unjournaled)

    def _scope(self, msg: _protocol.Message, conn: Optional[socket.socket]) -> None:
        """A scope's token (``msg.ident``) announced: *conn* owns the scope."""
        if conn is None:
            return
        token = msg.ident
        self.scopes[token] = conn
        # "join"s that were read before the announcement (another
        # connection's messages may be read first).
        for joined, entry in self.entries.items():
            if entry.get("s") == token and joined not in self.owners:
                self.owners[joined] = conn

    def _register(
        self,
        msg: _protocol.Message,
        conn: Optional[socket.socket],
        unregistered_later: bool,
        unjournaled: set[Key],
    ) -> None:
        """A "reg", "own" or "join": hold the segment (owned by *conn* for
        "own", by the scope it names for "join"). *unregistered_later*: an
        "unreg" of it follows in the same batch; *unjournaled*: the keys of
        this batch left out of the journal (see :meth:`handle`)."""
        key = msg.key
        if msg.op == "join" and key in self.gone:
            return  # taken over and unlinked already
        entry = _entry(msg)
        old = self.entries.get(key)
        if (old is not None and old.get("id") and entry.get("id")
                and old["id"] != entry["id"] and old.get("pid") != entry.get("pid")):
            self.shadowed.setdefault(key, {})[str(old["id"])] = old
        if key not in self.entries and unregistered_later:
            unjournaled.add(key)
        elif key not in unjournaled:
            entry = self._journal_put(key, entry)
        self.entries[key] = entry
        owner = conn if msg.op == "own" else None
        if msg.op == "join":  # owned by the scope it names, while that is open
            owner = self.scopes.get(str(entry.get("s")))
        if owner is not None:
            self.owners[key] = owner
        else:
            self.owners.pop(key, None)

    def _unregister(self, msg: _protocol.Message, unjournaled: set[Key]) -> None:
        """An "unreg": let the segment go (see :attr:`shadowed` for one
        withdrawn by identity, and :attr:`gone` for the names of "join"s)."""
        key = msg.key
        withdrawn = msg.identity  # (a registration withdrawn by identity)
        restored = None
        if withdrawn is not None:
            current = self.entries.get(key)
            if current is not None and current.get("id") != withdrawn:
                # Another process's registration of the name: it stays.
                self.shadowed.get(key, {}).pop(withdrawn, None)
                return
            shadows = self.shadowed.get(key)
            if shadows:
                restored = shadows.pop(next(reversed(shadows)))
        if not self.shadowed.get(key) or withdrawn is None:
            self.shadowed.pop(key, None)
        removed = self.entries.pop(key, None)
        self.owners.pop(key, None)
        if removed is not None:
            if key not in unjournaled:
                self.journal.drop(key)
            unjournaled.discard(key)
        if restored is not None:
            self.entries[key] = self._journal_put(key, restored)
            return
        if removed is None or removed["op"] == "join":  # (unknown: as a join)
            # A "join" is a fresh random name, registered once or twice
            # (SysV adds its identity): any that is read after this is stale.
            self.gone[key] = None
            if len(self.gone) > _GONE:
                self.gone.popitem(last=False)

    def _journal_put(self, key: Key, msg: dict[str, Any]) -> dict[str, Any]:
        """Journal a registration with the storage object's identity, so that
        ``mpshm gc`` (or a replacement) can tell it from a later object of
        the same name; return the registration as the entry to hold.

        Backends with random names send none: it is looked up here, off the
        creating process's path, and marked as looked up (``seen``): such a
        name is registered before the segment is made, so what is there now
        may be half made (an identity that includes the size, say), and is
        checked again later (:meth:`_verify`); :meth:`destroy` does not go by
        it. A segment not there (gone already, or not made yet) is not
        journaled now (but looked for again: see :meth:`_verify`)."""
        if msg.get("id") is None:
            from .. import backends

            try:
                if msg.get("m") and key[0] not in backends.registry:
                    _load_backend(backends, key[0], str(msg["m"]), msg.get("p") or [])
                backend = backends.get(key[0])
                if backend.unique_names:
                    identity = backend.identity(key[1])
                    self.recent[0].append((time.monotonic() + _VERIFY_AFTER[0], key, identity))
                    if identity is None:
                        return msg
                    msg = {**msg, "id": identity, "seen": True}
            except Exception:
                pass
        self.journal.put(key, msg)
        return msg

    def _verify(self) -> None:
        """Look up again, at each of ``_VERIFY_AFTER`` seconds on, the
        identities :meth:`_journal_put` looked up (or found none for), and
        journal any that changed or appeared: the segment was still being
        made then."""
        from .. import backends

        now = time.monotonic()
        for stage, queue in enumerate(self.recent):
            while queue and queue[0][0] <= now:
                _, key, seen = queue.popleft()
                entry = self.entries.get(key)
                if entry is None or entry.get("id") != seen or (seen and not entry.get("seen")):
                    continue  # unregistered, or registered again since
                try:
                    identity = backends.get(key[0]).identity(key[1])
                except Exception:
                    continue
                if identity is not None and identity != seen:
                    self.entries[key] = {**entry, "id": identity, "seen": True}
                    self.journal.put(key, self.entries[key])
                if stage + 1 < len(self.recent):
                    self.recent[stage + 1].append((now + _VERIFY_AFTER[stage + 1], key, identity))

    def closed(self, conn: socket.socket) -> None:
        """*conn* ended: destroy what it owns (registered with "own", or
        "join"-ed to a scope it announced) and still holds."""
        for token in [token for token, owner in self.scopes.items() if owner is conn]:
            del self.scopes[token]
        for key in [key for key, owner in self.owners.items() if owner is conn]:
            del self.owners[key]
            self.destroy(key, self.entries.pop(key))
            self.journal.drop(key)

    def still_running(self) -> bool:
        """Whether any process of the program may still be alive."""
        if self.conns:
            return True
        self.watched = {
            pid: start for pid, start in self.watched.items() if start_time(pid) == start
        }
        if self.watched:
            return True
        if self.starter and self.starter_start and start_time(self.starter) == self.starter_start:
            return True
        found = carriers(self.needles)
        self.watched = {pid: start for pids in found.values() for pid, start in pids.items()}
        return bool(self.watched)

    def _accept(self, selector: selectors.BaseSelector) -> None:
        try:
            conn, _ = self.listener.accept()
        except OSError:
            return
        # Only our own user may talk to us. SO_PEERCRED gives the effective
        # uid the peer had when it connected; messages are checked one by
        # one as well (_receive), for a process that changes user later.
        uid = _protocol.peer(conn)[1]
        if uid is not None and uid != os.geteuid():
            conn.close()
            return
        self.conns[conn] = _protocol.Decoder()
        selector.register(conn, selectors.EVENT_READ)

    def _receive(self, selector: selectors.BaseSelector, conn: socket.socket) -> bool:
        """Read what *conn* has queued; return whether there were messages.

        Where the kernel attaches each message's sender (Linux), a message
        from a process of another user is dropped whole: a process of the
        program that inherited a connection (the socket pair, say) and then
        switched to another user must not have us destroy what it names."""
        decoder = self.conns[conn]
        messages: list[_protocol.Message] = []
        received = False
        while True:  # drain what is queued, one packet (or chunk) at a time
            try:
                if _protocol.PASSCRED:
                    data, ancdata, _flags, _addr = conn.recvmsg(
                        1 << 16, _protocol.CREDENTIALS_SPACE, socket.MSG_DONTWAIT
                    )
                else:
                    data, ancdata = conn.recv(1 << 16, socket.MSG_DONTWAIT), []
            except BlockingIOError:
                self.handle(messages, conn)
                return received
            except OSError:
                data, ancdata = b"", []
            sender = _protocol.sender(ancdata) if ancdata else None
            if not data:
                if sender is not None:
                    continue  # an empty packet (credentials attached), not end-of-file
                break
            if sender is not None and sender[1] not in self.uids:
                continue
            received = True
            messages.extend(decoder.feed(data))
        self.handle(messages, conn)
        selector.unregister(conn)
        del self.conns[conn]
        self.ended.append(conn)  # see _settle
        return received

    def _settle(self, selector: selectors.BaseSelector) -> bool:
        """Apply the ends of connections, once every message sent before them
        is in: a worker's "join" for a scope sits in the worker's own
        connection (maybe not even accepted yet) while the scope's owner
        closes, and must be read first. Returns whether there were messages."""
        received = False
        for _ in range(_SETTLE_ROUNDS):
            events = selector.select(0)
            if not events:
                break
            for key, _ in events:
                if key.fileobj is self.listener:
                    self._accept(selector)
                elif self._receive(selector, key.fileobj):  # type: ignore[arg-type]
                    received = True
        ended, self.ended = self.ended, []
        for conn in ended:
            self.closed(conn)
            conn.close()
        return received

    def run(self) -> None:
        """Serve until the program is over.

        While messages flow, the tracker reads them in batches every
        ``_BATCH`` seconds instead of waiting for each: a process sending a
        message to a tracker that is not waiting pays no cross-process
        wake-up, which would otherwise cost more than creating the segment.
        After ``_IDLE`` seconds without messages it waits again (costing
        nothing while the program does not create or unlink segments). The
        pause between reads is sized for about ``_BATCH_TARGET`` messages
        a read, so that a program creating segments quickly never waits for a
        full socket buffer to drain (that made a tracked create of a small
        segment cost nearly twice as much as one with the tracker keeping up).
        """
        with selectors.DefaultSelector() as selector:
            selector.register(self.listener, selectors.EVENT_READ)
            for conn in self.conns:
                selector.register(conn, selectors.EVENT_READ)
            last_message = -_IDLE
            pause = _BATCH
            while True:
                if time.monotonic() - last_message < _IDLE:
                    time.sleep(pause)
                    timeout: Optional[float] = 0
                else:
                    busy = self.watched or any(self.recent)
                    timeout = None if self.conns and not busy else _POLL
                self.received = 0
                for key, _ in selector.select(timeout):
                    if key.fileobj is self.listener:
                        self._accept(selector)
                    elif self._receive(selector, key.fileobj):  # type: ignore[arg-type]
                        last_message = time.monotonic()
                if self.ended and self._settle(selector):
                    last_message = time.monotonic()
                if self.received:
                    pause = min(_BATCH, max(_BATCH_MIN, pause * _BATCH_TARGET / self.received))
                else:  # (gradually: bursts of creations come with short gaps)
                    pause = min(_BATCH, pause * 2)
                if any(self.recent):
                    self._verify()
                self.journal.flush(self.entries)
                # Before deciding, take in whoever connected meanwhile.
                if not self.conns and not self.still_running() and not selector.select(0):
                    return

    def destroy(self, key: Key, msg: dict[str, Any]) -> None:
        """Destroy one registered segment, if it is still the one registered.

        Only by identity: the one registered, or for a backend whose names
        are random (nobody else has them) what the name holds now, the
        registration having come from a process of the program. A taken-over
        entry (:meth:`_take_over`) goes by its journaled identity only, and
        one without is left alone, as is a name anyone may choose registered
        without identity: a later object may have that name."""
        from .. import backends

        backend_name, ident = key
        try:
            if msg.get("m") and backend_name not in backends.registry:
                _load_backend(backends, backend_name, str(msg["m"]), msg.get("p") or [])
            backend = backends.get(backend_name)
            identity = None if msg.get("seen") else msg.get("id")
            if identity is None:
                if msg.get("adopted") or not backend.unique_names:
                    return
                identity = backend.identity(ident)
                if identity is None:
                    return  # gone already
            backend.destroy(ident, str(identity))
        except Exception:
            pass

    def cleanup(self) -> None:
        """Destroy everything still registered (the program is over), then
        remove the journal: nothing is left for ``mpshm gc`` to do."""
        self.journal.flush(self.entries)
        for key, msg in list(self.entries.items()):
            self.destroy(key, msg)
        self.journal.close(remove=True)
        try:
            prune_journals()
        except Exception:
            pass


def prune_journals() -> None:
    """Remove the journals of dead trackers that name no existing segment
    (left by a tracker that was killed and replaced): nothing to clean up."""
    from .. import backends

    for journal in _journal.read_all():
        started = journal.header.get("t")
        if journal.pid is None or not isinstance(started, (int, float)):
            continue
        if alive(journal.pid, float(started)):
            continue  # that tracker is alive
        for backend, ident in journal.entries:
            if backend not in backends.registry or backends.get(backend).identity(ident):
                break  # something is left (or unknown): for ``mpshm gc`` to judge
        else:
            try:
                os.unlink(journal.path)
            except OSError:
                pass


def _entry(msg: _protocol.Message) -> dict[str, Any]:
    """The registration *msg* makes, as the tracker holds and journals it,
    stamped with the time it was read."""
    return {"op": msg.op, "b": msg.backend, "i": msg.ident, "id": msg.identity,
            "pid": msg.pid, **msg.extra, "t": time.time()}


def _load_backend(backends: Any, name: str, spec: str, path: list[str]) -> None:
    """Make a third-party backend known here, as the registering process had it."""
    for entry in path:
        if entry not in sys.path:
            sys.path.append(entry)
    module_name, _, qualname = spec.partition(":")
    importlib.import_module(module_name)  # may register the backend itself
    if name not in backends.registry and qualname and "<locals>" not in qualname:
        backends.register(name, f"{module_name}:{qualname}")


def main(argv: Optional[list[str]] = None) -> None:
    """Run the tracker, or a delivery helper (see the module docstring)."""
    args = sys.argv[1:] if argv is None else argv
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)
    if args and args[0] == "deliver":
        from . import _deliver

        _deliver(int(args[1]), int(args[2]))
        return
    adopt: list[str] = []
    while "--adopt" in args:
        at = args.index("--adopt")
        adopt.append(args[at + 1])
        args = args[:at] + args[at + 2 :]
    conn = socket.socket(fileno=int(args[0]))
    listener = socket.socket(fileno=int(args[1]))
    parent = int(args[2]) if len(args) > 2 else None
    tracker = Tracker(conn, listener, parent, adopt)
    try:
        tracker.run()
    finally:
        listener.close()
        tracker.cleanup()
        address = os.environ.get("MPSHM_TRACKER", "")
        if address.startswith("/"):
            try:
                os.unlink(address)
            except OSError:
                pass


if __name__ == "__main__":
    main()
