"""Nothing is destroyed without proof that it is the object mpshm made, and
nothing another user made passes for ours.

* A storage identity holds something a later object cannot share: the inode
  generation (ext4, which hands a freed inode number to the next file), a
  random token in a ``user.mpshm`` extended attribute (tmpfs), the SysV
  creator pid, uid and size. A file put where a tracked segment was, even at
  the same inode and size, survives the tracker and ``mpshm gc``.
* ``destroy(ident, None)`` destroys nothing; destroy never removes another
  user's object, a symbolic link, or a file in a directory others may change.
* A SysV segment created by another user is foreign even when it names us
  as its owner (its creator keeps every right over it).
* Segments are 0600 (the mmap directory 0700) under any umask; refusals
  (another user's unlink, kernel.shmmni, no address space) say what
  happened in one clean message.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import stat
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path
from typing import Any

import pytest
from helpers import OTHER_UIDS, as_other_user, run_script, unique

import mpshm
from mpshm import _sysinfo as _system
from mpshm import backends
from mpshm.backends import sysv
from mpshm.shared_memory import OwnershipWarning

pytestmark = pytest.mark.timeout(120)
IS_ROOT = os.geteuid() == 0


def _require(condition: bool, reason: str) -> None:
    """Skip unless *condition*; CI (MPSHM_REQUIRE_UNSHARE) fails instead."""
    if not condition:
        if os.environ.get("MPSHM_REQUIRE_UNSHARE"):
            pytest.fail(reason)
        pytest.skip(reason)


def _load_backends() -> None:
    for name in ("posix", "sysv", "mmap"):
        backends.get(name)


# --------------------------------------------------------------------------
# 1. Identities a new object cannot share


def _options(backend: str, tmp_path: Path) -> dict[str, Any]:
    return {"dir": str(tmp_path / "segments")} if backend == "mmap" else {}


def test_identity_is_the_same_from_creation_attach_and_name(backend, tmp_path):
    """The identity a creation records is what an attach and a look-up by
    name give for the same object (the pool's cache and the slabs compare
    them), and it carries the part a later object cannot share."""
    chosen = backends.get(backend)
    options = _options(backend, tmp_path)
    shm = mpshm.SharedMemory(create=True, size=5000, backend=backend, **options)
    try:
        created = shm._attachment.identity
        other = mpshm.SharedMemory(shm.name)
        try:
            assert created == other._attachment.identity == chosen.identity(shm._ident)
        finally:
            other.close()
        if backend == "sysv":
            assert created.split(":")[1:] == [str(os.getpid()), str(os.geteuid()), "5000"]
        else:
            fields = created.split(":")
            assert fields[2] == "5000" and fields[3][0] in "gx", created
        ident = chosen.generate(options)
        copied = chosen.create_from(ident, memoryview(b"abc" * 100), options)
        try:
            assert copied == chosen.identity(ident) and copied != created
        finally:
            chosen.unlink(ident)
    finally:
        shm.close()
        shm.unlink()


def test_destroy_without_identity_destroys_nothing(backend, tmp_path):
    chosen = backends.get(backend)
    shm = mpshm.SharedMemory(create=True, size=4096, backend=backend,
                             **_options(backend, tmp_path))
    try:
        assert chosen.destroy(shm._ident, None) is False
        assert chosen.identity(shm._ident) == shm._attachment.identity  # still there
        assert chosen.destroy(shm._ident, shm._attachment.identity + "0") is False
        assert chosen.destroy(shm._ident, shm._attachment.identity) is True
        assert chosen.identity(shm._ident) is None
    finally:
        shm.close()
        try:
            shm.unlink()
        except FileNotFoundError:
            pass


def test_tmpfs_identity_is_a_token_each_creation_draws_anew():
    """On tmpfs (no inode generation) a new POSIX segment carries a random
    token in its ``user.mpshm`` attribute: the same name made again at the
    same size has another identity, and without that token the file is no
    longer the object recorded (destroy leaves it alone)."""
    chosen = backends.get("posix")
    name = unique("token")
    identities = []
    for _ in range(2):
        shm = mpshm.SharedMemory(name, create=True, size=4096, track=False)
        shm.close()
        try:
            identities.append(chosen.identity(name))
            token = os.getxattr(f"/dev/shm/{name}", "user.mpshm").decode()
            assert identities[-1].split(":")[3] == "x" + token
        finally:
            shm.unlink()
    (*_, size0, token0), (*_, size1, token1) = (i.split(":") for i in identities)
    assert size0 == size1 == "4096" and token0[0] == token1[0] == "x"
    assert token0 != token1  # what tells them apart even at the same dev:ino
    shm = mpshm.SharedMemory(name, create=True, size=4096, track=False)
    try:
        recorded = shm._attachment.identity
        os.removexattr(f"/dev/shm/{name}", "user.mpshm")  # as a file mpshm did not make
        assert chosen.identity(name) == recorded.rsplit(":", 1)[0]
        assert chosen.destroy(name, recorded) is False
        assert os.path.exists(f"/dev/shm/{name}")
    finally:
        shm.close()
        shm.unlink()


def test_a_file_made_again_at_a_reused_inode_is_not_ours(tmp_path):
    """A segment file removed behind mpshm's back and a new file of the same
    size written at its path (on ext4 here the inode number comes back at
    once): the identity differs, and destroy leaves the new file alone."""
    chosen = backends.get("mmap")
    directory = tmp_path / "d"
    name = f"mmap:{directory}/results.bin"
    shm = mpshm.SharedMemory(name, create=True, size=8192, track=False, dir=str(directory))
    recorded = shm._attachment.identity
    shm.close()
    ident = shm._ident
    old = os.stat(ident).st_ino
    os.unlink(ident)
    Path(ident).write_bytes(b"n" * 8192)
    assert os.stat(ident).st_size == 8192
    reused = os.stat(ident).st_ino == old
    assert chosen.identity(ident) != recorded
    assert chosen.destroy(ident, recorded) is False
    assert Path(ident).read_bytes() == b"n" * 8192
    if not reused:
        print("(the inode number was not reused this time: the namespace tests cover it)")


@pytest.mark.skipif(not IS_ROOT, reason="changing a file's owner needs root")
def test_destroy_refuses_what_this_user_cannot_vouch_for(tmp_path):
    """A file of another user, a symbolic link, a file in a directory others
    may change: never destroyed, even with the identity recorded."""
    posix, mmap_ = backends.get("posix"), backends.get("mmap")
    made = mpshm.SharedMemory(create=True, size=4096, track=False)
    try:
        os.chown(f"/dev/shm/{made._ident}", OTHER_UIDS[0], -1)
        assert posix.destroy(made._ident, posix.identity(made._ident)) is False
        assert posix.identity(made._ident) is not None
    finally:
        made.close()
        made.unlink()
    directory = tmp_path / "d"
    segment = mpshm.SharedMemory(create=True, size=4096, backend="mmap", track=False,
                                 dir=str(directory))
    ident = segment._ident
    segment.close()
    try:
        os.chown(ident, OTHER_UIDS[0], -1)
        assert mmap_.destroy(ident, mmap_.identity(ident)) is False
        os.chown(ident, os.geteuid(), -1)
        os.chmod(directory, 0o777)  # anyone may swap its files
        assert mmap_.destroy(ident, mmap_.identity(ident)) is False
        os.chmod(directory, 0o1777)  # ... unless sticky
        assert mmap_.destroy(ident, mmap_.identity(ident)) is True
        target = tmp_path / "target"
        target.write_bytes(b"t" * 4096)
        link = directory / "link"
        os.symlink(target, link)
        assert mmap_.destroy(str(link), mmap_.identity(str(link))) is False
        assert link.is_symlink() and target.exists()
        real = tmp_path / "real"
        real.mkdir(mode=0o700)
        (real / "f").write_bytes(b"f" * 4096)
        os.symlink(real, tmp_path / "via")
        via = str(tmp_path / "via" / "f")
        assert mmap_.destroy(via, mmap_.identity(via)) is False  # a symlinked directory
        assert (real / "f").exists()
    finally:
        if os.path.exists(ident):
            os.unlink(ident)


def test_sysv_destroy_needs_every_recorded_fact():
    chosen = backends.get("sysv")
    shm = mpshm.SharedMemory(create=True, size=4096, backend="sysv", track=False)
    try:
        identity = shm._attachment.identity
        shmid, cpid, cuid, size = identity.split(":")
        for wrong in (f"{shmid}", f"{shmid}:{int(cpid) + 1}:{cuid}:{size}",
                      f"{shmid}:{cpid}:{int(cuid) + 1}:{size}", f"{shmid}:{cpid}:{cuid}:4097",
                      "junk"):
            assert chosen.destroy(shm._ident, wrong) is False, wrong
        assert chosen.destroy(unique("other"), identity) is False  # another key
        assert chosen.identity(shm._ident) == identity
        assert chosen.destroy(shm._ident, identity) is True
        assert chosen.identity(shm._ident) is None
    finally:
        shm.close()
        try:
            shm.unlink()
        except FileNotFoundError:
            pass


# -- The scenario: a tracked segment's file replaced, on a real ext4 ---------

CHILD = r"""
import sys
import mpshm, mpshm.tracking
size = int(sys.argv[1])
for path in sys.argv[2:]:
    shm = mpshm.SharedMemory("mmap:" + path, create=True, size=size)  # tracked
    shm.buf[:4] = b"mine"
    shm.close()  # (unmapped: its inode is freed when the file is removed)
print(mpshm.tracking.tracker_pid(), flush=True)
sys.stdin.readline()
"""

DRIVER = r"""
import json, os, signal, subprocess, sys, time

point, end, same = sys.argv[1], sys.argv[2], sys.argv[3] == "same"
directory, state = os.path.join(point, "d"), os.path.join(point, "state")
os.mkdir(directory, 0o700)
os.mkdir(state, 0o700)
env = dict(os.environ, MPSHM_STATE_DIR=state, MPSHM_DIR=directory)
env.pop("MPSHM_TRACKER", None)
target, control = os.path.join(directory, "results.bin"), os.path.join(directory, "control.bin")
SIZE = 8192
NEW = b"unrelated data " * 1000
NEW = NEW[:SIZE] if same else NEW[:5000]

def gone(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True

def wait(predicate, what, timeout=30):
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out waiting for {what}")
        time.sleep(0.02)

child = subprocess.Popen([sys.executable, "-c", sys.argv[4], str(SIZE), target, control],
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
tracker = int(child.stdout.readline())

def journaled():
    text = ""
    for name in os.listdir(state):
        try:
            with open(os.path.join(state, name)) as f:
                text += f.read()
        except OSError:
            pass
    return json.dumps(target) in text and json.dumps(control) in text

wait(journaled, "the tracker's journal")
if end == "kill":  # the program and its tracker, by pid
    os.kill(child.pid, signal.SIGKILL)
    os.kill(tracker, signal.SIGKILL)
    child.wait()
    wait(lambda: gone(tracker), "the tracker's death")

# Behind mpshm's back: the segment's file goes, an unrelated one takes its
# path, at the same inode number (ext4 hands it to the next file made).
old = os.stat(target)
os.unlink(target)
reused = False
candidates = []
for attempt in range(50):
    path = target if attempt == 0 else os.path.join(directory, f"candidate{attempt}")
    with open(path, "wb") as f:
        f.write(NEW)
    if os.stat(path).st_ino == old.st_ino:
        if path != target:
            os.rename(path, target)
        reused = True
        break
    candidates.append(path)
for path in candidates[1:]:
    os.unlink(path)
if not reused and candidates and candidates[0] != target:
    os.rename(candidates[0], target)

gc = ""
if end == "exit":
    child.stdin.write("\n")
    child.stdin.close()
    child.wait()
    wait(lambda: gone(tracker), "the tracker to clean up")
else:
    result = subprocess.run([sys.executable, "-m", "mpshm", "gc"], capture_output=True,
                            text=True, env=env, timeout=60)
    gc = result.stdout + result.stderr
try:
    with open(target, "rb") as f:
        survived = f.read() == NEW
except FileNotFoundError:
    survived = False
print(json.dumps({"reused": reused, "same_size": len(NEW) == old.st_size,
                  "survived": survived, "control_destroyed": not os.path.exists(control),
                  "gc": gc}))
"""


@pytest.mark.timeout(180)
@pytest.mark.parametrize("size", ["different", "same"])
@pytest.mark.parametrize("end", ["exit", "kill"])
def test_a_file_put_where_a_tracked_segment_was_survives(tmp_path, end, size):
    """Issue scenario 2, on a 16 MiB ext4 image mounted in a private mount
    namespace: a program creates ``mmap:<dir>/results.bin`` (tracked) and a
    control segment; the file is removed behind mpshm's back and an
    unrelated file written at its path, taking the same inode number (and,
    in the same-size case, the same size: only the inode generation tells
    them apart). Whether the program ends normally (its tracker cleans up)
    or is killed with its tracker (``mpshm gc`` cleans up), the new file
    survives, and the control segment is destroyed."""
    tools = [shutil.which(tool) for tool in ("unshare", "mkfs.ext4")]
    _require(all(tools) and IS_ROOT, "root, unshare and mkfs.ext4 are needed for this test")
    image = tmp_path / "disk.img"
    with open(image, "wb") as f:
        f.truncate(16 << 20)
    made = subprocess.run(["mkfs.ext4", "-q", "-F", str(image)], capture_output=True,
                          text=True, timeout=60)
    assert made.returncode == 0, made.stderr
    point = tmp_path / "disk"
    point.mkdir()
    shell = 'mount -o loop "$1" "$2" && exec "$3" -c "$4" "$2" "$5" "$6" "$7"'
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parent.parent))
    env.pop("MPSHM_TRACKER", None)
    result = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c", shell, "sh",
         str(image), str(point), sys.executable, textwrap.dedent(DRIVER), end, size,
         textwrap.dedent(CHILD)],
        capture_output=True, text=True, timeout=150, env=env,
    )
    if result.returncode != 0 and "mount" in result.stderr and not result.stdout:
        _require(False, f"cannot mount an ext4 image here: {result.stderr.strip()}")
    assert result.returncode == 0, result.stdout + result.stderr
    outcome = json.loads(result.stdout.strip().splitlines()[-1])
    assert outcome["reused"], "ext4 did not reuse the inode number: the test proves nothing"
    assert outcome["same_size"] is (size == "same")
    assert outcome["survived"], f"the unrelated file was destroyed: {outcome}"
    assert outcome["control_destroyed"], f"the control segment was left: {outcome}"


# --------------------------------------------------------------------------
# 2. A SysV segment created by another user


@pytest.mark.skipif(not IS_ROOT, reason="playing another user needs root")
@pytest.mark.parametrize("other", OTHER_UIDS)
def test_a_sysv_segment_created_by_another_user_is_foreign(other):
    """Issue scenario 3: another user creates the key the victim will use
    (mode 0600) and hands its ownership to the victim (IPC_SET). The victim
    owns it and the mode is right, but the creator keeps every right over
    it: owner_check reports it, and destroy never removes it."""
    import sysv_ipc

    _load_backends()
    name = f"sysv:{unique('frames')}"
    key = sysv._signed(sysv.key_for(name.split(":", 1)[1]))
    me = os.geteuid()

    def plant() -> int:
        segment = sysv_ipc.SharedMemory(key, sysv_ipc.IPC_CREX, mode=0o600, size=4096)
        segment.uid = me  # IPC_SET: the creator may name any owner
        shmid = int(segment.id)
        segment.detach()
        return shmid

    shmid = as_other_user(plant, uid=other)
    assert isinstance(shmid, int), shmid
    try:
        with pytest.raises(PermissionError, match=rf"created by uid {other}") as refused:
            mpshm.SharedMemory(name, owner_check="error")
        text = str(refused.value)
        assert f"owner uid {me}" in text and "0600" in text and "owner_check='ignore'" in text
        with pytest.warns(OwnershipWarning, match=rf"created by uid {other}"):
            shm = mpshm.SharedMemory(name)
        identity = shm._attachment.identity
        assert shm._attachment.creator_uid == other and shm._attachment.uid == me
        shm.close()
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            mpshm.SharedMemory(name, owner_check="ignore").close()
        chosen = backends.get("sysv")
        assert identity == chosen.identity(name.split(":", 1)[1])
        assert identity.split(":")[2] == str(other)
        assert chosen.destroy(name.split(":", 1)[1], identity) is False  # not ours
    finally:
        sysv_ipc.remove_shared_memory(shmid)


@pytest.mark.skipif(not IS_ROOT, reason="playing another user needs root")
def test_a_foreign_group_is_named_when_group_bits_allow_it():
    shm = mpshm.SharedMemory(create=True, size=4096, backend="sysv", track=False)
    try:
        import sysv_ipc

        segment = sysv_ipc.SharedMemory(sysv._signed(sysv.key_for(shm._ident)))
        try:
            segment.gid = OTHER_UIDS[0]
            segment.mode = 0o660
        finally:
            segment.detach()
        with pytest.raises(PermissionError, match=r"other users can change it \(the members "
                           rf"of group 0 and of group {OTHER_UIDS[0]}\)"):
            mpshm.SharedMemory(shm.name, owner_check="error")
    finally:
        shm.close()
        shm.unlink()


# --------------------------------------------------------------------------
# 3. Umask, and clean refusals

UMASK_PROGRAM = r"""
import json, os, stat, sys
import mpshm
from mpshm import backends
from mpshm.backends import sysv

os.umask(0o277)
base = sys.argv[1]
made, modes = [], {}
for backend in ("posix", "sysv", "mmap"):
    options = {"dir": os.path.join(base, "a", "b", "segments")} if backend == "mmap" else {}
    shm = mpshm.SharedMemory(create=True, size=4096, backend=backend, **options)
    made.append(shm)
    chosen = backends.get(backend)
    ident = chosen.generate(options)
    chosen.create_from(ident, memoryview(b"x" * 100), options)
    again = mpshm.SharedMemory(shm.name, owner_check="error")  # the same user attaches
    again.close()
    for what, key in (("create", shm._ident), ("create_from", ident)):
        if backend == "sysv":
            entry = next(e for e in sysv._proc_segments() if e.key == sysv.key_for(key))
            modes[f"{backend}-{what}"] = entry.mode & 0o777
        else:
            path = "/dev/shm/" + key if backend == "posix" else key
            modes[f"{backend}-{what}"] = stat.S_IMODE(os.stat(path).st_mode)
    chosen.unlink(ident)
for shm in made:
    shm.close()
    shm.unlink()
for sub in ("a", "a/b", "a/b/segments"):
    modes[sub] = stat.S_IMODE(os.stat(os.path.join(base, sub)).st_mode)
print(json.dumps(modes))
"""


def test_segments_are_0600_under_umask_0277(tmp_path):
    """Issue scenario 10: under umask 0277 a file would be created 0400 and a
    directory 0500 (for other than root, unusable: the same user's attach
    fails, and nothing can be created in the directory)."""
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(UMASK_PROGRAM), str(tmp_path)],
        capture_output=True, text=True, timeout=60,
        env=dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parent.parent)),
    )
    assert result.returncode == 0, result.stdout + result.stderr
    modes = json.loads(result.stdout)
    for backend in ("posix", "sysv", "mmap"):
        assert modes[f"{backend}-create"] == modes[f"{backend}-create_from"] == 0o600, modes
    assert modes["a"] == modes["a/b"] == modes["a/b/segments"] == 0o700, modes


@pytest.mark.skipif(not IS_ROOT, reason="playing another user needs root")
def test_another_user_under_umask_0277_can_use_its_segments():
    """As a user without root's override of file modes: segments made under
    umask 0277 attach (0600, not 0400), and the mmap directory takes files
    (0700, not 0500)."""
    _load_backends()
    base = f"/dev/shm/{unique('umask')}"

    def make_and_attach() -> dict[str, Any]:
        modes = {}
        for backend in ("posix", "sysv", "mmap"):
            options = {"dir": f"{base}/segments"} if backend == "mmap" else {}
            shm = mpshm.SharedMemory(create=True, size=4096, backend=backend, track=False,
                                     **options)
            try:
                again = mpshm.SharedMemory(shm.name, owner_check="error")
                again.buf[0] = 1
                again.close()
                modes[backend] = "attached"
            finally:
                shm.close()
                shm.unlink()
        modes["dir"] = stat.S_IMODE(os.stat(f"{base}/segments").st_mode)
        return modes

    try:
        outcome = as_other_user(make_and_attach, umask=0o277)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    assert outcome == {"posix": "attached", "sysv": "attached", "mmap": "attached",
                       "dir": 0o700}, outcome


@pytest.mark.skipif(not IS_ROOT, reason="playing another user needs root")
@pytest.mark.parametrize("backend", ["posix", "sysv", "mmap"])
def test_another_users_unlink_is_refused_in_one_clean_message(backend):
    _load_backends()
    chosen = backends.get(backend)
    directory = None
    options: dict[str, Any] = {}
    if backend == "mmap":  # a directory the other user may reach and write to
        directory = f"/dev/shm/{unique('shared')}"
        os.mkdir(directory)
        os.chmod(directory, 0o1777)
        options = {"dir": directory}
    shm = mpshm.SharedMemory(create=True, size=4096, backend=backend, track=False, **options)
    try:
        outcome = as_other_user(lambda: chosen.unlink(shm._ident))
        assert outcome[:2] == ("raised", "PermissionError"), outcome
        text = outcome[3]
        assert text.count("[Errno") == 1, text
        assert "owner" in text and "remove" in text and shm._ident in text, text
        assert chosen.identity(shm._ident) == shm._attachment.identity  # still there
    finally:
        shm.close()
        shm.unlink()
        if directory:
            os.rmdir(directory)


SHMMNI_PROGRAM = r"""
import errno, sys
import mpshm

made = []
try:
    for _ in range(64):
        made.append(mpshm.SharedMemory(create=True, size=4096, backend="sysv", track=False))
except OSError as exc:
    assert exc.errno == errno.ENOSPC, repr(exc)
    print(len(made), exc)
else:
    print("no refusal")
for shm in made:
    shm.close()
    shm.unlink()
"""


def test_sysv_out_of_segment_slots_says_so():
    """kernel.shmmni reached (in a private IPC namespace): the error names
    that limit and the count of segments, and no nonsense free space."""
    _require(bool(shutil.which("unshare")) and IS_ROOT, "root and unshare are needed")
    shell = 'echo 6 > /proc/sys/kernel/shmmni && exec "$0" -c "$1"'
    result = subprocess.run(
        ["unshare", "--ipc", "sh", "-c", shell, sys.executable, textwrap.dedent(SHMMNI_PROGRAM)],
        capture_output=True, text=True, timeout=60,
        env=dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parent.parent)),
    )
    assert result.returncode == 0, result.stdout + result.stderr
    count, message = result.stdout.strip().split(" ", 1)
    assert count == "6", result.stdout
    assert "kernel.shmmni = 6" in message and "6 segments exist" in message, message
    assert "free" not in message and "PiB" not in message, message


ENOMEM_PROGRAM = r"""
import errno, resource, sys
import mpshm
from mpshm.backends import sysv

name = sys.argv[1]
resource.setrlimit(resource.RLIMIT_AS, (768 << 20, 768 << 20))
for what in ("attach", "create"):
    try:
        if what == "attach":
            mpshm.SharedMemory(name)
        else:
            mpshm.SharedMemory(create=True, size=1 << 30, backend="sysv", track=False)
    except OSError as exc:
        print(what, type(exc).__name__, errno.errorcode.get(exc.errno), exc)
    except MemoryError as exc:
        print(what, "MemoryError", exc)
    else:
        print(what, "no error")
import os
print("left", [e.key for e in sysv._proc_segments() if e.cpid == os.getpid()])
"""


def test_sysv_out_of_address_space_is_enomem_like_the_other_backends():
    """What sysv_ipc reports as MemoryError (shmat refused for want of
    address space, here ulimit -v) is OSError(ENOMEM), as on the other
    backends; a refused creation leaves nothing behind."""
    shm = mpshm.SharedMemory(create=True, size=1 << 30, backend="sysv", track=False)
    try:
        result = run_script(ENOMEM_PROGRAM.replace("sys.argv[1]", repr(shm.name)))
        assert result.returncode == 0, result.stdout + result.stderr
        lines = {line.split(" ", 1)[0]: line for line in result.stdout.splitlines()}
        for what in ("attach", "create"):
            assert lines[what].startswith(f"{what} OSError ENOMEM "), result.stdout
            assert "1.0 GiB" in lines[what] and "System V" in lines[what], result.stdout
        assert lines["left"] == "left []", result.stdout  # the refused creation left none
    finally:
        shm.close()
        shm.unlink()


def test_sysv_errors_have_no_free_space_nonsense(monkeypatch):
    """A refusal that is not about space (no shmmni exhaustion, limits at
    the kernel's "no limit" defaults) reports no absurd free figure."""
    chosen = backends.get("sysv")
    values = {"/proc/sys/kernel/shmmax": 18446744073692774399,
              "/proc/sys/kernel/shmall": 18446744073692774399,
              "/proc/sys/kernel/shmmni": 4096}
    monkeypatch.setattr(_system, "read_int", values.get)
    error = chosen._refused("x", 4096, OSError(errno.ENOSPC, "No space left on device"))
    assert isinstance(error, OSError) and error.errno == errno.ENOSPC
    assert "PiB" not in str(error), str(error)
    # shmget's ENOMEM: the kernel would not commit the memory (no space for it).
    error = chosen._refused("x", 1 << 47, OSError(errno.ENOMEM, "Cannot allocate memory"))
    assert isinstance(error, OSError) and error.errno == errno.ENOSPC
    assert "would not commit" in str(error) and "PiB" not in str(error), str(error)
    # sysv_ipc's MemoryError (shmat: no address space) is ENOMEM, as elsewhere.
    error = chosen._refused("x", 4096, MemoryError())
    assert isinstance(error, OSError) and error.errno == errno.ENOMEM
    assert not isinstance(error, MemoryError)

