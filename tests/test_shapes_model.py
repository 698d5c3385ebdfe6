"""The shipped shapes models: load offline, and the benchmark-v2 regime (with tolerances, not the cards' digits)."""

import json
import os

import pytest

from queryshift.data import load_dataset
from queryshift.models import load_model
from queryshift.shifts.shapes_regime import CAPTION_STYLES, IMAGE_STYLES, SourceRecall, check

REGIME = os.path.join(os.path.dirname(__file__), os.pardir, "lab", "experiments", "shapes-regime.json")
NAMES = ("shapes-clip", "shapes-clip-general")


@pytest.mark.parametrize("name", NAMES)
def test_checkpoint_is_small_and_loads_offline(name):
    from queryshift.models import shapes_clip

    path = shapes_clip.GENERAL_CHECKPOINT if name.endswith("general") else shapes_clip.CHECKPOINT
    assert os.path.getsize(path) <= 25 * 2**20
    model = load_model(name)
    assert model.name == name and model.image_size == 64
    assert all(p.dtype.is_floating_point and p.element_size() == 4 for p in model.parameters())


@pytest.mark.parametrize("name", NAMES)
def test_missing_checkpoint_says_how_to_rebuild(name, monkeypatch, tmp_path):
    from queryshift.models import WeightsNotFoundError, shapes_clip

    monkeypatch.setattr(shapes_clip, "CHECKPOINT", str(tmp_path / "absent.pt"))
    monkeypatch.setattr(shapes_clip, "GENERAL_CHECKPOINT", str(tmp_path / "absent.pt"))
    with pytest.raises(WeightsNotFoundError, match="train-source"):
        load_model(name)


def test_committed_regime_verdicts_follow_from_its_numbers():
    """lab/experiments/shapes-regime.json (written by lab/experiments/shapes_regime.py) states each condition as
    check() reads it."""
    with open(REGIME, encoding="utf-8") as f:
        measured = json.load(f)
    assert measured["models"] == {"custom": "shapes-clip", "general": "shapes-clip-general"}
    verdicts = [(c["condition"], c["met"], c["measured"]) for c in measured["conditions"]]
    assert verdicts == check(measured)
    assert len(measured["image_corruptions"]) == 16 and len(measured["text_corruptions"]) == 11


@pytest.fixture(scope="module")
def sample():
    """The first 150 test images (750 captions): a cheap sample of the 1k split."""
    data = load_dataset("shapes:test:150")
    return SourceRecall(load_model("shapes-clip"), data), SourceRecall(load_model("shapes-clip-general"), data)


def _retained(recall, direction, shifts):
    clean = recall.r1(direction)
    return clean, [recall.r1(direction, s) / clean for s in shifts]


@pytest.mark.slow
def test_image_corruptions_leave_a_recoverable_share_on_a_sample(sample):
    """Severity-5 corruptions hurt without erasing everything: the mean share of clean R@1 kept sits inside
    the regime's 30-75 % band, widened by 10 points for the 150-image sample."""
    from queryshift.shifts.shapes_regime import IMAGE_TEST_SHIFTS

    custom, _ = sample
    clean, kept = _retained(custom, "i2t", IMAGE_TEST_SHIFTS)
    assert clean >= 40
    assert 0.20 <= sum(kept) / len(kept) <= 0.85
    assert max(kept) < 1.05  # no corruption helps
    assert sum(k >= 0.5 for k in kept) >= 4  # several shifts keep half of clean R@1 or more


@pytest.mark.slow
def test_text_corruptions_leave_a_recoverable_share_on_a_sample(sample):
    from queryshift.shifts.shapes_regime import TEXT_TEST_SHIFTS

    custom, _ = sample
    clean, kept = _retained(custom, "t2i", TEXT_TEST_SHIFTS)
    assert clean >= 30
    assert 0.20 <= sum(kept) / len(kept) <= 0.85


def test_styles_keep_some_recall_and_the_general_model_knows_the_image_styles(sample):
    custom, general = sample
    for styles, direction in ((IMAGE_STYLES, "i2t"), (CAPTION_STYLES, "t2i")):
        clean = custom.r1(direction)
        mine = [custom.r1(direction, s) for s in styles]
        assert all(r >= 0.05 * clean for r in mine), (styles, mine)  # regime: 10 %; 5 % on the sample
    # Image styles: customization forgets part of what the general stage learnt. (Caption styles: it does not;
    # the regime's "general > customized" is not met there, see lab/experiments/shapes-regime.json and the model card.)
    assert sum(general.r1("i2t", s) for s in IMAGE_STYLES) > sum(custom.r1("i2t", s) for s in IMAGE_STYLES)
