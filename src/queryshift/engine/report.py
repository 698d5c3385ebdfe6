"""What a run reports: metrics from the logged ranks, segments, forgetting, JSON and a Markdown table."""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any

import torch
from tqdm.auto import tqdm

from .. import shifts
from ..metrics import retrieval_metrics
from ..runinfo import git_commit, versions
from .config import RESULT_KEYS, RunConfig
from .ranking import rank_scores
from .stream import QueryItems, loader, query_order, stream_batches


def json_safe(value):
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, torch.Tensor):
        return json_safe(value.item()) if value.numel() == 1 else value.tolist()
    return value


def summarise(cfg: RunConfig, rows: list[dict], dataset, shift, bad_items: list[str]) -> dict[str, Any]:
    """The result dict of a run from its per-batch log rows."""
    ranks = [r for row in rows for r in row["ranks"]]
    aps = [a for row in rows for a in row["aps"]]
    result: dict[str, Any] = retrieval_metrics(ranks, aps)
    segments: dict[str, tuple[list, list]] = {}
    for row in rows:
        for seg, r, a in zip(row["segments"], row["ranks"], row["aps"]):
            segments.setdefault(seg, ([], []))[0].append(r)
            segments[seg][1].append(a)
    if len(segments) > 1:
        result["segments"] = {s: retrieval_metrics(r, a) for s, (r, a) in segments.items()}
    result["skipped_updates"] = sum(1 for row in rows if "skipped" in row)
    result.update({
        "direction": cfg.direction, "method": cfg.method, "shift": shift.name, "model": cfg.model,
        "dataset": dataset.name, "n_gallery": len(dataset.texts if cfg.direction == "i2t" else dataset.images),
        "seed": cfg.seed, "config": dataclasses.asdict(cfg), "lr": cfg.resolved_lr(),
        "versions": versions(), "git_commit": git_commit(),
    })
    if bad_items:
        result["skipped_items"] = bad_items
    return result


@torch.no_grad()
def clean_forgetting(retriever, dataset, relevance, cfg: RunConfig) -> dict[str, float]:
    """R@1 on clean queries with the adapted parameters minus R@1 with the source parameters."""
    order = query_order(len(relevance), cfg.seed, cfg.shuffle, cfg.max_queries)
    items = QueryItems(dataset, retriever.modality, order, shifts.QueryShift(), cfg.seed, retriever.model,
                       cfg.max_words)
    batches = stream_batches(len(order), cfg.batch_size)
    after, source = [], []
    for _, indices, batch in tqdm(loader(items, batches, cfg.num_workers), total=len(batches),
                                  desc="clean queries after adaptation", disable=not cfg.progress, leave=False):
        x = retriever.model_input(batch)
        rel = [relevance[i] for i in indices]
        after += rank_scores(retriever.scores(x), rel)[0]
        source += rank_scores(retriever.scores(x, source=True), rel)[0]
    r_after, r_source = retrieval_metrics(after), retrieval_metrics(source)
    return {"r1_after": r_after["r1"], "r1_source": r_source["r1"],
            "forgetting": round(r_after["r1"] - r_source["r1"], 2)}


def write_json(path: str, obj) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, default=str)
    os.replace(tmp, path)


def format_table(results: list[dict[str, Any]]) -> str:
    """A readable Markdown table of runs: method, direction, shift and the five metrics."""
    head = ["method", "direction", "shift", *RESULT_KEYS]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        cells = [r["method"], r["direction"], r["shift"]] + [f"{r[k]:.2f}" for k in RESULT_KEYS]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
