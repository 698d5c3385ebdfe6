"""Composed queries (--direction c2i) through the engine: the composed query encoder, shifts of either part,
every method unchanged, the shipped shapes-cir model and train-combiner."""

from __future__ import annotations

import argparse
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from queryshift import methods, shifts
from queryshift.cli import main as cli_main
from queryshift.commands import train_combiner
from queryshift.data import DataError, load_dataset
from queryshift.data.shapes import IMAGE_SIZE
from queryshift.engine import RunConfig, run, weights_digest
from queryshift.engine.composed import ComposedShift, build_composed_shift
from queryshift.engine.stream import QueryItems, collate, to_model_input
from queryshift.methods.components import index_batch
from queryshift.models import load_model
from queryshift.models.composed import (
    SHIPPED_COMBINERS,
    ComposedEncoder,
    GatedCombiner,
    SumComposer,
    compose,
    load_combiner,
)

from .cir_fixtures import make_cirr

MODEL = "openclip:qs-tiny/random"


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return compose(load_model(MODEL))


def _batch(model, data, n=4, shift=None):
    items = QueryItems(data, "composed", list(range(n)), shift or build_composed_shift(None), 0, model, 30)
    return to_model_input(model, "composed", collate([items[p] for p in range(n)])[2], "cpu")


def test_sum_is_the_default_composer_and_a_composed_model_keeps_its_own():
    base = load_model(MODEL)
    composed = compose(base)
    assert isinstance(composed, ComposedEncoder) and isinstance(composed.composer, SumComposer)
    assert composed.name == f"{MODEL}+sum"
    assert compose(composed) is composed
    with pytest.raises(ValueError, match="unknown composer 'mean'"):
        compose(base, "mean")


def test_composed_queries_adapt_the_layernorms_of_both_towers(tiny):
    names = {n for n, _ in tiny.adaptable_parameters("composed")}
    image = {n for n, _ in tiny.adaptable_parameters("image")}
    text = {n for n, _ in tiny.adaptable_parameters("text")}
    assert image and text and names == image | text
    assert all(n.startswith("base.model.visual.") or n.startswith("base.model.transformer.") for n in names)
    assert not any(n.startswith("composer") for n in names)


def test_composed_embedding_depends_on_both_parts(tiny):
    data = load_dataset("shapes-cir:test:8")
    batch = _batch(tiny, data)
    q = tiny.encode("composed", batch)
    assert q.shape == (4, tiny.encode("image", batch["image"]).shape[1])
    assert torch.allclose(q.norm(dim=1), torch.ones(4), atol=1e-5)
    other_text = dict(batch, text=batch["text"].roll(1, 0))
    other_image = dict(batch, image=batch["image"].roll(1, 0))
    assert not torch.allclose(q, tiny.encode("composed", other_text))
    assert not torch.allclose(q, tiny.encode("composed", other_image))


def test_image_text_and_combined_shifts_touch_their_part_only(tiny):
    data = load_dataset("shapes-cir:test:8")
    clean = _batch(tiny, data)
    noisy = _batch(tiny, data, shift=build_composed_shift("gaussian_noise:3"))
    typos = _batch(tiny, data, shift=build_composed_shift("RandomCharAug_swap:5"))
    both = _batch(tiny, data, shift=build_composed_shift("RandomCharAug_swap:5+gaussian_noise:3"))
    assert not torch.equal(noisy["image"], clean["image"]) and torch.equal(noisy["text"], clean["text"])
    assert torch.equal(typos["image"], clean["image"]) and not torch.equal(typos["text"], clean["text"])
    # each part has its own random stream: the combined shift is the two single shifts together
    assert torch.equal(both["image"], noisy["image"]) and torch.equal(both["text"], typos["text"])
    assert build_composed_shift("gaussian_noise:3+RandomCharAug_swap:5").name == "gaussian_noise:3+RandomCharAug_swap:5"


def test_bad_composed_shifts_are_refused():
    with pytest.raises(ValueError, match="two image shifts"):
        build_composed_shift("gaussian_noise:3+fog:2")
    with pytest.raises(ValueError, match="'sparkle:3' is neither an image nor a text shift"):
        build_composed_shift("sparkle:3")
    assert isinstance(build_composed_shift("clean"), ComposedShift)


def test_a_shift_that_empties_the_text_is_named():
    class Blank(shifts.QueryShift):
        name = "blank"

        def __call__(self, item, *args):
            return ""

    data = load_dataset("shapes-cir:test:4")
    shift = ComposedShift(shifts.QueryShift(), Blank())
    items = QueryItems(data, "composed", [2], shift, 0, load_model(MODEL), 30)
    with pytest.raises(DataError, match="composed query 2: the modification text is empty after the shift 'blank'"):
        items[0]


def test_composer_option_is_for_c2i_only():
    with pytest.raises(ValueError, match="applies to composed queries only"):
        RunConfig(direction="i2t", composer="sum")
    with pytest.raises(ValueError, match="direction must be <query>2<gallery>.*got 'x2y'"):
        RunConfig(direction="x2y")


@pytest.mark.parametrize("method", methods.available())
def test_every_method_runs_unchanged_on_composed_queries(tmp_path, method):
    cfg = RunConfig(model=MODEL, data="shapes-cir:test:24", direction="c2i", method=method, batch_size=8, steps=1,
                    shift="gaussian_noise:3+RandomCharAug_swap:5", cache_dir=str(tmp_path), progress=False)
    result = run(cfg)
    assert result["n_queries"] == 24 and result["direction"] == "c2i"
    assert 0 <= result["r1"] <= result["r5"] <= result["r10"] <= result["r50"] <= 100
    assert result["n_gallery"] == len(load_dataset("shapes-cir:test:24").images)


def test_tent_on_composed_queries_moves_both_towers_and_nothing_else(tmp_path):
    torch.manual_seed(0)
    model = compose(load_model(MODEL))
    data = load_dataset("shapes-cir:test:16")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    gallery = torch.nn.functional.normalize(torch.randn(len(data.images), 32), dim=1)
    method = methods.get("tent")(model, gallery, "composed", methods.AdaptConfig(lr=1e-2))
    method.step(_batch(model, data, n=16))
    moved = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    allowed = {n for n, _ in model.adaptable_parameters("composed")}
    assert moved and moved <= allowed
    assert any(".visual." in n for n in moved) and any(".transformer." in n for n in moved)


def test_cirr_run_reports_r50_and_recall_subset(tmp_path):
    root = make_cirr(tmp_path / "cirr")
    result = run(RunConfig(model=MODEL, data=f"cirr:{root}", direction="c2i", method="tcr", batch_size=2,
                           cache_dir=str(tmp_path / "cache"), progress=False, out=str(tmp_path / "out")))
    assert {"r1", "r5", "r10", "r50", "rsubset1", "rsubset2", "rsubset3"} <= set(result)
    assert result["r50"] == 100.0  # a gallery of 11 ranked images
    assert result["rsubset3"] >= result["rsubset2"] >= result["rsubset1"] >= result["r1"]
    assert result["rsubset1"] >= result["r1"]
    log = [json.loads(line) for line in (tmp_path / "out" / "log.jsonl").read_text().splitlines()]
    assert all(max(row["ranks"]) <= 10 for row in log)  # the reference is never ranked: 11 candidates


def test_run_contract_with_the_shipped_shapes_cir_model(tmp_path, capsys):
    code = cli_main(["run", "--model", "shapes-cir", "--data", "shapes-cir:test:40", "--direction", "c2i",
                     "--method", "tcr", "--shift", "gaussian_noise:3", "--cache-dir", str(tmp_path),
                     "--no-progress", "--out", str(tmp_path / "out")])
    assert code == 0
    result = json.loads((tmp_path / "out" / "result.json").read_text())
    assert f"r50 {result['r50']:.2f}" in capsys.readouterr().out
    assert result["model"] == "shapes-cir" and result["shift"] == "gaussian_noise:3"
    assert result["config"]["composer"] is None and result["n_queries"] == 40


def test_shipped_combiner_belongs_to_the_shipped_shapes_clip():
    """Fails when shapes-clip is retrained: rerun 'queryshift train-combiner' (the model card says how)."""
    combiner, meta = load_combiner(SHIPPED_COMBINERS["shapes-cir"][1])
    assert isinstance(combiner, GatedCombiner) and meta["base_model"] == "shapes-clip"
    assert meta["base_weights"] == weights_digest(load_model("shapes-clip"))
    model = load_model("shapes-cir")
    assert isinstance(model, ComposedEncoder) and isinstance(model.composer, GatedCombiner)


def test_train_combiner_learns_and_its_file_is_a_composer(tmp_path, capsys):
    out = tmp_path / "comb.pt"
    code = cli_main(["train-combiner", "--data", "shapes-cir:train:300", "--val-data", "shapes-cir:train:300",
                     "--epochs", "15", "--batch-size", "64", "--out", str(out), "--cache-dir", str(tmp_path),
                     "--no-progress", "--proj-dim", "64", "--hidden-dim", "128"])
    assert code == 0
    meta = json.loads((tmp_path / "comb.json").read_text())
    # on its own training queries the combiner must beat the training-free sum by a wide margin
    assert meta["val_clean"]["r10"] > meta["val_clean_sum"]["r10"] + 5
    assert meta["base_weights"] == weights_digest(load_model("shapes-clip"))
    result = run(RunConfig(model="shapes-clip", data="shapes-cir:train:300", direction="c2i",
                           composer=f"combiner:{out}", cache_dir=str(tmp_path), progress=False))
    # the engine measures what training measured (up to one query flipped by batch-size float noise)
    assert abs(result["r10"] - meta["val_clean"]["r10"]) <= 100 / 300 + 1e-6
    with pytest.raises(ValueError, match="fuses 128-d embeddings but"):
        compose(load_model(MODEL), f"combiner:{out}")


def test_train_combiner_step_budget_and_validation_curve(tmp_path):
    """--steps fixes the optimisation budget whatever the training-set size; --eval-every records the curve."""
    out = tmp_path / "comb.pt"
    assert cli_main(["train-combiner", "--data", "shapes-cir:train:40", "--val-data", "shapes-cir:train:40",
                     "--steps", "5", "--eval-every", "2", "--batch-size", "16", "--negatives", "32",
                     "--hard-negatives", "2", "--out", str(out), "--cache-dir", str(tmp_path), "--no-progress",
                     "--proj-dim", "16", "--hidden-dim", "16"]) == 0
    meta = json.loads((tmp_path / "comb.json").read_text())
    # 40 queries in batches of 16 are 3 steps an epoch: 5 steps end inside the second epoch, as asked
    assert [point["step"] for point in meta["val_curve"]] == [2, 4, 5]
    assert meta["steps"] == 5 and meta["train_queries"] == 40
    # the curve's last point is the trained combiner before its fp16 rounding: the shipped recall, up to a query
    assert abs(meta["val_curve"][-1]["r10"] - meta["val_clean"]["r10"]) <= 100 / 40 + 1e-6


def test_train_combiner_refuses_a_non_positive_step_budget(tmp_path, capsys):
    assert cli_main(["train-combiner", "--steps", "0", "--out", str(tmp_path / "c.pt"), "--no-progress"]) == 2
    assert "--steps must be a positive number" in capsys.readouterr().err


@pytest.mark.parametrize("budget, message", [(["--steps", "5", "--epochs", "2"], "give --steps or --epochs, not both"),
                                             (["--epochs", "0"], "--epochs must be a positive number")])
def test_train_combiner_refuses_an_ambiguous_or_empty_epoch_budget(tmp_path, capsys, budget, message):
    assert cli_main(["train-combiner", *budget, "--out", str(tmp_path / "c.pt"), "--no-progress"]) == 2
    assert message in capsys.readouterr().err


def test_bare_train_combiner_is_the_shipped_combiners_recipe():
    """The model card promises that 'queryshift train-combiner' with no option reproduces the shipped asset."""
    parser = argparse.ArgumentParser()
    train_combiner.add_parser(parser.add_subparsers())
    args = parser.parse_args(["train-combiner"])
    with open(os.path.splitext(SHIPPED_COMBINERS["shapes-cir"][1])[0] + ".json", encoding="utf-8") as f:
        shipped = json.load(f)
    for key in ("data", "val_data", "batch_size", "negatives", "hard_negatives", "lr", "weight_decay",
                "temperature", "seed", "epochs"):
        assert getattr(args, key) == shipped[key], key
    assert args.steps is None and shipped["steps"] == train_combiner.DEFAULT_STEPS  # main() fills the default
    assert args.out == SHIPPED_COMBINERS["shapes-cir"][1]
    for key in ("proj_dim", "hidden_dim", "dropout"):
        assert getattr(args, key) == shipped["hparams"][key], key


def test_train_combiner_refuses_non_composed_data(tmp_path, capsys):
    assert cli_main(["train-combiner", "--data", "shapes:test:10", "--out", str(tmp_path / "c.pt"),
                     "--no-progress"]) == 2
    assert "is not a composed dataset" in capsys.readouterr().err


def test_rendered_reference_is_preprocessed_like_a_gallery_image(tiny):
    data = load_dataset("shapes-cir:test:4")
    items = QueryItems(data, "composed", [1], build_composed_shift(None), 0, tiny, 30)
    _, _, (image, text) = items[0]
    assert torch.equal(image, tiny.preprocess(data.load_image(data.references[1])))
    assert text == data.texts[1]
    reference = data.load_reference(1)
    assert isinstance(reference, Image.Image) and np.asarray(reference).shape == (IMAGE_SIZE, IMAGE_SIZE, 3)


def test_hf_clip_composed_queries_flatten_their_token_dicts(tmp_path):
    pytest.importorskip("transformers")
    from .test_hf_backbones import save_tiny_clip

    spec = f"hf-clip:{save_tiny_clip(str(tmp_path / 'clip'))}"
    model = compose(load_model(spec))
    data = load_dataset("shapes-cir:test:6")
    batch = _batch(model, data, n=6)
    assert {"image", "text.input_ids", "text.attention_mask"} <= set(batch)
    half = index_batch(batch, torch.arange(6) < 3)  # the methods' row selection
    assert torch.allclose(model.encode("composed", half), model.encode("composed", batch)[:3], atol=1e-5)
    result = run(RunConfig(model=spec, data="shapes-cir:test:6", direction="c2i", method="tcr", batch_size=3,
                           cache_dir=str(tmp_path / "cache"), progress=False))
    assert result["n_queries"] == 6


def test_forgetting_on_clean_composed_queries(tmp_path):
    result = run(RunConfig(model=MODEL, data="shapes-cir:test:16", direction="c2i", method="tent", batch_size=8,
                           shift="RandomCharAug_swap:5", eval_clean_after=True, cache_dir=str(tmp_path),
                           progress=False))
    f = result["forgetting"]
    source = run(RunConfig(model=MODEL, data="shapes-cir:test:16", direction="c2i", batch_size=8,
                           cache_dir=str(tmp_path), progress=False))
    assert f["r1_source"] == source["r1"]  # clean queries, source parameters, reference excluded alike


def test_train_combiner_refuses_an_existing_out_before_any_work(tmp_path, capsys):
    out = tmp_path / "comb.pt"
    out.write_bytes(b"the user's combiner")
    code = cli_main(["train-combiner", "--data", "shapes-cir:train:40", "--out", str(out), "--no-progress"])
    assert code == 2 and out.read_bytes() == b"the user's combiner"
    assert "comb.pt exists; pass --overwrite" in capsys.readouterr().err
