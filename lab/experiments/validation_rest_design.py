"""Choose REST's design from a finished ``validation-rest-design`` bench run (validation shifts only).

    queryshift bench --suite validation-rest-design --out runs/validation-rest-design --jobs 2
    python lab/experiments/validation_rest_design.py runs/validation-rest-design \
        [--json lab/experiments/validation-rest-design.json]

The rule, fixed before the suite ran (issue 11: "by mean R@1 in both directions plus forgetting"): for every
variant, ``score = mean R@1 + mean forgetting``, both averaged over the suite's eight validation queries (five
single shifts in both directions and three validation streams; forgetting = clean R@1 with the adapted
parameters after the run minus clean R@1 with the source parameters, so it is <= 0 when adaptation forgets).
The REST variant with the best score gives REST's defaults. The script also prints, for each variant, the
issue's bars measured against TCR on the validation streams (stream R@1 >= TCR + 1, forgetting at most half
of TCR's) and the observation-4 diagnostics (angle between the adaptation and knowledge gradients, fraction of
tensors in conflict). Prints Markdown; writes the numbers as JSON.

Round 2 (``validation-rest-design-2``, cheaper knowledge gradients) adds one condition, fixed before that
suite's results were read: issues 11 and 13 require REST's step time to be at most ``--max-step-ratio`` (1.3) x
TCR's, so the default becomes the best-scoring variant that meets it (step times from the JSON line of
``benchmarks/step_time.py``, ``--step-times``); the incumbent (``--incumbent``, K1 global) stays only if none
does, and the score given up against it is printed:

    python benchmarks/step_time.py --no-big | tail -1 > /tmp/step_time.json
    python lab/experiments/validation_rest_design.py runs/validation-rest-design-2 \
        --json lab/experiments/validation-rest-design-2.json \
        --incumbent "rest K1 global" --step-times /tmp/step_time.json

Round 3 (``validation-rest-design-3``, K5's knowledge gradient combined otherwise: an EWC pull, the projection
plus a pull, half the conflicting component kept) adds ``--min-gain``, fixed before that suite's results were
read: the incumbent (K5 block global, rerun in the suite) stays unless a candidate beats its score by at least
0.3:

    python lab/experiments/validation_rest_design.py runs/validation-rest-design-3 \
        --json lab/experiments/validation-rest-design-3.json \
        --incumbent "rest K5 block global" --step-times /tmp/step_time.json --min-gain 0.3
"""

from __future__ import annotations

import argparse
import json
import os
from collections import defaultdict

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))


def read_runs(out: str) -> dict[str, dict[str, dict]]:
    """variant label -> query label -> {r1, forgetting, grad_angle, conflict_frac} from the bench results."""
    with open(os.path.join(out, "results.json")) as f:
        results = json.load(f)
    table = defaultdict(dict)
    for run in results["runs"]:
        labels = run["labels"]
        logged = run.get("log_means") or {}
        table[labels["variant"]][labels["query"]] = {
            "r1": run["r1"], "forgetting": (run.get("forgetting") or {}).get("forgetting"),
            "grad_angle": logged.get("grad_angle"), "conflict_frac": logged.get("conflict_frac"),
        }
    return table


def summarise(table: dict[str, dict[str, dict]]) -> dict:
    queries = list(next(iter(table.values())))
    streams = [q for q in queries if "(val)" in q]
    rows = {}
    for variant, runs in table.items():
        missing = [q for q in queries if q not in runs]
        if missing:
            raise SystemExit(f"{variant}: runs missing for {missing}; finish the suite first")
        r1 = float(np.mean([runs[q]["r1"] for q in queries]))
        forget = [runs[q]["forgetting"] for q in queries]
        forgetting = float(np.mean(forget)) if None not in forget else None
        rows[variant] = {
            "mean_r1": r1, "mean_forgetting": forgetting,
            "score": r1 + forgetting if forgetting is not None else None,
            "stream_r1": float(np.mean([runs[q]["r1"] for q in streams])),
            "stream_forgetting": float(np.mean([runs[q]["forgetting"] for q in streams])),
            "single_r1": float(np.mean([runs[q]["r1"] for q in queries if q not in streams])),
            "grad_angle": _mean_of(runs[q]["grad_angle"] for q in queries),
            "conflict_frac": _mean_of(runs[q]["conflict_frac"] for q in queries),
            "r1": {q: runs[q]["r1"] for q in queries}, "forgetting": {q: runs[q]["forgetting"] for q in queries},
        }
    tcr = rows.get("tcr")
    for row in rows.values():
        if tcr:
            row["stream_r1_minus_tcr"] = row["stream_r1"] - tcr["stream_r1"]
            row["forgetting_ratio_to_tcr"] = (row["stream_forgetting"] / tcr["stream_forgetting"]
                                              if tcr["stream_forgetting"] < 0 else None)
    candidates = {v: r for v, r in rows.items() if v.startswith("rest") and r["score"] is not None}
    chosen = max(candidates, key=lambda v: candidates[v]["score"])
    return {"queries": queries, "streams": streams, "variants": rows, "chosen": chosen}


# variant label of the design suites -> its key in the JSON line of benchmarks/step_time.py
# (benchmarks/step_time.py's "rest" is REST's default: K5 block with a global projection in round 2, when the
# rounds 2 and 3 suites were timed; the EWC pull since round 3, so K5 block global has its own key now)
STEP_TIME_KEYS = {"rest K1 global": "rest_know_kl_over_tcr", "rest K5 global": "rest_know_fisher_fisher_diag_over_tcr",
                  "rest K5 block global": "rest_decouple_global_lambda_k_0_over_tcr",
                  "rest K5 full global": "rest_know_fisher_fisher_full_over_tcr",
                  "rest K1 sub8 global": "rest_know_kl_know_queries_8_over_tcr",
                  # round 3: K5 block's knowledge gradient combined otherwise
                  "rest K5 ewc 3": "rest_decouple_off_lambda_k_3_over_tcr",
                  "rest K5 ewc 10": "rest_over_tcr",  # the default since round 3: timed as "rest"
                  "rest K5 global pull 3": "rest_decouple_global_lambda_k_3_over_tcr",
                  "rest K5 global keep 0.5": "rest_decouple_global_lambda_k_0_keep_0.5_over_tcr"}


def apply_step_rule(summary: dict, incumbent: str, step_times: dict, max_ratio: float,
                    min_gain: float = 0.0) -> dict:
    """Round 2's rule: the best-scoring REST variant whose step time is at most ``max_ratio`` x TCR's; the
    incumbent if none is. Round 3 adds ``min_gain``: a candidate replaces the incumbent only if its score is
    at least that much higher. Adds each variant's ``step_over_tcr`` and its score minus the incumbent's."""
    rows = summary["variants"]
    for label, row in rows.items():
        key = STEP_TIME_KEYS.get(label)
        row["step_over_tcr"] = step_times.get(key) if key else None
        if row["score"] is not None and rows[incumbent]["score"] is not None:
            row["score_minus_incumbent"] = row["score"] - rows[incumbent]["score"]
    admissible = [v for v, r in rows.items() if v.startswith("rest") and r["score"] is not None
                  and r["step_over_tcr"] is not None and r["step_over_tcr"] <= max_ratio]
    best = max(admissible, key=lambda v: rows[v]["score"]) if admissible else incumbent
    if best != incumbent and rows[best]["score"] < rows[incumbent]["score"] + min_gain:
        best = incumbent  # a near tie keeps the default (and the test tables generated with it)
    summary["chosen"] = best
    summary["rule"] = {"incumbent": incumbent, "max_step_ratio": max_ratio, "min_gain": min_gain}
    return summary


def _mean_of(values) -> float | None:
    values = [v for v in values if v is not None]
    return float(np.mean(values)) if values else None


def _f(v, signed=False) -> str:
    if v is None:
        return "-"
    return f"{v:+.2f}" if signed else f"{v:.2f}"


def markdown(s: dict) -> str:
    head = ("| variant | mean R@1 | mean forgetting | **score** | single shifts R@1 | streams R@1 | streams R@1 - TCR "
            "| streams forgetting | / TCR's | angle (deg) | conflict frac |")
    lines = [head, "|---|" + "---|" * 10]
    for v, r in sorted(s["variants"].items(), key=lambda kv: -(kv[1]["score"] or -1e9)):
        name = f"**{v}** (chosen)" if v == s["chosen"] else v
        lines.append(f"| {name} | {_f(r['mean_r1'])} | {_f(r['mean_forgetting'], True)} | {_f(r['score'])} | "
                     f"{_f(r['single_r1'])} | {_f(r['stream_r1'])} | {_f(r.get('stream_r1_minus_tcr'), True)} | "
                     f"{_f(r['stream_forgetting'], True)} | {_f(r.get('forgetting_ratio_to_tcr'))} | "
                     f"{_f(r['grad_angle'])} | {_f(r['conflict_frac'])} |")
    if "rule" in s:
        lines += ["", f"| variant | step time / TCR's | score - {s['rule']['incumbent']}'s |", "|---|---|---|"]
        lines += [f"| {v} | {_f(r.get('step_over_tcr'))} | {_f(r.get('score_minus_incumbent'), True)} |"
                  for v, r in s["variants"].items() if v.startswith("rest")]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", help="the bench output directory of the validation-rest-design suite")
    parser.add_argument("--json", default=os.path.join(HERE, "validation-rest-design.json"))
    parser.add_argument("--incumbent", help="round 2: the default that stays unless a candidate beats it (a label)")
    parser.add_argument("--step-times", help="round 2: the JSON line printed by benchmarks/step_time.py")
    parser.add_argument("--max-step-ratio", type=float, default=1.3)
    parser.add_argument("--min-gain", type=float, default=0.0,
                        help="round 3: a candidate must beat the incumbent's score by at least this much")
    args = parser.parse_args()
    summary = summarise(read_runs(args.out))
    if args.incumbent:
        if not args.step_times:
            raise SystemExit("--incumbent needs --step-times (the JSON line of benchmarks/step_time.py)")
        with open(args.step_times) as f:
            summary = apply_step_rule(summary, args.incumbent, json.loads(f.read().strip().splitlines()[-1]),
                                      args.max_step_ratio, args.min_gain)
    with open(args.json, "w") as f:
        json.dump(summary, f, indent=1)
    print(f"{len(summary['queries'])} validation queries ({len(summary['streams'])} streams); "
          f"score = mean R@1 + mean forgetting\n")
    print(markdown(summary))
    print(f"\nchosen: {summary['chosen']} (wrote {args.json})")


if __name__ == "__main__":
    main()
