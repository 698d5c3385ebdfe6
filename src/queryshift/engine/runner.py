"""``run(cfg)``: one online stream of query batches through a :class:`Retriever`, logged to a run directory.

Memory is bounded by batch x gallery: each batch's scores become per-query ranks at once and are dropped.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from .. import distributed, methods, shifts
from ..data import DataError, duplicate_entries, load_dataset
from ..methods.hparams import min_batch_size
from ..modalities import COMPOSED, check_direction
from ..models.composed import compose
from .composed import rank_queries
from .config import RunConfig
from .gallery import GALLERY, encode_gallery, load_source, resolve_shift, shift_note, weights_digest
from .gallery_index import ExactIndex, build_index, recall_at_k
from .report import (
    clean_forgetting,
    format_table,
    general_domain_styles,
    general_forgetting,
    json_safe,
    summarise,
)
from .retriever import Retriever
from .rundir import RunDir, notice
from .stream import QueryItems, loader, query_order, skip_bad_images, stream_batches


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
    if not methods.get(cfg.method).shardable:
        raise ValueError(f"method {cfg.method!r} re-encodes a selection of the batch and does not support "
                         f"data-parallel runs yet; run it in one process")
    if cfg.eval_clean_after:
        raise ValueError("--eval-clean-after is not supported with several processes yet; run it in one process")
    if cfg.eval_general_after:
        raise ValueError("--eval-general-after is not supported with several processes yet; run it in one "
                         "process")
    smallest = n_stream % cfg.batch_size or cfg.batch_size
    if min(cfg.batch_size, smallest) < world:
        raise ValueError(f"a batch of {min(cfg.batch_size, smallest)} queries cannot be split over {world} "
                         f"processes; use a batch size (and a query count) with at least one query per process")


def run(cfg: RunConfig) -> dict[str, Any]:
    """Run one online adaptation stream; returns (and, with ``cfg.out``, writes) the result dict.

    Everything that can be checked without the model (settings, data, shift, the output directory and its
    lock) is checked before the model is loaded, and nothing in ``cfg.out`` is replaced before then.
    Under ``torchrun`` (several processes) every rank adapts on its shard of each batch and holds the same
    parameters (:mod:`queryshift.distributed`); rank 0 ranks, logs, checkpoints and returns the result,
    the other ranks return ``{"rank": r}``.
    """
    t_start = time.time()
    check_device(cfg.device)
    device = distributed.init_from_env(cfg.device)
    if device != cfg.device:
        cfg = dataclasses.replace(cfg, device=device)
    if not distributed.is_main():
        cfg = dataclasses.replace(cfg, progress=False)
    if cfg.lr is None:  # record the rate in force: a backbone's default rate may change later
        cfg = dataclasses.replace(cfg, lr=cfg.resolved_lr())
    torch.manual_seed(cfg.seed)  # runs are reproducible; load_source reseeds for the model itself
    np.random.seed(cfg.seed)
    if cfg.image_root and not os.path.isdir(cfg.image_root):
        raise DataError(f"image_root {cfg.image_root}: not a directory (the folder the dataset's image paths "
                        f"are relative to)")
    dataset = load_dataset(cfg.data, cfg.image_root, cfg.max_words)
    dataset.relevance(cfg.query_modality, cfg.gallery_modality)  # a dataset without the direction's items fails here
    # a bad shift fails here; a shift of the gallery's modality only corrupts the gallery (gallery.resolve_shift)
    shift, side = resolve_shift(cfg.shift, cfg.query_modality, cfg.gallery_modality, cfg.seed)
    if side == GALLERY and distributed.is_main():
        notice(shift_note(shift, cfg.query_modality, cfg.gallery_modality))
    if cfg.eval_general_after and cfg.query_modality != "composed" and not general_domain_styles(cfg.query_modality):
        raise ValueError(f"eval_general_after measures forgetting on the general-domain styles of the query "
                         f"modality, and no style shifts {cfg.query_modality} queries; leave it out")
    rundir = RunDir(cfg.out, cfg.resume, cfg.overwrite, cfg) if cfg.out and distributed.is_main() else None
    try:
        with pinned_threads(cfg.threads):
            return _run(cfg, dataset, shift, side, rundir, t_start)
    finally:
        if rundir:
            rundir.close()


@contextmanager
def pinned_threads(n: int):
    """Run a block on ``n`` intra-op threads, then give the caller's setting back.

    CPU kernels split their reductions (matmul, LayerNorm, softmax sums) by thread, so the same run on 1 and on
    2 threads sums in a different order and differs in the last bits, enough to swap near-tied ranks. A run's
    thread count is therefore one of its settings (``RunConfig.threads``, recorded in its config), never what
    the process happened to start with (``bench --jobs``, ``OMP_NUM_THREADS``, the machine's cores).
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _run(cfg: RunConfig, dataset, shift, side: str | None, rundir: RunDir | None, t_start: float
         ) -> dict[str, Any]:
    main_rank = distributed.is_main()
    bad_items: list[str] = []
    if cfg.skip_bad_images:
        dataset, bad_items = skip_bad_images(dataset, cfg.progress)
        if bad_items and distributed.is_main():
            warn(f"--skip-bad-images: skipped {len(bad_items)} unreadable image(s), e.g. {bad_items[0]}; all are "
                 f"listed under skipped_items in result.json")
    warnings = setting_warnings(cfg, dataset) if main_rank else []
    model = load_source(cfg.model, cfg.seed, cfg.device)
    weights = weights_digest(model)  # before any adaptation: which source weights this run started from
    modality, gallery_modality = check_direction(cfg.direction, model.towers, model.name)
    if modality == COMPOSED:  # the composed query encoder: the model's own composer, --composer or sum
        model = compose(model, cfg.composer).to(cfg.device)
    n_queries, relevance = dataset.count(modality), dataset.relevance(modality, gallery_modality)
    if not main_rank:
        distributed.barrier()  # rank 0 encodes (and caches) the gallery first; the others then read the cache
    gallery = encode_gallery(model, dataset, gallery_modality, cache_dir=cfg.cache_dir,
                             batch_size=cfg.gallery_batch_size, max_words=cfg.max_words,
                             num_workers=cfg.num_workers, device=cfg.device, progress=cfg.progress,
                             weights=weights, threads=cfg.threads, shift=shift if side == GALLERY else None,
                             seed=cfg.seed).to(cfg.device)
    if main_rank:
        distributed.barrier()

    index = build_index(cfg.gallery_index, gallery) if cfg.gallery_index != "exact" else None
    retriever = Retriever(model, gallery, modality, cfg.method, cfg.adapt_config(), cfg.device, index)
    # a continual stream streams the (shuffled, capped) query set once per shift
    order = query_order(n_queries, cfg.seed, cfg.shuffle, cfg.max_queries) * getattr(shift, "passes", 1)
    batches = stream_batches(len(order), cfg.batch_size)
    check_distributed(cfg, len(order))

    rows: list[dict] = []
    state = None
    if rundir:
        state, rows = rundir.restore(cfg, weights, dataset.fingerprint())
    state, done = distributed.broadcast_object((state, len(rows)))
    if state is not None:
        retriever.load_state_dict(state)

    query_shift = shifts.QueryShift() if side == GALLERY else shift  # a gallery-shifted run's queries are clean
    items = QueryItems(dataset, modality, order, query_shift, cfg.seed, model, cfg.max_words)
    local_batches = [distributed.shard(b) for b in batches]  # one process: the batches themselves
    progress = tqdm(total=len(batches), initial=done, desc=f"{cfg.method} {cfg.direction} {shift.name}",
                    disable=not (cfg.progress and main_rank))
    try:
        for b, (_, _, batch) in enumerate(loader(items, local_batches[done:], cfg.num_workers), start=done):
            t0 = time.time()
            scores, info = retriever.adapt(retriever.model_input(batch))  # scores of the global batch
            refuse_nonfinite(scores, b, retriever.method)
            recall = index_recall(retriever, batch)  # every rank: its forward joins the global batch
            if not main_rank:
                continue
            positions = batches[b]
            indices = [order[p] for p in positions]
            ranks, aps, extra = rank_queries(scores, indices, dataset, relevance, cfg.direction)
            row = {"batch": b, "n": len(indices), "seconds": round(time.time() - t0, 4),
                   **{k: json_safe(v) for k, v in info.items()},
                   "queries": indices, "ranks": ranks, "aps": aps, **extra, **recall,
                   "segments": [shift.segment(p, len(order)) for p in positions]}
            if side == GALLERY:
                row["shift_side"] = side
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

    distributed.check_identical(retriever.method.params)  # every rank must end with the same parameters
    if not main_rank:
        return {"rank": distributed.rank()}
    result = summarise(cfg, rows, dataset, shift, bad_items, side)
    result["model_weights"] = weights
    result["hparams"] = dict(retriever.method.hp)  # defaults included: a method's defaults may change later
    if distributed.active():
        result["world_size"] = distributed.world_size()
    if index is not None:
        recalls = [row["index_recall_at_10"] for row in rows if "index_recall_at_10" in row]
        result["gallery_index"] = {"index": cfg.gallery_index, "build_seconds": round(index.build_seconds, 2),
                                   "recall_at_10": float(np.mean(recalls)) if recalls else None}
    warnings += skip_warnings(cfg, rows)
    if warnings:
        result["warnings"] = warnings
    # forgetting is measured against the run's own gallery: with a gallery-side shift that is the same shifted
    # gallery the stream searched (the queries were clean all along), so it isolates what adapting the query
    # tower changed, not what the gallery shift did
    if cfg.eval_clean_after:
        result["forgetting"] = clean_forgetting(retriever, dataset, relevance, cfg)
    if cfg.eval_general_after:
        result["forgetting_general"] = general_forgetting(retriever, dataset, relevance, cfg)
    result["seconds"] = round(time.time() - t_start, 2)
    if rundir:
        rundir.write_result(result, format_table([result]))
    return result


def refuse_nonfinite(scores: torch.Tensor, batch: int, method: methods.Method) -> None:
    """Stop at recorded scores that are NaN or infinite: ranked, they would tie (or a NaN would come first) and
    the run's metrics would be wrong without a word. ``on_nonfinite`` skips a non-finite *update*; there is
    no score to skip, so this always raises (every rank holds the global batch's scores and raises alike)."""
    finite = torch.isfinite(scores).all(dim=1)
    if not bool(finite.all()):  # one read of the device per batch
        tau = method.hp.get("tau")
        hint = f" (is tau {tau!r} too small? scores / tau overflow float32)" if tau is not None else ""
        raise FloatingPointError(f"{method.name}: the scores of batch {batch} are not finite (NaN or inf) for "
                                 f"{int((~finite).sum())} of its {len(finite)} queries{hint}; they cannot be ranked")


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
