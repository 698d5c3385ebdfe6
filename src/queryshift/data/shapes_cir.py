"""A synthetic composed-retrieval world (``--data shapes-cir``): (reference scene, modification, target scenes).

Scenes are those of :mod:`queryshift.data.shapes` (1-3 coloured shapes in distinct cells of a 3x3 grid,
rendered by its :func:`~queryshift.data.shapes.render`). What a scene *is*, for the ground truth, is its
symbolic state: the set of (cell, shape, colour, size) of its objects; the pixel-level jitter of a rendering
(background tint, offsets, radius, colour noise) does not count. A modification text changes the reference
state: an object's colour, shape or size, add, remove or move an object, or two attribute edits at once.
Each edit lists *every* state that satisfies it ("add a red circle" leaves the size and the cell open), and a
gallery image is a target of a query exactly when its state is one of them: the ground truth is exact and
many-to-many (several renderings and several valid states per query, one image a target of several queries).

A split is a sequence of episodes, each a pure function of (split seed, episode): a reference rendering, one
or two edits of it (their target renderings, sometimes a second valid target or a second rendering of the
same target) and a near miss (the reference under another edit that does not satisfy the query). The gallery
is every rendering of the split's episodes; the reference itself is excluded from its query's ranking, as in
CIRR (it never satisfies its own edit).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

from .composed import ComposedDataset
from .shapes import CANVAS, COLOURS, POSITIONS, SHAPES, SIZES, Scene, Shape, articles, render

# split -> (seed, number of composed queries); the test split has 1,000 queries like shapes' test split; train is
# large because the combiner memorises small training sets (model card: 12,000 queries) and the frozen embeddings
# are computed once. Episodes are pure functions of (seed, index), so enlarging a split keeps its first N queries
# (and their gallery) identical: shapes-cir:train:60000 is the split before it was enlarged to 120,000.
SPLITS = {"train": (31_250_601, 120_000), "val": (31_250_603, 1_000), "test": (31_250_602, 1_000)}
MAX_OBJECTS = 3  # as in the shapes world the source model was trained on

Obj = tuple[int, str, str, str]  # (cell 0..8, shape, colour, size)
State = tuple[Obj, ...]  # sorted by cell: a canonical key

EDIT_KINDS = ("colour", "shape", "size", "add", "remove", "move", "two")


@dataclass(frozen=True)
class Edit:
    kind: str
    text: str
    targets: tuple[State, ...]  # every state that satisfies the modification, exactly


@dataclass(frozen=True)
class Episode:
    reference: State
    edits: tuple[Edit, ...]
    renders: tuple[State, ...]  # gallery renderings of this episode, the reference first


def canonical(objects) -> State:
    return tuple(sorted(objects))


def random_state(rng: np.random.Generator) -> State:
    count = int(rng.choice([1, 2, 3], p=[0.2, 0.4, 0.4]))
    cells = rng.choice(9, size=count, replace=False)
    return canonical((int(c), str(rng.choice(SHAPES)), str(rng.choice(tuple(COLOURS))), str(rng.choice(tuple(SIZES))))
                     for c in cells)


def refer(state: State, obj: Obj, rng: np.random.Generator) -> str:
    """The shortest unambiguous description of ``obj`` in ``state`` ("the red circle", "the circle", ...)."""
    cell, shape, colour, size = obj

    def unique(match) -> bool:
        return sum(1 for o in state if match(o)) == 1

    if unique(lambda o: o[1] == shape) and rng.random() < 0.25:
        return f"the {shape}"
    if unique(lambda o: o[1] == shape and o[2] == colour):
        return f"the {colour} {shape}"
    if unique(lambda o: o[1:] == obj[1:]):
        return f"the {size} {colour} {shape}"
    return f"the {colour} {shape} in the {POSITIONS[cell]}"


def _replace(state: State, old: Obj, new: Obj | None) -> State:
    return canonical([o for o in state if o != old] + ([new] if new is not None else []))


def _pick(rng: np.random.Generator, options):
    options = list(options)
    return options[int(rng.integers(len(options)))]


def attribute_edit(state: State, obj: Obj, kind: str, rng: np.random.Generator) -> tuple[str, Obj]:
    """(text, edited object) for a colour, shape or size change of ``obj``; the text refers to it in ``state``."""
    cell, shape, colour, size = obj
    ref = refer(state, obj, rng)
    if kind == "colour":
        new = _pick(rng, [c for c in COLOURS if c != colour])
        text = _pick(rng, ["make {r} {v}", "change {r} to {v}", "paint {r} {v}"]).format(r=ref, v=new)
        return text, (cell, shape, new, size)
    if kind == "shape":
        new = _pick(rng, [s for s in SHAPES if s != shape])
        text = _pick(rng, ["turn {r} into a {v}", "replace {r} with a {c} {v}"]).format(r=ref, v=new, c=colour)
        return articles(text), (cell, new, colour, size)
    if kind == "size":
        new = "large" if size == "small" else "small"
        word = "larger" if new == "large" else "smaller"
        verb = "enlarge" if new == "large" else "shrink"
        text = _pick(rng, ["make {r} {w}", "{v} {r}"]).format(r=ref, w=word, v=verb)
        return text, (cell, shape, colour, new)
    raise ValueError(f"not an attribute edit: {kind!r}")


def possible_kinds(state: State) -> list[str]:
    kinds = ["colour", "shape", "size"]
    if len(state) < MAX_OBJECTS:
        kinds.append("add")
    if len(state) > 1:
        kinds += ["remove", "two"]
    if len(state) < 9:
        kinds.append("move")
    return kinds


def make_edit(state: State, kind: str, rng: np.random.Generator) -> Edit:
    """One modification of ``state`` of the given kind, with every state that satisfies it."""
    used = {o[0] for o in state}
    empty = [c for c in range(9) if c not in used]
    if kind in ("colour", "shape", "size"):
        obj = _pick(rng, state)
        text, new = attribute_edit(state, obj, kind, rng)
        return Edit(kind, text, (_replace(state, obj, new),))
    if kind == "two":
        a, b = (state[i] for i in rng.choice(len(state), size=2, replace=False))
        text_a, new_a = attribute_edit(state, a, _pick(rng, ("colour", "shape", "size")), rng)
        text_b, new_b = attribute_edit(state, b, _pick(rng, ("colour", "shape", "size")), rng)
        return Edit(kind, f"{text_a} and {text_b}", (_replace(_replace(state, a, new_a), b, new_b),))
    if kind == "add":
        shape, colour = _pick(rng, SHAPES), _pick(rng, tuple(COLOURS))
        if rng.random() < 0.5:  # loose: any size, any free cell satisfies it
            targets = tuple(canonical(state + ((c, shape, colour, z),)) for c in empty for z in SIZES)
            return Edit(kind, articles(f"add a {colour} {shape}"), targets)
        cell, size = _pick(rng, empty), _pick(rng, tuple(SIZES))
        text = articles(f"add a {size} {colour} {shape} in the {POSITIONS[cell]}")
        return Edit(kind, text, (canonical(state + ((cell, shape, colour, size),)),))
    if kind == "remove":
        obj = _pick(rng, state)
        text = _pick(rng, ["remove {r}", "take away {r}"]).format(r=refer(state, obj, rng))
        return Edit(kind, text, (_replace(state, obj, None),))
    if kind == "move":
        obj, cell = _pick(rng, state), _pick(rng, empty)
        text = f"move {refer(state, obj, rng)} to the {POSITIONS[cell]}"
        return Edit(kind, text, (_replace(state, obj, (cell, *obj[1:])),))
    raise ValueError(f"unknown edit kind {kind!r}; expected one of {EDIT_KINDS}")


def sample_edit(state: State, rng: np.random.Generator) -> Edit:
    return make_edit(state, _pick(rng, possible_kinds(state)), rng)


def episode(split: str, index: int) -> Episode:
    """Episode ``index`` of ``split``: independent of every other episode."""
    rng = np.random.default_rng([SPLITS[split][0], index])
    ref = random_state(rng)
    renders = [ref]
    edits = []
    for _ in range(2 if rng.random() < 0.2 else 1):  # sometimes two queries share the reference
        edit = sample_edit(ref, rng)
        edits.append(edit)
        intended = _pick(rng, edit.targets)
        renders.append(intended)
        others = [t for t in edit.targets if t != intended]
        if others and rng.random() < 0.5:
            renders.append(_pick(rng, others))  # a second, different state that also satisfies the query
        elif rng.random() < 0.3:
            renders.append(intended)  # a second rendering of the same state
        miss = sample_edit(ref, rng)
        near = _pick(rng, miss.targets)
        if near not in edit.targets and rng.random() < 0.7:
            renders.append(near)  # a hard negative: one edit away from the reference, the wrong one
    return Episode(ref, tuple(edits), tuple(renders))


def realise(state: State, rng: np.random.Generator) -> Scene:
    """A concrete scene of ``state``: the shapes world's background tint, offsets, radius and colour noise."""
    grey = rng.uniform(205, 240)
    background = tuple(int(np.clip(grey + rng.uniform(-12, 12), 0, 255)) for _ in range(3))
    cell_px = CANVAS / 3  # scene coordinates are canvas pixels; render() scales them to the native size
    objects = []
    for cell, shape, colour, size in state:
        radius = float(rng.uniform(*SIZES[size]))
        row, col = divmod(cell, 3)
        x = float(np.clip((col + 0.5) * cell_px + rng.uniform(-2.5, 2.5), radius + 1, CANVAS - radius - 1))
        y = float(np.clip((row + 0.5) * cell_px + rng.uniform(-2.5, 2.5), radius + 1, CANVAS - radius - 1))
        rgb = tuple(int(np.clip(v + rng.integers(-15, 16), 0, 255)) for v in COLOURS[colour])
        objects.append(Shape(shape, colour, size, cell, x, y, radius, rgb))
    return Scene(background, tuple(objects), (describe(state),))


def describe(state: State) -> str:
    return articles(" and ".join(f"a {z} {c} {s} in the {POSITIONS[cell]}" for cell, s, c, z in state))


@dataclass(frozen=True)
class World:
    """A split's composed queries: gallery states and their render keys, queries and exact targets."""

    split: str
    states: tuple[State, ...]  # gallery image i shows states[i]
    render_keys: tuple[tuple[int, int], ...]  # (episode, rendering) -> the rendering's random stream
    references: tuple[int, ...]
    texts: tuple[str, ...]
    kinds: tuple[str, ...]
    targets: tuple[tuple[int, ...], ...]

    def scene(self, i: int) -> Scene:
        episode_index, k = self.render_keys[i]
        return realise(self.states[i], np.random.default_rng([SPLITS[self.split][0], episode_index, 1 + k]))

    def image(self, i: int):
        return render(self.scene(i))


@functools.lru_cache(maxsize=8)
def build_world(split: str, n_queries: int) -> World:
    """The first ``n_queries`` composed queries of ``split`` and the gallery of their episodes."""
    states, keys, refs, texts, kinds, allowed = [], [], [], [], [], []
    e = 0
    while len(texts) < n_queries:
        ep = episode(split, e)
        ref_index = len(states)
        for k, state in enumerate(ep.renders):
            states.append(state)
            keys.append((e, k))
        for edit in ep.edits[: n_queries - len(texts)]:
            refs.append(ref_index)
            texts.append(edit.text)
            kinds.append(edit.kind)
            allowed.append(edit.targets)
        e += 1
    by_state: dict[State, list[int]] = {}
    for i, s in enumerate(states):
        by_state.setdefault(s, []).append(i)
    targets = tuple(tuple(sorted(i for s in ok for i in by_state.get(s, ()))) for ok in allowed)
    return World(split, tuple(states), tuple(keys), tuple(refs), tuple(texts), tuple(kinds), targets)


def parse_arg(arg: str | None) -> tuple[str, int]:
    """``None``/"test" -> ("test", 1000); "train:5000" -> ("train", 5000)."""
    split, _, count = (arg or "test").partition(":")
    if split not in SPLITS:
        raise ValueError(f"shapes-cir split must be one of {sorted(SPLITS)} (optionally ':N'), got {arg!r}")
    total = SPLITS[split][1]
    try:
        n = int(count) if count else total
    except ValueError:
        raise ValueError(f"shapes-cir:{split}: the query count must be an integer, got {count!r}") from None
    if not 0 < n <= total:
        raise ValueError(f"shapes-cir:{split} has {total} composed queries; asked for {n}")
    return split, n


def load_shapes_cir(arg: str | None = None, image_root: str | None = None) -> ComposedDataset:
    """``--data shapes-cir[:train|:val|:test][:N]``: the first N composed queries of a split, rendered on demand."""
    split, n = parse_arg(arg)
    world = build_world(split, n)
    return ComposedDataset(
        images=[f"shapes-cir/{split}/{i:06d}.png" for i in range(len(world.states))],
        references=list(world.references),
        modifications=list(world.texts),
        targets=[list(t) for t in world.targets],
        exclude=[[r] for r in world.references],
        name=f"shapes-cir-{split}",
        source=f"shapes-cir:{split}:{n}",
        image_loader=world.image,
    )
