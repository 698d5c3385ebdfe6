"""``sar``: SAR (Niu et al., ICLR 2023) as the TCR code runs it.

Per step, with entropies ``H`` of ``softmax(q . G^T / tau)`` over the full gallery:
1. select ``H <= thr``, thr = the k-th smallest entropy, ``k = int(margin_e0 * B)`` (a fraction here);
   ``L1`` = mean H of the selection; backward; SAM ascent ``w + rho g/||g||``;
2. at the perturbed weights, recompute the entropies of the same queries; keep ``H2 < thr`` (strict);
   ``L2`` = their mean; backward; SAM descent: restore w and step the base optimizer (AdamW by default);
3. model recovery: ``ema <- L2`` (first time) or ``0.9 ema + 0.1 L2`` (skipped when L2 is NaN); if
   ``ema < reset_constant`` restore the source parameters and optimizer but **keep the ema** (as SAR and
   the TCR code do: ``ema = self.ema; reset(); self.ema = ema``), so the model is reset at every step
   until the ema has recovered above ``reset_constant``.
Scores: the logits of pass 1.

Defaults: ``tau`` 0.01 (the TCR code's per-dataset temperature, set by configs via ``hparams``), ``margin_e0`` 0.4
(fraction), ``rho`` 0.05 (non-adaptive SAM), ``reset_constant`` 0.2, ``ema_momentum`` 0.9.

Deviations: the original SAR uses ``0.4 * ln(1000)`` as an entropy margin; we follow the TCR code's
fraction. Empty selections: the TCR code uses a 0 loss; here an empty pass 1 or pass 2
skips the update (``Method.update`` logs ``skipped``, or ``skipped2`` for pass 2, in which case
``skipped`` says ``pass2-<reason>`` too, since no descent step was taken; a started SAM perturbation is
undone), while the ema still receives ``L2 = 0`` as in that code, so the recovery rule behaves the same. A
non-finite L2 skips the descent and the ema update. Pass 2 forwards only the selected queries (equivalent
in eval mode). The base optimizer follows ``AdaptConfig.optimizer`` (AdamW in every TCR setting). SAM
restores the weights saved before the ascent exactly (``components.SAM``).
"""

from __future__ import annotations

import math

import torch

from . import components as C
from .base import Method
from .hparams import HP

_BASE = {"adamw": torch.optim.AdamW, "adam": torch.optim.Adam, "sgd": torch.optim.SGD}


class SAR(Method):
    name = "sar"
    defaults = {"tau": 0.01, "margin_e0": 0.4, "rho": 0.05, "reset_constant": 0.2, "ema_momentum": 0.9}
    hparam_spec = {"tau": HP(float, gt=0), "margin_e0": HP(float, ge=0, le=1, min_selected=1), "rho": HP(float, ge=0),
                   "reset_constant": HP(float), "ema_momentum": HP(float, ge=0, le=1)}
    state_attrs = ("ema",)
    shardable = False  # re-encodes the local part of a selection made over the global batch

    def build_optimizer(self):
        c = self.config
        if c.optimizer not in _BASE:
            raise ValueError(f"unknown optimizer {c.optimizer!r}; expected adamw, adam or sgd")
        extra = {"momentum": c.momentum} if c.optimizer == "sgd" else {}
        return C.SAM(self.params, _BASE[c.optimizer], rho=self.hp["rho"], lr=c.lr,
                     weight_decay=c.weight_decay, **extra)

    def init_state(self):
        self.ema = None

    def _entropy(self, query_batch):
        logits = C.gallery_logits(self.encode(query_batch), self.gallery, self.hp["tau"])
        return logits, C.entropy(logits)

    def forward_and_adapt(self, query_batch, step):
        hp = self.hp
        logits, ent = self._entropy(query_batch)
        sel, thr = C.select_lowest(ent, hp["margin_e0"])
        info, first, second = {"n_selected": int(sel.sum())}, {}, {}
        loss2 = 0.0  # the TCR code's value for an empty selection
        try:
            if self.update(ent[sel].mean() if sel.any() else None, first):  # backward + SAM ascent
                _, ent2 = self._entropy(C.index_batch(query_batch, sel))
                keep = ent2 < thr
                info["n_selected2"] = int(keep.sum())
                self.update(ent2[keep].mean() if keep.any() else None, second)  # backward + SAM descent
                loss2 = second.get("loss", 0.0) if second.get("skipped") != "nonfinite" else math.nan
            elif first.get("skipped") != "empty":
                loss2 = math.nan
        finally:
            if self.optimizer.perturbed:  # pass 2 was skipped: leave the ascent point
                self.optimizer.unperturb()
        info.update(first, **{f"{k}2": v for k, v in second.items()})  # loss/skipped of pass 1, *2 of pass 2
        if "skipped2" in info and "skipped" not in info:  # the ascent happened but no descent step
            info["skipped"] = f"pass2-{info['skipped2']}"
        if math.isfinite(loss2):
            m = hp["ema_momentum"]
            self.ema = loss2 if self.ema is None else m * self.ema + (1 - m) * loss2
            info["ema"] = self.ema
        if self.ema is not None and self.ema < hp["reset_constant"]:
            # parameters and optimizer back to the source; the ema survives, as in SAR (not a full reset())
            self.restore_source()
            info["reset"] = 1
        return logits.detach(), info
