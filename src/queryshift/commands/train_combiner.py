"""``queryshift train-combiner``: train a gated-fusion combiner on top of a frozen backbone.

This is how the shipped ``shapes-cir`` combiner was made (``--model shapes-clip --data shapes-cir:train
--steps 3760``, the defaults): the backbone stays frozen, so its embeddings of every gallery image and
modification text are computed once (and cached on disk by model weights and data), and training only touches
the small combiner.
The loss is a multi-positive contrastive loss: each composed query should score its target images (every
image that satisfies it) above the other images, its reference excluded as in the evaluation. To keep a step
cheap the other images are, per batch, the hard negatives of its queries (the gallery images closest to each
query's target, found once from the frozen embeddings) plus a random sample of the gallery (``--negatives 0``:
the whole gallery). AdamW, cosine decay; everything follows from ``--seed``. Retraining after the backbone
changes is the same single command.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time

import torch

from ..atomic import write_text
from ..models.composed import SHIPPED_COMBINERS

DEFAULT_OUT = SHIPPED_COMBINERS["shapes-cir"][1]
DEFAULT_STEPS = 3760  # the shipped combiner's budget (model card): 8 passes over shapes-cir:train's 120,000 queries
DEFAULT_EVAL_EVERY = 470  # validation is read-only (no random draw): the weights do not depend on it


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "train-combiner", help="train a composed-query combiner on a frozen backbone (the shipped shapes-cir one)",
        description="Train a CLIP4Cir-style gated-fusion combiner of reference-image and modification-text "
                    "embeddings on a frozen backbone and a composed dataset; writes an fp16 file for "
                    "'--composer combiner:<file>' plus <out>.json with the recipe and validation recall.")
    p.add_argument("--model", default="shapes-clip", help="frozen backbone (default shapes-clip)")
    p.add_argument("--data", default="shapes-cir:train",
                   help="composed training data (default shapes-cir:train, its 120,000 queries; the shipped "
                        "combiner's)")
    p.add_argument("--val-data", dest="val_data", default="shapes-cir:val",
                   help="composed validation data, reported at the end (default shapes-cir:val)")
    p.add_argument("--image-root", dest="image_root", help="folder the training data's image paths are relative to")
    p.add_argument("--steps", type=int,
                   help=f"optimisation steps (default {DEFAULT_STEPS}, the shipped combiner's; a budget that does "
                        "not grow with the training set)")
    p.add_argument("--epochs", type=int,
                   help="passes over the training queries instead of --steps")
    p.add_argument("--eval-every", dest="eval_every", type=int, default=DEFAULT_EVAL_EVERY,
                   help="also measure validation R@1/5/10/50 every N steps (the 'val_curve' of <out>.json; "
                        f"default {DEFAULT_EVAL_EVERY}; 0: only at the end)")
    p.add_argument("--batch-size", dest="batch_size", type=int, default=256, help="default 256")
    p.add_argument("--lr", type=float, default=2e-3, help="peak learning rate (default 2e-3)")
    p.add_argument("--weight-decay", dest="weight_decay", type=float, default=1e-4, help="default 1e-4")
    p.add_argument("--temperature", type=float, default=0.02, help="softmax temperature of the loss (default 0.02)")
    p.add_argument("--negatives", type=int, default=2048,
                   help="random gallery images per batch besides the positives and hard negatives; 0 = the whole "
                        "gallery (default 2048)")
    p.add_argument("--hard-negatives", dest="hard_negatives", type=int, default=16,
                   help="per query, the gallery images closest to its target (default 16)")
    p.add_argument("--proj-dim", dest="proj_dim", type=int, default=256, help="projection width (default 256)")
    p.add_argument("--hidden-dim", dest="hidden_dim", type=int, default=512, help="hidden width (default 512)")
    p.add_argument("--dropout", type=float, default=0.1, help="default 0.1")
    p.add_argument("--seed", type=int, default=0, help="seed of the initialisation and batch order (default 0)")
    p.add_argument("--out", default=DEFAULT_OUT, help="combiner file (default: the shipped shapes-cir asset)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing combiner at --out (and its .json); without it one is refused")
    p.add_argument("--cache-dir", dest="cache_dir", help="embedding cache (default ~/.cache/queryshift)")
    p.add_argument("--threads", type=int, help="torch CPU threads")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="hide progress bars")
    p.set_defaults(func=main)


def frozen_embeddings(model, dataset, cache_dir: str | None, progress: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(gallery image embeddings, modification text embeddings) of the frozen backbone, cached on disk."""
    from ..engine import encode_gallery

    return (encode_gallery(model, dataset, "image", cache_dir=cache_dir, progress=progress),
            encode_gallery(model, dataset, "text", cache_dir=cache_dir, progress=progress))


def multi_positive_loss(q: torch.Tensor, gallery: torch.Tensor, positives: torch.Tensor, excluded: torch.Tensor,
                        temperature: float) -> torch.Tensor:
    """-log( sum of softmax mass on the positives ), the softmax over the gallery minus the excluded items.

    ``positives`` and ``excluded`` are boolean B x N masks.
    """
    logits = (q @ gallery.T / temperature).masked_fill(excluded, float("-inf"))
    pos = logits.masked_fill(~positives, float("-inf"))
    return (torch.logsumexp(logits, dim=1) - torch.logsumexp(pos, dim=1)).mean()


@torch.no_grad()
def hard_negatives(dataset, images: torch.Tensor, k: int, chunk: int | None = None) -> torch.Tensor:
    """Q x k: for each query, the k gallery images most similar to its first target that are neither targets
    nor excluded (near misses: the scenes one wrong edit away look like the target)."""
    queries = len(dataset.references)
    chunk = chunk or max(1, min(1024, 2 ** 25 // max(1, len(images))))  # a chunk x gallery block stays <= 128 MB
    out = torch.empty(queries, k, dtype=torch.long)
    for start in range(0, queries, chunk):
        rows = range(start, min(start + chunk, queries))
        sim = images[[dataset.targets[q][0] for q in rows]] @ images.T
        for r, q in enumerate(rows):
            sim[r, dataset.targets[q]] = float("-inf")
            if dataset.exclude is not None:
                sim[r, dataset.exclude[q]] = float("-inf")
        out[start:start + len(rows)] = sim.topk(k, dim=1).indices
    return out


def candidates(dataset, batch: list[int], hard: torch.Tensor | None, negatives: int, n_gallery: int,
               gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(gallery indices scored in this step, positives mask, excluded mask), masks B x len(indices)."""
    if negatives <= 0:
        index = torch.arange(n_gallery)
    else:
        parts = [torch.tensor([t for q in batch for t in dataset.targets[q]]),
                 torch.randint(n_gallery, (negatives,), generator=gen)]
        if hard is not None:
            parts.append(hard[batch].flatten())
        index = torch.unique(torch.cat(parts))
    where = torch.full((n_gallery,), -1, dtype=torch.long)
    where[index] = torch.arange(len(index))
    positives = torch.zeros(len(batch), len(index), dtype=torch.bool)
    excluded = torch.zeros_like(positives)
    for row, q in enumerate(batch):
        positives[row, where[dataset.targets[q]]] = True
        if dataset.exclude is not None:
            ex = where[dataset.exclude[q]]
            excluded[row, ex[ex >= 0]] = True
    return index, positives, excluded


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


def train(combiner, dataset, images: torch.Tensor, texts: torch.Tensor, args,
          validate=None) -> tuple[list[float], list[dict]]:
    """Train ``combiner`` in place on frozen embeddings; returns (the last epoch's losses, the validation curve).

    The budget is ``args.steps`` steps when given, else ``args.epochs`` passes; the cosine schedule spans it.
    ``validate()`` (validation recall of the combiner) is called every ``args.eval_every`` steps if both are set.
    """
    opt = torch.optim.AdamW(combiner.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    n = len(dataset.references)
    steps_per_epoch = math.ceil(n / args.batch_size)
    total = args.steps if args.steps else args.epochs * steps_per_epoch
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, total) / total)))
    refs = torch.tensor(dataset.references)
    gen = torch.Generator().manual_seed(args.seed)
    hard = hard_negatives(dataset, images, args.hard_negatives) if args.hard_negatives > 0 else None
    step, epoch, losses, curve = 0, 0, [], []
    while step < total:
        combiner.train()
        order = torch.randperm(n, generator=gen).tolist()
        losses = []
        for start in range(0, n, args.batch_size):
            if step == total:
                break
            batch = order[start:start + args.batch_size]
            index, positives, excluded = candidates(dataset, batch, hard, args.negatives, len(images), gen)
            q = combiner(images[refs[batch]], texts[batch])
            loss = multi_positive_loss(q, images[index], positives, excluded, args.temperature)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            losses.append(float(loss.detach()))
            step += 1
            if validate is not None and args.eval_every and (step % args.eval_every == 0 or step == total):
                curve.append({"step": step, "loss": round(sum(losses) / len(losses), 4), **validate()})
                combiner.train()
                if args.progress:
                    print(f"step {step}/{total}: val {curve[-1]}", file=sys.stderr)
        epoch += 1
        if args.progress:
            print(f"epoch {epoch} (step {step}/{total}): loss {sum(losses) / len(losses):.4f}", file=sys.stderr)
    return losses, curve


def main(args) -> int:
    from ..data import ComposedDataset, load_dataset
    from ..engine import weights_digest
    from ..models import load_model
    from ..models.composed import GatedCombiner, SumComposer, save_combiner

    for path in (args.out, os.path.splitext(args.out)[0] + ".json"):  # before any work: nothing is lost later
        if os.path.isdir(path):
            raise ValueError(f"--out {path} is a directory; give the combiner's file name")
        if os.path.lexists(path) and not args.overwrite:
            raise ValueError(f"--out: {path} exists; pass --overwrite to replace the combiner and its .json")
    if args.steps is not None and args.epochs is not None:
        raise ValueError(f"give --steps or --epochs, not both (got --steps {args.steps} --epochs {args.epochs})")
    if args.steps is not None and args.steps < 1:
        raise ValueError(f"--steps must be a positive number of optimisation steps, got {args.steps}")
    if args.epochs is not None and args.epochs < 1:
        raise ValueError(f"--epochs must be a positive number of passes, got {args.epochs}")
    if args.epochs is None and args.steps is None:
        args.steps = DEFAULT_STEPS

    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.time()
    model = load_model(args.model)
    model = getattr(model, "base", model)  # a composed alias trains a new combiner for its backbone
    base_weights = weights_digest(model)
    train_data, val_data = (load_dataset(d, args.image_root) for d in (args.data, args.val_data))
    for name, d in ((args.data, train_data), (args.val_data, val_data)):
        if not isinstance(d, ComposedDataset):
            raise ValueError(f"--data/--val-data {name!r} is not a composed dataset "
                             "(shapes-cir, cirr:..., fashioniq:...)")
    images, texts = frozen_embeddings(model, train_data, args.cache_dir, args.progress)
    val_images, val_texts = frozen_embeddings(model, val_data, args.cache_dir, args.progress)
    t_embed = time.time() - t0

    torch.manual_seed(args.seed)
    combiner = GatedCombiner(images.shape[1], args.proj_dim, args.hidden_dim, args.dropout)
    t1 = time.time()
    losses, curve = train(combiner, train_data, images, texts, args,
                          lambda: evaluate(combiner, val_images, val_texts, val_data))
    t_train = time.time() - t1
    with torch.no_grad():  # measure what ships: the weights rounded to fp16 as save_combiner stores them
        combiner.load_state_dict({k: v.half().float() for k, v in combiner.state_dict().items()})

    val_metrics = evaluate(combiner, val_images, val_texts, val_data)
    sum_metrics = evaluate(SumComposer(), val_images, val_texts, val_data)
    meta = {
        "base_model": args.model, "base_weights": base_weights, "data": args.data, "val_data": args.val_data,
        "train_queries": len(train_data.references), "epochs": args.epochs, "steps": args.steps,
        "batch_size": args.batch_size, "negatives": args.negatives,
        "hard_negatives": args.hard_negatives, "lr": args.lr, "weight_decay": args.weight_decay,
        "temperature": args.temperature, "seed": args.seed, "threads": torch.get_num_threads(),
        "final_loss": round(sum(losses) / len(losses), 4), "val_curve": curve, "val_clean": val_metrics,
        "val_clean_sum": sum_metrics,
        "seconds_embeddings": round(t_embed, 1), "seconds_training": round(t_train, 1),
    }
    save_combiner(combiner, args.out, meta)
    write_text(os.path.splitext(args.out)[0] + ".json", json.dumps({**meta, "hparams": combiner.hparams()}, indent=2))
    print(f"wrote {args.out}: {args.data} -> {args.val_data} clean R@1/5/10/50 "
          + "/".join(f"{val_metrics[k]:.2f}" for k in ("r1", "r5", "r10", "r50"))
          + " (sum composer: " + "/".join(f"{sum_metrics[k]:.2f}" for k in ("r1", "r5", "r10", "r50")) + ")"
          + f"; embeddings {t_embed:.0f} s, training {t_train:.0f} s")
    return 0
