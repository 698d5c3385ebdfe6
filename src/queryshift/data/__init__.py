"""Retrieval datasets and loaders."""

from __future__ import annotations

import importlib

from .composed import ComposedDataset
from .loaders import load_dataset, load_karpathy, load_pairs
from .retrieval import DataError, RetrievalDataset, duplicate_entries, from_groups, pre_caption


def _lazy(module: str, func: str):
    def build(arg, image_root=None):
        return getattr(importlib.import_module(module, __package__), func)(arg, image_root=image_root)

    return build


# ``--data NAME[:ARG]`` -> builder(arg, image_root=...). One line per named dataset.
DATASETS = {
    "shapes": _lazy(".shapes", "load_shapes"),
    "shapes-5k": _lazy(".shapes", "load_shapes_5k"),
    "shapes-av": _lazy(".shapes_av", "load_shapes_av"),  # ARG = [train|val|test][:N] clips
    # composed image retrieval (--direction c2i): the synthetic world, CIRR and FashionIQ
    "shapes-cir": _lazy(".shapes_cir", "load_shapes_cir"),
    "cirr": _lazy(".cirr", "load_cirr"),  # ARG = <root>[:train|:val]
    "fashioniq": _lazy(".fashioniq", "load_fashioniq"),  # ARG = <root>:<dress|shirt|toptee>[:split]
    # query-gallery shift: ARG = annotation file or dataset root
    "nocaps_in": _lazy(".qgs", "load_nocaps_in"),
    "nocaps_near": _lazy(".qgs", "load_nocaps_near"),
    "nocaps_out": _lazy(".qgs", "load_nocaps_out"),
    "nocaps_entire": _lazy(".qgs", "load_nocaps_entire"),
    "fashion_gen": _lazy(".qgs", "load_fashion_gen"),
    "fashion_gen_detail": _lazy(".qgs", "load_fashion_gen_detail"),
    "cuhk_pedes": _lazy(".qgs", "load_cuhk_pedes"),
    "icfg_pedes": _lazy(".qgs", "load_icfg_pedes"),
    # audio-visual and audio-text files (data/av_files.py): ARG = index file; media relative to --image-root
    "av-files": _lazy(".av_files", "load_av_files"),  # JSON/JSONL/CSV rows video,audio[,group][,caption]
    "vggsound": _lazy(".av_files", "load_read_index"),  # CAV-MAE / READ index: {"data": [{video_id, wav, ...}]}
    "audioset": _lazy(".av_files", "load_read_index"),
    "audiocaps": _lazy(".av_files", "load_audiocaps"),
    "clotho": _lazy(".av_files", "load_clotho"),
}

__all__ = ["ComposedDataset", "DataError", "RetrievalDataset", "duplicate_entries", "from_groups", "pre_caption",
           "load_dataset", "load_karpathy", "load_pairs", "DATASETS"]
