"""Every script in examples/ runs cleanly and leaves no segment behind.

Each example runs as a program of its own. It must exit 0 with nothing on
stderr, and every segment name it printed must be gone when it returns
(checked at once, before any tracker could clean up after it: the examples
unlink what they create). A new example is picked up automatically; it
must print the names of the segments it creates. Examples that take a
``--backend`` option (listed in BACKEND_EXAMPLES) also run on the other
built-in backends. The C example (c_interop.py) builds examples/c_reader/reader.c
with the system compiler: a machine without one fails, it does not skip.
"""

from __future__ import annotations

import glob
import os
import re
import shutil
import subprocess
import sys

import pytest
from helpers import ROOT, exists

EXAMPLES = sorted(glob.glob(os.path.join(ROOT, "examples", "*.py")))
BACKEND_EXAMPLES = [
    os.path.join(ROOT, "examples", name) for name in ("executor_tiles.py", "pool_numpy.py")
]

# Segment names as the examples print them: generated POSIX names (mpshm's
# psm_<16 hex>, the standard library's psm_<8 hex>), and qualified names.
NAME = re.compile(
    r"(?<![\w:])psm_[0-9a-f]+\b"
    r"|\b(?:posix|sysv):[\w.+-]+"
    r"|\bmmap:/[^\s'\"),]+"
)


def printed_names(output: str) -> set[str]:
    """The segment names in *output*, qualified so they mean the same anywhere."""
    names = set()
    for match in NAME.finditer(output):
        name = match.group(0)
        names.add(name if ":" in name else f"posix:{name}")
    return names


def test_examples_found() -> None:
    assert EXAMPLES, "no examples/*.py found"


def test_c_example_runs_here() -> None:
    """c_interop.py is among the examples run, and this machine can build its C reader."""
    assert os.path.join(ROOT, "examples", "c_interop.py") in EXAMPLES
    assert os.path.isfile(os.path.join(ROOT, "examples", "c_reader", "reader.c"))
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    assert compiler, "no C compiler (cc or gcc): examples/c_interop.py needs one"


@pytest.mark.parametrize("path", EXAMPLES, ids=[os.path.basename(p) for p in EXAMPLES])
def test_example(path: str) -> None:
    check_example(path)


@pytest.mark.parametrize("backend", ["sysv", "mmap"])
@pytest.mark.parametrize(
    "path", BACKEND_EXAMPLES, ids=[os.path.basename(p) for p in BACKEND_EXAMPLES]
)
def test_example_on_backend(path: str, backend: str) -> None:
    check_example(path, "--backend", backend)


@pytest.mark.parametrize("storage", ["sysv", "mmap"])
def test_joblib_example_on_storage(storage: str) -> None:
    check_example(os.path.join(ROOT, "examples", "joblib_backend.py"), "--storage", storage)


@pytest.mark.parametrize("storage", ["posix", "sysv", "mmap"])
def test_dask_example_on_storage(storage: str) -> None:
    pytest.importorskip("distributed", reason="pip install 'mpshm[dask]'")
    check_example(os.path.join(ROOT, "examples", "dask_cluster.py"), "--storage", storage)


def check_example(path: str, *args: str) -> None:
    """Run the example *path* with *args*; it must succeed, quietly, leaving nothing."""
    env = dict(os.environ)
    env.pop("MPSHM_TRACKER", None)  # a program of its own, with its own tracker
    env.pop("MPSHM_BACKEND", None)  # the examples show the default (posix)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (ROOT, env.get("PYTHONPATH")) if p)
    result = subprocess.run(
        [sys.executable, path, *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, f"exit code {result.returncode}\n{result.stderr}"
    assert result.stderr == "", f"unexpected stderr:\n{result.stderr}"

    names = printed_names(result.stdout)
    assert names, f"the example printed no segment name:\n{result.stdout}"
    left = sorted(name for name in names if exists(name))
    assert not left, f"segment(s) left behind: {left}"
