"""Cleanup against a hostile local user: journals, state directories, handles, listings.

As root, a forked child that drops to an unused uid (:func:`as_other_user`)
plays the other user. Programs under test get a private temp directory
(``TMPDIR``) that is world-writable with the sticky bit, like ``/tmp``: the
other user can plant in it exactly as they could in ``/tmp``, and no other
test sees it.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import warnings
from typing import Any, Iterator

import pytest
from helpers import OTHER_UIDS, ROOT, as_other_user, exists, require_root, unique, wait_until

import mpshm
from mpshm import reduction
from mpshm.backends.sysv import key_for
from mpshm.shared_memory import SharedMemory, _rebuild
from mpshm.tracking import journal as _journal

pytestmark = pytest.mark.timeout(120)

OTHER_UID = OTHER_UIDS[0]


@pytest.fixture
def root() -> None:
    """The test plays another user: it needs root."""
    require_root()


@pytest.fixture
def shared_tmp() -> Iterator[str]:
    """A private stand-in for /tmp: mode 1777, removed afterwards."""
    path = tempfile.mkdtemp(prefix="mpshm-test-tmp-")
    os.chmod(path, 0o1777)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def program_env(tmp: str) -> dict[str, str]:
    """A program whose temp directory is *tmp*, with mpshm's defaults otherwise."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.path.join(ROOT, "tests")]),
               TMPDIR=tmp, PYTHONUNBUFFERED="1")
    for name in ("MPSHM_TRACKER", "MPSHM_STATE_DIR", "MPSHM_DIR", "XDG_RUNTIME_DIR",
                 "MPSHM_BACKEND"):
        env.pop(name, None)
    return env


def cli(tmp: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "mpshm", *args], capture_output=True,
                          text=True, timeout=60, env=program_env(tmp))


# --------------------------------------------------------------------------
# Scenario 1: a planted journal must never steer gc


def _plant_journal(directory: str, victim: str, with_identity: bool) -> None:
    os.makedirs(directory, mode=0o755, exist_ok=True)
    os.chmod(directory, 0o755)
    entry: dict[str, Any] = {"put": ["mmap", victim], "op": "reg"}
    if with_identity:
        st = os.stat(victim)
        entry["id"] = f"{st.st_dev}:{st.st_ino}"
    with open(os.path.join(directory, "tracker-999999-deadbeef.log"), "w") as f:
        f.write(json.dumps({"journal": 1, "pid": 999999, "t": 1.0}) + "\n")
        f.write(json.dumps(entry) + "\n")


@pytest.mark.parametrize("with_identity", [False, True])
def test_gc_ignores_a_journal_planted_by_another_user(root, shared_tmp, with_identity):
    """Another user makes the predictable state directory first and plants a
    journal naming a file of the victim's: gc destroys nothing and says why."""
    victim_dir = tempfile.mkdtemp(prefix="mpshm-test-home-")
    victim = os.path.join(victim_dir, "thesis.tex")
    try:
        with open(victim, "w") as f:
            f.write("my thesis\n")
        os.chmod(victim_dir, 0o755)  # the other user may look, not write
        state = os.path.join(shared_tmp, f"mpshm-{os.getuid()}-trackers")
        assert as_other_user(lambda: _plant_journal(state, victim, with_identity)) is None
        assert os.stat(state).st_uid == OTHER_UID
        result = cli(shared_tmp, "gc", "--backend", "mmap", "--json")
        assert result.returncode == 0, result.stderr
        assert os.path.exists(victim), "gc destroyed a file named by a planted journal"
        assert json.loads(result.stdout)["segments"] == []
        assert "UntrustedJournalWarning" in result.stderr and state in result.stderr
        listing = cli(shared_tmp, "list", "--backend", "mmap", "--json")
        assert json.loads(listing.stdout) == []
    finally:
        shutil.rmtree(victim_dir, ignore_errors=True)


def test_gc_never_destroys_a_journal_entry_without_identity(tmp_path, monkeypatch):
    """Even in a journal of our own, an entry that records no storage identity
    is reported by gc, never destroyed: nothing proves it is mpshm's object."""
    state = tmp_path / "state"
    monkeypatch.setenv("MPSHM_STATE_DIR", str(state))
    _journal.check_private_dir(str(state), create=True)
    victim = tmp_path / "data.bin"
    victim.write_bytes(b"x" * 4096)
    with open(state / "tracker-999999-deadbeef.log", "w") as f:
        f.write(json.dumps({"journal": 1, "pid": 999999, "t": 1.0}) + "\n")
        f.write(json.dumps({"put": ["mmap", str(victim)], "op": "reg", "pid": 999999,
                            "t": 1.0}) + "\n")
    os.chmod(state / "tracker-999999-deadbeef.log", 0o600)
    env = program_env(str(tmp_path))
    env["MPSHM_STATE_DIR"] = str(state)
    result = subprocess.run([sys.executable, "-m", "mpshm", "gc", "--backend", "mmap",
                             "--json"], capture_output=True, text=True, timeout=60, env=env)
    assert result.returncode == 0, result.stderr
    assert victim.exists()
    verdicts = json.loads(result.stdout)["segments"]
    assert [(v["name"], v["action"], v["kind"]) for v in verdicts] == [
        (f"mmap:{victim}", "keep", "no-identity")]


def test_journals_others_may_write_are_ignored(tmp_path, monkeypatch):
    """A journal (or state directory) that group or others may write is not
    trusted: read_all skips it with a warning naming it."""
    state = tmp_path / "state"
    monkeypatch.setenv("MPSHM_STATE_DIR", str(state))
    _journal.check_private_dir(str(state), create=True)
    assert stat.S_IMODE(os.stat(state).st_mode) == 0o700
    path = state / "tracker-1-00000000.log"
    path.write_text(json.dumps({"journal": 1, "pid": 1, "t": 1.0}) + "\n")
    os.chmod(path, 0o600)
    assert [j.path for j in _journal.read_all()] == [str(path)]
    os.chmod(path, 0o622)
    with pytest.warns(_journal.UntrustedJournalWarning, match="others may write"):
        assert _journal.read_all() == []
    os.chmod(path, 0o600)
    os.chmod(state, 0o777)
    with pytest.warns(_journal.UntrustedJournalWarning, match=str(state)):
        assert _journal.read_all() == []
    os.chmod(state, 0o700)
    os.unlink(path)
    os.mkfifo(path, 0o600)  # a FIFO must neither block nor count
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert _journal.read_all() == []


def test_state_directory_prefers_xdg_runtime_dir(tmp_path, monkeypatch):
    """$XDG_RUNTIME_DIR (per user, 0700, made by the system) is preferred to
    the shared temp directory; one that is not private is not used."""
    monkeypatch.delenv("MPSHM_STATE_DIR", raising=False)
    xdg = tmp_path / "run"
    xdg.mkdir(mode=0o700)
    os.chmod(xdg, 0o700)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(xdg))
    assert _journal.state_dir() == str(xdg / "mpshm")
    os.chmod(xdg, 0o755)
    assert _journal.state_dir().startswith(tempfile.gettempdir())
    monkeypatch.setenv("XDG_RUNTIME_DIR", "relative/path")
    assert _journal.state_dir().startswith(tempfile.gettempdir())


# --------------------------------------------------------------------------
# Scenario 7: squatted directories never silently stop journaling

SQUATTED_VICTIM = """
import os, sys, time
import mpshm
from mpshm import tracking
shm = mpshm.SharedMemory(create=True, size=4096, backend={backend!r})
try:
    mpshm.SharedMemory(create=True, size=4096, backend="mmap")
    print("mmap: created", flush=True)
except PermissionError as exc:
    print("mmap:", exc, flush=True)
print(shm.name, tracking.tracker_pid(), flush=True)
time.sleep(1.0)  # the tracker journals within milliseconds
print("ready", flush=True)
time.sleep(60)
"""


@pytest.mark.parametrize("backend", ["posix", "sysv"])
def test_squatted_state_directory_still_journals_for_gc(root, shared_tmp, backend):
    """Another user pre-creates the victim's mmap and state directories. The
    mmap backend refuses its directory with a clear error; the tracker
    journals into a private fallback directory, so after the program and its
    tracker are SIGKILLed gc still finds the tracked segment and destroys it."""
    uid = os.getuid()
    squatted = [os.path.join(shared_tmp, f"mpshm-{uid}"),
                os.path.join(shared_tmp, f"mpshm-{uid}-trackers")]

    def squat() -> None:
        for path in squatted:
            os.mkdir(path, 0o777)
            os.chmod(path, 0o777)

    assert as_other_user(squat) is None
    proc = subprocess.Popen([sys.executable, "-c", SQUATTED_VICTIM.format(backend=backend)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=program_env(shared_tmp), start_new_session=True)
    name = None
    try:
        mmap_line = proc.stdout.readline().strip()  # type: ignore[union-attr]
        assert f"Refusing to use a directory owned by uid {OTHER_UID}" in mmap_line, (
            mmap_line + proc.stderr.read())
        name, tracker = proc.stdout.readline().split()  # type: ignore[union-attr]
        assert proc.stdout.readline().strip() == "ready"  # type: ignore[union-attr]
        os.kill(int(tracker), signal.SIGKILL)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
        wait_until(lambda: not os.path.exists(f"/proc/{tracker}"), 10)
        assert exists(name), "the segment should outlive its killed tracker"
        result = cli(shared_tmp, "gc", name, "--json")
        assert result.returncode == 0, result.stdout + result.stderr
        verdicts = json.loads(result.stdout)["segments"]
        assert [(v["name"], v["action"], v["destroyed"]) for v in verdicts] == [
            (name, "destroy", True)], verdicts
        # Destroyed as tracked (its journal was found), not merely as named.
        assert verdicts[0]["reason"].startswith("tracked, its program is dead"), verdicts
        assert not exists(name)
        # The squatted directories are named, and never trusted.
        assert squatted[1] in result.stderr
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if name is not None and exists(name):
            mpshm.SharedMemory(name).unlink()


def test_state_directory_is_not_removed_when_empty(tmp_path):
    """A state directory removed whenever it empties could be made by someone
    else a moment later: once made, it stays."""
    state = tmp_path / "state"
    code = ("import mpshm; s = mpshm.SharedMemory(create=True, size=64); s.close(); "
            "s.unlink()")
    env = program_env(str(tmp_path))
    env["MPSHM_STATE_DIR"] = str(state)
    subprocess.run([sys.executable, "-c", code], env=env, check=True, timeout=60)
    wait_until(lambda: state.is_dir() and not any(state.iterdir()), 20)
    assert stat.S_IMODE(os.stat(state).st_mode) == 0o700


# --------------------------------------------------------------------------
# Scenario 9: a handle's name and identifier must agree


def _forged(shm: SharedMemory, name: str) -> bytes:
    class Forged:
        def __reduce__(self) -> Any:
            return (_rebuild, (SharedMemory, shm.backend, shm._ident, name, shm.size,
                               reduction.machine()))
    return pickle.dumps(Forged())


@pytest.mark.parametrize("backend", ["posix", "sysv", "mmap"])
def test_handle_whose_name_disagrees_is_refused(make_segment, backend):
    """A handle carries one segment: if its name is changed to another
    (absent) segment's, loading it is refused rather than reporting one name
    while mapping (and unlinking) another segment."""
    shm = make_segment(size=4096, backend=backend)
    shm.buf[:4] = b"live"
    other = {"posix": unique("psm"), "sysv": "sysv:0x0badf00d",
             "mmap": f"mmap:/nonexistent/{unique()}"}[backend]
    with pytest.raises(reduction.HandleError, match="does not name its segment"):
        pickle.loads(_forged(shm, other))
    with pytest.raises(reduction.HandleError, match="does not name its segment"):
        reduction.attach_owner(shm.backend, shm._ident, other, shm.size, reduction.machine())
    # The genuine handle and the segment are untouched.
    again = pickle.loads(pickle.dumps(shm))
    assert again.name == shm.name and bytes(again.buf[:4]) == b"live"
    again.close()


@pytest.mark.parametrize("backend", ["sysv", "mmap"])
def test_handles_of_user_names_still_load(tmp_path, backend):
    """Names of the user's own (not the qualified form) travel in handles and
    agree with their identifier, so such handles load as before."""
    options = {"dir": str(tmp_path)} if backend == "mmap" else {}
    name = unique("own")
    shm = mpshm.SharedMemory(name, create=True, size=64, backend=backend, **options)
    try:
        again = pickle.loads(pickle.dumps(shm))
        assert again.name == name and again.size == 64
        again.close()
    finally:
        shm.close()
        shm.unlink()


# --------------------------------------------------------------------------
# Scenario 10: listings cannot drive the terminal or forge rows


def test_list_escapes_hostile_names():
    name = unique("esc") + "\x1b[2J\nposix  fake-row\t\\"
    shm = mpshm.SharedMemory(name, create=True, size=4096, track=False)
    try:
        env = program_env(tempfile.gettempdir())
        result = subprocess.run([sys.executable, "-m", "mpshm", "list", "--all",
                                 "--backend", "posix"], capture_output=True, text=True,
                                timeout=60, env=env)
        assert result.returncode == 0, result.stderr
        assert "\x1b" not in result.stdout and "\t" not in result.stdout
        rows = [line for line in result.stdout.splitlines() if name[:20] in line]
        assert len(rows) == 1, rows
        assert "\\x1b[2J\\nposix  fake-row\\t\\\\" in rows[0]
        assert not any(line.startswith("posix  fake-row") for line in result.stdout.splitlines())
    finally:
        shm.close()
        shm.unlink()


# --------------------------------------------------------------------------
# gc after a program and its tracker were killed together: what the
# adversarial review found

KILLED_PROGRAM = """
import json, os, sys, time
import mpshm
from mpshm import tracking
made = [
    mpshm.SharedMemory(create=True, size=4096),
    mpshm.SharedMemory(create=True, size=4096, backend="mmap"),
    mpshm.SharedMemory({sysv_name!r}, create=True, size=4096),
    mpshm.SharedMemory({posix_name!r}, create=True, size=4096),
]
child = None
if {fork_mapper!r}:
    child = os.fork()
    if child == 0:  # keeps every mapping, outlives its parent and the tracker
        time.sleep(60)
        os._exit(0)
print(json.dumps({{"names": [s.name for s in made], "tracker": tracking.tracker_pid(),
                   "child": child}}), flush=True)
time.sleep(1.0)  # the tracker journals within milliseconds
print("ready", flush=True)
time.sleep(60)
"""


def _killed_program(tmp: str, fork_mapper: bool = False) -> dict[str, Any]:
    """Run a program that makes a tracked segment of each kind (a System V
    and a POSIX one under names of its own), then SIGKILL it and its tracker."""
    code = KILLED_PROGRAM.format(sysv_name="sysv:" + unique("own"), posix_name=unique("own"),
                                 fork_mapper=fork_mapper)
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=program_env(tmp),
                            start_new_session=True)
    try:
        made = json.loads(proc.stdout.readline())  # type: ignore[union-attr]
        assert proc.stdout.readline().strip() == "ready"  # type: ignore[union-attr]
    except Exception:
        proc.kill()
        raise AssertionError(proc.stderr.read()) from None  # type: ignore[union-attr]
    os.kill(made["tracker"], signal.SIGKILL)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(10)
    wait_until(lambda: not os.path.exists(f"/proc/{made['tracker']}"), 10)
    return dict(made)


def _gc(tmp: str, *args: str) -> dict[str, dict[str, Any]]:
    result = cli(tmp, "gc", "--json", *args)
    assert result.returncode == 0, result.stdout + result.stderr
    return {v["name"]: v for v in json.loads(result.stdout)["segments"]}


def _maps_anything(pid: int) -> bool:
    """Whether *pid* is alive with mappings (a zombie maps nothing)."""
    try:
        with open(f"/proc/{pid}/maps") as f:
            return bool(f.read())
    except OSError:
        return False


def _cleanup(names: list[str]) -> None:
    for name in names:
        if exists(name):
            mpshm.SharedMemory(name, owner_check="ignore").unlink()


def test_gc_finds_every_tracked_segment_and_keeps_other_backends_entries(shared_tmp):
    """System V segments under names of the user's own are journaled by name
    but listed by key: gc finds them all the same. ``gc --backend posix``
    leaves the other backends' journal entries for a later gc, and a
    misspelt name stops gc before it destroys anything."""
    made = _killed_program(shared_tmp)
    names = made["names"]
    try:
        posix_gen, mmap_gen, sysv_own, posix_own = names
        listing = {row["name"]: row for row in json.loads(
            cli(shared_tmp, "list", "--json", "--all", "--backend", "sysv").stdout)}
        key_name = f"sysv:0x{key_for(sysv_own[len('sysv:'):]):08x}"
        assert listing[key_name]["tracked"] is True

        typo = cli(shared_tmp, "gc", posix_gen, unique("typo"))
        assert typo.returncode == 2 and "nothing was destroyed" in typo.stderr
        assert exists(posix_gen)

        first = _gc(shared_tmp, "--backend", "posix", posix_gen, posix_own)
        assert {n: (v["action"], v["destroyed"]) for n, v in first.items()} == {
            posix_gen: ("destroy", True), posix_own: ("destroy", True)}
        second = _gc(shared_tmp, mmap_gen, sysv_own)
        assert {n: v["destroyed"] for n, v in second.items()} == {
            mmap_gen: True, key_name: True}
        assert all(v["reason"].startswith("tracked") for v in second.values()), second
        assert not any(exists(n) for n in names)
    finally:
        _cleanup(names)


def test_gc_keeps_named_segments_a_living_process_maps(shared_tmp):
    """A segment made under a user's name is mapped by its creator (and the
    creator's forked children) under the random name it was made with: gc
    finds the mappers by device and inode, not by path, and keeps it."""
    made = _killed_program(shared_tmp, fork_mapper=True)
    names = made["names"]
    try:
        verdicts = _gc(shared_tmp, *names)
        assert {n: v["kind"] for n, v in verdicts.items() if v["backend"] != "sysv"} == {
            names[0]: "mapped", names[1]: "mapped", names[3]: "mapped"}, verdicts
        assert all(exists(n) for n in names)
        os.kill(made["child"], signal.SIGKILL)
        wait_until(lambda: not _maps_anything(made["child"]), 10)
        verdicts = _gc(shared_tmp, *names)
        assert all(v["destroyed"] for v in verdicts.values()), verdicts
    finally:
        if made.get("child"):
            try:
                os.kill(made["child"], signal.SIGKILL)
            except ProcessLookupError:
                pass
        _cleanup(names)


RACE = """
import multiprocessing as mp, sys, time
import mpshm

def create(ready, name, out):
    ready.wait()
    try:
        mpshm.SharedMemory(name, create=True, size=4096).close()
        out.put("won")
    except FileExistsError:
        out.put("lost")

if __name__ == "__main__":
    ctx = mp.get_context("fork")
    mpshm.SharedMemory(create=True, size=64, backend={backend!r}).close()  # tracker first
    for name in sys.argv[1:]:
        ready, out = ctx.Event(), ctx.Queue()
        procs = [ctx.Process(target=create, args=(ready, name, out)) for _ in range(4)]
        for p in procs:
            p.start()
        time.sleep(0.05)
        ready.set()
        for p in procs:
            p.join()
        assert sorted(out.get() for _ in procs) == ["lost", "lost", "lost", "won"]
"""


@pytest.mark.parametrize("backend", ["posix", "sysv", "mmap"])
def test_processes_racing_for_one_name_leave_nothing(tmp_path, backend):
    """Four processes of one program create the same name at once: one wins,
    and the losers withdraw only their own registration, so the winner's
    segment is still destroyed when the program ends."""
    scheme = {"posix": "", "sysv": "sysv:", "mmap": f"mmap:{tmp_path}/"}[backend]
    names = [scheme + unique("race") for _ in range(6)]
    env = program_env(str(tmp_path))
    env["MPSHM_STATE_DIR"] = str(tmp_path / "state")
    try:
        result = subprocess.run([sys.executable, "-c", RACE.format(backend=backend), *names],
                                capture_output=True, text=True, timeout=90, env=env)
        assert result.returncode == 0, result.stderr
        wait_until(lambda: not any(exists(n) for n in names), 20)
    finally:
        _cleanup(names)


def test_untracked_files_of_others_in_the_mmap_directory_are_not_mpshms(tmp_path):
    """The mmap directory may be one other programs use too (MPSHM_DIR=/dev/shm,
    say): an untracked file there counts as mpshm's only under a generated
    name, so ``gc --untracked`` leaves the rest alone."""
    shared = tmp_path / "shared"
    shared.mkdir(mode=0o700)
    (shared / "data.bin").write_bytes(b"x" * 4096)
    env = program_env(str(tmp_path))
    env.update(MPSHM_DIR=str(shared), MPSHM_STATE_DIR=str(tmp_path / "state"))
    code = ("import mpshm; s = mpshm.SharedMemory(create=True, size=4096, backend='mmap', "
            "track=False); print(s.name)")
    made = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=env, timeout=60, check=True).stdout.strip()
    result = subprocess.run([sys.executable, "-m", "mpshm", "gc", "--untracked", "--backend",
                             "mmap", "--json"], capture_output=True, text=True, env=env,
                            timeout=60)
    assert result.returncode == 0, result.stderr
    verdicts = {v["name"]: v for v in json.loads(result.stdout)["segments"]}
    assert verdicts == {made: verdicts[made]} and verdicts[made]["destroyed"]
    assert (shared / "data.bin").exists()
