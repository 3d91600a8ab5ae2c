"""``python -m mpshm``: the command line (see :mod:`mpshm.cli`)."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
