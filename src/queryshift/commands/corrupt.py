"""``queryshift corrupt``: write COCO-C / Flickr-C style corrupted copies of a Karpathy-split dataset, or
AudioSet-C / VGGSound-C style copies of audio and video files (:mod:`.corrupt_media`).

The layout is the one TCR's configs and benchmark users expect:

* image corruptions: ``<out>/<Prefix>_IP_<name>_<severity>/<image path from the JSON>``, saved as JPEG q95
  like MM_Robustness's ``cv2.imwrite`` (so jpeg_compression is compressed twice there too);
* text corruptions: ``<out>/annotation_<Name>/<level>/<json file name>``, the JSON rewritten with its
  structure intact and only the captions perturbed (the first 5 per image for COCO, as the generator did).

Each image/caption is corrupted with the generator ``item_rng(seed, index)`` the online engine uses for the
same query, so image files match ``queryshift run --shift`` up to the JPEG re-encode. (Captions are perturbed
raw, as MM_Robustness did, whereas the engine perturbs the ``pre_caption``-cleaned text.) Existing outputs
are kept (the command resumes) unless ``--overwrite``. Streams and domain styles are online-only.

Nothing is written outside ``--out``: an existing ``--out`` must be empty or hold this command's outputs
only (``.queryshift-corrupt``, ``*_IP_*`` and ``annotation_*`` folders); every file goes through a fresh
temporary name and a rename (a link planted in the tree is never written through); an output path that
resolves outside ``--out``, onto its own input, or onto another image's output is refused.
"""

from __future__ import annotations

import fnmatch
import json
import os
import sys

from ..atomic import atomic_file, write_text
from ..shifts import item_rng
from .corrupt_media import is_media, write_media

MARKER = ".queryshift-corrupt"
OUTPUT_PATTERNS = (MARKER, ".queryshift.lock", "*_IP_*", "annotation_*", "*_AUDIO_*", "*_VIDEO_*")

IMAGE_SEVERITIES = (1, 2, 3, 4, 5)
TCR_TEXT_LEVELS = {"char": range(1, 8), "word": (6, 7), "sentence": (1,)}  # what the TCR YAMLs ship


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "corrupt", help="write corrupted copies of a dataset (COCO-C / Flickr-C layout)",
        description="Write corrupted copies of a Karpathy-split dataset in the TCR benchmark layout: "
                    "<out>/<Prefix>_IP_<corruption>_<severity>/<image path> for image corruptions and "
                    "<out>/annotation_<Name>/<level>/<json name> for text corruptions. Images keep their "
                    "relative path from the JSON (the loader also falls back to flat <basename>.jpg, the "
                    "layout MM_Robustness itself writes).")
    p.add_argument("--data", required=True, help="Karpathy-split JSON, e.g. coco_karpathy_test.json; or an audio "
                   "(.wav, .flac) or video (.mp4) file, or a folder of them: copies go to "
                   "<out>/<prefix>_AUDIO_<shift>_<severity>/ and <out>/<prefix>_VIDEO_<shift>_<severity>/")
    p.add_argument("--image-root", dest="image_root", help="folder the JSON's image paths are relative to "
                   "(needed for image corruptions)")
    p.add_argument("--shift", action="append", required=True, metavar="NAME:SEVERITY",
                   help="corruption to write, repeatable: gaussian_noise:5, RandomCharAug_swap:7, sr:6, "
                        "formal ...; 'all-image' = 16 corruptions x severities 1-5, 'all-text' = the 57 text "
                        "sets of the TCR configs (char 1-7, word 6-7, sentence 1; the last need HF models)")
    p.add_argument("--out", required=True, help="output root")
    p.add_argument("--seed", type=int, default=0, help="seed of the corruptions (default 0)")
    p.add_argument("--prefix", help="image folder prefix (default COCO / Flickr30K from the JSON name)")
    p.add_argument("--semantic-filter", dest="semantic_filter", action="store_true",
                   help="redraw EDA/ip/style outputs until paraphrase-mpnet-base-v2 similarity >= 0.9")
    p.add_argument("--workers", type=int, default=1, help="processes for image corruptions (default 1)")
    p.add_argument("--overwrite", action="store_true", help="rewrite outputs that already exist")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="hide progress bars")
    p.set_defaults(func=main)


def expand_shifts(values: list[str]) -> list[str]:
    from ..shifts.image import IMAGE_CORRUPTIONS
    from ..shifts.text import CHAR_CORRUPTIONS, SENTENCE_CORRUPTIONS, WORD_CORRUPTIONS

    specs = []
    for value in values:
        for item in value.split(","):
            item = item.strip()
            if item == "all-image":
                specs += [f"{n}:{s}" for n in IMAGE_CORRUPTIONS for s in IMAGE_SEVERITIES]
            elif item == "all-text":
                for names, kind in ((CHAR_CORRUPTIONS, "char"), (WORD_CORRUPTIONS, "word"),
                                    (SENTENCE_CORRUPTIONS, "sentence")):
                    specs += [f"{n}:{lv}" for n in names for lv in TCR_TEXT_LEVELS[kind]]
            elif item:
                specs.append(item)
    return list(dict.fromkeys(specs))


def default_prefix(data_path: str) -> str:
    base = os.path.basename(data_path).lower()
    if "coco" in base:
        return "COCO"
    if "flickr" in base:
        return "Flickr30K"
    return os.path.splitext(os.path.basename(data_path))[0]


def check_prefix(prefix: str | None) -> None:
    """The image folder is ``<out>/<prefix>_IP_<name>_<severity>``: the prefix must not leave ``--out``."""
    if prefix is not None and (not prefix or "/" in prefix or "\\" in prefix):
        raise ValueError(f"--prefix must be a plain folder-name prefix (no path separators), got {prefix!r}")


def inside(path: str, folder: str) -> bool:
    """Whether ``path`` resolves (symlinks and '..' included) to somewhere under ``folder``."""
    path, folder = os.path.realpath(path), os.path.realpath(folder)
    return os.path.commonpath([path, folder]) == folder


def check_out(out: str) -> None:
    """Refuse an ``--out`` that is a file, or a non-empty folder this command did not write (``/``, a home)."""
    if not out.strip():
        raise ValueError("--out is empty; give the output root")
    if os.path.lexists(out) and not os.path.isdir(out):
        raise ValueError(f"--out {out} is not a directory")
    if not os.path.isdir(out):
        return
    entries = sorted(os.listdir(out))
    foreign = [e for e in entries if not any(fnmatch.fnmatchcase(e, p) for p in OUTPUT_PATTERNS)]
    if foreign and MARKER not in entries:
        shown = ", ".join(foreign[:3]) + (", ..." if len(foreign) > 3 else "")
        raise ValueError(f"--out {out} is not empty and holds no 'queryshift corrupt' output ({shown}); choose a "
                         f"new or empty folder")


def main(args) -> int:
    from ..shifts.registry import ALIASES, IMAGE_CORRUPTIONS, TEXT_CORRUPTIONS, build_shift

    check_prefix(args.prefix)
    check_out(args.out)
    specs = expand_shifts(args.shift)
    if is_media(args.data):  # audio and video files: their own readers, writers and folders
        skipped = write_media(args, specs, inside, lambda: _start(args.out))
        if skipped:
            print(f"queryshift corrupt: {skipped} file(s) in all were not written (listed above); exit status 1",
                  file=sys.stderr)
        return 1 if skipped else 0
    jobs = []  # build every shift first: a bad name or a missing model fails before anything is written
    for spec in specs:
        name = ALIASES.get(spec.partition(":")[0], spec.partition(":")[0])
        if name not in IMAGE_CORRUPTIONS and name not in TEXT_CORRUPTIONS:
            raise ValueError(f"corrupt writes the 16 image and 16 text corruptions only, not {spec!r} "
                             "(streams and domain styles are applied online by `queryshift run --shift`)")
        modality = "image" if name in IMAGE_CORRUPTIONS else "text"
        jobs.append((modality, build_shift(spec, modality, args.seed, args.semantic_filter)))
    if any(m == "image" for m, _ in jobs) and not args.image_root:
        raise ValueError("image corruptions need --image-root (the folder the JSON's image paths live in)")
    _start(args.out)
    skipped = 0
    for modality, shift in jobs:
        if modality == "image":
            skipped += write_images(args, shift)
        else:
            write_captions(args, shift)
    if skipped:  # everything else was written; a script must still see that the set is incomplete
        print(f"queryshift corrupt: {skipped} image(s) in all were not written (listed above); exit status 1",
              file=sys.stderr)
        return 1
    return 0


def _start(out: str) -> None:
    os.makedirs(out, exist_ok=True)
    if not os.path.lexists(os.path.join(out, MARKER)):
        write_text(os.path.join(out, MARKER), "written by 'queryshift corrupt'\n")


# -- images ---------------------------------------------------------------------------------------------------

_WORK: dict = {}


def _init_worker(dataset, shift, seed, folder, overwrite, root=None):
    _WORK.update(dataset=dataset, shift=shift, seed=seed, folder=folder, overwrite=overwrite, root=root or folder)


def image_target(folder: str, rel: str) -> str:
    """Where the corrupted copy of the image at ``rel`` goes (an absolute path keeps only its file name)."""
    return os.path.join(folder, rel.lstrip("/\\") if not os.path.isabs(rel) else os.path.basename(rel))


def _corrupt_one(i: int) -> str | None:
    """Corrupt image ``i``; returns an error message instead of raising so one bad file does not stop a run."""
    from ..data.retrieval import DataError

    dataset, shift, folder = _WORK["dataset"], _WORK["shift"], _WORK["folder"]
    rel = dataset.images[i]
    target = image_target(folder, rel)
    if not inside(target, folder) or not inside(target, _WORK["root"]):  # ../../x/img.jpg, a planted link
        return f"image {i} ({rel!r}): its output path leaves {folder}; refused"
    if os.path.exists(target) and not _WORK["overwrite"]:
        return None
    source = dataset.image_path(i)
    if os.path.exists(target) and os.path.exists(source) and os.path.samefile(target, source):
        return f"image {i} ({rel!r}): its output would overwrite the input image {source}; refused"
    try:
        image = dataset.load_image(i)
    except DataError as err:
        return str(err)
    out = shift(image, i, i, len(dataset.images), item_rng(_WORK["seed"], i))
    os.makedirs(os.path.dirname(target), exist_ok=True)
    ext = os.path.splitext(target)[1].lower()
    fmt = "JPEG" if ext in (".jpg", ".jpeg", "") else _pil_format(ext)
    with atomic_file(target, "wb") as f:
        out.save(f, fmt, **({"quality": 95} if fmt == "JPEG" else {}))
    return None


def _pil_format(ext: str) -> str:
    from PIL import Image

    Image.init()
    return Image.EXTENSION.get(ext, "PNG")


def write_images(args, shift) -> int:
    """Write the corrupted copy of every image; returns how many were skipped (unreadable or refused)."""
    from tqdm import tqdm

    from ..data import load_karpathy

    dataset = load_karpathy(args.data, args.image_root)
    corruption, severity = shift.name.split(":")
    folder = os.path.join(args.out, f"{args.prefix or default_prefix(args.data)}_IP_{corruption}_{severity}")
    os.makedirs(folder, exist_ok=True)
    if not inside(folder, args.out):
        raise ValueError(f"{folder} leads outside --out {args.out} (a symbolic link); remove it")
    indices = _unique_images(dataset.images)
    check_targets(dataset, folder, indices)
    init = (dataset, shift, args.seed, folder, args.overwrite, args.out)
    errors = []
    with tqdm(total=len(indices), desc=shift.name, unit="img", disable=not getattr(args, "progress", True)) as bar:
        if args.workers > 1:
            import multiprocessing as mp

            with mp.get_context("fork").Pool(args.workers, _init_worker, init) as pool:
                for err in pool.imap_unordered(_corrupt_one, indices, chunksize=8):
                    errors += [err] if err else []
                    bar.update()
        else:
            _init_worker(*init)
            for i in indices:
                err = _corrupt_one(i)
                errors += [err] if err else []
                bar.update()
    for err in errors[:10]:
        print(f"skipped: {err}", file=sys.stderr)
    if errors:
        print(f"{shift.name}: {len(errors)} image(s) were skipped (unreadable, or refused as above)", file=sys.stderr)
    return len(errors)


def check_targets(dataset, folder: str, indices: list[int]) -> None:
    """Refuse, before anything is written, an output that would replace its own input or another image's
    output (two absolute paths of one file name)."""
    written: dict[str, int] = {}
    for i in indices:
        target = os.path.realpath(image_target(folder, dataset.images[i]))
        if target == os.path.realpath(dataset.image_path(i)):
            raise ValueError(f"image {i} ({dataset.images[i]!r}): its output {target} is the input image itself; "
                             f"choose an --out outside the images (or another --prefix)")
        if target in written:
            first = written[target]
            raise ValueError(f"images {dataset.images[first]!r} and {dataset.images[i]!r} would both be written "
                             f"to {target} (absolute paths keep only the file name, and it is the same); "
                             f"make the paths relative to an --image-root")
        written[target] = i


def _unique_images(images: list[str]) -> list[int]:
    first: dict[str, int] = {}
    for i, rel in enumerate(images):
        first.setdefault(rel, i)
    return sorted(first.values())


# -- captions -------------------------------------------------------------------------------------------------

def write_captions(args, shift) -> None:
    """Rewrite the raw JSON: only caption strings change; other keys and the order are kept."""
    from tqdm import tqdm

    from ..data import load_karpathy

    load_karpathy(args.data)  # validates the file with the loader's own checks and messages
    with open(args.data, encoding="utf-8-sig") as f:  # as the loader reads it: a byte-order mark is fine
        entries = json.load(f)
    corruption, level = shift.name.split(":")
    target = os.path.join(args.out, f"annotation_{corruption}", level, os.path.basename(args.data))
    if os.path.exists(target) and os.path.samefile(target, args.data):
        raise ValueError(f"{target} is the input annotation file itself; choose another --out")
    if not inside(target, args.out):
        raise ValueError(f"{target} leads outside --out {args.out} (a symbolic link); remove it")
    if os.path.exists(target) and not args.overwrite:
        print(f"{target} exists, kept (use --overwrite to rewrite)", file=sys.stderr)
        return
    # the loader's numbering of texts (COCO keeps 5 per image), so rng(index) matches the online engine
    keep = 5 if "coco" in os.path.basename(args.data).lower() else None
    index = 0
    for entry in tqdm(entries, desc=shift.name, unit="img", disable=not getattr(args, "progress", True)):
        single = isinstance(entry["caption"], str)
        captions = [entry["caption"]] if single else list(entry["caption"])
        for k in range(len(captions) if keep is None else min(keep, len(captions))):
            captions[k] = shift(captions[k], index, index, 0, item_rng(args.seed, index))
            index += 1
        entry["caption"] = captions[0] if single else captions
    os.makedirs(os.path.dirname(target), exist_ok=True)
    with atomic_file(target, "w") as f:
        json.dump(entries, f, allow_nan=False)
