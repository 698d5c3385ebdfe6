"""Temporal and diverse streams: segment boundaries, block interleaving, modality checks, registry hooks."""

import os
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from queryshift.shifts import build, item_rng
from queryshift.shifts.registry import IMAGE_CORRUPTIONS, TEXT_CORRUPTIONS, build_shift, list_shifts
from queryshift.shifts.streams import DEFAULT_TEMPORAL, DiverseStream, TemporalStream

HAS_WORDNET = os.path.exists("/usr/share/wordnet/index.noun")


def test_temporal_default_segments_are_equal_and_ordered():
    stream = build_shift("stream:temporal", "image", seed=0)
    assert isinstance(stream, TemporalStream) and stream.name == "stream:temporal"
    names = DEFAULT_TEMPORAL["image"]
    total = 100 * len(names)
    assert names[0] == "clean"
    for k, name in enumerate(names):
        assert stream.segment(100 * k, total) == name
        assert stream.segment(100 * k + 99, total) == name
    segments = Counter(stream.segment(p, 1003) for p in range(1003))
    assert set(segments) == set(names) and max(segments.values()) - min(segments.values()) <= 1


def test_custom_temporal_stream_applies_the_shift_in_force():
    stream = build("stream:temporal=clean,gaussian_noise:5", "image", seed=0)
    assert [stream.segment(p, 10) for p in range(10)] == ["clean"] * 5 + ["gaussian_noise:5"] * 5
    img = Image.fromarray(np.full((64, 64, 3), 128, np.uint8))
    assert np.array_equal(np.asarray(stream(img, 0, 4, 10, item_rng(0, 0))), np.asarray(img))
    assert not np.array_equal(np.asarray(stream(img, 0, 5, 10, item_rng(0, 0))), np.asarray(img))


def test_diverse_stream_interleaves_blocks_and_is_balanced():
    stream = build_shift("stream:diverse=gaussian_noise:5,fog:5,contrast:5", "image", seed=3)
    assert isinstance(stream, DiverseStream) and stream.block == 64
    per_block = [stream.segment(b * 64, 10**6) for b in range(30)]
    for b in range(30):  # one shift per block
        assert {stream.segment(b * 64 + i, 10**6) for i in range(64)} == {per_block[b]}
    for cycle in range(10):  # every cycle visits each shift once
        assert sorted(per_block[3 * cycle:3 * cycle + 3]) == ["contrast:5", "fog:5", "gaussian_noise:5"]
    assert len(set(per_block[0::3])) > 1  # ... in an order that changes from cycle to cycle
    again = build_shift("stream:diverse=gaussian_noise:5,fog:5,contrast:5", "image", seed=3)
    assert [again.segment(b * 64, 10**6) for b in range(30)] == per_block
    other = build_shift("stream:diverse=gaussian_noise:5,fog:5,contrast:5", "image", seed=4)
    assert [other.segment(b * 64, 10**6) for b in range(30)] != per_block


def test_diverse_block_size_option():
    stream = build_shift("stream:diverse@1=gaussian_noise:5,fog:5", "image")
    assert stream.block == 1
    assert {stream.segment(0, 4), stream.segment(1, 4)} == {"gaussian_noise:5", "fog:5"}
    assert build_shift("stream:diverse", "image").segment(0, 10) in IMAGE_CORRUPTIONS_AT_5


IMAGE_CORRUPTIONS_AT_5 = {f"{n}:5" for n in IMAGE_CORRUPTIONS}


@pytest.mark.skipif(not HAS_WORDNET, reason="the default text streams use sr (WordNet)")
def test_text_streams():
    stream = build_shift("stream:temporal", "text", seed=0)
    assert stream.modality == "text" and stream.segment(0, 60) == "clean"
    caption = "a dog runs across the green field"
    assert stream(caption, 0, 0, 60, item_rng(0, 0)) == caption
    assert stream(caption, 0, 59, 60, item_rng(0, 0)) != caption
    diverse = build_shift("stream:diverse", "text", seed=0)
    assert diverse.segment(0, 100).split(":")[0] in TEXT_CORRUPTIONS


def test_stream_errors():
    with pytest.raises(ValueError, match=r"'sr'.*image"):
        build_shift("stream:temporal=clean,sr:6", "image")
    with pytest.raises(ValueError, match=r"gaussian_noise.*text"):
        build_shift("stream:diverse=gaussian_noise:5", "text")
    with pytest.raises(ValueError, match="nested"):
        build_shift("stream:temporal=stream:diverse", "image")
    with pytest.raises(ValueError, match="stream:temporal or stream:diverse"):
        build_shift("stream:sideways", "image")
    with pytest.raises(ValueError, match="block"):
        build_shift("stream:diverse@x=fog:5", "image")
    with pytest.raises(ValueError, match="diverse streams only"):
        build_shift("stream:temporal@8=fog:5", "image")


def test_list_shifts_and_domain_hook():
    image, text = list_shifts("image"), list_shifts("text")
    assert set(IMAGE_CORRUPTIONS) <= set(image) and set(TEXT_CORRUPTIONS) <= set(text)
    assert "stream:temporal" in image and "stream:diverse" in text
    assert not set(IMAGE_CORRUPTIONS) & set(text)
    with pytest.raises(ValueError, match="query modality"):
        list_shifts("audio")
    try:
        from queryshift.shifts.domain import DOMAIN_SHIFTS
    except ImportError:
        pytest.skip("shifts.domain not available")
    image_styles = [n for n in DOMAIN_SHIFTS if n in image]
    assert image_styles and not set(image_styles) & set(text)
    style = build_shift(image_styles[0], "image", seed=0)
    assert style.modality == "image"
    with pytest.raises(ValueError):
        build_shift(image_styles[0], "text")
    mixed = build_shift(f"stream:diverse@1={image_styles[0]},fog:5", "image")
    assert {mixed.segment(0, 2), mixed.segment(1, 2)} == {image_styles[0], "fog:5"}


def test_unknown_names_list_the_valid_ones():
    with pytest.raises(ValueError, match=r"unknown shift.*gaussian_noise.*stream:temporal"):
        build_shift("gausian_noise:5", "image")
    assert build("clean", "text").name == "clean"
