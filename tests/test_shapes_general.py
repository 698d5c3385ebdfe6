"""The general corpus of the shapes world (``queryshift.shifts.shapes_general``)."""

import numpy as np
import torch

from queryshift.data.shapes import render, sample_scene
from queryshift.models.base import square_transform
from queryshift.shifts.shapes_general import (
    MODEL_INPUT,
    PHOTO_VARIATION,
    caption_variant,
    general_image,
    model_input,
    photo_variation,
    render_views,
    typos,
)


def test_views_are_deterministic_and_independent_of_chunking():
    whole, caps = render_views("train", 0, 6, 2, True)
    a, caps_a = render_views("train", 0, 3, 2, True)
    b, caps_b = render_views("train", 3, 6, 2, True)
    assert whole.shape == (6, 2, MODEL_INPUT, MODEL_INPUT, 3) and whole.dtype == np.uint8
    assert np.array_equal(whole, np.concatenate([a, b])) and caps == caps_a + caps_b
    assert not np.array_equal(whole[:, 0], whole[:, 1])  # two views of an image differ
    other_seed, _ = render_views("train", 0, 6, 2, True, seed=1)
    assert not np.array_equal(whole, other_seed)


def test_clean_views_are_what_the_backbone_transform_feeds_the_model():
    pixels, captions = render_views("train", 0, 4, 1, False)
    transform, _ = square_transform(MODEL_INPUT, mean=(0, 0, 0), std=(1, 1, 1))
    for i in range(4):
        expected = (transform(render(sample_scene("train", i))) * 255).round().to(torch.uint8)
        assert torch.equal(torch.from_numpy(pixels[i, 0]).permute(2, 0, 1), expected)
        assert captions[i] == list(sample_scene("train", i).captions)


def test_general_captions_are_the_base_captions_plus_rewordings():
    _, captions = render_views("train", 0, 30, 1, True)
    rewritten = 0
    for i, caps in enumerate(captions):
        base = list(sample_scene("train", i).captions)
        assert len(caps) == 10 and caps[:5] == base
        rewritten += sum(v != b for v, b in zip(caps[5:], base))
    assert rewritten > 0.6 * 150  # most variants differ from their base caption


def test_typos_edit_about_the_given_share_of_words():
    rng = np.random.default_rng(0)
    text = " ".join(["circle"] * 2000)
    edited = typos(text, rng, rate=0.05).split()
    share = np.mean([w != "circle" for w in edited])
    assert 0.03 < share < 0.07
    assert typos(text, rng, rate=0.0) == text


def test_photo_variation_is_mild():
    """Every variation is weaker than severity 1 of the closest test corruption (module table)."""
    assert PHOTO_VARIATION["noise"][1][1] < 0.08 and PHOTO_VARIATION["contrast"][1][0] > 0.4
    assert PHOTO_VARIATION["jpeg"][1][0] > 25
    scene = sample_scene("train", 5)
    clean = np.asarray(render(scene), float)
    diffs = [np.abs(np.asarray(photo_variation(render(scene), np.random.default_rng(s)), float) - clean).mean()
             for s in range(20)]
    assert max(diffs) < 40 and np.mean(diffs) > 1


def test_general_images_mix_styles_and_variation():
    scene = sample_scene("train", 2)
    clean = np.asarray(render(scene))
    views = [np.asarray(general_image(scene, np.random.default_rng(s))) for s in range(40)]
    assert all(v.shape == clean.shape for v in views)
    dark = sum(v[:8, :8].mean() < 80 for v in views)  # style:dark, sometimes
    assert 0 < dark < 20
    assert sum(np.array_equal(v, clean) for v in views) < 20


def test_caption_variant_keeps_the_caption_when_nothing_fires():
    class Never:
        def random(self):
            return 1.0

    assert caption_variant("a red circle", Never()) == "a red circle"
    assert model_input(render(sample_scene("train", 0))).shape == (MODEL_INPUT, MODEL_INPUT, 3)
