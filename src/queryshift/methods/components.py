"""Building blocks shared by the adaptation methods; each piece exists once, here.

Nothing in this module knows about a particular method. Notation follows the specs
(``/work/shared/spec/tcr-and-baselines.md``, ``rest.md``): ``q`` (B x d) L2-normalised query embeddings,
``gallery`` (N x d) the fixed L2-normalised gallery, ``g~`` (B x d) the candidate gallery item of each
query, ``tau`` a temperature, entropies in nats.

- entropy and the selection rules (fractions as in the TCR code: ``k = int(frac * B)``),
- candidate prediction / refinement (top-1 or top-k-mean gallery candidate, in-batch logits),
- :class:`SourceLikeQueue`, the source-like sample queue of TCR §2.3 (sizes as parameters, vectorised),
- the QS-robust loss terms (noise-robust entropy, centre-uniformity, modality gap, consistency),
- gradient decoupling (per-tensor or global projection) and :func:`surrogate_loss`, which lets a
  hand-built gradient go through :meth:`Method.update` (the single NaN guard),
- :class:`SAM` (sharpness-aware minimisation around a base optimizer) for SAR.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from contextlib import contextmanager

import torch
import torch.nn.functional as F

from .. import distributed

# -- entropy and selection --------------------------------------------------------------------------


@contextmanager
def one_thread():
    """Run a block of parameter-sized tensor ops (optimizer update, gradient bookkeeping) on one thread.

    Such tensors (LayerNorm weights: hundreds of elements) are far below any parallel grain, yet some CPU
    kernels (MKL's vectorised sqrt, for one) still open a parallel region, and on a busy machine every
    region waits for a descheduled second thread: sqrt of 128 floats took 11 us on one thread and 10 ms on
    two at load 8 on this 2-core machine, and an AdamW step over 20 such tensors 100 ms instead of 11 ms.
    Only for elementwise ops and reductions below the parallel grain, whose results do not depend on the
    thread count (bit for bit); never around a forward or backward of the model. The thread count is
    process-wide, so another thread's ops run on one thread meanwhile.
    """
    n = torch.get_num_threads()
    if n == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def entropy(logits: torch.Tensor) -> torch.Tensor:
    """Row-wise Shannon entropy (natural log) of ``softmax(logits)``; shape = logits.shape[:-1]."""
    logp = logits.log_softmax(dim=-1)
    return -(logp.exp() * logp).sum(dim=-1)


def scalar(t: torch.Tensor) -> float:
    """A 0-d tensor as a Python float for the logs (detached, no autograd warning)."""
    return float(t.detach())


def gallery_logits(q: torch.Tensor, gallery: torch.Tensor, tau: float) -> torch.Tensor:
    """Logits over the full gallery, ``q . G^T / tau`` (B x N), as every baseline uses them."""
    return q @ gallery.T / tau


def kth_smallest(values: torch.Tensor, frac: float) -> float | None:
    """The k-th smallest value with ``k = int(frac * len(values))`` (the TCR code's margin-as-fraction).

    Returns None when k == 0 (too few values for that fraction), so a caller can decide what "no
    threshold" means (an empty selection for the filters, +inf for DeYO's re-weighting).
    """
    k = min(int(frac * values.numel()), values.numel())
    if k < 1:
        return None
    return float(values.detach().flatten().kthvalue(k).values)


def select_lowest(values: torch.Tensor, frac: float, strict: bool = False):
    """Select the samples whose value is at most (``strict``: below) the k-th smallest, k = int(frac*B).

    Non-strict (``<=``) keeps at least k samples (SAR pass 1, EATA); strict (``<``) keeps those strictly
    below the k-th smallest, i.e. k-1 without ties (DeYO). k == 0 selects nothing.
    Returns (boolean mask, threshold: float or None).
    """
    thr = kth_smallest(values, frac)
    if thr is None:
        return torch.zeros_like(values, dtype=torch.bool), None
    v = values.detach()
    return (v < thr if strict else v <= thr), thr


def index_batch(batch, mask: torch.Tensor):
    """The rows ``mask`` of a query batch: a tensor or a dict of tensors with the batch first."""
    if isinstance(batch, dict):
        return {k: (v[mask] if torch.is_tensor(v) else v) for k, v in batch.items()}
    return batch[mask]


# -- candidate prediction / refinement -------------------------------------------------------------


def candidates(scores: torch.Tensor, gallery: torch.Tensor, k: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Each query's gallery candidate ``g~_i`` from its score row (rest.md §2.1, TCR §2.2).

    k == 1: the top-1 gallery item (TCR). k > 1: the mean of the top-k items, re-normalised to the unit
    sphere so that ``q . g~`` stays a cosine. Returns (g~ (B x d, no grad), top-1 indices (B,)).
    """
    k = max(1, min(int(k), gallery.shape[0]))
    idx = scores.detach().topk(k, dim=1).indices
    g = gallery[idx[:, 0]] if k == 1 else F.normalize(gallery[idx].mean(dim=1), dim=-1)
    return g.detach(), idx[:, 0]


def inbatch_logits(q: torch.Tensor, g_cand: torch.Tensor, tau: float) -> torch.Tensor:
    """Refined prediction logits over the B in-batch candidates: ``Q . G~^T / tau`` (B x B)."""
    return q @ g_cand.T / tau


def consistency(q: torch.Tensor, g_cand: torch.Tensor) -> torch.Tensor:
    """Query-gallery consistency of each query with its own candidate: ``q_i . g~_i`` (B,)."""
    return (q * g_cand).sum(dim=-1)


def modality_gap(q: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """``|| mean_i normalize(q_i) - mean_i normalize(g_i) ||_2`` (TCR's Delta, a scalar tensor)."""
    return torch.linalg.vector_norm(F.normalize(q, dim=-1).mean(0) - F.normalize(g, dim=-1).mean(0))


def source_like_indicator(q: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """TCR §2.3: ``2 * ||q_i - g~_i|| - ||q_i - c_q|| - ||g~_i - c_g||`` (smaller = more source-like).

    The centres are the plain batch means (not re-normalised), as in the TCR code.
    """
    gap = torch.linalg.vector_norm(q - g, dim=1)
    div_q = torch.linalg.vector_norm(q - q.mean(0), dim=1)
    div_g = torch.linalg.vector_norm(g - g.mean(0), dim=1)
    return 2 * gap - div_q - div_g


class SourceLikeQueue:
    """TCR's source-like sample queue (spec §2.3), with its constants as parameters (rest.md §2.1).

    While ``batch_index < warmup`` and only at step 0 of a batch, the ``int(frac * B)`` samples of the
    batch with the smallest indicator are added; the queue is then sorted by indicator and truncated to
    the ``size`` most source-like entries (a min-stack). Entries are frozen as inserted. The queue is kept
    sorted at all times (TCR sorts only when full; no statistic depends on the order). It provides the
    adaptive entropy threshold ``max_entropy`` (E_m), the target modality gap ``gap`` and, for REST, the
    reference consistency ``mean_consistency``. All statistics are None while the queue is empty.
    Samples with a non-finite indicator, entropy or feature are never added (a guard; the TCR code has
    none).
    """

    def __init__(self, size: int = 64, frac: float = 0.3, warmup: int = 10):
        self.size, self.frac, self.warmup = int(size), float(frac), int(warmup)
        self.indicator = self.q = self.g = self.entropy = self.consistency = None
        self._stats = None  # (max entropy, gap, mean consistency) as floats, computed once per change

    def __len__(self) -> int:
        return 0 if self.indicator is None else int(self.indicator.numel())

    def accepts(self, batch_index: int, step: int) -> bool:
        return step == 0 and batch_index < self.warmup

    @torch.no_grad()
    def push(self, q: torch.Tensor, g: torch.Tensor, entropy: torch.Tensor) -> int:
        """Add the most source-like ``int(frac * B)`` samples of a batch; returns how many were added."""
        q, g, entropy = q.detach(), g.detach(), entropy.detach()
        ind = source_like_indicator(q, g)
        # a non-finite sample (e.g. a NaN query, which also makes every indicator NaN through the batch
        # centre) never enters the queue: it would poison E_m and the reference gap for the whole stream
        finite = torch.isfinite(ind) & torch.isfinite(entropy) & torch.isfinite(q).all(1) & torch.isfinite(g).all(1)
        n = min(int(self.frac * len(q)), int(finite.sum()))
        if n < 1 or self.size < 1:
            return 0
        take = torch.argsort(torch.where(finite, ind, torch.inf), stable=True)[:n]
        new = (ind[take], q[take], g[take], entropy[take], consistency(q[take], g[take]))
        if self.indicator is not None:
            old = (self.indicator, self.q, self.g, self.entropy, self.consistency)
            new = tuple(torch.cat([a, b]) for a, b in zip(old, new))
        keep = torch.argsort(new[0], stable=True)[: self.size]
        self.indicator, self.q, self.g, self.entropy, self.consistency = (t[keep] for t in new)
        self._stats = None
        return n

    def _statistics(self) -> tuple[float, float, float] | None:
        """The three statistics read from the device in one transfer, then cached until the next push (once
        the queue is frozen, never again)."""
        if not len(self):
            return None
        if getattr(self, "_stats", None) is None:
            self._stats = tuple(torch.stack([self.entropy.max(), modality_gap(self.q, self.g),
                                             self.consistency.mean()]).tolist())
        return self._stats

    def update(self, q, g, entropy, batch_index: int, step: int) -> int:
        """:meth:`push` if the queue still accepts samples at this batch/step, else nothing."""
        return self.push(q, g, entropy) if self.accepts(batch_index, step) else 0

    @property
    def max_entropy(self) -> float | None:
        stats = self._statistics()
        return None if stats is None else stats[0]

    @property
    def gap(self) -> float | None:
        stats = self._statistics()
        return None if stats is None else stats[1]

    @property
    def mean_consistency(self) -> float | None:
        stats = self._statistics()
        return None if stats is None else stats[2]


def concat_inputs(a, b):
    """Two query-tower inputs (tensors or dicts of tensors, batch first) as one; token tensors of other
    widths are right-padded with 0 (padding, masked out by the attention mask where there is one)."""
    if isinstance(a, dict):
        return {k: concat_inputs(a[k], b[k]) if torch.is_tensor(a[k]) else a[k] for k in a}
    if a.dim() == 2 and a.shape[1] != b.shape[1]:
        width = max(a.shape[1], b.shape[1])
        a, b = F.pad(a, (0, width - a.shape[1])), F.pad(b, (0, width - b.shape[1]))
    return torch.cat([a, b])


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


class SampledFisher:
    """The Fisher of the source-like queries' predictions from single queries' scores, per tensor or whole.

    :meth:`add` takes ``g_i = d/dtheta -log p_i(y_i)`` of a single query, ``y_i`` drawn from ``p_i``
    (``E[g g^T]`` is that query's Fisher) and keeps it as a row of ``U`` (n x P). ``full=True``: ``F = U^T U / n``
    over all adapted parameters together, so it keeps how the LayerNorms of different layers act together on
    the predictions (rank at most n); ``full=False``: only the blocks of each tensor (``U_t^T U_t / n``).
    :meth:`knowledge` as :class:`DiagonalFisher` (``F d = U^T (U d) / n``: never a P x P matrix).
    """

    def __init__(self, full: bool = True):
        self.full = bool(full)
        self.rows: list[torch.Tensor] = []
        self.shapes: list[torch.Size] | None = None
        self._stacked: torch.Tensor | None = None  # U, stacked once per change of rows, not at every step

    def __getstate__(self) -> dict:  # checkpoints keep the rows, not a second copy of them
        return {**self.__dict__, "_stacked": None}

    def __setstate__(self, state: dict) -> None:  # also checkpoints written before the cache existed
        self.__dict__.update({"_stacked": None, **state})

    def __len__(self) -> int:
        return len(self.rows)

    @torch.no_grad()
    def add(self, grads: Sequence[torch.Tensor]) -> None:
        if not bool(torch.stack([torch.isfinite(g).all() for g in grads]).all()):
            return
        self.shapes = [g.shape for g in grads]
        self.rows.append(torch.cat([g.detach().flatten() for g in grads]))

    @torch.no_grad()
    def knowledge(self, params: Sequence[torch.Tensor], source: Sequence[torch.Tensor]):
        """-> (``F (theta - theta_0)`` per tensor, ``0.5 d^T F d`` as a float)."""
        if self._stacked is None or len(self._stacked) != len(self.rows):
            self._stacked = torch.stack(self.rows)
        u = self._stacked  # n x P
        d = torch.cat([(p.detach() - s).flatten() for p, s in zip(params, source)])
        sizes = [p.numel() for p in params]
        if self.full:
            fd = u.T @ (u @ d) / len(u)
        else:
            fd = torch.cat([ut.T @ (ut @ dt) for ut, dt in zip(u.split(sizes, dim=1), d.split(sizes))]) / len(u)
        grads = [t.view_as(p) for t, p in zip(fd.split(sizes), params)]
        return grads, 0.5 * float(fd @ d)


def draw_labels(logits: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """One label per row drawn from ``softmax(logits)`` with ``generator`` (CPU), on the logits' device."""
    drawn = torch.multinomial(logits.detach().float().softmax(-1).cpu(), 1, generator=generator).squeeze(1)
    return drawn.to(logits.device)


def sampled_nll(logits: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """``sum_i -log p_i(y_i)``, each label ``y_i`` drawn from ``p_i = softmax(logits_i)`` with ``generator`` (CPU).

    The elementwise square of its gradient estimates the diagonal Fisher of the predictions without bias
    (:class:`DiagonalFisher`); the argmax label instead of a draw would not.
    """
    return F.cross_entropy(logits, draw_labels(logits, generator), reduction="sum")


# -- QS-robust loss terms --------------------------------------------------------------------------


def rem_loss(ent: torch.Tensor, e_max: float | None, eps: float = 1e-3):
    """TCR's noise-robust entropy: ``mean w_i h_i`` over ``h_i <= E_m``, ``w_i = max(0, 1 - h_i/(E_m+eps))``.

    The weight is detached. Returns (loss, selection mask); the loss is None when nothing is selected
    or there is no threshold yet. (The TCR code takes the mean of an empty set there: a NaN value whose
    gradient is zero, so leaving the term out of the sum gives the TCR code's update.)
    """
    if e_max is None:
        return None, torch.zeros_like(ent, dtype=torch.bool)
    h = ent.detach()
    mask = h <= e_max
    if not bool(mask.any()):
        return None, mask
    w = (1 - h / (e_max + eps)).clamp_min(0)
    return (w * ent)[mask].mean(), mask


def uniformity_loss(q: torch.Tensor, t: float = 0.1) -> torch.Tensor:
    """TCR's centre-uniformity ``mean_i exp(-t ||q_i - c||)`` with c = mean_i q_i (with gradient)."""
    return torch.exp(-t * torch.linalg.vector_norm(q - q.mean(0), dim=1)).mean()


def gap_loss(q: torch.Tensor, g_cand: torch.Tensor, target: float) -> torch.Tensor:
    """TCR's EMG ``(Delta(Q, G~) - Delta_queue)^2``; the gradient flows through Q only."""
    return (modality_gap(q, g_cand.detach()) - target) ** 2


def consistency_loss(cons: torch.Tensor, target: float, mask: torch.Tensor) -> torch.Tensor | None:
    """REST's consistency term (our reading, rest.md §2.2): ``mean_{i in mask} relu(target - cons_i)``.

    None when the mask is empty.
    """
    if not bool(mask.any()):
        return None
    return F.relu(target - cons[mask]).mean()


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


# -- gradient decoupling ---------------------------------------------------------------------------


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
    # per-tensor inner products and squared norms computed on the device and read in one transfer
    sums = torch.stack([torch.stack([(a * b).sum(), (a * a).sum(), (b * b).sum()]) for a, b in zip(ga, gk)])
    dots, na2, nk2 = (list(col) for col in zip(*sums.double().tolist()))
    both = [i for i in range(len(ga)) if na2[i] > 0 and nk2[i] > 0]
    info = {"conflict_frac": (sum(dots[i] < 0 for i in both) / len(both)) if both else 0.0}
    dot, na, nk = sum(dots), math.sqrt(sum(na2)), math.sqrt(sum(nk2))
    if na > 0 and nk > 0 and math.isfinite(dot / (na * nk)):
        info["grad_angle"] = math.degrees(math.acos(max(-1.0, min(1.0, dot / (na * nk)))))
        info["know_norm_ratio"] = nk / na  # how strongly lambda_k g_k pulls against g_a (scale of lambda_k)
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


def grads_of(loss: torch.Tensor, params: Sequence[torch.Tensor], retain_graph: bool = False):
    """``d loss / d params`` as a list with zeros for parameters the loss does not reach."""
    gs = torch.autograd.grad(loss, list(params), retain_graph=retain_graph, allow_unused=True)
    # data-parallel: each rank holds its shard's share of the gradient; the global one is their sum
    return distributed.average_tensors([torch.zeros_like(p) if g is None else g for p, g in zip(params, gs)])


def surrogate_loss(value: torch.Tensor, params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor]):
    """A loss whose value is ``value`` and whose gradient w.r.t. ``params`` is exactly ``grads``.

    ``value.detach() + sum_p <p - p.detach(), g_p>``: lets a hand-built gradient go through
    :meth:`Method.update`, so the one NaN guard (loss and gradients) also covers decoupled updates.
    """
    s = value.detach()
    for p, g in zip(params, grads):
        s = s + ((p - p.detach()) * g.detach()).sum()
    return s


# -- SAM (for SAR) ---------------------------------------------------------------------------------


class SAM:
    """Sharpness-aware minimisation (Foret et al., 2021) around a base optimizer, as SAR uses it.

    ``first_step`` saves the weights ``w`` and moves the parameters to ``w + rho g/||g||`` (ascent;
    ``adaptive`` scales by |w| as ASAM), ``second_step`` restores the saved ``w`` exactly (a copy, as SAR
    and the TCR code do, not ``(w + e) - e``, which drifts by an ulp in some elements) and lets the base
    optimizer step with the gradient computed at the perturbed point. ``step()`` does whichever comes
    next, so :meth:`Method.update` (the NaN guard) can drive both passes; ``unperturb()`` abandons a
    perturbation without a step. ``state_dict`` is the base optimizer's (the perturbation is transient).
    """

    def __init__(self, params, base_cls=torch.optim.AdamW, rho: float = 0.05, adaptive: bool = False, **kw):
        self.params = list(params)
        self.base = base_cls(self.params, **kw)
        self.rho, self.adaptive = float(rho), bool(adaptive)
        self._saved: list[tuple[torch.Tensor, torch.Tensor]] | None = None  # (parameter, its weights w)

    @property
    def param_groups(self):
        return self.base.param_groups

    @property
    def perturbed(self) -> bool:
        return self._saved is not None

    @torch.no_grad()
    def first_step(self) -> None:
        with_grad = [p for p in self.params if p.grad is not None]
        scaled = [(p.abs() if self.adaptive else 1.0) * p.grad for p in with_grad]
        norm = float(torch.linalg.vector_norm(torch.stack([s.norm() for s in scaled]))) if scaled else 0.0
        self._saved = []
        for p in with_grad:
            e = (p.pow(2) if self.adaptive else 1.0) * p.grad * (self.rho / (norm + 1e-12))
            self._saved.append((p, p.detach().clone()))
            p.add_(e)

    @torch.no_grad()
    def unperturb(self) -> None:
        for p, w in self._saved or []:
            p.copy_(w)
        self._saved = None

    def second_step(self) -> None:
        self.unperturb()
        self.base.step()

    def step(self) -> None:
        self.second_step() if self.perturbed else self.first_step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.base.zero_grad(set_to_none=set_to_none)

    def state_dict(self):
        return self.base.state_dict()

    def load_state_dict(self, state) -> None:
        self._saved = None
        self.base.load_state_dict(state)
