"""The settings of one server (``queryshift serve`` options use these names)."""

from __future__ import annotations

import dataclasses
import ipaddress
from dataclasses import dataclass, field
from typing import Any

from .. import methods, modalities, models

# what a lane can serve: every registered modality but the composed one (a composed query is two inputs)
QUERY_MODALITIES = tuple(m for m in modalities.MODALITIES if m != modalities.COMPOSED)


@dataclass
class ServeConfig:
    model: str = "shapes-clip"
    data: str = "shapes"  # the gallery dataset: its items of the model's other tower answer each lane's queries
    image_root: str | None = None
    method: str = "rest"
    # query modalities served (one adaptation lane each): towers of the model, e.g. ("video", "audio")
    modalities: tuple[str, ...] = ("image", "text")
    seed: int = 42
    # the adaptation protocol of each update (as ``queryshift run``)
    steps: int = 3
    optimizer: str = "adamw"
    lr: float | None = None  # None: 3e-4, or 3e-5 for BLIP text queries (as RunConfig)
    weight_decay: float = 1e-4
    hparams: dict[str, Any] = field(default_factory=dict)
    # online adaptation
    adapt: bool = True  # False: answer with the source parameters only, no worker
    micro_batch: int = 16  # new queries that trigger an update
    adapt_batch: int = 64  # queries per update: the new ones and the most recent older ones of the bank
    max_wait: float = 2.0  # seconds a query waits at most before an update starts with fewer new queries
    bank_size: int = 256  # recent query inputs kept per lane
    max_update_rate: float = 4.0  # updates per second at most (all lanes together)
    # collapse guard: an update whose diagnostics pass these is undone by a reset to source
    min_uniformity_ratio: float = 0.3  # spread of the batch's embeddings / spread under the source parameters
    max_entropy_frac: float = 0.95  # mean prediction entropy over the gallery / ln(gallery size)
    guard_tau: float = 0.01  # temperature of the guard's gallery predictions
    # durability
    state_dir: str | None = None
    snapshot_every: int = 10  # updates between snapshots (0: only on shutdown and POST /snapshot)
    # serving
    host: str = "127.0.0.1"
    port: int = 8000
    token: str | None = None  # bearer token of POST /reset and /snapshot
    max_k: int = 100
    max_text_chars: int = 1000
    max_image_bytes: int = 8 * 1024 * 1024
    max_image_pixels: int = 40_000_000
    max_body_bytes: int = 12 * 1024 * 1024  # base64 makes an image ~4/3 larger
    max_media_bytes: int = 8 * 1024 * 1024  # an audio or video file
    max_media_seconds: float = 60.0  # an audio query's duration
    max_media_frames: int = 1800  # a video query's frames
    history: int = 500  # diagnostics points kept for /stats and the page's plot
    cache_dir: str | None = None
    max_words: int = 30
    device: str = "cpu"
    progress: bool = True

    def __post_init__(self):
        self.modalities = tuple(self.modalities)
        bad = [m for m in self.modalities if m not in QUERY_MODALITIES]
        if bad or not self.modalities or len(set(self.modalities)) != len(self.modalities):
            raise ValueError(f"modalities must be some of {', '.join(QUERY_MODALITIES)} (each once), got "
                             f"{list(self.modalities)}")
        methods.get(self.method)  # an unknown method fails here, with the list of known ones
        positive = {"micro_batch": self.micro_batch, "adapt_batch": self.adapt_batch, "bank_size": self.bank_size,
                    "steps": self.steps, "max_k": self.max_k, "max_text_chars": self.max_text_chars,
                    "max_image_bytes": self.max_image_bytes, "max_image_pixels": self.max_image_pixels,
                    "max_body_bytes": self.max_body_bytes, "history": self.history,
                    "max_media_bytes": self.max_media_bytes, "max_media_frames": self.max_media_frames}
        for name, value in positive.items():
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if self.adapt_batch < self.micro_batch:
            raise ValueError(f"adapt_batch ({self.adapt_batch}) must be >= micro_batch ({self.micro_batch})")
        if self.bank_size < self.adapt_batch:
            raise ValueError(f"bank_size ({self.bank_size}) must be >= adapt_batch ({self.adapt_batch})")
        if not self.max_media_seconds > 0:
            raise ValueError(f"max_media_seconds must be > 0, got {self.max_media_seconds}")
        if self.max_wait < 0 or self.max_update_rate <= 0:
            raise ValueError(f"max_wait must be >= 0 and max_update_rate > 0, got {self.max_wait}, "
                             f"{self.max_update_rate}")
        if self.state_dir is not None and not str(self.state_dir).strip():
            raise ValueError("state_dir (--state-dir) is empty; give a folder, or leave it out for no snapshots")
        if self.snapshot_every < 0:
            raise ValueError(f"snapshot_every must be >= 0, got {self.snapshot_every}")
        if not 0 < self.port < 65536:
            raise ValueError(f"port must be in 1..65535, got {self.port}")

    def resolved_lr(self, modality: str) -> float:
        if self.lr is not None:
            return float(self.lr)
        return models.protocol_lr(self.model, modality == "text", self.method)

    def adapt_config(self, modality: str) -> methods.AdaptConfig:
        return methods.AdaptConfig(steps=self.steps, optimizer=self.optimizer, lr=self.resolved_lr(modality),
                                   weight_decay=self.weight_decay, hparams=dict(self.hparams))

    def loopback(self) -> bool:
        """Whether the server listens on this machine only (``localhost`` or a loopback address)."""
        if self.host == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return False

    def public(self) -> dict[str, Any]:
        """The settings without the token (for /stats and snapshots)."""
        values = dataclasses.asdict(self)
        values["token"] = "set" if self.token else None
        return values
