"""Quickstart: two worker processes share one buffer, on every backend.

For each backend that works on this machine, the main process creates a
segment of 8 MiB. Two worker processes attach to it *by name*, each fills
its half with numbers and sums that half. The main process then checks
that it sees what the workers wrote, and destroys the segment.

Run it:  python examples/quickstart.py
"""

import multiprocessing
import time
from array import array

import mpshm
from mpshm import backends

SIZE = 8 * 1024 * 1024  # bytes: 1 Mi doubles of 8 bytes
COUNT = SIZE // 8


def worker(name, start, stop, results):
    """Attach to the segment called *name*, fill and sum doubles [start, stop)."""
    shm = mpshm.SharedMemory(name)  # attach: no size, no backend= needed
    doubles = shm.buf.cast("d")  # view the bytes as C doubles
    doubles[start:stop] = array("d", range(start, stop))  # write in place
    results.put(sum(doubles[start:stop]))  # read back what we wrote
    doubles.release()  # release our views before closing
    shm.close()  # detach; an attaching process never destroys


def run(backend, ctx):
    began = time.perf_counter()
    shm = mpshm.SharedMemory(create=True, size=SIZE, backend=backend)
    try:
        results = ctx.Queue()
        half = COUNT // 2
        workers = [
            ctx.Process(target=worker, args=(shm.name, 0, half, results)),
            ctx.Process(target=worker, args=(shm.name, half, COUNT, results)),
        ]
        for p in workers:
            p.start()
        partial_sums = [results.get(timeout=60) for _ in workers]
        for p in workers:
            p.join()

        # The workers' writes are visible here, with no copy and no pickling.
        doubles = shm.buf.cast("d")
        seen = sum(doubles)
        doubles.release()
        expected = COUNT * (COUNT - 1) / 2  # 0 + 1 + ... + (COUNT - 1)
        ok = sum(partial_sums) == seen == expected
        elapsed = time.perf_counter() - began
        print(
            f"{backend:<6} {shm.name}  {shm.size / 2**20:.0f} MiB  "
            f"{'ok' if ok else 'MISMATCH'}  {elapsed:.2f} s"
        )
        return ok
    finally:
        shm.close()  # this process's mapping
        shm.unlink()  # the segment itself: nobody can attach any more


if __name__ == "__main__":
    # "spawn" starts fresh interpreters: it works on every platform, and it
    # proves the workers find the segment by its name alone.
    ctx = multiprocessing.get_context("spawn")
    print(f"backends available here: {', '.join(backends.available())}")
    all_ok = all([run(backend, ctx) for backend in backends.available()])
    raise SystemExit(0 if all_ok else 1)
