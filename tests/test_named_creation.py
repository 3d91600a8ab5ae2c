"""Creating under a user's name (issue 16, case 6): an unnamed file (O_TMPFILE)
registered with its identity and then linked to the name, at one message to
the tracker; the sibling-and-link way where that cannot be done. Either way a
kill at any moment leaves nothing, and a name that is taken is never touched."""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
import textwrap

import pytest
from helpers import ROOT, run_script, unique, wait_until

import mpshm
from mpshm import backends, tracking
from mpshm.backends import _files

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux") or not os.path.isdir("/dev/shm"),
    reason="files in /dev/shm",
)


def _shm_files() -> set[str]:
    return set(os.listdir("/dev/shm"))


PRIVATE_SHM = (
    "mount -t tmpfs -o size=64m,mode=1777 tmpfs /dev/shm && "
    "mkdir -m 0700 /dev/shm/state && "
    'exec "$0" -c "$1"'
)

LEFT = """
import os, sys, time
def left():
    return sorted(n for n in os.listdir("/dev/shm") if n != "state" and not n.startswith("sem."))
deadline = time.monotonic() + 10
while left() and time.monotonic() < deadline:
    time.sleep(0.05)
print("LEFT", left())
"""


def _left_in_private_shm(code: str) -> list[str]:
    """Run *code* in a program of its own with a private, empty /dev/shm
    (``unshare -m``: other tests' segments cannot be mistaken for its own);
    the names it leaves there (after its tracker had 10 s to act)."""
    if not shutil.which("unshare"):
        pytest.fail("util-linux unshare is needed for this test")
    env = dict(os.environ, PYTHONPATH=ROOT, MPSHM_STATE_DIR="/dev/shm/state")
    env.pop("MPSHM_TRACKER", None)
    program = textwrap.dedent(code) + textwrap.dedent(LEFT)
    user = [] if os.geteuid() == 0 else ["--map-root-user"]
    result = subprocess.run(
        ["unshare", "--mount", "--ipc", *user, "sh", "-c", PRIVATE_SHM, sys.executable, program],
        capture_output=True, text=True, timeout=60, env=env,
    )
    assert result.returncode == 0 and "LEFT" in result.stdout, result.stdout + result.stderr
    line = [ln for ln in result.stdout.splitlines() if ln.startswith("LEFT")][-1]
    return list(ast.literal_eval(line[len("LEFT "):]))


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
    name = unique("named")
    shm = mpshm.SharedMemory(name, create=True, size=16)
    try:
        assert ("posix", name) in tracking.tracked()
        assert name in _shm_files()
    finally:
        shm.close()
        shm.unlink()
    assert name not in _shm_files()
    # Nothing else made on the way (the sibling) is left either.
    assert _left_in_private_shm("""
        import os
        import mpshm
        from mpshm.backends import _files
        _files._TMPFILE = False
        shm = mpshm.SharedMemory("named", create=True, size=16)
        assert sorted(os.listdir("/dev/shm")) == ["named", "state"], os.listdir("/dev/shm")
        shm.close()
        shm.unlink()
    """) == []


def test_a_link_that_cannot_be_made_falls_back_and_leaves_nothing(monkeypatch):
    def refuse(self):
        raise NotImplementedError("no /proc here")

    monkeypatch.setattr(_files.UnnamedFile, "name", refuse)
    name = unique("named")
    shm = mpshm.SharedMemory(name, create=True, size=16)
    try:
        assert name in _shm_files()
        assert shm._attachment.identity == backends.get("posix").identity(name)
    finally:
        shm.close()
        shm.unlink()
    assert name not in _shm_files()
    assert _left_in_private_shm("""
        import os
        import mpshm
        from mpshm.backends import _files
        def refuse(self):
            raise NotImplementedError("no /proc here")
        _files.UnnamedFile.name = refuse
        shm = mpshm.SharedMemory("named", create=True, size=16)
        assert sorted(os.listdir("/dev/shm")) == ["named", "state"], os.listdir("/dev/shm")
        shm.close()
        shm.unlink()
    """) == []


def test_a_race_for_the_name_leaves_the_winner_alone(monkeypatch):
    name = unique("named")
    winner = mpshm.SharedMemory(name, create=True, size=32, track=False)
    try:
        winner.buf[:3] = b"won"
        identity = backends.get("posix").identity(name)
        # As if the name was taken between the check and the link.
        monkeypatch.setattr(type(backends.get("posix")), "exists", lambda self, ident: False)
        with pytest.raises(FileExistsError):
            mpshm.SharedMemory(name, create=True, size=16)
        assert backends.get("posix").identity(name) == identity
        assert bytes(winner.buf[:3]) == b"won"
        assert ("posix", name) not in tracking.tracked()
    finally:
        winner.close()
        winner.unlink()


def test_a_kill_before_the_link_leaves_nothing():
    """Killed once the name is registered and before it exists: the unnamed
    file dies with the process, and the tracker finds nothing to destroy."""
    victim = (
        "import os, signal\n"
        "import mpshm\n"
        "from mpshm.backends import _files\n"
        "def die(self):\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n"
        "_files.UnnamedFile.name = die\n"
        "mpshm.SharedMemory('named', create=True, size=1 << 20)\n"
    )
    assert _left_in_private_shm(f"""
        import subprocess, sys
        victim = subprocess.run([sys.executable, "-c", {victim!r}])
        assert victim.returncode == -9, victim.returncode
    """) == []


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
