"""Who owns what: destroying tracked segments once their program is over.

A segment created with ``track=True`` (the default) is registered with the
*tracker* of the program that made it: one small process per program,
started on the first tracked creation. The tracker destroys every segment
still registered once the program is over, that is when the process that
started the tracker and every process that descends from it have ended,
however they ended (SIGKILL included). ``unlink()`` unregisters.

How the tracker knows the program is over:

* the process that starts it holds one end of a socket pair; processes
  forked from it inherit that end, so the tracker sees end-of-file only when
  all of them are gone;
* processes started with ``spawn``/``forkserver``/``subprocess`` find the
  tracker through the ``MPSHM_TRACKER`` environment variable and connect
  when they create or unlink a tracked segment;
* when no connection is left, the tracker looks for living processes of
  its user that still carry its ``MPSHM_TRACKER`` value in their environment
  (spawned children that never connected) and waits for them too (another
  user's process carrying it does not count: anyone can read the address);
* a ``multiprocessing`` child that starts a tracker of its own (its parent
  had none yet) also waits for that parent.

A tracker and its clients talk only to their own user. A client checks who
listens at the address before it says anything (another user can bind the
address of a tracker that died: addresses are in /proc/net/unix), and the
tracker drops every message whose sender is another user, including one
that changed user after inheriting a connection.

If the tracker dies (the OOM killer), the next process of the program that
registers something starts a replacement. The replacement takes over what
the dead tracker had journaled (the segments of processes that have exited
since included), waits for the processes of the old program as well as its
own, and each process hands it what it holds.

Sending to the tracker never blocks for long: a tracker that reads nothing
(stopped with SIGSTOP, say) costs a process about a second of waiting in
all, and one RuntimeWarning; what could not be sent stays queued and is
sent on later calls, and what is still queued when the process ends is
handed to a helper process that delivers it once the tracker reads again.

A :class:`Scope` registers segments on a connection of its own instead: the
tracker destroys those as soon as that connection closes, which is how a
manager's server makes its segments die with it.

The tracker also journals what it holds to a file of its own (see
:mod:`mpshm.tracking.journal`), and removes the file once it has cleaned up. If the
tracker is killed together with its program (``kill -9 -1``, a container
stopped, the OOM killer), nothing is left to destroy the program's tracked
segments; the journal it leaves behind lets ``mpshm gc`` find and destroy
them, once no living process maps them. ``mpshm list`` shows, for each
segment, whether a tracker holds it and whether that tracker is alive.

Nothing here touches ``multiprocessing``'s resource tracker. Processes that
only attach never register anything, so they never destroy a segment
(CPython gh-82300). Before destroying, the tracker checks that the name
still refers to the object that was registered (inode, SysV id), so a name
that someone else reused meanwhile is left alone.
"""

from __future__ import annotations

import atexit
import collections
import math
import multiprocessing
import os
import pickle
import secrets
import select
import socket
import subprocess
import sys
import threading
import time
import types
import warnings
import weakref
from typing import TYPE_CHECKING, Any, Optional

from . import protocol as _protocol

if TYPE_CHECKING:
    from ..backends import Backend

__all__ = [
    "ENV_VAR",
    "Member",
    "Scope",
    "ensure_running",
    "register",
    "tracked",
    "tracker_pid",
    "unregister",
]

#: Environment variable naming the tracker of this program.
ENV_VAR = "MPSHM_TRACKER"


def _socket_type() -> int:
    """SOCK_SEQPACKET where Unix sockets have it (Linux: each message arrives
    whole even when forked processes share a socket), else SOCK_STREAM."""
    kind = getattr(socket, "SOCK_SEQPACKET", None)
    if kind is None:
        return socket.SOCK_STREAM
    try:
        a, b = socket.socketpair(socket.AF_UNIX, kind)
    except OSError:
        return socket.SOCK_STREAM
    a.close()
    b.close()
    return int(kind)


_SOCK_TYPE = _socket_type()


Key = tuple[str, str]

#: Seconds that a stalled tracker may cost a process in all, not per message,
#: before it stops waiting (see :class:`_Client`). A tracker that keeps up
#: drains a full socket within milliseconds.
_STALL_BUDGET = 1.0
_SEND_FLAGS = getattr(socket, "MSG_NOSIGNAL", 0) | getattr(socket, "MSG_DONTWAIT", 0)


def _address_to_env(address: str) -> str:
    return address[1:] if address.startswith("\0") else address


def _address_from_env(value: str) -> str:
    return value if value.startswith("/") else "\0" + value


class _Client:
    """A connection to this program's tracker. *op* is what registrations
    say: ``reg`` (destroy when the program is over) or ``own`` (destroy as
    soon as this connection closes).

    Who listens is checked before anything is said: only a tracker of this
    process's own (effective) user will do. Another user can bind the
    address of a tracker that died (the addresses are public), so a tracker
    found gone is never called again: a replacement is started instead,
    which takes over what the dead one journaled.

    Sending never blocks for long. What the socket cannot take at once is
    queued, in order, and sent on later calls (:meth:`_drain`). A tracker
    that reads nothing (stopped, say) costs this process at most
    ``_STALL_BUDGET`` seconds of waiting in all, then one RuntimeWarning;
    what is still queued when the process ends (or a scope closes) is handed
    to a helper process that waits for the tracker (:func:`_deliver`).
    """

    def __init__(self, op: str = "reg", extra: Optional[dict[str, str]] = None) -> None:
        self._op = op
        self._extra = extra
        # Reentrant: a segment freed by a weakref callback (a slab, say) may
        # unregister while this thread is in the middle of a send.
        self._lock = threading.RLock()
        self._sock: Optional[socket.socket] = None
        # The address (environment form) that _sock reaches, and the effective
        # uid this process had when it checked who listens there.
        self._address: Optional[str] = None
        self._euid = -1
        # The address of a tracker found gone: never to be called again.
        self._gone: Optional[str] = None
        self._pid: Optional[int] = None  # the tracker this process started
        self._tracker_pid: Optional[int] = None  # the one _sock reaches, if known
        self._greeting: Optional[bytes] = None  # said first on every connection
        # Registrations made by this process: (backend, ident) -> message.
        self._held: dict[Key, bytes] = {}
        # Messages not sent yet, in order: number -> (data, key, is a registration).
        self._pending: collections.OrderedDict[int, tuple[bytes, Optional[Key], bool]] = (
            collections.OrderedDict()
        )
        self._seq = 0
        self._queued_by = 0  # the pid whose messages _pending holds
        # Keys whose registrations are all still queued: their numbers in
        # _pending (an unregistration then just drops them, unsent).
        self._unsent: dict[Key, list[int]] = {}
        # Unregistrations that no tracker got (it was gone, or not accepting
        # yet): for the next connection, which may have taken over the journal.
        self._orphans: dict[Key, bytes] = {}
        # Seconds a stall may cost us in all (a helper waits for ever), and
        # what is left of them in the current stall.
        self._patience = _STALL_BUDGET
        self._budget = self._patience
        self._warned = False
        self._busy = False  # the tracker's listen queue is full: connect again later
        self._replacing = False  # (see _lost)
        _clients.add(self)

    def _after_fork(self) -> None:
        # The inherited socket still reaches the parent's tracker (sharing it
        # is what keeps the tracker waiting for us). Our registrations start
        # empty: the parent's belong to the parent, and so does its queue.
        self._lock = threading.RLock()
        self._held = {}
        self._pid = None
        self._pending = collections.OrderedDict()
        self._unsent = {}
        self._orphans = {}
        self._budget = self._patience
        self._warned = False

    # -- finding the tracker --------------------------------------------------

    def _connect(self, value: str) -> Optional[socket.socket]:
        """A connection to the tracker at *value* (environment form); None if
        nobody listens there, or a process of another user does. Raises
        BlockingIOError if the tracker is not accepting (its queue is full)."""
        sock = socket.socket(socket.AF_UNIX, _SOCK_TYPE)
        try:
            sock.setblocking(False)  # a stopped tracker's full queue must not block us
            sock.connect(_address_from_env(value))
            sock.setblocking(True)
        except BlockingIOError:
            sock.close()
            raise
        except OSError:
            sock.close()
            return None
        # The credentials of whoever made the listening socket: a tracker of
        # ours, or an impostor who bound the address after our tracker died.
        uid = _protocol.peer(sock)[1]
        if uid is not None and uid != os.geteuid():
            sock.close()
            return None
        return sock

    def _socket(self, start: bool) -> tuple[Optional[socket.socket], bool]:
        """The socket to the tracker and whether it is a new connection (made
        now, with everything this process holds queued for it). A tracker is
        started if the one this process knows of is gone (a replacement),
        or with *start* if there is none. (None, False) if there is none, or
        it is not accepting connections (then ``_busy`` is set)."""
        if self._sock is not None:
            if self._euid == os.geteuid():
                return self._sock, False
            # This process switched user since it connected: that tracker
            # is another user's now (it drops what we send): find our own.
            self._drop(gone=False)
        value = os.environ.get(ENV_VAR)
        adopt = [self._gone] if self._gone else []
        self._busy = False
        if value and value != self._gone:
            try:
                sock = self._connect(value)
            except BlockingIOError:
                self._busy = True
                _backlogged.add(self)  # (what it holds must reach it, at exit at the latest)
                _arm_exit()
                return None, False
            if sock is not None:
                self._use(sock, value, None)
                return sock, True
            adopt.append(value)  # nobody (of ours) listens there: that tracker is gone
        if not start and not adopt:
            return None, False
        sock, pid, address = self._start(adopt)
        self._pid = pid
        self._use(sock, address, pid)
        return sock, True

    def _use(self, sock: socket.socket, address: str, pid: Optional[int]) -> None:
        """Talk to the tracker on *sock* from now on: it may be new to us
        (a replacement, say), so it gets everything this process holds."""
        self._sock = sock
        self._address = address
        self._euid = os.geteuid()
        self._tracker_pid = pid
        self._pending.clear()
        self._unsent.clear()
        self._budget = self._patience
        self._warned = False
        if self._greeting is not None:
            self._queue(self._greeting, None, False)
        for key, data in self._orphans.items():  # before the registrations: see _drop
            self._queue(data, key, False)
        self._orphans = {}
        for key, data in self._held.items():
            self._queue(data, key, True)

    def _drop(self, gone: bool) -> None:
        """Stop using the socket (with *gone*, its tracker is gone for good).
        Unregistrations still queued are kept for the next tracker: a
        replacement takes over the dead one's journal, which may still hold
        those segments."""
        for data, key, reg in self._pending.values():
            if not reg and key is not None and key not in self._held:
                self._orphans[key] = data
        self._pending.clear()
        self._unsent.clear()
        if gone:
            self._gone = self._address
        sock, self._sock = self._sock, None
        if sock is not None:
            sock.close()

    def _start(self, adopt: list[str]) -> tuple[socket.socket, int, str]:
        """Start a tracker; return our end of its socket pair, its pid and its
        address (environment form). *adopt*: addresses of trackers found gone,
        whose journals it takes over."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, _SOCK_TYPE)
        listener = socket.socket(socket.AF_UNIX, _SOCK_TYPE)
        token = secrets.token_hex(12)
        if sys.platform.startswith("linux"):
            address = f"\0mpshm-tracker-{os.geteuid()}-{token}"
        else:  # no abstract sockets: a path in the private directory
            from .._paths import check_dir, default_dir

            run = os.path.join(default_dir(), ".run")
            check_dir(run, create=True)
            address = os.path.join(run, f"tracker-{token}")
        value = _address_to_env(address)
        try:
            # Credentials on every message from the first on: the tracker
            # drops those of processes of another user (see _tracker).
            _protocol.pass_credentials(theirs)
            _protocol.pass_credentials(listener)
            listener.bind(address)
            listener.listen(128)
            argv = [
                sys.executable,
                "-m",
                "mpshm.tracking.server",
                str(theirs.fileno()),
                str(listener.fileno()),
            ]
            parent = multiprocessing.parent_process()
            if parent is not None and parent.pid is not None:
                argv.append(str(parent.pid))
            for old in dict.fromkeys(adopt):
                argv += ["--adopt", old]
            pid = _launch(argv, (theirs.fileno(), listener.fileno()), value)
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
            listener.close()
        os.environ[ENV_VAR] = value
        return ours, pid, value

    # -- sending --------------------------------------------------------------

    def _send_locked(
        self,
        data: bytes,
        start: bool,
        key: Optional[Key] = None,
        reg: bool = False,
        new: bool = False,
    ) -> bool:
        """Send *data* (about *key*: a registration if *reg*, the first of its
        key if *new*), or queue it; with *start*, start a tracker if there is
        none. Returns whether a tracker has it or will (queued)."""
        sock = self._sock
        if sock is None or self._euid != os.geteuid():
            sock, fresh = self._socket(start)
            if sock is None:
                if not reg and key is not None and (self._gone or self._busy):
                    self._orphans[key] = data
                return self._await_listener(start) if self._busy else False
            if fresh and reg:  # it went with everything held (see _use)
                return self._drain(start)
        if self._pending and self._queued_by != os.getpid():  # copied by fork: the parent's
            self._pending.clear()
            self._unsent.clear()
        if not self._pending:  # the fast path: one non-blocking send
            try:
                sent = sock.send(data, _SEND_FLAGS)
            except BlockingIOError:
                sent = 0
            except OSError:
                return self._lost(start, data, key, reg)
            if sent == len(data):
                return True
            if sent:  # (a stream socket: the rest must follow as it is)
                data, key, new = data[sent:], None, False
        self._queue(data, key, reg, new)
        return self._drain(start)

    def _queue(self, data: bytes, key: Optional[Key], reg: bool, new: bool = False) -> None:
        if not self._pending:
            self._queued_by = os.getpid()
            _backlogged.add(self)
            _arm_exit()
        self._seq += 1
        self._pending[self._seq] = (data, key, reg)
        if reg and key is not None:
            if new:
                self._unsent[key] = [self._seq]
            elif key in self._unsent:
                self._unsent[key].append(self._seq)

    def _drain(self, start: bool) -> bool:
        """Send what is queued, in order. While the tracker does not read,
        wait for it, but only as long as this stall's budget lasts; then warn
        once and leave the rest queued for later calls. A tracker found gone
        is replaced (see :meth:`_lost`)."""
        while self._pending:
            sock = self._sock
            if sock is None:
                return True
            seq = next(iter(self._pending))
            data, key, reg = self._pending[seq]
            try:
                sent = sock.send(data, _SEND_FLAGS)
            except BlockingIOError:
                if self._wait(sock):
                    continue
                return True
            except OSError:
                del self._pending[seq]
                return self._lost(start, data, key, reg)
            if sent < len(data):
                self._pending[seq] = (data[sent:], None, reg)
                continue
            del self._pending[seq]
            if reg and key is not None and self._unsent:
                self._unsent.pop(key, None)
            if self._budget <= 0:  # it reads again: waiting makes sense again
                self._budget = self._patience
        self._budget = self._patience
        self._warned = False
        _backlogged.discard(self)
        return True

    def _wait(self, sock: socket.socket) -> bool:
        """Wait until *sock* can take more, within the stall budget; False
        (after the one warning) once that is spent."""
        if self._budget <= 0:
            self._stalled()
            return False
        began = time.monotonic()
        timeout = None if math.isinf(self._budget) else self._budget
        try:
            if hasattr(select, "poll"):
                poller = select.poll()
                poller.register(sock, select.POLLOUT)
                poller.poll(None if timeout is None else max(1, int(timeout * 1000)))
            else:
                select.select([], [sock], [], timeout)
        except (OSError, ValueError):
            pass
        self._budget -= time.monotonic() - began
        return True

    def _await_listener(self, start: bool) -> bool:
        """The tracker is not accepting connections: try again, within the
        stall budget. What this process holds goes on the connection once
        made (see :meth:`_use`)."""
        while self._budget > 0:
            began = time.monotonic()
            time.sleep(0.01 if math.isinf(self._budget) else min(0.01, self._budget))
            self._budget -= time.monotonic() - began
            sock, _fresh = self._socket(start)
            if sock is not None:
                return self._drain(start)
            if not self._busy:
                return False
        self._stalled()
        return True

    def _lost(self, start: bool, data: bytes, key: Optional[Key], reg: bool) -> bool:
        """The tracker is gone (killed?): *data* could not be sent. Start a
        replacement (whatever *start* says: the program is still going), which
        takes over the dead tracker's journal and gets everything this
        process holds, *data* included."""
        if not reg and key is not None and key not in self._held:
            self._orphans[key] = data
        self._drop(gone=True)
        if self._replacing:  # the replacement died at once: do not start them forever
            raise ConnectionError("the segment tracker exited as soon as it started")
        self._replacing = True
        try:
            self._socket(start=True)
            return self._drain(start)
        finally:
            self._replacing = False

    def _stalled(self) -> None:
        """Warn (once per stall) that the tracker does not read."""
        if self._warned:
            return
        self._warned = True
        pid = self._tracker_pid or _find_tracker_pid(self._address)
        warnings.warn(
            f"mpshm's segment tracker{f' (pid {pid})' if pid else ''} has not read what this "
            f"process sent it for {self._patience:g} s (is it stopped?); going on without "
            f"waiting for it. The registrations it has not read yet stay queued here and "
            f"reach it once it reads again (or through a helper process if this one ends "
            f"first); until they do, a segment they name is not destroyed if the program is "
            f"killed",
            RuntimeWarning,
            stacklevel=_caller_level(),
        )

    def _finish(self) -> None:
        """This process ends (or closes the connection): send what is still
        queued, waiting only for what is left of the stall budget, and hand
        the rest to a helper process that waits for the tracker."""
        # Bounded: a daemon thread may hold the lock forever at exit.
        if not self._lock.acquire(timeout=_STALL_BUDGET):
            return
        try:
            if self._pending and self._queued_by != os.getpid():
                return  # copied by fork: the parent's to deliver
            if self._pending and self._sock is not None:
                self._drain(start=False)
            if self._pending or (self._busy and (self._held or self._orphans)):
                self._hand_off()
        finally:
            self._lock.release()

    def _hand_off(self) -> None:
        """Give what is queued (and held) to a helper process, with a copy of
        the connection: it delivers it however long the tracker takes."""
        state = {
            "op": self._op,
            "extra": self._extra,
            "address": self._address,
            "gone": self._gone,
            "tracker_pid": self._tracker_pid,
            "greeting": self._greeting,
            "held": self._held,
            "orphans": self._orphans,
            "pending": list(self._pending.values()),
        }
        fds: tuple[int, ...] = ()
        sock_fd = -1
        if self._sock is not None:
            sock_fd = self._sock.fileno()
            fds = (sock_fd,)
        left = len(self._pending) or len(self._held)
        try:
            read_end, write_end = os.pipe()
            try:
                _launch(
                    [sys.executable, "-m", "mpshm.tracking.server", "deliver", str(sock_fd),
                     str(read_end)],
                    (*fds, read_end),
                    os.environ.get(ENV_VAR, ""),
                )
            finally:
                os.close(read_end)
            with os.fdopen(write_end, "wb") as pipe:
                pickle.dump(state, pipe)
        except Exception as exc:
            warnings.warn(
                f"mpshm could not hand {left} message(s) for its stalled segment tracker to a "
                f"helper process ({exc}); the segments they name will not be destroyed "
                f"automatically",
                RuntimeWarning,
                stacklevel=2,
            )
        # The helper has it all now, and its own copy of the connection.
        self._let_go()

    def _let_go(self) -> None:
        """Forget what is queued and close the connection."""
        self._pending.clear()
        self._unsent.clear()
        self._orphans = {}
        _backlogged.discard(self)
        sock, self._sock = self._sock, None
        if sock is not None:
            sock.close()

    # -- the interface ----------------------------------------------------------

    def register(self, backend: Backend, ident: str, identity: Optional[str]) -> bool:
        extra: Optional[dict[str, Any]] = dict(self._extra) if self._extra else None
        spec = backend.import_spec()
        if spec is not None:  # a third-party backend: tell the tracker how to load it
            extra = dict(extra or {})
            extra.update(m=spec, p=[os.path.abspath(p or os.curdir) for p in sys.path])
        data = _protocol.encode(self._op, backend.name, ident, identity, extra)
        key = (backend.name, ident)
        with self._lock:
            new = key not in self._held
            self._held[key] = data
            if self._orphans:
                self._orphans.pop(key, None)
            try:
                return self._send_locked(data, True, key, True, new)
            except Exception as exc:  # the tracker could not be started or reached
                warnings.warn(
                    f"mpshm could not reach its segment tracker ({exc}); the segment "
                    f"{ident!r} will not be destroyed automatically",
                    RuntimeWarning,
                    stacklevel=4,
                )
                return False

    def unregister(self, backend: str, ident: str, identity: Optional[str] = None) -> None:
        key = (backend, ident)
        with self._lock:
            self._held.pop(key, None)
            if self._unsent:
                numbers = self._unsent.pop(key, None)
                if numbers is not None:  # the tracker never heard of it: nothing to say
                    for number in numbers:
                        self._pending.pop(number, None)
                    return
            data = _protocol.encode("unreg", backend, ident, identity)
            try:
                self._send_locked(data, False, key)
            except Exception:  # no tracker to be had: for the next one, if any
                if self._gone:
                    self._orphans[key] = data

    def tracked(self) -> list[tuple[str, str]]:
        with self._lock:
            return list(self._held)

    def ensure_connected(self, greeting: Optional[bytes] = None) -> None:
        with self._lock:
            if greeting is not None and greeting != self._greeting:
                self._greeting = greeting
                if self._sock is not None:  # connected already: say it now
                    self._send_locked(greeting, True)
                    return
            if self._sock is None or self._euid != os.geteuid():
                sock, fresh = self._socket(start=True)
                if sock is None and self._busy:
                    self._await_listener(True)
                elif fresh:
                    self._drain(True)

    def close(self, deliver: bool = True) -> None:
        """Close the connection; what is still queued is delivered first
        (by a helper if need be), unless *deliver* is false."""
        with self._lock:
            if deliver:
                self._finish()
            self._held = {}
            self._let_go()

    def pid(self) -> Optional[int]:
        return self._pid


#: Held while this process starts a program (a tracker, a helper) and while
#: mpshm's pools fork a worker (:mod:`mpshm.pool`): a process forked in
#: between, and not exec'd, would inherit the pipe on which
#: :mod:`subprocess` waits for the program's exec, and the start would wait
#: for ever (two threads of a program, one starting the first tracker while
#: the other starts a pool, say). Renewed in a forked child.
fork_lock = threading.Lock()


def _renew_fork_lock() -> None:
    global fork_lock
    fork_lock = threading.Lock()


os.register_at_fork(after_in_child=_renew_fork_lock)


def _launch(argv: list[str], fds: tuple[int, ...], address: str) -> int:
    """Start ``argv`` (a tracker or a helper) with *fds* open and
    ``MPSHM_TRACKER=address``, detached; return its pid. Through sh, so that
    it is not our child: it outlives us without a zombie or a "subprocess
    still running" warning."""
    env = dict(os.environ)
    env[ENV_VAR] = address
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    with fork_lock:
        launcher = subprocess.run(
            ["/bin/sh", "-c", '"$@" </dev/null >/dev/null 2>&1 & echo $!', "sh", *argv],
            pass_fds=fds,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
            env=env,
            check=True,
        )
    return int(launcher.stdout.split()[0])


def _find_tracker_pid(address: Optional[str]) -> Optional[int]:
    """Pid of the living tracker at *address*, from its journal (for messages)."""
    if not address:
        return None
    try:
        from .._sysinfo import alive
        from . import journal as _journal

        for journal in _journal.read_all():
            started = journal.header.get("t")
            if journal.header.get("address") == address and alive(
                journal.pid, started if isinstance(started, (int, float)) else None
            ):
                return journal.pid
    except Exception:
        pass
    return None


def _caller_level() -> int:
    """A warnings stack level that points at the first caller outside mpshm."""
    here = os.path.dirname(os.path.abspath(__file__)) + os.sep
    frame: Optional[types.FrameType] = sys._getframe(2)
    level = 2
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(here):
        frame = frame.f_back
        level += 1
    return level


def _deliver(sock_fd: int, pipe_fd: int) -> None:
    """The helper's work (``python -m mpshm.tracking.server deliver``): deliver what
    a process that ended could not, waiting as long as the tracker takes.
    Holding the connection meanwhile, it keeps the tracker waiting for the
    program (or a scope open) until the tracker has it all. If the tracker is
    gone, it starts a replacement, as the process would have."""
    with os.fdopen(pipe_fd, "rb") as pipe:
        state = pickle.load(pipe)
    client = _Client(state["op"], state["extra"])
    client._greeting = state["greeting"]
    client._held = state["held"]
    client._orphans = state["orphans"]
    client._gone = state["gone"]
    client._patience = client._budget = math.inf  # nobody waits for us: no hurry
    client._warned = True  # (and nobody would see a warning)
    with client._lock:
        try:
            if sock_fd >= 0:
                client._sock = socket.socket(fileno=sock_fd)
                client._address = state["address"]
                client._euid = os.geteuid()
                client._tracker_pid = state["tracker_pid"]
                for data, key, reg in state["pending"]:
                    client._queue(data, key, reg)
                client._drain(start=True)
            else:
                sock, fresh = client._socket(start=True)
                if sock is None and client._busy:
                    client._await_listener(True)
                elif fresh:
                    client._drain(True)
        finally:  # (never handed on again: one helper, one try)
            client.close(deliver=False)


#: Every client of this process (so that a fork resets them all).
_clients: weakref.WeakSet[_Client] = weakref.WeakSet()
#: Clients with messages queued, to deliver at exit.
_backlogged: weakref.WeakSet[_Client] = weakref.WeakSet()
_exit_armed = 0  # pid of the process whose multiprocessing exit hook is set


def _at_exit() -> None:
    for client in list(_backlogged):
        try:
            client._finish()
        except Exception:
            pass


def _arm_exit() -> None:
    """Make sure this process delivers its queue when it ends: at interpreter
    exit (atexit, set at import), or, in a multiprocessing child (which ends
    with os._exit), among multiprocessing's exit finalizers."""
    global _exit_armed
    if _exit_armed == os.getpid():
        return
    _exit_armed = os.getpid()
    if multiprocessing.parent_process() is not None:
        from multiprocessing import util

        util.Finalize(None, _at_exit, exitpriority=-(1 << 20))


def _after_fork_in_child() -> None:
    for client in list(_clients):
        if client is not _client:
            client._after_fork()


atexit.register(_at_exit)
_client = _Client()
# (The os module holds the bound method to the very end of the interpreter,
# and with it the main client: its socket is never collected, with a
# ResourceWarning, while module globals are cleared.)
os.register_at_fork(after_in_child=_client._after_fork)
os.register_at_fork(after_in_child=_after_fork_in_child)


def ensure_running() -> None:
    """Start this program's tracker now if it has none yet.

    Call it before starting long-lived helper processes (a manager's server,
    say) so that they find the tracker in their environment and the program
    keeps a single one.
    """
    _client.ensure_connected()


def _close_scopes_after_fork() -> None:
    # A forked child must not hold its parent's scope connections open: the
    # tracker would then wait for the child before destroying what the parent
    # owned when the parent dies.
    for scope in list(_scopes):
        scope._client.close(deliver=False)


_scopes: weakref.WeakSet[Scope] = weakref.WeakSet()
os.register_at_fork(after_in_child=_close_scopes_after_fork)


class Scope:
    """Registrations that end with a connection of their own.

    Segments registered here are destroyed by the tracker as soon as this
    object's connection to it closes without having unregistered them: on
    :meth:`close`, or when this process ends in any way (SIGKILL included),
    not when the whole program is over. A manager's server uses one, so that
    its segments die with it while the program that started it goes on.
    The connection is made (and the tracker started if there is none) on
    the first registration or :meth:`connect`.
    """

    def __init__(self) -> None:
        self._client = _Client(op="own")
        #: Names this scope to other processes of the program (see :class:`Member`).
        self.token = secrets.token_hex(12)
        self._pid = os.getpid()
        self._closed = False
        _scopes.add(self)

    def connect(self) -> None:
        """Connect to the tracker now (starting one if this program has none)."""
        self._client.ensure_connected(_protocol.encode("scope", "", self.token, None))

    def register(self, backend: Backend, ident: str, identity: Optional[str] = None) -> bool:
        """Like :func:`register`, but bound to this scope's connection."""
        if not self.alive():
            raise RuntimeError("a Scope can only be used by the process that made it")
        self.connect()
        return self._client.register(backend, ident, identity)

    def alive(self) -> bool:
        """Whether this process owns the scope's connection (not a forked copy)."""
        return os.getpid() == self._pid

    def unregister(self, backend: str, ident: str, identity: Optional[str] = None) -> None:
        """Like :func:`unregister`: the segment was unlinked, or is handed on."""
        if not self._closed:  # once closed, the tracker forgot the scope anyway
            self._client.unregister(backend, ident, identity)

    def close(self) -> None:
        """Close the connection: the tracker destroys what is still registered."""
        self._closed = True
        self._client.close()


class Member:
    """Registrations that another process's :class:`Scope` owns.

    A process of the same program (a pool worker, say) registers the
    segments it creates for the scope's owner here, by the scope's
    :attr:`Scope.token`: the tracker destroys them when the *scope* closes
    (or its process dies), not when this process does, so a segment handed
    to the owner survives its creator. If the scope is already closed, they
    are destroyed when the program is over.
    """

    def __init__(self, token: str) -> None:
        self._client = _Client(op="join", extra={"s": token})

    def register(self, backend: Backend, ident: str, identity: Optional[str] = None) -> bool:
        """Register a segment for the scope's owner."""
        return self._client.register(backend, ident, identity)

    def unregister(self, backend: str, ident: str, identity: Optional[str] = None) -> None:
        """The segment was destroyed after all."""
        self._client.unregister(backend, ident, identity)


def register(backend: Backend, ident: str, identity: Optional[str] = None) -> bool:
    """Register a segment this process created with its program's tracker.

    *ident* is the canonical identifier on *backend* and *identity* what
    :meth:`~mpshm.backends.Backend.identity` returned right after creation
    (None if not known yet). Registering the same segment again updates it.
    A third-party backend's class is named to the tracker, which imports it
    with this process's ``sys.path``. Returns whether the tracker got the
    registration (if not, a RuntimeWarning says so).
    """
    return _client.register(backend, ident, identity)


def unregister(backend: str, ident: str, identity: Optional[str] = None) -> None:
    """Tell the tracker that a segment was unlinked; it will not destroy it.

    With *identity*, withdraw only this process's registration of that
    identity (a creation that lost a race for the name): another process's
    registration of the same name stays."""
    _client.unregister(backend, ident, identity)


def tracked() -> list[tuple[str, str]]:
    """The ``(backend, ident)`` pairs this process registered and not unlinked."""
    return _client.tracked()


def tracker_pid() -> Optional[int]:
    """Pid of the tracker this process started, or None if it started none."""
    return _client.pid()
