"""CIRR and FashionIQ loaders on fixtures in their exact formats; CIRR's metrics; clear errors."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from queryshift.data import ComposedDataset, DataError, load_dataset
from queryshift.engine.composed import composed_metrics, rank_queries
from queryshift.metrics import recall_subset, subset_ranks

from .cir_fixtures import make_cirr, make_fashioniq


def test_cirr_val_queries_gallery_exclusion_and_subsets(tmp_path):
    root = make_cirr(tmp_path)
    data = load_dataset(f"cirr:{root}")
    assert isinstance(data, ComposedDataset) and data.name == "cirr-val"
    assert len(data.images) == 12 and len(data.references) == 4
    names = [os.path.splitext(os.path.basename(p))[0] for p in data.images]
    with open(os.path.join(root, "cirr", "captions", "cap.rc2.val.json")) as f:
        raw = json.load(f)
    for q, e in enumerate(raw):
        assert names[data.references[q]] == e["reference"]
        assert [names[t] for t in data.targets[q]] == [e["target_hard"]]
        assert data.exclude[q] == [data.references[q]]
        assert sorted(names[m] for m in data.subsets[q]) == sorted(m for m in e["img_set"]["members"]
                                                                    if m != e["reference"])
    assert data.texts[1] == "show two of them, fewer trees"  # pre_caption: lowercase, no final period
    assert data.load_reference(0).size == (40, 30)  # the image path of split.rc2.val.json resolves
    assert load_dataset(f"cirr:{root}/cirr").images == data.images  # the cirr folder itself works too
    assert [os.path.join(root, p) for p in data.images] == [data.image_path(i) for i in range(12)]


def test_cirr_wrong_format_and_test1_are_refused(tmp_path):
    root = make_cirr(tmp_path / "a")
    cap = os.path.join(root, "cirr", "captions", "cap.rc2.val.json")
    with open(cap) as f:
        entries = json.load(f)
    with open(cap, "w") as f:
        json.dump({"queries": entries}, f)
    with pytest.raises(DataError, match="cap.rc2.val.json: expected a JSON list"):
        load_dataset(f"cirr:{root}")
    bad = [dict(e) for e in entries]
    del bad[2]["img_set"]
    with open(cap, "w") as f:
        json.dump(bad, f)
    with pytest.raises(DataError, match=r"entry 2 \(pairid 2\): missing field 'img_set'"):
        load_dataset(f"cirr:{root}")
    bad = [dict(e) for e in entries]
    bad[1]["reference"] = "dev-999-0-img0"
    with open(cap, "w") as f:
        json.dump(bad, f)
    with pytest.raises(DataError, match="reference image 'dev-999-0-img0' is not in .*split.rc2.val.json"):
        load_dataset(f"cirr:{root}")
    bad = [dict(e) for e in entries]
    bad[3]["caption"] = " . "
    with open(cap, "w") as f:
        json.dump(bad, f)
    with pytest.raises(DataError, match="entry 3 .*empty modification text"):
        load_dataset(f"cirr:{root}")
    with open(os.path.join(root, "cirr", "image_splits", "split.rc2.val.json"), "w") as f:
        json.dump(["dev-100-0-img0"], f)
    with pytest.raises(DataError, match="split.rc2.val.json: expected a JSON object"):
        load_dataset(f"cirr:{root}")
    with pytest.raises(DataError, match="test1 has no public targets"):
        load_dataset(f"cirr:{make_cirr(tmp_path / 'b', 'test1')}:test1")
    with pytest.raises(DataError, match="no captions/ folder"):
        load_dataset(f"cirr:{tmp_path / 'nowhere'}")


def test_cirr_missing_reference_file_is_named(tmp_path):
    root = make_cirr(tmp_path)
    data = load_dataset(f"cirr:{root}")
    os.remove(data.image_path(data.references[2]))
    with pytest.raises(DataError, match="composed query 2: reference image 'dev/dev-101-0-img0.png' cannot be read"):
        data.load_reference(2)


def test_fashioniq_pairs_joined_captions_and_extension(tmp_path):
    root = make_fashioniq(tmp_path, "shirt", ext=".jpg")
    data = load_dataset(f"fashioniq:{root}:shirt")
    assert data.name == "fashioniq-shirt-val" and len(data.images) == 8
    assert data.images[0].endswith(".jpg") and data.load_image(0).size == (40, 30)
    assert data.texts[:2] == ["is shorter and is red with no sleeves", "has a floral print and is longer"]
    assert data.texts[3] == "is blue"  # an empty second caption leaves the first
    assert [data.references[q] for q in range(5)] == [0, 2, 4, 6, 1]
    assert data.targets == [[1], [3], [5], [7], [0]]
    assert data.exclude is None  # FashionIQ keeps the reference in the gallery
    with pytest.raises(ValueError, match="FashionIQ needs its root and a category"):
        load_dataset(f"fashioniq:{root}")
    with pytest.raises(ValueError, match="FashionIQ needs its root and a category"):
        load_dataset(f"fashioniq:{root}:hat")


def test_fashioniq_wrong_format_is_refused(tmp_path):
    root = make_fashioniq(tmp_path)
    cap = os.path.join(root, "captions", "cap.dress.val.json")
    with open(cap) as f:
        entries = json.load(f)
    for mutate, message in [
        (lambda e: e[1].pop("target"), "entry 1: missing field 'target'"),
        (lambda e: e[0].update(captions="is red"), "entry 0: 'captions' must be a list"),
        (lambda e: e[2].update(candidate="B00XX"), "reference \\(candidate\\) image 'B00XX' is not in"),
        (lambda e: e[4].update(captions=["", "?"]), "entry 4: empty modification text"),
    ]:
        bad = json.loads(json.dumps(entries))
        mutate(bad)
        with open(cap, "w") as f:
            json.dump(bad, f)
        with pytest.raises(DataError, match=message):
            load_dataset(f"fashioniq:{root}:dress")
    with open(cap, "w") as f:
        f.write("{not json")
    with pytest.raises(DataError, match="cap.dress.val.json: not valid JSON"):
        load_dataset(f"fashioniq:{root}:dress")


def test_subset_ranks_and_recall_subset_on_a_worked_example():
    scores = torch.tensor([[0.9, 0.8, 0.1, 0.5, 0.7, 0.3],
                           [0.1, 0.2, 0.3, 0.4, 0.5, 0.6]])
    # row 0: subset {2, 3, 5} ranks 3 (0.5) > 5 (0.3) > 2 (0.1): target 5 is second -> rank 1
    # row 1: subset {0, 1} ranks 1 > 0: target 0 is second -> rank 1; target 1 would be rank 0
    assert subset_ranks(scores, [[2, 3, 5], [0, 1]], [[5], [0]]) == [1, 1]
    assert subset_ranks(scores, [[2, 3, 5], [0, 1]], [[3], [1]]) == [0, 0]
    assert recall_subset([0, 1, 2, 5]) == {"rsubset1": 25.0, "rsubset2": 50.0, "rsubset3": 75.0}
    with pytest.raises(ValueError, match="no relevant item in its subset"):
        subset_ranks(scores, [[2, 3]], [[0]])


def test_excluded_reference_is_never_ranked_and_r50(tmp_path):
    data = ComposedDataset([f"{i}.png" for i in range(60)], [0, 1], ["a", "b"], [[2], [59]],
                           exclude=[[0], [1]], subsets=[[2, 3], [59, 4]], name="toy")
    scores = torch.zeros(2, 60)
    scores[0, 0], scores[0, 2] = 1.0, 0.5  # the reference outscores the target: excluded, target first
    scores[1] = torch.linspace(1, 0, 60)  # target 59 is last of 60, 58th once the reference is removed
    ranks, aps, extra = rank_queries(scores, [0, 1], data, data.targets, "c2i")
    assert ranks == [0, 58]
    assert extra["subset_ranks"] == [0, 1]
    metrics = composed_metrics([{"ranks": ranks, "subset_ranks": extra["subset_ranks"]}])
    assert metrics["r50"] == 50.0 and metrics["rsubset1"] == 50.0 and metrics["rsubset2"] == 100.0
    assert rank_queries(scores, [0, 1], data, data.targets, "i2t")[0] == [1, 59]  # i2t: no composed protocol
    assert np.isfinite(aps).all()
