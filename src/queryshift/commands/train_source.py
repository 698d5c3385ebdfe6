"""``queryshift train-source``: train the small open_clip CLIP of the shapes world from scratch.

This is how the shipped ``shapes-clip`` checkpoint was made: CLIP's symmetric contrastive loss on the
clean ``shapes:train`` split, AdamW with a linear warm-up and cosine decay. Half of each batch are images
whose objects have the same colours as another image of the batch (hard pairs). No augmentation, and no
domain style or corruption ever: those are the query shifts the model is later evaluated under.
Everything (model init, batch order, caption choice) follows from ``--seed``.
"""

from __future__ import annotations

import math
import os
import time

import numpy as np
import torch

DEFAULT_OUT = os.path.join(os.path.dirname(os.path.dirname(__file__)), "assets", "shapes-clip.pt")


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "train-source", help="train the shapes-world CLIP (the shipped shapes-clip model) from scratch",
        description="Train a small open_clip CLIP on the synthetic shapes world and write an fp16 checkpoint "
                    "plus <out>.json with the training configuration and clean test recall.")
    p.add_argument("--arch", default="qs-shapes", help="open_clip architecture (default qs-shapes)")
    p.add_argument("--seed", type=int, default=0, help="seed of the initialisation and data order (default 0)")
    p.add_argument("--steps", type=int, default=4000, help="total optimisation steps (default 4000, as shipped)")
    p.add_argument("--epochs", type=float, help="passes over the training images (overrides --steps)")
    p.add_argument("--train-images", dest="train_images", type=int, default=20_000,
                   help="first N images of shapes:train (default 20000)")
    p.add_argument("--batch-size", dest="batch_size", type=int, default=128, help="default 128")
    p.add_argument("--lr", type=float, default=1e-3, help="peak learning rate (default 1e-3)")
    p.add_argument("--weight-decay", dest="weight_decay", type=float, default=0.1, help="default 0.1")
    p.add_argument("--hard-pairs", dest="hard_pairs", type=float, default=0.5,
                   help="fraction of each batch that is a same-colour partner of another image in it, 0-0.5 "
                        "(default 0.5, as shipped)")
    p.add_argument("--warmup", type=int, default=100, help="linear warm-up steps (default 100)")
    p.add_argument("--eval-every", dest="eval_every", type=int, default=0,
                   help="every N steps, print clean R@1 on shapes:val (default: only at the end)")
    p.add_argument("--out", default=DEFAULT_OUT, help="checkpoint path (default: the shipped asset)")
    p.add_argument("--threads", type=int, help="torch CPU threads (results are bitwise reproducible for a fixed count)")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="hide the progress bar")
    p.set_defaults(func=main)


@torch.no_grad()
def evaluate_clean(model, dataset, batch_size: int = 250) -> dict[str, dict[str, float]]:
    """Clean R@1/5/10 and mAP of a DualEncoder in both directions (spec §1.10), via its own preprocessing."""
    from ..engine import encode_all
    from ..metrics import batch_ranks, retrieval_metrics

    model.eval()
    images = encode_all(model, dataset, "image", batch_size)
    texts = encode_all(model, dataset, "text", batch_size)
    out = {}
    for direction, scores, relevant in (("i2t", images @ texts.T, dataset.img2txt),
                                        ("t2i", texts @ images.T, dataset.txt2img)):
        ranks, aps = batch_ranks(scores, relevant)
        out[direction] = retrieval_metrics(ranks, aps)
    return out


def render_split(split: str, n: int):
    """uint8 images (n, 3, 64, 64), the five captions of each image, and each image's colour group.

    The colour group (index of the sorted multiset of object colours) is what hard-pair batching matches on.
    """
    from ..data.retrieval import pre_caption
    from ..data.shapes import render, sample_scene

    pixels = np.empty((n, 64, 64, 3), dtype=np.uint8)
    captions = []
    group_of: dict[tuple[str, ...], int] = {}
    groups = np.empty(n, dtype=np.int64)
    for i in range(n):
        scene = sample_scene(split, i)
        pixels[i] = np.asarray(render(scene))
        captions.extend(pre_caption(c) for c in scene.captions)
        groups[i] = group_of.setdefault(tuple(sorted(o.colour for o in scene.objects)), len(group_of))
    return torch.from_numpy(pixels).permute(0, 3, 1, 2).contiguous(), captions, torch.from_numpy(groups)


def hard_partners(anchors: torch.Tensor, groups: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """For each anchor image, another random image whose objects have the same colours.

    Random batches of this world can be told apart by colour alone, so shape, size and position get
    little gradient; a same-colour partner in the batch is a negative only those attributes separate.
    An anchor alone in its colour group gets a random other image.
    """
    order = torch.argsort(groups, stable=True)
    position = torch.empty_like(order)
    position[order] = torch.arange(len(order))
    start = torch.searchsorted(groups[order], groups[anchors])
    others = torch.searchsorted(groups[order], groups[anchors], right=True) - start - 1
    draw = torch.rand(len(anchors), generator=generator)
    pick = start + (draw * others).long()
    pick = pick + (pick >= position[anchors]).long()  # skip the anchor itself
    lonely = others == 0
    pick[lonely] = (position[anchors[lonely]] + 1 + (draw[lonely] * (len(order) - 1)).long()) % len(order)
    return order[pick]


class CompactTokenTable:
    """Train only the token-embedding rows the captions use.

    The captions use a few dozen of the tokenizer's 49,408 tokens. Training a compact table of just those
    rows is the same optimisation (the other rows get no gradient, so AdamW would only decay them) and
    skips a dense 6.3M-row gradient and optimizer update every step. ``tokens`` are the captions in the
    compact ids; :meth:`write_back` puts the trained rows into the full table (for evaluation and saving).
    """

    def __init__(self, model, tokens: torch.Tensor):
        # torch.unique sorts, so end-of-text stays the largest id and CLIP's argmax pooling finds the same token
        if model.text_pool_type != "argmax":
            raise ValueError(f"a compact token table needs argmax text pooling, not {model.text_pool_type!r}")
        self.model, self.full = model, model.token_embedding
        self.used, self.tokens = torch.unique(tokens, return_inverse=True)
        self.compact = torch.nn.Embedding.from_pretrained(self.full.weight[self.used].clone(), freeze=False)
        self.swap_in()

    def swap_in(self) -> None:
        self.model.token_embedding = self.compact

    @torch.no_grad()
    def write_back(self) -> None:
        self.full.weight[self.used] = self.compact.weight
        self.model.token_embedding = self.full


def make_optimizer(model, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW as CLIP trains it: betas 0.9/0.98, no decay on gains, biases and the temperature."""
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2 or "logit_scale" in n]
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "logit_scale" not in n]
    return torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=lr, betas=(0.9, 0.98))


def clip_step(model, optimizer, loss_fn, images: torch.Tensor, texts: torch.Tensor) -> torch.Tensor:
    """One optimisation step of CLIP's symmetric contrastive loss; the temperature stays at most 100."""
    model.train()
    img = torch.nn.functional.normalize(model.encode_image(images), dim=-1)
    txt = torch.nn.functional.normalize(model.encode_text(texts), dim=-1)
    loss = loss_fn(img, txt, model.logit_scale.exp())
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    with torch.no_grad():
        model.logit_scale.clamp_(0, math.log(100))
    return loss


def _lr_at(step: int, total: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    return 0.5 * peak * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def main(args) -> int:
    from tqdm import tqdm

    from ..data.shapes import CAPTIONS_PER_IMAGE, load_shapes
    from ..models import openclip as backend

    n_partners = int(round(args.hard_pairs * args.batch_size))
    if not 0 <= n_partners <= args.batch_size // 2:
        raise ValueError(f"--hard-pairs must be between 0 and 0.5, got {args.hard_pairs}")
    n_anchors = args.batch_size - n_partners
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    started = time.time()

    open_clip = backend._open_clip()
    model = open_clip.create_model(args.arch, pretrained=None, precision="fp32")
    encoder = backend.load(f"{args.arch}/random")  # only for its preprocessing constants and tokenizer
    mean = torch.tensor(encoder._transform.transforms[-1].mean).view(1, 3, 1, 1)
    std = torch.tensor(encoder._transform.transforms[-1].std).view(1, 3, 1, 1)

    pixels, captions, colour_groups = render_split("train", args.train_images)
    table = CompactTokenTable(model, encoder.tokenize(captions))
    tokens = table.tokens
    print(f"rendered {len(pixels)} training images, {len(captions)} captions in {time.time() - started:.0f}s")

    steps_per_epoch = len(pixels) // args.batch_size
    total = int(round(args.epochs * steps_per_epoch)) if args.epochs else args.steps
    optimizer = make_optimizer(model, args.lr, args.weight_decay)
    loss_fn = open_clip.ClipLoss()
    generator = torch.Generator().manual_seed(args.seed)
    val = load_shapes("val") if args.eval_every else None

    order = torch.empty(0, dtype=torch.long)
    bar = tqdm(range(total), desc="train-source", disable=not args.progress, mininterval=5)
    for step in bar:
        if len(order) < n_anchors:
            order = torch.randperm(len(pixels), generator=generator)
        idx, order = order[:n_anchors], order[n_anchors:]
        if n_partners:
            idx = torch.cat([idx, hard_partners(idx[:n_partners], colour_groups, generator)])
        pick = torch.randint(CAPTIONS_PER_IMAGE, (len(idx),), generator=generator)
        images = (pixels[idx].float() / 255 - mean) / std
        texts = tokens[idx * CAPTIONS_PER_IMAGE + pick]
        for group in optimizer.param_groups:
            group["lr"] = _lr_at(step, total, args.lr, args.warmup)
        loss = clip_step(model, optimizer, loss_fn, images, texts)
        bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
        if args.eval_every and (step + 1) % args.eval_every == 0 and step + 1 < total:
            table.write_back()
            encoder.model = model
            r = evaluate_clean(encoder, val)
            table.swap_in()
            print(f"step {step + 1}: val i2t R@1 {r['i2t']['r1']:.1f}  t2i R@1 {r['t2i']['r1']:.1f}", flush=True)

    table.write_back()
    minutes = (time.time() - started) / 60
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    torch.save({k: v.detach().half() for k, v in model.state_dict().items()}, args.out)
    encoder = backend.load(f"{args.arch}@{args.out}")  # evaluate exactly what was written
    result = evaluate_clean(encoder, load_shapes("test"))
    info = {
        "arch": args.arch, "config": open_clip.get_model_config(args.arch), "data": f"shapes:train:{args.train_images}",
        "seed": args.seed, "steps": total, "batch_size": args.batch_size, "lr": args.lr,
        "weight_decay": args.weight_decay, "warmup": args.warmup, "hard_pairs": args.hard_pairs,
        "threads": torch.get_num_threads(),
        "train_minutes": round(minutes, 1), "torch": torch.__version__, "open_clip": open_clip.__version__,
        "checkpoint_bytes": os.path.getsize(args.out), "clean_test": result,
    }
    from ..engine import write_json

    write_json(os.path.splitext(args.out)[0] + ".json", info)  # strict JSON: a NaN metric becomes null
    print(f"wrote {args.out} ({info['checkpoint_bytes'] / 1e6:.1f} MB) after {minutes:.1f} min")
    for direction in ("i2t", "t2i"):
        m = result[direction]
        print(f"clean {direction}: R@1 {m['r1']:.2f}  R@5 {m['r5']:.2f}  R@10 {m['r10']:.2f}")
    return 0

