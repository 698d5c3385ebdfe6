"""``rest``: REST (Li, Yang, Peng, arXiv 2511.14416), robust entropy minimisation with a pull toward the source.

Per step, with ``Q`` the query embeddings (with gradient) and ``S = Q G^T`` their raw scores (cosine):

- **refinement** (as TCR): each query's candidate ``g~_i`` is its top-1 gallery item (``topk`` > 1: the
  re-normalised mean of its top-k); the prediction is ``p_i = softmax_j(q_i . g~_j / tau)`` over the batch's
  B candidates. ``refine=False`` predicts over the full gallery instead (``softmax(q_i . G^T / tau)``, with
  the raw top-1 as ``g~_i``).
- **source-like queue** (as TCR): at step 0 of the first ``queue_batches`` batches the ``int(queue_frac * B)``
  most source-like queries enter a queue of ``queue_size``; it gives the entropy threshold ``E_m`` (its
  largest entropy), the reference modality gap ``Delta_queue`` and the reference consistency ``c_queue``
  (its mean ``q . g~``). The queries with ``h_i <= E_m`` are the *reliable* ones.
- **adaptation objective** ``L_adapt = w_ent L_ent + w_uni L_uni + w_gap L_gap + w_con L_con`` with
  ``L_ent = mean_{reliable} w_i h_i``, ``w_i = max(0, 1 - h_i / (E_m + rem_eps))`` (TCR's noise-robust entropy),
  ``L_uni = mean_i exp(-t ||q_i - c_q||)`` (centre uniformity), ``L_gap = (Delta(Q, G~) - Delta_queue)^2`` and
  ``L_con = mean_{reliable} relu(c_queue - q_i . g~_i)``. A weight of 0 removes a term.
- **knowledge pull** (EWC): during the queue's warm-up the Fisher of the reliable queries' predictions is
  estimated per parameter tensor from single-query scores ``d/dtheta -log p_i(y_i)``, ``y_i`` drawn from
  ``p_i`` (up to ``know_queries`` queries per batch, lowest entropy first; 0 = every reliable one). Then
  ``g_k = F (theta - theta_0)`` (the gradient of ``0.5 d^T F d``, the second-order expansion of
  ``KL(p_source || p_theta)`` around the source) and the optimizer (AdamW in the protocol) steps along
  ``g_a + lambda_k g_k`` with ``g_a = grad L_adapt``. ``lambda_k=0`` turns the pull (and the Fisher) off.

- **refined answers**: the batch's answers are its queries (those of the forward, before the update) refined by
  ``tcr-free``'s transform (:func:`components.refine_queries`): expansion by 2 about the batch centre, then the
  gap correction toward the candidates with the queue's gap ``Delta_queue``. Only the answers change; the losses
  and the update see the raw queries. Chosen on validation shifts (lab/reports/rest-design-4.md): adaptation and
  refinement add up on single shifts; the scale stays ``tcr-free``'s, so it is no hyper-parameter.

Deviations from the paper, whose exact equations are not published: ``L_con`` and the knowledge term are this
project's reading. The paper *decouples* the gradients (removes from ``g_a`` the part that conflicts with the
knowledge gradient); here the knowledge gradient is added as a pull instead, with no projection, which scored
higher on validation shifts (the design rounds, the projections and the other knowledge objectives are in the
lab: ``lab/rest_design.py``, method ``rest-design``, and ``lab/reports/rest-design.md``).

With ``lambda_k=0`` and ``w_con=0`` REST computes the same losses and parameters as ``tcr`` while the queue is
non-empty (always, with the defaults), and answers as ``tcr`` with its answers refined as above. An empty reliable
selection leaves ``L_ent`` and ``L_con`` out (logged as ``empty_selection: 1``); with an empty queue only ``L_uni``
is left (TCR skips the update). When no term is left the update is skipped (``Method.update`` logs
``skipped: empty``), as is a non-finite loss.

Log per step: ``n_selected``, ``queue_len``, each loss term, ``uniformity`` (mean ``||q_i - c_q||``), ``gap``,
``consistency`` (mean ``q_i . g~_i``), ``l_know`` (``0.5 d^T F d``), ``grad_angle`` (degrees between g_a and
g_k; absent while either is zero), ``know_norm_ratio`` and ``conflict_frac``.
"""

from __future__ import annotations

import warnings
from types import SimpleNamespace

import torch

from .. import distributed
from . import components as C
from .base import Method
from .hparams import HP

# tcr-free's expansion of the batch about its centre, used for REST's answers (not tuned apart: see the docstring)
ANSWER_SCALE = 2.0


class REST(Method):
    name = "rest"
    defaults = {
        "tau": 0.02, "refine": True, "topk": 1,
        "queue_size": 64, "queue_frac": 0.3, "queue_batches": 10,
        "t": 0.1, "rem_eps": 1e-3,
        "w_ent": 1.0, "w_uni": 1.0, "w_gap": 1.0, "w_con": 1.0,
        # weight of the knowledge gradient F (theta - theta_0) added to the adaptation gradient (EWC pull)
        "lambda_k": 10.0, "know_queries": 0,
    }
    hparam_spec = {
        "tau": HP(float, gt=0), "refine": HP(bool), "topk": HP(int, ge=1),
        "queue_size": HP(int, ge=1), "queue_frac": HP(float, ge=0, le=1, min_selected=1),
        "queue_batches": HP(int, ge=0),
        "t": HP(float, gt=0), "rem_eps": HP(float, ge=0),
        "w_ent": HP(float, ge=0), "w_uni": HP(float, ge=0), "w_gap": HP(float, ge=0), "w_con": HP(float, ge=0),
        "lambda_k": HP(float, ge=0), "know_queries": HP(int, ge=0),
    }
    state_attrs = ("queue", "fisher")

    def init_state(self):
        self.queue = C.SourceLikeQueue(self.hp["queue_size"], self.hp["queue_frac"], self.hp["queue_batches"])
        self.fisher = C.BlockFisher()

    def forward_and_adapt(self, query_batch, step):
        q, tapped = self._encode_tapped(query_batch, step)
        scores = q @ self.gallery.T
        a = self._adaptation(q, scores, step)
        a.tapped = tapped
        loss = a.loss
        if loss is not None and self.hp["lambda_k"]:
            loss = self._pulled(query_batch, a, step)
        self.update(loss, a.info)
        return self._answers(q, a), a.info

    # -- pieces shared with the lab's rest-design ------------------------------------------------------

    def _encode_tapped(self, query_batch, step):
        """The batch's queries, and on a warm-up step that will score queries the LayerNorm taps of this forward
        with this rank's queries (its Fisher scores come from them, :meth:`_score_rows`); else None."""
        taps = self._taps(step)
        if taps is None:
            return self.encode(query_batch), None
        with taps:
            q_local = self.encode_local(query_batch) if distributed.active() else self.encode(query_batch)
        return distributed.all_gather_with_grad(q_local), (taps, q_local)

    def _predict(self, q, g):
        """Prediction logits: over the in-batch candidates (refined) or the full gallery (raw)."""
        tau = self.hp["tau"]
        return C.inbatch_logits(q, g, tau) if self.hp["refine"] else C.gallery_logits(q, self.gallery, tau)

    def _consistency_term(self, cons, con_ref, reliable, logits, scores, top1):
        """L_con: the hinge to the queue's mean consistency over the reliable queries."""
        return C.consistency_loss(cons, con_ref, reliable)

    def _adaptation(self, q, scores, step):
        """Candidates, prediction, queue update and ``L_adapt`` of one forward -> a namespace with ``g``, ``top1``,
        ``logits``, ``ent``, ``cons``, ``reliable``, ``loss`` (None: no term left) and ``info`` (the step's log)."""
        hp = self.hp
        g, top1 = C.candidates(scores, self.gallery, hp["topk"] if hp["refine"] else 1)
        logits = self._predict(q, g)
        ent, cons = C.entropy(logits), C.consistency(q, g)
        self.queue.update(q, g, ent, self.batch_index, step)
        gap_ref, con_ref = self.queue.gap, self.queue.mean_consistency
        l_ent, reliable = C.rem_loss(ent, self.queue.max_entropy, hp["rem_eps"])
        terms = {
            "l_ent": (hp["w_ent"], l_ent),
            "l_uni": (hp["w_uni"], C.uniformity_loss(q, hp["t"])),
            "l_gap": (hp["w_gap"], None if gap_ref is None else C.gap_loss(q, g, gap_ref)),
            "l_con": (hp["w_con"], None if con_ref is None else self._consistency_term(
                cons, con_ref, reliable, logits, scores, top1)),
        }
        info = {
            "n_selected": int(reliable.sum()), "queue_len": len(self.queue),
            "uniformity": C.scalar(torch.linalg.vector_norm(q - q.mean(0), dim=1).mean()),
            "gap": C.scalar(C.modality_gap(q, g)), "consistency": C.scalar(cons.mean()),
            **{k: C.scalar(v) for k, (_, v) in terms.items() if v is not None},
        }
        if l_ent is None and gap_ref is not None:
            info["empty_selection"] = 1  # no reliable query: L_ent and L_con are left out
        active = [w * v for w, v in terms.values() if v is not None and w]
        return SimpleNamespace(g=g, top1=top1, logits=logits, ent=ent, cons=cons, reliable=reliable,
                               loss=sum(active) if active else None, info=info)

    @torch.no_grad()
    def _answers(self, q, a):
        """The returned scores: the forward's queries refined (``refine_queries``, scale 2, the queue's gap)."""
        refined, _ = C.refine_queries(q.detach(), a.g, self.queue.gap, ANSWER_SCALE)
        return refined @ self.gallery.T

    def _most_reliable(self, ent, reliable):
        """Indices of the ``know_queries`` reliable queries of lowest entropy (0: every reliable query)."""
        k = int(reliable.sum()) if not self.hp["know_queries"] else min(self.hp["know_queries"], int(reliable.sum()))
        ranked = torch.where(reliable, ent.detach(), torch.full_like(ent.detach(), float("inf")))
        return torch.topk(ranked, k, largest=False).indices

    def _taps(self, step):
        """LayerNorm taps for this step's forward if it is a warm-up step that will score queries, else None."""
        if not self.hp["lambda_k"] or not self.queue.accepts(self.batch_index, step):
            return None
        return C.LayerNormTaps.of(self.model, self.named_params)

    def _query_scores(self, query_batch, g, ent, logits, reliable, tapped=None):
        """Single-query scores ``d/dtheta -log p_i(y_i)`` of the most reliable queries, in order of entropy, with
        ``y_i`` drawn from the batch's prediction ``p_i``, each the gradient of that query's own loss (as if encoded
        alone). Data-parallel, every rank scores the queries of its own shard and the scores are gathered, so all
        ranks hold the same ones. ``tapped``: the taps and this rank's queries of the batch's forward
        (:meth:`_score_rows`)."""
        chosen = self._most_reliable(ent, reliable)
        labels = C.draw_labels(logits[chosen], self.generator)
        start, stop = distributed.shard_bounds(len(ent))
        mine = [order for order, i in enumerate(chosen.tolist()) if start <= i < stop]
        keys = torch.tensor(mine, dtype=torch.long, device=logits.device)
        inputs = C.index_batch(query_batch, chosen[keys] - start)
        rows = self._score_rows(inputs, g, labels[keys], tapped, chosen[keys] - start)
        rows, keys = distributed.all_gather_rows(rows, keys)
        sizes = [p.numel() for p in self.params]
        return [[t.view_as(p) for t, p in zip(rows[k].split(sizes), self.params)] for k in torch.argsort(keys)]

    def _score_rows(self, inputs, g, labels, tapped=None, local=None):
        """The rows (n x P) of :meth:`_query_scores` for ``inputs`` (rows ``local`` of this rank's batch).

        Each query's score depends on its own embedding only (its logits against the fixed candidates or gallery),
        so with ``tapped`` (the LayerNorm taps and the local queries of the batch's forward) the rows come from
        that forward and one backward of the summed scores (:class:`components.LayerNormTaps`, which refuses when
        a sample outside the chosen ones gets a gradient). Else per-sample gradients (``torch.func``; on
        shapes-clip ~50 queries cost one batch forward and backward), or one backward per query where vmap
        cannot run through the backbone (e.g. the Hugging Face text towers' data-dependent masking; warned once,
        then kept for the method's life)."""
        if tapped is not None and len(labels):
            taps, q_local = tapped
            with torch.enable_grad():  # a caller may hold no_grad (the lab's rest-design)
                summed = torch.nn.functional.cross_entropy(self._predict(q_local[local], g), labels, reduction="sum")
            rows = taps.rows(summed, local, len(q_local))
            if rows is not None:
                return rows

        def nll(x, y):
            return torch.nn.functional.cross_entropy(self._predict(self.encode_local(x), g), y.view(1),
                                                     reduction="sum")

        if len(labels) and not getattr(self, "_scores_looped", False):
            try:
                return C.per_sample_grads(self.model, self.named_params, nll, inputs, labels)
            except RuntimeError as err:  # the loop below raises again if the error is not vmap's
                reason = (str(err).splitlines() or [type(err).__name__])[0][:160]
                warnings.warn(f"rest: per-sample gradients cannot run through this backbone ({reason}); "
                              "the Fisher warm-up takes one backward per query", RuntimeWarning, stacklevel=2)
                self._scores_looped = True
        return C.looped_grads(self.params, nll, inputs, labels)

    def _collect_fisher(self, query_batch, a, step):
        """During the queue's warm-up: add the reliable queries' single-query scores to the Fisher estimate."""
        if self.queue.accepts(self.batch_index, step) and a.reliable.any():
            tapped = getattr(a, "tapped", None)
            for grads in self._query_scores(query_batch, a.g, a.ent, a.logits, a.reliable, tapped):
                self.fisher.add(grads)

    def _pulled(self, query_batch, a, step):
        """``L_adapt`` with its gradient replaced by ``g_a + lambda_k F (theta - theta_0)`` (unchanged while the
        Fisher is empty)."""
        self._collect_fisher(query_batch, a, step)
        if not len(self.fisher):
            return a.loss
        with C.one_thread():  # parameter-sized ops only (components.one_thread)
            g_know, a.info["l_know"] = self.fisher.knowledge(self.params, self._snapshot["params"].values())
        g_adapt = C.grads_of(a.loss, self.params)
        with C.one_thread():
            grads, diag = C.knowledge_pull(g_adapt, g_know, self.hp["lambda_k"])
            a.info.update(diag)
            return C.surrogate_loss(a.loss, self.params, grads)
