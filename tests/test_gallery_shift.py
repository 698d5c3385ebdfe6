"""Gallery-side shifts (issue 27): ``--shift`` naming a shift of the gallery's modality only (``traffic:5`` in v2a,
where the queries are video and the gallery is audio) corrupts the gallery items, each with its own generator;
the queries stay clean and the method adapts the query tower. Uses the tiny video-audio backbone of
tests/test_av_run.py."""

from __future__ import annotations

import json
import math

import pytest
import torch

from queryshift import shifts
from queryshift.engine import encode_all, encode_gallery, report, runner
from queryshift.engine.gallery import resolve_shift
from queryshift.engine.retriever import Retriever
from queryshift.engine.stream import QueryItems, collate
from tests.test_av_run import N_CLIPS, TinyAV, cfg, logged_ranks, tiny_av, tiny_av_dataset  # noqa: F401 (fixture)

pytestmark = pytest.mark.usefixtures("tiny_av")  # the tiny video-audio backbone and dataset, registered


@pytest.fixture
def spy(monkeypatch):
    """What each run hands its Retriever: the gallery embeddings and every batch of query input."""
    seen = {"galleries": [], "inputs": []}

    class Spy(Retriever):
        def __init__(self, model, gallery, *args, **kwargs):
            seen["galleries"].append(gallery.clone())
            super().__init__(model, gallery, *args, **kwargs)

        def adapt(self, query_input):
            seen["inputs"].append(query_input.clone())
            return super().adapt(query_input)

    monkeypatch.setattr(runner, "Retriever", Spy)
    return seen


def test_v2a_traffic_shifts_the_gallery_and_leaves_the_queries_clean(spy, tmp_path, capsys):
    shifted = runner.run(cfg(tmp_path, direction="v2a", shift="traffic:5", out=str(tmp_path / "shifted")))
    note = capsys.readouterr().err
    runner.run(cfg(tmp_path, direction="v2a", out=str(tmp_path / "clean")))
    (shifted_gallery, clean_gallery), inputs = spy["galleries"], spy["inputs"]
    assert not torch.allclose(shifted_gallery, clean_gallery, atol=1e-3)  # every run: the audio gallery changed
    half = len(inputs) // 2
    assert half and all(torch.equal(a, b) for a, b in zip(inputs[:half], inputs[half:]))  # the video queries: clean
    assert logged_ranks(tmp_path / "shifted") != logged_ranks(tmp_path / "clean")
    assert shifted["shift"] == "traffic:5" and shifted["shift_side"] == "gallery"
    saved = json.loads((tmp_path / "shifted" / "result.json").read_text())
    assert saved["shift"] == "traffic:5" and saved["shift_side"] == "gallery"
    assert "traffic:5 (gallery)" in (tmp_path / "shifted" / "table.md").read_text()
    assert "audio gallery is shifted" in note and "video queries are clean" in note


def test_a_gallery_shift_gives_each_item_its_own_seeded_draw():
    torch.manual_seed(0)
    # READ's additive noise: a random draw per item (READ's traffic overlay is the same recording every time)
    model, dataset, noise = TinyAV(), tiny_av_dataset(), shifts.build("gaussian_noise:5", "audio")
    got = encode_all(model, dataset, "audio", batch_size=5, shift=noise, seed=3)
    by_hand = []
    for i in range(N_CLIPS):  # each item alone, with the generator private to (seed, item)
        item = noise(dataset.load("audio", i), i, i, N_CLIPS, shifts.item_rng(3, i, "gallery"))
        by_hand.append(model.encode_audio(model.preprocess_audio(item)[None]))
    assert torch.allclose(got, torch.cat(by_hand), atol=1e-5)
    assert not torch.allclose(got, encode_all(model, dataset, "audio", shift=noise, seed=4), atol=1e-3)


def test_the_gallery_cache_never_mixes_clean_and_shifted(tmp_path):
    torch.manual_seed(0)
    model, dataset, traffic = TinyAV(), tiny_av_dataset(), shifts.build("traffic:5", "audio")
    clean = encode_all(model, dataset, "audio")
    shifted = encode_all(model, dataset, "audio", shift=traffic, seed=3)
    for first in ("clean", "shifted"):  # whichever is cached first, the other is never served from it
        cache = str(tmp_path / first)
        calls = [(None, 3), (traffic, 3)] if first == "clean" else [(traffic, 3), (None, 3)]
        got = {s is None: encode_gallery(model, dataset, "audio", cache_dir=cache, shift=s, seed=seed)
               for s, seed in calls}
        assert torch.allclose(got[True], clean, atol=2e-3) and torch.allclose(got[False], shifted, atol=2e-3)
        stores = sorted(p.parent.name for p in (tmp_path / first / "gallery").glob("*/manifest.json"))
        assert len(stores) == 2
    noise, cache = shifts.build("gaussian_noise:5", "audio"), str(tmp_path / "clean")
    seed_3 = encode_gallery(model, dataset, "audio", cache_dir=cache, shift=noise, seed=3)
    seed_4 = encode_gallery(model, dataset, "audio", cache_dir=cache, shift=noise, seed=4)
    assert not torch.allclose(seed_3, shifted, atol=2e-3)  # another shift: another store
    assert not torch.allclose(seed_4, seed_3, atol=2e-3)  # the seed draws the corruption: part of the key
    assert len(list((tmp_path / "clean" / "gallery").glob("*/manifest.json"))) == 4


def test_a2v_traffic_still_shifts_the_queries(spy, tmp_path):
    result = runner.run(cfg(tmp_path, direction="a2v", shift="traffic:5", out=str(tmp_path / "shifted")))
    runner.run(cfg(tmp_path, direction="a2v", out=str(tmp_path / "clean")))
    (shifted_gallery, clean_gallery), inputs = spy["galleries"], spy["inputs"]
    assert torch.equal(shifted_gallery, clean_gallery)  # the video gallery: clean
    half = len(inputs) // 2
    assert not any(torch.equal(a, b) for a, b in zip(inputs[:half], inputs[half:]))  # the audio queries: shifted
    assert result["shift"] == "traffic:5" and result["shift_side"] == "query"


def test_the_query_input_of_a_gallery_shifted_run_is_the_clean_items(spy, tmp_path):
    runner.run(cfg(tmp_path, direction="v2a", shift="traffic:5", batch_size=N_CLIPS, shuffle=False))
    model = TinyAV()
    items = QueryItems(tiny_av_dataset(), "video", list(range(N_CLIPS)), shifts.QueryShift(), 3, model, 30)
    _, _, clean = collate([items[p] for p in range(N_CLIPS)], "video")
    assert torch.equal(spy["inputs"][0], clean)


@pytest.mark.parametrize("spec, query, gallery, side", [
    ("traffic:5", "video", "audio", "gallery"), ("traffic:5", "audio", "video", "query"),
    ("fog:3", "audio", "video", "gallery"), ("gaussian_noise:5", "video", "audio", "query"),
    ("style:outline", "text", "image", "gallery"), ("style:outline", "image", "text", "query"),
    ("RandomCharAug_swap:5", "image", "text", "gallery"), ("stream:temporal", "video", "audio", "query"),
    ("clean", "video", "audio", None),
])
def test_the_side_is_the_query_whenever_the_shift_fits_the_queries(spec, query, gallery, side):
    shift, got = resolve_shift(spec, query, gallery, seed=3)
    assert got == side
    assert shift.modality in (None, query if side == "query" else gallery)


def test_a_shift_of_neither_side_names_the_valid_shifts_of_both(tmp_path):
    with pytest.raises(ValueError, match=r"corrupts image queries, but the queries here are video.*gaussian_noise"
                                         r".*nor does it shift the audio gallery.*traffic"):
        runner.run(cfg(tmp_path, direction="v2a", shift="speckle_noise:3"))


def test_a_gallery_side_stream_is_refused_clearly(tmp_path):
    with pytest.raises(ValueError, match="streams shift the queries only.*e.g. traffic:5"):
        runner.run(cfg(tmp_path, direction="v2a", shift="stream:temporal=clean,traffic:5"))


def test_a_bad_severity_of_a_gallery_shift_is_the_gallery_shifts_complaint(tmp_path):
    with pytest.raises(ValueError, match="traffic.*1-5") as err:
        runner.run(cfg(tmp_path, direction="v2a", shift="traffic:9"))
    assert "queries here are" not in str(err.value)


def test_resume_and_forgetting_use_the_same_shifted_gallery(tmp_path, monkeypatch):
    whole = tmp_path / "whole"
    settings = dict(direction="v2a", method="tent", shift="traffic:5", eval_clean_after=True)
    expected = runner.run(cfg(tmp_path, **settings, out=str(whole)))
    calls = {"n": 0}
    adapt = Retriever.adapt

    def killed_at_the_second_batch(self, query_input):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return adapt(self, query_input)

    part = tmp_path / "part"
    monkeypatch.setattr(Retriever, "adapt", killed_at_the_second_batch)
    with pytest.raises(KeyboardInterrupt):
        runner.run(cfg(tmp_path, **settings, out=str(part), cache_dir=str(tmp_path / "other-cache")))
    monkeypatch.setattr(Retriever, "adapt", adapt)
    resumed = runner.run(cfg(tmp_path, **settings, out=str(part), resume=True))
    assert logged_ranks(part) == logged_ranks(whole) and resumed["r1"] == expected["r1"]
    # forgetting: clean queries (all a gallery-shifted run has) against the run's own shifted gallery, so the
    # source parameters score what a source run under the same gallery shift scores
    scored = {"forgetting": [], "run": []}  # the scores each ranks (R@1 of a random model ties too often)
    ranks_in_report, ranks_in_run = report.rank_queries, runner.rank_queries
    monkeypatch.setattr(report, "rank_queries", lambda s, *a: scored["forgetting"].append(s) or ranks_in_report(s, *a))
    monkeypatch.setattr(runner, "rank_queries", lambda s, *a: scored["run"].append(s) or ranks_in_run(s, *a))
    runner.run(cfg(tmp_path, **settings, out=str(tmp_path / "again")))
    with_source_params = scored["forgetting"][1::2]  # per batch: adapted, then source parameters
    scored["run"].clear()
    runner.run(cfg(tmp_path, direction="v2a", shift="traffic:5"))  # the source model under the gallery shift
    under_gallery_shift = list(scored["run"])
    scored["run"].clear()
    runner.run(cfg(tmp_path, direction="v2a"))
    assert len(with_source_params) == len(under_gallery_shift) == 3
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(with_source_params, under_gallery_shift))
    assert not torch.allclose(torch.cat(with_source_params), torch.cat(scored["run"]), atol=1e-3)


def test_the_v2a_rest_traffic_command_line_runs(tmp_path, capsys):
    from queryshift.cli import main as cli_main

    out = tmp_path / "cli"
    assert cli_main(["run", "--model", "tiny-av:random", "--data", "tiny-av", "--direction", "v2a", "--method",
                     "rest", "--shift", "traffic:5", "--cache-dir", str(tmp_path / "cache"), "--out", str(out),
                     "--no-progress"]) == 0
    printed = capsys.readouterr()
    saved = json.loads((out / "result.json").read_text())
    assert saved["direction"] == "v2a" and saved["method"] == "rest" and saved["shift"] == "traffic:5"
    assert saved["shift_side"] == "gallery" and all(math.isfinite(saved[k]) for k in ("r1", "r5", "r10", "map"))
    assert "traffic:5 (gallery)" in printed.out and "audio gallery is shifted" in printed.err


def test_the_run_help_says_a_gallery_shift_corrupts_the_gallery(capsys):
    from queryshift.cli import main as cli_main

    with pytest.raises(SystemExit):
        cli_main(["run", "--help"])
    shift_help = capsys.readouterr().out.split("\n  --shift", 1)[1].split("\n  --out", 1)[0]
    assert "gallery" in shift_help
