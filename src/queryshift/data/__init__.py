"""Retrieval datasets and loaders."""

from __future__ import annotations

import importlib

from .loaders import load_dataset, load_karpathy, load_pairs
from .retrieval import DataError, RetrievalDataset, from_groups, pre_caption


def _lazy(module: str, func: str):
    def build(arg, image_root=None):
        return getattr(importlib.import_module(module, __package__), func)(arg, image_root=image_root)

    return build


# ``--data NAME[:ARG]`` -> builder(arg, image_root=...). One line per named dataset.
DATASETS = {
    "shapes": _lazy(".shapes", "load_shapes"),
}

__all__ = ["DataError", "RetrievalDataset", "from_groups", "pre_caption", "load_dataset", "load_karpathy",
           "load_pairs", "DATASETS"]
