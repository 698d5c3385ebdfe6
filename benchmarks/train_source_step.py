"""Step time of ``train-source`` with the compact token table vs the full 49,408-row table, side by side.

Both models start from the same initialisation and train on the same batches of real shapes-world
captions; steps alternate between the two (full, compact, full, ...) so that machine noise hits both
alike. Prints the median milliseconds per step of each and their ratio, and the largest difference in
the text embeddings after the last step (the two optimisations are the same up to weight decay of unused
rows, which the compact table leaves out).

    python benchmarks/train_source_step.py [--steps 30] [--threads 2]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch

from queryshift.commands.train_source import CompactTokenTable, clip_step, make_optimizer, render_split
from queryshift.models import openclip as backend


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=128)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    open_clip = backend._open_clip()
    full = open_clip.create_model("qs-shapes", pretrained=None)
    compact = copy.deepcopy(full)
    encoder = backend.load("qs-shapes/random")
    pixels, captions, _ = render_split("train", args.batch_size * 4)
    tokens = encoder.tokenize(captions)
    table = CompactTokenTable(compact, tokens)
    runs = {"full table": (full, tokens), "compact table": (compact, table.tokens)}
    optimizers = {name: make_optimizer(model, 1e-3, 0.1) for name, (model, _) in runs.items()}
    loss_fn = open_clip.ClipLoss()

    times: dict[str, list[float]] = {name: [] for name in runs}
    generator = torch.Generator().manual_seed(0)
    for step in range(args.steps + 2):  # the first two steps warm up allocators
        idx = torch.randint(len(pixels), (args.batch_size,), generator=generator)
        images = pixels[idx].float() / 255
        for name, (model, model_tokens) in runs.items():
            t0 = time.perf_counter()
            clip_step(model, optimizers[name], loss_fn, images, model_tokens[idx * 5])
            if step >= 2:
                times[name].append(time.perf_counter() - t0)

    table.write_back()
    with torch.no_grad():
        text = tokens[:64]
        difference = (full.encode_text(text) - compact.encode_text(text)).abs().max().item()
    ms = {name: 1000 * statistics.median(t) for name, t in times.items()}
    for name, value in ms.items():
        print(f"{name:14s} {value:7.1f} ms/step (median of {args.steps}, {args.threads} threads)")
    print(f"compact / full step time: {ms['compact table'] / ms['full table']:.2f}")
    print(f"largest text-embedding difference after {args.steps + 2} steps: {difference:.2e}")


if __name__ == "__main__":
    main()
