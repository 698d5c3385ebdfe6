"""Measure the benchmark-v2 regime of the shipped shapes models and write lab/experiments/shapes-regime.json.

Source R@1 (no adaptation) of ``shapes-clip`` (customized) and ``shapes-clip-general`` on clean ``shapes-5k``,
the 16 image corruptions at severity 5, the 11 char- and word-level text corruptions at level 7 and the
domain styles (1k split), then every condition of ``queryshift.shifts.shapes_regime.check``, met or not.

    python lab/experiments/shapes_regime.py [--custom shapes-clip] [--general shapes-clip-general]
                                 [--max-queries N] [--no-5k] [--out lab/experiments/shapes-regime.json]

Takes about ten minutes on one core for the shipped models and every query.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch

from queryshift.data import load_dataset
from queryshift.models import load_model
from queryshift.shifts.shapes_regime import check, measure

HERE = os.path.dirname(os.path.abspath(__file__))


def markdown(m: dict) -> str:
    custom, general = m["custom_styles"], m["general_styles"]
    lines = ["| shift | i2t R@1 | % of clean |", "|---|---|---|",
             f"| clean | {custom['clean_i2t']:.2f} | 100 |"]
    lines += [f"| {s} | {r:.2f} | {100 * r / custom['clean_i2t']:.0f} |" for s, r in m["image_corruptions"].items()]
    lines += ["", "| shift | t2i R@1 | % of clean |", "|---|---|---|", f"| clean | {custom['clean_t2i']:.2f} | 100 |"]
    lines += [f"| {s} | {r:.2f} | {100 * r / custom['clean_t2i']:.0f} |" for s, r in m["text_corruptions"].items()]
    lines += ["", "| query | shapes-clip-general R@1 | shapes-clip R@1 |", "|---|---|---|"]
    lines += [f"| {k} | {general[k]:.2f} | {custom[k]:.2f} |" for k in custom]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--custom", default="shapes-clip", help="customized model spec (default shapes-clip)")
    p.add_argument("--general", default="shapes-clip-general", help="general model spec")
    p.add_argument("--max-queries", type=int, help="first N queries of each 1k run (pilots)")
    p.add_argument("--no-5k", dest="five_k", action="store_false", help="skip clean shapes-5k")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=os.path.join(HERE, "shapes-regime.json"))
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    start = time.time()
    m = measure(load_model(args.general), load_model(args.custom), load_dataset("shapes"),
                load_dataset("shapes-5k") if args.five_k else None, max_queries=args.max_queries)
    m["models"] = {"custom": args.custom, "general": args.general}
    m["conditions"] = [{"condition": c, "met": met, "measured": v} for c, met, v in check(m)]
    m["minutes"] = round((time.time() - start) / 60, 1)
    with open(args.out, "w") as f:
        json.dump(m, f, indent=1)
    print(markdown(m))
    print()
    for c in m["conditions"]:
        print(f"{'MET ' if c['met'] else 'NOT '} {c['condition']}: {c['measured']}")
    print(f"wrote {args.out} after {m['minutes']} min")


if __name__ == "__main__":
    main()
