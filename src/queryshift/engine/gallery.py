"""What stays fixed during a run: the source model's weights digest and the encoded gallery (cached)."""

from __future__ import annotations

import hashlib
import json
import os

import numpy as np
import torch
from tqdm.auto import tqdm

from .. import shifts
from ..data import RetrievalDataset
from ..models import DualEncoder, load_model
from ..models.digest import weights_digest
from .store import EmbeddingStore
from .stream import QueryItems, loader, stream_batches, to_model_input


def load_source(spec: str, seed: int, device: str = "cpu") -> DualEncoder:
    torch.manual_seed(seed)  # random-init models (``/random``) must be identical across resumes and reruns
    return load_model(spec, device)


def source_weights(spec: str, seed: int, device: str = "cpu") -> str:
    """Digest of the source weights a run of ``spec`` starts from (what a finished run records)."""
    return weights_digest(load_source(spec, seed, device))


@torch.no_grad()
def encode_all(model: DualEncoder, dataset: RetrievalDataset, modality: str, batch_size: int = 256,
               max_words: int = 30, num_workers: int | None = 0, device: str = "cpu", progress: bool = False,
               indices: list[int] | None = None):
    """Clean items of ``modality`` of ``dataset`` (all, or ``indices``) through ``model`` in order (no cache, no
    shift)."""
    if indices is None:
        indices = list(range(dataset.count(modality)))
    items = QueryItems(dataset, modality, indices, shifts.QueryShift(), 0, model, max_words)
    batches = stream_batches(len(indices), batch_size)
    chunks = []
    for _, _, batch in tqdm(loader(items, batches, num_workers), total=len(batches),
                            desc=f"encoding {modality}s", disable=not progress, leave=False):
        chunks.append(model.encode(modality, to_model_input(model, modality, batch, device)).float())
    return torch.cat(chunks)


def default_cache_dir() -> str:
    return os.environ.get("QUERYSHIFT_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "queryshift"))


@torch.no_grad()
def encode_gallery(model: DualEncoder, dataset: RetrievalDataset, modality: str, *, cache_dir: str | None = None,
                   batch_size: int = 256, max_words: int = 30, num_workers: int | None = 0, device: str = "cpu",
                   progress: bool = False, weights: str | None = None, threads: int | None = None) -> torch.Tensor:
    """The whole gallery encoded once by the source model, from the embedding store (float32 on the CPU).

    The store (under ``cache_dir``, default :func:`default_cache_dir`) is keyed by model + weights +
    preprocessing + data + modality; ``weights`` is the model's weight digest when the caller has already
    computed it. ``batch_size``, ``num_workers``, ``device`` and ``progress`` only say how to encode.
    ``threads``: the intra-op thread count the caller pinned for the encoding (a run's ``RunConfig.threads``),
    part of the key, since the thread count changes the last bits of the embeddings.
    """
    manifest = {
        "model": model.name, "model_digest": weights or weights_digest(model), "preprocess": model.preprocess_id,
        "dataset": dataset.name, "dataset_digest": dataset.fingerprint(), "modality": modality,
        "max_words": max_words,
    }
    key_fields = ["model", "model_digest", "preprocess", "dataset_digest", "modality", "max_words"]
    if threads is not None:  # None (callers that do not pin threads) keeps the keys of stores made before
        manifest["threads"] = threads
        key_fields.append("threads")
    key = hashlib.sha256(json.dumps([manifest[k] for k in key_fields]).encode()).hexdigest()[:24]
    store = EmbeddingStore(os.path.join(cache_dir or default_cache_dir(), "gallery", key))
    n = dataset.count(modality)
    with store.locked():
        if not store.complete(manifest):
            store.fill(manifest, n, lambda rows: encode_all(
                model, dataset, modality, batch_size, max_words, num_workers, device,
                indices=rows), chunk=batch_size * 16, progress=progress)
        gallery = torch.from_numpy(np.asarray(store.open(), dtype=np.float32))
    if not torch.isfinite(gallery).all() or (gallery.norm(dim=1) == 0).any():
        raise FloatingPointError(f"gallery embeddings in {store.path} contain "
                                 f"NaN/inf or all-zero rows")
    return gallery
