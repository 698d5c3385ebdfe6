"""CIRR (Liu et al., ICCV 2021) for composed image retrieval: ``--data cirr:<root>[:split]``.

The release's layout under ``<root>``::

    cirr/captions/cap.rc2.{train,val,test1}.json      the composed queries
    cirr/image_splits/split.rc2.{train,val,test1}.json  image name -> path relative to <root> ("./dev/...png")
    train/ dev/ test1/                                 the NLVR2 images

A caption file is a JSON list of ``{"pairid", "reference", "target_hard", "target_soft", "caption",
"img_set": {"id", "members", "reference_rank", "target_rank"}}``; ``test1`` has no targets (its results go to
the evaluation server) and is refused here. The protocol (the CIRR paper, CLIP4Cir's validation code): the
gallery is every image of the split, the reference image is removed from its query's ranking, the target is
``target_hard``; Recall@1/5/10/50 over the gallery and Recall_subset@1/2/3 among the query's ``img_set``
members (minus the reference). ``<root>`` may also be the ``cirr`` folder itself; ``--image-root`` overrides
where the image paths are resolved.
"""

from __future__ import annotations

import os

from ..userfiles import describe, short_repr
from .composed import ComposedDataset
from .qgs import _read_json
from .retrieval import DataError, pre_caption

SPLITS = ("train", "val", "test1")


def parse_arg(arg: str | None) -> tuple[str, str]:
    """``<root>`` -> (root, "val"); ``<root>:train`` -> (root, "train")."""
    if not arg:
        raise ValueError("CIRR needs its root folder: --data cirr:<root>[:train|:val]")
    root, sep, split = arg.rpartition(":")
    if sep and split in SPLITS:
        return os.path.expanduser(root), split
    return os.path.expanduser(arg), "val"


def _annotation_dir(root: str) -> str:
    for candidate in (os.path.join(root, "cirr"), root):
        if os.path.isdir(os.path.join(candidate, "captions")):
            return candidate
    raise DataError(f"CIRR: no captions/ folder under {root} or {os.path.join(root, 'cirr')}")


def load_cirr(arg: str | None = None, image_root: str | None = None, max_words: int = 30) -> ComposedDataset:
    root, split = parse_arg(arg)
    if split == "test1":
        raise DataError("CIRR test1 has no public targets (its rankings are scored by the CIRR evaluation "
                        "server); use cirr:<root>:val")
    ann = _annotation_dir(root)
    cap_path = os.path.join(ann, "captions", f"cap.rc2.{split}.json")
    split_path = os.path.join(ann, "image_splits", f"split.rc2.{split}.json")
    name_to_path = _read_json(split_path)
    if not isinstance(name_to_path, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in name_to_path.items()):
        raise DataError(f"{split_path}: expected a JSON object mapping image names to relative paths")
    names = list(name_to_path)
    index = {n: i for i, n in enumerate(names)}
    entries = _read_json(cap_path)
    if not isinstance(entries, list):
        raise DataError(f"{cap_path}: expected a JSON list of CIRR queries")
    refs, texts, targets, exclude, subsets = [], [], [], [], []
    for k, e in enumerate(entries):
        pair = f" (pairid {short_repr(e['pairid'], 40)})" if isinstance(e, dict) and "pairid" in e else ""
        where = f"{cap_path}: entry {k}{pair}"
        if not isinstance(e, dict):
            raise DataError(f"{where}: expected an object")
        for key in ("reference", "caption", "target_hard", "img_set"):
            if key not in e:
                raise DataError(f"{where}: missing field {key!r}")
        members = e["img_set"].get("members") if isinstance(e["img_set"], dict) else None
        if not isinstance(members, list) or not all(isinstance(m, str) for m in members):
            raise DataError(f"{where}: img_set.members must be a list of image names, got {describe(members)}")
        for key in ("reference", "target_hard", "caption"):  # names are looked up: a list or dict cannot be
            if not isinstance(e[key], str):
                raise DataError(f"{where}: '{key}' must be a string, got {describe(e[key])}")
        ref, target = e["reference"], e["target_hard"]
        if ref not in index:
            raise DataError(f"{where}: reference image {short_repr(ref)} is not in {split_path}")
        if target not in index:
            raise DataError(f"{where}: target image {short_repr(target)} is not in {split_path}")
        missing = [m for m in members if m not in index]
        if missing:
            raise DataError(f"{where}: img_set member {short_repr(missing[0])} is not in {split_path}")
        if not pre_caption(e["caption"], max_words):
            raise DataError(f"{where}: empty modification text (reference {short_repr(ref)})")
        refs.append(index[ref])
        texts.append(pre_caption(e["caption"], max_words))
        targets.append([index[target]])
        exclude.append([index[ref]])
        subsets.append([index[m] for m in members if m != ref])
    if not refs:
        raise DataError(f"{cap_path}: no queries")
    images = [os.path.normpath(name_to_path[n]) for n in names]
    return ComposedDataset(images, refs, texts, targets, exclude=exclude, subsets=subsets,
                           image_root=image_root or os.path.dirname(os.path.abspath(ann)),
                           name=f"cirr-{split}", source=cap_path)
