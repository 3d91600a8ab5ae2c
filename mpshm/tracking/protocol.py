"""The messages between processes and their tracker (see :mod:`mpshm.tracking`).

A message is a 4-byte big-endian length, then NUL-separated UTF-8 fields:
operation (``reg``, ``own``, ``join``, ``unreg``, or ``scope``, which announces a
scope's token in the identifier field), backend, identifier, identity (may be empty),
a JSON object of extras (third-party backends only, else empty), and the
sending process's pid (for the tracker's journal: who created a segment).
Identifiers never contain NUL (every backend rejects it). The framing lets
the same decoder serve SOCK_SEQPACKET (one message per packet) and
SOCK_STREAM (where messages may arrive split or joined).

Who is at the other end matters as much as what it says: a tracker acts on
registrations with its user's rights, so both sides check credentials
(:func:`peer`, :func:`sender`). Tracker and clients must have the same
effective uid; another user who binds a dead tracker's address, or a
process of the program that changed user after inheriting a connection, is
not one of them.
"""

from __future__ import annotations

import json
import os
import socket
import struct
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any, NamedTuple, Optional

_HEADER = struct.Struct("!I")
_FIELDS = 6
#: ``struct ucred`` (pid, uid, gid), as SO_PEERCRED and SCM_CREDENTIALS carry it.
_UCRED = struct.Struct("3i")
#: Whether this system attaches the sender's credentials to every message
#: (Linux: SO_PASSCRED on the receiving socket).
PASSCRED = hasattr(socket, "SO_PASSCRED") and hasattr(socket, "SCM_CREDENTIALS")
#: Ancillary buffer size for one message's credentials (0 without PASSCRED).
CREDENTIALS_SPACE = socket.CMSG_SPACE(_UCRED.size) if PASSCRED else 0


def peer(sock: socket.socket) -> tuple[Optional[int], Optional[int]]:
    """(pid, effective uid) of the process at the other end of *sock*, as the
    kernel recorded it when that end was made: for a connection, when the
    listening socket started listening (so the listener's creator); for a
    socket pair, the process that made the pair. (None, None) where the system
    does not tell (there tracker addresses are paths in a private directory,
    so no other user can be listening)."""
    if not hasattr(socket, "SO_PEERCRED"):
        return None, None
    try:
        creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
    except OSError:
        return None, None
    pid, uid, _gid = _UCRED.unpack(creds)
    return int(pid), int(uid)


def pass_credentials(sock: socket.socket) -> None:
    """Have the kernel attach the sender's credentials to every message that
    *sock* receives from now on (set it on a listening socket before others
    connect: accepted connections inherit it)."""
    if PASSCRED:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)


def sender(ancdata: list[tuple[int, int, bytes]]) -> Optional[tuple[int, int]]:
    """(pid, real uid) of the process that sent a message, from the
    ancillary data ``recvmsg`` returned with it; None if the kernel attached
    none (the message was queued before :func:`pass_credentials`; pid 0 means
    the same). The kernel fills these in: a sender cannot claim another
    process's pid or a uid it does not have."""
    for level, kind, data in ancdata:
        if (
            level == socket.SOL_SOCKET
            and kind == getattr(socket, "SCM_CREDENTIALS", -1)
            and len(data) >= _UCRED.size
        ):
            pid, uid, _gid = _UCRED.unpack_from(data)
            return (int(pid), int(uid)) if pid else None
    return None


def encode(
    op: str,
    backend: str,
    ident: str,
    identity: Optional[str],
    extra: Optional[dict[str, Any]] = None,
) -> bytes:
    """Frame one message."""
    fields = [op, backend, ident, identity or "", json.dumps(extra) if extra else "",
              str(os.getpid())]
    payload = "\0".join(fields).encode("utf-8", "surrogateescape")
    return _HEADER.pack(len(payload)) + payload


class Message(NamedTuple):
    """One decoded message (see the module docstring for the wire format)."""

    #: ``reg``, ``own``, ``join``, ``unreg`` or ``scope``.
    op: str
    #: The backend's name (empty for ``scope``).
    backend: str
    #: The segment's identifier; for ``scope``, the scope's token.
    ident: str
    #: The storage object's identity, if the sender gave one.
    identity: Optional[str]
    #: The sending process's pid (None if the field is not a number).
    pid: Optional[int]
    #: The JSON extras: ``s`` (the scope token of a ``join``), ``m`` and ``p``
    #: (how to load a third-party backend: import spec and ``sys.path``).
    extra: Mapping[str, Any]

    @property
    def key(self) -> tuple[str, str]:
        """(backend, identifier): what the tracker files the segment under."""
        return self.backend, self.ident


_NO_EXTRA: Mapping[str, Any] = MappingProxyType({})


class Decoder:
    """Turns received bytes into :class:`Message` objects."""

    def __init__(self) -> None:
        self._buffer = b""

    def feed(self, data: bytes) -> list[Message]:
        """Add *data*; return the complete messages it finishes (bad ones dropped:
        not the fields :func:`encode` writes, or extras that are not a JSON object)."""
        self._buffer += data
        messages = []
        while len(self._buffer) >= _HEADER.size:
            (length,) = _HEADER.unpack_from(self._buffer)
            end = _HEADER.size + length
            if len(self._buffer) < end:
                break
            payload, self._buffer = self._buffer[_HEADER.size : end], self._buffer[end:]
            fields = payload.decode("utf-8", "surrogateescape").split("\0")
            if len(fields) != _FIELDS:
                continue
            op, backend, ident, identity, extra, pid = fields
            extras: Mapping[str, Any] = _NO_EXTRA
            if extra:
                try:
                    extras = json.loads(extra)
                except ValueError:
                    continue
                if not isinstance(extras, dict):
                    continue
            messages.append(Message(
                op, backend, ident, identity or None, int(pid) if pid.isdigit() else None, extras
            ))
        return messages
