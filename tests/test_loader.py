"""Loader workers chosen per stream (engine.stream.auto_workers)."""

import os
from types import SimpleNamespace

from queryshift.engine.stream import auto_workers


def test_auto_workers_for_long_image_streams_only():
    cores = os.cpu_count() or 1
    assert auto_workers(SimpleNamespace(modality="image"), 100) == max(0, min(4, cores - 1))
    assert auto_workers(SimpleNamespace(modality="image"), 7) == 0  # workers would cost more than they save
    assert auto_workers(SimpleNamespace(modality="text"), 100) == 0  # strings: nothing to decode
