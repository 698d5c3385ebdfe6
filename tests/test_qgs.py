"""Query-gallery-shift loaders on fixture files written here."""

from __future__ import annotations

import json
import os
import pickle

import pytest

from queryshift.data import DATASETS, DataError, load_dataset


def _write(path, obj):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(obj, f)
    return str(path)


def _check_symmetric(ds):
    for t, imgs in enumerate(ds.txt2img):
        for i in imgs:
            assert t in ds.img2txt[i]
    for i, txts in enumerate(ds.img2txt):
        for t in txts:
            assert i in ds.txt2img[t]


@pytest.fixture
def nocaps(tmp_path):
    entries = [
        {"image": "val/a.jpg", "caption": ["A Dog.", "a dog (running)", "dog"], "domain": "in-domain"},
        {"image": "val/b.jpg", "caption": ["A cat"], "domain": "near-domain"},
        {"image": "val/c.jpg", "caption": ["a red car", "car", "a car!", "an auto"], "domain": "out-domain"},
        {"image": "val/d.jpg", "caption": "one string caption", "domain": "in-domain"},
    ]
    return _write(tmp_path / "nocaps" / "annotations.json", entries)


def test_nocaps_domains(nocaps):
    root = os.path.dirname(nocaps)
    ds = load_dataset(f"nocaps_in:{nocaps}")
    assert ds.images == ["val/a.jpg", "val/d.jpg"] and ds.image_root == root and ds.name == "nocaps_in"
    assert ds.texts == ["a dog", "a dog running", "dog", "one string caption"]  # pre_caption, none dropped
    assert ds.img2txt == [[0, 1, 2], [3]] and ds.txt2img == [[0], [0], [0], [1]]
    assert load_dataset(f"nocaps_near:{nocaps}").images == ["val/b.jpg"]
    out = load_dataset(f"nocaps_out:{root}", image_root="/elsewhere")  # a root directory works too
    assert out.images == ["val/c.jpg"] and len(out.texts) == 4 and out.image_root == "/elsewhere"
    entire = load_dataset(f"nocaps_entire:{nocaps}")
    assert len(entire.images) == 4 and len(entire.texts) == 9
    _check_symmetric(entire)


def test_nocaps_errors(tmp_path, nocaps):
    path = _write(tmp_path / "bad.json", [{"image": "x.jpg", "caption": ["c"]}])
    with pytest.raises(DataError, match=r"bad\.json.*'domain'"):
        load_dataset(f"nocaps_in:{path}")
    assert len(load_dataset(f"nocaps_entire:{path}").images) == 1  # entire needs no domain
    only_in = _write(tmp_path / "in.json", [{"image": "x.jpg", "caption": ["c"], "domain": "in-domain"}])
    with pytest.raises(DataError, match="no entry with domain 'out-domain'"):
        load_dataset(f"nocaps_out:{only_in}")
    with pytest.raises(DataError, match="not found"):
        load_dataset(f"nocaps_in:{tmp_path / 'missing.json'}")


def _pickle(path, obj):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        pickle.dump(obj, f)


@pytest.fixture
def fashion(tmp_path):
    root = tmp_path / "Fashion-Gen"
    pk = root / "full_valid_info_PAI"
    # file names sort differently from creation order; product 200 has two views with the same description
    _pickle(pk / "3.pkl", {"captions": "Black LEATHER boots.", "img_name": "300_0.png", "super_cls_id": "21"})
    _pickle(pk / "1.pkl", {"captions": ["Slim jeans; blue"], "img_name": "200_0.png", "super_cls_id": "5"})
    _pickle(pk / "2.pkl", {"captions": ["Slim jeans; blue"], "img_name": "200_1.png", "super_cls_id": "5"})
    _pickle(pk / "0.pkl", {"captions": "Wool coat", "img_name": "100_0.png", "super_cls_id": 21})
    return str(root)


def test_fashion_gen_product_relevance(fashion):
    ds = load_dataset(f"fashion_gen:{fashion}")
    assert ds.images == ["100_0.png", "200_0.png", "200_1.png", "300_0.png"]  # sorted pickle order
    assert ds.texts == ["wool coat", "slim jeans blue", "slim jeans blue", "black leather boots"]
    assert ds.image_root == os.path.join(fashion, "extracted_valid_images")
    # many-to-many: both views of product 200 are relevant to both (duplicated) captions
    assert ds.txt2img == [[0], [1, 2], [1, 2], [3]]
    assert ds.img2txt == [[0], [1, 2], [1, 2], [3]]
    _check_symmetric(ds)
    same = load_dataset(f"fashion_gen:{os.path.join(fashion, 'full_valid_info_PAI')}")  # the pickle dir
    assert same.images == ds.images and same.image_root == ds.image_root


def test_fashion_gen_detail_and_errors(tmp_path, fashion):
    detail = load_dataset(f"fashion_gen_detail:{fashion}")
    assert detail.images == ["100_0.png", "300_0.png"] and detail.name == "fashion_gen_detail"
    long = " ".join(f"w{i}" for i in range(100))
    _pickle(tmp_path / "long" / "a.pkl", {"captions": long, "img_name": "1_0.png", "super_cls_id": "21"})
    assert len(load_dataset(f"fashion_gen:{tmp_path / 'long'}").texts[0].split()) == 77  # max_words 77
    _pickle(tmp_path / "bad" / "a.pkl", {"captions": "x", "super_cls_id": "21"})
    with pytest.raises(DataError, match=r"a\.pkl: lacks the 'img_name' field"):
        load_dataset(f"fashion_gen:{tmp_path / 'bad'}")
    with pytest.raises(DataError, match="full_valid_info_PAI"):
        load_dataset(f"fashion_gen:{tmp_path / 'nothing'}")


def _reid(tmp_path, name, file_name):
    entries = [
        {"split": "train", "captions": ["ignored"], "file_path": "train/0.jpg", "id": 1},
        {"split": "test", "captions": ["A woman in a RED coat.", "red coat woman"], "file_path": "t/a.jpg", "id": 7},
        {"split": "test", "captions": ["the same woman, from behind"], "file_path": "t/b.jpg", "id": 7},
        {"split": "test", "captions": ["A man with a bag"], "file_path": "t/c.jpg", "id": 9},
        {"split": "val", "captions": ["ignored too"], "file_path": "v/0.jpg", "id": 7},
    ]
    return _write(tmp_path / name / file_name, entries)


@pytest.mark.parametrize("name,file_name", [("cuhk_pedes", "reid_raw.json"), ("icfg_pedes", "ICFG-PEDES.json")])
def test_reid_person_id_relevance(tmp_path, name, file_name):
    path = _reid(tmp_path, name, file_name)
    for arg in (path, os.path.dirname(path)):
        ds = load_dataset(f"{name}:{arg}")
        assert ds.name == name and ds.image_root == os.path.join(os.path.dirname(path), "imgs")
        assert ds.images == ["t/a.jpg", "t/b.jpg", "t/c.jpg"]
        assert ds.texts[0] == "A woman in a RED coat."  # raw, no pre_caption
        assert ds.txt2img == [[0, 1], [0, 1], [0, 1], [2]]
        assert ds.img2txt == [[0, 1, 2], [0, 1, 2], [3]]
        _check_symmetric(ds)


def test_reid_errors(tmp_path):
    path = _write(tmp_path / "r.json", [{"split": "test", "captions": ["x"], "file_path": "a.jpg"}])
    with pytest.raises(DataError, match=r"r\.json: entry 0 lacks the 'id' field"):
        load_dataset(f"cuhk_pedes:{path}")
    path = _write(tmp_path / "t.json", [{"split": "train", "captions": ["x"], "file_path": "a.jpg", "id": 1}])
    with pytest.raises(DataError, match="no entry with split 'test'"):
        load_dataset(f"icfg_pedes:{path}")


def test_registered_names():
    for name in ("nocaps_in", "nocaps_near", "nocaps_out", "nocaps_entire", "fashion_gen", "fashion_gen_detail",
                 "cuhk_pedes", "icfg_pedes"):
        assert name in DATASETS
