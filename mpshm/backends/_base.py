"""The interface every storage backend implements: the contract.

A backend is a small object with no per-segment state: it turns an
*identifier* (the part of a name after ``scheme:``) into a mapping of the
segment in this process. Every backend raises the same exceptions for the
same situations, so nothing backend-specific leaks into
:mod:`mpshm.shared_memory`:

* ``ValueError`` for an identifier the storage cannot use;
* ``TypeError`` for an option the backend does not accept;
* ``FileExistsError`` when creating a name that is taken;
* ``FileNotFoundError`` when attaching or unlinking a name that is absent;
* ``OSError(ENOSPC)`` when the storage cannot hold the size asked for.

The helpers the backends share are in :mod:`mpshm.backends._util`, and
those of the file-backed ones in :mod:`mpshm.backends._files`.
"""

from __future__ import annotations

import abc
import mmap  # noqa: F401  (tests patch mmap.mmap through this module)
import os
from dataclasses import dataclass, field
from typing import Any, ClassVar, Mapping, Optional

from . import _huge

# Helpers that used to live here, still imported from here by other modules.
from ._util import _stranded as _stranded
from ._util import format_size as format_size
from ._util import map_shared as map_shared

__all__ = [
    "Attachment",
    "Backend",
    "SegmentInfo",
    "Unnamed",
]


@dataclass(frozen=True)
class SegmentInfo:
    """One segment that exists on a backend, as listed by :meth:`Backend.list`."""

    #: The name as mpshm names it (what ``SharedMemory.name`` would return).
    name: str
    #: The backend's registered name.
    backend: str
    #: Size in bytes.
    size: int
    #: Numeric user id of the owner.
    uid: int
    #: Permission bits.
    mode: int
    #: Creator's process id where the storage records it (SysV), else None.
    creator_pid: Optional[int] = None
    #: Number of attachments where the storage counts them (SysV), else None.
    attached: Optional[int] = None
    #: Time of creation or last change, seconds since the epoch.
    ctime: Optional[float] = None
    #: Anything else the backend knows.
    extra: Mapping[str, Any] = field(default_factory=dict)


class Attachment(abc.ABC):
    """A segment mapped into this process.

    ``buf`` is a writable memoryview of exactly ``size`` bytes. ``close()``
    drops this attachment's hold on the mapping; the memory stays mapped for
    as long as any view made from ``buf`` is alive, so closing never
    invalidates memory someone still uses (and never raises BufferError).
    """

    #: Exactly the segment's size.
    size: int
    #: Writable view of the whole segment, ``None`` once closed.
    buf: Optional[memoryview]
    #: Identity of the storage object (see :meth:`Backend.identity`), if known.
    identity: Optional[str] = None
    #: Owner (numeric user and group ids) and permission bits of the storage
    #: object, as an attach found them (None: not known, or created by this
    #: process). :class:`~mpshm.SharedMemory` checks them (its ``owner_check=``).
    uid: Optional[int] = None
    gid: Optional[int] = None
    mode: Optional[int] = None
    #: Who created it, where the storage records a creator apart from the
    #: owner (System V: the kernel grants its creator every right the owner
    #: has, and the creator may hand ownership to anyone); None elsewhere.
    creator_uid: Optional[int] = None
    creator_gid: Optional[int] = None

    @abc.abstractmethod
    def close(self) -> None:
        """Release this attachment; safe to call more than once."""


class Unnamed(abc.ABC):
    """A new segment without a name yet (see :meth:`Backend.create_unnamed`)."""

    #: The segment, mapped; its identity is known.
    attachment: Attachment

    @abc.abstractmethod
    def name(self) -> None:
        """Give the segment the name it was made for, atomically:
        FileExistsError if that name is taken, NotImplementedError where the
        storage turns out unable to (nothing changed, either way)."""

    @abc.abstractmethod
    def release(self) -> None:
        """Let go of what keeps the segment alive besides :attr:`attachment`
        (an unnamed one then lives as long as its mapping); safe to call twice."""


class Backend(abc.ABC):
    """A storage for shared memory segments.

    Subclasses set :attr:`name` (the scheme in ``scheme:identifier`` names)
    and implement the abstract methods. ``options`` are the backend-specific
    keyword arguments a user passed to ``SharedMemory(...)``; a backend
    rejects the ones it does not know in :meth:`check_options`.
    """

    #: The registered name, also the scheme of qualified names.
    name: ClassVar[str]
    #: Keyword options this backend accepts.
    option_names: ClassVar[frozenset[str]] = frozenset()
    #: Of those, the flags whose values :meth:`check_options` checks too
    #: (True, False or None): the built-in backends' ``huge_pages=`` and
    #: ``prefault=``. A backend of your own checks its values itself.
    checked_flags: ClassVar[frozenset[str]] = frozenset()
    #: Human description of the storage, for messages.
    storage: ClassVar[str] = "shared memory"
    #: Whether :meth:`generate` makes names nobody else will ever make (64
    #: random bits or more). Then the tracker needs no identity to destroy
    #: them safely, which saves a message per creation.
    unique_names: ClassVar[bool] = False

    def check_options(self, options: Mapping[str, Any]) -> None:
        """Raise TypeError naming any option this backend does not accept.

        Also TypeError unless the values of :attr:`checked_flags` are True,
        False or None.
        """
        unknown = sorted(set(options) - self.option_names)
        if unknown:
            accepted = ", ".join(sorted(self.option_names)) or "none"
            raise TypeError(
                f"the {self.name!r} backend does not accept the option(s) "
                f"{', '.join(unknown)}; it accepts: {accepted}"
            )
        if options and self.checked_flags:
            _huge.check({key: options[key] for key in self.checked_flags if key in options})

    @abc.abstractmethod
    def parse(self, ident: str, options: Mapping[str, Any]) -> str:
        """Validate a user-given identifier and return its canonical form.

        The canonical form is what the other methods take; it must not depend
        on this process's settings (the mmap backend turns a bare file name
        into an absolute path here). Raise ValueError, naming what is wrong
        and how to fix it, for an identifier the storage cannot use.
        """

    @abc.abstractmethod
    def generate(self, options: Mapping[str, Any]) -> str:
        """Return a fresh, random, canonical identifier for a new segment."""

    @abc.abstractmethod
    def qualified(self, ident: str) -> str:
        """Return the self-describing name of canonical *ident*."""

    @abc.abstractmethod
    def create(self, ident: str, size: int, options: Mapping[str, Any]) -> Attachment:
        """Create the segment exclusively (mode 0600), reserve its space, map it.

        Raise FileExistsError if it exists; OSError(ENOSPC) if the storage
        cannot hold it, leaving nothing behind. The segment reads as zeros.
        """

    def create_from(
        self, ident: str, data: memoryview, options: Mapping[str, Any]
    ) -> Optional[str]:
        """Create the segment exclusively, holding a copy of *data* (its size
        is ``data.nbytes``), without keeping it mapped; return its identity.

        The sharing pickler's copies are made this way. This default maps
        the new segment and copies; backends with a file descriptor write
        through it instead, which is faster for a fresh segment.
        """
        attachment = self.create(ident, data.nbytes, options)
        try:
            assert attachment.buf is not None
            self.before_copy(ident, attachment)
            attachment.buf[: data.nbytes] = data
        except BaseException:
            try:
                self.unlink(ident)
            except OSError:
                pass
            raise
        finally:
            attachment.close()
        return attachment.identity

    def before_copy(self, ident: str, attachment: Attachment) -> None:
        """Optional: called by the default :meth:`create_from` between
        creating segment *ident* (*attachment*, mapped) and copying into it,
        to make the copy cheaper (fault the whole mapping in at once, say).
        An exception it raises fails the creation, which leaves nothing
        behind. By default nothing."""
        return None

    @abc.abstractmethod
    def attach(self, ident: str, options: Mapping[str, Any]) -> Attachment:
        """Map an existing segment. Never changes or removes anything."""

    def attach_private(self, ident: str, options: Mapping[str, Any]) -> Optional[Attachment]:
        """Map an existing segment privately (copy-on-write): writes through
        ``buf`` are this mapping's own, never the segment's; pages not yet
        written still show later changes to the segment. None where the
        storage cannot (the default; System V, hugetlbfs): receivers of
        private copies then copy the bytes instead."""
        return None

    @abc.abstractmethod
    def unlink(self, ident: str) -> None:
        """Remove the segment's name; mappings stay valid until closed."""

    @abc.abstractmethod
    def identity(self, ident: str) -> Optional[str]:
        """Return a string that tells this storage object from any later one
        of the same name, or None if *ident* is absent.

        It must hold something a new object cannot share with the old one
        (an inode number alone is reused at once on ext4): the built-in
        backends use what the kernel records at creation and never changes,
        or a random token written at creation. Attaching gives the same
        string for the same object (``Attachment.identity``).
        """

    def destroy(self, ident: str, identity: Optional[str]) -> bool:
        """Unlink *ident* if it is still the object with *identity*.

        Used by the tracker at cleanup time and by ``mpshm gc``, so that a
        name reused in the meantime, by anyone, is left alone. Without an
        identity (None) nothing is destroyed: a name is no proof. Returns
        True if removed.
        """
        if not self.proves(identity, self.identity(ident)):
            return False
        try:
            self.unlink(ident)
        except FileNotFoundError:
            return False
        return True

    def proves(self, recorded: Optional[str], current: Optional[str]) -> bool:
        """Whether *current* (what :meth:`identity` says now) is the object
        that *recorded* (what a registration recorded: an identity, or a
        claim of :meth:`claim_identity`) names. Nothing proves an absent
        object, nor anything with no record."""
        return recorded is not None and current is not None and recorded == current

    def listed_ident(self, ident: str) -> str:
        """The identifier under which :meth:`list` reports segment *ident*
        (canonical); by default *ident* itself."""
        return ident

    def sibling(self, ident: str) -> Optional[str]:
        """A fresh random identifier for a segment that :meth:`link` can then
        give the name *ident*, or None where the storage cannot (the default).

        Creating under a user's name goes through it when it can, so that
        the name is registered with its identity before it exists."""
        return None

    def link(self, ident: str, name: str) -> None:
        """Give existing segment *ident* the further name *name* (canonical),
        atomically; FileExistsError if *name* is taken, NotImplementedError
        where the storage turns out unable to (the caller then creates under
        *name* directly). Only called for an *ident* that :meth:`sibling` gave."""
        raise NotImplementedError(f"the {self.name!r} backend cannot link segments")

    def create_unnamed(
        self, ident: str, size: int, options: Mapping[str, Any]
    ) -> Optional[Unnamed]:
        """A new segment of *size* bytes, mapped, that has no name yet and
        that :meth:`Unnamed.name` can then give the name *ident*; None where
        the storage cannot (the default: creating under a user's name then
        goes through :meth:`sibling` and :meth:`link`).

        Until it is named, the segment lives only as long as this process
        holds it: a kill leaves nothing behind, and the name can be
        registered with the segment's identity (``attachment.identity``)
        before it exists."""
        return None

    def exists(self, ident: str) -> bool:
        """Whether something holds the name *ident* (a creation of it would
        fail with FileExistsError); by default, whether it has an identity."""
        return self.identity(ident) is not None

    def claim_identity(self, ident: str, pid: int) -> Optional[str]:
        """A record, made before segment *ident* exists, that :meth:`proves`
        accepts for the segment process *pid* then creates there, where the
        storage records each segment's creator; None elsewhere (the default)."""
        return None

    @abc.abstractmethod
    def list(self) -> list[SegmentInfo]:
        """List the segments that exist on this storage (readable by us)."""

    def import_spec(self) -> Optional[str]:
        """``"module:Class"`` for a backend defined outside mpshm (so that another
        process can import and register it), None for a built-in one."""
        kind = type(self)
        if kind.__module__.startswith("mpshm.backends."):
            return None
        return f"{kind.__module__}:{kind.__qualname__}"

    def available(self) -> Optional[str]:
        """Return None if the backend works here, else the reason it does not."""
        return None

    def where(self, options: Mapping[str, Any]) -> Optional[str]:
        """The directory of the filesystem that holds new segments made with
        *options* (for its free space: ``os.statvfs``), or None where the
        storage is not a filesystem (the default)."""
        return None

    def free_space(self, options: Mapping[str, Any]) -> Optional[int]:
        """Bytes new segments made with *options* could still take, or None
        where that cannot be told: by default the free space of the
        filesystem at :meth:`where` (one ``statvfs``)."""
        where = self.where(options)
        if where is None:
            return None
        try:
            st = os.statvfs(where)
        except OSError:
            return None
        return st.f_bavail * st.f_frsize if st.f_blocks else None

    def __repr__(self) -> str:
        return f"<mpshm backend {self.name!r}>"
