"""Which backends work: the default backend setting, and each backend
tried for real (create, attach from a child process, write, read, unlink)."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import subprocess
import sys
import textwrap
import time
from typing import Any, Iterable, Mapping, Optional

from .report import BackendTrial, CheckResult, human_size
from .storage import _REMEDY_MMAP_DIR, _REMEDY_SHM_CONTAINER

__all__ = ["TRIAL_SIZE", "TRIAL_TIMEOUT", "check_settings", "try_backend", "try_backends"]


#: Size of the segment each backend is tried with.
TRIAL_SIZE = 1 << 20
#: Seconds the child process of a backend trial may take.
TRIAL_TIMEOUT = 30.0


# --------------------------------------------------------------------------
# The settings


def check_settings(environ: Optional[Mapping[str, str]] = None) -> CheckResult:
    """The default backend (``MPSHM_BACKEND``) and the mmap directory setting (``MPSHM_DIR``)."""
    from ... import backends

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
    from ... import backends

    if isinstance(exc, ImportError):
        return backends.install_hint(backend) or "install what the backend's module needs"
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
    from ... import backends
    from ...shared_memory import SharedMemory

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
    from ... import backends

    return [try_backend(n, size, timeout) for n in (names or list(backends.registry))]
