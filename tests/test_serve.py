"""``queryshift serve``: the search contract, online adaptation, the collapse guard, snapshots and restore."""

from __future__ import annotations

import os
import threading

import pytest
import torch

pytest.importorskip("fastapi", reason="queryshift serve needs the 'serve' extra (fastapi, uvicorn, httpx)")
from fastapi.testclient import TestClient  # noqa: E402

from queryshift.serve import snapshots  # noqa: E402
from queryshift.serve.app import create_app  # noqa: E402
from queryshift.serve.snapshots import SnapshotError  # noqa: E402

from .serve_helpers import b64, png_bytes, service  # noqa: E402


@pytest.fixture
def svc(tmp_path):
    s = service(tmp_path)
    yield s
    s.close()


def texts(s, n, start=0):
    return [s.dataset.texts[i] for i in range(start, start + n)]


def test_search_contract_text_and_image(svc):
    with TestClient(create_app(svc)) as client:
        assert client.get("/health").status_code == 200
        r = client.post("/search", json={"text": svc.dataset.texts[5], "k": 4})
        assert r.status_code == 200
        body = r.json()
        assert body["adapted"] is False  # nothing adapted yet
        assert len(body["results"]) == 4
        scores = [x["score"] for x in body["results"]]
        assert scores == sorted(scores, reverse=True)
        assert all(0 <= x["id"] < len(svc.dataset.images) for x in body["results"])
        assert 5 // 5 in [x["id"] for x in body["results"]]  # text 5 describes image 1 (5 captions each)

        image = png_bytes(svc.dataset.load_image(3))
        body = client.post("/search", json={"image_b64": b64(image)}).json()
        assert len(body["results"]) == 10  # default k
        assert all(0 <= x["id"] < len(svc.dataset.texts) and x["text"] for x in body["results"])
        assert body["results"][0]["id"] in svc.dataset.img2txt[3]

        stats = client.get("/stats").json()
        assert stats["queries"] == 2 and stats["updates"] == 0
        assert stats["lanes"]["text"]["bank"] == 1 and stats["lanes"]["image"]["bank"] == 1


def test_answers_use_published_parameters_after_an_update(svc):
    lane = svc.lanes["text"]
    query = svc.dataset.texts[0]
    before = svc.search("text", query, k=5)
    for t in texts(svc, 3, start=1):
        svc.search("text", t)
    assert svc.run_pending()  # 4 new text queries = one micro-batch
    assert svc.updates == 1 and lane.updates == 1 and lane.new == 0
    published = svc.answering.values("text")
    adapted = lane.retriever.adapted_parameters()
    assert published.keys() == adapted.keys()
    assert all(torch.equal(published[n], adapted[n]) for n in published)
    assert any(not torch.equal(published[n], svc.answering._source_values[n]) for n in published)

    after = svc.search("text", query, k=5)
    source = svc.search("text", query, k=5, adapt=False)
    assert after["adapted"] is True and source["adapted"] is False
    assert [r["score"] for r in source["results"]] == [r["score"] for r in before["results"]]
    assert [r["score"] for r in after["results"]] != [r["score"] for r in before["results"]]
    assert svc.lanes["image"].updates == 0  # the image lane saw no query


def test_unadapted_queries_are_not_banked(svc):
    svc.search("text", svc.dataset.texts[0], adapt=False)
    assert len(svc.lanes["text"].bank) == 0 and svc.lanes["text"].new == 0
    svc.search("text", svc.dataset.texts[0])
    assert len(svc.lanes["text"].bank) == 1


def test_micro_batch_takes_the_newest_queries_up_to_adapt_batch(svc):
    lane = svc.lanes["text"]
    for t in texts(svc, 12):
        svc.search("text", t)
    seen = []
    original = lane.retriever.adapt
    lane.retriever.adapt = lambda x: (seen.append(x), original(x))[1]
    assert svc.run_pending()
    assert seen[0].shape[0] == 8  # adapt_batch: the 12 banked queries' newest 8
    assert lane.new == 0 and not svc.run_pending()


def test_worker_waits_max_wait_then_adapts_fewer_queries(tmp_path):
    s = service(tmp_path, start_worker=True, max_wait=0.0, max_update_rate=100.0)
    try:
        done = threading.Event()
        original = s.update
        s.update = lambda lane, items: (original(lane, items), done.set())[0]
        s.search("text", s.dataset.texts[0])  # one query, below micro_batch 4: max_wait 0 starts the update
        assert done.wait(60)
        assert s.updates == 1 and s.lanes["text"].new == 0
    finally:
        s.close()


def test_search_does_not_wait_for_an_update_in_progress(tmp_path):
    s = service(tmp_path, start_worker=True, max_wait=0.0, max_update_rate=100.0)
    inside, release = threading.Event(), threading.Event()
    original = s.lanes["text"].retriever.adapt

    def blocked_adapt(x):
        inside.set()
        release.wait(120)
        return original(x)

    s.lanes["text"].retriever.adapt = blocked_adapt
    try:
        s.search("text", s.dataset.texts[0])
        assert inside.wait(60)  # the worker is now in the middle of an update
        answered = []
        t = threading.Thread(target=lambda: answered.append(s.search("text", s.dataset.texts[1], k=3)))
        t.start()
        t.join(60)
        assert answered and len(answered[0]["results"]) == 3  # answered while the update is blocked
        assert s.updates == 0
    finally:
        release.set()
        s.close()
    assert s.updates == 1


def test_collapse_guard_resets_to_source(tmp_path):
    s = service(tmp_path, min_uniformity_ratio=2.0)  # no update can keep twice the source spread
    for t in texts(s, 4):
        s.search("text", t)
    point = s.update(s.lanes["text"], list(s.lanes["text"].bank))
    assert "uniformity" in point["reset"]
    assert s.stats()["resets"] == 1
    published = s.answering.values("text")
    assert all(torch.equal(published[n], s.answering._source_values[n]) for n in published)
    method = s.lanes["text"].retriever.method
    assert all(torch.equal(p, method._snapshot["params"][n]) for n, p in method.named_params)
    assert s.search("text", s.dataset.texts[0])["adapted"] is False


def test_non_finite_parameters_are_never_published(svc):
    lane = svc.lanes["image"]
    original = lane.retriever.adapt

    def poisoned(x):
        out = original(x)
        with torch.no_grad():
            lane.retriever.method.params[0].fill_(float("nan"))
        return out

    lane.retriever.adapt = poisoned
    for i in range(4):
        svc.search("image", svc.dataset.load_image(i))
    assert svc.run_pending()
    assert svc.lanes["image"].last["reset"] == "non-finite parameters or embeddings"
    assert all(torch.isfinite(v).all() for v in svc.answering.values("image").values())
    answer = svc.search("image", svc.dataset.load_image(0), k=3)
    assert all(r["score"] == r["score"] for r in answer["results"])  # no NaN scores


def test_snapshot_restores_state_and_refuses_other_weights_or_method(tmp_path):
    state = tmp_path / "state"
    a = service(tmp_path, state_dir=str(state), snapshot_every=2)
    for t in texts(a, 8):
        a.search("text", t)
        a.run_pending()
    assert a.updates == 2 and a.snapshots == 1  # the periodic snapshot at update 2
    expected = a.search("text", a.dataset.texts[9], k=5)
    params = a.answering.values("text")
    a.close()  # nothing new since the last snapshot: no second write
    assert a.snapshots == 1

    b = service(tmp_path, state_dir=str(state), snapshot_every=2)
    assert b.updates == 2 and b.restored_from["updates"] == 2
    assert b.stats()["queries"] == 8  # the count at the snapshot (the query after it is lost)
    restored = b.answering.values("text")
    assert all(torch.equal(restored[n], params[n]) for n in params)
    again = b.search("text", b.dataset.texts[9], k=5)
    assert again == expected and again["adapted"] is True
    b.close()

    saved = torch.load(snapshots.snapshot_path(str(state)), weights_only=False)
    torch.save({**saved, "weights": "0123456789abcdef"}, snapshots.snapshot_path(str(state)))
    with pytest.raises(SnapshotError, match="0123456789abcdef"):
        service(tmp_path, state_dir=str(state))
    torch.save({**saved, "method": "tent"}, snapshots.snapshot_path(str(state)))
    with pytest.raises(SnapshotError, match="'tent'"):
        service(tmp_path, state_dir=str(state))


def test_close_snapshots_updates_since_the_last_snapshot(tmp_path):
    state = str(tmp_path / "state")
    a = service(tmp_path, state_dir=state, snapshot_every=10)
    for t in texts(a, 4):
        a.search("text", t)
    a.run_pending()
    assert a.snapshots == 0
    a.close()  # what the server does on SIGTERM
    assert a.snapshots == 1
    assert service(tmp_path, state_dir=state).updates == 1


def test_interrupted_snapshot_write_keeps_the_previous_one(tmp_path, monkeypatch):
    state = str(tmp_path / "state")
    snapshots.save(state, {"weights": "w", "method": "rest", "updates": 1})

    def dies_half_way(obj, f, *a, **kw):
        f.write(b"partial bytes of a snapshot")
        raise KeyboardInterrupt  # as a kill would stop the writer

    monkeypatch.setattr(snapshots.torch, "save", dies_half_way)
    with pytest.raises(KeyboardInterrupt):
        snapshots.save(state, {"weights": "w", "method": "rest", "updates": 2})
    monkeypatch.undo()
    assert snapshots.load(state, "w", "rest")["updates"] == 1
    assert os.listdir(state) == ["snapshot.pt"]


def test_stale_temporary_snapshot_is_removed_at_start(tmp_path):
    state = tmp_path / "state"
    state.mkdir()
    stale = state / ".snapshot.pt.12345.tmp"
    stale.write_bytes(b"half a snapshot from a killed server")
    s = service(tmp_path, state_dir=str(state))
    assert not stale.exists() and s.restored_from is None


def test_unreadable_snapshot_is_refused_with_its_path(tmp_path):
    state = tmp_path / "state"
    state.mkdir()
    (state / "snapshot.pt").write_bytes(b"not a torch file")
    with pytest.raises(SnapshotError, match="snapshot.pt is unreadable"):
        service(tmp_path, state_dir=str(state))


def test_reset_endpoint_returns_to_source_and_is_snapshotted(tmp_path):
    state = str(tmp_path / "state")
    s = service(tmp_path, state_dir=state, snapshot_every=100)
    with TestClient(create_app(s)) as client:
        for t in texts(s, 4):
            client.post("/search", json={"text": t})
        s.run_pending()
        assert client.post("/search", json={"text": s.dataset.texts[0]}).json()["adapted"] is True
        r = client.post("/reset")
        assert r.status_code == 200
        assert client.post("/search", json={"text": s.dataset.texts[0]}).json()["adapted"] is False
        assert client.get("/stats").json()["manual_resets"] == 1
    restarted = service(tmp_path, state_dir=state)
    assert restarted.answering.adapted == {"image": False, "text": False}


def test_cli_options_and_defaults():
    from queryshift.cli import build_parser
    from queryshift.commands.serve import config_from_args

    args = build_parser().parse_args(["serve", "--model", "shapes-clip", "--data", "shapes:test:24",
                                      "--method", "tcr", "--port", "8123", "--state-dir", "/tmp/x"])
    cfg = config_from_args(args)
    assert (cfg.host, cfg.port, cfg.snapshot_every) == ("127.0.0.1", 8123, 10)
    assert (cfg.method, cfg.state_dir) == ("tcr", "/tmp/x")
    assert cfg.loopback() and cfg.adapt and cfg.modalities == ("image", "text")
    args = build_parser().parse_args(["serve", "--host", "0.0.0.0", "--no-adapt", "--modalities", "text"])
    cfg = config_from_args(args)
    assert not cfg.loopback() and not cfg.adapt and cfg.modalities == ("text",)
    with pytest.raises(ValueError, match="unknown method 'nope'"):
        config_from_args(build_parser().parse_args(["serve", "--method", "nope"]))
    with pytest.raises(ValueError, match="adapt_batch"):
        config_from_args(build_parser().parse_args(["serve", "--micro-batch", "32", "--adapt-batch", "16"]))


def test_a_failing_update_is_counted_and_the_worker_goes_on(tmp_path):
    s = service(tmp_path, start_worker=True, max_wait=0.0, max_update_rate=100.0)
    lane = s.lanes["text"]
    original, calls, done = lane.retriever.adapt, [], threading.Event()

    def fails_once(x):
        calls.append(len(calls))
        if len(calls) == 1:
            raise RuntimeError("out of memory, say")
        out = original(x)
        done.set()
        return out

    lane.retriever.adapt = fails_once
    try:
        s.search("text", s.dataset.texts[0])
        for _ in range(600):  # bounded: until the first (failing) update has been counted
            if s.stats()["failures"]:
                break
            threading.Event().wait(0.1)
        stats = s.stats()
        assert stats["failures"] == 1 and "out of memory, say" in stats["last_error"]
        s.search("text", s.dataset.texts[1])
        assert done.wait(60) and s.worker.is_alive()
    finally:
        s.close()
    assert s.updates == 1
