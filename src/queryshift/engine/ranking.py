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


def _refuse_rows(bad: torch.Tensor, what: str) -> None:
    """FloatingPointError naming the rows flagged in ``bad`` (B booleans), if any (one read of the device)."""
    if bool(bad.any()):
        rows = bad.nonzero().squeeze(1).tolist()
        listed = ", ".join(map(str, rows[:8])) + (f" and {len(rows) - 8} more" if len(rows) > 8 else "")
        raise FloatingPointError(f"query row{'s' if len(rows) > 1 else ''} {listed}: {what}; they cannot be ranked")


def check_rankable(scores: torch.Tensor, rel_scores: torch.Tensor) -> None:
    """Refuse scores without a place in a descending order instead of ranking them as ties: NaN (every
    comparison is false, so a NaN relevant item would come first) or +inf anywhere in a row, or -inf at a
    relevant item. -inf elsewhere is a column excluded on purpose (CIRR's reference image) and ranks last."""
    bad = torch.isnan(scores).any(dim=1) | torch.isposinf(scores).any(dim=1) | torch.isneginf(rel_scores).any(dim=1)
    _refuse_rows(bad, "scores are NaN or +inf, or a relevant item scores -inf")


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
    check_rankable(scores, rel_scores)
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


# screened ranking: a row with more band columns than this (or 1/32 of the chunk) is settled by one fp32
# matmul over the chunk; exact pair scores are computed PAIR_PIECE pairs at a time (2 x 16k x d floats)
PAIR_ROW_LIMIT = 64
PAIR_PIECE = 16384
# bf16 unit roundoff (8 significant bits): rounding x to bf16 moves it by at most |x| * 2**-8
BF16_ROUNDOFF = 2.0 ** -8


def bf16_screen_available(device: torch.device) -> bool:
    """A CPU whose oneDNN bf16 matmul runs on AMX / AVX512-BF16 (there it is several times faster than fp32).

    Elsewhere (GPUs, CPUs without native bf16) :func:`rank_gallery` scores every chunk in the queries' dtype.
    """
    if device.type != "cpu":
        return False
    cpu = torch.cpu
    return bool(getattr(cpu, "_is_amx_tile_supported", lambda: False)()
                or getattr(cpu, "_is_avx512_bf16_supported", lambda: False)())


def screen_error_bound(d: int) -> float:
    """Coefficient c with |bf16 screening score - fp32 score| <= c * ||q|| * ||g|| for d-dimensional vectors.

    Screening rounds q and g to bf16 (u = 2**-8 each), multiplies with fp32 accumulation (error gamma_d =
    d * 2**-24 of sum |q_i g_i|) and rounds the product to bf16 (u again); the fp32 reference carries its own
    gamma_d. Summed: (2u + u^2) + 2u(1+u)^2(1+gamma) + gamma((1+u)^2 + 1), each times sum |q_i g_i| <=
    ||q|| ||g||. The factor 2 on top is a safety margin: a wider band only sends more columns to the exact
    check, it never changes a rank.
    """
    u, gamma = BF16_ROUNDOFF, d * 2.0 ** -24
    return 2.0 * ((2 * u + u * u) + 2 * u * (1 + u) ** 2 * (1 + gamma) + gamma * ((1 + u) ** 2 + 1))


def round_to_float32(x: torch.Tensor, up: bool) -> torch.Tensor:
    """fp64 -> the nearest fp32 value on the given side (so a band only ever gets wider)."""
    y = x.float()
    side = torch.full_like(y, torch.inf if up else -torch.inf)
    wrong = (y.double() < x) if up else (y.double() > x)
    return torch.where(wrong, torch.nextafter(y, side), y)


def pair_scores(queries: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """fp64 dot products of matching rows (P x d each): the reference score of a (query, item) pair.

    The product of an fp32 query value and an fp16/fp32 gallery value is exact in fp64 and the sum of d of
    them is off by at most d * 2**-53 relative: these are the scores' true order up to far below fp32
    rounding, independent of any BLAS kernel's summation order. Always the same elementwise product and row
    sum, so duplicate gallery rows tie exactly and a relevant item ties with itself.
    """
    return (queries.double() * rows.double()).sum(dim=1)


@torch.no_grad()
def rank_gallery(queries: torch.Tensor, gallery: torch.Tensor, relevant: Sequence[Sequence[int]],
                 chunk: int | None = None, screen: bool | None = None) -> tuple[list[int], list[float]]:
    """Best rank and AP of every query against ``gallery`` (N x d, any float dtype, may be memory-mapped
    on the host) without materialising the B x N scores: chunk by chunk, scores in the queries' dtype on
    the queries' device.

    ``screen`` (default: on for fp32 queries on a CPU with native bf16, see :func:`bf16_screen_available`)
    scores each chunk in bf16 first and settles every column whose bf16 score is farther than the proven
    error bound (:func:`screen_error_bound`) from a relevant item's fp32 score; only the columns inside the
    band are scored again in fp32 (:func:`pair_scores`). The ranks are those of the fp32 scores: the bf16
    pass only decides which columns need them.
    """
    _refuse_rows(~torch.isfinite(queries).all(dim=1), "the query embeddings are not finite")
    if screen is None:
        screen = queries.dtype == torch.float32 and bf16_screen_available(queries.device)
    if screen:
        return _rank_gallery_screened(queries, gallery, relevant, chunk)
    return _rank_gallery_direct(queries, gallery, relevant, chunk)


def _gather_rows(gallery: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    return gallery[idx.cpu() if gallery.device.type == "cpu" else idx]


def _rank_gallery_screened(queries: torch.Tensor, gallery: torch.Tensor, relevant: Sequence[Sequence[int]],
                           chunk: int | None) -> tuple[list[int], list[float]]:
    """Two screens, then exact pairs. Per chunk: bf16 scores settle most columns; a row whose relevant score
    sits in a crowd (many columns in the bf16 band) is rescored by an fp32 matmul, whose band is ~250x
    narrower; the columns still in a band get fp64 pair scores. After a chunk where most rows were crowded,
    the next chunks skip the bf16 screen (it would settle little) and start with fp32."""
    device = queries.device
    n, d = gallery.shape
    rel_idx, mask = pad_relevant(relevant, device, n)
    b, m = rel_idx.shape
    q32 = queries.float()
    rel_scores = pair_scores(q32.repeat_interleave(m, 0), _gather_rows(gallery, rel_idx.reshape(-1)).to(device))
    rel_scores = rel_scores.view(b, m)  # B x M fp64 reference scores of the relevant items
    q_bf16 = q32.to(torch.bfloat16)
    q_norm = q32.norm(dim=1, keepdim=True).double() * (1 + 1e-6)
    lowest = rel_scores.masked_fill(~mask, torch.inf).amin(dim=1)  # a row with nothing near this is done
    step = chunk_size(b, m, chunk)
    positions = torch.zeros(b, m, dtype=torch.int32, device=device)
    g_buffer = torch.empty(min(step, n), d, dtype=torch.bfloat16, device=device)  # reused: no page faults
    bf16_first = True
    for start in range(0, n, step):
        stop = min(start + step, n)
        g16 = gallery[start:stop].to(device)
        cols = torch.arange(start, stop, device=device)
        if bf16_first:
            g_bf16 = g_buffer[: stop - start].copy_(g16)
            # ||g|| <= ||bf16(g)|| / (1 - u), and the bf16 norm (fp32 accumulation) is rounded once more by u
            g_norm = torch.linalg.vector_norm(g_bf16, dim=1).amax().double() * (1 + 4 * BF16_ROUNDOFF)
            approx = q_bf16 @ g_bf16.T  # B x C bf16 scores
            err = screen_error_bound(d) * q_norm * g_norm  # B x 1
            rows = _maybe_ahead(approx, lowest, err)
            if rows.numel() == 0:
                continue
            band = _settle(approx[rows].float(), err[rows], rel_scores[rows], positions, rows, None)
            crowded = band.sum(dim=(1, 2)) > max(PAIR_ROW_LIMIT, (stop - start) // 32)
            bf16_first = int(crowded.sum()) * 2 <= b
            if crowded.any():
                h = crowded.nonzero().squeeze(1)
                g32 = g16.float()
                g_norm32 = torch.linalg.vector_norm(g32, dim=1).amax().double() * (1 + 1e-6)
                band[h] = _settle(q32[rows[h]] @ g32.T, fp32_error_bound(d) * q_norm[rows[h]] * g_norm32,
                                  rel_scores[rows[h]], positions, rows[h], band[h])
        else:
            g32 = g16.float()
            g_norm32 = torch.linalg.vector_norm(g32, dim=1).amax().double() * (1 + 1e-6)
            approx = q32 @ g32.T
            err = fp32_error_bound(d) * q_norm * g_norm32
            rows = _maybe_ahead(approx, lowest, err)
            if rows.numel() == 0:
                continue
            band = _settle(approx[rows], err[rows], rel_scores[rows], positions, rows, None)
        amb = band.nonzero()  # (row, item, column) triples in a band: fp64 pair scores decide
        for piece in amb.split(PAIR_PIECE):
            r, j, c = rows[piece[:, 0]], piece[:, 1], piece[:, 2]
            exact = pair_scores(q32[r], g16[c])
            t, col, item = rel_scores[r, j], cols[c], rel_idx[r, j]
            ahead = (exact > t) | ((exact == t) & (col < item))
            positions.index_put_((r, j), ahead.int(), accumulate=True)
    return _positions_to_metrics(positions, mask)


def fp32_error_bound(d: int) -> float:
    """Coefficient c with |fp32 matmul score - exact score| <= c * ||q|| * ||g|| (gamma_d = d u32 / (1 - d u32),
    u32 = 2**-24, times a safety factor 2; fp32 queries and fp16/fp32 gallery values are exact in fp32)."""
    u = 2.0 ** -24
    return 2.0 * d * u / (1 - d * u)


def _maybe_ahead(approx: torch.Tensor, lowest: torch.Tensor, err: torch.Tensor) -> torch.Tensor:
    """Rows of a chunk that may hold a column at or above one of their relevant scores (others add nothing)."""
    return (approx.amax(dim=1).double() >= lowest - err.squeeze(1)).nonzero().squeeze(1)


def _settle(approx: torch.Tensor, err: torch.Tensor, rel_scores: torch.Tensor, positions: torch.Tensor,
            rows: torch.Tensor, within: torch.Tensor | None) -> torch.Tensor:
    """Count the columns of ``approx`` (R x C, each within ``err`` (R x 1) of its exact score) that are surely
    ahead of each relevant score (R x M); return the R x M x C band the approximation cannot settle.
    ``within``: only these columns are still open (a coarser screen settled the others)."""
    hi = round_to_float32(rel_scores + err, up=True).unsqueeze(2)  # R x M x 1: the band rounded outwards
    lo = round_to_float32(rel_scores - err, up=False).unsqueeze(2)
    s = approx.unsqueeze(1)  # R x 1 x C
    above, band = s > hi, (s >= lo) & (s <= hi)
    if within is not None:
        above, band = above & within, band & within
    positions[rows] += above.sum(dim=2, dtype=torch.int32)
    return band


def _rank_gallery_direct(queries: torch.Tensor, gallery: torch.Tensor, relevant: Sequence[Sequence[int]],
                         chunk: int | None) -> tuple[list[int], list[float]]:
    """Every chunk scored by one matmul in the queries' dtype.

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
