"""Query shifts: corruptions, domain styles and streams applied to the query side on the fly.

``build(spec, modality, seed)`` turns a ``--shift`` value such as ``gaussian_noise:5``,
``RandomCharAug_swap:7`` or ``stream:temporal`` into a :class:`QueryShift`. The engine calls it for every
query with the query's dataset index and its position in the stream; the result depends only on
(seed, index, position), so a resumed run sees exactly the same queries.
"""

from __future__ import annotations

import hashlib
from typing import Any

import numpy as np


def item_rng(seed: int, index: int, salt: str = "") -> np.random.Generator:
    """A generator private to one query, stable across processes, workers and resumes."""
    digest = hashlib.sha256(f"{seed}:{index}:{salt}".encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "little"))


class QueryShift:
    """Base: the identity shift (clean queries)."""

    name = "clean"
    modality: str | None = None  # the query modality it shifts (queryshift.modalities), or None (any)

    def __call__(self, item: Any, index: int, position: int, total: int, rng: np.random.Generator) -> Any:
        return item

    def segment(self, position: int, total: int) -> str:
        """Name of the shift in force at this stream position (streams report metrics per segment)."""
        return self.name


def build(spec: str | None, modality: str, seed: int = 0) -> QueryShift:
    """Resolve a shift spec for queries of ``modality``; ``None``/"none"/"clean" is the identity."""
    if spec in (None, "", "none", "clean"):
        return QueryShift()
    from .registry import build_shift  # the catalogue of corruptions, styles and streams

    return build_shift(spec, modality, seed)
