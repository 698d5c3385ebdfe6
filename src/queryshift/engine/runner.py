"""``run(cfg)``: one online stream of query batches through a :class:`Retriever`, logged to a run directory.

Memory is bounded by batch x gallery: each batch's scores become per-query ranks at once and are dropped.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from .. import methods
from ..data import DataError, duplicate_entries, load_dataset
from ..methods.hparams import min_batch_size
from ..models.composed import compose
from .composed import build_query_shift, rank_queries
from .config import RunConfig
from .gallery import encode_gallery, load_source, weights_digest
from .report import clean_forgetting, format_table, json_safe, summarise
from .retriever import Retriever
from .rundir import RunDir
from .stream import QueryItems, loader, query_order, skip_bad_images, stream_batches


def run(cfg: RunConfig) -> dict[str, Any]:
    """Run one online adaptation stream; returns (and, with ``cfg.out``, writes) the result dict.

    Everything that can be checked without the model (settings, data, shift, the output directory and its
    lock) is checked before the model is loaded, and nothing in ``cfg.out`` is replaced before then.
    """
    t_start = time.time()
    torch.manual_seed(cfg.seed)  # runs are reproducible; load_source reseeds for the model itself
    np.random.seed(cfg.seed)
    check_device(cfg.device)
    if cfg.image_root and not os.path.isdir(cfg.image_root):
        raise DataError(f"image_root {cfg.image_root}: not a directory (the folder the dataset's image paths "
                        f"are relative to)")
    dataset = load_dataset(cfg.data, cfg.image_root, cfg.max_words)
    shift = build_query_shift(cfg.shift, dataset.query_items(cfg.direction)[0], cfg.seed)  # a bad shift fails here
    rundir = RunDir(cfg.out, cfg.resume, cfg.overwrite, cfg) if cfg.out else None
    try:
        return _run(cfg, dataset, shift, rundir, t_start)
    finally:
        if rundir:
            rundir.close()


def _run(cfg: RunConfig, dataset, shift, rundir: RunDir | None, t_start: float) -> dict[str, Any]:
    bad_items: list[str] = []
    if cfg.skip_bad_images:
        dataset, bad_items = skip_bad_images(dataset, cfg.progress)
    warnings = setting_warnings(cfg, dataset)
    model = load_source(cfg.model, cfg.seed, cfg.device)
    weights = weights_digest(model)  # before any adaptation: which source weights this run started from
    if cfg.direction == "c2i":  # the composed query encoder: the model's own composer, --composer or sum
        model = compose(model, cfg.composer).to(cfg.device)
    modality, n_queries, relevance = dataset.query_items(cfg.direction)
    gallery_modality = "text" if modality == "image" else "image"
    gallery = encode_gallery(model, dataset, gallery_modality, cfg, weights).to(cfg.device)

    retriever = Retriever(model, gallery, modality, cfg.method, cfg.adapt_config(), cfg.device)
    order = query_order(n_queries, cfg.seed, cfg.shuffle, cfg.max_queries)
    batches = stream_batches(len(order), cfg.batch_size)

    rows: list[dict] = []
    if rundir:
        state, rows = rundir.restore(cfg, weights)
        if state is not None:
            retriever.load_state_dict(state)
    done = len(rows)

    items = QueryItems(dataset, modality, order, shift, cfg.seed, model, cfg.max_words)
    progress = tqdm(total=len(batches), initial=done, desc=f"{cfg.method} {cfg.direction} {shift.name}",
                    disable=not cfg.progress)
    try:
        for b, (positions, indices, batch) in enumerate(loader(items, batches[done:], cfg.num_workers), start=done):
            t0 = time.time()
            scores, info = retriever.adapt(retriever.model_input(batch))
            ranks, aps, extra = rank_queries(scores, indices, dataset, relevance, cfg.direction)
            row = {"batch": b, "n": len(indices), "seconds": round(time.time() - t0, 4),
                   **{k: json_safe(v) for k, v in info.items()},
                   "queries": indices, "ranks": ranks, "aps": aps, **extra,
                   "segments": [shift.segment(p, len(order)) for p in positions]}
            rows.append(row)
            if rundir:
                rundir.append(row, {"config": dataclasses.asdict(cfg), "method": retriever.state_dict(),
                                    "model_weights": weights, "batches_done": b + 1})
            progress.update(1)
            if b % 10 == 0 or b == len(batches) - 1:
                progress.set_postfix(r1=f"{100 * np.mean([r < 1 for x in rows for r in x['ranks']]):.1f}")
    finally:
        progress.close()
        if rundir:
            rundir.close_log()

    result = summarise(cfg, rows, dataset, shift, bad_items)
    result["model_weights"] = weights
    warnings += skip_warnings(cfg, rows)
    if warnings:
        result["warnings"] = warnings
    if cfg.eval_clean_after:
        result["forgetting"] = clean_forgetting(retriever, dataset, relevance, cfg)
    result["seconds"] = round(time.time() - t_start, 2)
    if rundir:
        rundir.write_result(result, format_table([result]))
    return result


def check_device(device: str) -> None:
    try:
        kind = torch.device(device).type
    except RuntimeError as err:
        raise ValueError(f"device {device!r}: {err}") from None
    if kind == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r}: no CUDA device is available here; use --device cpu")
    if kind == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device {device!r}: MPS is not available here; use --device cpu")


def warn(message: str) -> str:
    print(f"queryshift: warning: {message}", file=sys.stderr)
    return message


def setting_warnings(cfg: RunConfig, dataset) -> list[str]:
    """Settings that run but do not measure what the user likely wants; printed now, kept in result.json."""
    found = []
    duplicates = duplicate_entries(dataset)
    if duplicates:
        found.append(warn(duplicates))
    cls = methods.get(cfg.method)
    need = min_batch_size(cls, cfg.hparams)
    if need and cfg.batch_size < need[0]:
        b, key = need
        at = f"at batch size {cfg.batch_size} (it needs a batch size >= {b})" if b < 1 << 62 else \
            f"at any batch size ({key} = {cfg.hparams.get(key, cls.defaults.get(key))})"
        found.append(warn(f"method {cfg.method!r} selects int({key} * batch size) samples per batch, too few "
                          f"{at}: it will not adapt and its updates are skipped"))
    return found


def skip_warnings(cfg: RunConfig, rows: list[dict]) -> list[str]:
    """A method that skipped most of its updates reports (nearly) the unadapted model under its own name."""
    skipped = [row["skipped"] for row in rows if "skipped" in row]
    if rows and len(skipped) * 2 > len(rows):
        reasons = ", ".join(f"{r} x{skipped.count(r)}" for r in dict.fromkeys(skipped))
        return [warn(f"method {cfg.method!r} skipped {len(skipped)} of {len(rows)} updates ({reasons}); its "
                     f"result is close to the unadapted model's")]
    return []
