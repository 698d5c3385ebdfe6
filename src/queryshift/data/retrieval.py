"""Retrieval datasets: images + texts + many-to-many relevance."""

from __future__ import annotations

import hashlib
import json
import os
import re
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

from PIL import Image, UnidentifiedImageError

from ..userfiles import clip, open_regular, short_repr

_PUNCT = re.compile(r"[.!\"()*#:;~]")
_SPACES = re.compile(r"\s{2,}")


class DataError(ValueError):
    """Bad input data; the message names the file, field or value."""


def pre_caption(caption, max_words: int = 30) -> str:
    """TCR/BLIP caption cleaning: lowercase, punctuation to spaces, truncate to ``max_words``."""
    if isinstance(caption, (list, tuple)):
        caption = " ".join(caption)
    caption = _PUNCT.sub(" ", caption.lower())
    caption = _SPACES.sub(" ", caption).rstrip("\n").strip(" ")
    words = caption.split(" ")
    if max_words and len(words) > max_words:
        caption = " ".join(words[:max_words])
    return caption


@dataclass
class RetrievalDataset:
    """Images and texts with relevance lists in both directions.

    ``images`` are paths relative to ``image_root`` (or absolute). ``img2txt[i]`` lists the texts relevant
    to image i, ``txt2img[t]`` the images relevant to text t; many-to-many relations are allowed.
    ``image_loader`` replaces file reading (e.g. procedurally rendered images).
    """

    images: list[str]
    texts: list[str]
    img2txt: list[list[int]]
    txt2img: list[list[int]]
    image_root: str | None = None
    name: str = "dataset"
    source: str = ""  # the annotation file, for messages and cache keys
    image_loader: Callable[[int], Image.Image] | None = field(default=None, repr=False)

    def __post_init__(self):
        if len(self.img2txt) != len(self.images) or len(self.txt2img) != len(self.texts):
            raise DataError(f"{self.source or self.name}: relevance lists do not match images/texts")
        for t, text in enumerate(self.texts):
            if not isinstance(text, str) or not text.strip():
                raise DataError(f"{self.source or self.name}: empty caption for text {t} (image(s) "
                                f"{short_repr(self.txt2img[t])})")

    def __repr__(self) -> str:
        return f"RetrievalDataset({self.name!r}, {len(self.images)} images, {len(self.texts)} texts)"

    def image_path(self, i: int) -> str:
        p = self.images[i]
        return p if os.path.isabs(p) or not self.image_root else os.path.join(self.image_root, p)

    def load_image(self, i: int) -> Image.Image:
        if self.image_loader is not None:
            return self.image_loader(i)
        path = self.image_path(i)
        if not os.path.exists(path) and self.image_root:
            # MM_Robustness writes corrupted images flat as <basename>.jpg
            flat = os.path.join(self.image_root, os.path.splitext(os.path.basename(self.images[i]))[0] + ".jpg")
            if os.path.exists(flat):
                path = flat
        try:
            with warnings.catch_warnings():
                # PIL only warns between its pixel limit and twice it; both decode into gigabytes
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                with open_regular(path, "rb", error=DataError) as f, Image.open(f) as im:
                    return im.convert("RGB")
        except FileNotFoundError as err:
            raise DataError(f"image {i} not found: {path}") from err
        except DataError as err:  # a pipe, device or folder where the image should be
            raise DataError(f"image {i} cannot be read: {err}") from err
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
            raise DataError(f"image {i} has too many pixels to decode safely: {path} ({err})") from err
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError) as err:
            raise DataError(f"image {i} is corrupt or unreadable: {path} ({clip(str(err))})") from err

    def fingerprint(self) -> str:
        """Content hash of the annotations and image locations; part of the gallery cache key."""
        h = hashlib.sha256()
        h.update(json.dumps([self.name, self.image_root or "", self.images, self.texts]).encode())
        return h.hexdigest()[:16]

    def subset(self, image_ids: list[int]) -> RetrievalDataset:
        """Keep the given images and the texts relevant to them; relevance is restricted accordingly."""
        keep_img = {old: new for new, old in enumerate(image_ids)}
        text_ids = sorted({t for i in image_ids for t in self.img2txt[i]})
        keep_txt = {old: new for new, old in enumerate(text_ids)}
        loader = self.image_loader
        return RetrievalDataset(
            images=[self.images[i] for i in image_ids],
            texts=[self.texts[t] for t in text_ids],
            img2txt=[[keep_txt[t] for t in self.img2txt[i] if t in keep_txt] for i in image_ids],
            txt2img=[[keep_img[i] for i in self.txt2img[t] if i in keep_img] for t in text_ids],
            image_root=self.image_root,
            name=self.name,
            source=self.source,
            image_loader=(lambda j: loader(image_ids[j])) if loader else None,
        )

    # the generic dataset interface the engine reads (AVDataset has the same): modalities, count, load, relevance
    @property
    def modalities(self) -> tuple[str, ...]:
        return ("image", "text")

    def count(self, modality: str) -> int:
        self._check(modality)
        return len(self.images) if modality == "image" else len(self.texts)

    def load(self, modality: str, index: int):
        """Item ``index`` of ``modality``: a PIL image (:meth:`load_image`) or a caption string."""
        self._check(modality)
        return self.load_image(index) if modality == "image" else self.texts[index]

    def relevance(self, query: str, gallery: str) -> list[list[int]]:
        """Per query item of ``query``: the relevant items of ``gallery``."""
        self._check(query)
        self._check(gallery)
        if query == gallery:
            raise DataError(f"{self.source or self.name}: queries and gallery are both {query}; give two "
                            f"different modalities")
        return self.img2txt if query == "image" else self.txt2img

    def _check(self, modality: str) -> None:
        if modality not in self.modalities:
            raise DataError(f"{self.source or self.name} has no {modality} items; it has "
                            f"{', '.join(self.modalities)}")

    def query_items(self, direction: str) -> tuple[str, int, list[list[int]]]:
        """-> (query modality, number of queries, relevance per query) for ``i2t`` or ``t2i``."""
        if direction == "i2t":
            return "image", len(self.images), self.img2txt
        if direction == "t2i":
            return "text", len(self.texts), self.txt2img
        raise ValueError(f"direction must be 'i2t' or 't2i', got {direction!r}")


def duplicate_entries(dataset: RetrievalDataset) -> str | None:
    """A message naming duplicated images and duplicated captions of one image, or None.

    Each copy is its own gallery item and query, so a duplicated image or caption changes the metrics
    (e.g. a text query's copy of its image counts as a wrong answer ranked above or below the right one).
    """
    if not isinstance(dataset, RetrievalDataset):  # audio-visual sets: their items are clips, checked by their loaders
        return None
    seen: dict[str, int] = {}
    for path in dataset.images:
        seen[path] = seen.get(path, 0) + 1
    images = {p: n for p, n in seen.items() if n > 1}
    pairs: dict[tuple, int] = {}
    for t, text in enumerate(dataset.texts):
        key = (text, tuple(sorted(dataset.txt2img[t])))
        pairs[key] = pairs.get(key, 0) + 1
    captions = {k: n for k, n in pairs.items() if n > 1}
    if not images and not captions:
        return None
    parts = []
    if images:
        parts.append(f"{len(images)} image(s) listed more than once (e.g. "
                     + ", ".join(f"{clip(p)} x{n}" for p, n in list(images.items())[:3]) + ")")
    if captions:
        parts.append(f"{len(captions)} caption(s) repeated for the same image (e.g. "
                     + ", ".join(f"{short_repr(k[0])} x{n}" for k, n in list(captions.items())[:2]) + ")")
    return (f"{dataset.source or dataset.name}: duplicate entries: " + "; ".join(parts)
            + "; each copy is a separate gallery item and query, which changes the metrics")


def from_groups(
    images: list[str], captions_per_image: list[list[str]], max_words: int = 30, **kw
) -> RetrievalDataset:
    """Build a dataset where each image owns its captions (texts numbered image by image)."""
    texts, img2txt, txt2img = [], [], []
    for i, caps in enumerate(captions_per_image):
        img2txt.append([])
        for cap in caps:
            img2txt[i].append(len(texts))
            txt2img.append([i])
            texts.append(pre_caption(cap, max_words))
    return RetrievalDataset(images=list(images), texts=texts, img2txt=img2txt, txt2img=txt2img, **kw)
