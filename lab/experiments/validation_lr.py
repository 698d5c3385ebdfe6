"""Choose the protocol learning rate of a backbone from a finished ``validation-lr`` bench run.

    queryshift bench --suite validation-lr --out runs/validation-lr --jobs 2
    python lab/experiments/validation_lr.py runs/validation-lr [--out lab/experiments/validation-lr.json]

Reads every run's ``result.json`` under the bench output, averages R@1 over the validation shifts for each
method and learning rate, then over the adapting methods (every method but ``source``, which ignores the
rate), and names the rate with the best mean: the same rate for every method, chosen on validation shifts
only. Prints a Markdown table and writes the numbers as JSON.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
from collections import defaultdict

import numpy as np


def read_runs(out: str) -> list[dict]:
    paths = sorted(glob.glob(os.path.join(out, "runs", "**", "result.json"), recursive=True))
    if not paths:
        raise SystemExit(f"{out}: no result.json under runs/; run the validation-lr suite first")
    runs = []
    for path in paths:
        with open(path) as f:
            r = json.load(f)
        runs.append({"method": r["method"], "lr": float(r["lr"]), "query": f"{r['direction']} {r['shift']}",
                     "r1": r["r1"]})
    return runs


def choose(runs: list[dict]) -> dict:
    queries = sorted({r["query"] for r in runs})
    by = defaultdict(dict)
    for r in runs:
        by[(r["method"], r["lr"])][r["query"]] = r["r1"]
    rates = sorted({r["lr"] for r in runs})
    methods = sorted({r["method"] for r in runs}, key=lambda m: (m != "source", m))
    missing = [f"{m} lr={lr} {q}" for m in methods for lr in rates for q in queries
               if m != "source" and q not in by[(m, lr)]]
    if missing:
        raise SystemExit(f"{len(missing)} runs missing (e.g. {missing[0]}); finish the suite first")
    mean = {m: {lr: float(np.mean([by[(m, lr)][q] for q in queries])) for lr in rates if by[(m, lr)]}
            for m in methods}
    adapting = [m for m in methods if m != "source"]
    over_methods = {lr: float(np.mean([mean[m][lr] for m in adapting])) for lr in rates}
    best = max(rates, key=lambda lr: over_methods[lr])
    per_method_best = {m: max(mean[m], key=mean[m].get) for m in adapting}
    return {"queries": queries, "rates": rates, "mean_r1": mean, "mean_over_adapting_methods": over_methods,
            "chosen_lr": best, "best_lr_per_method": per_method_best,
            "source_mean_r1": float(np.mean(list(by[("source", rates[0])].values()))) if by[("source", rates[0])]
            else None}


def markdown(c: dict) -> str:
    rates = c["rates"]
    head = "| method | " + " | ".join(f"lr {lr:g}" for lr in rates) + " | best |"
    lines = [head, "|---|" + "---|" * (len(rates) + 1)]
    for m, row in c["mean_r1"].items():
        if m == "source":
            continue
        cells = [f"**{row[lr]:.2f}**" if lr == c["best_lr_per_method"][m] else f"{row[lr]:.2f}" for lr in rates]
        lines.append(f"| {m} | " + " | ".join(cells) + f" | {c['best_lr_per_method'][m]:g} |")
    over = c["mean_over_adapting_methods"]
    lines.append("| **mean of the adapting methods** | " + " | ".join(
        f"**{over[lr]:.2f}**" if lr == c["chosen_lr"] else f"{over[lr]:.2f}" for lr in rates) + " | |")
    if c["source_mean_r1"] is not None:
        lines.append("| source (no adaptation) | " + " | ".join(f"{c['source_mean_r1']:.2f}" for _ in rates) + " | |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", help="the bench output directory of the validation-lr suite")
    parser.add_argument("--json", default=os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                                       "validation-lr.json"))
    args = parser.parse_args()
    chosen = choose(read_runs(args.out))
    with open(args.json, "w") as f:
        json.dump(chosen, f, indent=1, default=str)
    print(f"mean R@1 over {len(chosen['queries'])} validation shifts ({', '.join(chosen['queries'])})\n")
    print(markdown(chosen))
    print(f"\nchosen protocol learning rate: {chosen['chosen_lr']:g} (wrote {args.json})")


if __name__ == "__main__":
    main()
