"""Experiment (not shipped, issue 10): does a general stage with a smooth, uneven veil buy robustness to fog?

The veil is the fog corruption's own operation at strengths below its severity 1 (1.5): a plasma map of
strength a ~ U(0.1, 0.6), decay ~ U(1.4, 2.0), with the range compressed by peak / (peak + a), on 30 % of the
general views that get photo variation. Everything else is the shipped two-stage recipe (model cards), with
2 torch threads and 2 render workers. Then the source model's R@1 (1k split, first 1,000 queries) under the
regime's shifts. Results: lab/experiments/general_veil.json; reading: docs/model-card-shapes-clip.md.

    git show c035f82:src/queryshift/assets/shapes-clip.pt > WORK/shapes-clip-v1.pt
    python lab/experiments/general_veil.py WORK        # ~25 minutes on 2 idle cores
"""
import json
import os
import sys

import numpy as np
import torch
from PIL import Image

from queryshift.cli import main
from queryshift.data import load_dataset
from queryshift.models import openclip
from queryshift.shifts import shapes_general as sg
from queryshift.shifts.image import plasma_fractal
from queryshift.shifts.shapes_regime import CAPTION_STYLES, IMAGE_STYLES, IMAGE_TEST_SHIFTS, SourceRecall

_shipped_variation = sg.photo_variation


def photo_variation_with_veil(image, rng):
    out = _shipped_variation(image, rng)
    if rng.random() < 0.3:
        a = rng.uniform(0.1, 0.6)
        x = np.asarray(out, dtype=np.float32) / 255
        h, w = x.shape[:2]
        size = 1 << max(1, (max(h, w) - 1).bit_length())
        peak = x.max()
        x = (x + a * plasma_fractal(size, rng.uniform(1.4, 2.0), rng)[:h, :w, None]) * peak / (peak + a)
        out = Image.fromarray((np.clip(x, 0, 1) * 255).round().astype(np.uint8))
    return out


def train(work: str) -> None:
    sg.photo_variation = photo_variation_with_veil  # render workers are forked, so they see it too
    common = ["--threads", "2", "--workers", "2", "--cache-dir", os.path.join(work, "cache")]
    assert main(["train-source", "--stage", "general", "--init", os.path.join(work, "shapes-clip-v1.pt"),
                 "--steps", "1200", "--lr", "5e-4", "--warmup", "50", *common,
                 "--out", os.path.join(work, "general.pt")]) == 0
    assert main(["train-source", "--stage", "custom", "--init", os.path.join(work, "general.pt"),
                 "--train-images", "5000", "--steps", "100", "--lr", "2e-4", "--warmup", "10", *common,
                 "--out", os.path.join(work, "custom.pt")]) == 0


def evaluate(work: str) -> dict:
    torch.set_num_threads(2)
    dataset = load_dataset("shapes")
    out = {}
    for name in ("custom", "general"):
        rec = SourceRecall(openclip.load(f"qs-shapes@{os.path.join(work, name + '.pt')}", "cpu"), dataset,
                           max_queries=1000)
        r = {"clean_i2t": rec.r1("i2t"), "clean_t2i": rec.r1("t2i")}
        shifts = list(IMAGE_STYLES) + list(CAPTION_STYLES)
        if name == "custom":
            shifts += list(IMAGE_TEST_SHIFTS) + ["fog:1", "contrast:1", "frost:1", "fog:3", "contrast:3", "frost:3"]
        for shift in shifts:
            r[shift] = rec.r1("t2i" if shift in CAPTION_STYLES else "i2t", shift)
        out[name] = r
    return out


if __name__ == "__main__":
    work = sys.argv[1]
    train(work)
    result = evaluate(work)
    with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "general_veil.json"), "w") as f:
        json.dump(result, f, indent=1)
