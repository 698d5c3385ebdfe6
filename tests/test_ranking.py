"""Device ranking (engine.ranking) against the stable-sort reference (metrics.batch_ranks), ties included."""

import numpy as np
import pytest
import torch

from queryshift.engine.ranking import rank_gallery, rank_scores
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
