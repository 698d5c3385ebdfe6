"""An output directory of one run: ``log.jsonl`` (a line per batch), the checkpoint ``state.pt`` and the
results. Every batch is logged and checkpointed, so a killed run keeps its results and a resumed run
continues to the same final metrics as an uninterrupted one."""

from __future__ import annotations

import json
import os
from typing import Any

import torch

from .config import RunConfig, settings_changed
from .report import write_json


def atomic_save(obj, path: str) -> None:
    tmp = f"{path}.tmp"
    torch.save(obj, tmp)
    os.replace(tmp, path)


def read_log(path: str, upto_batch: int) -> list[dict]:
    """Log lines of batches < upto_batch (lines past the last checkpoint are dropped on resume)."""
    rows = []
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            for line in f:
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:  # a line cut by a kill mid-write
                    break
                if row["batch"] < upto_batch:
                    rows.append(row)
    return rows


def check_resumable(saved: dict, cfg: RunConfig) -> None:
    diff = settings_changed(saved, cfg)
    if diff:
        raise ValueError("cannot resume: the run's settings changed: " + ", ".join(diff))


class RunDir:
    """Prepares ``out`` for a new, resumed or overwritten run and writes into it."""

    def __init__(self, out: str, resume: bool = False, overwrite: bool = False):
        self.out, self.resume = out, resume
        os.makedirs(out, exist_ok=True)
        self.log_path = os.path.join(out, "log.jsonl")
        self.state_path = os.path.join(out, "state.pt")
        self.result_path = os.path.join(out, "result.json")
        if os.path.exists(self.log_path) and not (resume or overwrite):
            raise FileExistsError(f"{out} already holds a run (log.jsonl); pass --resume to continue it or "
                                  f"--overwrite to start again")
        if overwrite and not resume:
            for p in (self.log_path, self.state_path, self.result_path):
                if os.path.exists(p):
                    os.remove(p)
        self._log = None

    def restore(self, cfg: RunConfig, weights: str) -> tuple[dict[str, Any] | None, list[dict]]:
        """With --resume and a checkpoint: (method state, logged rows so far); otherwise (None, [])."""
        if self.resume and os.path.exists(self.state_path):
            state = torch.load(self.state_path, map_location=cfg.device, weights_only=False)
            check_resumable(state["config"], cfg)
            if state.get("model_weights", weights) != weights:
                raise ValueError(f"cannot resume {self.out}: the weights of {cfg.model} changed since the run "
                                 f"started")
            done = state["batches_done"]
            rows = read_log(self.log_path, done)
            if len(rows) != done:
                raise RuntimeError(f"{self.log_path} holds {len(rows)} complete batches but the checkpoint "
                                   f"says {done}")
            with open(self.log_path, "w", encoding="utf-8") as f:  # drop lines written after the checkpoint
                f.writelines(json.dumps(r) + "\n" for r in rows)
            return state["method"], rows
        if os.path.exists(self.log_path):
            os.remove(self.log_path)  # --resume without a checkpoint: nothing to continue from, start clean
        return None, []

    def append(self, row: dict[str, Any], checkpoint: dict[str, Any]) -> None:
        """Log one batch durably, then checkpoint the state after it."""
        if self._log is None:
            self._log = open(self.log_path, "a", encoding="utf-8")
        self._log.write(json.dumps(row) + "\n")
        self._log.flush()
        os.fsync(self._log.fileno())
        atomic_save(checkpoint, self.state_path)

    def close(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None

    def write_result(self, result: dict[str, Any], table: str) -> None:
        write_json(self.result_path, result)
        with open(os.path.join(self.out, "table.md"), "w", encoding="utf-8") as f:
            f.write(table + "\n")
