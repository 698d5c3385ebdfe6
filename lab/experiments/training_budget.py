"""Experiment (not shipped, issue 10): what the 45-minute training budget buys, and what more training costs.

Two variants of the shipped two-stage recipe (model cards), each measured with the regime of
``lab/experiments/shapes_regime.py`` (1k split, first 1,000 queries; clean shapes-5k with every query) and with
clean R@1 by the number of objects in the scene (the world pins three-object scenes down: the oracle's 5k R@1 on them
is 95.6 i2t / 97.1 t2i, lab/experiments/shapes-oracle.json):

* ``long_custom``: the shipped ``shapes-clip`` customized further on the clean domain, 3,000 steps on all
  20,000 training scenes at lr 5e-4 (about the 24 minutes the budget has left after the shipped stages);
* ``scratch``: the general stage from a random initialisation instead of the retired v1 model (the model
  card's "same command without --init and with --steps 4000"), then the shipped customization: is the
  whole recipe within 45 minutes on 2 cores without v1?

Every step is skipped when its output exists in WORK, so an interrupted run resumes. Results:
lab/experiments/training_budget.json; reading: docs/model-card-shapes-clip.md.

    python lab/experiments/training_budget.py WORK     # ~70 minutes on 2 idle cores
"""
import json
import os
import subprocess
import sys
import time

import numpy as np
import torch

from queryshift.cli import main
from queryshift.data import load_dataset
from queryshift.data.shapes import sample_scene
from queryshift.engine import encode_all
from queryshift.metrics import batch_ranks, recall_at_k
from queryshift.models import load_model

HERE = os.path.dirname(os.path.abspath(__file__))
COMMON = ["--threads", "2", "--workers", "2", "--no-progress"]


def train(work: str) -> dict:
    """Train both variants (unless their checkpoints exist); -> wall-clock minutes of each stage run here."""
    cache = ["--cache-dir", os.path.join(work, "cache")]
    runs = {
        "long_custom": ["train-source", "--stage", "custom", "--init", "src/queryshift/assets/shapes-clip.pt",
                        "--train-images", "20000", "--steps", "3000", "--lr", "5e-4", "--warmup", "100",
                        "--eval-every", "500"],
        "scratch_general": ["train-source", "--stage", "general", "--steps", "4000", "--lr", "5e-4",
                            "--warmup", "50"],
        "scratch_custom": ["train-source", "--stage", "custom", "--init", os.path.join(work, "scratch_general.pt"),
                           "--train-images", "5000", "--steps", "100", "--lr", "2e-4", "--warmup", "10"],
    }
    minutes = {}
    for name, command in runs.items():
        out = os.path.join(work, f"{name}.pt")
        if not os.path.exists(out):
            start = time.time()
            assert main([*command, *COMMON, *cache, "--out", out]) == 0
            minutes[name] = round((time.time() - start) / 60, 1)
    return minutes


def by_object_count(spec: str) -> dict:
    """Clean R@1 (top-1 only) on the 1k and 5k test splits, over all queries and by objects per scene."""
    model = load_model(spec)
    out = {}
    for data, split in (("shapes", "test"), ("shapes-5k", "test5k")):
        dataset = load_dataset(data)
        images, texts = encode_all(model, dataset, "image", 250), encode_all(model, dataset, "text", 250)
        objects = np.array([len(sample_scene(split, i).objects) for i in range(len(images))])
        ranks = {"i2t": np.array(batch_ranks(images @ texts.T, dataset.img2txt)[0]),
                 "t2i": np.array(batch_ranks(texts @ images.T, dataset.txt2img)[0])}
        per_query = {"i2t": objects, "t2i": objects[[group[0] for group in dataset.txt2img]]}
        row = {d: round(recall_at_k(r, 1), 2) for d, r in ranks.items()}
        for n in (1, 2, 3):
            row[f"{n}_objects"] = {d: round(recall_at_k(r[per_query[d] == n], 1), 2) for d, r in ranks.items()}
        out[data] = row
    return out


def regime(work: str, name: str, custom: str, general: str) -> dict:
    path = os.path.join(work, f"regime-{name}.json")
    if not os.path.exists(path):
        subprocess.run([sys.executable, os.path.join(HERE, "shapes_regime.py"), "--custom", custom,
                        "--general", general, "--threads", "2", "--max-queries", "1000", "--out", path], check=True)
    with open(path) as f:
        return json.load(f)


if __name__ == "__main__":
    work = sys.argv[1]
    minutes = train(work)
    torch.set_num_threads(2)
    variants = {
        "shipped": ("shapes-clip", "shapes-clip-general"),
        "long_custom": (f"openclip:qs-shapes@{work}/long_custom.pt", "shapes-clip-general"),
        "scratch": (f"openclip:qs-shapes@{work}/scratch_custom.pt", f"openclip:qs-shapes@{work}/scratch_general.pt"),
    }
    result = {"trained_minutes_this_run": minutes} if minutes else {}
    for name, (custom, general) in variants.items():
        if name == "shipped":  # the committed regime of the shipped models, measured the same way
            with open(os.path.join(HERE, "shapes-regime.json")) as f:
                m = json.load(f)
        else:
            m = regime(work, name, custom, general)
        result[name] = {"models": {"custom": custom.replace(work, "WORK"), "general": general.replace(work, "WORK")},
                        "clean_by_objects": by_object_count(custom),
                        "regime": {k: m[k] for k in ("clean_5k", "custom_styles", "general_styles",
                                                     "image_corruptions", "text_corruptions", "conditions")}}
    path = os.path.join(HERE, "training_budget.json")
    if os.path.exists(path):  # keep the hand-written record of how the committed numbers were trained
        with open(path) as f:
            result = {"run": json.load(f).get("run"), **result}
    with open(path, "w") as f:
        json.dump(result, f, indent=1)
        f.write("\n")
