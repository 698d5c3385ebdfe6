"""Issue 29, data and config inputs: every bad input is one clear line naming the file, record and field.

CSV rows with extra fields, captions of the wrong type, a byte-order mark, deeply nested JSON/YAML, YAML alias
bombs, special files (FIFOs, devices, folders) where a file is expected, and decompression-bomb images.
Commands run in-process through ``queryshift.cli.main``; a call that could block forever runs in a thread
with a deadline.
"""

from __future__ import annotations

import json
import os
import threading

import pytest
from PIL import Image

from queryshift.cli import main as cli_main
from queryshift.data import DataError, load_dataset, load_karpathy, load_pairs
from tests.cir_fixtures import make_cirr, make_fashioniq
from tests.helpers import TINY_MODEL

DEADLINE = 20  # seconds; a blocked open() never returns, a working check takes milliseconds


def _cli(argv, capsys) -> tuple[int, str]:
    code = cli_main([*argv, "--no-progress"])
    return code, capsys.readouterr().err


def _one_error_line(err: str, *names: str) -> None:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and ": error: " in lines[0], err[:2000]
    for name in names:
        assert name in lines[0], (name, lines[0][:2000])


def _within_deadline(call, *args):
    """Run ``call(*args)`` in a thread; -> its result or exception. Fails if it does not return in time."""
    box: dict = {}

    def target():
        try:
            box["result"] = call(*args)
        except BaseException as err:  # handed back to the test
            box["error"] = err

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(DEADLINE)
    assert not thread.is_alive(), f"{call.__name__} still blocked after {DEADLINE}s"
    return box


@pytest.fixture
def fifo():
    """fifo(path): a named pipe nobody writes to at ``path`` (replacing a file); opening it for reading
    blocks until a writer comes."""
    made = []

    def make(path):
        path = str(path)
        if os.path.lexists(path):
            os.remove(path)
        os.mkfifo(path)
        made.append(path)
        return path

    yield make
    for path in made:  # release a reader that is still blocked (a failing test), so its thread ends
        try:
            os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))
        except OSError:
            pass


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


# -- CSV ---------------------------------------------------------------------------------------------------

def test_csv_row_with_more_fields_than_the_header_is_refused_naming_file_and_line(tmp_path, capsys):
    path = tmp_path / "pairs.csv"
    path.write_text("image,caption\na.jpg,a dog\nb.jpg,a red car, parked by the road\n", encoding="utf-8")
    code, err = _cli(["run", "--model", TINY_MODEL, "--data", str(path)], capsys)
    assert code == 2
    _one_error_line(err, "pairs.csv:3", "3 fields", "header has 2", "quote")


def test_csv_row_with_fewer_fields_than_the_header_is_refused(tmp_path):
    path = tmp_path / "groups.csv"
    path.write_text("image,caption,group\na.jpg,a dog,1\nb.jpg,a cat\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"groups\.csv:3: 2 fields.*header has 3"):
        load_pairs(str(path))


def test_quoted_csv_caption_keeps_its_commas_and_quoted_newlines_keep_line_numbers(tmp_path):
    path = tmp_path / "quoted.csv"
    path.write_text('image,caption\na.jpg,"a red car, parked"\nb.jpg,"two\nlines"\nc.jpg,x,extra\n',
                    encoding="utf-8")
    with pytest.raises(DataError, match=r"quoted\.csv:5: 3 fields"):  # line 5: the quoted newline counts
        load_pairs(str(path))
    path.write_text('image,caption\na.jpg,"a red car, parked"\n', encoding="utf-8")
    assert load_pairs(str(path)).texts == ["a red car, parked"]


def test_utf8_byte_order_mark_is_accepted_in_every_text_format(tmp_path):
    bom = "\ufeff"
    (tmp_path / "bom.csv").write_text(bom + "image,caption\na.jpg,a dog\n", encoding="utf-8")
    (tmp_path / "bom.jsonl").write_text(bom + '{"image": "a.jpg", "caption": "a dog"}\n', encoding="utf-8")
    (tmp_path / "bom.json").write_text(bom + '[{"image": "a.jpg", "caption": ["a dog"]}]', encoding="utf-8")
    for name in ("bom.csv", "bom.jsonl", "bom.json"):
        ds = load_dataset(str(tmp_path / name))
        assert ds.images == ["a.jpg"] and ds.texts == ["a dog"], name
    nocaps = tmp_path / "nocaps.json"
    nocaps.write_text(bom + '[{"image": "a.jpg", "caption": ["a dog"], "domain": "in-domain"}]', encoding="utf-8")
    assert load_dataset(f"nocaps_in:{nocaps}").texts == ["a dog"]


def test_utf8_byte_order_mark_is_accepted_in_a_config(tmp_path, capsys):
    from queryshift.configs import load_run_config

    path = tmp_path / "bom.yaml"
    path.write_text("\ufeffmethod: tent\nseed: 3\n", encoding="utf-8")
    assert load_run_config(str(path)) == {"method": "tent", "seed": 3}


# -- captions and other fields of the wrong type -----------------------------------------------------------

@pytest.mark.parametrize("caption,shown", [
    ({"text": "a dog"}, "dict"), (5, "int"), (None, "null"), (True, "bool"), ([["a dog"]], "list"),
    (["a dog", 5], "int"), (["a dog", None], "null"), (["a dog", {"t": 1}], "dict"),
])
def test_karpathy_caption_of_the_wrong_type_is_named(tmp_path, capsys, caption, shown):
    path = tmp_path / "kp.json"
    path.write_text(json.dumps([{"image": "a.jpg", "caption": ["fine"]}, {"image": "b.jpg", "caption": caption}]))
    code, err = _cli(["run", "--model", TINY_MODEL, "--data", str(path)], capsys)
    assert code == 2
    _one_error_line(err, "kp.json", "entry 1", "'caption'", shown)


@pytest.mark.parametrize("caption,shown", [({"text": "a dog"}, "dict"), (5, "int"), (None, "null"),
                                           (["a dog"], "list"), (1.5, "float")])
def test_jsonl_caption_of_the_wrong_type_is_named(tmp_path, capsys, caption, shown):
    path = _write_jsonl(tmp_path / "pairs.jsonl", [{"image": "a.jpg", "caption": "ok"},
                                                   {"image": "b.jpg", "caption": caption}])
    code, err = _cli(["run", "--model", TINY_MODEL, "--data", path], capsys)
    assert code == 2
    _one_error_line(err, "pairs.jsonl:2", "'caption'", shown)


@pytest.mark.parametrize("row,match", [
    ({"image": 5, "caption": "x"}, r"pairs\.jsonl:1: 'image' must be .*int"),
    ({"image": "a.jpg", "caption": "x", "group": [1, 2]}, r"pairs\.jsonl:1: 'group' must be .*list"),
    ({"image": "a.jpg", "caption": "x", "group": {"id": 1}}, r"pairs\.jsonl:1: 'group' must be .*dict"),
])
def test_jsonl_image_and_group_of_the_wrong_type_are_named(tmp_path, row, match):
    with pytest.raises(DataError, match=match):
        load_pairs(_write_jsonl(tmp_path / "pairs.jsonl", [row]))


def test_a_row_without_a_group_among_grouped_rows_is_refused(tmp_path):
    """Otherwise every ungrouped image would be one group (None) and count as relevant to the others."""
    path = _write_jsonl(tmp_path / "pairs.jsonl", [{"image": "a.jpg", "caption": "x", "group": 1},
                                                   {"image": "b.jpg", "caption": "y"},
                                                   {"image": "c.jpg", "caption": "z"}])
    with pytest.raises(DataError, match=r"pairs\.jsonl:2: no 'group'"):
        load_pairs(path)


@pytest.mark.parametrize("caption,shown", [({"t": "a dog"}, "dict"), (5, "int"), (None, "null"), ([7], "int")])
def test_nocaps_and_reid_captions_of_the_wrong_type_are_named(tmp_path, caption, shown):
    nocaps = tmp_path / "nocaps.json"
    nocaps.write_text(json.dumps([{"image": "a.jpg", "caption": caption, "domain": "in-domain"}]))
    with pytest.raises(DataError, match=rf"nocaps\.json: entry 0 .*'caption'.*{shown}"):
        load_dataset(f"nocaps_entire:{nocaps}")
    reid = tmp_path / "reid.json"
    reid.write_text(json.dumps([{"split": "test", "captions": caption, "file_path": "a.jpg", "id": 1}]))
    with pytest.raises(DataError, match=rf"reid\.json: entry 0 .*'captions'.*{shown}"):
        load_dataset(f"cuhk_pedes:{reid}")


def test_fashion_gen_caption_of_the_wrong_type_is_named(tmp_path):
    import pickle

    folder = tmp_path / "full_valid_info_PAI"
    folder.mkdir()
    with open(folder / "0.pkl", "wb") as f:
        pickle.dump({"captions": {"t": "a dress"}, "img_name": "1_a.png", "super_cls_id": "21"}, f)
    with pytest.raises(DataError, match=r"0\.pkl: 'captions' must be .*dict"):
        load_dataset(f"fashion_gen:{tmp_path}")


def _rewrite(path, edit):
    with open(path, encoding="utf-8") as f:
        obj = json.load(f)
    edit(obj)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f)


@pytest.mark.parametrize("field,value", [("reference", ["x"]), ("target_hard", {"x": 1}), ("caption", 5)])
def test_cirr_fields_of_the_wrong_type_are_named(tmp_path, field, value):
    root = make_cirr(tmp_path / "cirr_root")
    cap = os.path.join(root, "cirr", "captions", "cap.rc2.val.json")
    _rewrite(cap, lambda entries: entries[1].__setitem__(field, value))
    with pytest.raises(DataError, match=rf"cap\.rc2\.val\.json: entry 1 .*'{field}'"):
        load_dataset(f"cirr:{root}")


def test_cirr_img_set_member_of_the_wrong_type_is_named(tmp_path):
    root = make_cirr(tmp_path / "cirr_root")
    cap = os.path.join(root, "cirr", "captions", "cap.rc2.val.json")
    _rewrite(cap, lambda entries: entries[0]["img_set"]["members"].append(["x"]))
    with pytest.raises(DataError, match=r"entry 0 .*img_set\.members"):
        load_dataset(f"cirr:{root}")


@pytest.mark.parametrize("field,value", [("candidate", ["x"]), ("target", {"x": 1}), ("captions", ["ok", 5])])
def test_fashioniq_fields_of_the_wrong_type_are_named(tmp_path, field, value):
    root = make_fashioniq(tmp_path / "fiq")
    cap = os.path.join(root, "captions", "cap.dress.val.json")
    _rewrite(cap, lambda entries: entries[1].__setitem__(field, value))
    with pytest.raises(DataError, match=rf"cap\.dress\.val\.json: entry 1.*'{field}'"):
        load_dataset(f"fashioniq:{root}:dress")


# -- nesting, huge numbers -----------------------------------------------------------------------------------

DEEP = "[" * 200_000 + "]" * 200_000


@pytest.mark.parametrize("name,text", [
    ("deep.json", DEEP), ("deep.jsonl", '{"image": "a.jpg", "caption": ' + DEEP + "}\n"),
    ("bigint.json", "[" + "9" * 50_000 + "]"),
    ("bigint.jsonl", '{"image": "a.jpg", "caption": ' + "9" * 50_000 + "}\n"),
])
def test_deeply_nested_or_huge_json_data_is_one_line_naming_the_file(tmp_path, capsys, name, text):
    (tmp_path / name).write_text(text)
    code, err = _cli(["run", "--model", TINY_MODEL, "--data", str(tmp_path / name)], capsys)
    assert code == 2
    _one_error_line(err, name)
    assert len(err) < 500


def test_deeply_nested_json_in_named_dataset_files_is_named(tmp_path):
    path = tmp_path / "annotations.json"
    path.write_text(DEEP)
    with pytest.raises(DataError, match="annotations.json.*nested"):
        load_dataset(f"nocaps_entire:{path}")
    root = make_cirr(tmp_path / "cirr_root")
    split = os.path.join(root, "cirr", "image_splits", "split.rc2.val.json")
    with open(split, "w") as f:
        f.write(DEEP)
    with pytest.raises(DataError, match="split.rc2.val.json.*nested"):
        load_dataset(f"cirr:{root}")


def test_deeply_nested_yaml_config_is_one_line_naming_the_file(tmp_path, capsys):
    path = tmp_path / "deep.yaml"
    path.write_text("hparams: {x: " + "[" * 100_000 + "]" * 100_000 + "}\n")
    code, err = _cli(["run", "--config", str(path)], capsys)
    assert code == 2
    _one_error_line(err, "deep.yaml")


# -- YAML aliases and echoed values --------------------------------------------------------------------------

def _laughs(levels: int) -> str:
    """A list whose aliases expand to 9**levels strings: a few hundred bytes of YAML."""
    parts = ["&l0 [lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    parts += [f"&l{k} [" + ", ".join([f"*l{k - 1}"] * 9) + "]" for k in range(1, levels)]
    return "[" + ", ".join(parts) + "]"


def test_yaml_alias_bomb_config_is_refused_in_one_short_line(tmp_path, capsys):
    path = tmp_path / "bomb.yaml"
    path.write_text(f"method: tent\nseed: {_laughs(6)}\n")
    assert path.stat().st_size < 1000
    code, err = _cli(["run", "--config", str(path)], capsys)
    assert code == 2
    _one_error_line(err, "bomb.yaml")
    assert len(err) < 600 and "YAML alias" in err


def test_yaml_alias_bomb_in_a_suite_is_refused(tmp_path, capsys):
    path = tmp_path / "suite.yaml"
    path.write_text(f"base: {{method: tent}}\ngrid: {{seed: [1, 2], foo: [{_laughs(6)}]}}\n")
    code, err = _cli(["bench", "--suite", str(path), "--out", str(tmp_path / "out")], capsys)
    assert code == 2
    _one_error_line(err, "suite.yaml", "YAML alias")
    assert len(err) < 600 and not (tmp_path / "out").exists()


def test_small_yaml_aliases_are_fine(tmp_path):
    from queryshift.configs import load_run_config

    path = tmp_path / "ok.yaml"
    path.write_text("method: tent\nhparams: &h {tau: 0.01}\n")
    assert load_run_config(str(path))["hparams"] == {"tau": 0.01}


@pytest.mark.parametrize("text,field", [
    ("seed: " + "x" * 100_000 + "\n", "seed"),
    ("record: " + "y" * 100_000 + "\n", "record"),
    ("? " + "z" * 100_000 + "\n: 1\n", "unknown key"),  # an explicit key: a plain one stops at 1024
])
def test_long_config_values_are_cut_in_messages(tmp_path, capsys, text, field):
    path = tmp_path / "long.yaml"
    path.write_text(text)
    code, err = _cli(["run", "--config", str(path)], capsys)
    assert code == 2
    _one_error_line(err, "long.yaml", field)
    assert len(err) < 1000


def test_long_suite_grid_value_is_cut_in_messages(tmp_path, capsys):
    path = tmp_path / "suite.yaml"
    path.write_text("base: {method: tent}\ngrid: {foo: [" + "w" * 100_000 + "]}\n")
    code, err = _cli(["bench", "--suite", str(path), "--out", str(tmp_path / "out")], capsys)
    assert code == 2
    _one_error_line(err, "suite.yaml", "foo")
    assert len(err) < 1000


def test_long_data_values_are_cut_in_messages(tmp_path, capsys):
    long = "v" * 100_000
    path = _write_jsonl(tmp_path / "pairs.jsonl", [{"image": long, "caption": "x", "group": 1},
                                                   {"image": long, "caption": "y", "group": 2}])
    code, err = _cli(["run", "--model", TINY_MODEL, "--data", path], capsys)
    assert code == 2
    _one_error_line(err, "pairs.jsonl:2", "two different groups")
    assert len(err) < 1000
    kp = tmp_path / "kp.json"
    kp.write_text(json.dumps([{"image": long, "caption": []}]))
    code, err = _cli(["run", "--model", TINY_MODEL, "--data", str(kp)], capsys)
    assert code == 2
    _one_error_line(err, "kp.json", "entry 0")
    assert len(err) < 1000


def test_short_repr_bounds_any_value():
    from queryshift.userfiles import short_repr

    shared = ["lol"] * 9
    for _ in range(8):
        shared = [shared] * 9  # 9**9 strings once expanded
    assert len(short_repr(shared)) <= 200
    assert len(short_repr("x" * 10**6)) <= 200 and short_repr("abc") == "'abc'" and short_repr(None) == "null"


# -- special files where a file is expected ------------------------------------------------------------------

def test_image_that_is_a_fifo_is_refused_not_waited_for(karpathy, fifo):
    data, root = karpathy
    fifo(os.path.join(root, "img", "3.jpg"))
    ds = load_karpathy(data, root)
    box = _within_deadline(ds.load_image, 3)
    assert isinstance(box.get("error"), DataError), box
    assert "3.jpg" in str(box["error"]) and "FIFO" in str(box["error"])


@pytest.mark.parametrize("special,kind", [("/dev/null", "character device"), ("folder", "directory")])
def test_image_that_is_a_device_or_a_folder_is_refused(karpathy, special, kind):
    data, root = karpathy
    image = os.path.join(root, "img", "2.jpg")
    os.remove(image)
    if special == "folder":
        os.mkdir(image)
    else:
        os.symlink(special, image)
    with pytest.raises(DataError, match=rf"2\.jpg.*{kind}"):
        load_karpathy(data, root).load_image(2)


def test_run_with_skip_bad_images_skips_a_fifo_image(karpathy, fifo, tmp_path, capsys):
    data, root = karpathy
    fifo(os.path.join(root, "img", "5.jpg"))
    argv = ["run", "--model", TINY_MODEL, "--data", data, "--image-root", root, "--skip-bad-images",
            "--cache-dir", str(tmp_path / "cache"), "--no-progress", "--batch-size", "4", "--out", str(tmp_path / "r")]
    box = _within_deadline(cli_main, argv)
    assert box.get("result") == 0, box
    result = json.loads((tmp_path / "r" / "result.json").read_text())
    assert result["n_queries"] == 7 and len(result["skipped_items"]) == 1
    assert "5.jpg" in result["skipped_items"][0] and "FIFO" in result["skipped_items"][0]
    assert "skipped 1 unreadable image(s)" in capsys.readouterr().err  # said at the time, not only in the file


@pytest.mark.parametrize("option,name", [("--data", "ann.json"), ("--data", "pairs.csv"),
                                         ("--data", "pairs.jsonl"), ("--config", "run.yaml")])
def test_annotation_or_config_that_is_a_fifo_is_refused(tmp_path, fifo, capsys, option, name):
    path = tmp_path / name
    fifo(path)
    argv = ["run", "--model", TINY_MODEL, option, str(path), "--no-progress"]
    box = _within_deadline(cli_main, argv)
    assert box.get("result") == 2, box
    _one_error_line(capsys.readouterr().err, name, "FIFO")


def test_named_dataset_file_that_is_a_fifo_is_refused(tmp_path, fifo):
    root = make_cirr(tmp_path / "cirr_root")
    fifo(os.path.join(root, "cirr", "captions", "cap.rc2.val.json"))
    box = _within_deadline(load_dataset, f"cirr:{root}")
    assert isinstance(box.get("error"), DataError) and "cap.rc2.val.json" in str(box["error"]), box


def test_corrupt_captions_with_a_fifo_as_data_is_refused(tmp_path, fifo, capsys):
    path = tmp_path / "ann.json"
    fifo(path)
    argv = ["corrupt", "--data", str(path), "--shift", "ocr:1", "--out", str(tmp_path / "out"), "--no-progress"]
    box = _within_deadline(cli_main, argv)
    assert box.get("result") == 2, box
    _one_error_line(capsys.readouterr().err, "ann.json")


# -- decompression bombs -------------------------------------------------------------------------------------

@pytest.fixture
def bomb(karpathy, monkeypatch):
    """Image 6 is past PIL's pixel limit (lowered for the test: the mechanism is the same at 89M pixels)."""
    data, root = karpathy
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 2000)  # the other images are 40x48 = 1920 pixels
    return data, root, os.path.join(root, "img", "6.jpg")


@pytest.mark.parametrize("size", [(60, 60), (100, 100)])  # PIL warns above the limit, refuses above twice it
def test_decompression_bomb_image_is_one_line_naming_it(bomb, tmp_path, capsys, size):
    data, root, image = bomb
    Image.new("RGB", size).save(image)
    code, err = _cli(["run", "--model", TINY_MODEL, "--data", data, "--image-root", root,
                      "--cache-dir", str(tmp_path / "cache"), "--batch-size", "4"], capsys)
    assert code == 2
    _one_error_line(err, "6.jpg", "pixels")


@pytest.mark.parametrize("size", [(60, 60), (100, 100)])
def test_decompression_bomb_image_is_skipped_with_skip_bad_images(bomb, tmp_path, capsys, size):
    data, root, image = bomb
    Image.new("RGB", size).save(image)
    out = tmp_path / "run"
    code, err = _cli(["run", "--model", TINY_MODEL, "--data", data, "--image-root", root, "--skip-bad-images",
                      "--cache-dir", str(tmp_path / "cache"), "--batch-size", "4", "--out", str(out)], capsys)
    assert code == 0, err
    result = json.loads((out / "result.json").read_text())
    assert result["n_queries"] == 7 and len(result["skipped_items"]) == 1
    assert "6.jpg" in result["skipped_items"][0] and "pixels" in result["skipped_items"][0]


def test_corrupt_captions_of_a_karpathy_json_with_a_byte_order_mark(tmp_path, capsys):
    path = tmp_path / "bom.json"
    path.write_text("\ufeff" + json.dumps([{"image": "a.jpg", "caption": ["a red car parked by the road"]}]),
                    encoding="utf-8")
    code, err = _cli(["corrupt", "--data", str(path), "--shift", "char_swap:7", "--out", str(tmp_path / "out")],
                     capsys)
    assert code == 0, err
    written = json.loads((tmp_path / "out" / "annotation_RandomCharAug_swap" / "7" / "bom.json").read_text())
    assert written[0]["image"] == "a.jpg" and written[0]["caption"][0] != "a red car parked by the road"


def test_config_include_that_is_not_a_path_is_named(tmp_path, capsys):
    path = tmp_path / "inc.yaml"
    path.write_text("config: [a.yaml]\nmethod: tent\n")
    code, err = _cli(["run", "--config", str(path)], capsys)
    assert code == 2
    _one_error_line(err, "inc.yaml", "'config'", "list")


@pytest.mark.parametrize("value", ["x" * 100_000, _laughs(5)])
def test_long_hyper_parameter_values_are_cut_in_messages(tmp_path, capsys, value):
    code, err = _cli(["run", "--model", TINY_MODEL, "--data", "shapes", "--method", "tent", "--hparam",
                      f"tau={value}"], capsys)
    assert code == 2
    _one_error_line(err, "tau")
    assert len(err) < 600


def test_csv_field_past_the_csv_limit_is_one_line_naming_file_and_line(tmp_path, capsys):
    path = tmp_path / "big.csv"
    path.write_text("image,caption\na.jpg,a dog\nb.jpg,\"" + "w" * 200_000 + "\"\n", encoding="utf-8")
    code, err = _cli(["run", "--model", TINY_MODEL, "--data", str(path)], capsys)
    assert code == 2
    _one_error_line(err, "big.csv:3", "CSV")
    assert len(err) < 600


@pytest.mark.parametrize("group", ["NaN", "Infinity"])
def test_non_finite_group_id_is_refused(tmp_path, group):
    """NaN never equals itself: each NaN row would be a group of its own, whatever the file meant."""
    path = tmp_path / "pairs.jsonl"
    path.write_text('{"image": "a.jpg", "caption": "x", "group": ' + group + "}\n")
    with pytest.raises(DataError, match=r"pairs\.jsonl:1: 'group'"):
        load_pairs(str(path))
    reid = tmp_path / "reid.json"
    reid.write_text('[{"split": "test", "captions": ["a man"], "file_path": "a.jpg", "id": ' + group + "}]")
    with pytest.raises(DataError, match=r"reid\.json: entry 0 .*'id'"):
        load_dataset(f"cuhk_pedes:{reid}")


@pytest.mark.parametrize("bad", ["missing", "bomb"])
def test_bad_image_read_in_a_loader_worker_is_one_line_without_the_workers_traceback(bomb, tmp_path, capsys, bad):
    """Worker processes hand an exception back with their traceback folded into its message."""
    data, root, image = bomb
    if bad == "missing":
        os.remove(image)
    else:
        Image.new("RGB", (100, 100)).save(image)
    code, err = _cli(["run", "--model", TINY_MODEL, "--data", data, "--image-root", root, "--num-workers", "1",
                      "--cache-dir", str(tmp_path / "cache"), "--batch-size", "4"], capsys)
    assert code == 2
    _one_error_line(err, "6.jpg")
    assert "Traceback" not in err and "worker" not in err and len(err) < 600
