"""systemd-logind's ``RemoveIPC=``, which deletes a non-system user's
segments when that user's last session ends."""

from __future__ import annotations

import os
from typing import Any, Optional, Sequence

from ... import _sysinfo
from .report import CheckResult

__all__ = ["check_remove_ipc"]


_REMEDY_REMOVE_IPC = "set RemoveIPC=no in /etc/systemd/logind.conf (or run as a system user)"


_TRUE = frozenset({"1", "yes", "y", "true", "t", "on"})
_FALSE = frozenset({"0", "no", "n", "false", "f", "off"})


def _logind_setting(path: str) -> Optional[bool]:
    """The last valid ``RemoveIPC=`` of the ``[Login]`` section of *path*, or None."""
    text = _sysinfo.read_text(path)
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
    for line in (_sysinfo.read_text(os.path.join(etc, "login.defs")) or "").splitlines():
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
    return any((_sysinfo.read_text(os.path.join(proc, pid, "comm")) or "").strip() == comm
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
