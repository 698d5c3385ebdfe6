"""Every shipped run config (queryshift/suites/runs) loads and validates; the shipped suites (queryshift/suites)
expand; absent paths are reported, not raised."""

from __future__ import annotations

import glob
import os

import pytest

from queryshift.configs import ConfigError, check_paths, load_run_config, load_suite, suite_runs
from queryshift.engine import RunConfig

SUITE_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "src", "queryshift", "suites")
ROOT = os.path.join(SUITE_DIR, "runs")  # the run configs the shipped suites build on (package data too)
RUNS = sorted(glob.glob(os.path.join(ROOT, "**", "*.yaml"), recursive=True))
SUITES = sorted(glob.glob(os.path.join(SUITE_DIR, "*.yaml")))
IMAGE_CORRUPTIONS = 16
TEXT_CORRUPTIONS = 15


def test_configs_exist():
    assert len(RUNS) >= 10 and len(SUITES) >= 10


@pytest.mark.parametrize("path", RUNS, ids=lambda p: os.path.relpath(p, ROOT))
def test_run_config_validates(path):
    cfg = load_run_config(path)
    RunConfig.from_dict(cfg, source=path)
    assert cfg["batch_size"] == 64 and cfg["steps"] == 3 and cfg["seed"] == 42
    if cfg["model"].startswith("hf-blip") and cfg["direction"] == "t2i":
        assert cfg["lr"] == pytest.approx(3e-5)
    assert RunConfig.from_dict(cfg).resolved_lr() == pytest.approx(
        3e-5 if cfg["model"].startswith("hf-blip") and cfg["direction"] == "t2i" else 3e-4)


@pytest.mark.parametrize("path", SUITES, ids=os.path.basename)
def test_suite_expands(path):
    base, runs, published = load_suite(path)
    _, labelled, _, table = suite_runs(path)
    assert runs and len(runs) == len(labelled)
    methods = {r["method"] for r in runs}
    assert "source" in methods  # every table compares against the unadapted model
    assert set(published) <= methods
    for labels, run in labelled:
        RunConfig.from_dict(run, source=path)
        assert table["rows"] in labels
    name = os.path.basename(path)
    if name.startswith(("coco-c", "flickr-c")):
        columns = {labels[table["columns"]] for labels, _ in labelled}
        assert len(columns) == (IMAGE_CORRUPTIONS if "-i2t-" in name else TEXT_CORRUPTIONS)
        direction = "i2t" if "-i2t-" in name else "t2i"
        assert all(r["direction"] == direction for r in runs)
        if name.endswith("-released.yaml"):
            assert all(r.get("shift") is None for r in runs)
        else:
            assert all(r["shift"].endswith(":5") for r in runs) if direction == "i2t" else True
            assert not any(r["shift"].startswith("KeyboardAug") for r in runs)
    if name.startswith("qgs-"):
        fashion = [(labels, r) for labels, r in labelled if labels["dataset"] == "fashion_gen"]
        for labels, r in fashion:
            tau = r.get("hparams", {}).get("tau")
            assert tau == (None if labels["method"] in ("source", "tcr", "rest") else 0.001)
            assert r.get("image_root") is None  # the loader's default, not Flickr's folder


def test_published_numbers():
    _, _, pub = load_suite(os.path.join(SUITE_DIR, "coco-c-i2t-blip-base.yaml"))
    assert pub == {"source": 45.0, "tent": 43.0, "eata": 49.3, "sar": 46.0, "read": 46.9, "deyo": 48.2,
                   "tcr": 59.1}
    assert load_suite(os.path.join(SUITE_DIR, "qgs-blip-base.yaml"))[2] == {"source": 62.1, "tcr": 67.0}


def test_check_paths_names_absent_paths(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = load_run_config(os.path.join(ROOT, "qs", "coco-i2t-blip-base.yaml"))
    missing = check_paths(cfg)
    assert any(m.startswith("data: dataset/coco/coco_annotations/coco_karpathy_test.json") for m in missing)
    assert any(m.startswith("image_root: dataset/coco-IP/coco_image") for m in missing)
    assert any("huggingface-cli download Salesforce/blip-itm-base-coco" in m for m in missing)
    (tmp_path / "dataset" / "coco" / "coco_annotations").mkdir(parents=True)
    (tmp_path / "dataset" / "coco" / "coco_annotations" / "coco_karpathy_test.json").write_text("[]")
    (tmp_path / "dataset" / "coco-IP" / "coco_image").mkdir(parents=True)
    assert [m for m in check_paths(cfg) if not m.startswith("model:")] == []
    qgs = dict(cfg, data="nocaps_in:dataset/nocaps/annotations.json", image_root=None,
               model="hf-blip:./weights/blip-base-pretrained")
    assert check_paths(qgs) == ["data: dataset/nocaps/annotations.json (annotation file or dataset root)",
                                "model: ./weights/blip-base-pretrained (model directory)"]


def _yaml(path, text):
    path.write_text(text)
    return str(path)


def test_errors_name_key_and_file(tmp_path):
    bad = _yaml(tmp_path / "bad.yaml", "model: shapes-clip\nlearning_rate: 0.1\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml: unknown key 'learning_rate'"):
        load_run_config(bad)
    with pytest.raises(ConfigError, match=r"'batch_size' must be int"):
        load_run_config(_yaml(tmp_path / "b.yaml", "batch_size: many\n"))
    with pytest.raises(ConfigError, match="direction"):
        load_run_config(_yaml(tmp_path / "d.yaml", "direction: both\n"))
    assert load_run_config(_yaml(tmp_path / "lr.yaml", "lr: 3e-4\n"))["lr"] == pytest.approx(3e-4)
    child = _yaml(tmp_path / "child.yaml", "config: lr.yaml\nmethod: tcr\n")
    assert load_run_config(child) == {"lr": pytest.approx(3e-4), "method": "tcr"}
    suite = _yaml(tmp_path / "s.yaml", "base: {config: lr.yaml}\ngrid: {method: [source]}\ncolumns: 3\n")
    with pytest.raises(ConfigError, match=r"s\.yaml: unknown suite key 'columns'"):
        load_suite(suite)
    suite = _yaml(tmp_path / "s2.yaml", "grid: {method: [source], lr: [1, x]}\n")
    with pytest.raises(ConfigError, match=r"s2\.yaml \(run method=source, lr=x\): 'lr' must be float"):
        load_suite(suite)
    suite = _yaml(tmp_path / "s3.yaml", "grid: {dataset: [coco]}\n")
    with pytest.raises(ConfigError, match="grid axis 'dataset' is not a run setting"):
        load_suite(suite)


def test_grid_bundles_and_rules(tmp_path):
    suite = _yaml(tmp_path / "s.yaml", """
base: {model: shapes-clip, hparams: {t: 0.2}}
grid:
  method: [tcr, rest]
  dataset:
    - {label: one, data: one.json}
    - {data: two.json, image_root: imgs}
rules:
  - when: {method: rest, dataset: one}
    set: {hparams: {tau: 0.5}, steps: 1}
published: {rest: 1.5}
""")
    base, labelled, published, _ = suite_runs(suite)
    assert base == {"model": "shapes-clip", "hparams": {"t": 0.2}}
    assert [labels for labels, _ in labelled] == [
        {"method": "tcr", "dataset": "one"}, {"method": "tcr", "dataset": "data=two.json,image_root=imgs"},
        {"method": "rest", "dataset": "one"}, {"method": "rest", "dataset": "data=two.json,image_root=imgs"}]
    runs = [r for _, r in labelled]
    assert runs[2] == {"model": "shapes-clip", "method": "rest", "data": "one.json", "steps": 1,
                       "hparams": {"t": 0.2, "tau": 0.5}}
    assert runs[3]["hparams"] == {"t": 0.2} and runs[3]["image_root"] == "imgs"
    assert published == {"rest": 1.5}


def test_no_test_suite_uses_a_validation_shift():
    registry = pytest.importorskip("queryshift.shifts.registry")
    assert registry.is_validation("spatter:3") and registry.is_validation("style:sketch")
    assert registry.is_validation("stream:temporal=clean,saturate:5") and registry.is_validation("style:chatty")
    assert not registry.is_validation("fog:5") and not registry.is_validation("style:outline")
    assert not registry.is_validation(None) and not registry.is_validation("stream:temporal")
    for path in SUITES:
        if os.path.basename(path).startswith("validation"):
            continue
        for run in load_suite(path)[1]:
            assert not registry.is_validation(run.get("shift")), (path, run["shift"])


def test_suite_shifts_are_known_corruptions():
    registry = pytest.importorskip("queryshift.shifts.registry")
    from queryshift import shifts

    for path in SUITES:
        for run in load_suite(path)[1]:
            if run["direction"] == "c2i":  # composed queries: an image part, a text part or both
                from queryshift.engine.composed import build_composed_shift

                parts = [p.partition(":")[0] for p in (run.get("shift") or "").split("+") if p]
                assert all(p in registry.IMAGE_CORRUPTIONS or p in registry.TEXT_CORRUPTIONS for p in parts), path
                if not any(p in registry.SENTENCE_CORRUPTIONS for p in parts):  # those load models when built
                    build_composed_shift(run.get("shift"))
                continue
            from queryshift.modalities import parse_direction

            modality = parse_direction(run["direction"])[0]  # the query's: audio in a2v, video in v2a
            name, _, level = (run.get("shift") or "").partition(":")
            if os.path.basename(path).startswith(("synthetic", "validation")):
                shifts.build(run.get("shift"), modality)  # offline suites: every shift resolves here
                continue  # the paper-row checks below do not apply to them
            if not name:
                continue
            if run["direction"] == "i2t":
                assert name in registry.IMAGE_CORRUPTIONS and level == "5", (path, run["shift"])
            else:
                assert name in registry.TEXT_CORRUPTIONS and name != "KeyboardAug", (path, run["shift"])


def test_check_paths_names_missing_audio_visual_backbones(tmp_path):
    assert check_paths({"model": "cav-mae:/nowhere/as2m.pth", "data": "shapes-av"}) == [
        "model: /nowhere/as2m.pth (CAV-MAE checkpoint or its directory)"]
    assert check_paths({"model": "hf-clap:/nowhere/clap"}) == ["model: /nowhere/clap (model directory)"]
    (tmp_path / "ckpt.pth").write_bytes(b"")
    assert check_paths({"model": f"cav-mae:{tmp_path / 'ckpt.pth'}"}) == []
