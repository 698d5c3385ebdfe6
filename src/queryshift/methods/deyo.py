"""``deyo``: DeYO (Lee et al., ICLR 2024) as reconstructed from the TCR code's bytecode.

With logits ``z = q . G^T / tau`` over the full gallery and entropies ``H``:
1. entropy filter: ``H <`` (strict) the k-th smallest entropy, ``k = int(deyo_margin * B)``;
2. PLPD: ``P(y|x) - P(y|x')`` with ``y = argmax P(.|x)`` and ``x'`` the selected queries with their
   patches shuffled (image queries: a ``patch_len x patch_len`` grid, an independent random
   permutation per image drawn from ``self.generator``; ``x'`` under no_grad); keep PLPD > threshold;
3. weight ``1/(exp(H - thr) + 0.1) + (1/exp(-PLPD) + 0.1)`` = ``1/(exp(H - thr) + 0.1) + exp(PLPD) + 0.1``
   (detached; :func:`deyo_weight`), ``thr`` = the k'-th smallest remaining entropy,
   ``k' = int(margin_e0 * n_remaining)`` (+inf if k' = 0); ``L = mean(weight * H)``. The PLPD term follows
   the TCR code's bytecode (``deyo.pyc`` source line 222: 1 is divided by ``exp(-PLPD)`` and only then 0.1
   is added), not ``1/(exp(-PLPD) + 0.1)`` as an earlier reading of it (and this code before) had it.
Scores: the logits ``z``.

Video queries: every frame's patches are shuffled (its own permutation), the image rule per frame. Audio
queries have no patch augmentation in DeYO; they are treated as texts are.

Text queries: as in the TCR code, ``x'`` is the unchanged texts and the PLPD threshold is -1, so PLPD = 0
and the PLPD filter is inactive (DeYO reduces to entropy-filtered, re-weighted Tent). We set PLPD = 0
directly instead of running the identical forward a second time.

Defaults: ``tau`` 0.01 (the TCR code's per-dataset temperature, set by configs via ``hparams``), ``deyo_margin``
0.5 and ``margin_e0`` 0.4 (fractions, as the TCR code; the original DeYO uses entropy margins scaled by
ln(num classes)), ``patch_len`` 4, ``plpd_threshold`` None = 0.0 for images and video, -1.0 for texts and audio.

Deviations: only the ``patch`` augmentation (the one the TCR code uses) is implemented. The image is
resized to a multiple of ``patch_len`` and back only when its size is not already a multiple, height
and width separately (the TCR code resizes to a square of the width, which breaks non-square ReID
inputs). An empty
selection skips the update, as the TCR code does (``Method.update`` logs ``skipped: empty``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .. import modalities
from . import components as C
from .base import Method
from .hparams import HP


def patch_shuffle(images: torch.Tensor, grid: int = 4, generator: torch.Generator | None = None):
    """Cut each image (B x C x H x W) into a grid x grid of patches and shuffle them, per image."""
    b, c, h, w = images.shape
    hh, ww = max(grid, h // grid * grid), max(grid, w // grid * grid)
    resize = (hh, ww) != (h, w)
    x = F.interpolate(images, size=(hh, ww), mode="bilinear", antialias=True) if resize else images
    ph, pw = hh // grid, ww // grid
    patches = x.reshape(b, c, grid, ph, grid, pw).permute(0, 2, 4, 1, 3, 5).reshape(b, grid * grid, c, ph, pw)
    perm = torch.rand(b, grid * grid, generator=generator).argsort(dim=1).to(images.device)
    patches = patches[torch.arange(b, device=images.device)[:, None], perm]
    x = patches.reshape(b, grid, grid, c, ph, pw).permute(0, 3, 1, 4, 2, 5).reshape(b, c, hh, ww)
    return F.interpolate(x, size=(h, w), mode="bilinear", antialias=True) if resize else x


def shuffle_frames(batch: torch.Tensor, grid: int = 4, generator: torch.Generator | None = None):
    """:func:`patch_shuffle` of an image batch (B x C x H x W), or of every frame of a video batch
    (B x T x C x H x W, frames first as video towers take them), each frame with its own permutation."""
    if batch.dim() == 4:
        return patch_shuffle(batch, grid, generator)
    if batch.dim() != 5:
        raise ValueError(f"deyo: patch shuffling needs images (B x C x H x W) or clips (B x T x C x H x W), got "
                         f"a batch of shape {tuple(batch.shape)}")
    b, t = batch.shape[:2]
    return patch_shuffle(batch.reshape(b * t, *batch.shape[2:]), grid, generator).reshape(batch.shape)


def deyo_weight(ent: torch.Tensor, thr: float, plpd: torch.Tensor) -> torch.Tensor:
    """The TCR code's DeYO sample weight ``1/(exp(H - thr) + 0.1) + exp(PLPD) + 0.1`` (no gradient)."""
    return 1 / (torch.exp(ent.detach() - thr) + 0.1) + (1 / torch.exp(-plpd.detach()) + 0.1)


class DeYO(Method):
    name = "deyo"
    shardable = False  # re-encodes the local part of a selection made over the global batch
    defaults = {"tau": 0.01, "deyo_margin": 0.5, "margin_e0": 0.4, "patch_len": 4, "plpd_threshold": None}
    # deyo_margin: the strict filter keeps int(deyo_margin * B) - 1 queries, so 2 are needed for one
    hparam_spec = {"tau": HP(float, gt=0), "deyo_margin": HP(float, ge=0, le=1, min_selected=2),
                   "margin_e0": HP(float, ge=0, le=1), "patch_len": HP(int, ge=1),
                   "plpd_threshold": HP(float, none=True)}

    @property
    def spatial(self) -> bool:
        """Whether the queries are pictures (images, video frames) whose patches can be shuffled."""
        return modalities.get(self.modality).spatial

    def _logits(self, query_batch):
        return C.gallery_logits(self.encode(query_batch), self.gallery, self.hp["tau"])

    def forward_and_adapt(self, query_batch, step):
        hp = self.hp
        logits = self._logits(query_batch)
        ent = C.entropy(logits)
        sel, _ = C.select_lowest(ent, hp["deyo_margin"], strict=True)
        info = {"n_entropy": int(sel.sum()), "n_selected": 0}
        loss = None
        if sel.any():
            probs = logits[sel].detach().softmax(dim=1)
            pseudo = probs.argmax(dim=1, keepdim=True)
            if self.spatial:
                with torch.no_grad():
                    shuffled = shuffle_frames(C.index_batch(query_batch, sel), hp["patch_len"], self.generator)
                    probs_aug = self._logits(shuffled).softmax(dim=1)
                plpd = (probs.gather(1, pseudo) - probs_aug.gather(1, pseudo)).squeeze(1)
            else:
                plpd = torch.zeros(len(probs), device=probs.device)
            plpd_thr = hp["plpd_threshold"]
            if plpd_thr is None:
                plpd_thr = 0.0 if self.spatial else -1.0
            keep = plpd > plpd_thr
            info["n_selected"] = int(keep.sum())
            if keep.any():
                ent_k, plpd_k = ent[sel][keep], plpd[keep]
                thr = C.kth_smallest(ent_k, hp["margin_e0"])
                thr = math.inf if thr is None else thr
                loss = (deyo_weight(ent_k, thr, plpd_k) * ent_k).mean()
                info["plpd"] = C.scalar(plpd_k.mean())
        self.update(loss, info)
        return logits.detach(), info
