"""A synthetic audio-visual world (``shapes-av``): short clips of moving shapes with a soundtrack of the same scene.

A clip is a scene of 1-3 shapes from :mod:`queryshift.data.shapes` (same shapes, colours, sizes, rendered by its
:func:`~queryshift.data.shapes.render`) that glide in straight lines at constant speed and bounce off the walls,
seen in :data:`FRAMES` frames of :data:`FRAME_SIZE` px over :data:`DURATION` s, and heard in a mono soundtrack at
:data:`SAMPLE_RATE` Hz synthesised from the same scene, so either modality identifies the clip:

- timbre from the shape (circle: sine, square: odd harmonics, triangle: all harmonics like a sawtooth, diamond:
  an organ-like octave stack, cross: a struck bar's inharmonic partials, star: a sine with breath noise above);
- pitch from the colour (one note per colour, three semitones apart, detuned by at most a third of a semitone);
- onsets from the motion: an object sounds a decaying note every :data:`STEP` canvas pixels it travels, so a
  fast object plays more notes than a slow one;
- loudness proportional to the radius;
- all in a mildly reverberant room (an exponentially decaying noise impulse response, RT60 0.15-0.35 s).

Everything is a pure function of (split seed, clip index): clip i of a split is the same in any process and
independently of the other clips, and clip i's video matches clip i's audio exactly (the ground truth is the
clip identity). Each clip also has a short caption written from its scene, for audio-text tasks.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from functools import partial

import numpy as np
from scipy.signal import butter, fftconvolve, sosfilt

from .av import AUDIO_RATE, AV_MODALITIES, AVDataset
from .retrieval import DataError
from .shapes import (
    CANVAS,
    COLOURS,
    SHAPES,
    SIZES,
    Scene,
    Shape,
    articles,
    render,
    sample_background,
    sample_shape,
)

FRAMES = 8
FRAME_SIZE = 128  # native rendering: twice the models' 64 px input, as shapes renders above it
DURATION = 1.0  # seconds, for both the frames and the soundtrack
SAMPLE_RATE = AUDIO_RATE
SAMPLES = int(DURATION * SAMPLE_RATE)

# split -> (seed, number of clips); seeds differ from every other shapes world's. Clip i does not depend on the
# split's size, so the training split could grow (10,000 -> 100,000) without changing a clip of any split.
SPLITS = {"train": (41_260_601, 100_000), "val": (41_260_603, 1_000), "test": (41_260_602, 1_000)}

SPEEDS = {"slowly": (10.0, 18.0), "fast": (26.0, 40.0)}  # canvas px per second
STEP = 8.0  # canvas px travelled between two notes of an object
NOTE_DECAY = 0.05  # s, time constant of a note's exponential decay
NOTE_ATTACK = 0.004  # s, linear rise that avoids a click at each onset
BASE_PITCH = 196.0  # Hz (G3): the lowest colour's note
# colour -> semitones above BASE_PITCH; 3 semitones apart, so a detune of <= 1/3 semitone keeps colours apart
PITCH_STEPS = {colour: 3 * k for k, colour in enumerate(COLOURS)}
MAX_DETUNE = 1 / 3  # semitones
# shape -> timbre: (partial frequency ratios, amplitudes); "star" is a sine plus noise instead. Overtones stay >= 9 dB
# below the fundamental, so the room's colouration cannot make one louder and the pitch stays the colour's.
TIMBRES = {
    "circle": ((1.0,), (1.0,)),
    "square": ((1.0, 3.0, 5.0, 7.0), (1.0, 1 / 3, 1 / 5, 1 / 7)),
    "triangle": ((1.0, 2.0, 3.0, 4.0, 5.0, 6.0), (1.0, 0.35, 0.19, 0.125, 0.09, 0.07)),  # 1/k**1.5
    "diamond": ((1.0, 2.0, 4.0), (1.0, 0.35, 0.2)),
    "cross": ((1.0, 2.76, 5.40), (1.0, 0.35, 0.15)),
}
NOISE_BAND = (1.5, 4.0)  # the star's breath noise spans these multiples of its pitch
NOISE_LEVEL = 0.2  # its RMS (the sine's is 0.71): audible, never louder than the pitch
LEVEL = 0.3  # amplitude of the loudest (largest) object before the room
ROOM_RT60 = (0.15, 0.35)  # s
ROOM_WET = 0.35  # level of the reverberant tail relative to the direct sound
IR_LENGTH = 0.3  # s
PEAK = 0.95  # the mix is scaled down to this peak when it would exceed it
assert set(TIMBRES) | {"star"} == set(SHAPES)


@dataclass(frozen=True)
class MovingShape:
    """A shapes-world object (its position is the start, at t=0) with a constant velocity and a voice."""

    shape: Shape
    vx: float  # canvas px per second
    vy: float
    speed_word: str  # a key of SPEEDS
    pitch: float  # Hz
    first_note: float  # canvas px travelled before the first note, in [0, STEP)

    @property
    def speed(self) -> float:
        return float(np.hypot(self.vx, self.vy))

    def positions(self, times: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Centre (x, y) at ``times`` (s): straight motion folded back at the walls (elastic bounces)."""
        r = self.shape.radius
        return (_bounce(self.shape.x + self.vx * times, r + 1, CANVAS - r - 1),
                _bounce(self.shape.y + self.vy * times, r + 1, CANVAS - r - 1))

    def onsets(self) -> np.ndarray:
        """Note onset times (s) within the clip: one each time the object has travelled STEP more px."""
        count = int(np.ceil((self.speed * DURATION - self.first_note) / STEP))
        return (self.first_note + STEP * np.arange(max(count, 0))) / self.speed


@dataclass(frozen=True)
class ClipScene:
    background: tuple[int, int, int]
    objects: tuple[MovingShape, ...]
    rt60: float  # s
    noise_seed: int  # seeds the room's impulse response and the star's noise band


def _bounce(p: np.ndarray, low: float, high: float) -> np.ndarray:
    """Fold unbounded positions into [low, high] as a ball bouncing between two walls (a triangle wave)."""
    span = high - low
    u = np.mod(p - low, 2 * span)
    return low + span - np.abs(span - u)


def clip_rng(split: str, index: int) -> np.random.Generator:
    if split not in SPLITS:
        raise ValueError(f"shapes-av split must be one of {sorted(SPLITS)}, got {split!r}")
    total = SPLITS[split][1]
    if not 0 <= index < total:
        raise ValueError(f"shapes-av:{split} has {total} clips; clip index {index} is out of range")
    return np.random.default_rng([SPLITS[split][0], index])


def sample_clip_scene(rng: np.random.Generator) -> ClipScene:
    """A random clip scene: objects start in distinct cells of the 3x3 grid, as in the shapes world."""
    background = sample_background(rng)
    count = int(rng.choice([1, 2, 3], p=[0.3, 0.4, 0.3]))
    objects = []
    for cell in rng.choice(9, size=count, replace=False):
        shape = sample_shape(rng, cell)
        colour = shape.colour
        speed_word = str(rng.choice(tuple(SPEEDS)))
        speed, angle = rng.uniform(*SPEEDS[speed_word]), rng.uniform(0, 2 * np.pi)
        pitch = BASE_PITCH * 2 ** ((PITCH_STEPS[colour] + rng.uniform(-MAX_DETUNE, MAX_DETUNE)) / 12)
        objects.append(MovingShape(shape, float(speed * np.cos(angle)), float(speed * np.sin(angle)), speed_word,
                                   float(pitch), float(rng.uniform(0, STEP))))
    return ClipScene(background, tuple(objects), float(rng.uniform(*ROOM_RT60)), int(rng.integers(2**31)))


# -- video -------------------------------------------------------------------------------------


def frame_times() -> np.ndarray:
    return np.arange(FRAMES) * (DURATION / FRAMES)


def render_frames(scene: ClipScene, size: int = FRAME_SIZE) -> np.ndarray:
    """[FRAMES, size, size, 3] uint8: the shapes world's renderer applied to each frame's positions."""
    times = frame_times()
    tracks = [obj.positions(times) for obj in scene.objects]
    frames = np.empty((FRAMES, size, size, 3), dtype=np.uint8)
    for k in range(FRAMES):
        moved = tuple(replace(obj.shape, x=float(xs[k]), y=float(ys[k]))
                      for obj, (xs, ys) in zip(scene.objects, tracks))
        frames[k] = np.asarray(render(Scene(scene.background, moved, ()), size))
    return frames


# -- audio -------------------------------------------------------------------------------------


def _note_envelope(onsets: np.ndarray, t: np.ndarray) -> np.ndarray:
    """Each sample's decay since the latest onset (0 before the first), with a short linear attack."""
    latest = np.searchsorted(onsets, t, side="right") - 1
    since = t - onsets[np.maximum(latest, 0)]
    envelope = np.exp(-since / NOTE_DECAY) * np.minimum(since / NOTE_ATTACK, 1.0)
    return np.where(latest >= 0, envelope, 0.0)


def _voice(obj: MovingShape, t: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """The object's sustained tone (peak about 1) before its note envelope and level."""
    if obj.shape.shape == "star":
        # a breathy tone: a sine plus a wide band of noise above it. A narrow noise band alone would swell and
        # fade at its bandwidth's rate (tens of ms), which sounds like notes the motion did not make.
        band = butter(2, (obj.pitch * NOISE_BAND[0], obj.pitch * NOISE_BAND[1]), btype="bandpass",
                      fs=SAMPLE_RATE, output="sos")
        noise = sosfilt(band, rng.standard_normal(t.size))
        noise *= NOISE_LEVEL / np.sqrt(np.mean(noise**2))
        return (np.sin(2 * np.pi * obj.pitch * t) + noise) / (1 + NOISE_LEVEL)
    ratios, amplitudes = TIMBRES[obj.shape.shape]
    partials = np.asarray(ratios)[:, None] * obj.pitch
    tone = np.asarray(amplitudes) @ np.sin(2 * np.pi * partials * t[None, :])
    return tone / sum(amplitudes)


def room_response(rt60: float, rng: np.random.Generator) -> np.ndarray:
    """A direct impulse plus noise decaying by 60 dB over ``rt60`` seconds: a small, mildly reverberant room."""
    t = np.arange(int(IR_LENGTH * SAMPLE_RATE)) / SAMPLE_RATE
    tail = rng.standard_normal(t.size) * np.exp(-6.91 * t / rt60)
    tail[0] = 0.0
    tail *= ROOM_WET / np.sqrt(np.sum(tail**2))
    tail[0] = 1.0
    return tail


def dry_objects(scene: ClipScene) -> np.ndarray:
    """[objects, SAMPLES] float64: each object's notes before the room."""
    rng = np.random.default_rng(scene.noise_seed)
    t = np.arange(SAMPLES) / SAMPLE_RATE
    largest = SIZES["large"][1]
    out = np.empty((len(scene.objects), SAMPLES))
    for i, obj in enumerate(scene.objects):
        level = LEVEL * obj.shape.radius / largest
        out[i] = level * _note_envelope(obj.onsets(), t) * _voice(obj, t, rng)
    return out


def synthesize_audio(scene: ClipScene) -> tuple[np.ndarray, float]:
    """-> (mono soundtrack [SAMPLES] float32 in [-PEAK, PEAK], the gain applied to keep it there: <= 1)."""
    rng = np.random.default_rng([scene.noise_seed, 1])  # the room's own stream, apart from the voices'
    dry = dry_objects(scene).sum(axis=0)
    wet = fftconvolve(dry, room_response(scene.rt60, rng))[:SAMPLES]
    peak = float(np.abs(wet).max())
    gain = min(1.0, PEAK / peak) if peak > 0 else 1.0
    return (wet * gain).astype(np.float32), gain


# -- clips -------------------------------------------------------------------------------------


def caption(scene: ClipScene) -> str:
    """E.g. 'a large red circle moving fast and a small blue star moving slowly'."""
    parts = [f"a {o.shape.size} {o.shape.colour} {o.shape.shape} moving {o.speed_word}" for o in scene.objects]
    return articles(" and ".join(parts))


def describe(scene: ClipScene) -> dict:
    """The scene as plain JSON-ready values (for tests, ground truth and captions)."""
    return {
        "background": list(scene.background),
        "rt60": scene.rt60,
        "caption": caption(scene),
        "objects": [{
            "shape": o.shape.shape, "colour": o.shape.colour, "size": o.shape.size, "radius": o.shape.radius,
            "rgb": list(o.shape.rgb), "start": [o.shape.x, o.shape.y], "velocity": [o.vx, o.vy],
            "speed": o.speed, "speed_word": o.speed_word, "pitch": o.pitch, "onsets": o.onsets().tolist(),
        } for o in scene.objects],
    }


def make_clip(seed_or_rng: int | np.random.Generator, index: int = 0) -> tuple[np.ndarray, np.ndarray, dict]:
    """-> (frames [FRAMES, FRAME_SIZE, FRAME_SIZE, 3] uint8, audio [SAMPLES] float32, meta).

    An int seed draws the clip from ``default_rng([seed, index])`` (a pure function of both); a Generator is
    drawn from as it is (``index`` is then only recorded in the meta).
    """
    if isinstance(seed_or_rng, np.random.Generator):
        rng = seed_or_rng
    elif isinstance(seed_or_rng, (int, np.integer)) and not isinstance(seed_or_rng, bool):
        rng = np.random.default_rng([int(seed_or_rng), int(index)])
    else:
        raise ValueError(f"make_clip takes an int seed or a numpy Generator, got {type(seed_or_rng).__name__}")
    scene = sample_clip_scene(rng)
    audio, gain = synthesize_audio(scene)
    meta = {"index": int(index), **describe(scene), "audio_gain": gain}
    return render_frames(scene), audio, meta


def clip_scene(split: str, index: int) -> ClipScene:
    return sample_clip_scene(clip_rng(split, index))


def clip(split: str, index: int) -> tuple[np.ndarray, np.ndarray, dict]:
    """Clip ``index`` of ``split``: the same arrays in every call and every process."""
    clip_rng(split, index)  # validates split and index
    frames, audio, meta = make_clip(SPLITS[split][0], index)
    return frames, audio, {"split": split, **meta}


class ShapesAV:
    """The first ``n`` clips of a split (all by default); clip i's video and clip i's audio are a pair."""

    def __init__(self, split: str = "test", n: int | None = None):
        if split not in SPLITS:
            raise ValueError(f"shapes-av split must be one of {sorted(SPLITS)}, got {split!r}")
        total = SPLITS[split][1]
        if n is not None and not 0 < n <= total:
            raise ValueError(f"shapes-av:{split} has {total} clips; asked for {n}")
        self.split, self.n = split, total if n is None else n

    def __len__(self) -> int:
        return self.n

    def _check(self, index: int) -> None:
        if not 0 <= index < self.n:
            raise ValueError(f"shapes-av:{self.split} subset has {self.n} clips; clip index {index} is out of range")

    def clip(self, index: int) -> tuple[np.ndarray, np.ndarray, dict]:
        self._check(index)
        return clip(self.split, index)

    def caption(self, index: int) -> str:
        self._check(index)
        return caption(clip_scene(self.split, index))


# -- the --data loader -------------------------------------------------------------------------


def parse_arg(arg: str | None) -> tuple[str, int]:
    """``None``/"test" -> ("test", 1000); "train:500" -> ("train", 500)."""
    split, _, count = (arg or "test").partition(":")
    if split not in SPLITS:
        raise DataError(f"shapes-av split must be one of {sorted(SPLITS)} (optionally ':N'), got {arg!r}")
    total = SPLITS[split][1]
    if count and not count.isdigit():
        raise DataError(f"shapes-av:{split} takes an optional clip count (shapes-av:{split}:N), got {count!r}")
    n = int(count) if count else total
    if not 0 < n <= total:
        raise DataError(f"shapes-av:{split} has {total} clips; asked for {n}")
    return split, n


def _video(split: str, index: int) -> np.ndarray:
    return render_frames(clip_scene(split, index))


def _audio(split: str, index: int) -> np.ndarray:
    return synthesize_audio(clip_scene(split, index))[0]


def _caption(split: str, index: int) -> str:
    return caption(clip_scene(split, index))


def load_shapes_av(arg: str | None = None, image_root: str | None = None) -> AVDataset:
    """``--data shapes-av[:train|:val|:test][:N]``: the first N clips of a split (test by default) as video,
    audio and caption items grouped by clip; each loader draws the clip's scene and renders only its modality."""
    split, n = parse_arg(arg)
    # the native sizes are in the (virtual) names, so gallery caches of another rendering are not reused
    suffix = {"video": f"@{FRAMES}x{FRAME_SIZE}px", "audio": f"@{SAMPLE_RATE}Hz", "text": ""}
    render = {"video": _video, "audio": _audio, "text": _caption}
    return AVDataset(
        items={m: [f"shapes-av/{split}/{i:06d}.{m}{suffix[m]}" for i in range(n)] for m in AV_MODALITIES},
        groups={m: list(range(n)) for m in AV_MODALITIES},
        loaders={m: partial(render[m], split) for m in AV_MODALITIES},  # picklable, for loader processes
        name=f"shapes-av-{split}", source=f"shapes-av:{split}:{n}")
