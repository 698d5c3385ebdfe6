"""Public extension points: a method, a backbone and a shift defined outside the package, registered through
``queryshift.methods.register``, ``queryshift.models.register_backbone`` and ``queryshift.shifts.registry.
register_shift``, run end to end by ``queryshift run``; method capabilities declared by the method."""

import json

import numpy as np
import pytest
from PIL import Image

from queryshift import methods, models
from queryshift.cli import main as cli_main
from queryshift.methods import Method
from queryshift.shifts import registry
from tests.helpers import make_karpathy

CALLS: dict[str, int] = {"backbone": 0, "shift": 0, "adapt": 0}


class MyEntropy(Method):
    """Entropy minimisation over the gallery, written as a user would outside the package."""

    name = "my-entropy"
    defaults = {"tau": 0.05}

    def forward_and_adapt(self, query_batch, step):
        CALLS["adapt"] += 1
        scores = self.encode(query_batch) @ self.gallery.T
        p = (scores / self.hp["tau"]).softmax(1)
        loss = -(p * p.clamp_min(1e-12).log()).sum(1).mean()
        info = {}
        self.update(loss, info)
        return scores, info


def my_backbone(spec: str, device: str):
    """A backbone file's whole contract: ``(spec, device) -> DualEncoder``; here the tiny test CLIP."""
    CALLS["backbone"] += 1
    return models.load_model(f"openclip:qs-tiny/{spec or 'random'}", device)


def invert(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    CALLS["shift"] += 1
    return Image.fromarray(255 - np.asarray(image.convert("RGB")))


@pytest.fixture
def registered():
    """Register the three extensions for one test and remove them after it, through the public API."""
    methods.register("my-entropy", MyEntropy)
    models.register_backbone("mine", my_backbone)
    registry.register_shift("my-invert", invert, "image")
    CALLS.update(backbone=0, shift=0, adapt=0)
    yield
    methods.unregister("my-entropy")
    models.unregister_backbone("mine")
    registry.unregister_shift("my-invert")


def test_user_method_backbone_and_shift_run_end_to_end(registered, tmp_path, capsys):
    data = make_karpathy(tmp_path / "d", n_images=6, captions=2)
    out = tmp_path / "run"
    argv = ["run", "--model", "mine:random", "--data", data, "--image-root", str(tmp_path / "d"),
            "--method", "my-entropy", "--shift", "my-invert", "--batch-size", "4", "--steps", "1",
            "--out", str(out), "--cache-dir", str(tmp_path / "c"), "--no-progress"]
    assert cli_main(argv) == 0, capsys.readouterr().err
    result = json.loads((out / "result.json").read_text())
    assert result["config"]["method"] == "my-entropy" and result["config"]["model"] == "mine:random"
    assert result["config"]["shift"] == "my-invert"
    assert CALLS["backbone"] >= 1 and CALLS["shift"] == 6 and CALLS["adapt"] == 2  # 6 image queries, 2 batches
    assert "my-entropy" in methods.available() and "my-invert" in registry.list_shifts("image")


def test_unregistered_extensions_are_gone(registered):
    assert "mine" in models.BACKENDS
    models.unregister_backbone("mine")
    registry.unregister_shift("my-invert")
    methods.unregister("my-entropy")
    with pytest.raises(ValueError, match="unknown model 'mine:x'"):
        models.load_model("mine:x")
    with pytest.raises(ValueError, match="unknown shift 'my-invert'"):
        registry.build_shift("my-invert", "image")
    with pytest.raises(ValueError, match="unknown method 'my-entropy'"):
        methods.get("my-entropy")
    # the fixture's own removal after this test must not fail on names already gone
    models.register_backbone("mine", my_backbone)
    registry.register_shift("my-invert", invert, "image")
    methods.register("my-entropy", MyEntropy)


def test_register_backbone_and_shift_refuse_clashes_and_bad_names(registered):
    models.register_backbone("mine", my_backbone)  # the same factory again: nothing to do
    with pytest.raises(ValueError, match="backbone 'mine' is already registered"):
        models.register_backbone("mine", invert)
    with pytest.raises(ValueError, match="backbone 'openclip' is already registered"):
        models.register_backbone("openclip", my_backbone)
    with pytest.raises(ValueError, match="backbone name"):
        models.register_backbone("my:net", my_backbone)
    with pytest.raises(TypeError, match="callable"):
        models.register_backbone("other", 3)
    with pytest.raises(ValueError, match="shift 'my-invert' is already registered"):
        registry.register_shift("my-invert", lambda item, rng: item, "image")
    with pytest.raises(ValueError, match="shift 'gaussian_noise' is already"):
        registry.register_shift("gaussian_noise", invert, "image")
    with pytest.raises(ValueError, match="modality must be one of image, text, audio, video, got 'smell'"):
        registry.register_shift("my-other", invert, "smell")


def test_a_user_shift_of_audio_queries(registered):
    import numpy as np

    registry.register_shift("my-quieter", lambda item, rng: item * 0.5, "audio")
    try:
        shift = registry.build_shift("my-quieter", "audio")
        out = shift(np.ones(4, dtype=np.float32), 0, 0, 1, np.random.default_rng(0))
        assert out.tolist() == [0.5] * 4 and "my-quieter" in registry.list_shifts("audio")
        with pytest.raises(ValueError, match="corrupts audio queries, but the queries here are video"):
            registry.build_shift("my-quieter", "video")
    finally:
        registry.unregister_shift("my-quieter")


def test_a_user_shift_refuses_the_other_modality(registered):
    with pytest.raises(ValueError, match="corrupts image queries, but the queries here are text"):
        registry.build_shift("my-invert", "text")
    assert "my-invert" not in registry.list_shifts("text")


def test_shardable_is_declared_by_the_method(monkeypatch):
    from queryshift import distributed
    from queryshift.engine import RunConfig
    from queryshift.engine.runner import check_distributed

    assert {name for name in methods.available() if not methods.get(name).shardable} >= {"sar", "deyo"}
    assert methods.get("tcr").shardable and methods.get("tent").shardable

    class Unshardable(MyEntropy):
        shardable = False

    methods.register("my-unshardable", Unshardable)
    try:
        monkeypatch.setattr(distributed, "world_size", lambda: 2)
        check_distributed(RunConfig(method="tent", batch_size=4), 8)  # shardable: accepted
        with pytest.raises(ValueError, match="'my-unshardable' .* data-parallel"):
            check_distributed(RunConfig(method="my-unshardable", batch_size=4), 8)
    finally:
        methods.unregister("my-unshardable")
