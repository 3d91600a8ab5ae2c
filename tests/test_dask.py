"""mpshm.dask against a real LocalCluster of process workers (no mocks).

Arrays between workers, from the client to a worker and back, on every
storage; arrays already in mpshm memory with no copy; the scheduler's relay
and a worker in private IPC and mount namespaces with its own /dev/shm,
which must get bytes; SIGKILL of the sending and of the receiving worker;
``Client.get_executor()``; forged handles and another user's probe.
"""

from __future__ import annotations

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
        x = np.arange(3 * MiB // np.dtype(dtype).itemsize).astype(dtype)
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


@pytest.mark.parametrize("victim", ["sender", "receiver"])
def test_sigkill_of_a_worker_mid_transfer_leaves_nothing(victim, tmp_path):
    # mmap files in a directory of this test's own: all it makes is there
    cluster = mpshm.dask.local_cluster(backend="mmap", dir=str(tmp_path), n_workers=2,
                                       threads_per_worker=1, dashboard_address=":0")
    try:
        with distributed.Client(cluster, direct_to_workers=True) as client:
            a, b = workers(client)
            pids = client.run(pid)
            x = client.submit(made, 32 * MiB // 8, 1.0, workers=[a], pure=False)
            distributed.wait(x)
            rng = np.random.default_rng()
            # the receiver holds the array for a while; kill one side in the
            # middle: while the sender copies, or while the receiver holds it
            held = client.submit(holds, x, 0.5, workers=[b], pure=False)
            time.sleep(float(rng.uniform(0.0, 0.3)))
            os.kill(pids[a if victim == "sender" else b], signal.SIGKILL)
            try:
                held.result(timeout=60)
            except Exception:
                pass
            if victim == "receiver":
                # the sender sees its receiver gone and may reuse the spare
                client.wait_for_workers(2, timeout=60)
    finally:
        cluster.close()
        mpshm.dask.dask_teardown(None)
    wait_until(lambda: not os.listdir(tmp_path), timeout=15)


def test_a_killed_sender_s_spares_go_at_once_while_the_receiver_keeps_its_data(tmp_path):
    cluster = mpshm.dask.local_cluster(backend="mmap", dir=str(tmp_path), n_workers=2,
                                       threads_per_worker=1, dashboard_address=":0")
    try:
        with distributed.Client(cluster, direct_to_workers=True) as client:
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
    finally:
        cluster.close()
        mpshm.dask.dask_teardown(None)
    wait_until(lambda: not os.listdir(tmp_path), timeout=15)


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
