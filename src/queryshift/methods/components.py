"""Building blocks shared by the adaptation methods; each piece exists once, here.

Nothing in this module knows about a particular method. Notation: ``q`` (B x d) L2-normalised query embeddings,
``gallery`` (N x d) the fixed L2-normalised gallery, ``g~`` (B x d) the candidate gallery item of each
query, ``tau`` a temperature, entropies in nats.

- entropy and the selection rules (fractions as in the TCR code: ``k = int(frac * B)``),
- candidate prediction / refinement (top-1 or top-k-mean gallery candidate, in-batch logits),
- :class:`SourceLikeQueue`, TCR's source-like sample queue (sizes as parameters, vectorised),
- the QS-robust loss terms (noise-robust entropy, centre-uniformity, modality gap, consistency),
- per-sample gradients (:class:`LayerNormTaps` from the batch's forward and one backward, :func:`per_sample_grads`
  with ``torch.func``, :func:`looped_grads` one by one),
- REST's knowledge pull (:class:`BlockFisher`, :func:`knowledge_pull`) and :func:`surrogate_loss`, which lets a
  hand-built gradient go through :meth:`Method.update` (the single NaN guard),
- :class:`SAM` (sharpness-aware minimisation around a base optimizer) for SAR.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Sequence
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

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
    """Each query's gallery candidate ``g~_i`` from its score row (TCR's query-gallery refinement; REST's top-k).

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


def refine_queries(q: torch.Tensor, g: torch.Tensor, gap_ref: float | None, scale: float
                   ) -> tuple[torch.Tensor, dict[str, float]]:
    """TCR_Untrain's query transform: expand the batch about its centre ``c_q`` by ``scale``, then move it by
    ``(1 - Delta_ref / Delta_batch) (mean(G~) - c_q)`` toward the candidates (skipped without a reference or
    when ``Delta_batch`` is 0), re-normalised. Returns (the refined queries, log values)."""
    gap_batch = float(modality_gap(q, g))
    centre = q.mean(dim=0)
    refined = centre + scale * (q - centre)
    info = {"gap": gap_batch}
    if gap_ref is not None and gap_batch > 0:
        refined = refined + (1 - gap_ref / gap_batch) * (g.mean(dim=0) - centre)
        info["gap_ref"] = gap_ref
    return F.normalize(refined, dim=-1), info


def source_like_indicator(q: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """TCR's source-like indicator ``2 * ||q_i - g~_i|| - ||q_i - c_q|| - ||g~_i - c_g||`` (smaller = more source-like).

    The centres are the plain batch means (not re-normalised), as in the TCR code.
    """
    gap = torch.linalg.vector_norm(q - g, dim=1)
    div_q = torch.linalg.vector_norm(q - q.mean(0), dim=1)
    div_g = torch.linalg.vector_norm(g - g.mean(0), dim=1)
    return 2 * gap - div_q - div_g


class SourceLikeQueue:
    """TCR's source-like sample queue, with its constants (size, fraction, warm-up batches) as parameters.

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


class BlockFisher:
    """The per-tensor blocks of the Fisher of the source-like queries' predictions, from single queries' scores.

    :meth:`add` takes ``g_i = d/dtheta -log p_i(y_i)`` of one query, ``y_i`` drawn from ``p_i`` (``E[g g^T]`` is
    that query's Fisher), and keeps it as a row of ``U`` (n x P). The estimate is ``F_t = U_t^T U_t / n`` for
    each parameter tensor t (the blocks of ``U^T U / n`` on its diagonal): :meth:`knowledge` gives REST's
    knowledge gradient ``F (theta - theta_0)`` (``F_t d_t = U_t^T (U_t d_t) / n``, never a P x P matrix) and the
    quadratic distance ``0.5 d^T F d`` from the source, the second-order expansion of ``KL(p_source || p_theta)``.
    """

    def __init__(self):
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

    def _product(self, u: torch.Tensor, d: torch.Tensor, sizes: list[int]) -> torch.Tensor:
        """``F d`` for the flat parameter change ``d`` (the per-tensor blocks of ``U^T U / n``)."""
        return torch.cat([ut.T @ (ut @ dt) for ut, dt in zip(u.split(sizes, dim=1), d.split(sizes))]) / len(u)

    @torch.no_grad()
    def knowledge(self, params: Sequence[torch.Tensor], source: Sequence[torch.Tensor]):
        """-> (``F (theta - theta_0)`` per tensor, ``0.5 d^T F d`` as a float)."""
        if self._stacked is None or len(self._stacked) != len(self.rows):
            self._stacked = torch.stack(self.rows)
        d = torch.cat([(p.detach() - s).flatten() for p, s in zip(params, source)])
        sizes = [p.numel() for p in params]
        fd = self._product(self._stacked, d, sizes)
        grads = [t.view_as(p) for t, p in zip(fd.split(sizes), params)]
        return grads, 0.5 * float(fd @ d)


class LayerNormTaps:
    """Per-sample gradients of LayerNorm affine parameters from the batch's own forward and ONE backward.

    A LayerNorm computes ``y = x_hat * w + b`` over its normalised (last) dims, so ``dL/dw = sum x_hat * dL/dy``
    and ``dL/db = sum dL/dy`` over every other position. When each sample's loss depends on that sample's rows
    only (towers batch-first and in eval mode, a per-sample loss summed), summing over one sample's positions gives
    that sample's gradient: the rows of :func:`per_sample_grads` without a second forward or a vmap. Used as a
    context manager around the forward: forward hooks record every call of the LayerNorms that own the
    parameters (input and output); :meth:`rows` then takes the one backward to the recorded outputs.
    """

    def __init__(self, owners: list[tuple[torch.nn.LayerNorm, str]]):
        self.owners = owners  # (module, "weight" | "bias") of each parameter, in order
        # (module, input, output, their versions at the call): an op in place later makes them another tensor
        self.calls: list[tuple[torch.nn.Module, torch.Tensor, torch.Tensor, tuple[int, int]]] = []
        self._handles: list = []

    @classmethod
    def of(cls, model: torch.nn.Module, named_params) -> LayerNormTaps | None:
        """Taps for ``named_params`` (names as in ``model``), or None unless each is the weight or bias of an
        ``nn.LayerNorm`` whose forward is a plain one (another forward need not be ``x_hat * w + b``)."""
        modules = dict(model.named_modules())
        owners = []
        for name, _ in named_params:
            module_name, _, attr = name.rpartition(".")
            module = modules.get(module_name)
            if not (isinstance(module, torch.nn.LayerNorm) and attr in ("weight", "bias")
                    and _plain_layernorm(module)):
                return None
            owners.append((module, attr))
        return cls(owners) if owners else None

    def _record(self, module, inputs, output):
        x = inputs[0].detach()
        self.calls.append((module, x, output, (x._version, output._version)))

    def __enter__(self):
        self.calls = []
        self._handles = [m.register_forward_hook(self._record) for m in dict.fromkeys(m for m, _ in self.owners)]
        return self

    def __exit__(self, *exc):
        for h in self._handles:
            h.remove()
        self._handles = []

    def rows(self, loss: torch.Tensor, chosen: torch.Tensor, batch_size: int) -> torch.Tensor | None:
        """The per-sample gradients (one flat row per index of ``chosen``, parameters in order) of ``loss``, the sum
        of the ``chosen`` samples' own losses computed from the recorded forward of ``batch_size`` samples. None
        where the recorded calls do not show one sample per row of dim 0, a recorded input or output was changed in
        place after the call, or a sample outside ``chosen`` gets a gradient (a layer or the loss couples samples):
        then the rows would not be per-sample; the graph is kept."""
        modules = {m for m, _ in self.owners}
        if ({m for m, *_ in self.calls} != modules or not loss.requires_grad
                or any(x.shape[:1] != (batch_size,) or (x._version, y._version) != v for _, x, y, v in self.calls)):
            return None
        grads = torch.autograd.grad(loss, [y for _, _, y, _ in self.calls], retain_graph=True, allow_unused=True)
        others = torch.ones(batch_size, dtype=torch.bool, device=chosen.device)
        others[chosen] = False
        if any(g is not None and bool(g[others].any()) for g in grads):
            return None
        per_module: dict[torch.nn.Module, dict[str, torch.Tensor]] = {}
        n = len(chosen)
        for (module, x, _, _), g in zip(self.calls, grads):
            if g is None:
                continue
            shape, k = module.normalized_shape, math.prod(module.normalized_shape)
            x_hat = F.layer_norm(x[chosen].float(), shape, eps=module.eps)  # the module's own normalisation
            g = g[chosen].float()
            found = {"weight": (x_hat * g).reshape(n, -1, k).sum(1), "bias": g.reshape(n, -1, k).sum(1)}
            acc = per_module.setdefault(module, {})
            for attr, value in found.items():  # a LayerNorm called twice: its gradient is the sum over calls
                acc[attr] = acc[attr] + value if attr in acc else value
        out = []
        for module, attr in self.owners:
            p = getattr(module, attr)
            value = per_module.get(module, {}).get(attr)
            out.append(torch.zeros(n, p.numel(), dtype=p.dtype, device=p.device) if value is None
                       else value.to(p.dtype))
        return torch.cat(out, dim=1)


def _plain_layernorm(module: torch.nn.Module) -> bool:
    """Whether ``module`` computes ``F.layer_norm`` with its own weight and bias: torch's LayerNorm, or open_clip's
    two subclasses (the same call between dtype casts; looked up only if open_clip is loaded)."""
    forward = type(module).forward
    if forward is torch.nn.LayerNorm.forward:
        return True
    open_clip = sys.modules.get("open_clip.transformer")
    return open_clip is not None and forward in (open_clip.LayerNorm.forward, open_clip.LayerNormFp32.forward)


class _Bound(torch.nn.Module):
    """``fn`` as the forward of a module holding ``model``, so that ``torch.func.functional_call`` can swap the
    model's parameters for the duration of a call of ``fn`` (which reaches the model through its own reference)."""

    def __init__(self, model: torch.nn.Module, fn):
        super().__init__()
        self.model, self.fn = model, fn

    def forward(self, *args):
        return self.fn(*args)


def _one_sample_batch(x):
    """A sample (vmap strips the batch dimension) as a batch of one, for a model that expects a batch."""
    if isinstance(x, dict):
        return {k: (v.unsqueeze(0) if torch.is_tensor(v) else v) for k, v in x.items()}
    return x.unsqueeze(0)


def per_sample_grads(model: torch.nn.Module, named_params, loss_of_one, inputs, targets) -> torch.Tensor:
    """``d/dtheta loss_of_one(x_i, y_i)`` for every sample at once, one flat row per sample (the parameters of
    ``named_params``, names as in ``model``, concatenated in order): ``torch.func.vmap`` over the ``grad`` of a
    ``functional_call``. ``loss_of_one(x, y)`` gets one sample as a batch of one (``y`` a 0-d tensor) and must reach
    the parameters through ``model``. ``inputs`` is a tensor or a dict of tensors with the samples first.
    Raises RuntimeError where vmap cannot run through the model (data-dependent control flow, ``.item()``, an op
    without a batching rule that also has no fallback); :func:`looped_grads` gives the same rows one by one."""
    bound = _Bound(model, lambda x, y: loss_of_one(_one_sample_batch(x), y))
    names = [n for n, _ in named_params]
    params = {f"model.{n}": p.detach() for n, p in named_params}

    def loss(theta, x, y):
        return torch.func.functional_call(bound, theta, (x, y))

    in_dims = ({k: (0 if torch.is_tensor(v) else None) for k, v in inputs.items()} if isinstance(inputs, dict)
               else 0)
    # the math attention kernel: CPU flash attention has no batching rule, and vmap's fallback loops per sample
    with sdpa_kernel(SDPBackend.MATH):
        grads = torch.func.vmap(torch.func.grad(loss), in_dims=(None, in_dims, 0))(params, inputs, targets)
    return torch.cat([grads[f"model.{n}"].flatten(1) for n in names], dim=1)


def looped_grads(params: Sequence[torch.Tensor], loss_of_one, inputs, targets) -> torch.Tensor:
    """The rows of :func:`per_sample_grads` from one forward and backward per sample (zeros for a parameter the
    loss does not reach)."""
    rows = []
    for i, y in enumerate(targets):
        loss = loss_of_one(index_batch(inputs, torch.tensor([i])), y)
        grads = torch.autograd.grad(loss, list(params), allow_unused=True)
        rows.append(torch.cat([(torch.zeros_like(p) if d is None else d).flatten() for p, d in zip(params, grads)]))
    return torch.stack(rows) if rows else torch.zeros(0, sum(p.numel() for p in params), device=params[0].device)


def draw_labels(logits: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """One label per row drawn from ``softmax(logits)`` with ``generator`` (CPU), on the logits' device."""
    drawn = torch.multinomial(logits.detach().float().softmax(-1).cpu(), 1, generator=generator).squeeze(1)
    return drawn.to(logits.device)


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
    """REST's consistency term (this project's reading of the paper): ``mean_{i in mask} relu(target - cons_i)``.

    None when the mask is empty.
    """
    if not bool(mask.any()):
        return None
    return F.relu(target - cons[mask]).mean()


# -- the knowledge pull ------------------------------------------------------------------------------


def gradient_agreement(g_adapt: Sequence[torch.Tensor], g_know: Sequence[torch.Tensor]):
    """How two gradients (one tensor per parameter) relate, read from the device in one transfer.

    -> (per-tensor inner products, squared norms of g_adapt, squared norms of g_know, diagnostics): ``grad_angle``
    (degrees between the whole gradients; absent when either is zero), ``know_norm_ratio`` (``||g_k|| / ||g_a||``,
    absent with it) and ``conflict_frac`` (fraction of the tensors with both gradients non-zero whose inner
    product is negative).
    """
    sums = torch.stack([torch.stack([(a * b).sum(), (a * a).sum(), (b * b).sum()]) for a, b in zip(g_adapt, g_know)])
    dots, na2, nk2 = (list(col) for col in zip(*sums.double().tolist()))
    both = [i for i in range(len(dots)) if na2[i] > 0 and nk2[i] > 0]
    info = {"conflict_frac": (sum(dots[i] < 0 for i in both) / len(both)) if both else 0.0}
    dot, na, nk = sum(dots), math.sqrt(sum(na2)), math.sqrt(sum(nk2))
    if na > 0 and nk > 0 and math.isfinite(dot / (na * nk)):
        info["grad_angle"] = math.degrees(math.acos(max(-1.0, min(1.0, dot / (na * nk)))))
        info["know_norm_ratio"] = nk / na  # how strongly lambda_k g_k pulls against g_a (scale of lambda_k)
    return dots, na2, nk2, info


def knowledge_pull(g_adapt: Sequence[torch.Tensor], g_know: Sequence[torch.Tensor], lambda_k: float):
    """REST's update direction ``g_a + lambda_k g_k`` per tensor (an EWC pull toward the source when g_k is
    ``F (theta - theta_0)``), with the :func:`gradient_agreement` diagnostics. -> (gradients, diagnostics)."""
    ga, gk = list(g_adapt), list(g_know)
    *_, info = gradient_agreement(ga, gk)
    return ([a + lambda_k * b for a, b in zip(ga, gk)] if lambda_k else ga), info


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
