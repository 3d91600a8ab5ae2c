"""Dask distributed: same-host transfers of NumPy arrays through shared
memory, with a verified fallback to Dask's own serialization.

Turn it on with one line per side::

    import mpshm.dask  # in the client's process

    cluster = LocalCluster(n_workers=4, preload=["mpshm.dask"])
    # or: dask worker tcp://scheduler:8786 --preload mpshm.dask
    client = Client(cluster, direct_to_workers=True)

(:func:`local_cluster` does the first two.) From then on, a NumPy array of
at least ``threshold`` bytes (1 MiB) that a worker sends to another worker,
or that a client and a worker exchange directly, travels as a handle of a
few hundred bytes whenever both ends are *verified* to map the same shared
memory; everywhere else Dask's own serializer runs, unchanged.

How "the same memory" is verified, never guessed from an address: every
process that imports this module adds an identity to the handshake of each
Dask connection it makes or accepts (a key of its own, which Dask passes
through): its user, the machine's boot id, its PID namespace, the storage
it uses (for POSIX shared memory, the device and inode of ``/dev/shm``; for
System V, its IPC namespace; for mmap files, the directory's) and the name
of a small *probe* segment holding a random nonce. The sender of an array
compares the recipient's identity with its own, then maps the recipient's
probe and reads the nonce: only if all of that holds (checked once per
peer, then cached) does the array go by handle. A worker in another
container, or in another IPC or mount namespace with its own ``/dev/shm``,
fails the check and gets bytes. A scheduler never gets a handle: it relays
data without loading it, to a process the sender does not know, so this
module keeps schedulers' connections out of the handshake.

What travels how:

* An array whose memory is a segment this process made with
  :mod:`mpshm.numpy` (a dedicated one: larger than its slab limit) travels
  with no copy at all: the receiver maps the same memory (writes are
  shared, as with any :mod:`mpshm.numpy` handle). Arrays received from
  another process are copied when passed on: their maker may destroy the
  segment's name as soon as it drops them.
* Any other array is copied once into a segment of the sender (a *spare*)
  that the receiver maps: no socket, no second copy. The receiver's array
  is a view of that spare, its own until it drops the array: the spare is
  then free for the sender's next transfer. Spares are kept warm (the
  receiver keeps its mapping too), since a fresh segment costs the kernel
  about as much as Dask's whole transfer; a spare given back and unused
  for 5 seconds (``MPSHM_CACHE_IDLE``) is destroyed.
* Small arrays, object arrays, structured and broadcast arrays, spilling
  to disk and every other type take Dask's own path.

Lifetimes: spares are registered with a :class:`mpshm.tracking.Scope` of
the sending process, so the tracker destroys them as soon as that process
ends, SIGKILL included; a receiver that dies frees what it held (the
sender sees it gone). A receiver's data stays valid even after the
sender's spare is destroyed (the name goes, the memory stays with the
last mapping).

The hooks used: Dask's public ``dask_serialize``/``dask_deserialize`` for
``numpy.ndarray`` (with the ``context`` argument comms pass), the worker
and client preloads (``dask_setup``/``dask_teardown``); and one wrapper
that is not a documented hook, around
``distributed.comm.core.Comm.handshake_info``: the only place a process can
say who it is to every peer (see ``docs/dask.md``; a test pins it).
"""

from __future__ import annotations

import atexit
import ctypes
import os
import secrets
import threading
import time
import weakref
from typing import Any, Literal, Optional

import click
import distributed.protocol.numpy as _dask_numpy  # before ours: see _register
import numpy as np
from distributed.comm.core import Comm
from distributed.protocol.serialize import dask_deserialize, dask_serialize

from . import _mappings, backends, tracking
from ._mappings import IDLE_SECONDS, default_limit, destroy_name, reaper
from ._sysinfo import alive, machine
from .errors import HandleError
from .numpy import SharedArray, owned_handle, rebuild_from_fields
from .reduction import attach_owner
from .shared_memory import Mapped, create_mapping

__all__ = [
    "DEFAULT_THRESHOLD",
    "configure",
    "dask_setup",
    "dask_teardown",
    "identity",
    "local_cluster",
    "settings",
    "stats",
]

#: Arrays smaller than this many bytes take Dask's own path.
DEFAULT_THRESHOLD = 1 << 20
#: The handshake key.
KEY = "mpshm"
_VERSION = 1

# A spare's first page: magic, lease, state, holder pid (native u64 words);
# the data starts on the next page.
_MAGIC = 0x6D7073686D64736B  # "mpshmdsk"
_DATA = 4096
_FREE, _LENT, _HELD = 0, 1, 2
#: A spare lent and never taken for this long is destroyed, never reused.
_LENT_EXPIRY = 60.0
_GRAIN = 1 << 20
#: A peer whose probe did not hold is checked again after this many seconds.
_RECHECK = 30.0


def _words(owner: Any) -> Any:
    return (ctypes.c_uint64 * 4).from_buffer(owner, 0)


# --------------------------------------------------------------------------
# Settings and this process's identity


class _Settings:
    def __init__(self, backend: Optional[str], threshold: int, options: dict[str, Any]) -> None:
        chosen, _ = backends.resolve(None, backend, options)
        chosen.check_options(options)
        self.backend = chosen
        self.threshold = threshold
        self.options = options


def _storage_id(backend: backends.Backend, options: dict[str, Any]) -> str:
    """What decides, for *backend*, whether two processes see the same
    segments: the filesystem object that holds them, or the IPC namespace."""
    if backend.name == "sysv":
        return f"ipc:{os.stat('/proc/self/ns/ipc').st_ino}"
    where = backend.where(options)
    if where is None:
        return f"{backend.name}:unknown-{secrets.token_hex(8)}"  # matches nobody
    if backend.name == "mmap":  # (made on first use otherwise: stat it now)
        os.makedirs(where, mode=0o700, exist_ok=True)
    st = os.stat(where)
    return f"{backend.name}:{st.st_dev}:{st.st_ino}"


def _ns(kind: str) -> int:
    try:
        return os.stat(f"/proc/self/ns/{kind}").st_ino
    except OSError:
        return 0


class _State:
    """This process's settings, identity, probe, spares and verified peers."""

    def __init__(self, settings: _Settings) -> None:
        self.settings = settings
        self.pid = os.getpid()
        self.lock = threading.RLock()
        self.scope = tracking.Scope()
        self.spares: list[_Spare] = []
        #: Verdicts on peers' probes: True, or when to ask again.
        self.verified: dict[tuple[str, str], Any] = {}
        self.closed = False
        self._identity: Optional[dict[str, Any]] = None
        self._probe: Optional[Mapped] = None
        self.counts = {"handles": 0, "fallbacks": 0}

    def count(self, what: str) -> None:
        with self.lock:
            self.counts[what] += 1

    def identity(self) -> dict[str, Any]:
        with self.lock:
            if self._identity is None:
                s = self.settings
                nonce = secrets.token_hex(16)
                probe = create_mapping(_DATA, s.backend, s.options, self.scope)
                probe.buf[:32] = nonce.encode()
                self._probe = probe
                self._identity = {
                    "v": _VERSION, "uid": os.geteuid(), "boot": machine()[1],
                    "pidns": _ns("pid"), "backend": s.backend.name,
                    "storage": _storage_id(s.backend, s.options), "pid": self.pid,
                    "probe": probe.name, "nonce": nonce,
                }
            return self._identity

    # -- peers -------------------------------------------------------------

    def shares_memory_with(self, peer: Any) -> bool:
        """Whether *peer* (an identity from a handshake) verifiably maps the
        segments this process makes."""
        if not isinstance(peer, dict) or peer.get("v") != _VERSION:
            return False
        me = self.identity()
        if peer.get("pid") == me["pid"] and peer.get("nonce") == me["nonce"]:
            return False  # ourselves: Dask does not serialize to itself anyway
        for field in ("uid", "boot", "pidns", "backend", "storage"):
            if peer.get(field) != me[field]:
                return False
        probe, nonce = peer.get("probe"), peer.get("nonce")
        if not (isinstance(probe, str) and isinstance(nonce, str)):
            return False
        key = (probe, nonce)
        now = time.monotonic()
        known = self.verified.get(key)
        if known is None or (known is not True and now > known):
            holds = _probe_holds(probe, nonce)
            if len(self.verified) > 4096:  # peers come and go: forget old verdicts
                self.verified.clear()
            # a failure may be passing (EMFILE, ENOMEM): asked again later
            self.verified[key] = True if holds else now + _RECHECK
            return holds
        return known is True

    # -- spares ------------------------------------------------------------

    def lend(self, x: np.ndarray) -> Optional[dict[str, Any]]:
        """Copy *x* into a spare; the handle a receiver takes it with, or
        None (no room: the caller sends bytes)."""
        need = _DATA + x.nbytes
        spare = self._take_spare(need)
        if spare is None:
            mapped = self._new_segment(-(-need // _GRAIN) * _GRAIN)
            if mapped is None:
                return None
            spare = _Spare(mapped)
            with self.lock:
                if self.closed:
                    _destroy(self.scope, mapped)
                    return None
                self.spares.append(spare)
            self._trim()
        order: Literal["C", "F"] = (
            "F" if (x.flags.f_contiguous and not x.flags.c_contiguous) else "C")
        dst: np.ndarray = np.ndarray(x.shape, x.dtype, spare.mapped.buf, _DATA, order=order)
        np.copyto(dst, x, casting="no")
        del dst
        lease = secrets.randbits(63)
        words = _words(spare.mapped.owner)
        words[0], words[1], words[3], words[2] = _MAGIC, lease, 0, _LENT
        del words
        with self.lock:
            spare.lent_at = spare.used = time.monotonic()
            spare.busy = False
        m = spare.mapped
        return {"b": m.backend.name, "i": m.ident, "n": m.name, "s": m.size,
                "m": list(machine()), "l": lease, "o": order}

    def _new_segment(self, size: int) -> Optional[Mapped]:
        """A new segment for a spare, or None if the storage cannot hold it
        even after the caches let go of what they can."""
        for attempt in range(2):
            try:
                return create_mapping(size, self.settings.backend, self.settings.options,
                                      self.scope)
            except (OSError, ValueError):
                if attempt or not _mappings.reclaim():
                    return None
        return None

    def _take_spare(self, need: int) -> Optional[_Spare]:
        now = time.monotonic()
        best: Optional[_Spare] = None
        doomed: list[_Spare] = []
        with self.lock:
            for spare in self.spares:
                if spare.busy:
                    continue
                state = spare.state(now)
                if state == "expired":
                    doomed.append(spare)
                elif (state == "free" and need <= spare.mapped.size <= 2 * need + _GRAIN
                      and (best is None or spare.mapped.size < best.mapped.size)):
                    best = spare
            for spare in doomed:
                self.spares.remove(spare)
            if best is not None:
                best.busy = True
        for spare in doomed:
            _destroy(self.scope, spare.mapped)
        return best

    def _trim(self) -> None:
        """Keep spares within the cache limit: destroy the least recently
        used ones that nobody holds."""
        limit = default_limit()
        doomed = []
        with self.lock:
            total = sum(s.mapped.size for s in self.spares)
            now = time.monotonic()
            for spare in sorted(self.spares, key=lambda s: s.used):
                if total <= limit:
                    break
                if not spare.busy and spare.state(now) in ("free", "expired"):
                    self.spares.remove(spare)
                    total -= spare.mapped.size
                    doomed.append(spare)
        for spare in doomed:
            _destroy(self.scope, spare.mapped)

    def sweep(self, idle: Optional[float] = None) -> bool:
        """Destroy spares unused for *idle* seconds (default: the cache's
        idle time, ``MPSHM_CACHE_IDLE``) and expired ones; True if any. A
        spare a receiver holds is in use, not idle: its memory could not be
        freed anyway, and it is warm for the next transfer once given back."""
        idle = IDLE_SECONDS if idle is None else idle
        now = time.monotonic()
        doomed = []
        with self.lock:
            for spare in list(self.spares):
                if spare.busy:
                    continue
                state = spare.state(now)
                if state == "held":
                    spare.used = now  # idle from when it is given back
                elif state == "expired" or (now - spare.used > idle and state != "lent"):
                    self.spares.remove(spare)
                    doomed.append(spare)
        for spare in doomed:
            _destroy(self.scope, spare.mapped)
        return bool(doomed)

    def reclaim(self) -> bool:
        """The storage is full: destroy every spare nobody holds."""
        return self.sweep(idle=0.0)

    def close(self) -> None:
        """Destroy the spares and the probe, and end the scope."""
        with self.lock:
            if self.closed:
                return
            self.closed = True
            spares, self.spares = self.spares, []
            probe, self._probe = self._probe, None
        if os.getpid() != self.pid:
            return  # a forked copy: the parent's to destroy
        for spare in spares:
            _destroy(self.scope, spare.mapped, later=False)
        if probe is not None:
            _destroy(self.scope, probe, later=False)
        self.scope.close()


class _Spare:
    __slots__ = ("busy", "lent_at", "mapped", "used")

    def __init__(self, mapped: Mapped) -> None:
        self.mapped = mapped
        self.busy = True
        self.lent_at = 0.0
        self.used = time.monotonic()

    def state(self, now: float) -> str:
        """"free", "lent" (handed out, not yet taken), "held" (a live
        receiver holds it) or "expired" (lent long ago and never taken)."""
        words = _words(self.mapped.owner)
        try:
            if words[0] != _MAGIC:
                return "free"
            state, holder = words[2], words[3]
        finally:
            del words
        if state == _FREE:
            return "free"
        if state == _HELD:  # free only once its holder is known to be gone
            return "free" if alive(int(holder)) is False else "held"
        return "lent" if now - self.lent_at < _LENT_EXPIRY else "expired"


def _destroy(scope: tracking.Scope, mapped: Mapped, later: bool = True) -> None:
    """Destroy the name of segment *mapped* (made by this process in *scope*).
    Freeing a large segment's pages takes a while: done in the reaper's
    thread unless *later* is false."""

    args = (mapped.backend.name, mapped.ident, scope, mapped.identity)
    if later:
        reaper.later(destroy_name, *args)
    else:
        destroy_name(*args)


def _probe_holds(name: str, nonce: str) -> bool:
    """Whether the probe segment *name* maps here, is this user's own (mode
    0600: another user's probe proves nothing), and holds *nonce*."""
    import warnings

    from .shared_memory import SharedMemory

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            probe = SharedMemory(name, owner_check="error")
    except (OSError, ValueError, HandleError):
        return False
    try:
        return probe.size >= 32 and bytes(probe.buf[:32]) == nonce.encode()
    finally:
        probe.close()


_state: Optional[_State] = None
_state_lock = threading.Lock()


def _current() -> _State:
    global _state
    state = _state
    if state is not None and state.pid == os.getpid() and not state.closed:
        return state
    with _state_lock:
        if _state is None or _state.pid != os.getpid() or _state.closed:
            settings = _state.settings if _state is not None else _Settings(
                None, DEFAULT_THRESHOLD, {})
            _state = _State(settings)
            _mappings.reclaimable.add(_state)
            _mappings.sweeper.add(_state)
        return _state


def configure(backend: Optional[str] = None, threshold: int = DEFAULT_THRESHOLD,
              **options: Any) -> None:
    """Choose this process's storage (*backend* and its *options*, as for
    :class:`mpshm.SharedMemory`; default: :func:`mpshm.get_default_backend`,
    e.g. from ``MPSHM_BACKEND``) and the smallest array sent by handle.
    Use the same storage in every process: processes whose storages differ
    exchange bytes. Spares made under the previous settings are destroyed."""
    if not isinstance(threshold, int) or isinstance(threshold, bool) or threshold < 1:
        raise ValueError(f"threshold must be a positive number of bytes, not {threshold!r}")
    settings = _Settings(backend, threshold, dict(options))
    global _state
    with _state_lock:
        old, _state = _state, None
        _state = _State(settings)
        _mappings.reclaimable.add(_state)
        _mappings.sweeper.add(_state)
    if old is not None:
        old.close()


def settings() -> dict[str, Any]:
    """This process's settings: ``backend``, ``threshold`` and the options."""
    s = _current().settings
    return {"backend": s.backend.name, "threshold": s.threshold, **s.options}


def identity() -> dict[str, Any]:
    """What this process tells its Dask peers about its shared memory (see
    the module's documentation); makes the probe segment on first use."""
    return dict(_current().identity())


def stats() -> dict[str, int]:
    """Counts in this process: arrays sent by handle (``handles``), arrays
    that a verified peer got as bytes because no segment could be made
    (``fallbacks``), and spares held (``spares``, ``spare_bytes``)."""
    state = _current()
    with state.lock:
        return {**state.counts, "spares": len(state.spares),
                "spare_bytes": sum(s.mapped.size for s in state.spares)}


# --------------------------------------------------------------------------
# The handshake


def _scheduler_ports() -> set[int]:
    import sys

    module = sys.modules.get("distributed.scheduler")
    ports: set[int] = set()
    if module is None:
        return ports
    for scheduler in list(getattr(module.Scheduler, "_instances", ())):
        # A scheduler's own connections say nothing of us (see _advertised).
        overrides = scheduler.connection_args.setdefault("handshake_overrides", {})
        overrides[KEY] = None
        for listener in list(getattr(scheduler, "listeners", ())):
            try:
                port = _port(listener.listen_address)
            except Exception:  # not started, or closed
                continue
            if port:
                ports.add(port)
    return ports


def _port(address: str) -> int:
    try:
        return int(address.rsplit(":", 1)[1].strip("]/"))
    except (IndexError, ValueError):
        return 0


def _advertised(comm: Any) -> Optional[dict[str, Any]]:
    """The identity to put in *comm*'s handshake, or None for a comm a
    scheduler accepted: a scheduler relays data undecoded to processes the
    sender cannot know, so it must never receive a handle."""
    try:
        local = comm.local_address or ""
        if not local.startswith(("tcp://", "tls://")) or _port(local) in _scheduler_ports():
            return None
        return _current().identity()
    except Exception:  # no storage here, or a comm closing: say nothing (bytes)
        return None


def _install_handshake() -> None:
    original = Comm.handshake_info
    if getattr(original, "_mpshm", False):
        return

    def handshake_info(self: Any) -> dict[str, Any]:
        info: dict[str, Any] = original(self)
        ours = _advertised(self)
        if ours is not None:
            info[KEY] = ours
        return info

    handshake_info._mpshm = True  # type: ignore[attr-defined]
    handshake_info.__wrapped__ = original  # type: ignore[attr-defined]
    Comm.handshake_info = handshake_info  # type: ignore[method-assign]


# --------------------------------------------------------------------------
# Serializers


def _peer(context: Any) -> Any:
    if not isinstance(context, dict):
        return None
    recipient = context.get("recipient")
    return recipient.get(KEY) if isinstance(recipient, dict) else None


def _eligible(x: np.ndarray, threshold: int) -> bool:
    return (x.nbytes >= threshold and not x.dtype.hasobject and x.dtype.fields is None
            and 0 not in x.strides and type(x) in (np.ndarray, SharedArray))


def serialize(x: np.ndarray, context: Optional[dict[str, Any]] = None) -> tuple[
        dict[str, Any], list[Any]]:
    """Dask's serializer for arrays: a handle for a verified same-memory
    recipient, else Dask's own ``serialize_numpy_ndarray``."""
    state = _current()
    if _eligible(x, state.settings.threshold):
        peer = _peer(context)
        if peer is not None and state.shares_memory_with(peer):
            fields = owned_handle(x)
            if fields is not None:
                state.count("handles")
                return {KEY: "ref", "storage": state.identity()["storage"], "h": fields}, []
            lent = state.lend(x)
            if lent is not None:
                state.count("handles")
                header = {KEY: "spare", "storage": state.identity()["storage"],
                          "dtype": x.dtype.str, "shape": list(x.shape), "h": lent}
                return header, []
            state.count("fallbacks")
    return _dask_numpy.serialize_numpy_ndarray(x, context=context)  # type: ignore[no-any-return]


def deserialize(header: dict[str, Any], frames: list[Any]) -> np.ndarray:
    """Dask's deserializer for arrays: maps what :func:`serialize` sent."""
    kind = header.get(KEY)
    if kind is None:
        return _dask_numpy.deserialize_numpy_ndarray(header, frames)  # type: ignore[no-any-return]
    own = _current().identity()["storage"]
    if header.get("storage") != own:
        raise HandleError(
            f"mpshm.dask: got a shared memory handle for storage {header.get('storage')!r}, "
            f"but this process uses {own!r}; it was relayed past a check (a bug: please "
            "report it) or forged. Turn mpshm.dask off on that path to get bytes"
        )
    if kind == "ref":
        return rebuild_from_fields(header["h"])
    if kind == "spare":
        return _take(header)
    raise HandleError(f"mpshm.dask: unknown kind of handle {kind!r}; are all processes "
                      "running the same mpshm version?")


def _take(header: dict[str, Any]) -> np.ndarray:
    h = header["h"]
    dtype = np.dtype(header["dtype"])
    shape = tuple(int(n) for n in header["shape"])
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    size = int(h["s"])
    if not (isinstance(size, int) and _DATA + nbytes <= size):
        raise HandleError(f"mpshm.dask: a handle of {size} bytes cannot hold {nbytes}")
    owner = attach_owner(h["b"], h["i"], h["n"], size, tuple(h["m"]), shareable=False,
                         cache=True)
    lease = int(h["l"])
    words = _words(owner)
    try:
        if words[0] != _MAGIC or words[1] != lease or words[2] != _LENT:
            raise HandleError(
                f"mpshm.dask: segment {h['n']!r} no longer holds the array it was sent "
                "for (its sender gave up waiting, or the handle is forged)"
            )
        words[3] = os.getpid()
        words[2] = _HELD
    finally:
        del words
    owned = _mappings.lease(owner, _DATA, nbytes)
    weakref.finalize(owned, _give_back, owner, lease).atexit = False
    arr: np.ndarray = np.frombuffer(owned, dtype=dtype).reshape(shape, order=h["o"])
    return arr


def _give_back(owner: Any, lease: int) -> None:
    """The receiver's last view of a spare is gone: the sender may reuse it."""
    try:
        words = _words(owner)
    except (ValueError, TypeError):  # unmapped
        return
    if words[1] == lease and words[3] == os.getpid():
        words[2] = _FREE
    del words


def _register() -> None:
    # distributed.protocol.numpy is imported first (above): its lazy
    # registration would otherwise replace ours on the first dispatch.
    for cls in (np.ndarray, SharedArray):
        dask_serialize.register(cls)(serialize)
        dask_deserialize.register(cls)(deserialize)


# --------------------------------------------------------------------------
# Turning it on


@click.command(context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
@click.option("--backend", "backend_", default=None,
              help="mpshm storage: posix, sysv or mmap (default: MPSHM_BACKEND, else posix)")
@click.option("--dir", "dir_", default=None, help="directory of the mmap storage")
@click.option("--threshold", default=DEFAULT_THRESHOLD, type=int, show_default=True,
              help="smallest array (bytes) sent through shared memory")
def dask_setup(obj: Any, backend_: Optional[str], dir_: Optional[str],
               threshold: int) -> None:
    """The preload's setup (``--preload mpshm.dask``): applies the options
    (``--backend``, ``--dir``, ``--threshold``) to this worker (or client)."""
    options = {"dir": dir_} if dir_ is not None else {}
    if backend_ is not None or options or threshold != DEFAULT_THRESHOLD:
        configure(backend_, threshold, **options)
    if hasattr(obj, "handlers"):  # a worker: the probe exists before a peer asks
        _current().identity()  # the probe exists before the first peer asks


def dask_teardown(obj: Any) -> None:
    """The preload's teardown (of a worker or a client): destroys this
    process's spares and probe once no other Dask client or worker of this
    process is running (the next transfer makes new ones)."""
    import distributed

    def running(other: Any) -> bool:
        status = str(getattr(other, "status", "closed"))
        return other is not obj and any(
            word in status for word in ("running", "paused", "connecting", "starting"))

    others = [*getattr(distributed.Client, "_instances", ()),
              *getattr(distributed.Worker, "_instances", ())]
    if obj is not None and any(running(other) for other in list(others)):
        return
    state = _state
    if state is not None and state.pid == os.getpid():
        state.close()


def _preload_clients() -> None:
    """Every :class:`distributed.Client` of this process runs this module's
    ``dask_setup``/``dask_teardown`` (Dask's client preload), so that
    ``Client.close()`` leaves no segment of this process behind."""
    import dask.config

    preload = list(dask.config.get("distributed.client.preload", None) or [])
    if __name__ in preload:
        return
    argv = dask.config.get("distributed.client.preload-argv", None) or []
    update: dict[str, Any] = {"distributed.client.preload": [*preload, __name__]}
    if argv and all(isinstance(a, (list, tuple)) for a in argv):
        update["distributed.client.preload-argv"] = [*argv, []]  # one list per preload
    elif argv:  # one list for every preload: each gets its own copy, ours none
        update["distributed.client.preload-argv"] = [list(argv) for _ in preload] + [[]]
    dask.config.set(update)


def local_cluster(*, backend: Optional[str] = None, threshold: int = DEFAULT_THRESHOLD,
                  **kwargs: Any) -> Any:
    """A :class:`distributed.LocalCluster` (``processes=True``; *kwargs* are
    its own) whose workers preload this module with *backend* (and
    ``dir=``, for mmap) and *threshold*; this process uses them too."""
    from distributed import LocalCluster

    options = {k: kwargs.pop(k) for k in ("dir",) if k in kwargs}
    configure(backend, threshold, **options)
    argv = []
    if backend is not None:
        argv += ["--backend", backend]
    if "dir" in options:
        argv += ["--dir", str(options["dir"])]
    if threshold != DEFAULT_THRESHOLD:
        argv += ["--threshold", str(threshold)]
    preload = [*list(kwargs.pop("preload", None) or []), __name__]
    preload_argv = kwargs.pop("preload_argv", None)
    if preload_argv is None:
        preload_argv = [[] for _ in preload[:-1]] + [argv]
    kwargs.setdefault("processes", True)
    return LocalCluster(preload=preload, preload_argv=preload_argv, **kwargs)


def _at_exit() -> None:
    state = _state
    if state is not None and state.pid == os.getpid():
        state.close()


_register()
_install_handshake()
_preload_clients()
atexit.register(_at_exit)
