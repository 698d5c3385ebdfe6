"""--precision: the query tower runs under autocast, embeddings/losses/statistics stay fp32."""

import pytest
import torch

from queryshift import methods
from queryshift.engine import RunConfig
from queryshift.models import load_model


def tower_dtypes(precision):
    torch.manual_seed(0)
    model = load_model("openclip:qs-tiny/random")
    gallery = torch.nn.functional.normalize(torch.randn(6, model.encode("text", model.tokenize(["a"])).shape[1]), dim=1)
    method = methods.get("tcr")(model, gallery, "text", methods.AdaptConfig(steps=1, precision=precision))
    seen = []
    hooks = [m.register_forward_hook(lambda mod, inp, out: seen.append(out.dtype))
             for m in model.tower("text").modules() if type(m) is torch.nn.Linear]
    scores, info = method.step(model.tokenize(["a red thing", "blue thing", "green", "x", "y", "z"]))
    for h in hooks:
        h.remove()
    return seen, scores, info


@pytest.mark.parametrize("precision, dtype", [("bf16", torch.bfloat16), ("fp32", torch.float32)])
def test_tower_runs_in_the_requested_precision_and_scores_are_fp32(precision, dtype):
    seen, scores, info = tower_dtypes(precision)
    assert seen and set(seen) == {dtype}
    assert scores.dtype == torch.float32 and torch.isfinite(scores).all()
    assert "skipped" not in info or info["skipped"] == "empty"


def test_bad_precision_is_named():
    with pytest.raises(ValueError, match="precision must be fp32, bf16 or fp16, got 'int8'"):
        RunConfig(precision="int8")
    with pytest.raises(ValueError, match="precision must be one of"):
        methods.AdaptConfig(precision="fp64")
