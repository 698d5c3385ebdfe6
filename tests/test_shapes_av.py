"""The synthetic audio-visual world shapes-av: determinism, splits, formats, and audio tied to the scene."""

import hashlib
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from queryshift.data.shapes import SIZES
from queryshift.data.shapes_av import (
    FRAME_SIZE,
    FRAMES,
    PEAK,
    PITCH_STEPS,
    SAMPLE_RATE,
    SAMPLES,
    SPLITS,
    ShapesAV,
    clip,
    clip_scene,
    dry_objects,
    make_clip,
    synthesize_audio,
)


def _digest(split, index):
    frames, audio, meta = clip(split, index)
    return hashlib.sha256(frames.tobytes() + audio.tobytes() + repr(meta).encode()).hexdigest()


def _single_object_indices(split="test", count=12):
    found = [i for i in range(200) if len(clip_scene(split, i).objects) == 1]
    assert len(found) >= count
    return found[:count]


def _dominant_frequency(audio):
    spectrum = np.abs(np.fft.rfft(audio * np.hanning(audio.size)))
    return np.fft.rfftfreq(audio.size, 1 / SAMPLE_RATE)[np.argmax(spectrum)]


def _detected_onsets(audio, hop=0.005):
    """Times where the short-time energy jumps by 6 dB over the previous 25 ms and is not a minor peak."""
    samples = int(hop * SAMPLE_RATE)
    energy = np.sqrt(np.mean(audio[: audio.size // samples * samples].reshape(-1, samples) ** 2, axis=1))
    onsets = []
    for j in range(1, energy.size):
        before = energy[max(0, j - 5):j].min()
        if energy[j] > 2 * before + 1e-4 and energy[j] > 0.1 * energy.max():
            if not onsets or j * hop - onsets[-1] > 0.06:
                onsets.append(j * hop)
    return np.array(onsets)


def test_test_split_has_1000_clips_and_disjoint_seeds():
    assert SPLITS["test"][1] == 1000 and len(ShapesAV("test")) == 1000
    assert len({seed for seed, _ in SPLITS.values()}) == len(SPLITS)


def test_clip_is_deterministic_within_and_across_processes():
    assert _digest("test", 7) == _digest("test", 7)
    code = "from tests.test_shapes_av import _digest; print(_digest('test', 7))"
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                           cwd=Path(__file__).resolve().parents[1])
    assert other.stdout.strip() == _digest("test", 7)


def test_make_clip_from_seed_matches_split_clip_and_from_rng_is_reproducible():
    frames, audio, _ = clip("val", 3)
    seed_frames, seed_audio, _ = make_clip(SPLITS["val"][0], 3)
    np.testing.assert_array_equal(frames, seed_frames)
    np.testing.assert_array_equal(audio, seed_audio)
    a = make_clip(np.random.default_rng(5))
    b = make_clip(np.random.default_rng(5))
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])


def test_splits_do_not_share_clips():
    def scenes(split):
        return {repr({k: v for k, v in clip(split, i)[2].items() if k not in ("split", "index")}) for i in range(40)}

    train, test = scenes("train"), scenes("test")
    assert len(train) == 40 and len(test) == 40
    assert not train & test


def test_formats_and_ranges():
    frames, audio, meta = clip("test", 0)
    assert frames.shape == (FRAMES, FRAME_SIZE, FRAME_SIZE, 3) and frames.dtype == np.uint8
    assert FRAME_SIZE >= 2 * 64
    assert audio.shape == (SAMPLES,) and audio.dtype == np.float32 and SAMPLES == SAMPLE_RATE
    assert np.all(np.isfinite(audio)) and np.abs(audio).max() > 0.01
    assert 1 <= len(meta["objects"]) <= 3 and meta["caption"].startswith("a")


def test_audio_never_clips_even_with_loud_scenes():
    for i in range(60):
        _, audio, meta = clip("test", i)
        assert np.abs(audio).max() <= PEAK + 1e-6 and meta["audio_gain"] <= 1.0
    loud = clip_scene("test", 0)
    loud = replace(loud, objects=tuple(replace(o, shape=replace(o.shape, radius=40.0)) for o in loud.objects) * 3)
    audio, gain = synthesize_audio(loud)
    assert gain < 1.0 and np.abs(audio).max() == pytest.approx(PEAK, rel=1e-4)


def test_dominant_frequency_of_a_single_object_follows_its_colour():
    names = list(PITCH_STEPS)
    for i in _single_object_indices():
        _, audio, meta = clip("test", i)
        obj = meta["objects"][0]
        heard = _dominant_frequency(audio)
        # the colour whose nominal note is nearest (in semitones) to the loudest frequency
        nominal = np.array([196.0 * 2 ** (PITCH_STEPS[c] / 12) for c in names])
        nearest = names[int(np.argmin(np.abs(12 * np.log2(heard / nominal))))]
        assert nearest == obj["colour"], (i, obj["shape"], heard, obj["pitch"])
        assert abs(12 * np.log2(heard / obj["pitch"])) < 0.5


def test_loudness_grows_with_size():
    for i in _single_object_indices(count=4):
        scene = clip_scene("test", i)
        small, large = SIZES["small"][0], SIZES["large"][1]
        levels = []
        for radius in (small, large):
            obj = scene.objects[0]
            audio, gain = synthesize_audio(replace(scene, objects=(replace(obj, shape=replace(obj.shape,
                                                                                              radius=radius)),)))
            levels.append(np.sqrt(np.mean(audio.astype(np.float64) ** 2)) / gain)
        assert levels[1] > 1.5 * levels[0]


def test_onsets_in_the_audio_follow_the_motion():
    counts = {}
    for i in _single_object_indices(count=16):
        _, audio, meta = clip("test", i)
        obj = meta["objects"][0]
        # a note in the last 30 ms has too little signal left for the detector to see
        expected = np.array([t for t in obj["onsets"] if t < 0.97])
        detected = _detected_onsets(audio)
        detected = detected[detected < 0.97]
        assert len(detected) == len(expected), (i, detected, expected)
        assert np.all(np.abs(detected - expected) < 0.015), (i, detected, expected)
        counts.setdefault(obj["speed_word"], []).append(len(expected))
    assert min(counts["fast"]) > max(counts["slowly"])


def test_each_object_sounds_only_from_its_first_onset():
    scene = clip_scene("test", 1)
    t = np.arange(SAMPLES) / SAMPLE_RATE
    for obj, voice in zip(scene.objects, dry_objects(scene)):
        first = obj.onsets()[0]
        assert np.all(voice[t < first] == 0) and np.abs(voice[(t >= first) & (t < first + 0.03)]).max() > 0


def test_frames_move_and_different_clips_differ_in_both_modalities():
    frames, audio, meta = clip("test", 0)
    for k in range(1, FRAMES):
        assert np.abs(frames[k].astype(int) - frames[k - 1].astype(int)).sum() > 0
    other_frames, other_audio, other_meta = clip("test", 1)
    assert meta != other_meta
    assert np.abs(frames.astype(int) - other_frames.astype(int)).mean() > 1
    assert np.abs(audio - other_audio).mean() > 1e-3


def test_caption_names_every_object_and_its_speed():
    for i in range(10):
        _, _, meta = clip("test", i)
        assert ShapesAV("test").caption(i) == meta["caption"]
        parts = meta["caption"].split(" and ")
        assert len(parts) == len(meta["objects"])
        for part, obj in zip(parts, meta["objects"]):
            assert part.endswith(f"{obj['size']} {obj['colour']} {obj['shape']} moving {obj['speed_word']}")


def test_bad_split_or_index_is_a_clear_error():
    with pytest.raises(ValueError, match="split must be one of"):
        clip("tset", 0)
    with pytest.raises(ValueError, match="out of range"):
        clip("test", 1000)
    with pytest.raises(ValueError, match="asked for 2000"):
        ShapesAV("test", 2000)
    with pytest.raises(ValueError, match="int seed or a numpy Generator"):
        make_clip("7")
