"""What flows into a run: the query order, shifted query items, batches and the model input."""

from __future__ import annotations

import os

import torch
from tqdm.auto import tqdm

from .. import shifts
from ..data import DataError, RetrievalDataset, pre_caption
from ..models import DualEncoder


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
        if self.modality == "composed":  # (reference image, modification text); the shift may touch both
            image, text = self.shift((self.dataset.load_reference(index), self.dataset.texts[index]),
                                     index, position, len(self.order), rng)
            text = pre_caption(text, self.max_words)
            if not text:
                raise DataError(f"composed query {index}: the modification text is empty after the shift "
                                f"{self.shift.name!r}")
            return position, index, (self.model.preprocess(image), text)
        if self.modality == "image":
            image = self.shift(self.dataset.load_image(index), index, position, len(self.order), rng)
            return position, index, self.model.preprocess(image)
        text = self.shift(self.dataset.texts[index], index, position, len(self.order), rng)
        text = pre_caption(text, self.max_words)
        if not text:
            raise DataError(f"text query {index} is empty after the shift {self.shift.name!r}")
        return position, index, text


def collate(batch):
    positions, indices, items = zip(*batch)
    if isinstance(items[0], torch.Tensor):
        items = torch.stack(items)
    elif isinstance(items[0], tuple):  # composed: (preprocessed reference image, text)
        items = {"image": torch.stack([i for i, _ in items]), "text": [t for _, t in items]}
    else:
        items = list(items)
    return list(positions), list(indices), items


def to_model_input(model: DualEncoder, modality: str, items, device: str):
    """A collated batch of preprocessed images, raw texts or composed items -> the query encoder's input."""
    if modality == "image":
        return items.to(device)
    if modality == "composed":
        return model.composed_input(items["image"], items["text"], device)
    tokens = model.tokenize(items)
    if isinstance(tokens, dict):
        return {k: v.to(device) for k, v in tokens.items()}
    return tokens.to(device)


def auto_workers(items: torch.utils.data.Dataset, n_batches: int) -> int:
    """Loader workers when the user did not choose: image decoding and corruption in ``min(4, cores - 1)``
    worker processes, prefetching ahead of the model, where ``fork`` exists; text items (strings) and short
    streams (< 8 batches, where starting workers costs more than it saves) load in the main process."""
    if getattr(items, "modality", "image") != "image" or n_batches < 8:
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


def _collate_or_failure(batch):
    failed = [item for item in batch if isinstance(item, _ItemFailed)]
    return failed[0] if failed else collate(batch)


def _raise_failures(batches):
    for batch in batches:
        if isinstance(batch, _ItemFailed):
            raise DataError(batch.message)
        yield batch


def loader(items: torch.utils.data.Dataset, batches: list[list[int]], num_workers: int | None):
    """Batches of collated items; ``num_workers`` None chooses (:func:`auto_workers`)."""
    if num_workers is None:
        num_workers = auto_workers(items, len(batches))
    if num_workers == 0:
        return torch.utils.data.DataLoader(items, batch_sampler=batches, collate_fn=collate, num_workers=0)
    extra = {"prefetch_factor": 4, "persistent_workers": False}
    if "fork" in torch.multiprocessing.get_all_start_methods():
        # fork, not the process's default: inside bench's spawned job processes the default is spawn, which
        # must pickle the items (model, shift, dataset) and fails for some of them
        extra["multiprocessing_context"] = "fork"
    return _raise_failures(torch.utils.data.DataLoader(_CarryErrors(items), batch_sampler=batches,
                                                       collate_fn=_collate_or_failure, num_workers=num_workers,
                                                       **extra))


def stream_batches(n: int, batch_size: int) -> list[list[int]]:
    """Consecutive stream positions 0..n-1 in batches; the last batch may be smaller (drop_last false)."""
    return [list(range(i, min(i + batch_size, n))) for i in range(0, n, batch_size)]


def query_order(n: int, seed: int, shuffle: bool = True, max_queries: int | None = None) -> list[int]:
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist() if shuffle else list(range(n))
    return order[:max_queries] if max_queries else order


def skip_bad_images(dataset: RetrievalDataset, progress: bool = True) -> tuple[RetrievalDataset, list[str]]:
    """The dataset without its unreadable images, and one message per dropped image."""
    good, bad = [], []
    for i in tqdm(range(len(dataset.images)), desc="checking images", leave=False, disable=not progress):
        try:
            dataset.load_image(i)
            good.append(i)
        except DataError as err:
            bad.append(str(err))
    return (dataset.subset(good) if bad else dataset), bad
