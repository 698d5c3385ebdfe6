"""``--data shapes-av[:split][:N]``: an AVDataset of the synthetic clips, each modality rendered only when asked."""

import numpy as np
import pytest

from queryshift.data import DATASETS, DataError
from queryshift.data import shapes_av as world
from queryshift.data.av import AUDIO_RATE, AVDataset
from queryshift.data.shapes_av import load_shapes_av


def test_registered_and_defaults_to_the_1000_test_clips():
    data = DATASETS["shapes-av"](None)
    assert isinstance(data, AVDataset)
    assert data.modalities == ("video", "audio", "text")
    assert [data.count(m) for m in data.modalities] == [1000, 1000, 1000]
    assert data.groups["video"] == data.groups["audio"] == data.groups["text"] == list(range(1000))
    assert data.relevance("video", "audio")[7] == [7] and data.relevance("audio", "text")[999] == [999]


@pytest.mark.parametrize("arg, split, n", [("val", "val", 1000), ("train:30", "train", 30), ("test:5", "test", 5)])
def test_split_and_count(arg, split, n):
    data = load_shapes_av(arg)
    assert data.count("audio") == n
    frames, audio, meta = world.clip(split, n - 1)
    np.testing.assert_array_equal(data.load("video", n - 1), frames)
    np.testing.assert_array_equal(data.load("audio", n - 1), audio)
    assert data.load("text", n - 1) == meta["caption"]


def test_items_have_the_canonical_forms():
    data = load_shapes_av("test:3")
    video, audio, text = (data.load(m, 2) for m in ("video", "audio", "text"))
    assert video.dtype == np.uint8 and video.shape == (8, 128, 128, 3)
    assert audio.dtype == np.float32 and audio.shape == (AUDIO_RATE,) and np.abs(audio).max() <= 1
    assert isinstance(text, str) and text


def test_splits_have_different_fingerprints():
    assert load_shapes_av("test:5").fingerprint() != load_shapes_av("val:5").fingerprint()
    assert load_shapes_av("test:5").fingerprint() != load_shapes_av("test:6").fingerprint()


def test_each_loader_renders_only_its_modality(monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("rendered a modality nobody asked for")

    data = load_shapes_av("test:2")
    monkeypatch.setattr(world, "synthesize_audio", forbidden)
    assert data.load("video", 1).shape == (8, 128, 128, 3)
    assert isinstance(data.load("text", 1), str)
    monkeypatch.undo()
    monkeypatch.setattr(world, "render_frames", forbidden)
    assert data.load("audio", 1).shape == (AUDIO_RATE,)


@pytest.mark.parametrize("arg, words", [("dev", "dev"), ("test:0", "0"), ("test:1001", "1001"),
                                        ("test:ten", "ten"), ("train:5:6", "5:6")])
def test_bad_argument_is_a_clear_error(arg, words):
    with pytest.raises(DataError, match=f"shapes-av.*{words}"):
        load_shapes_av(arg)
