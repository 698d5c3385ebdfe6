"""``OnlineService``: the gallery, one adaptation lane per query modality, search, stats, reset, snapshots.

A query of one tower searches the gallery's items of the model's other tower and adapts its own tower
(a text query searches images, an image query texts; a video query sounds, an audio query clips). Each lane
has a worker-side :class:`~queryshift.engine.Retriever` (the model the method adapts) and a memory bank of
recent query inputs; the answers come from the :class:`~.answering.AnsweringModel`. Locks, and what each one guards:

- ``answering.lock``: one request's forward, or the copy of freshly adapted parameters into it;
- ``cond``: the memory banks and the worker's wake-up (held for an append or a batch take-out);
- ``adapt_lock``: the worker-side models and method states (an update, a reset, a snapshot);
- ``stats_lock``: counters and the diagnostics history.

No request path takes ``adapt_lock``: a search never waits for an update.
"""

from __future__ import annotations

import logging
import math
import os
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import torch

from .. import modalities
from ..data import load_dataset
from ..engine import Retriever, encode_gallery, load_source, weights_digest
from ..engine.stream import collate
from ..locks import ExclusiveLock
from . import snapshots
from .answering import AnsweringModel
from .config import ServeConfig
from .guard import collapse_reason, diagnostics
from .inputs import InputError
from .worker import AdaptWorker

log = logging.getLogger("queryshift.serve")


@dataclass
class Lane:
    """Everything about the queries of one modality."""

    modality: str
    gallery_modality: str
    retriever: Retriever
    bank: deque  # recent query items (preprocessed image tensors or cleaned texts), newest last
    new: int = 0  # queries banked since the last update
    first_new_at: float | None = None
    queries: int = 0
    updates: int = 0
    skipped_updates: int = 0
    resets: int = 0
    failures: int = 0
    last: dict[str, Any] = field(default_factory=dict)  # diagnostics of the last update

    @property
    def gallery(self) -> torch.Tensor:
        return self.retriever.gallery


def gallery_modality(model, modality: str) -> str:
    """The gallery a lane of ``modality`` queries searches: the model's other tower."""
    others = [t for t in model.towers if t != modality]
    if modality not in model.towers or len(others) != 1:
        raise ValueError(f"{model.name} has the towers {', '.join(model.towers)}: it cannot serve {modality} "
                         f"queries (a lane needs the queries' tower and one other); give --modalities among "
                         f"{', '.join(model.towers)}")
    return others[0]


class OnlineService:
    def __init__(self, cfg: ServeConfig, start_worker: bool = True):
        self.cfg = cfg
        self.started = time.time()
        self.worker = None
        self._state_lock = self._lock_state_dir(cfg.state_dir) if cfg.state_dir else None
        try:
            self._build(cfg, start_worker)
        except BaseException:
            self._release_state_dir()
            raise

    @staticmethod
    def _lock_state_dir(state_dir: str) -> ExclusiveLock:
        """One server per ``--state-dir``: a second one would overwrite the first's acknowledged snapshots."""
        if os.path.lexists(state_dir) and not os.path.isdir(state_dir):
            raise ValueError(f"--state-dir {state_dir} is not a directory (a file is there); choose a folder")
        os.makedirs(state_dir, exist_ok=True)
        return ExclusiveLock(state_dir, what=f"--state-dir {state_dir}").acquire()

    def _release_state_dir(self) -> None:
        if self._state_lock is not None:
            self._state_lock.release()

    def _build(self, cfg: ServeConfig, start_worker: bool) -> None:
        self.dataset = load_dataset(cfg.data, cfg.image_root, cfg.max_words)
        model = load_source(cfg.model, cfg.seed, cfg.device)
        self.model = model
        self.weights = weights_digest(model)  # of the source parameters: snapshots must match it
        galleries = {}
        gallery_of = {m: gallery_modality(model, m) for m in cfg.modalities}
        for m in cfg.modalities:
            gm = gallery_of[m]
            galleries[m] = encode_gallery(model, self.dataset, gm, cache_dir=cfg.cache_dir, device=cfg.device,
                                          max_words=cfg.max_words, progress=cfg.progress,
                                          weights=self.weights).to(cfg.device)
        adaptable = {m: [n for n, _ in model.adaptable_parameters(m)] for m in cfg.modalities}
        self.answering = AnsweringModel(model, adaptable)  # before any method touches requires_grad
        self.lanes: dict[str, Lane] = {}
        for m in cfg.modalities:
            retriever = Retriever(model, galleries[m], m, cfg.method, cfg.adapt_config(m), cfg.device)
            self.lanes[m] = Lane(m, gallery_of[m], retriever, deque(maxlen=cfg.bank_size))
        # Each method freezes the whole model and unfreezes its own tower's LayerNorms, so building the
        # second lane froze the first one's; the lanes adapt disjoint parameters of the one shared model.
        for lane in self.lanes.values():
            for p in lane.retriever.method.params:
                p.requires_grad_(True)

        self.cond = threading.Condition()
        self.adapt_lock = threading.Lock()
        self.stats_lock = threading.Lock()
        self.history: deque = deque(maxlen=cfg.history)
        self.updates = 0
        self.manual_resets = 0
        self.snapshots = 0
        self.last_snapshot: dict[str, Any] | None = None
        self.snapshot_updates = 0  # ``updates`` when the last snapshot was written (or restored)
        self.restored_from: dict[str, Any] | None = None
        # the adapted state of lanes a snapshot holds but this server does not serve (fewer --modalities):
        # written back into every snapshot, so a restart with all modalities finds it again
        self.kept_lanes: dict[str, Any] = {}
        self.last_error: str | None = None
        self._round_robin = 0
        if cfg.state_dir:
            for path in snapshots.remove_stale(cfg.state_dir):
                log.warning("removed %s, a snapshot being written when the server was killed", path)
            self._restore()
        self.worker = AdaptWorker(self) if cfg.adapt and start_worker else None
        if self.worker:
            self.worker.start()

    # -- answering ---------------------------------------------------------------------------------

    def query_item(self, modality: str, value):
        """A cleaned text, a PIL image, a waveform or a clip -> the model-ready item the bank keeps."""
        if modality not in self.lanes:
            raise InputError(422, f"this server answers {' and '.join(self.lanes)} queries, not {modality} queries "
                                  f"(see --modalities)")
        try:
            return modalities.get(modality).prepare(self.model, value)
        except ValueError as err:  # the model's own check of a waveform or clip
            raise InputError(422, f"{modality} query: {err}") from err

    def search(self, modality: str, value, k: int = 10, adapt: bool = True) -> dict[str, Any]:
        """Top-``k`` gallery items for one query, with the parameters in force now; the query then joins
        the memory bank of its lane (unless ``adapt`` is false: source parameters, not banked)."""
        if not 1 <= k <= self.cfg.max_k:
            raise InputError(422, f"k must be in 1..{self.cfg.max_k}, got {k}")
        return self.answer(modality, self.query_item(modality, value), k, adapt)

    def answer(self, modality: str, item, k: int = 10, adapt: bool = True) -> dict[str, Any]:
        """:meth:`search` for a model-ready item (a preprocessed image tensor or a cleaned text)."""
        lane = self.lanes[modality]
        x = lane.retriever.model_input(collate([(0, 0, item)], modality)[2])
        use_adapted = adapt and self.cfg.adapt
        q, adapted = self.answering.encode(modality, x, source=not use_adapted)
        scores = (q @ lane.gallery.T)[0]
        top_scores, top_ids = scores.topk(min(k, scores.shape[0]))
        if use_adapted:
            with self.cond:
                lane.bank.append(item)
                lane.new += 1
                if lane.first_new_at is None:
                    lane.first_new_at = time.monotonic()
                self.cond.notify()
        with self.stats_lock:
            lane.queries += 1
        return {"results": [self.describe(lane, int(i), float(s)) for s, i in zip(top_scores, top_ids)],
                "adapted": adapted}

    def describe(self, lane: Lane, index: int, score: float) -> dict[str, Any]:
        gm = lane.gallery_modality
        if gm == "text":
            return {"id": index, "score": round(score, 6), "text": self.dataset.load("text", index)}
        if gm == "image":
            return {"id": index, "score": round(score, 6), "image": f"/gallery/image/{index}"}
        return {"id": index, "score": round(score, 6), gm: self.dataset.items[gm][index]}  # the clip's name

    # -- the worker's side -------------------------------------------------------------------------

    def _ready(self, now: float) -> Lane | None:
        lanes = list(self.lanes.values())
        for i in range(len(lanes)):
            lane = lanes[(self._round_robin + i) % len(lanes)]
            if lane.new >= self.cfg.micro_batch or (lane.new and now - lane.first_new_at >= self.cfg.max_wait):
                self._round_robin = (self._round_robin + i + 1) % len(lanes)
                return lane
        return None

    def _take(self, lane: Lane) -> list:
        lane.new, lane.first_new_at = 0, None
        return list(lane.bank)[-self.cfg.adapt_batch:]

    def wait_for_work(self, stopping: threading.Event):
        """Block until a lane is ready -> (lane, its micro-batch items), or None once ``stopping`` is set."""
        with self.cond:
            while not stopping.is_set():
                now = time.monotonic()
                lane = self._ready(now)
                if lane is not None:
                    return lane, self._take(lane)
                waits = [lane.first_new_at + self.cfg.max_wait - now for lane in self.lanes.values() if lane.new]
                self.cond.wait(max(0.0, min(waits)) if waits else None)
        return None

    def wake(self) -> None:
        with self.cond:
            self.cond.notify_all()

    def run_pending(self) -> bool:
        """Run one update now if a lane has ``micro_batch`` new queries (no waiting); whether it ran.
        For callers without the worker thread (the micro-batch benchmark, tests)."""
        with self.cond:
            lane = next((la for la in self.lanes.values() if la.new >= self.cfg.micro_batch), None)
            items = self._take(lane) if lane else None
        if lane is None:
            return False
        self.update(lane, items)
        return True

    def update(self, lane: Lane, items: list) -> dict[str, Any]:
        """One adaptation round on ``items``; the result answers requests only if it passes the guard."""
        retriever = lane.retriever
        with self.adapt_lock:
            t0 = time.monotonic()
            x = retriever.model_input(collate([(0, 0, it) for it in items], lane.modality)[2])
            _, info = retriever.adapt(x)
            q_new, q_src = retriever.encode(x), retriever.encode(x, source=True)
            finite = all(bool(torch.isfinite(p).all()) for p in retriever.method.params)
            d_new = diagnostics(q_new, lane.gallery, self.cfg.guard_tau)
            d_src = diagnostics(q_src, lane.gallery, self.cfg.guard_tau)
            reason = collapse_reason(d_new, d_src, lane.gallery.shape[0], finite, self.cfg)
            if reason:
                retriever.reset()
                self.answering.publish_source(lane.modality)
                log.warning("%s lane: collapse (%s): reset to the source parameters", lane.modality, reason)
            elif retriever.method.params:
                self.answering.publish(lane.modality, retriever.adapted_parameters())
            point = {"update": self.updates + 1, "time": round(time.time(), 3), "lane": lane.modality,
                     "batch": len(items), **{k: round(v, 6) for k, v in d_new.items()},
                     "seconds": round(time.monotonic() - t0, 4)}
            for key in ("loss", "grad_angle", "n_selected", "skipped"):
                if key in info and (not isinstance(info[key], float) or math.isfinite(info[key])):
                    point[key] = info[key]
            if reason:
                point["reset"] = reason
            with self.stats_lock:
                self.updates += 1
                lane.updates += 1
                lane.skipped_updates += "skipped" in info
                lane.resets += bool(reason)
                lane.last = point
                self.history.append(point)
            if self.cfg.state_dir and self.cfg.snapshot_every and self.updates % self.cfg.snapshot_every == 0:
                self._save()
        return point

    def count_failure(self, lane: Lane, error: str) -> None:
        with self.stats_lock:
            lane.failures += 1
            self.last_error = error

    # -- admin: reset, snapshots -------------------------------------------------------------------

    def reset(self) -> dict[str, Any]:
        """Every lane back to the source parameters, a fresh method state and an empty bank."""
        with self.adapt_lock:
            with self.cond:
                for lane in self.lanes.values():
                    lane.bank.clear()
                    lane.new, lane.first_new_at = 0, None
            for lane in self.lanes.values():
                lane.retriever.reset()
                self.answering.publish_source(lane.modality)
            self.kept_lanes = {}  # a reset is of every lane, the ones not served now too
            with self.stats_lock:
                self.manual_resets += 1
            if self.cfg.state_dir:  # a restart must not bring back what was just reset
                self._save()
        return {"reset": True, "updates": self.updates}

    def snapshot(self) -> dict[str, Any]:
        if not self.cfg.state_dir:
            raise InputError(409, "this server has no --state-dir to write snapshots to")
        with self.adapt_lock:
            return self._save()

    def identity(self) -> dict[str, Any]:
        """What a snapshot must have been made for to be restored here: the gallery's content and the settings
        the adapted state depends on (the source weights and the method are checked on their own)."""
        cfg = self.cfg
        return {"gallery": self.dataset.fingerprint(), "data": cfg.data, "model": cfg.model, "steps": cfg.steps,
                "optimizer": cfg.optimizer, "lr": cfg.lr, "weight_decay": cfg.weight_decay,
                "hparams": dict(cfg.hparams), "max_words": cfg.max_words}

    def _state(self) -> dict[str, Any]:
        served = {m: {"method": lane.retriever.state_dict(), "queries": lane.queries, "updates": lane.updates,
                      "skipped_updates": lane.skipped_updates, "resets": lane.resets}
                  for m, lane in self.lanes.items()}
        return {
            "weights": self.weights, "model": self.cfg.model, "method": self.cfg.method, "data": self.cfg.data,
            "identity": self.identity(), "config": self.cfg.public(), "updates": self.updates,
            "manual_resets": self.manual_resets, "lanes": {**self.kept_lanes, **served},
        }

    def _save(self) -> dict[str, Any]:
        """Write a snapshot (the caller holds ``adapt_lock``)."""
        path = snapshots.save(self.cfg.state_dir, self._state())
        with self.stats_lock:
            self.snapshots += 1
            self.snapshot_updates = self.updates
            self.last_snapshot = {"path": path, "updates": self.updates, "time": round(time.time(), 3)}
        return dict(self.last_snapshot)

    def _restore(self) -> None:
        state = snapshots.load(self.cfg.state_dir, self.weights, self.cfg.method, self.identity())
        if state is None:
            return
        for m, saved in state["lanes"].items():
            lane = self.lanes.get(m)
            if lane is None:
                self.kept_lanes[m] = saved
                log.info("%s lane: not served now (--modalities); its adapted state is kept in the snapshots", m)
                continue
            lane.retriever.load_state_dict(saved["method"])
            if lane.retriever.method.params:
                self.answering.publish(m, lane.retriever.adapted_parameters())
            lane.queries, lane.updates = saved["queries"], saved["updates"]
            lane.skipped_updates, lane.resets = saved["skipped_updates"], saved["resets"]
        self.updates = self.snapshot_updates = state["updates"]
        self.manual_resets = state["manual_resets"]
        self.restored_from = {"path": snapshots.snapshot_path(self.cfg.state_dir), "updates": state["updates"],
                              "time": state["time"]}
        log.info("restored %d updates from %s", state["updates"], self.restored_from["path"])

    def close(self) -> None:
        """Stop the worker, then snapshot what was adapted since the last snapshot (shutdown, SIGTERM)."""
        if self.worker:
            self.worker.stop()
        try:
            if self.cfg.state_dir and self.updates != self.snapshot_updates:
                with self.adapt_lock:
                    self._save()
        finally:
            self._release_state_dir()

    # -- stats -------------------------------------------------------------------------------------

    def stats(self, history: int | None = None) -> dict[str, Any]:
        with self.stats_lock:
            lanes = {m: {"queries": la.queries, "updates": la.updates, "skipped_updates": la.skipped_updates,
                         "resets": la.resets, "failures": la.failures, "bank": len(la.bank), "pending": la.new,
                         "adapted": self.answering.adapted[m], "gallery": la.gallery.shape[0],
                         "gallery_modality": la.gallery_modality, "diagnostics": dict(la.last)}
                     for m, la in self.lanes.items()}
            points = list(self.history)
            return {
                "queries": sum(la["queries"] for la in lanes.values()),
                "updates": self.updates,
                "skipped_updates": sum(la["skipped_updates"] for la in lanes.values()),
                "resets": sum(la["resets"] for la in lanes.values()),
                "manual_resets": self.manual_resets,
                "failures": sum(la["failures"] for la in lanes.values()),
                "snapshots": self.snapshots,
                "last_snapshot": self.last_snapshot,
                "restored_from": self.restored_from,
                "adapting": self.cfg.adapt,
                "method": self.cfg.method, "model": self.cfg.model, "data": self.cfg.data, "weights": self.weights,
                "lanes": lanes,
                "diagnostics": dict(points[-1]) if points else {},
                "history": points[-history:] if history else points,
                "last_error": self.last_error,
                "uptime": round(time.time() - self.started, 1),
            }
