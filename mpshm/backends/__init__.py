"""The registry of storage backends.

Three backends come with mpshm: ``posix`` (the default), ``sysv`` and
``mmap``. A third-party backend subclasses :class:`Backend` and registers
itself under the scheme its names carry::

    from mpshm import backends
    backends.register("memfd", MemfdBackend())
    SharedMemory("memfd:frames", create=True, size=4096)

Built-in backends are imported on first use, so a missing optional library
only matters to the backend that needs it (the error names what to install:
each entry of the registry carries its install hint, ``register(...,
install="pip install ...")``). Registering the same backend again under the
same name (the same object, or the same ``"module:Class"``) changes nothing,
so registering a ``"module:Class"`` string (or one object) may be repeated.

Which backend a call uses: ``backend=`` argument > :func:`set_default_backend`
> the ``MPSHM_BACKEND`` environment variable > ``posix``. A name's scheme
(``sysv:``, ``mmap:``, ``posix:``) decides by itself; a bare name belongs to
the default backend.
"""

from __future__ import annotations

import importlib
import os
import re
import threading
from types import MappingProxyType
from typing import Any, Mapping, Optional, Union

from ._base import Attachment, Backend, SegmentInfo

__all__ = [
    "Attachment",
    "Backend",
    "SegmentInfo",
    "available",
    "get",
    "get_default_backend",
    "install_hint",
    "names_agree",
    "register",
    "registry",
    "resolve",
    "set_default_backend",
]

_lock = threading.Lock()
_registry: dict[str, Union[Backend, str]] = {
    "posix": "mpshm.backends.posix:PosixBackend",
    "sysv": "mpshm.backends.sysv:SysVBackend",
    "mmap": "mpshm.backends.mmapfile:MmapBackend",
}
#: Read-only view of the registry: name -> backend, or "module:Class" not yet imported.
registry: Mapping[str, Union[Backend, str]] = MappingProxyType(_registry)

#: Install hint of each registry entry that has one: name -> what to run.
_install: dict[str, str] = {"posix": "pip install posix_ipc", "sysv": "pip install sysv_ipc"}
#: Name -> the "module:Class" spec a loaded entry was imported from.
_loaded_from: dict[str, str] = {}
_SCHEME = re.compile(r"([a-z][a-z0-9_+.-]*):(.*)", re.DOTALL)
_default: Optional[str] = None


def register(
    name: str,
    backend: Union[Backend, str],
    clobber: bool = False,
    *,
    install: Optional[str] = None,
) -> None:
    """Register *backend* under *name*, the scheme of its names.

    *backend* is a :class:`Backend` instance, or a ``"module:Class"`` string
    imported on first use. Registering the same backend again under *name*
    (the same object, or the same ``"module:Class"``, imported or not) does
    nothing; registering another one under a name that is taken raises
    ValueError unless ``clobber=True``. *install* is what to do when the
    backend cannot be imported (``"pip install posix_ipc"``): the error
    names it.
    """
    if not isinstance(name, str) or not re.fullmatch(r"[a-z][a-z0-9_+.-]*", name):
        raise ValueError(
            f"invalid backend name {name!r}: use lower-case letters, digits and "
            "'_+.-', starting with a letter (it becomes the scheme of segment names)"
        )
    if isinstance(backend, Backend):
        if backend.name != name:
            raise ValueError(
                f"backend {backend!r} calls itself {backend.name!r}, not {name!r}: "
                "the registered name must be the backend's name"
            )
    elif not (isinstance(backend, str) and ":" in backend):
        raise TypeError(
            f"backend must be a mpshm.backends.Backend instance or a 'module:Class' "
            f"string, not {type(backend).__name__}"
        )
    if install is not None and not isinstance(install, str):
        raise TypeError(f"install= must be a str or None, not {type(install).__name__}")
    with _lock:
        if name in _registry and _same(name, _registry[name], backend):
            if install is not None:
                _install[name] = install
            return
        if name in _registry and not clobber:
            raise ValueError(
                f"a backend named {name!r} is already registered; pass clobber=True to replace it"
            )
        _registry[name] = backend
        _loaded_from.pop(name, None)
        if install is not None:
            _install[name] = install
        else:
            _install.pop(name, None)


def _same(name: str, entry: Union[Backend, str], backend: Union[Backend, str]) -> bool:
    """Whether registering *backend* under *name*, where *entry* is, changes
    nothing: the same object, the same spec, or the spec *entry* was imported
    from (or names *entry*'s class). Another instance of the class is
    another backend (it may be set up differently). Call with the lock held."""
    if entry is backend:
        return True
    if not isinstance(backend, str):
        return False
    if isinstance(entry, str):
        return entry == backend
    kind = type(entry)
    return backend in (_loaded_from.get(name), f"{kind.__module__}:{kind.__qualname__}")


def install_hint(name: str) -> Optional[str]:
    """What to install for backend *name* to load (``"pip install posix_ipc"``),
    as registered with ``register(..., install=...)``; None if nothing was said."""
    return _install.get(name)


def _load(name: str, spec: str) -> Backend:
    module_name, _, attr = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        hint = install_hint(name)
        hint_text = f" Install it with: {hint}" if hint else ""
        raise ImportError(f"the {name!r} backend cannot be loaded ({exc}).{hint_text}") from exc
    obj: Any = module
    for part in attr.split("."):
        obj = getattr(obj, part)
    backend = obj() if isinstance(obj, type) else obj
    if not isinstance(backend, Backend):
        raise TypeError(f"{spec} is not a mpshm.backends.Backend")
    return backend


def get(name: str) -> Backend:
    """Return the backend registered as *name*.

    Raises ValueError, listing the registered names, if there is none.
    """
    try:
        entry = _registry[name]
    except (KeyError, TypeError):
        raise ValueError(
            f"unknown mpshm backend {name!r}; registered backends: {', '.join(sorted(_registry))}"
        ) from None
    if not isinstance(entry, str):  # (a Backend: an ABC's isinstance costs more)
        return entry
    backend = _load(name, entry)
    with _lock:
        if _registry.get(name) == entry:
            _registry[name] = backend
            _loaded_from[name] = entry
        current = _registry[name]
    return current if isinstance(current, Backend) else backend


def available() -> list[str]:
    """Names of the registered backends that work on this machine."""
    names = []
    for name in list(_registry):
        try:
            backend = get(name)
        except (ImportError, TypeError):
            continue
        if backend.available() is None:
            names.append(name)
    return names


def set_default_backend(name: Optional[str]) -> None:
    """Make *name* the backend of calls that name none (None: back to the default).

    This setting overrides the ``MPSHM_BACKEND`` environment variable, and
    lasts for this process (child processes started with ``fork`` inherit it;
    others read ``MPSHM_BACKEND``).
    """
    global _default
    if name is not None:
        get(name)
    _default = name


def get_default_backend() -> str:
    """Name of the backend used when neither ``backend=`` nor a scheme says."""
    if _default is not None:
        return _default
    env = os.environ.get("MPSHM_BACKEND")
    if env:
        if env not in _registry:
            raise ValueError(
                f"the environment variable MPSHM_BACKEND={env!r} names no mpshm "
                f"backend; registered backends: {', '.join(sorted(_registry))}"
            )
        return env
    return "posix"


def resolve(
    name: Optional[str], backend: Optional[str], options: Mapping[str, Any]
) -> tuple[Backend, Optional[str]]:
    """Find the backend and canonical identifier for a user-given name.

    Returns ``(backend, ident)``; ``ident`` is None when *name* is None.
    """
    if backend is not None and not isinstance(backend, str):
        raise TypeError(f"backend= must be a backend name (str), not {type(backend).__name__}")
    explicit = get(backend) if backend is not None else None  # ValueError lists the names
    if name is None:
        chosen = explicit or get(get_default_backend())
        chosen.check_options(options)
        return chosen, None
    if not isinstance(name, str):
        raise TypeError(f"name must be a str or None, not {type(name).__name__}")
    match = _SCHEME.fullmatch(name)
    if match and match.group(1) in _registry:
        scheme, ident = match.group(1), match.group(2)
        if backend is not None and backend != scheme:
            raise ValueError(
                f"the name {name!r} belongs to the {scheme!r} backend, but backend="
                f"{backend!r} was given: drop backend= or change the name's scheme"
            )
        chosen = get(scheme)
    else:
        chosen = explicit or get(get_default_backend())
        ident = name
    return chosen, chosen.parse(ident, options)


def names_agree(backend: Backend, ident: str, name: Any) -> bool:
    """Whether *name* (what a pickled handle reports as ``.name``) names the
    segment *ident* of *backend* (what the handle attaches and ``unlink()``
    removes): its qualified name, a name with the backend's scheme that
    parses to *ident*, or a bare name that *ident* ends with (a bare mmap
    name is a file in the sender's directory, which may differ from ours).
    """
    if not isinstance(name, str):
        return False
    if name == backend.qualified(ident):
        return True
    match = _SCHEME.fullmatch(name)
    if match and match.group(1) in _registry:
        if match.group(1) != backend.name:
            return False
        try:
            return backend.parse(match.group(2), {}) == ident
        except (ValueError, TypeError):
            return False
    try:
        if backend.parse(name, {}) == ident:
            return True
    except (ValueError, TypeError):
        return False
    return "/" not in name and ident.endswith("/" + name)
