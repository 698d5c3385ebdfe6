"""``queryshift train-combiner``: train a gated-fusion combiner on top of a frozen backbone.

This is how the shipped ``shapes-cir`` combiner was made (``--model shapes-clip --data shapes-cir:train``, the
defaults): the backbone stays frozen, so its embeddings of every gallery image and modification text are
computed once (and cached on disk by model weights and data), and training only touches the small combiner.
The loss is a multi-positive contrastive loss over the *whole* training gallery: each composed query should
score its target images (every image that satisfies it) above every other image, its reference excluded as in
the evaluation. AdamW, cosine decay; everything follows from ``--seed``. Retraining after the backbone
changes is the same single command.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time

import torch

from ..models.composed import SHIPPED_COMBINERS

DEFAULT_OUT = SHIPPED_COMBINERS["shapes-cir"][1]


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "train-combiner", help="train a composed-query combiner on a frozen backbone (the shipped shapes-cir one)",
        description="Train a CLIP4Cir-style gated-fusion combiner of reference-image and modification-text "
                    "embeddings on a frozen backbone and a composed dataset; writes an fp16 file for "
                    "'--composer combiner:<file>' plus <out>.json with the recipe and validation recall.")
    p.add_argument("--model", default="shapes-clip", help="frozen backbone (default shapes-clip)")
    p.add_argument("--data", default="shapes-cir:train", help="composed training data (default shapes-cir:train)")
    p.add_argument("--val-data", dest="val_data", default="shapes-cir:val",
                   help="composed validation data, reported at the end (default shapes-cir:val)")
    p.add_argument("--image-root", dest="image_root", help="folder the training data's image paths are relative to")
    p.add_argument("--epochs", type=int, default=30, help="passes over the training queries (default 30)")
    p.add_argument("--batch-size", dest="batch_size", type=int, default=256, help="default 256")
    p.add_argument("--lr", type=float, default=2e-3, help="peak learning rate (default 2e-3)")
    p.add_argument("--weight-decay", dest="weight_decay", type=float, default=1e-4, help="default 1e-4")
    p.add_argument("--temperature", type=float, default=0.02, help="softmax temperature of the loss (default 0.02)")
    p.add_argument("--proj-dim", dest="proj_dim", type=int, default=256, help="projection width (default 256)")
    p.add_argument("--hidden-dim", dest="hidden_dim", type=int, default=512, help="hidden width (default 512)")
    p.add_argument("--dropout", type=float, default=0.1, help="default 0.1")
    p.add_argument("--seed", type=int, default=0, help="seed of the initialisation and batch order (default 0)")
    p.add_argument("--out", default=DEFAULT_OUT, help="combiner file (default: the shipped shapes-cir asset)")
    p.add_argument("--cache-dir", dest="cache_dir", help="embedding cache (default ~/.cache/queryshift)")
    p.add_argument("--threads", type=int, help="torch CPU threads")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="hide progress bars")
    p.set_defaults(func=main)


def frozen_embeddings(model, dataset, cache_dir: str | None, progress: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(gallery image embeddings, modification text embeddings) of the frozen backbone, cached on disk."""
    from ..engine import RunConfig, encode_gallery

    cfg = RunConfig(cache_dir=cache_dir, progress=progress)
    return encode_gallery(model, dataset, "image", cfg), encode_gallery(model, dataset, "text", cfg)


def multi_positive_loss(q: torch.Tensor, gallery: torch.Tensor, positives: torch.Tensor, excluded: torch.Tensor,
                        temperature: float) -> torch.Tensor:
    """-log( sum of softmax mass on the positives ), the softmax over the gallery minus the excluded items.

    ``positives`` and ``excluded`` are boolean B x N masks.
    """
    logits = (q @ gallery.T / temperature).masked_fill(excluded, float("-inf"))
    pos = logits.masked_fill(~positives, float("-inf"))
    return (torch.logsumexp(logits, dim=1) - torch.logsumexp(pos, dim=1)).mean()


def _masks(dataset, queries: list[int], n_gallery: int) -> tuple[torch.Tensor, torch.Tensor]:
    positives = torch.zeros(len(queries), n_gallery, dtype=torch.bool)
    excluded = torch.zeros_like(positives)
    for row, q in enumerate(queries):
        positives[row, dataset.targets[q]] = True
        if dataset.exclude is not None:
            excluded[row, dataset.exclude[q]] = True
    return positives, excluded


@torch.no_grad()
def evaluate(composer, images: torch.Tensor, texts: torch.Tensor, dataset) -> dict[str, float]:
    """Clean R@1/5/10/50 of composed queries with the evaluation protocol of ``queryshift run`` (reference
    excluded), from precomputed frozen embeddings."""
    from ..engine.composed import rank_queries
    from ..metrics import recall_at_k

    composer.eval()
    refs = torch.tensor(dataset.references)
    ranks = []
    for start in range(0, len(refs), 500):
        idx = list(range(start, min(start + 500, len(refs))))
        q = composer(images[refs[idx]], texts[idx])
        ranks += rank_queries(q @ images.T, idx, dataset, dataset.targets, "c2i")[0]
    return {f"r{k}": round(recall_at_k(ranks, k), 2) for k in (1, 5, 10, 50)}


def main(args) -> int:
    from ..data import ComposedDataset, load_dataset
    from ..engine import weights_digest
    from ..models import load_model
    from ..models.composed import GatedCombiner, SumComposer, save_combiner

    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.time()
    model = load_model(args.model)
    model = getattr(model, "base", model)  # a composed alias trains a new combiner for its backbone
    base_weights = weights_digest(model)
    train, val = (load_dataset(d, args.image_root) for d in (args.data, args.val_data))
    for name, d in ((args.data, train), (args.val_data, val)):
        if not isinstance(d, ComposedDataset):
            raise ValueError(f"--data/--val-data {name!r} is not a composed dataset "
                             "(shapes-cir, cirr:..., fashioniq:...)")
    images, texts = frozen_embeddings(model, train, args.cache_dir, args.progress)
    val_images, val_texts = frozen_embeddings(model, val, args.cache_dir, args.progress)
    t_embed = time.time() - t0

    torch.manual_seed(args.seed)
    combiner = GatedCombiner(images.shape[1], args.proj_dim, args.hidden_dim, args.dropout)
    opt = torch.optim.AdamW(combiner.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    n = len(train.references)
    steps_per_epoch = math.ceil(n / args.batch_size)
    total = args.epochs * steps_per_epoch
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, total) / total)))
    refs = torch.tensor(train.references)
    gen = torch.Generator().manual_seed(args.seed)
    t1 = time.time()
    for epoch in range(args.epochs):
        combiner.train()
        order = torch.randperm(n, generator=gen).tolist()
        losses = []
        for start in range(0, n, args.batch_size):
            batch = order[start:start + args.batch_size]
            positives, excluded = _masks(train, batch, len(images))
            q = combiner(images[refs[batch]], texts[batch])
            loss = multi_positive_loss(q, images, positives, excluded, args.temperature)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            losses.append(float(loss.detach()))
        if args.progress:
            print(f"epoch {epoch + 1}/{args.epochs}: loss {sum(losses) / len(losses):.4f}", file=sys.stderr)
    t_train = time.time() - t1
    with torch.no_grad():  # measure what ships: the weights rounded to fp16 as save_combiner stores them
        combiner.load_state_dict({k: v.half().float() for k, v in combiner.state_dict().items()})

    val_metrics = evaluate(combiner, val_images, val_texts, val)
    sum_metrics = evaluate(SumComposer(), val_images, val_texts, val)
    meta = {
        "base_model": args.model, "base_weights": base_weights, "data": args.data, "val_data": args.val_data,
        "epochs": args.epochs, "batch_size": args.batch_size, "lr": args.lr, "weight_decay": args.weight_decay,
        "temperature": args.temperature, "seed": args.seed, "threads": torch.get_num_threads(),
        "final_loss": round(sum(losses) / len(losses), 4), "val_clean": val_metrics, "val_clean_sum": sum_metrics,
        "seconds_embeddings": round(t_embed, 1), "seconds_training": round(t_train, 1),
    }
    save_combiner(combiner, args.out, meta)
    with open(os.path.splitext(args.out)[0] + ".json", "w", encoding="utf-8") as f:
        json.dump({**meta, "hparams": combiner.hparams()}, f, indent=2)
    print(f"wrote {args.out}: {args.data} -> {args.val_data} clean R@1/5/10/50 "
          + "/".join(f"{val_metrics[k]:.2f}" for k in ("r1", "r5", "r10", "r50"))
          + " (sum composer: " + "/".join(f"{sum_metrics[k]:.2f}" for k in ("r1", "r5", "r10", "r50")) + ")"
          + f"; embeddings {t_embed:.0f} s, training {t_train:.0f} s")
    return 0
