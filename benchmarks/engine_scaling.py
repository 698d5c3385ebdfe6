"""How the engine scales: peak memory vs the number of queries, vs the gallery size and per
``--gallery-index`` kind, and 2-process vs 1-process throughput of data-parallel adaptation.

Synthetic text queries against a gallery of generated images (``engine_memory.synthetic``) with the tiny
random open_clip architecture, direction t2i. Memory: peak resident-set growth of ``engine.run`` (source
method) after a warm-up run that fills the gallery store. Per ``--gallery-index`` kind (each run builds its
own index) the same runs at the smallest and largest query count: the engine's extra memory should be the
exact path's plus the index, flat in the queries. Throughput: ``tcr`` on the same stream in one process with
``--threads`` threads and in ``--threads`` gloo processes with one thread each (same global batch), queries
per second of the stream loop. Ends with one JSON line.

    python benchmarks/engine_scaling.py [--queries 2000,4000,8000] [--galleries 1000,2000,4000]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import tempfile
import time

import torch
import torch.multiprocessing as mp
from engine_memory import PeakRSS, synthetic  # benchmarks/ is on sys.path when this script runs
from gallery_scale import split_specs

from queryshift import data, engine


def register(n_images: int, captions: int) -> str:
    name = f"scaling-{n_images}-{captions}"
    dataset = synthetic(n_images, captions)
    data.DATASETS[name] = lambda arg, image_root=None: dataset
    return name


def peak_mb(name: str, cache: str, batch_size: int, gallery_index: str = "exact") -> float:
    cfg = engine.RunConfig(model="openclip:qs-tiny/random", data=name, direction="t2i", method="source",
                           batch_size=batch_size, cache_dir=cache, progress=False, gallery_index=gallery_index)
    engine.run(cfg)  # warm-up: fills the gallery store, loads libraries
    with PeakRSS() as mem:
        engine.run(cfg)
    return mem.extra_mb


def _rank(rank: int, world: int, port: int, cfg: dict, threads: int, out: dict) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(threads)
    register(cfg.pop("n_images"), cfg.pop("captions"))
    t0 = time.perf_counter()
    result = engine.run(engine.RunConfig(**cfg))
    if rank == 0:
        out["seconds"] = time.perf_counter() - t0
        out["r1"] = result["r1"]
    torch.distributed.destroy_process_group()


def throughput(n_images: int, captions: int, cache: str, batch_size: int, threads: int) -> dict:
    name = register(n_images, captions)
    cfg = dict(model="openclip:qs-tiny/random", data=name, direction="t2i", method="tcr", steps=1,
               batch_size=batch_size, cache_dir=cache, progress=False)
    engine.run(engine.RunConfig(**cfg, max_queries=batch_size))  # fills the gallery store
    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    one = engine.run(engine.RunConfig(**cfg, threads=threads))  # a run pins its own thread count (default 1)
    seconds_one = time.perf_counter() - t0
    with mp.Manager() as manager:
        out = manager.dict()
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        mp.spawn(_rank, args=(threads, port, {**cfg, "n_images": n_images, "captions": captions}, 1, out),
                 nprocs=threads, join=True)
        out = dict(out)
    queries = n_images * captions
    return {"queries": queries, "one_process_qps": round(queries / seconds_one, 1),
            "processes": threads, "multi_process_qps": round(queries / out["seconds"], 1),
            "speedup": round(seconds_one / out["seconds"], 2), "same_r1": one["r1"] == out["r1"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--queries", default="2000,4000,8000", help="query counts (gallery fixed at --gallery)")
    p.add_argument("--gallery", type=int, default=1000)
    p.add_argument("--galleries", default="1000,2000,4000", help="gallery sizes (queries fixed at the largest)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--throughput-gallery", type=int, default=500)
    p.add_argument("--indexes", default="exact,faiss-flat,faiss-hnsw,faiss-ivf:nlist=16,nprobe=4",
                   help="--gallery-index kinds measured at the smallest and largest of --queries ('' = none)")
    p.add_argument("--parts", default="queries,gallery,indexes,throughput",
                   help="which measurements to run (comma-separated subset of the default)")
    args = p.parse_args()
    parts = set(args.parts.split(","))
    if unknown := parts - {"queries", "gallery", "indexes", "throughput"}:
        p.error(f"--parts: unknown {sorted(unknown)}; choose from queries, gallery, indexes, throughput")
    torch.set_num_threads(args.threads)
    result: dict = {"by_queries": [], "by_gallery": [], "by_index": []}
    counts = [int(q) for q in args.queries.split(",")]
    with tempfile.TemporaryDirectory() as cache:
        if "queries" in parts:
            for q in counts:
                mb = peak_mb(register(args.gallery, q // args.gallery), cache, args.batch_size)
                result["by_queries"].append({"queries": q, "gallery": args.gallery, "peak_extra_mb": round(mb, 1)})
        if "gallery" in parts:
            sizes = [int(n) for n in args.galleries.split(",")]
            for n in sizes:
                captions = max(sizes) // n
                mb = peak_mb(register(n, captions), cache, args.batch_size)
                result["by_gallery"].append({"queries": captions * n, "gallery": n, "peak_extra_mb": round(mb, 1)})
        if "indexes" in parts and args.indexes:
            for spec in split_specs(args.indexes):
                row = {"index": spec}
                for q in (min(counts), max(counts)):
                    mb = peak_mb(register(args.gallery, q // args.gallery), cache, args.batch_size, spec)
                    row[f"peak_extra_mb_{q}"] = round(mb, 1)
                result["by_index"].append(row)
        if "throughput" in parts:
            result["throughput"] = throughput(args.throughput_gallery, 4, cache, args.batch_size, args.threads)
    if result["by_queries"] or result["by_gallery"]:
        print("| queries | gallery | engine peak extra MB |")
        print("|---|---|---|")
        for row in result["by_queries"] + result["by_gallery"]:
            print(f"| {row['queries']} | {row['gallery']} | {row['peak_extra_mb']:.1f} |")
    if result["by_index"]:
        lo, hi = min(counts), max(counts)
        print(f"\n| --gallery-index | gallery | peak extra MB, {lo} queries | peak extra MB, {hi} queries |")
        print("|---|---|---|---|")
        for row in result["by_index"]:
            print(f"| {row['index']} | {args.gallery} | {row[f'peak_extra_mb_{lo}']:.1f} | "
                  f"{row[f'peak_extra_mb_{hi}']:.1f} |")
    if "throughput" in result:
        t = result["throughput"]
        print(f"\ntcr, {t['queries']} queries, batch {args.batch_size}: 1 process x {args.threads} threads "
              f"{t['one_process_qps']} queries/s; {t['processes']} processes x 1 thread {t['multi_process_qps']} "
              f"queries/s (x{t['speedup']}); same R@1: {t['same_r1']}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
