"""Small generated fixtures shared by the tests (nothing is downloaded)."""

from __future__ import annotations

import json
import os

import numpy as np
from PIL import Image


def make_karpathy(root, n_images: int = 8, captions: int = 2, size=(40, 48), name: str = "test.json") -> str:
    """Write ``n_images`` random JPEGs and a Karpathy JSON under ``root``; return the JSON path."""
    rng = np.random.default_rng(0)
    os.makedirs(os.path.join(root, "img"), exist_ok=True)
    entries = []
    colours = ["red", "green", "blue", "yellow", "black", "white", "pink", "grey", "brown", "cyan"]
    for i in range(n_images):
        Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)).save(os.path.join(root, "img", f"{i}.jpg"))
        caps = [f"A {colours[i % 10]} photo, number {i}!", f"picture {i} of {colours[(i + 3) % 10]} noise",
                f"the {i}th image"][:captions]
        entries.append({"image": f"img/{i}.jpg", "caption": caps})
    path = os.path.join(root, name)
    with open(path, "w") as f:
        json.dump(entries, f)
    return path


TINY_MODEL = "openclip:qs-tiny/random"


def tiny_run_config(data_and_root, tmp_path, **kw):
    """A RunConfig for the tiny random model on a generated dataset ``(json_path, image_root)``."""
    from queryshift.engine import RunConfig

    data, root = data_and_root
    base = dict(model=TINY_MODEL, data=data, image_root=root, cache_dir=str(tmp_path / "cache"), progress=False)
    return RunConfig(**{**base, **kw})
