"""Step time of each method relative to ``source`` and to one forward+backward of the query tower.

Methods: source, tent, tcr and rest at their defaults (``--methods``; ``NAME:KEY=VALUE,...`` sets
hyper-parameters, and with ``QUERYSHIFT_PLUGINS=lab`` the lab's ``rest-design`` candidates can be timed too).

For each backbone, one batch of real shifted queries (``--shift``) is adapted on again and again with
``steps=1``; every round times one step of each method in turn (source, the floor, tent, tcr, rest), so
that machine noise hits all alike, and the medians are compared. The floor is what any gradient method
must pay: the query tower's forward and backward with the adapted LayerNorm parameters (``q.sum()`` as the
loss, no optimizer). Methods first run ``--warmup`` steps so that TCR/REST queues are full and frozen,
as in most of a stream.

Backbones: ``shapes-clip`` (the bundled checkpoint) at ``--batch-size`` (64), and a random ViT-B/16 CLIP
(``openclip:ViT-B-16/random``) at ``--big-batch-size`` (4) with ``--big-methods`` (source, tent, tcr, rest)
after ``--big-warmup`` (12) steps, unless ``--no-big``. Ends with one JSON line
holding ``rest_over_tcr`` (after the warm-up), ``rest_over_tcr_warmup`` (during it) and ``tcr_over_fwdbwd``
(shapes-clip), and every measured median.

Whole streams: a fresh method adapts on the first ``--stream-queries`` (1,000: the whole test split, 15 batches of
64 and one of 40) with the protocol's 3 steps a batch, warm-up included (the queue's first 10 batches, where REST
also estimates its Fisher), tcr and rest in turn for ``--stream-rounds`` rounds; ``rest_over_tcr_stream`` is the
ratio of the medians.

    python benchmarks/step_time.py [--rounds 30] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from queryshift import methods, shifts
from queryshift.data import load_dataset
from queryshift.engine import encode_all, load_source
from queryshift.engine.stream import QueryItems, collate, to_model_input

QUEUE_BATCHES = 10  # the queue's warm-up (TCR and REST defaults): steps=1, so the first 10 steps

METHODS = ("source", "tent", "tcr", "rest")


def query_batch(model, dataset, modality: str, batch_size: int, shift: str, start: int = 0):
    order = list(range(start, start + batch_size))
    items = QueryItems(dataset, modality, order, shifts.build(shift, modality, 0), 0, model, 30)
    return to_model_input(model, modality, collate([items[i] for i in range(batch_size)])[2], "cpu")


def floor_model(spec: str, modality: str):
    """The source model set up as the gradient methods set it up: eval mode, only the query tower's
    LayerNorm affine parameters trainable."""
    model = load_source(spec, 0)
    model.eval()
    model.requires_grad_(False)
    params = [p for _, p in model.adaptable_parameters(modality, False)]
    for p in params:
        p.requires_grad_(True)
    return model, params


def fwd_bwd(model, params, modality: str, batch):
    """The floor: forward and backward through the query tower with the adapted parameters."""
    model.encode(modality, batch).sum().backward()
    for p in params:
        p.grad = None


def build(name: str, spec: str, gallery, modality: str, steps: int):
    """A fresh method on a freshly loaded (same seeded) source model; ``name`` may carry ``:KEY=VALUE,...``."""
    model = load_source(spec, 0)
    method_name, _, options = name.partition(":")
    hparams = dict(o.split("=") for o in options.split(",")) if options else {}
    return methods.get(method_name)(model, gallery, modality, methods.AdaptConfig(steps=steps, hparams=hparams))


def measure_streams(spec: str, batch_size: int, n_queries: int, rounds: int, direction: str, shift: str) -> dict:
    """Median seconds of a whole fresh stream (warm-up included, 3 steps a batch) for tcr and rest."""
    dataset = load_dataset("shapes")
    modality = "image" if direction == "i2t" else "text"
    model = load_source(spec, 0)
    gallery = encode_all(model, dataset, "text" if modality == "image" else "image", batch_size=256)
    batches = [query_batch(model, dataset, modality, min(batch_size, n_queries - start), shift, start=start)
               for start in range(0, n_queries, batch_size)]
    times: dict[str, list[float]] = {"tcr": [], "rest": []}
    for _ in range(rounds):
        for name in times:
            method = build(name, spec, gallery, modality, steps=3)
            t0 = time.perf_counter()
            for batch in batches:
                method.step(batch)
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(t) for name, t in times.items()}


def measure(spec: str, batch_size: int, rounds: int, warmup: int, direction: str, shift: str,
            names: tuple[str, ...] = METHODS) -> dict:
    dataset = load_dataset("shapes")
    modality = "image" if direction == "i2t" else "text"
    runners = {}
    gallery = None
    for name in names:
        if gallery is None:  # encoded once per backbone
            gallery = encode_all(load_source(spec, 0), dataset, "text" if modality == "image" else "image",
                                 batch_size=256)
        runners[name] = build(name, spec, gallery, modality, steps=1).step
    floor, params = floor_model(spec, modality)
    batch = query_batch(floor, dataset, modality, batch_size, shift)
    runners["fwd+bwd"] = lambda x: fwd_bwd(floor, params, modality, x)
    # the warm-up steps are timed too: while the queue fills (its first QUEUE_BATCHES batches) REST's K5 also
    # estimates its Fisher, so those steps cost more; they are reported apart, not in the ratios
    warm: dict[str, list[float]] = {name: [] for name in runners}
    for name, fn in runners.items():
        for _ in range(warmup):
            t0 = time.perf_counter()
            fn(batch)
            warm[name].append(time.perf_counter() - t0)
    times: dict[str, list[float]] = {name: [] for name in runners}
    for _ in range(rounds):
        for name, fn in runners.items():
            t0 = time.perf_counter()
            fn(batch)
            times[name].append(time.perf_counter() - t0)
    medians = {name: statistics.median(t) for name, t in times.items()}
    medians.update({f"{name}_warmup": statistics.median(t[:QUEUE_BATCHES]) for name, t in warm.items() if t})
    return medians


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=30)
    p.add_argument("--warmup", type=int, default=12, help="steps before timing (TCR's queue freezes after 10)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--big-batch-size", type=int, default=4)
    p.add_argument("--big-rounds", type=int, default=5)
    p.add_argument("--big-warmup", type=int, default=12,
                   help="ViT-B/16 steps before timing; fewer than 10 times REST inside the queue's warm-up")
    p.add_argument("--methods", default=",".join(METHODS), help="methods timed on shapes-clip (comma-separated; "
                   "source and tcr are needed for the ratios)")
    p.add_argument("--big-methods", default="source,tent,tcr,rest", help="methods timed on ViT-B/16")
    p.add_argument("--stream-queries", type=int, default=1000, help="queries of a whole stream (0: skip)")
    p.add_argument("--stream-rounds", type=int, default=3)
    p.add_argument("--no-big", dest="big", action="store_false", help="skip the ViT-B/16 backbone")
    p.add_argument("--direction", choices=["i2t", "t2i"], default="i2t")
    p.add_argument("--shift", default="gaussian_noise:3", help="query shift of the batch (image queries)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    shift = args.shift if args.direction == "i2t" else "RandomCharAug_swap:3"
    methods.load_plugins()
    names = tuple(args.methods.split(","))
    big_methods = tuple(args.big_methods.split(","))
    for option, chosen in (("--methods", names), ("--big-methods", big_methods)):
        unknown = [m for m in chosen if m.partition(":")[0] not in methods.available()]
        if unknown or not {"source", "tcr"} <= set(chosen):  # the ratios are taken against these
            p.error(f"{option}: unknown {unknown} or source/tcr missing; choose from {', '.join(methods.available())}")
    backbones = [("shapes-clip", args.batch_size, args.rounds, args.warmup, names)]
    if args.big:
        backbones.append(("openclip:ViT-B-16/random", args.big_batch_size, args.big_rounds, args.big_warmup,
                          big_methods))
    result: dict = {"threads": args.threads, "direction": args.direction, "shift": shift}
    print(f"median step time, steps=1, {args.threads} threads, {args.direction}, shift {shift}")
    print("| backbone | batch | method | ms/step | x source | x fwd+bwd | x tcr | warm-up ms/step | warm-up x tcr |")
    print("|---|---|---|---|---|---|---|---|---|")
    for spec, batch_size, rounds, warmup, names in backbones:
        med = measure(spec, batch_size, rounds, warmup, args.direction, shift, names)
        for name in ("fwd+bwd", *names):
            warm, warm_ratio = "-", "-"
            if name + "_warmup" in med:
                warm = f"{1000 * med[name + '_warmup']:.1f}"
                warm_ratio = f"{med[name + '_warmup'] / med['tcr_warmup']:.2f}"
            print(f"| {spec} | {batch_size} | {name} | {1000 * med[name]:.1f} | {med[name] / med['source']:.2f} | "
                  f"{med[name] / med['fwd+bwd']:.2f} | {med[name] / med['tcr']:.2f} | {warm} | {warm_ratio} |")
        result[spec] = {"batch": batch_size, "rounds": rounds,
                        **{f"{k}_ms": round(1000 * v, 2) for k, v in med.items()}}
        if spec == "shapes-clip":
            for name in names:
                if name not in ("source", "tcr"):  # rest_over_tcr; a variant's key spells its options
                    key = name.replace(":", "_").replace("=", "_").replace(",", "_").replace("-", "_")
                    result[f"{key}_over_tcr"] = round(med[name] / med["tcr"], 3)
                    if f"{name}_warmup" in med:  # the queue's warm-up steps (REST: its Fisher too)
                        result[f"{key}_over_tcr_warmup"] = round(med[f"{name}_warmup"] / med["tcr_warmup"], 3)
            result["tcr_over_fwdbwd"] = round(med["tcr"] / med["fwd+bwd"], 3)
    if args.stream_queries:
        whole = measure_streams("shapes-clip", args.batch_size, args.stream_queries, args.stream_rounds,
                                args.direction, shift)
        print(f"\nwhole fresh stream of {args.stream_queries} queries x 3 steps (warm-up included), shapes-clip: "
              f"tcr {whole['tcr']:.2f} s, rest {whole['rest']:.2f} s, rest / tcr {whole['rest'] / whole['tcr']:.2f}")
        result["stream_s"] = {k: round(v, 3) for k, v in whole.items()}
        result["rest_over_tcr_stream"] = round(whole["rest"] / whole["tcr"], 3)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
