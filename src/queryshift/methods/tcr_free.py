"""``tcr-free``: TCR_Untrain, the training-free TCR variant. No parameter is updated.

One forward per batch: ``Q``, candidates ``G~`` (top-1), the source-like queue updated as in TCR
(step 0 of the first ``queue_batches`` batches), then a feature transform of the queries:
1. ``Delta_batch = Delta(Q, G~)`` before the transform;
2. uniformity expansion ``q_i <- c_q + scale (q_i - c_q)``, ``c_q = mean(Q)``;
3. gap correction ``q_i <- q_i + (1 - Delta_queue / Delta_batch) (mean(G~) - c_q)``;
4. re-normalise; scores ``q' . G^T``.

Defaults: ``scale`` 2.0, ``tau`` 0.01 (the TCR code's per-dataset temperature, set by configs via ``hparams``; it
only enters the queue's stored entropies, which the transform does not use), ``con_ratio`` 0.3,
``queue_size`` 64, ``queue_batches`` 10.

Deviations: the gap correction is skipped while the queue is empty or when ``Delta_batch`` is 0 (the
code would fail or divide by zero); neither happens with the defaults and real data. The TCR wrapper
logs zero losses; we log the batch and queue gaps instead.
"""

from __future__ import annotations

import torch

from . import components as C
from .base import Method
from .hparams import HP


class TCRFree(Method):
    name = "tcr-free"
    adapts = False
    defaults = {"tau": 0.01, "scale": 2.0, "con_ratio": 0.3, "queue_size": 64, "queue_batches": 10}
    hparam_spec = {"tau": HP(float, gt=0), "scale": HP(float, gt=0), "con_ratio": HP(float, ge=0, le=1, min_selected=1),
                   "queue_size": HP(int, ge=1), "queue_batches": HP(int, ge=0)}
    state_attrs = ("queue",)

    def init_state(self):
        self.queue = C.SourceLikeQueue(self.hp["queue_size"], self.hp["con_ratio"], self.hp["queue_batches"])

    @torch.no_grad()
    def forward_and_adapt(self, query_batch, step):
        q = self.encode(query_batch)
        g, _ = C.candidates(q @ self.gallery.T, self.gallery)
        self.queue.update(q, g, C.entropy(C.inbatch_logits(q, g, self.hp["tau"])), self.batch_index, step)
        refined, info = C.refine_queries(q, g, self.queue.gap, self.hp["scale"])
        return refined @ self.gallery.T, {**info, "queue_len": len(self.queue)}
