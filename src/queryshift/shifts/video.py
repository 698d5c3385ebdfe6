"""Video query shifts: READ's 15 frame corruptions with one draw per clip, plus temporal and codec shifts.

A video item is a clip, a ``uint8`` array ``[T, H, W, 3]`` (RGB frames); every shift returns a ``uint8``
array of exactly the same shape.

READ's corruptions (``make_corruptions/make_c_video.py`` in XLearning-SCU/2024-ICLR-READ, its ``all`` list):
``VIDEO_FRAME_CORRUPTIONS`` = the ImageNet-C set without speckle noise, severities 1-5, computed by
:mod:`queryshift.shifts.image` (the MM_Robustness/ImageNet-C parameters and the deviations listed there).
The validation corruptions are image.py's ``VALIDATION_CORRUPTIONS`` (gaussian_blur, spatter, saturate):
READ's script defines them too but leaves them out of its benchmark, as ImageNet-C does.

Further shifts (not in READ):

* ``frame_drop``: each frame after the first is lost with probability .1/.2/.3/.45/.6 and replaced by the
  last frame that arrived (a frozen picture, as a player shows), so the clip keeps its T frames.
* ``frame_rate``: the frame rate is divided by 2/3/4/6/8: frame ``t`` shows frame ``k * (t // k)``
  (sample and hold), so T is kept; no randomness.
* ``h264``: H.264 (libx264 through PyAV, in an MP4 in memory) at constant rate factor 30/35/40/45/51, played
  at ``H264_FPS`` frames per second, decoded back. Odd sides are padded by edge replication for 4:2:0 chroma
  and cropped again.

Deviations from READ, and why:

* One draw per clip. READ corrupts each of its 10 frames in a separate pass over the data set with the
  unseeded global ``np.random``, so every frame gets a fresh noise pattern, fog map, frost crop and blur
  angle. The issue asks for one draw per clip: every frame of a clip is corrupted with a generator re-seeded
  identically (a seed drawn once from the query's generator), so the noise, the fog, the frost texture and
  the motion-blur angle are the same on every frame, as a dirty lens or a fixed sensor defect would be.
* Resolution. READ resizes frames to 256 and centre-crops 224 before corrupting; we corrupt each frame at the
  clip's own resolution, as image.py does for images (the pixel parameters are the same).
* Randomness comes from the query's generator (the engine's ``item_rng``), so a query is the same in every run.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from . import QueryShift
from .image import IMAGE_CORRUPTIONS, SEVERITIES, VALIDATION_CORRUPTIONS, corrupt

VIDEO_FRAME_CORRUPTIONS = tuple(name for name in IMAGE_CORRUPTIONS if name != "speckle_noise")  # READ's 15
VIDEO_TEMPORAL_SHIFTS = ("frame_drop", "frame_rate", "h264")
VIDEO_SHIFTS = VIDEO_FRAME_CORRUPTIONS + VIDEO_TEMPORAL_SHIFTS
VIDEO_VALIDATION_SHIFTS = VALIDATION_CORRUPTIONS

FRAME_DROP_RATE = (.1, .2, .3, .45, .6)
FRAME_RATE_DIVISOR = (2, 3, 4, 6, 8)
H264_CRF = (30, 35, 40, 45, 51)
H264_FPS = 8


def _frame_corruption(clip: np.ndarray, name: str, severity: int, rng: np.random.Generator) -> np.ndarray:
    clip_seed = int(rng.integers(2 ** 63))  # the clip's one draw
    return np.stack([np.asarray(corrupt(Image.fromarray(frame), name, severity, np.random.default_rng(clip_seed)))
                     for frame in clip])


def _frame_drop(clip, severity, rng):
    lost = rng.random(len(clip)) < FRAME_DROP_RATE[severity - 1]
    # a lost frame shows the latest frame that arrived; frame 0 stands in for itself (nothing came before it)
    shown = np.maximum.accumulate(np.where(lost, 0, np.arange(len(clip))))
    return clip[shown]


def _frame_rate(clip, severity, rng):
    k = FRAME_RATE_DIVISOR[severity - 1]
    return clip[(np.arange(len(clip)) // k) * k]


def _h264(clip, severity, rng):
    import av

    t, h, w = clip.shape[:3]
    padded = np.pad(clip, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)), mode="edge")  # 4:2:0 needs even sides
    buffer = io.BytesIO()
    with av.open(buffer, "w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=H264_FPS)
        stream.width, stream.height, stream.pix_fmt = padded.shape[2], padded.shape[1], "yuv420p"
        stream.options = {"crf": str(H264_CRF[severity - 1]), "preset": "veryfast", "threads": "1"}
        for frame in padded:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode(None))
    buffer.seek(0)
    with av.open(buffer, "r") as container:
        frames = [frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)]
    if len(frames) != t:
        raise RuntimeError(f"h264: decoded {len(frames)} frames from a {t}-frame clip")
    return np.stack(frames)[:, :h, :w]


TEMPORAL_FUNCTIONS = {"frame_drop": _frame_drop, "frame_rate": _frame_rate, "h264": _h264}


def _check(name: str, severity: int) -> None:
    if name not in VIDEO_SHIFTS + VIDEO_VALIDATION_SHIFTS:
        raise ValueError(f"unknown video shift {name!r}; choose from "
                         f"{', '.join(VIDEO_SHIFTS + VIDEO_VALIDATION_SHIFTS)}")
    if severity not in SEVERITIES:
        raise ValueError(f"video shift {name}: severity must be one of 1-5, got {severity!r}")


def corrupt_clip(clip: np.ndarray, name: str, severity: int, rng: np.random.Generator) -> np.ndarray:
    """Apply one video shift to a clip ``[T, H, W, 3]`` uint8; returns a uint8 clip of the same shape."""
    _check(name, severity)
    clip = np.asarray(clip)
    if clip.ndim != 4 or clip.shape[-1] != 3 or clip.dtype != np.uint8:
        raise ValueError(f"{name}: a video query must be a uint8 array [T, H, W, 3], got {clip.dtype} {clip.shape}")
    if len(clip) == 0:
        return clip.copy()
    if name in TEMPORAL_FUNCTIONS:
        return np.ascontiguousarray(TEMPORAL_FUNCTIONS[name](clip, severity, rng))
    return _frame_corruption(clip, name, severity, rng)


class VideoShift(QueryShift):
    """One video shift at one severity, applied to every video query (a uint8 clip [T, H, W, 3])."""

    modality = "video"

    def __init__(self, shift: str, severity: int):
        _check(shift, severity)
        self.shift, self.severity = shift, severity
        self.name = f"{shift}:{severity}"

    def __call__(self, item, index, position, total, rng):
        return corrupt_clip(item, self.shift, self.severity, rng)


def build_video_shift(name: str, severity: int) -> VideoShift:
    """The shift ``name`` (one of ``VIDEO_SHIFTS`` or ``VIDEO_VALIDATION_SHIFTS``) at ``severity`` 1-5."""
    return VideoShift(name, severity)
