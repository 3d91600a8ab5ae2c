"""``mpshm doctor``: the checks with fake files, and the command on this machine, on a
small private /dev/shm (``unshare``), and with an unusable backend."""

from __future__ import annotations

import json
import os
import resource
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any, Optional

import pytest
from helpers import ROOT

from mpshm import backends
from mpshm.backends.mmapfile import default_dir
from mpshm.cli import doctor
from mpshm.cli.doctor import CheckResult

MiB = 1 << 20
GiB = 1 << 30
EXPECTED_CHECKS = {
    "shm.dir", "sysv.limits", "sysv.usage", "sysv.rmid_forced", "thp.shmem", "thp.gain", "hugetlb",
    "vm.max_map_count", "rlimit.nofile", "rlimit.as", "cgroup.memory", "logind.remove_ipc",
    "mmap.dir", "settings",
}


def write(path: Path, text: str) -> Path:
    """Write *text* to *path*, making its directories."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def doctor_env(**extra: str) -> dict[str, str]:
    """Environment of a separate ``python -m mpshm`` program using this checkout."""
    env = dict(os.environ)
    env.pop("MPSHM_TRACKER", None)
    env.pop("MPSHM_BACKEND", None)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (ROOT, env.get("PYTHONPATH")) if p)
    env.update(extra)
    return env


def run_doctor(*args: str, timeout: float = 120, **env: str) -> subprocess.CompletedProcess[str]:
    """Run ``python -m mpshm doctor ARGS`` and capture its output."""
    return subprocess.run(
        [sys.executable, "-m", "mpshm", "doctor", *args],
        capture_output=True, text=True, timeout=timeout, env=doctor_env(**env),
        stdin=subprocess.DEVNULL,
    )


def by_name(report: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The report's checks by name."""
    return {c["name"]: c for c in report["checks"]}


# --------------------------------------------------------------------------
# The command on this machine


@pytest.mark.timeout(150)
def test_doctor_json_on_this_machine() -> None:
    result = run_doctor("--json")
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads(result.stdout)
    assert set(report) >= {"checks", "backends", "ok"}
    assert report["ok"] is True
    # Every backend tried, and working.
    assert [b["name"] for b in report["backends"]] == list(backends.registry)
    for trial in report["backends"]:
        assert trial["works"] is True and trial["verdict"] == "works", trial
        assert trial["reason"] is None
        assert trial["detail"]["size_bytes"] == doctor.TRIAL_SIZE
        assert 0 < trial["detail"]["create_s"] <= trial["detail"]["total_s"]
    # Every check present, with a valid verdict, a summary, a remedy when it matters.
    checks = by_name(report)
    assert set(checks) == EXPECTED_CHECKS
    for check in report["checks"]:
        assert check["verdict"] in doctor.VERDICTS, check
        assert check["summary"] and "\n" not in check["summary"]
        if check["verdict"] in ("warn", "problem"):
            assert check["remedy"] and "\n" not in check["remedy"], check
        for key, text in check["human"].items():
            assert isinstance(check["detail"][key], int) and isinstance(text, str)
    # The figures are this machine's.
    shm = checks["shm.dir"]["detail"]
    st = os.statvfs("/dev/shm")
    assert shm["total_bytes"] == st.f_blocks * st.f_frsize
    assert 0 <= shm["free_bytes"] <= shm["total_bytes"]  # others' tests come and go
    assert checks["shm.dir"]["human"]["total_bytes"] == doctor.human_size(shm["total_bytes"])
    sysv = checks["sysv.limits"]["detail"]
    assert sysv["shmmni"] == int(Path("/proc/sys/kernel/shmmni").read_text())
    assert sysv["shmmax_bytes"] == int(Path("/proc/sys/kernel/shmmax").read_text())
    assert sysv["shmall_bytes"] == sysv["shmall_pages"] * os.sysconf("SC_PAGE_SIZE")
    maps = checks["vm.max_map_count"]["detail"]
    assert maps["max_map_count"] == int(Path("/proc/sys/vm/max_map_count").read_text())
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    assert checks["rlimit.nofile"]["detail"]["soft"] == soft
    assert checks["logind.remove_ipc"]["detail"]["uid"] == os.getuid()
    assert checks["mmap.dir"]["detail"]["path"] == default_dir()


@pytest.mark.timeout(60)
def test_doctor_human_report_without_backends() -> None:
    result = run_doctor("--no-backends", timeout=50)
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    for section in ("/dev/shm", "System V", "Huge pages", "Process limits", "Memory cgroup",
                    "systemd-logind", "mmap backend", "Settings"):
        assert f"\n{section}" in out, section
    assert "Backends: not tried (--no-backends)" in out
    assert out.rstrip().splitlines()[-1].startswith("backends not tried; ")


@pytest.mark.timeout(60)
def test_doctor_help_explains_every_part() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "mpshm", "doctor", "--help"],
        capture_output=True, text=True, timeout=50, env=doctor_env(),
    )
    assert result.returncode == 0, result.stderr
    for word in ("/dev/shm", "shmmax", "shmem_enabled", "max_map_count", "cgroup", "RemoveIPC",
                 "MPSHM_DIR", "--json", "--no-backends", "--strict", "exit status"):
        assert word in result.stdout, word


# --------------------------------------------------------------------------
# A small /dev/shm, as in a container (private mount namespace)


def run_in_small_shm(*args: str) -> subprocess.CompletedProcess[str]:
    """``python -m mpshm doctor ARGS`` with a private 64 MiB tmpfs on /dev/shm."""
    assert shutil.which("unshare"), "util-linux unshare is needed for this test"
    user = [] if os.geteuid() == 0 else ["--map-root-user"]
    shell = 'mount -t tmpfs -o size=64m,mode=1777 tmpfs /dev/shm && exec "$0" -m mpshm doctor "$@"'
    result = subprocess.run(
        ["unshare", "--mount", "--ipc", *user, "sh", "-c", shell, sys.executable, *args],
        capture_output=True, text=True, timeout=120, env=doctor_env(),
        stdin=subprocess.DEVNULL,
    )
    if result.returncode not in (0, 1) and "unshare" in result.stderr and not result.stdout:
        # No private mount namespace here (not root, and unprivileged user
        # namespaces disabled). CI runs as root and sets MPSHM_REQUIRE_UNSHARE,
        # so there this is a failure, never a skip.
        if os.environ.get("MPSHM_REQUIRE_UNSHARE"):
            pytest.fail(f"unshare failed: {result.stderr.strip()}")
        pytest.skip(f"cannot build a private tmpfs here: {result.stderr.strip()}")
    return result


@pytest.mark.timeout(150)
def test_doctor_reports_a_small_dev_shm_with_its_remedy() -> None:
    result = run_in_small_shm("--json")
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads(result.stdout)
    shm = by_name(report)["shm.dir"]
    assert shm["verdict"] == "problem", shm
    assert shm["detail"]["total_bytes"] == 64 * MiB
    assert shm["human"]["total_bytes"] == "64 MiB"
    assert "64 MiB" in shm["summary"]
    assert "--shm-size" in shm["remedy"] and "mmap" in shm["remedy"]
    # The small tmpfs still holds the trial's segment: every backend works.
    assert all(b["works"] for b in report["backends"]), report["backends"]
    # A problem counts with --strict.
    strict = run_in_small_shm("--strict", "--no-backends")
    assert strict.returncode == 1, strict.stdout + strict.stderr
    lines = strict.stdout.splitlines()
    size = next(i for i, line in enumerate(lines) if "problem" in line and "64 MiB" in line)
    remedy = lines[size + 1].strip()
    assert remedy.startswith(("→ ", "fix: ")) and "--shm-size" in remedy, lines
    assert lines[-1].endswith("exit status 1")


# --------------------------------------------------------------------------
# An unusable backend


@pytest.mark.timeout(150)
@pytest.mark.parametrize("kind", ["world-writable", "symlink"])
def test_doctor_exits_1_when_a_backend_is_unusable(tmp_path: Path, kind: str) -> None:
    real = tmp_path / "real"
    real.mkdir(mode=0o700)
    if kind == "world-writable":
        bad = tmp_path / "open"
        bad.mkdir()
        bad.chmod(0o777)  # no sticky bit
    else:
        bad = tmp_path / "link"
        bad.symlink_to(real)
    result = run_doctor("--json", MPSHM_DIR=str(bad))
    assert result.returncode == 1, result.stdout + result.stderr
    report = json.loads(result.stdout)
    assert report["ok"] is False
    trials = {b["name"]: b for b in report["backends"]}
    assert not trials["mmap"]["works"] and trials["mmap"]["verdict"] == "unusable"
    assert str(bad) in trials["mmap"]["reason"]
    assert "MPSHM_DIR" in trials["mmap"]["remedy"]
    assert trials["posix"]["works"] and trials["sysv"]["works"]
    directory = by_name(report)["mmap.dir"]
    assert directory["verdict"] == "problem" and str(bad) in directory["summary"]
    assert os.listdir(bad) == []  # nothing was created there
    # And in the human report.
    human = run_doctor(MPSHM_DIR=str(bad))
    assert human.returncode == 1
    assert "unusable" in human.stdout and "(mmap unusable)" in human.stdout


@pytest.mark.timeout(60)
def test_a_backend_that_cannot_be_imported_is_unusable() -> None:
    code = (
        "import sys\n"
        "from mpshm import backends\n"
        "from mpshm.cli import main\n"
        "backends.register('broken', 'no_such_module_for_mpshm:Backend')\n"
        "sys.exit(main(['doctor', '--json']))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=50, env=doctor_env(), stdin=subprocess.DEVNULL)
    assert result.returncode == 1, result.stdout + result.stderr
    trials = {b["name"]: b for b in json.loads(result.stdout)["backends"]}
    assert trials["broken"]["verdict"] == "unusable"
    assert trials["broken"]["reason"].startswith("ImportError: ")
    assert "no_such_module_for_mpshm" in trials["broken"]["reason"]
    assert all(trials[n]["works"] for n in ("posix", "sysv", "mmap"))


# --------------------------------------------------------------------------
# Parsing checks, with fake files


def fake_mounts(proc: Path, *lines: str) -> None:
    write(proc / "mounts", "".join(line + "\n" for line in lines))


def test_human_size() -> None:
    assert doctor.human_size(0) == "0 bytes"
    assert doctor.human_size(1) == "1 byte"
    assert doctor.human_size(64 * MiB) == "64 MiB"
    assert doctor.human_size(int(1.5 * GiB)) == "1.5 GiB"
    assert doctor.human_size(None) == "unknown"


@pytest.mark.parametrize("container", [True, False])
def test_small_shm_dir_is_a_problem_with_its_remedy(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, container: bool
) -> None:
    proc = tmp_path / "proc"
    fake_mounts(proc, f"shm {tmp_path} tmpfs rw,nosuid,nodev,size=65536k 0 0")
    monkeypatch.setattr(doctor.storage, "_statvfs", lambda path: (64 * MiB, 60 * MiB, 4 * MiB))
    result = doctor.check_shm_dir(str(tmp_path), str(proc), container=container)
    assert result.verdict == "problem"
    assert result.detail["total_bytes"] == 64 * MiB and result.detail["fstype"] == "tmpfs"
    assert "Docker's default" in result.summary
    assert result.remedy is not None
    assert "--shm-size" in result.remedy and "mmap" in result.remedy and "dir=" in result.remedy
    monkeypatch.setattr(doctor.storage, "_statvfs", lambda path: (256 * MiB, 200 * MiB, 56 * MiB))
    assert doctor.check_shm_dir(str(tmp_path), str(proc), container=container).verdict == "problem"
    monkeypatch.setattr(
        doctor.storage, "_statvfs", lambda path: (8 * GiB, 100 * MiB, 8 * GiB - 100 * MiB)
    )
    low = doctor.check_shm_dir(str(tmp_path), str(proc), container=container)
    assert low.verdict == "warn" and "little free space" in low.summary
    monkeypatch.setattr(doctor.storage, "_statvfs", lambda path: (8 * GiB, 8 * GiB, 0))
    assert doctor.check_shm_dir(str(tmp_path), str(proc), container=container).verdict == "ok"


def test_read_only_or_missing_shm_dir(tmp_path: Path) -> None:
    proc = tmp_path / "proc"
    fake_mounts(proc, f"shm {tmp_path} tmpfs ro,size=65536k 0 0")
    result = doctor.check_shm_dir(str(tmp_path), str(proc), container=False)
    assert result.verdict == "problem" and "read-only" in result.summary
    missing = doctor.check_shm_dir(str(tmp_path / "nope"), str(proc), container=False)
    assert missing.verdict == "problem" and "does not exist" in missing.summary


def fake_sysctls(proc: Path, **values: int) -> None:
    for key, value in values.items():
        group = "vm" if key == "max_map_count" else "kernel"
        write(proc / "sys" / group / key, f"{value}\n")


def test_sysv_limits(tmp_path: Path) -> None:
    proc = tmp_path / "proc"
    fake_sysctls(proc, shmmax=18446744073692774399, shmall=18446744073692774399, shmmni=4096)
    result = doctor.check_sysv_limits(str(proc), page_size=4096)
    assert result.verdict == "ok"
    assert result.summary == "shmmax no limit, shmall no limit, shmmni 4096"
    fake_sysctls(proc, shmmax=32 * MiB, shmall=2097152, shmmni=4096)
    small = doctor.check_sysv_limits(str(proc), page_size=4096)
    assert small.verdict == "warn" and "kernel.shmmax 32 MiB is small" in small.summary
    assert small.detail["shmall_bytes"] == 8 * GiB
    assert small.remedy is not None and "sysctl" in small.remedy
    fake_sysctls(proc, shmmax=4096, shmall=2097152, shmmni=8)
    assert doctor.check_sysv_limits(str(proc), page_size=4096).verdict == "problem"
    assert doctor.check_sysv_limits(str(tmp_path / "none")).verdict == "info"


SYSVIPC_HEADER = (
    "       key      shmid perms                  size  cpid  lpid nattch   uid   gid  cuid  "
    "cgid      atime      dtime      ctime                   rss                  swap\n"
)


def sysv_line(key: int, shmid: int, size: int, nattch: int, uid: int = 1000) -> str:
    return (f"{key:>10} {shmid:>10} 600 {size:>21} 100 101 {nattch:>6} {uid:>5} {uid:>5} "
            f"{uid:>5} {uid:>5} 1700000000 1700000000 1700000000 {size:>21} 0\n")


def test_sysv_usage_figures(tmp_path: Path) -> None:
    proc = tmp_path / "proc"
    write(proc / "sysvipc" / "shm", SYSVIPC_HEADER + sysv_line(1234, 1, 4096, 1)
          + sysv_line(-5678, 2, 10 * MiB, 0) + sysv_line(0, 3, 5000, 2))
    fake_sysctls(proc, shmmni=4096, shmall=1 << 40)
    result = doctor.check_sysv_usage(str(proc), page_size=4096)
    assert result.verdict == "ok"
    assert result.detail["segments"] == 3
    assert result.detail["used_bytes"] == 4096 + 10 * MiB + 5000
    assert result.detail["used_pages"] == 1 + 2560 + 2
    assert result.detail["unattached"] == 1
    assert result.summary.startswith("3 segments, 10.0 MiB (1 with nobody attached)")
    fake_sysctls(proc, shmmni=3)
    full = doctor.check_sysv_usage(str(proc), page_size=4096)
    assert full.verdict == "problem" and full.remedy is not None and "ipcrm" in full.remedy
    fake_sysctls(proc, shmmni=4096, shmall=2600)
    assert doctor.check_sysv_usage(str(proc), page_size=4096).verdict == "warn"
    write(proc / "sysvipc" / "shm", SYSVIPC_HEADER)
    empty = doctor.check_sysv_usage(str(proc), page_size=4096)
    assert empty.detail["segments"] == 0 and empty.summary.startswith("0 segments, 0 bytes")
    assert doctor.check_sysv_usage(str(tmp_path / "none")).verdict == "info"


def test_sysv_rmid_forced(tmp_path: Path) -> None:
    proc = tmp_path / "proc"
    fake_sysctls(proc, shm_rmid_forced=0)
    assert doctor.check_sysv_rmid_forced(str(proc)).verdict == "ok"
    fake_sysctls(proc, shm_rmid_forced=1)
    forced = doctor.check_sysv_rmid_forced(str(proc))
    assert forced.verdict == "warn" and forced.remedy and "shm_rmid_forced=0" in forced.remedy


@pytest.mark.parametrize(
    ("text", "value", "posix"),
    [
        ("always within_size advise [never] deny force", "never", "within_size"),
        ("[always] within_size advise never deny force", "always", "within_size"),
        ("always within_size [advise] never deny force", "advise", "within_size"),
        ("always within_size advise never [deny] force", "deny", "deny"),
        ("always within_size advise never deny [force]", "force", "force"),
        ("always [within_size] advise never", "within_size", "within_size"),
    ],
)
def test_thp_shmem(tmp_path: Path, text: str, value: str, posix: str) -> None:
    sysfs, proc = tmp_path / "sys", tmp_path / "proc"
    write(sysfs / "kernel" / "mm" / "transparent_hugepage" / "shmem_enabled", text + "\n")
    fake_mounts(proc, f"tmpfs {tmp_path} tmpfs rw,huge=within_size 0 0")
    result = doctor.check_thp_shmem(str(sysfs), str(proc), str(tmp_path))
    assert result.verdict == "info"
    assert result.detail["shmem_enabled"] == value
    assert result.detail["shm_dir_huge"] == "within_size"
    assert result.detail["posix_effective"] == posix
    assert f"shmem_enabled={value}" in result.summary


@pytest.mark.parametrize(
    "shmem, huge, steps",
    [("never", None, ["shmem_enabled", "remount,huge=advise"]),
     ("advise", "advise", []),
     ("advise", None, ["remount,huge=advise"]),
     ("force", None, [])],
)
def test_thp_gain_says_what_to_change(
    tmp_path: Path, shmem: str, huge: Optional[str], steps: list[str]
) -> None:
    sysfs, proc = tmp_path / "sys", tmp_path / "proc"
    thp = sysfs / "kernel" / "mm" / "transparent_hugepage"
    write(thp / "shmem_enabled", f"[{shmem}]\n")
    write(thp / "enabled", "always [never] madvise\n")  # nothing measured
    fake_mounts(proc, f"tmpfs {tmp_path} tmpfs rw{',huge=' + huge if huge else ''} 0 0")
    result = doctor.check_thp_gain(str(sysfs), str(proc), str(tmp_path))
    assert result.verdict == "info" and "not measured" in result.summary
    assert result.detail["speedup"] is None
    for step in steps:
        assert step in result.detail["advice"]
    if not steps:
        assert result.detail["advice"].startswith("enabled")
    assert "huge_pages=True" in result.summary


def test_thp_gain_measures_on_this_machine() -> None:
    """With anonymous THP on madvise or always, the gain is measured, quickly."""
    import time

    enabled = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    if not enabled.exists() or "[never]" in enabled.read_text():
        pytest.skip("no anonymous transparent huge pages here")
    start = time.perf_counter()
    result = doctor.check_thp_gain()
    assert time.perf_counter() - start < 2.0  # 0.35 s budget, on a noisy machine
    assert result.detail["small_pages_s"] > 0 and result.detail["huge_pages_s"] > 0
    if result.detail["speedup"] is not None:
        assert "ms with huge pages" in result.summary


def test_thp_missing_and_hugetlb(tmp_path: Path) -> None:
    proc = tmp_path / "proc"
    assert doctor.check_thp_shmem(str(tmp_path / "sys"), str(proc), str(tmp_path)).verdict == "info"
    write(proc / "meminfo", "MemTotal: 1000 kB\nHugePages_Total:      16\nHugePages_Free:       "
          "12\nHugepagesize:       2048 kB\n")
    fake_mounts(proc, "hugetlbfs /dev/hugepages hugetlbfs rw,relatime,pagesize=2M 0 0")
    result = doctor.check_hugetlb(str(proc))
    assert result.verdict == "info"
    assert result.detail == {"hugepages_total": 16, "hugepages_free": 12,
                             "hugepage_size_bytes": 2 * MiB, "mounts": ["/dev/hugepages"]}
    assert "16 pages of 2 MiB reserved, 12 free" in result.summary


def test_max_map_count(tmp_path: Path) -> None:
    proc = tmp_path / "proc"
    fake_sysctls(proc, max_map_count=65530)
    write(proc / "self" / "maps", "x\n" * 100)
    result = doctor.check_max_map_count(str(proc))
    assert result.verdict == "ok" and result.detail["room"] == 65430
    fake_sysctls(proc, max_map_count=5000)
    assert doctor.check_max_map_count(str(proc)).verdict == "warn"
    fake_sysctls(proc, max_map_count=1050)
    low = doctor.check_max_map_count(str(proc))
    assert low.verdict == "problem" and low.remedy and "vm.max_map_count" in low.remedy


def test_rlimits() -> None:
    assert doctor.check_open_files((1024, 4096)).verdict == "ok"
    few = doctor.check_open_files((64, 4096))
    assert few.verdict == "warn" and few.remedy and "ulimit -n 4096" in few.remedy
    assert doctor.check_address_space((resource.RLIM_INFINITY,) * 2).verdict == "ok"
    limited = doctor.check_address_space((4 * GiB, resource.RLIM_INFINITY))
    assert limited.verdict == "warn" and limited.detail["soft_bytes"] == 4 * GiB


def cgroup_v2(tmp_path: Path, path: str, limits: dict[str, str]) -> tuple[str, str]:
    """Fake /proc and /sys for cgroup v2 with memory.max files (path -> value)."""
    proc, sysfs = tmp_path / "proc", tmp_path / "sys"
    write(proc / "self" / "cgroup", f"0::{path}\n")
    root = sysfs / "fs" / "cgroup"
    write(root / "cgroup.controllers", "cpuset cpu io memory pids\n")
    for where, value in limits.items():
        write(root / where.lstrip("/") / "memory.max", value + "\n")
    write(root / path.lstrip("/") / "memory.current", f"{100 * MiB}\n")
    return str(proc), str(sysfs)


def test_cgroup_v2_limit_below_and_above_dev_shm(tmp_path: Path) -> None:
    proc, sysfs = cgroup_v2(tmp_path, "/kubepods/pod1/ctr", {
        "/kubepods": "max", "/kubepods/pod1": str(GiB), "/kubepods/pod1/ctr": "max"})
    below = doctor.check_cgroup_memory(proc, sysfs, shm_size=2 * GiB)
    assert below.verdict == "warn"
    assert below.detail["limit_bytes"] == GiB and below.detail["version"] == 2
    assert below.detail["limit_set_by"] == "/kubepods/pod1"
    assert below.detail["usage_bytes"] == 100 * MiB
    assert "OOM-killed" in below.summary and below.remedy and "--memory" in below.remedy
    above = doctor.check_cgroup_memory(proc, sysfs, shm_size=512 * MiB)
    assert above.verdict == "ok" and "above /dev/shm's size 512 MiB" in above.summary


def test_cgroup_v2_max_and_innermost_limit(tmp_path: Path) -> None:
    proc, sysfs = cgroup_v2(tmp_path, "/user.slice/app", {
        "/user.slice": "max", "/user.slice/app": "max"})
    unlimited = doctor.check_cgroup_memory(proc, sysfs, shm_size=64 * GiB)
    assert unlimited.verdict == "ok" and unlimited.detail["limit_bytes"] is None
    assert "no limit" in unlimited.summary
    proc, sysfs = cgroup_v2(tmp_path / "b", "/user.slice/app", {
        "/user.slice": str(8 * GiB), "/user.slice/app": str(2 * GiB)})
    inner = doctor.check_cgroup_memory(proc, sysfs, shm_size=4 * GiB)
    assert inner.verdict == "warn" and inner.detail["limit_bytes"] == 2 * GiB


def test_cgroup_v1_and_none(tmp_path: Path) -> None:
    proc, sysfs = tmp_path / "proc", tmp_path / "sys"
    write(proc / "self" / "cgroup", "5:memory:/docker/abc\n4:cpu,cpuacct:/docker/abc\n0::/\n")
    memory = sysfs / "fs" / "cgroup" / "memory"
    write(memory / "memory.limit_in_bytes", "9223372036854771712\n")
    write(memory / "docker" / "abc" / "memory.limit_in_bytes", f"{256 * MiB}\n")
    result = doctor.check_cgroup_memory(str(proc), str(sysfs), shm_size=GiB)
    assert result.verdict == "warn" and result.detail["version"] == 1
    assert result.detail["limit_bytes"] == 256 * MiB
    write(memory / "docker" / "abc" / "memory.limit_in_bytes", "9223372036854771712\n")
    assert doctor.check_cgroup_memory(str(proc), str(sysfs), shm_size=GiB).verdict == "ok"
    none = doctor.check_cgroup_memory(str(tmp_path / "nothing"), str(sysfs), shm_size=GiB)
    assert none.verdict == "info"


class Logind:
    """A fake root for the RemoveIPC check: /etc, /run, /usr and /proc under tmp_path."""

    def __init__(self, root: Path, running: bool = True) -> None:
        self.root = root
        for d in ("etc", "run", "usr", "proc"):
            (root / d).mkdir(parents=True, exist_ok=True)
        if running:
            write(root / "proc" / "321" / "comm", "systemd-logind\n")
        write(root / "proc" / "1" / "comm", "init\n")

    def conf(self, relative: str, text: str) -> None:
        write(self.root / relative, text)

    def check(self, uid: int) -> CheckResult:
        r = self.root
        return doctor.check_remove_ipc(
            etc=str(r / "etc"), run=str(r / "run"), usr=str(r / "usr"), uid=uid,
            binaries=[str(r / "usr" / "lib" / "systemd" / "systemd-logind")],
            proc=str(r / "proc"),
        )


def test_remove_ipc_absent_is_yes(tmp_path: Path) -> None:
    logind = Logind(tmp_path)
    user = logind.check(1000)
    assert user.verdict == "problem"
    assert user.detail["remove_ipc"] is True and user.detail["configured"] is None
    assert user.remedy == "set RemoveIPC=no in /etc/systemd/logind.conf (or run as a system user)"
    root = logind.check(0)
    assert root.verdict == "ok" and "exempt" in root.summary
    assert logind.check(999).verdict == "ok"  # a system user


def test_remove_ipc_yes_and_no(tmp_path: Path) -> None:
    logind = Logind(tmp_path)
    logind.conf("etc/systemd/logind.conf", "[Login]\n#RemoveIPC=no\nRemoveIPC=yes\n")
    assert logind.check(1000).verdict == "problem"
    logind.conf("etc/systemd/logind.conf", "[Login]\nKillUserProcesses=no\nRemoveIPC=no\n")
    no = logind.check(1000)
    assert no.verdict == "ok" and no.detail["remove_ipc"] is False
    assert no.detail["source"].endswith("etc/systemd/logind.conf")
    # Another section's key, a comment, an invalid value: none count.
    logind.conf("etc/systemd/logind.conf",
                "[Other]\nRemoveIPC=no\n[Login]\n; RemoveIPC=no\nRemoveIPC=maybe\n")
    assert logind.check(1000).detail["remove_ipc"] is True


def test_remove_ipc_overridden_by_drop_ins(tmp_path: Path) -> None:
    logind = Logind(tmp_path)
    logind.conf("etc/systemd/logind.conf", "[Login]\nRemoveIPC=no\n")
    logind.conf("usr/lib/systemd/logind.conf.d/50-vendor.conf", "[Login]\nRemoveIPC=yes\n")
    vendor = logind.check(1000)
    assert vendor.verdict == "problem"  # a drop-in overrides the main file
    assert vendor.detail["source"].endswith("usr/lib/systemd/logind.conf.d/50-vendor.conf")
    # The same name in /etc hides the vendor's drop-in.
    logind.conf("etc/systemd/logind.conf.d/50-vendor.conf", "[Login]\nRemoveIPC=no\n")
    assert logind.check(1000).verdict == "ok"
    # Drop-ins are applied in file-name order, whichever directory they are in.
    logind.conf("run/systemd/logind.conf.d/90-late.conf", "[Login]\nRemoveIPC=yes\n")
    assert logind.check(1000).verdict == "problem"
    logind.conf("etc/systemd/logind.conf.d/95-local.conf", "[Login]\nRemoveIPC=off\n")
    last = logind.check(1000)
    assert last.verdict == "ok" and last.detail["source"].endswith("95-local.conf")
    # The main file is the first of /etc, /run, /usr/local/lib, /usr/lib: only one counts.
    (tmp_path / "etc/systemd/logind.conf").unlink()
    logind.conf("usr/lib/systemd/logind.conf", "[Login]\nRemoveIPC=no\n")
    files = logind.check(1000).detail["files"]
    assert files[0].endswith("usr/lib/systemd/logind.conf")


def test_remove_ipc_without_logind_and_system_range(tmp_path: Path) -> None:
    absent = Logind(tmp_path / "a", running=False)
    result = absent.check(1000)
    assert result.verdict == "ok" and result.detail["applies"] is False
    assert "not installed" in result.summary
    # systemd as init with logind installed counts as running.
    booted = Logind(tmp_path / "b", running=False)
    (tmp_path / "b" / "run" / "systemd" / "system").mkdir(parents=True)
    booted.conf("usr/lib/systemd/systemd-logind", "")
    assert booted.check(1000).verdict == "problem"
    # The system range from login.defs.
    booted.conf("etc/login.defs", "UID_MIN 1000\nSYS_UID_MAX 499\n")
    assert booted.check(600).verdict == "problem"
    assert booted.check(499).verdict == "ok"


def test_mmap_dir(tmp_path: Path) -> None:
    fresh = doctor.check_mmap_dir(str(tmp_path / "new"))
    assert fresh.verdict in ("ok", "info", "warn") and "first use" in fresh.summary
    assert not (tmp_path / "new").exists()
    mine = tmp_path / "mine"
    mine.mkdir(mode=0o700)
    good = doctor.check_mmap_dir(str(mine))
    assert good.detail["free_bytes"] > 0 and good.detail["fstype"]
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    bad = doctor.check_mmap_dir(str(shared))
    assert bad.verdict == "problem" and str(shared) in bad.summary
    assert bad.remedy and "MPSHM_DIR" in bad.remedy
    link = tmp_path / "link"
    link.symlink_to(mine)
    assert doctor.check_mmap_dir(str(link)).verdict == "problem"


@pytest.mark.parametrize(("fstype", "backed_by", "verdict"), [
    ("ext4", "disk", "info"), ("xfs", "disk", "info"), ("overlay", "disk", "info"),
    ("tmpfs", "ram", "ok"), ("ramfs", "ram", "ok"),
])
def test_mmap_dir_says_what_backs_it(tmp_path: Path, fstype: str, backed_by: str,
                                     verdict: str) -> None:
    """RAM (a tmpfs) or a disk, from the mount table: on a disk, a hint to use a tmpfs
    (the default directory is in the temp directory, often on a disk)."""
    mine = tmp_path / "mine"
    mine.mkdir(mode=0o700)
    proc = tmp_path / "proc"
    write(proc / "mounts", f"/dev/vda / ext4 rw 0 0\ntmpfs /dev/shm tmpfs rw,nosuid 0 0\n"
                           f"/dev/x {os.path.realpath(mine)} {fstype} rw 0 0\n")
    result = doctor.check_mmap_dir(str(mine), proc=str(proc))
    assert result.verdict == verdict
    assert (result.detail["fstype"], result.detail["backed_by"]) == (fstype, backed_by)
    if backed_by == "ram":
        assert "RAM" in result.summary and result.remedy is None
    else:
        assert "disk" in result.summary and "depends on the disk" in result.summary
        assert result.remedy is not None
        assert "MPSHM_DIR" in result.remedy and "dir=" in result.remedy
        assert f"/dev/shm/mpshm-{os.getuid()}" in result.remedy


def test_mmap_dir_hint_without_a_dev_shm_tmpfs(tmp_path: Path) -> None:
    proc = tmp_path / "proc"
    write(proc / "mounts", "/dev/vda / xfs rw 0 0\n")
    result = doctor.check_mmap_dir(str(tmp_path / "new"), proc=str(proc))
    assert result.verdict == "info" and result.detail["backed_by"] == "disk"
    assert result.remedy is not None and "tmpfs" in result.remedy
    assert "/dev/shm/" not in result.remedy


def test_mmap_dir_of_this_machine_names_its_backing() -> None:
    """The default directory (here: the temp directory, unless MPSHM_DIR is set)."""
    result = doctor.check_mmap_dir()
    assert result.detail["path"] == default_dir()
    fstype = result.detail["fstype"]
    expected = "ram" if fstype in ("tmpfs", "ramfs") else "network" if fstype in (
        "nfs", "nfs4", "cifs") else "disk"
    assert result.detail["backed_by"] == expected
    if expected == "disk" and result.verdict == "info":
        assert result.remedy and "tmpfs" in result.remedy


def test_settings() -> None:
    assert doctor.check_settings({}).summary == "posix (MPSHM_BACKEND unset)"
    assert doctor.check_settings({"MPSHM_BACKEND": "sysv"}).summary == "sysv (MPSHM_BACKEND)"
    wrong = doctor.check_settings({"MPSHM_BACKEND": "nope"})
    assert wrong.verdict == "problem" and wrong.remedy and "posix" in wrong.remedy


def test_a_failing_check_is_reported_not_raised() -> None:
    def check_broken() -> CheckResult:
        raise RuntimeError("boom")

    (result,) = doctor.run_checks([check_broken])
    assert result.verdict == "info" and "boom" in result.summary


def test_human_report_shows_remedies(capsys: pytest.CaptureFixture[str]) -> None:
    checks = [
        CheckResult("shm.dir", "/dev/shm", "size", "problem", "64 MiB, 64 MiB free", {},
                    "start the container with --shm-size=2g"),
        CheckResult("hugetlb", "Huge pages", "hugetlbfs", "info", "none", {}),
    ]
    trials = [doctor.BackendTrial("mmap", False, "PermissionError: refused", "refused",
                                  "set MPSHM_DIR")]
    system = {"host": "h", "system": "Linux", "release": "6", "python": "3", "mpshm": "0",
              "uid": 1000, "container": True}
    text = doctor.format_report(checks, trials, system)
    lines = text.splitlines()
    problem = lines.index(next(line for line in lines if "problem" in line))
    assert lines[problem + 1].strip() in ("→ start the container with --shm-size=2g",
                                          "fix: start the container with --shm-size=2g")
    assert any("unusable" in line and "mmap" in line for line in lines)
    assert lines[-1] == ("0 of 1 backends work (mmap unusable); 1 problem, no warnings; "
                         "exit status 1")
    # The verdict column lines up.
    rows = [line for line in lines if line.startswith("  ") and not line.strip().startswith(
        ("→", "fix:"))]
    assert len({line.index(line.split()[1]) for line in rows}) == 1


def test_json_of_a_result() -> None:
    result = CheckResult("x", "A", "t", "ok", "s", {"total_bytes": 64 * MiB, "count": 3})
    data = json.loads(json.dumps(result.to_json()))
    assert data["detail"] == {"total_bytes": 64 * MiB, "count": 3}
    assert data["human"] == {"total_bytes": "64 MiB"}
