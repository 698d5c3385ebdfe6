"""Print the model card's shift tables from the runs of ``queryshift bench --suite synthetic-source``.

    python lab/experiments/model_card_tables.py runs/synthetic/runs/synthetic-source

The card's numbers are copied from this output, so they are exactly what the suite measured.
"""

from __future__ import annotations

import glob
import json
import os
import sys


def load(run_dir: str) -> dict[tuple[str, str], dict]:
    """(direction, shift or 'clean') -> result.json of every finished run under ``run_dir``."""
    results = {}
    for path in glob.glob(os.path.join(run_dir, "*", "result.json")):
        with open(path, encoding="utf-8") as f:
            r = json.load(f)
        results[r["direction"], r["shift"] or "clean"] = r
    if not results:
        raise SystemExit(f"no result.json under {run_dir}: run `queryshift bench --suite synthetic-source` first")
    return results


def style_table(results) -> list[str]:
    rows = ["| style | queries | R@1 | R@5 | R@10 |", "|---|---|---|---|---|"]
    for direction, queries in (("i2t", "image (i2t)"), ("t2i", "text (t2i)")):
        shifts = ["clean"] + sorted(s for d, s in results if d == direction and s.startswith("style:"))
        for shift in shifts:
            r = results[direction, shift]
            name = shift if shift == "clean" else f"`{shift}`"
            rows.append(f"| {name} | {queries} | {r['r1']:.2f} | {r['r5']:.2f} | {r['r10']:.2f} |")
    return rows


def corruption_table(results) -> list[str]:
    columns = []
    for direction in ("i2t", "t2i"):
        clean = results[direction, "clean"]["r1"]
        shifts = sorted((r["r1"], s) for (d, s), r in results.items()
                        if d == direction and s != "clean" and not s.startswith("style:"))
        columns.append([("clean", f"{clean:.2f}", "")] + [(s, f"{r1:.2f}", f"{r1 - clean:+.2f}") for r1, s in shifts])
    rows = ["| image corruption (severity 5) | i2t R@1 | change | text corruption (level 7) | t2i R@1 | change |",
            "|---|---|---|---|---|---|"]
    for k in range(max(map(len, columns))):
        cells = [c[k] if k < len(c) else ("", "", "") for c in columns]
        rows.append("| " + " | ".join(x for cell in cells for x in cell) + " |")
    lowered = [sum(float(change) < 0 for _, _, change in c[1:]) for c in columns]
    rows.append("")
    rows.append(f"lower than clean: {lowered[0]} of {len(columns[0]) - 1} image corruptions, "
                f"{lowered[1]} of {len(columns[1]) - 1} text corruptions")
    return rows


def main(argv: list[str]) -> int:
    results = load(argv[0] if argv else "runs/synthetic/runs/synthetic-source")
    print("\n".join(style_table(results)))
    print()
    print("\n".join(corruption_table(results)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
