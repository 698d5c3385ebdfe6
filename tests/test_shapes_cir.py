"""The synthetic composed-retrieval world: exact many-to-many ground truth, determinism, bad input."""

from __future__ import annotations

import itertools
import re

import numpy as np
import pytest

from queryshift.data import ComposedDataset, DataError, load_dataset
from queryshift.data.shapes import COLOURS, IMAGE_SIZE, POSITIONS, SHAPES, SIZES
from queryshift.data.shapes_cir import build_world, load_shapes_cir

_C = "|".join(COLOURS)
_S = "|".join(SHAPES)
_Z = "|".join(SIZES)
_P = "|".join(sorted(POSITIONS, key=len, reverse=True))
_REF = rf"the (?:(?P<{{p}}z>{_Z}) )?(?:(?P<{{p}}c>{_C}) )?(?P<{{p}}s>{_S})(?: in the (?P<{{p}}pos>{_P}))?"


def _ref(p: str) -> str:
    return _REF.format(p=p)


# One regex per clause form, written from the texts a user reads (independent of the generator's code).
CLAUSES = [
    ("colour", re.compile(rf"^(?:make|paint) {_ref('a')} (?P<colour>{_C})$")),
    ("colour", re.compile(rf"^change {_ref('a')} to (?P<colour>{_C})$")),
    ("shape", re.compile(rf"^turn {_ref('a')} into an? (?P<shape>{_S})$")),
    ("shape", re.compile(rf"^replace {_ref('a')} with an? (?P<keep>{_C}) (?P<shape>{_S})$")),
    ("size", re.compile(rf"^make {_ref('a')} (?P<word>larger|smaller)$")),
    ("size", re.compile(rf"^(?P<word>enlarge|shrink) {_ref('a')}$")),
    ("add", re.compile(rf"^add an? (?:(?P<size>{_Z}) )?(?P<colour>{_C}) (?P<shape>{_S})(?: in the (?P<pos>{_P}))?$")),
    ("remove", re.compile(rf"^(?:remove|take away) {_ref('a')}$")),
    ("move", re.compile(rf"^move {_ref('a')} to the (?P<pos>{_P})$")),
]


def _resolve(state, m) -> tuple:
    """The one object of ``state`` a referring expression names (it must be unambiguous)."""
    found = [o for o in state
             if o[1] == m["as"] and (m["ac"] is None or o[2] == m["ac"]) and (m["az"] is None or o[3] == m["az"])
             and (m["apos"] is None or POSITIONS[o[0]] == m["apos"])]
    assert len(found) == 1, (state, m.groupdict())
    return found[0]


def _outcomes(state, clause: str) -> set:
    """Every state that satisfies one clause applied to ``state`` (as a frozenset of objects)."""
    for kind, regex in CLAUSES:
        m = regex.match(clause)
        if not m:
            continue
        rest = set(state)
        if kind == "add":
            cells = [POSITIONS.index(m["pos"])] if m["pos"] else [c for c in range(9) if c not in {o[0] for o in state}]
            sizes = [m["size"]] if m["size"] else list(SIZES)
            return {frozenset(rest | {(c, m["shape"], m["colour"], z)}) for c in cells for z in sizes}
        obj = _resolve(state, m)
        rest.discard(obj)
        cell, shape, colour, size = obj
        if kind == "colour":
            new = (cell, shape, m["colour"], size)
        elif kind == "shape":
            assert m.groupdict().get("keep") in (None, colour)
            new = (cell, m["shape"], colour, size)
        elif kind == "size":
            new = (cell, shape, colour, "large" if m["word"] in ("larger", "enlarge") else "small")
        elif kind == "move":
            new = (POSITIONS.index(m["pos"]), shape, colour, size)
        else:  # remove
            return {frozenset(rest)}
        return {frozenset(rest | {new})}
    raise AssertionError(f"unparsed modification clause {clause!r}")


def _satisfying(state, text: str) -> set:
    """Two clauses ("X and Y") edit two different objects of the reference, so they compose independently."""
    clauses = text.split(" and ")
    if len(clauses) == 1:
        return _outcomes(state, text)
    (a,), (b,) = _outcomes(state, clauses[0]), _outcomes(state, clauses[1])
    removed_a, removed_b = set(state) - a, set(state) - b
    return {frozenset((set(state) - removed_a - removed_b) | (a - set(state)) | (b - set(state)))}


def test_targets_are_exactly_the_gallery_images_that_satisfy_the_text():
    world = build_world("test", 200)
    gallery = [frozenset(s) for s in world.states]
    for q, text in enumerate(world.texts):
        reference = world.states[world.references[q]]
        ok = _satisfying(reference, text)
        expected = tuple(i for i, s in enumerate(gallery) if s in ok)
        assert world.targets[q] == expected, (q, text)
        assert world.references[q] not in world.targets[q]


def test_ground_truth_is_many_to_many_and_covers_every_edit_kind():
    world = build_world("test", 1000)
    assert max(len(t) for t in world.targets) >= 3  # several gallery scenes satisfy some queries
    per_image = {}
    for q, targets in enumerate(world.targets):
        for i in targets:
            per_image.setdefault(i, []).append(q)
    assert any(len(qs) > 1 for qs in per_image.values())  # some images satisfy several queries
    assert set(world.kinds) == {"colour", "shape", "size", "add", "remove", "move", "two"}
    assert len(set(world.references)) < len(world.references)  # some references carry two queries
    loose = [q for q, t in enumerate(world.texts) if re.fullmatch(rf"add an? ({_C}) ({_S})", t)]
    assert loose and any(len(world.targets[q]) > 1 for q in loose)


def test_a_split_prefix_is_the_same_queries_and_renders_identically():
    small, full = load_shapes_cir("test:30"), load_shapes_cir("test")
    assert small.texts == full.texts[:30]
    assert small.references == full.references[:30]
    for q in (0, 7, 29):
        r = small.references[q]
        assert np.array_equal(np.asarray(small.load_reference(q)), np.asarray(full.load_image(r)))
    assert isinstance(load_dataset("shapes-cir:val:10"), ComposedDataset)


def test_renderings_of_one_state_differ_in_pixels_only():
    world = build_world("test", 300)
    seen = {}
    for i, s in enumerate(world.states):
        seen.setdefault(s, []).append(i)
    i, j = next(v for v in seen.values() if len(v) > 1)[:2]
    a, b = np.asarray(world.image(i), dtype=float), np.asarray(world.image(j), dtype=float)
    assert a.shape == (IMAGE_SIZE, IMAGE_SIZE, 3)
    assert np.abs(a - b).mean() > 1  # a different background tint and jitter
    assert [o.shape for o in world.scene(i).objects] == [o.shape for o in world.scene(j).objects]


def test_c2i_query_items_and_the_cirr_style_exclusion():
    data = load_shapes_cir("test:20")
    modality, n, relevance = data.query_items("c2i")
    assert (modality, n) == ("composed", 20)
    assert relevance == data.targets
    assert data.exclude == [[r] for r in data.references]
    assert data.query_items("t2i")[2] == data.targets  # the text-only baseline runs on the same data


def test_bad_composed_queries_are_named():
    with pytest.raises(DataError, match="composed query 1 .*empty modification text"):
        ComposedDataset(["a.png", "b.png"], [0, 1], ["make it red", "  "], [[1], [0]], name="toy")
    with pytest.raises(DataError, match="composed query 0 has no reference image"):
        ComposedDataset(["a.png"], [3], ["make it red"], [[0]], name="toy")
    with pytest.raises(DataError, match="composed query 0 .*no target"):
        ComposedDataset(["a.png", "b.png"], [0], ["make it red"], [[]], name="toy")
    with pytest.raises(ValueError, match="shapes-cir split"):
        load_shapes_cir("dev")
    with pytest.raises(ValueError, match="has 1000 composed queries"):
        load_shapes_cir("test:5000")


def test_missing_reference_file_names_the_query(tmp_path):
    data = ComposedDataset(["missing.png", "b.png"], [0], ["make it red"], [[1]], image_root=str(tmp_path),
                           name="toy")
    with pytest.raises(DataError, match="composed query 0: reference image 'missing.png'"):
        data.load_reference(0)


def test_every_clause_form_is_generated():
    world = build_world("test", 1000)
    forms = {i for text in world.texts for clause in text.split(" and ")
             for i, (_, regex) in enumerate(CLAUSES) if regex.match(clause)}
    assert forms == set(range(len(CLAUSES)))
    assert not list(itertools.islice((t for t in world.texts if "  " in t), 1))


def test_scenes_are_laid_out_on_the_shapes_worlds_canvas():
    """Composed scenes use the shapes world's coordinates: every object inside the canvas, in its cell, so a
    rendering shows it (a layout in native pixels put most objects off the image)."""
    from queryshift.data.shapes import CANVAS

    world = build_world("test", 200)
    for i in range(len(world.states)):
        for o in world.scene(i).objects:
            assert o.radius <= o.x <= CANVAS - o.radius and o.radius <= o.y <= CANVAS - o.radius, (i, o)
            row, col = divmod(o.cell, 3)
            assert abs(o.x - (col + 0.5) * CANVAS / 3) <= 5 and abs(o.y - (row + 0.5) * CANVAS / 3) <= 5, (i, o)
