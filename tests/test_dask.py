"""mpshm.dask against a real LocalCluster of process workers (no mocks).

Arrays between workers, from the client to a worker and back, on every
storage; arrays already in mpshm memory with no copy; the scheduler's relay
and a worker in private IPC and mount namespaces with its own /dev/shm,
which must get bytes; SIGKILL of the sending and of the receiving worker;
``Client.get_executor()``; forged handles and another user's probe.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from helpers import ROOT, as_other_user, exists, require_root, wait_until

distributed = pytest.importorskip("distributed", reason="pip install 'mpshm[dask]'")


import mpshm  # noqa: E402
import mpshm.dask  # noqa: E402
import mpshm.numpy as mnp  # noqa: E402
from mpshm.errors import HandleError  # noqa: E402

pytestmark = pytest.mark.timeout(240)

MiB = 1 << 20
N = 2 * MiB // 8  # float64 items of a 2 MiB array: above the 1 MiB threshold


# -- tasks (module level: workers import them) --

def made(n: int, value: float) -> np.ndarray:
    return np.full(n, float(value))


def made_shared(n: int, value: float) -> np.ndarray:
    arr = mnp.empty(n)
    arr[:] = value
    return arr


def total(x: np.ndarray) -> float:
    return float(x.sum())


def where(x: np.ndarray) -> tuple[float, str | None]:
    """The sum of *x* and the mpshm segment its memory is in (None: none)."""
    return float(x.sum()), mnp.segment_name(x)


def holds(x: np.ndarray, seconds: float) -> float:
    """Sums *x* after holding it for *seconds*."""
    time.sleep(seconds)
    return float(x.sum())


def holds_in(x: np.ndarray, seconds: float, where: int) -> float:
    """Sums *x*, after holding it for *seconds* if this is process *where*."""
    if os.getpid() == where:
        time.sleep(seconds)
    return float(x.sum())


def tail(x: np.ndarray) -> np.ndarray:
    return x[1:]


class Box:
    """An object Dask pickles whole (not a list, tuple or dict)."""

    def __init__(self, arr: np.ndarray) -> None:
        self.arr = arr


def handles() -> int:
    return mpshm.dask.stats()["handles"]


def own_segments() -> list[str]:
    """The names of this worker's probe and spares."""
    state = mpshm.dask._current()
    return [state.identity()["probe"]] + [s.mapped.name for s in state.spares]


# -- fixtures --

def made_here(client) -> set[str]:
    """The probes and spares of the cluster's workers and of this process."""
    names = set(own_segments())
    for found in client.run(own_segments).values():
        names.update(found)
    return names


def all_gone(names: set[str], wait: float = 15.0) -> list[str]:
    deadline = time.monotonic() + wait
    while True:
        left = sorted(n for n in names if exists(n))
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.1)


@pytest.fixture(scope="module", params=["posix", "sysv", "mmap"])
def cluster(request):
    cluster = mpshm.dask.local_cluster(
        backend=request.param, n_workers=2, threads_per_worker=1, dashboard_address=":0")
    cluster.mpshm_names = set()
    try:
        yield cluster
    finally:
        cluster.close()
        mpshm.dask.dask_teardown(None)
        assert not all_gone(cluster.mpshm_names), "the cluster left segments behind"


@pytest.fixture
def client(cluster):
    with distributed.Client(cluster, direct_to_workers=True) as client:
        yield client
        cluster.mpshm_names |= made_here(client)


def workers(client) -> list[str]:
    return sorted(client.scheduler_info()["workers"])


def counts(client) -> dict[str, int]:
    return client.run(handles)


# -- the paths --

def test_worker_to_worker_goes_by_handle(client):
    a, b = workers(client)
    before = counts(client)
    for i in range(3):  # the second and third reuse the warm spare
        x = client.submit(made, N, i + 1, workers=[a], pure=False)
        assert client.submit(total, x, workers=[b], pure=False).result() == N * (i + 1)
        del x
    after = counts(client)
    assert after[a] - before[a] == 3 and after[b] == before[b]


def test_client_and_worker_exchange_by_handle(client):
    (a, _), sent = workers(client), mpshm.dask.stats()["handles"]
    y = np.arange(N, dtype=np.float64)
    f = client.scatter(y, workers=[a], direct=True)
    assert client.submit(total, f, workers=[a]).result() == y.sum()
    assert mpshm.dask.stats()["handles"] == sent + 1
    before = counts(client)[a]
    first = client.submit(made, N, 1.0, workers=[a], pure=False).result()
    assert counts(client)[a] == before + 1
    assert first.flags.writeable and first.dtype == np.float64 and first.shape == (N,)
    # While the client holds the first result, the worker's spare is not reused:
    second = client.submit(made, N, 2.0, workers=[a], pure=False).result()
    assert (first == 1.0).all() and (second == 2.0).all()
    first[:] = 7.0  # the client's own
    assert (second == 2.0).all()


def test_spares_come_back_when_the_receiver_drops_the_array(client):
    (a, _) = workers(client)

    def spares():
        return client.run(mpshm.dask.stats, workers=[a])[a]["spares"]

    client.submit(made, N, 0, workers=[a], pure=False).result()
    had = spares()
    for i in range(1, 5):
        r = client.submit(made, N, i, workers=[a], pure=False).result()
        assert (r == i).all()
        del r
    assert spares() == had, "each transfer should have reused a spare given back"


def echo(x):
    return x


@pytest.mark.parametrize("order", ["C", "F", "strided"])
def test_layouts_and_dtypes_arrive_intact(client, order):
    a, b = workers(client)
    base = np.random.default_rng(1).integers(0, 1000, size=(1024, 1024)).astype(np.int32)
    arr = {"C": base, "F": np.asfortranarray(base), "strided": base[:, ::2]}[order]
    f = client.scatter(arr, workers=[a], direct=True)
    got = client.submit(echo, f, workers=[b], pure=False).result()
    np.testing.assert_array_equal(got, arr)
    assert got.dtype == arr.dtype
    if order == "F":
        assert got.flags.f_contiguous
    for dtype in (np.uint8, np.complex128, np.float16, ">f8"):
        x = (np.arange(3 * MiB // np.dtype(dtype).itemsize) % 200).astype(dtype)
        back = client.submit(echo, client.scatter(x, workers=[a], direct=True),
                             workers=[b], pure=False).result()
        np.testing.assert_array_equal(back, x)
        assert back.dtype == x.dtype


def test_arrays_in_mpshm_memory_travel_with_no_copy(client):
    a, b = workers(client)
    x = client.submit(made_shared, N, 3.0, workers=[a], pure=False)
    made_in = client.submit(mnp.segment_name, x, workers=[a], pure=False).result()
    got, seen_in = client.submit(where, x, workers=[b], pure=False).result()
    assert got == 3.0 * N
    assert made_in is not None and seen_in == made_in  # the same segment: no copy


def test_a_view_of_a_received_mpshm_array_is_copied_when_passed_on(client):
    """Only the process that made an mpshm array sends it by reference: a
    receiver passing on a view of it copies, since the maker may destroy the
    segment's name as soon as it drops the array."""
    a, b = workers(client)
    x = client.submit(made_shared, N, 4.0, workers=[a], pure=False)
    y = client.submit(tail, x, workers=[b], pure=False)
    distributed.wait(y)
    del x  # a forgets x: its segment's name is destroyed
    wait_until(lambda: client.run(lambda: len(mnp._owned), workers=[a])[a] == 0, timeout=30)
    got = y.result()
    assert got.shape == (N - 1,) and (got == 4.0).all()
    assert mnp.segment_name(got) is None  # a copy, the client's own


def test_small_mpshm_arrays_never_go_by_reference():
    """A small mpshm.numpy array is a chunk of a slab, reused once the array
    is gone: even above the threshold it is copied, never sent by name."""
    before = mpshm.dask.settings()
    backend = before.pop("backend")
    threshold = before.pop("threshold")
    mpshm.dask.configure(threshold=1024)
    try:
        small = mnp.empty(2048)  # 16 KiB: a slab's chunk
        small[:] = 1.0
        peer = dict(mpshm.dask.identity(), pid=1)
        header, frames = mpshm.dask.serialize(small, {"recipient": {KEY: peer}})
        assert header[KEY] == "spare" and frames == []
        got = mpshm.dask.deserialize(header, frames)
        small[:] = 666.0
        assert (got == 1.0).all()
        del got
        big = mnp.empty(N)  # dedicated: by reference
        header, _ = mpshm.dask.serialize(big, {"recipient": {KEY: peer}})
        assert header[KEY] == "ref"
        mnp.release(big)
    finally:
        mpshm.dask.configure(backend, threshold, **before)


def test_mpshm_arrays_inside_objects_dask_pickles_go_by_value():
    """Dask pickles some objects whole, and may spill them to disk and load
    them after the array is gone: the array's bytes go, not its name."""
    from distributed.protocol import deserialize_bytes, serialize_bytelist

    arr = mnp.empty(N)
    arr[:] = 3.0
    frames = serialize_bytelist(Box(arr))
    assert sum(memoryview(f).nbytes for f in frames) >= arr.nbytes
    mnp.release(arr)
    del arr
    assert (deserialize_bytes(b"".join(frames)).arr == 3.0).all()


def test_importing_keeps_the_client_preload_settings_consistent():
    import dask

    with dask.config.set({"distributed.client.preload": ["other"],
                          "distributed.client.preload-argv": [["--x", "1"]]}):
        mpshm.dask._preload_clients()
        assert dask.config.get("distributed.client.preload") == ["other", "mpshm.dask"]
        assert dask.config.get("distributed.client.preload-argv") == [["--x", "1"], []]
    with dask.config.set({"distributed.client.preload": ["other"],
                          "distributed.client.preload-argv": ["--x", "1"]}):
        mpshm.dask._preload_clients()
        assert dask.config.get("distributed.client.preload-argv") == [["--x", "1"], []]


def test_small_and_object_arrays_take_dasks_path(client):
    a, b = workers(client)
    before = counts(client)
    small = client.submit(made, 1000, 1.0, workers=[a], pure=False)
    assert client.submit(total, small, workers=[b], pure=False).result() == 1000.0
    objs = client.scatter(np.array([{"k": 1}] * 200_000, dtype=object), workers=[a], direct=True)
    assert client.submit(len, objs, workers=[b], pure=False).result() == 200_000
    assert counts(client) == before


def test_the_scheduler_relay_gets_bytes(cluster):
    """Without direct transfers, data goes through the scheduler, which relays
    it undecoded to a process the sender cannot know: bytes, never a handle."""
    with distributed.Client(cluster, direct_to_workers=False) as client:
        (a, _), sent = workers(client), mpshm.dask.stats()["handles"]
        before = counts(client)
        y = np.ones(N)
        f = client.scatter(y, workers=[a])
        assert client.submit(total, f, workers=[a]).result() == N
        r = client.submit(made, N, 2.0, workers=[a], pure=False).result()
        assert (r == 2.0).all()
        assert mpshm.dask.stats()["handles"] == sent and counts(client) == before

        # The scheduler says nothing of itself in its handshakes:
        info = client.run_on_scheduler(
            lambda dask_scheduler: dask_scheduler.connection_args["handshake_overrides"])
        assert info.get("mpshm", "absent") is None


KEY = mpshm.dask.KEY


def test_get_executor_takes_and_returns_mpshm_arrays(client):
    arr = mnp.empty(N)
    arr[:] = 2.0
    with client.get_executor(pure=False) as ex:
        assert ex.submit(total, arr).result() == 2.0 * N
        results = list(ex.map(made_shared, [N, N], [1.0, 4.0]))
    assert [float(r.sum()) for r in results] == [N * 1.0, N * 4.0]
    del results
    mnp.release(arr)


# -- a worker that cannot map our memory --

def _start_namespaced_worker(address: str) -> subprocess.Popen[str]:
    assert shutil.which("unshare"), "util-linux unshare is needed for this test"
    shell = ('mount -t tmpfs -o size=256m tmpfs /dev/shm && '
             'exec "$0" -m distributed.cli.dask_worker "$1" --preload mpshm.dask '
             '--nthreads 1 --no-nanny --no-dashboard --name namespaced')
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.path.dirname(__file__)]))
    env.pop("MPSHM_TRACKER", None)
    return subprocess.Popen(
        ["unshare", "--mount", "--ipc", "sh", "-c", shell, sys.executable, address],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env,
        start_new_session=True)


def test_a_worker_with_its_own_shm_gets_bytes():
    if os.geteuid() != 0:
        if os.environ.get("MPSHM_REQUIRE_UNSHARE"):
            pytest.fail("a private /dev/shm needs root here")
        pytest.skip("a private /dev/shm needs root here")
    names: set[str] = set()
    cluster = mpshm.dask.local_cluster(n_workers=1, threads_per_worker=1,
                                       dashboard_address=":0")
    proc = None
    try:
        proc = _start_namespaced_worker(cluster.scheduler_address)
        with distributed.Client(cluster, direct_to_workers=True) as client:
            client.wait_for_workers(2, timeout=60)
            info = client.scheduler_info()["workers"]
            inside = next(w for w, d in info.items() if d.get("name") == "namespaced")
            local = next(w for w in info if w != inside)
            sent_local = counts(client)[local]
            sent = mpshm.dask.stats()["handles"]
            # worker to worker, both ways, and client to worker and back
            x = client.submit(made, N, 5.0, workers=[local], pure=False)
            assert client.submit(total, x, workers=[inside], pure=False).result() == 5.0 * N
            y = client.submit(made, N, 6.0, workers=[inside], pure=False)
            assert (y.result() == 6.0).all()  # from the namespaced worker: bytes
            assert client.submit(total, y, workers=[local], pure=False).result() == 6.0 * N
            f = client.scatter(np.ones(N), workers=[inside], direct=True)
            assert client.submit(total, f, workers=[inside]).result() == N
            assert counts(client)[local] == sent_local
            assert client.run(handles, workers=[inside])[inside] == 0
            assert mpshm.dask.stats()["handles"] == sent
            # and the verified path still works beside it
            z = client.submit(made, N, 1.0, workers=[local], pure=False).result()
            assert (z == 1.0).all() and mpshm.dask.stats()["handles"] == sent
            assert counts(client)[local] == sent_local + 1
            del z
            names = set(own_segments()) | set(client.run(own_segments, workers=[local])[local])
    finally:
        if proc is not None:
            os.kill(proc.pid, signal.SIGTERM)  # our own child, by PID
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait(timeout=30)
        cluster.close()
        mpshm.dask.dask_teardown(None)
    assert names and not all_gone(names)


# -- crashes --

def pid() -> int:
    return os.getpid()


@contextlib.contextmanager
def cluster_in(directory):
    """A 2-worker cluster on mmap files in *directory* (this test's own: all
    it makes is there) and a direct client; after it closes, *directory*
    must empty."""
    cluster = mpshm.dask.local_cluster(backend="mmap", dir=str(directory), n_workers=2,
                                       threads_per_worker=1, dashboard_address=":0")
    try:
        with distributed.Client(cluster, direct_to_workers=True) as client:
            yield client
    finally:
        cluster.close()
        mpshm.dask.dask_teardown(None)
    wait_until(lambda: not os.listdir(directory), timeout=15)


@pytest.mark.parametrize("victim", ["sender", "receiver"])
def test_sigkill_of_a_worker_mid_transfer_leaves_nothing(victim, tmp_path):
    with cluster_in(tmp_path) as client:
        a, b = workers(client)
        pids = client.run(pid)
        x = client.submit(made, 32 * MiB // 8, 1.0, workers=[a], pure=False)
        distributed.wait(x)
        # kill one side at a random moment: while the sender copies, while
        # the handle travels, or while the receiver holds the array
        held = client.submit(holds, x, 0.5, workers=[b], pure=False)
        time.sleep(float(np.random.default_rng().uniform(0.0, 0.3)))
        os.kill(pids[a if victim == "sender" else b], signal.SIGKILL)
        try:
            held.result(timeout=60)
        except Exception:
            pass


def test_the_spare_of_a_killed_receiver_is_taken_back(tmp_path):
    with cluster_in(tmp_path) as client:
        a, b = workers(client)
        pids = client.run(pid)
        x = client.submit(made, N, 1.0, workers=[a], pure=False)
        held = client.submit(holds_in, x, 60.0, pids[b], workers=[b], pure=False,
                             allow_other_workers=True)
        wait_until(lambda: counts(client)[a] >= 1, timeout=30)
        time.sleep(0.5)  # b holds the array now
        assert client.run(mpshm.dask.stats, workers=[a])[a]["spares"] == 1
        os.kill(pids[b], signal.SIGKILL)
        # Dask runs the task again elsewhere (the nanny's new worker, or a)
        assert held.result(timeout=60) == N
        client.wait_for_workers(2, timeout=60)
        new_b = next(w for w in workers(client) if w != a)
        y = client.submit(made, N, 2.0, workers=[a], pure=False)
        assert client.submit(total, y, workers=[new_b], pure=False).result() == 2.0 * N
        # the dead receiver's spare was reused, not a new one made
        assert client.run(mpshm.dask.stats, workers=[a])[a]["spares"] == 1


def test_a_killed_sender_s_spares_go_at_once_while_the_receiver_keeps_its_data(tmp_path):
    with cluster_in(tmp_path) as client:
        a, b = workers(client)
        pids = client.run(pid)
        x = client.submit(made, N, 3.0, workers=[a], pure=False)
        held = client.submit(holds, x, 3.0, workers=[b], pure=False)
        wait_until(lambda: counts(client)[a] >= 1, timeout=30)
        names = client.run(own_segments, workers=[a])[a]
        assert len(names) == 2 and all(exists(n) for n in names)  # probe and spare
        os.kill(pids[a], signal.SIGKILL)
        assert held.result(timeout=60) == 3.0 * N  # the receiver's view is intact
        # the dead sender's scope is closed: its spare and probe are gone
        wait_until(lambda: not any(exists(n) for n in names), timeout=10)


# -- settings and bad input --

def test_bad_settings_are_refused_with_what_to_do():
    with pytest.raises(ValueError, match="threshold"):
        mpshm.dask.configure(threshold=0)
    with pytest.raises(ValueError, match="posix"):
        mpshm.dask.configure(backend="nope")


def test_a_forged_handle_changes_nothing():
    victim = mpshm.SharedMemory(create=True, size=2 * MiB)
    try:
        victim.buf[:16] = b"keep this intact"
        own = mpshm.dask.identity()["storage"]
        be, ident = mpshm.backends.resolve(victim.name, None, {})
        header = {KEY: "spare", "storage": own, "dtype": "<f8", "shape": [1024],
                  "h": {"b": be.name, "i": ident, "n": victim.name, "s": victim.size,
                        "m": list(mpshm._sysinfo.machine()), "l": 12345, "o": "C"}}
        with pytest.raises(HandleError, match="no longer holds"):
            mpshm.dask.deserialize(header, [])
        assert bytes(victim.buf[:16]) == b"keep this intact"
        with pytest.raises(HandleError, match="storage"):
            mpshm.dask.deserialize(dict(header, storage="posix:1:2"), [])
        with pytest.raises(HandleError, match="invalid array handle"):
            mpshm.dask.deserialize({KEY: "ref", "storage": own, "h": {"name": 1}}, [])
        with pytest.raises(HandleError, match="unknown kind"):
            mpshm.dask.deserialize({KEY: "other", "storage": own}, [])
    finally:
        victim.close()
        victim.unlink()


def test_another_users_probe_proves_nothing():
    require_root()
    me = mpshm.dask.identity()
    import secrets

    nonce = secrets.token_hex(16)

    def make_probe():
        shm = mpshm.SharedMemory(create=True, size=4096, track=False)
        shm.buf[:32] = nonce.encode()
        name = shm.name
        shm.close()
        return name

    name = as_other_user(make_probe)
    assert isinstance(name, str), name
    try:
        peer = dict(me, pid=1, probe=name, nonce=nonce)
        assert not mpshm.dask._current().shares_memory_with(peer)
        # the same identity with our own probe is trusted (the check is real)
        assert mpshm.dask._current().shares_memory_with(dict(me, pid=1))
    finally:
        mpshm.SharedMemory(name, owner_check="ignore").unlink()
