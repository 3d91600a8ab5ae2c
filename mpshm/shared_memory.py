"""``SharedMemory`` and ``ShareableList``: the standard library's, on any backend.

Both behave like :mod:`multiprocessing.shared_memory` (Python 3.13) in every
observable way, with the storage chosen by ``backend=`` or by the name's
scheme, and with the standard library's known bugs fixed (each fix is named
in the docstrings below).
"""

from __future__ import annotations

import errno
import operator
import os
import re
import struct
import sys
import types
import warnings
from typing import (
    Any,
    Callable,
    ClassVar,
    Iterable,
    Iterator,
    Mapping,
    NamedTuple,
    Optional,
    Protocol,
    TypeVar,
    Union,
)

from . import _mappings, backends, tracking
from ._sysinfo import check_machine, machine
from .backends import Attachment, Backend
from .backends._base import Unnamed
from .errors import HandleError

__all__ = ["OwnershipWarning", "ShareableList", "SharedMemory"]

_T = TypeVar("_T", bound="SharedMemory")
_R = TypeVar("_R")


def _check_size(size: Any, nonzero: bool = False) -> int:
    """*size* as an int; TypeError/ValueError as the standard library words them.
    With *nonzero* (creating a segment), 0 is refused too."""
    try:
        value = operator.index(size)
    except TypeError:
        raise TypeError(
            f"'size' must be an integer number of bytes, not {type(size).__name__}"
        ) from None
    if value < 0:
        raise ValueError("'size' must be a positive integer")
    if nonzero and value == 0:
        raise ValueError("'size' must be a positive number different from zero")
    if nonzero and value > sys.maxsize:
        raise ValueError(
            f"'size' is too large: {value} bytes cannot be mapped into this process "
            f"(at most {sys.maxsize})"
        )
    return value


class OwnershipWarning(RuntimeWarning):
    """An attached segment is not owned by this user with mode 0600, as mpshm
    creates segments (see ``owner_check=`` of :class:`SharedMemory`)."""


_OWNER_CHECKS = ("warn", "error", "ignore")


def _owner_check(value: Any) -> str:
    if not (isinstance(value, str) and value in _OWNER_CHECKS):
        raise ValueError(f"owner_check must be 'warn', 'error' or 'ignore', not {value!r}")
    return value


def _check_owner(attachment: Attachment, name: str, policy: str) -> None:
    """Apply *policy* (see ``owner_check=``) to an attached segment; on
    ``"error"``, close *attachment* and raise PermissionError.

    The creator counts as much as the owner where the storage records one
    (System V): the kernel grants a segment's creator every right its owner
    has, and the creator may give the segment to any owner, this user
    included, while keeping them."""
    uid, mode = attachment.uid, attachment.mode
    if policy == "ignore" or uid is None or mode is None:
        return
    me = os.geteuid()
    creator = attachment.creator_uid
    foreign_creator = creator is not None and creator != me
    if uid == me and not mode & 0o077 and not foreign_creator:
        return
    if mode & 0o022:
        risk = "other users can change it"
    elif mode & 0o044:
        risk = "other users can read it"
    elif mode & 0o077:
        risk = "other users have access to it"
    else:
        risk = ""
    if risk and not mode & 0o007:  # only through the group: say which
        groups = sorted({g for g in (attachment.gid, attachment.creator_gid) if g is not None})
        if groups:
            risk += " (the members of group " + " and of group ".join(map(str, groups)) + ")"
    if foreign_creator:
        risk = (f"uid {creator} created it, and its creator keeps every right over it "
                "whatever its owner and mode say (to read, change or remove it, or give it "
                "to another owner)") + (f"; {risk}" if risk else "")
        found = f"was created by uid {creator} (owner uid {uid}, mode {mode:04o})"
    else:
        if uid != me:
            risk = "another user owns it" + (f"; {risk}" if risk else "")
        found = f"is owned by uid {uid} with mode {mode:04o}"
    message = (
        f"The shared memory segment {found}, not by you (uid {me}) with mode 0600 as "
        f"mpshm creates segments: {risk}. Pass owner_check='ignore' to accept such a segment"
    )
    if policy == "error":
        attachment.close()
        raise PermissionError(errno.EACCES, message, name)
    warnings.warn(f"{message}: {name!r}", OwnershipWarning, stacklevel=3)


class Mapped(NamedTuple):
    """A mapping of a segment that no :class:`SharedMemory` object holds:
    what mpshm's pickler, arrays and pools keep (see :func:`attach_mapping`
    and :func:`create_mapping`). Views of :attr:`owner` keep it mapped."""

    #: The object holding the mapping (an mmap, a System V attachment).
    owner: Any
    #: A view of exactly the segment's bytes.
    buf: memoryview
    backend: Backend
    ident: str
    name: str
    size: int
    #: The storage object's identity (see :meth:`mpshm.backends.Backend.identity`).
    identity: Optional[str]


def attach_mapping(
    backend: str, ident: str, name: str, size: int, private: bool = False,
) -> Mapped:
    """Map the segment of a pickled handle (checked as :class:`SharedMemory`
    checks handles); with *private*, copy-on-write: NotImplementedError where
    the storage cannot."""
    return SharedMemory._from_handle(backend, ident, name, size, private)._let_go()


def create_mapping(
    size: int, chosen: Backend, options: Mapping[str, Any], registry: _Registry,
) -> Mapped:
    """A new segment of *size* bytes with a generated name on *chosen* (its
    *options* checked by the caller), registered with *registry* (the
    :mod:`~mpshm.tracking` module, a pool's scope, ...), and noted so that
    the pickler finds views of it by address."""
    return SharedMemory._create_in(registry, size, chosen, options)._let_go(note=True)


class SharedMemory:
    """Create a new shared memory segment or attach to an existing one.

    A drop-in for :class:`multiprocessing.shared_memory.SharedMemory`: same
    arguments, attributes (``name``, ``size``, ``buf``), methods (``close``,
    ``unlink``), exceptions, ``repr`` and pickling (a handle, never the
    bytes); a context manager that closes (not unlinks) on exit. In addition:

    * *backend* chooses the storage (``"posix"``, ``"sysv"``, ``"mmap"`` or a
      registered one; default: :func:`mpshm.get_default_backend`), and
      *options* are its keywords (``dir=`` for ``mmap``; ``huge_pages=`` and
      ``prefault=`` for every built-in backend).
    * *track* (on creation): the segment is destroyed once the program that
      created it is over, however it ended, unless someone unlinked it
      first. A process that only attaches never destroys a segment.
    * *owner_check* (on attach): what to do with a segment not owned by you
      with mode 0600: ``"warn"`` (an :class:`OwnershipWarning`), ``"error"``
      (PermissionError) or ``"ignore"``.
    * A segment the storage cannot hold fails at creation with
      ``OSError(ENOSPC)``, never with a SIGBUS later; ``close()`` never raises
      BufferError.

    The user guide has the whole story: ``docs/shared-memory.md``,
    ``docs/lifetimes.md`` and ``docs/security.md``.
    """

    # Harmless defaults, so that close() and unlink() work on a half-built object.
    _name: Optional[str] = None
    _ident: Optional[str] = None
    _backend: Optional[Backend] = None
    _attachment: Optional[Attachment] = None
    _buf: Optional[memoryview] = None
    _size: int = 0
    _track: bool = True
    _created: bool = False
    _noted: bool = False

    def __init__(
        self,
        name: Optional[str] = None,
        create: bool = False,
        size: int = 0,
        *,
        track: bool = True,
        backend: Optional[str] = None,
        owner_check: str = "warn",
        **options: Any,
    ) -> None:
        size = _check_size(size, nonzero=create)
        if name is None and not create:
            raise ValueError("'name' can only be None if create=True")
        policy = _owner_check(owner_check)
        chosen, ident = backends.resolve(name, backend, options)
        self._backend = chosen
        self._track = bool(track)
        if not create:
            assert ident is not None
            attachment = chosen.attach(ident, options)
            _check_owner(attachment, name or ident, policy)
        elif ident is not None:
            registry = tracking if track else None
            try:
                attachment = _create_named(chosen, ident, size, options, registry)
            except OSError as exc:
                if not _reclaimed(exc):
                    raise
                attachment = _create_named(chosen, ident, size, options, registry)
        else:
            registry = tracking if track else None
            attachment, ident = _create_generated(chosen, size, options, registry)
        self._created = bool(create)
        self._adopt(chosen, ident, name, attachment)

    def _adopt(
        self, chosen: Backend, ident: str, name: Optional[str], attachment: Attachment
    ) -> None:
        self._backend = chosen
        self._ident = ident
        self._name = name if name is not None else chosen.qualified(ident)
        self._attachment = attachment
        self._size = attachment.size
        self._buf = attachment.buf

    @classmethod
    def _create_in(
        cls: type[_T], registry: _Registry, size: int, chosen: Backend,
        options: Mapping[str, Any],
    ) -> _T:
        """A new segment of *size* bytes (checked by the caller) with a generated
        name on *chosen* (its *options* checked too), registered with *registry*
        (a :class:`~mpshm.tracking.Scope`, the tracking module, ...) and so not
        tracked by this object."""
        attachment, ident = _create_generated(chosen, size, options, registry)
        self = cls.__new__(cls)
        self._track = False
        self._created = True
        self._adopt(chosen, ident, None, attachment)
        return self

    @classmethod
    def _from_handle(
        cls: type[_T], backend: str, ident: str, name: str, size: int, private: bool = False,
    ) -> _T:
        """Attach the segment of a pickled handle; with *private*, copy-on-write
        (see :meth:`~mpshm.backends.Backend.attach_private`): NotImplementedError
        where the storage cannot."""
        chosen = backends.get(backend)
        if not isinstance(ident, str) or chosen.parse(ident, {}) != ident:
            # Handles carry canonical identifiers: this one was forged or damaged.
            raise HandleError(
                f"invalid shared memory handle: {ident!r} is not a canonical identifier of "
                f"the {backend} backend"
            )
        if not backends.names_agree(chosen, ident, name):
            # One handle, one segment: a name that is not the identifier's would
            # make .name report one segment while buf and unlink() use another.
            raise HandleError(
                f"invalid shared memory handle: its name {name!r} does not name its "
                f"segment {chosen.qualified(ident)!r}; it was forged or damaged"
            )
        self = cls.__new__(cls)
        try:
            found = chosen.attach_private(ident, {}) if private else chosen.attach(ident, {})
        except FileNotFoundError as exc:
            raise FileNotFoundError(
                errno.ENOENT,
                f"The shared memory segment {name!r} ({backend} backend) of a pickled "
                "handle no longer exists: it was unlinked, or the program that "
                "created it ended",
                name,
            ) from exc
        if found is None:
            raise NotImplementedError(f"the {backend} backend cannot map {name!r} privately")
        attachment = found
        if attachment.size != size:
            attachment.close()
            raise ValueError(
                f"the shared memory segment {name!r} has {attachment.size} bytes but the "
                f"pickled handle says {size}: the name now refers to another segment"
            )
        _check_owner(attachment, name, "warn")
        self._track = False
        self._adopt(chosen, ident, name, attachment)
        return self

    def __reduce__(self) -> tuple[Callable[..., Any], tuple[Any, ...]]:
        if self._backend is None or self._ident is None:
            raise ValueError("cannot pickle a SharedMemory that was never opened")
        # The size as a fixed-width string: a pickle's length does not depend on
        # the segment's size under any protocol (protocol 0 writes ints in decimal).
        return (
            _rebuild,
            (type(self), self._backend.name, self._ident, self.name, f"{self.size:016x}",
             machine()),
        )

    def _owner(self) -> Any:
        """The object that holds this process's mapping (an mmap, a SysV
        attachment): views keep it, and so the memory, alive."""
        assert self._buf is not None
        return self._buf.obj

    def _note(self) -> None:
        """Let the pickler find arrays and views of this segment by address."""
        if not self._noted and self._buf is not None:
            assert self._backend is not None and self._ident is not None
            self._noted = True
            _mappings.note_mapping(
                self._owner(), self._backend.name, self._ident, self.name, self._size
            )

    def _forget_attachment(self) -> None:
        """Drop this object's hold without closing: the owner (see
        :meth:`_owner`), referenced elsewhere, keeps the mapping."""
        self._buf = None
        self._attachment = None

    def _let_go(self, note: bool = False) -> Mapped:
        """Hand this object's mapping to the caller (noted for the pickler
        with *note*): this object then holds nothing, and the mapping lives
        as long as the returned owner or views of it do."""
        if note:
            self._note()
        assert self._backend is not None and self._ident is not None and self._buf is not None
        identity = None if self._attachment is None else self._attachment.identity
        mapped = Mapped(self._owner(), self._buf, self._backend, self._ident, self.name,
                        self._size, identity)
        self._forget_attachment()
        return mapped

    def __repr__(self) -> str:
        return f"{self.__class__.__name__}({self.name!r}, size={self.size})"

    def __enter__(self: _T) -> _T:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass

    @property
    def buf(self) -> memoryview:
        """A writable memoryview of the segment's contents (None once closed)."""
        if not self._noted:
            self._note()
        return self._buf  # type: ignore[return-value]

    @property
    def name(self) -> str:
        """The name that re-attaches to this segment from another process."""
        return self._name  # type: ignore[return-value]

    @property
    def size(self) -> int:
        """Size in bytes, exactly as created."""
        return self._size

    @property
    def backend(self) -> str:
        """Name of the backend that holds this segment."""
        return self._backend.name if self._backend is not None else ""

    def close(self) -> None:
        """Close this process's access to the segment; does not destroy it.

        Views of ``buf`` made before (NumPy arrays, memoryviews) stay valid:
        the memory is unmapped when the last of them is released.
        """
        self._buf = None
        attachment, self._attachment = self._attachment, None
        if attachment is not None:
            attachment.close()

    def unlink(self) -> None:
        """Destroy the segment's name, so no new process can attach to it.

        Call it once, from any one process. Memory already mapped stays valid
        until closed everywhere. Raises FileNotFoundError if it is already
        gone.
        """
        if self._backend is None or self._ident is None:
            return
        try:
            self._backend.unlink(self._ident)
        finally:
            # Segments this process made untracked were never registered; any
            # other may be (by whichever process of this program created it).
            if self._track or not self._created:
                tracking.unregister(self._backend.name, self._ident)


class _Registry(Protocol):
    def register(self, backend: Backend, ident: str, identity: Optional[str] = None) -> bool: ...

    def unregister(self, backend: str, ident: str, identity: Optional[str] = None) -> None: ...


def _generate(
    chosen: Backend, options: Mapping[str, Any], registry: Optional[_Registry],
    make: Callable[[str], tuple[_R, Optional[str]]],
) -> tuple[_R, str]:
    """Create a segment with a fresh name by ``make(ident) -> (result,
    identity)``; register it with *registry* (the :mod:`~mpshm.tracking`
    module, a Scope, or None for untracked). A storage found full is tried
    once more if this process's caches had memory to give back (see
    :func:`_reclaimed`)."""
    retried = False
    while True:
        ident = chosen.generate(options)
        registered = False
        if registry is not None:
            # Registered before it exists, so that a kill during creation
            # cannot leak it (the name is random: nobody else has it).
            # Where the storage records each segment's creator, a claim naming
            # this process proves it ours from the first moment.
            registered = registry.register(chosen, ident, chosen.claim_identity(ident, os.getpid()))
        try:
            result, identity = make(ident)
        except BaseException as exc:
            if registry is not None:
                registry.unregister(chosen.name, ident)
            if isinstance(exc, FileExistsError):
                continue
            if not retried and _reclaimed(exc):
                retried = True
                continue
            raise
        if registered and identity is not None and not chosen.unique_names:
            registry.register(chosen, ident, identity)  # type: ignore[union-attr]
        return result, ident


def _reclaimed(exc: BaseException) -> bool:
    """Whether *exc* says the storage is full and this process's caches (a
    pool's warm segments, kept mappings) gave back what they held: then a
    creation is worth one more try. Costs nothing unless the storage is full."""
    if not isinstance(exc, OSError) or exc.errno != errno.ENOSPC:
        return False
    # Segments a pool let go of may still be queued for destruction (see
    # _mappings.reaper): their space comes back once that is done.
    pending = _mappings.reaper.pending()
    _mappings.reaper.drain()
    return _mappings.reclaim() or pending


def _create_named(
    chosen: Backend, ident: str, size: int, options: Mapping[str, Any],
    registry: Optional[_Registry],
) -> Attachment:
    """Create and map segment *ident* (a user's name) of *size* bytes,
    registered with *registry* (None: untracked) so that a kill at any moment
    leaves nothing behind, and nothing of anyone else's is destroyed.

    Where the storage can make a segment without a name
    (:meth:`~mpshm.backends.Backend.create_unnamed`: an O_TMPFILE file),
    the unnamed segment is registered under the user's name with its
    identity, then given that name (see :func:`_name_unnamed`): one message
    to the tracker. Else, where it can give an existing segment a second
    name (:meth:`~mpshm.backends.Backend.link`), the segment is made under a
    fresh random name first (registered before it exists, as generated ones
    are), then registered under the user's name with its identity, and only
    then linked to that name. Either way, at every moment each name that
    exists is registered with an identity that proves it is this segment.
    Elsewhere the name is registered as soon as the segment exists, with a
    tracker already running.
    """
    if registry is None:
        return chosen.create(ident, size, options)
    if chosen.exists(ident):  # taken: fail before registering anything
        raise FileExistsError(errno.EEXIST, "A shared memory segment of that name exists",
                              chosen.qualified(ident))
    unnamed = chosen.create_unnamed(ident, size, options)
    if unnamed is not None:
        named = _name_unnamed(chosen, ident, unnamed, registry)
        if named is not None:
            return named
    staged = _generate_sibling(chosen, ident, size, options, registry)
    if staged is None:
        return _create_then_register(chosen, ident, size, options, registry)
    attachment, sibling = staged
    linked = False
    try:
        registry.register(chosen, ident, attachment.identity)
        try:
            chosen.link(sibling, ident)
            linked = True
        finally:
            if not linked:  # (only ours: the winner of a race for the name keeps its own)
                registry.unregister(chosen.name, ident, attachment.identity)
    except NotImplementedError:  # this filesystem has no hard links after all
        pass
    finally:
        if not linked:
            attachment.close()
        try:
            chosen.unlink(sibling)
        except OSError:
            pass
        registry.unregister(chosen.name, sibling)
    if linked:
        return attachment
    return _create_then_register(chosen, ident, size, options, registry)


def _name_unnamed(
    chosen: Backend, ident: str, unnamed: Unnamed, registry: _Registry,
) -> Optional[Attachment]:
    """Register *ident* with the identity of *unnamed*, then give it that
    name: a kill before the name exists leaves nothing (an unnamed segment
    dies with this process), and once it exists the tracker can prove it is
    this segment. FileExistsError if the name is taken meanwhile (its
    registration withdrawn, the winner's left alone); None where the storage
    cannot name it after all (nothing left either: the caller creates
    another way)."""
    attachment = unnamed.attachment
    named = False
    try:
        registry.register(chosen, ident, attachment.identity)
        try:
            unnamed.name()
            named = True
        except NotImplementedError:
            pass
        finally:
            if not named:  # (only ours: the winner of a race for the name keeps its own)
                registry.unregister(chosen.name, ident, attachment.identity)
    finally:
        unnamed.release()
        if not named:
            attachment.close()
    return attachment if named else None


def _generate_sibling(
    chosen: Backend, ident: str, size: int, options: Mapping[str, Any], registry: _Registry,
) -> Optional[tuple[Attachment, str]]:
    """A new segment under a fresh random name that can be linked to *ident*
    (registered before it exists), or None where the storage cannot link."""
    while True:
        sibling = chosen.sibling(ident)
        if sibling is None:
            return None
        registry.register(chosen, sibling, None)
        try:
            return chosen.create(sibling, size, options), sibling
        except FileExistsError:
            registry.unregister(chosen.name, sibling)
        except BaseException:
            registry.unregister(chosen.name, sibling)
            raise


def _create_then_register(
    chosen: Backend, ident: str, size: int, options: Mapping[str, Any], registry: _Registry,
) -> Attachment:
    """Create *ident*, then register it with its identity (storages that cannot
    link). A claim sent first names the creating process, so that a kill
    between creation and registration leaves a segment the tracker can still
    prove is this process's (see :meth:`~mpshm.backends.Backend.claim`)."""
    claim = chosen.claim_identity(ident, os.getpid())
    if claim is not None:
        registry.register(chosen, ident, claim)
    else:
        try:
            tracking.ensure_running()  # a kill while one starts would leak it
        except Exception:  # register() below warns that it cannot track
            pass
    try:
        attachment = chosen.create(ident, size, options)
    except BaseException:
        if claim is not None:
            registry.unregister(chosen.name, ident, claim)
        raise
    try:
        registry.register(chosen, ident, attachment.identity)
    except BaseException:  # never leave a segment nobody knows of
        attachment.close()
        try:
            chosen.unlink(ident)
        except OSError:
            pass
        raise
    return attachment


def _create_generated(
    chosen: Backend, size: int, options: Mapping[str, Any], registry: Optional[_Registry]
) -> tuple[Attachment, str]:
    """Create and map a segment of *size* bytes with a fresh name (see :func:`_generate`)."""

    def make(ident: str) -> tuple[Attachment, Optional[str]]:
        attachment = chosen.create(ident, size, options)
        return attachment, attachment.identity

    return _generate(chosen, options, registry, make)


_HANDLE_SIZE = re.compile(r"[0-9a-f]{16}")


def _rebuild(
    cls: type[SharedMemory], backend: str, ident: str, name: str, size: Union[str, int],
    made_on: Optional[tuple[str, str]] = None,
) -> SharedMemory:
    """Unpickle a :class:`SharedMemory` handle by attaching to its segment.

    *size* is 16 hexadecimal digits (see :meth:`SharedMemory.__reduce__`),
    or an int in handles of earlier versions."""
    check_machine(made_on, name)
    if isinstance(size, str) and _HANDLE_SIZE.fullmatch(size):
        size = int(size, 16)
    elif not isinstance(size, int) or isinstance(size, bool):
        raise HandleError(
            f"invalid shared memory handle of {name!r}: its size is {size!r}, not 16 "
            "hexadecimal digits"
        )
    return cls._from_handle(backend, ident, name, size)


# --------------------------------------------------------------------------
# ShareableList

_encoding = "utf8"


class _UnsupportedType(TypeError, KeyError):
    """Raised for a value ShareableList cannot store (also a KeyError, as in
    the standard library)."""

    def __str__(self) -> str:
        return str(self.args[0])


class _IntOutOfRange(struct.error, OverflowError):
    """Raised for an int outside 64 bits (also a struct.error, as in the
    standard library, which finds out only once the segment exists)."""


_INT_MIN, _INT_MAX = -(2**63), 2**63 - 1


def _string_format(encoded: bytes, slot: int, what: str) -> str:
    """The packing format of a str/bytes value stored in a slot of *slot* bytes.

    ``"<n>sx"`` where it fits (values under a million bytes, with at least one
    spare byte in the slot): the value, then a pad byte. The standard library
    reads that as an ``n``-byte string (the pad has no value), so readers of
    either kind get the value exactly, trailing NULs included; the trailing
    ``x`` also makes the standard library's ``__setitem__`` write a format of
    its own rather than reuse this one. Otherwise the standard library's
    ``"<slot>s"``, which readers strip of trailing NULs: a value that ends
    with NUL is refused then rather than silently shortened.
    """
    length = len(encoded)
    if length > slot:
        raise ValueError(
            f"bytes/str item exceeds available storage: {what} has room for {slot} "
            f"bytes, the value needs {length}"
        )
    exact = f"{length}sx"
    if length < slot and len(exact) <= 8:
        return exact
    if encoded.endswith(b"\x00"):
        raise ValueError(
            f"bytes/str item exceeds available storage: {what} ({slot} bytes) cannot "
            f"hold a value of {length} bytes ending with NUL bytes exactly (it would "
            "read back without them); keep such values under 1,000,000 bytes with a "
            "spare byte, or store them in a SharedMemory segment"
        )
    return f"{slot}s"


class ShareableList:
    """A fixed-length list of ``int``, ``float``, ``bool``, ``str``, ``bytes``
    and ``None`` stored in one shared memory segment.

    A drop-in for :class:`multiprocessing.shared_memory.ShareableList`, on any
    backend (``backend=``, and that backend's options such as ``dir=``), with
    the same byte layout, so a POSIX list is
    readable and writable by either implementation. Fixed here:

    * ``str`` and ``bytes`` values round-trip exactly: trailing NUL bytes are
      kept (the standard library strips them, CPython gh-96779 and
      gh-106939) and multi-byte UTF-8 strings get room for their encoded
      size (the standard library sizes them by characters and truncates
      them, CPython gh-88336).
    * A value larger than the layout can describe (more than 9,999,991
      bytes) raises ValueError at creation instead of writing a list nobody
      can read.
    * Where the layout cannot record a value's exact length (values of a
      million bytes or more, or one that fills its slot to the last byte),
      a value ending with NUL bytes raises ValueError instead of losing them.

    Lists written by the standard library are read as it reads them
    (padding stripped), since their layout does not record exact lengths.
    """

    _types_mapping: ClassVar[dict[type, str]] = {
        int: "q",
        float: "d",
        bool: "xxxxxxx?",
        str: "%ds",
        bytes: "%ds",
        type(None): "xxxxxx?x",
    }
    _alignment = 8
    _back_transforms_mapping: ClassVar[dict[int, Callable[[Any], Any]]] = {
        0: lambda value: value,
        1: lambda value: value.decode(_encoding),
        2: lambda value: value,
        3: lambda _value: None,
    }

    shm: SharedMemory
    _list_len: int
    _allocated_offsets: list[int]

    @staticmethod
    def _extract_recreation_code(value: Any) -> int:
        if not isinstance(value, (str, bytes, type(None))):
            return 0
        if isinstance(value, str):
            return 1
        if isinstance(value, bytes):
            return 2
        return 3

    @classmethod
    def _packed(cls, value: Any) -> Any:
        """What struct packs for *value* (str encoded); unsupported types raise."""
        if type(value) not in cls._types_mapping:
            raise _UnsupportedType(
                f"ShareableList cannot store a value of type {type(value).__name__}: "
                "supported types are int, float, bool, str, bytes and None"
            )
        if type(value) is int and not _INT_MIN <= value <= _INT_MAX:
            raise _IntOutOfRange(
                f"ShareableList cannot store the int {value}: it holds 64-bit signed "
                f"integers ({_INT_MIN} to {_INT_MAX})"
            )
        return value.encode(_encoding) if isinstance(value, str) else value

    @classmethod
    def _format_for(cls, value: Any, packed: Any, slot: int, what: str) -> str:
        if isinstance(value, (str, bytes)):
            return _string_format(packed, slot, what)
        return cls._types_mapping[type(value)]

    @classmethod
    def _allocation(cls, value: Any, packed: Any) -> int:
        if isinstance(value, (str, bytes)):
            slot = cls._alignment * (len(packed) // cls._alignment + 1)
            if slot >= 10_000_000:
                raise ValueError(
                    f"a {type(value).__name__} of {len(packed)} bytes is too large for a "
                    "ShareableList (its layout describes values of at most 9999991 bytes); "
                    "store it in a SharedMemory segment instead"
                )
            return slot
        return cls._alignment

    def __init__(
        self,
        sequence: Optional[Iterable[Any]] = None,
        *,
        name: Optional[str] = None,
        backend: Optional[str] = None,
        **options: Any,
    ) -> None:
        if name is None or sequence is not None:
            self._build(
                sequence,
                lambda size: SharedMemory(name, create=True, size=size, backend=backend, **options),
            )
        else:
            self._attach(SharedMemory(name, backend=backend, **options))

    def _build(
        self, sequence: Optional[Iterable[Any]], make: Callable[[int], SharedMemory]
    ) -> None:
        """Lay *sequence* out in a new segment of the size it needs, made by *make*."""
        items = list(sequence or ())
        self._list_len = len(items)
        offset = 0
        self._allocated_offsets = [0]
        formats = []
        packed = [self._packed(item) for item in items]
        for position, (item, data) in enumerate(zip(items, packed)):
            slot = self._allocation(item, data)
            formats.append(self._format_for(item, data, slot, f"item {position}"))
            offset += slot
            self._allocated_offsets.append(offset)
        self.shm = make(8 * (self._list_len + 2) + offset + 8 * self._list_len + self._list_len)
        try:
            self._lay_out(formats, packed, items)
        except BaseException:
            self.shm.close()  # a list nobody can read: gone at once, not at exit
            try:
                self.shm.unlink()
            except FileNotFoundError:
                pass
            raise

    def _lay_out(self, formats: list[str], packed: list[Any], items: list[Any]) -> None:
        """Write the header and *items* (packed as *packed* with *formats*)."""
        buf = self.shm.buf
        struct.pack_into(
            "q" + self._format_size_metainfo, buf, 0, self._list_len, *self._allocated_offsets
        )
        for position, (fmt, data) in enumerate(zip(formats, packed)):
            at = self._offset_data_start + self._allocated_offsets[position]
            struct.pack_into(fmt, buf, at, data)
        struct.pack_into(
            self._format_packing_metainfo,
            buf,
            self._offset_packing_formats,
            *(fmt.encode(_encoding) for fmt in formats),
        )
        struct.pack_into(
            self._format_back_transform_codes,
            buf,
            self._offset_back_transform_codes,
            *(self._extract_recreation_code(item) for item in items),
        )

    def _attach(self, shm: SharedMemory) -> None:
        """Take *shm*, which holds a list someone made, and read its header."""
        self.shm = shm
        self._list_len = len(self)
        if not 0 <= self._list_len <= (shm.size - 16) // 25:
            shm.close()
            raise ValueError(
                f"the segment {shm.name!r} does not hold a ShareableList "
                f"(its header says {self._list_len} items in {shm.size} bytes)"
            )
        self._allocated_offsets = list(struct.unpack_from(self._format_size_metainfo, shm.buf, 8))

    # -- layout ---------------------------------------------------------------

    @property
    def _format_size_metainfo(self) -> str:
        return "q" * (self._list_len + 1)

    @property
    def _format_packing_metainfo(self) -> str:
        return "8s" * self._list_len

    @property
    def _format_back_transform_codes(self) -> str:
        return "b" * self._list_len

    @property
    def _offset_data_start(self) -> int:
        return (self._list_len + 2) * 8

    @property
    def _offset_packing_formats(self) -> int:
        return self._offset_data_start + self._allocated_offsets[-1]

    @property
    def _offset_back_transform_codes(self) -> int:
        return self._offset_packing_formats + self._list_len * 8

    def _position(self, position: int, message: str) -> int:
        position = operator.index(position)
        if position < 0:
            position += self._list_len
        if not 0 <= position < self._list_len:
            raise IndexError(message)
        return position

    def _get_packing_format(self, position: int) -> str:
        raw = struct.unpack_from("8s", self.shm.buf, self._offset_packing_formats + position * 8)[0]
        return str(raw.rstrip(b"\x00").decode(_encoding))

    def _get_back_transform(self, position: int) -> Callable[[Any], Any]:
        code = struct.unpack_from("b", self.shm.buf, self._offset_back_transform_codes + position)[
            0
        ]
        try:
            return self._back_transforms_mapping[code]
        except KeyError:
            raise ValueError(
                f"item {position} of {self.shm.name!r} has an unknown type code {code}: "
                "the segment is not a ShareableList or is corrupted"
            ) from None

    def _set_packing_format_and_transform(self, position: int, fmt: str, value: Any) -> None:
        struct.pack_into(
            "8s",
            self.shm.buf,
            self._offset_packing_formats + position * 8,
            fmt.encode(_encoding),
        )
        struct.pack_into(
            "b",
            self.shm.buf,
            self._offset_back_transform_codes + position,
            self._extract_recreation_code(value),
        )

    # -- list protocol ----------------------------------------------------------

    def __getitem__(self, position: int) -> Any:
        position = self._position(position, "index out of range")
        fmt = self._get_packing_format(position)
        offset = self._offset_data_start + self._allocated_offsets[position]
        (value,) = struct.unpack_from(fmt, self.shm.buf, offset)
        if fmt.endswith("s"):
            # The standard library's format, padded to the slot with no record
            # of the exact length: read it the way it does.
            value = value.rstrip(b"\x00")
        return self._get_back_transform(position)(value)

    def __setitem__(self, position: int, value: Any) -> None:
        position = self._position(position, "assignment index out of range")
        slot = self._allocated_offsets[position + 1] - self._allocated_offsets[position]
        packed = self._packed(value)
        fmt = self._format_for(value, packed, slot, f"item {position}")
        offset = self._offset_data_start + self._allocated_offsets[position]
        # The value first: if it cannot be written, the slot keeps its old one.
        struct.pack_into(fmt, self.shm.buf, offset, packed)
        self._set_packing_format_and_transform(position, fmt, value)

    def __len__(self) -> int:
        return int(struct.unpack_from("q", self.shm.buf, 0)[0])

    def __iter__(self) -> Iterator[Any]:
        for position in range(self._list_len):
            yield self[position]

    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuild_list, (type(self), self.shm))

    def __repr__(self) -> str:
        return f"{self.__class__.__name__}({list(self)}, name={self.shm.name!r})"

    @property
    def format(self) -> str:
        """The struct packing format used by all currently stored items."""
        return "".join(self._get_packing_format(i) for i in range(self._list_len))

    def count(self, value: Any) -> int:
        """L.count(value) -> integer -- return number of occurrences of value."""
        return sum(value == entry for entry in self)

    def index(self, value: Any) -> int:
        """L.index(value) -> integer -- return first index of value.

        Raises ValueError if the value is not present.
        """
        for position, entry in enumerate(self):
            if value == entry:
                return position
        raise ValueError(f"{value!r} not in this container")

    __class_getitem__ = classmethod(types.GenericAlias)  # type: ignore[var-annotated]


def _rebuild_list(cls: type[ShareableList], shm: SharedMemory) -> ShareableList:
    """Unpickle a :class:`ShareableList` from the handle of its segment."""
    self = cls.__new__(cls)
    self._attach(shm)
    return self
