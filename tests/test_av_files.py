"""Audio-visual / audio-text datasets from files: tiny MP4, WAV and JPEG fixtures written here."""

from __future__ import annotations

import csv
import json
import os
from fractions import Fraction

import numpy as np
import pytest

from queryshift.data import DataError, load_dataset
from queryshift.data.av_files import load_audiocaps, load_av_files, load_clotho, load_read_index, read_video

av = pytest.importorskip("av")
sf = pytest.importorskip("soundfile")

FPS = 10


def write_mp4(path, n_frames=20, size=(32, 48), tone=None, rate=22_050, seconds=1.0):
    """An H.264 MP4 whose frame k is filled with grey level 8 * k (so a frame's index can be read back), with
    an AAC track of a ``tone`` Hz sine when given."""
    with av.open(str(path), "w") as container:
        video = container.add_stream("libx264", rate=FPS)
        video.height, video.width = size
        video.pix_fmt = "yuv420p"
        video.options = {"qp": "0"}  # lossless enough to read the grey level back
        audio = None
        if tone is not None:
            audio = container.add_stream("aac", rate=rate)
            audio.layout = "stereo"
        for k in range(n_frames):
            img = np.full((*size, 3), 8 * k, np.uint8)
            for packet in video.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                container.mux(packet)
        for packet in video.encode():
            container.mux(packet)
        if audio is not None:
            t = np.arange(int(rate * seconds)) / rate
            wave = (0.5 * np.sin(2 * np.pi * tone * t)).astype(np.float32)
            block = 1024
            for start in range(0, len(wave), block):
                chunk = np.stack([wave[start:start + block]] * 2)
                frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(chunk), format="fltp", layout="stereo")
                frame.sample_rate = rate
                frame.pts = start
                frame.time_base = Fraction(1, rate)
                for packet in audio.encode(frame):
                    container.mux(packet)
            for packet in audio.encode():
                container.mux(packet)
    return str(path)


def write_wav(path, tone=440.0, rate=22_050, seconds=0.5, channels=1):
    t = np.arange(int(rate * seconds)) / rate
    wave = 0.5 * np.sin(2 * np.pi * tone * t)
    sf.write(str(path), np.stack([wave] * channels, axis=1) if channels > 1 else wave, rate)
    return str(path)


def dominant_hz(wave, rate=16_000):
    spectrum = np.abs(np.fft.rfft(wave * np.hanning(len(wave))))
    return np.fft.rfftfreq(len(wave), 1 / rate)[spectrum.argmax()]


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    root = tmp_path_factory.mktemp("media")
    write_mp4(root / "a.mp4", tone=500.0)
    write_mp4(root / "b.mp4", n_frames=30)  # no audio track
    write_wav(root / "b.wav", tone=1000.0, channels=2)
    return root


def test_video_frames_sampled_uniformly(media):
    clip = read_video(str(media / "a.mp4"), frames=10)
    assert clip.shape == (10, 32, 48, 3) and clip.dtype == np.uint8
    # 20 frames, 10 sampled: indices int(i * 20 / 10) = 0, 2, ..., 18 -> grey levels 0, 16, ..., 144
    np.testing.assert_allclose(clip.reshape(10, -1).mean(axis=1), 16 * np.arange(10), atol=3)
    five = read_video(str(media / "b.mp4"), frames=5)  # 30 frames -> 0, 6, 12, 18, 24
    np.testing.assert_allclose(five.reshape(5, -1).mean(axis=1), 48 * np.arange(5), atol=3)


def test_av_files_own_track_and_wav(media):
    index = media / "pairs.jsonl"
    index.write_text(json.dumps({"video": "a.mp4", "audio": ""}) + "\n" +
                     json.dumps({"video": "b.mp4", "audio": "b.wav"}) + "\n")
    ds = load_dataset(f"av-files:{index}")
    assert ds.modalities == ("video", "audio") and ds.count("video") == 2
    assert ds.relevance("video", "audio") == [[0], [1]]
    own, wav = ds.load("audio", 0), ds.load("audio", 1)
    assert own.dtype == wav.dtype == np.float32 and own.ndim == wav.ndim == 1
    # the own track: 1 s of AAC at 22.05 kHz -> about 16,000 samples at 16 kHz, its 500 Hz tone kept
    assert abs(len(own) - 16_000) < 2_000 and abs(dominant_hz(own) - 500) < 10
    # the stereo WAV: 0.5 s at 22.05 kHz -> 8,000 samples at 16 kHz, mono, 1 kHz
    assert len(wav) == 8_000 and abs(dominant_hz(wav) - 1000) < 10
    assert ds.load("video", 1).shape == (10, 32, 48, 3)


def test_av_files_groups_and_captions_csv(media, tmp_path):
    index = tmp_path / "clips.csv"
    with open(index, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["video", "audio", "group", "caption"])
        w.writerow([str(media / "a.mp4"), "", "dog", "a dog barks"])
        w.writerow([str(media / "b.mp4"), str(media / "b.wav"), "dog", "another dog"])
        w.writerow([str(media / "a.mp4"), str(media / "b.wav"), "dog", "a third"])
    ds = load_av_files(str(index))
    assert ds.count("video") == 2 and ds.count("audio") == 2 and ds.count("text") == 3
    assert ds.relevance("audio", "video") == [[0, 1], [0, 1]]
    assert ds.load("text", 2) == "a third"


def test_read_index_frames_and_wav(tmp_path):
    from PIL import Image

    frames = tmp_path / "frames"
    for k in range(10):
        (frames / f"frame_{k}").mkdir(parents=True)
        for vid in ("v1", "v2"):
            Image.fromarray(np.full((24, 24, 3), 20 * k, np.uint8)).save(frames / f"frame_{k}" / f"{vid}.jpg")
    write_wav(tmp_path / "v1.wav", rate=16_000)
    write_wav(tmp_path / "v2.wav", rate=16_000)
    rows = [{"video_id": v, "wav": f"{v}.wav", "video_path": "frames", "labels": "/m/0"} for v in ("v1", "v2")]
    (tmp_path / "vgg_test.json").write_text(json.dumps({"data": rows}))
    ds = load_read_index(str(tmp_path / "vgg_test.json"))
    clip = ds.load("video", 1)
    assert clip.shape == (10, 24, 24, 3)
    np.testing.assert_allclose(clip.reshape(10, -1).mean(axis=1), 20 * np.arange(10), atol=2)
    assert len(ds.load("audio", 0)) == 8_000 and ds.relevance("video", "audio") == [[0], [1]]
    assert load_dataset(f"vggsound:{tmp_path / 'vgg_test.json'}").count("audio") == 2
    os.remove(frames / "frame_0" / "v2.jpg")  # a frame never extracted is skipped
    assert load_read_index(str(tmp_path / "vgg_test.json")).load("video", 1).shape == (9, 24, 24, 3)


def test_clotho_five_captions_and_audiocaps_rows(tmp_path):
    write_wav(tmp_path / "rain.wav")
    write_wav(tmp_path / "bird.flac".replace(".flac", ".wav"))
    index = tmp_path / "clotho_captions_evaluation.csv"
    with open(index, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["file_name"] + [f"caption_{k}" for k in range(1, 6)])
        w.writerow(["rain.wav"] + [f"rain {k}" for k in range(5)])
        w.writerow(["bird.wav"] + [f"bird, singing {k}" for k in range(5)])
    ds = load_dataset(f"clotho:{index}")
    assert ds.count("audio") == 2 and ds.count("text") == 10
    assert ds.relevance("audio", "text") == [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]]
    assert ds.load("text", 6) == "bird, singing 1"
    write_wav(tmp_path / "Yabc.wav")
    caps = tmp_path / "test.csv"
    caps.write_text("audiocap_id,youtube_id,start_time,caption\n1,abc,30,a car passes\n2,abc,30,engine noise\n"
                    "3,rain,0,rain falls\n")
    ds = load_audiocaps(str(caps))
    assert ds.count("audio") == 2 and ds.relevance("text", "audio") == [[0], [0], [1]]
    assert ds.items["audio"][0].startswith("Yabc.wav")
    (tmp_path / "caps.json").write_text(json.dumps({"data": [{"audio": "rain.wav", "caption": ["a", "b"]}]}))
    assert load_clotho(str(tmp_path / "caps.json")).count("text") == 2


@pytest.mark.parametrize("rows, message", [
    ([], "no rows"),
    ([{"audio": "b.wav"}], "entry 0: missing field 'video'"),
    ([{"video": "missing.mp4"}], "entry 0: 'video': .*missing.mp4 not found"),
    ([{"video": "a.mp4", "audio": "gone.wav"}], "entry 0: 'audio': .*gone.wav not found"),
    ([{"video": "a.mp4", "group": [1]}], "entry 0: 'group' must be a string or a finite number"),
    ([{"video": "a.mp4", "group": 1}, {"video": "b.mp4"}], "entry 1: no 'group' for video"),
    ([{"video": "a.mp4", "group": 1}, {"video": "a.mp4", "group": 2}], "entry 1: video 'a.mp4@10f' appears in two"),
    ([{"video": 5}], "entry 0: 'video' must be a file path"),
])
def test_bad_index_named(media, rows, message):
    index = media / "bad.json"
    index.write_text(json.dumps(rows))
    with pytest.raises(DataError, match=message):
        load_av_files(str(index))


def test_bad_media_named(media, tmp_path):
    (tmp_path / "broken.mp4").write_bytes(b"not a video at all" * 10)
    index = tmp_path / "x.json"
    index.write_text(json.dumps([{"video": str(media / "b.mp4")}, {"video": "broken.mp4", "audio": "broken.mp4"}]))
    ds = load_av_files(str(index))
    with pytest.raises(DataError, match=r"entry 0: .*b\.mp4 has no audio track"):
        ds.load("audio", 0)
    with pytest.raises(DataError, match=r"entry 1: cannot decode video .*broken\.mp4"):
        ds.load("video", 1)
    with pytest.raises(DataError, match=r"entry 1: cannot decode audio of .*broken\.mp4"):
        ds.load("audio", 1)
    (tmp_path / "noise.wav").write_bytes(b"RIFF0000WAVEjunk")
    (tmp_path / "c.json").write_text(json.dumps([{"audio": "noise.wav", "caption": "x"}]))
    with pytest.raises(DataError, match=r"noise\.wav"):
        load_clotho(str(tmp_path / "c.json")).load("audio", 0)


def test_bad_read_index_and_captions_named(tmp_path):
    write_wav(tmp_path / "v1.wav")
    (tmp_path / "idx.json").write_text(json.dumps({"data": [{"video_id": "v1", "wav": "v1.wav",
                                                             "video_path": "nowhere", "labels": ""}]}))
    with pytest.raises(DataError, match=r"entry 0 \(v1\): no frames found"):
        load_read_index(str(tmp_path / "idx.json"))
    (tmp_path / "list.json").write_text(json.dumps([{"video_id": "v1"}]))
    with pytest.raises(DataError, match="a CAV-MAE / READ index"):
        load_read_index(str(tmp_path / "list.json"))
    (tmp_path / "test.csv").write_text("audiocap_id,youtube_id,start_time,caption\n1,zzz,0,a car\n")
    with pytest.raises(DataError, match=r"test\.csv:2: audio file not found \(tried .*zzz\.wav"):
        load_audiocaps(str(tmp_path / "test.csv"))
    (tmp_path / "c.csv").write_text("file_name,caption_1\nv1.wav,\n")
    with pytest.raises(DataError, match=r"c\.csv:2: caption 1 is empty"):
        load_clotho(str(tmp_path / "c.csv"))
    with pytest.raises(DataError, match="index file not found"):
        load_clotho(str(tmp_path / "none.csv"))
    with pytest.raises(DataError, match="av-files needs an index file"):
        load_dataset("av-files")
