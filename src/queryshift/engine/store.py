"""The gallery embedding store: an fp16 memory-mapped array with a JSON manifest, filled in resumable chunks.

A store is a directory: ``embeddings.npy`` (N x d float16, NumPy format, opened memory-mapped so a 1M-item
gallery costs no RAM until read), ``manifest.json`` (model and weights digest, preprocessing, dataset
digest, modality, shape, ``rows_done``, ``complete``) and ``lock`` (one writer at a time). Encoding writes
chunk by chunk and records ``rows_done`` after each flushed chunk, so an interrupted encoding continues where
it stopped; a store whose manifest does not describe the requested gallery is rebuilt, never trusted.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable

import numpy as np
import torch
from tqdm.auto import tqdm

from ..atomic import write_text
from ..locks import ExclusiveLock
from ..userfiles import open_regular

IDENTITY = ("model", "model_digest", "preprocess", "dataset_digest", "modality", "max_words")


class EmbeddingStore:
    def __init__(self, path: str):
        self.path = path
        self.array_path = os.path.join(path, "embeddings.npy")
        self.manifest_path = os.path.join(path, "manifest.json")

    @contextlib.contextmanager
    def locked(self):
        """Exclusive lock on the store (another process encoding the same gallery waits, then reuses it)."""
        os.makedirs(self.path, exist_ok=True)
        with ExclusiveLock(os.path.join(self.path, "lock"), wait=True, what=f"embedding store {self.path}"):
            yield

    def manifest(self) -> dict | None:
        try:
            with open_regular(self.manifest_path, encoding="utf-8") as f:
                return json.load(f)
        except (FileNotFoundError, ValueError, RecursionError):  # absent, damaged, a pipe: rebuilt, never read
            return None

    def _write_manifest(self, manifest: dict) -> None:
        write_text(self.manifest_path, json.dumps(manifest, indent=2))

    def _matches(self, saved: dict | None, manifest: dict) -> bool:
        return saved is not None and all(saved.get(k) == manifest.get(k) for k in IDENTITY)

    def complete(self, manifest: dict) -> bool:
        saved = self.manifest()
        return self._matches(saved, manifest) and bool(saved.get("complete")) and os.path.exists(self.array_path)

    def open(self) -> np.ndarray:
        """The embeddings, memory-mapped read-only (N x d float16)."""
        saved = self.manifest()
        if not saved or not saved.get("complete"):
            raise FileNotFoundError(f"{self.path}: the embedding store is incomplete (manifest {self.manifest_path})")
        array = np.load(self.array_path, mmap_mode="r", allow_pickle=False)
        if list(array.shape) != [saved["rows"], saved["dim"]]:
            raise ValueError(f"{self.array_path}: shape {array.shape} does not match its manifest "
                             f"({saved['rows']} x {saved['dim']})")
        return array

    def fill(self, manifest: dict, rows: int, encode: Callable[[list[int]], torch.Tensor], chunk: int = 4096,
             progress: bool = False) -> None:
        """Encode rows ``0..rows-1`` with ``encode(indices) -> (len x d)`` into the store, resuming a partial one."""
        os.makedirs(self.path, exist_ok=True)
        saved = self.manifest()
        if os.path.islink(self.array_path):  # never fill a file elsewhere through a link planted in the store
            os.remove(self.array_path)
        if self._matches(saved, manifest) and saved.get("rows") == rows and os.path.exists(self.array_path):
            done = int(saved.get("rows_done", 0))
            array = np.load(self.array_path, mmap_mode="r+", allow_pickle=False)
        else:
            first = encode(list(range(min(chunk, rows))))  # the first chunk tells the dimension
            array = np.lib.format.open_memmap(self.array_path, mode="w+", dtype=np.float16,
                                              shape=(rows, first.shape[1]))
            done = self._write_chunk(array, 0, first, manifest, rows)
        bar = tqdm(total=rows, initial=done, desc=f"encoding {manifest['modality']} gallery", unit="item",
                   disable=not progress, leave=False)
        while done < rows:
            stop = min(done + chunk, rows)
            done = self._write_chunk(array, done, encode(list(range(done, stop))), manifest, rows)
            bar.update(stop - bar.n)
        bar.close()
        self._write_manifest({**manifest, "rows": rows, "dim": int(array.shape[1]), "dtype": "float16",
                              "rows_done": rows, "complete": True})
        del array

    def _write_chunk(self, array: np.memmap, start: int, emb: torch.Tensor, manifest: dict, rows: int) -> int:
        if not torch.isfinite(emb).all() or (emb.norm(dim=1) == 0).any():
            raise FloatingPointError(f"gallery embeddings {start}..{start + len(emb) - 1} contain NaN/inf or "
                                     f"all-zero rows")
        array[start:start + len(emb)] = emb.detach().cpu().numpy().astype(np.float16)
        array.flush()  # the data is on disk before the manifest says so
        done = start + len(emb)
        self._write_manifest({**manifest, "rows": rows, "dim": int(array.shape[1]), "dtype": "float16",
                              "rows_done": done, "complete": False})
        return done
