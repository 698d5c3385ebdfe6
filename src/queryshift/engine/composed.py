"""The engine side of composed queries (``--direction c2i``): their shifts, ranks and extra metrics.

A composed query is (reference image, modification text). ``--shift`` corrupts either part or both:
``gaussian_noise:3`` the reference image, ``RandomCharAug_swap:5`` the text, and
``gaussian_noise:3+RandomCharAug_swap:5`` both (an image part and a text part joined by ``+``, in any
order; ``+filter`` still belongs to the text shift it follows). Each part draws its randomness from its own
stream, so the image corruption of a query is the same whether or not its text is shifted too.
"""

from __future__ import annotations

import re

import numpy as np
import torch

from .. import shifts
from ..metrics import recall_at_k, recall_subset, subset_ranks
from ..modalities import COMPOSED, get, parse_direction
from ..shifts.registry import WrongModality
from .ranking import rank_scores

_PARTS = re.compile(r"\+(?!filter\b)")


class ComposedShift(shifts.QueryShift):
    """An image shift for the reference image and a text shift for the modification text."""

    modality = COMPOSED

    def __init__(self, image: shifts.QueryShift, text: shifts.QueryShift):
        self.image, self.text = image, text
        self.name = "+".join(s.name for s in (image, text) if s.name != "clean") or "clean"

    def __call__(self, item, index: int, position: int, total: int, rng: np.random.Generator):
        image, text = item
        image_rng, text_rng = (np.random.default_rng(s) for s in rng.integers(0, 2**63 - 1, size=2))
        return (self.image(image, index, position, total, image_rng),
                self.text(text, index, position, total, text_rng))

    def segment(self, position: int, total: int) -> str:
        parts = [s.segment(position, total) for s in (self.image, self.text)]
        return "+".join(p for p in parts if p != "clean") or "clean"


def build_composed_shift(spec: str | None, seed: int = 0) -> ComposedShift:
    """Parse ``--shift`` for composed queries: at most one image part and one text part, joined by ``+``."""
    clean = shifts.QueryShift()
    if spec is None or spec.strip() in ("", "none", "clean"):
        return ComposedShift(clean, clean)
    sides: dict[str, shifts.QueryShift] = {}
    for part in (p.strip() for p in _PARTS.split(spec)):
        errors = []
        for modality in get(COMPOSED).shift_families:
            try:
                built = shifts.build(part, modality, seed)
            except WrongModality:  # a shift of the other side: not this part's problem
                continue
            except ValueError as err:
                errors.append(str(err))
                continue
            if modality in sides:
                raise ValueError(f"composed shift {spec!r}: two {modality} shifts; give at most one image shift "
                                 f"and one text shift, e.g. gaussian_noise:3+RandomCharAug_swap:5")
            sides[modality] = built
            break
        else:
            if not errors:  # a shift of another modality altogether (an audio or video shift)
                raise ValueError(f"composed shift {spec!r}: {part!r} shifts neither the reference image nor the "
                                 f"modification text")
            if len(errors) == 1:  # a shift of one side with a bad severity or option: that side's complaint
                raise ValueError(f"composed shift {spec!r}: part {part!r}: {errors[0]}")
            raise ValueError(f"composed shift {spec!r}: {part!r} is neither an image nor a text shift "
                             f"({errors[0]})")
    return ComposedShift(sides.get("image", clean), sides.get("text", clean))


def build_query_shift(spec: str | None, modality: str, seed: int = 0) -> shifts.QueryShift:
    if modality == COMPOSED:
        return build_composed_shift(spec, seed)
    return shifts.build(spec, modality, seed)


def rank_queries(scores: torch.Tensor, indices: list[int], dataset, relevance, direction: str
                 ) -> tuple[list, list, dict]:
    """Best ranks and APs of one batch. For the queries of a composed dataset (``c2i``, and ``t2i``: the text
    alone) its excluded images (CIRR: the reference) are never ranked, and with CIRR subsets the rank within
    the subset is logged too (``subset_ranks``)."""
    on_gallery = parse_direction(direction)[1] == "image"  # other galleries: nothing of the composed protocol
    exclude = getattr(dataset, "exclude", None)
    if exclude is not None and on_gallery:
        scores = scores.clone()
        for row, q in enumerate(indices):
            scores[row, exclude[q]] = float("-inf")
    rel = [relevance[q] for q in indices]
    ranks, aps = rank_scores(scores, rel)
    extra = {}
    subsets = getattr(dataset, "subsets", None)
    if subsets is not None and on_gallery:
        extra["subset_ranks"] = subset_ranks(scores, [subsets[q] for q in indices], rel)
    return ranks, aps, extra


def composed_metrics(rows: list[dict]) -> dict[str, float]:
    """R@50 (CIRR, FashionIQ) and, when logged, CIRR's Recall_subset@1/2/3."""
    ranks = [r for row in rows for r in row["ranks"]]
    out = {"r50": recall_at_k(ranks, 50)}
    sub = [r for row in rows for r in row.get("subset_ranks", [])]
    if sub:
        out.update(recall_subset(sub))
    return out
