"""The suite's own leak checks fail a run that leaks (tested on a throwaway suite)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

from helpers import ROOT, exists

import mpshm

LEAKY = '''
import mpshm

def test_forgets_a_tracked_segment():
    shm = mpshm.SharedMemory(create=True, size=64, backend={backend!r})
    print("TRACKED", shm.name)

def test_leaks_an_untracked_segment():
    shm = mpshm.SharedMemory(create=True, size=64, backend={backend!r}, track=False)
    with open({record!r}, "w") as f:
        f.write(shm.name)
'''


def test_leaks_fail_the_run(tmp_path, backend):
    record = tmp_path / "leaked-name"
    (tmp_path / "test_leaky.py").write_text(
        textwrap.dedent(LEAKY.format(backend=backend, record=str(record)))
    )
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.path.join(ROOT, "tests")]))
    env.pop("MPSHM_TRACKER", None)
    env.pop("PYTEST_XDIST_WORKER", None)
    env["MPSHM_LEAKCHECK_WAIT"] = "2"
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "leakcheck", "-p", "no:cacheprovider",
         "-q", "-s", str(tmp_path / "test_leaky.py")],
        capture_output=True, text=True, timeout=120, env=env, cwd=tmp_path,
    )
    leaked = record.read_text()
    try:
        output = result.stdout + result.stderr
        assert result.returncode != 0
        # the test that forgot a tracked segment fails by itself
        assert "test_forgets_a_tracked_segment" in output
        assert "left tracked segment(s) behind" in output
        # the untracked one is caught by the session check, named
        assert "LEAKED SEGMENTS" in output
        shown = leaked.split(":", 1)[1] if backend != "posix" else leaked
        assert shown in output
    finally:
        if exists(leaked):
            mpshm.SharedMemory(leaked).unlink()
