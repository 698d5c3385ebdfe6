"""The settings of one online adaptation run (``queryshift run`` options and YAML config keys)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from .. import methods
from .gallery_index import parse_spec as parse_index_spec

RESULT_KEYS = ("r1", "r5", "r10", "r_mean", "map")

# Fields that may differ between an interrupted run and its resumption (or a reused finished run).
RESUME_FREE = frozenset({"out", "resume", "overwrite", "num_workers", "progress", "cache_dir", "device",
                         "gallery_index"})


@dataclass
class RunConfig:
    """One online adaptation run. YAML config keys and ``queryshift run`` options use these names."""

    model: str = "shapes-clip"
    data: str = "shapes"
    image_root: str | None = None
    direction: str = "i2t"  # i2t: image queries, text gallery; t2i: text queries, image gallery
    method: str = "source"
    shift: str | None = None  # query-side shift, e.g. gaussian_noise:5, RandomCharAug_swap:7, stream:temporal
    batch_size: int = 64
    seed: int = 42
    steps: int = 3
    record: str = "last"  # scores of the first or the last step's forward (spec §1.8)
    optimizer: str = "adamw"
    lr: float | None = None  # None: 3e-4, or 3e-5 for BLIP text queries (spec §1.4)
    weight_decay: float = 1e-4
    hparams: dict[str, Any] = field(default_factory=dict)
    include_final_ln: bool = False
    on_nonfinite: str = "skip"
    out: str | None = None
    resume: bool = False
    overwrite: bool = False
    cache_dir: str | None = None
    num_workers: int | None = None  # None: chosen per stream (engine.stream.auto_workers)
    device: str = "cpu"
    max_queries: int | None = None
    shuffle: bool = True
    skip_bad_images: bool = False
    eval_clean_after: bool = False  # forgetting: clean queries with the adapted vs the source parameters
    max_words: int = 30
    gallery_batch_size: int = 256
    progress: bool = True
    precision: str = "fp32"  # query tower forward: fp32, bf16 or fp16 (autocast; loss and statistics in fp32)
    gallery_index: str = "exact"  # candidate search: exact | faiss-flat | faiss-hnsw | faiss-ivf[:key=value,...]

    def __post_init__(self):
        if self.direction not in ("i2t", "t2i"):
            raise ValueError(f"direction must be 'i2t' or 't2i', got {self.direction!r}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.precision not in ("fp32", "bf16", "fp16"):
            raise ValueError(f"precision must be fp32, bf16 or fp16, got {self.precision!r}")
        parse_index_spec(self.gallery_index)  # a clear error for an unknown index kind or parameter

    @classmethod
    def from_dict(cls, values: dict[str, Any], source: str = "config") -> RunConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"{source}: unknown key(s) {unknown}; known keys: {sorted(known)}")
        return cls(**values)

    def resolved_lr(self) -> float:
        if self.lr is not None:
            return float(self.lr)
        return 3e-5 if self.model.startswith("hf-blip") and self.direction == "t2i" else 3e-4

    def adapt_config(self) -> methods.AdaptConfig:
        return methods.AdaptConfig(
            steps=self.steps, record=self.record, optimizer=self.optimizer, lr=self.resolved_lr(),
            weight_decay=self.weight_decay, include_final_ln=self.include_final_ln,
            on_nonfinite=self.on_nonfinite, hparams=dict(self.hparams), precision=self.precision,
        )


def settings_changed(saved: dict[str, Any], cfg: RunConfig) -> list[str]:
    """Descriptions of the settings that differ between a saved run's config and ``cfg``."""
    current = dataclasses.asdict(cfg)
    return [f"{k} {saved.get(k)!r} -> {current[k]!r}" for k in current
            if k not in RESUME_FREE and saved.get(k) != current[k]]
