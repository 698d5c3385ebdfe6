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

import torch
import torch.nn.functional as F

from .. import distributed

# -- entropy and selection --------------------------------------------------------------------------


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
        n = min(int(self.frac * len(q)), len(q))
        if n < 1 or self.size < 1:
            return 0
        take = torch.argsort(ind, stable=True)[:n]
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


# -- QS-robust loss terms --------------------------------------------------------------------------


def rem_loss(ent: torch.Tensor, e_max: float | None, eps: float = 1e-3):
    """TCR's noise-robust entropy: ``mean w_i h_i`` over ``h_i <= E_m``, ``w_i = max(0, 1 - h_i/(E_m+eps))``.

    The weight is detached. Returns (loss, selection mask); the loss is None when nothing is selected
    or there is no threshold yet (the TCR code would take the mean of an empty set, i.e. NaN).
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
) -> tuple[list[torch.Tensor], dict[str, float]]:
    """Remove from ``g_adapt`` its component that conflicts with ``g_know``, then add ``lambda_k g_know``.

    mode "tensor": for every parameter tensor with ``<g_a, g_k> < 0``,
    ``g_a <- g_a - <g_a, g_k> / ||g_k||^2 g_k`` (the projected gradient is orthogonal to g_k).
    mode "global": the same test and projection on the concatenation of all tensors.
    mode "off": no projection (only the ``lambda_k`` term).
    Both lists hold one tensor per parameter (see :func:`grads_of`). Returns (new gradients,
    diagnostics): ``grad_angle`` (degrees, between the global g_a and g_k, before any change; absent
    when either is zero) and
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
    out = list(ga)
    if mode == "tensor":
        out = [a - (d / (n2 + eps)) * b if d < 0 and n2 > 0 else a for a, b, d, n2 in zip(ga, gk, dots, nk2)]
    elif mode == "global" and dot < 0 and nk > 0:
        coef = dot / (nk * nk + eps)
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

    ``first_step`` moves the parameters to ``w + rho g/||g||`` (ascent; ``adaptive`` scales by |w| as
    ASAM), ``second_step`` moves them back and lets the base optimizer step with the gradient computed
    at the perturbed point. ``step()`` does whichever comes next, so :meth:`Method.update` (the NaN
    guard) can drive both passes; ``unperturb()`` abandons a perturbation without a step.
    ``state_dict`` is the base optimizer's (the perturbation is transient).
    """

    def __init__(self, params, base_cls=torch.optim.AdamW, rho: float = 0.05, adaptive: bool = False, **kw):
        self.params = list(params)
        self.base = base_cls(self.params, **kw)
        self.rho, self.adaptive = float(rho), bool(adaptive)
        self._e: list[tuple[torch.Tensor, torch.Tensor]] | None = None

    @property
    def param_groups(self):
        return self.base.param_groups

    @property
    def perturbed(self) -> bool:
        return self._e is not None

    @torch.no_grad()
    def first_step(self) -> None:
        with_grad = [p for p in self.params if p.grad is not None]
        scaled = [(p.abs() if self.adaptive else 1.0) * p.grad for p in with_grad]
        norm = float(torch.linalg.vector_norm(torch.stack([s.norm() for s in scaled]))) if scaled else 0.0
        self._e = []
        for p in with_grad:
            e = (p.pow(2) if self.adaptive else 1.0) * p.grad * (self.rho / (norm + 1e-12))
            p.add_(e)
            self._e.append((p, e))

    @torch.no_grad()
    def unperturb(self) -> None:
        for p, e in self._e or []:
            p.sub_(e)
        self._e = None

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
        self._e = None
        self.base.load_state_dict(state)
