"""Temporal and diverse streams: segment boundaries, block interleaving, modality checks, registry hooks."""

import json
import os
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from queryshift.shifts import build, item_rng
from queryshift.shifts.registry import IMAGE_CORRUPTIONS, TEXT_CORRUPTIONS, build_shift, list_shifts
from queryshift.shifts.streams import (
    CONTINUAL_IMAGE_ORDER,
    DEFAULT_TEMPORAL,
    ContinualDiverseStream,
    ContinualStream,
    DiverseStream,
    TemporalStream,
)

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
    with pytest.raises(ValueError, match="stream:temporal, stream:diverse, stream:continual"):
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
    audio = list_shifts("audio")  # READ's corruptions and the everyday ones; no image or text corruption
    assert {"gaussian_noise", "traffic", "crowd", "rain", "thunder", "wind", "codec"} <= set(audio)
    assert not (set(IMAGE_CORRUPTIONS) - {"gaussian_noise"}) & set(audio) and not set(TEXT_CORRUPTIONS) & set(audio)
    with pytest.raises(ValueError, match="query modality"):
        list_shifts("smell")
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


def test_continual_stream_is_one_pass_per_shift_in_order():
    stream = build_shift("stream:continual=gaussian_noise:5,fog:5,gaussian_noise:5", "image", seed=0)
    assert isinstance(stream, ContinualStream) and stream.passes == 3
    n = 7  # queries per pass: the engine streams 3 * 7 positions
    names = [stream.segment(p, 3 * n) for p in range(3 * n)]
    # a repeated shift is its own segment, so a return to an earlier condition is reported apart
    assert names == ["gaussian_noise:5"] * n + ["fog:5"] * n + ["gaussian_noise:5#2"] * n
    img = Image.fromarray(np.full((32, 32, 3), 128, np.uint8))
    fogged = stream(img, 0, n, 3 * n, item_rng(0, 0))
    assert np.array_equal(np.asarray(fogged), np.asarray(build("fog:5", "image")(img, 0, 0, 1, item_rng(0, 0))))


def test_continual_defaults_follow_the_continual_tta_order():
    sev5, sev3 = build_shift("stream:continual", "image"), build_shift("stream:continual-s3", "image")
    assert [s.name for s in sev5.shifts] == [f"{c}:5" for c in CONTINUAL_IMAGE_ORDER]
    assert [s.name for s in sev3.shifts] == [f"{c}:3" for c in CONTINUAL_IMAGE_ORDER]
    assert CONTINUAL_IMAGE_ORDER[:3] == ("gaussian_noise", "shot_noise", "impulse_noise")
    assert CONTINUAL_IMAGE_ORDER[-1] == "speckle_noise" and len(set(CONTINUAL_IMAGE_ORDER)) == 16
    assert set(CONTINUAL_IMAGE_ORDER) == set(IMAGE_CORRUPTIONS)
    assert sev5.passes == 16
    text = build_shift("stream:continual", "text")
    assert all(s.name.endswith(":7") for s in text.shifts) and text.passes == len(text.shifts) >= 10
    for name in ("stream:continual", "stream:continual-s3", "stream:continual-diverse"):
        assert name in list_shifts("image")


def test_continual_diverse_interleaves_over_all_passes():
    stream = build_shift("stream:continual-diverse@4=gaussian_noise:5,fog:5", "image", seed=1)
    assert isinstance(stream, ContinualDiverseStream) and stream.passes == 2 and stream.block == 4
    per_block = [stream.segment(4 * b, 40) for b in range(10)]
    for cycle in range(5):
        assert sorted(per_block[2 * cycle:2 * cycle + 2]) == ["fog:5", "gaussian_noise:5"]
    with pytest.raises(ValueError, match="diverse streams only"):
        build_shift("stream:continual@4=fog:5", "image")


CONTINUAL = "stream:continual=gaussian_noise:5,clean,gaussian_noise:5"


def _continual_cfg(karpathy, tmp_path, out, **kw):
    from tests.helpers import tiny_run_config

    return tiny_run_config(karpathy, tmp_path, direction="i2t", method="tcr", batch_size=4, steps=1,
                           shift=CONTINUAL, out=str(tmp_path / out), eval_clean_after=True, **kw)


def _log(path):
    with open(path / "log.jsonl") as f:
        return [json.loads(line) for line in f]


def test_a_continual_run_streams_every_shift_over_the_whole_query_set(karpathy, tmp_path):
    from queryshift.engine import run

    result = run(_continual_cfg(karpathy, tmp_path, "run"))
    n = 8  # the fixture's images: one pass of i2t queries
    assert list(result["segments"]) == ["gaussian_noise:5", "clean", "gaussian_noise:5#2"]
    assert result["segment_order"] == list(result["segments"]) and result["n_queries"] == 3 * n
    assert result["stream_r1"] == pytest.approx(sum(s["r1"] for s in result["segments"].values()) / 3, abs=0.01)
    queries = [q for row in _log(tmp_path / "run") for q in row["queries"]]
    assert sorted(queries[:n]) == list(range(n)) and queries[:n] == queries[n:2 * n] == queries[2 * n:]
    assert "forgetting" in result


def test_a_continual_run_resumes_mid_stream(karpathy, tmp_path, monkeypatch):
    from queryshift.engine import run
    from queryshift.engine.retriever import Retriever

    full = run(_continual_cfg(karpathy, tmp_path, "full"))
    adapt, calls = Retriever.adapt, []

    def dies_in_the_second_segment(self, batch):
        calls.append(1)
        if len(calls) == 3:  # batches 0-1 are the first segment (8 queries, batch size 4)
            raise KeyboardInterrupt
        return adapt(self, batch)

    monkeypatch.setattr(Retriever, "adapt", dies_in_the_second_segment)
    with pytest.raises(KeyboardInterrupt):
        run(_continual_cfg(karpathy, tmp_path, "killed"))
    monkeypatch.setattr(Retriever, "adapt", adapt)
    assert len(_log(tmp_path / "killed")) == 2
    resumed = run(_continual_cfg(karpathy, tmp_path, "killed", resume=True))
    assert [r["ranks"] for r in _log(tmp_path / "killed")] == [r["ranks"] for r in _log(tmp_path / "full")]
    assert resumed["segments"] == full["segments"] and resumed["r1"] == full["r1"]
