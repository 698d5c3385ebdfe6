"""What stays fixed during a run: the source model's weights digest and the encoded gallery (cached), and the
side a ``--shift`` corrupts: the queries, or (a shift of the gallery's modality only) the gallery items."""

from __future__ import annotations

import hashlib
import json
import os

import numpy as np
import torch
from tqdm.auto import tqdm

from .. import shifts
from ..data import DataError, RetrievalDataset
from ..modalities import COMPOSED, direction
from ..models import DualEncoder, load_model
from ..models.digest import weights_digest
from ..shifts.registry import ALIASES, WrongModality, list_shifts
from .composed import build_query_shift
from .store import EmbeddingStore
from .stream import QueryItems, loader, stream_batches, to_model_input

QUERY, GALLERY = "query", "gallery"  # the side a run's shift corrupts (result.json ``shift_side``)


def resolve_shift(spec: str | None, query_modality: str, gallery_modality: str, seed: int = 0
                  ) -> tuple[shifts.QueryShift, str | None]:
    """The shift ``--shift spec`` names and the side it corrupts: ``"query"``, ``"gallery"``, or None (clean).

    A shift of the query modality shifts the queries, exactly as always (errors included). A shift of the
    gallery's modality only (``traffic:5`` in v2a: an audio shift, and the gallery is the audio; ``style:outline``
    in t2i) corrupts every gallery item instead (a gallery-side shift); the queries stay clean and the method
    adapts the query tower as always. Composed queries (c2i) and streams stay query-side. A shift of another
    modality than either is a ValueError naming the valid shifts of both.
    """
    if query_modality == COMPOSED or not _gallery_only(spec, query_modality, gallery_modality):
        try:
            shift = build_query_shift(spec, query_modality, seed)
        except WrongModality as wrong:  # the other side's shift (a stream of them), or a third modality's
            raise _neither_side(spec, wrong, query_modality, gallery_modality, seed) from None
        return shift, (QUERY if shift.name != "clean" else None)
    return shifts.build(spec, gallery_modality, seed), GALLERY  # its severity or option errors are its own


def _names(spec: str | None) -> set[str]:
    """The catalogue names ``spec`` may be listed under (``traffic:5`` -> traffic; ``style:outline`` as is)."""
    base = (spec or "").strip().removesuffix("+filter").strip()
    name = base.partition(":")[0]
    return {base, name, ALIASES.get(name, name)}


def _gallery_only(spec: str | None, query_modality: str, gallery_modality: str) -> bool:
    if (spec or "").strip() in ("", "none", "clean"):
        return False
    names = _names(spec)
    return bool(names & set(list_shifts(gallery_modality))) and not names & set(list_shifts(query_modality))


def _neither_side(spec: str, wrong: WrongModality, query_modality: str, gallery_modality: str, seed: int
                  ) -> ValueError:
    run_direction = direction(query_modality, gallery_modality)
    gallery_shifts = [s for s in list_shifts(gallery_modality) if not s.startswith("stream:")]
    if spec.strip().startswith("stream:"):
        try:
            shifts.build(spec, gallery_modality, seed)
        except ValueError:
            pass
        else:  # a stream orders shifts over the query stream: it has no meaning for a gallery encoded once
            return ValueError(f"shift {spec!r} streams {gallery_modality} shifts, but the queries of "
                              f"{run_direction} are {query_modality} and streams shift the queries only; to shift "
                              f"the {gallery_modality} gallery give one shift, e.g. "
                              f"{_example(spec, gallery_shifts[0])}, or stream {query_modality} shifts")
    return ValueError(f"{wrong}; nor does it shift the {gallery_modality} gallery of {run_direction} (a shift of "
                      f"the gallery's modality only corrupts the gallery items): valid {gallery_modality} gallery "
                      f"shifts: " + ", ".join(gallery_shifts))


def _example(spec: str, fallback: str) -> str:
    """A member of a stream spec (``stream:temporal=clean,traffic:5`` -> ``traffic:5``), for messages."""
    members = [m.strip() for m in spec.partition("=")[2].split(",") if m.strip() not in ("", "clean", "none")]
    return members[0] if members else f"{fallback}:5"


def shift_note(shift: shifts.QueryShift, query_modality: str, gallery_modality: str) -> str:
    """The line a gallery-shifted run prints, so that no one reads its numbers as a query shift's."""
    return (f"shift {shift.name!r} corrupts {gallery_modality}, the gallery of "
            f"{direction(query_modality, gallery_modality)}: the {gallery_modality} gallery is shifted (each item "
            f"with its own seeded draw) and the {query_modality} queries are clean; the method adapts the "
            f"{query_modality} tower")


class GalleryItems(QueryItems):
    """Gallery items of one modality under a gallery-side shift, each corrupted with a generator private to
    (seed, item) (the salt keeps it apart from a query's draw of the same index) at the stream position of its
    index, so that an item is the same whatever chunk of the gallery it is encoded in."""

    def __getitem__(self, position: int):
        index = self.order[position]
        total = self.dataset.count(self.modality)
        item = self.shift(self.dataset.load(self.modality, index), index, index, total,
                          shifts.item_rng(self.seed, index, "gallery"))
        settled = self.kind.settle(item, self.max_words)
        if settled is None:
            raise DataError(f"{self.modality} gallery item {index} is empty after the gallery shift "
                            f"{self.shift.name!r}")
        return position, index, self.kind.prepare(self.model, settled)


def _shift_id(shift: shifts.QueryShift) -> str:
    """What tells one gallery shift from another in the cache key (the redraw filter changes the items)."""
    return shift.name + ("+filter" if getattr(shift, "filter", None) is not None else "")


def load_source(spec: str, seed: int, device: str = "cpu") -> DualEncoder:
    torch.manual_seed(seed)  # random-init models (``/random``) must be identical across resumes and reruns
    return load_model(spec, device)


def source_weights(spec: str, seed: int, device: str = "cpu") -> str:
    """Digest of the source weights a run of ``spec`` starts from (what a finished run records)."""
    return weights_digest(load_source(spec, seed, device))


@torch.no_grad()
def encode_all(model: DualEncoder, dataset: RetrievalDataset, modality: str, batch_size: int = 256,
               max_words: int = 30, num_workers: int | None = 0, device: str = "cpu", progress: bool = False,
               indices: list[int] | None = None, shift: shifts.QueryShift | None = None, seed: int = 0):
    """Items of ``modality`` of ``dataset`` (all, or ``indices``) through ``model`` in order (no cache): clean,
    or each corrupted by the gallery-side ``shift`` with its own generator drawn from ``seed``
    (:class:`GalleryItems`)."""
    if indices is None:
        indices = list(range(dataset.count(modality)))
    if shift is None or shift.name == "clean":
        items = QueryItems(dataset, modality, indices, shifts.QueryShift(), 0, model, max_words)
    else:
        items = GalleryItems(dataset, modality, indices, shift, seed, model, max_words)
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
                   progress: bool = False, weights: str | None = None, threads: int | None = None,
                   shift: shifts.QueryShift | None = None, seed: int = 0) -> torch.Tensor:
    """The whole gallery encoded once by the source model, from the embedding store (float32 on the CPU).

    The store (under ``cache_dir``, default :func:`default_cache_dir`) is keyed by model + weights +
    preprocessing + data + modality; ``weights`` is the model's weight digest when the caller has already
    computed it. ``batch_size``, ``num_workers``, ``device`` and ``progress`` only say how to encode.
    ``threads``: the intra-op thread count the caller pinned for the encoding (a run's ``RunConfig.threads``),
    part of the key, since the thread count changes the last bits of the embeddings.
    ``shift``: a gallery-side shift (:func:`resolve_shift`) drawn per item from ``seed``; both are part of the
    key, so a clean gallery is never served for a shifted one, nor one shift or seed for another.
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
    shifted = shift is not None and shift.name != "clean"
    if shifted:  # clean galleries keep the keys of stores made before gallery shifts existed
        manifest.update(gallery_shift=_shift_id(shift), gallery_shift_seed=seed)
        key_fields += ["gallery_shift", "gallery_shift_seed"]
    key = hashlib.sha256(json.dumps([manifest[k] for k in key_fields]).encode()).hexdigest()[:24]
    store = EmbeddingStore(os.path.join(cache_dir or default_cache_dir(), "gallery", key))
    n = dataset.count(modality)
    with store.locked():
        if not store.complete(manifest):
            store.fill(manifest, n, lambda rows: encode_all(
                model, dataset, modality, batch_size, max_words, num_workers, device,
                indices=rows, shift=shift if shifted else None, seed=seed), chunk=batch_size * 16, progress=progress)
        gallery = torch.from_numpy(np.asarray(store.open(), dtype=np.float32))
    if not torch.isfinite(gallery).all() or (gallery.norm(dim=1) == 0).any():
        raise FloatingPointError(f"gallery embeddings in {store.path} contain "
                                 f"NaN/inf or all-zero rows")
    return gallery
