"""The ``doctor`` subcommand: what on this machine decides whether shared memory works.

Each check is a small function returning a :class:`CheckResult`: a verdict
(``ok``, ``info``, ``warn`` or ``problem``), a one-line summary with human
sizes, the raw figures, and, for a warning or a problem, the remedy in one
line. Every check takes the locations of what it reads as parameters with
the real ones as defaults (``proc="/proc"``, ``sysfs="/sys"``,
``etc="/etc"``, the shm directory), so that it can be fed fake files; a
file that does not exist (not Linux, no cgroup, no systemd) gives an
``info`` or ``ok`` verdict with the reason, never an exception.

Then each registered backend is tried for real (:func:`try_backend`):
create a small segment, write a random pattern, attach it from a child
process that checks the pattern and writes a reply, read the reply, unlink.
The exit status is 1 when a backend is unusable, else 0 (with ``--strict``,
a check with a ``problem`` verdict counts too).
"""

from __future__ import annotations

import argparse
import dataclasses
import errno
import hashlib
import json
import os
import platform
import re
import resource
import stat
import subprocess
import sys
import textwrap
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence

from .. import _system

__all__ = [
    "CHECKS",
    "VERDICTS",
    "BackendTrial",
    "CheckResult",
    "add_parser",
    "check_address_space",
    "check_cgroup_memory",
    "check_hugetlb",
    "check_max_map_count",
    "check_mmap_dir",
    "check_open_files",
    "check_remove_ipc",
    "check_settings",
    "check_shm_dir",
    "check_sysv_limits",
    "check_sysv_rmid_forced",
    "check_sysv_usage",
    "check_thp_gain",
    "check_thp_shmem",
    "format_report",
    "human_size",
    "in_container",
    "run",
    "run_checks",
    "try_backend",
    "try_backends",
]

#: The verdicts of a check, from good to bad.
VERDICTS = ("ok", "info", "warn", "problem")

#: Below this, a /dev/shm (or an mmap directory's free space) is too small for real work.
SMALL_SHM = 512 << 20
#: Docker's default /dev/shm size.
DOCKER_DEFAULT_SHM = 64 << 20
#: Free space below this (or below :data:`LOW_FREE_FRACTION` of the total) is a warning.
LOW_FREE = 256 << 20
LOW_FREE_FRACTION = 0.10
#: Limits at or above this many bytes are the kernel's "no limit" values.
NO_LIMIT = 1 << 62
#: Size of the segment each backend is tried with.
TRIAL_SIZE = 1 << 20
#: Seconds the child process of a backend trial may take.
TRIAL_TIMEOUT = 30.0

_REMEDY_SHM_CONTAINER = (
    "start the container with --shm-size=2g (docker run --shm-size), or use the mmap backend "
    "with dir=/path/on/a/larger/disk (backend='mmap' or MPSHM_BACKEND=mmap)"
)
_REMEDY_SHM_HOST = (
    "enlarge it (mount -o remount,size=2g /dev/shm; in a container: --shm-size=2g), or use the "
    "mmap backend with dir=/path/on/a/larger/disk (backend='mmap' or MPSHM_BACKEND=mmap)"
)
_REMEDY_MMAP_DIR = (
    "set MPSHM_DIR (or pass dir=) to a directory of your own, mode 0700, not a symbolic link"
)
_REMEDY_REMOVE_IPC = "set RemoveIPC=no in /etc/systemd/logind.conf (or run as a system user)"
_NETWORK_FS = frozenset(
    {"nfs", "nfs4", "cifs", "smb3", "smbfs", "9p", "fuse.sshfs", "ceph", "glusterfs", "lustre"}
)
#: Filesystems whose files live in RAM (and swap): mmap segments there run at memory speed.
_RAM_FS = frozenset({"tmpfs", "ramfs", "hugetlbfs"})


# --------------------------------------------------------------------------
# Results


@dataclass
class CheckResult:
    """The outcome of one check."""

    #: Stable identifier, e.g. ``"shm.dir"``.
    name: str
    #: The section of the report, e.g. ``"/dev/shm"``.
    area: str
    #: Short label in the report, e.g. ``"size"``.
    title: str
    #: One of :data:`VERDICTS`.
    verdict: str
    #: One line with human sizes.
    summary: str
    #: The raw figures (sizes in bytes, under keys ending in ``_bytes``).
    detail: dict[str, Any] = field(default_factory=dict)
    #: One line saying what to do, for a ``warn`` or ``problem`` verdict (or a
    #: hint, for an ``info`` one).
    remedy: Optional[str] = None

    def to_json(self) -> dict[str, Any]:
        """The result as a JSON-ready dict, with a ``human`` string for every byte figure."""
        data = dataclasses.asdict(self)
        data["human"] = _human_figures(self.detail)
        return data


@dataclass
class BackendTrial:
    """The outcome of trying one backend for real (see :func:`try_backend`)."""

    #: The backend's registered name.
    name: str
    #: Whether create, attach from a child, write, read and unlink all worked.
    works: bool
    #: One line: the round-trip time, or why the backend is unusable.
    summary: str
    #: The exception text (or the child's complaint) when it does not work.
    reason: Optional[str] = None
    #: One line saying what to do, when it does not work.
    remedy: Optional[str] = None
    #: Raw figures: ``size_bytes`` and timings in seconds (``*_s``).
    detail: dict[str, Any] = field(default_factory=dict)

    @property
    def verdict(self) -> str:
        """``"works"`` or ``"unusable"``."""
        return "works" if self.works else "unusable"

    def to_json(self) -> dict[str, Any]:
        """The trial as a JSON-ready dict."""
        data = dataclasses.asdict(self)
        data["verdict"] = self.verdict
        data["human"] = _human_figures(self.detail)
        return data


# --------------------------------------------------------------------------
# Small helpers


def human_size(n: Optional[int]) -> str:
    """A byte count for people: ``'512 bytes'``, ``'64 MiB'``, ``'23.5 GiB'``."""
    if n is None:
        return "unknown"
    if n < 1024:
        return "1 byte" if n == 1 else f"{n} bytes"
    value = float(n)
    for unit in ("KiB", "MiB", "GiB", "TiB", "PiB", "EiB"):
        value /= 1024
        if value < 1024 or unit == "EiB":
            break
    if value == int(value):
        return f"{int(value)} {unit}"
    return f"{value:.1f} {unit}"


def _limit_text(n: Optional[int]) -> str:
    if n is None:
        return "unknown"
    return "no limit" if n >= NO_LIMIT else human_size(n)


def _human_figures(detail: Mapping[str, Any]) -> dict[str, str]:
    return {
        key: _limit_text(value)
        for key, value in detail.items()
        if key.endswith("_bytes") and isinstance(value, int) and not isinstance(value, bool)
    }


def _page_size() -> int:
    try:
        return int(os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return 4096


def _percent(part: int, whole: int) -> str:
    return f"{100 * part / whole:.0f}%" if whole else "n/a"





def in_container(root: str = "/", environ: Optional[Mapping[str, str]] = None) -> bool:
    """Whether this process seems to run in a container (Docker, Podman, Kubernetes, LXC)."""
    env = os.environ if environ is None else environ
    if env.get("container") or env.get("KUBERNETES_SERVICE_HOST"):
        return True
    if any(os.path.exists(os.path.join(root, p)) for p in (".dockerenv", "run/.containerenv")):
        return True
    cgroup = _system.read_text(os.path.join(root, "proc/1/cgroup")) or ""
    return bool(re.search(r"docker|kubepods|containerd|libpod|lxc", cgroup))


def _statvfs(path: str) -> Optional[tuple[int, int, int]]:
    """(total, free to us, used) bytes of the filesystem holding *path*, or None."""
    try:
        st = os.statvfs(path)
    except OSError:
        return None
    total = st.f_blocks * st.f_frsize
    return total, st.f_bavail * st.f_frsize, total - st.f_bfree * st.f_frsize


# --------------------------------------------------------------------------
# /dev/shm


def check_shm_dir(
    path: str = "/dev/shm",
    proc: str = "/proc",
    container: Optional[bool] = None,
) -> CheckResult:
    """Size, free space, mount options and permissions of *path* (POSIX shared memory).

    A size below :data:`SMALL_SHM` (Docker's 64 MiB default included) is a
    problem, little free space a warning; so is a tmpfs larger than RAM and
    swap together (filling it exhausts memory before it reports ENOSPC).
    """
    name, area, title = "shm.dir", "/dev/shm (POSIX shared memory)", "size"
    if container is None:
        container = in_container()
    remedy = _REMEDY_SHM_CONTAINER if container else _REMEDY_SHM_HOST
    if not os.path.isdir(path):
        if sys.platform.startswith("linux"):
            return CheckResult(
                name, area, title, "problem",
                f"{path} does not exist: the posix backend has nowhere to put segments",
                {"path": path, "exists": False},
                f"mount a tmpfs there (mount -t tmpfs -o size=2g,mode=1777 tmpfs {path}), "
                "or use the mmap backend (MPSHM_BACKEND=mmap)",
            )
        return CheckResult(
            name, area, title, "info",
            f"no {path} on {sys.platform}: POSIX shared memory lives elsewhere here",
            {"path": path, "exists": False},
        )
    figures = _statvfs(path)
    mount = _system.mount_of(os.path.realpath(path), _system.mounts(proc))
    st = os.stat(path)
    detail: dict[str, Any] = {
        "path": path,
        "exists": True,
        "fstype": mount.fstype if mount else None,
        "mount_point": mount.point if mount else None,
        "mount_options": list(mount.options) if mount else [],
        "mode": f"{stat.S_IMODE(st.st_mode):04o}",
        "writable": os.access(path, os.W_OK | os.X_OK),
        "container": container,
    }
    if figures is None:
        return CheckResult(name, area, title, "info", f"cannot statvfs {path}", detail)
    total, free, used = figures
    memory = _system.meminfo(proc)
    ram_swap = memory.get("MemTotal", 0) + memory.get("SwapTotal", 0)
    detail.update(total_bytes=total, free_bytes=free, used_bytes=used,
                  ram_and_swap_bytes=ram_swap or None)
    options = ",".join(mount.options) if mount else "mount unknown"
    summary = (
        f"{human_size(total)}, {human_size(free)} free ({_percent(used, total)} used); "
        f"{detail['fstype'] or '?'} {options}"
    )
    if mount is not None and "ro" in mount.options:
        return CheckResult(name, area, title, "problem", summary + ": mounted read-only", detail,
                           f"remount it read-write (mount -o remount,rw {path})")
    if not detail["writable"]:
        return CheckResult(
            name, area, title, "problem",
            f"{summary}: not writable by uid {os.getuid()} (mode {detail['mode']})", detail,
            f"chmod 1777 {path} (as root), or use the mmap backend (MPSHM_BACKEND=mmap)",
        )
    if total == DOCKER_DEFAULT_SHM:
        return CheckResult(
            name, area, title, "problem",
            f"{summary}: Docker's default size, too small for real work", detail, remedy,
        )
    if total < SMALL_SHM:
        return CheckResult(
            name, area, title, "problem",
            f"{summary}: below {human_size(SMALL_SHM)}, too small for real work", detail, remedy,
        )
    if free < LOW_FREE or free < total * LOW_FREE_FRACTION:
        return CheckResult(
            name, area, title, "warn", f"{summary}: little free space", detail,
            "unlink segments nobody uses (mpshm list, mpshm gc), or " + remedy,
        )
    if ram_swap and total > ram_swap:
        return CheckResult(
            name, area, title, "warn",
            f"{summary}: larger than RAM and swap ({human_size(ram_swap)}), so filling it "
            "exhausts memory before ENOSPC", detail,
            f"give it a size below memory (mount -o remount,size={max(1, ram_swap >> 31)}g "
            f"{path}: half of it)",
        )
    if st.st_mode & stat.S_IWOTH and not st.st_mode & stat.S_ISVTX:
        return CheckResult(
            name, area, title, "warn",
            f"{summary}: world-writable without the sticky bit, anyone may delete segments",
            detail, f"chmod +t {path}",
        )
    return CheckResult(name, area, title, "ok", summary, detail)


# --------------------------------------------------------------------------
# System V


def check_sysv_limits(proc: str = "/proc", page_size: Optional[int] = None) -> CheckResult:
    """``kernel.shmmax`` (largest segment), ``kernel.shmall`` (all segments, in pages)
    and ``kernel.shmmni`` (number of segments)."""
    name, area, title = "sysv.limits", "System V shared memory", "limits"
    page = page_size or _page_size()
    base = os.path.join(proc, "sys", "kernel")
    shmmax = _system.read_int(os.path.join(base, "shmmax"))
    shmall = _system.read_int(os.path.join(base, "shmall"))
    shmmni = _system.read_int(os.path.join(base, "shmmni"))
    if shmmax is None and shmall is None and shmmni is None:
        return CheckResult(name, area, title, "info",
                           f"no {base}/shm*: System V limits unknown on {sys.platform}", {})
    shmall_bytes = shmall * page if shmall is not None else None
    detail: dict[str, Any] = {
        "shmmax_bytes": shmmax, "shmall_pages": shmall, "shmall_bytes": shmall_bytes,
        "shmmni": shmmni, "page_size_bytes": page,
    }
    pages = f" ({shmall} pages)" if shmall_bytes is not None and shmall_bytes < NO_LIMIT else ""
    summary = (
        f"shmmax {_limit_text(shmmax)}, shmall {_limit_text(shmall_bytes)}{pages}, "
        f"shmmni {shmmni if shmmni is not None else 'unknown'}"
    )
    worst, why = "ok", []
    for label, value in (("kernel.shmmax", shmmax), ("kernel.shmall", shmall_bytes)):
        if value is None:
            continue
        if value < 1 << 20:
            worst = "problem"
            why.append(f"{label} {human_size(value)} leaves no room for real segments")
        elif value < SMALL_SHM:
            worst = "problem" if worst == "problem" else "warn"
            why.append(f"{label} {human_size(value)} is small")
    if shmmni is not None and shmmni < 256:
        worst = "problem" if shmmni < 16 or worst == "problem" else "warn"
        why.append(f"kernel.shmmni {shmmni} allows few segments")
    if worst == "ok":
        return CheckResult(name, area, title, "ok", summary, detail)
    return CheckResult(
        name, area, title, worst, f"{summary}: {'; '.join(why)}", detail,
        "raise them: sysctl -w kernel.shmmax=17179869184 kernel.shmall=4194304 "
        "kernel.shmmni=4096 (persist in /etc/sysctl.d/; a container: docker run --sysctl)",
    )


def _sysv_segments(proc: str) -> Optional[list[dict[str, int]]]:
    text = _system.read_text(os.path.join(proc, "sysvipc", "shm"))
    if text is None:
        return None
    segments = []
    for line in text.splitlines()[1:]:
        fields = line.split()
        if len(fields) < 8:
            continue
        try:
            segments.append({"key": int(fields[0]), "shmid": int(fields[1]),
                             "size": int(fields[3]), "nattch": int(fields[6]),
                             "uid": int(fields[7])})
        except ValueError:
            continue
    return segments


def check_sysv_usage(proc: str = "/proc", page_size: Optional[int] = None) -> CheckResult:
    """How many System V segments and bytes are in use, against shmmni and shmall."""
    name, area, title = "sysv.usage", "System V shared memory", "in use"
    page = page_size or _page_size()
    segments = _sysv_segments(proc)
    if segments is None:
        return CheckResult(name, area, title, "info",
                           f"no {os.path.join(proc, 'sysvipc', 'shm')}: usage unknown", {})
    count = len(segments)
    used = sum(s["size"] for s in segments)
    used_pages = sum(-(-s["size"] // page) for s in segments)
    unattached = sum(1 for s in segments if s["nattch"] == 0)
    mine = sum(1 for s in segments if s["uid"] == os.getuid())
    shmmni = _system.read_int(os.path.join(proc, "sys", "kernel", "shmmni"))
    shmall = _system.read_int(os.path.join(proc, "sys", "kernel", "shmall"))
    detail: dict[str, Any] = {
        "segments": count, "used_bytes": used, "used_pages": used_pages,
        "unattached": unattached, "owned_by_me": mine, "shmmni": shmmni,
        "shmall_pages": shmall,
    }
    summary = (
        f"{count} segment{'s' if count != 1 else ''}, {human_size(used)}"
        f"{f' ({unattached} with nobody attached)' if unattached else ''}"
    )
    if shmmni:
        summary += f"; {_percent(count, shmmni)} of shmmni"
    if shmall and shmall * page < NO_LIMIT:
        summary += f", {_percent(used_pages, shmall)} of shmall"
    remedy = ("remove segments nobody uses (ipcs -m; ipcrm -m <shmid>; mpshm gc), or raise "
              "sysctl kernel.shmmni / kernel.shmall")
    if (shmmni and count >= shmmni) or (shmall and used_pages >= shmall):
        return CheckResult(name, area, title, "problem", summary + ": the limit is reached",
                           detail, remedy)
    if (shmmni and count >= 0.9 * shmmni) or (shmall and used_pages >= 0.9 * shmall):
        return CheckResult(name, area, title, "warn", summary + ": nearly used up", detail,
                           remedy)
    return CheckResult(name, area, title, "ok", summary, detail)


def check_sysv_rmid_forced(proc: str = "/proc") -> CheckResult:
    """``kernel.shm_rmid_forced``: when 1, a System V segment is destroyed as soon as
    no process has it attached, so one cannot be handed over by name."""
    name, area, title = "sysv.rmid_forced", "System V shared memory", "shm_rmid_forced"
    path = os.path.join(proc, "sys", "kernel", "shm_rmid_forced")
    value = _system.read_int(path)
    if value is None:
        return CheckResult(name, area, title, "info", f"no {path}", {"shm_rmid_forced": None})
    detail = {"shm_rmid_forced": value}
    if value:
        return CheckResult(
            name, area, title, "warn",
            "1: a System V segment is destroyed when its last process detaches, so a segment "
            "created, closed and attached later by name is gone", detail,
            "sysctl -w kernel.shm_rmid_forced=0, or keep the creator attached (or use posix)",
        )
    return CheckResult(name, area, title, "ok",
                       "0: segments stay until unlinked, attached or not", detail)


# --------------------------------------------------------------------------
# Huge pages


_THP_MEANING = {
    "always": "huge pages whenever possible",
    "within_size": "huge pages within the segment's size",
    "advise": "huge pages only where madvise(MADV_HUGEPAGE) asks",
    "never": "no huge pages",
    "deny": "no huge pages anywhere, /dev/shm included (emergency setting)",
    "force": "huge pages forced everywhere, /dev/shm included (testing setting)",
}


def check_thp_shmem(
    sysfs: str = "/sys", proc: str = "/proc", shm_dir: str = "/dev/shm"
) -> CheckResult:
    """Transparent huge pages for shared memory: ``shmem_enabled`` (System V segments,
    shared anonymous memory) and the ``huge=`` option of /dev/shm's tmpfs (POSIX)."""
    name, area, title = "thp.shmem", "Huge pages", "THP for shmem"
    path = os.path.join(sysfs, "kernel", "mm", "transparent_hugepage", "shmem_enabled")
    text = _system.read_text(path)
    mount = _system.mount_of(os.path.realpath(shm_dir), _system.mounts(proc))
    huge = mount.option("huge") if mount is not None and mount.fstype == "tmpfs" else None
    detail: dict[str, Any] = {"shmem_enabled": None, "shm_dir_huge": huge}
    if text is None:
        return CheckResult(name, area, title, "info",
                           f"no {path}: this kernel has no transparent huge pages for shmem",
                           detail)
    value = _system.selected(text)
    detail["shmem_enabled"] = value
    posix = value if value in ("deny", "force") else (huge or "never")
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
            rollup = _system.read_text("/proc/self/smaps_rollup") or ""
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
    anon = _system.selected(_system.read_text(os.path.join(thp, "enabled")) or "")
    shmem = _system.selected(_system.read_text(os.path.join(thp, "shmem_enabled")) or "")
    mount = _system.mount_of(os.path.realpath(shm_dir), _system.mounts(proc))
    huge = mount.option("huge") if mount is not None and mount.fstype == "tmpfs" else None
    posix = shmem if shmem in ("deny", "force") else (huge or "never")
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
    info = _system.meminfo(proc)
    mounts = [m.point for m in _system.mounts(proc) if m.fstype == "hugetlbfs"]
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


# --------------------------------------------------------------------------
# Process limits


def check_max_map_count(proc: str = "/proc") -> CheckResult:
    """``vm.max_map_count`` against the maps this process uses: each mapped segment is
    (at least) one map, so it bounds how many segments one process can map at once."""
    name, area, title = "vm.max_map_count", "Process limits", "map count"
    path = os.path.join(proc, "sys", "vm", "max_map_count")
    limit = _system.read_int(path)
    maps = _system.read_text(os.path.join(proc, "self", "maps"))
    in_use = len(maps.splitlines()) if maps is not None else None
    detail = {"max_map_count": limit, "maps_in_use": in_use}
    if limit is None:
        return CheckResult(name, area, title, "info", f"no {path}: no per-process map limit known",
                           detail)
    room = limit - (in_use or 0)
    detail["room"] = room
    summary = (f"vm.max_map_count {limit}, {in_use if in_use is not None else '?'} in use "
               f"here: room for about {room} more mapped segments per process")
    remedy = "sysctl -w vm.max_map_count=262144 (persist in /etc/sysctl.d/)"
    if room < 1000:
        return CheckResult(name, area, title, "problem", summary, detail, remedy)
    if limit < 65530:
        return CheckResult(name, area, title, "warn", summary + " (below the default 65530)",
                           detail, remedy)
    return CheckResult(name, area, title, "ok", summary, detail)


def _rlimit_text(value: int) -> str:
    return "unlimited" if value == resource.RLIM_INFINITY else str(value)


def check_open_files(limits: Optional[tuple[int, int]] = None) -> CheckResult:
    """The open-file limit (``RLIMIT_NOFILE``, soft and hard).

    mpshm closes a segment's descriptor once it is mapped (posix, mmap) and
    System V segments have none, so this limit does not bound the number of
    segments; it matters to the pipes and sockets of the processes around them.
    """
    name, area, title = "rlimit.nofile", "Process limits", "open files"
    soft, hard = limits if limits is not None else resource.getrlimit(resource.RLIMIT_NOFILE)
    detail = {"soft": None if soft == resource.RLIM_INFINITY else soft,
              "hard": None if hard == resource.RLIM_INFINITY else hard}
    summary = (f"soft {_rlimit_text(soft)}, hard {_rlimit_text(hard)} (mpshm keeps no "
               "descriptor open per segment)")
    if soft != resource.RLIM_INFINITY and soft < 256:
        return CheckResult(
            name, area, title, "warn", summary, detail,
            f"ulimit -n {_rlimit_text(hard)} (up to the hard limit; LimitNOFILE= in a unit)",
        )
    return CheckResult(name, area, title, "ok", summary, detail)


def check_address_space(limits: Optional[tuple[int, int]] = None) -> CheckResult:
    """The address-space limit (``RLIMIT_AS``, ``ulimit -v``): every mapped segment
    counts against it, so a limit makes large mappings fail with ENOMEM."""
    name, area, title = "rlimit.as", "Process limits", "address space"
    soft, hard = limits if limits is not None else resource.getrlimit(resource.RLIMIT_AS)
    detail = {"soft_bytes": None if soft == resource.RLIM_INFINITY else soft,
              "hard_bytes": None if hard == resource.RLIM_INFINITY else hard}
    if soft == resource.RLIM_INFINITY:
        return CheckResult(name, area, title, "ok", "unlimited (ulimit -v)", detail)
    return CheckResult(
        name, area, title, "warn",
        f"{human_size(soft)} (ulimit -v): all of a process's mappings, segments included, "
        "must fit", detail,
        "ulimit -v unlimited (or raise it above the segments a process maps)",
    )


# --------------------------------------------------------------------------
# cgroup memory limit


def _cgroup_lines(proc: str) -> Optional[list[tuple[str, list[str], str]]]:
    text = _system.read_text(os.path.join(proc, "self", "cgroup"))
    if text is None:
        return None
    lines = []
    for line in text.splitlines():
        parts = line.split(":", 2)
        if len(parts) == 3:
            lines.append((parts[0], parts[1].split(",") if parts[1] else [], parts[2]))
    return lines


def _walk_limit(
    base: str, path: str, limit_file: str, usage_file: str, unlimited: Callable[[str], bool]
) -> tuple[Optional[int], Optional[str], Optional[int], bool]:
    """Smallest limit in *limit_file* from ``base/path`` up to *base*:
    (limit or None, the cgroup that sets it, usage of the innermost cgroup, found any)."""
    relative = os.path.normpath("/" + path.lstrip("/")).lstrip("/")
    parts = [] if relative in ("", ".") else relative.split("/")
    best: Optional[int] = None
    where: Optional[str] = None
    usage: Optional[int] = None
    found = False
    for depth in range(len(parts), -1, -1):
        directory = os.path.join(base, *parts[:depth])
        text = _system.read_text(os.path.join(directory, limit_file))
        if usage is None:
            usage = _system.read_int(os.path.join(directory, usage_file))
        if text is None:
            continue
        found = True
        value = text.strip()
        if unlimited(value):
            continue
        try:
            number = int(value)
        except ValueError:
            continue
        if best is None or number < best:
            best, where = number, "/" + "/".join(parts[:depth])
    return best, where, usage, found


def check_cgroup_memory(
    proc: str = "/proc", sysfs: str = "/sys", shm_size: Optional[int] = None
) -> CheckResult:
    """This process's cgroup memory limit against /dev/shm's size (*shm_size*; None:
    ``statvfs("/dev/shm")``).

    Pages in /dev/shm (and System V segments) are charged to the cgroup of
    the process that touches them, so a limit below /dev/shm's size means a
    process filling /dev/shm is OOM-killed rather than told ENOSPC.
    """
    name, area, title = "cgroup.memory", "Memory cgroup", "memory limit"
    if shm_size is None:
        figures = _statvfs("/dev/shm")
        shm_size = figures[0] if figures else None
    lines = _cgroup_lines(proc)
    detail: dict[str, Any] = {"version": None, "cgroup": None, "limit_bytes": None,
                              "limit_set_by": None, "usage_bytes": None,
                              "shm_size_bytes": shm_size}
    if lines is None:
        return CheckResult(name, area, title, "info",
                           f"no {proc}/self/cgroup: no cgroups here ({sys.platform})", detail)
    root = os.path.join(sysfs, "fs", "cgroup")
    limit = where = usage = None
    found = False
    v2 = [path for hid, controllers, path in lines if hid == "0" and not controllers]
    v2_controllers = (_system.read_text(os.path.join(root, "cgroup.controllers")) or "").split()
    if v2 and "memory" in v2_controllers:
        detail.update(version=2, cgroup=v2[0])
        limit, where, usage, found = _walk_limit(
            root, v2[0], "memory.max", "memory.current", lambda v: v == "max")
    else:
        for _hid, controllers, path in lines:
            if "memory" in controllers:
                detail.update(version=1, cgroup=path)
                for base in (os.path.join(root, ",".join(controllers)),
                             os.path.join(root, "memory")):
                    if os.path.isdir(base):
                        limit, where, usage, found = _walk_limit(
                            base, path, "memory.limit_in_bytes", "memory.usage_in_bytes",
                            lambda v: v.isdigit() and int(v) >= NO_LIMIT)
                        break
                break
    detail.update(limit_bytes=limit, limit_set_by=where, usage_bytes=usage)
    if detail["version"] is None or not found:
        return CheckResult(name, area, title, "ok",
                           "no memory cgroup limit found (no memory controller for this process)",
                           detail)
    label = f"cgroup v{detail['version']} {detail['cgroup']}"
    if limit is None:
        return CheckResult(name, area, title, "ok", f"no limit ({label})", detail)
    summary = (f"{human_size(limit)}"
               f"{f', {human_size(usage)} used' if usage is not None else ''} ({label}"
               f"{f', set by {where}' if where != detail['cgroup'] else ''})")
    if shm_size is not None and limit < shm_size:
        return CheckResult(
            name, area, title, "warn",
            f"{summary}: below /dev/shm's size {human_size(shm_size)}, so a process filling "
            "/dev/shm is OOM-killed rather than getting ENOSPC", detail,
            "raise the memory limit above /dev/shm's size (docker run --memory, Kubernetes "
            "resources.limits.memory), or make /dev/shm smaller than the limit (--shm-size)",
        )
    if shm_size is not None:
        summary += f", above /dev/shm's size {human_size(shm_size)}"
    return CheckResult(name, area, title, "ok", summary, detail)


# --------------------------------------------------------------------------
# systemd-logind RemoveIPC


_TRUE = frozenset({"1", "yes", "y", "true", "t", "on"})
_FALSE = frozenset({"0", "no", "n", "false", "f", "off"})


def _logind_setting(path: str) -> Optional[bool]:
    """The last valid ``RemoveIPC=`` of the ``[Login]`` section of *path*, or None."""
    text = _system.read_text(path)
    if text is None:
        return None
    section: Optional[str] = None
    value: Optional[bool] = None
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line[0] in "#;":
            continue
        if line.startswith("[") and line.endswith("]"):
            section = line[1:-1].strip()
            continue
        key, sep, rest = line.partition("=")
        if sep and section == "Login" and key.strip() == "RemoveIPC":
            word = rest.strip().lower()
            if word in _TRUE:
                value = True
            elif word in _FALSE:
                value = False
    return value


def _system_uid_max(etc: str) -> tuple[int, str]:
    """The largest system uid: logind's is fixed when systemd is built, usually from
    ``SYS_UID_MAX`` (or ``UID_MIN - 1``) of /etc/login.defs; 999 otherwise."""
    values: dict[str, int] = {}
    for line in (_system.read_text(os.path.join(etc, "login.defs")) or "").splitlines():
        parts = line.split()
        if len(parts) >= 2 and not parts[0].startswith("#"):
            try:
                values[parts[0]] = int(parts[1])
            except ValueError:
                pass
    if "SYS_UID_MAX" in values:
        return values["SYS_UID_MAX"], "SYS_UID_MAX in login.defs"
    if "UID_MIN" in values:
        return values["UID_MIN"] - 1, "UID_MIN in login.defs, minus 1"
    return 999, "the usual default"


def _process_running(proc: str, comm: str) -> bool:
    """Whether a process whose ``comm`` is *comm* is visible in *proc*."""
    try:
        pids = [e for e in os.listdir(proc) if e.isdigit()]
    except OSError:
        return False
    return any((_system.read_text(os.path.join(proc, pid, "comm")) or "").strip() == comm
               for pid in pids)


def check_remove_ipc(
    etc: str = "/etc",
    run: str = "/run",
    usr: str = "/usr",
    uid: Optional[int] = None,
    binaries: Optional[Sequence[str]] = None,
    proc: str = "/proc",
) -> CheckResult:
    """systemd-logind's ``RemoveIPC=``: when on (the upstream default), the segments of
    a non-system user are deleted when that user's last session ends.

    Reads the main logind.conf (the first of /etc, /run, /usr/local/lib,
    /usr/lib) and the drop-ins ``logind.conf.d/*.conf`` of those directories
    (sorted by file name, a name in /etc hiding the same name further down,
    the last setting winning), as logind.conf(5) describes. Root and system
    users (uid at most the system range's end, normally 999) are exempt.
    logind counts as running when a ``systemd-logind`` process is visible in
    *proc*, or systemd is init (``/run/systemd/system``) and logind is installed.
    """
    name, area, title = "logind.remove_ipc", "systemd-logind", "RemoveIPC"
    uid = os.getuid() if uid is None else uid
    dirs = [os.path.join(etc, "systemd"), os.path.join(run, "systemd"),
            os.path.join(usr, "local", "lib", "systemd"), os.path.join(usr, "lib", "systemd")]
    if binaries is None:
        binaries = [os.path.join(usr, "lib", "systemd", "systemd-logind"),
                    "/lib/systemd/systemd-logind"]
    installed = any(os.path.exists(b) for b in binaries)
    systemd_running = os.path.isdir(os.path.join(run, "systemd", "system"))
    # A process named systemd-logind is proof; systemd as init with logind installed is
    # taken as running too (/proc mounted with hidepid= hides other users' processes).
    running = _process_running(proc, "systemd-logind") or (systemd_running and installed)
    value: Optional[bool] = None
    source = "the upstream default"
    files: list[str] = []
    main = next((p for p in (os.path.join(d, "logind.conf") for d in dirs)
                 if os.path.isfile(p)), None)
    if main is not None:
        files.append(main)
    dropins: dict[str, str] = {}
    for directory in reversed(dirs):  # /etc last, so its files hide the others' of that name
        try:
            names = os.listdir(os.path.join(directory, "logind.conf.d"))
        except OSError:
            continue
        for entry in names:
            if entry.endswith(".conf"):
                dropins[entry] = os.path.join(directory, "logind.conf.d", entry)
    files += [dropins[n] for n in sorted(dropins)]
    for path in files:
        found = _logind_setting(path)
        if found is not None:
            value, source = found, path
    effective = True if value is None else value
    system_max, system_source = _system_uid_max(etc)
    exempt = uid <= system_max
    detail: dict[str, Any] = {
        "remove_ipc": effective, "configured": value, "source": source, "files": files,
        "logind_installed": installed, "systemd_running": systemd_running,
        "logind_running": running, "uid": uid, "system_uid_max": system_max,
        "system_uid_max_source": system_source, "applies": running and effective and not exempt,
    }
    setting = f"RemoveIPC={'yes' if effective else 'no'} ({source})"
    kind = "root" if uid == 0 else "a system user"
    if not running:
        state = "installed but not running" if installed else "not installed"
        effect = f"uid {uid} exempt" if exempt else f"uid {uid} affected"
        return CheckResult(
            name, area, title, "ok",
            f"systemd-logind {state}: nothing deletes segments at logout (if it ran: "
            f"RemoveIPC={'yes' if effective else 'no'}, {effect})", detail,
        )
    if not effective:
        return CheckResult(name, area, title, "ok",
                           f"{setting}: segments survive logout", detail)
    if exempt:
        return CheckResult(
            name, area, title, "ok",
            f"{setting}, but uid {uid} is {kind} (up to {system_max}): exempt", detail)
    who = f"uid {uid} is not a system user (above {system_max})"
    return CheckResult(
        name, area, title, "problem",
        f"{setting}, and {who}: its segments are deleted when its last session ends", detail,
        _REMEDY_REMOVE_IPC,
    )


# --------------------------------------------------------------------------
# The mmap backend's directory, and the settings


def _tmpfs_hint(mounts: Sequence[_system.Mount]) -> str:
    """Where to put the mmap backend's segments for memory speed, on this machine."""
    shm = _system.mount_of("/dev/shm", mounts)
    where = (f"such as /dev/shm/mpshm-{os.getuid()}" if shm is not None and shm.point == "/dev/shm"
             and shm.fstype == "tmpfs" else "(mount -t tmpfs)")
    return (f"for memory speed every time, set MPSHM_DIR (or pass dir=) to a directory on a "
            f"tmpfs, {where}; it counts against that tmpfs's size")


def check_mmap_dir(path: Optional[str] = None, proc: str = "/proc") -> CheckResult:
    """The directory the mmap backend puts segments in (default:
    :func:`mpshm.backends.mmapfile.default_dir`): usable, its filesystem (what
    backs it: RAM for a tmpfs, a disk otherwise, with a hint), its free space."""
    from ..backends.mmapfile import check_dir, default_dir

    name, area, title = "mmap.dir", "mmap backend", "directory"
    source = "MPSHM_DIR" if path is None and os.environ.get("MPSHM_DIR") else "default"
    if path is None:
        path = default_dir()
    else:
        source = "given"
    detail: dict[str, Any] = {"path": path, "source": source, "exists": os.path.lexists(path)}
    if not detail["exists"]:
        parent = os.path.dirname(path.rstrip("/")) or "/"
        while not os.path.exists(parent) and parent != "/":
            parent = os.path.dirname(parent)
        if not os.access(parent, os.W_OK | os.X_OK):
            return CheckResult(
                name, area, title, "problem",
                f"{path} does not exist and cannot be created ({parent} is not writable)",
                detail, _REMEDY_MMAP_DIR)
        where = parent
    else:
        try:
            check_dir(path, create=False)
        except OSError as exc:
            detail["error"] = str(exc)
            return CheckResult(name, area, title, "problem", f"unusable: {exc}", detail,
                               _REMEDY_MMAP_DIR)
        where = path
    mounts = _system.mounts(proc)
    mount = _system.mount_of(os.path.realpath(where), mounts)
    figures = _statvfs(where)
    fstype = mount.fstype if mount else None
    backed_by = ("ram" if fstype in _RAM_FS else "network" if fstype in _NETWORK_FS
                 else "disk" if fstype else "unknown")
    detail.update(fstype=fstype, mount_point=mount.point if mount else None, backed_by=backed_by)
    state = "" if detail["exists"] else " (created with mode 0700 on first use)"
    if figures is None:
        return CheckResult(name, area, title, "info", f"{path}{state}: cannot statvfs", detail)
    total, free, _used = figures
    detail.update(total_bytes=total, free_bytes=free)
    kind = {"ram": "RAM: memory speed", "network": "a network filesystem",
            "disk": "a disk: page cache, written back to the disk",
            "unknown": "unknown filesystem"}[backed_by]
    summary = f"{path}{state}: {fstype or '?'} ({kind}), {human_size(free)} free"
    if backed_by == "network":
        return CheckResult(
            name, area, title, "warn",
            f"{summary}: a network filesystem shares mappings only within one machine, slowly",
            detail, "set MPSHM_DIR (or dir=) to a local directory, a tmpfs for memory speed")
    if free < SMALL_SHM:
        return CheckResult(name, area, title, "warn", summary + ": little free space", detail,
                           "free space there, or set MPSHM_DIR (or dir=) to a larger filesystem")
    if backed_by != "ram":
        # Not wrong, but irregular: segments are files whose dirty pages the kernel
        # writes back to the disk. As fast as a tmpfs while they stay in the page
        # cache; several times slower when writeback or a busy disk gets in the way.
        return CheckResult(
            name, area, title, "info",
            f"{summary}: mmap's speed here depends on the disk (the kernel writes the "
            "segments back to it), from as fast as a tmpfs to several times slower",
            detail, _tmpfs_hint(mounts))
    return CheckResult(name, area, title, "ok", summary, detail)


def check_settings(environ: Optional[Mapping[str, str]] = None) -> CheckResult:
    """The default backend (``MPSHM_BACKEND``) and the mmap directory setting (``MPSHM_DIR``)."""
    from .. import backends

    env = os.environ if environ is None else environ
    name, area, title = "settings", "Settings", "default backend"
    chosen = env.get("MPSHM_BACKEND") or None
    detail: dict[str, Any] = {"MPSHM_BACKEND": chosen, "MPSHM_DIR": env.get("MPSHM_DIR"),
                              "registered": sorted(backends.registry)}
    if chosen is not None and chosen not in backends.registry:
        return CheckResult(
            name, area, title, "problem",
            f"MPSHM_BACKEND={chosen!r} names no backend: every call without backend= fails",
            detail, f"unset MPSHM_BACKEND or set it to one of: {', '.join(detail['registered'])}")
    default = chosen or "posix"
    detail["default"] = default
    why = "MPSHM_BACKEND" if chosen else "MPSHM_BACKEND unset"
    return CheckResult(name, area, title, "ok", f"{default} ({why})", detail)


#: The checks :func:`run_checks` runs, in report order.
CHECKS: tuple[Callable[[], CheckResult], ...] = (
    check_shm_dir,
    check_sysv_limits,
    check_sysv_usage,
    check_sysv_rmid_forced,
    check_thp_shmem,
    check_thp_gain,
    check_hugetlb,
    check_max_map_count,
    check_open_files,
    check_address_space,
    check_cgroup_memory,
    check_remove_ipc,
    check_mmap_dir,
    check_settings,
)


def run_checks(checks: Iterable[Callable[[], CheckResult]] = CHECKS) -> list[CheckResult]:
    """Run *checks*; one that fails unexpectedly gives an ``info`` result saying so."""
    results = []
    for check in checks:
        try:
            results.append(check())
        except Exception as exc:  # a check must never take the report down
            label = check.__name__.removeprefix("check_")
            results.append(CheckResult(label, "Other", label, "info",
                                       f"could not check: {type(exc).__name__}: {exc}",
                                       {"error": repr(exc)}))
    return results


# --------------------------------------------------------------------------
# Backends tried for real


_CHILD = textwrap.dedent(
    """
    import hashlib, json, sys, time
    start = time.perf_counter()
    from mpshm import SharedMemory
    imported = time.perf_counter()
    name, backend, size, digest, token = sys.argv[1:]
    size = int(size)
    shm = SharedMemory(name, backend=backend)
    attached = time.perf_counter()
    try:
        view = shm.buf[:size]
        if hashlib.sha256(view).hexdigest() != digest:
            raise SystemExit("the child read different bytes than the parent wrote")
        reply = bytes.fromhex(token)
        view[:] = (reply * (size // len(reply) + 1))[:size]
        view.release()
    finally:
        shm.close()
    print(json.dumps({"import_s": imported - start, "attach_s": attached - imported}))
    """
)


def _pattern(token: bytes, size: int) -> bytes:
    return (token * (size // len(token) + 1))[:size]


def _child_env() -> dict[str, str]:
    """The child's environment: this mpshm first on the path, no tracker of ours."""
    import mpshm

    env = dict(os.environ)
    env.pop("MPSHM_TRACKER", None)
    top = os.path.dirname(os.path.dirname(os.path.abspath(mpshm.__file__)))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (top, env.get("PYTHONPATH")) if p)
    return env


def _trial_remedy(backend: str, exc: BaseException) -> Optional[str]:
    from .. import backends

    if isinstance(exc, ImportError):
        package = backends._PACKAGES.get(backend)
        return f"pip install {package}" if package else "install what the backend's module needs"
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.ENOMEM, errno.EDQUOT):
        return {
            "posix": "see the /dev/shm check above: " + _REMEDY_SHM_CONTAINER,
            "sysv": "raise sysctl kernel.shmmax / kernel.shmall / kernel.shmmni, or remove "
                    "unused segments (ipcs -m)",
            "mmap": "free space there, or set MPSHM_DIR (or dir=) to a larger filesystem",
        }.get(backend)
    if backend == "mmap" and isinstance(exc, OSError):
        return _REMEDY_MMAP_DIR
    if isinstance(exc, PermissionError):
        return "check the permissions the reason names"
    return None


class _TrialError(Exception):
    """A trial step that went wrong without an exception of its own (the child's complaint)."""


def try_backend(name: str, size: int = TRIAL_SIZE, timeout: float = TRIAL_TIMEOUT) -> BackendTrial:
    """Try backend *name* for real: create a *size*-byte segment (tracked, so that
    it goes even if the doctor is killed mid-trial),
    write a random pattern, have a child process (``sys.executable``) attach it by
    name, check the pattern and write a reply, read the reply, close and unlink.

    The segment is unlinked whatever happens. Returns a :class:`BackendTrial`:
    works with the timings, or unusable with the exception text as the reason.
    """
    from .. import backends
    from ..shared_memory import SharedMemory

    detail: dict[str, Any] = {"size_bytes": size}
    start = time.perf_counter()
    shm: Optional[SharedMemory] = None
    try:
        backend = backends.get(name)
        why_not = backend.available()
        if why_not is not None:
            raise _TrialError(why_not)
        shm = SharedMemory(create=True, size=size, backend=name)
        created = time.perf_counter()
        detail["create_s"] = created - start
        detail["segment"] = shm.name
        token = os.urandom(32)
        data = _pattern(token, size)
        shm.buf[:size] = data
        reply = os.urandom(32)
        try:
            child = subprocess.run(
                [sys.executable, "-c", _CHILD, shm.name, name, str(size),
                 hashlib.sha256(data).hexdigest(), reply.hex()],
                capture_output=True, text=True, timeout=timeout, env=_child_env(),
                stdin=subprocess.DEVNULL,
            )
        except subprocess.TimeoutExpired:
            raise _TrialError(
                f"the child process did not attach and answer within {timeout:g} s") from None
        detail["child_s"] = time.perf_counter() - created
        if child.returncode != 0:
            lines = (child.stderr or child.stdout).strip().splitlines()
            raise _TrialError(
                f"attaching from a child process failed (exit status {child.returncode}): "
                f"{lines[-1] if lines else 'no output'}")
        try:
            timings = json.loads(child.stdout.strip().splitlines()[-1])
            detail["child_attach_s"] = float(timings["attach_s"])
            detail["child_import_s"] = float(timings["import_s"])
        except (ValueError, KeyError, IndexError, TypeError):
            raise _TrialError(f"the child process said {child.stdout!r}") from None
        if bytes(shm.buf[:size]) != _pattern(reply, size):
            raise _TrialError("the parent did not read what the child process wrote")
    except Exception as exc:
        reason = str(exc) if isinstance(exc, _TrialError) else f"{type(exc).__name__}: {exc}"
        detail["total_s"] = time.perf_counter() - start
        return BackendTrial(name, False, reason, reason, _trial_remedy(name, exc), detail)
    finally:
        if shm is not None:
            shm.close()
            try:
                shm.unlink()
            except OSError:
                pass
    detail["total_s"] = time.perf_counter() - start
    summary = (
        f"round trip {detail['total_s'] * 1e3:.0f} ms for {human_size(size)}: create "
        f"{detail['create_s'] * 1e3:.1f} ms, child process {detail['child_s'] * 1e3:.0f} ms "
        f"(attach {detail['child_attach_s'] * 1e3:.1f} ms)"
    )
    return BackendTrial(name, True, summary, detail=detail)


def try_backends(
    names: Optional[Iterable[str]] = None, size: int = TRIAL_SIZE, timeout: float = TRIAL_TIMEOUT
) -> list[BackendTrial]:
    """:func:`try_backend` for each of *names* (default: every registered backend)."""
    from .. import backends

    return [try_backend(n, size, timeout) for n in (names or list(backends.registry))]


# --------------------------------------------------------------------------
# The report


def _arrow() -> str:
    encoding = getattr(sys.stdout, "encoding", None) or "ascii"
    try:
        "→".encode(encoding)
    except (UnicodeEncodeError, LookupError):
        return "fix:"
    return "→"


def _about_this_system() -> dict[str, Any]:
    from .. import __version__

    uid = os.getuid()
    return {
        "host": platform.node(), "system": platform.system(), "release": platform.release(),
        "python": platform.python_version(), "mpshm": __version__, "uid": uid,
        "container": in_container(),
    }


def _status(checks: Sequence[CheckResult], trials: Sequence[BackendTrial], strict: bool) -> int:
    if any(not t.works for t in trials):
        return 1
    if strict and any(c.verdict == "problem" for c in checks):
        return 1
    return 0


def _plural(n: int, word: str) -> str:
    return f"{'no' if n == 0 else n} {word}{'' if n == 1 else 's'}"


def format_report(
    checks: Sequence[CheckResult], trials: Sequence[BackendTrial], system: Mapping[str, Any],
    tried: bool = True, strict: bool = False,
) -> str:
    """The human report: a section per area, one aligned line per check, remedies indented."""
    arrow = _arrow()
    rows: list[tuple[str, str, str, str, Optional[str]]] = [
        (c.area, c.verdict, c.title, c.summary, c.remedy) for c in checks
    ]
    area = "Backends (create, attach from a child process, write, read, unlink)"
    rows += [(area, t.verdict, t.name, t.summary, t.remedy) for t in trials]
    verdict_width = max(len(r[1]) for r in rows) if rows else 8
    title_width = max(len(r[2]) for r in rows) if rows else 8
    who = "root" if system["uid"] == 0 else f"uid {system['uid']}"
    lines = [
        f"mpshm doctor: {system['host']}, {system['system']} {system['release']}, "
        f"Python {system['python']}, mpshm {system['mpshm']}, {who}"
        f"{', in a container' if system['container'] else ''}"
    ]
    current = None
    for row_area, verdict, title, summary, remedy in rows:
        if row_area != current:
            lines += ["", row_area]
            current = row_area
        lines.append(f"  {verdict:<{verdict_width}}  {title:<{title_width}}  {summary}")
        if remedy:
            lines.append(f"  {'':<{verdict_width}}  {'':<{title_width}}  {arrow} {remedy}")
    if not tried:
        lines += ["", "Backends: not tried (--no-backends)"]
    problems = sum(c.verdict == "problem" for c in checks)
    warnings = sum(c.verdict == "warn" for c in checks)
    working = sum(t.works for t in trials)
    status = _status(checks, trials, strict)
    head = (f"{working} of {len(trials)} backends work" if tried else "backends not tried")
    broken = [t.name for t in trials if not t.works]
    if broken:
        head += f" ({', '.join(broken)} unusable)"
    lines += [
        "",
        f"{head}; {_plural(problems, 'problem')}, {_plural(warnings, 'warning')}; "
        f"exit status {status}",
    ]
    return "\n".join(lines) + "\n"


_DESCRIPTION = """\
Check what on this machine decides whether shared memory works, then try every
backend for real. Each check gets a verdict (ok, info, warn, problem) and, for a
warning or a problem, the remedy in one line:

  /dev/shm          size, free space, mount options, permissions (Docker's 64 MiB
                    default, or anything below 512 MiB, is a problem)
  System V          kernel.shmmax, kernel.shmall, kernel.shmmni; segments and bytes
                    in use (/proc/sysvipc/shm); kernel.shm_rmid_forced
  Huge pages        transparent huge pages for shmem (shmem_enabled, /dev/shm's
                    huge= option); what huge pages would gain, measured (first
                    touch of 64 MiB with and without MADV_HUGEPAGE, about 0.3 s)
                    and the settings that give segments made with
                    huge_pages=True huge pages; reserved huge pages and
                    hugetlbfs mounts
  Process limits    vm.max_map_count (each mapped segment is a map), the open-file
                    limit (ulimit -n), the address-space limit (ulimit -v)
  Memory cgroup     a memory limit below /dev/shm's size (OOM kill instead of ENOSPC)
  systemd-logind    RemoveIPC=, which deletes a non-system user's segments at logout
  mmap backend      its directory (MPSHM_DIR or the default): safe, filesystem and
                    what backs it (RAM for a tmpfs, else a disk: slower), free
  Settings          the default backend (MPSHM_BACKEND)
  Backends          each one tried: create a 1 MiB segment, write a pattern, attach it
                    from a child process that checks it and replies, read, unlink
"""

_EPILOG = """\
exit status: 0 when every backend works, 1 when one is unusable (with --strict,
also when a check finds a problem); warnings never change it.
"""


def add_parser(subparsers: Any) -> None:
    """Register ``doctor``."""
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "doctor",
        help="check this machine's shared memory settings and try every backend",
        description=_DESCRIPTION,
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--json", action="store_true",
        help='print one JSON object {"checks": [...], "backends": [...], "ok": bool, '
        '"system": {...}}: raw figures (bytes) with their human strings')
    parser.add_argument(
        "--no-backends", action="store_true",
        help="skip trying the backends (fast; the exit status then reflects the checks only "
        "with --strict)")
    parser.add_argument(
        "--strict", action="store_true",
        help="exit with status 1 when a check finds a problem, not only when a backend is "
        "unusable")
    parser.add_argument(
        "--timeout", type=float, default=TRIAL_TIMEOUT, metavar="SECONDS",
        help=f"how long a backend trial's child process may take (default {TRIAL_TIMEOUT:g})")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Run the checks and the backend trials, print the report; return the exit status."""
    checks = run_checks()
    trials = [] if args.no_backends else try_backends(timeout=args.timeout)
    status = _status(checks, trials, args.strict)
    system = _about_this_system()
    if args.json:
        report = {
            "checks": [c.to_json() for c in checks],
            "backends": [t.to_json() for t in trials],
            "ok": status == 0,
            "status": status,
            "backends_tried": not args.no_backends,
            "system": system,
        }
        print(json.dumps(report, indent=2))
    else:
        sys.stdout.write(format_report(checks, trials, system, not args.no_backends,
                                       args.strict))
    return status
