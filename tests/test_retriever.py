"""The online core: search answers with the current parameters, adapt changes them, reset restores them."""

import numpy as np
import torch
from PIL import Image

from queryshift.engine import Retriever
from queryshift.models import load_model

MODEL = "openclip:qs-tiny/random"


def _retriever(method="tent"):
    torch.manual_seed(0)
    model = load_model(MODEL, "cpu")
    gallery = model.encode("text", model.tokenize([f"caption number {i}" for i in range(40)])).detach()
    rng = np.random.default_rng(0)
    images = torch.stack([model.preprocess(Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)))
                          for _ in range(6)])
    r = Retriever(model, gallery, "image", method, device="cpu")
    return r, r.model_input(images)


def test_search_returns_the_top_k_of_the_current_scores_in_order():
    r, x = _retriever()
    top_scores, top_ids = r.search(x, k=5)
    full = r.scores(x)
    assert top_ids.shape == (6, 5)
    expected = full.sort(dim=1, descending=True)
    torch.testing.assert_close(top_scores, expected.values[:, :5])
    assert torch.equal(full.gather(1, top_ids), top_scores)


def test_adapt_moves_search_and_reset_brings_back_the_source_answers():
    r, x = _retriever("tent")
    before = r.scores(x)
    r.method.config.lr = 1e-1  # a visible step on a tiny model
    for group in r.method.optimizer.param_groups:
        group["lr"] = 1e-1
    r.adapt(x)
    after = r.scores(x)
    assert not torch.allclose(before, after), "an adapting method must change the answers"
    torch.testing.assert_close(r.scores(x, source=True), before)  # the source answers stay available
    r.reset()
    torch.testing.assert_close(r.scores(x), before)


def test_search_does_not_adapt():
    r, x = _retriever("tent")
    before = r.scores(x)
    for _ in range(3):
        r.search(x, k=3)
    assert torch.equal(r.scores(x), before)
