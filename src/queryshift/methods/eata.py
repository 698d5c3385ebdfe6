"""``eata``: EATA (Niu et al., ICML 2022) as reconstructed from the TCR code's bytecode.

Per forward, with logits ``z = q . G^T / tau`` over the full gallery and entropies ``H``:
1. reliable: ``H <= `` the k-th smallest entropy, ``k = int(e_margin * B)`` (``e_margin`` is a fraction);
2. non-redundant: once a running mean ``m`` of the predictions exists, keep ``|cos(m, p_i)| < d_margin``;
3. loss: ``mean(exp(-(H - e_offset)) * H)`` over the survivors (the weight is detached);
4. ``m`` <- mean of the survivors' p (first time), else ``0.9 m + 0.1 mean(p)`` (unchanged if none).
No Fisher/EWC term (the TCR code passes ``fishers=None``), no reset. Scores: the logits ``z``. Without the
Fisher regulariser this is **ETA-style** (EATA's sample selection and weighting only); forgetting numbers
of ``eata`` are those of ETA, not of EATA's anti-forgetting term.

Defaults: ``tau`` 0.01 (the TCR code's per-dataset temperature, set by configs via ``hparams``), ``e_margin`` 0.4,
``e_offset`` 0.4, ``d_margin`` 0.05, ``momentum`` 0.9.

Deviations: the TCR code uses one number, ``e_margin = 0.4``, both as the selection fraction and as the
entropy offset of the weight; here they are two hyper-parameters with that same default. The original
EATA uses ``0.4 * ln(1000)`` as an entropy margin; we follow the TCR code.
Empty selection (no survivor): the TCR code takes the mean of an empty set, whose value is NaN but whose
gradient is zero, so its AdamW still steps with zero gradients (the momentum of earlier steps and the
weight decay move the parameters). We do the same: the loss is ``0 * sum(H)`` (zero gradient) and the
optimizer steps; the step logs ``empty_selection: 1`` and no ``loss``, and ``m`` is left unchanged. (An
earlier version skipped the update instead.)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import components as C
from .base import Method
from .hparams import HP


class EATA(Method):
    name = "eata"
    defaults = {"tau": 0.01, "e_margin": 0.4, "e_offset": 0.4, "d_margin": 0.05, "momentum": 0.9}
    hparam_spec = {"tau": HP(float, gt=0), "e_margin": HP(float, ge=0, le=1, min_selected=1), "e_offset": HP(float),
                   "d_margin": HP(float, gt=0), "momentum": HP(float, ge=0, le=1)}
    state_attrs = ("mean_probs",)

    def init_state(self):
        self.mean_probs = None  # running mean of the softmax over the gallery (N,)

    def forward_and_adapt(self, query_batch, step):
        hp = self.hp
        logits = C.gallery_logits(self.encode(query_batch), self.gallery, hp["tau"])
        ent = C.entropy(logits)
        keep, _ = C.select_lowest(ent, hp["e_margin"])
        info = {"n_reliable": int(keep.sum())}
        probs = logits.detach().softmax(dim=1)
        if self.mean_probs is not None:
            keep = keep & (F.cosine_similarity(self.mean_probs[None], probs, dim=1).abs() < hp["d_margin"])
        info["n_selected"] = int(keep.sum())
        if keep.any():
            coeff = torch.exp(-(ent[keep].detach() - hp["e_offset"]))
            loss = (coeff * ent[keep]).mean()
            batch_mean = probs[keep].mean(dim=0)
            m = hp["momentum"]
            old = self.mean_probs
            self.mean_probs = batch_mean if old is None else m * old + (1 - m) * batch_mean
        else:  # the TCR code's empty mean: NaN value, zero gradient, and the optimizer still steps
            loss = (0 * ent).sum()
            info["empty_selection"] = 1
        self.update(loss, info)
        if "empty_selection" in info and "skipped" not in info:
            del info["loss"]  # the 0 above is not a loss value (the TCR code's would be NaN)
        return logits.detach(), info
