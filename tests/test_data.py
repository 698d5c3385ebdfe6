import json

import pytest

from queryshift.data import DataError, load_dataset, load_karpathy, load_pairs, pre_caption
from tests.helpers import make_karpathy


def test_pre_caption_matches_tcr():
    assert pre_caption('A "Man" (riding) a horse!!  on: the beach.') == "a man riding a horse on the beach"
    assert pre_caption("one two three four", max_words=2) == "one two"
    assert pre_caption(["two", "Parts."]) == "two parts"


def test_karpathy_coco_keeps_five_captions(tmp_path):
    entries = [{"image": f"val2014/{i}.jpg", "caption": [f"cap {i} {k}" for k in range(7)]} for i in range(3)]
    path = tmp_path / "coco_karpathy_test.json"
    path.write_text(json.dumps(entries))
    ds = load_karpathy(str(path), str(tmp_path))
    assert len(ds.images) == 3 and len(ds.texts) == 15
    assert ds.img2txt[1] == [5, 6, 7, 8, 9]
    assert ds.txt2img[7] == [1]
    flickr = tmp_path / "flickr30k_test.json"
    flickr.write_text(json.dumps(entries))
    assert len(load_karpathy(str(flickr)).texts) == 21  # Flickr keeps every caption


def test_karpathy_errors_name_the_file_and_entry(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps([{"image": "a.jpg", "caption": ["fine"]}, {"image": "b.jpg", "caption": ["  .. "]}]))
    with pytest.raises(DataError, match=r"bad.json.*empty caption 0 of entry 1 \(b.jpg\)"):
        load_karpathy(str(path))
    path.write_text(json.dumps([{"image": "a.jpg"}]))
    with pytest.raises(DataError, match="entry 0 lacks"):
        load_karpathy(str(path))
    with pytest.raises(DataError, match="not found"):
        load_karpathy(str(tmp_path / "missing.json"))


def test_pairs_jsonl_with_groups_is_many_to_many(tmp_path):
    rows = [{"image": "p1_a.jpg", "caption": "red shirt", "group": "p1"},
            {"image": "p1_b.jpg", "caption": "a red shirt, back", "group": "p1"},
            {"image": "p2_a.jpg", "caption": "blue jeans", "group": "p2"}]
    path = tmp_path / "pairs.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    ds = load_dataset(str(path))
    assert ds.txt2img == [[0, 1], [0, 1], [2]]
    assert ds.img2txt == [[0, 1], [0, 1], [2]]


def test_pairs_csv_and_errors(tmp_path):
    path = tmp_path / "pairs.csv"
    path.write_text("image,caption\na.jpg,a cat\na.jpg,the cat\nb.jpg,a dog\n")
    ds = load_pairs(str(path))
    assert ds.img2txt == [[0, 1], [2]]
    path.write_text("image,caption\na.jpg,\n")
    with pytest.raises(DataError, match=r"pairs.csv:2: empty caption"):
        load_pairs(str(path))
    path.write_text("img,text\n")
    with pytest.raises(DataError, match="lacks column"):
        load_pairs(str(path))


def test_corrupt_and_missing_image_named(tmp_path):
    ds = load_karpathy(make_karpathy(tmp_path, n_images=2), str(tmp_path))
    (tmp_path / "img" / "1.jpg").write_bytes(b"not a jpeg")
    ds.load_image(0)
    with pytest.raises(DataError, match=r"corrupt or unreadable: .*img/1.jpg"):
        ds.load_image(1)
    (tmp_path / "img" / "0.jpg").unlink()
    with pytest.raises(DataError, match=r"not found: .*img/0.jpg"):
        ds.load_image(0)


def test_flat_basename_fallback(tmp_path):
    """MM_Robustness writes corrupted images flat as <basename>.jpg."""
    ds = load_karpathy(make_karpathy(tmp_path, n_images=1), str(tmp_path))
    ds.images[0] = "val2014/nested/0.png"
    ds.image_root = str(tmp_path / "img")
    assert ds.load_image(0).size == (48, 40)


def test_subset_restricts_relevance(tmp_path):
    ds = load_karpathy(make_karpathy(tmp_path, n_images=4), str(tmp_path))
    sub = ds.subset([1, 3])
    assert sub.images == ["img/1.jpg", "img/3.jpg"]
    assert sub.img2txt == [[0, 1], [2, 3]] and sub.txt2img == [[0], [0], [1], [1]]
