"""Lifecycle costs of a segment, mpshm against the raw libraries, side by side.

    python benchmarks/lifecycle.py [--repeat N] [--json FILE]

For each backend: create+close+unlink and attach+close of a small (4 KiB)
segment, and create + first fill of a large one (64 MiB), each timed against
the raw calls that do the same work (posix_ipc + mmap, sysv_ipc, open +
mmap) and the standard library's SharedMemory, in the same run. Figures are
medians of several rounds and given as ratios to the raw calls, since these
machines are shared and noisy. ``track=False`` is timed too, to show what
the tracker's bookkeeping costs.
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import sys
import tempfile
from multiprocessing import shared_memory
from typing import Any, Callable

import posix_ipc
import sysv_ipc

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import mpshm
from mpshm.bench import median_time

SMALL = 4096
LARGE = 64 << 20


# -- raw baselines -----------------------------------------------------------


def raw_posix_create(size: int, fill: bool = False) -> None:
    name = "/bench_" + os.urandom(8).hex()
    shm = posix_ipc.SharedMemory(name, posix_ipc.O_CREX, size=size)
    m = mmap.mmap(shm.fd, size)
    shm.close_fd()
    if fill:
        m[:] = FILL[:size]
    m.close()
    posix_ipc.unlink_shared_memory(name)


def raw_sysv_create(size: int, fill: bool = False) -> None:
    shm = sysv_ipc.SharedMemory(None, sysv_ipc.IPC_CREX, size=size, init_character=b"\0")
    if fill:
        memoryview(shm)[:] = FILL[:size]
    shm.detach()
    shm.remove()


def raw_mmap_create(size: int, fill: bool = False) -> None:
    path = os.path.join(DIR, "bench_" + os.urandom(8).hex())
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    os.ftruncate(fd, size)
    m = mmap.mmap(fd, size)
    os.close(fd)
    if fill:
        m[:] = FILL[:size]
    m.close()
    os.unlink(path)


def stdlib_create(size: int, fill: bool = False) -> None:
    shm = shared_memory.SharedMemory(create=True, size=size)
    if fill:
        shm.buf[:] = FILL[:size]
    shm.close()
    shm.unlink()


def mpshm_create(backend: str, track: bool) -> Callable[[int, bool], None]:
    def run(size: int, fill: bool = False) -> None:
        shm = mpshm.SharedMemory(create=True, size=size, backend=backend, track=track)
        if fill:
            shm.buf[:] = FILL[:size]
        shm.close()
        shm.unlink()

    return run


def raw_attach(backend: str, name: str) -> Callable[[], None]:
    if backend == "posix":

        def run() -> None:
            shm = posix_ipc.SharedMemory("/" + name)
            m = mmap.mmap(shm.fd, shm.size)
            shm.close_fd()
            m.close()

    elif backend == "sysv":
        key = int(name.split(":", 1)[1], 16)
        key = key - 2**32 if key >= 2**31 else key

        def run() -> None:
            shm = sysv_ipc.SharedMemory(key)
            shm.detach()

    else:
        path = name.split(":", 1)[1]

        def run() -> None:
            fd = os.open(path, os.O_RDWR)
            m = mmap.mmap(fd, os.fstat(fd).st_size)
            os.close(fd)
            m.close()

    return run


def measure(repeat: int, calls: int = 300) -> list[dict[str, Any]]:
    """Every lifecycle figure (printed as it comes): a row per operation,
    with the raw calls' time and mpshm's (and others') time and ratio.
    The raw mmap files live in a directory that exists only meanwhile (not
    made at import: spawned workers of ``peers.py`` import this module)."""
    global DIR
    DIR = tempfile.mkdtemp(prefix="mpshm-bench-")
    try:
        return _measure(repeat, calls)
    finally:
        os.rmdir(DIR)


def _measure(repeat: int, calls: int) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []

    def row(what: str, baseline: float, **candidates: float) -> None:
        cells = {k: v for k, v in candidates.items()}
        rows.append({"what": what, "raw_us": baseline * 1e6,
                     **{f"{k}_us": v * 1e6 for k, v in cells.items()},
                     **{f"{k}_ratio": v / baseline for k, v in cells.items()}})
        text = "  ".join(f"{k} {v * 1e6:8.1f} us ({v / baseline:4.2f}x)" for k, v in cells.items())
        print(f"{what:<34} raw {baseline * 1e6:8.1f} us   {text}", flush=True)

    raw_create = {"posix": raw_posix_create, "sysv": raw_sysv_create, "mmap": raw_mmap_create}
    n, r = calls, repeat
    for backend in ("posix", "sysv", "mmap"):
        base = median_time(lambda b=backend: raw_create[b](SMALL), n, r)
        tracked = median_time(lambda b=backend: mpshm_create(b, True)(SMALL), n, r)
        untracked = median_time(lambda b=backend: mpshm_create(b, False)(SMALL), n, r)
        extra = {}
        if backend == "posix":
            extra["stdlib"] = median_time(lambda: stdlib_create(SMALL), n, r)
        row(f"{backend}: create+destroy 4 KiB", base, mpshm=tracked, untracked=untracked,
            **extra)

        shm = mpshm.SharedMemory(create=True, size=SMALL, backend=backend)
        try:
            base = median_time(raw_attach(backend, shm.name), n * 3, r)

            def ours(name: str = shm.name) -> None:
                mpshm.SharedMemory(name).close()

            extra = {}
            if backend == "posix":

                def theirs(name: str = shm.name) -> None:
                    s = shared_memory.SharedMemory(name, track=False) if sys.version_info >= (
                        3, 13) else shared_memory.SharedMemory(name)
                    s.close()
                    if sys.version_info < (3, 13):
                        from multiprocessing import resource_tracker
                        resource_tracker.unregister(s._name, "shared_memory")

                extra["stdlib"] = median_time(theirs, n * 3, r)
            row(f"{backend}: attach+detach 4 KiB", base, mpshm=median_time(ours, n * 3, r), **extra)
        finally:
            shm.close()
            shm.unlink()

        base = median_time(lambda b=backend: raw_create[b](LARGE, True), 1, r)
        ours_large = median_time(lambda b=backend: mpshm_create(b, True)(LARGE, True), 1, r)
        extra = {}
        if backend == "posix":
            extra["stdlib"] = median_time(lambda: stdlib_create(LARGE, True), 1, r)
        row(f"{backend}: create+fill 64 MiB", base, mpshm=ours_large, **extra)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=7, help="rounds per figure (median)")
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args()
    print(f"python {sys.version.split()[0]}, {os.cpu_count()} cores; "
          f"medians of {args.repeat} rounds\n")
    rows = measure(args.repeat)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


FILL = bytes(LARGE)
DIR = ""  # made by measure() for its raw mmap files

if __name__ == "__main__":
    main()
