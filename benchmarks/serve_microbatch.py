"""R@1 of the answers ``queryshift serve`` gives, for micro-batch sizes 1, 4, 16, 64, against the offline protocol.

The offline protocol (``queryshift run``) adapts on each batch of 64 queries and scores those queries with
the parameters of its last step, i.e. after adapting on them. A server must answer each query when it
arrives, before any update that uses it: here every query is answered by ``OnlineService.answer`` with the
parameters in force at that moment, joins the memory bank, and an update runs as soon as ``M`` new queries
have arrived, on the newest ``--adapt-batch`` queries of the bank (the worker's rule). Updates run inline
(no worker thread) so the numbers do not depend on timing: this is the server whose worker keeps up with
the queries. The same shifted query stream (order, seed, shift) feeds every row and the offline run.

    PYTHONPATH=src OMP_NUM_THREADS=1 python benchmarks/serve_microbatch.py --method tcr --lr 3e-3 \\
        --shift gaussian_noise:3 --queries 1000
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import torch

from queryshift import shifts
from queryshift.engine import QueryItems, RunConfig, query_order, run
from queryshift.serve import OnlineService, ServeConfig


def served_r1(args, micro_batch: int, cache_dir: str, with_source: bool = False) -> dict:
    modality = "image" if args.direction == "i2t" else "text"
    cfg = ServeConfig(model=args.model, data=args.data, method=args.method, modalities=(modality,), seed=args.seed,
                      lr=args.lr, micro_batch=micro_batch, adapt_batch=max(args.adapt_batch, micro_batch),
                      bank_size=max(args.adapt_batch, micro_batch), max_wait=0.0, cache_dir=cache_dir,
                      progress=False)
    service = OnlineService(cfg, start_worker=False)
    _, n, relevance = service.dataset.query_items(args.direction)
    order = query_order(n, args.seed, True, args.queries)
    items = QueryItems(service.dataset, modality, order, shifts.build(args.shift, modality, args.seed), args.seed,
                       service.model, cfg.max_words)
    hits = source_hits = adapted_answers = 0
    t0 = time.time()
    for position in range(len(order)):
        _, index, item = items[position]
        if with_source:
            top = service.answer(modality, item, k=1, adapt=False)["results"][0]["id"]
            source_hits += top in relevance[index]
        answer = service.answer(modality, item, k=1)
        hits += answer["results"][0]["id"] in relevance[index]
        adapted_answers += answer["adapted"]
        service.run_pending()
    stats = service.stats()
    row = {"micro_batch": micro_batch, "adapt_batch": cfg.adapt_batch, "updates": stats["updates"],
           "skipped": stats["skipped_updates"], "resets": stats["resets"], "adapted_answers": adapted_answers,
           "r1": 100.0 * hits / len(order), "seconds": round(time.time() - t0, 1)}
    if with_source:
        row["source_r1"] = 100.0 * source_hits / len(order)
    return row


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="shapes-clip")
    p.add_argument("--data", default="shapes")
    p.add_argument("--direction", default="i2t", choices=["i2t", "t2i"])
    p.add_argument("--method", default="rest")
    p.add_argument("--lr", type=float)
    p.add_argument("--shift", default="gaussian_noise:3")
    p.add_argument("--queries", type=int, default=1000)
    p.add_argument("--adapt-batch", dest="adapt_batch", type=int, default=64)
    p.add_argument("--micro-batches", dest="micro_batches", default="1,4,16,64")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--cache-dir", dest="cache_dir")
    args = p.parse_args(argv)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    cache_dir = args.cache_dir or os.environ.get("QUERYSHIFT_CACHE") or tempfile.mkdtemp(prefix="qs-cache-")

    t0 = time.time()
    offline = run(RunConfig(model=args.model, data=args.data, direction=args.direction, method=args.method,
                            shift=args.shift, lr=args.lr, seed=args.seed, max_queries=args.queries,
                            cache_dir=cache_dir, progress=False))
    offline_seconds = round(time.time() - t0, 1)
    print(f"offline: r1 {offline['r1']:.2f}, {offline_seconds} s", file=sys.stderr, flush=True)
    sizes = sorted((int(m) for m in args.micro_batches.split(",")), reverse=True)  # cheapest first
    rows = []
    for i, m in enumerate(sizes):
        rows.append(served_r1(args, m, cache_dir, with_source=(i == 0)))
        print(f"served: {rows[-1]}", file=sys.stderr, flush=True)  # progress: the slow rows come last
    rows.reverse()
    source = rows[-1]["source_r1"]

    lr = args.lr if args.lr is not None else offline["lr"]
    print(f"# served R@1, {args.method} (lr {lr:g}), {args.data} {args.direction}, shift {args.shift}, "
          f"{args.queries} queries, seed {args.seed}, {torch.get_num_threads()} thread(s)\n")
    print("| answers | micro-batch M | queries per update | updates | skipped | collapse resets | R@1 | "
          "vs source | seconds |")
    print("|---|---|---|---|---|---|---|---|---|")
    print(f"| source parameters (no adaptation) | - | - | 0 | - | - | {source:.2f} | +0.00 | - |")
    for r in rows:
        print(f"| served, before the update that uses them | {r['micro_batch']} | {r['adapt_batch']} | "
              f"{r['updates']} | {r['skipped']} | {r['resets']} | {r['r1']:.2f} | {r['r1'] - source:+.2f} | "
              f"{r['seconds']} |")
    print(f"| offline protocol (`queryshift run`, batch 64, scores after adapting on the batch) | - | 64 | "
          f"{-(-args.queries // 64)} | {offline['skipped_updates']} | - | {offline['r1']:.2f} | "
          f"{offline['r1'] - source:+.2f} | {offline_seconds} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
