"""Peak memory of the online engine vs the full query x gallery score matrix, measured side by side.

25,000 text queries against a 5,000-image gallery (COCO's t2i shape) with the tiny random open_clip
architecture, so that the score bookkeeping, not the model, dominates. The engine keeps only a
batch x gallery score block alive; the naive baseline materialises all queries x gallery scores before
ranking, as a one-shot evaluation would. Peak RSS above the pre-stream level is sampled every 2 ms.

    python benchmarks/engine_memory.py [--queries 25000] [--gallery 5000] [--batch-size 64]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import threading
import time

import numpy as np
import torch
from PIL import Image

from queryshift import data, engine
from queryshift.metrics import batch_ranks, retrieval_metrics


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakRSS:
    """Samples resident memory in a thread; ``peak - start`` is the extra memory of the measured block."""

    def __enter__(self):
        self.start = self.peak = rss_bytes()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_bytes())
            time.sleep(0.002)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_bytes())

    @property
    def extra_mb(self) -> float:
        return (self.peak - self.start) / 2**20


def synthetic(n_images: int, captions_per_image: int) -> data.RetrievalDataset:
    colours = ["red", "green", "blue", "black", "white", "pink", "grey", "brown"]
    caps = [[f"{colours[(i + k) % 8]} thing number {i} variant {k}" for k in range(captions_per_image)]
            for i in range(n_images)]
    palette = np.random.default_rng(0).integers(0, 255, (n_images, 3), dtype=np.uint8)
    return data.from_groups([f"synthetic/{i}.png" for i in range(n_images)], caps, name=f"synthetic-{n_images}",
                            image_loader=lambda i: Image.new("RGB", (32, 32), tuple(int(c) for c in palette[i])))


def naive_full_matrix(cfg: engine.RunConfig, dataset: data.RetrievalDataset) -> float:
    """Encode every query, score the whole matrix at once, then rank: memory grows with queries x gallery."""
    from queryshift.models import load_model

    torch.manual_seed(cfg.seed)
    model = load_model(cfg.model)
    gallery = engine.encode_gallery(model, dataset, "image", cache_dir=cfg.cache_dir, max_words=cfg.max_words)
    queries = engine.encode_all(model, dataset, "text", batch_size=512)
    scores = queries @ gallery.T
    ranks, aps = batch_ranks(scores, dataset.txt2img)
    return retrieval_metrics(ranks, aps)["r1"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--queries", type=int, default=25000)
    p.add_argument("--gallery", type=int, default=5000)
    p.add_argument("--batch-size", type=int, default=64)
    args = p.parse_args()
    dataset = synthetic(args.gallery, args.queries // args.gallery)
    data.DATASETS["memory-bench"] = lambda arg, image_root=None: dataset
    with tempfile.TemporaryDirectory() as cache:
        cfg = engine.RunConfig(model="openclip:qs-tiny/random", data="memory-bench", direction="t2i",
                               method="source", batch_size=args.batch_size, cache_dir=cache, progress=False)
        engine.run(cfg)  # warm-up: builds the gallery cache, loads libraries, so both sides start equal
        with PeakRSS() as online:
            r1_engine = engine.run(cfg)["r1"]
        with PeakRSS() as naive:
            r1_naive = naive_full_matrix(cfg, dataset)
    q, n, b = len(dataset.texts), args.gallery, args.batch_size
    print(f"{q} queries x {n} gallery items, batch {b}")
    print(f"  bound batch x gallery (float32 scores): {b * n * 4 / 2**20:8.1f} MB")
    print(f"  queries x gallery (float32 scores):     {q * n * 4 / 2**20:8.1f} MB")
    print(f"  engine peak extra RSS:                  {online.extra_mb:8.1f} MB")
    print(f"  full-matrix peak extra RSS:             {naive.extra_mb:8.1f} MB")
    print(f"  ratio full-matrix / engine:             {naive.extra_mb / max(online.extra_mb, 1e-6):8.1f} x")
    print(f"  same R@1 both ways: {r1_engine:.2f} vs {r1_naive:.2f}")


if __name__ == "__main__":
    main()
