"""The ``bench`` subcommand: :class:`mpshm.pool.Pool` against pickling and the
standard library's SharedMemory, side by side (what is measured and how:
:mod:`mpshm.bench.pool`).

This module holds the command line: the options, the progress display on
stderr, the table on stdout, the JSON file and the chart. (The project's
development targets for these figures are checked by ``benchmarks/pool.py``,
not by the installed command.)
It imports neither NumPy nor matplotlib until ``bench`` runs, so that
``mpshm --help`` and the other subcommands work without them.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
import threading
import time
from typing import TYPE_CHECKING, Any, Callable, Optional, Sequence, TextIO

from .. import backends as registry
from ..bench import DIRECTIONS, GIB, KIB, MIB, label

if TYPE_CHECKING:
    from matplotlib.axes import Axes

__all__ = [
    "DIRECTIONS",
    "Progress",
    "add_parser",
    "label",
    "parse_size",
    "plot",
    "print_report",
    "run",
]

DEFAULT_SIZES = ("1M", "16M", "256M", "1G")
DEFAULT_REPEAT = 3
# --quick: small sizes and fewer rounds (never fewer than 3 per figure: see
# mpshm.bench.pool.MIN_ROUNDS), so that the whole run (pool start-up included)
# stays under a minute on a busy 2-core machine.
QUICK_SIZES = ("1M", "16M", "64M")
QUICK_REPEAT = 1
DEFAULT_BACKENDS = ("posix", "sysv", "mmap")
NUMPY_MISSING = "mpshm bench needs NumPy: pip install 'mpshm[bench]'"
MATPLOTLIB_MISSING = "mpshm bench --plot needs matplotlib: pip install 'mpshm[plot]'"

PANEL_TITLES = {
    "send": "send: parent -> worker (worker takes len)",
    "args": "args: parent -> worker (worker sums)",
    "results": "results: worker -> parent (parent sums)",
}
METHOD_STYLES = {
    "pickle": ("tab:red", "o"),
    "stdlib-shm": ("tab:orange", "s"),
    "mpshm-posix": ("tab:blue", "^"),
    "mpshm-sysv": ("tab:green", "v"),
    "mpshm-mmap": ("tab:purple", "D"),
    "preshared": ("tab:cyan", "P"),
}


# -- arguments -------------------------------------------------------------------


def parse_size(text: str) -> int:
    """'1M', '16MiB', '1G', '4096' -> bytes (rounded down to a multiple of 8,
    for float64). Raises :class:`argparse.ArgumentTypeError` naming *text*."""
    match = re.fullmatch(r"\s*(\d+)\s*([kmg]?)(?:i?b)?\s*", text, re.IGNORECASE)
    if match is None:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (try 1M, 256M, 1G)")
    nbytes = int(match.group(1)) * {"": 1, "k": KIB, "m": MIB, "g": GIB}[match.group(2).lower()]
    nbytes -= nbytes % 8
    if nbytes < 8:
        raise argparse.ArgumentTypeError(f"size {text!r} is below one float64 (8 bytes)")
    return nbytes


def _backend_name(text: str) -> str:
    if text not in registry.registry:
        raise argparse.ArgumentTypeError(
            f"unknown backend {text!r} (valid: {', '.join(registry.registry)})")
    return text


def _repeat(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number >= 1, got {text!r}")
    return value


def _output_file(text: str) -> str:
    directory = os.path.dirname(os.path.abspath(text))
    if not os.path.isdir(directory):
        raise argparse.ArgumentTypeError(f"cannot write {text!r}: no directory {directory!r}")
    return text


def add_parser(subparsers: Any) -> None:
    """Register ``bench`` with the subcommands of ``mpshm``."""
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "bench",
        help="time mpshm's pool against pickling and the standard library's SharedMemory",
        description="Send float64 arrays to a 2-worker pool (spawn) and back, one task at a "
        "time, with plain pickling, the standard library's SharedMemory, mpshm.Pool on each "
        "backend and arrays made in shared memory from the start (preshared); print the "
        "median time per task (of at least 3 rounds) side by side with this machine's "
        "memcpy. Needs NumPy (pip install 'mpshm[bench]'). Progress goes to stderr, the "
        "table to stdout once done. Exit status 0 when it ran, 1 when it could not, 2 for "
        "bad arguments.",
    )
    parser.add_argument(
        "--quick", action="store_true",
        help=f"a short run, under a minute on 2 cores: sizes {' '.join(QUICK_SIZES)} "
        f"(unless --sizes is given) and --repeat {QUICK_REPEAT} (unless given)")
    parser.add_argument(
        "--sizes", nargs="+", type=parse_size, metavar="SIZE",
        help=f"array sizes, e.g. 1M 16M 256M 1G (default {' '.join(DEFAULT_SIZES)})")
    parser.add_argument(
        "--backends", nargs="+", type=_backend_name, metavar="NAME",
        help=f"mpshm backends to measure (default: {' '.join(DEFAULT_BACKENDS)}, those that "
        "work here); preshared uses the first one given (default posix)")
    parser.add_argument(
        "--repeat", type=_repeat, metavar="N",
        help=f"rounds per figure at the largest sizes, at least 3 whatever N; smaller sizes "
        f"get more (default {DEFAULT_REPEAT}, {QUICK_REPEAT} with --quick)")
    parser.add_argument("--json", type=_output_file, metavar="FILE",
                        help="also write the figures as JSON")
    parser.add_argument(
        "--plot", type=_output_file, metavar="FILE.png",
        help="also draw time per task against size, one line per method and a panel per "
        "direction (needs matplotlib: pip install 'mpshm[plot]')")
    parser.add_argument("--no-progress", action="store_true",
                        help="print nothing on stderr while it runs")
    parser.set_defaults(func=run)


def _choose_backends(asked: Optional[Sequence[str]]) -> tuple[list[str], list[str]]:
    """(backends to measure, problems); an asked-for backend that does not work
    here is a problem, a default one that does not is left out."""
    names = list(dict.fromkeys(asked)) if asked else list(DEFAULT_BACKENDS)
    chosen, problems = [], []
    for name in names:
        try:
            reason = registry.get(name).available()
        except ImportError as exc:
            reason = str(exc)
        if reason is None:
            chosen.append(name)
        elif asked:
            problems.append(f"backend {name!r} does not work here: {reason}")
    if not chosen and not problems:
        problems.append("none of the backends works here (see mpshm doctor)")
    return chosen, problems


# -- progress --------------------------------------------------------------------


def _ms(seconds: float) -> str:
    ms = seconds * 1e3
    digits = 0 if ms >= 100 else 1 if ms >= 10 else 2 if ms >= 1 else 3
    return f"{ms:.{digits}f} ms"


class Progress:
    """The progress display on *stream*: with *live* (a terminal) one line,
    redrawn as measurements finish and every second in between; otherwise
    one line per finished step. With *stream* None, nothing at all."""

    def __init__(self, stream: Optional[TextIO], total: int, live: bool) -> None:
        self.stream = stream
        self.total = total
        self.live = live and stream is not None
        self.done = 0
        self.started = time.monotonic()
        self._last = f"[0/{total}]"
        self._now = ""
        self._note = ""
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._ticker: Optional[threading.Thread] = None
        if self.live:
            self._ticker = threading.Thread(target=self._tick, name="mpshm-bench-progress",
                                            daemon=True)
            self._ticker.start()

    def _width(self) -> int:
        if self.stream is not None:
            try:
                return os.get_terminal_size(self.stream.fileno()).columns
            except (OSError, ValueError):  # not a terminal after all, or no file descriptor
                pass
        return shutil.get_terminal_size().columns

    def _elapsed(self) -> str:
        return f"elapsed {time.monotonic() - self.started:.0f} s"

    def _tick(self) -> None:
        while not self._stop.wait(1.0):
            self._draw()

    def _draw(self) -> None:
        assert self.stream is not None
        with self._lock:
            if self.done == 0 and self._now:  # setting up: what is going on comes first
                text = f"[0/{self.total}] {self._now} ...  {self._elapsed()}"
                if self._note:
                    text += f"  ({self._note})"
            else:
                text = f"{self._last}  {self._elapsed()}"
                if self._now:
                    text += f"  now: {self._now}"
            width = self._width() - 1
            self.stream.write("\r" + text[:max(width, 20)] + "\x1b[K")
            self.stream.flush()

    def _line(self, text: str) -> None:
        assert self.stream is not None
        self.stream.write(f"{text}  {self._elapsed()}\n")
        self.stream.flush()

    def phase(self, text: str) -> None:
        """A setup step starts (shown on a terminal only)."""
        if self.live:
            self._now = text
            self._draw()

    def note(self, text: str) -> None:
        """A setup step is over; *text* says its result."""
        if self.stream is None:
            return
        if self.live:
            self._last, self._note = f"[0/{self.total}] {text}", text
            self._draw()
        else:
            self._line(text)

    def begin(self, direction: str, nbytes: int, method: str) -> None:
        """A measurement starts."""
        where = f"{direction} {label(nbytes)}"
        # On the live line, the method alone when the last result was at the same place.
        self.phase(method if self._last.startswith(f"[{self.done}/{self.total}] {where} ")
                   else f"{where} {method}")

    def end(self, direction: str, nbytes: int, method: str, seconds: float) -> None:
        """A measurement is over: *seconds* per task."""
        self.done += 1
        text = (f"[{self.done}/{self.total}] {direction} {label(nbytes)} {method}  "
                f"{_ms(seconds)}/task")
        if self.stream is None:
            return
        if self.live:
            self._last, self._now = text, ""
            self._draw()
        else:
            self._line(text)

    def close(self) -> None:
        """Stop the display (on a terminal, leave the last line as it is)."""
        self._stop.set()
        if self._ticker is not None:
            self._ticker.join()
            self._ticker = None
        if self.live:
            assert self.stream is not None
            self._now = ""
            self._draw()
            self.stream.write("\n")
            self.stream.flush()
            self.live = False


# -- the report ------------------------------------------------------------------


def _times(value: float) -> str:
    """A ratio with about three significant digits: 0.00812, 0.91, 12.4, 130."""
    for floor, digits in ((100, 0), (10, 1), (0.1, 2), (0.01, 3)):
        if value >= floor:
            return f"{value:.{digits}f}"
    return f"{value:.2g}"


def print_report(figures: dict[str, Any], out: TextIO) -> None:
    """The header and the side-by-side table, to *out*."""
    sizes = ", ".join(label(s) for s in figures["sizes"])
    print(f"python {figures['python']}, numpy {figures['numpy']}, {figures['cores']} cores; "
          f"{figures['workers']} workers ({figures['start_method']}); sizes {sizes}; "
          f"backends {', '.join(figures['backends'])} (preshared on "
          f"{figures['preshared_backend']}); repeat {figures['repeat']}", file=out)
    print(f"memcpy (np.copyto, {label(figures['memcpy_bytes'])}, one thread): "
          f"{figures['memcpy_gbps']:.2f} GB/s", file=out)
    print("empty task (pool.apply(noop)): " + ", ".join(
        f"{m} {v:.3f} ms" for m, v in figures["empty_task_ms_at_start"].items()), file=out)
    print(file=out)

    methods = list(figures["empty_task_ms_at_start"])
    ranked = sorted(figures["rows"], key=lambda r: (DIRECTIONS.index(r["direction"]), r["size"],
                                                    methods.index(r["method"])))
    width = max(12, *(len(m) for m in methods))
    print(f"{'direction':<9} {'size':>8}  {'method':<{width}} {'ms/task':>10} {'GB/s':>8} "
          f"{'x vs pickle':>11} {'memcpys':>9}", file=out)
    previous = None
    for r in ranked:
        if previous is not None and (r["direction"], r["size"]) != previous:
            print(file=out)
        previous = (r["direction"], r["size"])
        print(f"{r['direction']:<9} {r['size_label']:>8}  {r['method']:<{width}} "
              f"{r['ms']:10.3f} {r['gbps']:8.2f} {r['x_vs_pickle']:10.2f}x "
              f"{_times(r['memcpys']):>9}", file=out)
    print("(median time per task over at least 3 rounds; GB/s = array bytes / time;",
          file=out)
    print(" x vs pickle = pickle time / time, higher is faster; memcpys = time / the time one",
          file=out)
    print(" memcpy of the array takes here: 1 = the cost of copying it once, below 1 = less",
          file=out)
    print(" than one copy (only a handle travelled). send: the worker does not read the "
          "array;", file=out)
    print(" args: the worker sums it; results: the worker returns one, the parent sums it)",
          file=out)


# -- the chart -------------------------------------------------------------------


def _matplotlib_missing() -> bool:
    try:
        import matplotlib  # noqa: F401
        from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: F401
    except ImportError:
        return True
    return False


def _ms_tick(value: float, _position: Any) -> str:
    return f"{value:g}"


def _size_tick(value: float, _position: Any) -> str:
    return label(round(value))


def plot(figures: dict[str, Any], path: str) -> None:
    """Draw time per task against payload size (log-log), one panel per direction
    and one line per method, with the memcpy time of each size, into *path*
    (its extension says the format; Agg, no display needed)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import FixedLocator, FuncFormatter, NullLocator

    rows = figures["rows"]
    methods = list(figures["empty_task_ms_at_start"])
    sizes = sorted({r["size"] for r in rows})
    gbps = figures["memcpy_gbps"]
    fig = Figure(figsize=(15, 5.6), dpi=100)
    FigureCanvasAgg(fig)
    panels: list[Axes] = list(fig.subplots(1, len(DIRECTIONS), sharey=True))
    for index, (ax, direction) in enumerate(zip(panels, DIRECTIONS)):
        for number, method in enumerate(methods):
            points = sorted((r["size"], r["ms"]) for r in rows
                            if r["direction"] == direction and r["method"] == method)
            color, marker = METHOD_STYLES.get(method, (f"C{number % 10}", "o"))
            ax.plot([p[0] for p in points], [p[1] for p in points], marker=marker,
                    color=color, label=method, linewidth=1.6, markersize=6)
        ax.plot(sizes, [s / (gbps * 1e9) * 1e3 for s in sizes], linestyle="--", color="0.35",
                linewidth=1.2, marker="x" if len(sizes) == 1 else None,
                label=f"memcpy at {gbps:.1f} GB/s")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.xaxis.set_major_locator(FixedLocator(sizes))
        ax.xaxis.set_major_formatter(FuncFormatter(_size_tick))
        ax.xaxis.set_minor_locator(NullLocator())
        ax.yaxis.set_major_formatter(FuncFormatter(_ms_tick))
        if len(sizes) > 5:
            ax.tick_params(axis="x", labelrotation=35)
        ax.margins(x=0.08)
        ax.grid(True, which="major", alpha=0.35)
        ax.grid(True, which="minor", axis="y", alpha=0.12)
        ax.set_title(PANEL_TITLES[direction], fontsize=11)
        ax.set_xlabel("payload size (float64 array)")
        if index == 0:
            ax.set_ylabel("time per task (ms, log scale)")
    handles, labels = panels[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(labels), frameon=False,
               fontsize=10)
    fig.suptitle(f"mpshm bench: time per task, {figures['workers']}-worker pool "
                 f"({figures['start_method']}), {figures['cores']} cores, "
                 f"memcpy {gbps:.2f} GB/s, python {figures['python']}", fontsize=12)
    fig.subplots_adjust(left=0.055, right=0.99, top=0.86, bottom=0.18, wspace=0.08)
    fig.savefig(path)


# -- the subcommand --------------------------------------------------------------


def run(args: argparse.Namespace,
        after: Optional[Callable[[dict[str, Any], TextIO], None]] = None) -> int:
    """Run ``mpshm bench`` with the parsed *args*; return the exit status.

    *after*, if given, is called with the figures and stdout once the table is
    printed, before the JSON file is written (``benchmarks/pool.py`` adds and
    prints its development targets there)."""
    try:
        import numpy  # noqa: F401
    except ImportError:
        print(NUMPY_MISSING, file=sys.stderr)
        return 1
    if args.plot and _matplotlib_missing():
        print(MATPLOTLIB_MISSING, file=sys.stderr)
        return 1
    chosen, problems = _choose_backends(args.backends)
    if problems:
        for problem in problems:
            print(f"mpshm bench: {problem}", file=sys.stderr)
        return 2 if args.backends else 1
    preshared = chosen[0]

    from ..bench import pool as _poolbench

    sizes = sorted(set(args.sizes or [parse_size(s) for s in
                                      (QUICK_SIZES if args.quick else DEFAULT_SIZES)]))
    repeat = args.repeat or (QUICK_REPEAT if args.quick else DEFAULT_REPEAT)
    total = len(sizes) * len(DIRECTIONS) * len(_poolbench.methods_for(chosen))
    stream = None if args.no_progress else sys.stderr
    progress = Progress(stream, total, live=stream is not None and stream.isatty())
    try:
        figures = _poolbench.measure(sizes, repeat, chosen, preshared, progress)
    finally:
        progress.close()
    print_report(figures, sys.stdout)
    if after is not None:
        after(figures, sys.stdout)
    if args.json or args.plot:
        print()
    status = 0
    for path, what, write in ((args.json, "figures", _write_json), (args.plot, "chart", plot)):
        if path:
            try:
                write(figures, path)
            except OSError as exc:
                print(f"mpshm bench: cannot write the {what} to {path}: {exc}", file=sys.stderr)
                status = 1
            else:
                print(f"{what} written to {path}")
    return status


def _write_json(figures: dict[str, Any], path: str) -> None:
    with open(path, "w") as f:
        json.dump(figures, f, indent=1)
        f.write("\n")
