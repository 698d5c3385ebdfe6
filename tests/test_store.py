"""The fp16 memory-mapped embedding store: resumable chunked filling, manifest checks."""

import json

import numpy as np
import pytest
import torch

from queryshift.engine.store import EmbeddingStore

MANIFEST = {"model": "m", "model_digest": "abc", "preprocess": "p", "dataset": "d", "dataset_digest": "123",
            "modality": "text", "max_words": 30}


def embeddings(rows):
    g = torch.Generator().manual_seed(0)
    table = torch.nn.functional.normalize(torch.randn(50, 8, generator=g), dim=1)
    return table[rows]


def test_interrupted_fill_resumes_where_it_stopped(tmp_path):
    store = EmbeddingStore(str(tmp_path / "s"))
    calls = []

    def failing(rows):
        calls.append(rows)
        if len(calls) == 3:
            raise KeyboardInterrupt  # killed while encoding the third chunk
        return embeddings(rows)

    with pytest.raises(KeyboardInterrupt):
        store.fill(MANIFEST, 50, failing, chunk=16)
    saved = json.loads((tmp_path / "s" / "manifest.json").read_text())
    assert saved["rows_done"] == 32 and not saved["complete"]
    assert not store.complete(MANIFEST)

    resumed = []
    store.fill(MANIFEST, 50, lambda rows: resumed.append(rows) or embeddings(rows), chunk=16)
    assert resumed == [list(range(32, 48)), list(range(48, 50))]  # only what was missing
    assert store.complete(MANIFEST)
    array = store.open()
    assert array.dtype == np.float16 and isinstance(array, np.memmap)
    np.testing.assert_array_equal(array, embeddings(list(range(50))).numpy().astype(np.float16))


def test_a_store_of_other_weights_is_rebuilt_not_trusted(tmp_path):
    store = EmbeddingStore(str(tmp_path / "s"))
    store.fill(MANIFEST, 50, embeddings, chunk=64)
    other = {**MANIFEST, "model_digest": "def"}
    assert not store.complete(other)
    seen = []
    store.fill(other, 50, lambda rows: seen.append(rows) or embeddings(rows), chunk=64)
    assert seen == [list(range(50))]
    assert json.loads((tmp_path / "s" / "manifest.json").read_text())["model_digest"] == "def"


def test_nonfinite_embeddings_are_refused(tmp_path):
    store = EmbeddingStore(str(tmp_path / "s"))
    with pytest.raises(FloatingPointError, match="gallery embeddings 0..3"):
        store.fill(MANIFEST, 4, lambda rows: torch.full((len(rows), 8), float("nan")))
