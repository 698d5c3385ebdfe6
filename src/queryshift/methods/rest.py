"""``rest``: REST (Li, Yang, Peng, arXiv 2511.14416), the design of ``rest.md`` §2.

The paper's exact equations are not available; the parts marked *our reading* are this project's.

Per step (``Q`` query embeddings with gradient, ``S = Q G^T`` returned as scores, raw cosine):
- **refinement** (paper; TCR §2.2 generalised): candidates ``g~_i`` = top-1 gallery item (``topk`` > 1:
  re-normalised mean of the top-k), prediction ``p_i = softmax_j(q_i . g~_j / tau)`` over the B in-batch
  candidates. ``refine=False`` ("no refinement", ablation): ``p_i`` is the raw prediction
  ``softmax(q_i . G^T / tau)`` over the full gallery (the entropies, the queue's E_m, the reliable set
  and L_know all use it) and ``g~_i`` is the raw top-1 item (``topk`` ignored) for the gap and
  consistency terms and the queue indicator.
- source-like queue (TCR §2.3, sizes as hparams): at step 0 of the first ``queue_batches`` batches;
  gives E_m (max entropy), the reference gap and the reference consistency (mean ``q . g~``).
- **QS-robust objective** ``L_adapt = w_ent L_ent + w_uni L_uni + w_gap L_gap + w_con L_con``:
  L_ent = TCR's noise-robust entropy (threshold E_m); L_uni = centre-uniformity (``t``);
  L_gap = ``(Delta(Q, G~) - Delta_queue)^2``; L_con (*our reading*) = ``mean relu(con_queue - q_i.g~_i)``
  over the reliable queries (``h_i <= E_m``). A weight of 0 removes a term.
- **gradient decoupling** (*our reading*): ``L_know = KL(p_source || p_theta)`` over the same candidates
  on the reliable queries, ``p_source`` from ``encode_with_source`` (source LN parameters, no grad).
  ``g_a = grad L_adapt``, ``g_k = grad L_know`` (one forward, two autograd.grad calls); ``decouple``
  "tensor" (default) / "global" projects g_a off g_k where ``<g_a, g_k> < 0``, "off" does not; the update
  uses ``g_a + lambda_k g_k``. The result goes through ``Method.update`` via ``surrogate_loss``.
  ``log_angle`` computes L_know and the angle even when it changes nothing (decouple off, lambda_k 0).

Log per step: ``n_selected`` (reliable queries), ``queue_len``, each loss term, ``uniformity``
(mean ``||q_i - c_q||``, higher = more spread), ``gap`` (``Delta(Q, G~)``), ``consistency`` (mean
``q_i . g~_i``), ``l_know``, ``grad_angle`` (degrees between the global g_a and g_k; absent when either is
zero, e.g. at the source parameters where L_know has zero gradient) and ``conflict_frac`` (fraction of
parameter tensors with ``<g_a, g_k> < 0``).

Defaults (rest.md §2.4): ``tau`` 0.02 (as TCR, all datasets; configs may override via ``hparams``),
queue 64 / 0.3 / 10 batches, ``t`` 0.1, ``rem_eps`` 1e-3, all weights 1, ``decouple`` "tensor",
``lambda_k`` 0.

Empty selections: L_ent, L_con and L_know are 0 (left out) for a step without reliable queries, and
L_ent/L_gap/L_con while the queue is empty; the update then uses the remaining terms (rest.md §2.2).
When no term is left the update is skipped (``Method.update`` logs ``skipped: empty``); a non-finite loss
or gradient is skipped by the same guard.
"""

from __future__ import annotations

import torch

from . import components as C
from .base import Method


class REST(Method):
    name = "rest"
    defaults = {
        "tau": 0.02, "refine": True, "topk": 1,
        "queue_size": 64, "queue_frac": 0.3, "queue_batches": 10,
        "t": 0.1, "rem_eps": 1e-3,
        "w_ent": 1.0, "w_uni": 1.0, "w_gap": 1.0, "w_con": 1.0,
        "decouple": "tensor", "lambda_k": 0.0, "log_angle": True,
    }
    state_attrs = ("queue",)

    def init_state(self):
        if self.hp["decouple"] not in ("tensor", "global", "off"):
            raise ValueError(f"decouple must be 'tensor', 'global' or 'off', got {self.hp['decouple']!r}")
        self.queue = C.SourceLikeQueue(self.hp["queue_size"], self.hp["queue_frac"], self.hp["queue_batches"])

    def _predict(self, q, g):
        """Prediction logits: over the in-batch candidates (refined) or the full gallery (raw)."""
        tau = self.hp["tau"]
        return C.inbatch_logits(q, g, tau) if self.hp["refine"] else C.gallery_logits(q, self.gallery, tau)

    def forward_and_adapt(self, query_batch, step):
        hp = self.hp
        need_know = hp["decouple"] != "off" or hp["lambda_k"] or hp["log_angle"]
        # before the forward with grad: the parameter swap would invalidate its graph
        if step == 0 or getattr(self, "_q_src", None) is None:  # the source forward once per batch
            self._q_src = self.encode_with_source(query_batch) if need_know else None
        q_src = self._q_src
        q = self.encode(query_batch)
        scores = q @ self.gallery.T
        g, _ = C.candidates(scores, self.gallery, hp["topk"] if hp["refine"] else 1)
        logits = self._predict(q, g)
        ent, cons = C.entropy(logits), C.consistency(q, g)
        self.queue.update(q, g, ent, self.batch_index, step)
        gap_ref, con_ref = self.queue.gap, self.queue.mean_consistency
        l_ent, reliable = C.rem_loss(ent, self.queue.max_entropy, hp["rem_eps"])
        terms = {
            "l_ent": (hp["w_ent"], l_ent),
            "l_uni": (hp["w_uni"], C.uniformity_loss(q, hp["t"])),
            "l_gap": (hp["w_gap"], None if gap_ref is None else C.gap_loss(q, g, gap_ref)),
            "l_con": (hp["w_con"], None if con_ref is None else C.consistency_loss(cons, con_ref, reliable)),
        }
        info = {
            "n_selected": int(reliable.sum()), "queue_len": len(self.queue),
            "uniformity": C.scalar(torch.linalg.vector_norm(q - q.mean(0), dim=1).mean()),
            "gap": C.scalar(C.modality_gap(q, g)), "consistency": C.scalar(cons.mean()),
            **{k: C.scalar(v) for k, (_, v) in terms.items() if v is not None},
        }
        active = [w * v for w, v in terms.values() if v is not None and w]
        loss = sum(active) if active else None
        if loss is not None and q_src is not None:
            loss = self._decoupled(q_src, g, logits, reliable, loss, info)
        self.update(loss, info)
        return scores.detach(), info

    def _decoupled(self, q_src, g, logits, reliable, loss, info):
        """``loss`` with its gradient replaced by the decoupled one (unchanged without reliable queries)."""
        if not reliable.any():
            return loss
        l_know = C.kl_to_source(self._predict(q_src, g), logits, reliable)
        info["l_know"] = C.scalar(l_know)
        g_adapt = C.grads_of(loss, self.params, retain_graph=True)
        g_know = C.grads_of(l_know, self.params)
        grads, diag = C.decouple_gradients(g_adapt, g_know, self.hp["decouple"], self.hp["lambda_k"])
        info.update(diag)
        return C.surrogate_loss(loss, self.params, grads)
