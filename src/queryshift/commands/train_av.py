"""``queryshift train-av``: train the shipped video-audio model ``shapes-av`` on the shapes-av world.

General-to-customized, as ``shapes-clip`` (docs/model-card-shapes-av.md has the exact commands):

* ``--stage general``: from scratch on clips as recordings vary: each training clip's soundtrack in ``--views``
  versions, each with (independent draws) another room (a decaying-noise impulse response, RT60 0.1-0.6 s), a
  sample rate it passed through (11.025-48 kHz, resampled back to 16 kHz), a gain (-12 to +6 dB, never above
  full scale) and faint white noise (std .002-.02; READ's weakest Gaussian noise is .08); and its frames with
  mild camera variation drawn per clip in each batch (gain, contrast, colour cast, slight softening, a shift of
  up to 3 px, faint sensor noise). Never a test shift of :mod:`queryshift.shifts.audio` or
  :mod:`queryshift.shifts.video` at its test strength, nor a validation shift (no low-pass, bit-crushing,
  Gaussian blur, spatter or saturation);
* ``--stage custom --init GENERAL.pt``: fine-tuning on the clean clips.

The loss is the symmetric contrastive (InfoNCE) loss of CLIP and CAV-MAE with a learnt temperature, optimised by
AdamW with a linear warm-up and cosine decay. Training features are computed once (frames at the model's 64 px
as uint8, log-mels as float16) and kept in memory, optionally in ``--cache-dir``. Everything follows from
``--seed``.
"""

from __future__ import annotations

import math
import os
import time

import numpy as np
import torch
from torch.nn import functional as F

ASSETS = os.path.join(os.path.dirname(os.path.dirname(__file__)), "assets")
# the general model is a step towards the shipped one, not shipped itself: by default it goes to the working folder
DEFAULT_OUT = {"general": "shapes-av-general.pt", "custom": os.path.join(ASSETS, "shapes-av.pt")}
# per-stage defaults of --steps/--lr/--warmup/--views: the general stage and the first customization run of the
# shipped model, which three more runs continue (docs/model-card-shapes-av.md has the whole chain)
STAGE_DEFAULTS = {"general": {"steps": 2000, "lr": 2e-3, "warmup": 100, "views": 2},
                  "custom": {"steps": 3000, "lr": 1e-3, "warmup": 100, "views": 1}}

# Audio variation of the general stage: (probability, range). Test severity 1 of the closest shift, for
# comparison: gaussian_noise std .08; reverb room .3 wet .1 (pedalboard's algorithmic reverb, not a convolution).
AUDIO_VARIATION = {
    "room": (0.5, (0.1, 0.6)),  # RT60 of another room, s
    "room_wet": (0.5, (0.1, 0.4)),  # its tail's level relative to the direct sound
    "rate": (0.4, (11_025, 12_000, 22_050, 24_000, 32_000, 44_100, 48_000)),  # Hz passed through, one of
    "gain": (0.6, (-12.0, 6.0)),  # dB, capped at full scale
    "noise": (0.4, (0.002, 0.02)),  # white noise std
}
# Video variation of the general stage, drawn per clip (the same for all its frames) at the model input
VIDEO_VARIATION = {
    "gain": (0.4, (0.8, 1.15)),
    "contrast": (0.4, (0.6, 1.0)),  # factor towards the clip's mean
    "cast": (0.3, (0.92, 1.08)),  # per-channel gain
    "soften": (0.25, (0.3, 1.0)),  # blend with a 3x3 box blur
    "shift": (0.4, 3),  # px, up to, in each direction
    "noise": (0.3, (0.0, 0.03)),  # sensor noise std in [0, 1] units
}


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "train-av", help="train the shapes-av video-audio model (general stage, then customization)",
        description="Train the small video-audio dual encoder of the shapes-av world (general stage with varied "
                    "rooms, rates, gains, faint noise and camera variation; or customization on clean clips) and "
                    "write an fp16 checkpoint plus <out>.json with the recipe and clean test recall.")
    p.add_argument("--stage", choices=("general", "custom"), default="custom", help="default custom")
    p.add_argument("--init", help="checkpoint to start from (e.g. the general model); default: random init")
    p.add_argument("--seed", type=int, default=0, help="seed of the initialisation, variation and data order")
    p.add_argument("--steps", type=int, help="optimisation steps (default: general 2000, custom 3000)")
    p.add_argument("--train-clips", dest="train_clips", type=int, default=10_000,
                   help="first N clips of shapes-av:train (default 10000)")
    p.add_argument("--views", type=int, help="soundtrack versions per clip (default: general 2, custom 1)")
    p.add_argument("--batch-size", dest="batch_size", type=int, default=64, help="default 64")
    p.add_argument("--lr", type=float, help="peak learning rate (default: general 2e-3, custom 1e-3)")
    p.add_argument("--weight-decay", dest="weight_decay", type=float, default=0.05, help="default 0.05")
    p.add_argument("--warmup", type=int, help="linear warm-up steps (default: 100)")
    p.add_argument("--arch", help="JSON object of model settings that replace the defaults of "
                                  "queryshift.models.shapes_av.CONFIG (e.g. '{\"width\": 96}'); ignored with --init")
    p.add_argument("--eval-every", dest="eval_every", type=int, default=0,
                   help="every N steps, print clean R@1 on the first 250 clips of shapes-av:val (default: never)")
    p.add_argument("--test-clips", dest="test_clips", type=int, default=1000,
                   help="clean test clips the final recall is measured on (default 1000)")
    p.add_argument("--out", help="checkpoint path (default: general shapes-av-general.pt here, custom the shipped "
                                 "asset)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out and its .json")
    p.add_argument("--cache-dir", dest="cache_dir", help="keep the training features here and reuse them")
    p.add_argument("--workers", type=int, default=1, help="processes computing the training features (default 1)")
    p.add_argument("--threads", type=int, help="torch CPU threads")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="hide the progress bar")
    p.set_defaults(func=main)


# -- training features ------------------------------------------------------------------------


def _draw(rng: np.random.Generator, table: dict, name: str):
    p, values = table[name]
    if rng.random() >= p:
        return None
    if isinstance(values, tuple) and len(values) == 2 and isinstance(values[0], float):
        return float(rng.uniform(*values))
    return values


def vary_audio(audio: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One general-stage version of a 16 kHz soundtrack (see ``AUDIO_VARIATION``)."""
    from scipy.signal import fftconvolve, resample_poly

    from ..data.shapes_av import SAMPLE_RATE

    x = audio.astype(np.float64)
    if (rt60 := _draw(rng, AUDIO_VARIATION, "room")) is not None:
        t = np.arange(int(0.6 * SAMPLE_RATE)) / SAMPLE_RATE
        tail = rng.standard_normal(t.size) * np.exp(-6.91 * t / rt60)
        tail[0] = 0.0
        tail *= rng.uniform(*AUDIO_VARIATION["room_wet"][1]) / np.sqrt(np.sum(tail ** 2))
        tail[0] = 1.0
        x = fftconvolve(x, tail)[:x.size]
    if _draw(rng, AUDIO_VARIATION, "rate") is not None:
        rate = int(rng.choice(AUDIO_VARIATION["rate"][1]))
        g = math.gcd(rate, SAMPLE_RATE)
        x = resample_poly(resample_poly(x, rate // g, SAMPLE_RATE // g), SAMPLE_RATE // g, rate // g)[:audio.size]
        x = np.pad(x, (0, audio.size - x.size))
    if (noise := _draw(rng, AUDIO_VARIATION, "noise")) is not None:
        x = x + rng.standard_normal(x.size) * noise
    peak = float(np.abs(x).max()) or 1.0
    if (db := _draw(rng, AUDIO_VARIATION, "gain")) is not None:
        x = x * min(10 ** (db / 20), 1.0 / peak)
    elif peak > 1.0:
        x = x / peak
    return x.astype(np.float32)


def vary_video(clips: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """General-stage camera variation of a batch of clips in [0, 1], float [B, T, 3, H, W], one draw per clip."""
    b = clips.shape[0]

    def chosen(name):
        return torch.rand(b, generator=generator) < VIDEO_VARIATION[name][0]

    def uniform(name, shape=(1,)):
        lo, hi = VIDEO_VARIATION[name][1]
        return lo + (hi - lo) * torch.rand((b, *shape), generator=generator)

    def per_clip(mask, values, neutral):
        return torch.where(mask.view(-1, *[1] * (values.dim() - 1)), values, torch.full_like(values, neutral))

    x = clips
    x = x * per_clip(chosen("gain"), uniform("gain"), 1.0).view(b, 1, 1, 1, 1)
    x = x * per_clip(chosen("cast"), uniform("cast", (3,)), 1.0).view(b, 1, 3, 1, 1)
    c = per_clip(chosen("contrast"), uniform("contrast"), 1.0).view(b, 1, 1, 1, 1)
    mean = x.mean(dim=(1, 2, 3, 4), keepdim=True)
    x = mean + (x - mean) * c
    blurred = F.avg_pool2d(x.flatten(0, 1), 3, stride=1, padding=1, count_include_pad=False).view_as(x)
    a = per_clip(chosen("soften"), uniform("soften"), 0.0).view(b, 1, 1, 1, 1)
    x = x + (blurred - x) * a
    limit = VIDEO_VARIATION["shift"][1]
    shifts = torch.randint(-limit, limit + 1, (b, 2), generator=generator) * chosen("shift").view(b, 1)
    h, w = x.shape[-2:]
    padded = F.pad(x.flatten(0, 1), (limit,) * 4, mode="replicate").view(*x.shape[:3], h + 2 * limit, w + 2 * limit)
    x = torch.stack([padded[i, ..., limit + dy:limit + dy + h, limit + dx:limit + dx + w]
                     for i, (dy, dx) in enumerate(shifts.tolist())])
    sigma = per_clip(chosen("noise"), uniform("noise"), 0.0).view(b, 1, 1, 1, 1)
    x = x + torch.randn(x.shape, generator=generator) * sigma
    return x.clamp(0, 1)


def _feature_chunk(job):
    from ..data.shapes_av import clip_scene, render_frames, synthesize_audio
    from ..models.shapes_av import ShapesAVEncoder

    start, stop, views, general, seed, config = job
    torch.set_num_threads(1)
    model = ShapesAVEncoder(config)
    pixels, waves = [], []
    for i in range(start, stop):
        scene = clip_scene("train", i)
        pixels.append(model.video_pixels(render_frames(scene)))
        audio = synthesize_audio(scene)[0]
        if general:
            rng = np.random.default_rng([seed, i])
            waves.append(np.stack([vary_audio(audio, rng) for _ in range(views)]))
        else:
            waves.append(audio[None])
    with torch.no_grad():
        w = torch.from_numpy(np.stack(waves))
        logmels = model.logmel(w.flatten(0, 1))
    logmels = logmels.view(len(waves), w.shape[1], *logmels.shape[1:])
    return torch.stack(pixels), logmels.half()


def training_features(n: int, views: int, general: bool, seed: int, config: dict, cache_dir: str | None,
                      workers: int):
    """-> (uint8 frames [n, T, 3, 64, 64], float16 log-mels [n, views, n_mels, frames]) of the first n training
    clips, cached in ``cache_dir`` under a key that includes the source of the modules they are made from."""
    import hashlib
    import json

    from ..data import shapes, shapes_av
    from ..models import shapes_av as model_module
    from .train_source import rendering_code

    path = None
    if cache_dir:
        code = rendering_code((shapes, shapes_av, model_module)) + "".join(
            str(v) for v in (AUDIO_VARIATION, json.dumps(config, sort_keys=True)))
        import inspect

        code += inspect.getsource(vary_audio) + inspect.getsource(_feature_chunk)
        key = hashlib.sha256(f"{n}:{views}:{general}:{seed}:{code}".encode()).hexdigest()[:16]
        path = os.path.join(cache_dir, f"shapes-av-train-{n}-{'general' if general else 'clean'}-{views}v-{key}.pt")
        if os.path.isfile(path):
            try:  # a shared cache folder holds data, never code
                saved = torch.load(path, weights_only=True)
                return saved["pixels"], saved["logmels"]
            except Exception as err:  # noqa: BLE001 - an unreadable entry is computed again
                print(f"note: {path} is not a readable feature cache ({type(err).__name__}); computing again")
    chunk = 250
    jobs = [(a, min(a + chunk, n), views, general, seed, config) for a in range(0, n, chunk)]
    if workers > 1:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork")) as pool:
            parts = list(pool.map(_feature_chunk, jobs))
    else:
        parts = [_feature_chunk(job) for job in jobs]
    pixels, logmels = torch.cat([p for p, _ in parts]), torch.cat([m for _, m in parts])
    if path:
        from ..atomic import save_torch

        os.makedirs(cache_dir, exist_ok=True)
        save_torch({"pixels": pixels, "logmels": logmels}, path)
    return pixels, logmels


# -- training and evaluation ------------------------------------------------------------------


def contrastive_loss(video: torch.Tensor, audio: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE over the batch: clip i's video and audio are the only positives of each other."""
    logits = logit_scale.exp() * video @ audio.T
    target = torch.arange(len(video))
    return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2


def train_step(model, optimizer, videos: torch.Tensor, logmels: torch.Tensor) -> float:
    model.train()
    loss = contrastive_loss(model.encode_video(videos), model.encode_audio(logmels), model.logit_scale)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    with torch.no_grad():
        model.logit_scale.clamp_(0, math.log(100))
    return loss.item()


def make_optimizer(model, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW, no decay on gains, biases, position embeddings and the temperature."""
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "position" not in n]
    rest = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "position" not in n)]
    return torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                              {"params": rest, "weight_decay": 0.0}], lr=lr, betas=(0.9, 0.98))


def lr_at(step: int, total: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    return 0.5 * peak * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


@torch.no_grad()
def encode_clips(model, dataset, modality: str, shift=None, batch_size: int = 100) -> torch.Tensor:
    """Every ``modality`` item of an AVDataset through the model's own preprocessing; ``shift(item, index)``
    changes an item first."""
    model.eval()
    out = []
    for start in range(0, dataset.count(modality), batch_size):
        items = []
        for i in range(start, min(start + batch_size, dataset.count(modality))):
            item = dataset.load(modality, i)
            items.append(model.prepare(modality, shift(item, i) if shift else item))
        out.append(model.encode(modality, torch.stack(items)))
    return torch.cat(out)


def recall(queries: torch.Tensor, gallery: torch.Tensor, relevant) -> dict[str, float]:
    from ..metrics import batch_ranks, retrieval_metrics

    ranks, aps = batch_ranks(queries @ gallery.T, relevant)
    return retrieval_metrics(ranks, aps)


def evaluate_clean(model, dataset) -> dict[str, dict[str, float]]:
    """Clean R@1/5/10 and mAP in both directions (v2a, a2v) over every clip of ``dataset``."""
    video, audio = encode_clips(model, dataset, "video"), encode_clips(model, dataset, "audio")
    return {"v2a": recall(video, audio, dataset.relevance("video", "audio")),
            "a2v": recall(audio, video, dataset.relevance("audio", "video"))}


def parse_arch(text: str | None) -> dict:
    """``--arch`` JSON -> model settings, each a known key of the default config."""
    import json

    from ..models.shapes_av import CONFIG

    if not text:
        return {}
    try:
        arch = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"--arch is not JSON: {err}") from None
    if not isinstance(arch, dict) or set(arch) - set(CONFIG):
        raise ValueError(f"--arch must be a JSON object with keys among {', '.join(CONFIG)}, got {text!r}")
    return arch


def evaluate_audio_noises(model, dataset, severity: int = 5, noises=None) -> dict[str, dict[str, float]]:
    """a2v recall with READ's noises (default: Gaussian and the five environmental ones) added to every audio
    query at ``severity``; query i's draw is seeded by (severity, i). The video gallery is clean."""
    from ..shifts.audio import READ_NOISES, corrupt_audio

    video = encode_clips(model, dataset, "video")
    relevant = dataset.relevance("audio", "video")
    out = {}
    for noise in noises or ("gaussian_noise",) + READ_NOISES:
        def shift(item, i, noise=noise):
            return corrupt_audio(item, noise, severity, np.random.default_rng([severity, i]))

        out[f"{noise}:{severity}"] = recall(encode_clips(model, dataset, "audio", shift), video, relevant)
    return out


def check_args(args) -> None:
    for option, value, low in (("--steps", args.steps, 1), ("--batch-size", args.batch_size, 2),
                               ("--train-clips", args.train_clips, 2), ("--views", args.views, 1),
                               ("--warmup", args.warmup, 0), ("--workers", args.workers, 1),
                               ("--test-clips", args.test_clips, 1), ("--eval-every", args.eval_every, 0)):
        if value < low:
            raise ValueError(f"{option} must be at least {low}, got {value}")
    from ..data.shapes_av import parse_arg

    for option, value, split in (("--train-clips", args.train_clips, "train"),
                                 ("--test-clips", args.test_clips, "test")):
        try:  # the --data parser's own check of a split's size
            parse_arg(f"{split}:{value}")
        except ValueError as err:
            raise ValueError(f"{option}: {err}") from None
    if not (args.lr > 0 and math.isfinite(args.lr)):
        raise ValueError(f"--lr must be a positive number, got {args.lr}")
    if not args.weight_decay >= 0:
        raise ValueError(f"--weight-decay must be >= 0, got {args.weight_decay}")
    if args.init and not os.path.isfile(args.init):
        raise ValueError(f"--init: no checkpoint at {args.init}")
    if os.path.isdir(args.out):
        raise ValueError(f"--out {args.out} is a directory; give the checkpoint's file name")
    for path in (args.out, os.path.splitext(args.out)[0] + ".json"):
        if os.path.lexists(path) and not args.overwrite:
            raise ValueError(f"--out: {path} exists; pass --overwrite to replace the checkpoint and its .json")


def main(args) -> int:
    from tqdm import tqdm

    from ..data.shapes_av import load_shapes_av
    from ..engine import write_json
    from ..models import shapes_av

    for key, value in STAGE_DEFAULTS[args.stage].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.out = args.out or DEFAULT_OUT[args.stage]
    check_args(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    started = time.time()
    model = shapes_av.load_checkpoint(args.init) if args.init else shapes_av.ShapesAVEncoder(parse_arch(args.arch))
    val = load_shapes_av("val:250") if args.eval_every else None
    general = args.stage == "general"
    pixels, logmels = training_features(args.train_clips, args.views, general, args.seed, model.config,
                                        args.cache_dir, args.workers)
    print(f"features of {len(pixels)} training clips x {logmels.shape[1]} soundtracks in "
          f"{time.time() - started:.0f}s", flush=True)

    optimizer = make_optimizer(model, args.lr, args.weight_decay)
    generator = torch.Generator().manual_seed(args.seed)
    order = torch.empty(0, dtype=torch.long)
    recent = []
    bar = tqdm(range(args.steps), desc=f"train-av {args.stage}", disable=not args.progress, mininterval=5)
    for step in bar:
        if len(order) < args.batch_size:
            order = torch.randperm(len(pixels), generator=generator)
        idx, order = order[:args.batch_size], order[args.batch_size:]
        view = torch.randint(logmels.shape[1], (len(idx),), generator=generator)
        frames = pixels[idx].float() / 255
        if general:
            frames = vary_video(frames, generator)
        videos = (frames - model.mean) / model.std
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, args.steps, args.lr, args.warmup)
        loss = train_step(model, optimizer, videos, logmels[idx, view].float())
        bar.set_postfix(loss=f"{loss:.3f}", refresh=False)
        recent.append(loss)
        if (step + 1) % 100 == 0:
            print(f"step {step + 1}: loss {np.mean(recent):.3f} ({(time.time() - started) / 60:.1f} min)", flush=True)
            recent = []
        if args.eval_every and (step + 1) % args.eval_every == 0 and step + 1 < args.steps:
            r = evaluate_clean(model, val)
            print(f"step {step + 1}: val R@1 v2a {r['v2a']['r1']:.1f}  a2v {r['a2v']['r1']:.1f}", flush=True)

    minutes = (time.time() - started) / 60
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    shapes_av.save_checkpoint(model, args.out)
    written = shapes_av.load_checkpoint(args.out)  # evaluate exactly what was written
    test = load_shapes_av(f"test:{args.test_clips}")
    result = evaluate_clean(written, test)
    noises = evaluate_audio_noises(written, test) if args.stage == "custom" else None
    info = {
        "model": "shapes-av", "config": model.config, "stage": args.stage,
        "init": os.path.basename(args.init) if args.init else None,
        "data": f"shapes-av:train:{args.train_clips}", "views": logmels.shape[1], "seed": args.seed,
        "steps": args.steps, "batch_size": args.batch_size, "lr": args.lr, "weight_decay": args.weight_decay,
        "warmup": args.warmup, "threads": torch.get_num_threads(), "train_minutes": round(minutes, 1),
        "torch": torch.__version__, "checkpoint_bytes": os.path.getsize(args.out), "clean_test": result,
        "a2v_audio_noise_test": noises,
    }
    write_json(os.path.splitext(args.out)[0] + ".json", info)
    print(f"wrote {args.out} ({info['checkpoint_bytes'] / 1e6:.1f} MB) after {minutes:.1f} min")
    for direction in ("v2a", "a2v"):
        m = result[direction]
        print(f"clean {direction}: R@1 {m['r1']:.2f}  R@5 {m['r5']:.2f}  R@10 {m['r10']:.2f}")
    for shift, m in (noises or {}).items():
        print(f"a2v with {shift} on the audio queries: R@1 {m['r1']:.2f}")
    return 0
