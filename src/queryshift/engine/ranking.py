"""Scores -> ranks and AP on the device where the scores are, chunked over the gallery.

The position of a relevant item ``j`` in a row's descending, *stable* order is the number of gallery
items ahead of it: ``#{k : s_k > s_j} + #{k < j : s_k == s_j}`` (ties keep gallery order). Counting needs
no sort, no B x N index matrix and no copy of the scores to the host; the gallery is visited in column
chunks so the comparison block is O(batch x relevant x chunk). Only the B x M positions (M = most
relevant items of a row) leave the device, once per batch. The results are identical to
:func:`queryshift.metrics.batch_ranks` (the stable-sort reference), ties included.

:func:`rank_gallery` does the same from query embeddings and a (possibly memory-mapped, fp16) gallery
without ever holding the B x N score matrix: each chunk's scores are computed, counted and dropped.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

# comparison elements (batch x relevant x chunk) per block: 16M booleans/ints keep a block well under 200 MB
BLOCK_ELEMENTS = 1 << 24


def pad_relevant(relevant: Sequence[Sequence[int]], device, n_gallery: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Relevant gallery indices as a B x M tensor (rows padded by repeating their first item) and a mask."""
    sizes = [len(r) for r in relevant]
    for row, rel in enumerate(relevant):
        if len(rel) == 0:
            raise ValueError(f"query row {row} has no relevant gallery item")
        if min(rel) < 0 or max(rel) >= n_gallery:
            raise ValueError(f"query row {row}: relevant gallery index outside 0..{n_gallery - 1}: {list(rel)}")
    m = max(sizes)
    idx = torch.tensor([list(r) + [r[0]] * (m - len(r)) for r in relevant], dtype=torch.long)
    mask = torch.arange(m).unsqueeze(0) < torch.tensor(sizes).unsqueeze(1)
    return idx.to(device), mask.to(device)


def chunk_size(batch: int, m: int, chunk: int | None = None) -> int:
    """Gallery columns per block: given, or as many as keep a block at ``BLOCK_ELEMENTS``."""
    if chunk is not None:
        if chunk < 1:
            raise ValueError(f"ranking chunk must be >= 1, got {chunk}")
        return int(chunk)
    return max(1024, BLOCK_ELEMENTS // max(1, batch * m))


def thresholds(rel_scores: torch.Tensor, rel_idx: torch.Tensor, stop: int) -> torch.Tensor:
    """Per (row, relevant item), the score a column of a chunk ending at ``stop`` must exceed to be ahead.

    A chunk wholly before the item (``stop <= j``): ``s_k >= s_j`` (ties go first), i.e. ``s_k`` greater than
    the next float below ``s_j``; any other chunk: ``s_k > s_j``. One comparison per element either way;
    ties inside the item's own chunk are added by :func:`own_chunk_ties`.
    """
    below = torch.nextafter(rel_scores, torch.full_like(rel_scores, -torch.inf))
    return torch.where(rel_idx >= stop, below, rel_scores)


def count_above(block: torch.Tensor, thr: torch.Tensor) -> torch.Tensor:
    """B x M counts of the columns of ``block`` (B x C) above each row's thresholds ``thr`` (B x M)."""
    return (block.unsqueeze(1) > thr.unsqueeze(2)).sum(dim=2, dtype=torch.int32)


def own_chunk_ties(window: torch.Tensor, rel_scores: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
    """Ties ahead of each relevant item in its own chunk: columns ``< offset`` of ``window`` (B x M x C, the
    item's chunk from its start) scoring exactly the item's score."""
    cols = torch.arange(window.shape[2], device=window.device).view(1, 1, -1)
    return ((window == rel_scores.unsqueeze(2)) & (cols < offset.unsqueeze(2))).sum(dim=2, dtype=torch.int32)


def _positions_to_metrics(positions: torch.Tensor, mask: torch.Tensor) -> tuple[list[int], list[float]]:
    """B x M positions (padding masked) -> best rank and AP per row, computed on the device, read once."""
    big = torch.iinfo(positions.dtype).max
    pos = torch.where(mask, positions, torch.full_like(positions, big)).sort(dim=1).values
    best = pos[:, 0]
    m = mask.sum(dim=1)
    k = torch.arange(1, pos.shape[1] + 1, device=pos.device, dtype=torch.float64).unsqueeze(0)
    valid = torch.arange(pos.shape[1], device=pos.device).unsqueeze(0) < m.unsqueeze(1)
    terms = torch.where(valid, k / (pos.to(torch.float64) + 1), torch.zeros_like(k))
    ap = terms.sum(dim=1) / m.to(torch.float64)
    out = torch.stack([best.to(torch.float64), ap], dim=1).cpu()  # the one device -> host transfer
    return [int(v) for v in out[:, 0].tolist()], out[:, 1].tolist()


def rank_scores(scores: torch.Tensor, relevant: Sequence[Sequence[int]],
                chunk: int | None = None) -> tuple[list[int], list[float]]:
    """Best (smallest) 0-based rank and AP of every row of a B x N score matrix, on its device.

    Identical to the stable-sort reference :func:`queryshift.metrics.batch_ranks`.
    """
    scores = scores.detach()
    if scores.dim() != 2 or scores.shape[0] != len(relevant):
        raise ValueError(f"scores of shape {tuple(scores.shape)} do not match {len(relevant)} query rows")
    n = scores.shape[1]
    rel_idx, mask = pad_relevant(relevant, scores.device, n)
    rel_scores = scores.gather(1, rel_idx)
    b, m = rel_idx.shape
    step = chunk_size(b, m, chunk)
    positions = torch.zeros(b, m, dtype=torch.int32, device=scores.device)
    for start in range(0, n, step):
        stop = min(start + step, n)
        positions += count_above(scores[:, start:stop], thresholds(rel_scores, rel_idx, stop))
    # ties in each item's own chunk, before it: gathered once for all rows (no per-chunk sync)
    own_start = rel_idx - rel_idx % step
    cols = (own_start.unsqueeze(2) + torch.arange(step, device=scores.device)).clamp(max=n - 1)
    window = scores.gather(1, cols.view(b, -1)).view(b, m, step)
    positions += own_chunk_ties(window, rel_scores, rel_idx - own_start)
    return _positions_to_metrics(positions, mask)


@torch.no_grad()
def rank_gallery(queries: torch.Tensor, gallery: torch.Tensor, relevant: Sequence[Sequence[int]],
                 chunk: int | None = None) -> tuple[list[int], list[float]]:
    """Best rank and AP of every query against ``gallery`` (N x d, any float dtype, may be memory-mapped
    on the host) without materialising the B x N scores: chunk by chunk, scores in the queries' dtype on
    the queries' device.

    A relevant item's own score is computed once (the dot product with its gallery row) and it is not
    compared with itself, so its rank is exact for that score even if a chunked matmul rounds differently.
    """
    device, dtype = queries.device, queries.dtype
    n = gallery.shape[0]
    rel_idx, mask = pad_relevant(relevant, device, n)
    rel_rows = gallery[rel_idx.cpu() if gallery.device.type == "cpu" else rel_idx].to(device, dtype)  # B x M x d
    rel_scores = (rel_rows @ queries.unsqueeze(2)).squeeze(2)  # B x M
    b, m = rel_idx.shape
    step = chunk_size(b, m, chunk)
    positions = torch.zeros(b, m, dtype=torch.int32, device=device)
    for start in range(0, n, step):
        stop = min(start + step, n)
        block = queries @ gallery[start:stop].to(device, dtype).T
        positions += count_above(block, thresholds(rel_scores, rel_idx, stop))
        own = (rel_idx >= start) & (rel_idx < stop)  # items whose own chunk this is
        own_score = block.gather(1, (rel_idx - start).clamp(0, stop - start - 1))
        # the item itself counted iff this chunk's matmul rounded its score above the once-computed one
        positions -= (own & (own_score > rel_scores)).int()
        rows = own.any(dim=1).nonzero().squeeze(1)  # few rows: only those with an item in this chunk
        if rows.numel():
            window = block[rows].unsqueeze(1).expand(-1, m, -1)
            ties = own_chunk_ties(window, rel_scores[rows], rel_idx[rows] - start)
            positions[rows] += torch.where(own[rows], ties, torch.zeros_like(ties))
    return _positions_to_metrics(positions, mask)
