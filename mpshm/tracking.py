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
* when no connection is left, the tracker looks for living processes that
  still carry its ``MPSHM_TRACKER`` value in their environment (spawned
  children that never connected) and waits for them too;
* a ``multiprocessing`` child that starts a tracker of its own (its parent
  had none yet) also waits for that parent.

A :class:`Scope` registers segments on a connection of its own instead: the
tracker destroys those as soon as that connection closes, which is how a
manager's server makes its segments die with it.

The tracker also journals what it holds to a file of its own (see
:mod:`mpshm._journal`), and removes the file once it has cleaned up. If the
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

import multiprocessing
import os
import secrets
import socket
import subprocess
import sys
import threading
import warnings
import weakref
from typing import TYPE_CHECKING, Any, Optional

from . import _protocol

if TYPE_CHECKING:
    from .backends import Backend

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


def _address_to_env(address: str) -> str:
    return address[1:] if address.startswith("\0") else address


def _address_from_env(value: str) -> str:
    return value if value.startswith("/") else "\0" + value


class _Client:
    """A connection to this program's tracker. *op* is what registrations
    say: ``reg`` (destroy when the program is over) or ``own`` (destroy as
    soon as this connection closes)."""

    def __init__(self, op: str = "reg", extra: Optional[dict[str, str]] = None) -> None:
        self._op = op
        self._extra = extra
        # Reentrant: a segment freed by a weakref callback (a slab, say) may
        # unregister while this thread is in the middle of a send.
        self._lock = threading.RLock()
        self._sock: Optional[socket.socket] = None
        self._pid: Optional[int] = None
        # Registrations made by this process: (backend, ident) -> message.
        self._held: dict[tuple[str, str], bytes] = {}

    def _after_fork(self) -> None:
        # The inherited socket still reaches the parent's tracker (sharing it
        # is what keeps the tracker waiting for us). Our registrations start
        # empty: the parent's belong to the parent.
        self._lock = threading.RLock()
        self._held = {}
        self._pid = None

    def _connect_env(self) -> Optional[socket.socket]:
        value = os.environ.get(ENV_VAR)
        if not value:
            return None
        sock = socket.socket(socket.AF_UNIX, _SOCK_TYPE)
        try:
            sock.connect(_address_from_env(value))
        except OSError:
            sock.close()
            return None
        return sock

    def _start(self) -> socket.socket:
        ours, theirs = socket.socketpair(socket.AF_UNIX, _SOCK_TYPE)
        listener = socket.socket(socket.AF_UNIX, _SOCK_TYPE)
        token = secrets.token_hex(12)
        if sys.platform.startswith("linux"):
            address = f"\0mpshm-tracker-{os.getuid()}-{token}"
        else:  # no abstract sockets: a path in the private directory
            from .backends.mmapfile import check_dir, default_dir

            run = os.path.join(default_dir(), ".run")
            check_dir(run, create=True)
            address = os.path.join(run, f"tracker-{token}")
        try:
            listener.bind(address)
            listener.listen(128)
            env = dict(os.environ)
            env[ENV_VAR] = _address_to_env(address)
            root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
            env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
            argv = [
                sys.executable,
                "-m",
                "mpshm._tracker",
                str(theirs.fileno()),
                str(listener.fileno()),
            ]
            parent = multiprocessing.parent_process()
            if parent is not None and parent.pid is not None:
                argv.append(str(parent.pid))
            # Through sh, so that the tracker is not our child: it outlives us
            # without a zombie or a "subprocess still running" warning.
            launcher = subprocess.run(
                ["/bin/sh", "-c", '"$@" </dev/null >/dev/null 2>&1 & echo $!', "sh", *argv],
                pass_fds=(theirs.fileno(), listener.fileno()),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL,
                start_new_session=True,
                env=env,
                check=True,
            )
            self._pid = int(launcher.stdout.split()[0])
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
            listener.close()
        os.environ[ENV_VAR] = _address_to_env(address)
        return ours

    def _socket(self, start: bool) -> Optional[socket.socket]:
        if self._sock is None:
            self._sock = self._connect_env()
        if self._sock is None and start:
            self._sock = self._start()
        return self._sock

    def _send_locked(self, data: bytes, start: bool) -> bool:
        """Send *data*; with *start*, start a tracker if there is none."""
        flags = getattr(socket, "MSG_NOSIGNAL", 0)
        sock = self._socket(start)
        if sock is None:
            return False
        try:
            sock.sendall(data, flags)
            return True
        except OSError:
            sock.close()
            self._sock = None
        if not start:
            return False
        # The tracker is gone (killed?): start a new one and give it everything
        # this process holds, *data* included (register() put it there).
        fresh = self._socket(start=True)
        assert fresh is not None
        for held in self._held.values():
            fresh.sendall(held, flags)
        return True

    def register(self, backend: Backend, ident: str, identity: Optional[str]) -> bool:
        extra: Optional[dict[str, Any]] = dict(self._extra) if self._extra else None
        spec = backend.import_spec()
        if spec is not None:  # a third-party backend: tell the tracker how to load it
            extra = dict(extra or {})
            extra.update(m=spec, p=[os.path.abspath(p or os.curdir) for p in sys.path])
        data = _protocol.encode(self._op, backend.name, ident, identity, extra)
        with self._lock:
            self._held[(backend.name, ident)] = data
            try:
                return self._send_locked(data, start=True)
            except Exception as exc:  # the tracker could not be started or reached
                warnings.warn(
                    f"mpshm could not reach its segment tracker ({exc}); the segment "
                    f"{ident!r} will not be destroyed automatically",
                    RuntimeWarning,
                    stacklevel=4,
                )
                return False

    def unregister(self, backend: str, ident: str) -> None:
        with self._lock:
            self._held.pop((backend, ident), None)
            try:
                self._send_locked(_protocol.encode("unreg", backend, ident, None), start=False)
            except OSError:
                pass

    def tracked(self) -> list[tuple[str, str]]:
        with self._lock:
            return list(self._held)

    def ensure_connected(self, greeting: Optional[bytes] = None) -> None:
        with self._lock:
            if self._sock is None and self._socket(start=True) is not None and greeting:
                assert self._sock is not None
                self._sock.sendall(greeting, getattr(socket, "MSG_NOSIGNAL", 0))

    def close(self) -> None:
        with self._lock:
            self._held = {}
            sock, self._sock = self._sock, None
            if sock is not None:
                sock.close()

    def pid(self) -> Optional[int]:
        return self._pid


_client = _Client()
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_client._after_fork)


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
        scope._client.close()


_scopes: weakref.WeakSet[Scope] = weakref.WeakSet()
if hasattr(os, "register_at_fork"):
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

    def unregister(self, backend: str, ident: str) -> None:
        """Like :func:`unregister`: the segment was unlinked, or is handed on."""
        if not self._closed:  # once closed, the tracker forgot the scope anyway
            self._client.unregister(backend, ident)

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

    def unregister(self, backend: str, ident: str) -> None:
        """The segment was destroyed after all."""
        self._client.unregister(backend, ident)


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


def unregister(backend: str, ident: str) -> None:
    """Tell the tracker that a segment was unlinked; it will not destroy it."""
    _client.unregister(backend, ident)


def tracked() -> list[tuple[str, str]]:
    """The ``(backend, ident)`` pairs this process registered and not unlinked."""
    return _client.tracked()


def tracker_pid() -> Optional[int]:
    """Pid of the tracker this process started, or None if it started none."""
    return _client.pid()
