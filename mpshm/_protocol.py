"""The messages between processes and their tracker (see :mod:`mpshm.tracking`).

A message is a 4-byte big-endian length, then NUL-separated UTF-8 fields:
operation (``reg``, ``own``, ``join``, ``unreg``, or ``scope``, which announces a
scope's token in the identifier field), backend, identifier, identity (may be empty),
a JSON object of extras (third-party backends only, else empty), and the
sending process's pid (for the tracker's journal: who created a segment).
Identifiers never contain NUL (every backend rejects it). The framing lets
the same decoder serve SOCK_SEQPACKET (one message per packet) and
SOCK_STREAM (where messages may arrive split or joined).
"""

from __future__ import annotations

import json
import os
import struct
from typing import Any, Optional

_HEADER = struct.Struct("!I")
_FIELDS = 6


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


class Decoder:
    """Turns received bytes into message dicts (``op b i id`` and extras)."""

    def __init__(self) -> None:
        self._buffer = b""

    def feed(self, data: bytes) -> list[dict[str, Any]]:
        """Add *data*; return the complete messages it finishes (bad ones dropped).

        Messages of an earlier version without the pid field are accepted
        (``pid`` is then None)."""
        self._buffer += data
        messages = []
        while len(self._buffer) >= _HEADER.size:
            (length,) = _HEADER.unpack_from(self._buffer)
            end = _HEADER.size + length
            if len(self._buffer) < end:
                break
            payload, self._buffer = self._buffer[_HEADER.size : end], self._buffer[end:]
            fields = payload.decode("utf-8", "surrogateescape").split("\0")
            if len(fields) == _FIELDS - 1:
                fields.append("")
            if len(fields) != _FIELDS:
                continue
            op, backend, ident, identity, extra, pid = fields
            message: dict[str, Any] = {
                "op": op,
                "b": backend,
                "i": ident,
                "id": identity or None,
                "pid": int(pid) if pid.isdigit() else None,
            }
            if extra:
                try:
                    message.update(json.loads(extra))
                except ValueError:
                    continue
            messages.append(message)
        return messages
