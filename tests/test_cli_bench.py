"""``mpshm bench``: the pool benchmark from the installed package.

The runs are short (sizes of 1 and 2 MiB, ``--repeat 1``): what is checked is
that everything is measured, written and drawn, and where the output goes; the
figures themselves are read by people. Every figure is a median of at least
three rounds, and the installed command prints no development targets (those
are benchmarks/pool.py's, see test_benchmarks.py).
"""

from __future__ import annotations

import io
import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time

import pytest
from helpers import ROOT

from mpshm.bench import pool as _poolbench
from mpshm.cli import bench, main

MIB = 1 << 20
ALL_METHODS = {"pickle", "stdlib-shm", "mpshm-posix", "mpshm-sysv", "mpshm-mmap", "preshared"}
DIRECTIONS = {"send", "args", "results"}
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
PROGRESS_LINE = re.compile(r"\[(\d+)/(\d+)\] (send|args|results) \d+ MiB \S+  [\d.]+ ms/task"
                           r"  elapsed \d+ s")


def _env() -> dict[str, str]:
    env = dict(os.environ, PYTHONPATH=ROOT)
    env.pop("MPSHM_TRACKER", None)  # the bench is a program of its own, with its own tracker
    return env


def _bench(*options: str, timeout: float = 150) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "mpshm", "bench", *options],
                          capture_output=True, text=True, timeout=timeout, env=_env())


# A meta-path finder refusing some top-level packages, then the command line.
_BLOCKED = textwrap.dedent("""
    import sys

    BLOCKED = set(sys.argv[1].split(","))

    class Refuse:
        def find_spec(self, name, path=None, target=None):
            if name.partition(".")[0] in BLOCKED:
                raise ModuleNotFoundError(f"No module named {name!r} (blocked)", name=name)
            return None

    sys.meta_path.insert(0, Refuse())
    import mpshm.cli

    try:
        status = mpshm.cli.main(sys.argv[2:])
    except SystemExit as exc:
        status = exc.code
    assert not BLOCKED & set(sys.modules), "a blocked package was imported"
    sys.exit(status)
""")


def _blocked(packages: str, *argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", _BLOCKED, packages, *argv],
                          capture_output=True, text=True, timeout=60, env=_env())


@pytest.mark.timeout(180)
def test_bench_writes_table_json_and_chart(tmp_path):
    out, png = tmp_path / "figures.json", tmp_path / "chart.png"
    result = _bench("--quick", "--sizes", "1M", "2M", "--repeat", "1", "--json", str(out),
                    "--plot", str(png))
    assert result.returncode == 0, result.stderr

    figures = json.loads(out.read_text())
    rows = figures["rows"]
    assert sorted((r["direction"], r["method"], r["size"]) for r in rows) == sorted(
        (d, m, s) for d in DIRECTIONS for m in ALL_METHODS for s in (MIB, 2 * MIB))
    for r in rows:
        assert r["ms"] > 0 and r["gbps"] > 0 and r["x_vs_pickle"] > 0 and r["memcpys"] > 0
        assert r["empty_task_ms"] > 0 and r["rounds"] >= 3 and r["tasks_per_round"] >= 1
        # memcpys: the time per task in copies of the array at the memcpy measured
        assert r["memcpys"] == pytest.approx(
            r["ms"] / 1e3 / (r["size"] / (figures["memcpy_gbps"] * 1e9)))
    assert figures["memcpy_gbps"] > 0
    assert figures["backends"] == ["posix", "sysv", "mmap"]
    assert figures["preshared_backend"] == "posix"
    assert "targets" not in figures and "pct_memcpy" not in rows[0]

    data = png.read_bytes()
    assert data[:8] == PNG_MAGIC
    import matplotlib.image

    image = matplotlib.image.imread(str(png))
    height, width = image.shape[:2]
    assert 800 <= width <= 4000 and 300 <= height <= 3000

    # The table and the verdicts on stdout, one line per direction, size and method.
    table = [line.split() for line in result.stdout.splitlines()]
    assert ["direction", "size", "method", "ms/task", "GB/s", "x", "vs", "pickle",
            "memcpys"] in table
    found = {(cells[0], cells[3], int(cells[1]) * MIB) for cells in table
             if len(cells) == 8 and cells[0] in DIRECTIONS and cells[2] == "MiB"}
    assert found == {(d, m, s) for d in DIRECTIONS for m in ALL_METHODS for s in (MIB, 2 * MIB)}
    assert not any("%" in cells[-1] for cells in table if len(cells) == 8)
    assert "memcpys = time / the time one" in result.stdout  # the header explains it
    # Development targets are the project's (benchmarks/pool.py), not the user's.
    assert "target" not in result.stdout.lower()
    assert not re.search(r"\b(PASS|FAIL|SKIP)\b", result.stdout)
    assert "elapsed" not in result.stdout

    # The progress on stderr (not a terminal: one line per finished measurement).
    done = [PROGRESS_LINE.fullmatch(line) for line in result.stderr.splitlines()]
    counts = [(int(m.group(1)), int(m.group(2))) for m in done if m]
    assert counts == [(i, 36) for i in range(1, 37)], result.stderr


@pytest.mark.timeout(180)
def test_backends_restrict_the_methods_and_no_progress_is_silent(tmp_path):
    out = tmp_path / "figures.json"
    result = _bench("--sizes", "1M", "--repeat", "1", "--backends", "sysv", "--no-progress",
                    "--json", str(out))
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    figures = json.loads(out.read_text())
    assert {r["method"] for r in figures["rows"]} == {"pickle", "stdlib-shm", "mpshm-sysv",
                                                      "preshared"}
    assert len(figures["rows"]) == 3 * 4
    assert figures["preshared_backend"] == "sysv"
    assert "mpshm-posix" not in result.stdout and "mpshm-sysv" in result.stdout


@pytest.mark.timeout(120)
def test_ctrl_c_ends_the_run_at_once():
    # Ctrl-C in a terminal reaches the whole process group, workers included.
    proc = subprocess.Popen(
        [sys.executable, "-m", "mpshm", "bench", "--sizes", "1M", "2M", "4M", "8M", "16M",
         "--repeat", "1"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(),
        start_new_session=True)
    try:
        assert proc.stderr is not None
        seen = []
        for line in proc.stderr:  # wait until the pools are up and measuring
            seen.append(line)
            if line.startswith("[1/"):
                break
        os.killpg(proc.pid, signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:  # the group is the bench's alone (a session of its own)
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 130, "".join(seen) + err
    assert err.splitlines()[-1] == "mpshm: interrupted"
    assert "Traceback" not in err and out == ""


@pytest.mark.parametrize(("argv", "named"), [
    (["--sizes", "1M", "12X"], "'12X'"),
    (["--sizes", "0"], "'0'"),
    (["--backends", "posix", "shmfs"], "'shmfs'"),
    (["--repeat", "0"], "'0'"),
    (["--plot", "/nonexistent-dir/chart.png"], "/nonexistent-dir/chart.png"),
])
def test_bad_arguments_exit_2_naming_the_value(capsys, argv, named):
    with pytest.raises(SystemExit) as info:
        main(["bench", "--no-progress", *argv])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert named in err
    if "--backends" in argv:
        assert "posix, sysv, mmap" in err  # the valid names


@pytest.mark.timeout(90)
def test_bad_sizes_from_the_command_line():
    result = _bench("--sizes", "big", timeout=60)
    assert result.returncode == 2
    assert "'big'" in result.stderr and result.stdout == ""


@pytest.mark.timeout(90)
def test_without_numpy_a_clear_message():
    result = _blocked("numpy", "bench", "--quick")
    assert (result.returncode, result.stdout) == (1, "")
    assert result.stderr.strip() == "mpshm bench needs NumPy: pip install 'mpshm[bench]'"


@pytest.mark.timeout(90)
def test_help_never_imports_numpy_or_matplotlib():
    for argv in (["--help"], ["bench", "--help"]):
        result = _blocked("numpy,matplotlib", *argv)
        assert result.returncode == 0, result.stderr
        assert "usage: mpshm" in result.stdout


@pytest.mark.timeout(90)
def test_plot_without_matplotlib_fails_before_measuring(tmp_path):
    result = _blocked("matplotlib", "bench", "--quick", "--plot", str(tmp_path / "c.png"))
    assert result.returncode == 1
    assert "pip install 'mpshm[plot]'" in result.stderr
    assert result.stdout == ""  # nothing was measured
    assert not (tmp_path / "c.png").exists()


@pytest.mark.parametrize("nbytes", [MIB, 16 * MIB, 64 * MIB, 256 * MIB, 1 << 30, 4 << 30])
@pytest.mark.parametrize("repeat", sorted({1, 2, bench.QUICK_REPEAT, bench.DEFAULT_REPEAT}))
def test_every_figure_is_a_median_of_three_rounds_or_more(nbytes, repeat):
    assert _poolbench.rounds_for(nbytes, repeat) >= 3


def test_a_slow_task_is_still_timed_three_times():
    """--quick at a large size: each call is long, and one sample is not a median."""
    calls = []

    def task():
        calls.append(1)
        time.sleep(0.02)  # longer than a round's target: one task per round

    seconds, rounds, number = _poolbench.per_task(task, 1 << 30, bench.QUICK_REPEAT)
    assert (rounds, number) == (3, 1)
    assert len(calls) == 1 + 3  # the warm-up, then one per round
    assert 0.015 < seconds < 1


def test_report_explains_memcpys_and_reads_at_any_ratio():
    figures = {
        "python": "3.x", "numpy": "2.x", "cores": 2, "workers": 2, "start_method": "spawn",
        "sizes": [1 << 30], "backends": ["posix"], "preshared_backend": "posix", "repeat": 3,
        "memcpy_gbps": 13.0, "memcpy_bytes": 256 * MIB, "measuring_seconds": 1.0,
        "empty_task_ms_at_start": {"pickle": 0.5, "preshared": 1.0},
        "rows": [{"direction": "send", "size": 1 << 30, "size_label": "1 GiB", "method": m,
                  "ms": ms, "gbps": (1 << 30) / ms / 1e6, "x_vs_pickle": 10_000 / ms,
                  "memcpys": ms / 1e3 / ((1 << 30) / 13e9)}
                 for m, ms in (("pickle", 10_000.0), ("preshared", 0.67))],
    }
    out = io.StringIO()
    bench.print_report(figures, out)
    lines = {line.split()[3]: line.split() for line in out.getvalue().splitlines()
             if line.startswith("send ")}
    assert lines["pickle"][-1] == "121"        # 10 s: 121 copies' worth of time
    assert lines["preshared"][-1] == "0.0081"  # less than a hundredth of one copy
    assert "%" not in out.getvalue().split("(median")[0]


def test_sizes_and_labels():
    assert bench.parse_size("1M") == MIB
    assert bench.parse_size("16MiB") == 16 * MIB
    assert bench.parse_size("1g") == 1 << 30
    assert bench.parse_size("4096") == 4096
    assert bench.parse_size("1001") == 1000  # whole float64 items
    assert [bench.label(n) for n in (MIB, 1 << 30, 3 * 1024, 1000)] == [
        "1 MiB", "1 GiB", "3 KiB", "1000 B"]


def test_live_progress_redraws_one_line():
    stream = io.StringIO()
    progress = bench.Progress(stream, total=2, live=True)
    progress.phase("starting 6 pools")
    progress.note("6 pools ready")
    progress.begin("args", 16 * MIB, "mpshm-posix")
    progress.end("args", 16 * MIB, "mpshm-posix", 0.0032)
    progress.begin("args", 16 * MIB, "preshared")
    progress.close()
    text = stream.getvalue()
    assert text.endswith("\n") and text.count("\n") == 1  # one line, redrawn with \r
    last = text.rstrip("\n").split("\r")[-1]
    assert re.fullmatch(r"\[1/2\] args 16 MiB mpshm-posix  3.20 ms/task  elapsed \d+ s\x1b\[K",
                        last)
    assert "now: preshared" in text


def test_no_progress_writes_nothing():
    progress = bench.Progress(None, total=1, live=False)
    progress.phase("x")
    progress.note("y")
    progress.begin("send", MIB, "pickle")
    progress.end("send", MIB, "pickle", 0.001)
    progress.close()
