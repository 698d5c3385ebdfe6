"""``queryshift serve``: bad input gets a clear 4xx (never a 500 or a dead worker); the bearer token."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("fastapi", reason="queryshift serve needs the 'serve' extra (fastapi, uvicorn, httpx)")
from fastapi.testclient import TestClient  # noqa: E402

from queryshift.serve.app import create_app  # noqa: E402

from .serve_helpers import b64, png_bytes, service  # noqa: E402


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("serve-inputs")
    s = service(tmp, start_worker=True, max_image_bytes=200_000, max_image_pixels=300 * 300,
                max_body_bytes=300_000, max_text_chars=200, max_k=20)
    with TestClient(create_app(s), raise_server_exceptions=False) as client:
        yield s, client
    s.close()


def detail(r) -> str:
    d = r.json()["detail"]
    return d if isinstance(d, str) else " ".join(f"{e['loc']} {e['msg']}" for e in d)


def truncated_png() -> bytes:
    return png_bytes(Image.new("RGB", (64, 64), "red"))[:60]


@pytest.mark.parametrize("body, status, words", [
    ({"image_b64": "not base64 at all!"}, 422, "not valid base64"),
    ({"image_b64": b64(b"hello, this is a text file\n" * 10)}, 422, "not a readable image"),
    ({"image_b64": b64(truncated_png())}, 422, "not a readable image"),
    ({"image_b64": ""}, 422, "image_b64 is empty"),
    ({"image_b64": b64(png_bytes(Image.new("RGB", (400, 400))))}, 413, "400x400 pixels"),
    ({"image_b64": "data:image/png;base64" + "A" * 8}, 422, "data URL"),
    ({"text": "x" * 201}, 413, "201 characters"),
    ({"text": "  !!! ... "}, 422, "empty once punctuation"),
    ({"text": "a red circle", "image_b64": b64(png_bytes(Image.new("RGB", (8, 8))))}, 422, "exactly one"),
    ({}, 422, "exactly one"),
    ({"text": "a red circle", "k": 0}, 422, "k must be in 1..20"),
    ({"text": "a red circle", "k": 21}, 422, "k must be in 1..20"),
    ({"text": "a red circle", "colour": "red"}, 422, "colour"),
    ({"text": 42}, 422, "text"),
])
def test_bad_search_input_is_a_clear_4xx(served, body, status, words):
    _, client = served
    r = client.post("/search", json=body)
    assert r.status_code == status, r.text
    assert words in detail(r)


def test_oversized_and_malformed_bodies(served):
    s, client = served
    noise = np.random.default_rng(0).integers(0, 255, (270, 270, 3), dtype=np.uint8)
    big = png_bytes(Image.fromarray(noise))
    assert 200_000 < len(big) < 225_000  # over the image limit, under the body limit once in base64
    r = client.post("/search", json={"image_b64": b64(big)})
    assert r.status_code == 413 and "the image limit is 200000 bytes" in detail(r)
    r = client.post("/search", content=b'{"text": "' + b"a" * 400_000 + b'"}',
                    headers={"Content-Type": "application/json"})
    assert r.status_code == 413 and "300000 bytes" in detail(r)
    r = client.post("/search", content=b"{not json", headers={"Content-Type": "application/json"})
    assert r.status_code == 422


def test_multipart_upload(served):
    s, client = served
    image = png_bytes(s.dataset.load_image(2))
    r = client.post("/search/upload", files={"image": ("q.png", image, "image/png")}, data={"k": "3"})
    assert r.status_code == 200 and len(r.json()["results"]) == 3
    assert r.json()["results"][0]["id"] in s.dataset.img2txt[2]
    r = client.post("/search/upload", data={"text": s.dataset.texts[0], "adapt": "false"})
    assert r.status_code == 200 and r.json()["adapted"] is False
    r = client.post("/search/upload", files={"image": ("notes.txt", b"plain text, not an image", "text/plain")})
    assert r.status_code == 422 and "image is not a readable image" in detail(r)


def test_after_bad_input_the_worker_is_alive_and_answers(served):
    s, client = served
    for _ in range(3):
        client.post("/search", json={"image_b64": b64(truncated_png())})
    r = client.post("/search", json={"text": s.dataset.texts[3], "k": 2})
    assert r.status_code == 200 and len(r.json()["results"]) == 2
    health = client.get("/health").json()
    assert health["worker_alive"] is True
    assert client.get("/stats").json()["failures"] == 0


def test_gallery_image_endpoint(served):
    s, client = served
    r = client.get("/gallery/image/0")
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    assert Image.open(io.BytesIO(r.content)).size[0] > 0
    assert client.get(f"/gallery/image/{len(s.dataset.images)}").status_code == 404


def test_bearer_token_guards_reset_and_snapshot(tmp_path):
    s = service(tmp_path, token="s3cret", state_dir=str(tmp_path / "state"))
    with TestClient(create_app(s)) as client:
        for path in ("/reset", "/snapshot"):
            assert client.post(path).status_code == 401
            assert client.post(path, headers={"Authorization": "Bearer wrong"}).status_code == 401
            assert client.post(path, headers={"Authorization": "Bearer s3cret"}).status_code == 200
        assert client.post("/search", json={"text": "a red circle"}).status_code == 200  # search needs none
    s.close()


def test_without_token_mutating_endpoints_refused_off_loopback(tmp_path):
    s = service(tmp_path, host="0.0.0.0")
    with TestClient(create_app(s)) as client:
        r = client.post("/reset")
        assert r.status_code == 403 and "--token" in detail(r)
        assert client.post("/snapshot").status_code == 403
    local = service(tmp_path)
    with TestClient(create_app(local)) as client:
        assert client.post("/reset").status_code == 200
        r = client.post("/snapshot")  # open on loopback, but this server has no --state-dir
        assert r.status_code == 409 and "--state-dir" in detail(r)


def test_openapi_docs(served):
    _, client = served
    assert client.get("/docs").status_code == 200
    paths = client.get("/openapi.json").json()["paths"]
    assert {"/search", "/search/upload", "/stats", "/health", "/reset", "/snapshot"} <= set(paths)
