"""Audio and video queries of ``serve``: base64 or uploaded bytes -> the canonical items of their modality.

An audio file (anything libsndfile reads: WAV, FLAC, OGG ...) becomes a mono float32 waveform at 16 kHz
(channels averaged, resampled as the data loaders do); a video file (anything FFmpeg demuxes: MP4, WebM ...)
becomes its frames, a uint8 array ``[T, H, W, 3]``. Sizes are checked before decoding: the base64 length,
the byte count, then the decoded duration or frame count.
"""

from __future__ import annotations

import base64
import binascii
import io

import numpy as np

from .config import ServeConfig
from .inputs import InputError

MEDIA_FIELDS = {"audio": "audio_b64", "video": "video_b64"}


def decode_media_b64(data: str, cfg: ServeConfig, field: str) -> bytes:
    """``audio_b64`` / ``video_b64`` -> bytes; a ``data:...;base64,`` prefix is allowed."""
    if data.startswith("data:"):
        _, sep, data = data.partition(",")
        if not sep:
            raise InputError(422, f"{field} is a data URL without a ',' before its base64 payload")
    if len(data) > (cfg.max_media_bytes + 2) // 3 * 4 + 4:
        raise InputError(413, f"{field} is {len(data)} characters; the file limit is {cfg.max_media_bytes} bytes")
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError) as err:
        raise InputError(422, f"{field} is not valid base64 ({err})") from err


def _check_size(raw: bytes, cfg: ServeConfig, field: str) -> None:
    if not raw:
        raise InputError(422, f"{field} is empty")
    if len(raw) > cfg.max_media_bytes:
        raise InputError(413, f"{field} is {len(raw)} bytes; the limit is {cfg.max_media_bytes}")


def open_audio(raw: bytes, cfg: ServeConfig, field: str = "audio_b64") -> np.ndarray:
    """Bytes of an audio file -> a mono float32 waveform at 16 kHz, at most ``cfg.max_media_seconds`` long."""
    import soundfile as sf

    from ..data.av import AUDIO_RATE
    from ..data.av_files import resample

    _check_size(raw, cfg, field)
    try:
        with sf.SoundFile(io.BytesIO(raw)) as f:
            seconds = f.frames / f.samplerate
            if seconds > cfg.max_media_seconds:
                raise InputError(413, f"{field} is {seconds:.1f} s long; the limit is {cfg.max_media_seconds} s")
            samples, rate = f.read(dtype="float32", always_2d=True), f.samplerate
    except InputError:
        raise
    except (RuntimeError, sf.LibsndfileError, ValueError, EOFError) as err:
        raise InputError(422, f"{field} is not a readable audio file ({type(err).__name__}: {err})") from err
    if not len(samples):
        raise InputError(422, f"{field} has no samples")
    return resample(samples.mean(axis=1), rate, AUDIO_RATE)


def open_video(raw: bytes, cfg: ServeConfig, field: str = "video_b64") -> np.ndarray:
    """Bytes of a video file -> its frames, uint8 ``[T, H, W, 3]``, at most ``cfg.max_media_frames`` of them and
    ``cfg.max_image_pixels`` pixels a frame."""
    import av

    _check_size(raw, cfg, field)
    frames = []
    try:
        with av.open(io.BytesIO(raw)) as container:
            stream = container.streams.video[0]
            if stream.width * stream.height > cfg.max_image_pixels:
                raise InputError(413, f"{field} is {stream.width}x{stream.height} pixels a frame; the limit is "
                                      f"{cfg.max_image_pixels} pixels")
            for frame in container.decode(stream):
                if len(frames) == cfg.max_media_frames:
                    raise InputError(413, f"{field} has more than {cfg.max_media_frames} frames; the limit is "
                                          f"{cfg.max_media_frames}")
                frames.append(frame.to_ndarray(format="rgb24"))
    except InputError:
        raise
    except (av.FFmpegError, IndexError, ValueError, EOFError) as err:
        raise InputError(422, f"{field} is not a readable video file ({type(err).__name__}: {err or 'no video stream'})"
                         ) from err
    if not frames:
        raise InputError(422, f"{field} has no frames")
    return np.stack(frames)


OPENERS = {"audio": open_audio, "video": open_video}
