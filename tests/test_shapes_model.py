"""The shipped shapes-clip checkpoint reproduces the clean recall its model card reports."""

import os
import re

import pytest

from queryshift.engine import RunConfig, run
from queryshift.models import load_model
from queryshift.models.shapes_clip import CHECKPOINT

CARD = os.path.join(os.path.dirname(__file__), os.pardir, "docs", "model-card-shapes-clip.md")


def card_recall() -> dict[str, list[float]]:
    """{"i2t": [R@1, R@5, R@10], "t2i": [...]} from the card's table rows '| i2t ... | r1 | r5 | r10 |'."""
    with open(CARD, encoding="utf-8") as f:
        rows = re.findall(r"^\| (i2t|t2i)[^|]*\|([^\n]*)$", f.read(), flags=re.M)
    return {d: [float(x) for x in cells.strip(" |").split("|")[:3]] for d, cells in rows}


def test_checkpoint_is_small_and_loads_offline():
    assert os.path.getsize(CHECKPOINT) <= 25 * 2**20
    model = load_model("shapes-clip")
    assert model.name == "shapes-clip" and model.image_size == 64
    assert all(p.dtype.is_floating_point and p.element_size() == 4 for p in model.parameters())


@pytest.mark.slow
@pytest.mark.parametrize("direction", ["i2t", "t2i"])
def test_clean_recall_matches_model_card(direction, tmp_path):
    expected = card_recall()[direction]
    result = run(RunConfig(model="shapes-clip", data="shapes", direction=direction, method="source",
                           cache_dir=str(tmp_path), progress=False))
    assert result["n_queries"] == (1000 if direction == "i2t" else 5000)
    assert abs(result["r1"] - expected[0]) <= 0.5
    assert abs(result["r5"] - expected[1]) <= 0.5 and abs(result["r10"] - expected[2]) <= 0.5


def test_clean_recall_is_in_the_target_band():
    assert all(40 <= recall[0] <= 90 for recall in card_recall().values())


def test_missing_checkpoint_says_how_to_rebuild(monkeypatch, tmp_path):
    from queryshift.models import WeightsNotFoundError, shapes_clip

    monkeypatch.setattr(shapes_clip, "CHECKPOINT", str(tmp_path / "absent.pt"))
    with pytest.raises(WeightsNotFoundError, match="train-source"):
        load_model("shapes-clip")
