"""mpshm.pool.Pool against pickling and the standard library's SharedMemory, side by side.

    python benchmarks/pool.py [--quick] [--sizes 1M 16M 256M 1G] [--repeat N] [--json FILE]
                              [--backends NAME ...] [--plot FILE.png] [--no-progress]

The same as ``mpshm bench`` (``python -m mpshm bench``), which the installed
package carries: the measuring is in ``mpshm/_poolbench.py`` (its docstring
says what is measured and how), the options, progress display, table and
chart in ``mpshm/cli/bench.py``. Progress goes to stderr, the table and the
target verdicts to stdout at the end.
"""

from __future__ import annotations

import sys

from mpshm.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
