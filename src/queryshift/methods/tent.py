"""``tent``: Tent (Wang et al., ICLR 2021) for retrieval, as the TCR code runs it.

Loss: the mean over all B queries of the entropy of ``softmax(q . G^T / tau)`` over the full gallery.
No sample selection, no reset. Scores: the logits ``q . G^T / tau``.

Defaults: ``tau`` 0.01 (the TCR code's value for COCO, Flickr and Nocaps). The dataset-specific temperatures
(Fashion-Gen 0.001, CUHK-/ICFG-PEDES 0.0001) are set by the run configs through ``hparams``.

Deviations: none in the loss. A non-finite loss or gradient skips the update (``Method.update``), where
the original would write NaN into the parameters.
"""

from __future__ import annotations

from . import components as C
from .base import Method
from .hparams import HP


class Tent(Method):
    name = "tent"
    defaults = {"tau": 0.01}
    hparam_spec = {"tau": HP(float, gt=0)}

    def forward_and_adapt(self, query_batch, step):
        logits = C.gallery_logits(self.encode(query_batch), self.gallery, self.hp["tau"])
        loss = C.entropy(logits).mean()
        info = {"n_selected": len(logits)}
        self.update(loss, info)
        return logits.detach(), info
