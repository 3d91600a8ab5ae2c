"""Facts about this machine from /proc and /sys, read one way for everyone
who needs them (the backends and ``mpshm doctor``), so that what doctor
reports is what the backends act on.

Every reader takes the root of /proc where it reads from it (tests point it
at a fake one) and returns None, or an empty result, where a file is
missing or unreadable.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Optional, Sequence

__all__ = ["Mount", "meminfo", "mount_of", "mounts", "read_int", "read_text", "selected"]


def read_text(path: str) -> Optional[str]:
    """The text of *path*, or None."""
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.read()
    except OSError:
        return None


def read_int(path: str) -> Optional[int]:
    """The integer *path* starts with (a sysctl, say), or None."""
    text = read_text(path)
    if text is None:
        return None
    try:
        return int(text.split()[0])
    except (ValueError, IndexError):
        return None


def selected(text: str) -> Optional[str]:
    """The value a kernel choice list selects: ``always [advise] never`` gives
    ``advise``; a list of one word, that word; None if nothing is selected."""
    match = re.search(r"\[([^\]]+)\]", text)
    if match:
        return match.group(1)
    words = text.split()
    return words[0] if len(words) == 1 else None


def meminfo(proc: str = "/proc") -> dict[str, int]:
    """``/proc/meminfo`` as numbers: sizes in bytes (its ``kB`` lines),
    counts (``HugePages_Free``) as they are."""
    values: dict[str, int] = {}
    for line in (read_text(os.path.join(proc, "meminfo")) or "").splitlines():
        name, _, rest = line.partition(":")
        parts = rest.split()
        if not parts:
            continue
        try:
            number = int(parts[0])
        except ValueError:
            continue
        values[name.strip()] = number * 1024 if parts[1:2] == ["kB"] else number
    return values


@dataclass(frozen=True)
class Mount:
    """One line of ``/proc/mounts``."""

    device: str
    point: str
    fstype: str
    options: tuple[str, ...]

    def option(self, key: str) -> Optional[str]:
        """The value of mount option *key* (``huge``, ``size``), or None."""
        for option in self.options:
            name, _, value = option.partition("=")
            if name == key:
                return value
        return None


def _unescape(field: str) -> str:
    # /proc/mounts writes space, tab, newline and backslash as octal escapes.
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def mounts(proc: str = "/proc") -> list[Mount]:
    """This process's mounts, in the kernel's order."""
    found = []
    for line in (read_text(os.path.join(proc, "mounts")) or "").splitlines():
        fields = line.split()
        if len(fields) >= 4:
            found.append(Mount(_unescape(fields[0]), _unescape(fields[1]), fields[2],
                               tuple(fields[3].split(","))))
    return found


def mount_of(path: str, among: Sequence[Mount]) -> Optional[Mount]:
    """The mount of *among* that holds *path* (already resolved): the
    longest mount point above it, the last listed (the topmost) of several
    mounts on the same point."""
    best: Optional[Mount] = None
    best_length = -1
    for mount in among:
        point = mount.point.rstrip("/") or "/"
        inside = point == "/" or path == point or path.startswith(point + "/")
        if inside and len(point) >= best_length:
            best, best_length = mount, len(point)
    return best
