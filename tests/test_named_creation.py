"""Creating under a user's name (issue 16, case 6): an unnamed file (O_TMPFILE)
registered with its identity and then linked to the name, at one message to
the tracker; the sibling-and-link way where that cannot be done. Either way a
kill at any moment leaves nothing, and a name that is taken is never touched."""

from __future__ import annotations

import os
import sys

import pytest
from helpers import run_script, unique, wait_until

import mpshm
from mpshm import backends, tracking
from mpshm.backends import _files

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux") or not os.path.isdir("/dev/shm"),
    reason="files in /dev/shm",
)


def _shm_files() -> set[str]:
    return set(os.listdir("/dev/shm"))


@pytest.fixture
def mmap_dir(tmp_path):
    return {"dir": str(tmp_path)}


@pytest.mark.parametrize("backend", ["posix", "mmap"])
def test_named_creation_is_registered_with_its_identity(backend, mmap_dir):
    options = mmap_dir if backend == "mmap" else {}
    chosen = backends.get(backend)
    name = unique("named")
    shm = mpshm.SharedMemory(name, create=True, size=16, backend=backend, **options)
    try:
        ident = chosen.parse(name, options)
        assert (backend, ident) in tracking.tracked()
        assert shm._attachment.identity == chosen.identity(ident)
        shm.buf[:5] = b"hello"
        other = mpshm.SharedMemory(shm.name, backend=backend, **options)
        assert bytes(other.buf[:5]) == b"hello"
        other.close()
        with pytest.raises(FileExistsError):
            mpshm.SharedMemory(name, create=True, size=16, backend=backend, **options)
        assert bytes(shm.buf[:5]) == b"hello"
    finally:
        shm.close()
        shm.unlink()
    assert (backend, ident) not in tracking.tracked()


def test_without_unnamed_files_the_sibling_way_still_works(monkeypatch):
    monkeypatch.setattr(_files, "_TMPFILE", False)
    before = _shm_files()
    name = unique("named")
    shm = mpshm.SharedMemory(name, create=True, size=16)
    try:
        assert ("posix", name) in tracking.tracked()
        assert _shm_files() - before == {name}  # the sibling is gone
    finally:
        shm.close()
        shm.unlink()


def test_a_link_that_cannot_be_made_falls_back_and_leaves_nothing(monkeypatch):
    def refuse(self):
        raise NotImplementedError("no /proc here")

    monkeypatch.setattr(_files.UnnamedFile, "name", refuse)
    before = _shm_files()
    name = unique("named")
    shm = mpshm.SharedMemory(name, create=True, size=16)
    try:
        assert _shm_files() - before == {name}
        assert shm._attachment.identity == backends.get("posix").identity(name)
    finally:
        shm.close()
        shm.unlink()
    assert _shm_files() - before == set()


def test_a_race_for_the_name_leaves_the_winner_alone(monkeypatch):
    name = unique("named")
    winner = mpshm.SharedMemory(name, create=True, size=32, track=False)
    try:
        winner.buf[:3] = b"won"
        identity = backends.get("posix").identity(name)
        # As if the name was taken between the check and the link.
        monkeypatch.setattr(type(backends.get("posix")), "exists", lambda self, ident: False)
        before = _shm_files()
        with pytest.raises(FileExistsError):
            mpshm.SharedMemory(name, create=True, size=16)
        assert _shm_files() == before
        assert backends.get("posix").identity(name) == identity
        assert bytes(winner.buf[:3]) == b"won"
        assert ("posix", name) not in tracking.tracked()
    finally:
        winner.close()
        winner.unlink()


def test_a_kill_before_the_link_leaves_nothing():
    """Killed once the name is registered and before it exists: the unnamed
    file dies with the process, and the tracker finds nothing to destroy."""
    name = unique("named")
    before = _shm_files()
    result = run_script(f"""
        import os, signal
        import mpshm
        from mpshm.backends import _files
        def die(self):
            os.kill(os.getpid(), signal.SIGKILL)
        _files.UnnamedFile.name = die
        mpshm.SharedMemory({name!r}, create=True, size=1 << 20)
    """)
    assert result.returncode == -9, result.stderr
    assert name not in _shm_files()
    assert _shm_files() - before <= {f for f in _shm_files() if f.startswith("sem.")}


def test_a_kill_after_the_link_is_cleaned_up_by_the_tracker():
    name = unique("named")
    result = run_script(f"""
        import os, signal
        import mpshm
        from mpshm.backends import _files
        link = _files.UnnamedFile.name
        def link_then_die(self):
            link(self)
            os.kill(os.getpid(), signal.SIGKILL)
        _files.UnnamedFile.name = link_then_die
        mpshm.SharedMemory({name!r}, create=True, size=16)
    """)
    assert result.returncode == -9, result.stderr
    wait_until(lambda: name not in _shm_files(), 20)
