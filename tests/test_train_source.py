"""``queryshift train-source``: hard-pair batching and a tiny end-to-end training run."""

import json

import torch

from queryshift.cli import main as cli_main
from queryshift.commands.train_source import hard_partners
from queryshift.models import load_model


def test_hard_partners_share_the_colour_group_and_are_never_the_anchor():
    groups = torch.tensor([0, 1, 0, 2, 1, 0, 3, 1, 1])
    anchors = torch.tensor([0, 1, 2, 3, 4, 5, 6, 7, 8, 0])
    generator = torch.Generator().manual_seed(0)
    seen = set()
    for _ in range(50):
        partners = hard_partners(anchors, groups, generator)
        assert not (partners == anchors).any()
        shared = ~torch.isin(groups[anchors], torch.tensor([2, 3]))  # groups 2 and 3 have a single member
        assert (groups[partners][shared] == groups[anchors][shared]).all()
        seen.update(partners[anchors == 1].tolist())
    assert seen == {4, 7, 8}  # every other member of the group is drawn


def test_train_source_writes_a_loadable_checkpoint_and_its_card_data(tmp_path):
    import open_clip

    from queryshift.models import openclip as backend

    backend._open_clip()
    config = {"embed_dim": 16,
              "vision_cfg": {"image_size": 64, "layers": 1, "width": 32, "head_width": 16, "patch_size": 16},
              "text_cfg": {"context_length": 24, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}
    (tmp_path / "qs-test64.json").write_text(json.dumps(config))
    open_clip.add_model_config(str(tmp_path / "qs-test64.json"))
    torch.manual_seed(0)
    untrained = open_clip.create_model("qs-test64").token_embedding.weight.detach().clone()

    out = tmp_path / "m.pt"
    assert cli_main(["train-source", "--arch", "qs-test64", "--steps", "3", "--train-images", "64",
                     "--batch-size", "16", "--hard-pairs", "0.5", "--warmup", "1", "--out", str(out),
                     "--no-progress"]) == 0
    info = json.loads((tmp_path / "m.json").read_text())
    assert info["steps"] == 3 and info["hard_pairs"] == 0.5 and info["data"] == "shapes:train:64"
    assert set(info["clean_test"]) == {"i2t", "t2i"} and info["clean_test"]["t2i"]["n_queries"] == 5000

    trained = torch.load(out)["token_embedding.weight"].float()
    changed = (trained - untrained.half().float()).abs().sum(1) > 0
    # Only the few dozen tokens the captions use are trained; the rest keep their initialisation.
    assert 10 < int(changed.sum()) < 100
    model = load_model(f"openclip:qs-test64@{out}")
    assert model.tokenize(["a red circle"]).shape[1] == 24


def test_bad_hard_pairs_fraction_is_refused_before_any_work(tmp_path, capsys):
    assert cli_main(["train-source", "--hard-pairs", "0.7", "--out", str(tmp_path / "m.pt"), "--no-progress"]) == 2
    assert "--hard-pairs must be between 0 and 0.5, got 0.7" in capsys.readouterr().err
    assert not (tmp_path / "m.pt").exists()


def test_general_stage_then_customization_from_it(tmp_path):
    """The two-stage recipe end to end on a toy architecture: general corpus, then custom from --init."""
    import open_clip

    from queryshift.models import openclip as backend

    backend._open_clip()
    config = {"embed_dim": 16,
              "vision_cfg": {"image_size": 64, "layers": 1, "width": 32, "head_width": 16, "patch_size": 16},
              "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}
    (tmp_path / "qs-test64g.json").write_text(json.dumps(config))
    open_clip.add_model_config(str(tmp_path / "qs-test64g.json"))
    common = ["--arch", "qs-test64g", "--steps", "2", "--train-images", "32", "--batch-size", "8", "--warmup", "1",
              "--no-progress", "--cache-dir", str(tmp_path / "cache")]
    general, custom = tmp_path / "general.pt", tmp_path / "custom.pt"
    assert cli_main(["train-source", "--stage", "general", "--views", "2", "--out", str(general), *common]) == 0
    info = json.loads((tmp_path / "general.json").read_text())
    assert info["stage"] == "general" and info["views"] == 2 and info["captions_per_image"] == 10
    assert len(list((tmp_path / "cache").iterdir())) == 1  # the rendered views are kept for the next run

    assert cli_main(["train-source", "--stage", "custom", "--init", str(general), "--out", str(custom),
                     *common]) == 0
    info = json.loads((tmp_path / "custom.json").read_text())
    assert info["stage"] == "custom" and info["init"] == "general.pt" and info["captions_per_image"] == 5
    start, end = torch.load(general), torch.load(custom)
    # customization starts from the general weights: a 2-step fine-tune stays close to them
    moved = (end["visual.proj"].float() - start["visual.proj"].float()).abs().mean()
    assert 0 < moved < start["visual.proj"].float().abs().mean()


def test_init_must_exist(tmp_path, capsys):
    assert cli_main(["train-source", "--init", str(tmp_path / "absent.pt"), "--out", str(tmp_path / "m.pt"),
                     "--no-progress"]) == 2
    assert "--init: no checkpoint at" in capsys.readouterr().err


def test_view_cache_is_not_shared_with_a_patched_rendering(tmp_path, monkeypatch):
    """An experiment that swaps the general corpus's photo variation must not read (or leave) the shipped views."""
    from queryshift.commands.train_source import render_cached
    from queryshift.shifts import shapes_general

    args = ("train", 3, 1, True, 0, str(tmp_path))
    shipped, _, _ = render_cached(*args, workers=1)
    assert len(list(tmp_path.iterdir())) == 1
    again, _, _ = render_cached(*args, workers=1)
    assert torch.equal(again, shipped) and len(list(tmp_path.iterdir())) == 1  # same code: the cache is reused

    def inverted(image, rng):
        from PIL import ImageOps
        return ImageOps.invert(image)

    monkeypatch.setattr(shapes_general, "photo_variation", inverted)
    patched, _, _ = render_cached(*args, workers=1)
    assert len(list(tmp_path.iterdir())) == 2  # a view cache of its own
    assert not torch.equal(patched, shipped)
