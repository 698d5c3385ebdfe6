"""Audio-visual and audio-text datasets from files: clips decoded with PyAV, sound files read with soundfile.

Three index formats, each -> an :class:`~queryshift.data.av.AVDataset` whose items are read on demand in the
canonical forms (video: uint8 ``[T, H, W, 3]`` at the native size; audio: mono float32 at 16 kHz; text: str):

- :func:`load_av_files` (``--data av-files:INDEX``): a JSON list, JSONL or CSV of ``video,audio[,group][,caption]``
  rows. An empty ``audio`` (or the video's own path) means the video's own sound track. Rows without a ``group``
  make one clip per distinct video.
- :func:`load_read_index` (``--data vggsound:INDEX`` / ``audioset:INDEX``): the index files of CAV-MAE and READ,
  ``{"data": [{"video_id", "wav", "video_path", "labels"}, ...]}`` with the frames they extracted at
  ``<video_path>/frame_<k>/<video_id>.jpg``; one clip per ``video_id``.
- :func:`load_audiocaps` / :func:`load_clotho` (``--data audiocaps:INDEX`` / ``clotho:INDEX``): audio with
  captions, from the datasets' CSV files or a JSON list of ``{"audio", "caption"}`` entries.

Relative paths are resolved against ``--image-root`` when given, else against the index file's folder.

Frame sampling follows CAV-MAE's ``extract_video_frame.py`` (which READ's frames come from): ``frames`` frames
(10 by default) at indices ``int(i * n / frames)`` over the first 10 s of the video. Deviations: CAV-MAE's
OpenCV seek reads frame ``index - 1`` (we read ``index``), and it stores the frames resized to 224 px and
centre-cropped, while we keep the native size (the model's preprocessing resizes). Audio is mixed down to mono
by averaging the channels, where CAV-MAE keeps the first channel (``sox remix 1``).
"""

from __future__ import annotations

import csv
import json
import math
import os
from functools import partial

import numpy as np

from ..userfiles import clip, describe, open_regular, parse_json, short_repr
from .av import AUDIO_RATE, AVDataset
from .loaders import captions as caption_list
from .loaders import is_id
from .retrieval import DataError

FRAMES = 10  # CAV-MAE / READ extract 10 frames per clip
MAX_SECONDS = 10.0  # CAV-MAE samples frames over the first 10 s (AudioSet and VGGSound clips are 10 s long)
AUDIO_EXTENSIONS = (".wav", ".flac")  # tried in this order when a dataset names a clip without its extension


# -- decoding ---------------------------------------------------------------------------------------------------


def _library(name: str):
    """Import a media library of the ``av`` extra, saying how to install it when it is missing."""
    import importlib

    try:
        return importlib.import_module(name)
    except ImportError as err:
        raise ImportError(f"reading audio/video files needs {name}: pip install 'queryshift[av]'") from err


def read_video(path: str, frames: int = FRAMES, where: str = "") -> np.ndarray:
    """``frames`` RGB frames sampled uniformly over the first :data:`MAX_SECONDS` of a video -> uint8 [T, H, W, 3]."""
    av = _library("av")

    label = f"{where}: " if where else ""
    _check_file(path, where)
    try:
        with av.open(path) as container:
            if not container.streams.video:
                raise DataError(f"{label}{path} has no video stream")
            stream = container.streams.video[0]
            fps = float(stream.average_rate or 0)
            total = stream.frames or sum(1 for p in container.demux(stream) if p.size)  # count when not stored
        if fps > 0:
            total = min(total, int(fps * MAX_SECONDS))
        if total < 1:
            raise DataError(f"{label}{path} has no video frames")
        wanted = sorted({int(i * total / frames) for i in range(frames)})
        picked: dict[int, np.ndarray] = {}
        with av.open(path) as container:
            for k, frame in enumerate(container.decode(video=0)):
                if k in wanted:
                    picked[k] = frame.to_ndarray(format="rgb24")
                if k >= wanted[-1]:
                    break
    except DataError:
        raise
    except (av.error.FFmpegError, OSError, ValueError) as err:
        raise DataError(f"{label}cannot decode video {path} ({type(err).__name__}: {clip(str(err))})") from err
    if not picked:
        raise DataError(f"{label}{path} has no decodable video frames")
    # a stored frame count can exceed what decodes: the last decoded frame stands in for missing ones
    last = picked[max(picked)]
    return np.stack([picked.get(int(i * total / frames), last) for i in range(frames)])


def read_audio(path: str, where: str = "") -> np.ndarray:
    """A sound file (soundfile: WAV, FLAC, ...) or a media file's sound track (PyAV) -> mono float32 at 16 kHz."""
    sf = _library("soundfile")
    _check_file(path, where)
    try:
        samples, rate = sf.read(path, dtype="float32", always_2d=True)
    except sf.LibsndfileError:  # not a format libsndfile reads (an MP4, an M4A): decode it as a media file
        return read_track(path, where)
    if samples.shape[0] == 0:
        raise DataError(f"{where + ': ' if where else ''}{path} holds no audio samples")
    return resample(samples.mean(axis=1), rate)


def read_track(path: str, where: str = "") -> np.ndarray:
    """The first sound track of a media file, decoded and resampled by PyAV (libswresample) to mono 16 kHz."""
    av = _library("av")

    label = f"{where}: " if where else ""
    _check_file(path, where)
    try:
        with av.open(path) as container:
            if not container.streams.audio:
                raise DataError(f"{label}{path} has no audio track; give the sound in the 'audio' field")
            resampler = av.AudioResampler(format="flt", layout="mono", rate=AUDIO_RATE)
            chunks = []
            for frame in container.decode(audio=0):
                chunks += [f.to_ndarray().reshape(-1) for f in resampler.resample(frame)]
            chunks += [f.to_ndarray().reshape(-1) for f in resampler.resample(None)]  # flush
    except DataError:
        raise
    except (av.error.FFmpegError, OSError, ValueError) as err:
        raise DataError(f"{label}cannot decode audio of {path} ({type(err).__name__}: {clip(str(err))})") from err
    if not chunks or not sum(len(c) for c in chunks):
        raise DataError(f"{label}{path}: its audio track holds no samples")
    return np.concatenate(chunks).astype(np.float32)


def resample(samples: np.ndarray, rate: int, target: int = AUDIO_RATE) -> np.ndarray:
    """Polyphase resampling (scipy) from ``rate`` to ``target`` Hz."""
    if rate == target:
        return np.ascontiguousarray(samples, dtype=np.float32)
    from scipy.signal import resample_poly

    g = math.gcd(int(rate), int(target))
    return resample_poly(samples, target // g, int(rate) // g).astype(np.float32)


def read_frames(paths: list[str], where: str = "") -> np.ndarray:
    """Frame images (CAV-MAE's extracted JPEGs) -> uint8 [T, H, W, 3]."""
    from PIL import Image

    frames = []
    for path in paths:
        _check_file(path, where)
        try:
            with Image.open(path) as im:
                frames.append(np.asarray(im.convert("RGB")))
        except OSError as err:
            raise DataError(f"{where + ': ' if where else ''}cannot read frame {path} ({clip(str(err))})") from err
    if len({f.shape for f in frames}) > 1:
        raise DataError(f"{where + ': ' if where else ''}the frames of one clip differ in size "
                        f"({', '.join(sorted({f'{f.shape[1]}x{f.shape[0]}' for f in frames}))}): {paths[0]}")
    return np.stack(frames)


def _check_file(path: str, where: str) -> None:
    if not os.path.isfile(path):
        what = "is not a regular file" if os.path.exists(path) else "not found"
        raise DataError(f"{where + ': ' if where else ''}{path} {what}")


# -- index files ------------------------------------------------------------------------------------------------


class _Clips:
    """Collects items per modality with their group ids and the index line each came from (for messages)."""

    def __init__(self, index: str):
        self.index = index
        self.items: dict[str, list[str]] = {}
        self.groups: dict[str, list[int]] = {}
        self.where: dict[str, list[str]] = {}
        self.paths: dict[str, list] = {}
        self._group_ids: dict = {}
        self._seen: dict[tuple[str, str], int] = {}

    def group(self, key) -> int:
        return self._group_ids.setdefault(key, len(self._group_ids))

    def add(self, modality: str, name: str, path, group: int, where: str, dedupe: bool = True) -> None:
        """Add an item; with ``dedupe`` the same name again must come with the same group and is kept once."""
        if dedupe and (modality, name) in self._seen:
            first = self._seen[(modality, name)]
            if self.groups[modality][first] != group:
                raise DataError(f"{where}: {modality} {short_repr(name)} appears in two groups (first at "
                                f"{self.where[modality][first]}); one file belongs to one group")
            return
        self._seen[(modality, name)] = len(self.items.setdefault(modality, []))
        self.items[modality].append(name)
        self.groups.setdefault(modality, []).append(group)
        self.where.setdefault(modality, []).append(where)
        self.paths.setdefault(modality, []).append(path)

    def dataset(self, readers: dict, name: str, root: str) -> AVDataset:
        loaders = {m: partial(_load_item, readers[m], self.paths[m], self.where[m]) for m in self.items}
        return AVDataset(items=self.items, groups=self.groups, loaders=loaders, name=name, source=self.index,
                         root=root)


def _load_item(reader, paths: list, wheres: list[str], index: int):
    return reader(paths[index], where=wheres[index])


def _need_index(index: str | None, name: str) -> None:
    if not index:
        raise DataError(f"--data {name} needs an index file: --data {name}:PATH")


def _root(index: str, image_root: str | None) -> str:
    return image_root if image_root else os.path.dirname(os.path.abspath(index))


def _resolve(root: str, path: str) -> str:
    return os.path.normpath(path if os.path.isabs(path) else os.path.join(root, os.path.expanduser(path)))


def _name(index: str) -> str:
    return os.path.splitext(os.path.basename(index))[0]


def _read_json(path: str):
    try:
        with open_regular(path, encoding="utf-8-sig", error=DataError) as f:
            return parse_json(lambda: json.load(f), path, DataError)
    except FileNotFoundError as err:
        raise DataError(f"index file not found: {path}") from err
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: not UTF-8 text (byte {err.object[err.start]:#04x} at offset {err.start})") from None
    except json.JSONDecodeError as err:
        hint = "; it looks like JSON Lines (one object per line): name it .jsonl" if err.msg == "Extra data" else ""
        raise DataError(f"{path}: not valid JSON ({err}){hint}") from err


def _rows(path: str, required: tuple[str, ...]) -> list[tuple[str, object]]:
    """(position for messages, record) of a JSON list (or ``{"data": [...]}``), JSONL or CSV file."""
    if path.endswith(".csv"):
        return _csv_rows(path, required)
    if path.endswith(".jsonl"):
        try:
            f = open_regular(path, encoding="utf-8-sig", error=DataError)
        except FileNotFoundError as err:
            raise DataError(f"index file not found: {path}") from err
        rows = []
        with f:
            try:
                for n, raw in enumerate(f, start=1):
                    if raw.strip():
                        try:
                            rows.append((f"{path}:{n}", parse_json(lambda raw=raw: json.loads(raw), f"{path}:{n}",
                                                                   DataError)))
                        except json.JSONDecodeError as err:
                            raise DataError(f"{path}:{n}: not valid JSON ({err})") from err
            except UnicodeDecodeError as err:
                raise DataError(f"{path}: not UTF-8 text ({err.reason})") from None
        return rows
    data = _read_json(path)
    if isinstance(data, dict) and isinstance(data.get("data"), list):
        data = data["data"]
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON list of entries (or {{\"data\": [...]}}), got {describe(data)}")
    return [(f"{path}: entry {i}", row) for i, row in enumerate(data)]


def _csv_rows(path: str, required: tuple[str, ...]) -> list[tuple[str, object]]:
    try:
        f = open_regular(path, encoding="utf-8-sig", newline="", error=DataError)
    except FileNotFoundError as err:
        raise DataError(f"index file not found: {path}") from err
    rows = []
    with f:
        reader = csv.reader(f)
        try:
            header = next(reader, None) or []
            missing = [c for c in required if c not in header]
            if missing:
                raise DataError(f"{path}: CSV header lacks column(s) {missing} (found "
                                f"{short_repr(header) if header else 'no header'})")
            for cells in reader:
                if not cells:
                    continue
                if len(cells) != len(header):
                    raise DataError(f"{path}:{reader.line_num}: {len(cells)} fields, but the header has "
                                    f"{len(header)} ({','.join(header)}); quote a field that holds commas")
                rows.append((f"{path}:{reader.line_num}", {k: (v if v != "" else None) for k, v in zip(header, cells)}))
        except csv.Error as err:
            raise DataError(f"{path}:{reader.line_num}: not valid CSV ({clip(str(err))})") from err
        except UnicodeDecodeError as err:
            raise DataError(f"{path}: not UTF-8 text ({err.reason})") from None
    return rows


def _path_field(row: dict, field: str, where: str, optional: bool = False) -> str | None:
    value = row.get(field)
    if value is None or value == "":
        if optional:
            return None
        raise DataError(f"{where}: missing field {field!r}")
    if not isinstance(value, str):
        raise DataError(f"{where}: {field!r} must be a file path (a string), got {describe(value)}")
    return value


def _object(row, where: str, fields: str) -> dict:
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected an object with {fields}, got {describe(row)}")
    return row


def _need_rows(rows: list, path: str, what: str) -> None:
    if not rows:
        raise DataError(f"{path}: no rows; a dataset needs at least one {what}")


def load_av_files(index: str, image_root: str | None = None, frames: int = FRAMES) -> AVDataset:
    """``video,audio[,group][,caption]`` rows (JSON list, JSONL or CSV) -> video, audio (and text) items.

    Rows of one ``group`` are relevant to each other; without a group column each distinct video is a clip,
    and an audio file must then belong to one video. ``caption`` (a string, or in JSON a list of strings) adds
    text items to the row's clip.
    """
    _need_index(index, "av-files")
    root = _root(index, image_root)
    rows = _rows(index, ("video",))
    _need_rows(rows, index, "video[,audio] row")
    grouped = [isinstance(r, dict) and r.get("group") is not None for _, r in rows]
    clips = _Clips(index)
    for (where, row), has_group in zip(rows, grouped):
        row = _object(row, where, "'video' and 'audio'")
        video = _path_field(row, "video", where)
        audio = _path_field(row, "audio", where, optional=True)
        if has_group and not is_id(row["group"]):
            raise DataError(f"{where}: 'group' must be a string or a finite number (an id), got "
                            f"{describe(row['group'])}")
        if any(grouped) and not has_group:
            raise DataError(f"{where}: no 'group' for video {short_repr(video)}, while other rows have one; give "
                            f"every row a group, or none")
        group = clips.group(("g", row["group"]) if has_group else ("v", video))
        video_path = _resolve(root, video)
        _check_file(video_path, f"{where}: 'video'")
        clips.add("video", f"{video}@{frames}f", video_path, group, where)
        if audio is None or _resolve(root, audio) == video_path:
            clips.add("audio", f"{video}#track@{AUDIO_RATE}Hz", video_path, group, where)
        else:
            audio_path = _resolve(root, audio)
            _check_file(audio_path, f"{where}: 'audio'")
            clips.add("audio", f"{audio}@{AUDIO_RATE}Hz", audio_path, group, where)
        if "caption" in row and row["caption"] is not None:
            for k, text in enumerate(caption_list(row["caption"], where, "caption")):
                if not text.strip():
                    raise DataError(f"{where}: empty caption {k}")
                clips.add("text", text.strip(), text.strip(), group, where, dedupe=False)
    readers = {"video": partial(read_video, frames=frames), "audio": _read_audio_or_track, "text": _text}
    return clips.dataset(readers, _name(index), root)


def _read_audio_or_track(path: str, where: str = "") -> np.ndarray:
    ext = os.path.splitext(path)[1].lower()
    return read_audio(path, where) if ext in (".wav", ".flac", ".ogg", ".mp3", ".aiff", ".aif") else read_track(
        path, where)


def _text(text: str, where: str = "") -> str:
    return text


def load_read_index(index: str, image_root: str | None = None, frames: int = FRAMES) -> AVDataset:
    """CAV-MAE / READ index (``{"data": [{"video_id", "wav", "video_path", "labels"}]}``) -> video and audio.

    A clip's video is its extracted frames ``<video_path>/frame_<k>/<video_id>.jpg`` for k < ``frames`` (READ
    reads only the middle one, ``frame_5``, in evaluation; we read them all and the model picks; frames that
    were never extracted are skipped, none at all is an error), its audio the ``wav`` file. ``labels`` are not
    used: in retrieval a clip is relevant to itself only, as in CAV-MAE's retrieval evaluation.
    """
    _need_index(index, "vggsound (or audioset)")
    root = _root(index, image_root)
    data = _read_json(index)
    if not isinstance(data, dict) or not isinstance(data.get("data"), list):
        raise DataError(f"{index}: expected {{\"data\": [{{\"video_id\", \"wav\", \"video_path\", \"labels\"}}, ...]}}"
                        f" (a CAV-MAE / READ index), got {describe(data)}")
    rows = data["data"]
    _need_rows(rows, index, "entry")
    clips = _Clips(index)
    for i, row in enumerate(rows):
        where = f"{index}: entry {i}"
        row = _object(row, where, "'video_id', 'wav' and 'video_path'")
        video_id = _path_field(row, "video_id", where)
        wav = _resolve(root, _path_field(row, "wav", where))
        folder = _resolve(root, _path_field(row, "video_path", where))
        _check_file(wav, f"{where} ({video_id}): 'wav'")
        frame_paths = [os.path.join(folder, f"frame_{k}", f"{video_id}.jpg") for k in range(frames)]
        present = [p for p in frame_paths if os.path.isfile(p)]
        if not present:
            raise DataError(f"{where} ({video_id}): no frames found ({frame_paths[0]} ... frame_{frames - 1}); "
                            f"'video_path' must be the folder holding frame_<k>/<video_id>.jpg")
        group = clips.group(video_id)
        clips.add("video", f"{folder}/frame_*/{video_id}.jpg@{frames}f", present, group, where)
        clips.add("audio", f"{wav}@{AUDIO_RATE}Hz", wav, group, where)
    return clips.dataset({"video": read_frames, "audio": read_audio}, _name(index), root)


def _find_audio(root: str, stems: list[str], where: str) -> str:
    tried = [_resolve(root, stem + ext) for stem in stems for ext in AUDIO_EXTENSIONS]
    for path in tried:
        if os.path.isfile(path):
            return path
    raise DataError(f"{where}: audio file not found (tried {', '.join(tried[:4])}"
                    f"{' ...' if len(tried) > 4 else ''})")


def _audio_captions(index: str, image_root: str | None, entries: list, name: str) -> AVDataset:
    """(position, audio path, captions, group key) -> audio and text items; one audio item per distinct path."""
    clips = _Clips(index)
    for where, path, texts, key in entries:
        group = clips.group(key)
        clips.add("audio", f"{os.path.relpath(path, _root(index, image_root))}@{AUDIO_RATE}Hz", path, group, where)
        for k, text in enumerate(texts):
            if not isinstance(text, str) or not text.strip():
                raise DataError(f"{where}: caption {k + 1} is empty")
            clips.add("text", text.strip(), text.strip(), group, where, dedupe=False)
    return clips.dataset({"audio": read_audio, "text": _text}, name, _root(index, image_root))


def _json_captions(index: str, root: str) -> list:
    """WavCaps-style JSON entries: an audio path (``audio``, ``wav``, ``file_name`` or ``audio_path``) and captions
    (``caption``: str or list, ``captions``: list, or ``caption_1`` ... ``caption_5``)."""
    rows = _rows(index, ())
    _need_rows(rows, index, "audio with captions")
    entries = []
    for where, row in rows:
        row = _object(row, where, "'audio' and 'caption'")
        field = next((f for f in ("audio", "wav", "file_name", "audio_path") if row.get(f) not in (None, "")), None)
        if field is None:
            raise DataError(f"{where}: missing field 'audio' (the audio file's path)")
        path = _resolve(root, _path_field(row, field, where))
        _check_file(path, f"{where}: {field!r}")
        numbered = sorted((k for k in row if k.startswith("caption_") and k[8:].isdigit()), key=lambda k: int(k[8:]))
        if "caption" in row or "captions" in row:
            key = "caption" if "caption" in row else "captions"
            texts = caption_list(row[key], where, key)
        elif numbered:
            texts = [row[k] for k in numbered]
        else:
            raise DataError(f"{where}: missing field 'caption' (or 'captions', 'caption_1' ...)")
        if not texts:
            raise DataError(f"{where}: no captions for {short_repr(row[field])}")
        entries.append((where, path, texts, path))
    return entries


def load_clotho(index: str, image_root: str | None = None) -> AVDataset:
    """Clotho: ``clotho_captions_<split>.csv`` (``file_name,caption_1..caption_5``, five captions per audio;
    the audio files in ``--image-root``, e.g. ``clotho_audio_evaluation/``) or a JSON list of entries."""
    _need_index(index, "clotho")
    root = _root(index, image_root)
    if not index.endswith(".csv"):
        return _audio_captions(index, image_root, _json_captions(index, root), _name(index))
    rows = _csv_rows(index, ("file_name", "caption_1"))
    _need_rows(rows, index, "file_name,caption_1..caption_5 row")
    entries = []
    for where, row in rows:
        file_name = _path_field(row, "file_name", where)
        path = _resolve(root, file_name)
        _check_file(path, f"{where}: 'file_name'")
        numbered = sorted((k for k in row if k.startswith("caption_") and k[8:].isdigit()), key=lambda k: int(k[8:]))
        entries.append((where, path, [row[k] for k in numbered], path))
    return _audio_captions(index, image_root, entries, _name(index))


def load_audiocaps(index: str, image_root: str | None = None) -> AVDataset:
    """AudioCaps: ``<split>.csv`` (``audiocap_id,youtube_id,start_time,caption``, one caption a row; rows of one
    ``youtube_id`` share its audio, five in the test split), the audio at ``<root>/<youtube_id>.wav`` (or
    ``Y<youtube_id>``, ``<audiocap_id>``; ``.wav`` or ``.flac``), or a JSON list of entries."""
    _need_index(index, "audiocaps")
    root = _root(index, image_root)
    if not index.endswith(".csv"):
        return _audio_captions(index, image_root, _json_captions(index, root), _name(index))
    rows = _csv_rows(index, ("youtube_id", "caption"))
    _need_rows(rows, index, "audiocap_id,youtube_id,start_time,caption row")
    entries, found = [], {}
    for where, row in rows:
        youtube_id = _path_field(row, "youtube_id", where)
        if youtube_id not in found:
            stems = [youtube_id, "Y" + youtube_id] + ([row["audiocap_id"]] if row.get("audiocap_id") else [])
            found[youtube_id] = _find_audio(root, stems, where)
        if row.get("caption") is None:
            raise DataError(f"{where}: empty caption for {youtube_id}")
        entries.append((where, found[youtube_id], [row["caption"]], youtube_id))
    return _audio_captions(index, image_root, entries, _name(index))
