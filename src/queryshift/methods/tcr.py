"""``tcr``: TCR (Li et al., ICLR 2025), as its released code runs it.

Per step: ``Q`` query embeddings, ``S = Q G^T`` (returned as scores, raw cosine), candidates
``g~_i = G[argmax_j S_ij]``, in-batch logits ``Q G~^T / tau`` and their entropies ``h``. At step 0 of
the first ``queue_batches`` batches the source-like queue takes the ``int(con_ratio * B)`` samples with
the smallest indicator (``components.SourceLikeQueue``). Loss ``L_REM + L_UNI + L_EMG`` (weights 1):
noise-robust entropy with threshold ``E_m`` = max queue entropy, centre-uniformity with ``t``, and
``(Delta(Q, G~) - Delta_queue)^2``.

Defaults: ``tau`` 0.02 on every dataset (the TCR code skips the dataset table for TCR;
a config may still set another value through ``hparams``),
``con_ratio`` 0.3, ``queue_size`` 64, ``queue_batches`` 10, ``t`` 0.1, ``rem_eps`` 1e-3.

Empty REM selection (no query has ``h <= E_m``): in the TCR code L_REM is the mean of an empty set, so
the loss *value* is NaN, but the gradient of that empty mean is zero and the update is that of
``L_UNI + L_EMG``. Here the loss is ``L_UNI + L_EMG`` (finite, so it is also the logged ``loss``) and the
step logs ``empty_selection: 1`` with ``n_selected: 0``; the parameters move exactly as in the TCR code.

Deviations: the queue constants are hyper-parameters (the TCR code ties them to B = 64); the defaults
reproduce it at B = 64. While the queue is still empty (no E_m, no reference gap; the TCR code would fail
there) the update is skipped (``Method.update`` logs ``skipped: empty``); with the defaults this cannot
happen, since the queue is filled at step 0 of the first batch before its first use. Non-finite samples
never enter the queue (``SourceLikeQueue``).

``rest`` with ``lambda_k=0`` and ``w_con=0`` (and its other defaults) computes
the same loss and update as ``tcr`` whenever the queue is non-empty (tests/test_method_fidelity.py).
"""

from __future__ import annotations

from . import components as C
from .base import Method
from .hparams import HP


class TCR(Method):
    name = "tcr"
    defaults = {
        "tau": 0.02, "con_ratio": 0.3, "queue_size": 64, "queue_batches": 10, "t": 0.1, "rem_eps": 1e-3,
    }
    hparam_spec = {
        "tau": HP(float, gt=0), "con_ratio": HP(float, ge=0, le=1, min_selected=1), "queue_size": HP(int, ge=1),
        "queue_batches": HP(int, ge=0), "t": HP(float, gt=0), "rem_eps": HP(float, ge=0),
    }
    state_attrs = ("queue",)

    def init_state(self):
        self.queue = C.SourceLikeQueue(self.hp["queue_size"], self.hp["con_ratio"], self.hp["queue_batches"])

    def forward_and_adapt(self, query_batch, step):
        hp = self.hp
        q = self.encode(query_batch)
        scores = q @ self.gallery.T
        g, _ = C.candidates(scores, self.gallery)
        ent = C.entropy(C.inbatch_logits(q, g, hp["tau"]))
        self.queue.update(q, g, ent, self.batch_index, step)
        l_rem, sel = C.rem_loss(ent, self.queue.max_entropy, hp["rem_eps"])
        l_uni = C.uniformity_loss(q, hp["t"])
        info = {"n_selected": int(sel.sum()), "queue_len": len(self.queue), "l_uni": C.scalar(l_uni)}
        loss = None
        if len(self.queue):
            l_gap = C.gap_loss(q, g, self.queue.gap)
            info["l_gap"] = C.scalar(l_gap)
            if l_rem is None:  # TCR's empty REM: a NaN value but zero gradient, i.e. the update of UNI + EMG
                loss = l_uni + l_gap
                info["empty_selection"] = 1
            else:
                loss = l_rem + l_uni + l_gap
                info["l_rem"] = C.scalar(l_rem)
        self.update(loss, info)
        return scores.detach(), info
