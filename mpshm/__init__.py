"""mpshm: shared memory for multiprocessing and concurrent.futures, on the storage you choose.

Drop-in replacements for :mod:`multiprocessing.shared_memory`::

    from mpshm import SharedMemory, ShareableList

    shm = SharedMemory(create=True, size=1 << 20)                  # POSIX, like the stdlib
    shm = SharedMemory(create=True, size=1 << 20, backend="sysv")  # System V
    shm = SharedMemory(create=True, size=1 << 20, backend="mmap")  # a file, mmap'd

Backends live in :mod:`mpshm.backends`; the default is ``posix``, or
``MPSHM_BACKEND``, or what :func:`set_default_backend` says.

Pools whose task arguments and results travel through shared memory
(:mod:`mpshm.pool`)::

    with mpshm.Pool(4) as pool:                      # or mpshm.ProcessPoolExecutor
        sums = pool.map(np.sum, big_arrays)           # handles, not bytes

NumPy arrays that live in shared memory are in :mod:`mpshm.numpy`.
"""

import sys

from . import reduction
from .backends import get_default_backend, set_default_backend
from .managers import SharedMemoryManager
from .pool import Pool, ProcessPoolExecutor, get_context
from .shared_memory import ShareableList, SharedMemory

__all__ = [
    "Pool",
    "ProcessPoolExecutor",
    "ShareableList",
    "SharedMemory",
    "SharedMemoryManager",
    "get_context",
    "get_default_backend",
    "set_default_backend",
]

__version__ = "0.1.0"


def _numpy_reducers() -> bool:
    """Register :mod:`mpshm.numpy`'s reducers (it does so when imported).
    False, to be asked again, while someone else imports it: another thread
    (it registers them when done), or, in a child forked meanwhile, a thread
    of the parent, whose import would never finish here."""
    module = sys.modules.get(f"{__name__}.numpy")
    if module is not None and reduction.initializing(module):
        return False
    from . import numpy  # noqa: F401

    return True


# NumPy arrays that live in a segment pickle as handles once NumPy is in use.
reduction.register_lazy("numpy", _numpy_reducers)
