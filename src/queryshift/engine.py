"""The online engine: encode the gallery once, stream the queries batch by batch through a method.

Memory is bounded by batch x gallery: each batch's scores become per-query ranks at once and are dropped.
Every batch appends one line to ``log.jsonl`` and checkpoints the method state, so a killed run keeps its
results and ``resume=True`` continues to the same final metrics as an uninterrupted run.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from . import methods, shifts
from .data import DataError, RetrievalDataset, load_dataset, pre_caption
from .metrics import batch_ranks, retrieval_metrics
from .models import DualEncoder, load_model
from .runinfo import git_commit, versions

RESULT_KEYS = ("r1", "r5", "r10", "r_mean", "map")


@dataclass
class RunConfig:
    """One online adaptation run. YAML config keys and ``queryshift run`` options use these names."""

    model: str = "shapes-clip"
    data: str = "shapes"
    image_root: str | None = None
    direction: str = "i2t"  # i2t: image queries, text gallery; t2i: text queries, image gallery
    method: str = "source"
    shift: str | None = None  # query-side shift, e.g. gaussian_noise:5, RandomCharAug_swap:7, stream:temporal
    batch_size: int = 64
    seed: int = 42
    steps: int = 3
    record: str = "last"  # scores of the first or the last step's forward (spec §1.8)
    optimizer: str = "adamw"
    lr: float | None = None  # None: 3e-4, or 3e-5 for BLIP text queries (spec §1.4)
    weight_decay: float = 1e-4
    hparams: dict[str, Any] = field(default_factory=dict)
    include_final_ln: bool = False
    on_nonfinite: str = "skip"
    out: str | None = None
    resume: bool = False
    overwrite: bool = False
    cache_dir: str | None = None
    num_workers: int = 0
    device: str = "cpu"
    max_queries: int | None = None
    shuffle: bool = True
    skip_bad_images: bool = False
    eval_clean_after: bool = False  # forgetting: clean queries with the adapted vs the source parameters
    max_words: int = 30
    gallery_batch_size: int = 256
    progress: bool = True

    def __post_init__(self):
        if self.direction not in ("i2t", "t2i"):
            raise ValueError(f"direction must be 'i2t' or 't2i', got {self.direction!r}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")

    @classmethod
    def from_dict(cls, values: dict[str, Any], source: str = "config") -> RunConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"{source}: unknown key(s) {unknown}; known keys: {sorted(known)}")
        return cls(**values)

    def resolved_lr(self) -> float:
        if self.lr is not None:
            return float(self.lr)
        return 3e-5 if self.model.startswith("hf-blip") and self.direction == "t2i" else 3e-4

    def adapt_config(self) -> methods.AdaptConfig:
        return methods.AdaptConfig(
            steps=self.steps, record=self.record, optimizer=self.optimizer, lr=self.resolved_lr(),
            weight_decay=self.weight_decay, include_final_ln=self.include_final_ln,
            on_nonfinite=self.on_nonfinite, hparams=dict(self.hparams),
        )


# Fields that may differ between an interrupted run and its resumption.
_RESUME_FREE = {"out", "resume", "overwrite", "num_workers", "progress", "cache_dir", "device"}


# -- data plumbing ---------------------------------------------------------------------------------


class QueryItems(torch.utils.data.Dataset):
    """Stream position -> (position, query index, shifted query item) for one direction."""

    def __init__(self, dataset: RetrievalDataset, modality: str, order: list[int], shift, seed: int,
                 model: DualEncoder, max_words: int):
        self.dataset, self.modality, self.order = dataset, modality, order
        self.shift, self.seed, self.model, self.max_words = shift, seed, model, max_words

    def __len__(self) -> int:
        return len(self.order)

    def __getitem__(self, position: int):
        index = self.order[position]
        rng = shifts.item_rng(self.seed, index)
        if self.modality == "image":
            image = self.shift(self.dataset.load_image(index), index, position, len(self.order), rng)
            return position, index, self.model.preprocess(image)
        text = self.shift(self.dataset.texts[index], index, position, len(self.order), rng)
        text = pre_caption(text, self.max_words)
        if not text:
            raise DataError(f"text query {index} is empty after the shift {self.shift.name!r}")
        return position, index, text


def _collate(batch):
    positions, indices, items = zip(*batch)
    if isinstance(items[0], torch.Tensor):
        items = torch.stack(items)
    else:
        items = list(items)
    return list(positions), list(indices), items


def _to_model_input(model: DualEncoder, modality: str, items, device: str):
    if modality == "image":
        return items.to(device)
    tokens = model.tokenize(items)
    if isinstance(tokens, dict):
        return {k: v.to(device) for k, v in tokens.items()}
    return tokens.to(device)


def _loader(items: torch.utils.data.Dataset, batches: list[list[int]], num_workers: int):
    return torch.utils.data.DataLoader(items, batch_sampler=batches, collate_fn=_collate,
                                       num_workers=num_workers)


# -- gallery ---------------------------------------------------------------------------------------


def _weights_digest(model: DualEncoder) -> str:
    h = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def _load_source(spec: str, seed: int, device: str = "cpu") -> DualEncoder:
    torch.manual_seed(seed)  # random-init models (``/random``) must be identical across resumes and reruns
    return load_model(spec, device)


def source_weights(spec: str, seed: int, device: str = "cpu") -> str:
    """Digest of the source weights a run of ``spec`` starts from (what a finished run records)."""
    return _weights_digest(_load_source(spec, seed, device))


@torch.no_grad()
def encode_all(model: DualEncoder, dataset: RetrievalDataset, modality: str, batch_size: int = 256,
               max_words: int = 30, num_workers: int = 0, device: str = "cpu", progress: bool = False):
    """Every clean image or text of ``dataset`` through ``model`` in dataset order (no cache, no shift)."""
    n = len(dataset.images) if modality == "image" else len(dataset.texts)
    items = QueryItems(dataset, modality, list(range(n)), shifts.QueryShift(), 0, model, max_words)
    batches = stream_batches(n, batch_size)
    chunks = []
    for _, _, batch in tqdm(_loader(items, batches, num_workers), total=len(batches),
                            desc=f"encoding {modality}s", disable=not progress, leave=False):
        chunks.append(model.encode(modality, _to_model_input(model, modality, batch, device)).float())
    return torch.cat(chunks)


def stream_batches(n: int, batch_size: int) -> list[list[int]]:
    """Consecutive stream positions 0..n-1 in batches; the last batch may be smaller (drop_last false)."""
    return [list(range(i, min(i + batch_size, n))) for i in range(0, n, batch_size)]


def default_cache_dir() -> str:
    return os.environ.get("QUERYSHIFT_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "queryshift"))


@torch.no_grad()
def encode_gallery(model: DualEncoder, dataset: RetrievalDataset, modality: str, cfg: RunConfig,
                   weights: str | None = None) -> torch.Tensor:
    """Encode the whole gallery once with the source model, cached on disk by model + data + preprocessing.

    ``weights`` is the model's weight digest when the caller has already computed it.
    """
    key = hashlib.sha256(json.dumps([
        model.name, weights or _weights_digest(model), model.preprocess_id, dataset.fingerprint(), modality,
        cfg.max_words,
    ]).encode()).hexdigest()[:24]
    cache_dir = cfg.cache_dir or default_cache_dir()
    path = os.path.join(cache_dir, "gallery", f"{key}.pt")
    if os.path.exists(path):
        try:
            return torch.load(path, map_location=cfg.device)
        except Exception:  # a truncated cache file is rebuilt rather than trusted
            os.remove(path)
    gallery = encode_all(model, dataset, modality, cfg.gallery_batch_size, cfg.max_words, cfg.num_workers,
                         cfg.device, cfg.progress)
    if not torch.isfinite(gallery).all() or (gallery.norm(dim=1) == 0).any():
        raise FloatingPointError("gallery embeddings contain NaN/inf or all-zero rows")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp"
    torch.save(gallery.cpu(), tmp)
    os.replace(tmp, path)
    return gallery


# -- run -------------------------------------------------------------------------------------------


def query_order(n: int, seed: int, shuffle: bool = True, max_queries: int | None = None) -> list[int]:
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist() if shuffle else list(range(n))
    return order[:max_queries] if max_queries else order


def _skip_bad_images(dataset: RetrievalDataset) -> tuple[RetrievalDataset, list[str]]:
    good, bad = [], []
    for i in tqdm(range(len(dataset.images)), desc="checking images", leave=False):
        try:
            dataset.load_image(i)
            good.append(i)
        except DataError as err:
            bad.append(str(err))
    return (dataset.subset(good) if bad else dataset), bad


def _atomic_save(obj, path: str) -> None:
    tmp = f"{path}.tmp"
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _read_log(path: str, upto_batch: int) -> list[dict]:
    """Log lines of batches < upto_batch (lines past the last checkpoint are dropped on resume)."""
    rows = []
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            for line in f:
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:  # a line cut by a kill mid-write
                    break
                if row["batch"] < upto_batch:
                    rows.append(row)
    return rows


def _json_safe(value):
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, torch.Tensor):
        return _json_safe(value.item()) if value.numel() == 1 else value.tolist()
    return value


def run(cfg: RunConfig) -> dict[str, Any]:
    """Run one online adaptation stream; returns (and, with ``cfg.out``, writes) the result dict."""
    t_start = time.time()
    out = cfg.out
    log_path = state_path = None
    if out:
        os.makedirs(out, exist_ok=True)
        log_path, state_path = os.path.join(out, "log.jsonl"), os.path.join(out, "state.pt")
        if os.path.exists(log_path) and not (cfg.resume or cfg.overwrite):
            raise FileExistsError(f"{out} already holds a run (log.jsonl); pass --resume to continue it or "
                                  f"--overwrite to start again")
        if cfg.overwrite and not cfg.resume:
            for p in (log_path, state_path, os.path.join(out, "result.json")):
                if os.path.exists(p):
                    os.remove(p)

    torch.manual_seed(cfg.seed)  # runs are reproducible; _load_source reseeds for the model itself
    np.random.seed(cfg.seed)
    dataset = load_dataset(cfg.data, cfg.image_root, cfg.max_words)
    bad_items: list[str] = []
    if cfg.skip_bad_images:
        dataset, bad_items = _skip_bad_images(dataset)
    model = _load_source(cfg.model, cfg.seed, cfg.device)
    weights = _weights_digest(model)  # before any adaptation: which source weights this run started from
    modality, n_queries, relevance = dataset.query_items(cfg.direction)
    gallery_modality = "text" if modality == "image" else "image"
    gallery = encode_gallery(model, dataset, gallery_modality, cfg, weights).to(cfg.device)

    method = methods.get(cfg.method)(model, gallery, modality, cfg.adapt_config())
    shift = shifts.build(cfg.shift, modality, cfg.seed)
    order = query_order(n_queries, cfg.seed, cfg.shuffle, cfg.max_queries)
    batches = stream_batches(len(order), cfg.batch_size)

    done, rows = 0, []
    if out and cfg.resume and os.path.exists(state_path):
        state = torch.load(state_path, map_location=cfg.device, weights_only=False)
        _check_resumable(state["config"], cfg)
        if state.get("model_weights", weights) != weights:
            raise ValueError(f"cannot resume {out}: the weights of {cfg.model} changed since the run started")
        method.load_state_dict(state["method"])
        done = state["batches_done"]
        rows = _read_log(log_path, done)
        if len(rows) != done:
            raise RuntimeError(f"{log_path} holds {len(rows)} complete batches but the checkpoint says {done}")
        with open(log_path, "w", encoding="utf-8") as f:  # drop lines written after the last checkpoint
            f.writelines(json.dumps(r) + "\n" for r in rows)
    elif out and os.path.exists(log_path):
        os.remove(log_path)  # --resume without a checkpoint: nothing to continue from, start clean

    items = QueryItems(dataset, modality, order, shift, cfg.seed, model, cfg.max_words)
    log_file = open(log_path, "a", encoding="utf-8") if out else None
    progress = tqdm(total=len(batches), initial=done, desc=f"{cfg.method} {cfg.direction} {shift.name}",
                    disable=not cfg.progress)
    try:
        for b, (positions, indices, batch) in enumerate(_loader(items, batches[done:], cfg.num_workers), start=done):
            t0 = time.time()
            scores, info = method.step(_to_model_input(model, modality, batch, cfg.device))
            ranks, aps = batch_ranks(scores, [relevance[i] for i in indices])
            row = {"batch": b, "n": len(indices), "seconds": round(time.time() - t0, 4),
                   **{k: _json_safe(v) for k, v in info.items()},
                   "queries": indices, "ranks": ranks, "aps": aps,
                   "segments": [shift.segment(p, len(order)) for p in positions]}
            rows.append(row)
            if log_file:
                log_file.write(json.dumps(row) + "\n")
                log_file.flush()
                os.fsync(log_file.fileno())
                _atomic_save({"config": dataclasses.asdict(cfg), "method": method.state_dict(),
                              "model_weights": weights, "batches_done": b + 1}, state_path)
            progress.update(1)
            if b % 10 == 0 or b == len(batches) - 1:
                progress.set_postfix(r1=f"{100 * np.mean([r < 1 for x in rows for r in x['ranks']]):.1f}")
    finally:
        progress.close()
        if log_file:
            log_file.close()

    result = _summarise(cfg, rows, dataset, shift, bad_items, model)
    result["model_weights"] = weights
    if cfg.eval_clean_after:
        result["forgetting"] = clean_forgetting(method, dataset, modality, relevance, cfg)
    result["seconds"] = round(time.time() - t_start, 2)
    if out:
        write_json(os.path.join(out, "result.json"), result)
        with open(os.path.join(out, "table.md"), "w", encoding="utf-8") as f:
            f.write(format_table([result]) + "\n")
    return result


def _check_resumable(saved: dict, cfg: RunConfig) -> None:
    current = dataclasses.asdict(cfg)
    diff = [k for k in current if k not in _RESUME_FREE and saved.get(k) != current[k]]
    if diff:
        raise ValueError("cannot resume: the run's settings changed: " +
                         ", ".join(f"{k} {saved.get(k)!r} -> {current[k]!r}" for k in diff))


def _summarise(cfg, rows, dataset, shift, bad_items, model) -> dict[str, Any]:
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
def clean_forgetting(method, dataset, modality, relevance, cfg: RunConfig) -> dict[str, float]:
    """R@1 on clean queries with the adapted parameters minus R@1 with the source parameters."""
    order = query_order(len(relevance), cfg.seed, cfg.shuffle, cfg.max_queries)
    items = QueryItems(dataset, modality, order, shifts.QueryShift(), cfg.seed, method.model, cfg.max_words)
    batches = stream_batches(len(order), cfg.batch_size)
    after, source = [], []
    for _, indices, batch in tqdm(_loader(items, batches, cfg.num_workers), total=len(batches),
                                  desc="clean queries after adaptation", disable=not cfg.progress, leave=False):
        x = _to_model_input(method.model, modality, batch, cfg.device)
        rel = [relevance[i] for i in indices]
        after += batch_ranks(method.encode(x) @ method.gallery.T, rel)[0]
        source += batch_ranks(method.encode_with_source(x) @ method.gallery.T, rel)[0]
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
