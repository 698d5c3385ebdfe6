"""``shot``: SHOT-IM plus pseudo-label cross-entropy, as the TCR code runs it.

With logits ``z = q . G^T / tau`` over the full gallery and ``P = softmax(z)``:
``L = mean_i H(P_i) + sum_j pbar_j log(pbar_j + 1e-5) + clf_coeff * CE(z_i, argmax P_i)``, where
``pbar = mean_i P_i`` (the second term is minus the entropy of the marginal, i.e. diversity) and the CE
is averaged over the queries with ``max_j P_ij > threshold`` (0 when there are none). No reset.
Scores: the logits.

Defaults: ``tau`` 0.01 (the TCR code's per-dataset temperature, set by configs via ``hparams``), ``threshold`` 0.9,
``clf_coeff`` 0.1.

Pseudo-labels: ``argmax P_i`` of the current forward, thresholded by confidence, as the TCR code computes
them. This is **not** SHOT's pseudo-labelling (Liang et al., 2020), which clusters the target features
around class centroids weighted by the predictions and labels each sample by its nearest centroid; the
TCR code (and so this method) has no clustering step.

Deviations: the TCR code toggles ``.eval()``/``.train()`` around each step; every forward runs in eval
mode there anyway, so here the model simply stays in eval mode. A non-finite loss or gradient skips
the update (``Method.update``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import components as C
from .base import Method
from .hparams import HP


def shot_loss(logits: torch.Tensor, threshold: float = 0.9, clf_coeff: float = 0.1):
    """-> (L, info dict of its terms) for logits B x N."""
    probs = logits.softmax(dim=1)
    ent = C.entropy(logits).mean()
    pbar = probs.mean(dim=0)
    div = (pbar * torch.log(pbar + 1e-5)).sum()
    conf, pseudo = probs.detach().max(dim=1)
    mask = conf > threshold
    loss = ent + div
    info = {"l_ent": C.scalar(ent), "l_div": C.scalar(div), "n_selected": int(mask.sum())}
    if mask.any():
        ce = F.cross_entropy(logits[mask], pseudo[mask])
        loss = loss + clf_coeff * ce
        info["l_ce"] = C.scalar(ce)
    return loss, info


class SHOT(Method):
    name = "shot"
    defaults = {"tau": 0.01, "threshold": 0.9, "clf_coeff": 0.1}
    hparam_spec = {"tau": HP(float, gt=0), "threshold": HP(float, ge=0), "clf_coeff": HP(float, ge=0)}

    def forward_and_adapt(self, query_batch, step):
        logits = C.gallery_logits(self.encode(query_batch), self.gallery, self.hp["tau"])
        loss, info = shot_loss(logits, self.hp["threshold"], self.hp["clf_coeff"])
        self.update(loss, info)
        return logits.detach(), info
