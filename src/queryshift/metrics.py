"""Retrieval metrics as small pure functions.

The engine turns each batch's scores into per-query ranks at once (:func:`batch_ranks`), so memory stays
bounded by batch x gallery; the final metrics only need the per-query best rank and average precision.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch


def relevant_positions(scores: torch.Tensor, relevant: Sequence[Sequence[int]]) -> list[np.ndarray]:
    """0-based positions, sorted ascending, of each row's relevant items in its descending score order.

    Ties keep gallery order (stable sort), so results do not depend on the device or thread count.
    """
    scores = scores.detach().float().cpu()
    order = torch.sort(scores, dim=1, descending=True, stable=True).indices
    position = torch.empty_like(order)
    position.scatter_(1, order, torch.arange(scores.shape[1]).expand_as(order).contiguous())
    out = []
    for row, rel in enumerate(relevant):
        if len(rel) == 0:
            raise ValueError(f"query row {row} has no relevant gallery item")
        out.append(np.sort(position[row, list(rel)].numpy()))
    return out


def average_precision(positions: np.ndarray) -> float:
    """AP = (1/m) sum_k k / (pos_k + 1) over the sorted positions of all m relevant items."""
    k = np.arange(1, len(positions) + 1)
    return float(np.mean(k / (np.asarray(positions) + 1)))


def batch_ranks(scores: torch.Tensor, relevant: Sequence[Sequence[int]]) -> tuple[list[int], list[float]]:
    """Best (smallest) rank and AP of every query row of one batch."""
    positions = relevant_positions(scores, relevant)
    return [int(p[0]) for p in positions], [average_precision(p) for p in positions]


def recall_at_k(best_ranks: Sequence[int], k: int) -> float:
    return 100.0 * float(np.mean(np.asarray(best_ranks) < k))


def retrieval_metrics(best_ranks: Sequence[int], aps: Sequence[float] | None = None) -> dict[str, float]:
    """R@1/5/10, their mean (2 decimals) and mAP (percent, 2 decimals; only given ``aps``), as TCR reports."""
    if len(best_ranks) == 0:
        raise ValueError("no queries were scored")
    r1, r5, r10 = (recall_at_k(best_ranks, k) for k in (1, 5, 10))
    metrics = {"r1": r1, "r5": r5, "r10": r10, "r_mean": round((r1 + r5 + r10) / 3, 2)}
    if aps is not None:
        metrics["map"] = round(100.0 * float(np.mean(aps)), 2)
    metrics["n_queries"] = len(best_ranks)
    return metrics


def subset_ranks(scores: torch.Tensor, subsets: Sequence[Sequence[int]],
                 relevant: Sequence[Sequence[int]]) -> list[int]:
    """Best rank of each row's relevant items among that row's subset of the gallery (CIRR's ``img_set``).

    The subset is ranked by score (ties in gallery order); a relevant item outside the subset does not count.
    """
    out = []
    for row, (members, rel) in enumerate(zip(subsets, relevant)):
        members = list(members)
        inside = [m for m in members if m in set(rel)]
        if not inside:
            raise ValueError(f"query row {row}: no relevant item in its subset {members}")
        sub = scores[row, members].detach().float().cpu()
        order = torch.sort(sub, descending=True, stable=True).indices.tolist()
        out.append(min(order.index(members.index(m)) for m in inside))
    return out


def recall_subset(best_ranks: Sequence[int], ks: Sequence[int] = (1, 2, 3)) -> dict[str, float]:
    """CIRR's Recall_subset@K (percent) as ``rsubset1``, ``rsubset2``, ``rsubset3``."""
    return {f"rsubset{k}": recall_at_k(best_ranks, k) for k in ks}
