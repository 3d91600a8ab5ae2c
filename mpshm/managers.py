"""``SharedMemoryManager``: the standard library's, on any backend, and leak-proof.

A drop-in for :class:`multiprocessing.managers.SharedMemoryManager`. The
manager's server process creates and owns the segments; clients get
:class:`mpshm.SharedMemory` / :class:`mpshm.ShareableList` objects attached
to them (which pickle as handles, so they can be passed to Pool workers).

Lifetime (see ``docs/manager.md``): everything the manager made is destroyed

* at ``shutdown()`` and at the end of a ``with`` block, also after an
  exception and also if clients unlinked some segments themselves;
* when the process that started the manager dies, SIGKILL included: the
  server watches it, destroys its segments and exits;
* when the server process itself dies, SIGKILL included: it registers its
  segments with the program's tracker on a connection of its own
  (:class:`mpshm.tracking.Scope`), and the tracker destroys them as soon as
  that connection closes, while the rest of the program goes on.
"""

from __future__ import annotations

import os
import select
import sys
import threading
import time
from dataclasses import dataclass, replace
from multiprocessing import ProcessError, managers, process, util
from multiprocessing.managers import BaseManager, Server
from typing import Any, Callable, Iterable, NamedTuple, Optional, Sequence, Union

from . import backends, tracking
from . import shared_memory as _shm
from ._sysinfo import start_time
from .backends import Backend
from .shared_memory import ShareableList, SharedMemory, _check_size

# Not in typeshed: the standard library's manager state values and request helper.
_State: Any = managers.State  # type: ignore[attr-defined]
_dispatch: Any = managers.dispatch  # type: ignore[attr-defined]

__all__ = [
    "ManagedSegment", "ManagerLimitError", "ManagerNotRunningError", "SharedMemoryManager",
    "SharedMemoryServer",
]


class ManagedSegment(NamedTuple):
    """One segment a manager holds, as listed by :meth:`SharedMemoryManager.segments`."""

    #: The name that attaches to it (``SharedMemory(name)``).
    name: str
    #: The backend that stores it.
    backend: str
    #: Its size in bytes.
    size: int


class ManagerNotRunningError(ProcessError, ValueError):
    """A :class:`SharedMemoryManager` was used before ``start()`` or after ``shutdown()``.

    A :class:`ValueError`, as the standard library's manager raises then (and
    CPython's tests expect), and also a :class:`multiprocessing.ProcessError`,
    as mpshm raised before, so that both kinds of ``except`` still catch it.
    """


class ManagerLimitError(MemoryError):
    """A manager was asked for more than its ``max_bytes`` allows."""

    def __init__(self, limit: int, held: int, requested: int) -> None:
        super().__init__(limit, held, requested)
        #: The manager's ``max_bytes``.
        self.limit = limit
        #: Bytes the manager held when asked.
        self.held = held
        #: Bytes asked for.
        self.requested = requested

    def __str__(self) -> str:
        return (
            f"SharedMemoryManager max_bytes={self.limit} exceeded: it holds {self.held} "
            f"bytes and {self.requested} more were asked for; release() segments no longer "
            "needed, or start the manager with a larger max_bytes"
        )


@dataclass(frozen=True)
class _Config:
    """What the server needs to know, sent to its process at start."""

    backend: str
    options: dict[str, Any]
    max_bytes: Optional[int] = None
    #: Import spec of a third-party backend ("module:Class"), so that the
    #: server process can register it too.
    spec: Optional[str] = None
    #: Pid of the process that started the server (it dies with it).
    starter: Optional[int] = None


@dataclass(frozen=True)
class _Held:
    backend: Backend
    ident: str
    identity: Optional[str]
    size: int


# Set in the server process by _configure() before SharedMemoryServer is built.
_pending: Optional[_Config] = None


def _configure(
    config: _Config, initializer: Optional[Callable[..., object]], initargs: Sequence[Any]
) -> None:
    """Runs first in a started server process: keep *config*, run the user's initializer."""
    global _pending
    _pending = config
    if initializer is not None:
        initializer(*initargs)


def _wait_for_exit(pid: int) -> None:
    """Return once process *pid* has ended."""
    start = start_time(pid)
    if start is None:
        return
    fd: Optional[int] = None
    if hasattr(os, "pidfd_open"):
        try:
            fd = os.pidfd_open(pid)
        except ProcessLookupError:
            return
        except OSError:  # kernel without pidfd: poll below
            fd = None
    if fd is not None and start_time(pid) == start:  # still the process we were given
        try:
            select.select([fd], [], [])
        finally:
            os.close(fd)
        return
    while start_time(pid) == start:
        time.sleep(0.05)


class SharedMemoryServer(Server):
    """The server of a :class:`SharedMemoryManager`: creates and owns its segments.

    Besides the standard library's requests (``track_segment``,
    ``release_segment``, ``list_segments``) it serves ``mpshm_session``: a
    connection that stays open for many requests (see :meth:`mpshm_session`),
    which the manager's clients use.
    """

    public = [  # noqa: RUF012 (the standard library's attribute)
        *Server.public,
        "track_segment",
        "release_segment",
        "list_segments",
        "mpshm_session",
    ]

    def __init__(
        self,
        registry: dict[str, Any],
        address: Any,
        authkey: bytes,
        serializer: str,
        config: Optional[_Config] = None,
    ) -> None:
        super().__init__(registry, address, authkey, serializer)
        config = config if config is not None else _pending
        if config is None:
            config = _Config(backend=backends.get_default_backend(), options={})
        if config.spec is not None and config.backend not in backends.registry:
            backends.register(config.backend, config.spec)
        self._config = config
        self._backend = backends.get(config.backend)
        self._backend.check_options(config.options)
        self._lock = threading.Lock()
        self._held: dict[str, _Held] = {}
        self._bytes = 0  # held plus being created
        self._closing = False
        self._scope = tracking.Scope()
        self._scope.connect()

    # -- bookkeeping ----------------------------------------------------------

    def _reserve(self, size: int) -> None:
        limit = self._config.max_bytes
        with self._lock:
            if self._closing:
                raise ProcessError("the SharedMemoryManager is shutting down")
            if limit is not None and self._bytes + size > limit:
                self._prune_locked()
                if self._bytes + size > limit:
                    raise ManagerLimitError(limit, self._bytes, size)
            self._bytes += size

    def _prune_locked(self) -> None:
        """Forget segments that clients unlinked themselves."""
        for name, held in list(self._held.items()):
            if held.backend.identity(held.ident) is None:
                del self._held[name]
                self._bytes -= held.size
                self._scope.unregister(held.backend.name, held.ident)

    def _destroy(self, held: _Held) -> None:
        try:
            held.backend.destroy(held.ident, held.identity)
        except Exception:
            pass  # the tracker tries again when our scope closes
        else:
            self._scope.unregister(held.backend.name, held.ident)

    @staticmethod
    def _key(name: str) -> str:
        """The qualified form of *name*, whichever way a client spelled it."""
        chosen, ident = backends.resolve(name, None, {})
        assert ident is not None
        return chosen.qualified(ident)

    def _take(self, name: str) -> _Held:
        key = self._key(name)
        with self._lock:
            held = self._held.pop(key, None)
            if held is None:
                raise ValueError(
                    f"the segment {name!r} is not held by this SharedMemoryManager "
                    "(already released, or never made by it)"
                )
            self._bytes -= held.size
        return held

    def destroy_all(self) -> None:
        """Destroy every segment held, and refuse to make more."""
        with self._lock:
            self._closing = True
            held, self._held = list(self._held.values()), {}
            self._bytes = 0
        for entry in held:
            self._destroy(entry)

    # -- requests ---------------------------------------------------------------

    def _create(self, size: int) -> tuple[str, str, str, int]:
        size = _check_size(size, nonzero=True)
        self._reserve(size)
        try:
            shm = SharedMemory._create_in(self._scope, size, self._backend, self._config.options)
        except BaseException:
            with self._lock:
                self._bytes -= size
            raise
        assert shm._attachment is not None and shm._ident is not None
        held = _Held(self._backend, shm._ident, shm._attachment.identity, shm.size)
        shm.close()  # the server never uses the memory itself
        with self._lock:
            closing = self._closing
            if not closing:
                self._held[shm.name] = held
        if closing:  # shutdown started meanwhile
            self._destroy(held)
            raise ProcessError("the SharedMemoryManager is shutting down")
        return self._backend.name, held.ident, shm.name, held.size

    def _release(self, name: str) -> None:
        self._destroy(self._take(name))

    def _segments(self) -> list[tuple[str, str, int]]:
        with self._lock:
            self._prune_locked()
            return [(name, h.backend.name, h.size) for name, h in self._held.items()]

    def mpshm_session(self, c: Any) -> None:
        """Serve requests on connection *c* until the client closes it.

        Each request is ``(operation, args)`` with operation ``create``
        (size), ``release`` (name) or ``segments`` (); each answer is
        ``(True, result)`` or ``(False, exception)``. Keeping the
        authenticated connection open spares every request the connection
        set-up and the challenge exchange the standard library pays for each.
        """
        operations: dict[str, Callable[..., Any]] = {
            "create": self._create,
            "release": self._release,
            "segments": self._segments,
        }
        while True:
            try:
                operation, args = c.recv()
            except (EOFError, OSError):
                return
            try:
                answer: tuple[bool, Any] = (True, operations[operation](*args))
            except Exception as exc:  # raised as such by the client (not as a traceback string)
                answer = (False, exc)
            c.send(answer)

    def track_segment(self, c: Any, segment_name: str) -> None:
        """Take over a segment a client made (the standard library's protocol)."""
        key = self._key(segment_name)
        with self._lock:
            if key in self._held:
                return
        shm = SharedMemory(key)
        try:
            assert shm._backend is not None and shm._ident is not None
            identity = shm._backend.identity(shm._ident)
            held = _Held(shm._backend, shm._ident, identity, shm.size)
        finally:
            shm.close()
        self._reserve(held.size)
        self._scope.register(held.backend, held.ident, identity)
        with self._lock:
            if key in self._held:  # another client tracked it meanwhile
                self._bytes -= held.size
                return
            self._held[key] = held

    def release_segment(self, c: Any, segment_name: str) -> None:
        """Destroy one held segment now (the standard library's protocol)."""
        self._release(segment_name)

    def list_segments(self, c: Any) -> list[str]:
        """Names of the held segments (the standard library's protocol)."""
        with self._lock:
            return list(self._held)

    def shutdown(self, c: Any) -> None:
        """Destroy everything held, then stop serving."""
        self.destroy_all()
        super().shutdown(c)

    # -- serving ----------------------------------------------------------------

    def _watch(self, pid: int) -> None:
        _wait_for_exit(pid)
        util.debug("SharedMemoryManager server: the process that started it is gone")
        self.destroy_all()
        self.stop_event.set()

    def serve_forever(self) -> None:
        """Serve until shut down, or until the process that started it ends;
        then destroy every segment held and exit."""
        self.stop_event = threading.Event()
        process.current_process()._manager_server = self  # type: ignore[attr-defined]
        try:
            threading.Thread(target=self.accepter, daemon=True).start()
            if self._config.starter is not None:
                watcher = threading.Thread(target=self._watch, args=(self._config.starter,))
                watcher.daemon = True
                watcher.start()
            try:
                while not self.stop_event.is_set():
                    self.stop_event.wait(1)
            except (KeyboardInterrupt, SystemExit):
                pass
        finally:
            self.destroy_all()
            self._scope.close()
            if sys.stdout != sys.__stdout__:
                sys.stdout = sys.__stdout__
                sys.stderr = sys.__stderr__
            sys.exit(0)


class SharedMemoryManager(BaseManager):
    """A manager whose server creates, tracks and destroys shared memory segments.

    A drop-in for :class:`multiprocessing.managers.SharedMemoryManager`
    (same arguments, ``start()``, ``shutdown()``, ``with`` block,
    ``get_server()``, ``connect()`` from another process, ``register()``),
    whose segments live on *backend* (default: the default backend), created
    with the backend's *options* (``dir=`` for ``mmap``, say).
    :meth:`SharedMemory` and :meth:`ShareableList` return
    :class:`mpshm.SharedMemory` and :class:`mpshm.ShareableList` objects.

    Beyond the standard library:

    * every segment is destroyed at shutdown even if a client unlinked some;
      and also when the starting process or the server process is killed
      (see :mod:`mpshm.managers`);
    * :meth:`release` destroys one segment now, :meth:`segments` lists them;
    * *max_bytes* bounds the total held: asking for more raises
      :class:`ManagerLimitError` (a MemoryError).

    *shutdown_timeout* is honoured on Python 3.11 and later (the standard
    library's own; earlier versions wait 1 second).
    """

    _Server = SharedMemoryServer
    # BaseManager's attributes (not in typeshed).
    _state: Any
    _registry: dict[str, Any]
    _address: Any
    _authkey: bytes
    _serializer: str
    _Client: Any

    def __init__(
        self,
        address: Any = None,
        authkey: Optional[bytes] = None,
        serializer: str = "pickle",
        ctx: Any = None,
        *,
        shutdown_timeout: float = 1.0,
        backend: Optional[str] = None,
        max_bytes: Optional[int] = None,
        **options: Any,
    ) -> None:
        chosen, _ = backends.resolve(None, backend, options)
        if max_bytes is not None:
            max_bytes = _check_size(max_bytes)
        self._config = _Config(chosen.name, dict(options), max_bytes, chosen.import_spec())
        extra = {"shutdown_timeout": shutdown_timeout} if sys.version_info >= (3, 11) else {}
        super().__init__(address, authkey, serializer, ctx, **extra)
        self._sessions = threading.local()  # per thread: a connection to the server

    @property
    def backend(self) -> str:
        """Name of the backend the manager's segments live on (if it started them)."""
        return self._config.backend

    @property
    def max_bytes(self) -> Optional[int]:
        """The bound on the total bytes held, or None."""
        return self._config.max_bytes

    def start(
        self, initializer: Optional[Callable[..., object]] = None, initargs: Iterable[Any] = ()
    ) -> None:
        """Start the server process (it ignores SIGINT, as the standard library's does)."""
        if initializer is not None and not callable(initializer):
            raise TypeError("initializer must be a callable")
        # One tracker for the whole program, found by the server in its environment.
        tracking.ensure_running()
        config = replace(self._config, starter=os.getpid())
        super().start(_configure, (config, initializer, tuple(initargs)))

    def get_server(self) -> SharedMemoryServer:
        """A server to run in this process with ``serve_forever()``."""
        if self._state.value != _State.INITIAL:
            if self._state.value == _State.STARTED:
                raise ProcessError("Already started SharedMemoryServer")
            raise ProcessError("SharedMemoryManager has shut down")
        return SharedMemoryServer(
            self._registry, self._address, self._authkey, self._serializer, self._config
        )

    def _request(self, operation: str, *args: Any) -> Any:
        """Send one request on this thread's session with the server; return its result."""
        if self._state.value != _State.STARTED:
            raise ManagerNotRunningError(
                "the SharedMemoryManager is not running: call start() (or connect() to a "
                "running one) first, or use it in a with block"
            )
        local = self._sessions
        conn = getattr(local, "conn", None)
        if conn is None or local.pid != os.getpid():  # none yet, or inherited through fork
            conn = self._Client(self._address, authkey=self._authkey)
            conn.send((None, "mpshm_session", (), {}))
            local.conn, local.pid = conn, os.getpid()
        try:
            conn.send((operation, args))
            ok, value = conn.recv()
        except BaseException:
            # Interrupted or broken: the answer may never be read, so the
            # session cannot be trusted any more. The next request opens another.
            local.conn = None
            conn.close()
            raise
        if not ok:
            raise value
        return value

    def SharedMemory(self, size: int) -> _shm.SharedMemory:
        """A new segment of *size* bytes, owned by the manager."""
        backend, ident, name, size = self._request("create", _check_size(size, nonzero=True))
        try:
            return SharedMemory._from_handle(backend, ident, name, size)
        except BaseException:
            self._request("release", name)
            raise

    def ShareableList(self, sequence: Optional[Iterable[Any]]) -> _shm.ShareableList:
        """A new :class:`mpshm.ShareableList` holding *sequence*, owned by the manager."""
        made: list[SharedMemory] = []

        def make(size: int) -> SharedMemory:
            made.append(self.SharedMemory(size))
            return made[-1]

        sl = ShareableList.__new__(ShareableList)
        try:
            sl._build(sequence, make)
        except BaseException:
            for shm in made:
                self.release(shm)
            raise
        return sl

    def release(self, segment: Union[_shm.SharedMemory, _shm.ShareableList, str]) -> None:
        """Destroy one segment the manager holds now, and close *segment*.

        Takes the object :meth:`SharedMemory` or :meth:`ShareableList`
        returned, or a segment's name. Views of its memory that are still
        alive stay valid; no process can attach to it any more. Raises
        ValueError if the manager does not hold it.
        """
        shm = segment.shm if isinstance(segment, ShareableList) else segment
        if isinstance(shm, SharedMemory):
            name = shm.name
        elif isinstance(shm, str):
            name = shm
        else:
            raise TypeError(
                "release() takes a SharedMemory, a ShareableList or a segment name, "
                f"not {type(segment).__name__}"
            )
        self._request("release", name)
        if isinstance(shm, SharedMemory):
            shm.close()

    def segments(self) -> list[ManagedSegment]:
        """The segments the manager holds now (name, backend, size)."""
        return [ManagedSegment(*entry) for entry in self._request("segments")]
