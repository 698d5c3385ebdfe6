"""Domain styles of the shapes world: the query-gallery-shift analogue of the synthetic benchmark.

Training only ever sees light plain backgrounds, filled shapes and the caption templates and words of
:mod:`queryshift.data.shapes`. Each style moves queries off that distribution while keeping their meaning:

* image styles are pure image operations. Backgrounds in the shapes world are plain, so the background
  colour is the median of the border pixels and the objects are the pixels far from it; that works on
  any rendered image (full split, subset or single item) without knowing its scene.
  Pixel sizes (contour width, stripe period) are given for a 64 px image and scale with the image, so a
  style looks the same at the native resolution (160 px) as at the model's input size.
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
_REFERENCE_SIZE = 64  # the pixel sizes below are for an image of this side


def _px(image_side: int, pixels: float) -> float:
    return pixels * image_side / _REFERENCE_SIZE


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


def _erode(mask: Image.Image, width: int) -> np.ndarray:
    """Erosion by a (2 width + 1) square, as ``width`` 3x3 erosions (the same result, much faster)."""
    for _ in range(width):
        mask = mask.filter(ImageFilter.MinFilter(3))
    return np.asarray(mask) > 0


def outline(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    pixels, background, alpha = _split_background(image)
    mask = Image.fromarray((alpha > 0.5).astype(np.uint8) * 255)
    inner = _erode(mask, max(1, round(_px(min(alpha.shape), 2))))  # a 2 px contour at 64 px
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
    period = max(1, round(_px(min(h, w), int(rng.integers(4, 9)))))
    kind = rng.integers(3)
    if kind == 0:  # diagonal stripes
        pattern = ((xx + yy) // period) % 2
    elif kind == 1:  # checks
        pattern = (xx // period + yy // period) % 2
    else:  # coarse noise
        cell = max(1, round(_px(min(h, w), 4)))
        pattern = np.kron(rng.random((h // cell + 1, w // cell + 1)), np.ones((cell, cell)))[:h, :w]
    light, shade = rng.uniform(150, 230, size=3), rng.uniform(60, 140, size=3)
    new_background = light + pattern[..., None] * (shade - light)
    return _composite(_object_colours(pixels, background, alpha), alpha, new_background)


def sketch(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Validation style: a pencil sketch on white paper, a dark contour around a pale (washed-out) fill."""
    pixels, background, alpha = _split_background(image)
    objects = _object_colours(pixels, background, alpha)
    paper = np.full(3, rng.uniform(238, 252)) + rng.uniform(-4, 4, size=3)
    pale = paper + rng.uniform(0.35, 0.55) * (objects - paper)
    mask = Image.fromarray((alpha > 0.5).astype(np.uint8) * 255)
    inner = _erode(mask, max(1, round(_px(min(alpha.shape), 1))))
    ring = alpha * ~inner
    pencil = np.full(3, rng.uniform(30, 70))
    filled = _composite(pale, alpha, paper)
    return _composite(np.broadcast_to(pencil, pixels.shape), ring, np.asarray(filled, dtype=np.float32))


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


CHATTY_OPENERS = ("look", "i can see", "here we have", "check this out", "so there is", "well")
CHATTY_CLOSERS = ("i think", "if i am not mistaken", "as far as i can tell", "right there", "pretty much", "lol")


def chatty(caption: str, rng: np.random.Generator) -> str:
    """Validation caption style: the caption wrapped in conversational filler (an opener and/or a closer)."""
    kind = int(rng.integers(3))  # opener, closer or both
    opener = f"{rng.choice(CHATTY_OPENERS)} " if kind != 1 else ""
    closer = f" {rng.choice(CHATTY_CLOSERS)}" if kind != 0 else ""
    return opener + caption + closer


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
# For choosing hyper-parameters only: in no test table or test suite, and never seen in training.
VALIDATION_STYLES = {
    "style:sketch": ("image", sketch),
    "style:chatty": ("text", chatty),
}
DOMAIN_SHIFTS: dict[str, Callable[[str, int], QueryShift]] = {
    name: _factory(name, modality, fn) for name, (modality, fn) in {**_STYLES, **VALIDATION_STYLES}.items()
}
TEST_STYLES = tuple(_STYLES)
