"""What a run reports: metrics from the logged ranks, segments, forgetting, JSON and a Markdown table."""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from ..atomic import write_text
from ..metrics import retrieval_metrics
from ..runinfo import git_commit, versions
from .composed import build_query_shift, composed_metrics, rank_queries
from .config import RESULT_KEYS, RunConfig
from .stream import QueryItems, loader, query_order, stream_batches


def json_safe(value):
    """A log or result value as strict JSON: tensors become numbers or lists, NaN/inf become null.

    Python's json writes NaN/Infinity as bare words that no other JSON parser accepts; a non-finite loss is
    recorded as null, next to the ``skipped`` reason the method logs for it.
    """
    if isinstance(value, torch.Tensor):
        value = value.item() if value.numel() == 1 else value.tolist()
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if hasattr(value, "item") and getattr(value, "ndim", None) == 0:  # numpy scalars
        return json_safe(value.item())
    return value


def json_line(obj) -> str:
    """One strict-JSON line (log.jsonl)."""
    return json.dumps(json_safe(obj), allow_nan=False, default=str)


def summarise(cfg: RunConfig, rows: list[dict], dataset, shift, bad_items: list[str], side: str | None = "query"
              ) -> dict[str, Any]:
    """The result dict of a run from its per-batch log rows. ``side``: what the shift corrupted, ``"query"``
    or ``"gallery"`` (a shift of the gallery's modality only; ``engine.gallery.resolve_shift``), None when
    clean."""
    ranks = [r for row in rows for r in row["ranks"]]
    aps = [a for row in rows for a in row["aps"]]
    result: dict[str, Any] = retrieval_metrics(ranks, aps)
    if cfg.direction == "c2i":
        result.update(composed_metrics(rows))
    segments: dict[str, tuple[list, list]] = {}
    for row in rows:
        for seg, r, a in zip(row["segments"], row["ranks"], row["aps"]):
            segments.setdefault(seg, ([], []))[0].append(r)
            segments[seg][1].append(a)
    if len(segments) > 1:  # in stream order (first appearance); a stream's mean weighs its segments equally
        result["segments"] = {s: retrieval_metrics(r, a) for s, (r, a) in segments.items()}
        result["segment_order"] = list(segments)
        result["stream_r1"] = round(float(np.mean([m["r1"] for m in result["segments"].values()])), 2)
    result["skipped_updates"] = sum(1 for row in rows if "skipped" in row)
    result.update({
        "direction": cfg.direction, "method": cfg.method, "shift": shift.name,
        "shift_side": side if shift.name != "clean" else None, "model": cfg.model,
        "dataset": dataset.name, "n_gallery": dataset.count(cfg.gallery_modality),
        "seed": cfg.seed, "config": dataclasses.asdict(cfg), "lr": cfg.resolved_lr(),
        "versions": versions(), "git_commit": git_commit(),
    })
    if bad_items:
        result["skipped_items"] = bad_items
    return result


@torch.no_grad()
def shift_forgetting(retriever, dataset, relevance, cfg: RunConfig, spec: str | None = None) -> dict[str, float]:
    """R@1 with the adapted parameters minus R@1 with the source parameters, on the stream's queries (the
    first ``max_queries`` in stream order) under the query shift ``spec`` (None: clean queries)."""
    order = query_order(len(relevance), cfg.seed, cfg.shuffle, cfg.max_queries)
    shift = build_query_shift(spec, retriever.modality, cfg.seed)
    items = QueryItems(dataset, retriever.modality, order, shift, cfg.seed, retriever.model, cfg.max_words)
    batches = stream_batches(len(order), cfg.batch_size)
    after, source = [], []
    for _, indices, batch in tqdm(loader(items, batches, cfg.num_workers), total=len(batches),
                                  desc=f"{shift.name} queries after adaptation", disable=not cfg.progress,
                                  leave=False):
        x = retriever.model_input(batch)
        after += rank_queries(retriever.scores(x), indices, dataset, relevance, cfg.direction)[0]
        source += rank_queries(retriever.scores(x, source=True), indices, dataset, relevance, cfg.direction)[0]
    r_after, r_source = retrieval_metrics(after), retrieval_metrics(source)
    return {"r1_after": r_after["r1"], "r1_source": r_source["r1"],
            "forgetting": round(r_after["r1"] - r_source["r1"], 2)}


def clean_forgetting(retriever, dataset, relevance, cfg: RunConfig) -> dict[str, float]:
    """Forgetting on clean queries (``--eval-clean-after``)."""
    return shift_forgetting(retriever, dataset, relevance, cfg)


def general_domain_styles(modality: str) -> list[str]:
    """The test styles of ``modality``'s queries, the general domains the general source model was trained on
    (``shifts.domain.TEST_STYLES``; the validation styles are not among them)."""
    from ..shifts.domain import TEST_STYLES
    from ..shifts.registry import list_shifts

    offered = set(list_shifts(modality))  # the styles that shift this modality
    return [s for s in TEST_STYLES if s in offered]


def general_forgetting(retriever, dataset, relevance, cfg: RunConfig) -> dict[str, dict[str, float]]:
    """Forgetting on each general-domain style of the query modality, and their mean
    (``--eval-general-after``)."""
    styles = general_domain_styles(retriever.modality)
    if not styles:
        raise ValueError(f"no general-domain style shifts {retriever.modality} queries")
    out = {s: shift_forgetting(retriever, dataset, relevance, cfg, s) for s in styles}
    after = sum(f["r1_after"] for f in out.values()) / len(styles)
    source = sum(f["r1_source"] for f in out.values()) / len(styles)
    out["mean"] = {"r1_after": round(after, 2), "r1_source": round(source, 2),
                   "forgetting": round(after - source, 2)}
    return out


def write_json(path: str, obj) -> None:
    """Write strict JSON atomically (a kill leaves the old file or the new one, never half of one)."""
    text = json.dumps(json_safe(obj), indent=2, allow_nan=False, default=str)
    write_text(path, text)


def format_table(results: list[dict[str, Any]]) -> str:
    """A readable Markdown table of runs: method, direction, shift and the five metrics; a shift of the gallery
    (``shift_side`` gallery) reads ``traffic:5 (gallery)``."""
    head = ["method", "direction", "shift", *RESULT_KEYS]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        shift = r["shift"] + (" (gallery)" if r.get("shift_side") == "gallery" else "")
        cells = [r["method"], r["direction"], shift] + [f"{r[k]:.2f}" for k in RESULT_KEYS]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
