"""``make demo``: the offline benchmark in one command.

The shipped ``shapes-clip`` model on the synthetic shapes world, clean queries and a representative set of
query shifts in both directions, with every registered method. Prints a table of R@1 per shift and the
average, and writes ``demo-results/results.json``, ``results.md`` and ``demo.png``: the change of R@1 against
``source`` per shift per method.
Finished runs are reused, so an interrupted demo continues where it stopped.

    python -m queryshift.demo [--out demo-results] [--methods source,tcr,rest] [--max-queries N]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from . import bench, methods
from .engine import RunConfig

# a noise, a blur and an unseen image style; a char-level corruption and an unseen caption style
I2T_SHIFTS = ["clean", "gaussian_noise:5", "defocus_blur:5", "style:outline"]
T2I_SHIFTS = ["clean", "RandomCharAug_swap:5", "style:synonyms"]
# all 1,000 image queries; the first 1,000 of the 5,000 shuffled caption queries, so the demo fits in
# ten minutes on two cores (`queryshift bench --suite synthetic` streams them all)
T2I_QUERIES = 1000


def build_tables(method_names: list[str], max_queries: int | None, cache_dir: str | None) -> list[dict]:
    runs = []
    for method in method_names:
        for direction, shift_list in (("i2t", I2T_SHIFTS), ("t2i", T2I_SHIFTS)):
            limit = max_queries or (T2I_QUERIES if direction == "t2i" else None)
            for shift in shift_list:
                cfg = RunConfig(model="shapes-clip", data="shapes", direction=direction, method=method,
                                shift=None if shift == "clean" else shift, max_queries=limit,
                                cache_dir=cache_dir, progress=False)
                runs.append(({"method": method, "direction": direction, "shift": shift}, cfg))
    return [{"name": "demo", "runs": runs, "published": {},
             "description": "R@1 of the shipped shapes-clip model on the synthetic shapes test split "
                            "(1,000 image queries against 5,000 captions; the first 1,000 of the 5,000 "
                            "shuffled caption queries against 1,000 images), batch 64, 3 steps per batch, "
                            "each method at its own learning rate (the model card's), seed 42.",
             "hints": {"rows": "method", "columns": ["direction", "shift"], "metric": "r1"}}]


def gains(grid: dict) -> tuple[list[str], list[str], list[list[float]]]:
    """(methods, columns, R@1 minus ``source``'s) from a bench table grid: every method but source, every shift
    column plus ``avg``; NaN where a run is missing."""
    cols = [*grid["cols"], "avg"]
    rows = [r for r in grid["rows"] if r != "source"]

    def values(row: str) -> list:
        return [grid["cell"].get((row, c)) for c in grid["cols"]] + [grid["averages"].get(row)]

    base = values("source")
    known = (int, float)
    return rows, cols, [[v - b if isinstance(v, known) and isinstance(b, known) else float("nan")
                         for v, b in zip(values(r), base)] for r in rows]


def plot_gains(grid: dict, path: str) -> None:
    """Heatmap of R@1 minus ``source``'s per method (rows) and shift (columns), plus the average; the point of
    the demo is the difference to the unadapted model, which absolute bars hide."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    rows, cols, table = gains(grid)
    gains_arr = np.array(table, dtype=float).reshape(len(rows), len(cols))
    bound = max(1.0, float(np.nanmax(np.abs(gains_arr)))) if np.isfinite(gains_arr).any() else 1.0
    fig, ax = plt.subplots(figsize=(1.4 * len(cols) + 2.4, 0.42 * len(rows) + 2.2))
    image = ax.imshow(gains_arr, cmap="RdBu", vmin=-bound, vmax=bound, aspect="auto")
    for (i, j), v in np.ndenumerate(gains_arr):
        ax.text(j, i, "" if np.isnan(v) else f"{v:+.1f}", ha="center", va="center", fontsize=9,
                color="white" if abs(v) > 0.6 * bound else "black", fontweight="bold" if j == len(cols) - 1 else None)
    # "i2t gaussian_noise:5" -> two lines, so the labels stay horizontal and readable
    ax.set_xticks(range(len(cols)), [c.replace(" ", "\n", 1) for c in cols], fontsize=8)
    ax.set_yticks(range(len(rows)), rows, fontsize=9)
    ax.axvline(len(cols) - 1.5, color="black", linewidth=1)
    ax.set_title("R@1 change vs source (no adaptation), per query shift; blue = better", fontsize=10)
    fig.colorbar(image, ax=ax, label="Δ R@1 vs source", fraction=0.04, pad=0.02)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m queryshift.demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="demo-results")
    p.add_argument("--methods", help="comma-separated (default: every registered method)")
    p.add_argument("--max-queries", type=int, help="only the first N queries of each stream (quick check)")
    p.add_argument("--cache-dir", help="gallery embedding cache")
    p.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1),
                   help="runs in parallel, one torch thread each (default: 2, or 1 on a single core)")
    args = p.parse_args(argv)
    names = args.methods.split(",") if args.methods else methods.available()
    start = time.time()
    tables = build_tables(names, args.max_queries, args.cache_dir)
    records = bench.execute(tables, args.out, jobs=args.jobs)
    command = "python -m queryshift.demo " + " ".join(argv if argv is not None else sys.argv[1:])
    print(bench.report(tables, records, args.out, "queryshift demo: shapes-clip under query shift",
                       command.strip()))
    if "source" in names:  # replaces the report's absolute bars with the change against source
        plot_gains(bench.render_table(tables[0], records)[1], os.path.join(args.out, "demo.png"))
    print(f"demo finished in {time.time() - start:.0f} s; results in {args.out}/ (results.md, results.json, demo.png)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
