"""The tracker against a hostile local user, and when it dies or stalls.

* Tracker addresses are public (``/proc/net/unix``): another user who binds
  the address of a tracker that died must get nothing, and the program must
  start a tracker of its own instead (scenario 4a).
* Another user's process that carries a tracker's address in its
  environment must not keep that tracker (or ``mpshm gc``) waiting (4b).
* A process of the program that switched to another user must not be able
  to use the connection it inherited.
* A tracker that replaces a dead one takes over what the dead one journaled,
  including the segments of processes that have exited since (scenario 6).
* A stalled (stopped) tracker costs the program about a second and one
  warning, never a hang, and still learns everything once it reads again
  (scenario 8).

Playing another user takes root: a process started as root drops to
``OTHER`` (an unused uid) with setuid, having imported what it needs first
(the interpreter's own directory may be closed to that uid). Every program
under test gets a private state directory (``MPSHM_STATE_DIR``).
"""

from __future__ import annotations

import json
import os
import queue
import select
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
import warnings
from pathlib import Path
from typing import Any, Optional

import pytest
from helpers import exists, finish, popen_script, require_root, unique, wait_until

import mpshm
from mpshm import tracking
from mpshm._sysinfo import start_time
from mpshm.tracking import journal as _journal
from mpshm.tracking import protocol as _protocol
from mpshm.tracking import server as _tracker

CLEANUP_LIMIT = 5.0  # seconds a tracker may take once the program is over
OTHER = 65533  # the other user: an unused uid (no passwd entry needed)


@pytest.fixture
def state(tmp_path: Path) -> str:
    """A private state directory (journals) for the programs of one test."""
    path = tmp_path / "state"
    path.mkdir(mode=0o700)
    return str(path)


def _journals(state: str) -> list[str]:
    return sorted(n for n in os.listdir(state) if n.startswith("tracker-")) \
        if os.path.isdir(state) else []


def _line(proc: subprocess.Popen[str], timeout: float = 60) -> str:
    """The next line *proc* prints, waiting at most *timeout* seconds (a
    thread reads them: lines that arrive together sit in the pipe's reader,
    where select() does not see them)."""
    lines: Optional[queue.Queue[str]] = getattr(proc, "_lines", None)
    if lines is None:
        lines = queue.Queue()

        def read(stream: Any, sink: queue.Queue[str]) -> None:
            try:
                for text in stream:
                    sink.put(text)
            except (OSError, ValueError):  # closed by _finish
                pass
            sink.put("")

        threading.Thread(target=read, args=(proc.stdout, lines), daemon=True).start()
        proc._lines = lines  # type: ignore[attr-defined]
    try:
        line = lines.get(timeout=timeout).strip()
    except queue.Empty:
        line = ""
    if not line:
        proc.kill()
        stderr = proc.stderr.read() if proc.stderr is not None else ""
        raise AssertionError(f"program said nothing within {timeout} s; stderr: {stderr}")
    return line


def _say(proc: subprocess.Popen[str], text: str = "") -> None:
    assert proc.stdin is not None
    proc.stdin.write(text + "\n")
    proc.stdin.flush()


def _kill_dead(pid: int) -> None:
    """SIGKILL the tracker *pid* (one a test's program started) and wait
    until it is gone (a zombie counts as gone)."""
    os.kill(pid, signal.SIGKILL)
    wait_until(lambda: start_time(pid) is None, 10)


def _remove(names: list[str]) -> None:
    """Unlink what is left of *names* (only if a test failed)."""
    for name in names:
        if exists(name):
            mpshm.SharedMemory(name, owner_check="ignore").unlink()


def _resume(pid: Optional[int]) -> None:
    """SIGCONT *pid* if it is still there (a stopped tracker must never be left)."""
    if pid is not None:
        try:
            os.kill(pid, signal.SIGCONT)
        except ProcessLookupError:
            pass


def _as_other(code: str, *args: str, env: Optional[dict[str, str]] = None,
              setuid_program: bool = False) -> subprocess.Popen[str]:
    """Run *code* as user ``OTHER``: this interpreter is started as root,
    imports what *code* needs (``os``, ``select``, ``socket``, ``sys``,
    ``time``, ``json``), then drops to ``OTHER``; with *setuid_program*,
    to the credentials of a set-user-ID root program that ``OTHER`` runs
    (real uid ``OTHER``, effective and saved uid 0). *code* sees *args* in
    ``sys.argv[1:]``; stdin, stdout and stderr are pipes."""
    if setuid_program:
        drop = f"os.setresgid({OTHER}, 0, 0); os.setresuid({OTHER}, 0, 0)"
    else:
        drop = f"os.setgroups([]); os.setgid({OTHER}); os.setuid({OTHER})"
    prelude = f"import json, os, select, socket, sys, time\n{drop}\n"
    return subprocess.Popen(
        [sys.executable, "-c", prelude + textwrap.dedent(code), *args],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env=env if env is not None else {"PATH": os.environ.get("PATH", "/usr/bin:/bin")},
    )


# --------------------------------------------------------------------------
# Scenario 4a: an impostor at a dead tracker's address

IMPOSTOR = """
# Listen where the victim's tracker listened; count what anyone sends, until stdin closes.
listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
listener.bind("\\0" + sys.argv[1])
listener.listen(16)
print("bound", flush=True)
conns, accepted, received = [], 0, 0
while True:
    ready, _, _ = select.select([listener, sys.stdin, *conns], [], [], 1.0)
    if sys.stdin in ready and not sys.stdin.readline():
        break
    for sock in ready:
        if sock is listener:
            conn, _ = listener.accept()
            conns.append(conn)
            accepted += 1
        elif sock is not sys.stdin:
            data = sock.recv(1 << 16)
            received += len(data)
            if not data:
                conns.remove(sock)
print(json.dumps({"accepted": accepted, "bytes": received}), flush=True)
"""


@pytest.mark.timeout(120)
def test_impostor_at_a_dead_trackers_address_gets_nothing(state: str) -> None:
    """The tracker dies; another user binds its address. The program's next
    tracked creation starts a tracker of its own (the dead one's address is
    never called again), a process started with the dead address in its
    environment sees who listens there and starts its own too: the impostor
    receives not one byte, and every segment is destroyed when the program
    ends."""
    require_root()
    program = popen_script(
        """
        import os, subprocess, sys, mpshm
        from mpshm import tracking

        first = mpshm.SharedMemory(create=True, size=4096)
        old = os.environ["MPSHM_TRACKER"]
        print(first.name, tracking.tracker_pid(), old, flush=True)
        sys.stdin.readline()  # the tracker is dead, the impostor listens
        second = mpshm.SharedMemory(create=True, size=4096)
        print(second.name, tracking.tracker_pid(), flush=True)
        child = subprocess.run(
            [sys.executable, "-c", "import mpshm; from mpshm import tracking; "
             "s = mpshm.SharedMemory(create=True, size=4096); "
             "print(s.name, tracking.tracker_pid())"],
            env=dict(os.environ, MPSHM_TRACKER=old), capture_output=True, text=True,
            timeout=60,
        )
        print(child.stdout.strip() or "failed: " + child.stderr.replace("\\n", " "), flush=True)
        sys.stdin.readline()
        """,
        env={"MPSHM_STATE_DIR": state},
    )
    impostor = None
    names: list[str] = []
    try:
        first, tracker, address = _line(program).split()
        names.append(first)
        _kill_dead(int(tracker))
        impostor = _as_other(IMPOSTOR, address)
        assert _line(impostor) == "bound"
        _say(program)
        second, replacement = _line(program).split()
        names.append(second)
        child_line = _line(program)
        assert not child_line.startswith("failed"), child_line
        child_segment, child_tracker = child_line.split()
        names.append(child_segment)
        assert int(replacement) != int(tracker)
        assert child_tracker not in (tracker, replacement)  # its own: the impostor is refused
        assert exists(first) and exists(second)
        _say(program)
        program.wait(30)
        took = wait_until(lambda: not any(exists(n) for n in names), CLEANUP_LIMIT)
        print(f"cleanup after an impostor took the address: {took:.3f} s")
        impostor.stdin.close()  # type: ignore[union-attr]
        report = json.loads(_line(impostor))
        # The program itself never called the dead address again; the child
        # connected (it cannot know before), saw another user, and said nothing.
        assert report["bytes"] == 0, report
        assert report["accepted"] <= 1, report
        wait_until(lambda: not _journals(state), CLEANUP_LIMIT)
    finally:
        finish(program, impostor)
        _remove(names)


# --------------------------------------------------------------------------
# Scenario 4b: another user's process carrying a tracker's address

PINNER = """
# Carry MPSHM_TRACKER (in this environment) for a long time.
print("ready", flush=True)
time.sleep(60)
"""


@pytest.mark.timeout(120)
@pytest.mark.parametrize("kind", ["plain", "setuid-program"])
def test_another_users_process_carrying_the_address_does_not_pin_the_tracker(
    state: str, kind: str
) -> None:
    """A process of another user whose environment carries the program's
    tracker address does not keep the tracker waiting: once the program
    ends, its segment is destroyed while that process still runs. So for a
    set-user-ID root program that user runs (root's tracker: its effective
    uid is root's, its real uid is not)."""
    require_root()
    program = popen_script(
        """
        import os, sys, mpshm
        shm = mpshm.SharedMemory(create=True, size=4096)
        print(shm.name, os.environ["MPSHM_TRACKER"], flush=True)
        sys.stdin.readline()
        """,
        env={"MPSHM_STATE_DIR": state},
    )
    pinner = None
    name = ""
    try:
        name, address = _line(program).split()
        pinner = _as_other(PINNER, env={"PATH": "/usr/bin:/bin", tracking.ENV_VAR: address},
                           setuid_program=kind == "setuid-program")
        assert _line(pinner) == "ready"
        assert _carries(pinner.pid, f"{tracking.ENV_VAR}={address}".encode())
        _say(program)
        program.wait(30)
        took = wait_until(lambda: not exists(name), CLEANUP_LIMIT)
        print(f"cleanup with another user's process carrying the address ({kind}): {took:.3f} s")
        assert pinner.poll() is None  # it still runs
        wait_until(lambda: not _journals(state), CLEANUP_LIMIT)
    finally:
        finish(program, pinner)
        _remove([name] if name else [])


def _carries(pid: int, needle: bytes) -> bool:
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            return needle in f.read().split(b"\0")
    except OSError:
        return False


@pytest.mark.timeout(60)
def test_carriers_count_only_processes_of_this_user() -> None:
    """``carriers()`` (the tracker's and ``mpshm gc``'s test of whether a
    program still runs) counts a process of this user carrying the address,
    not one of another user, nor a set-user-ID program another user runs,
    though /proc/<pid> is root's for that one."""
    require_root()
    value = f"mpshm-tracker-test-{unique()}"
    needle = f"{tracking.ENV_VAR}={value}".encode()
    env = {"PATH": "/usr/bin:/bin", tracking.ENV_VAR: value}
    procs: list[subprocess.Popen[str]] = []
    try:
        mine = subprocess.Popen(["sleep", "60"], env=env, text=True)
        procs.append(mine)
        plain = _as_other(PINNER, env=env)
        procs.append(plain)
        setuid = _as_other(PINNER, env=env, setuid_program=True)
        procs.append(setuid)
        assert _line(plain) == "ready" and _line(setuid) == "ready"
        # Why the owner of /proc/<pid> (the effective uid) will not do:
        assert os.stat(f"/proc/{setuid.pid}").st_uid == 0
        found = _tracker.carriers([needle]).get(needle, {})
        assert mine.pid in found
        assert plain.pid not in found and setuid.pid not in found
    finally:
        finish(*procs)


# --------------------------------------------------------------------------
# A process of the program that switched user keeps its inherited connection


@pytest.mark.timeout(120)
def test_process_that_switched_user_cannot_use_the_inherited_connection(state: str) -> None:
    """A forked child that drops to another user still holds the program's
    socket pair to the tracker. What it sends there is dropped: a claim on a
    segment that is not the program's, an unregistration of one that is,
    and an empty packet (which looks like end-of-file to a plain read) or a
    shutdown of the shared socket do not make the tracker destroy anything
    early or anything that is not the program's."""
    require_root()
    victim = mpshm.SharedMemory(create=True, size=4096, track=False)
    identity = mpshm.backends.get("posix").identity(victim._ident)
    program = None
    name = ""
    try:
        program = popen_script(
            f"""
            import os, socket, sys, time, mpshm
            from mpshm import tracking
            from mpshm.tracking import protocol as _protocol

            shm = mpshm.SharedMemory(create=True, size=4096)
            print(shm.name, flush=True)
            pid = os.fork()
            if pid == 0:
                code = 1
                try:
                    sock = tracking._client._sock
                    os.setgroups([]); os.setgid({OTHER}); os.setuid({OTHER})
                    sock.send(_protocol.encode("reg", "posix", {victim._ident!r}, {identity!r}))
                    sock.send(_protocol.encode("unreg", "posix", shm._ident, None))
                    sock.send(b"")
                    sock.shutdown(socket.SHUT_WR)
                    code = 0
                finally:
                    os._exit(code)
            _, status = os.waitpid(pid, 0)
            print("sent", status, flush=True)
            sys.stdin.readline()
            mpshm.SharedMemory(create=True, size=4096)  # (the pair is shut: a new tracker)
            sys.stdin.readline()
            """,
            env={"MPSHM_STATE_DIR": state},
        )
        name = _line(program)
        assert _line(program) == "sent 0"
        time.sleep(1.5)  # the tracker has read all that long ago
        assert exists(name)  # not destroyed early
        _say(program)
        _say(program)
        program.wait(30)
        wait_until(lambda: not exists(name), CLEANUP_LIMIT)
        wait_until(lambda: not _journals(state), CLEANUP_LIMIT)  # every tracker is done
        assert exists(victim.name)  # the claim was not honoured
    finally:
        finish(program)
        _remove([name] if name else [])
        victim.close()
        victim.unlink()


CONNECTOR = """
# Connect to the tracker at sys.argv[1] and claim the segment sys.argv[2].
sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
sock.connect("\\0" + sys.argv[1])
payload = "\\0".join(["reg", "posix", sys.argv[2], sys.argv[3], "", str(os.getpid())]).encode()
try:
    sock.send(len(payload).to_bytes(4, "big") + payload)
except OSError:
    pass
print("sent", flush=True)
sys.stdin.readline()
"""


@pytest.mark.timeout(120)
def test_tracker_refuses_connections_of_another_user(state: str) -> None:
    """Another user who connects to a tracker (its address is public) and
    registers a segment of the tracker's user gets it destroyed by nobody."""
    require_root()
    victim = mpshm.SharedMemory(create=True, size=4096, track=False)
    identity = mpshm.backends.get("posix").identity(victim._ident)
    program = other = None
    try:
        program = popen_script(
            """
            import os, sys, mpshm
            shm = mpshm.SharedMemory(create=True, size=4096)
            print(os.environ["MPSHM_TRACKER"], flush=True)
            sys.stdin.readline()
            """,
            env={"MPSHM_STATE_DIR": state},
        )
        address = _line(program)
        other = _as_other(CONNECTOR, address, victim._ident, str(identity))
        assert _line(other) == "sent"
        _say(program)
        program.wait(30)
        wait_until(lambda: not _journals(state), CLEANUP_LIMIT)  # the tracker is done
        assert exists(victim.name)
    finally:
        finish(program, other)
        victim.close()
        victim.unlink()


# --------------------------------------------------------------------------
# Scenario 6: a replacement takes over the dead tracker's journal

WORKER = '''
import mpshm


def make(args):
    """Create tracked segments and leave them (the process then exits)."""
    backend, count = args
    names = []
    for _ in range(count):
        shm = mpshm.SharedMemory(create=True, size=4096, backend=backend)
        names.append(shm.name)
        shm.close()
    return names
'''


@pytest.mark.timeout(180)
@pytest.mark.parametrize(("backend", "method", "trigger"), [
    *[(backend, method, "create") for backend in ("posix", "sysv", "mmap")
      for method in ("fork", "spawn")],
    ("posix", "fork", "unlink"),
])
def test_replacement_takes_over_what_exited_processes_made(
    tmp_path: Path, state: str, backend: str, method: str, trigger: str
) -> None:
    """Pool workers create tracked segments and exit; the tracker is then
    killed; the program's next tracked creation (or unlink) starts a
    replacement, which takes over the dead tracker's journal. When the
    program ends, every segment is destroyed, the exited workers' included,
    and no journal is left."""
    (tmp_path / "adopt_worker.py").write_text(WORKER)
    program = popen_script(
        f"""
        import json, multiprocessing as mp, sys
        sys.path.insert(0, {str(tmp_path)!r})
        import mpshm, adopt_worker
        from mpshm import tracking

        if __name__ == "__main__":
            first = mpshm.SharedMemory(create=True, size=4096, backend={backend!r})
            pool = mp.get_context({method!r}).Pool(2, maxtasksperchild=1)
            made = [n for names in pool.map(adopt_worker.make, [({backend!r}, 25)] * 4)
                    for n in names]
            pool.close()
            pool.join()  # every worker has exited
            print(tracking.tracker_pid(), flush=True)
            sys.stdin.readline()  # the tracker is dead
            if {trigger!r} == "create":
                last = mpshm.SharedMemory(create=True, size=4096, backend={backend!r})
                made += [first.name, last.name]
            else:
                first.unlink()
            print(json.dumps({{"tracker": tracking.tracker_pid(), "names": made}}), flush=True)
            sys.stdin.readline()
        """,
        env={"MPSHM_STATE_DIR": state},
    )
    names: list[str] = []
    try:
        tracker = int(_line(program, 120))
        time.sleep(0.5)  # journaled, identities checked again (see _tracker._verify)
        _kill_dead(tracker)
        _say(program)
        report = json.loads(_line(program))
        names = report["names"]
        assert report["tracker"] not in (None, tracker)  # a replacement started
        assert len(names) == 100 + (2 if trigger == "create" else 0)
        assert all(exists(n) for n in names)
        _say(program)
        program.wait(30)
        took = wait_until(lambda: not any(exists(n) for n in names), CLEANUP_LIMIT)
        print(f"replacement cleanup of {len(names)} segments ({backend}, {method}): {took:.3f} s")
        wait_until(lambda: not _journals(state), CLEANUP_LIMIT)
    finally:
        finish(program)
        _remove(names)


def _dead_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


@pytest.mark.timeout(60)
def test_takeover_only_of_a_dead_trackers_journal_by_exact_address(
    state: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Which journals a replacement takes over, and what it destroys of
    them: only the journal of the dead tracker it replaces (its address
    exactly, its pid dead), and of that only entries with their identity."""
    monkeypatch.setenv("MPSHM_STATE_DIR", state)
    address = f"mpshm-tracker-test-{unique()}"
    posix = mpshm.backends.get("posix")
    segments = {
        label: mpshm.SharedMemory(create=True, size=4096, track=False)
        for label in ("proven", "unproven", "near", "living")
    }
    sleeper = subprocess.Popen(["sleep", "60"])
    pair = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    tracker: Optional[_tracker.Tracker] = None
    try:
        def journal(addr: str, pid: int, entries: dict[str, Optional[str]]) -> str:
            # (started now: the sleeper started before, so it is that tracker)
            writer = _journal.Writer({"pid": pid, "t": time.time(), "address": addr,
                                      "starter": None, "parent": None})
            for label, identity in entries.items():
                shm = segments[label]
                writer.put(("posix", shm._ident), {"op": "reg", "id": identity, "pid": pid,
                                                   "t": time.time() - 5})
            writer.flush({})
            writer.close(remove=False)
            return writer.path

        ident = {label: posix.identity(shm._ident) for label, shm in segments.items()}
        dead = journal(address, _dead_pid(), {"proven": ident["proven"], "unproven": None})
        near = journal(address + "0", _dead_pid(), {"near": ident["near"]})
        living = journal(address, sleeper.pid, {"living": ident["living"]})
        tracker = _tracker.Tracker(pair[0], listener, None, adopt=[address])
        taken = {key[1] for key in tracker.entries}
        assert taken == {segments["proven"]._ident, segments["unproven"]._ident}
        assert all(m["op"] == "reg" for m in tracker.entries.values())
        assert not os.path.exists(dead)  # ours holds them now
        assert os.path.exists(near) and os.path.exists(living)
        mine = _journal.read(tracker.journal.path)
        assert mine is not None and {k[1] for k in mine.entries} == taken
        assert mine.header.get("adopted") == [address]
        tracker.cleanup()
        assert not exists(segments["proven"].name)
        assert exists(segments["unproven"].name)  # no identity: never destroyed
        assert exists(segments["near"].name) and exists(segments["living"].name)
        for path in (near, living):
            os.unlink(path)
    finally:
        if tracker is not None:
            tracker.journal.close(remove=True)
        finish(sleeper)  # type: ignore[arg-type]
        for sock in (*pair, listener):
            sock.close()
        for shm in segments.values():
            shm.close()
            if exists(shm.name):
                shm.unlink()


# --------------------------------------------------------------------------
# Scenario 8: a stalled tracker


@pytest.mark.timeout(120)
def test_stopped_tracker_costs_about_a_second_and_one_warning(state: str) -> None:
    """With the tracker stopped, 3000 tracked creations and unlinks finish
    in bounded time with exactly one RuntimeWarning naming the tracker; once
    it runs again the program ends and nothing is left."""
    program = popen_script(
        """
        import json, sys, time, warnings, mpshm
        from mpshm import tracking

        keep = mpshm.SharedMemory(create=True, size=4096)
        print(keep.name, tracking.tracker_pid(), flush=True)
        sys.stdin.readline()  # the tracker is stopped
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            began = time.monotonic()
            for _ in range(3000):
                shm = mpshm.SharedMemory(create=True, size=4096)
                shm.close()
                shm.unlink()
            took = time.monotonic() - began
        print(json.dumps({"took": took, "warnings": [
            [w.category.__name__, str(w.message)] for w in caught]}), flush=True)
        sys.stdin.readline()  # the tracker runs again
        """,
        env={"MPSHM_STATE_DIR": state},
    )
    tracker: Optional[int] = None
    name = ""
    try:
        name, pid = _line(program).split()
        tracker = int(pid)
        os.kill(tracker, signal.SIGSTOP)
        _say(program)
        report = json.loads(_line(program, 60))
        print(f"3000 creations with the tracker stopped: {report['took']:.2f} s")
        assert report["took"] < 10
        assert len(report["warnings"]) == 1, report["warnings"]
        category, message = report["warnings"][0]
        assert category == "RuntimeWarning" and f"pid {tracker}" in message
        _resume(tracker)
        _say(program)
        program.wait(30)
        wait_until(lambda: not exists(name), CLEANUP_LIMIT)
        wait_until(lambda: not _journals(state), CLEANUP_LIMIT)
    finally:
        _resume(tracker)
        finish(program)
        _remove([name] if name else [])


@pytest.mark.timeout(120)
@pytest.mark.parametrize("then", ["resumed", "killed"])
def test_program_that_ends_while_its_tracker_is_stopped_leaks_nothing(
    tmp_path: Path, state: str, then: str
) -> None:
    """The program creates segments while its tracker is stopped and ends
    before the tracker reads them: it still ends at once, and what it could
    not send is delivered by a helper once the tracker runs again, or, if
    the stopped tracker is killed instead, to the replacement the helper
    starts (which takes over the dead tracker's journal)."""
    listing = tmp_path / "names.txt"
    program = popen_script(
        f"""
        import sys, mpshm
        from mpshm import tracking

        made = [mpshm.SharedMemory(create=True, size=4096)]
        with open({str(listing)!r}, "w") as f:
            f.write(made[0].name + "\\n")
            f.flush()
            print(tracking.tracker_pid(), flush=True)
            sys.stdin.readline()  # the tracker is stopped
            for _ in range(1000):
                made.append(mpshm.SharedMemory(create=True, size=4096))
                f.write(made[-1].name + "\\n")
                f.flush()
        """,
        env={"MPSHM_STATE_DIR": state},
    )
    tracker: Optional[int] = None
    try:
        tracker = int(_line(program))
        os.kill(tracker, signal.SIGSTOP)
        _say(program)
        program.wait(30)  # bounded: about a second of waiting, then a hand-off
        stderr = program.stderr.read()  # type: ignore[union-attr]
        assert program.returncode == 0, stderr
        assert stderr.count("RuntimeWarning") == 1, stderr
        names = listing.read_text().split()
        assert len(names) == 1001 and all(exists(n) for n in names)
        if then == "resumed":
            _resume(tracker)
        else:
            _kill_dead(tracker)
        # (killed: the helper and then the replacement it starts are two
        # interpreters to start before anything is destroyed)
        limit = CLEANUP_LIMIT * (1 if then == "resumed" else 3)
        took = wait_until(lambda: not any(exists(n) for n in names), limit)
        print(f"cleanup after the program ended with its tracker stopped, {then}: {took:.3f} s")
        wait_until(lambda: not _journals(state), CLEANUP_LIMIT)
    finally:
        _resume(tracker)
        finish(program)
        if listing.exists():
            _remove(listing.read_text().split())


@pytest.mark.timeout(60)
def test_client_queues_in_order_and_forgets_what_was_never_sent(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The client's queue, against a "tracker" that reads nothing (a socket
    pair): sends stop blocking after the stall budget, with one warning; a
    segment registered and unregistered while queued is never mentioned;
    once the tracker reads, it gets everything else, in order."""
    monkeypatch.setattr(tracking, "_STALL_BUDGET", 0.3)
    posix = mpshm.backends.get("posix")
    client = tracking._Client()
    ours, tracker_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    client._use(ours, "test", 4242)
    idents = [unique("psm") for _ in range(1500)]
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            began = time.monotonic()
            for ident in idents:
                assert client.register(posix, ident, None)
            for ident in idents[1000:1250]:  # queued, never sent: forgotten
                client.unregister("posix", ident)
            took = time.monotonic() - began
        assert took < 0.3 + 2.0
        assert [w.category for w in caught] == [RuntimeWarning]
        assert "pid 4242" in str(caught[0].message)
        assert len(client._pending) == 1500 - 250 - _sent(client, idents)
        received: list[_protocol.Message] = []
        decoder = _protocol.Decoder()
        deadline = time.monotonic() + 30
        while client._pending or _readable(tracker_end):
            assert time.monotonic() < deadline
            while _readable(tracker_end):
                received += decoder.feed(tracker_end.recv(1 << 16))
            with client._lock:
                client._drain(start=False)
        assert [(m.op, m.ident) for m in received] == (
            [("reg", i) for i in idents[:1000] + idents[1250:]])
        assert not client._unsent and client._budget == client._patience == 0.3
    finally:
        client.close(deliver=False)
        tracker_end.close()


def _sent(client: tracking._Client, idents: list[str]) -> int:
    """How many of *idents* were sent (the rest are queued or forgotten)."""
    queued = {key[1] for _, key, _ in client._pending.values() if key is not None}
    return sum(1 for i in idents[:1000] + idents[1250:] if i not in queued)


def _readable(sock: socket.socket) -> bool:
    return bool(select.select([sock], [], [], 0)[0])
