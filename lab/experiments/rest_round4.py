"""REST design round 4 (issue 26): score the candidates of ``lab/suites/validation-rest-design-4.yaml``.

    python -m lab.cli bench --suite validation-rest-design-4 --out runs/validation-rest-design-4
    python -m lab.experiments.rest_round4 runs/validation-rest-design-4

The rule (written before the runs, in the suite too): score = (S + stream R@1 + clean forgetting) / 2 with S the
mean R@1 over the five single validation shifts, as in ``choose_rates.py``; the incumbent is the shipped ``rest``
at its chosen rate (``lab/experiments/validation-rates.json``); the best candidate replaces it only if its score is
at least ``MARGIN`` higher (the step-time bar, 1.3x TCR's, is checked apart with benchmarks/step_time.py).
"""

from __future__ import annotations

import argparse
import json
import os

import numpy as np
from lab.experiments.choose_rates import HERE, _results

MARGIN = 0.3


def candidates(out: str) -> dict[tuple[str, float], dict[str, float]]:
    by: dict[tuple[str, float], dict] = {}
    for r in _results(out):
        key = (json.dumps(r.get("hparams", {}).get("answers", "raw")), float(r["lr"]))
        row = by.setdefault(key, {"singles": []})
        if r.get("stream_r1") is not None:
            row["stream_r1"], row["forgetting"] = r["stream_r1"], r["forgetting"]["forgetting"]
        else:
            row["singles"].append(r["r1"])
    table = {}
    for key, row in by.items():
        if len(row["singles"]) != 5 or "stream_r1" not in row:
            raise SystemExit(f"{out}: candidate {key} is incomplete (5 single shifts and the stream expected)")
        s = float(np.mean(row["singles"]))
        table[key] = {"S": round(s, 3), "stream_r1": row["stream_r1"], "forgetting": row["forgetting"],
                      "score": round((s + row["stream_r1"] + row["forgetting"]) / 2, 3)}
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out")
    parser.add_argument("--rates", default=os.path.join(HERE, "validation-rates.json"))
    args = parser.parse_args()
    with open(args.rates, encoding="utf-8") as f:
        rates = json.load(f)
    lr = rates["chosen_lr"]["rest"]
    incumbent = {k: rates["scores"]["rest"][str(lr)][k] for k in ("S", "stream_r1", "forgetting", "score")}
    free = rates["scores"]["tcr-free"][str(lr)]
    table = candidates(args.out)
    print("| candidate | lr | S | stream R@1 | forgetting | score |\n|---|---|---|---|---|---|")
    print(f"| rest (incumbent) | {lr:g} | {incumbent['S']:.2f} | {incumbent['stream_r1']:.2f} | "
          f"{incumbent['forgetting']:+.2f} | {incumbent['score']:.2f} |")
    print(f"| tcr-free (reference) | - | {free['S']:.2f} | {free['stream_r1']:.2f} | {free['forgetting']:+.2f} | "
          f"{free['score']:.2f} |")
    for (answers, rate), row in sorted(table.items()):
        print(f"| answers={json.loads(answers)} | {rate:g} | {row['S']:.2f} | {row['stream_r1']:.2f} | "
              f"{row['forgetting']:+.2f} | {row['score']:.2f} |")
    best_key = max(table, key=lambda k: table[k]["score"])
    best = table[best_key]
    adopt = best["score"] >= incumbent["score"] + MARGIN
    verdict = {"incumbent": {"lr": lr, **incumbent}, "tcr_free": free,
               "candidates": {f"answers={json.loads(a)} lr={r:g}": v for (a, r), v in table.items()},
               "best": f"answers={json.loads(best_key[0])} lr={best_key[1]:g}", "adopt": adopt}
    with open(os.path.join(HERE, "validation-rest-design-4.json"), "w", encoding="utf-8") as f:
        json.dump(verdict, f, indent=1)
    print(f"\nbest candidate {verdict['best']} (score {best['score']:.2f}); "
          f"{'replaces' if adopt else 'does not replace'} the incumbent ({incumbent['score']:.2f}, margin {MARGIN})")


if __name__ == "__main__":
    main()
