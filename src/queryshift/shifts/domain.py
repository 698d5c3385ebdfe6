"""Domain styles of the shapes world: the query-gallery-shift analogue of the synthetic benchmark.

Training only ever sees light plain backgrounds, filled shapes and the caption templates and words of
:mod:`queryshift.data.shapes`. Each style moves queries off that distribution while keeping their meaning:

* image styles are pure image operations. Backgrounds in the shapes world are plain, so the background
  colour is the median of the border pixels and the objects are the pixels far from it; that works on
  any rendered image (full split, subset or single item) without knowing its scene.
  ``style:outline`` keeps only a 2-pixel contour of each shape, ``style:dark`` puts the shapes on a
  near-black background, ``style:texture`` on random stripes or checks.
* caption styles rewrite text. ``style:synonyms`` swaps shape, colour, size, position and relation words
  for synonyms the tokenizer knows but training never used; ``style:templates`` parses the caption
  (:func:`~queryshift.data.shapes.parse_caption`) and re-words it with held-out sentence templates.
  Captions no template produced (e.g. already corrupted) pass through unchanged.

Randomness (texture choice, synonym choice) comes from the per-query generator, so a style is a
deterministic function of (seed, index).
"""

from __future__ import annotations

import re
from collections.abc import Callable

import numpy as np
from PIL import Image, ImageFilter

from ..data.retrieval import pre_caption
from ..data.shapes import articles, build_templates, parse_caption
from . import QueryShift

_FOREGROUND = 40.0  # max channel distance from the background that counts as object


def _split_background(image: Image.Image) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """-> (pixels float HxWx3, background colour, alpha in [0, 1] of how much each pixel is object)."""
    pixels = np.asarray(image.convert("RGB"), dtype=np.float32)
    border = np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]])
    background = np.median(border, axis=0)
    distance = np.abs(pixels - background).max(axis=-1)
    alpha = np.clip(distance / _FOREGROUND, 0, 1)
    return pixels, background, alpha


def _object_colours(pixels: np.ndarray, background: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """Undo anti-aliasing: the colour each pixel would have if it were fully object."""
    safe = np.maximum(alpha, 1e-3)[..., None]
    return np.clip(background + (pixels - background) / safe, 0, 255)


def _composite(objects: np.ndarray, alpha: np.ndarray, background: np.ndarray) -> Image.Image:
    out = alpha[..., None] * objects + (1 - alpha[..., None]) * background
    return Image.fromarray(np.clip(out, 0, 255).round().astype(np.uint8))


def outline(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    pixels, background, alpha = _split_background(image)
    mask = Image.fromarray((alpha > 0.5).astype(np.uint8) * 255)
    inner = np.asarray(mask.filter(ImageFilter.MinFilter(5))) > 0
    ring = alpha * ~inner  # object minus its erosion, keeping the anti-aliased outer edge
    return _composite(_object_colours(pixels, background, alpha), ring, background)


def dark(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    pixels, background, alpha = _split_background(image)
    new_background = np.full(3, rng.uniform(10, 45)) + rng.uniform(-8, 8, size=3)
    return _composite(_object_colours(pixels, background, alpha), alpha, new_background)


def texture(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    pixels, background, alpha = _split_background(image)
    h, w = alpha.shape
    yy, xx = np.mgrid[0:h, 0:w]
    period = int(rng.integers(4, 9))
    kind = rng.integers(3)
    if kind == 0:  # diagonal stripes
        pattern = ((xx + yy) // period) % 2
    elif kind == 1:  # checks
        pattern = (xx // period + yy // period) % 2
    else:  # coarse noise
        pattern = np.kron(rng.random((h // 4 + 1, w // 4 + 1)), np.ones((4, 4)))[:h, :w]
    light, shade = rng.uniform(150, 230, size=3), rng.uniform(60, 140, size=3)
    new_background = light + pattern[..., None] * (shade - light)
    return _composite(_object_colours(pixels, background, alpha), alpha, new_background)


# -- caption styles ----------------------------------------------------------------------------

SYNONYMS = {
    "left of": ("west of", "to the west of"),
    "right of": ("east of", "to the east of"),
    "above": ("over", "higher than"),
    "below": ("under", "lower than"),
    "top": ("upper",),
    "bottom": ("lower",),
    "center": ("middle",),
    "left": ("west",),
    "right": ("east",),
    "circle": ("disk", "round dot"),
    "square": ("block", "quadrilateral"),
    "triangle": ("wedge", "trigon"),
    "star": ("pentagram", "asterisk"),
    "cross": ("plus sign", "plus symbol"),
    "diamond": ("rhombus", "lozenge"),
    "red": ("crimson", "scarlet"),
    "green": ("emerald", "lime"),
    "blue": ("azure", "navy"),
    "yellow": ("golden", "lemon"),
    "purple": ("violet", "lilac"),
    "orange": ("amber", "tangerine"),
    "pink": ("rose", "magenta"),
    "brown": ("chestnut", "chocolate"),
    "small": ("tiny", "little"),
    "large": ("huge", "big"),
    "shapes": ("figures",),
    "shape": ("figure",),
    "object": ("item",),
    "picture": ("photo",),
    "image": ("photo",),
}
_SYNONYM_RE = re.compile(r"\b(" + "|".join(sorted(map(re.escape, SYNONYMS), key=len, reverse=True)) + r")\b")

# held-out sentence heads and tails, one per training head, with the same fields
NEW_TEMPLATES = build_templates(
    {
        "attr": "this picture contains a {c1} {s1} of {z1} size",
        "single": "nothing but one {c1} {s1}",
        "where": "the {pos} holds a {c1} {s1}",
        "where_size": "in the {pos} sits a {z1} {s1}",
        "is_size": "we see a {z1} sized {c1} {s1}",
        "count": "{n} shapes appear, among them a {c1} {s1}",
        "list": "listing {n}, {z1} {c1} {s1}",
        "rel": "there is a {c2} {s2} and a {c1} {s1} is {rel} it",
        "rel_colour": "something {c1} sits {rel} the {c2} {s2}",
    },
    ", next to it a {{c{k}}} {{s{k}}}", ", plus a {{c{k}}} {{s{k}}}", ", {{z{k}}} {{c{k}}} {{s{k}}}",
)


def synonyms(caption: str, rng: np.random.Generator) -> str:
    swapped = _SYNONYM_RE.sub(lambda m: str(rng.choice(SYNONYMS[m.group(1)])), caption)
    return re.sub(r"\b(?:a|an) (?=(\w))", lambda m: "an " if m.group(1) in "aeiou" else "a ", swapped)


def templates(caption: str, rng: np.random.Generator) -> str:
    parsed = parse_caption(caption)
    if parsed is None:
        return caption
    key, fields = parsed
    return pre_caption(articles(NEW_TEMPLATES[key].format(**fields)))


# -- the QueryShift wrappers -------------------------------------------------------------------


class DomainStyle(QueryShift):
    """A style applied to every query of one modality; ``rng`` is the engine's per-query generator."""

    def __init__(self, name: str, modality: str, transform: Callable):
        self.name = name
        self.modality = modality
        self.transform = transform

    def __call__(self, item, index, position, total, rng):
        return self.transform(item, rng)


def _factory(name: str, modality: str, transform: Callable) -> Callable[[str, int], QueryShift]:
    def build(query_modality: str, seed: int = 0) -> QueryShift:
        if query_modality != modality:
            raise ValueError(f"{name} is a {modality} style; it cannot shift {query_modality} queries")
        return DomainStyle(name, modality, transform)

    return build


_STYLES = {
    "style:outline": ("image", outline),
    "style:dark": ("image", dark),
    "style:texture": ("image", texture),
    "style:synonyms": ("text", synonyms),
    "style:templates": ("text", templates),
}
DOMAIN_SHIFTS: dict[str, Callable[[str, int], QueryShift]] = {
    name: _factory(name, modality, fn) for name, (modality, fn) in _STYLES.items()
}
