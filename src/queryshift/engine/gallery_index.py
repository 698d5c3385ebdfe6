"""Candidate search over the gallery: exact (chunked matmul, the default) or a faiss index for 1M+ items.

An index answers "the top-k gallery items of these queries"; it serves ``Retriever.search`` and the
recall report of ``run --gallery-index``. Metrics never use it: ranks for R@K and mAP stay exact
(:mod:`.ranking`). Spec strings: ``exact``, ``faiss-flat``, ``faiss-hnsw`` or ``faiss-ivf``, optionally
with parameters, e.g. ``faiss-hnsw:M=32,ef_search=128`` or ``faiss-ivf:nlist=1024,nprobe=32``.
faiss indexes score by inner product; HNSW and IVF store the vectors in fp16 (as the embedding store does),
flat in fp32 (faiss's BLAS search).
"""

from __future__ import annotations

import math
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

KINDS = ("exact", "faiss-flat", "faiss-hnsw", "faiss-ivf")
PARAMS = {
    "exact": {"chunk": 16384},
    "faiss-flat": {},
    "faiss-hnsw": {"M": 32, "ef_construction": 40, "ef_search": 128},
    "faiss-ivf": {"nlist": 0, "nprobe": 16, "train_size": 0, "kmeans_iters": 10},  # 0: from the gallery size
}
# parameters that only change how a built index is searched (no rebuild): see FaissIndex.set_search
SEARCH_PARAMS = {"faiss-hnsw": ("ef_search",), "faiss-ivf": ("nprobe",)}
# smallest value of each parameter (faiss aborts the process on an HNSW with M < 2, returns -1 ids for
# ef_search 0 and fails inside its search for nprobe 0); every value must also fit faiss's C int
MINIMUM = {"chunk": 1, "M": 2, "ef_construction": 1, "ef_search": 1, "nlist": 0, "nprobe": 1, "train_size": 0,
           "kmeans_iters": 0}
C_INT_MAX = 2**31 - 1


def parse_spec(spec: str) -> tuple[str, dict]:
    """``kind[:key=value,...]`` -> (kind, parameters with defaults filled in); clear errors for typos."""
    kind, _, rest = spec.partition(":")
    if kind not in KINDS:
        raise ValueError(f"gallery index {spec!r}: unknown kind {kind!r}; expected one of {', '.join(KINDS)}")
    params, given = dict(PARAMS[kind]), set()
    for item in filter(None, rest.split(",")):
        key, sep, value = item.partition("=")
        if not sep or key not in params:
            raise ValueError(f"gallery index {spec!r}: unknown parameter {item!r}; known: {sorted(params)}")
        if key in given:
            raise ValueError(f"gallery index {spec!r}: {key} is given twice")
        given.add(key)
        try:
            params[key] = int(value)
        except ValueError:
            raise ValueError(f"gallery index {spec!r}: {key} must be an integer, got {value!r}") from None
        check_param(spec, key, params[key])
    return kind, params


def check_param(spec: str, key: str, value: int) -> None:
    """ValueError unless ``value`` is a usable ``key`` (at least ``MINIMUM[key]``, at most a C int)."""
    low = MINIMUM[key]
    if not low <= value <= C_INT_MAX:
        auto = " (0: chosen from the gallery size)" if low == 0 and key in ("nlist", "train_size") else ""
        raise ValueError(f"gallery index {spec!r}: {key} must be an integer in [{low}, {C_INT_MAX}]{auto}, "
                         f"got {value}")


class ExactIndex:
    """Top-k by chunked matmul over the gallery: memory O(queries x chunk), exact scores.

    Only the first chunk goes through ``topk``; every later chunk only offers the columns scoring at least a
    row's current k-th best (a comparison and a ``nonzero``), merged by a stable sort, so ties keep gallery
    order. torch's CPU ``topk`` over a 1000 x 64k block cost several times the block's matmul.
    """

    kind = "exact"

    def __init__(self, gallery: torch.Tensor, chunk: int = 16384):
        self.gallery, self.chunk = gallery, int(chunk)
        self.build_seconds = 0.0

    @torch.no_grad()
    def search(self, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        n = self.gallery.shape[0]
        k = min(k, n)
        best_s = best_i = None
        for start in range(0, n, self.chunk):
            block = queries @ self.gallery[start:start + self.chunk].to(queries.device, queries.dtype).T
            if best_s is None:
                s, i = block.topk(min(k, block.shape[1]), dim=1)
                best_s, best_i = merge_topk(s, i, k)  # topk's order among equal scores: by index here
                continue
            # a column enters a row's top-k only if it scores at least the row's current k-th best
            rows, cols = (block >= best_s[:, -1:]).nonzero(as_tuple=True)
            if rows.numel() == 0:
                continue
            counts = torch.bincount(rows, minlength=block.shape[0])
            width = int(counts.max())
            slot = torch.arange(len(rows), device=rows.device) - (torch.cumsum(counts, 0) - counts)[rows]
            pad_s = torch.full((block.shape[0], width), -torch.inf, dtype=block.dtype, device=block.device)
            pad_i = torch.full((block.shape[0], width), n, dtype=torch.long, device=block.device)
            pad_s[rows, slot], pad_i[rows, slot] = block[rows, cols], cols + start
            # running entries come from earlier chunks, candidates in ascending columns: a stable sort keeps
            # equal scores in gallery order
            best_s, best_i = merge_topk(torch.cat([best_s, pad_s], 1), torch.cat([best_i, pad_i], 1), k)
        return best_s, best_i


def merge_topk(scores: torch.Tensor, idx: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k best of each row, highest score first; equal scores ordered by gallery index."""
    by_index = idx.sort(dim=1, stable=True).indices
    scores, idx = scores.gather(1, by_index), idx.gather(1, by_index)
    order = scores.sort(dim=1, descending=True, stable=True).indices[:, :k]
    return scores.gather(1, order), idx.gather(1, order)


class FaissIndex:
    """A faiss inner-product index over the gallery, built chunk by chunk from any float store."""

    def __init__(self, kind: str, gallery, params: dict, add_chunk: int = 65536):
        try:
            import faiss
            from faiss.contrib import ivf_tools
        except ImportError as err:
            raise ImportError(f"--gallery-index {kind} needs faiss: pip install 'queryshift[index]' "
                              f"(faiss-cpu) or faiss-gpu") from err
        self.kind, self.params = kind, params
        self._faiss, self._ivf_tools = faiss, ivf_tools  # imported once, here, where a missing faiss is reported
        n, d = gallery.shape
        t0 = time.perf_counter()
        fp16, ip = faiss.ScalarQuantizer.QT_fp16, faiss.METRIC_INNER_PRODUCT
        if kind == "faiss-flat":
            index = faiss.IndexFlatIP(d)  # fp32 (BLAS search): a faiss-side exact baseline, 2x the fp16 store
        elif kind == "faiss-hnsw":
            index = faiss.IndexHNSWSQ(d, fp16, params["M"], ip)
            index.hnsw.efConstruction = params["ef_construction"]
            index.hnsw.efSearch = params["ef_search"]
        else:
            # IVF whose list centroids, list assignment and probe selection are torch matmuls (faiss's own
            # k-means, add and coarse search run on faiss's bundled BLAS, 10-40x slower than torch's on this
            # project's CPUs: a 4,096-list build of 1M items took 17 min); faiss stores and scans the lists
            nlist = params["nlist"] or max(1, min(4096, int(math.sqrt(n))))
            if nlist > n:
                raise ValueError(f"faiss-ivf: nlist={nlist} lists for {n} gallery items; use at most {n} (or 0: "
                                 f"chosen from the gallery size)")
            train = min(n, params["train_size"] or 40 * nlist)
            rows = np.sort(np.random.default_rng(0).choice(n, size=train, replace=False))
            self.centroids = spherical_kmeans(torch.from_numpy(as_float32(gallery[rows])), nlist,
                                              params["kmeans_iters"])
            self._coarse = faiss.IndexFlatIP(d)  # kept alive: the IVF index does not own it
            self._coarse.add(self.centroids.numpy())
            index = faiss.IndexIVFScalarQuantizer(self._coarse, d, nlist, fp16, ip)
            index.nprobe = min(params["nprobe"], nlist)  # probing more lists than exist = probing all
            # the quantizer already holds nlist centroids, so faiss trains only its fp16 codec here
            index.train(as_float32(gallery[rows[: min(train, 4096)]]))
        if not index.is_trained:
            index.train(as_float32(gallery[: min(n, 65536)]))
        for start in range(0, n, add_chunk):
            x = as_float32(gallery[start:start + add_chunk])
            if kind == "faiss-ivf":
                lists = self._probe(x, 1)[1][:, 0]
                ivf_tools.add_preassigned(index, x, np.ascontiguousarray(lists, dtype=np.int64))
            else:
                index.add(x)
        self.index = index
        self.build_seconds = time.perf_counter() - t0

    def set_search(self, params: dict) -> None:
        """Change the search-time parameters (``nprobe``, ``ef_search``) of the built index."""
        for key in ("nprobe", "ef_search"):
            if key in params:
                check_param(self.kind, key, int(params[key]))
        if "nprobe" in params and self.kind == "faiss-ivf":
            self.params["nprobe"] = int(params["nprobe"])
            self.index.nprobe = min(self.params["nprobe"], self.index.nlist)
        if "ef_search" in params and self.kind == "faiss-hnsw":
            self.index.hnsw.efSearch = self.params["ef_search"] = int(params["ef_search"])

    @torch.no_grad()
    def _probe(self, x: np.ndarray, nprobe: int, chunk: int = 16384) -> tuple[np.ndarray, np.ndarray]:
        """The ``nprobe`` best lists of each row of ``x`` and their centroid scores (what the IVF's coarse
        quantizer would return, by torch matmul)."""
        xt = torch.from_numpy(x)
        scores, lists = zip(*((xt[i:i + chunk] @ self.centroids.T).topk(nprobe, dim=1)
                              for i in range(0, len(xt), chunk)))
        return torch.cat(scores).numpy(), torch.cat(lists).numpy()

    @torch.no_grad()
    def search(self, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        q = as_float32(queries)
        if self.kind == "faiss-ivf":
            coarse, lists = self._probe(q, self.index.nprobe)
            lists = lists.astype(np.int64)

            def part(rows: slice):
                # the codes are residuals to the list centroid: faiss adds the centroid score, so pass the true one
                return self._ivf_tools.search_preassigned(self.index, q[rows], k, lists[rows], coarse[rows])

            # faiss runs a preassigned search on one thread; it releases the GIL, so query slices in threads
            # use the cores its own search would (same results: each query is searched independently)
            n_parts = min(self._faiss.omp_get_max_threads(), max(1, len(q) // 64))
            bounds = np.linspace(0, len(q), n_parts + 1).astype(int)
            with ThreadPoolExecutor(n_parts) as pool:
                parts = list(pool.map(part, [slice(a, b) for a, b in zip(bounds[:-1], bounds[1:])]))
            scores, idx = np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
        else:
            scores, idx = self.index.search(q, k)
        return torch.from_numpy(scores).to(queries.device), torch.from_numpy(idx).to(queries.device)


@torch.no_grad()
def spherical_kmeans(x: torch.Tensor, k: int, iters: int, seed: int = 0) -> torch.Tensor:
    """k unit centroids for inner-product search: start from k distinct rows of ``x`` (seeded), then ``iters``
    rounds of assigning each row to its best centroid and renormalising each cluster's mean. A cluster that
    empties keeps its previous centroid (a data row)."""
    if k > len(x):
        raise ValueError(f"faiss-ivf: nlist={k} lists need at least as many training vectors, got {len(x)}")
    g = torch.Generator().manual_seed(seed)
    centroids = torch.nn.functional.normalize(x[torch.randperm(len(x), generator=g)[:k]], dim=1)
    for _ in range(iters):
        assign = torch.cat([(x[i:i + 16384] @ centroids.T).argmax(dim=1) for i in range(0, len(x), 16384)])
        sums = torch.zeros_like(centroids).index_add_(0, assign, x)
        filled = torch.bincount(assign, minlength=k) > 0
        centroids = torch.where(filled[:, None], torch.nn.functional.normalize(sums, dim=1), centroids)
    return centroids.contiguous()


def as_float32(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().float().numpy()
    return np.ascontiguousarray(x, dtype=np.float32)


def build_index(spec: str, gallery):
    """An index over ``gallery`` (N x d tensor or array, e.g. the memory-mapped fp16 store)."""
    kind, params = parse_spec(spec)
    if kind == "exact":
        return ExactIndex(gallery if isinstance(gallery, torch.Tensor) else torch.from_numpy(gallery), **params)
    return FaissIndex(kind, gallery, params)


def build_key(spec: str) -> tuple:
    """What the build of ``spec`` depends on: two specs with the same key differ only in search parameters."""
    kind, params = parse_spec(spec)
    return kind, tuple(sorted((k, v) for k, v in params.items() if k not in SEARCH_PARAMS.get(kind, ())))


def recall_at_k(approx: torch.Tensor, exact: torch.Tensor) -> float:
    """Mean fraction of each query's exact top-k indices that the approximate top-k also holds."""
    k = exact.shape[1]
    hits = (approx[:, :k].unsqueeze(2) == exact.unsqueeze(1)).any(dim=1)
    return float(hits.float().mean())
