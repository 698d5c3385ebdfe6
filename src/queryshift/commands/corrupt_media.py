"""``queryshift corrupt`` on audio and video files: corrupted copies of WAV/FLAC (soundfile) and MP4 (PyAV) files.

``--data`` is one file or a folder (searched recursively); each shift goes to
``<out>/<prefix>_AUDIO_<name>_<severity>/<path relative to --data>`` for audio files and ``..._VIDEO_...`` for
video files, where ``<prefix>`` defaults to the name of ``--data``. A shift applies to the files of the
modalities it corrupts (``gaussian_noise`` to both, ``traffic`` to audio, ``h264`` to video).

File ``i`` (in sorted order of relative path) is corrupted with ``item_rng(seed, i)``, the generator the online
engine gives query ``i``. Audio is corrupted at the file's own sample rate, every channel with the same draw
(one noise source, as in a room), and written back with the input's format and sample encoding (16-bit PCM
quantises, as READ's ``sf.write`` did). Video frames are read whole, corrupted as one clip (one draw per clip,
:mod:`queryshift.shifts.video`) and written as H.264 (libx264, CRF 18, yuv420p) at the input's frame rate;
an audio track of a video file is not copied.
"""

from __future__ import annotations

import os
import sys
from fractions import Fraction

import numpy as np

from ..atomic import atomic_file
from ..shifts import item_rng

AUDIO_FILES = (".wav", ".flac")
VIDEO_FILES = (".mp4",)
FOLDER_KIND = {"audio": "AUDIO", "video": "VIDEO"}
OUTPUT_PATTERNS = ("*_AUDIO_*", "*_VIDEO_*")


def is_media(data: str) -> bool:
    return os.path.isdir(data) or data.lower().endswith(AUDIO_FILES + VIDEO_FILES)


def media_files(data: str) -> dict[str, list[str]]:
    """``{"audio": [...], "video": [...]}``: paths relative to ``data`` (a folder), or ``data`` itself."""
    if not os.path.exists(data):
        raise FileNotFoundError(f"--data {data}: no such file or folder")
    if os.path.isfile(data):
        rel = [os.path.basename(data)]
    else:
        rel = sorted(os.path.relpath(os.path.join(root, f), data)
                     for root, _, files in os.walk(data) for f in files)
    found = {"audio": [r for r in rel if r.lower().endswith(AUDIO_FILES)],
             "video": [r for r in rel if r.lower().endswith(VIDEO_FILES)]}
    if not any(found.values()):
        raise ValueError(f"--data {data}: no audio (.wav, .flac) or video (.mp4) files")
    return found


def read_audio(path: str) -> tuple[np.ndarray, int, str, str]:
    """-> (samples [n, channels] float32, rate, format, subtype)."""
    import soundfile as sf

    try:
        info = sf.info(path)
        samples, rate = sf.read(path, dtype="float32", always_2d=True)
    except (RuntimeError, sf.LibsndfileError) as err:
        raise ValueError(f"{path}: not a readable audio file ({err})") from None
    return samples, rate, info.format, info.subtype


def write_audio(target: str, samples: np.ndarray, rate: int, fmt: str, subtype: str) -> None:
    import soundfile as sf

    with atomic_file(target, "wb") as f:
        sf.write(f, samples, rate, format=fmt, subtype=subtype)


def read_video(path: str) -> tuple[np.ndarray, Fraction]:
    """-> (frames [T, H, W, 3] uint8, frame rate)."""
    import av

    try:
        with av.open(path) as container:
            stream = container.streams.video[0]
            rate = stream.average_rate or stream.guessed_rate or Fraction(25)
            frames = [f.to_ndarray(format="rgb24") for f in container.decode(stream)]
    except (av.FFmpegError, IndexError) as err:
        raise ValueError(f"{path}: not a readable video file ({err or 'no video stream'})") from None
    if not frames:
        raise ValueError(f"{path}: the video has no frames")
    return np.stack(frames), Fraction(rate)


def write_video(target: str, frames: np.ndarray, rate: Fraction) -> None:
    import av

    t, h, w, _ = frames.shape
    pad = ((0, 0), (0, h % 2), (0, w % 2), (0, 0))  # 4:2:0 chroma needs even sides
    frames = np.pad(frames, pad, mode="edge") if h % 2 or w % 2 else frames
    with atomic_file(target, "wb") as f, av.open(f, "w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=rate)
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        stream.options = {"crf": "18"}
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")))
        container.mux(stream.encode())


def corrupt_file(source: str, target: str, modality: str, name: str, severity: int, rng) -> None:
    if modality == "audio":
        from ..shifts.audio import corrupt_audio

        samples, rate, fmt, subtype = read_audio(source)
        out = np.stack([corrupt_audio(samples[:, c], name, severity, rng_copy, rate)
                        for c, rng_copy in enumerate(_same_draws(rng, samples.shape[1]))], axis=1)
        write_audio(target, out, rate, fmt, subtype)
    else:
        from ..shifts.video import corrupt_clip

        frames, rate = read_video(source)
        write_video(target, corrupt_clip(frames, name, severity, rng), rate)


def _same_draws(rng: np.random.Generator, n: int) -> list[np.random.Generator]:
    """``n`` generators that draw the same numbers as ``rng`` would (one draw for every channel)."""
    state = rng.bit_generator.state
    copies = []
    for _ in range(n):
        g = np.random.default_rng()
        g.bit_generator.state = state
        copies.append(g)
    return copies


def write_media(args, specs: list[str], inside, start) -> int:
    """Check every shift, call ``start()`` (which prepares ``--out``), then write every shift's corrupted copies;
    returns how many files were skipped (unreadable)."""
    from tqdm import tqdm

    from ..shifts.registry import CATALOGUES

    files = media_files(args.data)
    root = args.data if os.path.isdir(args.data) else os.path.dirname(args.data)
    prefix = args.prefix or os.path.splitext(os.path.basename(os.path.normpath(args.data)))[0]
    jobs = []
    for spec in specs:  # every spec is checked before anything is written
        name, _, level = spec.partition(":")
        kinds = [m for m in ("audio", "video") if files[m] and name in CATALOGUES[m]]
        if not kinds:
            present = " and ".join(m for m in ("audio", "video") if files[m])
            raise ValueError(f"shift {spec!r} corrupts none of the {present} files in --data {args.data}; audio "
                             f"shifts: {', '.join(CATALOGUES['audio'])}; video shifts: "
                             f"{', '.join(CATALOGUES['video'])}")
        try:
            severity = int(level)
        except ValueError:
            raise ValueError(f"shift {spec!r}: give NAME:SEVERITY with a severity 1-5") from None
        if not 1 <= severity <= 5:
            raise ValueError(f"shift {spec!r}: severity must be one of 1-5, got {severity}")
        jobs += [(m, name, severity) for m in kinds]
    start()
    skipped = 0
    for modality, name, severity in jobs:
        folder = os.path.join(args.out, f"{prefix}_{FOLDER_KIND[modality]}_{name}_{severity}")
        os.makedirs(folder, exist_ok=True)
        if not inside(folder, args.out):
            raise ValueError(f"{folder} leads outside --out {args.out} (a symbolic link); remove it")
        for i, rel in enumerate(tqdm(files[modality], desc=f"{modality} {name}:{severity}",
                                     disable=not getattr(args, "progress", True))):
            target = os.path.join(folder, rel)
            if not inside(target, folder):
                raise ValueError(f"{target} leads outside {folder} (a symbolic link); remove it")
            if os.path.exists(target) and not args.overwrite:
                continue
            os.makedirs(os.path.dirname(target), exist_ok=True)
            try:
                corrupt_file(os.path.join(root, rel), target, modality, name, severity,
                             item_rng(args.seed, i))
            except ValueError as err:
                print(f"skipped: {err}", file=sys.stderr)
                skipped += 1
    return skipped
