"""Loaders for Karpathy-split JSON (COCO, Flickr30K) and generic JSONL/CSV files (spec §4.2)."""

from __future__ import annotations

import csv
import json
import os

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
        with open(path, encoding="utf-8") as f:
            entries = json.load(f)
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
            raise DataError(f"{path}: entry {i}: 'image' must be a file path, got {entry['image']!r}")
        caps = entry["caption"]
        caps = [caps] if isinstance(caps, str) else list(caps)
        if max_captions:
            caps = caps[:max_captions]
        if not caps:
            raise DataError(f"{path}: entry {i} ({entry['image']}) has no caption")
        images.append(entry["image"])
        img2txt.append([])
        for k, cap in enumerate(caps):
            if _empty(cap):
                raise DataError(f"{path}: empty caption {k} of entry {i} ({entry['image']})")
            img2txt[-1].append(len(texts))
            txt2img.append([len(images) - 1])
            texts.append(pre_caption(cap, max_words))
    return RetrievalDataset(images, texts, img2txt, txt2img, image_root=image_root,
                            name=name or os.path.splitext(os.path.basename(path))[0], source=path)


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
    images, image_index, texts, text_image, groups = [], {}, [], [], []
    for line, row in rows:
        if not isinstance(row, dict):
            raise DataError(f"{path}:{line}: expected an object with 'image' and 'caption', got {row!r:.60}")
        img, cap = row.get("image"), row.get("caption")
        if not img or not isinstance(img, str):
            raise DataError(f"{path}:{line}: missing field 'image'")
        if cap is None or _empty(cap):
            raise DataError(f"{path}:{line}: empty caption for image {img!r}")
        if img not in image_index:
            image_index[img] = len(images)
            images.append(img)
            groups.append(row.get("group"))
        elif row.get("group") not in (None, groups[image_index[img]]):
            raise DataError(f"{path}:{line}: image {img!r} appears with two different groups")
        texts.append(pre_caption(cap, max_words))
        text_image.append(image_index[img])
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
    if not os.path.exists(path):
        raise DataError(f"annotation file not found: {path}")
    with open(path, encoding="utf-8", newline="") as f:
        if path.endswith(".csv"):
            reader = csv.DictReader(f)
            missing = {"image", "caption"} - set(reader.fieldnames or [])
            if missing:
                raise DataError(f"{path}: CSV header lacks column(s) {sorted(missing)} (found "
                                f"{reader.fieldnames or 'no header'}); expected a comma-separated header "
                                f"image,caption[,group]")
            for n, row in enumerate(reader, start=2):
                yield n, {k: (v if v != "" else None) for k, v in row.items()}
        else:
            for n, raw in enumerate(f, start=1):
                if raw.strip():
                    try:
                        yield n, json.loads(raw)
                    except json.JSONDecodeError as err:
                        raise DataError(f"{path}:{n}: not valid JSON ({err})") from err


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
