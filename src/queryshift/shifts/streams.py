"""Streams whose query shift changes with the stream position (REST's temporal-sequence and diverse shifts).

A stream is itself a :class:`QueryShift`: it hands each query to the shift in force at that position, and
``segment()`` names that shift so the engine can report R@1 per segment. Which shift is in force depends only
on (position, total, seed), never on the query, so a resumed run sees the same stream.
"""

from __future__ import annotations

import numpy as np

from . import QueryShift

# clean -> noise -> blur -> weather -> digital, at the headline severity (5) / a strong text level
DEFAULT_TEMPORAL = {
    "image": ("clean", "gaussian_noise:5", "defocus_blur:5", "snow:5", "contrast:5", "jpeg_compression:5"),
    "text": ("clean", "OcrAug:5", "RandomCharAug_swap:5", "sr:7", "rd:7", "ip:7"),
}
DEFAULT_DIVERSE = {
    "image": ("gaussian_noise:5", "defocus_blur:5", "snow:5", "contrast:5", "jpeg_compression:5"),
    "text": ("KeyboardAug:5", "OcrAug:5", "RandomCharAug_insert:5", "sr:7", "ri:7", "rs:7"),
}
DEFAULT_BLOCK = 64  # one global query batch


class _Stream(QueryShift):
    def __init__(self, name: str, shifts: list[QueryShift]):
        if not shifts:
            raise ValueError(f"{name}: a stream needs at least one shift")
        self.name, self.shifts = name, list(shifts)
        kinds = {s.modality for s in shifts} - {None}
        self.modality = kinds.pop() if len(kinds) == 1 else None

    def active(self, position: int, total: int) -> int:
        raise NotImplementedError

    def __call__(self, item, index, position, total, rng):
        return self.shifts[self.active(position, total)](item, index, position, total, rng)

    def segment(self, position: int, total: int) -> str:
        return self.shifts[self.active(position, total)].name


class TemporalStream(_Stream):
    """The shifts follow one another in equal consecutive segments of the stream."""

    def active(self, position: int, total: int) -> int:
        if total <= 0:
            return 0
        return min(len(self.shifts) - 1, max(0, position) * len(self.shifts) // total)


class DiverseStream(_Stream):
    """The shifts take turns in blocks of ``block`` positions.

    Every cycle of ``len(shifts)`` blocks visits each shift once, in an order drawn from the seed, so the
    shifts stay balanced while the next one is not predictable.
    """

    def __init__(self, name: str, shifts: list[QueryShift], block: int = DEFAULT_BLOCK, seed: int = 0):
        super().__init__(name, shifts)
        if block < 1:
            raise ValueError(f"{name}: block size must be >= 1, got {block}")
        self.block, self.seed = block, seed

    def active(self, position: int, total: int) -> int:
        cycle, slot = divmod(max(0, position) // self.block, len(self.shifts))
        order = np.random.default_rng([self.seed, cycle, 0x5EED]).permutation(len(self.shifts))
        return int(order[slot])
