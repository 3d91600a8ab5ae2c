"""System V shared memory: the kernel's limits (shmmax, shmall, shmmni),
what is in use against them, and ``kernel.shm_rmid_forced``."""

from __future__ import annotations

import os
import sys
from typing import Any, Optional

from ... import _sysinfo
from .report import NO_LIMIT, CheckResult, _limit_text, _percent, human_size
from .storage import SMALL_SHM

__all__ = ["check_sysv_limits", "check_sysv_rmid_forced", "check_sysv_usage"]


def _page_size() -> int:
    try:
        return int(os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return 4096


def check_sysv_limits(proc: str = "/proc", page_size: Optional[int] = None) -> CheckResult:
    """``kernel.shmmax`` (largest segment), ``kernel.shmall`` (all segments, in pages)
    and ``kernel.shmmni`` (number of segments)."""
    name, area, title = "sysv.limits", "System V shared memory", "limits"
    page = page_size or _page_size()
    base = os.path.join(proc, "sys", "kernel")
    shmmax = _sysinfo.read_int(os.path.join(base, "shmmax"))
    shmall = _sysinfo.read_int(os.path.join(base, "shmall"))
    shmmni = _sysinfo.read_int(os.path.join(base, "shmmni"))
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
    text = _sysinfo.read_text(os.path.join(proc, "sysvipc", "shm"))
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
    shmmni = _sysinfo.read_int(os.path.join(proc, "sys", "kernel", "shmmni"))
    shmall = _sysinfo.read_int(os.path.join(proc, "sys", "kernel", "shmall"))
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
    value = _sysinfo.read_int(path)
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
