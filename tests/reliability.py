"""Programs of the stress, fault and limit tests (issue 7), run as separate programs.

Each program is started by a test as ``python -m reliability <program> <json
arguments>``, usually with ``RLIMIT_NOFILE`` at 256 (:func:`limited`), and
prints one ``FIGURES {...}`` line (JSON) that the test checks and reports.
Every byte a program reads back is compared with what was written: contents
are :func:`pattern` bytes derived from the segment's name.

The fault programs run in private mount and IPC namespaces (see
:func:`run_in_namespace`), with a tmpfs of their own on /dev/shm: whatever is
left there, in SysV shared memory or in the mmap directory is theirs, so
"segments left" is an exact count.
"""

from __future__ import annotations

import atexit
import hashlib
import json
import multiprocessing
import os
import pickle
import random
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any, Callable, Iterator, Optional

from helpers import exists

import mpshm
from mpshm import reduction

BACKENDS = ["posix", "sysv", "mmap"]
#: Multiplies the default figures (``MPSHM_STRESS_SCALE=10`` for a long run).
SCALE = max(1, int(os.environ.get("MPSHM_STRESS_SCALE", "1") or "1"))
#: File descriptors the programs may open (``ulimit -n 256``).
FD_LIMIT = 256
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HERE = os.path.dirname(os.path.abspath(__file__))

KiB = 1 << 10
MiB = 1 << 20


def pattern(seed: str, size: int) -> bytes:
    """*size* bytes that only *seed* produces (so a misplaced byte is caught)."""
    return hashlib.shake_128(seed.encode("utf-8", "surrogatepass")).digest(size)


def report(**figures: Any) -> None:
    """Print the program's figures for the test."""
    print("FIGURES " + json.dumps(figures, sort_keys=True), flush=True)


# --------------------------------------------------------------------------
# Running the programs (test side)


def limited(fds: int = FD_LIMIT) -> Callable[[], None]:
    """A ``preexec_fn``: ``ulimit -n fds`` (soft and hard), SIGINT as default."""

    def apply() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (fds, fds))
        signal.signal(signal.SIGINT, signal.SIG_DFL)

    return apply


def program_env(extra: Optional[dict[str, str]] = None) -> dict[str, str]:
    env = dict(os.environ)
    env.pop("MPSHM_TRACKER", None)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (ROOT, HERE, env.get("PYTHONPATH")) if p)
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra or {})
    return env


def argv(program: str, **arguments: Any) -> list[str]:
    return [sys.executable, "-m", "reliability", program, json.dumps(arguments)]


def figures_of(stdout: str) -> dict[str, Any]:
    """The FIGURES line of a program's output."""
    for line in stdout.splitlines():
        if line.startswith("FIGURES "):
            result: dict[str, Any] = json.loads(line[len("FIGURES "):])
            return result
    raise AssertionError(f"the program printed no figures:\n{stdout}")


def run(program: str, timeout: float, fds: int = FD_LIMIT,
        env: Optional[dict[str, str]] = None, **arguments: Any) -> dict[str, Any]:
    """Run *program* under ``ulimit -n fds``; its figures (it must succeed quietly)."""
    result = subprocess.run(
        argv(program, **arguments), capture_output=True, text=True, timeout=timeout,
        env=program_env(env), preexec_fn=limited(fds),
    )
    assert result.returncode == 0, f"rc={result.returncode}\n{result.stdout}\n{result.stderr}"
    assert result.stderr == "", result.stderr
    return figures_of(result.stdout)


def line(kind: str, test: str, figures: dict[str, Any]) -> str:
    """``STRESS test k=v ...`` (or FAULTS): the figures line a test prints."""
    text = " ".join(f"{k}={v}" for k, v in figures.items())
    return f"{kind} {test} {text}"


NAMESPACE_SHELL = (
    "mount -t tmpfs -o size={size},mode=1777 tmpfs /dev/shm && "
    "mkdir -m 0700 /dev/shm/mmap /dev/shm/state && "
    "echo {shmmax} > /proc/sys/kernel/shmmax && "
    "echo NAMESPACE-READY && "
    'exec "$0" "$@"'
)


def run_in_namespace(program: str, timeout: float, tmpfs: str = "256m",
                     shmmax: int = 1 << 30, **arguments: Any) -> dict[str, Any]:
    """Run *program* in private mount and IPC namespaces (``unshare -m -i``)
    with a tmpfs of *tmpfs* on /dev/shm (the mmap backend's directory and
    the trackers' journals in it) and ``kernel.shmmax`` at *shmmax*.

    Skips where no namespace can be made, unless ``MPSHM_REQUIRE_UNSHARE`` is
    set (CI): then that is a failure.
    """
    import pytest

    if not shutil.which("unshare"):
        if os.environ.get("MPSHM_REQUIRE_UNSHARE"):
            pytest.fail("util-linux unshare is needed for this test")
        pytest.skip("util-linux unshare is needed for this test")
    user = [] if os.geteuid() == 0 else ["--map-root-user"]
    shell = NAMESPACE_SHELL.format(size=tmpfs, shmmax=shmmax)
    env = program_env({"MPSHM_DIR": "/dev/shm/mmap", "MPSHM_STATE_DIR": "/dev/shm/state"})
    result = subprocess.run(
        ["unshare", "--mount", "--ipc", *user, "sh", "-c", shell,
         *argv(program, **arguments)],
        capture_output=True, text=True, timeout=timeout, env=env, preexec_fn=limited(),
    )
    if "NAMESPACE-READY" not in result.stdout:
        if os.environ.get("MPSHM_REQUIRE_UNSHARE"):
            pytest.fail(f"cannot build private namespaces: {result.stderr.strip()}")
        pytest.skip(f"cannot build private namespaces here: {result.stderr.strip()}")
    assert result.returncode == 0, f"rc={result.returncode}\n{result.stdout}\n{result.stderr}"
    assert result.stderr == "", result.stderr
    return figures_of(result.stdout)


# --------------------------------------------------------------------------
# Stress: segments created, attached, written, verified and unlinked concurrently


def _ring_worker(index: int, backend: str, rounds: int, seed: int, options: dict[str, Any],
                 links: dict[str, Any], names_path: str) -> None:
    rng = random.Random(seed * 1000 + index)
    counts = {"operations": 0, "bytes_verified": 0, "segments": 0}
    with open(names_path, "a") as names:
        for round_ in range(rounds):
            size = rng.choice([1, 7, 4096, 4097, rng.randint(1, 256 * KiB),
                               rng.randint(256 * KiB, MiB)])
            shm = mpshm.SharedMemory(create=True, size=size, backend=backend, **options)
            names.write(shm.name + "\n")
            names.flush()
            shm.buf[:] = pattern(shm.name, size)
            links["next"].send((shm.name, size))
            # Serve the neighbour: attach its segment, check it, answer in it.
            name, other_size = links["prev"].recv()
            other = mpshm.SharedMemory(name)
            assert other.size == other_size == len(other.buf), (name, other.size, other_size)
            assert bytes(other.buf) == pattern(name, other_size), f"{name}: bytes differ"
            other.buf[:] = pattern(name + "/reply", other_size)
            other.close()
            links["ack_prev"].send(name)
            # Our own segment: the neighbour's answer must be there, whole.
            assert links["ack_next"].recv() == shm.name
            assert bytes(shm.buf) == pattern(shm.name + "/reply", size), f"{shm.name}: reply"
            shm.close()
            shm.unlink()
            assert not exists(shm.name)
            counts["segments"] += 1
            counts["operations"] += 7  # create, write, attach, verify, write, verify, unlink
            counts["bytes_verified"] += size + other_size
            if round_ % 16 == 0:  # an unlinked name cannot be attached, nor unlinked again
                try:
                    mpshm.SharedMemory(shm.name)
                except FileNotFoundError:
                    counts["operations"] += 1
                else:
                    raise AssertionError(f"{shm.name} still attaches after unlink")
    links["result"].send(counts)


def stress_segments(backend: str, workers: int, rounds: int, seed: int, names: str,
                    dir: Optional[str] = None) -> None:
    """*workers* processes in a ring, *rounds* segments each (see :func:`_ring_worker`)."""
    ctx = multiprocessing.get_context("fork")
    options = {"dir": dir} if dir else {}
    forward = [ctx.Pipe(duplex=False) for _ in range(workers)]
    backward = [ctx.Pipe(duplex=False) for _ in range(workers)]
    results = [ctx.Pipe(duplex=False) for _ in range(workers)]
    procs = []
    start = time.monotonic()
    for i in range(workers):
        links = {
            "next": forward[i][1], "prev": forward[(i - 1) % workers][0],
            "ack_prev": backward[(i - 1) % workers][1], "ack_next": backward[i][0],
            "result": results[i][1],
        }
        proc = ctx.Process(target=_ring_worker,
                           args=(i, backend, rounds, seed, options, links, names))
        proc.start()
        procs.append(proc)
    totals = {"operations": 0, "bytes_verified": 0, "segments": 0}
    for (receiver, _), proc in zip(results, procs):
        if not receiver.poll(120):
            raise AssertionError(f"worker {proc.pid} gave no result")
        for key, value in receiver.recv().items():
            totals[key] += value
    for proc in procs:
        proc.join(30)
        assert proc.exitcode == 0, proc.exitcode
    report(backend=backend, processes=workers, **totals,
           seconds=round(time.monotonic() - start, 2), fd_limit=_fd_limit())


def _fd_limit() -> int:
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


# --------------------------------------------------------------------------
# Stress: a Pool of many tasks with mixed payloads, through the sharing pickler


def _payload_size(rng: random.Random) -> int:
    roll = rng.random()
    if roll < 0.55:
        return rng.randint(0, 4 * KiB)
    if roll < 0.9:
        return rng.randint(8 * KiB, 64 * KiB)
    return rng.randint(128 * KiB, 640 * KiB)


def _wrap(data: bytes, kind: int) -> Any:
    if kind == 0:
        return data  # pickled inline, whatever its size
    if kind == 1:
        return memoryview(bytearray(data))  # out of band: a segment above the threshold
    import numpy as np

    return np.frombuffer(data, dtype=np.uint8).copy()


def pool_task(index: int, payload: Any, size: int, reply: int) -> tuple[int, int, Any]:
    """Check every byte of *payload*; answer with *reply* bytes of a pattern."""
    data = bytes(payload)
    if len(data) != size or data != pattern(f"task{index}", size):
        raise AssertionError(f"task {index}: the payload arrived damaged")
    return index, size, _wrap(pattern(f"reply{index}", reply), index % 3)


def stress_pool(backend: str, tasks: int, seed: int, threshold: int) -> None:
    rng = random.Random(seed)
    specs = [(i, _payload_size(rng), _payload_size(rng)) for i in range(tasks)]
    ctx = multiprocessing.get_context("fork")
    start = time.monotonic()
    sent = verified = shared = 0
    kinds = ("bytes", "memoryview", "ndarray")

    def arguments() -> Any:
        for index, size, reply in specs:
            yield index, _wrap(pattern(f"task{index}", size), index % 3), size, reply

    with mpshm.Pool(2, context=ctx, backend=backend, share_threshold=threshold) as pool:
        done = set()
        for index, size, answer in pool.starmap(pool_task, arguments(), chunksize=8):
            reply = specs[index][2]
            data = bytes(answer)
            assert data == pattern(f"reply{index}", reply), f"reply {index} damaged"
            done.add(index)
            sent += size
            verified += size + reply  # the worker checked the payload, we the reply
            if kinds[index % 3] != "bytes":  # out-of-band buffers: by segment if large
                shared += (size >= threshold) + (reply >= threshold)
            del answer
        assert done == set(range(tasks))
    report(backend=backend, tasks=tasks, operations=2 * tasks, bytes_verified=verified,
           bytes_sent=sent, buffers_through_segments=shared,
           seconds=round(time.monotonic() - start, 2), fd_limit=_fd_limit())


# --------------------------------------------------------------------------
# Stress: ShareableList and manager segments under concurrent writers

_SLOT = 48  # bytes of room for str/bytes values in every slot of the stress list


def _list_value(rng: random.Random) -> Any:
    kind = rng.randrange(7)
    if kind == 0:
        return rng.randint(-(2**63), 2**63 - 1)
    if kind == 1:
        return rng.uniform(-1e300, 1e300)
    if kind == 2:
        text = "".join(rng.choice("aé€𝄞\x00z") for _ in range(rng.randint(0, 12)))
        return text
    if kind == 3:
        return bytes(rng.randrange(256) for _ in range(rng.randint(0, _SLOT)))
    if kind == 4:
        return None
    if kind == 5:
        return rng.random() < 0.5
    return rng.randint(-5, 5)


def _value_bytes(value: Any) -> int:
    """Bytes a ShareableList slot holds for *value* (8 for numbers, bools, None)."""
    if isinstance(value, str):
        return len(value.encode())
    return len(value) if isinstance(value, bytes) else 8


def _list_writer(name: str, slots: list[int], rounds: int, seed: int, out: Any) -> None:
    rng = random.Random(seed)
    sl = mpshm.ShareableList(name=name)
    final = {}
    checks = read = 0
    for _ in range(rounds):
        position = rng.choice(slots)
        value = _list_value(rng)
        sl[position] = value
        got = sl[position]
        assert type(got) is type(value) and got == value, (position, value, got)
        final[position] = value
        checks += 1
        read += _value_bytes(got)
    sl.shm.close()
    out.send((final, checks, read))


def stress_lists(backend: str, writers: int, slots: int, rounds: int, seed: int) -> None:
    ctx = multiprocessing.get_context("fork")
    start = time.monotonic()
    sl = mpshm.ShareableList(["." * _SLOT] * (writers * slots), backend=backend)
    pipes = [ctx.Pipe(duplex=False) for _ in range(writers)]
    procs = []
    for w in range(writers):
        mine = list(range(w * slots, (w + 1) * slots))
        proc = ctx.Process(target=_list_writer,
                           args=(sl.shm.name, mine, rounds, seed + w, pipes[w][1]))
        proc.start()
        procs.append(proc)
    expected: dict[int, Any] = {}
    checks = verified = 0
    for (receiver, _), proc in zip(pipes, procs):
        assert receiver.poll(120), f"writer {proc.pid} gave no result"
        final, count, read = receiver.recv()
        expected.update(final)
        checks += count
        verified += read
        proc.join(30)
        assert proc.exitcode == 0
    values = list(sl)
    for position, value in expected.items():
        assert type(values[position]) is type(value) and values[position] == value
    for position in set(range(len(values))) - set(expected):
        assert values[position] == "." * _SLOT
    verified += sum(_value_bytes(value) for value in values)
    sl.shm.close()
    sl.shm.unlink()
    report(backend=backend, writers=writers, operations=2 * checks + len(values),
           slots=len(values), bytes_verified=verified,
           seconds=round(time.monotonic() - start, 2), fd_limit=_fd_limit())


def _manager_client(smm: Any, rounds: int, seed: int, out: Any) -> None:
    rng = random.Random(seed)
    kept = []
    operations = verified = 0
    for i in range(rounds):
        size = rng.choice([1, 100, 4096, rng.randint(1, 128 * KiB)])
        shm = smm.SharedMemory(size)
        shm.buf[:] = pattern(shm.name, size)
        assert bytes(shm.buf) == pattern(shm.name, size)
        operations += 3
        verified += size
        if i % 2:
            shm.close()
            smm.release(shm)
            operations += 1
        else:
            kept.append((shm.name, size))
            shm.close()
        if i % 8 == 0:
            values = [rng.randint(0, 10**9), "x" * rng.randint(0, 20), None]
            sl = smm.ShareableList(values)
            assert list(sl) == values
            kept_list = (sl.shm.name, values)
            sl.shm.close()
            out.send(("list", kept_list))
            operations += 2
    out.send(("done", (kept, operations, verified)))


def stress_manager(backend: str, clients: int, rounds: int, seed: int, names: str) -> None:
    ctx = multiprocessing.get_context("fork")
    start = time.monotonic()
    kept: list[tuple[str, int]] = []
    lists: list[tuple[str, list[Any]]] = []
    operations = verified = 0
    with mpshm.SharedMemoryManager(backend=backend) as smm:
        pipes = [ctx.Pipe(duplex=False) for _ in range(clients)]
        procs = [ctx.Process(target=_manager_client, args=(smm, rounds, seed + c, pipes[c][1]))
                 for c in range(clients)]
        for proc in procs:
            proc.start()
        for (receiver, _), proc in zip(pipes, procs):
            while True:
                assert receiver.poll(120), f"client {proc.pid} gave no result"
                what, value = receiver.recv()
                if what == "list":
                    lists.append(value)
                    continue
                names_kept, ops, checked = value
                kept += names_kept
                operations += ops
                verified += checked
                break
            proc.join(30)
            assert proc.exitcode == 0
        held = {segment.name for segment in smm.segments()}
        assert {name for name, _ in kept} | {name for name, _ in lists} == held
        for name, size in kept:  # every segment a client kept is intact, byte for byte
            shm = mpshm.SharedMemory(name)
            assert bytes(shm.buf) == pattern(name, size), name
            verified += size
            shm.close()
        for name, values in lists:
            sl = mpshm.ShareableList(name=name)
            assert list(sl) == values
            sl.shm.close()
        operations += len(kept) + len(lists)
    with open(names, "w") as f:
        f.writelines(name + "\n" for name in sorted(held))
    report(backend=backend, clients=clients, operations=operations, bytes_verified=verified,
           segments=len(held), seconds=round(time.monotonic() - start, 2), fd_limit=_fd_limit())


# --------------------------------------------------------------------------
# Limits: thousands of live segments under ulimit -n 256


def many_segments(backend: str, count: int, seed: int, dir: Optional[str] = None) -> None:
    options = {"dir": dir} if dir else {}
    rng = random.Random(seed)
    start = time.monotonic()
    before = len(os.listdir("/proc/self/fd"))
    live = []
    for _ in range(count):
        size = rng.choice([1, 100, 4096, 8192 + rng.randint(0, 100)])
        shm = mpshm.SharedMemory(create=True, size=size, backend=backend, **options)
        shm.buf[:] = pattern(shm.name, size)
        live.append(shm)
    during = len(os.listdir("/proc/self/fd"))
    verified = 0
    for shm in live:  # all of them mapped at once
        assert bytes(shm.buf) == pattern(shm.name, shm.size), shm.name
        verified += shm.size
    # Attach each once more from here (a second mapping of each), check, close.
    for shm in live:
        other = mpshm.SharedMemory(shm.name)
        assert bytes(other.buf[:16]) == pattern(shm.name, shm.size)[:16]
        other.close()
    names = [shm.name for shm in live]
    for shm in live:
        shm.close()
        shm.unlink()
    left = sum(exists(name) for name in names)
    report(backend=backend, live_segments=count, operations=4 * count,
           bytes_verified=verified, fds_before=before, fds_with_all_mapped=during,
           fd_limit=_fd_limit(), segments_left=left, seconds=round(time.monotonic() - start, 2))


# --------------------------------------------------------------------------
# Faults: random SIGKILLs, in private namespaces


def storage_left(ignore: frozenset[str] = frozenset()) -> list[str]:
    """Everything in this namespace's storage (see :func:`run_in_namespace`)
    but *ignore*: segments of each backend, POSIX semaphores, journals."""
    found = []
    for entry in os.listdir("/dev/shm"):
        if entry in ("mmap", "state"):
            continue
        found.append(f"posix-semaphore:{entry}" if entry.startswith("sem.") else entry)
    found += [f"mmap:/dev/shm/mmap/{entry}" for entry in os.listdir("/dev/shm/mmap")]
    for root, _dirs, files in os.walk("/dev/shm/state"):
        found += [f"journal:{os.path.join(root, f)}" for f in files]
    with open("/proc/sysvipc/shm") as f:
        for row in f.read().splitlines()[1:]:
            fields = row.split()
            found.append(f"sysv:0x{int(fields[0]) & 0xFFFFFFFF:08x}")
    return sorted(set(found) - ignore)


class _Survivors:
    """Segments the driver holds (untracked: the driver has no tracker, so
    that each victim it forks starts one of its own) on every backend."""

    def __init__(self) -> None:
        self.held = [mpshm.SharedMemory(create=True, size=64 * KiB + i, backend=backend,
                                        track=False)
                     for i, backend in enumerate(BACKENDS)]
        for shm in self.held:
            shm.buf[:] = pattern(shm.name, shm.size)
        self.names = frozenset(shm.name for shm in self.held)

    def verify(self) -> int:
        """Check every byte, through the driver's mapping and a new attach."""
        checked = 0
        for shm in self.held:
            assert bytes(shm.buf) == pattern(shm.name, shm.size), f"{shm.name} damaged"
            again = mpshm.SharedMemory(shm.name)
            assert bytes(again.buf) == pattern(shm.name, shm.size), f"{shm.name} damaged"
            again.close()
            checked += 2 * shm.size
        return checked

    def destroy(self) -> None:
        for shm in self.held:
            shm.close()
            shm.unlink()


def _survivor_check(name: str) -> int:
    """In a victim: attach a survivor, check it, close it (never destroys it)."""
    shm = mpshm.SharedMemory(name)
    assert bytes(shm.buf) == pattern(name, shm.size), f"{name} damaged"
    size = shm.size
    shm.close()
    return size


#: How long a victim that the driver kills works at most: far longer than any
#: delay before the kill, so that the kill comes mid-work however fast the
#: machine is (a victim that finishes first counts as ``finished_before_kill``).
_VICTIM_SECONDS = 30.0


def _until_killed() -> Iterator[int]:
    """0, 1, 2, ... for :data:`_VICTIM_SECONDS` at most."""
    deadline = time.monotonic() + _VICTIM_SECONDS
    i = 0
    while time.monotonic() < deadline:
        yield i
        i += 1


def _victim_create(backend: str, rng: random.Random, survivors: list[str], _out: int,
                   _driver_kills: bool) -> None:
    held: list[mpshm.SharedMemory] = []
    for i in _until_killed():
        size = rng.choice([1, 100, 4096, 64 * KiB, 256 * KiB])
        shm = mpshm.SharedMemory(create=True, size=size, backend=backend)
        shm.buf[:] = pattern(shm.name, size)
        if rng.random() < 0.5:
            shm.close()
            shm.unlink()
        else:
            held.append(shm)  # left to the tracker
            if len(held) > 200:  # (bounded: the victim works until it is killed)
                held.pop(0).close()
        if i % 20 == 0:
            _survivor_check(rng.choice(survivors))


def _victim_named(backend: str, rng: random.Random, survivors: list[str], _out: int,
                  _driver_kills: bool) -> None:
    """Segments under names of the user's own (registered around their
    creation, unlike generated ones), some large enough that a kill often
    lands while their space is being reserved."""
    held: list[mpshm.SharedMemory] = []
    for i in _until_killed():
        size = rng.choice([4096, 256 * KiB, 8 * MiB, 32 * MiB])
        name = f"named_{rng.getrandbits(64):016x}"
        shm = mpshm.SharedMemory(name, create=True, size=size, backend=backend)
        shm.buf[:16] = pattern(shm.name, 16)
        if rng.random() < 0.5:
            shm.close()
            shm.unlink()
        else:
            held.append(shm)  # left to the tracker
            if len(held) > 4:  # (bounded: the namespace's tmpfs is small)
                old = held.pop(0)
                old.close()
                old.unlink()
        if i % 20 == 0:
            _survivor_check(rng.choice(survivors))


def _victim_pickle(backend: str, rng: random.Random, survivors: list[str], _out: int,
                   _driver_kills: bool) -> None:
    kept = []
    for i in _until_killed():
        size = rng.choice([4 * KiB, 64 * KiB, 256 * KiB])
        data = pattern(f"pickle{i}", size)
        blob = reduction.dumps(memoryview(bytearray(data)), threshold=4 * KiB, backend=backend)
        if rng.random() < 0.6:
            view = reduction.loads(blob)
            assert bytes(view) == data
            kept.append(view)
            if len(kept) > 200:
                del kept[0]
        # else never loaded: the tracker destroys its segment when the program is over
        if i % 10 == 0:
            shm = mpshm.SharedMemory(rng.choice(survivors))
            clone = pickle.loads(pickle.dumps(shm))  # a handle of a survivor
            assert bytes(clone.buf) == pattern(shm.name, shm.size)
            clone.close()
            shm.close()


def echo_pair(task: tuple[int, Any]) -> Any:
    return echo_task(*task)


def echo_task(index: int, payload: Any) -> Any:
    data = bytes(payload)
    assert data == pattern(f"map{index}", len(data)), f"task {index} damaged"
    return memoryview(bytearray(pattern(f"back{index}", len(data))))


def _victim_map(backend: str, rng: random.Random, survivors: list[str], out: int,
                driver_kills: bool) -> None:
    ctx = multiprocessing.get_context("fork")
    sizes = [rng.choice([100, 8 * KiB, 64 * KiB, 512 * KiB]) for _ in range(24)]
    payloads = [memoryview(bytearray(pattern(f"map{i}", n))) for i, n in enumerate(sizes)]
    if driver_kills:  # the driver kills this process, the pool's parent, mid-map
        with mpshm.Pool(2, context=ctx, backend=backend, share_threshold=4 * KiB) as pool:
            for _ in range(200):
                answers = pool.starmap(echo_task, enumerate(payloads))
                for i, answer in enumerate(answers):
                    assert bytes(answer) == pattern(f"back{i}", sizes[i])
        return
    # This process kills one of its executor's workers at a random moment.
    import concurrent.futures.process

    ex = mpshm.ProcessPoolExecutor(2, mp_context=ctx, backend=backend,
                                   share_threshold=4 * KiB)
    victims: list[int] = []
    lock = threading.Lock()
    finished = False

    def kill_a_worker() -> None:
        with lock:  # never after the executor is shut down below
            if finished:
                return
            pids = list(ex._processes or ())  # type: ignore[attr-defined]
            if pids:
                pid = rng.choice(pids)
                os.kill(pid, signal.SIGKILL)
                victims.append(pid)

    # Why the executor broke, if no kill of ours did it (a product bug).
    unprompted = None
    timer = threading.Timer(rng.uniform(0, 0.2), kill_a_worker)
    try:
        list(ex.map(echo_task, range(2), payloads[:2]))  # workers are up
        timer.start()
        for _ in range(200):
            answers = list(ex.map(echo_task, range(len(payloads)), payloads))
            for i, answer in enumerate(answers):
                assert bytes(answer) == pattern(f"back{i}", sizes[i])
            if victims:
                time.sleep(0.05)  # the executor notices the death before the next map
        timer.join()
    except concurrent.futures.process.BrokenProcessPool as exc:
        with lock:
            if not victims:
                causes = []
                cause: Optional[BaseException] = exc
                while cause is not None:
                    causes.append(f"{type(cause).__name__}: {cause}")
                    cause = cause.__cause__ or cause.__context__
                unprompted = " <- ".join(causes)
    finally:
        with lock:
            finished = True
        timer.cancel()
        ex.shutdown(wait=True)
    checked = sum(_survivor_check(name) for name in survivors)
    summary = {"worker_kills": len(victims), "checked": checked}
    if unprompted is not None:
        summary["unprompted_break"] = unprompted
    os.write(out, json.dumps(summary).encode() + b"\n")


def _victim_manager(backend: str, rng: random.Random, survivors: list[str], out: int,
                    _driver_kills: bool) -> None:
    """Start a manager, say its server's pid, then make segments with it until
    the server dies (the driver kills it); check what is still mapped here."""
    smm = mpshm.SharedMemoryManager(backend=backend)
    smm.start()
    own = mpshm.SharedMemory(create=True, size=8 * KiB, backend=backend)
    own.buf[:] = pattern(own.name, own.size)
    os.write(out, json.dumps({"server": smm._process.pid}).encode() + b"\n")  # type: ignore
    held = []
    error = None
    try:
        for _ in range(5000):
            size = rng.choice([1, 4096, 64 * KiB])
            shm = smm.SharedMemory(size)
            shm.buf[:] = pattern(shm.name, size)
            held.append(shm)
            if len(held) > 40:
                old = held.pop(0)
                old.close()
                smm.release(old)
    except Exception as exc:  # the server is gone
        error = type(exc).__name__
    # Live mappings keep their data, whatever happened to the server.
    checked = 0
    for shm in held:
        assert bytes(shm.buf) == pattern(shm.name, shm.size), f"{shm.name} damaged"
        checked += shm.size
    assert bytes(own.buf) == pattern(own.name, own.size)
    checked += own.size + sum(_survivor_check(name) for name in survivors)
    os.write(out, json.dumps({"intact": len(held), "checked": checked,
                              "error": error}).encode() + b"\n")
    own.close()
    own.unlink()
    os._exit(0)  # the manager's server is dead: no shutdown to wait for


_VICTIMS = {"create": _victim_create, "named": _victim_named, "pickle": _victim_pickle,
            "map": _victim_map, "manager": _victim_manager}


def _read_lines(fd: int) -> list[dict[str, Any]]:
    chunks = []
    while True:
        chunk = os.read(fd, 65536)
        if not chunk:
            break
        chunks.append(chunk)
    return [json.loads(row) for row in b"".join(chunks).splitlines() if row]


def _wait(pid: int, timeout: float) -> int:
    """Reap *pid*; its wait status. SIGKILL it if it outlives *timeout*."""
    deadline = time.monotonic() + timeout
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return status
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            raise AssertionError(f"process {pid} still ran after {timeout} s")
        time.sleep(0.005)


def _readline(fd: int, timeout: float) -> Optional[dict[str, Any]]:
    import select

    data = b""
    deadline = time.monotonic() + timeout
    while not data.endswith(b"\n"):
        ready, _, _ = select.select([fd], [], [], max(0, deadline - time.monotonic()))
        if not ready:
            return None
        chunk = os.read(fd, 4096)
        if not chunk:
            return None
        data += chunk
    result: dict[str, Any] = json.loads(data)
    return result


#: What a pool worker may print when its parent was killed while it sent a
#: result (the standard library's worker reports the broken pipe, mpshm's too).
_PARENT_GONE = ("BrokenPipeError", "ConnectionResetError")


def _read_logs(logs: str) -> int:
    """Check the victims' stderr files (and remove them): only pool workers
    that lost their parent may have said something; how many did."""
    tracebacks = 0
    texts = {}
    for name in sorted(os.listdir(logs)):
        with open(os.path.join(logs, name)) as f:
            texts[name] = f.read()
    shutil.rmtree(logs)
    for name, text in texts.items():
        for row in text.splitlines():
            if row.startswith("Process "):  # a worker's header (two may interleave)
                if "PoolWorker" not in row:
                    raise AssertionError(f"{name} printed:\n{text}")
                tracebacks += 1
            elif row and not row.startswith((" ", "Traceback", "During handling")) and not (
                row.startswith(_PARENT_GONE)
            ):
                raise AssertionError(f"{name} printed:\n{text}")
    return tracebacks


def faults(scenario: str, trials: int, seed: int, max_delay: float) -> None:
    """*trials* victims (forked, each a program of its own with its own tracker),
    each SIGKILLed at a random moment, on the backends in turn."""
    assert os.environ.get("MPSHM_TRACKER") is None
    # The victims' trackers (and pool workers) outlive their killed starters:
    # as their subreaper the driver can wait for every one of them to end
    # before counting what is left (a tracker slow to start under load may
    # still be making its journal when the storage first looks clean).
    _become_subreaper()
    rng = random.Random(seed)
    survivors = _Survivors()
    names = sorted(survivors.names)
    logs = tempfile.mkdtemp(prefix="mpshm-faults-")
    atexit.register(shutil.rmtree, logs, True)  # also if a trial fails (victims _exit)
    body = _VICTIMS[scenario]
    kills = finished = checked = intact = orphans = 0
    errors: dict[str, int] = {}
    unprompted: list[str] = []  # executors that broke with no worker killed
    start = time.monotonic()
    for trial in range(trials):
        backend = BACKENDS[trial % len(BACKENDS)]
        trial_seed = rng.randrange(2**32)
        delay = rng.uniform(0, max_delay)
        # In half the map trials the victim kills one of its own workers instead.
        driver_kills = scenario != "map" or trial % 2 == 0
        read_fd, write_fd = os.pipe()
        log = os.path.join(logs, f"trial{trial}")
        pid = os.fork()
        if pid == 0:  # the victim
            code = 0
            try:
                os.close(read_fd)
                # Its stderr (and its children's) go to a file the driver reads.
                err = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
                os.dup2(err, 2)
                os.close(err)
                body(backend, random.Random(trial_seed), names, write_fd, driver_kills)
            except BaseException:
                import traceback

                traceback.print_exc()
                code = 1
            finally:
                os._exit(code)
        os.close(write_fd)
        target = pid
        if scenario == "manager":
            hello = _readline(read_fd, 60)
            assert hello is not None, "the victim never started its manager"
            if trial % 3 != 2:
                target = hello["server"]  # the server dies; its starter goes on
        if not driver_kills:
            target = 0
        time.sleep(delay)
        if target:
            try:
                os.kill(target, signal.SIGKILL)
                kills += 1
            except ProcessLookupError:
                pass
        status = _wait(pid, 60)
        orphans += len(storage_left(survivors.names))  # what its tracker has to destroy
        messages = _read_lines(read_fd)
        os.close(read_fd)
        killed = os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
        if target != pid or not killed:
            assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, (
                f"trial {trial}: victim ended with status {status}")
            finished += target == pid
        for message in messages:
            kills += message.get("worker_kills", 0)
            checked += message.get("checked", 0)
            intact += message.get("intact", 0)
            if message.get("unprompted_break"):
                unprompted.append(message["unprompted_break"])
            if message.get("error"):
                errors[message["error"]] = errors.get(message["error"], 0) + 1
    # Every victim's tracker cleans up once its program is over: wait for them
    # (and for everything else the victims started) to end.
    still_running = _reap_descendants(60)
    left = storage_left(survivors.names)
    cleanup = time.monotonic() - start
    quiet_deaths = _read_logs(logs)
    checked += survivors.verify()
    survivors.destroy()
    left_at_end = _segments(storage_left())
    semaphores = sorted(set(left) - set(_segments(left)))
    report(scenario=scenario, trials=trials, kills=kills, finished_before_kill=finished,
           bytes_verified=checked, mapped_segments_intact=intact, server_errors=errors,
           executors_broken_unprompted=unprompted,
           orphans_seen_after_kills=orphans, worker_tracebacks_after_parent_kill=quiet_deaths,
           segments_left=len(_segments(left)), left=_segments(left)[:10],
           left_at_end=left_at_end, stdlib_semaphores_left=semaphores,
           processes_still_running=still_running, seconds=round(cleanup, 2))


def _become_subreaper() -> None:
    """Orphans among this process's descendants become its children
    (``PR_SET_CHILD_SUBREAPER``), so that it can wait for them."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(36, 1, 0, 0, 0) != 0:  # PR_SET_CHILD_SUBREAPER
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_CHILD_SUBREAPER)")


def _reap_descendants(timeout: float) -> list[str]:
    """Wait until every child (orphaned descendants included, see
    :func:`_become_subreaper`) has ended; SIGKILL those still running after
    *timeout* seconds and return their command lines."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if os.waitpid(-1, os.WNOHANG)[0] == 0:
                time.sleep(0.02)
        except ChildProcessError:
            return []
    running = []
    for pid in _children():
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                running.append(f.read().replace(b"\0", b" ").decode(errors="replace")[:200])
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
    while True:
        try:
            os.waitpid(-1, 0)
        except ChildProcessError:
            return running


def _children() -> list[int]:
    """This process's children (from /proc)."""
    me = os.getpid()
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    stat = f.read()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == me:
                found.append(int(entry))
    return found


def _segments(entries: list[str]) -> list[str]:
    """*entries* but POSIX semaphores: those are the standard library's (a
    process killed inside ``sem_open``, creating a multiprocessing lock, leaves
    glibc's temporary ``sem.XXXXXX`` file, or one not yet unlinked), which no
    tracker knows of. Counted apart; in the private namespace they go with it."""
    return [entry for entry in entries if not entry.startswith("posix-semaphore:")]


def enospc_mid_map() -> None:
    """/dev/shm (16 MiB here) full in the middle of a map: the task that does
    not fit fails in the caller, the others and later ones work, and nothing
    is left behind."""
    import errno

    ctx = multiprocessing.get_context("fork")
    results = {}
    for backend, big in (("posix", 24 * MiB), ("mmap", 24 * MiB), ("sysv", 2 * MiB)):
        sizes = [256 * KiB] * 6 + [big] + [256 * KiB] * 6
        payloads = [memoryview(bytearray(pattern(f"map{i}", n))) for i, n in enumerate(sizes)]
        failures = []
        answers = 0
        with mpshm.Pool(2, context=ctx, backend=backend, share_threshold=64 * KiB) as pool:
            iterator = pool.imap(echo_pair, enumerate(payloads))
            for i in range(len(sizes)):
                try:
                    answer = iterator.next(60)
                except OSError as exc:
                    assert exc.errno == errno.ENOSPC, repr(exc)
                    failures.append((i, str(exc)))
                    continue
                assert bytes(answer) == pattern(f"back{i}", sizes[i])
                answers += 1
                del answer
            # The pool keeps working for tasks that fit.
            small = pool.starmap(echo_task, [(i, payloads[i]) for i in range(4)])
            assert [bytes(a) for a in small] == [pattern(f"back{i}", sizes[i])
                                                 for i in range(4)]
            del small
        assert [i for i, _ in failures] == [6], failures
        results[backend] = {"answers": answers, "failed": failures[0][1][:400]}
    # (This program's own tracker is still running: its journal is not a leak.)
    left = [entry for entry in storage_left() if not entry.startswith("journal:")]
    report(results=results, segments_left=len(left), left=left)


def main() -> None:
    program, arguments = sys.argv[1], json.loads(sys.argv[2])
    programs: dict[str, Callable[..., None]] = {
        "stress_segments": stress_segments, "stress_pool": stress_pool,
        "stress_lists": stress_lists, "stress_manager": stress_manager,
        "many_segments": many_segments, "faults": faults, "enospc_mid_map": enospc_mid_map,
    }
    programs[program](**arguments)


if __name__ == "__main__":
    main()

