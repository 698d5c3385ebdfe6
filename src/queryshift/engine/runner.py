"""``run(cfg)``: one online stream of query batches through a :class:`Retriever`, logged to a run directory.

Memory is bounded by batch x gallery: each batch's scores become per-query ranks at once and are dropped.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from .. import distributed, shifts
from ..data import load_dataset
from .config import RunConfig
from .gallery import encode_gallery, load_source, weights_digest
from .gallery_index import ExactIndex, build_index, recall_at_k
from .ranking import rank_scores
from .report import clean_forgetting, format_table, json_safe, summarise
from .retriever import Retriever
from .rundir import RunDir
from .stream import QueryItems, loader, query_order, skip_bad_images, stream_batches

# methods that re-encode a subset of the local batch chosen by a mask over the global batch
SHARD_UNSAFE = frozenset({"sar", "deyo"})


@torch.no_grad()
def index_recall(retriever: Retriever, batch) -> dict[str, float]:
    """With an approximate index: recall@10 of its top-10 against exact search, for this batch's queries
    under the parameters after the update (one extra forward of the query tower, without gradient)."""
    if retriever.index is None:
        return {}
    q = retriever.method.encode(retriever.model_input(batch))
    k = min(10, retriever.gallery.shape[0])
    exact = ExactIndex(retriever.gallery).search(q, k)[1]
    return {"index_recall_at_10": recall_at_k(retriever.index.search(q, k)[1], exact)}


def check_distributed(cfg: RunConfig, n_stream: int) -> None:
    """Settings a data-parallel run cannot honour, refused before any work."""
    world = distributed.world_size()
    if world == 1:
        return
    if cfg.method in SHARD_UNSAFE:
        raise ValueError(f"method {cfg.method!r} re-encodes a selection of the batch and does not support "
                         f"data-parallel runs yet; run it in one process")
    if cfg.eval_clean_after:
        raise ValueError("--eval-clean-after is not supported with several processes yet; run it in one process")
    smallest = n_stream % cfg.batch_size or cfg.batch_size
    if min(cfg.batch_size, smallest) < world:
        raise ValueError(f"a batch of {min(cfg.batch_size, smallest)} queries cannot be split over {world} "
                         f"processes; use a batch size (and a query count) with at least one query per process")


def run(cfg: RunConfig) -> dict[str, Any]:
    """Run one online adaptation stream; returns (and, with ``cfg.out``, writes) the result dict.

    Under ``torchrun`` (several processes) every rank adapts on its shard of each batch and holds the same
    parameters (:mod:`queryshift.distributed`); rank 0 ranks, logs, checkpoints and returns the result,
    the other ranks return ``{"rank": r}``.
    """
    t_start = time.time()
    device = distributed.init_from_env(cfg.device)
    if device != cfg.device:
        cfg = dataclasses.replace(cfg, device=device)
    main_rank = distributed.is_main()
    if not main_rank:
        cfg = dataclasses.replace(cfg, progress=False)
    rundir = RunDir(cfg.out, cfg.resume, cfg.overwrite) if cfg.out and main_rank else None

    torch.manual_seed(cfg.seed)  # runs are reproducible; load_source reseeds for the model itself
    np.random.seed(cfg.seed)
    dataset = load_dataset(cfg.data, cfg.image_root, cfg.max_words)
    bad_items: list[str] = []
    if cfg.skip_bad_images:
        dataset, bad_items = skip_bad_images(dataset)
    model = load_source(cfg.model, cfg.seed, cfg.device)
    weights = weights_digest(model)  # before any adaptation: which source weights this run started from
    modality, n_queries, relevance = dataset.query_items(cfg.direction)
    gallery_modality = "text" if modality == "image" else "image"
    if not main_rank:
        distributed.barrier()  # rank 0 encodes (and caches) the gallery first; the others then read the cache
    gallery = encode_gallery(model, dataset, gallery_modality, cfg, weights).to(cfg.device)
    if main_rank:
        distributed.barrier()

    index = build_index(cfg.gallery_index, gallery) if cfg.gallery_index != "exact" else None
    retriever = Retriever(model, gallery, modality, cfg.method, cfg.adapt_config(), cfg.device, index)
    shift = shifts.build(cfg.shift, modality, cfg.seed)
    order = query_order(n_queries, cfg.seed, cfg.shuffle, cfg.max_queries)
    batches = stream_batches(len(order), cfg.batch_size)
    check_distributed(cfg, len(order))

    rows: list[dict] = []
    state = None
    if rundir:
        state, rows = rundir.restore(cfg, weights)
    state, done = distributed.broadcast_object((state, len(rows)))
    if state is not None:
        retriever.load_state_dict(state)

    items = QueryItems(dataset, modality, order, shift, cfg.seed, model, cfg.max_words)
    local_batches = [distributed.shard(b) for b in batches]  # one process: the batches themselves
    progress = tqdm(total=len(batches), initial=done, desc=f"{cfg.method} {cfg.direction} {shift.name}",
                    disable=not (cfg.progress and main_rank))
    try:
        for b, (_, _, batch) in enumerate(loader(items, local_batches[done:], cfg.num_workers), start=done):
            t0 = time.time()
            scores, info = retriever.adapt(retriever.model_input(batch))  # scores of the global batch
            recall = index_recall(retriever, batch)  # every rank: its forward joins the global batch
            if not main_rank:
                continue
            positions = batches[b]
            indices = [order[p] for p in positions]
            ranks, aps = rank_scores(scores, [relevance[i] for i in indices])
            row = {"batch": b, "n": len(indices), "seconds": round(time.time() - t0, 4),
                   **{k: json_safe(v) for k, v in info.items()},
                   "queries": indices, "ranks": ranks, "aps": aps, **recall,
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
            rundir.close()

    distributed.check_identical(retriever.method.params)  # every rank must end with the same parameters
    if not main_rank:
        return {"rank": distributed.rank()}
    result = summarise(cfg, rows, dataset, shift, bad_items)
    result["model_weights"] = weights
    if distributed.active():
        result["world_size"] = distributed.world_size()
    if index is not None:
        recalls = [row["index_recall_at_10"] for row in rows if "index_recall_at_10" in row]
        result["gallery_index"] = {"index": cfg.gallery_index, "build_seconds": round(index.build_seconds, 2),
                                   "recall_at_10": float(np.mean(recalls)) if recalls else None}
    if cfg.eval_clean_after:
        result["forgetting"] = clean_forgetting(retriever, dataset, relevance, cfg)
    result["seconds"] = round(time.time() - t_start, 2)
    if rundir:
        rundir.write_result(result, format_table([result]))
    return result
