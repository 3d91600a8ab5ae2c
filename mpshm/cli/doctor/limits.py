"""Per-process limits that bound mapped segments: ``vm.max_map_count``,
the open-file limit and the address-space limit."""

from __future__ import annotations

import os
import resource
from typing import Optional

from ... import _sysinfo
from .report import CheckResult, human_size

__all__ = ["check_address_space", "check_max_map_count", "check_open_files"]


def check_max_map_count(proc: str = "/proc") -> CheckResult:
    """``vm.max_map_count`` against the maps this process uses: each mapped segment is
    (at least) one map, so it bounds how many segments one process can map at once."""
    name, area, title = "vm.max_map_count", "Process limits", "map count"
    path = os.path.join(proc, "sys", "vm", "max_map_count")
    limit = _sysinfo.read_int(path)
    maps = _sysinfo.read_text(os.path.join(proc, "self", "maps"))
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
