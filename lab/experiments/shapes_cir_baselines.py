"""Clean composed-retrieval baselines on shapes-cir for the model card (docs/model-card-shapes-cir.md).

    PYTHONPATH=src python lab/experiments/shapes_cir_baselines.py [--split test] [--cache-dir DIR]

Prints R@1/5/10/50 (the reference excluded from its ranking, as in every c2i run) of: the reference image
alone, the modification text alone, the sum composer, the shipped combiner, and an oracle that queries with a
fresh rendering of the query's first target: the best any composer of shapes-clip's frozen image embeddings can
hope for, since the gallery holds other scenes whose embeddings are as close.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from queryshift.data import load_dataset
from queryshift.data.shapes import render
from queryshift.data.shapes_cir import build_world, parse_arg, realise
from queryshift.engine import encode_gallery
from queryshift.engine.composed import rank_queries
from queryshift.metrics import recall_at_k
from queryshift.models import load_model
from queryshift.models.composed import SumComposer


def recalls(queries: torch.Tensor, gallery: torch.Tensor, data) -> str:
    ranks = rank_queries(queries @ gallery.T, list(range(len(queries))), data, data.targets, "c2i")[0]
    return " | ".join(f"{recall_at_k(ranks, k):.2f}" for k in (1, 5, 10, 50))


@torch.no_grad()
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--split", default="test")
    p.add_argument("--cache-dir", dest="cache_dir")
    args = p.parse_args()
    torch.set_num_threads(1)
    split, n = parse_arg(args.split)
    data = load_dataset(f"shapes-cir:{split}:{n}")
    world = build_world(split, n)
    model = load_model("shapes-cir")
    gallery = encode_gallery(model.base, data, "image", cache_dir=args.cache_dir)
    texts = encode_gallery(model.base, data, "text", cache_dir=args.cache_dir)
    refs = gallery[data.references]
    rng = np.random.default_rng(0)
    fresh = [model.preprocess(render(realise(world.states[t[0]], rng))) for t in world.targets]
    oracle = torch.cat([model.encode_image(torch.stack(fresh[i:i + 250])) for i in range(0, len(fresh), 250)])
    print(f"shapes-cir:{split} ({n} queries, {len(data.images)} gallery images), clean, R@1 | R@5 | R@10 | R@50")
    print("| query | R@1 | R@5 | R@10 | R@50 |\n|---|---|---|---|---|")
    print(f"| reference image alone | {recalls(refs, gallery, data)} |")
    print(f"| modification text alone | {recalls(texts, gallery, data)} |")
    print(f"| sum composer | {recalls(SumComposer()(refs, texts), gallery, data)} |")
    print(f"| shipped combiner | {recalls(model.composer(refs, texts), gallery, data)} |")
    print(f"| oracle: a fresh rendering of the target | {recalls(oracle, gallery, data)} |")


if __name__ == "__main__":
    main()
