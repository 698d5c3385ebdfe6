"""The settings of one online adaptation run (``queryshift run`` options and YAML config keys)."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from .. import methods, modalities, models
from .gallery_index import parse_spec as parse_index_spec

RESULT_KEYS = ("r1", "r5", "r10", "r_mean", "map")
# <query>2<gallery> over the registered modalities (i t a v; c2i: composed queries, a reference image and a
# modification text, against images); which of them a run may take depends on its model's towers
DIRECTIONS = modalities.ALL_DIRECTIONS

# Fields that may differ between an interrupted run and its resumption (or a reused finished run).
RESUME_FREE = frozenset({"out", "resume", "overwrite", "num_workers", "progress", "cache_dir", "device",
                         "gallery_index"})


@dataclass
class RunConfig:
    """One online adaptation run. YAML config keys and ``queryshift run`` options use these names."""

    model: str = "shapes-clip"
    data: str = "shapes"
    image_root: str | None = None
    direction: str = "i2t"  # <query>2<gallery>: i2t, t2i, c2i (composed), v2a, a2v, a2t, ... (the model's towers)
    composer: str | None = None  # c2i: sum, combiner:<file> or a shipped combiner (default: the model's, else sum)
    method: str = "source"
    # query-side shift, e.g. gaussian_noise:5, RandomCharAug_swap:7, stream:temporal; a shift of the gallery's
    # modality only (traffic:5 in v2a) shifts the gallery items instead (engine.gallery.resolve_shift)
    shift: str | None = None
    batch_size: int = 64
    seed: int = 42
    steps: int = 3
    record: str = "last"  # scores of the first or the last step's forward
    optimizer: str = "adamw"
    lr: float | None = None  # None: the backbone's protocol rate (models.protocol_lr), recorded when the run starts
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
    eval_general_after: bool = False  # the same on each general-domain (test) style of the query modality
    max_words: int = 30
    gallery_batch_size: int = 256
    progress: bool = True
    precision: str = "fp32"  # query tower forward: fp32, bf16 or fp16 (autocast; loss and statistics in fp32)
    gallery_index: str = "exact"  # candidate search: exact | faiss-flat | faiss-hnsw | faiss-ivf[:key=value,...]
    # intra-op CPU threads of the run's numerics: the thread count changes the order of sums, so it is a setting
    # (recorded with the run), not whatever the process started with; runs saved before it existed count as 1
    threads: int = 1

    def __post_init__(self):
        for f in dataclasses.fields(self):  # "" would act as unset: --out "" wrote nothing, --shift "" ran clean
            value = getattr(self, f.name)
            if isinstance(value, str) and not value.strip():
                raise ValueError(f"{f.name} is an empty string; leave it out for the default")
        modalities.parse_direction(self.direction)  # its letters; the model's towers are checked when it loads
        if self.composer is not None and self.direction != "c2i":
            raise ValueError(f"composer {self.composer!r} applies to composed queries only (--direction c2i)")
        self._check_ranges()
        if self.eval_general_after and self.direction == "c2i":
            raise ValueError("eval_general_after measures forgetting on the image or caption styles of i2t and "
                             "t2i queries; composed queries (c2i) have no general-domain styles")
        if self.precision not in ("fp32", "bf16", "fp16"):
            raise ValueError(f"precision must be fp32, bf16 or fp16, got {self.precision!r}")
        parse_index_spec(self.gallery_index)  # a clear error for an unknown index kind or parameter
        # the method's own hyper-parameters, typed and range-checked (an unknown method fails here too)
        self.hparams = methods.get(self.method).check_hparams(self.hparams)

    def _check_ranges(self) -> None:
        """Out-of-range values would give wrong answers with exit 0 (e.g. max_queries -3 scores 5 of 8)."""
        def need(ok: bool, name: str, what: str, value) -> None:
            if not ok:
                raise ValueError(f"{name} must be {what}, got {value!r}")

        for name in ("batch_size", "steps", "max_words", "gallery_batch_size", "threads"):
            value = getattr(self, name)
            need(isinstance(value, int) and value >= 1, name, "an integer >= 1", value)
        need(self.max_queries is None or (isinstance(self.max_queries, int) and self.max_queries >= 1),
             "max_queries", "an integer >= 1 (leave it unset for every query)", self.max_queries)
        need(self.num_workers is None or (isinstance(self.num_workers, int) and self.num_workers >= 0),
             "num_workers", "an integer >= 0 (leave it unset for automatic)", self.num_workers)
        need(isinstance(self.seed, int) and 0 <= self.seed < 2**32, "seed", "an integer in [0, 2**32)", self.seed)
        need(self.lr is None or _finite(self.lr) and self.lr > 0, "lr", "a finite number > 0", self.lr)
        need(_finite(self.weight_decay) and self.weight_decay >= 0, "weight_decay", "a finite number >= 0",
             self.weight_decay)
        need(self.record in ("first", "last"), "record", "'first' or 'last'", self.record)
        need(self.optimizer in ("adamw", "adam", "sgd"), "optimizer", "'adamw', 'adam' or 'sgd'", self.optimizer)
        need(self.on_nonfinite in ("skip", "raise"), "on_nonfinite", "'skip' or 'raise'", self.on_nonfinite)
        if (self.resume or self.overwrite) and not self.out:
            raise ValueError(f"--{'resume' if self.resume else 'overwrite'} applies to an output directory: "
                             f"give --out")

    @property
    def query_modality(self) -> str:
        return modalities.parse_direction(self.direction)[0]

    @property
    def gallery_modality(self) -> str:
        return modalities.parse_direction(self.direction)[1]

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
        return models.protocol_lr(self.model, self.direction == "t2i", self.method)

    def adapt_config(self) -> methods.AdaptConfig:
        return methods.AdaptConfig(
            steps=self.steps, record=self.record, optimizer=self.optimizer, lr=self.resolved_lr(),
            weight_decay=self.weight_decay, include_final_ln=self.include_final_ln,
            on_nonfinite=self.on_nonfinite, hparams=dict(self.hparams), precision=self.precision,
        )


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _defaults() -> dict[str, Any]:
    return {f.name: f.default_factory() if f.default is dataclasses.MISSING else f.default
            for f in dataclasses.fields(RunConfig)}


def _saved_lr(saved: dict[str, Any]) -> float:
    """The rate a saved run used: runs saved before rates were recorded (``lr: null``) ran at the protocol's
    default."""
    lr = saved.get("lr")
    if lr is None:
        lr = models.spec_default_lr(str(saved.get("model", "")), saved.get("direction") == "t2i")
    return float(lr)


def changed_keys(saved: dict[str, Any], cfg: RunConfig) -> list[str]:
    """The settings (other than ``RESUME_FREE``) in which a saved run's config differs from ``cfg``.

    A key the saved config lacks (a run from before that setting existed) counts as its default, so a new
    setting left at its default never makes finished or interrupted runs look changed. The learning rate is
    compared as resolved: a backbone's default rate can change.
    """
    current, defaults = dataclasses.asdict(cfg), _defaults()
    keys = [k for k in current if k not in RESUME_FREE | {"lr"} and saved.get(k, defaults[k]) != current[k]]
    return keys + (["lr"] if _saved_lr(saved) != cfg.resolved_lr() else [])


def settings_changed(saved: dict[str, Any], cfg: RunConfig) -> list[str]:
    """Descriptions (``key old -> new``) of the settings that differ between a saved run's config and ``cfg``."""
    old = {**_defaults(), **saved, "lr": _saved_lr(saved)}
    new = {**dataclasses.asdict(cfg), "lr": cfg.resolved_lr()}
    return [f"{k} {old[k]!r} -> {new[k]!r}" for k in changed_keys(saved, cfg)]
