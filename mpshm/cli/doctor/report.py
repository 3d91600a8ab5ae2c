"""What a check gives (:class:`CheckResult`), what a backend trial gives
(:class:`BackendTrial`), sizes for people, and the human report."""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional, Sequence

__all__ = [
    "NO_LIMIT", "VERDICTS", "BackendTrial", "CheckResult", "format_report", "human_size",
]


#: The verdicts of a check, from good to bad.
VERDICTS = ("ok", "info", "warn", "problem")

#: Limits at or above this many bytes are the kernel's "no limit" values.
NO_LIMIT = 1 << 62


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
# Sizes and shares


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


def _percent(part: int, whole: int) -> str:
    return f"{100 * part / whole:.0f}%" if whole else "n/a"


# --------------------------------------------------------------------------
# The report


def _arrow() -> str:
    encoding = getattr(sys.stdout, "encoding", None) or "ascii"
    try:
        "→".encode(encoding)
    except (UnicodeEncodeError, LookupError):
        return "fix:"
    return "→"


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
