"""The tracker process: ``python -m mpshm._tracker CONN_FD LISTEN_FD [PARENT_PID]``.

Started by :mod:`mpshm.tracking`; not meant to be run by hand. It reads
register/unregister messages, waits until the program that started it is
over (see :mod:`mpshm.tracking` for how it tells), destroys what is still
registered, and exits. It writes nothing to stdout or stderr.
"""

from __future__ import annotations

import collections
import importlib
import os
import selectors
import signal
import socket
import struct
import sys
import time
from typing import Any, Iterable, Optional

from . import _journal, _protocol

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


def carriers(needles: Iterable[bytes]) -> dict[bytes, dict[int, str]]:
    """For each of *needles* (``MPSHM_TRACKER=<address>``), the living processes
    whose environment carries it, as pid -> start time (one pass over /proc)."""
    wanted = set(needles)
    found: dict[bytes, dict[int, str]] = {}
    me = os.getpid()
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
        for needle in wanted & env:
            start = start_time(pid)
            if start is not None:
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


def _peer(conn: socket.socket) -> tuple[Optional[int], Optional[int]]:
    """(pid, uid) of the process at the other end of *conn* (for a socket
    pair: the process that made it), None where unknown."""
    if not hasattr(socket, "SO_PEERCRED"):
        return None, os.getuid()
    fmt = "3i"
    try:
        creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize(fmt))
    except OSError:
        return None, None
    pid, uid, _gid = struct.unpack(fmt, creds)
    return int(pid), int(uid)


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


class Tracker:
    """The registry of one program's tracked segments."""

    def __init__(self, conn: socket.socket, listener: socket.socket, parent: Optional[int]) -> None:
        self.listener = listener
        self.conns: dict[socket.socket, _protocol.Decoder] = {conn: _protocol.Decoder()}
        self.entries: dict[tuple[str, str], dict[str, Any]] = {}
        # Entries registered with "own": destroyed when that connection closes.
        self.owners: dict[tuple[str, str], socket.socket] = {}
        # Scope tokens announced with "scope": the connection that owns each.
        self.scopes: dict[str, socket.socket] = {}
        # Keys unregistered before they were registered: a "join" (always a
        # fresh random name) sent on one connection can be read after the
        # "unreg" of the process that took the segment over, sent on another.
        self.gone: collections.OrderedDict[tuple[str, str], None] = collections.OrderedDict()
        # Connections that ended, to apply once what came before is read (_settle).
        self.ended: list[socket.socket] = []
        self.needle = f"MPSHM_TRACKER={os.environ.get('MPSHM_TRACKER', '')}".encode()
        self.watched: dict[int, str] = {}
        #: Messages read in the current round (see :meth:`run`).
        self.received = 0
        if parent is not None:
            start = start_time(parent)
            if start is not None:
                self.watched[parent] = start
        me = os.getpid()
        self.journal = _journal.Writer(
            {"pid": me, "t": started_at(me) or time.time(), "address": os.environ.get(
                "MPSHM_TRACKER", ""), "starter": _peer(conn)[0], "parent": parent}
        )

    def handle(self, messages: list[dict[str, Any]], conn: Optional[socket.socket] = None) -> None:
        """Apply the register/unregister messages that came on *conn*.

        A segment registered and unregistered within the same batch (created
        and unlinked between two reads) is never journaled: that saves the
        identity lookup and two journal lines per short-lived segment."""
        self.received += len(messages)
        last_unreg = {(m["b"], m["i"]): n for n, m in enumerate(messages) if m["op"] == "unreg"}
        unjournaled: set[tuple[str, str]] = set()
        for n, msg in enumerate(messages):
            key = (msg["b"], msg["i"])
            op = msg["op"]
            if op == "scope":
                if conn is not None:
                    token = msg["i"]
                    self.scopes[token] = conn
                    # "join"s that were read before the announcement (another
                    # connection's messages may be read first).
                    for joined, entry in self.entries.items():
                        if entry.get("s") == token and joined not in self.owners:
                            self.owners[joined] = conn
            elif op == "join" and key in self.gone:
                continue  # taken over and unlinked already
            elif op in ("reg", "own", "join"):
                msg["t"] = time.time()
                if key not in self.entries and last_unreg.get(key, -1) > n:
                    unjournaled.add(key)
                elif key not in unjournaled:
                    self._journal_put(key, msg)
                self.entries[key] = msg
                owner = conn if op == "own" else None
                if op == "join":  # owned by the scope it names, while that is open
                    owner = self.scopes.get(str(msg.get("s")))
                if owner is not None:
                    self.owners[key] = owner
                else:
                    self.owners.pop(key, None)
            elif op == "unreg":
                removed = self.entries.pop(key, None)
                self.owners.pop(key, None)
                if removed is not None:
                    if key not in unjournaled:
                        self.journal.drop(key)
                    unjournaled.discard(key)
                else:
                    removed = {"op": "join"}  # unknown: as a join
                if removed["op"] == "join":
                    # A "join" is a fresh random name, registered once or
                    # twice (SysV adds its identity): any that is read
                    # after this is stale.
                    self.gone[key] = None
                    if len(self.gone) > _GONE:
                        self.gone.popitem(last=False)

    def _journal_put(self, key: tuple[str, str], msg: dict[str, Any]) -> None:
        """Journal a registration with the storage object's identity, so that
        ``mpshm gc`` can tell it from a later object of the same name. Backends
        with random names send none (they need none to be destroyed safely):
        it is looked up here, off the creating process's path. A segment
        already gone is not journaled (a later one of its name is not ours)."""
        if msg.get("id") is None and not msg.get("m"):
            from . import backends

            try:
                backend = backends.get(key[0])
                if backend.unique_names:
                    identity = backend.identity(key[1])
                    if identity is None:
                        return
                    msg = {**msg, "id": identity}
            except Exception:
                pass
        self.journal.put(key, msg)

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
        self.watched = carriers([self.needle]).get(self.needle, {})
        return bool(self.watched)

    def _accept(self, selector: selectors.BaseSelector) -> None:
        try:
            conn, _ = self.listener.accept()
        except OSError:
            return
        if _peer(conn)[1] != os.getuid():  # only our own user may talk to us
            conn.close()
            return
        self.conns[conn] = _protocol.Decoder()
        selector.register(conn, selectors.EVENT_READ)

    def _receive(self, selector: selectors.BaseSelector, conn: socket.socket) -> bool:
        """Read what *conn* has queued; return whether there were messages."""
        decoder = self.conns[conn]
        messages: list[dict[str, Any]] = []
        received = False
        while True:  # drain what is queued, one packet (or chunk) at a time
            try:
                data = conn.recv(1 << 16, socket.MSG_DONTWAIT)
            except BlockingIOError:
                self.handle(messages, conn)
                return received
            except OSError:
                data = b""
            if not data:
                break
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
                    timeout = None if self.conns and not self.watched else _POLL
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
                self.journal.flush(self.entries)
                # Before deciding, take in whoever connected meanwhile.
                if not self.conns and not self.still_running() and not selector.select(0):
                    return

    def destroy(self, key: tuple[str, str], msg: dict[str, Any]) -> None:
        """Destroy one registered segment, if it is still the one registered."""
        from . import backends

        backend_name, ident = key
        try:
            if msg.get("m") and backend_name not in backends.registry:
                _load_backend(backends, backend_name, str(msg["m"]), msg.get("p") or [])
            backends.get(backend_name).destroy(ident, msg.get("id"))
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
    from . import backends

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
    """Run the tracker (see the module docstring)."""
    args = sys.argv[1:] if argv is None else argv
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)
    conn = socket.socket(fileno=int(args[0]))
    listener = socket.socket(fileno=int(args[1]))
    parent = int(args[2]) if len(args) > 2 else None
    tracker = Tracker(conn, listener, parent)
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
