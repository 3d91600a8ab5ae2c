"""Where segments live: /dev/shm (its size, mount and permissions), the
mmap backend's directory (its filesystem and what backs it), and the
container around them (a cgroup memory limit below /dev/shm's size)."""

from __future__ import annotations

import os
import re
import stat
import sys
from typing import Any, Callable, Mapping, Optional, Sequence

from ... import _sysinfo
from .report import NO_LIMIT, CheckResult, _percent, human_size

__all__ = [
    "DOCKER_DEFAULT_SHM", "LOW_FREE", "LOW_FREE_FRACTION", "SMALL_SHM",
    "check_cgroup_memory", "check_mmap_dir", "check_shm_dir", "in_container",
]


#: Below this, a /dev/shm (or an mmap directory's free space) is too small for real work.
SMALL_SHM = 512 << 20
#: Docker's default /dev/shm size.
DOCKER_DEFAULT_SHM = 64 << 20
#: Free space below this (or below :data:`LOW_FREE_FRACTION` of the total) is a warning.
LOW_FREE = 256 << 20
LOW_FREE_FRACTION = 0.10


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
_NETWORK_FS = frozenset(
    {"nfs", "nfs4", "cifs", "smb3", "smbfs", "9p", "fuse.sshfs", "ceph", "glusterfs", "lustre"}
)
#: Filesystems whose files live in RAM (and swap): mmap segments there run at memory speed.
_RAM_FS = frozenset({"tmpfs", "ramfs", "hugetlbfs"})


def in_container(root: str = "/", environ: Optional[Mapping[str, str]] = None) -> bool:
    """Whether this process seems to run in a container (Docker, Podman, Kubernetes, LXC)."""
    env = os.environ if environ is None else environ
    if env.get("container") or env.get("KUBERNETES_SERVICE_HOST"):
        return True
    if any(os.path.exists(os.path.join(root, p)) for p in (".dockerenv", "run/.containerenv")):
        return True
    cgroup = _sysinfo.read_text(os.path.join(root, "proc/1/cgroup")) or ""
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
    mount = _sysinfo.mount_of(os.path.realpath(path), _sysinfo.mounts(proc))
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
    memory = _sysinfo.meminfo(proc)
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
# cgroup memory limit


def _cgroup_lines(proc: str) -> Optional[list[tuple[str, list[str], str]]]:
    text = _sysinfo.read_text(os.path.join(proc, "self", "cgroup"))
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
        text = _sysinfo.read_text(os.path.join(directory, limit_file))
        if usage is None:
            usage = _sysinfo.read_int(os.path.join(directory, usage_file))
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
    v2_controllers = (_sysinfo.read_text(os.path.join(root, "cgroup.controllers")) or "").split()
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
# The mmap backend's directory


def _tmpfs_hint(mounts: Sequence[_sysinfo.Mount]) -> str:
    """Where to put the mmap backend's segments for memory speed, on this machine."""
    shm = _sysinfo.mount_of("/dev/shm", mounts)
    where = (f"such as /dev/shm/mpshm-{os.getuid()}" if shm is not None and shm.point == "/dev/shm"
             and shm.fstype == "tmpfs" else "(mount -t tmpfs)")
    return (f"for memory speed every time, set MPSHM_DIR (or pass dir=) to a directory on a "
            f"tmpfs, {where}; it counts against that tmpfs's size")


def check_mmap_dir(path: Optional[str] = None, proc: str = "/proc") -> CheckResult:
    """The directory the mmap backend puts segments in (default:
    :func:`mpshm.backends.mmapfile.default_dir`): usable, its filesystem (what
    backs it: RAM for a tmpfs, a disk otherwise, with a hint), its free space."""
    from ..._paths import check_dir, default_dir

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
    mounts = _sysinfo.mounts(proc)
    mount = _sysinfo.mount_of(os.path.realpath(where), mounts)
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
