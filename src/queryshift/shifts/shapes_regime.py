"""The regime benchmark v2 asks of its source models, measured with no adaptation (``source``).

Query shift on COCO-C is *recoverable*: BLIP keeps about half of its clean R@1 on average, so adaptation
has something to restore. The shapes world's shipped models are held to the same shape of regime:

* clean R@1 on ``shapes-5k``: i2t >= 60, t2i >= 50;
* the 16 image corruptions at severity 5 (i2t, 1k split): mean source R@1 between 30 % and 75 % of clean,
  and at most 2 of them below 10 % of clean;
* the char- and word-level text corruptions at their strongest level, 7 (t2i, 1k split): the same two;
* every image and caption style keeps at least 10 % of clean R@1 with the customized model, and the
  general model does better than the customized one on each style (it knows them).

:func:`measure` computes every number (``lab/experiments/shapes_regime.py`` writes them to its JSON
for the model cards); :func:`check` turns a measurement into the list of conditions, met or not.
Query shifts get the engine's per-query generator (``item_rng(seed, index)``), so each R@1 here equals what
``queryshift run --method source`` reports for the same queries.
"""

from __future__ import annotations

import numpy as np
import torch

from ..data.retrieval import pre_caption
from ..metrics import batch_ranks
from . import build, item_rng
from .image import IMAGE_CORRUPTIONS
from .text import CHAR_CORRUPTIONS, WORD_CORRUPTIONS

IMAGE_TEST_SHIFTS = tuple(f"{name}:5" for name in IMAGE_CORRUPTIONS)
TEXT_TEST_SHIFTS = tuple(f"{name}:7" for name in CHAR_CORRUPTIONS + WORD_CORRUPTIONS)
IMAGE_STYLES = ("style:outline", "style:dark", "style:texture")
CAPTION_STYLES = ("style:synonyms", "style:templates")

CLEAN_5K = {"i2t": 60.0, "t2i": 50.0}
MEAN_RETAINED = (0.30, 0.75)  # mean corrupted R@1 / clean R@1
COLLAPSED = 0.10  # a shift "collapses" the model below this fraction of clean R@1
MAX_COLLAPSED = 2
STYLE_RETAINED = 0.10


@torch.no_grad()
def _encode(model, modality: str, items: list, batch_size: int = 250) -> torch.Tensor:
    chunks = []
    for a in range(0, len(items), batch_size):
        batch = items[a:a + batch_size]
        if modality == "image":
            inputs = torch.stack([model.preprocess(x) for x in batch])
        else:
            inputs = model.tokenize([pre_caption(x) for x in batch])
        chunks.append(model.encode(modality, inputs).float())
    return torch.cat(chunks)


class SourceRecall:
    """R@1 of one model with no adaptation, clean gallery encoded once per direction."""

    def __init__(self, model, dataset, seed: int = 42, max_queries: int | None = None):
        self.model, self.dataset, self.seed = model, dataset, seed
        self.max_queries = max_queries
        self._gallery: dict[str, torch.Tensor] = {}
        self.model.eval()

    def gallery(self, direction: str) -> torch.Tensor:
        if direction not in self._gallery:
            if direction == "i2t":
                self._gallery[direction] = _encode(self.model, "text", self.dataset.texts)
            else:
                images = [self.dataset.load_image(i) for i in range(len(self.dataset.images))]
                self._gallery[direction] = _encode(self.model, "image", images)
        return self._gallery[direction]

    def r1(self, direction: str, shift: str | None = None) -> float:
        modality, n, relevant = self.dataset.query_items(direction)
        n = min(n, self.max_queries or n)
        query_shift = build(shift, modality, self.seed)
        items = []
        for i in range(n):
            item = self.dataset.load_image(i) if modality == "image" else self.dataset.texts[i]
            items.append(query_shift(item, i, i, n, item_rng(self.seed, i)))
        scores = _encode(self.model, modality, items) @ self.gallery(direction).T
        ranks, _ = batch_ranks(scores, relevant[:n])
        return 100.0 * float(np.mean(np.asarray(ranks) == 0))


def measure(general, custom, data_1k, data_5k=None, max_queries: int | None = None, log=print) -> dict:
    """Every number of the regime for the customized model ``custom`` and the general model ``general``.

    ``data_5k`` None skips the clean 5k rows; ``max_queries`` limits the queries of each 1k run (the gallery
    stays whole), for quick pilots and tests.
    """
    out: dict = {"max_queries": max_queries}
    if data_5k is not None:
        five_k = SourceRecall(custom, data_5k)
        out["clean_5k"] = {d: five_k.r1(d) for d in ("i2t", "t2i")}
        log(f"clean shapes-5k: {out['clean_5k']}")
    models = {"custom": SourceRecall(custom, data_1k, max_queries=max_queries),
              "general": SourceRecall(general, data_1k, max_queries=max_queries)}
    for name, recall in models.items():
        rows = {"clean_i2t": recall.r1("i2t"), "clean_t2i": recall.r1("t2i")}
        for shift in IMAGE_STYLES:
            rows[shift] = recall.r1("i2t", shift)
        for shift in CAPTION_STYLES:
            rows[shift] = recall.r1("t2i", shift)
        out[f"{name}_styles"] = rows
        log(f"{name}: {rows}")
    custom_recall = models["custom"]
    out["image_corruptions"] = {s: custom_recall.r1("i2t", s) for s in IMAGE_TEST_SHIFTS}
    log(f"image corruptions: {out['image_corruptions']}")
    out["text_corruptions"] = {s: custom_recall.r1("t2i", s) for s in TEXT_TEST_SHIFTS}
    log(f"text corruptions: {out['text_corruptions']}")
    return out


def _family(name: str, rows: dict[str, float], clean: float) -> list[tuple[str, bool, str]]:
    retained = {s: r / clean for s, r in rows.items()}
    mean = float(np.mean(list(retained.values())))
    collapsed = sorted(s for s, r in retained.items() if r < COLLAPSED)
    lo, hi = MEAN_RETAINED
    return [
        (f"{name}: mean R@1 between {lo:.0%} and {hi:.0%} of clean", lo <= mean <= hi, f"{mean:.1%}"),
        (f"{name}: at most {MAX_COLLAPSED} below {COLLAPSED:.0%} of clean", len(collapsed) <= MAX_COLLAPSED,
         f"{len(collapsed)} ({', '.join(collapsed) or 'none'})"),
    ]


def check(m: dict) -> list[tuple[str, bool, str]]:
    """-> (condition, met, measured value) for every regime condition ``m`` has the numbers for."""
    out = []
    for direction, floor in CLEAN_5K.items():
        if "clean_5k" in m:
            r1 = m["clean_5k"][direction]
            out.append((f"clean {direction} R@1 on shapes-5k >= {floor:g}", r1 >= floor, f"{r1:.2f}"))
    custom, general = m["custom_styles"], m["general_styles"]
    out += _family("image corruptions (i2t, severity 5)", m["image_corruptions"], custom["clean_i2t"])
    out += _family("text corruptions (t2i, level 7)", m["text_corruptions"], custom["clean_t2i"])
    for style in IMAGE_STYLES + CAPTION_STYLES:
        clean = custom["clean_i2t" if style in IMAGE_STYLES else "clean_t2i"]
        kept = custom[style] / clean
        out.append((f"{style} keeps >= {STYLE_RETAINED:.0%} of clean (customized)", kept >= STYLE_RETAINED,
                    f"{kept:.1%}"))
        out.append((f"{style}: general model > customized", general[style] > custom[style],
                    f"{general[style]:.2f} vs {custom[style]:.2f}"))
    return out
