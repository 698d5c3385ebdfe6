"""The synthetic shapes world and its domain styles."""

import re

import numpy as np
import pytest
from PIL import Image

from queryshift.data import DATASETS
from queryshift.data.shapes import (
    CAPTIONS_PER_IMAGE,
    COLOURS,
    IMAGE_SIZE,
    SHAPES,
    TEMPLATES,
    load_shapes,
    parse_caption,
    relation,
    render,
    sample_scene,
)
from queryshift.shifts import item_rng
from queryshift.shifts.domain import DOMAIN_SHIFTS, SYNONYMS


def _pixels(dataset, i):
    return np.asarray(dataset.load_image(i))


def test_test_split_has_flickr_shape():
    ds = load_shapes(None)
    assert ds.name == "shapes-test"
    assert (len(ds.images), len(ds.texts)) == (1000, 5000)
    assert all(len(t) == CAPTIONS_PER_IMAGE for t in ds.img2txt)
    assert all(ds.txt2img[t] == [i] for i, ts in enumerate(ds.img2txt) for t in ts)
    assert ds.load_image(0).size == (IMAGE_SIZE, IMAGE_SIZE) and ds.load_image(0).mode == "RGB"
    assert IMAGE_SIZE >= 2 * 64  # native resolution: at least twice the models' input


def test_shapes_5k_is_coco_sized_and_extends_the_1k_split():
    big = DATASETS["shapes-5k"](None)
    assert big.name == "shapes-5k" and (len(big.images), len(big.texts)) == (5000, 25000)
    assert -(-len(big.images) // 64) == 79 and -(-len(big.texts) // 64) == 391  # COCO-C's stream lengths
    small = load_shapes("test:40")
    assert big.texts[:200] == small.texts
    assert np.array_equal(_pixels(big, 39), _pixels(small, 39))
    assert len(DATASETS["shapes-5k"]("12").images) == 12
    with pytest.raises(ValueError, match="shapes-5k"):
        DATASETS["shapes-5k"]("test")
    assert f"@{IMAGE_SIZE}px" in big.images[0]  # another rendering gets another gallery cache key


def test_render_scales_the_scene_not_the_layout():
    scene = sample_scene("test", 3)
    small, native = np.asarray(render(scene, 64)), np.asarray(render(scene))
    downsized = np.asarray(render(scene).resize((64, 64), Image.Resampling.BOX))
    assert native.shape == (IMAGE_SIZE, IMAGE_SIZE, 3)
    assert np.abs(downsized.astype(int) - small.astype(int)).mean() < 3


def test_registered_and_subsets_match_the_full_split():
    small = DATASETS["shapes"]("test:30")
    full = load_shapes("test")
    assert len(small.images) == 30 and small.texts == full.texts[:150]
    assert np.array_equal(_pixels(small, 29), _pixels(full, 29))
    with pytest.raises(ValueError):
        load_shapes("valid")
    with pytest.raises(ValueError):
        load_shapes("test:1001")


def test_deterministic():
    a, b = load_shapes("test:20"), load_shapes("test:20")
    assert a.texts == b.texts and a.fingerprint() == b.fingerprint()
    assert all(np.array_equal(_pixels(a, i), _pixels(b, i)) for i in range(20))


def test_train_and_test_differ():
    test = [sample_scene("test", i) for i in range(200)]
    train = [sample_scene("train", i) for i in range(200)]
    assert not {s.objects for s in test} & {s.objects for s in train}
    assert len(load_shapes("train:5").images) == 5


def test_captions_use_distinct_templates_and_are_true():
    for i in range(300):
        scene = sample_scene("test", i)
        parsed = [parse_caption(c) for c in scene.captions]
        assert all(p is not None for p in parsed), scene.captions
        assert len({key for key, _ in parsed}) == CAPTIONS_PER_IMAGE
        n = len(scene.objects)
        described = {(o.colour, o.shape) for o in scene.objects}
        for key, fields in parsed:
            assert key.endswith(f"/{n}")
            for k in range(2, n + 1):  # every object is named, the first one maybe only partly
                assert (fields[f"c{k}"], fields[f"s{k}"]) in described
            if "c1" in fields and "s1" in fields:
                assert (fields["c1"], fields["s1"]) in described
            if "pos" in fields:
                assert fields["pos"] in {o.position for o in scene.objects}
            if "rel" in fields:
                assert any(relation(a, b) == fields["rel"] for a in scene.objects for b in scene.objects if a != b)
            if "n" in fields:
                assert fields["n"] == ("one", "two", "three")[n - 1]


def test_every_template_occurs_and_some_captions_are_shared():
    ds = load_shapes("test")
    assert {parse_caption(t)[0] for t in ds.texts} == set(TEMPLATES)
    assert len(set(ds.texts)) < len(ds.texts)  # partial captions fit several images


@pytest.mark.parametrize("name", ["style:outline", "style:dark", "style:texture", "style:sketch"])
def test_image_styles_change_the_image_deterministically(name):
    ds = load_shapes("test:10")
    style = DOMAIN_SHIFTS[name]("image", 0)
    assert style.modality == "image" and style.name == name
    changed = 0
    for i in range(10):
        clean = ds.load_image(i)
        a = style(clean, i, i, 10, item_rng(0, i))
        b = style(ds.load_image(i), i, i, 10, item_rng(0, i))
        assert a.size == clean.size and a.mode == "RGB"
        assert np.array_equal(np.asarray(a), np.asarray(b))
        changed += not np.array_equal(np.asarray(a), np.asarray(clean))
    assert changed >= 8  # an outline of a shape thinner than the contour is the shape itself
    with pytest.raises(ValueError, match="image style"):
        DOMAIN_SHIFTS[name]("text", 0)


@pytest.mark.parametrize("name", ["style:synonyms", "style:templates"])
def test_caption_styles_rewrite_deterministically(name):
    ds = load_shapes("test:40")
    style = DOMAIN_SHIFTS[name]("text", 0)
    for t, text in enumerate(ds.texts):
        a = style(text, t, t, len(ds.texts), item_rng(0, t))
        assert a == style(text, t, t, len(ds.texts), item_rng(0, t))
        assert a != text and a.strip()
    assert style("an unparseable caption", 0, 0, 1, item_rng(0, 0)) == "an unparseable caption"
    with pytest.raises(ValueError, match="text style"):
        DOMAIN_SHIFTS[name]("image", 0)


def test_synonyms_never_occur_in_training_captions():
    train_words = {w for i in range(2000) for c in sample_scene("train", i).captions for w in c.split()}
    synonym_words = {w for choices in SYNONYMS.values() for s in choices for w in s.split()} - {"to", "the", "of"}
    assert not train_words & synonym_words
    style = DOMAIN_SHIFTS["style:synonyms"]("text", 0)
    for t, text in enumerate(load_shapes("test:50").texts):
        words = set(re.findall(r"\w+", style(text, t, t, 1, item_rng(0, t))))
        assert not words & (set(SHAPES) | set(COLOURS))


def test_chatty_wraps_the_caption_in_filler():
    style = DOMAIN_SHIFTS["style:chatty"]("text", 0)
    texts = load_shapes("test:20").texts
    out = [style(t, i, i, len(texts), item_rng(0, i)) for i, t in enumerate(texts)]
    assert all(t in o and o != t for t, o in zip(texts, out))
    assert out == [style(t, i, i, len(texts), item_rng(0, i)) for i, t in enumerate(texts)]
    with pytest.raises(ValueError, match="text style"):
        DOMAIN_SHIFTS["style:chatty"]("image", 0)
