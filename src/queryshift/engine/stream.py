"""What flows into a run: the query order, shifted query items, batches and the model input."""

from __future__ import annotations

import functools
import os

import torch
from tqdm.auto import tqdm

from .. import modalities, shifts
from ..data import DataError, RetrievalDataset
from ..models import DualEncoder


class QueryItems(torch.utils.data.Dataset):
    """Stream position -> (position, query index, shifted and prepared item) for queries (or gallery items) of
    one modality: ``dataset.load(modality, index)``, the shift, then the modality's ``settle`` and ``prepare``
    (:mod:`queryshift.modalities`)."""

    def __init__(self, dataset: RetrievalDataset, modality: str, order: list[int], shift, seed: int,
                 model: DualEncoder, max_words: int):
        self.dataset, self.modality, self.order = dataset, modality, order
        self.shift, self.seed, self.model, self.max_words = shift, seed, model, max_words
        self.kind = modalities.get(modality)

    def __len__(self) -> int:
        return len(self.order)

    def __getitem__(self, position: int):
        index = self.order[position]
        rng = shifts.item_rng(self.seed, index)
        item = self.shift(self.dataset.load(self.modality, index), index, position, len(self.order), rng)
        settled = self.kind.settle(item, self.max_words)
        if settled is None:
            if self.modality == modalities.COMPOSED:
                raise DataError(f"composed query {index}: the modification text is empty after the shift "
                                f"{self.shift.name!r}")
            raise DataError(f"{self.modality} query {index} is empty after the shift {self.shift.name!r}")
        return position, index, self.kind.prepare(self.model, settled)


def collate(batch, modality: str | None = None):
    """(position, index, prepared item) triples -> (positions, indices, batch), the items collated by their
    modality's ``collate``; without ``modality`` it is told from the items (tensors stack, a tuple is a
    composed query, anything else stays a list)."""
    positions, indices, items = zip(*batch)
    if modality is not None:
        return list(positions), list(indices), modalities.get(modality).collate(list(items))
    if isinstance(items[0], torch.Tensor):
        items = torch.stack(items)
    elif isinstance(items[0], tuple):  # composed: (preprocessed reference image, text)
        items = modalities.get(modalities.COMPOSED).collate(list(items))
    else:
        items = list(items)
    return list(positions), list(indices), items


def to_model_input(model: DualEncoder, modality: str, items, device: str):
    """A collated batch of ``modality`` (image, video or audio tensors, raw texts, composed items) -> the
    tower's input, by the modality's ``model_input`` (texts are tokenised by the model here)."""
    return modalities.get(modality).model_input(model, items, device)


def auto_workers(items: torch.utils.data.Dataset, n_batches: int) -> int:
    """Loader workers when the user did not choose: for modalities whose items pay for them (decoding and
    corrupting images, clips or waveforms), ``min(4, cores - 1)`` worker processes, prefetching ahead of the
    model, where ``fork`` exists; text items (strings) and short streams (< 8 batches, where starting workers
    costs more than it saves) load in the main process."""
    modality = getattr(items, "modality", "image")
    if modality not in modalities.MODALITIES or not modalities.get(modality).workers or n_batches < 8:
        return 0
    if "fork" not in torch.multiprocessing.get_all_start_methods():
        return 0
    return max(0, min(4, (os.cpu_count() or 1) - 1))


class _ItemFailed:
    """A DataError met in a loader worker, carried to the main process as data: torch re-raises a worker's
    exception with the worker's whole traceback folded into its message, which is no one-line error."""

    def __init__(self, message: str):
        self.message = message


class _CarryErrors(torch.utils.data.Dataset):
    def __init__(self, items):
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, position: int):
        try:
            return self.items[position]
        except DataError as err:
            return _ItemFailed(str(err))


class _CollateOrFailure:
    """The modality's collate, or the first failure of the batch (a class, not a closure: picklable)."""

    def __init__(self, modality: str | None):
        self.modality = modality

    def __call__(self, batch):
        failed = [item for item in batch if isinstance(item, _ItemFailed)]
        return failed[0] if failed else collate(batch, self.modality)


def _raise_failures(batches):
    for batch in batches:
        if isinstance(batch, _ItemFailed):
            raise DataError(batch.message)
        yield batch


def loader(items: torch.utils.data.Dataset, batches: list[list[int]], num_workers: int | None):
    """Batches of collated items; ``num_workers`` None chooses (:func:`auto_workers`)."""
    if num_workers is None:
        num_workers = auto_workers(items, len(batches))
    modality = getattr(items, "modality", None)
    if num_workers == 0:
        return torch.utils.data.DataLoader(items, batch_sampler=batches, collate_fn=functools.partial(
            collate, modality=modality), num_workers=0)
    extra = {"prefetch_factor": 4, "persistent_workers": False}
    if "fork" in torch.multiprocessing.get_all_start_methods():
        # fork, not the process's default: inside bench's spawned job processes the default is spawn, which
        # must pickle the items (model, shift, dataset) and fails for some of them
        extra["multiprocessing_context"] = "fork"
    return _raise_failures(torch.utils.data.DataLoader(_CarryErrors(items), batch_sampler=batches,
                                                       collate_fn=_CollateOrFailure(modality), num_workers=num_workers,
                                                       **extra))


def stream_batches(n: int, batch_size: int) -> list[list[int]]:
    """Consecutive stream positions 0..n-1 in batches; the last batch may be smaller (drop_last false)."""
    return [list(range(i, min(i + batch_size, n))) for i in range(0, n, batch_size)]


def query_order(n: int, seed: int, shuffle: bool = True, max_queries: int | None = None) -> list[int]:
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist() if shuffle else list(range(n))
    return order[:max_queries] if max_queries else order


def skip_bad_images(dataset: RetrievalDataset, progress: bool = True) -> tuple[RetrievalDataset, list[str]]:
    """The dataset without its unreadable images, and one message per dropped image."""
    if not hasattr(dataset, "subset"):
        raise DataError(f"--skip-bad-images drops unreadable images of an image-text dataset; {dataset.name} has "
                        f"{', '.join(dataset.modalities)} items")
    good, bad = [], []
    for i in tqdm(range(len(dataset.images)), desc="checking images", leave=False, disable=not progress):
        try:
            dataset.load_image(i)
            good.append(i)
        except DataError as err:
            bad.append(str(err))
    return (dataset.subset(good) if bad else dataset), bad
