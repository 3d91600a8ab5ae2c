"""SharedMemory in one process: the standard library's behaviour, on every backend."""

from __future__ import annotations

import errno
import gc
import hashlib
import multiprocessing
import os
import pickle
import stat
import sys

import numpy as np
import pytest
from helpers import exists, recreate, run_script, unique

import mpshm
from mpshm import backends
from mpshm.backends import mmapfile, sysv


def test_create_attach_write_read(make_shm, backend):
    shm = make_shm(size=4096)
    other = mpshm.SharedMemory(shm.name)
    try:
        shm.buf[:5] = b"hello"
        assert bytes(other.buf[:5]) == b"hello"
        other.buf[100] = 255
        assert shm.buf[100] == 255
        assert other.size == shm.size == 4096
        assert other.backend == backend
    finally:
        other.close()


@pytest.mark.parametrize("size", [1, 7, 4095, 4097, 1 << 20, (1 << 20) + 3])
def test_size_is_exact_and_zero_filled(make_shm, size):
    shm = make_shm(size=size)
    assert shm.size == size
    assert len(shm.buf) == size
    assert bytes(shm.buf) == bytes(size)
    attached = mpshm.SharedMemory(shm.name)
    try:
        assert attached.size == size and len(attached.buf) == size
    finally:
        attached.close()


def test_generated_name_forms(make_shm, backend):
    shm = make_shm(size=10)
    if backend == "posix":
        assert shm.name.startswith("psm_") and ":" not in shm.name
        assert os.path.exists(f"/dev/shm/{shm.name}")
    elif backend == "sysv":
        assert shm.name.startswith("sysv:0x") and len(shm.name) == len("sysv:0x") + 8
    else:
        path = shm.name[len("mmap:"):]
        assert shm.name.startswith("mmap:/") and os.path.isfile(path)
        assert os.path.dirname(path) == mmapfile.default_dir()


def test_generated_names_are_random(make_shm):
    names = {make_shm(size=1).name for _ in range(20)}
    assert len(names) == 20


def test_repr_matches_stdlib(make_shm):
    shm = make_shm(size=123)
    assert repr(shm) == f"SharedMemory({shm.name!r}, size=123)"


def test_context_manager_closes_not_unlinks(make_shm):
    shm = make_shm(size=64)
    with mpshm.SharedMemory(shm.name) as other:
        other.buf[0] = 1
    assert other.buf is None
    assert exists(shm.name)
    assert shm.buf[0] == 1


def test_instances_accept_extra_attributes(make_shm):
    shm = make_shm(size=8)
    shm.label = "frames"  # the stdlib class has no __slots__; programs rely on it
    assert shm.label == "frames"


def test_size_accepts_integer_like_values(make_shm):
    shm = make_shm(size=np.int64(4096))
    assert shm.size == 4096 and type(shm.size) is int
    shm2 = make_shm(size=np.uint16(10))
    assert len(shm2.buf) == 10


@pytest.mark.parametrize("size", [1.5, "10", None, 10.0])
def test_size_must_be_an_integer(backend, size):
    with pytest.raises(TypeError, match="size"):
        mpshm.SharedMemory(create=True, size=size, backend=backend)


def test_bad_arguments_raise_like_stdlib(backend):
    with pytest.raises(ValueError, match="positive"):
        mpshm.SharedMemory(create=True, size=-1, backend=backend)
    with pytest.raises(ValueError, match="different from zero"):
        mpshm.SharedMemory(create=True, size=0, backend=backend)
    with pytest.raises(ValueError, match="only be None if create=True"):
        mpshm.SharedMemory(backend=backend)
    with pytest.raises(TypeError):
        mpshm.SharedMemory(12345, backend=backend)  # type: ignore[arg-type]


def test_absent_name_raises_file_not_found_naming_it(backend):
    name = unique("absent")
    with pytest.raises(FileNotFoundError) as info:
        mpshm.SharedMemory(name, backend=backend)
    assert info.value.errno == errno.ENOENT
    assert name in str(info.value)


def test_taken_name_raises_file_exists(make_shm, backend):
    name = unique()
    make_shm(name, size=10)
    with pytest.raises(FileExistsError) as info:
        mpshm.SharedMemory(name, create=True, size=10, backend=backend)
    assert name in str(info.value)


def test_user_name_is_returned_as_given_and_reattaches(make_shm, backend):
    name = unique("frames")
    shm = make_shm(name, size=100)
    assert shm.name == name
    other = mpshm.SharedMemory(name, backend=backend)
    try:
        shm.buf[:3] = b"xyz"
        assert bytes(other.buf[:3]) == b"xyz"
    finally:
        other.close()


def test_names_built_from_names_are_valid(make_shm, backend):
    base = make_shm(size=16)
    derived = make_shm(base.name + "_suffix", size=32)
    assert derived.name == base.name + "_suffix"
    assert derived.backend == backend
    again = mpshm.SharedMemory(derived.name)
    try:
        assert again.size == 32
    finally:
        again.close()


def test_scheme_and_backend_argument_must_agree():
    with pytest.raises(ValueError, match="belongs to the 'sysv' backend"):
        mpshm.SharedMemory("sysv:0x1234", backend="posix")


def test_unknown_backend_lists_available():
    with pytest.raises(ValueError, match="posix") as info:
        mpshm.SharedMemory(create=True, size=10, backend="nosuch")
    assert "nosuch" in str(info.value) and "sysv" in str(info.value)


def test_unknown_option_is_a_type_error():
    with pytest.raises(TypeError, match="dir"):
        mpshm.SharedMemory(create=True, size=10, backend="posix", dir="/tmp")


def test_backend_choice_precedence(monkeypatch):
    monkeypatch.setenv("MPSHM_BACKEND", "mmap")
    try:
        assert mpshm.get_default_backend() == "mmap"
        shm = mpshm.SharedMemory(create=True, size=10)
        try:
            assert shm.backend == "mmap" and shm.name.startswith("mmap:")
        finally:
            shm.close()
            shm.unlink()
        mpshm.set_default_backend("sysv")
        assert mpshm.get_default_backend() == "sysv"
        shm = mpshm.SharedMemory(create=True, size=10)
        try:
            assert shm.backend == "sysv"
        finally:
            shm.close()
            shm.unlink()
        shm = mpshm.SharedMemory(create=True, size=10, backend="posix")
        try:
            assert shm.backend == "posix"
        finally:
            shm.close()
            shm.unlink()
    finally:
        mpshm.set_default_backend(None)
    monkeypatch.setenv("MPSHM_BACKEND", "bogus")
    with pytest.raises(ValueError, match="MPSHM_BACKEND"):
        mpshm.SharedMemory(create=True, size=10)


def test_set_default_backend_rejects_unknown():
    with pytest.raises(ValueError, match="registered backends"):
        mpshm.set_default_backend("nosuch")


def test_bare_name_belongs_to_default_backend(monkeypatch):
    name = unique("bare")
    mpshm.set_default_backend("sysv")
    try:
        shm = mpshm.SharedMemory(name, create=True, size=10)
        try:
            assert shm.backend == "sysv" and shm.name == name
            assert mpshm.SharedMemory("sysv:" + name).size == 10
        finally:
            shm.close()
            shm.unlink()
    finally:
        mpshm.set_default_backend(None)


def test_posix_scheme_is_accepted_everywhere():
    name = unique()
    shm = mpshm.SharedMemory("posix:" + name, create=True, size=10)
    try:
        assert shm.backend == "posix"
        assert os.path.exists(f"/dev/shm/{name}")
        mpshm.set_default_backend("mmap")
        try:
            other = mpshm.SharedMemory("posix:" + name)
            assert other.backend == "posix"
            other.close()
        finally:
            mpshm.set_default_backend(None)
    finally:
        shm.close()
        shm.unlink()


# -- pickling -----------------------------------------------------------------


def test_pickles_as_a_small_handle(make_shm, backend):
    shm = make_shm(size=8 << 20)
    shm.buf[:4] = b"data"
    data = pickle.dumps(shm)
    assert len(data) < 1024
    other = pickle.loads(data)
    try:
        assert type(other) is mpshm.SharedMemory
        assert other.name == shm.name and other.size == shm.size
        assert bytes(other.buf[:4]) == b"data"
        other.buf[0] = ord("D")
        assert shm.buf[0] == ord("D")
    finally:
        other.close()


def test_pickled_handle_carries_its_backend(make_shm, backend):
    name = unique()
    shm = make_shm(name, size=10)
    data = pickle.dumps(shm)
    other_default = "sysv" if backend != "sysv" else "mmap"
    mpshm.set_default_backend(other_default)
    try:
        other = pickle.loads(data)
        assert other.backend == backend and other.name == name
        other.close()
    finally:
        mpshm.set_default_backend(None)


def test_unpickling_a_gone_segment_names_it(backend):
    shm = mpshm.SharedMemory(create=True, size=10, backend=backend)
    data = pickle.dumps(shm)
    shm.close()
    shm.unlink()
    with pytest.raises(FileNotFoundError) as info:
        pickle.loads(data)
    assert shm.name in str(info.value)


# -- close / unlink -------------------------------------------------------------


def test_close_and_unlink_are_safe(backend):
    shm = mpshm.SharedMemory(create=True, size=10, backend=backend)
    shm.close()
    shm.close()
    assert shm.buf is None
    shm.unlink()
    assert not exists(shm.name)
    with pytest.raises(FileNotFoundError):
        shm.unlink()


def test_half_built_object_closes_quietly():
    shm = mpshm.SharedMemory.__new__(mpshm.SharedMemory)
    shm.close()
    shm.unlink()


def test_views_outlive_close_without_buffer_error(backend):
    shm = mpshm.SharedMemory(create=True, size=4096, backend=backend)
    name = shm.name
    try:
        array = np.frombuffer(shm.buf, dtype=np.uint8)
        view = memoryview(shm.buf)[10:20]
        array[:3] = [1, 2, 3]
        shm.close()  # the stdlib raises BufferError here
        del shm
        array[3] = 4
        assert list(array[:4]) == [1, 2, 3, 4]
        view[0] = 9
        assert array[10] == 9
    finally:
        mpshm.SharedMemory(name).unlink()


def _mappings(shm):
    """How many of this process's mappings are of *shm*'s segment."""
    if shm.backend == "sysv":
        marker = f"/SYSV{int(shm.name.split(':')[1], 16):08x}"
    elif shm.backend == "posix":
        marker = f"/dev/shm/{shm.name.lstrip('/')}"
    else:
        marker = shm.name.split(":", 1)[1]
    with open("/proc/self/maps") as f:
        return sum(line.rstrip().endswith(marker) or f"{marker} (deleted)" in line for line in f)


@pytest.mark.parametrize("how", ["ndarray", "variable"])
def test_close_keeps_memory_referenced_without_export(backend, how):
    """np.ndarray(buffer=shm.buf) holds the mapping without exporting its buffer
    (numpy#23305), and a variable can hold shm.buf itself: close() must not unmap
    that memory (the standard library does, and the next access crashes), and
    the mapping must go once they do."""
    shm = mpshm.SharedMemory(create=True, size=4096, backend=backend)
    try:
        if how == "ndarray":
            user = np.ndarray((512,), dtype=np.int64, buffer=shm.buf)
            user[:] = np.arange(512)
        else:
            user = shm.buf
            user[:2] = b"ok"
        shm.close()
        assert _mappings(shm) == 1
        if how == "ndarray":
            assert int(user.sum()) == sum(range(512))
        else:
            assert bytes(user[:2]) == b"ok"
        del user
        gc.collect()
        assert _mappings(shm) == 0
    finally:
        shm.unlink()


def test_close_unmaps_when_nothing_uses_the_memory(backend):
    shm = mpshm.SharedMemory(create=True, size=4096, backend=backend)
    try:
        assert _mappings(shm) == 1
        shm.close()
        assert _mappings(shm) == 0
    finally:
        shm.unlink()


def test_unlinked_segment_stays_usable_while_mapped(make_shm):
    shm = make_shm(size=100)
    other = mpshm.SharedMemory(shm.name)
    shm.unlink()
    try:
        assert not exists(shm.name)
        other.buf[0] = 5
        assert shm.buf[0] == 5
    finally:
        other.close()
    with pytest.raises(FileNotFoundError):
        shm.unlink()


def _break_mapping(monkeypatch, backend):
    def fail(*args, **kwargs):
        raise OSError(errno.ENOMEM, "simulated mapping failure")

    if backend == "sysv":
        monkeypatch.setattr(sysv, "SysVAttachment", fail)
    else:
        monkeypatch.setattr(backends._base.mmap, "mmap", fail)


def test_attach_racing_destruction_is_found_or_not_found(backend):
    """Attaching a name that another process keeps creating and destroying
    either attaches or raises FileNotFoundError, never a backend's own error
    (SysV's shmat after the segment went away gave ValueError)."""
    name = f"{backend}:{unique('race')}"
    ctx = multiprocessing.get_context("fork")
    stop, rounds = ctx.Event(), ctx.Value("i", 0)
    proc = ctx.Process(target=recreate, args=(name, backend, stop, rounds))
    proc.start()
    attached = missing = 0
    try:
        while rounds.value < 8000 or not (attached and missing):
            try:
                shm = mpshm.SharedMemory(name)
            except FileNotFoundError:
                missing += 1
            else:
                attached += 1
                shm.close()
            assert rounds.value < 200000, "no attach ever met a living segment"
    finally:
        stop.set()
        proc.join(10)
    assert proc.exitcode == 0


def test_failed_attach_changes_nothing(make_shm, backend, monkeypatch):
    shm = make_shm(size=64)
    shm.buf[:3] = b"abc"
    with monkeypatch.context() as m:
        _break_mapping(m, backend)
        with pytest.raises(OSError, match="simulated"):
            mpshm.SharedMemory(shm.name)
    assert exists(shm.name)
    assert bytes(shm.buf[:3]) == b"abc"


def test_failed_create_leaves_nothing(backend, monkeypatch):
    name = unique()
    with monkeypatch.context() as m:
        _break_mapping(m, backend)
        with pytest.raises(OSError, match="simulated"):
            mpshm.SharedMemory(name, create=True, size=64, backend=backend)
    assert not exists(f"{backend}:{name}")


# -- backend specifics ----------------------------------------------------------


def test_posix_segments_are_private(make_segment):
    shm = make_segment(size=10, backend="posix")
    assert stat.S_IMODE(os.stat(f"/dev/shm/{shm.name}").st_mode) == 0o600


def test_posix_rejects_bad_names():
    for bad in ["", "a/b", "x\0y", "..", "n" * 300]:
        with pytest.raises(ValueError, match="POSIX shared memory name"):
            mpshm.SharedMemory(bad, create=True, size=10, backend="posix")


def test_posix_leading_slash_like_stdlib(make_segment):
    name = unique()
    shm = make_segment("/" + name, size=10, backend="posix")
    assert shm.name == "/" + name
    assert os.path.exists(f"/dev/shm/{name}")


def test_sysv_key_rule_is_stable():
    assert sysv.key_for("0x1234abcd") == 0x1234ABCD
    assert sysv.key_for("4660") == 4660
    assert sysv.key_for("-1") == 0xFFFFFFFF
    expected = int.from_bytes(hashlib.sha256(b"frames").digest()[:4], "big")
    assert sysv.key_for("frames") == expected
    with pytest.raises(ValueError, match="IPC_PRIVATE"):
        mpshm.SharedMemory("sysv:0", create=True, size=10)
    with pytest.raises(ValueError, match="32-bit"):
        mpshm.SharedMemory("sysv:0x123456789", create=True, size=10)


def test_sysv_numeric_and_hashed_names(make_segment):
    key = f"{int.from_bytes(os.urandom(4), 'big') | 1:#010x}"
    shm = make_segment("sysv:" + key, size=10)
    assert shm.name == "sysv:" + key
    decimal = mpshm.SharedMemory(f"sysv:{int(key, 16)}")
    try:
        assert decimal.size == 10
    finally:
        decimal.close()
    name = unique("frames")
    hashed = make_segment(name, size=10, backend="sysv")
    key_of_name = sysv.key_for(name)
    assert any(e.key == key_of_name for e in sysv._proc_segments() or [])
    assert hashed.name == name


def test_sysv_segments_are_private_and_zeroed(make_segment):
    shm = make_segment(size=64 << 10, backend="sysv")
    key = sysv.key_for(shm.name.split(":", 1)[1])
    entry = next(e for e in sysv._proc_segments() or [] if e.key == key)
    assert entry.mode & 0o777 == 0o600
    assert entry.size == 64 << 10
    assert bytes(shm.buf) == bytes(64 << 10)  # not sysv_ipc's spaces


def test_mmap_files_and_directory_are_private(make_segment, tmp_path):
    directory = tmp_path / "segments"
    shm = make_segment(size=10, backend="mmap", dir=str(directory))
    path = shm.name[len("mmap:"):]
    assert os.path.dirname(path) == str(directory)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(directory).st_mode) == 0o700


def test_mmap_bare_name_goes_into_dir(make_segment, tmp_path):
    name = unique()
    shm = make_segment(name, size=10, backend="mmap", dir=str(tmp_path))
    assert shm.name == name
    assert (tmp_path / name).is_file()
    other = mpshm.SharedMemory(name, backend="mmap", dir=str(tmp_path))
    other.close()
    # The handle carries the absolute path: it works with another MPSHM_DIR.
    clone = pickle.loads(pickle.dumps(shm))
    clone.close()


def test_mmap_default_directory(monkeypatch, tmp_path):
    monkeypatch.delenv("MPSHM_DIR", raising=False)
    import tempfile

    assert mmapfile.default_dir() == os.path.join(
        tempfile.gettempdir(), f"mpshm-{os.getuid()}"
    )
    monkeypatch.setenv("MPSHM_DIR", str(tmp_path / "env"))
    shm = mpshm.SharedMemory(create=True, size=10, backend="mmap")
    try:
        assert shm.name.startswith(f"mmap:{tmp_path / 'env'}/")
    finally:
        shm.close()
        shm.unlink()


def test_mmap_attaches_an_existing_data_file(tmp_path):
    path = tmp_path / "data.bin"
    path.write_bytes(b"0123456789")
    os.chmod(path, 0o644)  # a data file, readable by others: reported unless ignored
    with pytest.warns(mpshm.shared_memory.OwnershipWarning, match="0644"):
        mpshm.SharedMemory(f"mmap:{path}").close()
    shm = mpshm.SharedMemory(f"mmap:{path}", owner_check="ignore")
    try:
        assert shm.size == 10 and bytes(shm.buf) == b"0123456789"
        shm.buf[0:1] = b"X"
    finally:
        shm.close()
    assert path.read_bytes() == b"X123456789"


def test_mmap_refuses_symlinks(tmp_path, make_segment):
    target = tmp_path / "target"
    target.write_bytes(b"secret")
    link = tmp_path / "link"
    link.symlink_to(target)
    with pytest.raises(PermissionError, match="symbolic link"):
        mpshm.SharedMemory(f"mmap:{link}")
    with pytest.raises(FileExistsError):
        mpshm.SharedMemory(f"mmap:{link}", create=True, size=10)
    assert target.read_bytes() == b"secret"
    linked_dir = tmp_path / "linked_dir"
    linked_dir.symlink_to(tmp_path)
    with pytest.raises(PermissionError, match="symbolic link"):
        mpshm.SharedMemory(create=True, size=10, backend="mmap", dir=str(linked_dir))


def test_mmap_refuses_unsafe_directories(tmp_path):
    open_dir = tmp_path / "open"
    open_dir.mkdir()
    open_dir.chmod(0o777)
    with pytest.raises(PermissionError, match="world-writable"):
        mpshm.SharedMemory(create=True, size=10, backend="mmap", dir=str(open_dir))
    if os.getuid() == 0:
        foreign = tmp_path / "foreign"
        foreign.mkdir()
        os.chown(foreign, 12345, 12345)
        with pytest.raises(PermissionError, match="owned by uid 12345"):
            mpshm.SharedMemory(create=True, size=10, backend="mmap", dir=str(foreign))


def test_mmap_rejects_ambiguous_names():
    for bad in ["", "a/b", "..", "x\0y"]:
        with pytest.raises(ValueError, match="mmap name"):
            mpshm.SharedMemory(bad, create=True, size=10, backend="mmap")


def test_mmap_empty_file_is_a_clear_error_and_kept(tmp_path):
    path = tmp_path / "empty"
    path.touch()
    with pytest.raises(ValueError, match="empty"):
        mpshm.SharedMemory(f"mmap:{path}")
    assert path.exists()


def test_posix_empty_object_is_a_clear_error_and_kept():
    import posix_ipc

    name = unique()
    raw = posix_ipc.SharedMemory("/" + name, posix_ipc.O_CREX)
    raw.close_fd()
    try:
        with pytest.raises(ValueError, match="size 0"):
            mpshm.SharedMemory(name)
        assert os.path.exists(f"/dev/shm/{name}")
    finally:
        posix_ipc.unlink_shared_memory("/" + name)


# -- registry -----------------------------------------------------------------


def test_registry_lists_and_gets_backends():
    assert {"posix", "sysv", "mmap"} <= set(backends.available())
    assert backends.get("sysv").name == "sysv"
    assert isinstance(backends.get("mmap"), backends.Backend)
    with pytest.raises(ValueError, match="registered backends"):
        backends.get("nope")
    with pytest.raises(TypeError):
        backends.registry["x"] = "y"  # type: ignore[index]


def test_third_party_backend_plugs_in_by_scheme():
    from mpshm.backends.posix import PosixBackend

    scheme = "t" + os.urandom(4).hex()

    class Custom(PosixBackend):
        name = scheme  # type: ignore[assignment]

        def qualified(self, ident: str) -> str:
            return f"{self.name}:{ident}"

    backends.register(scheme, Custom())
    with pytest.raises(ValueError, match="already registered"):
        backends.register(scheme, Custom())
    backends.register(scheme, Custom(), clobber=True)
    with pytest.raises(ValueError, match="calls itself"):
        backends.register("t" + os.urandom(4).hex(), Custom())
    with pytest.raises(ValueError, match="invalid backend name"):
        backends.register("Bad Name", Custom())
    shm = mpshm.SharedMemory(create=True, size=10, backend=scheme)
    try:
        assert shm.name.startswith(scheme + ":psm_")
        again = mpshm.SharedMemory(shm.name)
        assert again.backend == scheme
        again.close()
    finally:
        shm.close()
        shm.unlink()


def test_missing_backend_library_names_the_package(monkeypatch):
    scheme = "t" + os.urandom(4).hex()
    backends.register(scheme, "mpshm_no_such_module:Backend")
    with pytest.raises(ImportError, match="cannot be loaded"):
        backends.get(scheme)


@pytest.mark.skipif(sys.platform != "linux", reason="Linux /dev/shm")
def test_backend_list_sees_segments(make_shm, backend):
    shm = make_shm(size=4096)
    listed = {info.name: info for info in backends.get(backend).list()}
    assert shm.name in listed
    info = listed[shm.name]
    assert info.size == 4096 and info.uid == os.getuid() and info.mode == 0o600


def test_mmap_backend_works_without_posix_ipc():
    """Each backend needs only its own library: with posix_ipc missing, the mmap
    backend works and the posix backend's error names the package to install."""
    result = run_script(
        """
        import sys

        class Block:
            def find_spec(self, name, path=None, target=None):
                if name == "posix_ipc":
                    raise ImportError("No module named 'posix_ipc'")

        sys.meta_path.insert(0, Block())
        import mpshm
        from mpshm import backends
        print(sorted(backends.available()))
        shm = mpshm.SharedMemory(create=True, size=100, backend="mmap")
        shm.buf[:2] = b"ok"
        other = mpshm.SharedMemory(shm.name)
        print(bytes(other.buf[:2]).decode())
        other.close(); shm.close(); shm.unlink()
        try:
            mpshm.SharedMemory(create=True, size=100, backend="posix")
        except ImportError as exc:
            print(exc)
        """
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "['mmap', 'sysv']" and lines[1] == "ok"
    assert "pip install posix_ipc" in lines[2]
