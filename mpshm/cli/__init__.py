"""The command line: ``python -m mpshm`` (or the ``mpshm`` script).

Subcommands, each in a module of its own with ``add_parser(subparsers)``
that registers it and sets ``func`` to a function taking the parsed
arguments and returning the exit status:

* ``doctor`` (:mod:`mpshm.cli.doctor`): what on this machine decides
  whether shared memory works, with a verdict and a remedy for each;
* ``list`` and ``gc`` (:mod:`mpshm.cli.inventory`): the segments of every
  backend, and destroying the ones mpshm meant to clean up but could not;
* ``bench`` (:mod:`mpshm.cli.bench`): the side-by-side pool benchmark.
"""

from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``mpshm`` with every subcommand."""
    from .. import __version__
    from . import bench, doctor, inventory

    parser = argparse.ArgumentParser(
        prog="mpshm",
        description="Shared memory for multiprocessing: check this machine, list and "
        "clean up segments, benchmark.",
    )
    parser.add_argument("--version", action="version", version=f"mpshm {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    doctor.add_parser(subparsers)
    inventory.add_parsers(subparsers)
    bench.add_parser(subparsers)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the command line with *argv* (default: ``sys.argv[1:]``); return the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    try:
        status: int = args.func(args)
    except KeyboardInterrupt:
        print("mpshm: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `mpshm list | head`
        return 0
    return status
