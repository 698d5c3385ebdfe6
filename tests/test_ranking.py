"""Device ranking (engine.ranking) against the stable-sort reference (metrics.batch_ranks), ties included."""

import numpy as np
import pytest
import torch

from queryshift.engine.ranking import rank_gallery, rank_scores, screen_error_bound
from queryshift.metrics import batch_ranks


def random_relevance(rng, b, n, max_rel):
    return [sorted(rng.choice(n, size=rng.integers(1, max_rel + 1), replace=False).tolist()) for _ in range(b)]


@pytest.mark.parametrize("chunk", [None, 1, 7, 64])
def test_rank_scores_equals_stable_sort_with_ties(chunk):
    rng = np.random.default_rng(0)
    # few distinct values: most scores tie with many others, so tie order decides most ranks
    scores = torch.from_numpy(rng.integers(0, 5, (40, 97)).astype(np.float32) / 4)
    relevant = random_relevance(rng, 40, 97, 6)
    ranks, aps = rank_scores(scores, relevant, chunk=chunk)
    ref_ranks, ref_aps = batch_ranks(scores, relevant)
    assert ranks == ref_ranks
    assert aps == pytest.approx(ref_aps, rel=1e-12)


def test_rank_scores_continuous_scores_chunked_equals_unchunked():
    rng = np.random.default_rng(1)
    scores = torch.randn(33, 1000, generator=torch.Generator().manual_seed(1))
    relevant = random_relevance(rng, 33, 1000, 5)
    assert rank_scores(scores, relevant, chunk=1000) == rank_scores(scores, relevant, chunk=13)
    assert rank_scores(scores, relevant)[0] == batch_ranks(scores, relevant)[0]


def test_rank_gallery_never_builds_full_scores_and_matches_reference():
    # integer-valued embeddings: every dot product is exact, so ties are real and order-independent
    g = torch.Generator().manual_seed(2)
    queries = torch.randint(-2, 3, (20, 8), generator=g).float()
    gallery = torch.randint(-2, 3, (300, 8), generator=g).float()
    rng = np.random.default_rng(2)
    relevant = random_relevance(rng, 20, 300, 4)
    ref = batch_ranks(queries @ gallery.T, relevant)
    for chunk in (None, 1, 17, 300):
        ranks, aps = rank_gallery(queries, gallery, relevant, chunk=chunk)
        assert ranks == ref[0]
        assert aps == pytest.approx(ref[1], rel=1e-12)
    # an fp16 store (what the memory-mapped gallery holds) ranks the same when the values are exact in fp16
    assert rank_gallery(queries, gallery.half(), relevant, chunk=50)[0] == ref[0]


def test_hand_computed_ties_and_errors():
    # row order (stable, descending): 1, 3 (tie with 1, later), 0, 2
    scores = torch.tensor([[0.5, 0.9, 0.1, 0.9]])
    assert rank_scores(scores, [[3]]) == ([1], [0.5])
    assert rank_scores(scores, [[2, 0]]) == ([2], [pytest.approx((1 / 3 + 2 / 4) / 2)])
    with pytest.raises(ValueError, match="no relevant"):
        rank_scores(scores, [[]])
    with pytest.raises(ValueError, match="outside 0..3"):
        rank_scores(scores, [[4]])
    with pytest.raises(ValueError, match="do not match"):
        rank_scores(scores, [[0], [1]])


def crowded_gallery(seed, n=3000, d=64, b=40):
    """fp16 gallery of clustered unit vectors with exact duplicates; queries near random items, relevant sets
    with the near item (well ranked) or only random items (in the crowd, badly ranked)."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.nn.functional.normalize(torch.randn(8, d, generator=g), dim=1)
    x = centres[torch.randint(0, 8, (n,), generator=g)] + 0.2 * torch.randn(n, d, generator=g)
    gallery = torch.nn.functional.normalize(x, dim=1).half()
    gallery[n // 2: n // 2 + 200] = gallery[:200]  # exact duplicates: ties that gallery order must break
    near = torch.randint(0, n, (b,), generator=g)
    queries = torch.nn.functional.normalize(gallery[near].float() + 0.1 * torch.randn(b, d, generator=g), dim=1)
    rng = np.random.default_rng(seed)
    # even rows: the near item and up to 3 random ones; odd rows: only random items (ranked in the crowd)
    relevant = [sorted(({int(near[i])} if i % 2 == 0 else set())
                       | set(rng.choice(n, size=rng.integers(1, 4), replace=False).tolist()))
                for i in range(b)]
    return queries, gallery, relevant


@pytest.mark.parametrize("chunk", [None, 97, 1000])
def test_screened_rank_gallery_equals_exact_scores_reference(chunk):
    # bf16 screen + fp32/fp64 rescoring must give the ranks of the exactly computed scores (fp64 products of
    # the fp32 queries and fp16 gallery values), ties (duplicates) in gallery order, for any chunking
    queries, gallery, relevant = crowded_gallery(3)
    ref_ranks, ref_aps = batch_ranks(queries.double() @ gallery.double().T, relevant)
    ranks, aps = rank_gallery(queries, gallery, relevant, chunk=chunk, screen=True)
    assert ranks == ref_ranks
    assert aps == pytest.approx(ref_aps, rel=1e-12)
    assert max(ranks) > 100  # crowded rows took the fp32 rescoring path, not only the bf16 screen


def test_screened_and_direct_rank_gallery_agree_on_exactly_representable_scores():
    # integer embeddings: every dot product is exact in fp32, so both paths rank by the same scores
    g = torch.Generator().manual_seed(4)
    queries = torch.randint(-3, 4, (30, 16), generator=g).float()
    gallery = torch.randint(-3, 4, (2000, 16), generator=g).half()
    relevant = random_relevance(np.random.default_rng(4), 30, 2000, 5)
    ref = batch_ranks(queries @ gallery.float().T, relevant)[0]
    assert rank_gallery(queries, gallery, relevant, chunk=300, screen=True)[0] == ref
    assert rank_gallery(queries, gallery, relevant, chunk=300, screen=False)[0] == ref


def test_bf16_screen_error_bound_holds_without_its_safety_factor():
    # the bound is a proof, not a tolerance: half of it (the safety factor removed) must still cover the worst
    # bf16 score error seen over many random pairs, and must not be loose by orders of magnitude
    d = 512
    g = torch.Generator().manual_seed(5)
    q = torch.randn(200, d, generator=g) * torch.rand(200, 1, generator=g)
    x = (torch.randn(4000, d, generator=g) * torch.rand(4000, 1, generator=g)).half()
    approx = (q.bfloat16() @ x.bfloat16().T).double()
    exact = q.double() @ x.double().T
    scale = q.norm(dim=1, keepdim=True).double() * x.double().norm(dim=1)
    worst = float(((approx - exact).abs() / scale).max())
    assert worst <= screen_error_bound(d) / 2
    assert worst >= screen_error_bound(d) / 2 / 100
