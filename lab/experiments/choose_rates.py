"""Choose each method's learning rate for a backbone on validation shifts only (issue 26: fair rates).

    queryshift bench --suite lab/suites/validation-rates-continual.yaml --out runs/validation-rates-continual --jobs 2
    queryshift bench --suite lab/suites/validation-rates-rest.yaml --out runs/validation-rates-rest --jobs 2
    python lab/experiments/choose_rates.py runs/validation-rates-continual runs/validation-rates-rest

The rule, written before the runs:
- single shifts: ``S(m, lr)`` = mean R@1 over the five single validation shifts of ``validation-lr``
  (``lab/experiments/validation-lr.json``; REST's own runs from ``validation-rates-rest`` replace its entries
  there, which were made with an earlier default);
- continual: ``C(m, lr)`` = the validation continual stream's R@1 (mean over its segments) plus the clean
  forgetting after it (R@1 points; negative when the method forgot);
- ``score(m, lr) = (S + C) / 2``; each method's rate is the one with the highest score, a tie (within 0.05)
  going to the lower rate. ``source`` and ``tcr-free`` do not use a rate and get none.
Prints a Markdown table and writes the numbers as JSON (default ``lab/experiments/validation-rates.json``).
"""

from __future__ import annotations

import argparse
import glob
import json
import os

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
RATELESS = ("source", "tcr-free")
TIE = 0.05


def _results(out: str) -> list[dict]:
    paths = sorted(glob.glob(os.path.join(out, "runs", "**", "result.json"), recursive=True))
    if not paths:
        raise SystemExit(f"{out}: no result.json under runs/; run its suite first")
    found = []
    for path in paths:
        with open(path, encoding="utf-8") as f:
            found.append(json.load(f))
    return found


def continual_scores(out: str) -> dict[str, dict[float, dict[str, float]]]:
    by: dict[str, dict[float, dict[str, float]]] = {}
    for r in _results(out):
        r1 = r.get("stream_r1")
        if r1 is None:
            raise SystemExit(f"{out}: a run of {r['method']} at lr {r['lr']} has no stream segments")
        forgetting = (r.get("forgetting") or {}).get("forgetting")
        if forgetting is None:
            raise SystemExit(f"{out}: a run of {r['method']} at lr {r['lr']} has no clean forgetting")
        by.setdefault(r["method"], {})[float(r["lr"])] = {"stream_r1": r1, "forgetting": forgetting,
                                                          "C": r1 + forgetting}
    return by


def single_scores(rest_out: str | None, committed: str) -> dict[str, dict[float, float]]:
    with open(committed, encoding="utf-8") as f:
        mean = {m: {float(lr): v for lr, v in row.items()} for m, row in json.load(f)["mean_r1"].items()}
    if rest_out:
        runs: dict[float, list[float]] = {}
        for r in _results(rest_out):
            runs.setdefault(float(r["lr"]), []).append(r["r1"])
        if any(len(v) != 5 for v in runs.values()):
            raise SystemExit(f"{rest_out}: expected 5 single validation shifts per rate, got "
                             f"{ {lr: len(v) for lr, v in runs.items()} }")
        mean["rest"] = {lr: float(np.mean(v)) for lr, v in runs.items()}
    return mean


def choose(continual: dict, single: dict) -> dict:
    table, chosen = {}, {}
    for m in sorted(continual, key=lambda m: (m not in RATELESS, m)):
        rows = {}
        for lr, c in sorted(continual[m].items()):
            s = single.get(m, {}).get(lr)
            rows[lr] = {**c, "S": s, "score": None if s is None else round((s + c["C"]) / 2, 3)}
        table[m] = rows
        if m in RATELESS:
            continue
        scored = {lr: row["score"] for lr, row in rows.items() if row["score"] is not None}
        if not scored:
            raise SystemExit(f"no single-shift validation numbers for {m}")
        top = max(scored.values())
        chosen[m] = min(lr for lr, v in scored.items() if v >= top - TIE)
    return {"rule": __doc__.split("The rule, written before the runs:")[1].split("Prints")[0].strip(),
            "scores": table, "chosen_lr": chosen}


def markdown(c: dict) -> str:
    rates = sorted({lr for rows in c["scores"].values() for lr in rows})
    lines = ["| method | " + " | ".join(f"lr {lr:g}: S / stream / forg. / score" for lr in rates) + " | chosen |",
             "|---|" + "---|" * (len(rates) + 1)]
    for m, rows in c["scores"].items():
        cells = []
        for lr in rates:
            row = rows.get(lr)
            if row is None:
                cells.append("—")
                continue
            s = "—" if row["S"] is None else f"{row['S']:.2f}"
            score = "—" if row["score"] is None else f"{row['score']:.2f}"
            cell = f"{s} / {row['stream_r1']:.2f} / {row['forgetting']:+.2f} / {score}"
            cells.append(f"**{cell}**" if c["chosen_lr"].get(m) == lr else cell)
        lines.append(f"| {m} | " + " | ".join(cells) + f" | {c['chosen_lr'].get(m, '—')} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("continual", help="bench output of lab/suites/validation-rates-continual.yaml")
    parser.add_argument("rest", nargs="?", help="bench output of lab/suites/validation-rates-rest.yaml")
    parser.add_argument("--single", default=os.path.join(HERE, "validation-lr.json"))
    parser.add_argument("--json", default=os.path.join(HERE, "validation-rates.json"))
    args = parser.parse_args()
    chosen = choose(continual_scores(args.continual), single_scores(args.rest, args.single))
    with open(args.json, "w", encoding="utf-8") as f:
        json.dump(chosen, f, indent=1)
    print(markdown(chosen))
    print(f"\nchosen rates: {chosen['chosen_lr']} (wrote {args.json})")


if __name__ == "__main__":
    main()
