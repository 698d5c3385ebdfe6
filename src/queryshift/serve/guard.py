"""Diagnostics of an update and the collapse rule (as SAR's model recovery, on the served batch).

After each update the worker encodes the update's batch with the new and with the source parameters (no
gradient) and compares them, before the new parameters answer any request:

- ``uniformity``: mean distance of the embeddings to their centre (REST's diagnostic; higher = more
  spread). Collapse squeezes every query onto one point: the update is refused when the spread falls
  below ``min_uniformity_ratio`` times the spread of the same queries under the source parameters;
- ``entropy``: mean entropy (nats) of the queries' predictions over the whole gallery at ``guard_tau``.
  Embeddings that no longer discriminate give near-uniform predictions: refused above
  ``max_entropy_frac * ln(gallery size)``;
- ``gap`` and ``consistency`` (TCR/REST's modality gap and query-candidate similarity) are reported;
- non-finite parameters or embeddings are always a collapse.
"""

from __future__ import annotations

import math

import torch

from ..methods import components as C
from .config import ServeConfig


@torch.no_grad()
def diagnostics(q: torch.Tensor, gallery: torch.Tensor, tau: float) -> dict[str, float]:
    scores = q @ gallery.T
    cand, _ = C.candidates(scores, gallery)
    return {
        "uniformity": float(torch.linalg.vector_norm(q - q.mean(0), dim=1).mean()),
        "entropy": float(C.entropy(scores / tau).mean()),
        "gap": float(C.modality_gap(q, cand)),
        "consistency": float(C.consistency(q, cand).mean()),
    }


def collapse_reason(adapted: dict[str, float], source: dict[str, float], n_gallery: int,
                    finite: bool, cfg: ServeConfig) -> str | None:
    """Why the adapted parameters count as collapsed, or None when they may answer."""
    if not finite or not all(math.isfinite(v) for v in adapted.values()):
        return "non-finite parameters or embeddings"
    if source["uniformity"] > 0 and adapted["uniformity"] < cfg.min_uniformity_ratio * source["uniformity"]:
        return (f"uniformity {adapted['uniformity']:.4f} < {cfg.min_uniformity_ratio} x source "
                f"{source['uniformity']:.4f}")
    limit = cfg.max_entropy_frac * math.log(max(n_gallery, 2))
    if adapted["entropy"] > limit:
        return f"entropy {adapted['entropy']:.3f} > {cfg.max_entropy_frac} x ln({n_gallery}) = {limit:.3f}"
    return None
