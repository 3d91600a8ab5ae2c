"""mpshm and multiprocessing.shared_memory share POSIX segments both ways.

On the posix backend a name is a bare shm_open name, exactly like the
standard library's, so either library attaches to the other's segments.

One trap is the standard library's, not mpshm's: its resource tracker may
destroy a segment that the standard library merely *attached to* when the
attaching process exits, with a "leaked shared_memory" warning (CPython
gh-82300). So when the standard library attaches:
  * Python 3.13+: pass track=False;
  * before 3.13: unregister the segment from its resource tracker.

Run it:  python examples/stdlib_interop.py
"""

import sys
from multiprocessing import resource_tracker, shared_memory

import mpshm


def stdlib_attach(name):
    """Attach with the standard library without letting it destroy the segment."""
    if sys.version_info >= (3, 13):
        return shared_memory.SharedMemory(name, track=False)
    shm = shared_memory.SharedMemory(name)
    resource_tracker.unregister(shm._name, "shared_memory")  # _name has a leading "/"
    return shm


if __name__ == "__main__":
    # 1. mpshm creates, the standard library attaches by name and reads.
    ours = mpshm.SharedMemory(create=True, size=4096, backend="posix")
    try:
        ours.buf[:11] = b"from mpshm!"
        theirs = stdlib_attach(ours.name)
        print(f"stdlib read {bytes(theirs.buf[:11])!r} from {ours.name}")
        assert bytes(theirs.buf[:11]) == b"from mpshm!"
        theirs.close()
    finally:
        ours.close()
        ours.unlink()  # the creator destroys it

    # 2. The standard library creates, mpshm attaches by name and reads.
    theirs = shared_memory.SharedMemory(create=True, size=4096)
    try:
        theirs.buf[:12] = b"from stdlib!"
        # backend="posix" in case MPSHM_BACKEND names another default.
        ours = mpshm.SharedMemory(theirs.name, backend="posix")
        print(f"mpshm read {bytes(ours.buf[:12])!r} from {theirs.name}")
        assert bytes(ours.buf[:12]) == b"from stdlib!"
        ours.close()  # attaching with mpshm never destroys anything
    finally:
        theirs.close()
        theirs.unlink()  # the creator destroys it (and tells its tracker)
