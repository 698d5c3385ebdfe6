"""``queryshift train-source``: train the small open_clip CLIP of the shapes world.

The shipped models come from two stages, the general-to-customized paradigm REST starts from
(docs/model-card-shapes-clip.md has the exact commands):

* ``--stage general`` (``shapes-clip-general``): from scratch on the general corpus of
  :mod:`queryshift.shifts.shapes_general`: every domain style, caption paraphrases, synonyms and typos, and
  mild photo-like variation, never a test corruption at its test strength nor a validation shift;
* ``--stage custom --init GENERAL.pt`` (``shapes-clip``): fine-tuning on the target domain, the clean
  rendering with the base caption templates. Without ``--init`` it trains from scratch on clean data only.

Both use CLIP's symmetric contrastive loss, AdamW with a linear warm-up and cosine decay, and hard pairs
(half of each batch are images whose objects have the same colours as another image of the batch). Images
are rendered at native resolution, varied there, and resized by the backbone's transform, as queries are.
Everything (model init, views, batch order, caption choice) follows from ``--seed``.
"""

from __future__ import annotations

import math
import os
import time

import numpy as np
import torch

from ..atomic import save_torch

ASSETS = os.path.join(os.path.dirname(os.path.dirname(__file__)), "assets")
DEFAULT_OUT = {"general": os.path.join(ASSETS, "shapes-clip-general.pt"),
               "custom": os.path.join(ASSETS, "shapes-clip.pt")}
# per-stage defaults of --steps/--lr/--warmup/--views (custom: training from scratch; the shipped recipe
# fine-tunes with the options written in the model card)
STAGE_DEFAULTS = {
    "general": {"steps": 4000, "lr": 1e-3, "warmup": 100, "views": 3},
    "custom": {"steps": 4000, "lr": 1e-3, "warmup": 100, "views": 1},
}


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "train-source", help="train the shapes-world CLIP (shapes-clip-general, shapes-clip)",
        description="Train a small open_clip CLIP on the synthetic shapes world (general stage, or customization "
                    "on the clean domain) and write an fp16 checkpoint plus <out>.json with the training "
                    "configuration and clean test recall.")
    p.add_argument("--stage", choices=("general", "custom"), default="custom",
                   help="general: styles, paraphrases, typos and photo variation; custom: the clean target "
                        "domain (default)")
    p.add_argument("--init", help="checkpoint to start from (e.g. the general model); default: random init")
    p.add_argument("--arch", default="qs-shapes", help="open_clip architecture (default qs-shapes)")
    p.add_argument("--seed", type=int, default=0, help="seed of the initialisation and data order (default 0)")
    p.add_argument("--steps", type=int, help="total optimisation steps (default 4000)")
    p.add_argument("--epochs", type=float, help="passes over the training images (overrides --steps)")
    p.add_argument("--train-images", dest="train_images", type=int, default=20_000,
                   help="first N images of shapes:train (default 20000)")
    p.add_argument("--views", type=int, help="pre-rendered views per training image (default: general 3, custom 1)")
    p.add_argument("--batch-size", dest="batch_size", type=int, default=128, help="default 128")
    p.add_argument("--lr", type=float, help="peak learning rate (default 1e-3)")
    p.add_argument("--weight-decay", dest="weight_decay", type=float, default=0.1, help="default 0.1")
    p.add_argument("--hard-pairs", dest="hard_pairs", type=float, default=0.5,
                   help="fraction of each batch that is a same-colour partner of another image in it, 0-0.5 "
                        "(default 0.5)")
    p.add_argument("--warmup", type=int, help="linear warm-up steps (default 100)")
    p.add_argument("--eval-every", dest="eval_every", type=int, default=0,
                   help="every N steps, print clean R@1 on shapes:val (default: only at the end)")
    p.add_argument("--out", help="checkpoint path (default: the shipped asset of the stage)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing checkpoint at --out (and its .json); without it one is refused")
    p.add_argument("--cache-dir", dest="cache_dir",
                   help="keep the rendered training views here and reuse them (default: render every time)")
    p.add_argument("--workers", type=int, default=1, help="processes rendering the training views (default 1)")
    p.add_argument("--threads", type=int, help="torch CPU threads (results are bitwise reproducible for a fixed count)")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="hide the progress bar")
    p.set_defaults(func=main)


@torch.no_grad()
def evaluate_clean(model, dataset, batch_size: int = 250) -> dict[str, dict[str, float]]:
    """Clean R@1/5/10 and mAP of a DualEncoder in both directions, via its own preprocessing."""
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
    """Clean model-input uint8 images (n, 3, 64, 64), the five captions of each image, and each image's
    colour group (what hard-pair batching matches on). Rendered at native resolution, then resized by the
    backbone's transform, as gallery images and queries are."""
    pixels, captions, groups = render_cached(split, n, views=1, general=False, seed=0, cache_dir=None, workers=1)
    return pixels[:, 0].permute(0, 3, 1, 2).contiguous(), [c for cs in captions for c in cs], groups


def _render_chunk(job):
    from ..shifts.shapes_general import render_views

    return render_views(*job)


def rendering_code(modules) -> str:
    """The code the views are made from, for the cache key: each module's source, plus the source of every
    function bound in it that it does not define itself, as bound now. An experiment that patches
    ``shapes_general.photo_variation`` thus gets its own views instead of the shipped ones (and the
    shipped recipe never reads an experiment's views). Values changed at run time (a patched table of
    strengths) are not seen: such an experiment needs a cache directory of its own."""
    import inspect

    parts = []
    for module in modules:
        parts.append(inspect.getsource(module))
        for name, value in sorted(vars(module).items()):
            if inspect.isfunction(value) and value.__module__ != module.__name__:
                try:
                    body = inspect.getsource(value)
                except (OSError, TypeError):  # defined where no source is kept (a REPL): its bytecode
                    body = value.__code__.co_code.hex() + repr(value.__code__.co_consts)
                parts.append(f"{module.__name__}.{name} = {value.__module__}.{value.__qualname__}\n{body}")
    return "".join(parts)


def render_cached(split: str, n: int, views: int, general: bool, seed: int, cache_dir: str | None,
                  workers: int):
    """-> uint8 pixels (n, views, 64, 64, 3), captions per image, colour group per image.

    Views are rendered in ``workers`` processes (each view depends only on its own index, so the result
    does not depend on the split into chunks) and kept in ``cache_dir`` under a key that includes the source
    of the rendering modules, so an edit to the corpus never reuses stale pixels.
    """
    import hashlib

    from ..data import shapes
    from ..data.shapes import sample_scene
    from ..shifts import domain, shapes_general

    path = None
    if cache_dir:
        code = rendering_code((shapes, shapes_general, domain))
        key = hashlib.sha256(f"{split}:{n}:{views}:{general}:{seed}:{code}".encode()).hexdigest()[:16]
        path = os.path.join(cache_dir, f"shapes-{split}-{n}-{'general' if general else 'clean'}-{views}v-{key}.pt")
        if os.path.isfile(path):
            try:  # a cache folder may be shared: a file found there is data, never code
                saved = torch.load(path, weights_only=True)
                return saved["pixels"], saved["captions"], saved["groups"]
            except Exception as err:  # noqa: BLE001 - any unreadable cache entry is rendered again
                print(f"note: {path} is not a readable view cache ({type(err).__name__}); rendering again",
                      flush=True)
    chunk = 500
    jobs = [(split, a, min(a + chunk, n), views, general, seed) for a in range(0, n, chunk)]
    if workers > 1:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork")) as pool:
            parts = list(pool.map(_render_chunk, jobs))
    else:
        parts = [_render_chunk(job) for job in jobs]
    pixels = torch.from_numpy(np.concatenate([p for p, _ in parts]))
    captions = [c for _, cs in parts for c in cs]
    group_of: dict[tuple[str, ...], int] = {}
    groups = torch.tensor([group_of.setdefault(tuple(sorted(o.colour for o in sample_scene(split, i).objects)),
                                               len(group_of)) for i in range(n)])
    if path:
        os.makedirs(cache_dir, exist_ok=True)
        save_torch({"pixels": pixels, "captions": captions, "groups": groups}, path)
    return pixels, captions, groups


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


def check_args(args) -> None:
    """Every number in range and the output free, before any rendering or training."""
    at_least = {"--steps": (args.steps, 1), "--batch-size": (args.batch_size, 2), "--train-images": (
        args.train_images, 2), "--views": (args.views, 1), "--warmup": (args.warmup, 0), "--workers": (
        args.workers, 1), "--eval-every": (args.eval_every, 0)}
    for option, (value, low) in at_least.items():
        if value < low:
            raise ValueError(f"{option} must be at least {low}, got {value}")
    for option, value in (("--lr", args.lr), ("--epochs", args.epochs)):
        if value is not None and not (value > 0 and math.isfinite(value)):
            raise ValueError(f"{option} must be a positive number, got {value}")
    if not (0 <= args.hard_pairs <= 0.5) or not 0 <= int(round(args.hard_pairs * args.batch_size)) <= \
            args.batch_size // 2:
        raise ValueError(f"--hard-pairs must be between 0 and 0.5, got {args.hard_pairs}")
    if not args.weight_decay >= 0:
        raise ValueError(f"--weight-decay must be >= 0, got {args.weight_decay}")
    if args.epochs is not None and int(round(args.epochs * (args.train_images // args.batch_size))) < 1:
        raise ValueError(f"--epochs {args.epochs} is less than one step of --batch-size {args.batch_size} over "
                         f"--train-images {args.train_images}")
    if args.init and not os.path.isfile(args.init):
        raise ValueError(f"--init: no checkpoint at {args.init}")
    if os.path.isdir(args.out):
        raise ValueError(f"--out {args.out} is a directory; give the checkpoint's file name")
    for path in (args.out, os.path.splitext(args.out)[0] + ".json"):
        if os.path.lexists(path) and not args.overwrite:
            raise ValueError(f"--out: {path} exists; pass --overwrite to replace the checkpoint and its .json")


def load_init(path: str) -> dict[str, torch.Tensor]:
    """The state dict of ``--init``: tensors only (weights_only), or a clear error naming the file."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - not a torch file, truncated, or holding objects (refused, not run)
        raise ValueError(f"--init {path}: not a checkpoint written by train-source ({type(err).__name__}: "
                         f"{str(err).splitlines()[0][:200] if str(err) else ''})") from None
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"--init {path}: not a checkpoint written by train-source (a state dict of tensors)")
    return state


def main(args) -> int:
    from tqdm import tqdm

    from ..data.shapes import load_shapes
    from ..models import openclip as backend

    for key, value in STAGE_DEFAULTS[args.stage].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.out is not None and not args.out.strip():
        raise ValueError("--out is empty; give the checkpoint's path, or leave it out for the stage's shipped asset")
    args.out = args.out or DEFAULT_OUT[args.stage]
    check_args(args)
    n_partners = int(round(args.hard_pairs * args.batch_size))
    init_state = load_init(args.init) if args.init else None
    n_anchors = args.batch_size - n_partners
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    started = time.time()

    open_clip = backend._open_clip()
    model = open_clip.create_model(args.arch, pretrained=None, precision="fp32")
    if init_state is not None:
        try:
            model.load_state_dict({k: v.float() for k, v in init_state.items()})
        except RuntimeError as err:  # missing, unexpected or mis-shaped keys
            raise ValueError(f"--init {args.init}: not a checkpoint of --arch {args.arch} "
                             f"({str(err).splitlines()[0][:200]})") from None
    encoder = backend.load(f"{args.arch}/random")  # only for its preprocessing constants and tokenizer
    mean = torch.tensor(encoder._transform.transforms[-1].mean).view(1, 3, 1, 1)
    std = torch.tensor(encoder._transform.transforms[-1].std).view(1, 3, 1, 1)

    general = args.stage == "general"
    pixels, captions, colour_groups = render_cached("train", args.train_images, args.views, general, args.seed,
                                                    args.cache_dir, args.workers)
    per_image = len(captions[0])
    table = CompactTokenTable(model, encoder.tokenize([c for cs in captions for c in cs]))
    tokens = table.tokens
    print(f"rendered {len(pixels)} training images x {args.views} views, {len(captions) * per_image} captions "
          f"in {time.time() - started:.0f}s", flush=True)

    steps_per_epoch = len(pixels) // args.batch_size
    total = int(round(args.epochs * steps_per_epoch)) if args.epochs else args.steps
    optimizer = make_optimizer(model, args.lr, args.weight_decay)
    loss_fn = open_clip.ClipLoss()
    generator = torch.Generator().manual_seed(args.seed)
    val = load_shapes("val") if args.eval_every else None

    order = torch.empty(0, dtype=torch.long)
    bar = tqdm(range(total), desc=f"train-source {args.stage}", disable=not args.progress, mininterval=5)
    for step in bar:
        if len(order) < n_anchors:
            order = torch.randperm(len(pixels), generator=generator)
        idx, order = order[:n_anchors], order[n_anchors:]
        if n_partners:
            idx = torch.cat([idx, hard_partners(idx[:n_partners], colour_groups, generator)])
        view = torch.randint(args.views, (len(idx),), generator=generator)
        pick = torch.randint(per_image, (len(idx),), generator=generator)
        images = (pixels[idx, view].permute(0, 3, 1, 2).float() / 255 - mean) / std
        texts = tokens[idx * per_image + pick]
        for group in optimizer.param_groups:
            group["lr"] = _lr_at(step, total, args.lr, args.warmup)
        loss = clip_step(model, optimizer, loss_fn, images, texts)
        bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
        if args.eval_every and (step + 1) % args.eval_every == 0 and step + 1 < total:
            table.write_back()
            encoder.model = model
            r = evaluate_clean(encoder, val)
            table.swap_in()
            print(f"step {step + 1}: val i2t R@1 {r['i2t']['r1']:.1f}  t2i R@1 {r['t2i']['r1']:.1f} "
                  f"({(time.time() - started) / 60:.1f} min)", flush=True)

    table.write_back()
    minutes = (time.time() - started) / 60
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    save_torch({k: v.detach().half() for k, v in model.state_dict().items()}, args.out)
    encoder = backend.load(f"{args.arch}@{args.out}")  # evaluate exactly what was written
    result = evaluate_clean(encoder, load_shapes("test"))
    info = {
        "arch": args.arch, "config": open_clip.get_model_config(args.arch), "stage": args.stage,
        "init": os.path.basename(args.init) if args.init else None,
        "data": f"shapes:train:{args.train_images}", "views": args.views, "captions_per_image": per_image,
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
