"""track=True: segments nobody unlinked are destroyed once their program is over.

Each test runs a separate program (a fresh interpreter, with a tracker of its
own) and watches its segments from outside, including after SIGKILL.
"""

from __future__ import annotations

import os
import signal
import time

import pytest
from helpers import exists, popen_script, run_script, unique, wait_until

import mpshm

CLEANUP_LIMIT = 5.0  # seconds a tracker may take once the program is over


def _read_line(proc) -> str:
    line = proc.stdout.readline().strip()
    if not line:
        proc.kill()
        raise AssertionError(f"program said nothing; stderr: {proc.stderr.read()}")
    return line


def _finish(proc) -> None:
    if proc.poll() is None:
        proc.kill()
    proc.wait(10)
    proc.stdout.close()
    proc.stderr.close()


def test_normal_exit_destroys_without_a_word(backend):
    result = run_script(
        f"""
        import mpshm
        shm = mpshm.SharedMemory(create=True, size=1 << 20, backend={backend!r})
        shm.buf[:2] = b"hi"
        named = mpshm.SharedMemory({unique()!r}, create=True, size=10, backend={backend!r})
        print(shm.name)
        print(named.name)
        """
    )
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""  # no resource-tracker style warnings
    for name in result.stdout.split():
        wait_until(lambda name=name: not exists(name), CLEANUP_LIMIT)


def test_untracked_segment_survives_its_program(backend):
    result = run_script(
        f"""
        import mpshm
        shm = mpshm.SharedMemory(create=True, size=4096, backend={backend!r}, track=False)
        shm.buf[:5] = b"keep!"
        print(shm.name)
        """
    )
    assert result.returncode == 0 and result.stderr == ""
    name = result.stdout.strip()
    time.sleep(0.5)
    try:
        shm = mpshm.SharedMemory(name)
        assert bytes(shm.buf[:5]) == b"keep!"
        shm.close()
    finally:
        mpshm.SharedMemory(name).unlink()


def test_unlinked_segment_is_not_touched_again(backend):
    """A name unlinked and reused by someone else is left alone by the tracker."""
    name = unique("reused")
    qualified = name if backend == "posix" else f"{backend}:{name}"
    proc = popen_script(
        f"""
        import sys, mpshm
        shm = mpshm.SharedMemory({qualified!r}, create=True, size=64)
        print(shm.name)
        import time; time.sleep(60)
        """
    )
    try:
        assert _read_line(proc) == qualified
        old = mpshm.SharedMemory(qualified)
        old.unlink()  # from outside the program
        old.close()
        new = mpshm.SharedMemory(qualified, create=True, size=128, track=False)
        try:
            proc.send_signal(signal.SIGKILL)
            proc.wait(10)
            time.sleep(1.0)  # the tracker has run by now
            assert exists(qualified)
            assert mpshm.SharedMemory(qualified).size == 128
        finally:
            new.close()
            new.unlink()
    finally:
        _finish(proc)


def test_sigkill_of_the_program_destroys(backend):
    proc = popen_script(
        f"""
        import time, mpshm
        segments = [mpshm.SharedMemory(create=True, size=1 << 16, backend={backend!r})
                    for _ in range(3)]
        for shm in segments:
            print(shm.name)
        time.sleep(120)
        """
    )
    try:
        names = [_read_line(proc) for _ in range(3)]
        assert all(exists(name) for name in names)
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        took = wait_until(lambda: not any(exists(n) for n in names), CLEANUP_LIMIT)
        print(f"cleanup after SIGKILL ({backend}): {took:.3f} s")
    finally:
        _finish(proc)


@pytest.mark.parametrize("method", ["fork", "spawn", "forkserver"])
def test_program_is_over_only_when_its_children_are(backend, method):
    """SIGKILL of the main process: the segment lives on while a child uses it."""
    proc = popen_script(
        f"""
        import multiprocessing as mp, os, sys, time
        import mpshm, helpers

        if __name__ == "__main__":
            ctx = mp.get_context({method!r})
            shm = mpshm.SharedMemory(create=True, size=4096, backend={backend!r})
            ready = ctx.Event()
            p = ctx.Process(target=helpers.hold_segment, args=(shm.name, ready))
            p.start()
            ready.wait(60)
            print(shm.name)
            print(p.pid)
            time.sleep(120)
        """
    )
    try:
        name = _read_line(proc)
        child_pid = int(_read_line(proc))
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        time.sleep(1.0)
        assert exists(name), "destroyed while a child of the program still runs"
        os.kill(child_pid, signal.SIGKILL)
        took = wait_until(lambda: not exists(name), CLEANUP_LIMIT)
        print(f"cleanup after the last child ({backend}, {method}): {took:.3f} s")
    finally:
        _finish(proc)
        try:
            os.kill(child_pid, signal.SIGKILL)
        except (ProcessLookupError, UnboundLocalError):
            pass


@pytest.mark.parametrize("method", ["fork", "spawn", "forkserver"])
def test_segments_created_in_children_are_destroyed_with_the_program(backend, method):
    result = run_script(
        f"""
        import multiprocessing as mp
        import helpers

        if __name__ == "__main__":
            ctx = mp.get_context({method!r})
            queue = ctx.Queue()
            procs = [ctx.Process(target=helpers.child_create,
                                 args=({backend!r}, 4096, True, queue)) for _ in range(2)]
            for p in procs:
                p.start()
            names = [queue.get(timeout=60) for _ in procs]
            for p in procs:
                p.join(60)
            import mpshm
            for name in names:  # still there: the program is not over
                mpshm.SharedMemory(name).close()
                print(name)
        """
    )
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    for name in result.stdout.split():
        wait_until(lambda name=name: not exists(name), CLEANUP_LIMIT)


def test_attach_only_program_never_destroys(make_shm):
    shm = make_shm(size=64)
    result = run_script(
        f"""
        import mpshm
        shm = mpshm.SharedMemory({shm.name!r}, track=True)
        shm.buf[0] = 1
        """
    )
    assert result.returncode == 0 and result.stderr == ""
    time.sleep(0.5)
    assert exists(shm.name) and shm.buf[0] == 1


def test_killed_tracker_is_replaced(backend):
    proc = popen_script(
        f"""
        import os, signal, sys, time, mpshm
        from mpshm import tracking
        first = mpshm.SharedMemory(create=True, size=64, backend={backend!r})
        print(first.name)
        print(tracking.tracker_pid())
        time.sleep(0.5)
        second = mpshm.SharedMemory(create=True, size=64, backend={backend!r})
        print(second.name)
        time.sleep(120)
        """
    )
    try:
        first = _read_line(proc)
        tracker = int(_read_line(proc))
        os.kill(tracker, signal.SIGKILL)
        second = _read_line(proc)
        assert exists(first) and exists(second)
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        wait_until(lambda: not exists(first) and not exists(second), CLEANUP_LIMIT)
    finally:
        _finish(proc)


def test_sigint_in_the_program_still_cleans_up(backend):
    proc = popen_script(
        f"""
        import time, mpshm
        shm = mpshm.SharedMemory(create=True, size=64, backend={backend!r})
        print(shm.name)
        time.sleep(120)
        """
    )
    try:
        name = _read_line(proc)
        proc.send_signal(signal.SIGINT)
        proc.wait(10)
        assert "KeyboardInterrupt" in proc.stderr.read()
        wait_until(lambda: not exists(name), CLEANUP_LIMIT)
    finally:
        _finish(proc)


def test_third_party_backend_segments_are_destroyed_too(tmp_path):
    """The tracker loads a backend the way the program had it (path and spec)."""
    (tmp_path / "thirdparty_backend.py").write_text(
        "from mpshm.backends.posix import PosixBackend\n"
        "class Custom(PosixBackend):\n"
        "    name = 'custom'\n"
        "    def qualified(self, ident):\n"
        "        return 'custom:' + ident\n"
    )
    proc = popen_script(
        f"""
        import sys, time
        sys.path.insert(0, {str(tmp_path)!r})
        from mpshm import backends, SharedMemory
        backends.register("custom", "thirdparty_backend:Custom")
        shm = SharedMemory(create=True, size=64, backend="custom")
        named = SharedMemory("custom:" + {unique("own")!r}, create=True, size=64)
        print(shm.name)
        print(named.name)
        time.sleep(120)
        """
    )
    try:
        name = _read_line(proc)
        assert name.startswith("custom:psm_")
        posix_names = [name.split(":", 1)[1], _read_line(proc).split(":", 1)[1]]
        assert all(exists(n) for n in posix_names)
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        wait_until(lambda: not any(exists(n) for n in posix_names), CLEANUP_LIMIT)
    finally:
        _finish(proc)


@pytest.mark.parametrize("method", ["fork", "spawn", "forkserver"])
def test_concurrent_creators_then_whole_group_killed(backend, method):
    """Four processes register and unregister at once (forked ones share the
    tracker's socket); SIGKILL of the whole process group leaves nothing."""
    proc = popen_script(
        f"""
        import multiprocessing as mp, time
        import helpers, mpshm

        if __name__ == "__main__":
            ctx = mp.get_context({method!r})
            mpshm.SharedMemory(create=True, size=64, backend={backend!r})  # tracker first
            procs = [ctx.Process(target=helpers.churn, args=({backend!r}, 60))
                     for _ in range(4)]
            for p in procs:
                p.start()
            for p in procs:
                p.join(60)
            print("DONE", flush=True)
            time.sleep(120)
        """,
        new_group=True,
    )
    try:
        names = []
        while True:
            line = _read_line(proc)
            if line == "DONE":
                break
            names.append(line)
        assert len(names) == 4 * 30
        assert all(exists(name) for name in names)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)
        took = wait_until(lambda: not any(exists(n) for n in names), CLEANUP_LIMIT)
        print(f"group kill, {len(names)} segments ({backend}, {method}): {took:.3f} s")
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        _finish(proc)


def test_tracker_that_cannot_start_is_a_warning_not_a_failure(backend):
    result = run_script(
        f"""
        import warnings, mpshm
        from mpshm import tracking

        def broken(*args, **kwargs):
            raise FileNotFoundError(2, "No such file or directory", "/bin/sh")

        tracking.subprocess.run = broken
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            shm = mpshm.SharedMemory(create=True, size=64, backend={backend!r})
        shm.buf[0] = 1
        print(len(caught), caught[0].category.__name__, str(caught[0].message))
        shm.close()
        shm.unlink()
        """
    )
    assert result.returncode == 0, result.stderr
    count, category, message = result.stdout.split(" ", 2)
    assert (count, category) == ("1", "RuntimeWarning")
    assert "tracker" in message and "not be destroyed automatically" in message


def test_scope_destroys_its_segments_when_closed(backend):
    """A Scope's registrations end with its connection, not with the program:
    closing it destroys what it still holds (and only that) while this
    program goes on."""
    from mpshm import tracking

    scope = tracking.Scope()
    held = mpshm.SharedMemory(create=True, size=4096, backend=backend, track=False)
    handed_on = mpshm.SharedMemory(create=True, size=4096, backend=backend, track=False)
    try:
        for shm in (held, handed_on):
            scope.register(shm._backend, shm._ident, shm._attachment.identity)
        scope.unregister(handed_on.backend, handed_on._ident)
        time.sleep(0.1)  # both still exist while the scope is open
        assert exists(held.name) and exists(handed_on.name)
        scope.close()
        took = wait_until(lambda: not exists(held.name), CLEANUP_LIMIT)
        print(f"scope cleanup ({backend}): {took * 1000:.1f} ms")
        assert exists(handed_on.name)
    finally:
        held.close()
        handed_on.close()
        handed_on.unlink()
        if exists(held.name):
            held.unlink()


def _message(op, ident, identity=None, extra=None):
    from mpshm.tracking import protocol as _protocol

    return _protocol.Decoder().feed(_protocol.encode(op, "posix", ident, identity, extra))


def test_tracker_bookkeeping_of_scopes_joins_and_late_messages(tmp_path, monkeypatch):
    """The tracker's rules, message by message (messages of different
    connections may be read in any order)."""
    import socket

    from mpshm.tracking import server as _tracker

    monkeypatch.setenv("MPSHM_STATE_DIR", str(tmp_path))

    pairs = [socket.socketpair() for _ in range(3)]
    owner, worker, parent = (a for a, _ in pairs)
    listener = socket.socket(socket.AF_UNIX)
    tracker = _tracker.Tracker(owner, listener, None)
    destroyed = []
    tracker.destroy = lambda key, msg: destroyed.append(key[1])  # type: ignore[method-assign]
    try:
        tracker.handle(_message("join", "early", extra={"s": "T"}), worker)  # before the scope
        tracker.handle(_message("scope", "T"), owner)
        tracker.handle(_message("join", "kept", extra={"s": "T"}), worker)
        tracker.handle(_message("join", "taken", extra={"s": "T"}), worker)
        tracker.handle(_message("unreg", "taken"), parent)  # the parent took it over
        tracker.handle(_message("join", "taken", "id", {"s": "T"}), worker)  # late: stale
        tracker.handle(_message("unreg", "raced"), parent)  # read before its join
        tracker.handle(_message("join", "raced", extra={"s": "T"}), worker)
        tracker.handle(_message("unreg", "mine"), parent)  # a user's name, unlinked...
        tracker.handle(_message("reg", "mine"), parent)  # ...and made again: tracked
        assert set(tracker.entries) == {("posix", "early"), ("posix", "kept"),
                                        ("posix", "mine")}
        tracker.closed(worker)  # a worker's end destroys nothing of the scope's
        assert destroyed == []
        tracker.closed(owner)  # the scope's end destroys what it owns
        assert sorted(destroyed) == ["early", "kept"]
        assert set(tracker.entries) == {("posix", "mine")} and not tracker.scopes
    finally:
        tracker.journal.close(remove=True)
        for a, b in pairs:
            a.close()
            b.close()
        listener.close()


def test_tracker_journals_existing_segments_with_their_identity(tmp_path, monkeypatch):
    """The journal (read by ``mpshm gc``) holds what the tracker holds, with
    the storage identity and the registering pid; a segment already gone when
    its registration is read is not journaled (a later one of its name is not
    the program's)."""
    import socket

    from mpshm.backends import get
    from mpshm.tracking import journal as _journal
    from mpshm.tracking import protocol as _protocol
    from mpshm.tracking import server as _tracker

    monkeypatch.setenv("MPSHM_STATE_DIR", str(tmp_path))
    owner, peer = socket.socketpair()
    listener = socket.socket(socket.AF_UNIX)
    tracker = _tracker.Tracker(owner, listener, None)
    real = mpshm.SharedMemory(create=True, size=4096, track=False)
    gone = unique("psm")
    try:
        for ident in (real.name, gone):
            tracker.handle(_protocol.Decoder().feed(
                _protocol.encode("reg", "posix", ident, None)), owner)
        tracker.journal.flush(tracker.entries)
        journal = _journal.read(tracker.journal.path)
        assert journal is not None
        assert journal.header["pid"] == os.getpid()
        assert journal.header["starter"] == os.getpid()  # who made the socket pair
        assert set(journal.entries) == {("posix", real.name)}
        entry = journal.entries[("posix", real.name)]
        assert entry["id"] == get("posix").identity(real.name)
        assert entry["pid"] == os.getpid() and entry["op"] == "reg"
        tracker.handle(_protocol.Decoder().feed(
            _protocol.encode("unreg", "posix", real.name, None)), owner)
        tracker.journal.flush(tracker.entries)
        journal = _journal.read(tracker.journal.path)
        assert journal is not None and journal.entries == {}
    finally:
        tracker.journal.close(remove=True)
        assert not os.path.exists(tracker.journal.path)
        real.close()
        real.unlink()
        for sock in (owner, peer, listener):
            sock.close()


def test_tracker_reads_what_came_before_a_scope_ended(tmp_path, monkeypatch):
    """A worker's join for a scope, sent on a connection not even accepted
    yet, is read before the scope's end is applied (else the segment would
    outlive the scope)."""
    import selectors
    import socket

    from mpshm.tracking import protocol as _protocol
    from mpshm.tracking import server as _tracker

    monkeypatch.setenv("MPSHM_STATE_DIR", str(tmp_path))
    owner_end, owner = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    listener.bind(f"\0mpshm-test-{os.urandom(8).hex()}")
    listener.listen(8)
    worker = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    tracker = _tracker.Tracker(owner, listener, None)
    destroyed = []
    tracker.destroy = lambda key, msg: destroyed.append(key[1])  # type: ignore[method-assign]
    with selectors.DefaultSelector() as selector:
        selector.register(listener, selectors.EVENT_READ)
        selector.register(owner, selectors.EVENT_READ)
        try:
            owner_end.send(_protocol.encode("scope", "", "T", None))
            tracker._receive(selector, owner)
            worker.connect(listener.getsockname())
            worker.send(_protocol.encode("join", "posix", "result", None, {"s": "T"}))
            owner_end.close()  # the pool ends
            tracker._receive(selector, owner)  # end of file: noted, not yet applied
            assert destroyed == [] and tracker.ended == [owner]
            tracker._settle(selector)
            assert destroyed == ["result"] and not tracker.ended
        finally:
            tracker.journal.close(remove=True)
            worker.close()
            listener.close()
            for conn in list(tracker.conns):
                conn.close()
