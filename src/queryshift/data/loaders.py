"""Loaders for Karpathy-split JSON (COCO, Flickr30K) and generic JSONL/CSV files."""

from __future__ import annotations

import csv
import json
import math
import os

from ..userfiles import clip, describe, open_regular, parse_json, short_repr
from .retrieval import DataError, RetrievalDataset, pre_caption


def _empty(cap) -> bool:
    return not isinstance(cap, str) or not pre_caption(cap).strip()


def load_karpathy(
    path: str, image_root: str | None = None, max_captions: int | None = None, max_words: int = 30,
    name: str | None = None,
) -> RetrievalDataset:
    """BLIP-style Karpathy JSON: a list of {"image": relative path, "caption": [str, ...]}.

    ``max_captions`` defaults to 5 for COCO (file name contains 'coco') and to all captions otherwise,
    as the TCR code does.
    """
    try:
        with open_regular(path, encoding="utf-8-sig", error=DataError) as f:  # -sig: a byte-order mark is fine
            entries = parse_json(lambda: json.load(f), path, DataError)
    except FileNotFoundError as err:
        raise DataError(f"annotation file not found: {path}") from err
    except UnicodeDecodeError as err:
        raise not_utf8(path, err) from None
    except json.JSONDecodeError as err:
        hint = ("; it looks like JSON Lines (one object per line): name it .jsonl" if err.msg == "Extra data"
                else "; --data takes a Karpathy-split JSON list, or image,caption rows in a .jsonl or .csv file")
        raise DataError(f"{path}: not valid JSON ({err}){hint}") from err
    if not isinstance(entries, list):
        raise DataError(f"{path}: expected a JSON list of {{'image', 'caption'}} entries")
    if not entries:
        raise DataError(f"{path}: no entries (an empty list); a dataset needs at least one image with a caption")
    if max_captions is None and "coco" in os.path.basename(path).lower():
        max_captions = 5
    images, texts, img2txt, txt2img = [], [], [], []
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict) or "image" not in entry or "caption" not in entry:
            raise DataError(f"{path}: entry {i} lacks the 'image' or 'caption' field")
        if not isinstance(entry["image"], str) or not entry["image"]:
            raise DataError(f"{path}: entry {i}: 'image' must be a file path, got {describe(entry['image'])}")
        caps = captions(entry["caption"], f"{path}: entry {i} ({clip(entry['image'])})", "caption")
        if max_captions:
            caps = caps[:max_captions]
        if not caps:
            raise DataError(f"{path}: entry {i} ({clip(entry['image'])}) has no caption")
        images.append(entry["image"])
        img2txt.append([])
        for k, cap in enumerate(caps):
            if _empty(cap):
                raise DataError(f"{path}: empty caption {k} of entry {i} ({clip(entry['image'])})")
            img2txt[-1].append(len(texts))
            txt2img.append([len(images) - 1])
            texts.append(pre_caption(cap, max_words))
    return RetrievalDataset(images, texts, img2txt, txt2img, image_root=image_root,
                            name=name or os.path.splitext(os.path.basename(path))[0], source=path)


def captions(value, where: str, field: str) -> list[str]:
    """A caption field that is one string or a list of strings -> the list; anything else names ``field``.

    A dict would otherwise give its keys as captions, a number or null a crash.
    """
    if isinstance(value, str):
        return [value]
    if not isinstance(value, list):
        raise DataError(f"{where}: '{field}' must be a string or a list of strings, got {describe(value)}")
    for k, cap in enumerate(value):
        if not isinstance(cap, str):
            raise DataError(f"{where}: '{field}' item {k} must be a string, got {describe(cap)}")
    return value


def is_id(value) -> bool:
    """Whether ``value`` can group relevance: a string or a finite number (NaN never equals itself, so each
    NaN row would be a group of its own; a list or dict cannot be a key)."""
    if isinstance(value, float):
        return math.isfinite(value)
    return isinstance(value, (str, int)) and not isinstance(value, bool)


def load_pairs(path: str, image_root: str | None = None, max_words: int = 30, name: str | None = None):
    """Users' own data: JSONL or CSV rows of (image, caption[, group]).

    Rows with the same image share one gallery/query image. With a ``group`` column every image and every
    caption of a group are relevant to each other (e.g. product or person ids); otherwise an image is
    relevant to its own captions.
    """
    try:
        rows = list(_read_rows(path))
    except UnicodeDecodeError as err:
        raise not_utf8(path, err) from None
    if not rows:
        raise DataError(f"{path}: no rows; a dataset needs at least one image,caption row")
    is_csv = path.endswith(".csv")
    images, image_index, texts, text_image, groups, first_line = [], {}, [], [], [], []
    for line, row in rows:
        where = f"{path}:{line}"
        if not isinstance(row, dict):
            raise DataError(f"{where}: expected an object with 'image' and 'caption', got {describe(row)}")
        img, cap, group = row.get("image"), row.get("caption"), row.get("group")
        if img is None or img == "":
            raise DataError(f"{where}: missing field 'image'")
        if not isinstance(img, str):
            raise DataError(f"{where}: 'image' must be a file path (a string), got {describe(img)}")
        if (cap is None and is_csv) or (isinstance(cap, str) and _empty(cap)):
            raise DataError(f"{where}: empty caption for image {short_repr(img)}")
        if cap is None and "caption" not in row:
            raise DataError(f"{where}: missing field 'caption'")
        if not isinstance(cap, str):
            raise DataError(f"{where}: 'caption' must be a string, got {describe(cap)}")
        if group is not None and not is_id(group):
            raise DataError(f"{where}: 'group' must be a string or a finite number (an id), got {describe(group)}")
        if img not in image_index:
            image_index[img] = len(images)
            images.append(img)
            groups.append(group)
            first_line.append(line)
        elif group not in (None, groups[image_index[img]]):
            raise DataError(f"{where}: image {short_repr(img)} appears with two different groups")
        texts.append(pre_caption(cap, max_words))
        text_image.append(image_index[img])
    if any(g is not None for g in groups) and None in groups:
        # the ungrouped images would form one group (None) and count as relevant to each other
        i = groups.index(None)
        raise DataError(f"{path}:{first_line[i]}: no 'group' for image {short_repr(images[i])}, while other rows "
                        f"have one; give every row a group, or none")
    if any(g is not None for g in groups):
        by_group: dict = {}
        for i, g in enumerate(groups):
            by_group.setdefault(g, []).append(i)
        txt2img = [by_group[groups[i]] for i in text_image]
    else:
        txt2img = [[i] for i in text_image]
    img2txt = [[] for _ in images]
    for t, rel in enumerate(txt2img):
        for i in rel:
            img2txt[i].append(t)
    return RetrievalDataset(images, texts, img2txt, txt2img, image_root=image_root,
                            name=name or os.path.splitext(os.path.basename(path))[0], source=path)


def not_utf8(path: str, err: UnicodeDecodeError) -> DataError:
    return DataError(f"{path}: not UTF-8 text (byte {err.object[err.start]:#04x} at offset {err.start}); "
                     f"--data takes a Karpathy-split JSON or a .jsonl/.csv of image,caption rows, saved as UTF-8")


def _read_rows(path):
    """-> (line number, record) pairs; CSV cells that are empty become None."""
    try:
        f = open_regular(path, encoding="utf-8-sig", newline="", error=DataError)  # -sig: a byte-order mark is fine
    except FileNotFoundError as err:
        raise DataError(f"annotation file not found: {path}") from err
    with f:
        if path.endswith(".csv"):
            yield from _csv_rows(f, path)
        else:
            for n, raw in enumerate(f, start=1):
                if raw.strip():
                    try:
                        yield n, parse_json(lambda raw=raw: json.loads(raw), f"{path}:{n}", DataError)
                    except json.JSONDecodeError as err:
                        raise DataError(f"{path}:{n}: not valid JSON ({err})") from err


def _csv_rows(f, path):
    reader = csv.reader(f)
    try:
        header = next(reader, None) or []
        missing = {"image", "caption"} - set(header)
        if missing:
            raise DataError(f"{path}: CSV header lacks column(s) {sorted(missing)} (found "
                            f"{short_repr(header) if header else 'no header'}); expected a comma-separated "
                            f"header image,caption[,group]")
        if len(set(header)) < len(header):
            raise DataError(f"{path}: CSV header names a column twice ({short_repr(header)})")
        for cells in reader:
            if not cells:  # a blank line
                continue
            if len(cells) != len(header):
                # csv would put extra cells aside and leave missing ones empty: a caption cut at a comma
                fix = ("quote a caption that holds commas: \"a red car, parked\"" if len(cells) > len(header)
                       else "leave an empty cell as two commas")
                raise DataError(f"{path}:{reader.line_num}: {len(cells)} fields, but the header has {len(header)} "
                                f"({','.join(header)}); {fix}")
            yield reader.line_num, {k: (v if v != "" else None) for k, v in zip(header, cells)}
    except csv.Error as err:
        raise DataError(f"{path}:{reader.line_num}: not valid CSV ({clip(str(err))})") from err


def load_dataset(data: str, image_root: str | None = None, max_words: int = 30) -> RetrievalDataset:
    """Resolve ``--data``: a registered dataset name, a Karpathy JSON, or a JSONL/CSV pairs file."""
    from . import DATASETS

    name, _, arg = data.partition(":")
    if name in DATASETS:
        return DATASETS[name](arg or None, image_root=image_root)
    if os.path.isdir(data):
        raise DataError(f"--data {data} is a folder: pass its annotation file (a Karpathy-split JSON or a "
                        f".jsonl/.csv of image,caption rows) and the folder as --image-root")
    if data.endswith((".jsonl", ".csv")):
        return load_pairs(data, image_root, max_words)
    return load_karpathy(data, image_root, max_words=max_words)
