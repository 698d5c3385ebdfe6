"""``queryshift corrupt`` on audio (WAV/FLAC, soundfile) and video (MP4, PyAV) files the tests write."""

from __future__ import annotations

import os

import av
import numpy as np
import pytest
import soundfile as sf

from queryshift.cli import main as cli_main
from queryshift.shifts import item_rng
from queryshift.shifts.audio import corrupt_audio
from queryshift.shifts.video import corrupt_clip

RATE = 16_000


def write_clip(path, frames: np.ndarray, fps: int = 8) -> None:
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        stream.options = {"crf": "0"}
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())


def read_clip(path) -> np.ndarray:
    with av.open(str(path)) as container:
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])


@pytest.fixture()
def media(tmp_path):
    root = tmp_path / "media"
    (root / "sounds").mkdir(parents=True)
    t = np.arange(RATE // 2) / RATE
    sf.write(root / "sounds" / "a.wav", (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32), RATE,
             subtype="FLOAT")
    stereo = np.stack([0.2 * np.sin(2 * np.pi * 330 * t), 0.2 * np.sin(2 * np.pi * 550 * t)], axis=1)
    sf.write(root / "sounds" / "b.flac", stereo.astype(np.float32), RATE, subtype="PCM_16")
    frames = np.zeros((6, 32, 48, 3), dtype=np.uint8)
    for k in range(6):
        frames[k, 8:24, 4 + 6 * k:20 + 6 * k] = (200, 60, 30)  # a square moving right
    write_clip(root / "clip.mp4", frames)
    return root


def test_audio_copies_match_the_engines_shift_and_keep_format(media, tmp_path):
    out = tmp_path / "out"
    assert cli_main(["corrupt", "--data", str(media), "--shift", "traffic:5", "--out", str(out), "--seed", "4",
                     "--no-progress"]) == 0
    folder = out / "media_AUDIO_traffic_5"
    assert sorted(os.listdir(folder / "sounds")) == ["a.wav", "b.flac"]
    assert not (out / "media_VIDEO_traffic_5").exists()  # traffic is no video shift
    clean, _ = sf.read(media / "sounds" / "a.wav", dtype="float32")
    got, rate = sf.read(folder / "sounds" / "a.wav", dtype="float32")
    assert rate == RATE and got.shape == clean.shape and sf.info(folder / "sounds" / "a.wav").subtype == "FLOAT"
    expected = corrupt_audio(clean, "traffic", 5, item_rng(4, 0), RATE)  # file 0 of the sorted files
    assert np.allclose(got, expected, atol=1e-6) and not np.allclose(got, clean, atol=1e-2)
    flac, _ = sf.read(folder / "sounds" / "b.flac", dtype="float32", always_2d=True)
    assert flac.shape == (RATE // 2, 2) and sf.info(folder / "sounds" / "b.flac").subtype == "PCM_16"


def test_video_copies_keep_frames_and_size_and_follow_the_clip_shift(media, tmp_path):
    out = tmp_path / "out"
    assert cli_main(["corrupt", "--data", str(media / "clip.mp4"), "--shift", "fog:5,frame_rate:5", "--out", str(out),
                     "--no-progress"]) == 0
    clean = read_clip(media / "clip.mp4")
    fog = read_clip(out / "clip_VIDEO_fog_5" / "clip.mp4")
    held = read_clip(out / "clip_VIDEO_frame_rate_5" / "clip.mp4")
    assert fog.shape == clean.shape == held.shape
    assert np.abs(fog.astype(int) - clean.astype(int)).mean() > 10
    expected = corrupt_clip(clean, "frame_rate", 5, item_rng(0, 0))  # sample and hold: every frame is frame 0
    assert np.abs(held.astype(int) - expected.astype(int)).mean() < 3
    assert np.abs(held[-1].astype(int) - clean[-1].astype(int)).mean() > 3


def test_gaussian_noise_corrupts_both_and_bad_shifts_fail_before_writing(media, tmp_path, capsys):
    out = tmp_path / "out"
    assert cli_main(["corrupt", "--data", str(media), "--shift", "gaussian_noise:1", "--out", str(out),
                     "--no-progress"]) == 0
    assert sorted(os.listdir(out)) == [".queryshift-corrupt", "media_AUDIO_gaussian_noise_1",
                                       "media_VIDEO_gaussian_noise_1"]
    bad = tmp_path / "bad"
    assert cli_main(["corrupt", "--data", str(media), "--shift", "RandomCharAug_swap:5", "--out", str(bad)]) != 0
    assert "corrupts none of the audio and video files" in capsys.readouterr().err and not bad.exists()
    assert cli_main(["corrupt", "--data", str(media), "--shift", "traffic:8", "--out", str(bad)]) != 0
    assert "severity must be one of 1-5, got 8" in capsys.readouterr().err and not bad.exists()
