"""A synthetic image-caption world (``--data shapes``): a benchmark that needs no downloads.

Each scene is a light, slightly tinted background with 1-3 coloured shapes in distinct cells of a 3x3
grid. Captions come from templates that each mention only some attributes (colour, shape, size, grid
position, a pairwise relation, the object count), so many captions fit several images: retrieval is
genuinely ambiguous and a good model stays well below 100 R@1. Everything is a pure function of
(split seed, image index), so a subset or a single image renders exactly as in the full split.

The caption grammar is regular on purpose: :func:`parse_caption` recovers the fields of any training
caption, which lets the caption styles in :mod:`queryshift.shifts.domain` rewrite it faithfully.
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

from .retrieval import RetrievalDataset, from_groups

CANVAS = 64  # scene coordinates (positions, radii) are in pixels of a 64x64 canvas
# Images are rendered at a photo-like native resolution, 2.5x the models' 64 px input: corruptions and
# styles act on the native image, as COCO-C corrupts the full photo, and the backbone's own transform
# resizes it (bicubic) like every other query. Training renders the same way (``train_source``).
IMAGE_SIZE = 160
_SCALE = 2  # draw at 2x and box-downsample: cheap anti-aliasing
CAPTIONS_PER_IMAGE = 5

SHAPES = ("circle", "square", "triangle", "star", "cross", "diamond")
COLOURS = {
    "red": (215, 40, 40),
    "green": (40, 165, 60),
    "blue": (40, 80, 215),
    "yellow": (230, 200, 30),
    "purple": (135, 55, 185),
    "orange": (240, 130, 20),
    "pink": (235, 120, 185),
    "brown": (125, 80, 40),
}
SIZES = {"small": (4.0, 6.0), "large": (8.5, 11.0)}  # radius range in canvas pixels
POSITIONS = ("top left", "top", "top right", "left", "center", "right", "bottom left", "bottom", "bottom right")
RELATIONS = ("left of", "right of", "above", "below")
COUNT_WORDS = ("one", "two", "three")

# split -> (seed, number of images). The test split has Flickr30K's shape: 1,000 images x 5 captions.
# ``val`` (same distribution, other seed) is what training monitors, so the test split stays unseen.
# ``test5k`` (``--data shapes-5k``) has COCO's 5k test shape and the test seed: its first 1,000 images are the
# 1k test split.
SPLITS = {"train": (20_240_601, 20_000), "val": (20_240_603, 1_000), "test": (20_240_602, 1_000),
          "test5k": (20_240_602, 5_000)}

# Captions = a head about one or two objects, mentioning only some of their attributes, plus a tail naming
# every other object by colour and shape. Partial heads keep retrieval ambiguous; the tails keep it
# solvable (with heads alone, even a perfect model would stay near 23 t2i R@1 on the test split).
# Fields: c/s/z = colour/shape/size of object 1..3, rel (object 1 relative to 2), pos (of object 1), n.
HEADS = {
    "attr": "a {z1} {c1} {s1}",
    "single": "a single {c1} {s1}",
    "where": "a {c1} {s1} in the {pos}",
    "where_size": "a {z1} {s1} in the {pos}",
    "is_size": "a {c1} {s1} that is {z1}",
    "count": "{n} shapes including a {c1} {s1}",
    "list": "{n} shapes a {z1} {c1} {s1}",
    "rel": "a {c1} {s1} {rel} a {c2} {s2}",
    "rel_colour": "a {c1} object {rel} a {c2} {s2}",
}
_TWO_OBJECT_HEADS = {"rel", "rel_colour"}


def build_templates(heads: dict[str, str], first: str, more: str, listed: str) -> dict[str, str]:
    """``head/n`` -> the head plus a tail naming the other objects of an n-object scene.

    ``first``/``more`` format the first/later tail objects ({k} = object number); ``listed`` is used
    after the "list" head and also gives sizes.
    """
    out = {}
    for n in (1, 2, 3):
        for key, head in heads.items():
            used = 2 if key in _TWO_OBJECT_HEADS else 1
            if used > n or (key == "single" and n > 1):
                continue
            if key == "list":
                tail = "".join(listed.format(k=k) for k in range(used + 1, n + 1))
            else:
                tail = "".join((first if k == used + 1 else more).format(k=k) for k in range(used + 1, n + 1))
            out[f"{key}/{n}"] = head + tail
    return out


TEMPLATES = build_templates(HEADS, " with a {{c{k}}} {{s{k}}}", " and a {{c{k}}} {{s{k}}}",
                            " and a {{z{k}}} {{c{k}}} {{s{k}}}")
_WORDS = {
    "c": tuple(COLOURS),
    "s": SHAPES,
    "z": tuple(SIZES),
    "rel": RELATIONS,
    "pos": POSITIONS,
    "n": COUNT_WORDS,
}


@dataclass(frozen=True)
class Shape:
    shape: str
    colour: str
    size: str
    cell: int  # 0..8, row-major in the 3x3 grid
    x: float  # centre, pixels
    y: float
    radius: float
    rgb: tuple[int, int, int]

    @property
    def position(self) -> str:
        return POSITIONS[self.cell]


@dataclass(frozen=True)
class Scene:
    background: tuple[int, int, int]
    objects: tuple[Shape, ...]
    captions: tuple[str, ...]


def scene_rng(split: str, index: int) -> np.random.Generator:
    return np.random.default_rng([SPLITS[split][0], index])


def sample_background(rng: np.random.Generator) -> tuple[int, int, int]:
    """A light grey, slightly tinted background colour."""
    grey = rng.uniform(205, 240)
    return tuple(int(np.clip(grey + rng.uniform(-12, 12), 0, 255)) for _ in range(3))


def sample_shape(rng: np.random.Generator, cell: int) -> Shape:
    """A random object centred near the middle of grid cell ``cell`` (0-8 of the 3x3 grid), inside the canvas."""
    cell_px = CANVAS / 3
    size = str(rng.choice(tuple(SIZES)))
    radius = float(rng.uniform(*SIZES[size]))
    row, col = divmod(int(cell), 3)
    x = float(np.clip((col + 0.5) * cell_px + rng.uniform(-2.5, 2.5), radius + 1, CANVAS - radius - 1))
    y = float(np.clip((row + 0.5) * cell_px + rng.uniform(-2.5, 2.5), radius + 1, CANVAS - radius - 1))
    colour = str(rng.choice(tuple(COLOURS)))
    rgb = tuple(int(np.clip(v + rng.integers(-15, 16), 0, 255)) for v in COLOURS[colour])
    return Shape(str(rng.choice(SHAPES)), colour, size, int(cell), x, y, radius, rgb)


def sample_scene(split: str, index: int) -> Scene:
    """The scene of image ``index`` of ``split``; independent of every other index."""
    rng = scene_rng(split, index)
    background = sample_background(rng)
    count = int(rng.choice([1, 2, 3], p=[0.2, 0.4, 0.4]))
    objects = tuple(sample_shape(rng, cell) for cell in rng.choice(9, size=count, replace=False))
    return Scene(background, objects, tuple(_captions(objects, rng)))


def relation(a: Shape, b: Shape) -> str:
    """Where ``a`` is relative to ``b``, along the axis where they differ most."""
    dx, dy = a.x - b.x, a.y - b.y
    if abs(dx) >= abs(dy):
        return "left of" if dx < 0 else "right of"
    return "above" if dy < 0 else "below"


def _captions(objects: tuple[Shape, ...], rng: np.random.Generator) -> list[str]:
    """Five captions from five different templates, each with its own random object order."""
    n = len(objects)
    usable = [k for k in TEMPLATES if k.endswith(f"/{n}")]
    keys = [usable[i] for i in rng.choice(len(usable), size=CAPTIONS_PER_IMAGE, replace=False)]
    captions = []
    for key in keys:
        order = [objects[i] for i in rng.permutation(n)]
        fields = {"n": COUNT_WORDS[n - 1], "pos": order[0].position}
        for k, obj in enumerate(order, 1):
            fields.update({f"c{k}": obj.colour, f"s{k}": obj.shape, f"z{k}": obj.size})
        if n >= 2:
            fields["rel"] = relation(order[0], order[1])
        captions.append(articles(TEMPLATES[key].format(**fields)))
    return captions


def articles(text: str) -> str:
    """'a orange' -> 'an orange'."""
    return re.sub(r"\ba (?=[aeiou])", "an ", text)


# -- parsing (used by the caption styles) --------------------------------------------------------


def _template_regex(template: str) -> re.Pattern:
    parts = re.split(r"(\{\w+\})", template)
    out = []
    for part in parts:
        if part.startswith("{"):
            name = part[1:-1]
            words = sorted(_WORDS[name.rstrip("123")], key=len, reverse=True)
            out.append(f"(?P<{name}>{'|'.join(map(re.escape, words))})")
        else:
            out.append(re.sub(r"\ba\\ ", r"an?\\ ", re.escape(part)))
    return re.compile("^" + "".join(out) + "$")


_PARSERS = {key: _template_regex(t) for key, t in TEMPLATES.items()}


def parse_caption(caption: str) -> tuple[str, dict[str, str]] | None:
    """-> (template key, fields) for a caption written by a training template, else None."""
    for key, regex in _PARSERS.items():
        match = regex.match(caption)
        if match:
            return key, match.groupdict()
    return None


_ATTRIBUTES = {"c": "colour", "s": "shape", "z": "size"}


def caption_fits(caption: str, scene: Scene) -> bool:
    """Whether the caption generator could have written ``caption`` for ``scene``: the truth of a base caption.

    A caption written by template ``key/n`` names all n objects of its scene (the head's one or two, the tail
    the rest), so it fits a scene of exactly n objects that can be put in an order where every mentioned
    colour, shape and size matches its object, the first object is in the named grid position and stands
    in the named relation to the second, and the count word is n. Objects are matched as a whole (two red
    objects cannot both be the one red circle). Only base captions are read (the templates of
    :data:`TEMPLATES`); a caption no template produced is an error, not a silent False.
    """
    parses = [(key, m.groupdict()) for key, regex in _PARSERS.items() if (m := regex.match(caption))]
    if not parses:
        raise ValueError(f"caption {caption!r} was not written by a shapes template; caption_fits reads base "
                         f"captions only")
    return any(_fields_fit(key, fields, scene.objects) for key, fields in parses)


def _fields_fit(key: str, fields: dict[str, str], objects: tuple[Shape, ...]) -> bool:
    n = int(key.rpartition("/")[2])
    if len(objects) != n or fields.get("n", COUNT_WORDS[n - 1]) != COUNT_WORDS[n - 1]:
        return False
    wanted = [(int(name[1:]) - 1, _ATTRIBUTES[name[0]], value) for name, value in fields.items()
              if name[0] in _ATTRIBUTES and name[1:].isdigit()]
    for order in itertools.permutations(objects):
        if "pos" in fields and order[0].position != fields["pos"]:
            continue
        if "rel" in fields and relation(order[0], order[1]) != fields["rel"]:
            continue
        if all(getattr(order[k], attribute) == value for k, attribute, value in wanted):
            return True
    return False


# -- rendering ---------------------------------------------------------------------------------


def _outline(shape: str, x: float, y: float, r: float) -> list[tuple[float, float]]:
    if shape == "square":
        r *= 0.85
        return [(x - r, y - r), (x + r, y - r), (x + r, y + r), (x - r, y + r)]
    if shape == "diamond":
        return [(x, y - r), (x + r, y), (x, y + r), (x - r, y)]
    if shape == "triangle":
        return [(x, y - r), (x + r * 0.95, y + r * 0.8), (x - r * 0.95, y + r * 0.8)]
    if shape == "star":
        angles = np.pi / 2 + np.arange(10) * np.pi / 5
        radii = np.where(np.arange(10) % 2 == 0, r, r * 0.45)
        return [(x + rr * np.cos(a), y - rr * np.sin(a)) for a, rr in zip(angles, radii)]
    if shape == "cross":
        t = r * 0.35
        arm = [(t, r), (t, t), (r, t)]  # one quarter, rotated four times
        pts = [(px * c - py * s, px * s + py * c) for c, s in ((1, 0), (0, -1), (-1, 0), (0, 1)) for px, py in arm]
        return [(x + px, y + py) for px, py in pts]
    raise ValueError(f"unknown shape {shape!r}")


def render(scene: Scene, size: int = IMAGE_SIZE) -> Image.Image:
    """The ``size`` x ``size`` RGB image of a scene (default: the native resolution)."""
    big = Image.new("RGB", (size * _SCALE, size * _SCALE), scene.background)
    draw = ImageDraw.Draw(big)
    scale = size * _SCALE / CANVAS
    for obj in scene.objects:
        x, y, r = obj.x * scale, obj.y * scale, obj.radius * scale
        if obj.shape == "circle":
            draw.ellipse([x - r, y - r, x + r, y + r], fill=obj.rgb)
        else:
            draw.polygon(_outline(obj.shape, x, y, r), fill=obj.rgb)
    return big.resize((size, size), Image.Resampling.BOX)


def render_index(split: str, index: int) -> Image.Image:
    return render(sample_scene(split, index))


# -- datasets ----------------------------------------------------------------------------------


def parse_arg(arg: str | None) -> tuple[str, int]:
    """``None``/"test" -> ("test", 1000); "train:5000" -> ("train", 5000)."""
    split, _, count = (arg or "test").partition(":")
    if split not in SPLITS:
        raise ValueError(f"shapes split must be one of {sorted(SPLITS)} (optionally ':N'), got {arg!r}")
    total = SPLITS[split][1]
    n = int(count) if count else total
    if not 0 < n <= total:
        raise ValueError(f"shapes:{split} has {total} images; asked for {n}")
    return split, n


def load_shapes(arg: str | None = None, image_root: str | None = None) -> RetrievalDataset:
    """``--data shapes[:train|:val|:test|:test5k][:N]``: the first N images of a split, rendered on demand."""
    split, n = parse_arg(arg)
    scenes = [sample_scene(split, i) for i in range(n)]
    return from_groups(
        # the native size is in the (virtual) path, so gallery caches of another rendering are not reused
        [f"shapes/{split}/{i:06d}@{IMAGE_SIZE}px.png" for i in range(n)],
        [list(s.captions) for s in scenes],
        name="shapes-5k" if split == "test5k" else f"shapes-{split}",
        source=f"shapes:{split}:{n}",
        image_loader=lambda i: render(scenes[i]),
    )


def load_shapes_5k(arg: str | None = None, image_root: str | None = None) -> RetrievalDataset:
    """``--data shapes-5k[:N]``: the COCO-sized test split (5,000 images x 5 captions; 79 i2t batches of 64).

    Same seed as the 1k test split, so its first 1,000 images and captions are ``--data shapes``.
    """
    if arg and not arg.isdigit():
        raise ValueError(f"shapes-5k takes an optional image count (shapes-5k:N), got {arg!r}")
    return load_shapes(f"test5k:{arg}" if arg else "test5k", image_root)
