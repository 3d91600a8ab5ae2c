"""``mpshm list`` and ``mpshm gc``, through their ``--json`` output, and the
trackers' journals they read.

Programs under test get a private state directory (``MPSHM_STATE_DIR``), so
a test sees its own programs' journals only; ``gc`` is always given the
names it may act on, so it never touches another test's segments.
"""

from __future__ import annotations

import json
import multiprocessing.shared_memory as stdlib_shm
import os
import signal
import subprocess
import sys
import time

import pytest
from helpers import BACKENDS, ROOT, exists, finish, popen_script, unique, wait_until

import mpshm
from mpshm._sysinfo import start_time
from mpshm.tracking import journal as _journal

TIMEOUT = 60


def mpshm_cli(*args: str, state: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run ``python -m mpshm ARGS`` with the private state directory *state*."""
    env = dict(os.environ, PYTHONPATH=ROOT, MPSHM_STATE_DIR=state)
    env.pop("MPSHM_TRACKER", None)
    result = subprocess.run([sys.executable, "-m", "mpshm", *args], capture_output=True,
                            text=True, timeout=TIMEOUT, env=env)
    if check:
        assert result.returncode == 0, result.stdout + result.stderr
    return result


def listed(state: str, *args: str) -> dict[str, dict]:
    rows = json.loads(mpshm_cli("list", "--json", *args, state=state).stdout)
    return {row["name"]: row for row in rows}


def gc_json(state: str, *args: str) -> dict[str, dict]:
    out = json.loads(mpshm_cli("gc", "--json", *args, state=state).stdout)
    return {row["name"]: row for row in out["segments"]}


def read_lines(proc: subprocess.Popen[str], count: int) -> list[str]:
    lines = []
    for _ in range(count):
        line = proc.stdout.readline().strip()  # type: ignore[union-attr]
        if not line:
            proc.kill()
            raise AssertionError(f"program said nothing; stderr: {proc.stderr.read()}")
        lines.append(line)
    return lines


@pytest.fixture
def state(tmp_path) -> str:
    return str(tmp_path / "state")


HOLDER = """
    import os, sys, time, mpshm
    from mpshm import tracking
    shm = mpshm.SharedMemory(create=True, size={size}, backend={backend!r})
    shm.buf[:2] = b"ok"
    {close}
    print(shm.name)
    print(os.getpid())
    print(tracking.tracker_pid())
    sys.stdin.readline()
"""


@pytest.mark.timeout(120)
@pytest.mark.parametrize("backend", BACKENDS)
def test_list_sees_a_segment_made_by_a_child_process(backend, state):
    proc = popen_script(HOLDER.format(size=3 * 4096, backend=backend, close=""),
                        env={"MPSHM_STATE_DIR": state})
    try:
        name, pid, tracker = read_lines(proc, 3)
        # The tracker journals within milliseconds; poll rather than sleep.
        seen: dict = {}

        def journaled() -> bool:
            seen.update(listed(state, "--backend", backend))
            return seen.get(name, {}).get("tracked", False)

        wait_until(journaled, 10, step=0.1)
        row = seen[name]
        assert row["backend"] == backend
        assert row["size"] == 3 * 4096
        assert row["uid"] == os.getuid() and row["mode"] == "0600"
        assert row["mpshm"] is True
        assert row["creator_pid"] == int(pid) and row["creator_alive"] is True
        assert row["mapped"] >= 1
        if backend != "sysv":  # SysV: the kernel counts, /proc/<pid>/maps is not read
            assert int(pid) in row["mapped_by"]
        assert row["tracker_pid"] == int(tracker) and row["tracker_alive"] is True
        assert 0 <= row["age"] < 60
        # Filtered out by backend, and the human form names it too.
        other = next(b for b in BACKENDS if b != backend)
        assert name not in listed(state, "--backend", other)
        human = mpshm_cli("list", state=state).stdout
        assert name in human and "TRACKED" in human
    finally:
        proc.stdin.write("\n")  # type: ignore[union-attr]
        proc.stdin.flush()  # type: ignore[union-attr]
        proc.wait(TIMEOUT)
        finish(proc)
    wait_until(lambda: not exists(name), 10)  # its tracker destroyed it at the end


def test_list_all_shows_foreign_segments_that_list_leaves_out(state):
    foreign = stdlib_shm.SharedMemory(create=True, size=4096)  # the stdlib's psm_<8 hex>
    ours = mpshm.SharedMemory(create=True, size=4096, track=False)
    try:
        default = listed(state, "--backend", "posix")
        everything = listed(state, "--all", "--backend", "posix")
        assert foreign.name not in default
        assert everything[foreign.name]["mpshm"] is False
        assert default[ours.name]["mpshm"] is True and default[ours.name]["tracked"] is False
        assert default[ours.name]["mapped"] >= 1  # this process maps it
        assert os.getpid() in default[ours.name]["mapped_by"]
    finally:
        foreign.close()
        foreign.unlink()
        ours.close()
        ours.unlink()


KILLED = """
    import os, sys, time, mpshm
    from mpshm import tracking
    for backend in {backends!r}:
        tracked = mpshm.SharedMemory(create=True, size=8192, backend=backend)
        tracked.buf[:4] = b"data"
        tracked.close()
        print(tracked.name)
    untracked = mpshm.SharedMemory(create=True, size=4096, track=False)
    untracked.close()
    print(untracked.name)
    print(tracking.tracker_pid())
    time.sleep(300)
"""


@pytest.mark.timeout(180)
def test_gc_destroys_what_a_killed_program_left_and_nothing_else(state):
    # A living program with a tracked segment of its own (not mapped now): never touched.
    living = popen_script(HOLDER.format(size=4096, backend="posix", close="shm.close()"),
                          env={"MPSHM_STATE_DIR": state})
    victim = popen_script(KILLED.format(backends=BACKENDS), env={"MPSHM_STATE_DIR": state},
                          new_group=True)
    untracked = None
    tracked: list[str] = []
    try:
        alive_name, _, _ = read_lines(living, 3)
        *tracked, untracked, tracker = read_lines(victim, len(BACKENDS) + 2)
        names = [*tracked, untracked, alive_name]
        wait_until(lambda: all(listed(state).get(n, {}).get("tracked") for n in tracked),
                   10, step=0.1)
        # The whole program is killed at once, its tracker with it: mpshm's own
        # cleanup cannot run, and the segments stay.
        # The tracker first: killed after the program, it could see the
        # program's end and clean up before its own SIGKILL lands.
        os.kill(int(tracker), signal.SIGKILL)
        os.killpg(victim.pid, signal.SIGKILL)
        victim.wait(TIMEOUT)
        time.sleep(0.5)
        assert all(exists(n) for n in names)
        rows = listed(state)
        assert all(rows[n]["tracker_alive"] is False and rows[n]["creator_alive"] is False
                   and rows[n]["mapped"] == 0 for n in tracked)

        planned = gc_json(state, "--dry-run", *tracked, untracked, alive_name)
        assert {n: planned[n]["action"] for n in names} == {
            **{n: "destroy" for n in tracked}, untracked: "destroy", alive_name: "keep"}
        # Naming an untracked segment includes it; without names, --untracked
        # is needed (checked below). The dry run destroyed nothing.
        assert "tracker" in planned[alive_name]["reason"]
        assert all(exists(n) for n in names)
        assert not any(row["destroyed"] for row in planned.values())

        # Without names: the tracked ones go, the untracked one stays.
        everything = gc_json(state, "--dry-run")
        assert everything[untracked]["action"] == "keep"
        assert "--untracked" in everything[untracked]["reason"]

        done = gc_json(state, *tracked, alive_name)
        assert all(done[n]["destroyed"] for n in tracked)
        assert not done[alive_name]["destroyed"]
        assert not any(exists(n) for n in tracked)
        assert exists(untracked) and exists(alive_name)
        # The dead tracker's journal is gone with its last entry.
        assert int(tracker) not in [j.pid for j in _journal.read_all(state)]
    finally:
        for proc in (victim, living):
            finish(proc)
        for name in [*tracked, untracked] if untracked is not None else []:
            if exists(name):  # the test failed half-way: leave nothing behind
                mpshm.SharedMemory(name).unlink()


@pytest.mark.timeout(120)
def test_gc_leaves_a_segment_that_a_living_process_maps(state):
    """The creating program is dead, but a process it started (in a session of
    its own, so it survived) still maps the segment: kept until that one exits."""
    victim = popen_script(
        """
        import subprocess, sys, time, mpshm
        from mpshm import tracking
        shm = mpshm.SharedMemory(create=True, size=4096)
        shm.buf[:5] = b"alive"
        code = ("import sys, mpshm; s = mpshm.SharedMemory(sys.argv[1]); "
                "import time; print('ready', flush=True); time.sleep(300)")
        reader = subprocess.Popen([sys.executable, "-c", code, shm.name],
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                  start_new_session=True)
        assert reader.stdout.readline().strip() == "ready"
        print(shm.name)
        print(tracking.tracker_pid())
        print(reader.pid)
        time.sleep(300)
        """,
        env={"MPSHM_STATE_DIR": state}, new_group=True,
    )
    reader = None
    name = None
    try:
        name, tracker, reader_pid = read_lines(victim, 3)
        reader = int(reader_pid)
        wait_until(lambda: listed(state).get(name, {}).get("tracked", False), 10, step=0.1)
        # The tracker first: killed after the program, it could see the
        # program's end and clean up before its own SIGKILL lands.
        os.kill(int(tracker), signal.SIGKILL)
        os.killpg(victim.pid, signal.SIGKILL)
        victim.wait(TIMEOUT)
        verdict = gc_json(state, name)[name]
        assert verdict["action"] == "keep" and "maps it" in verdict["reason"]
        assert str(reader) in verdict["reason"]
        assert exists(name)
        os.kill(reader, signal.SIGKILL)
        wait_until(lambda: start_time(reader) is None, 10)  # gone, or a zombie
        reader = None
        assert gc_json(state, name)[name]["destroyed"] is True
        assert not exists(name)
    finally:
        if reader is not None:
            os.kill(reader, signal.SIGKILL)
        finish(victim)
        if name is not None and exists(name):
            mpshm.SharedMemory(name).unlink()


def test_gc_never_touches_another_users_segment(state):
    if os.geteuid() != 0:
        pytest.skip("giving a segment to another user needs root (CI runs as root)")
    shm = mpshm.SharedMemory(create=True, size=4096, track=False)
    try:
        os.chown(f"/dev/shm/{shm.name}", 65534, 65534)
        verdict = gc_json(state, shm.name)[shm.name]
        assert verdict["action"] == "keep" and "uid 65534" in verdict["reason"]
        assert exists(shm.name)
    finally:
        shm.close()
        shm.unlink()


def test_gc_of_an_unknown_name_is_an_error(state):
    result = mpshm_cli("gc", unique("psm"), state=state, check=False)
    assert result.returncode == 2
    assert "no segment" in result.stderr and "mpshm list --all" in result.stderr


def test_gc_human_output_says_what_and_why(state):
    shm = mpshm.SharedMemory(create=True, size=4096, track=False)
    shm.close()
    try:
        out = mpshm_cli("gc", "--dry-run", shm.name, state=state).stdout
        assert f"would destroy: {shm.name}" in out and "untracked" in out
        assert exists(shm.name)
        kept = mpshm.SharedMemory(create=True, size=4096)  # tracked, its tracker alive
        try:
            out = mpshm_cli("gc", "--dry-run", "--verbose", kept.name, state=state).stdout
            assert f"kept: {kept.name}: a living process maps it ({os.getpid()})" in out
            out = mpshm_cli("gc", "--dry-run", kept.name, state=state).stdout
            assert "kept 1 (a living process maps them)" in out
        finally:
            kept.close()
            kept.unlink()
    finally:
        shm.unlink()


# -- the command line as a whole ---------------------------------------------------


@pytest.mark.parametrize("command", ["doctor", "list", "gc", "bench"])
def test_every_subcommand_has_help(command, state):
    result = mpshm_cli(command, "--help", state=state)
    assert result.stdout.startswith(f"usage: mpshm {command}")
    assert "--json" in result.stdout


def test_no_subcommand_prints_usage(state):
    result = mpshm_cli(state=state, check=False)
    assert result.returncode == 2 and "usage: mpshm" in result.stderr


def test_the_console_script_is_installed():
    script = os.path.join(os.path.dirname(sys.executable), "mpshm")
    result = subprocess.run([script, "--version"], capture_output=True, text=True,
                            timeout=TIMEOUT)
    assert result.returncode == 0 and result.stdout.strip() == f"mpshm {mpshm.__version__}"


# -- the journal ------------------------------------------------------------------


def test_journal_records_puts_and_drops_and_survives_a_cut_last_line(tmp_path, monkeypatch):
    monkeypatch.setenv("MPSHM_STATE_DIR", str(tmp_path))
    writer = _journal.Writer({"pid": 1, "t": 0.0, "address": "x", "starter": None})
    entries: dict = {}
    for i in range(5):
        key = ("posix", f"seg{i}")
        entries[key] = {"op": "reg", "pid": 7, "id": f"0:{i}"}
        writer.put(key, entries[key])
    writer.drop(("posix", "seg1"))
    del entries[("posix", "seg1")]
    writer.flush(entries)
    with open(writer.path, "ab") as f:
        f.write(b'{"put": ["posix", "half')  # a tracker killed mid-write
    journal = _journal.read(writer.path)
    assert journal is not None and journal.pid == 1
    assert sorted(journal.entries) == sorted(entries)
    assert journal.entries[("posix", "seg3")]["id"] == "0:3"
    assert os.stat(writer.path).st_mode & 0o777 == 0o600
    writer.close(remove=True)
    assert not os.path.exists(writer.path)


def test_journal_compacts_without_losing_entries(tmp_path, monkeypatch):
    monkeypatch.setenv("MPSHM_STATE_DIR", str(tmp_path))
    writer = _journal.Writer({"pid": 1, "t": 0.0})
    entries: dict = {}
    for i in range(3000):  # create and unlink, keeping every 100th
        key = ("posix", f"seg{i}")
        writer.put(key, {"op": "reg", "pid": 7})
        if i % 100:
            writer.drop(key)
        else:
            entries[key] = {"op": "reg", "pid": 7}
        writer.flush(entries)
    with open(writer.path, "rb") as f:
        assert len(f.read().splitlines()) < 1000  # compacted
    journal = _journal.read(writer.path)
    assert journal is not None and sorted(journal.entries) == sorted(entries)
    writer.close(remove=True)


def test_an_unusable_state_directory_never_stops_tracking(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    code = """
        import mpshm
        shm = mpshm.SharedMemory(create=True, size=4096)
        print(shm.name)
    """
    from helpers import run_script

    result = run_script(code, env={"MPSHM_STATE_DIR": str(blocker / "state"),
                                   "TMPDIR": str(tmp_path)})
    assert result.returncode == 0 and result.stderr == ""
    name = result.stdout.strip()
    wait_until(lambda: not exists(name), 10)  # the tracker still destroyed it
    # It journaled into a private fallback directory meanwhile (emptied now).
    fallbacks = list(tmp_path.glob(f"mpshm-{os.getuid()}-trackers-*"))
    assert len(fallbacks) == 1 and (fallbacks[0].stat().st_mode & 0o777) == 0o700


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait(TIMEOUT)
    return proc.pid


@pytest.mark.parametrize("same_object", [True, False])
def test_a_journal_claims_only_the_object_it_recorded(state, same_object):
    """A dead tracker's journal names a user-chosen name; if that name was
    unlinked and made again since, the new object is not the dead program's,
    and gc leaves it alone."""
    from mpshm.backends import get

    name = unique("reused")
    old = mpshm.SharedMemory(name, create=True, size=4096, track=False)
    recorded = get("posix").identity(name)
    old.close()
    if not same_object:
        old.unlink()
        mpshm.SharedMemory(name, create=True, size=4096, track=False).close()
    try:
        dead = _dead_pid()
        os.makedirs(state, mode=0o700)
        with open(os.path.join(state, f"tracker-{dead}-test.log"), "w") as f:
            f.write(json.dumps({"journal": 1, "pid": dead, "t": time.time() - 60,
                                "address": unique("addr"), "starter": dead}) + "\n")
            f.write(json.dumps({"put": ["posix", name], "op": "reg", "id": recorded,
                                "pid": dead, "t": time.time() - 59}) + "\n")
        row = listed(state, "--all", "--backend", "posix")[name]
        assert row["tracked"] is same_object
        verdict = gc_json(state, "--dry-run")
        if same_object:
            assert verdict[name]["action"] == "destroy"
            assert gc_json(state)[name]["destroyed"] is True
            assert not exists(name)
            # The emptied journal went; its directory stays (see test_cleanup_proof).
            assert os.listdir(state) == []
        else:
            assert name not in verdict  # a user's own name, untracked: not mpshm's
            assert exists(name)
    finally:
        if exists(name):
            mpshm.SharedMemory(name).unlink()
