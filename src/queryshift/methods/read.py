"""``read``: the READ baseline as the TCR code implements it.

With ``P = softmax(q . G^T / tau)`` over the full gallery (B x N):
- robust term ``L_ra = mean_i p_i (1 - log p_i + log gamma)``, ``p_i = max_j P_ij``, ``gamma = e^-1``
  (which equals ``mean_i -p_i log p_i``);
- balance term ``L_bal = H(softmax_j(sum_i P_ij))`` (a softmax of the column sums, not a normalisation);
- ``L = L_ra - w_bal * L_bal``. No selection, no reset. Scores: the logits.

Defaults: ``tau`` 0.01 (the TCR code's per-dataset temperature, set by configs via ``hparams``), ``gamma`` e^-1,
``w_bal`` 1.

Deviations: none in the loss; a non-finite loss or gradient skips the update (``Method.update``).
"""

from __future__ import annotations

import math

import torch

from . import components as C
from .base import Method
from .hparams import HP


def read_loss(logits: torch.Tensor, gamma: float = math.exp(-1), w_bal: float = 1.0):
    """-> (L, L_ra, L_bal) for logits B x N."""
    logp_max = logits.log_softmax(dim=1).max(dim=1).values
    p_max = logp_max.exp()
    l_ra = (p_max * (1 - logp_max + math.log(gamma))).mean()
    l_bal = C.entropy(logits.softmax(dim=1).sum(dim=0))
    return l_ra - w_bal * l_bal, l_ra, l_bal


class READ(Method):
    name = "read"
    defaults = {"tau": 0.01, "gamma": math.exp(-1), "w_bal": 1.0}
    hparam_spec = {"tau": HP(float, gt=0), "gamma": HP(float, gt=0), "w_bal": HP(float)}

    def forward_and_adapt(self, query_batch, step):
        logits = C.gallery_logits(self.encode(query_batch), self.gallery, self.hp["tau"])
        loss, l_ra, l_bal = read_loss(logits, self.hp["gamma"], self.hp["w_bal"])
        info = {"n_selected": len(logits), "l_ra": C.scalar(l_ra), "l_bal": C.scalar(l_bal)}
        self.update(loss, info)
        return logits.detach(), info
