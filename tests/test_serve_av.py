"""``queryshift serve`` with a video and an audio tower: ``audio_b64`` / ``video_b64`` queries, one lane each,
searching the other tower's gallery and adapting their own tower (issue 27)."""

from __future__ import annotations

import io

import av
import numpy as np
import pytest
import soundfile as sf

pytest.importorskip("fastapi", reason="queryshift serve needs the 'serve' extra (fastapi, uvicorn, httpx)")
from fastapi.testclient import TestClient  # noqa: E402

from queryshift import data, models  # noqa: E402
from queryshift.data.shapes_av import clip  # noqa: E402
from queryshift.serve.app import create_app  # noqa: E402

from .serve_helpers import b64, service  # noqa: E402
from .test_av_run import N_CLIPS, TinyAV, tiny_av_dataset  # noqa: E402


@pytest.fixture
def av_service(tmp_path, monkeypatch):
    models.register_backbone("tiny-av", lambda spec, device: TinyAV().to(device))
    monkeypatch.setitem(data.DATASETS, "tiny-av", tiny_av_dataset)
    s = service(tmp_path, model="tiny-av:random", data="tiny-av", modalities=("video", "audio"), method="tent",
                lr=1e-2, micro_batch=2, adapt_batch=2, bank_size=4)
    yield s
    s.close()
    models.unregister_backbone("tiny-av")


def wav_bytes(waveform: np.ndarray, rate: int = 16_000) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, waveform, rate, format="WAV", subtype="FLOAT")
    return buf.getvalue()


def mp4_bytes(frames: np.ndarray) -> bytes:
    buf = io.BytesIO()
    with av.open(buf, "w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=8)
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())
    return buf.getvalue()


def test_audio_and_video_queries_search_the_other_towers_gallery_and_adapt(av_service):
    assert {m: la.gallery_modality for m, la in av_service.lanes.items()} == {"video": "audio", "audio": "video"}
    names = set(tiny_av_dataset().items["video"])
    with TestClient(create_app(av_service)) as client:
        for i in range(2):
            frames, audio, _ = clip("test", i)
            r = client.post("/search", json={"audio_b64": b64(wav_bytes(audio)), "k": 3})
            assert r.status_code == 200, r.text
            results = r.json()["results"]
            assert len(results) == 3 and all(x["video"] in names for x in results)
            r = client.post("/search", json={"video_b64": b64(mp4_bytes(frames)), "k": N_CLIPS})
            assert r.status_code == 200, r.text
            assert {x["audio"] for x in r.json()["results"]} == set(tiny_av_dataset().items["audio"])
        assert av_service.run_pending() and av_service.run_pending()  # one update per lane
        stats = client.get("/stats").json()["lanes"]
        assert stats["audio"]["updates"] == 1 and stats["video"]["updates"] == 1
        assert stats["audio"]["adapted"] and stats["video"]["adapted"]
        upload = client.post("/search/upload", files={"audio": ("q.wav", wav_bytes(clip("test", 5)[1]))},
                             data={"k": "2"})
        assert upload.status_code == 200 and upload.json()["adapted"] is True


def test_bad_media_queries_are_clear_4xx(av_service):
    with TestClient(create_app(av_service)) as client:
        r = client.post("/search", json={"audio_b64": b64(b"not a sound at all")})
        assert r.status_code == 422 and "audio_b64 is not a readable audio file" in r.json()["detail"]
        r = client.post("/search", json={"video_b64": b64(b"\x00" * 64)})
        assert r.status_code == 422 and "video_b64 is not a readable video file" in r.json()["detail"]
        r = client.post("/search", json={"text": "a red circle"})
        assert r.status_code == 422 and "answers video and audio queries, not text" in r.json()["detail"]
        two = client.post("/search", json={"audio_b64": b64(b"x"), "video_b64": b64(b"y")})
        assert two.status_code == 422 and "exactly one of" in two.json()["detail"]
        long = wav_bytes(np.zeros(16_000 * 61, dtype=np.float32))
        av_service.cfg.max_media_bytes = len(long) + 1
        r = client.post("/search", json={"audio_b64": b64(long)})
        assert r.status_code == 413 and "the limit is 60.0 s" in r.json()["detail"]


def test_an_image_text_server_refuses_audio_and_an_av_model_refuses_image_lanes(tmp_path, monkeypatch):
    s = service(tmp_path)
    try:
        with TestClient(create_app(s)) as client:
            r = client.post("/search", json={"audio_b64": b64(wav_bytes(np.zeros(1600, dtype=np.float32)))})
            assert r.status_code == 422 and "answers image and text queries, not audio" in r.json()["detail"]
    finally:
        s.close()
    models.register_backbone("tiny-av", lambda spec, device: TinyAV().to(device))
    monkeypatch.setitem(data.DATASETS, "tiny-av", tiny_av_dataset)
    try:
        with pytest.raises(ValueError, match="has the towers video, audio: it cannot serve image queries"):
            service(tmp_path, model="tiny-av:random", data="tiny-av")
    finally:
        models.unregister_backbone("tiny-av")
