"""Video-audio retrieval through the engine (issue 27): a tiny backbone with a video and an audio tower, defined
here and registered like any other, on a tiny audio-visual dataset of shapes-av clips; every adapting method in
both directions under an audio and a video shift, resume, and a wrong direction naming the valid ones."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from torch import nn

from queryshift import data, models
from queryshift.data.av import AVDataset
from queryshift.data.shapes_av import clip
from queryshift.engine import RunConfig, run
from queryshift.engine.retriever import Retriever
from queryshift.models.base import DualEncoder, l2_normalize

N_CLIPS = 24
FRAMES, SIDE = 4, 16  # the tiny video tower's input: 4 frames of 16 x 16
SAMPLES, HOP = 16_000, 400  # one second at 16 kHz, cut into 40 frames of 400 samples


class TinyAV(DualEncoder):
    """A video tower (frames -> per-frame MLP -> mean over time) and an audio tower (log spectra of short frames
    -> MLP -> mean over time), each with a LayerNorm that adapts, as CAV-MAE's towers have."""

    name = "tiny-av"
    towers = ("video", "audio")
    preprocess_id = f"tiny-av-{FRAMES}x{SIDE}-{HOP}"

    def __init__(self):
        super().__init__()
        self.video = nn.Sequential(nn.Linear(3 * SIDE * SIDE, 48), nn.LayerNorm(48), nn.GELU(), nn.Linear(48, 24))
        self.audio = nn.Sequential(nn.Linear(HOP // 2 + 1, 48), nn.LayerNorm(48), nn.GELU(), nn.Linear(48, 24))

    def preprocess_video(self, frames) -> torch.Tensor:  # uint8 [T, H, W, 3] -> float [FRAMES, 3, SIDE, SIDE]
        x = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2).float() / 255
        x = x[torch.linspace(0, len(x) - 1, FRAMES).round().long()]
        return nn.functional.interpolate(x, size=(SIDE, SIDE), mode="area")

    def preprocess_audio(self, waveform) -> torch.Tensor:  # float32 [n] at 16 kHz -> log spectra [40, 201]
        x = torch.zeros(SAMPLES)
        w = torch.from_numpy(np.asarray(waveform, dtype=np.float32))[:SAMPLES]
        x[:len(w)] = w
        return torch.log1p(torch.fft.rfft(x.reshape(-1, HOP), dim=1).abs())

    def encode_video(self, clips: torch.Tensor) -> torch.Tensor:  # [B, T, 3, H, W]
        return l2_normalize(self.video(clips.flatten(2)).mean(dim=1))

    def encode_audio(self, spectra: torch.Tensor) -> torch.Tensor:  # [B, 40, 201]
        return l2_normalize(self.audio(spectra).mean(dim=1))

    def tower(self, which: str) -> nn.Module:
        if which not in self.towers:
            raise ValueError(f"{self.name} has no {which!r} tower")
        return getattr(self, which)


def tiny_av_dataset(arg=None, image_root=None) -> AVDataset:
    clips = [clip("test", i) for i in range(N_CLIPS)]
    return AVDataset(
        items={"video": [f"clip{i}.mp4" for i in range(N_CLIPS)], "audio": [f"clip{i}.wav" for i in range(N_CLIPS)]},
        groups={"video": list(range(N_CLIPS)), "audio": list(range(N_CLIPS))},
        loaders={"video": lambda i: clips[i][0], "audio": lambda i: clips[i][1]},
        name="tiny-av", source="tiny-av")


@pytest.fixture
def tiny_av(monkeypatch):
    models.register_backbone("tiny-av", lambda spec, device: TinyAV().to(device))
    monkeypatch.setitem(data.DATASETS, "tiny-av", tiny_av_dataset)
    yield
    models.unregister_backbone("tiny-av")


def cfg(tmp_path, **kw) -> RunConfig:
    base = dict(model="tiny-av:random", data="tiny-av", batch_size=8, steps=1, lr=1e-2, seed=3, num_workers=0,
                cache_dir=str(tmp_path / "cache"), progress=False)
    return RunConfig(**{**base, **kw})


def logged_ranks(out) -> list[int]:
    rows = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    return [r for row in rows for r in row["ranks"]]


SHIFT = {"a2v": "traffic:5", "v2a": "gaussian_noise:5"}  # the query modality's shift: audio, then video


@pytest.mark.parametrize("direction", ["v2a", "a2v"])
def test_every_method_runs_both_ways_under_the_query_modalitys_shift(tiny_av, tmp_path, direction):
    ranks = {}
    for method in ("source", "tcr", "rest", "tent"):
        out = tmp_path / method
        result = run(cfg(tmp_path, direction=direction, method=method, shift=SHIFT[direction], out=str(out)))
        assert result["n_queries"] == N_CLIPS and result["n_gallery"] == N_CLIPS
        assert result["shift"] == SHIFT[direction] and result["direction"] == direction
        assert all(math.isfinite(result[k]) for k in ("r1", "r5", "r10", "r_mean", "map"))
        if method != "source":
            assert result["skipped_updates"] == 0, (method, result.get("warnings"))
        ranks[method] = logged_ranks(out)
    run(cfg(tmp_path, direction=direction, out=str(tmp_path / "clean")))
    assert logged_ranks(tmp_path / "clean") != ranks["source"]  # the shift reached the queries
    assert ranks["tent"] != ranks["source"]  # the query tower adapted


def test_the_query_tower_adapts_and_the_gallery_tower_does_not(tiny_av):
    model = TinyAV()
    retriever = Retriever(model, l2_normalize(torch.randn(N_CLIPS, 24)), "audio", "tent")
    names = {n for n, _ in retriever.method.named_params}
    assert names == {"audio.1.weight", "audio.1.bias"}


def test_resume_gives_the_ranks_of_an_uninterrupted_run(tiny_av, tmp_path, monkeypatch):
    whole = tmp_path / "whole"
    expected = run(cfg(tmp_path, direction="a2v", method="tent", shift="traffic:5", out=str(whole)))
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
        run(cfg(tmp_path, direction="a2v", method="tent", shift="traffic:5", out=str(part)))
    monkeypatch.setattr(Retriever, "adapt", adapt)
    assert len((part / "log.jsonl").read_text().splitlines()) == 1
    resumed = run(cfg(tmp_path, direction="a2v", method="tent", shift="traffic:5", out=str(part), resume=True))
    assert logged_ranks(part) == logged_ranks(whole)
    assert resumed["r1"] == expected["r1"]


def test_a_direction_the_towers_do_not_allow_names_the_valid_ones(tiny_av, tmp_path, monkeypatch):
    three = tiny_av_dataset()
    three = AVDataset(items={**three.items, "text": ["a clip"] * N_CLIPS},
                      groups={**three.groups, "text": list(range(N_CLIPS))},
                      loaders={**three.loaders, "text": lambda i: "a clip"}, name="tiny-av-text")
    monkeypatch.setitem(data.DATASETS, "tiny-av-text", lambda arg=None, image_root=None: three)
    with pytest.raises(ValueError, match="has the towers video, audio; valid directions for it: v2a, a2v"):
        run(cfg(tmp_path, data="tiny-av-text", direction="v2t"))


def test_a_direction_the_dataset_lacks_is_refused_before_the_model_loads(tiny_av, tmp_path):
    with pytest.raises(data.DataError, match="tiny-av has no image items; it has video, audio"):
        run(cfg(tmp_path, direction="i2t"))


def test_an_image_shift_on_audio_queries_names_the_audio_shifts(tiny_av, tmp_path):
    # speckle_noise shifts images only; fog, a video shift too, shifts the a2v gallery (tests/test_gallery_shift.py)
    with pytest.raises(ValueError, match="corrupts image queries, but the queries here are audio.*traffic"):
        run(cfg(tmp_path, direction="a2v", shift="speckle_noise:3"))


def test_cli_runs_a2v_and_list_shows_the_audio_and_video_shifts(tiny_av, tmp_path, capsys):
    from queryshift.cli import main as cli_main

    out = tmp_path / "cli"
    assert cli_main(["run", "--model", "tiny-av:random", "--data", "tiny-av", "--direction", "a2v", "--method",
                     "tcr", "--shift", "wind:3", "--batch-size", "8", "--steps", "1", "--lr", "1e-3",
                     "--cache-dir", str(tmp_path / "cache"), "--out", str(out), "--no-progress"]) == 0
    saved = json.loads((out / "result.json").read_text())
    assert saved["direction"] == "a2v" and saved["shift"] == "wind:3" and math.isfinite(saved["r1"])
    capsys.readouterr()
    assert cli_main(["list"]) == 0
    lines = {line.split(":")[0]: line for line in capsys.readouterr().out.splitlines()}
    audio = lines["audio shifts"].split(": ", 1)[1].split(", ")
    video = lines["video shifts"].split(": ", 1)[1].split(", ")
    assert {"gaussian_noise", "traffic", "crowd", "rain", "thunder", "wind", "reverb", "pitch_shift", "codec",
            "dropout"} <= set(audio)
    assert {"gaussian_noise", "fog", "motion_blur", "jpeg_compression", "frame_drop", "frame_rate", "h264",
            "snow"} <= set(video)
    assert "speckle_noise" not in video and "fog" not in audio


def test_cli_names_the_valid_directions_of_the_model(tiny_av, tmp_path, capsys):
    from queryshift.cli import main as cli_main

    code = cli_main(["run", "--model", "tiny-av:random", "--data", "shapes-av:test:4", "--direction", "t2v",
                     "--cache-dir", str(tmp_path / "cache"), "--no-progress"])
    err = capsys.readouterr().err
    assert code != 0 and "queryshift run: error: direction 't2v'" in err and "v2a, a2v" in err


def test_a_bench_grid_keeps_the_shifts_of_each_directions_query_modality():
    from queryshift.bench.plan import plan_grid

    runs = plan_grid(["source"], ["clean", "traffic:5", "fog:3", "gaussian_noise:2"], ["a2v", "v2a", "i2t"])[0]["runs"]
    kept = {(labels["direction"], labels["shift"]) for labels, _ in runs}
    assert kept == {("a2v", "clean"), ("a2v", "traffic:5"), ("a2v", "gaussian_noise:2"),
                    ("v2a", "clean"), ("v2a", "fog:3"), ("v2a", "gaussian_noise:2"),
                    ("i2t", "clean"), ("i2t", "fog:3"), ("i2t", "gaussian_noise:2")}
    with pytest.raises(ValueError, match="severity"):
        plan_grid(["source"], ["traffic:9"], ["a2v"])


def test_eval_general_after_is_refused_before_the_model_loads_when_no_style_shifts_audio(tiny_av, tmp_path,
                                                                                          monkeypatch):
    monkeypatch.setattr("queryshift.engine.runner.load_source", lambda *a, **k: pytest.fail("the model loaded"))
    with pytest.raises(ValueError, match="no style shifts audio queries"):
        run(cfg(tmp_path, direction="a2v", eval_general_after=True))
