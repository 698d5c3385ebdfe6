"""What a results table may show, and its Markdown rendering."""

from __future__ import annotations

import re
from typing import Any

# numbers every finished run reports (``result.json``)
SCALAR_METRICS = ("r1", "r5", "r10", "r_mean", "map", "r50", "rsubset1", "rsubset2", "rsubset3", "n_queries",
                  "skipped_updates", "seconds", "stream_r1")
# nested records, shown by a dotted path: forgetting.forgetting, forgetting_general.mean.forgetting,
# segments.<segment>.r1, log_means.<per-batch log key>
NESTED_METRICS = ("forgetting", "forgetting_general", "segments", "log_means")
METRICS = SCALAR_METRICS + tuple(f"{m}.<key>" for m in NESTED_METRICS)
# what a bench record keeps of a run's result
RECORD_KEYS = ("r1", "r5", "r10", "r_mean", "map", "r50", "rsubset1", "rsubset2", "rsubset3", "n_queries",
               "segments", "segment_order", "stream_r1", "forgetting", "forgetting_general", "skipped_updates",
               "warnings", "seconds")


def check_metric(metric: Any) -> None:
    """A table metric must name a number every run reports, or a dotted path into a nested record."""
    head, dot, rest = str(metric).partition(".") if isinstance(metric, str) else ("", "", "")
    if (head in SCALAR_METRICS and not dot) or (head in NESTED_METRICS and dot and rest):
        return
    raise ValueError(f"unknown table metric {metric!r}; valid metrics: {', '.join(METRICS)}")


def metric_value(record: dict, metric: str):
    value: Any = record
    for part in metric.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    return value


def _fmt(v) -> str:
    return "—" if v is None else f"{v:.2f}" if isinstance(v, float) else str(v)


def render_table(t: dict, records: list[dict], metric: str = "r1") -> tuple[str, dict]:
    """Markdown table for one suite: rows by ``hints.rows``, one column per other label combination, average."""
    hints = t["hints"]
    rows_axis = hints.get("rows", "method")
    mine = [r for r in records if r["table"] == t["name"]]
    cols_axes = hints.get("columns") or [a for a in mine[0]["labels"] if a != rows_axis]
    cols_axes = [cols_axes] if isinstance(cols_axes, str) else list(cols_axes)
    rows, cols, cell = [], [], {}
    if metric != "r1" and "." in metric:  # a diagnostic only some methods log: keep the rows that have it
        mine = [r for r in mine if metric_value(r, metric) is not None] or mine
    for r in mine:
        row = r["labels"].get(rows_axis, "")
        col = " ".join(r["labels"][a] for a in cols_axes if a in r["labels"])
        rows += [row] if row not in rows else []
        cols += [col] if col not in cols else []
        cell[row, col] = metric_value(r, metric)
    has_pub = bool(t["published"])
    averages = {}
    for row in rows:
        vals = [cell.get((row, c)) for c in cols]
        known = [v for v in vals if isinstance(v, (int, float))]
        averages[row] = sum(known) / len(known) if known and len(known) == len(vals) else None
    # every row against the unadapted model, when the table has one
    has_delta = metric in ("r1", "r5", "r10", "r_mean", "map") and "source" in rows and len(rows) > 1 \
        and averages["source"] is not None
    head = [rows_axis, *cols, "avg"] + (["Δ avg vs source"] if has_delta else []) + (
        ["published avg"] if has_pub else [])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        cells = [row, *(_fmt(cell.get((row, c))) for c in cols), _fmt(averages[row])]
        if has_delta:
            delta = None if averages[row] is None else averages[row] - averages["source"]
            cells.append("—" if delta is None else f"{delta:+.2f}")
        cells += [_fmt(t["published"].get(row))] if has_pub else []
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines), {"rows": rows, "cols": cols, "cell": cell, "metric": metric, "averages": averages}


def metric_slug(metric: str, metrics: list[str]) -> str:
    """A metric's part of its table and PNG names: the last part of a dotted path, or the whole path when two
    of the table's metrics end alike (forgetting.forgetting and forgetting_general.mean.forgetting)."""
    last = metric.split(".")[-1]
    if sum(m.split(".")[-1] == last for m in metrics) > 1:
        return re.sub(r"[^A-Za-z0-9_-]+", "-", metric)
    return last


def table_metrics(hints: dict) -> list[str]:
    metrics = hints.get("metric", "r1")
    return [metrics] if isinstance(metrics, str) else list(metrics)
