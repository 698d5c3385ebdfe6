"""Small CIRR and FashionIQ releases in their exact file formats (names, JSON shapes, folder layout)."""

from __future__ import annotations

import json
import os

import numpy as np
from PIL import Image


def _image(path: str, seed: int) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (30, 40, 3), dtype=np.uint8)).save(path)


def _dump(path: str, obj) -> str:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f)
    return path


def make_cirr(root, split: str = "val") -> str:
    """<root>/cirr/{captions,image_splits}/*.rc2.<split>.json and <root>/dev/*.png: 12 images in two img_sets
    of 6, 4 queries. Returns the root."""
    root = str(root)
    folder = {"val": "dev", "train": "train/0", "test1": "test1"}[split]
    prefix = {"val": "dev", "train": "train", "test1": "test1"}[split]
    names = [f"{prefix}-{100 + s}-{k // 2}-img{k % 2}" for s in range(2) for k in range(6)]
    for j, n in enumerate(names):
        _image(os.path.join(root, folder, f"{n}.png"), j)
    _dump(os.path.join(root, "cirr", "image_splits", f"split.rc2.{split}.json"),
          {n: f"./{folder}/{n}.png" for n in names})
    sets = [names[:6], names[6:]]
    queries = [(0, 0, 3, "make the dog run on the beach"), (1, 0, 5, "Show two of them, fewer trees."),
               (2, 1, 7, "same breed but lying down"), (3, 1, 11, "remove the person and add a ball")]
    entries = []
    for pairid, s, target, caption in queries:
        ref = sets[s][pairid % 2]
        entry = {"pairid": pairid, "reference": ref, "caption": caption,
                 "img_set": {"id": s, "members": sets[s], "reference_rank": pairid % 2,
                             "target_rank": sets[s].index(names[target])}}
        if split != "test1":
            entry["target_hard"] = names[target]
            entry["target_soft"] = {names[target]: 1.0}
        entries.append(entry)
    _dump(os.path.join(root, "cirr", "captions", f"cap.rc2.{split}.json"), entries)
    return root


def make_fashioniq(root, category: str = "dress", split: str = "val", ext: str = ".png") -> str:
    """<root>/{captions,image_splits,images}: 8 images, 5 pairs with two relative captions each."""
    root = str(root)
    names = [f"B00{category[:2].upper()}{k:05d}" for k in range(8)]
    for j, n in enumerate(names):
        _image(os.path.join(root, "images", n + ext), 100 + j)
    _dump(os.path.join(root, "image_splits", f"split.{category}.{split}.json"), names)
    pairs = [(0, 1, ["is shorter", "is red with no sleeves"]), (2, 3, ["has a floral print.", "is longer"]),
             (4, 5, ["is darker?", "has a belt"]), (6, 7, ["is blue", ""]), (1, 0, ["is longer", "is black"])]
    _dump(os.path.join(root, "captions", f"cap.{category}.{split}.json"),
          [{"target": names[t], "candidate": names[c], "captions": caps} for c, t, caps in pairs])
    return root
