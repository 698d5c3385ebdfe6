"""Candidate search indexes (engine.gallery_index) against exact top-k, and run --gallery-index."""

import pytest
import torch
import torch.nn.functional as F

from queryshift.engine import RunConfig, run
from queryshift.engine.gallery_index import (
    ExactIndex,
    build_index,
    build_key,
    parse_spec,
    recall_at_k,
    spherical_kmeans,
)
from tests.helpers import make_karpathy

faiss = pytest.importorskip("faiss")


def clustered(n, d, seed):
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(16, d, generator=g)
    x = centres[torch.randint(0, 16, (n,), generator=g)] + 0.3 * torch.randn(n, d, generator=g)
    return F.normalize(x, dim=1)


def test_exact_index_chunked_topk_equals_full_topk():
    gallery, queries = clustered(500, 16, 0), clustered(12, 16, 1)
    scores, idx = ExactIndex(gallery, chunk=37).search(queries, 10)
    ref_scores, ref_idx = (queries @ gallery.T).topk(10, dim=1)
    torch.testing.assert_close(scores, ref_scores)
    assert torch.equal(idx, ref_idx)


@pytest.mark.parametrize("spec", ["faiss-flat", "faiss-ivf:nlist=8,nprobe=8", "faiss-hnsw:M=16,ef_search=200"])
def test_faiss_indexes_find_the_exact_neighbours(spec):
    gallery, queries = clustered(2000, 32, 2), clustered(50, 32, 3)
    exact = ExactIndex(gallery).search(queries, 10)[1]
    approx = build_index(spec, gallery.half().numpy())  # built from an fp16 store, as run does at scale
    recall = recall_at_k(approx.search(queries, 10)[1], exact)
    # flat and an IVF probing every list are exhaustive: only fp16 rounding can swap near-ties at rank 10
    assert recall >= (0.99 if "hnsw" not in spec else 0.95)


def test_ivf_probing_by_torch_matches_faiss_own_coarse_search():
    """The IVF's lists are chosen and its centroid scores computed by torch (FaissIndex._probe); with the
    true centroid scores faiss ranks the residual codes exactly as its own search does."""
    gallery, queries = clustered(3000, 32, 6), clustered(200, 32, 7)
    index = build_index("faiss-ivf:nlist=24,nprobe=3", gallery.numpy())
    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(3)  # the queries are searched in 3 slices on 3 threads, then put back in order
    try:
        ours = index.search(queries, 10)
    finally:
        faiss.omp_set_num_threads(threads)
    theirs = index.index.search(queries.numpy(), 10)  # faiss's coarse quantizer holds the same centroids
    assert torch.equal(ours[1], torch.from_numpy(theirs[1]))
    torch.testing.assert_close(ours[0], torch.from_numpy(theirs[0]))
    assert index.index.ntotal == 3000 and sorted(ours[1].unique().tolist())[0] >= 0  # every item stored, ids real


def test_spherical_kmeans_converges_to_normalised_cluster_means():
    g = torch.Generator().manual_seed(0)
    centres = F.normalize(torch.randn(6, 16, generator=g), dim=1)
    x = F.normalize(centres.repeat(50, 1) + 0.05 * torch.randn(300, 16, generator=g), dim=1)
    torch.testing.assert_close(spherical_kmeans(x, 1, iters=1)[0], F.normalize(x.sum(0), dim=0))
    found = spherical_kmeans(x, 6, iters=20)
    torch.testing.assert_close(found.norm(dim=1), torch.ones(6))
    assign = (x @ found.T).argmax(dim=1)
    for j in assign.unique():  # a fixed point: each centroid is the direction of its members' mean
        torch.testing.assert_close(found[j], F.normalize(x[assign == j].sum(0), dim=0), atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="nlist=400"):
        spherical_kmeans(x, 400, iters=1)


def test_search_parameters_change_a_built_index_like_a_rebuild():
    gallery, queries = clustered(2000, 32, 4), clustered(50, 32, 5)
    assert build_key("faiss-ivf:nlist=32,nprobe=1") == build_key("faiss-ivf:nlist=32,nprobe=32")
    assert build_key("faiss-ivf:nlist=32") != build_key("faiss-ivf:nlist=64")
    assert build_key("faiss-hnsw:ef_search=8") == build_key("faiss-hnsw:ef_search=64") != build_key("faiss-hnsw:M=8")
    index = build_index("faiss-ivf:nlist=32,nprobe=1", gallery.numpy())
    one_list = index.search(queries, 10)[1]
    index.set_search({"nprobe": 32})  # every list: exhaustive, as a fresh build with nprobe=32
    rebuilt = build_index("faiss-ivf:nlist=32,nprobe=32", gallery.numpy())
    assert torch.equal(index.search(queries, 10)[1], rebuilt.search(queries, 10)[1])
    assert not torch.equal(one_list, index.search(queries, 10)[1])  # nprobe really changed the search
    index.set_search({"nprobe": 100})  # more probes than lists: every list, as with nprobe=32
    assert torch.equal(index.search(queries, 10)[1], rebuilt.search(queries, 10)[1])
    assert build_index("faiss-ivf:nlist=32,nprobe=64", gallery.numpy()).index.nprobe == 32


def test_benchmark_splits_index_specs_at_kinds_only():
    import sys
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from gallery_scale import split_specs
    assert split_specs("faiss-ivf,faiss-ivf:nlist=4096,nprobe=8,faiss-hnsw:M=16,ef_search=64,faiss-flat") == [
        "faiss-ivf", "faiss-ivf:nlist=4096,nprobe=8", "faiss-hnsw:M=16,ef_search=64", "faiss-flat"]


def test_recall_at_k_counts_shared_indices():
    exact = torch.tensor([[1, 2, 3, 4], [5, 6, 7, 8]])
    approx = torch.tensor([[4, 3, 9, 9], [5, 6, 7, 8]])
    assert recall_at_k(approx, exact) == pytest.approx((2 / 4 + 1) / 2)


def test_spec_errors_name_the_bad_part():
    assert parse_spec("faiss-ivf:nprobe=64")[1]["nprobe"] == 64
    with pytest.raises(ValueError, match="unknown kind 'annoy'"):
        parse_spec("annoy")
    with pytest.raises(ValueError, match="unknown parameter 'ef=3'"):
        parse_spec("faiss-hnsw:ef=3")
    with pytest.raises(ValueError, match="nprobe must be an integer"):
        parse_spec("faiss-ivf:nprobe=many")
    with pytest.raises(ValueError, match="unknown kind"):
        RunConfig(gallery_index="faiss-lsh")


def test_run_reports_index_recall_and_keeps_exact_ranks(tmp_path):
    data = make_karpathy(tmp_path / "data", n_images=8, captions=2)
    base = dict(model="openclip:qs-tiny/random", data=data, image_root=str(tmp_path / "data"), direction="t2i",
                method="tent", steps=1, batch_size=5, cache_dir=str(tmp_path / "cache"), progress=False)
    exact = run(RunConfig(**base))
    flat = run(RunConfig(**base, gallery_index="faiss-flat", out=str(tmp_path / "out")))
    assert flat["r1"] == exact["r1"] and flat["map"] == exact["map"]  # metrics never use the index
    assert flat["gallery_index"]["index"] == "faiss-flat"
    assert flat["gallery_index"]["recall_at_10"] == pytest.approx(1.0)  # 8 items: top-10 is everything
    assert "gallery_index" not in exact
