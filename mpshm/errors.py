"""Exceptions that every layer of mpshm may raise.

They live at the bottom of the package so that a storage backend, the
tracker and the pickler can all raise them without importing each other.
"""

from __future__ import annotations

__all__ = ["HandleError"]


class HandleError(ValueError):
    """A pickled handle cannot be used where it was unpickled."""
