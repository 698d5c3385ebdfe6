"""Metrics against cases computed by hand."""

import numpy as np
import pytest
import torch

from queryshift.metrics import (
    average_precision,
    batch_ranks,
    recall_at_k,
    relevant_positions,
    retrieval_metrics,
)


def test_positions_and_ranks_one_to_one():
    scores = torch.tensor([[0.9, 0.1, 0.5], [0.2, 0.3, 0.8]])
    # row 0 order: 0, 2, 1 -> item 2 at position 1; row 1 order: 2, 1, 0 -> item 2 at position 0
    ranks, aps = batch_ranks(scores, [[2], [2]])
    assert ranks == [1, 0]
    assert aps == pytest.approx([1 / 2, 1.0])


def test_many_to_many_best_rank_and_ap():
    # order of the row: items 3, 1, 4, 0, 2 (positions 0..4)
    scores = torch.tensor([[0.2, 0.8, 0.1, 0.9, 0.5]])
    positions = relevant_positions(scores, [[0, 1, 2]])
    assert positions[0].tolist() == [1, 3, 4]
    ranks, aps = batch_ranks(scores, [[0, 1, 2]])
    assert ranks == [1]
    # AP = (1/3) * (1/2 + 2/4 + 3/5)
    assert aps[0] == pytest.approx((0.5 + 0.5 + 0.6) / 3)


def test_ties_keep_gallery_order():
    ranks, _ = batch_ranks(torch.tensor([[1.0, 1.0, 1.0]]), [[2]])
    assert ranks == [2]


def test_recall_and_summary():
    ranks = [0, 0, 3, 7, 12]
    assert recall_at_k(ranks, 1) == pytest.approx(40.0)
    assert recall_at_k(ranks, 5) == pytest.approx(60.0)
    assert recall_at_k(ranks, 10) == pytest.approx(80.0)
    m = retrieval_metrics(ranks, [1.0, 1.0, 0.25, 0.125, 1 / 13])
    assert m["r_mean"] == 60.0
    assert m["map"] == round(100 * np.mean([1.0, 1.0, 0.25, 0.125, 1 / 13]), 2)
    assert m["n_queries"] == 5


def test_average_precision_single_relevant_is_reciprocal_rank():
    assert average_precision(np.array([4])) == pytest.approx(1 / 5)


def test_errors():
    with pytest.raises(ValueError, match="no relevant"):
        batch_ranks(torch.zeros(1, 3), [[]])
    with pytest.raises(ValueError, match="no queries"):
        retrieval_metrics([], [])
