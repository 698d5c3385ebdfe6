"""Composed image retrieval data: (reference image, modification text) queries against an image gallery.

A :class:`ComposedDataset` is a :class:`RetrievalDataset` whose ``images`` are the gallery and whose ``texts``
are the modification texts, one per composed query. Query ``q`` is (``images[references[q]]``, ``texts[q]``)
and ``targets[q]`` lists the gallery images that satisfy it (many-to-many allowed). Because ``txt2img`` is
``targets``, the text-only baseline (``t2i``: modification text alone against the gallery) runs on the same
data; ``c2i`` is the composed direction.

Two optional per-query lists follow the CIRR protocol: ``exclude[q]`` are gallery images never ranked for
query q (CIRR removes the reference image from the results), ``subsets[q]`` are the images of the query's
CIRR ``img_set`` (minus the reference) that ``Recall_subset@K`` ranks among.
"""

from __future__ import annotations

from ..userfiles import short_repr
from .retrieval import DataError, RetrievalDataset


class ComposedDataset(RetrievalDataset):
    def __init__(self, images: list[str], references: list[int], modifications: list[str],
                 targets: list[list[int]], exclude: list[list[int]] | None = None,
                 subsets: list[list[int]] | None = None, **kw):
        where = kw.get("source") or kw.get("name", "dataset")
        n = len(references)
        if not (len(modifications) == len(targets) == n):
            raise DataError(f"{where}: {n} references, {len(modifications)} modification texts and "
                            f"{len(targets)} target lists; one of each per composed query")
        for q, (ref, text, rel) in enumerate(zip(references, modifications, targets)):
            if not isinstance(ref, int) or not 0 <= ref < len(images):
                raise DataError(f"{where}: composed query {q} has no reference image (got {short_repr(ref)}; "
                                f"the gallery has {len(images)} images)")
            if not isinstance(text, str) or not text.strip():
                raise DataError(f"{where}: composed query {q} (reference {short_repr(images[ref])}) has an empty "
                                f"modification text")
            if not rel:
                raise DataError(f"{where}: composed query {q} (reference {short_repr(images[ref])}) has no "
                                f"target image")
            bad = [t for t in rel if not 0 <= t < len(images)]
            if bad:
                raise DataError(f"{where}: composed query {q}: target index {bad[0]} outside the gallery")
        for label, lists in (("exclude", exclude), ("subsets", subsets)):
            if lists is not None and len(lists) != n:
                raise DataError(f"{where}: {label} has {len(lists)} entries for {n} composed queries")
        img2txt: list[list[int]] = [[] for _ in images]
        for q, rel in enumerate(targets):
            for t in rel:
                img2txt[t].append(q)
        super().__init__(images=list(images), texts=list(modifications), img2txt=img2txt,
                         txt2img=[list(t) for t in targets], **kw)
        self.references = list(references)
        self.targets = self.txt2img
        self.exclude = exclude
        self.subsets = subsets

    def __repr__(self) -> str:
        return f"ComposedDataset({self.name!r}, {len(self.images)} gallery images, {len(self.texts)} composed queries)"

    def query_items(self, direction: str) -> tuple[str, int, list[list[int]]]:
        if direction == "c2i":
            return "composed", len(self.references), self.targets
        return super().query_items(direction)

    @property
    def modalities(self) -> tuple[str, ...]:
        return ("composed", "image", "text")

    def count(self, modality: str) -> int:
        return len(self.references) if modality == "composed" else super().count(modality)

    def load(self, modality: str, index: int):
        """A composed query is (reference image, modification text)."""
        if modality == "composed":
            return self.load_reference(index), self.texts[index]
        return super().load(modality, index)

    def relevance(self, query: str, gallery: str) -> list[list[int]]:
        if query == "composed" and gallery == "image":
            return self.targets
        if "composed" in (query, gallery):
            raise DataError(f"{self.source or self.name}: composed queries retrieve images (c2i), not {gallery}")
        return super().relevance(query, gallery)

    def load_reference(self, q: int):
        """The reference image of composed query ``q``; a missing file names the query and the image."""
        ref = self.references[q]
        try:
            return self.load_image(ref)
        except DataError as err:
            raise DataError(f"composed query {q}: reference image {short_repr(self.images[ref])} cannot be read: "
                            f"{err}") from err

    def subset(self, image_ids: list[int]):
        raise DataError(f"{self.name}: a composed dataset cannot drop gallery images (--skip-bad-images); "
                        "fix or remove the unreadable images instead")


def is_composed(dataset) -> bool:
    return isinstance(dataset, ComposedDataset)
