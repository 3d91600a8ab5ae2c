"""ShareableList: a fixed-length list in shared memory, read and written by a child.

Items may be int, float, bool, str, bytes or None. Unlike the standard
library's, str and bytes values come back exactly as stored: trailing NUL
bytes are kept (CPython gh-96779, gh-106939), and multi-byte UTF-8 text is
not cut short (CPython gh-88336).

Run it:  python examples/shareable_list.py
"""

import multiprocessing

from mpshm import ShareableList

VALUES = [
    "padded\x00\x00",  # trailing NULs: the stdlib would drop them
    "ééééééé",  # 7 characters, 14 bytes: the stdlib would keep only 4 of them
    "日本語のテキスト ✓",
    b"raw\x00bytes\x00",
    42,
    3.5,
    True,
    None,
]


def child(name, queue):
    sl = ShareableList(name=name)  # attach by the segment's name
    queue.put(list(sl))  # send back what we read
    sl[0] = "changed\x00"  # a new value must fit the item's original room
    sl[4] += 1
    sl.shm.close()  # detach; only the creator unlinks


if __name__ == "__main__":
    ctx = multiprocessing.get_context("spawn")
    sl = ShareableList(VALUES)  # backend="sysv" or "mmap" work the same way
    try:
        print(f"created {sl.shm.name} ({sl.shm.size} bytes)")
        queue = ctx.Queue()
        p = ctx.Process(target=child, args=(sl.shm.name, queue))
        p.start()
        seen = queue.get(timeout=60)
        p.join()
        assert p.exitcode == 0

        print(f"the child read: {seen!r}")
        assert seen == VALUES, "a value did not round-trip"
        print(f"after the child wrote: {sl[0]!r}, {sl[4]!r}")
        assert sl[0] == "changed\x00" and sl[4] == 43
    finally:
        sl.shm.close()
        sl.shm.unlink()  # destroy the segment
