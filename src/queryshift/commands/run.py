"""``queryshift run``: one online adaptation stream, written to ``--out``."""

from __future__ import annotations

import argparse
import dataclasses
import sys

from ..engine import RunConfig, format_table, run
from ..methods.hparams import RawText


def _hparam(text: str):
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key, RawText(value)  # typed by the method's hparam_spec (a string hparam keeps "off" as text)


def lr_help() -> str:
    """The --lr help, from the rates a run resolves (``models.protocol_lr``), so that it says what runs record."""
    from .. import models

    def own(model: str) -> str:  # the methods' own rates on the backbone, grouped by rate
        groups: dict[float, list[str]] = {}
        for method, rate in models.METHOD_LR.get(model, {}).items():
            groups.setdefault(rate, []).append(method)
        listed = "; ".join(f"{rate:g} {', '.join(names)}" for rate, names in groups.items())
        # brackets, not parentheses: the help's default is read up to its first ')'
        return f" [or the method's own rate: {listed}]" if listed else ""

    chosen = "; ".join(f"{rate:g} for {model}{own(model)}" for model, rate in models.PROTOCOL_LR.items())
    return (f"learning rate (default: the backbone's protocol rate, recorded in result.json: {chosen}; "
            f"{models.spec_default_lr('hf-blip', True):g} for BLIP text queries; "
            f"{models.spec_default_lr('', False):g} otherwise)")


def add_run_options(p: argparse.ArgumentParser) -> None:
    """Options shared by ``run`` and ``bench``; every default is None so a YAML config can supply it."""
    g = p.add_argument_group("run settings (override --config)")
    g.add_argument("--model", help="backbone: openclip:<arch>/<tag>, openclip:<arch>@<ckpt>, openclip:<arch>/random, "
                                   "hf-blip:<id or dir>, hf-clip:<id or dir>, shapes-clip, shapes-av, ... (see "
                                   "'queryshift list'; default: shapes-clip)")
    g.add_argument("--data", help="dataset: a Karpathy JSON, a JSONL/CSV of image,caption[,group], or a named "
                                  "dataset such as 'shapes' or 'shapes-av' (default: shapes)")
    g.add_argument("--image-root", dest="image_root", help="folder the dataset's image paths are relative to")
    g.add_argument("--composer", help="c2i only: how the reference image and the text fuse: sum, combiner:<file> "
                                      "(queryshift train-combiner) or shapes-cir (default: the model's own, else sum)")
    g.add_argument("--batch-size", dest="batch_size", type=int, help="queries per online batch (default 64)")
    g.add_argument("--seed", type=int, help="seed of the query order, the shifts and random models (default 42)")
    g.add_argument("--steps", type=int, help="optimisation steps per batch (default 3)")
    g.add_argument("--record", choices=["first", "last"], help="record the first or last step's scores (default last)")
    g.add_argument("--optimizer", choices=["adamw", "adam", "sgd"], help="default adamw")
    g.add_argument("--lr", type=float, help=lr_help())
    g.add_argument("--weight-decay", dest="weight_decay", type=float, help="default 1e-4")
    g.add_argument("--hparam", action="append", type=_hparam, metavar="KEY=VALUE",
                   help="method hyper-parameter, repeatable (e.g. --hparam tau=0.01)")
    g.add_argument("--include-final-ln", dest="include_final_ln", action="store_const", const=True,
                   help="also adapt the text tower's final LayerNorm (excluded by the TCR code)")
    g.add_argument("--on-nonfinite", dest="on_nonfinite", choices=["skip", "raise"],
                   help="a NaN/inf loss skips that update (default) or stops the run; NaN/inf scores always stop "
                        "it (they cannot be ranked)")
    g.add_argument("--max-queries", dest="max_queries", type=int, help="only the first N queries of the stream")
    g.add_argument("--no-shuffle", dest="shuffle", action="store_const", const=False,
                   help="stream queries in dataset order")
    g.add_argument("--skip-bad-images", dest="skip_bad_images", action="store_const", const=True,
                   help="drop unreadable images (reported in result.json) instead of stopping")
    g.add_argument("--eval-clean-after", dest="eval_clean_after", action="store_const", const=True,
                   help="after the stream, measure forgetting on clean queries")
    g.add_argument("--eval-general-after", dest="eval_general_after", action="store_const", const=True,
                   help="after the stream, measure forgetting on each general-domain style of the query modality "
                        "(i2t: style:outline, style:dark, style:texture; t2i: style:synonyms, style:templates)")
    g.add_argument("--max-words", dest="max_words", type=int, help="caption truncation (default 30)")
    g.add_argument("--cache-dir", dest="cache_dir", help="gallery embedding cache (default ~/.cache/queryshift)")
    g.add_argument("--num-workers", dest="num_workers", type=int,
                   help="item loading worker processes (default: min(4, cores - 1) for image, video and audio "
                        "streams of 8+ batches, else 0)")
    g.add_argument("--device", help="torch device (default cpu)")
    g.add_argument("--threads", type=int,
                   help="intra-op CPU threads of the run (default 1); results are reproducible for a given value, "
                        "whatever --jobs or OMP_NUM_THREADS, and may differ in the last bits between values")
    g.add_argument("--precision", choices=["fp32", "bf16", "fp16"],
                   help="query tower forward in mixed precision (autocast; loss and statistics stay fp32); "
                        "default fp32")
    g.add_argument("--gallery-index", dest="gallery_index", metavar="KIND[:K=V,...]",
                   help="candidate search for top-k answers: exact (default, chunked matmul), faiss-flat, faiss-hnsw "
                        "or faiss-ivf (needs faiss-cpu/faiss-gpu), e.g. faiss-ivf:nprobe=64; metrics stay exact and "
                        "result.json reports the index's recall@10 against exact search")
    g.add_argument("--no-progress", dest="progress", action="store_const", const=False, help="hide progress bars")


def config_from_args(args: argparse.Namespace, extra: dict | None = None) -> RunConfig:
    values: dict = {}
    if getattr(args, "config", None) is not None and not args.config.strip():
        raise ValueError("--config is an empty string; give a YAML file or leave it out")
    if getattr(args, "config", None):
        from ..configs import load_run_config

        values.update(load_run_config(args.config))
    fields = {f.name for f in dataclasses.fields(RunConfig)}
    for name in fields:
        v = getattr(args, name, None)
        if v is not None and name != "hparams":
            values[name] = v
    if getattr(args, "hparam", None):
        values["hparams"] = {**values.get("hparams", {}), **dict(args.hparam)}
    values.update(extra or {})
    return RunConfig.from_dict(values, source=getattr(args, "config", None) or "command line")


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "run", help="adapt a model online on one query stream and write DIR/result.json",
        description="Stream the queries of a dataset in batches through a test-time adaptation method, "
                    "against a gallery encoded once by the source model. Writes OUT/result.json (r1 r5 r10 "
                    "r_mean map, config, seed, versions, git commit), OUT/log.jsonl (one line per batch), "
                    "OUT/table.md, and a checkpoint that --resume continues from.")
    p.add_argument("--config", help="YAML file of run settings; command-line options override it")
    p.add_argument("--direction",
                   help="<query>2<gallery> among the model's towers, letters i image, t text, a audio, v video: "
                        "i2t image queries; t2i text queries; c2i composed queries, a reference image plus a "
                        "modification text, against images; v2a video queries against sounds, a2v, a2t, t2a, ... "
                        "(default i2t; a direction the model cannot run names the ones it can)")
    p.add_argument("--method", help="adaptation method, see 'queryshift list' (default source)")
    p.add_argument("--shift", help="query shift NAME:SEVERITY, a domain style or a stream (default: clean); a "
                                   "shift of the gallery's modality only (e.g. traffic:5 in v2a) corrupts the "
                                   "gallery items instead, the queries stay clean (result.json shift_side)")
    p.add_argument("--out", help="output directory")
    p.add_argument("--resume", action="store_const", const=True, help="continue the interrupted run in --out")
    p.add_argument("--overwrite", action="store_const", const=True, help="discard a previous run in --out")
    add_run_options(p)
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    result = run(config_from_args(args))
    if "r1" not in result:  # a rank > 0 of a data-parallel run: rank 0 reports
        return 0
    print(format_table([result]))
    if "r50" in result:  # composed queries: CIRR / FashionIQ report R@50 (and CIRR Recall_subset@K)
        extra = ["r50"] + [k for k in ("rsubset1", "rsubset2", "rsubset3") if k in result]
        print("  ".join(f"{k} {result[k]:.2f}" for k in extra))
    if "forgetting" in result:
        f = result["forgetting"]
        print(f"forgetting (clean R@1 after - source): {f['forgetting']:+.2f} "
              f"({f['r1_after']:.2f} vs {f['r1_source']:.2f})")
    for style, f in result.get("forgetting_general", {}).items():
        print(f"forgetting ({style} R@1 after - source): {f['forgetting']:+.2f} "
              f"({f['r1_after']:.2f} vs {f['r1_source']:.2f})")
    if args.out:
        print(f"wrote {args.out}/result.json")
    else:
        print("queryshift run: note: no --out given, so nothing was written; pass --out DIR to keep result.json, "
              "the per-batch log and a checkpoint", file=sys.stderr)
    return 0
