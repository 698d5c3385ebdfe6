"""FashionIQ (Wu et al., CVPR 2021) for composed image retrieval: ``--data fashioniq:<root>:<category>[:split]``.

The release's layout under ``<root>``::

    captions/cap.{dress,shirt,toptee}.{train,val,test}.json       the composed queries
    image_splits/split.{dress,shirt,toptee}.{train,val,test}.json  the image names of the split
    images/<name>.png (or .jpg)

A caption file is a JSON list of ``{"target": name, "candidate": name, "captions": [str, str]}``: the
candidate is the reference image and the two relative captions, both written for the same pair, form one
query joined as "<first> and <second>" (as CLIP4Cir does). The protocol: one category at a time, the gallery
is that category's split images, the reference stays in the gallery, Recall@10 and Recall@50 (reported per
category; the paper's average is over the three). The standard split is ``val`` (the default).
"""

from __future__ import annotations

import os

from ..userfiles import describe, short_repr
from .composed import ComposedDataset
from .qgs import _read_json
from .retrieval import DataError, pre_caption

CATEGORIES = ("dress", "shirt", "toptee")
SPLITS = ("train", "val", "test")
EXTENSIONS = (".png", ".jpg", ".jpeg")


def parse_arg(arg: str | None) -> tuple[str, str, str]:
    """``<root>:dress`` -> (root, "dress", "val"); ``<root>:shirt:train`` -> (root, "shirt", "train")."""
    parts = (arg or "").split(":")
    split = parts.pop() if len(parts) >= 3 and parts[-1] in SPLITS else "val"
    category = parts.pop() if len(parts) >= 2 else None
    if category not in CATEGORIES or not parts or not parts[0]:
        raise ValueError(f"FashionIQ needs its root and a category: --data fashioniq:<root>:<{'|'.join(CATEGORIES)}>"
                         f"[:{'|'.join(SPLITS)}], got {arg!r}")
    return os.path.expanduser(":".join(parts)), category, split


def join_captions(captions: list[str]) -> str:
    """The two relative captions of a pair as one modification text ("is red and has long sleeves")."""
    parts = [c.strip(".?, ") for c in captions if isinstance(c, str) and c.strip(".?, ")]
    return " and ".join(parts)


def _extension(folder: str, names: list[str]) -> str:
    for name in names[:50]:
        for ext in EXTENSIONS:
            if os.path.exists(os.path.join(folder, name + ext)):
                return ext
    return EXTENSIONS[0]


def load_fashioniq(arg: str | None = None, image_root: str | None = None, max_words: int = 30) -> ComposedDataset:
    root, category, split = parse_arg(arg)
    cap_path = os.path.join(root, "captions", f"cap.{category}.{split}.json")
    split_path = os.path.join(root, "image_splits", f"split.{category}.{split}.json")
    names = _read_json(split_path)
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise DataError(f"{split_path}: expected a JSON list of image names")
    index = {n: i for i, n in enumerate(names)}
    entries = _read_json(cap_path)
    if not isinstance(entries, list):
        raise DataError(f"{cap_path}: expected a JSON list of FashionIQ pairs")
    refs, texts, targets = [], [], []
    for k, e in enumerate(entries):
        where = f"{cap_path}: entry {k}"
        if not isinstance(e, dict):
            raise DataError(f"{where}: expected an object")
        for key in ("candidate", "target", "captions"):
            if key not in e:
                raise DataError(f"{where}: missing field {key!r}" + (
                    " (this split's targets are not public)" if key == "target" else ""))
        if not isinstance(e["captions"], list):
            raise DataError(f"{where}: 'captions' must be a list of strings, got {describe(e['captions'])}")
        for k, cap in enumerate(e["captions"]):  # join_captions would drop a number silently
            if not isinstance(cap, str):
                raise DataError(f"{where}: 'captions' item {k} must be a string, got {describe(cap)}")
        for key in ("candidate", "target"):
            if not isinstance(e[key], str):
                raise DataError(f"{where}: '{key}' must be an image name (a string), got {describe(e[key])}")
        ref, target = e["candidate"], e["target"]
        if ref not in index:
            raise DataError(f"{where}: reference (candidate) image {short_repr(ref)} is not in {split_path}")
        if target not in index:
            raise DataError(f"{where}: target image {short_repr(target)} is not in {split_path}")
        text = pre_caption(join_captions(e["captions"]), max_words)
        if not text:
            raise DataError(f"{where}: empty modification text (candidate {short_repr(ref)})")
        refs.append(index[ref])
        texts.append(text)
        targets.append([index[target]])
    if not refs:
        raise DataError(f"{cap_path}: no queries")
    folder = image_root or os.path.join(root, "images")
    ext = _extension(folder, names)
    return ComposedDataset([n + ext for n in names], refs, texts, targets, image_root=folder,
                           name=f"fashioniq-{category}-{split}", source=cap_path)
