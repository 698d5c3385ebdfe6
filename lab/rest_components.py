"""Building blocks of REST's design candidates (issue 11) that the shipped ``rest`` does not use.

K1's KL to the source predictions (:func:`kl_to_source`), K2's anchors (:class:`AnchorStore`,
:func:`concat_inputs`), K4's protected subspace (:class:`GradientSubspace`), K5's diagonal and full Fisher
(:class:`DiagonalFisher`, :func:`sampled_nll`, :class:`SampledFisher`), the consistency alternatives
(:func:`agreement_loss`, :func:`margin_loss`) and the gradient projections (:func:`decouple_gradients`).
The shared pieces (queue, loss terms, per-tensor Fisher blocks, surrogate loss) stay in
:mod:`queryshift.methods.components`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from queryshift.methods.components import (
    BlockFisher,
    draw_labels,
    gradient_agreement,
    index_batch,
    source_like_indicator,
)
from queryshift.plainstate import allow_state_class


def concat_inputs(a, b):
    """Two query-tower inputs (tensors or dicts of tensors, batch first) as one; token tensors of other
    widths are right-padded with 0 (padding, masked out by the attention mask where there is one)."""
    if isinstance(a, dict):
        return {k: concat_inputs(a[k], b[k]) if torch.is_tensor(a[k]) else a[k] for k in a}
    if a.dim() == 2 and a.shape[1] != b.shape[1]:
        width = max(a.shape[1], b.shape[1])
        a, b = F.pad(a, (0, width - a.shape[1])), F.pad(b, (0, width - b.shape[1]))
    return torch.cat([a, b])


@allow_state_class
class AnchorStore:
    """The raw inputs of the ``size`` most source-like queries (TCR's indicator) seen at step 0 of the
    first ``warmup`` batches, with their candidates and source-time embeddings (REST's K2 knowledge
    objective re-encodes them with the current parameters). Frozen after the warm-up, like the queue."""

    def __init__(self, size: int = 16, warmup: int = 10):
        self.size, self.warmup = int(size), int(warmup)
        self.inputs = self.indicator = self.q = self.g = None

    def __len__(self) -> int:
        return 0 if self.indicator is None else int(self.indicator.numel())

    @torch.no_grad()
    def update(self, batch, q: torch.Tensor, g: torch.Tensor, batch_index: int, step: int) -> None:
        if step != 0 or batch_index >= self.warmup or self.size < 1:
            return
        q, g = q.detach(), g.detach()
        ind = source_like_indicator(q, g)
        finite = torch.isfinite(ind) & torch.isfinite(q).all(1)
        if not bool(finite.any()):
            return
        take = torch.argsort(torch.where(finite, ind, torch.inf), stable=True)[: min(self.size, int(finite.sum()))]
        new = (index_batch(batch, take), ind[take], q[take], g[take])
        if self.indicator is not None:
            new = (concat_inputs(self.inputs, new[0]),
                   *(torch.cat([a, b]) for a, b in zip((self.indicator, self.q, self.g), new[1:])))
        keep = torch.argsort(new[1], stable=True)[: self.size]
        self.inputs = index_batch(new[0], keep)
        self.indicator, self.q, self.g = (t[keep] for t in new[1:])


@allow_state_class
class GradientSubspace:
    """Protected gradient directions, as GPM in continual learning (REST's K4 knowledge objective).

    While collecting, :meth:`add` stores one gradient (a list of tensors) of the knowledge objective; the
    first :meth:`project` after that freezes, per parameter tensor, the top singular directions of the
    stored gradients that hold ``energy`` of their squared norm (at most ``max_rank``). :meth:`project`
    then removes from a gradient its component in those directions, so updates leave the protected
    behaviour unchanged to first order.
    """

    def __init__(self, energy: float = 0.9, max_rank: int = 4):
        self.energy, self.max_rank = float(energy), int(max_rank)
        self.rows: list[list[torch.Tensor]] = []
        self.basis: list[torch.Tensor] | None = None

    def __len__(self) -> int:
        return len(self.rows) if self.basis is None else sum(int(b.shape[1]) for b in self.basis)

    @torch.no_grad()
    def add(self, grads: Sequence[torch.Tensor]) -> None:
        if self.basis is None and all(torch.isfinite(g).all() for g in grads):
            self.rows.append([g.detach().flatten().clone() for g in grads])

    @torch.no_grad()
    def _freeze(self) -> None:
        self.basis = []
        for i in range(len(self.rows[0]) if self.rows else 0):
            m = torch.stack([r[i] for r in self.rows], dim=1)  # d x n
            u, sv, _ = torch.linalg.svd(m, full_matrices=False)
            share = (sv**2).cumsum(0) / (sv**2).sum().clamp_min(1e-30)
            rank = min(self.max_rank, int((share < self.energy).sum()) + 1) if float(sv[0]) > 0 else 0
            self.basis.append(u[:, :rank].contiguous())
        self.rows = []

    @torch.no_grad()
    def project(self, grads: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        if self.basis is None:
            if not self.rows:
                return list(grads)
            self._freeze()
        out = []
        for g, u in zip(grads, self.basis):
            flat = g.flatten()
            out.append((flat - u @ (u.T @ flat)).view_as(g) if u.shape[1] else g)
        return out


@allow_state_class
class DiagonalFisher:
    """Diagonal Fisher information of the source-like queries' predictions (REST's K5 knowledge objective, as EWC).

    While collecting (the queue's warm-up), :meth:`add` takes the gradient of ``sum_i -log p_i(y_i)`` over
    ``n`` reliable queries, each ``y_i`` drawn from the query's own prediction ``p_i``. Its elementwise square
    is an unbiased estimate of the sum of the n queries' diagonal Fisher: each query's score
    ``J_i^T (p_i - e_y)`` has mean zero when y is drawn from p_i, so the cross terms vanish in expectation.
    :attr:`weights` is the per-query mean over every added batch. Then ``0.5 sum F (theta - theta_0)^2`` is the
    second-order expansion around the source of K1's mean ``KL(p_source || p_theta)``, and its gradient
    ``F (theta - theta_0)`` is K1's knowledge gradient without K1's source forward and second backward.
    """

    def __init__(self):
        self.total: list[torch.Tensor] | None = None
        self.count = 0

    def __len__(self) -> int:
        return self.count

    @torch.no_grad()
    def add(self, grads: Sequence[torch.Tensor], n: int) -> None:
        if n < 1 or not bool(torch.stack([torch.isfinite(g).all() for g in grads]).all()):
            return
        squares = [g.detach() ** 2 / n for g in grads]
        self.total = squares if self.total is None else [t + s for t, s in zip(self.total, squares)]
        self.count += 1

    @property
    def weights(self) -> list[torch.Tensor] | None:
        return None if self.total is None else [t / self.count for t in self.total]

    @torch.no_grad()
    def knowledge(self, params: Sequence[torch.Tensor], source: Sequence[torch.Tensor]):
        """-> (``F (theta - theta_0)`` per tensor, ``0.5 sum F (theta - theta_0)^2`` as a float)."""
        deltas = [p.detach() - s for p, s in zip(params, source)]
        grads = [w * d for w, d in zip(self.weights, deltas)]
        return grads, 0.5 * float(torch.stack([(g * d).sum() for g, d in zip(grads, deltas)]).sum())


@allow_state_class
class SampledFisher(BlockFisher):
    """:class:`BlockFisher` with ``full=True``: ``F = U^T U / n`` over all adapted parameters together, so it keeps
    how the LayerNorms of different layers act together on the predictions (rank at most n); ``full=False`` is
    :class:`BlockFisher` (the blocks of each tensor, ``U_t^T U_t / n``)."""

    def __init__(self, full: bool = True):
        super().__init__()
        self.full = bool(full)

    def _product(self, u: torch.Tensor, d: torch.Tensor, sizes: list[int]) -> torch.Tensor:
        return u.T @ (u @ d) / len(u) if self.full else super()._product(u, d, sizes)


def sampled_nll(logits: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """``sum_i -log p_i(y_i)``, each label ``y_i`` drawn from ``p_i = softmax(logits_i)`` with ``generator`` (CPU).

    The elementwise square of its gradient estimates the diagonal Fisher of the predictions without bias
    (:class:`DiagonalFisher`); the argmax label instead of a draw would not.
    """
    return F.cross_entropy(logits, draw_labels(logits, generator), reduction="sum")


def agreement_loss(logits: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor | None:
    """Consistency alternative: cross-entropy of each prediction toward its raw top-1 (``target``),
    ``mean_{i in mask} -log p_i[target_i]``; None for an empty mask."""
    if not bool(mask.any()):
        return None
    return F.cross_entropy(logits[mask], target[mask])


def margin_loss(scores: torch.Tensor, mask: torch.Tensor) -> torch.Tensor | None:
    """Consistency alternative: ``-mean_{i in mask} (s_i,top1 - s_i,top2)`` over the gallery scores (a
    query should single out the item it retrieves); None for an empty mask or a one-item gallery."""
    if not bool(mask.any()) or scores.shape[1] < 2:
        return None
    top = scores[mask].topk(2, dim=1).values
    return -(top[:, 0] - top[:, 1]).mean()


def kl_to_source(logits_source: torch.Tensor, logits: torch.Tensor, mask: torch.Tensor):
    """``mean_{i in mask} KL(p_source,i || p_theta,i)`` over the same candidates; None for an empty mask.

    Written as ``lse(z) - lse(z_s) - sum_j p_s,j (z_j - z_s,j)`` (the same value) so that its gradient is
    exactly ``softmax(z) - p_s`` with ``p_s = exp(z_s - lse(z_s))``, the very expression autograd uses for
    softmax(z): at the source parameters (z == z_s) the gradient is exactly zero instead of rounding noise,
    whose random direction the gradient decoupling would otherwise project on.
    """
    if not bool(mask.any()):
        return None
    z_s, z = logits_source[mask].detach(), logits[mask]
    lse_s = torch.logsumexp(z_s, dim=-1, keepdim=True)
    p_s = (z_s - lse_s).exp()
    kl = torch.logsumexp(z, dim=-1) - lse_s.squeeze(-1) - (p_s * (z - z_s)).sum(-1)
    return kl.mean()


def decouple_gradients(
    g_adapt: Sequence[torch.Tensor],
    g_know: Sequence[torch.Tensor],
    mode: str = "tensor",
    lambda_k: float = 0.0,
    eps: float = 1e-20,
    margin_deg: float = 90.0,
    keep: float = 0.0,
) -> tuple[list[torch.Tensor], dict[str, float]]:
    """Remove from ``g_adapt`` its component that conflicts with ``g_know``, then add ``lambda_k g_know``.

    Combination rules (REST design space): a tensor (or, globally, the whole gradient) counts as in
    conflict when its angle to g_k exceeds ``margin_deg`` (90: any negative inner product); ``keep``
    is the fraction of the conflicting component that stays (0: full projection).

    mode "tensor": for every parameter tensor with ``<g_a, g_k> < 0``,
    ``g_a <- g_a - <g_a, g_k> / ||g_k||^2 g_k`` (the projected gradient is orthogonal to g_k).
    mode "global": the same test and projection on the concatenation of all tensors.
    mode "off": no projection (only the ``lambda_k`` term).
    Both lists hold one tensor per parameter (see :func:`grads_of`). Returns (new gradients,
    diagnostics): ``grad_angle`` (degrees, between the global g_a and g_k, before any change; absent
    when either is zero), ``know_norm_ratio`` (``||g_k|| / ||g_a||``, absent with it) and
    ``conflict_frac`` (fraction of the tensors with both gradients non-zero whose inner product is < 0).
    """
    if mode not in ("tensor", "global", "off"):
        raise ValueError(f"unknown decoupling mode {mode!r}; expected 'tensor', 'global' or 'off'")
    ga, gk = list(g_adapt), list(g_know)
    dots, na2, nk2, info = gradient_agreement(ga, gk)
    dot, na, nk = sum(dots), math.sqrt(sum(na2)), math.sqrt(sum(nk2))
    # cos(90 degrees) is 6e-17 in floating point: the default must test the sign exactly
    cos_m = 0.0 if margin_deg == 90.0 else math.cos(math.radians(margin_deg))

    def conflicts(d: float, na2_: float, nk2_: float) -> bool:
        return nk2_ > 0 and d < cos_m * math.sqrt(na2_ * nk2_) and d < 0

    out = list(ga)
    if mode == "tensor":
        out = [a - (1 - keep) * (d / (n2 + eps)) * b if conflicts(d, a2, n2) else a
               for a, b, d, a2, n2 in zip(ga, gk, dots, na2, nk2)]
    elif mode == "global" and conflicts(dot, na * na, nk * nk):
        coef = (1 - keep) * dot / (nk * nk + eps)
        out = [a - coef * b for a, b in zip(ga, gk)]
    if lambda_k:
        out = [a + lambda_k * b for a, b in zip(out, gk)]
    return out, info
