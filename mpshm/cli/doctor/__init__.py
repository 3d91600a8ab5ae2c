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

The checks live by topic: :mod:`.storage` (/dev/shm, the mmap directory,
the memory cgroup), :mod:`.sysv` (System V limits), :mod:`.hugepages`,
:mod:`.limits` (per-process limits), :mod:`.logind` (``RemoveIPC=``),
:mod:`.backends` (the settings and the backend trials) and :mod:`.report`
(:class:`CheckResult`, sizes, the human report). This module holds the
command: the checks in report order, ``add_parser`` and ``run``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from typing import Any, Callable, Iterable

from .backends import TRIAL_SIZE, TRIAL_TIMEOUT, check_settings, try_backend, try_backends
from .hugepages import (
    THP_TRIAL_BUDGET,
    THP_TRIAL_SIZE,
    check_hugetlb,
    check_thp_gain,
    check_thp_shmem,
)
from .limits import check_address_space, check_max_map_count, check_open_files
from .logind import check_remove_ipc
from .report import (
    NO_LIMIT,
    VERDICTS,
    BackendTrial,
    CheckResult,
    _status,
    format_report,
    human_size,
)
from .storage import (
    DOCKER_DEFAULT_SHM,
    LOW_FREE,
    LOW_FREE_FRACTION,
    SMALL_SHM,
    check_cgroup_memory,
    check_mmap_dir,
    check_shm_dir,
    in_container,
)
from .sysv import check_sysv_limits, check_sysv_rmid_forced, check_sysv_usage

__all__ = [
    "CHECKS",
    "DOCKER_DEFAULT_SHM",
    "LOW_FREE",
    "LOW_FREE_FRACTION",
    "NO_LIMIT",
    "SMALL_SHM",
    "THP_TRIAL_BUDGET",
    "THP_TRIAL_SIZE",
    "TRIAL_SIZE",
    "TRIAL_TIMEOUT",
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


def _about_this_system() -> dict[str, Any]:
    from ... import __version__

    uid = os.getuid()
    return {
        "host": platform.node(), "system": platform.system(), "release": platform.release(),
        "python": platform.python_version(), "mpshm": __version__, "uid": uid,
        "container": in_container(),
    }


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
