"""A tour of the backends: name forms, attaching by name, pickled handles.

One segment per backend. Each name says which backend holds it, so
``SharedMemory(name)`` finds the segment again with no ``backend=`` argument,
in this process or any other. A pickled SharedMemory is a small handle
(backend, name, size), never the bytes: unpickling attaches to the segment.

Run it:  python examples/backends_tour.py
"""

import multiprocessing
import os
import pickle
import tempfile

import mpshm
from mpshm import backends


def child(shm):
    # *shm* arrived pickled, as a handle: the child attached to the segment.
    print(f"  child sees {bytes(shm.buf[:5])!r} in {shm.name}")
    shm.close()


if __name__ == "__main__":
    ctx = multiprocessing.get_context("spawn")
    print(f"default backend: {mpshm.get_default_backend()}")

    with tempfile.TemporaryDirectory() as tmp:
        for backend in backends.available():
            # The mmap backend puts its files in MPSHM_DIR, or a private
            # directory under the system temp dir; dir= picks another one.
            options = {"dir": tmp} if backend == "mmap" else {}
            shm = mpshm.SharedMemory(create=True, size=4096, backend=backend, **options)
            shm.buf[:5] = b"hello"
            print(f"{backend}: name {shm.name!r}, size {shm.size}")

            # Attach by name, as another process would (no backend= needed).
            again = mpshm.SharedMemory(shm.name)
            assert bytes(again.buf[:5]) == b"hello"
            again.close()

            # Pickling sends a handle of a few dozen bytes, whatever the size.
            data = pickle.dumps(shm)
            copy = pickle.loads(data)
            print(f"  pickled handle: {len(data)} bytes -> {copy!r}")
            copy.close()

            # multiprocessing pickles arguments the same way.
            p = ctx.Process(target=child, args=(shm,))
            p.start()
            p.join()
            assert p.exitcode == 0

            shm.close()
            shm.unlink()  # destroy it; the temporary directory goes last

    # Names you choose: "posix:<name>" (or a bare name, under the default
    # backend), "sysv:<name>" (hashed to a 32-bit key), "mmap:<file name>".
    if "sysv" in backends.available():
        from mpshm.backends.sysv import key_for

        name = f"sysv:tour-{os.getpid()}"
        with mpshm.SharedMemory(name, create=True, size=4096) as shm:
            print(f"{shm.name!r} is System V key {key_for(name[5:]):#010x}")
            shm.unlink()  # the with block only closes; unlink destroys
