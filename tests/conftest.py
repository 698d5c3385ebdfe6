import os

import pytest

# Tests never touch the network: hub clients fail fast instead of retrying for a minute.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture
def karpathy(tmp_path):
    """A tiny Karpathy-format split (8 random JPEGs, 2 captions each): (JSON path, image root)."""
    from tests.helpers import make_karpathy

    return make_karpathy(tmp_path / "data", n_images=8, captions=2), str(tmp_path / "data")
