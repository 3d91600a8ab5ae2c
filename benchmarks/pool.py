"""mpshm.pool.Pool against pickling and the standard library's SharedMemory, side by side.

    python benchmarks/pool.py [--quick] [--sizes 1M 16M 256M 1G] [--repeat N] [--json FILE]
                              [--backends NAME ...] [--plot FILE.png] [--no-progress]

The same as ``mpshm bench`` (``python -m mpshm bench``), which the installed
package carries: the measuring is in ``mpshm/bench/pool.py`` (``docs/cli.md``
says what is measured and how), the options, progress display, table and
chart in ``mpshm/cli/bench.py``. Progress goes to stderr, the table to stdout
at the end.

What this script adds: the project's development targets for these figures,
checked after the table (and written to the JSON file as ``targets``). They
are goals for mpshm's developers, not a verdict on a user's machine, so the
installed ``mpshm bench`` does not print them. These machines are shared and
noisy: one FAIL is a reason to rerun, not a verdict.
"""

from __future__ import annotations

import sys
from typing import Any, Sequence, TextIO

from mpshm.cli import bench, build_parser

MIB = 1 << 20

TARGET_NAMES = {
    "a_preshared_flat": "(a) preshared send, largest size within 2x of smallest",
    "a_preshared_overhead": "(a) preshared send over an empty task < 1 ms",
    "b_mpshm_vs_pickle_256M": "(b) best mpshm backend >= 10x pickle at 256 MiB",
    "c_results_vs_args": "(c) mpshm results <= 1.5x args, every backend and size",
}


def check_targets(rows: list[dict[str, Any]], backends: Sequence[str]) -> dict[str, dict[str, Any]]:
    """The verdicts: pass is True, False, or None (not measured in this run)."""
    label = bench.label
    ms = {(r["direction"], r["size"], r["method"]): r["ms"] for r in rows}
    sizes = sorted({r["size"] for r in rows})
    mpshm_methods = [f"mpshm-{b}" for b in backends]
    targets: dict[str, dict[str, Any]] = {}

    small, large = sizes[0], sizes[-1]
    if small == large:
        targets["a_preshared_flat"] = {"pass": None, "detail": "needs two sizes"}
    else:
        t_small, t_large = ms["send", small, "preshared"], ms["send", large, "preshared"]
        targets["a_preshared_flat"] = {
            "pass": t_large <= 2 * t_small,
            "detail": f"preshared send {label(large)} {t_large:.3f} ms vs {label(small)} "
                      f"{t_small:.3f} ms: {t_large / t_small:.2f}x (limit 2x)",
        }
    overheads = {r["size"]: r["overhead_ms"] for r in rows
                 if r["direction"] == "send" and r["method"] == "preshared"}
    worst = max(overheads, key=lambda s: overheads[s])
    targets["a_preshared_overhead"] = {
        "pass": all(v < 1.0 for v in overheads.values()),
        "detail": "preshared send minus an empty task on its pool: " + ", ".join(
            f"{label(s)} {v:.3f} ms" for s, v in sorted(overheads.items()))
        + f" (worst {label(worst)}; limit 1 ms)",
    }

    if 256 * MIB in sizes:
        parts, ok = [], True
        for direction in ("args", "results"):
            best = min(mpshm_methods, key=lambda m: ms[direction, 256 * MIB, m])
            x = ms[direction, 256 * MIB, "pickle"] / ms[direction, 256 * MIB, best]
            ok = ok and x >= 10
            parts.append(f"{direction}: {best} {x:.1f}x")
        targets["b_mpshm_vs_pickle_256M"] = {
            "pass": ok, "detail": "best mpshm backend vs pickle at 256 MiB, " + ", ".join(parts)
            + " (limit 10x)"}
    else:
        targets["b_mpshm_vs_pickle_256M"] = {"pass": None, "detail": "256 MiB not measured"}

    worst_ratio, where, failed = 0.0, "", []
    for method in mpshm_methods:
        for size in sizes:
            ratio = ms["results", size, method] / ms["args", size, method]
            if ratio > worst_ratio:
                worst_ratio, where = ratio, f"{method} {label(size)}"
            if ratio > 1.5:
                failed.append(f"{method} {label(size)} {ratio:.2f}x")
    targets["c_results_vs_args"] = {
        "pass": not failed,
        "detail": (f"results/args time, worst {worst_ratio:.2f}x ({where}); limit 1.5x"
                   + (": over it: " + ", ".join(failed) if failed else "")),
    }
    return targets


def print_targets(figures: dict[str, Any], out: TextIO) -> None:
    """Check the targets, add them to *figures* and print the verdicts to *out*."""
    figures["targets"] = check_targets(figures["rows"], figures["backends"])
    print(file=out)
    print(f"development targets ({figures['measuring_seconds']:.0f} s of measuring; "
          "informational: these machines are noisy, rerun before believing a FAIL):", file=out)
    for key, verdict in figures["targets"].items():
        word = {True: "PASS", False: "FAIL", None: "SKIP"}[verdict["pass"]]
        print(f"  {word}  {TARGET_NAMES.get(key, key)}\n        {verdict['detail']}", file=out)


def main(argv: Sequence[str]) -> int:
    args = build_parser().parse_args(["bench", *argv])
    try:
        return bench.run(args, after=print_targets)
    except KeyboardInterrupt:
        print("benchmarks/pool.py: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
