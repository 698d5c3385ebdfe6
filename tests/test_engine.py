"""End to end through the engine with the tiny random open_clip architecture and generated images."""

import json

import pytest
import torch

from queryshift import methods
from queryshift.cli import main as cli_main
from queryshift.data import DataError
from queryshift.engine import RunConfig, run
from queryshift.methods.base import Method
from queryshift.models import WeightsNotFoundError, load_model
from tests.helpers import tiny_run_config

MODEL = "openclip:qs-tiny/random"


class EntropyMin(Method):
    """A Tent-like method local to these tests, so the engine is tested without any real method."""

    name = "entropy-min"
    defaults = {"tau": 0.05}
    fail_at_batch = None  # simulate a kill at this batch

    def forward_and_adapt(self, query_batch, step):
        if self.batch_index == self.fail_at_batch:
            raise KeyboardInterrupt
        scores = self.encode(query_batch) @ self.gallery.T
        p = (scores / self.hp["tau"]).softmax(1)
        loss = -(p * p.clamp_min(1e-12).log()).sum(1).mean()
        info = {}
        self.update(loss, info)
        return scores, info


@pytest.fixture
def entropy_method():
    methods.register("entropy-min", "tests.test_engine:EntropyMin")  # by path: bench workers import it too
    EntropyMin.fail_at_batch = None
    yield
    EntropyMin.fail_at_batch = None
    methods.unregister("entropy-min")



_cfg = tiny_run_config


@pytest.mark.parametrize("direction", ["i2t", "t2i"])
def test_source_run_writes_result_and_log(karpathy, tmp_path, direction):
    out = tmp_path / f"out-{direction}"
    result = run(_cfg(karpathy, tmp_path, direction=direction, out=str(out), batch_size=3))
    saved = json.loads((out / "result.json").read_text())
    for key in ("r1", "r5", "r10", "r_mean", "map", "config", "seed", "versions", "git_commit"):
        assert key in saved
    assert saved["r1"] == result["r1"]
    n = 8 if direction == "i2t" else 16
    assert saved["n_queries"] == n
    lines = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    assert [x["batch"] for x in lines] == list(range(-(-n // 3)))
    assert sum(x["n"] for x in lines) == n and all("seconds" in x for x in lines)
    assert (out / "table.md").read_text().startswith("| method")


def test_cli_run_documents_and_runs(karpathy, tmp_path, capsys):
    data, root = karpathy
    out = tmp_path / "cli-out"
    code = cli_main(["run", "--model", MODEL, "--data", data, "--image-root", root, "--direction", "i2t",
                     "--method", "source", "--out", str(out), "--cache-dir", str(tmp_path / "c"), "--no-progress"])
    assert code == 0
    assert "| source | i2t | clean |" in capsys.readouterr().out
    assert json.loads((out / "result.json").read_text())["config"]["method"] == "source"
    # a second run into the same directory must not silently destroy the first
    assert cli_main(["run", "--model", MODEL, "--data", data, "--image-root", root, "--out", str(out),
                     "--no-progress"]) == 2


def test_resume_after_interruption_gives_identical_metrics(karpathy, tmp_path, entropy_method):
    kw = dict(method="entropy-min", direction="t2i", batch_size=3, steps=2)
    full = run(_cfg(karpathy, tmp_path, out=str(tmp_path / "full"), **kw))

    out = tmp_path / "killed"
    EntropyMin.fail_at_batch = 3
    with pytest.raises(KeyboardInterrupt):
        run(_cfg(karpathy, tmp_path, out=str(out), **kw))
    assert len((out / "log.jsonl").read_text().splitlines()) == 3  # finished batches survive the kill
    assert not (out / "result.json").exists()
    EntropyMin.fail_at_batch = None
    resumed = run(_cfg(karpathy, tmp_path, out=str(out), resume=True, **kw))
    for key in ("r1", "r5", "r10", "r_mean", "map", "n_queries"):
        assert resumed[key] == full[key]
    full_log = [json.loads(x) for x in (tmp_path / "full" / "log.jsonl").read_text().splitlines()]
    resumed_log = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    assert [x["ranks"] for x in resumed_log] == [x["ranks"] for x in full_log]
    assert [x["loss"] for x in resumed_log] == pytest.approx([x["loss"] for x in full_log], rel=1e-6)


def test_resume_refuses_changed_settings(karpathy, tmp_path, entropy_method):
    out = str(tmp_path / "o")
    run(_cfg(karpathy, tmp_path, out=out, method="entropy-min", batch_size=4))
    with pytest.raises(ValueError, match="batch_size 4 -> 2"):
        run(_cfg(karpathy, tmp_path, out=out, method="entropy-min", batch_size=2, resume=True))


def test_resume_refuses_other_source_weights(karpathy, tmp_path, entropy_method):
    out = tmp_path / "o"
    result = run(_cfg(karpathy, tmp_path, out=str(out), method="entropy-min", batch_size=4))
    state = torch.load(out / "state.pt", weights_only=False)
    assert state["model_weights"] == result["model_weights"]
    torch.save({**state, "model_weights": "0" * 16}, out / "state.pt")  # as if the checkpoint were retrained
    with pytest.raises(ValueError, match="weights of .* changed"):
        run(_cfg(karpathy, tmp_path, out=str(out), method="entropy-min", batch_size=4, resume=True))


def test_only_query_tower_layernorms_move(karpathy, tmp_path, entropy_method):
    torch.manual_seed(0)
    model = load_model(MODEL)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    gallery = torch.nn.functional.normalize(torch.randn(5, 32), dim=1)
    method = EntropyMin(model, gallery, "image", methods.AdaptConfig(steps=2, lr=1e-2))
    method.step(torch.randn(4, 3, 32, 32))
    adapted = {n for n, _ in model.adaptable_parameters("image")}
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert changed and changed <= adapted
    method.reset()
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_bad_image_is_named_and_can_be_skipped(karpathy, tmp_path):
    data, root = karpathy
    (tmp_path / "data" / "img" / "5.jpg").write_bytes(b"\x00garbage")
    with pytest.raises(DataError, match=r"img/5.jpg"):
        run(_cfg(karpathy, tmp_path, direction="i2t"))
    result = run(_cfg(karpathy, tmp_path, direction="i2t", skip_bad_images=True))
    assert result["n_queries"] == 7 and "5.jpg" in result["skipped_items"][0]


def test_empty_caption_is_named(tmp_path):
    (tmp_path / "a.json").write_text(json.dumps([{"image": "x.jpg", "caption": ["ok", ""]}]))
    with pytest.raises(DataError, match="empty caption 1 of entry 0"):
        run(RunConfig(model=MODEL, data=str(tmp_path / "a.json"), progress=False))


def test_missing_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(WeightsNotFoundError, match=r"checkpoint not found: .*nope.pt"):
        load_model(f"openclip:qs-tiny@{tmp_path}/nope.pt")
    with pytest.raises(ValueError, match="unknown model"):
        load_model("nosuchbackend:x")


def test_gallery_cache_is_reused(karpathy, tmp_path, monkeypatch):
    from queryshift.models.openclip import OpenCLIPEncoder

    calls = []  # i2t: the text tower encodes the gallery and nothing else, so its calls are cache misses
    encode_text = OpenCLIPEncoder.encode_text
    monkeypatch.setattr(OpenCLIPEncoder, "encode_text", lambda self, t: calls.append(len(t)) or encode_text(self, t))
    cfg = _cfg(karpathy, tmp_path, direction="i2t")
    first = run(cfg)
    assert sum(calls) == 16  # a miss: all 16 captions encoded
    files = list((tmp_path / "cache" / "gallery").glob("*/manifest.json"))
    assert len(files) == 1
    manifest = json.loads(files[0].read_text())
    assert manifest["complete"] and manifest["dtype"] == "float16" and manifest["rows"] == 16  # 8 x 2 captions
    calls.clear()
    assert run(cfg)["r1"] == first["r1"]
    assert calls == []  # a hit: the gallery came from the cache
    assert list((tmp_path / "cache" / "gallery").glob("*/manifest.json")) == files


def test_forgetting_is_reported(karpathy, tmp_path, entropy_method):
    result = run(_cfg(karpathy, tmp_path, method="entropy-min", eval_clean_after=True, batch_size=4))
    f = result["forgetting"]
    assert f["forgetting"] == pytest.approx(f["r1_after"] - f["r1_source"], abs=0.01)


def _run_in_child(cfg):
    return run(cfg)["r1"]


def test_image_stream_with_loader_workers_runs_in_a_spawned_process(tmp_path):
    """bench runs each point in a spawned process; an image stream of 8+ batches there starts DataLoader
    workers, which must not need to pickle the model and shift (the spawn default would)."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    # the shapes world (its dataset is not picklable), 8 batches of 1: loader workers chosen automatically
    cfg = RunConfig(model="shapes-clip", data="shapes", direction="i2t", batch_size=1, max_queries=8,
                    cache_dir=str(tmp_path / "cache"), progress=False)
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        r1_child = pool.submit(_run_in_child, cfg).result(timeout=600)
    assert r1_child == run(cfg)["r1"]
