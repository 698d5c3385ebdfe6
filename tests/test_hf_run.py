"""End to end: tiny random hf-blip / hf-clip models through the engine in both directions, offline."""

from __future__ import annotations

import importlib.util
import os

import pytest

from queryshift import methods
from queryshift.engine import RunConfig, run
from tests.helpers import make_karpathy
from tests.test_hf_backbones import save_tiny_blip, save_tiny_clip

pytest.importorskip("transformers")

METHODS = [m for m in ("source", "tent") if m in methods.METHODS
           and importlib.util.find_spec("queryshift.methods" + methods.METHODS[m].partition(":")[0]) is not None]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("hfrun")
    return {
        "data": make_karpathy(str(root / "data"), n_images=4, captions=2),
        "hf-blip": save_tiny_blip(str(root / "blip")),
        "hf-clip": save_tiny_clip(str(root / "clip")),
        "cache": str(root / "cache"),
    }


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("direction", ["i2t", "t2i"])
@pytest.mark.parametrize("backend", ["hf-blip", "hf-clip"])
def test_run_tiny_hf_model(setup, backend, direction, method, tmp_path):
    cfg = RunConfig(model=f"{backend}:{setup[backend]}", data=setup["data"],
                    image_root=os.path.dirname(setup["data"]), direction=direction, method=method,
                    batch_size=3, steps=2, cache_dir=setup["cache"], out=str(tmp_path / "out"), progress=False)
    result = run(cfg)
    assert 0.0 <= result["r1"] <= 100.0 and 0.0 <= result["map"] <= 100.0
    assert (tmp_path / "out" / "result.json").exists()
