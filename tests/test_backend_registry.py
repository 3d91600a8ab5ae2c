"""The backend registry: registering twice, install hints; and what the
backends share in their base (check_options, available(), before_copy)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterator

import pytest

import mpshm
from mpshm import backends
from mpshm.backends.mmapfile import MmapBackend
from mpshm.backends.posix import PosixBackend

MISSING = "mpshm_no_such_module_for_tests:Backend"


@pytest.fixture(autouse=True)
def restore_registry() -> Iterator[None]:
    """Whatever a test registers is gone after it (and what it replaced is back)."""
    tables: tuple[dict[str, Any], ...] = (backends._registry, backends._install,
                                          backends._loaded_from)
    saved = [(table, dict(table)) for table in tables]
    yield
    for table, before in saved:
        for key in [k for k in table if k not in before]:
            del table[key]
        table.update(before)


def scheme() -> str:
    return "t" + os.urandom(4).hex()


def custom(name: str) -> PosixBackend:
    class Custom(PosixBackend):
        def qualified(self, ident: str) -> str:
            return f"{self.name}:{ident}"

    Custom.name = name
    return Custom()


# -- registering twice ----------------------------------------------------------


def test_registering_the_same_backend_twice_is_harmless() -> None:
    name = scheme()
    backend = custom(name)
    backends.register(name, backend)
    backends.register(name, backend)  # the same object: nothing happens
    assert backends.registry[name] is backend and backends.get(name) is backend
    spec_name = scheme()
    backends.register(spec_name, MISSING)
    backends.register(spec_name, MISSING)  # the same spec
    assert backends.registry[spec_name] == MISSING


def test_registering_a_builtin_spec_again_keeps_the_entry() -> None:
    """A module that registers a built-in's spec again (imported twice, say)
    changes nothing, before and after the backend was imported."""
    loaded = backends.get("mmap")
    backends.register("mmap", "mpshm.backends.mmapfile:MmapBackend")
    assert backends.get("mmap") is loaded
    backends.register("mmap", loaded)
    assert backends.get("mmap") is loaded
    backends.register("posix", "mpshm.backends.posix:PosixBackend")
    assert backends._install["posix"] == "pip install posix_ipc"


def test_a_loaded_spec_registered_again_is_the_same_backend() -> None:
    name = "mmap"
    backends._registry[name] = "mpshm.backends.mmapfile:MmapBackend"  # not imported yet
    backends.register(name, "mpshm.backends.mmapfile:MmapBackend")
    assert backends.registry[name] == "mpshm.backends.mmapfile:MmapBackend"
    loaded = backends.get(name)
    assert isinstance(loaded, MmapBackend)
    backends.register(name, "mpshm.backends.mmapfile:MmapBackend")
    assert backends.get(name) is loaded


def test_another_backend_under_a_taken_name_needs_clobber() -> None:
    name = scheme()
    first, second = custom(name), custom(name)
    backends.register(name, first)
    with pytest.raises(ValueError, match=r"already registered.*clobber=True"):
        backends.register(name, second)  # another object, even of the same class
    with pytest.raises(ValueError, match="clobber=True"):
        backends.register(name, MISSING)
    assert backends.get(name) is first
    backends.register(name, second, clobber=True)
    assert backends.get(name) is second
    with pytest.raises(ValueError, match="clobber=True"):
        backends.register("mmap", MmapBackend())
    with pytest.raises(ValueError, match="clobber=True"):
        backends.register("posix", "mpshm.backends.other:PosixBackend")


def test_register_checks_the_install_hint() -> None:
    with pytest.raises(TypeError, match="install="):
        backends.register(scheme(), MISSING, install=["pip"])  # type: ignore[arg-type]


# -- install hints --------------------------------------------------------------


def test_a_missing_library_error_names_the_install_hint() -> None:
    name = scheme()
    backends.register(name, MISSING, install="pip install mpshm-test-backend")
    with pytest.raises(ImportError, match=r"cannot be loaded.*pip install mpshm-test-backend"):
        backends.get(name)
    with pytest.raises(ImportError, match="pip install mpshm-test-backend"):
        backends.resolve(f"{name}:segment", None, {})
    with pytest.raises(ImportError, match="pip install mpshm-test-backend"):
        mpshm.SharedMemory(create=True, size=10, backend=name)
    assert name not in backends.available()


def test_no_hint_without_one() -> None:
    name = scheme()
    backends.register(name, MISSING)
    with pytest.raises(ImportError) as info:
        backends.get(name)
    assert "cannot be loaded" in str(info.value) and "Install it with" not in str(info.value)


def test_the_hint_goes_with_its_entry() -> None:
    name = scheme()
    backends.register(name, MISSING, install="pip install first")
    backends.register(name, MISSING, clobber=True)  # the same backend: nothing changes
    with pytest.raises(ImportError, match="pip install first"):
        backends.get(name)
    other = MISSING + "2"
    backends.register(name, other, clobber=True)  # a new entry: no hint of its own
    with pytest.raises(ImportError) as info:
        backends.get(name)
    assert "pip install first" not in str(info.value)
    backends.register(name, other, install="pip install again")  # the same: adds the hint
    with pytest.raises(ImportError, match="pip install again"):
        backends.get(name)


@pytest.mark.parametrize(("name", "hint"), [("posix", "pip install posix_ipc"),
                                            ("sysv", "pip install sysv_ipc")])
def test_builtin_backends_name_their_library(
        monkeypatch: pytest.MonkeyPatch, name: str, hint: str) -> None:
    monkeypatch.setitem(backends._registry, name, MISSING)  # as if the library were missing
    with pytest.raises(ImportError, match=hint):
        backends.get(name)
    with pytest.raises(ImportError, match=hint):
        backends.resolve(f"{name}:x", None, {})


# -- what the backends share ----------------------------------------------------


@pytest.mark.parametrize("name", ["posix", "sysv", "mmap"])
def test_check_options_is_the_base_one(name: str) -> None:
    backend = backends.get(name)
    assert "check_options" not in vars(type(backend))
    backend.check_options({})
    backend.check_options({"huge_pages": True, "prefault": None})
    with pytest.raises(TypeError, match="prefault= must be True or False"):
        backend.check_options({"prefault": "yes"})
    with pytest.raises(TypeError, match="huge_pages= must be True or False"):
        backend.check_options({"huge_pages": 1})
    with pytest.raises(TypeError, match="does not accept the option"):
        backend.check_options({"nope": 1})
    with pytest.raises(TypeError, match="prefault= must be True or False"):
        mpshm.SharedMemory(create=True, size=10, backend=name, prefault="yes")


def test_check_options_leaves_other_backends_options_alone() -> None:
    class Plain(PosixBackend):
        option_names = frozenset({"colour"})

    Plain.name = scheme()
    Plain().check_options({"colour": "blue"})
    with pytest.raises(TypeError, match="does not accept the option"):
        Plain().check_options({"prefault": True})


def test_option_values_are_a_third_party_backends_own_business() -> None:
    """The base checks the values of checked_flags only: a backend of one's
    own that takes a huge_pages= of its own meaning gets it unchanged."""

    class Sized(PosixBackend):
        option_names = frozenset({"huge_pages"})
        checked_flags = frozenset()

    Sized.name = scheme()
    Sized().check_options({"huge_pages": "1G"})
    assert backends.Backend.checked_flags == frozenset()


def test_mmap_available_here(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    backend = backends.get("mmap")
    assert backend.available() is None
    assert "mmap" in backends.available()
    monkeypatch.setenv("MPSHM_DIR", str(tmp_path / "new" / "deeper"))
    assert backend.available() is None  # can be made: the first creation makes it
    assert os.listdir(tmp_path) == []  # and available() made nothing


@pytest.mark.parametrize("where", ["into", "at"])
def test_mmap_available_says_why_not(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path, where: str) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    directory = blocker / "segments" if where == "into" else blocker
    monkeypatch.setenv("MPSHM_DIR", str(directory))
    reason = backends.get("mmap").available()
    assert isinstance(reason, str) and str(directory) in reason
    assert "mmap" not in backends.available()


def test_sysv_create_from_calls_before_copy(monkeypatch: pytest.MonkeyPatch) -> None:
    backend = backends.get("sysv")
    assert "before_copy" in vars(type(backend))
    seen: list[tuple[str, int]] = []
    original = type(backend).before_copy

    def spy(self: Any, ident: str, attachment: Any) -> None:
        seen.append((ident, attachment.size))
        original(self, ident, attachment)

    monkeypatch.setattr(type(backend), "before_copy", spy)
    ident = backend.generate({})
    data = os.urandom(100 << 10)
    try:
        identity = backend.create_from(ident, memoryview(data), {})
        assert seen == [(ident, len(data))]
        attachment = backend.attach(ident, {})
        try:
            assert attachment.identity == identity
            assert attachment.buf is not None and bytes(attachment.buf) == data
        finally:
            attachment.close()
    finally:
        backend.unlink(ident)
