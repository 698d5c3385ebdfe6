"""Query-gallery-shift datasets in the TCR formats: Nocaps, Fashion-Gen, CUHK-PEDES, ICFG-PEDES.

``--data NAME[:ARG]``: ARG is the annotation file or the dataset root; without it the TCR code's layout under
``./dataset`` is assumed. Without ``--image-root`` images are looked up where the TCR layout puts them,
relative to the dataset root.

ReID captions are kept as raw text: TCR tokenises them with the IRRA CLIP BPE tokenizer and no ``pre_caption``.
Every backbone here lowercases and cleans whitespace in its own tokenizer, so the raw text is equivalent.
"""

from __future__ import annotations

import glob
import json
import os
import pickle
from functools import partial

from ..userfiles import clip, describe, open_regular, parse_json
from .loaders import captions, is_id, not_utf8
from .retrieval import DataError, RetrievalDataset, pre_caption

NOCAPS_DOMAINS = {"in": "in-domain", "near": "near-domain", "out": "out-domain", "entire": None}


def _read_json(path: str):
    try:
        with open_regular(path, encoding="utf-8-sig", error=DataError) as f:  # -sig: a byte-order mark is fine
            return parse_json(lambda: json.load(f), path, DataError)
    except FileNotFoundError as err:
        raise DataError(f"annotation file not found: {path}") from err
    except UnicodeDecodeError as err:
        raise not_utf8(path, err) from None
    except json.JSONDecodeError as err:
        raise DataError(f"{path}: not valid JSON ({err})") from err


def _key(value, where: str, field: str):
    """An id that relevance is grouped by (see :func:`is_id`)."""
    if not is_id(value):
        raise DataError(f"{where}: '{field}' must be a string or a finite number (an id), got {describe(value)}")
    return value


def _path(value, where: str, field: str) -> str:
    if not isinstance(value, str) or not value:
        raise DataError(f"{where}: '{field}' must be an image file path, got {describe(value)}")
    return value


def _resolve(arg: str | None, default_root: str, file_name: str) -> tuple[str, str]:
    """-> (annotation file, dataset root) from a file, a root directory, or nothing."""
    arg = os.path.expanduser(arg or default_root)
    if os.path.isdir(arg):
        return os.path.join(arg, file_name), arg
    return arg, os.path.dirname(arg) or "."


def _grouped(images: list[str], image_keys: list, texts: list[str], text_keys: list, **kw) -> RetrievalDataset:
    """Many-to-many relevance: an image and a text are relevant when their keys (product/person id) match."""
    by_key: dict = {}
    for i, k in enumerate(image_keys):
        by_key.setdefault(k, []).append(i)
    txt2img = [list(by_key.get(k, [])) for k in text_keys]
    img2txt: list[list[int]] = [[] for _ in images]
    for t, rel in enumerate(txt2img):
        for i in rel:
            img2txt[i].append(t)
    return RetrievalDataset(images, texts, img2txt, txt2img, **kw)


def load_nocaps(arg: str | None = None, image_root: str | None = None, domain: str = "entire",
                max_words: int = 30) -> RetrievalDataset:
    """Nocaps: a JSON list of {"image", "caption": [all captions], "domain": "in-domain"|...}.

    ``domain`` is in, near, out or entire (no filter). Images default to the annotation file's directory.
    """
    if domain not in NOCAPS_DOMAINS:
        raise ValueError(f"nocaps domain must be one of {list(NOCAPS_DOMAINS)}, got {domain!r}")
    path, root = _resolve(arg, "dataset/nocaps", "annotations.json")
    entries = _read_json(path)
    if not isinstance(entries, list):
        raise DataError(f"{path}: expected a JSON list of {{'image', 'caption', 'domain'}} entries")
    want = NOCAPS_DOMAINS[domain]
    images, groups, seen = [], [], set()
    for n, e in enumerate(entries):
        if not isinstance(e, dict) or "image" not in e or "caption" not in e:
            raise DataError(f"{path}: entry {n} lacks the 'image' or 'caption' field")
        where = f"{path}: entry {n} ({clip(_path(e['image'], f'{path}: entry {n}', 'image'))})"
        if want is not None and "domain" not in e:
            raise DataError(f"{where} lacks the 'domain' field")
        seen.add(clip(str(e.get("domain")), 60))
        caps = captions(e["caption"], where, "caption")
        if want is None or e["domain"] == want:
            if not caps:
                raise DataError(f"{where} has no caption")
            images.append(e["image"])
            groups.append([pre_caption(c, max_words) for c in caps])
    if not images:
        raise DataError(f"{path}: no entry with domain {want!r}; domains found: {sorted(map(str, seen))}")
    texts, text_keys = [t for caps in groups for t in caps], [i for i, caps in enumerate(groups) for _ in caps]
    return _grouped(images, list(range(len(images))), texts, text_keys, image_root=image_root or root,
                    name=f"nocaps_{domain}", source=path)


def load_fashion_gen(arg: str | None = None, image_root: str | None = None, detail: bool = False,
                     max_words: int = 77) -> RetrievalDataset:
    """Fashion-Gen validation pickles (``full_valid_info_PAI/*.pkl``, read in sorted order), each a dict with
    ``captions`` (str or list), ``img_name`` and ``super_cls_id``. Relevance is by product id (the part of
    ``img_name`` before the first '_'); each pickle's captions join its product's captions, so a description
    repeated by k views appears k times, as in TCR. ``detail`` keeps only ``super_cls_id == '21'``.

    ARG is the dataset root (default ``dataset/Fashion-Gen``) or the pickle directory. The pickles are
    unpickled, so only point this at trusted files.
    """
    root = os.path.expanduser(arg or "dataset/Fashion-Gen")
    pkl_dir = root if glob.glob(os.path.join(root, "*.pkl")) else os.path.join(root, "full_valid_info_PAI")
    if pkl_dir != root and not os.path.isdir(pkl_dir):
        raise DataError(f"Fashion-Gen pickle directory not found: {pkl_dir} (expected <root>/full_valid_info_PAI)")
    files = sorted(glob.glob(os.path.join(pkl_dir, "*.pkl")))
    if not files:
        raise DataError(f"no .pkl files in {pkl_dir}")
    if pkl_dir == root:
        root = os.path.dirname(os.path.normpath(pkl_dir))
    products: dict[str, tuple[list[str], list[str]]] = {}  # product id -> (images, captions)
    for f in files:
        try:
            with open_regular(f, "rb", error=DataError) as fh:
                info = pickle.load(fh)
        except DataError:
            raise
        except RecursionError:
            raise DataError(f"{f}: cannot unpickle (nested too deeply)") from None
        except Exception as err:  # unpickling a stranger's file can raise anything; name the file
            raise DataError(f"{f}: cannot unpickle ({type(err).__name__}: {clip(str(err))})") from err
        for key in ("captions", "img_name") + (("super_cls_id",) if detail else ()):
            if not isinstance(info, dict) or key not in info:
                raise DataError(f"{f}: lacks the '{key}' field")
        if detail and str(info["super_cls_id"]) != "21":
            continue
        name = _path(info["img_name"], f, "img_name")
        caps = [pre_caption(c, max_words) for c in captions(info["captions"], f, "captions")]
        if not caps or not all(caps):
            raise DataError(f"{f}: empty 'captions' for image {clip(name)!r}")
        imgs, texts = products.setdefault(name.split("_")[0], ([], []))
        if name not in imgs:
            imgs.append(name)
        texts.extend(caps)
    if not products:
        raise DataError(f"{pkl_dir}: no pickle with super_cls_id '21'")
    keys = list(products)
    images = [im for k in keys for im in products[k][0]]
    texts = [t for k in keys for t in products[k][1]]
    return _grouped(images, [k for k in keys for _ in products[k][0]], texts,
                    [k for k in keys for _ in products[k][1]],
                    image_root=image_root or os.path.join(root, "extracted_valid_images"),
                    name="fashion_gen_detail" if detail else "fashion_gen", source=pkl_dir)


def load_reid(arg: str | None = None, image_root: str | None = None, default_root: str = "dataset/CUHK-PEDES",
              file_name: str = "reid_raw.json", name: str = "cuhk_pedes") -> RetrievalDataset:
    """IRRA-style ReID JSON: a list of {"split", "captions", "file_path", "id"}; only split == 'test' is used.
    Relevance is by person id. Images default to ``<root>/imgs``; captions stay raw (module docstring)."""
    path, root = _resolve(arg, default_root, file_name)
    entries = _read_json(path)
    if not isinstance(entries, list):
        raise DataError(f"{path}: expected a JSON list of {{'split', 'captions', 'file_path', 'id'}} entries")
    images, pids, texts, text_pids = [], [], [], []
    for n, e in enumerate(entries):
        for key in ("split", "captions", "file_path", "id"):
            if not isinstance(e, dict) or key not in e:
                raise DataError(f"{path}: entry {n} lacks the '{key}' field")
        if e["split"] != "test":
            continue
        image = _path(e["file_path"], f"{path}: entry {n}", "file_path")
        where = f"{path}: entry {n} ({clip(image)})"
        caps = captions(e["captions"], where, "captions")
        for k, c in enumerate(caps):
            if not c.strip():
                raise DataError(f"{path}: empty caption {k} of entry {n} ({clip(image)})")
        images.append(image)
        pids.append(_key(e["id"], where, "id"))
        texts.extend(caps)
        text_pids.extend([e["id"]] * len(caps))
    if not images:
        raise DataError(f"{path}: no entry with split 'test'")
    return _grouped(images, pids, texts, text_pids, image_root=image_root or os.path.join(root, "imgs"),
                    name=name, source=path)


load_nocaps_in = partial(load_nocaps, domain="in")
load_nocaps_near = partial(load_nocaps, domain="near")
load_nocaps_out = partial(load_nocaps, domain="out")
load_nocaps_entire = partial(load_nocaps, domain="entire")
load_fashion_gen_detail = partial(load_fashion_gen, detail=True)
load_cuhk_pedes = partial(load_reid, default_root="dataset/CUHK-PEDES", file_name="reid_raw.json",
                          name="cuhk_pedes")
load_icfg_pedes = partial(load_reid, default_root="dataset/ICFG-PEDES", file_name="ICFG-PEDES.json",
                          name="icfg_pedes")
