"""What stays fixed during a run: the source model's weights digest and the encoded gallery (cached)."""

from __future__ import annotations

import hashlib
import json
import os

import torch
from tqdm.auto import tqdm

from .. import shifts
from ..atomic import save_torch
from ..data import RetrievalDataset
from ..locks import cache_write_lock
from ..models import DualEncoder, load_model
from .config import RunConfig
from .stream import QueryItems, loader, stream_batches, to_model_input


def weights_digest(model: DualEncoder) -> str:
    h = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def load_source(spec: str, seed: int, device: str = "cpu") -> DualEncoder:
    torch.manual_seed(seed)  # random-init models (``/random``) must be identical across resumes and reruns
    return load_model(spec, device)


def source_weights(spec: str, seed: int, device: str = "cpu") -> str:
    """Digest of the source weights a run of ``spec`` starts from (what a finished run records)."""
    return weights_digest(load_source(spec, seed, device))


@torch.no_grad()
def encode_all(model: DualEncoder, dataset: RetrievalDataset, modality: str, batch_size: int = 256,
               max_words: int = 30, num_workers: int = 0, device: str = "cpu", progress: bool = False):
    """Every clean image or text of ``dataset`` through ``model`` in dataset order (no cache, no shift)."""
    n = len(dataset.images) if modality == "image" else len(dataset.texts)
    items = QueryItems(dataset, modality, list(range(n)), shifts.QueryShift(), 0, model, max_words)
    batches = stream_batches(n, batch_size)
    chunks = []
    for _, _, batch in tqdm(loader(items, batches, num_workers), total=len(batches),
                            desc=f"encoding {modality}s", disable=not progress, leave=False):
        chunks.append(model.encode(modality, to_model_input(model, modality, batch, device)).float())
    return torch.cat(chunks)


def default_cache_dir() -> str:
    return os.environ.get("QUERYSHIFT_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "queryshift"))


@torch.no_grad()
def encode_gallery(model: DualEncoder, dataset: RetrievalDataset, modality: str, cfg: RunConfig,
                   weights: str | None = None) -> torch.Tensor:
    """Encode the whole gallery once with the source model, cached on disk by model + data + preprocessing.

    ``weights`` is the model's weight digest when the caller has already computed it.
    """
    key = hashlib.sha256(json.dumps([
        model.name, weights or weights_digest(model), model.preprocess_id, dataset.fingerprint(), modality,
        cfg.max_words,
    ]).encode()).hexdigest()[:24]
    cache_dir = cfg.cache_dir or default_cache_dir()
    path = os.path.join(cache_dir, "gallery", f"{key}.pt")
    if os.path.exists(path):
        try:
            return torch.load(path, map_location=cfg.device)
        except Exception:  # a truncated cache file is rebuilt rather than trusted
            os.remove(path)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with cache_write_lock(path):  # one writer per entry: parallel runs of one gallery encode it once
        if os.path.exists(path):  # written by the process this one waited for
            return torch.load(path, map_location=cfg.device)
        gallery = encode_all(model, dataset, modality, cfg.gallery_batch_size, cfg.max_words, cfg.num_workers,
                             cfg.device, cfg.progress)
        if not torch.isfinite(gallery).all() or (gallery.norm(dim=1) == 0).any():
            raise FloatingPointError("gallery embeddings contain NaN/inf or all-zero rows")
        save_torch(gallery.cpu(), path)
    return gallery
