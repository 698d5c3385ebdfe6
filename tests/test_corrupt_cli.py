"""``queryshift corrupt`` writes the COCO-C / Flickr-C layout from a tiny generated Karpathy split."""

import argparse
import json
import os

import numpy as np
import pytest
from PIL import Image

from queryshift.commands import corrupt
from queryshift.data import load_karpathy

CAPTIONS = ["a red circle above a blue square", "two green triangles next to each other",
            "a small yellow star on a white background", "a large purple square in the corner",
            "three orange dots in a row", "an extra sixth caption that coco drops"]


@pytest.fixture()
def karpathy(tmp_path):
    root = tmp_path / "images"
    entries = []
    rng = np.random.default_rng(0)
    for i, rel in enumerate(["val2014/COCO_val2014_000000000001.jpg", "val2014/COCO_val2014_000000000002.jpg",
                             "other/nested/img3.jpg"]):
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (48, 64 + 8 * i, 3), dtype=np.uint8)).save(path, quality=95)
        entries.append({"image": rel, "caption": CAPTIONS[: 6 if i == 0 else 5], "image_id": i})
    data = tmp_path / "ann" / "coco_karpathy_test.json"
    data.parent.mkdir()
    data.write_text(json.dumps(entries))
    return str(data), str(root), entries


def _run(argv):
    parser = argparse.ArgumentParser()
    corrupt.add_parser(parser.add_subparsers())
    args = parser.parse_args(["corrupt", *argv])
    return args.func(args)


def test_image_layout_keeps_relative_paths(karpathy, tmp_path):
    data, root, entries = karpathy
    out = tmp_path / "out"
    assert _run(["--data", data, "--image-root", root, "--shift", "gaussian_noise:5", "--shift", "pixelate:2",
                 "--out", str(out), "--seed", "1"]) == 0
    for folder in ("COCO_IP_gaussian_noise_5", "COCO_IP_pixelate_2"):
        for entry in entries:
            written = out / folder / entry["image"]
            with Image.open(written) as im, Image.open(os.path.join(root, entry["image"])) as orig:
                assert im.format == "JPEG" and im.size == orig.size
    # the loader reads the corrupted copy with the clean annotations
    dataset = load_karpathy(data, str(out / "COCO_IP_gaussian_noise_5"))
    assert dataset.load_image(2).size == (80, 48)
    # same seed -> same files; existing files are kept unless --overwrite
    first = (out / "COCO_IP_gaussian_noise_5" / entries[0]["image"]).read_bytes()
    _run(["--data", data, "--image-root", root, "--shift", "gaussian_noise:5", "--out", str(tmp_path / "again"),
          "--seed", "1"])
    assert (tmp_path / "again" / "COCO_IP_gaussian_noise_5" / entries[0]["image"]).read_bytes() == first


def test_text_layout_keeps_json_structure(karpathy, tmp_path):
    data, _, entries = karpathy
    out = tmp_path / "out"
    assert _run(["--data", data, "--shift", "char_swap:7", "--shift", "rd:7", "--out", str(out)]) == 0
    for folder in ("annotation_RandomCharAug_swap/7", "annotation_rd/7"):
        written = json.loads((out / folder / "coco_karpathy_test.json").read_text())
        assert [e["image"] for e in written] == [e["image"] for e in entries]
        assert [e["image_id"] for e in written] == [0, 1, 2]
        assert [len(e["caption"]) for e in written] == [6, 5, 5]
        assert written[0]["caption"][5] == CAPTIONS[5]  # COCO: only the first 5 captions are perturbed
        changed = sum(a != b for e, w in zip(entries, written) for a, b in zip(e["caption"][:5], w["caption"][:5]))
        assert changed >= 10
    assert len(load_karpathy(str(out / "annotation_rd/7/coco_karpathy_test.json")).texts) == 15


def test_expand_all_sets():
    images = corrupt.expand_shifts(["all-image"])
    assert len(images) == 80 and images[0] == "gaussian_noise:1"
    texts = corrupt.expand_shifts(["all-text"])
    assert len(texts) == 57 and "sr:6" in texts and "sr:5" not in texts and "back_trans:1" in texts


def test_errors(karpathy, tmp_path):
    data, root, _ = karpathy
    with pytest.raises(ValueError, match="image-root"):
        _run(["--data", data, "--shift", "fog:3", "--out", str(tmp_path / "o")])
    with pytest.raises(ValueError, match="online"):
        _run(["--data", data, "--image-root", root, "--shift", "stream:temporal", "--out", str(tmp_path / "o")])
    with pytest.raises(ValueError, match="unknown shift|corrupt writes"):
        _run(["--data", data, "--image-root", root, "--shift", "fogg:3", "--out", str(tmp_path / "o")])
    assert not os.path.exists(tmp_path / "o" / "COCO_IP_fog_3")


def test_unreadable_image_is_skipped_the_rest_written_and_the_exit_status_says_so(karpathy, tmp_path, capsys):
    data, root, entries = karpathy
    broken = os.path.join(root, entries[1]["image"])
    with open(broken, "wb") as f:
        f.write(b"not a jpeg")
    out = tmp_path / "out"
    status = _run(["--data", data, "--image-root", root, "--shift", "pixelate:2", "--out", str(out)])
    assert status == 1
    err = capsys.readouterr().err
    assert entries[1]["image"].split("/")[-1] in err and "1 image(s)" in err
    folder = out / "COCO_IP_pixelate_2"
    assert (folder / entries[0]["image"]).exists() and (folder / entries[2]["image"]).exists()
    assert not (folder / entries[1]["image"]).exists()

