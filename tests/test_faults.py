"""Faults (issue 7): whatever happens to the processes, no data that a living
process holds is lost, and no segment is left.

* SIGKILL at random moments, many trials per scenario (creating, pickling,
  mid-map, the manager's server): each victim is a program of its own (with
  its own tracker), killed after a random delay, in private mount and IPC
  namespaces with a tmpfs of their own, so that whatever is left is counted
  exactly. Survivor segments held by the driver all along, and segments the
  victims still map, are checked byte for byte.
* A segment unlinked from outside while workers use it (what systemd-logind's
  RemoveIPC does when a user logs out).
* /dev/shm full in the middle of a map.

Each test prints a ``FAULTS`` line with its figures. ``MPSHM_STRESS_SCALE``
multiplies the trials; ``MPSHM_STRESS_SEED`` replays a run.
"""

from __future__ import annotations

import multiprocessing
import os
import pickle
import re
import time

import pytest
from reliability import SCALE, exists, line, pattern, run_in_namespace

import mpshm
from mpshm.backends import sysv

pytestmark = [pytest.mark.faults, pytest.mark.timeout(300 * SCALE)]

SEED = int(os.environ.get("MPSHM_STRESS_SEED") or int.from_bytes(os.urandom(3), "big"))
TRIALS = 21 * SCALE  # 7 per backend
MAX_DELAY = {"create": 0.3, "named": 0.5, "pickle": 0.3, "map": 0.4, "manager": 0.3}


@pytest.mark.parametrize("scenario", ["create", "named", "pickle", "map", "manager"])
def test_sigkill_at_random_moments(scenario):
    """``create``: tracked segments being created, filled, unlinked or kept;
    ``named``: the same under names of the user's own, some of 32 MiB (a
    kill during their creation left them behind: they were registered only
    once created);
    ``pickle``: the sharing pickler's dumps/loads, and survivor handles;
    ``map``: a Pool's parent killed mid-map, or (half the trials) an
    executor's worker killed by its parent mid-map; ``manager``: a
    SharedMemoryManager's server killed while a client makes segments (the
    client checks every segment it still maps), or (a third) its starter."""
    figures = run_in_namespace("faults", 240 * SCALE, scenario=scenario, trials=TRIALS,
                               seed=SEED, max_delay=MAX_DELAY[scenario])
    print(line("FAULTS", f"sigkill[{scenario}]", {**figures, "seed": SEED}))
    assert figures["trials"] == TRIALS
    assert figures["processes_still_running"] == []  # every tracker ended
    assert figures["segments_left"] == 0, figures["left"]
    assert figures["left_at_end"] == []
    # A kill inside sem_open (a multiprocessing lock being made) can leave the
    # standard library's semaphore file; never anything but that.
    assert all(re.fullmatch(r"posix-semaphore:sem\.(mp-\w+|\w{6})", entry)
               for entry in figures["stdlib_semaphores_left"]), figures["stdlib_semaphores_left"]
    assert figures["executors_broken_unprompted"] == []  # only our kills break a pool
    assert figures["kills"] >= TRIALS - figures["finished_before_kill"]
    assert figures["finished_before_kill"] < TRIALS // 4  # the kills came mid-work
    assert figures["orphans_seen_after_kills"] > 0  # and the trackers had work to do
    if scenario == "manager":
        assert figures["mapped_segments_intact"] > 0


# --------------------------------------------------------------------------
# RemoveIPC: the segment's name destroyed from outside while it is in use


def _remove_from_outside(shm: mpshm.SharedMemory) -> None:
    """Destroy *shm*'s storage object with the raw system call, as systemd does."""
    if shm.backend == "posix":
        os.unlink(f"/dev/shm/{shm.name}")
    elif shm.backend == "mmap":
        os.unlink(shm.name[len("mmap:"):])
    else:
        import sysv_ipc

        key = sysv.key_for(shm.name[len("sysv:"):])
        shmid = next(e.shmid for e in sysv._proc_segments() or [] if e.key == key)
        sysv_ipc.remove_shared_memory(shmid)


def _hammer(name: str, index: int, ready, stop, out) -> None:
    """Attach, then check the creator's half and write/check our own quarter
    until told to stop."""
    shm = mpshm.SharedMemory(name)
    half = shm.size // 2
    quarter = shm.size // 4
    mine = slice(half + index * quarter, half + (index + 1) * quarter)
    expected = pattern(name, shm.size)[:half]
    ready.set()
    rounds = verified = 0
    while not stop.is_set() or rounds < 3:
        assert bytes(shm.buf[:half]) == expected
        data = pattern(f"{name}/{index}/{rounds}", quarter)
        shm.buf[mine] = data
        assert bytes(shm.buf[mine]) == data
        rounds += 1
        verified += half + quarter
    out.send((rounds, verified, bytes(shm.buf[mine])))
    shm.close()


def test_segment_unlinked_from_outside_while_workers_use_it(backend):
    size = 1 << 20
    shm = mpshm.SharedMemory(create=True, size=size, backend=backend)
    try:
        shm.buf[:] = pattern(shm.name, size)
        handle = pickle.dumps(shm)
        ctx = multiprocessing.get_context("fork")
        stop = ctx.Event()
        readies = [ctx.Event() for _ in range(2)]
        pipes = [ctx.Pipe(duplex=False) for _ in range(2)]
        procs = [ctx.Process(target=_hammer, args=(shm.name, i, readies[i], stop, pipes[i][1]))
                 for i in range(2)]
        for proc in procs:
            proc.start()
        try:
            assert all(ready.wait(30) for ready in readies)
            _remove_from_outside(shm)
            # New attaches and unpickled handles fail, naming the segment.
            with pytest.raises(FileNotFoundError) as attach:
                mpshm.SharedMemory(shm.name)
            assert attach.value.filename == shm.name and shm.name in str(attach.value)
            with pytest.raises(FileNotFoundError) as unpickle:
                pickle.loads(handle)
            assert shm.name in str(unpickle.value) and "no longer exists" in str(unpickle.value)
            time.sleep(0.3)  # the workers go on with their mappings meanwhile
            stop.set()
            results = []
            for (receiver, _), proc in zip(pipes, procs):
                assert receiver.poll(30)
                results.append(receiver.recv())
                proc.join(30)
                assert proc.exitcode == 0
        finally:
            stop.set()
            for proc in procs:
                proc.join(10)
                if proc.is_alive():
                    proc.kill()
        # Their last writes are in our mapping too: one memory, no name.
        half, quarter = size // 2, size // 4
        for index, (_, _, last) in enumerate(results):
            assert bytes(shm.buf[half + index * quarter: half + (index + 1) * quarter]) == last
        assert bytes(shm.buf[:half]) == pattern(shm.name, size)[:half]
        # A pool task that carries the handle fails in the caller; the pool goes on.
        with mpshm.Pool(1, context=ctx, backend=backend) as pool:
            with pytest.raises(FileNotFoundError, match="no longer exists"):
                pool.apply(len, (shm,))
            assert pool.apply(len, (b"still works",)) == 11
        assert not exists(shm.name)
        with pytest.raises(FileNotFoundError):
            shm.unlink()  # already gone: says so (and the tracker forgets it)
        rounds = sum(r for r, _, _ in results)
        verified = sum(v for _, v, _ in results) + size
        print(line("FAULTS", f"removeipc[{backend}]", {
            "workers": 2, "rounds_after_and_before_unlink": rounds, "bytes_verified": verified,
            "segments_left": int(exists(shm.name))}))
    finally:
        shm.close()
        try:
            shm.unlink()
        except FileNotFoundError:
            pass


def test_dev_shm_full_in_the_middle_of_a_map():
    """On a 16 MiB /dev/shm (and kernel.shmmax 1 MiB), one task of a map is too
    large for the storage: it alone fails in the caller with ENOSPC, the
    other tasks get their answers, later tasks work, nothing is left."""
    figures = run_in_namespace("enospc_mid_map", 120, tmpfs="16m", shmmax=1 << 20)
    print(line("FAULTS", "enospc_mid_map", figures))
    assert figures["segments_left"] == 0, figures["left"]
    for backend, outcome in figures["results"].items():
        assert outcome["answers"] == 12, (backend, outcome)
        assert "No space left" in outcome["failed"] and "free" in outcome["failed"]
    assert "/dev/shm" in figures["results"]["posix"]["failed"]
    assert "/dev/shm/mmap" in figures["results"]["mmap"]["failed"]
    assert "shmmax" in figures["results"]["sysv"]["failed"]
