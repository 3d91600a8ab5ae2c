"""A C program reads segments made in Python: mpshm segments are plain OS objects.

A ``posix`` segment is what ``shm_open(3)`` opens by its name, and a ``sysv``
segment what ``shmget(2)`` finds by its key, so C (or any language) reads
them with the usual system calls. This script creates one of each, writes a
message into it, builds ``c_reader/reader.c`` with the system C compiler and
runs it on both.

Run it:  python examples/c_interop.py   (needs cc or gcc; CC=... picks another)
"""

import os
import shutil
import subprocess
import sys
import tempfile

import mpshm

SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "c_reader", "reader.c")
MESSAGE = b"hello from Python"


def build_reader(directory):
    """Compile reader.c into *directory*; return the program's path."""
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        sys.exit("no C compiler found: install gcc (or set CC) to run this example")
    program = os.path.join(directory, "reader")
    # -lrt: shm_open lives in librt with glibc before 2.34 (harmless after).
    subprocess.run(
        [compiler, "-std=c99", "-Wall", "-Wextra", "-O2", "-o", program, SOURCE, "-lrt"],
        check=True,
    )
    return program


if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as tmp:
        reader = build_reader(tmp)
        for backend in ("posix", "sysv"):
            shm = mpshm.SharedMemory(create=True, size=4096, backend=backend)
            try:
                shm.buf[: len(MESSAGE)] = MESSAGE
                # What C needs: the bare POSIX name ("psm_..."), or the SysV key
                # after "sysv:" ("0x5a3c09e1").
                ident = shm.name if backend == "posix" else shm.name.split(":", 1)[1]
                result = subprocess.run(
                    [reader, backend, ident, str(len(MESSAGE))], capture_output=True, text=True
                )
                if result.returncode != 0:
                    sys.exit(f"reader failed on {shm.name}: {result.stderr.strip()}")
                print(f"{shm.name} -> {result.stdout.strip()}")
                assert f'read "{MESSAGE.decode()}"' in result.stdout, result.stdout
            finally:
                shm.close()
                shm.unlink()  # C only read it; the creator destroys it
