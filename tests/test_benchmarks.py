"""The benchmarks run (a smoke test: their figures are read by people, not asserted)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from helpers import ROOT


def _run(script, out):
    """Run benchmarks/<script> briefly, writing JSON to *out*; return its rows."""
    env = dict(os.environ, PYTHONPATH=ROOT)
    env.pop("MPSHM_TRACKER", None)
    result = subprocess.run(
        [sys.executable, os.path.join(ROOT, "benchmarks", script), "--repeat", "1",
         "--json", str(out)],
        capture_output=True, text=True, timeout=300, env=env,
    )
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    return json.loads(out.read_text())


def test_lifecycle_benchmark_runs(tmp_path):
    rows = _run("lifecycle.py", tmp_path / "figures.json")
    assert {row["what"].split(":")[0] for row in rows} == {"posix", "sysv", "mmap"}
    assert all(row["raw_us"] > 0 and row["mpshm_ratio"] > 0 for row in rows)


def test_manager_benchmark_runs(tmp_path):
    rows = _run("manager.py", tmp_path / "figures.json")
    assert {row["manager"] for row in rows} == {"stdlib", "mpshm-posix", "mpshm-sysv",
                                                 "mpshm-mmap"}
    assert all(row["ms"] > 0 and row["ratio"] > 0 for row in rows)
