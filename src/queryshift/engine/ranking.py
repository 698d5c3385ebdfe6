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


def count_ahead(block: torch.Tensor, start: int, rel_scores: torch.Tensor, rel_idx: torch.Tensor) -> torch.Tensor:
    """Per (row, relevant item): how many columns of ``block`` (gallery columns ``start..``) come before it."""
    b = block.unsqueeze(1)  # B x 1 x C
    s = rel_scores.unsqueeze(2)  # B x M x 1
    cols = torch.arange(start, start + block.shape[1], device=block.device)
    before = cols.view(1, 1, -1) < rel_idx.unsqueeze(2)  # B x M x C: earlier gallery position
    ahead = (b > s) | ((b == s) & before)
    return ahead.sum(dim=2)


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
    step = chunk_size(*rel_idx.shape, chunk)
    positions = torch.zeros_like(rel_idx)
    for start in range(0, n, step):
        positions += count_ahead(scores[:, start:start + step], start, rel_scores, rel_idx)
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
    step = chunk_size(*rel_idx.shape, chunk)
    positions = torch.zeros_like(rel_idx)
    for start in range(0, n, step):
        block = queries @ gallery[start:start + step].to(device, dtype).T
        ahead = count_ahead(block, start, rel_scores, rel_idx)
        own = (rel_idx >= start) & (rel_idx < start + block.shape[1])  # the item itself is in this chunk
        own_score = block.gather(1, (rel_idx - start).clamp(0, block.shape[1] - 1))
        # undo the self-comparison: it counted iff its chunk score beat the once-computed one
        ahead -= (own & (own_score > rel_scores)).long()
        positions += ahead
    return _positions_to_metrics(positions, mask)
