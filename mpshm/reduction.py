"""Handles, not bytes: pickling shared memory by reference.

Two mechanisms live here.

**Handles** work with any pickler, plain :mod:`pickle` included.
:class:`~mpshm.SharedMemory`, :class:`~mpshm.ShareableList` and NumPy arrays
made by :mod:`mpshm.numpy` (whole, sliced, strided, any dtype) pickle as a
handle of a few hundred bytes: the segment's backend and name, its size, the
view's offset, shape, strides and dtype, and the machine it was made on.
Unpickling attaches the segment (or reuses this process's mapping of it) and
returns a zero-copy, writable view: a write on one side is visible on the
other. The view keeps its mapping alive for as long as it lives, whatever
happens to the object that made it. A handle unpickled on another machine
raises :class:`HandleError` naming both machines.

**The sharing pickler** (:class:`SharingPickler`, :func:`dumps`,
:func:`loads`) also moves large buffers that are *not* in a segment: every
pickle protocol 5 out-of-band buffer (NumPy arrays, ``memoryview``,
:class:`pickle.PickleBuffer` and objects built on them) of at least
``threshold`` bytes is copied once into a fresh segment and sent as a handle;
smaller ones travel inline. Receivers get such a copy as pickling gives it:
their own, writable (read-only if the sender's buffer was), and nobody
else sees their writes. It is a private (copy-on-write) mapping of the
segment where the storage has one (POSIX, mmap files): free until a page is
written; System V has none, so there the receiver copies the bytes out of
the segment. A buffer already inside a segment is sent by reference, never
copied. ``bytearray`` objects are the exception: CPython's pickler writes
them inline without asking any hook; wrap one in ``memoryview`` to share it.

Who destroys a copied buffer's segment: with :func:`dumps`, the receiver
(:func:`loads` unlinks its name once mapped; the memory goes with the last
view), or the tracker of the sender's program if nobody ever loads it.
:mod:`mpshm.pool` uses the same pickler with its own bookkeeping (a task's
arguments die with the task, results belong to the receiver).

Nothing is changed globally: importing mpshm leaves
:class:`multiprocessing.reduction.ForkingPickler`, :mod:`copyreg` and the
standard library's resource tracker as they were.
"""

from __future__ import annotations

import copyreg
import functools
import io
import marshal
import os
import pickle
import struct
import sys
import threading
import warnings
import weakref
from typing import Any, Callable, Mapping, NamedTuple, Optional

from . import _mappings, backends, tracking
from ._mappings import find, note_mapping, note_private, reaper
from ._sysinfo import buffer_address, check_machine, machine
from .backends import Backend
from .errors import HandleError
from .shared_memory import (
    Mapped,
    SharedMemory,
    _check_size,
    _generate,
    attach_mapping,
    create_mapping,
)

__all__ = [
    "DEFAULT_THRESHOLD",
    "Carrier",
    "Collector",
    "Descriptor",
    "HandleError",
    "Receiver",
    "Segment",
    "SharingPickler",
    "dumps",
    "load_parts",
    "loads",
    "machine",
    "receiver",
    "register",
    "register_lazy",
]

#: Buffers of at least this many bytes are moved into shared memory.
DEFAULT_THRESHOLD = 1 << 20

_ENVELOPE = b"MPSHM\x01"
#: The same for a pickle with a pool's note about it alone (see envelope).
_NOTE = b"MPSHM\x02"
_LENGTH = struct.Struct("!Q")


# --------------------------------------------------------------------------
# Where this process's segments are mapped

def attach_owner(
    backend: str, ident: str, name: str, size: int, made_on: Optional[tuple[str, str]],
    shareable: bool = True, cache: bool = False,
) -> Any:
    """The object holding a mapping of segment *ident*: this process's live
    one if there is one, else (with *cache*) one kept from an earlier
    message (see :class:`mpshm._mappings.MappingCache`), else a new attachment's
    (kept for later with *cache*)."""
    check_machine(made_on, name)
    if not (isinstance(backend, str) and isinstance(ident, str)
            and backends.names_agree(backends.get(backend), ident, name)):
        raise HandleError(
            f"invalid shared memory handle: its name {name!r} does not name its segment "
            f"{ident!r} ({backend!r} backend); it was forged or damaged"
        )
    owner = _mappings.live_owner(backend, ident, size)
    if owner is not None:
        return owner
    if cache:
        owner = _mappings.mappings.get(backend, ident, size)
        if owner is not None:
            return owner
    mapped = attach_mapping(backend, ident, name, size)
    note_mapping(mapped.owner, backend, ident, name, size, shareable)
    if cache:
        _mappings.mappings.put(backend, ident, size, mapped.owner, mapped.identity)
    return mapped.owner


# --------------------------------------------------------------------------
# The sharing pickler

class Descriptor(NamedTuple):
    """An out-of-band buffer: which segment holds it and who owns it."""

    backend: str
    ident: str
    name: str
    size: int
    machine: tuple[str, str]
    offset: int
    nbytes: int
    readonly: bool
    #: "ref": an existing segment; "give": the receiver owns it (unlinks its
    #: name once mapped); "loan": the sender destroys or reuses it (a pool,
    #: per task); "spare": the receiver's own segment, lent to the sender to
    #: write into (a pool's parent, for results).
    kind: str


class Segment(NamedTuple):
    """A segment a carrier made (not mapped by the sender)."""

    backend: Backend
    ident: str
    name: str
    size: int

    @classmethod
    def of(cls, mapped: Mapped) -> Segment:
        """The segment *mapped* maps."""
        return cls(mapped.backend, mapped.ident, mapped.name, mapped.size)

    def descriptor(self, offset: int, nbytes: int, readonly: bool, kind: str) -> Descriptor:
        """How a receiver finds *nbytes* at *offset* in this segment."""
        return Descriptor(
            self.backend.name, self.ident, self.name, self.size, machine(), offset, nbytes,
            readonly, kind,
        )


class Carrier:
    """Where :class:`SharingPickler` puts buffers it moves into shared memory.

    This one (used by :func:`dumps`) creates a fresh segment per buffer on
    *backend*, registered with the program's tracker, and hands it to the
    receiver. :mod:`mpshm.pool` subclasses it.
    """

    kind = "give"
    #: Whether arrays of :mod:`mpshm.numpy` that this process owns are handed
    #: over to the receiver (a pool worker's results) or sent by reference.
    hands_over = False

    def __init__(
        self, backend: Optional[str] = None, threshold: int = DEFAULT_THRESHOLD,
        **options: Any,
    ) -> None:

        self.threshold = _check_size(threshold)
        self.backend, _ = backends.resolve(None, backend, options)
        self.backend.check_options(options)
        self.options = options

    def registry(self) -> Any:
        """Where new segments are registered (see ``shared_memory._generate``)."""
        return tracking

    def abandon(self, pickler: SharingPickler) -> None:
        """The message *pickler* was pickling will not be sent: destroy the
        segments made for it."""
        discard(pickler.made, self.registry())

    def kind_of(self, segment: Segment) -> str:
        """Who destroys *segment* (returned by :meth:`carry`): ``"give"``,
        ``"loan"``, or ``"spare"`` for a segment the receiver lent to this
        process to write into (not this carrier's to destroy)."""
        return self.kind

    def new_segment(self, nbytes: int) -> Mapped:
        """A fresh, mapped segment of *nbytes* bytes, registered with :meth:`registry`."""
        return create_mapping(nbytes, self.backend, self.options, self.registry())

    def carry(self, raw: memoryview, address: int) -> tuple[Segment, int]:
        """Copy *raw* (whose first byte is at *address*) into a fresh segment
        (written, not mapped: see :meth:`~mpshm.backends.Backend.create_from`);
        return it and the offset there."""

        backend, options = self.backend, self.options

        def make(ident: str) -> tuple[None, Optional[str]]:
            return None, backend.create_from(ident, raw, options)

        _, ident = _generate(backend, options, self.registry(), make)
        return Segment(backend, ident, backend.qualified(ident), raw.nbytes), 0


# --------------------------------------------------------------------------
# Reducers of other types

#: Reducers added with :func:`register`, by exact type (replaced, never
#: changed in place: picklers being made read it without a lock).
_reducers: dict[type, Callable[[Any, Any], Any]] = {}
#: Loaders that register reducers, by the top-level module whose import they
#: wait for (see :func:`register_lazy`; replaced, never changed in place).
_lazy: dict[str, Callable[[], Optional[bool]]] = {}
_lazy_lock = threading.RLock()
_version = 0


def _new_lazy_lock() -> None:
    # A child forked while another thread held the lock would wait forever.
    global _lazy_lock
    _lazy_lock = threading.RLock()


os.register_at_fork(after_in_child=_new_lazy_lock)


def register(cls: type, reducer: Callable[[Collector, Any], Any]) -> None:
    """Make every :class:`SharingPickler` made from now on reduce objects of
    exactly type *cls* with ``reducer(collector, obj)``, which returns what
    :meth:`object.__reduce__` would. The :class:`Collector` lets it send a
    buffer by handle (``collector.kept``) or copy it into a segment
    (``collector.carrier``). Registering a type again replaces its reducer.
    :mod:`mpshm.numpy` registers NumPy arrays this way."""
    global _reducers, _version
    with _lazy_lock:
        _reducers = {**_reducers, cls: reducer}
        _version += 1


def register_lazy(module: str, loader: Callable[[], Optional[bool]]) -> None:
    """Call *loader* (which calls :func:`register`) when the first pickler is
    made after *module* (a top-level module, ``"numpy"``) has been imported
    by someone: programs that never use it never pay for its reducers. A
    loader that returns False is asked again for the next pickler."""
    global _lazy
    with _lazy_lock:
        _lazy = {**_lazy, module: loader}


def initializing(module: Any) -> bool:
    """Whether *module* (in :data:`sys.modules`) is still being imported."""
    return bool(getattr(getattr(module, "__spec__", None), "_initializing", False))


def _load_lazy() -> None:
    global _lazy
    # (Every pickler a pool makes or reuses comes here: no lock until a
    # module a loader waits for has been imported.)
    if all(sys.modules.get(name) is None for name in _lazy):
        return
    with _lazy_lock:  # (others wait here until the reducers are registered)
        for name in list(_lazy):
            module = sys.modules.get(name)
            # Not while it is being imported: by a thread of this process (its
            # objects are not in use yet) or, in a child forked meanwhile, by
            # a thread that is gone (importing anything of it would hang).
            if module is None or initializing(module):
                continue
            try:
                done = _lazy[name]() is not False
            except Exception as exc:  # pickling goes on without those reducers
                warnings.warn(f"mpshm could not load its reducers for {name}: {exc!r}",
                              RuntimeWarning, stacklevel=3)
                done = True
            if done:
                _lazy = {key: value for key, value in _lazy.items() if key != name}


class Collector:
    """What a :class:`SharingPickler` adds to pickling: the out-of-band
    buffer callback, the reducers of the types it handles itself, and what
    reducers (see :func:`register`) report: segments made (:attr:`made`)
    and objects sent by reference (:attr:`kept`).

    A separate object, so that the pickler is not in a reference cycle with
    its own bound methods (the garbage collector clearing memoryviews with
    exports in such a cycle can crash CPython).
    """

    def __init__(self, carrier: Carrier) -> None:
        self.carrier = carrier
        self.descriptors: list[Descriptor] = []
        self.made: list[Segment] = []
        #: Objects whose segments were sent by reference: a pool keeps them
        #: alive until the task is done (an owned array would destroy its
        #: segment when collected).
        self.kept: list[Any] = []

    def reducers(self) -> dict[type, Callable[[Any], Any]]:
        """Reducers by exact type, for the pickler's dispatch table. (A table
        rather than ``reducer_override``, which CPython would call for every
        object of every other non-builtin type too: 3-4x slower pickling of
        many small objects.)"""
        table: dict[type, Callable[[Any], Any]] = {
            memoryview: self._reduce_memoryview,
            SharedMemory: self._reduce_shared_memory,
        }
        for cls, reducer in _reducers.items():
            table[cls] = functools.partial(reducer, self)
        return table

    @staticmethod
    def _reduce_memoryview(view: memoryview) -> Any:
        return _rebuild_memoryview, (pickle.PickleBuffer(view), view.format, view.shape)

    def _reduce_shared_memory(self, shm: SharedMemory) -> Any:
        self.kept.append(shm)
        return shm.__reduce__()

    def __call__(self, buffer: pickle.PickleBuffer) -> bool:
        raw = buffer.raw()
        nbytes = raw.nbytes
        if nbytes < self.carrier.threshold or nbytes == 0:
            return True  # inline
        address = buffer_address(raw)
        found = find(address, nbytes)
        if found is not None:
            _, region, offset = found
            kind = "ref"
            if any(seg.ident == region.ident and seg.backend.name == region.backend
                   for seg in self.made):
                kind = self.carrier.kind  # a copy made by _reduce_array
            else:
                self.kept.append(raw.obj)
            self.descriptors.append(Descriptor(
                region.backend, region.ident, region.name, region.size, machine(),
                offset, nbytes, raw.readonly, kind,
            ))
            return False
        segment, offset = self.carrier.carry(raw, address)
        kind = self.carrier.kind_of(segment)
        if kind != "spare" and segment not in self.made:
            self.made.append(segment)
        # A copy arrives writable if the buffer was (pickle protocol 5's rule).
        self.descriptors.append(segment.descriptor(offset, nbytes, raw.readonly, kind))
        return False


class SharingPickler(pickle.Pickler):
    """A pickler (protocol 5) that sends large buffers through shared memory.

    Use it like :class:`pickle.Pickler` with a :class:`Carrier` that says
    where copied buffers go; pass what it wrote and its :attr:`descriptors`
    to :func:`envelope`, and read the result with :func:`loads`.
    :func:`dumps` does all of it in one step. *dispatch_table* is the table
    of reducers to start from (default: :mod:`copyreg`'s); the pickler adds
    its own for ``memoryview`` and ``SharedMemory``, and those :func:`register` added.
    """

    def __init__(
        self, file: Any, carrier: Carrier,
        dispatch_table: Optional[Mapping[Any, Any]] = None,
    ) -> None:
        self._collector = Collector(carrier)
        super().__init__(file, protocol=5, buffer_callback=self._collector)
        self.carrier = carrier
        table = dict(copyreg.dispatch_table if dispatch_table is None else dispatch_table)
        _load_lazy()
        self._version = _version
        table.update(self._collector.reducers())
        self.dispatch_table = table

    def finish(self) -> None:
        """Let go of the message just pickled (the memo, the carrier and the
        lists hold its objects) so that this pickler can be kept for
        :meth:`reuse`; the caller empties the file."""
        self.clear_memo()
        collector = self._collector
        collector.carrier = self.carrier = None  # type: ignore[assignment]
        collector.descriptors = []
        collector.made = []
        collector.kept = []

    def reuse(self, carrier: Carrier) -> bool:
        """Make a pickler let go of by :meth:`finish` ready for another
        message carried by *carrier*; False if it cannot be (a type it has a
        reducer for was registered since: NumPy's, say)."""
        _load_lazy()
        if self._version != _version:
            return False
        self._collector.carrier = self.carrier = carrier
        return True

    @property
    def descriptors(self) -> list[Descriptor]:
        """One per out-of-band buffer, in order."""
        return self._collector.descriptors

    @property
    def made(self) -> list[Segment]:
        """Segments made for this pickle (the caller decides their fate)."""
        return self._collector.made

    @property
    def kept(self) -> list[Any]:
        """Objects whose memory was sent by reference, not copied."""
        return self._collector.kept


def _rebuild_memoryview(buffer: Any, fmt: str, shape: tuple[int, ...]) -> memoryview:
    view = memoryview(buffer)
    if view.format != fmt or view.shape != shape:
        view = view.cast("B").cast(fmt, shape)  # type: ignore[call-overload]
    return view


def envelope(
    main: bytes, descriptors: list[Descriptor], about: Any = None, extra: Any = None,
) -> bytes:
    """The bytes :func:`loads` reads: *main* alone if there are no descriptors
    and nothing said *about* the message (what a pool substitutes for it if
    it cannot be unpickled; see :func:`split_message`) and no *extra* (a pool's
    bookkeeping of warm segments; see :func:`split_message`)."""
    if not descriptors and extra is None:
        if about is None:
            return main
        try:  # (a pool's note alone, of strings and numbers: marshal is quicker)
            note = marshal.dumps(about)
        except ValueError:
            pass
        else:
            return b"".join((_NOTE, _LENGTH.pack(len(main)), main, note))
    parts = (descriptors, about) if extra is None else (descriptors, about, extra)
    table = pickle.dumps(parts, protocol=5)
    return b"".join((_ENVELOPE, _LENGTH.pack(len(main)), main, table))


def dumps(
    obj: Any, *, threshold: int = DEFAULT_THRESHOLD, backend: Optional[str] = None,
    **options: Any,
) -> bytes:
    """Pickle *obj*, moving buffers of *threshold* bytes or more into shared memory.

    Read the result with :func:`loads`, once, on this machine: it takes
    ownership of the segments made for it (unlinking their names; the memory
    lives as long as the views it returns). Segments nobody loads are
    destroyed when this program is over.
    """
    carrier = Carrier(backend, threshold, **options)
    file = io.BytesIO()
    pickler = SharingPickler(file, carrier)
    dump(pickler, obj, carrier.abandon)
    return envelope(file.getvalue(), pickler.descriptors)


def dump(pickler: SharingPickler, obj: Any, cleanup: Callable[[SharingPickler], None]) -> None:
    """``pickler.dump(obj)``; if it fails, call ``cleanup(pickler)`` and raise
    the error without the pickler's own frames and memo. Those hold
    memoryviews with exports, and an exception kept in a reference cycle
    (a pool keeps it in its result, which its traceback reaches) would put
    them in garbage the collector cannot clear safely (CPython crashes)."""
    try:
        pickler.dump(obj)
    except BaseException as exc:
        cleanup(pickler)
        pickler.clear_memo()
        _drop_tracebacks(exc)
        raise exc


def _drop_tracebacks(exc: BaseException) -> None:
    """Clear the tracebacks of *exc* and of the exceptions it chains to."""
    pending: list[Optional[BaseException]] = [exc]
    seen: set[int] = set()
    while pending:
        current = pending.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        current.__traceback__ = None
        pending += [current.__cause__, current.__context__]


def discard(made: list[Segment], registry: Any) -> None:
    """Destroy segments made for a pickle that will not be sent (or whose
    use is over), and unregister them from *registry*."""
    for segment in made:
        try:
            segment.backend.unlink(segment.ident)
        except FileNotFoundError:
            pass
        finally:
            registry.unregister(segment.backend.name, segment.ident)
    if made:
        _mappings.destroyed()


class Receiver:
    """How this process takes the out-of-band buffers of a message it
    unpickles (see :func:`load_parts`). This one, the default, keeps nothing
    for later messages; a pool passes its own, which keeps mappings
    (:attr:`cache`), records the leases of its workers' arguments
    (:attr:`leases`) and keeps the segments of its parent's results
    (:meth:`adopt`)."""

    #: Keep mappings of segments for later messages naming them again
    #: (:class:`mpshm._mappings.MappingCache`).
    cache = False
    #: Where the leases of lent buffers are recorded (a pool's worker
    #: reports them gone with its next result), or None.
    leases: Optional[list[tuple[str, str, Any]]] = None

    def adopt(self, descriptor: Descriptor) -> Optional[memoryview]:
        """A view of a buffer whose segment the sender gives to this process
        (kind ``give``) or wrote into for it (``spare``), if this receiver
        keeps such segments itself (a pool's parent, for reuse); None to take
        it the default way."""
        return None

    def take(self, descriptor: Descriptor) -> memoryview:
        """Map an out-of-band buffer; take ownership of it if it is given."""
        offset, nbytes, size = descriptor.offset, descriptor.nbytes, descriptor.size
        if not (
            isinstance(offset, int) and isinstance(nbytes, int) and isinstance(size, int)
            and 0 <= offset <= offset + nbytes <= size
        ):
            # Slicing would silently clamp (or count from the end): refuse instead.
            raise HandleError(
                f"invalid shared memory handle: {nbytes!r} bytes at offset {offset!r} do not "
                f"lie within the {size!r} bytes of segment {descriptor.name!r}"
            )
        kind = descriptor.kind
        if kind in ("give", "spare"):
            adopted = self.adopt(descriptor)
            if adopted is not None:
                return adopted
        if kind == "spare":
            raise HandleError(
                f"invalid shared memory handle: {descriptor.name!r} was lent by a pool to "
                "its workers and cannot be read here"
            )
        if kind != "ref" and not descriptor.readonly:
            return _private(descriptor, self.leases if kind == "loan" else None)
        owner = attach_owner(
            descriptor.backend, descriptor.ident, descriptor.name, descriptor.size,
            descriptor.machine, shareable=kind == "ref", cache=self.cache and kind != "give",
        )
        if kind == "give":
            reaper.watch(owner, descriptor.backend, descriptor.ident)
        leases = self.leases
        if kind == "loan" and leases is not None:
            # The sender reuses the segment once this process reports the lease gone.
            owned = _mappings.lease(owner, offset, nbytes)
            leases.append((descriptor.backend, descriptor.ident, weakref.ref(owned)))
            return _mappings.lease_view(owned, descriptor.readonly)
        view = memoryview(owner)[offset : offset + nbytes]
        return view.toreadonly() if descriptor.readonly else view


_default_receiver = Receiver()
_receiving = threading.local()


def receiver() -> Receiver:
    """The receiver of the message this thread is unpickling (for the
    rebuild functions of registered reducers), or the default one."""
    return getattr(_receiving, "current", None) or _default_receiver


def _gone() -> None:
    """A lease that is already gone (see :func:`_private`)."""
    return None


def _private(
    descriptor: Descriptor, leases: Optional[list[tuple[str, str, Any]]],
) -> memoryview:
    """A writable view of a buffer the sender copied (kinds give and loan),
    as pickling gives it: the receiver's own memory, whose changes nobody
    else sees. A private (copy-on-write) mapping of the segment where the
    storage can map one, else a copy. With *leases* (a pool's worker receiving
    task arguments), the private memory is kept for the next message (see
    :class:`mpshm._mappings.PrivateCopies`) and the segment's lease recorded there."""
    backend, ident, name, size = (
        descriptor.backend, descriptor.ident, descriptor.name, descriptor.size)
    offset, nbytes = descriptor.offset, descriptor.nbytes
    give = descriptor.kind == "give"
    check_machine(descriptor.machine, name)
    kept = None if leases is None else _mappings.private.take(backend, ident, size)
    if kept is None:
        try:
            mapped = attach_mapping(backend, ident, name, size, private=True)
        except NotImplementedError:
            return _private_copy(descriptor, leases)
        kept = mapped.owner, mapped.identity
        note_private(mapped.owner, backend, ident, name, size)
    owner, identity = kept
    if give:
        reaper.watch(owner, backend, ident)
    if leases is None:
        return memoryview(owner)[offset : offset + nbytes]
    owned = _mappings.private.lease(owner, offset, nbytes, backend, ident, size, identity)
    leases.append((backend, ident, weakref.ref(owned)))
    return _mappings.lease_view(owned, False)


def _private_copy(
    descriptor: Descriptor, leases: Optional[list[tuple[str, str, Any]]],
) -> memoryview:
    """:func:`_private` for a storage that cannot map privately (System V):
    the bytes copied out of the segment into private memory."""
    backend, ident, offset, nbytes = (
        descriptor.backend, descriptor.ident, descriptor.offset, descriptor.nbytes)
    source = attach_owner(
        backend, ident, descriptor.name, descriptor.size, descriptor.machine,
        shareable=False, cache=leases is not None,
    )
    if descriptor.kind == "give":
        reaper.watch(source, backend, ident)
    if nbytes == 0:
        return memoryview(bytearray())
    kept = None if leases is None else _mappings.private.take("", "", nbytes)
    copy = _mappings.anonymous(nbytes) if kept is None else kept[0]
    memoryview(copy)[:nbytes] = memoryview(source)[offset : offset + nbytes]
    del source
    note_private(copy, backend, ident, descriptor.name, nbytes)
    if leases is None:
        return memoryview(copy)
    owned = _mappings.private.lease(copy, 0, nbytes, "", "", nbytes, None)
    leases.append((backend, ident, _gone))  # the segment is not looked at any more
    return _mappings.lease_view(owned, False)


def split_message(data: bytes) -> tuple[memoryview, list[Descriptor], Any, Any]:
    """The pickle, the out-of-band descriptors, the *about* note and the
    *extra* (or None) of *data* (see :func:`envelope`)."""
    view = memoryview(data)
    head = view[: len(_ENVELOPE)]
    if head != _ENVELOPE:
        if head != _NOTE:
            return view, [], None, None
        start = len(_NOTE) + _LENGTH.size
        (length,) = _LENGTH.unpack_from(view, len(_NOTE))
        return view[start : start + length], [], marshal.loads(view[start + length :]), None
    start = len(_ENVELOPE) + _LENGTH.size
    (length,) = _LENGTH.unpack_from(view, len(_ENVELOPE))
    table = pickle.loads(view[start + length :])
    descriptors, about = table[0], table[1]
    extra = table[2] if len(table) > 2 else None
    return view[start : start + length], descriptors, about, extra


def load_parts(
    main: Any, descriptors: list[Descriptor], receiver: Optional[Receiver] = None,
) -> Any:
    """Unpickle *main*, mapping the out-of-band buffers *descriptors* name
    the way *receiver* takes them (default: :class:`Receiver`)."""
    if receiver is None:
        if not descriptors:
            return pickle.loads(main)
        receiver = _default_receiver
    previous = getattr(_receiving, "current", None)
    _receiving.current = receiver
    try:
        return pickle.loads(main, buffers=[receiver.take(descriptor)
                                           for descriptor in descriptors])
    finally:
        _receiving.current = previous


def loads(data: bytes) -> Any:
    """Unpickle what :func:`dumps` (or a pool's pickler) made.

    Buffers that travelled by handle come back as zero-copy views of their
    segments; those the sender copied as the receiver's own private copies,
    writable if the sender's buffer was (see the module docstring).
    """
    main, descriptors, _, _ = split_message(data)
    return load_parts(main, descriptors)
