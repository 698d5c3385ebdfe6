"""``rest-design``: REST's full design space (issue 11), the candidates the shipped ``rest`` was chosen from.

At its defaults ``rest-design`` is ``rest`` (K5 with per-tensor Fisher blocks as an EWC pull ``g_a + 10 g_k``, no
projection, refined answers; lab/tests/test_rest_design_default.py pins the two together). The design history is
lab/reports/rest-design.md. Everything below is this project's reading of the paper.

- **knowledge objective** ``know``, the gradient g_k the adaptation must not oppose:
  "kl" (K1): ``L_know = KL(p_source || p_theta)`` over the batch's candidates on the reliable queries,
  ``p_source`` from ``encode_with_source`` (one source forward per batch); ``know_queries=k`` computes it on the
  k most reliable queries only (a forward and backward of k queries instead of a second backward of the batch).
  "anchors" (K2): the ``n_anchors`` most source-like queries of the warm-up batches are kept as raw inputs and
  re-encoded every step; ``L_know`` = their mean ``1 - q.g~`` with their stored candidates
  (``anchor_loss="consistency"``) or the KL of their in-anchor prediction to the stored source one ("kl").
  "reliable" (K3): ``L_know`` = mean ``1 - q_i.g~_i`` over the batch's reliable queries (no extra forward).
  "subspace" (K4, as GPM): during the warm-up the gradients of the reliable queries' consistency are
  collected; then every update is projected off their top singular directions (``subspace_energy`` of the
  squared norm, at most ``subspace_rank`` per tensor); no conflict test.
  "fisher" (K5, as EWC): ``g_k = F (theta - theta_0)`` with F the Fisher of the reliable queries' predictions,
  estimated during the warm-up: ``fisher`` "diag" (one backward per warm-up batch), "block" (per-tensor
  blocks, the shipped default) or "full" (all adapted parameters together).
- **combination** ``decouple``: "tensor" / "global" removes from g_a its component along g_k where
  ``<g_a, g_k> < 0`` (per tensor or over the whole gradient), "off" does not; the update uses
  ``g_a + lambda_k g_k``. ``margin_deg`` (a conflict only past this angle) and ``keep`` (fraction of the
  conflicting component kept) refine the projection. ``decouple_after="optimizer"`` lets the optimizer step with
  the unprojected gradient and projects the applied parameter change instead (with AdamW a projected gradient
  does not give a conflict-free update); it logs ``update_conflict_frac``.
- **consistency term** ``con``: "queue" (hinge to the queue's mean consistency, as ``rest``), "agree"
  (cross-entropy of the prediction toward its raw top-1), "margin" (``-(s_top1 - s_top2)``).
- ``log_angle``: compute L_know and its gradient for the diagnostics even when nothing uses them.
- **answers** (issue 26, round 4, shipped in ``rest`` since): "refined" (the default, as ``rest``) returns the
  answers of the adapted queries refined as ``tcr-free`` refines the source's (:func:`components.refine_queries`:
  expansion about the batch centre by ``answer_scale``, gap correction toward the candidates with REST's own queue
  gap); "raw" returns ``Q G^T`` (``rest`` before round 4). Only the answers change: the losses and the update see
  the raw queries.
"""

from __future__ import annotations

import torch

from lab import rest_components as RC
from queryshift import distributed
from queryshift.methods import components as C
from queryshift.methods import register
from queryshift.methods.hparams import HP
from queryshift.methods.rest import REST

KNOWN_CHOICES = {
    "decouple": ("tensor", "global", "off"), "decouple_after": ("gradient", "optimizer"),
    "know": ("kl", "anchors", "reliable", "subspace", "fisher"), "anchor_loss": ("consistency", "kl"),
    "con": ("queue", "agree", "margin"), "fisher": ("diag", "block", "full"), "answers": ("raw", "refined"),
}


class RESTDesign(REST):
    name = "rest-design"
    defaults = {
        **REST.defaults,
        "decouple": "off", "log_angle": False, "decouple_after": "gradient",
        "know": "fisher", "fisher": "block", "n_anchors": 16, "anchor_loss": "consistency",
        "margin_deg": 90.0, "keep": 0.0, "con": "queue", "subspace_energy": 0.9, "subspace_rank": 4,
        "answers": "refined", "answer_scale": 2.0,
    }
    hparam_spec = {
        **REST.hparam_spec,
        "decouple": HP(str, choices=KNOWN_CHOICES["decouple"]), "log_angle": HP(bool),
        "decouple_after": HP(str, choices=KNOWN_CHOICES["decouple_after"]),
        "know": HP(str, choices=KNOWN_CHOICES["know"]), "fisher": HP(str, choices=KNOWN_CHOICES["fisher"]),
        "n_anchors": HP(int, ge=1), "anchor_loss": HP(str, choices=KNOWN_CHOICES["anchor_loss"]),
        "margin_deg": HP(float, ge=90, le=180), "keep": HP(float, ge=0, le=1),
        "con": HP(str, choices=KNOWN_CHOICES["con"]),
        "subspace_energy": HP(float, gt=0, le=1), "subspace_rank": HP(int, ge=1),
        "answers": HP(str, choices=KNOWN_CHOICES["answers"]), "answer_scale": HP(float, gt=0),
    }
    state_attrs = ("queue", "anchors", "subspace", "fisher")

    def init_state(self):
        for key, allowed in KNOWN_CHOICES.items():
            if self.hp[key] not in allowed:
                raise ValueError(f"{key} must be one of {allowed}, got {self.hp[key]!r}")
        super().init_state()
        self.anchors = RC.AnchorStore(self.hp["n_anchors"] if self.hp["know"] == "anchors" else 0,
                                      self.hp["queue_batches"])
        self.subspace = RC.GradientSubspace(self.hp["subspace_energy"], self.hp["subspace_rank"])
        fisher = self.hp["fisher"]
        self.fisher = (RC.DiagonalFisher() if fisher == "diag" else RC.SampledFisher(full=True) if fisher == "full"
                       else C.BlockFisher())
        self._source_embeddings = None  # (batch_index, Q under theta_0): constant within a batch
        self._know_subset = None  # know_queries > 0: (batch_index, raw inputs of the subset, their Q under theta_0)
        if self.hp["know"] == "kl" and self.hp["know_queries"] and distributed.active():
            raise ValueError("know_queries > 0 with know=kl re-encodes a subset of the batch in one process only; "
                             "use know_queries=0 with torchrun")

    def _source_batch(self, query_batch, step):
        """Q under the source parameters, computed once per batch (the batch does not change between steps)."""
        cached = self._source_embeddings
        if step == 0 or cached is None or cached[0] != self.batch_index:
            cached = self._source_embeddings = (self.batch_index, self.encode_with_source(query_batch))
        return cached[1]

    def forward_and_adapt(self, query_batch, step):
        hp = self.hp
        # without decoupling or lambda_k, L_know costs a backward that changes nothing: only on request
        need_know = hp["decouple"] != "off" or hp["lambda_k"] or hp["log_angle"]
        # before the forward with grad: the parameter swap would invalidate its graph
        whole_batch_kl = need_know and hp["know"] == "kl" and not hp["know_queries"]
        q_src = self._source_batch(query_batch, step) if whole_batch_kl else None
        q, tapped = self._encode_tapped(query_batch, step)
        scores = q @ self.gallery.T
        a = self._adaptation(q, scores, step)
        a.tapped = tapped
        self.anchors.update(query_batch, q, a.g, self.batch_index, step)
        loss, info, g_know = a.loss, a.info, None
        if loss is not None and hp["know"] == "subspace":
            loss = self._subspace_protected(a, step)
        elif loss is not None and need_know and hp["know"] == "fisher":
            loss, g_know = self._fisher_protected(query_batch, a, step)
        elif loss is not None and need_know and hp["know"] == "kl" and hp["know_queries"]:
            loss, g_know = self._subset_kl(query_batch, a, step)
        elif loss is not None and need_know:
            l_know = self._knowledge_loss(q_src, q, a)
            if l_know is not None:
                info["l_know"] = C.scalar(l_know)
                loss, g_know = self._decoupled(loss, info, l_know=l_know)
        after_optimizer = g_know is not None and hp["decouple"] != "off" and hp["decouple_after"] == "optimizer"
        before = [p.detach().clone() for p in self.params] if after_optimizer else None
        if self.update(loss, info) and after_optimizer:
            self._project_update(before, g_know, info)
        return self._answers(q, a), info

    @torch.no_grad()
    def _answers(self, q, a):
        """``answers="refined"``: ``rest``'s refined answers at ``answer_scale``; "raw": ``Q G^T``."""
        if self.hp["answers"] == "raw":
            return q.detach() @ self.gallery.T
        refined, _ = C.refine_queries(q.detach(), a.g, self.queue.gap, self.hp["answer_scale"])
        return refined @ self.gallery.T

    def _consistency_term(self, cons, con_ref, reliable, logits, scores, top1):
        """L_con: "queue" (hinge to the queue's mean consistency), "agree" (the prediction agrees with
        the raw top-1: its own candidate in the batch, or the top-1 gallery item without refinement),
        "margin" (the top-1 stands out from the top-2)."""
        con = self.hp["con"]
        if con == "queue":
            return super()._consistency_term(cons, con_ref, reliable, logits, scores, top1)
        if con == "agree":
            target = torch.arange(len(cons), device=cons.device) if self.hp["refine"] else top1
            return RC.agreement_loss(logits, target, reliable)
        return RC.margin_loss(scores, reliable)

    def _knowledge_loss(self, q_src, q, a):
        """L_know of K1 ("kl"), K3 ("reliable") or K2 ("anchors"); None: nothing to protect yet."""
        know, reliable = self.hp["know"], a.reliable
        if know == "kl":
            return RC.kl_to_source(self._predict(q_src, a.g), a.logits, reliable) if reliable.any() else None
        if know == "reliable":
            return (1 - a.cons[reliable]).mean() if reliable.any() else None
        if not len(self.anchors):
            return None
        qa = self.encode(self.anchors.inputs)
        if self.hp["anchor_loss"] == "consistency":
            return (1 - C.consistency(qa, self.anchors.g)).mean()
        tau = self.hp["tau"]
        everyone = torch.ones(len(qa), dtype=torch.bool, device=qa.device)
        return RC.kl_to_source(C.inbatch_logits(self.anchors.q, self.anchors.g, tau),
                               C.inbatch_logits(qa, self.anchors.g, tau), everyone)

    def _subspace_protected(self, a, step):
        """K4: while the queue fills, collect the gradient of the reliable queries' consistency (what
        already works); afterwards project every update off its principal directions."""
        loss, info, reliable = a.loss, a.info, a.reliable
        if self.queue.accepts(self.batch_index, step) and reliable.any():
            l_know = (1 - a.cons[reliable]).mean()
            info["l_know"] = C.scalar(l_know)
            self.subspace.add(C.grads_of(l_know, self.params, retain_graph=True))
            return loss
        if self.queue.accepts(self.batch_index, step) or not len(self.subspace):
            return loss
        grads = self.subspace.project(C.grads_of(loss, self.params, retain_graph=True))
        info["subspace_rank"] = len(self.subspace)
        return C.surrogate_loss(loss, self.params, grads)

    def _fisher_protected(self, query_batch, a, step):
        """K5 (as EWC): the Fisher collected during the warm-up (``fisher="diag"``: one backward of the batch per
        warm-up batch; "block" / "full": single-query scores, as ``rest``); then ``g_k = F (theta - theta_0)``
        with no source forward and no second backward. -> (loss, g_know or None)."""
        if self.hp["fisher"] != "diag":
            self._collect_fisher(query_batch, a, step)
        elif self.queue.accepts(self.batch_index, step) and a.reliable.any():
            nll = RC.sampled_nll(a.logits[a.reliable], self.generator)
            self.fisher.add(C.grads_of(nll, self.params, retain_graph=True), int(a.reliable.sum()))
        if not len(self.fisher):
            return a.loss, None
        with C.one_thread():
            g_know, a.info["l_know"] = self.fisher.knowledge(self.params, self._snapshot["params"].values())
        return self._decoupled(a.loss, a.info, g_know=g_know)

    def _subset_kl(self, query_batch, a, step):
        """K1 on the ``know_queries`` most reliable queries (lowest entropy, chosen at the batch's first step):
        the same KL to the source predictions over the batch's candidates, from a forward and backward of
        those queries alone. Their source embeddings are computed once per batch, after g_a is taken (the
        parameter swap would invalidate its graph)."""
        cached = self._know_subset
        if step == 0 or cached is None or cached[0] != self.batch_index:
            subset = None
            if a.reliable.any():
                subset = C.index_batch(query_batch, self._most_reliable(a.ent, a.reliable))
            cached = self._know_subset = [self.batch_index, subset, None]
        if cached[1] is None:
            return a.loss, None
        g_adapt = C.grads_of(a.loss, self.params)
        if cached[2] is None:
            cached[2] = self.encode_with_source(cached[1])
        logits_k = self._predict(self.encode(cached[1]), a.g)
        everyone = torch.ones(len(logits_k), dtype=torch.bool, device=logits_k.device)
        l_know = RC.kl_to_source(self._predict(cached[2], a.g), logits_k, everyone)
        a.info["l_know"] = C.scalar(l_know)
        return self._decoupled(a.loss, a.info, g_know=C.grads_of(l_know, self.params), g_adapt=g_adapt)

    def _decoupled(self, loss, info, l_know=None, g_know=None, g_adapt=None):
        """-> (``loss`` with its gradient replaced by the decoupled one, g_know): g_know given, or the gradient
        of ``l_know`` (taken after g_adapt, from the same graph). With ``decouple_after="optimizer"`` the
        gradient is ``g_a + lambda_k g_k`` unprojected (the projection then acts on the optimizer's update,
        :meth:`_project_update`)."""
        if g_adapt is None:
            g_adapt = C.grads_of(loss, self.params, retain_graph=l_know is not None)
        if l_know is not None:
            g_know = C.grads_of(l_know, self.params)
        mode = "off" if self.hp["decouple_after"] == "optimizer" else self.hp["decouple"]
        with C.one_thread():  # parameter-sized ops only (components.one_thread)
            grads, diag = RC.decouple_gradients(g_adapt, g_know, mode, self.hp["lambda_k"],
                                                margin_deg=self.hp["margin_deg"], keep=self.hp["keep"])
            info.update(diag)
            return C.surrogate_loss(loss, self.params, grads), g_know

    @torch.no_grad()
    def _project_update(self, before, g_know, info):
        """Project the applied parameter change ``d = w_new - w_old`` off g_k where ``<d, g_k> > 0``.

        A change ``d`` raises L_know to first order exactly when ``-d`` conflicts with g_k as a gradient
        would (``<-d, g_k> < 0``), so ``-d`` goes through the same :func:`decouple_gradients` rule.
        """
        neg = [b - p for p, b in zip(self.params, before)]
        projected, diag = RC.decouple_gradients(neg, g_know, self.hp["decouple"], margin_deg=self.hp["margin_deg"],
                                                keep=self.hp["keep"])
        for p, b, n, n_proj in zip(self.params, before, neg, projected):
            if n_proj is not n:  # untouched tensors keep the optimizer's result bit for bit
                p.copy_(b - n_proj)
        info["update_conflict_frac"] = diag["conflict_frac"]


register("rest-design", RESTDesign)
