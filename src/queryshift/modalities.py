"""The registry of modalities: what a query or gallery item is, and how it travels from a dataset to a tower.

Every modality declares:

- ``letter``: its letter in a direction ``<query>2<gallery>`` (``i2t``, ``v2a``, ``c2i`` ...);
- ``settle(item, max_words)``: the item after its query shift, ready to prepare (captions are cleaned as TCR
  cleans them; ``None`` means nothing is left, e.g. a caption the shift emptied);
- ``prepare(model, item)``: one item -> what a batch stacks (run in loader workers);
- ``collate(items)``: a list of prepared items -> one batch (tensors stacked, texts kept as strings);
- ``model_input(model, batch, device)``: a batch -> the tower's input (texts are tokenised by the model here);
- ``workers``: whether loader worker processes pay off (decoding and corrupting pixels or samples does;
  handing over strings does not);
- ``shift_families``: the shift catalogues (``shifts.registry``) whose shifts apply to its queries;
- ``spatial``: whether a batch is a picture (or frames of pictures) a patch shuffle keeps the content of
  (DeYO's PLPD augmentation).

Items are read from a dataset as ``dataset.load(modality, index)``: a PIL image, a caption, a mono float32
waveform at 16 kHz (audio), a uint8 ``[T, H, W, 3]`` clip (video), or (reference image, modification text)
for a composed query.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .data.retrieval import pre_caption

# torch is imported where batches are made, not here: ``queryshift list`` and ``--help`` read this registry
# (through the shift catalogue) and must stay fast


@dataclass(frozen=True)
class Modality:
    name: str
    letter: str
    item: str  # what ``dataset.load`` returns, for messages and docs
    settle: Callable[[Any, int], Any]
    prepare: Callable[[Any, Any], Any]
    collate: Callable[[list], Any]
    model_input: Callable[[Any, Any, str], Any]
    workers: bool
    shift_families: tuple[str, ...]
    spatial: bool = False


def _as_is(item, max_words: int):
    return item


def _caption(text, max_words: int):
    return pre_caption(text, max_words) or None


def _composed_settle(item, max_words: int):
    image, text = item
    text = pre_caption(text, max_words)
    return (image, text) if text else None


def _by_tower(modality: str):
    return lambda model, item: model.prepare(modality, item)


def _stack(items: list):
    import torch

    shapes = {tuple(i.shape) for i in items}
    if len(shapes) > 1:
        raise ValueError(f"cannot batch prepared items of different shapes {sorted(shapes)}; the model's "
                         f"preprocessing must give every item one shape")
    return torch.stack(items)


def _to_device(model, batch, device: str):
    if isinstance(batch, dict):
        return {k: v.to(device) for k, v in batch.items()}
    return batch.to(device)


def _tokens(model, texts: list[str], device: str):
    return _to_device(model, model.tokenize(list(texts)), device)


def _composed_prepare(model, item):
    image, text = item
    return model.preprocess(image), text


def _composed_collate(items: list):
    import torch

    return {"image": torch.stack([i for i, _ in items]), "text": [t for _, t in items]}


def _composed_input(model, batch, device: str):
    return model.composed_input(batch["image"], batch["text"], device)


MODALITIES: dict[str, Modality] = {}


def register(modality: Modality) -> None:
    """Add a modality (a backbone with a ``<name>`` tower encodes it with ``encode_<name>``)."""
    taken = {m.letter: m.name for m in MODALITIES.values() if m.name != modality.name}
    if modality.letter in taken:
        raise ValueError(f"modality {modality.name!r}: letter {modality.letter!r} is {taken[modality.letter]}'s")
    MODALITIES[modality.name] = modality


for _m in (
    Modality("image", "i", "a PIL image", _as_is, _by_tower("image"), _stack, _to_device, workers=True,
             shift_families=("image",), spatial=True),
    Modality("text", "t", "a caption string", _caption, _by_tower("text"), list, _tokens, workers=False,
             shift_families=("text",)),
    Modality("audio", "a", "a mono float32 waveform at 16 kHz", _as_is, _by_tower("audio"), _stack, _to_device,
             workers=True, shift_families=("audio",)),
    Modality("video", "v", "a uint8 clip [T, H, W, 3]", _as_is, _by_tower("video"), _stack, _to_device,
             workers=True, shift_families=("video",), spatial=True),
    # a composed query: a reference image and its modification text, encoded together against images. Its
    # loader stays in the main process as before the registry (the ranks of composed runs are recorded).
    Modality("composed", "c", "(reference image, modification text)", _composed_settle, _composed_prepare,
             _composed_collate, _composed_input, workers=False, shift_families=("image", "text")),
):
    register(_m)

COMPOSED = "composed"


def get(name: str) -> Modality:
    try:
        return MODALITIES[name]
    except KeyError:
        raise ValueError(f"unknown modality {name!r}; known: {', '.join(MODALITIES)}") from None


def letter(name: str) -> str:
    return get(name).letter


def direction(query: str, gallery: str) -> str:
    return f"{letter(query)}2{letter(gallery)}"


def parse_direction(spec: str) -> tuple[str, str]:
    """``'v2a'`` -> ``('video', 'audio')``; a malformed or unknown direction is a ValueError naming it."""
    by_letter = {m.letter: m.name for m in MODALITIES.values()}
    q, sep, g = (spec or "").partition("2") if isinstance(spec, str) else ("", "", "")
    if not sep or q not in by_letter or g not in by_letter or q == g:
        raise ValueError("direction must be <query>2<gallery> with the letters "
                         + ", ".join(f"{m.letter} ({m.name})" for m in MODALITIES.values())
                         + f", e.g. i2t, t2i, c2i, v2a, a2v, a2t; got {spec!r}")
    if by_letter[g] == COMPOSED:
        raise ValueError(f"direction {spec!r}: composed queries are queries only (c2i), never a gallery")
    return by_letter[q], by_letter[g]


def directions(towers: tuple[str, ...]) -> list[str]:
    """Every direction a model with these towers runs: each ordered pair of two towers, and c2i (composed
    queries against images) when it has an image and a text tower."""
    found = [direction(q, g) for q in towers for g in towers if q != g and q in MODALITIES and g in MODALITIES]
    if "image" in towers and "text" in towers:
        found.append(direction(COMPOSED, "image"))
    return found


def check_direction(spec: str, towers: tuple[str, ...], model_name: str) -> tuple[str, str]:
    """The (query, gallery) modalities of ``spec`` when the model's towers allow it; otherwise a ValueError
    naming the valid directions for this model."""
    query, gallery = parse_direction(spec)
    if spec not in directions(tuple(towers)):
        raise ValueError(f"direction {spec!r} needs {query} queries and a {gallery} gallery, but {model_name} has "
                         f"the towers {', '.join(towers)}; valid directions for it: "
                         + ", ".join(directions(tuple(towers))))
    return query, gallery


ALL_DIRECTIONS = tuple(directions(tuple(m for m in MODALITIES if m != COMPOSED)))
