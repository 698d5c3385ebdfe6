"""Ranking queries against a web-scale gallery: exact chunked ranking vs faiss candidate search.

A synthetic gallery of ``--gallery`` unit vectors of ``--dim`` dimensions is written to an fp16
memory-mapped store (the format of ``engine.gallery``); vectors are drawn around ``--clusters`` centres,
as real embeddings cluster. Each query is a noisy copy of one gallery item, its only relevant item.

- exact: :func:`queryshift.engine.ranking.rank_gallery` — the exact rank and AP of every query against
  every gallery item, chunk by chunk from the store (never the queries x gallery matrix); also the exact
  top-10 search (:class:`ExactIndex`) that the approximate indexes are measured against;
- each faiss index (fp16 vectors, inner product): build time, search time for the top-10 of all queries,
  and recall@10 against the exact top-10; ``speedup`` = exact ranking seconds / index search seconds.

Peak memory is the resident-set growth during each measured block, sampled every 2 ms (the store's pages
count once they are read). Ends with one JSON line.

    python benchmarks/gallery_scale.py --gallery 1000000 --queries 1000 --dim 512
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import numpy as np
import torch
from engine_memory import PeakRSS  # benchmarks/ is on sys.path when this script runs

from queryshift.engine.gallery_index import KINDS, ExactIndex, build_index, build_key, parse_spec, recall_at_k
from queryshift.engine.ranking import rank_gallery


def write_store(path: str, n: int, dim: int, clusters: int, seed: int, chunk: int = 65536) -> np.ndarray:
    """Clustered unit vectors in an fp16 memory-mapped file, written chunk by chunk; returns the centres."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, dim)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    store = np.lib.format.open_memmap(path, mode="w+", dtype=np.float16, shape=(n, dim))
    for start in range(0, n, chunk):
        m = min(chunk, n - start)
        x = centres[rng.integers(0, clusters, m)] + 0.7 / np.sqrt(dim) * rng.standard_normal((m, dim), np.float32)
        store[start:start + m] = x / np.linalg.norm(x, axis=1, keepdims=True)
    store.flush()
    del store
    return centres


def make_queries(store: np.ndarray, n: int, seed: int) -> tuple[torch.Tensor, list[list[int]]]:
    rng = np.random.default_rng(seed + 1)
    targets = np.sort(rng.choice(store.shape[0], size=n, replace=False))
    x = store[targets].astype(np.float32) + 0.5 / np.sqrt(store.shape[1]) * rng.standard_normal(
        (n, store.shape[1]), np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    # float32 as a query tower emits (NumPy promotes x to float64 through the float64 noise scale above)
    return torch.from_numpy(x.astype(np.float32)), [[int(t)] for t in targets]


# IVF at the default and at 4096 lists with 16 down to 2 probes (one build); faiss-flat (faiss's own BLAS, minutes at 1M
# on this machine) and faiss-hnsw (a long build at 1M) are left to --indexes
DEFAULT_INDEXES = ("faiss-ivf,faiss-ivf:nlist=4096,nprobe=16,faiss-ivf:nlist=4096,nprobe=8,"
                   "faiss-ivf:nlist=4096,nprobe=4,faiss-ivf:nlist=4096,nprobe=2")


def split_specs(text: str) -> list[str]:
    """``"faiss-ivf:nlist=4096,nprobe=4,faiss-hnsw"`` -> one spec per index: a comma separates two specs only
    where the next item names an index kind; otherwise it separates the parameters of one spec."""
    specs: list[str] = []
    for item in filter(None, text.split(",")):
        if specs and item.partition(":")[0] not in KINDS:
            specs[-1] += "," + item
        else:
            specs.append(item)
    return specs


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--gallery", type=int, default=1_000_000)
    p.add_argument("--queries", type=int, default=1000)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--clusters", type=int, default=1000)
    p.add_argument("--indexes", default=DEFAULT_INDEXES,
                   help="comma-separated --gallery-index specs to compare with exact ranking (specs that "
                        "differ only in nprobe / ef_search share one build)")
    p.add_argument("--threads", type=int, default=2, help="torch and faiss threads")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dir", help="where to write the store (default: a temporary directory)")
    p.add_argument("--store", help="keep the generated store at this .npy path and reuse it when it exists")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    try:
        import faiss

        faiss.omp_set_num_threads(args.threads)
    except ImportError:
        faiss = None

    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        path = args.store or os.path.join(tmp, "gallery.npy")
        if not (args.store and os.path.exists(path)
                and np.load(path, mmap_mode="r").shape == (args.gallery, args.dim)):
            t0 = time.perf_counter()
            write_store(path, args.gallery, args.dim, args.clusters, args.seed)
            print(f"wrote {args.gallery} x {args.dim} fp16 store ({os.path.getsize(path) / 2**20:.0f} MB) "
                  f"in {time.perf_counter() - t0:.1f} s", flush=True)
        store = np.load(path, mmap_mode="r+")  # writable map (torch wants one); nothing writes to it
        queries, relevant = make_queries(store, args.queries, args.seed)
        gallery = torch.from_numpy(store)  # a view of the memory map, no copy; fp16
        del store

        with PeakRSS() as mem:
            t0, c0 = time.perf_counter(), time.process_time()
            ranks, aps = rank_gallery(queries, gallery, relevant)
            exact_seconds, exact_cpu = time.perf_counter() - t0, time.process_time() - c0
        print(f"exact ranking: {exact_seconds:.1f} s (CPU {exact_cpu:.1f} s), peak extra {mem.extra_mb:.0f} MB",
              flush=True)
        t0, c0 = time.perf_counter(), time.process_time()
        exact_top = ExactIndex(gallery).search(queries, 10)[1]
        exact_search_seconds, search_cpu = time.perf_counter() - t0, time.process_time() - c0
        print(f"exact top-10 search: {exact_search_seconds:.1f} s (CPU {search_cpu:.1f} s)", flush=True)
        result = {
            "gallery": args.gallery, "queries": args.queries, "dim": args.dim, "threads": args.threads,
            "exact_seconds": round(exact_seconds, 3), "exact_peak_extra_mb": round(mem.extra_mb, 1),
            "exact_search_seconds": round(exact_search_seconds, 3),
            # CPU seconds of this process (all its threads): on a shared machine, wall time also counts the
            # time other jobs held the cores
            "exact_cpu_seconds": round(exact_cpu, 3), "exact_search_cpu_seconds": round(search_cpu, 3),
            "load_average": [round(x, 2) for x in os.getloadavg()],
            "exact_r1": round(100 * float(np.mean(np.asarray(ranks) < 1)), 2),
            "exact_map": round(100 * float(np.mean(aps)), 2),
        }
        rows = [("exact ranking (ranks + AP)", "-", exact_seconds, exact_cpu, mem.extra_mb, "1.000", "1.0")]
        rows.append(("exact top-10 search", "-", exact_search_seconds, search_cpu, float("nan"), "1.000",
                     f"{exact_seconds / exact_search_seconds:.1f}"))
        built = None  # (build key, index, build MB): specs that differ only in nprobe/ef_search share a build
        for spec in split_specs(args.indexes):
            if faiss is None:
                print(f"skipping {spec}: faiss is not installed (pip install 'queryshift[index]')")
                continue
            if built is not None and built[0] == build_key(spec):
                index, build_mb = built[1], built[2]
                index.set_search(parse_spec(spec)[1])
            else:
                built = index = None  # free the previous index before building the next
                with PeakRSS() as build_mem:
                    index = build_index(spec, gallery)
                build_mb = build_mem.extra_mb
                built = (build_key(spec), index, build_mb)
            with PeakRSS() as search_mem:
                t0, c0 = time.perf_counter(), time.process_time()
                top = index.search(queries, 10)[1]
                seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
            recall = recall_at_k(top, exact_top)
            print(f"{spec}: build {index.build_seconds:.1f} s, search {seconds:.2f} s, recall@10 {recall:.3f}",
                  flush=True)
            result[spec] = {"seconds": round(seconds, 4), "cpu_seconds": round(cpu, 4),
                            "recall_at_10": round(recall, 4),
                            "build_seconds": round(index.build_seconds, 1),
                            "index_mb": round(build_mb, 1), "search_peak_extra_mb": round(
                                search_mem.extra_mb, 1), "speedup": round(exact_seconds / seconds, 1)}
            rows.append((spec, f"{index.build_seconds:.1f}", seconds, cpu, build_mb, f"{recall:.3f}",
                         f"{exact_seconds / seconds:.1f}"))
            index = None

    print(f"\n{args.queries} queries x {args.gallery} gallery items x {args.dim} dims, {args.threads} threads, "
          f"load average {' '.join(f'{x:.1f}' for x in os.getloadavg())}")
    print("| method | build s | seconds | CPU s | peak extra MB | recall@10 | speed-up vs exact ranking |")
    print("|---|---|---|---|---|---|---|")
    for name, build, sec, cpu, mb, rec, speed in rows:
        print(f"| {name} | {build} | {sec:.3f} | {cpu:.1f} | {mb:.0f} | {rec} | {speed} |")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
