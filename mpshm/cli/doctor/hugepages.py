"""Huge pages: transparent huge pages for shared memory, what they would
gain here (measured), reserved huge pages and hugetlbfs mounts."""

from __future__ import annotations

import os
import re
import sys
import time
from typing import Any, Optional

from ... import _sysinfo
from ...backends import _huge
from .report import CheckResult, human_size

__all__ = [
    "THP_TRIAL_BUDGET", "THP_TRIAL_SIZE", "check_hugetlb", "check_thp_gain", "check_thp_shmem",
]


_THP_MEANING = {
    "always": "huge pages whenever possible",
    "within_size": "huge pages within the segment's size",
    "advise": "huge pages only where madvise(MADV_HUGEPAGE) asks",
    "never": "no huge pages",
    "deny": "no huge pages anywhere, /dev/shm included (emergency setting)",
    "force": "huge pages forced everywhere, /dev/shm included (testing setting)",
}


def _shm_dir_huge(shm_dir: str, proc: str, shmem: Optional[str]) -> tuple[Optional[str], str]:
    """The ``huge=`` option of the tmpfs holding *shm_dir* (None if it is not on
    a tmpfs), and what POSIX segments there get: that option (``never`` when
    not given), or ``shmem_enabled`` *shmem* where it is ``deny`` or ``force``."""
    mount = _sysinfo.mount_of(os.path.realpath(shm_dir), _sysinfo.mounts(proc))
    huge = mount.option("huge") if mount is not None and mount.fstype == "tmpfs" else None
    if shmem == "deny" or shmem == "force":
        return huge, shmem
    return huge, huge or "never"


def check_thp_shmem(
    sysfs: str = "/sys", proc: str = "/proc", shm_dir: str = "/dev/shm"
) -> CheckResult:
    """Transparent huge pages for shared memory: ``shmem_enabled`` (System V segments,
    shared anonymous memory) and the ``huge=`` option of /dev/shm's tmpfs (POSIX)."""
    name, area, title = "thp.shmem", "Huge pages", "THP for shmem"
    path = os.path.join(sysfs, "kernel", "mm", "transparent_hugepage", "shmem_enabled")
    text = _sysinfo.read_text(path)
    value = _sysinfo.selected(text) if text is not None else None
    huge, posix = _shm_dir_huge(shm_dir, proc, value)
    detail: dict[str, Any] = {"shmem_enabled": None, "shm_dir_huge": huge}
    if text is None:
        return CheckResult(name, area, title, "info",
                           f"no {path}: this kernel has no transparent huge pages for shmem",
                           detail)
    detail["shmem_enabled"] = value
    detail["posix_effective"] = posix
    summary = (
        f"shmem_enabled={value} (System V: {_THP_MEANING.get(value or '', 'unknown setting')}); "
        f"{shm_dir}: {'huge=' + posix if value not in ('deny', 'force') else value}"
    )
    return CheckResult(name, area, title, "info", summary, detail)


#: What :func:`check_thp_gain` first-touches, and how long it may take in all.
THP_TRIAL_SIZE = 64 << 20
THP_TRIAL_BUDGET = 0.35


def _first_touch(size: int, huge: bool) -> tuple[float, bool]:
    """Seconds to first-touch *size* bytes of fresh anonymous memory (one write
    per 4 KiB page), with ``MADV_HUGEPAGE`` if *huge*; and whether huge pages
    were actually used (AnonHugePages of the mapping)."""
    import mmap

    m = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    try:
        if huge:
            m.madvise(mmap.MADV_HUGEPAGE)
        zeros = bytes(size // 4096)
        start = time.perf_counter()
        m[::4096] = zeros
        elapsed = time.perf_counter() - start
        used = False
        if huge:
            rollup = _sysinfo.read_text("/proc/self/smaps_rollup") or ""
            found = re.search(r"AnonHugePages:\s+(\d+)", rollup)
            used = bool(found and int(found.group(1)) > 0)
        return elapsed, used
    finally:
        m.close()


def check_thp_gain(
    sysfs: str = "/sys", proc: str = "/proc", shm_dir: str = "/dev/shm",
    size: int = THP_TRIAL_SIZE, budget: float = THP_TRIAL_BUDGET,
) -> CheckResult:
    """What huge pages would gain here, measured: the time to first-touch
    *size* bytes of anonymous memory with 4 KiB pages and with
    ``MADV_HUGEPAGE`` (when anonymous THP allows ``madvise``), and which
    setting gives segments huge pages (``huge_pages=True``)."""
    name, area, title = "thp.gain", "Huge pages", "huge page gain"
    thp = os.path.join(sysfs, "kernel", "mm", "transparent_hugepage")
    anon = _sysinfo.selected(_sysinfo.read_text(os.path.join(thp, "enabled")) or "")
    shmem = _huge.shmem_thp(os.path.join(thp, "shmem_enabled"))
    _, posix = _shm_dir_huge(shm_dir, proc, shmem)
    detail: dict[str, Any] = {"anon_enabled": anon, "size_bytes": size,
                              "small_pages_s": None, "huge_pages_s": None, "speedup": None}
    steps = []
    if shmem not in ("advise", "always", "within_size", "force"):
        steps.append("echo advise > /sys/kernel/mm/transparent_hugepage/shmem_enabled "
                     "(System V)")
    if posix not in ("advise", "always", "within_size", "force"):
        steps.append(f"mount -o remount,huge=advise {shm_dir} (POSIX)")
    if steps:
        advice = "to use them: " + "; ".join(steps) + "; then pass huge_pages=True " \
                 "(or set MPSHM_HUGE_PAGES=1)"
    else:
        advice = "enabled: segments made with huge_pages=True (or MPSHM_HUGE_PAGES=1) use them"
    detail["advice"] = advice
    if anon not in ("madvise", "always") or not sys.platform.startswith("linux"):
        return CheckResult(name, area, title, "info",
                           f"not measured (anonymous THP is {anon or 'absent'}); {advice}",
                           detail)
    small: list[float] = []
    large: list[float] = []
    used = False
    deadline = time.perf_counter() + budget
    while len(small) < 3 and (not small or time.perf_counter() < deadline):
        small.append(_first_touch(size, False)[0])
        elapsed, used_now = _first_touch(size, True)
        large.append(elapsed)
        used = used or used_now
    detail["small_pages_s"], detail["huge_pages_s"] = min(small), min(large)
    if not used:
        return CheckResult(name, area, title, "info",
                           f"not measured (no huge page could be had: memory too "
                           f"fragmented?); {advice}", detail)
    speedup = min(small) / min(large)
    detail["speedup"] = round(speedup, 2)
    summary = (f"first touch of {human_size(size)}: {min(small) * 1e3:.0f} ms with 4 KiB "
               f"pages, {min(large) * 1e3:.0f} ms with huge pages ({speedup:.1f}x); {advice}")
    return CheckResult(name, area, title, "info", summary, detail)


def check_hugetlb(proc: str = "/proc") -> CheckResult:
    """Reserved huge pages (``HugePages_Total/Free`` in /proc/meminfo) and hugetlbfs mounts."""
    name, area, title = "hugetlb", "Huge pages", "hugetlbfs"
    info = _sysinfo.meminfo(proc)
    mounts = [m.point for m in _sysinfo.mounts(proc) if m.fstype == "hugetlbfs"]
    total = info.get("HugePages_Total")
    free = info.get("HugePages_Free")
    page = info.get("Hugepagesize")
    detail: dict[str, Any] = {
        "hugepages_total": total, "hugepages_free": free, "hugepage_size_bytes": page,
        "mounts": mounts,
    }
    if total is None:
        return CheckResult(name, area, title, "info", "no huge page figures in /proc/meminfo",
                           detail)
    reserved = (f"{total} pages of {human_size(page)} reserved, {free} free" if total
                else "no huge pages reserved (vm.nr_hugepages 0)")
    where = f"hugetlbfs on {', '.join(mounts)}" if mounts else "no hugetlbfs mounted"
    return CheckResult(name, area, title, "info", f"{reserved}; {where}", detail)
