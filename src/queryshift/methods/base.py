"""The one small base class every test-time adaptation method subclasses.

A method gets the query-tower model, the fixed gallery embeddings and the query modality. The engine
calls :meth:`Method.step` once per query batch and ranks the scores it returns; it knows nothing about
any specific method. A subclass implements :meth:`forward_and_adapt` (one forward, loss, update) and, if
it has state besides the adapted parameters (a queue, an EMA), lists it in ``state_attrs``.
"""

from __future__ import annotations

import copy
import math
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from .. import distributed
from ..models.base import DualEncoder
from .components import one_thread
from .hparams import HP, validate_hparams


class NonFiniteLossError(FloatingPointError):
    pass


# --precision -> autocast dtype of the query tower's forward (None: plain fp32)
AUTOCAST = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class AdaptConfig:
    """Protocol settings shared by all methods. Defaults follow the TCR code."""

    steps: int = 3  # optimisation steps per query batch
    record: str = "last"  # which step's forward gives the recorded scores: "first" or "last"
    optimizer: str = "adamw"  # "adamw" | "adam" | "sgd"
    lr: float = 3e-4
    weight_decay: float = 1e-4
    momentum: float = 0.9  # sgd only
    include_final_ln: bool = False  # CLIP text: also adapt ln_final (excluded by the TCR code)
    on_nonfinite: str = "skip"  # a NaN/inf loss: "skip" the update (logged) or "raise"
    hparams: dict[str, Any] = field(default_factory=dict)  # method-specific overrides of ``defaults``
    precision: str = "fp32"  # the query tower's forward: "fp32", or autocast to "bf16" / "fp16"

    def __post_init__(self):
        if self.record not in ("first", "last"):
            raise ValueError(f"record must be 'first' or 'last', got {self.record!r}")
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")
        if self.precision not in AUTOCAST:
            raise ValueError(f"precision must be one of {', '.join(AUTOCAST)}, got {self.precision!r}")
        if self.on_nonfinite not in ("skip", "raise"):
            raise ValueError(f"on_nonfinite must be 'skip' or 'raise', got {self.on_nonfinite!r}")


class Method:
    name: ClassVar[str] = "base"
    #: method hyper-parameters and their defaults; ``AdaptConfig.hparams`` may override known keys only
    defaults: ClassVar[dict[str, Any]] = {}
    #: type and range of each hyper-parameter (``hparams.HP``), checked before a run writes anything
    hparam_spec: ClassVar[dict[str, HP]] = {}
    #: False for methods that never update parameters (source, training-free variants)
    adapts: ClassVar[bool] = True
    #: False for methods whose update cannot be split over data-parallel processes (e.g. one that re-encodes a
    #: selection of its local batch made by a mask over the global batch); the engine refuses to shard them
    shardable: ClassVar[bool] = True
    #: attributes saved in checkpoints and restored by reset() (besides parameters and optimizer)
    state_attrs: ClassVar[tuple[str, ...]] = ()

    def __init__(self, model: DualEncoder, gallery: torch.Tensor, modality: str, config: AdaptConfig | None = None):
        self.model = model
        self.gallery = gallery
        self.modality = modality
        self.config = config or AdaptConfig()
        self.hp = {**copy.deepcopy(self.defaults), **self.check_hparams(self.config.hparams)}
        self.steps = self.config.steps if self.adapts else 1
        self.generator = torch.Generator().manual_seed(0)
        self.batch_index = 0
        self.configure_model()
        self.named_params = self.collect_params() if self.adapts else []
        self.params = [p for _, p in self.named_params]
        self.optimizer = self.build_optimizer() if self.params else None
        self.init_state()
        self._snapshot = self._capture()

    @classmethod
    def check_hparams(cls, hparams: dict[str, Any]) -> dict[str, Any]:
        """``hparams`` converted to the declared types; ValueError for unknown keys or values out of range."""
        return validate_hparams(cls, hparams)

    # -- hooks for subclasses --------------------------------------------------------------------

    def configure_model(self) -> None:
        """Freeze everything, then unfreeze the query tower's LayerNorm affine parameters.

        The model stays in eval mode: dropout and drop-path are off during adaptation.
        """
        self.model.eval()
        self.model.requires_grad_(False)
        if self.adapts:
            for _, p in self.model.adaptable_parameters(self.modality, self.config.include_final_ln):
                p.requires_grad_(True)

    def collect_params(self) -> list[tuple[str, torch.nn.Parameter]]:
        return self.model.adaptable_parameters(self.modality, self.config.include_final_ln)

    def init_state(self) -> None:
        """Create the method's own state (queue, EMA, ...). Called at construction and by reset()."""

    def forward_and_adapt(self, query_batch: Any, step: int) -> tuple[torch.Tensor, dict[str, Any]]:
        """One forward pass, loss and update. Return (scores B x N, log values) of that forward."""
        raise NotImplementedError

    # -- engine API --------------------------------------------------------------------------------

    def step(self, query_batch: Any) -> tuple[torch.Tensor, dict[str, Any]]:
        """Adapt on one query batch for ``steps`` iterations; return the recorded scores and a log dict.

        The log is the info dict of the **last** step only (a key a method logs at step 0 but not at the
        last step, such as ``skipped`` or ``grad_angle``, does not leak into the batch's log). For adapting
        methods it also holds ``skipped_steps``: how many of the batch's steps skipped their update. So a
        batch log has ``skipped`` exactly when its last step's update was skipped, which is what the run's
        ``skipped_updates`` (the number of batch logs with ``skipped``) counts.
        """
        recorded, log, skipped = None, {}, 0
        for s in range(self.steps):
            scores, info = self.forward_and_adapt(query_batch, s)
            if s == 0 or self.config.record == "last":
                recorded = scores.detach()
            log = dict(info)
            skipped += "skipped" in info
        if self.adapts:
            log["skipped_steps"] = skipped
        self.batch_index += 1
        return recorded, log

    def reset(self) -> None:
        """Back to the state of a newly constructed method: the source parameters, a fresh optimizer state, the
        method's initial state and stream position 0 (so a warm-up, such as a source-like queue's, starts again).
        After ``reset()`` the method gives exactly the scores and logs a new instance gives on the same batches."""
        self._restore(self._snapshot)

    def restore_source(self) -> None:
        """The source parameters and a fresh optimizer state only; the method's own state (queue, EMA, ...) and
        its stream position stay. For a method's own model recovery (SAR's), which is not a :meth:`reset`."""
        with torch.no_grad():
            for n, p in self.named_params:
                p.copy_(self._snapshot["params"][n])
                p.grad = None
        if self.optimizer is not None:
            self.optimizer.load_state_dict(copy.deepcopy(self._snapshot["optimizer"]))

    # -- shared helpers ----------------------------------------------------------------------------

    def encode(self, query_batch: Any) -> torch.Tensor:
        """Query embeddings of the batch; under data-parallel adaptation, of the global batch (all ranks' shards,
        gradient flowing back to this rank's)."""
        return distributed.all_gather_with_grad(self.encode_local(query_batch))

    def encode_local(self, query_batch: Any) -> torch.Tensor:
        """Query embeddings of this rank's own rows only (no gathering: ranks may call it unevenly)."""
        dtype = AUTOCAST[self.config.precision]
        if dtype is None:
            return self.model.encode(self.modality, query_batch)
        device = next(self.model.parameters()).device.type  # mixed precision in the tower; the rest in fp32
        with torch.autocast(device_type=device, dtype=dtype):
            q = self.model.encode(self.modality, query_batch)
        return q.float()

    @torch.no_grad()
    def encode_with_source(self, query_batch: Any) -> torch.Tensor:
        """Query embeddings under the source (initial) parameters, without a second model copy."""
        with self._swapped(self._snapshot["params"]):
            return self.encode(query_batch)

    def update(self, loss: torch.Tensor | None, info: dict[str, Any] | None = None) -> bool:
        """Backward and optimizer step, unless the loss is missing, has no graph or is not finite.

        This is the single guard that keeps NaN out of every optimizer. Returns whether it stepped.
        """
        if info is None:
            info = {}
        if loss is None or not loss.requires_grad:
            info["skipped"] = "empty"
            return False
        value = float(loss.detach())
        info["loss"] = value
        if not math.isfinite(value):
            if self.config.on_nonfinite == "raise":
                raise NonFiniteLossError(f"{self.name}: loss is {value} at batch {self.batch_index}")
            info["skipped"] = "nonfinite"
            self.optimizer.zero_grad(set_to_none=True)
            return False
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        distributed.average_gradients(self.params)  # identity in one process
        grads = [p.grad for p in self.params if p.grad is not None]
        with one_thread():  # parameter-sized ops: see components.one_thread
            # one stacked check, read once (not one device sync per parameter tensor)
            finite = not grads or bool(torch.stack([torch.isfinite(g).all() for g in grads]).all())
            if finite:
                self.optimizer.step()
        if not finite:
            if self.config.on_nonfinite == "raise":
                raise NonFiniteLossError(f"{self.name}: non-finite gradient at batch {self.batch_index}")
            info["skipped"] = "nonfinite-grad"
            self.optimizer.zero_grad(set_to_none=True)
            return False
        return True

    def build_optimizer(self) -> torch.optim.Optimizer:
        c = self.config
        if c.optimizer == "adamw":
            return torch.optim.AdamW(self.params, lr=c.lr, weight_decay=c.weight_decay)
        if c.optimizer == "adam":
            return torch.optim.Adam(self.params, lr=c.lr, weight_decay=c.weight_decay)
        if c.optimizer == "sgd":
            return torch.optim.SGD(self.params, lr=c.lr, momentum=c.momentum, weight_decay=c.weight_decay)
        raise ValueError(f"unknown optimizer {c.optimizer!r}; expected adamw, adam or sgd")

    # -- snapshot, reset and checkpoints ----------------------------------------------------------

    def _capture(self) -> dict[str, Any]:
        return {
            "params": {n: p.detach().clone() for n, p in self.named_params},
            "optimizer": copy.deepcopy(self.optimizer.state_dict()) if self.optimizer else None,
            "extra": {a: copy.deepcopy(getattr(self, a)) for a in self.state_attrs},
            "generator": self.generator.get_state(),
            "batch_index": self.batch_index,
        }

    def _restore(self, state: dict[str, Any]) -> None:
        """Every piece of state back to ``state`` (a :meth:`_capture`): parameters, optimizer, ``state_attrs``,
        generator and stream position. ``init_state()`` runs first, so whatever a method keeps outside
        ``state_attrs`` (caches keyed by the stream position) starts afresh instead of surviving the restore."""
        self.init_state()
        with torch.no_grad():
            for n, p in self.named_params:
                p.copy_(state["params"][n])
                p.grad = None
        if self.optimizer is not None:
            self.optimizer.load_state_dict(copy.deepcopy(state["optimizer"]))
        for a in self.state_attrs:
            setattr(self, a, copy.deepcopy(state["extra"][a]))
        self.generator.set_state(state["generator"])
        self.batch_index = state["batch_index"]

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue the stream exactly (for --resume)."""
        return self._capture()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._restore(state)

    @contextmanager
    def _swapped(self, values: dict[str, torch.Tensor]):
        with one_thread():
            saved = {n: p.detach().clone() for n, p in self.named_params}
        try:
            with torch.no_grad(), one_thread():
                for n, p in self.named_params:
                    p.copy_(values[n])
            yield
        finally:
            with torch.no_grad(), one_thread():
                for n, p in self.named_params:
                    p.copy_(saved[n])
