"""Audio-visual (and audio-text) retrieval datasets: items of several modalities grouped into clips.

Every item of every modality belongs to one group (a clip id): a clip's video, its audio track and its captions
share a group, and a query's relevant gallery items are the gallery modality's items of the query's group. Items
are read on demand through one loader per modality, in the canonical form each modality has everywhere in
queryshift:

- ``video``: a uint8 array ``[T, H, W, 3]`` (the frames the dataset samples, at their native size);
- ``audio``: a mono float32 waveform at :data:`AUDIO_RATE` Hz, in [-1, 1];
- ``text``: a caption string.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .retrieval import DataError

AUDIO_RATE = 16_000  # Hz: every audio item is delivered at this rate (loaders resample; models resample further)
AV_MODALITIES = ("video", "audio", "text")


@dataclass
class AVDataset:
    """``items[modality]`` names each item (a path, or a key the loader understands), ``groups[modality]`` its
    group, ``loaders[modality](index)`` reads it; ``source`` is the index file (for messages and cache keys)."""

    items: dict[str, list[str]]
    groups: dict[str, list[int]]
    loaders: dict[str, Callable[[int], Any]] = field(repr=False)
    name: str = "av-dataset"
    source: str = ""
    root: str | None = None

    def __post_init__(self):
        where = self.source or self.name
        if len(self.items) < 2:
            raise DataError(f"{where}: an audio-visual dataset needs at least two modalities, got {sorted(self.items)}")
        for modality, names in self.items.items():
            if modality not in AV_MODALITIES:
                raise DataError(f"{where}: unknown modality {modality!r}; expected some of {AV_MODALITIES}")
            if len(self.groups.get(modality, ())) != len(names):
                raise DataError(f"{where}: {modality}: {len(names)} items but "
                                f"{len(self.groups.get(modality, ()))} group ids")
            if modality not in self.loaders:
                raise DataError(f"{where}: no loader for {modality}")
            if not names:
                raise DataError(f"{where}: no {modality} items")

    def __repr__(self) -> str:
        counts = ", ".join(f"{len(v)} {m}" for m, v in self.items.items())
        return f"AVDataset({self.name!r}, {counts})"

    @property
    def modalities(self) -> tuple[str, ...]:
        return tuple(self.items)

    def count(self, modality: str) -> int:
        self._check(modality)
        return len(self.items[modality])

    def load(self, modality: str, index: int) -> Any:
        self._check(modality)
        return self.loaders[modality](index)

    def relevance(self, query: str, gallery: str) -> list[list[int]]:
        """Per query item of ``query``: the ``gallery`` items of its group."""
        self._check(query)
        self._check(gallery)
        by_group: dict[int, list[int]] = {}
        for j, g in enumerate(self.groups[gallery]):
            by_group.setdefault(g, []).append(j)
        return [by_group.get(g, []) for g in self.groups[query]]

    def fingerprint(self) -> str:
        """Content hash of the item names and groups; part of the gallery cache key."""
        h = hashlib.sha256()
        h.update(json.dumps([self.name, self.root or "", self.items, self.groups], sort_keys=True).encode())
        return h.hexdigest()[:16]

    def _check(self, modality: str) -> None:
        if modality not in self.items:
            raise DataError(f"{self.source or self.name} has no {modality} items; it has "
                            f"{', '.join(self.modalities)}")
