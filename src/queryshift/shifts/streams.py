"""Streams whose query shift changes with the stream position (REST's temporal-sequence and diverse shifts).

A stream is itself a :class:`QueryShift`: it hands each query to the shift in force at that position, and
``segment()`` names that shift so the engine can report R@1 per segment. Which shift is in force depends only
on (position, total, seed), never on the query, so a resumed run sees the same stream.

Temporal and diverse streams split one pass over the queries between their shifts. A *continual* stream
(``passes`` > 1) is what a deployed service meets: every listed shift streams the whole query set once, in
order, with no reset in between, so the engine repeats the query order ``passes`` times.
"""

from __future__ import annotations

import numpy as np

from . import QueryShift

# clean -> noise -> blur -> weather -> digital, at the headline severity (5) / a strong text level
DEFAULT_TEMPORAL = {
    "image": ("clean", "gaussian_noise:5", "defocus_blur:5", "snow:5", "contrast:5", "jpeg_compression:5"),
    "text": ("clean", "OcrAug:5", "RandomCharAug_swap:5", "sr:7", "rd:7", "ip:7"),
    # clean -> additive noise -> environment -> room -> transmission
    "audio": ("clean", "gaussian_noise:5", "traffic:5", "rain:5", "reverb:5", "codec:5"),
    # clean -> sensor noise -> blur -> weather -> transmission
    "video": ("clean", "gaussian_noise:5", "defocus_blur:5", "snow:5", "contrast:5", "h264:5"),
}
DEFAULT_DIVERSE = {
    "image": ("gaussian_noise:5", "defocus_blur:5", "snow:5", "contrast:5", "jpeg_compression:5"),
    "text": ("KeyboardAug:5", "OcrAug:5", "RandomCharAug_insert:5", "sr:7", "ri:7", "rs:7"),
    "audio": ("gaussian_noise:5", "traffic:5", "crowd:5", "wind:5", "telephone:5"),
    "video": ("gaussian_noise:5", "defocus_blur:5", "snow:5", "contrast:5", "frame_drop:5"),
}
DEFAULT_BLOCK = 64  # one global query batch
# the usual continual-TTA order of the 16 image corruptions (CoTTA and its successors)
CONTINUAL_IMAGE_ORDER = ("gaussian_noise", "shot_noise", "impulse_noise", "defocus_blur", "glass_blur",
                         "motion_blur", "zoom_blur", "snow", "frost", "fog", "brightness", "contrast",
                         "elastic_transform", "pixelate", "jpeg_compression", "speckle_noise")
# character- and word-level text corruptions at their strongest level (sentence-level ones need hub models)
CONTINUAL_TEXT = ("KeyboardAug:7", "OcrAug:7", "RandomCharAug_insert:7", "RandomCharAug_substitute:7",
                  "RandomCharAug_swap:7", "RandomCharAug_delete:7", "sr:7", "ri:7", "rs:7", "rd:7", "ip:7")
# READ's audio corruptions (its Gaussian noise, then its five environmental noises), then the everyday ones
CONTINUAL_AUDIO_ORDER = ("gaussian_noise", "traffic", "crowd", "rain", "thunder", "wind", "reverb", "pitch_shift",
                         "time_stretch", "clipping", "telephone", "codec", "dropout")
# READ's 15 frame corruptions in the continual-TTA order (it has no speckle noise), then the temporal ones
CONTINUAL_VIDEO_ORDER = tuple(c for c in CONTINUAL_IMAGE_ORDER if c != "speckle_noise") + (
    "frame_drop", "frame_rate", "h264")
DEFAULT_CONTINUAL = {  # stream:continual (severity 5), stream:continual-s3 (severity 3)
    "image": tuple(f"{c}:5" for c in CONTINUAL_IMAGE_ORDER),
    "text": CONTINUAL_TEXT,
    "audio": tuple(f"{c}:5" for c in CONTINUAL_AUDIO_ORDER),
    "video": tuple(f"{c}:5" for c in CONTINUAL_VIDEO_ORDER),
}
DEFAULT_CONTINUAL_S3 = {"image": tuple(f"{c}:3" for c in CONTINUAL_IMAGE_ORDER), "text": CONTINUAL_TEXT,
                        "audio": tuple(f"{c}:3" for c in CONTINUAL_AUDIO_ORDER),
                        "video": tuple(f"{c}:3" for c in CONTINUAL_VIDEO_ORDER)}


class _Stream(QueryShift):
    #: how many times the engine streams the query order (1: the shifts share one pass)
    passes = 1

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


class ContinualStream(TemporalStream):
    """Every shift streams the whole query set once, in the listed order, with no reset: ``passes`` is the
    number of shifts. A shift listed twice is two segments (its second one named ``NAME#2``), so R@1 after a
    return to an earlier condition is reported apart from the first visit."""

    def __init__(self, name: str, shifts: list[QueryShift]):
        super().__init__(name, shifts)
        self.passes = len(self.shifts)
        seen: dict[str, int] = {}
        self.segment_names = []
        for s in self.shifts:
            seen[s.name] = seen.get(s.name, 0) + 1
            self.segment_names.append(s.name if seen[s.name] == 1 else f"{s.name}#{seen[s.name]}")

    def segment(self, position: int, total: int) -> str:
        return self.segment_names[self.active(position, total)]


class ContinualDiverseStream(DiverseStream):
    """The continual stream's length (``passes`` = number of shifts: the query set streamed that many times)
    with the shifts taking turns in blocks of ``block`` positions, in a seeded order per cycle, as in
    :class:`DiverseStream`: each shift holds about one pass's worth of queries, and a condition returns
    many times instead of once."""

    def __init__(self, name: str, shifts: list[QueryShift], block: int = DEFAULT_BLOCK, seed: int = 0):
        super().__init__(name, shifts, block=block, seed=seed)
        self.passes = len(self.shifts)
