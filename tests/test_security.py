"""Security (issue 7): nobody gets in who does not belong.

* Segments and files are created 0600, owned by their creator, whatever the
  umask (ShareableList and manager segments too).
* The mmap backend refuses a directory that is a symbolic link, one that
  others may write to without the sticky bit, and one owned by someone else.
* Attaching a segment whose owner or mode is not what mpshm creates is
  reported (``owner_check=``: a warning by default, an error on request).
* Generated names carry 64 random bits (POSIX, mmap); SysV keys are 32-bit.
* A manager answers only clients that know its authkey.
"""

from __future__ import annotations

import os
import pickle
import re
import stat
import warnings
from typing import Any

import pytest
from helpers import BACKENDS
from reliability import pattern

import mpshm
from mpshm.backends import sysv
from mpshm.shared_memory import OwnershipWarning

pytestmark = pytest.mark.timeout(120)
ROOT = os.geteuid() == 0
OTHER_UID = 12345


def _path(shm: mpshm.SharedMemory) -> str:
    assert shm._ident is not None
    return f"/dev/shm/{shm._ident}" if shm.backend == "posix" else shm._ident


def _owner_and_mode(shm: mpshm.SharedMemory) -> tuple[int, int]:
    if shm.backend == "sysv":
        key = sysv.key_for(shm._ident or "")
        entry = next(e for e in sysv._proc_segments() or [] if e.key == key)
        return entry.uid, entry.mode & 0o777
    st = os.stat(_path(shm))
    return st.st_uid, stat.S_IMODE(st.st_mode)


def _set_owner_and_mode(shm: mpshm.SharedMemory, uid: int | None, mode: int | None) -> None:
    """What another user (or a careless one) could have done to the segment."""
    if shm.backend == "sysv":
        import sysv_ipc

        segment = sysv_ipc.SharedMemory(sysv._signed(sysv.key_for(shm._ident or "")))
        try:
            if uid is not None:
                segment.uid = uid
            if mode is not None:
                segment.mode = mode
        finally:
            segment.detach()
        return
    path = _path(shm)
    if uid is not None:
        os.chown(path, uid, -1)
    if mode is not None:
        os.chmod(path, mode)


@pytest.mark.parametrize("umask", [0o000, 0o022, 0o077], ids=["000", "022", "077"])
def test_segments_are_created_0600_by_their_owner(backend, umask, tmp_path):
    old = os.umask(umask)
    try:
        options: dict[str, Any] = {"dir": str(tmp_path / "d")} if backend == "mmap" else {}
        shm = mpshm.SharedMemory(create=True, size=4096, backend=backend, **options)
        named = mpshm.SharedMemory(f"{backend}:own_{os.urandom(8).hex()}", create=True,
                                   size=10, **options)
        sl = mpshm.ShareableList([1, "two"], backend=backend, **options)
    finally:
        os.umask(old)
    try:
        for made in (shm, named, sl.shm):
            assert _owner_and_mode(made) == (os.geteuid(), 0o600), made.name
        if backend == "mmap":
            assert stat.S_IMODE(os.stat(tmp_path / "d").st_mode) == 0o700
    finally:
        for made in (shm, named, sl.shm):
            made.close()
            made.unlink()


def test_manager_segments_are_0600(backend):
    old = os.umask(0)
    try:
        with mpshm.SharedMemoryManager(backend=backend) as smm:
            shm = smm.SharedMemory(4096)
            sl = smm.ShareableList([1, 2])
            assert _owner_and_mode(shm) == (os.geteuid(), 0o600)
            assert _owner_and_mode(sl.shm) == (os.geteuid(), 0o600)
            shm.close()
            sl.shm.close()
    finally:
        os.umask(old)


def test_a_manager_needs_its_authkey():
    from multiprocessing import AuthenticationError

    with mpshm.SharedMemoryManager(authkey=b"the right key") as smm:
        wrong = mpshm.SharedMemoryManager(address=smm.address, authkey=b"a wrong key")
        with pytest.raises(AuthenticationError):
            wrong.connect()
        right = mpshm.SharedMemoryManager(address=smm.address, authkey=b"the right key")
        right.connect()  # and the manager still serves
        shm = smm.SharedMemory(64)
        shm.close()


# -- the mmap backend's directory ---------------------------------------------------


def _create_in(directory: Any) -> None:
    shm = mpshm.SharedMemory(create=True, size=10, backend="mmap", dir=str(directory))
    shm.close()
    shm.unlink()


def test_mmap_refuses_a_symlinked_directory(tmp_path, monkeypatch):
    real = tmp_path / "real"
    real.mkdir(mode=0o700)
    link = tmp_path / "link"
    link.symlink_to(real)
    with pytest.raises(PermissionError, match="symbolic link"):
        _create_in(link)
    monkeypatch.setenv("MPSHM_DIR", str(link))  # the default directory too
    with pytest.raises(PermissionError, match="symbolic link"):
        mpshm.SharedMemory(create=True, size=10, backend="mmap")
    with pytest.raises(PermissionError, match="symbolic link"):
        mpshm.SharedMemory("mmap:name", create=True, size=10)
    assert os.listdir(real) == []


def test_mmap_refuses_a_world_writable_directory_without_sticky_bit(tmp_path):
    shared = tmp_path / "shared"
    shared.mkdir()
    for mode in (0o777, 0o772, 0o703):
        shared.chmod(mode)
        with pytest.raises(PermissionError, match="world-writable"):
            _create_in(shared)
    shared.chmod(0o1777)  # like /tmp: others cannot remove or replace our files
    _create_in(shared)
    shared.chmod(0o770)  # group-writable is the owner's choice
    _create_in(shared)
    assert os.listdir(shared) == []


@pytest.mark.skipif(not ROOT, reason="giving a directory to another user needs root")
def test_mmap_refuses_a_directory_owned_by_someone_else(tmp_path, monkeypatch):
    foreign = tmp_path / "foreign"
    foreign.mkdir(mode=0o700)
    os.chown(foreign, OTHER_UID, OTHER_UID)
    with pytest.raises(PermissionError, match=f"owned by uid {OTHER_UID}"):
        _create_in(foreign)
    monkeypatch.setenv("MPSHM_DIR", str(foreign))
    with pytest.raises(PermissionError, match=f"owned by uid {OTHER_UID}"):
        mpshm.SharedMemory(create=True, size=10, backend="mmap")
    assert os.listdir(foreign) == []


def test_mmap_refuses_symlinked_segment_files(tmp_path):
    target = tmp_path / "target"
    target.write_bytes(b"secret")
    (tmp_path / "link").symlink_to(target)
    with pytest.raises(PermissionError, match="symbolic link"):
        mpshm.SharedMemory(f"mmap:{tmp_path}/link")
    with pytest.raises(FileExistsError):
        mpshm.SharedMemory(f"mmap:{tmp_path}/link", create=True, size=10)
    assert target.read_bytes() == b"secret"


# -- owner_check ------------------------------------------------------------------


def _foreign(backend, make_shm, uid, mode):
    shm = make_shm(size=4096)
    shm.buf[:] = pattern(shm.name, 4096)
    _set_owner_and_mode(shm, uid, mode)
    return shm


CASES = [
    pytest.param(OTHER_UID, None, "another user owns it", id="other-owner"),
    pytest.param(None, 0o644, "other users can read it", id="mode-0644"),
    pytest.param(None, 0o666, "other users can change it", id="mode-0666"),
    pytest.param(None, 0o660, "other users can change it", id="mode-0660"),
]


@pytest.mark.parametrize(("uid", "mode", "risk"), CASES)
def test_owner_check_reports_a_foreign_segment(backend, make_shm, uid, mode, risk):
    if uid is not None and not ROOT:
        pytest.skip("giving a segment to another user needs root")
    shm = _foreign(backend, make_shm, uid, mode)
    owner, bits = _owner_and_mode(shm)
    expected = rf"owned by uid {owner} with mode {bits:04o}, not by you \(uid {os.geteuid()}\)"
    # Default: a warning naming owner, mode and what mpshm expects; the attach works.
    with pytest.warns(OwnershipWarning, match=expected) as caught:
        other = mpshm.SharedMemory(shm.name)
    assert risk in str(caught[0].message) and "0600" in str(caught[0].message)
    assert caught[0].filename == __file__  # it points at the caller
    assert bytes(other.buf) == pattern(shm.name, 4096)
    other.close()
    # Unpickled handles are checked too.
    with pytest.warns(OwnershipWarning, match=expected):
        pickle.loads(pickle.dumps(shm)).close()
    # "error": PermissionError naming the same; nothing attached, nothing changed.
    with pytest.raises(PermissionError, match=expected) as refused:
        mpshm.SharedMemory(shm.name, owner_check="error")
    assert refused.value.filename == shm.name and "owner_check='ignore'" in str(refused.value)
    with pytest.raises(PermissionError, match=expected):
        mpshm.ShareableList(name=shm.name, owner_check="error")
    # "ignore": silence.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        mpshm.SharedMemory(shm.name, owner_check="ignore").close()
    assert _owner_and_mode(shm) == (owner, bits)
    assert bytes(shm.buf) == pattern(shm.name, 4096)


def test_owner_check_is_silent_for_segments_mpshm_made(backend, make_shm):
    shm = make_shm(size=64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for policy in ("warn", "error", "ignore"):
            mpshm.SharedMemory(shm.name, owner_check=policy).close()
        pickle.loads(pickle.dumps(shm)).close()
        _set_owner_and_mode(shm, None, 0o400)  # stricter than mpshm's: fine
        mpshm.SharedMemory(shm.name, owner_check="error").close()


@pytest.mark.parametrize("bad", ["warning", "", None, True, "ERROR"])
def test_owner_check_values(bad, make_segment):
    shm = make_segment(size=64)
    with pytest.raises(ValueError, match="owner_check must be 'warn', 'error' or 'ignore'"):
        mpshm.SharedMemory(shm.name, owner_check=bad)
    with pytest.raises(ValueError, match="owner_check"):
        mpshm.SharedMemory(create=True, size=64, owner_check=bad)


# -- names ------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_generated_names_are_unguessable(backend):
    """64 random bits (16 hex digits) for POSIX and mmap; 32-bit keys for SysV,
    which is all a key holds (and why SysV relies on mode 0600 alone)."""
    chosen = mpshm.backends.get(backend)
    names = [chosen.generate({}) for _ in range(5000)]
    if backend == "sysv":
        # 5000 random 32-bit keys collide in about one run of 340 (the
        # birthday bound), three times in about one of 10**8; a generator of
        # fewer random bits would collide many times.
        assert len(names) - len(set(names)) <= 2
        assert all(re.fullmatch(r"0x[0-9a-f]{8}", name) for name in names)
        keys = {int(name, 16) for name in names}
        assert len({key >> 28 for key in keys}) == 16  # spread over the whole range
        return
    assert len(set(names)) == len(names)
    tokens = [re.fullmatch(r".*_([0-9a-f]+)", os.path.basename(name)).group(1)
              for name in names]
    assert all(len(token) >= 16 for token in tokens)  # >= 64 bits
    assert len({token[:4] for token in tokens}) > 4000  # not a counter
