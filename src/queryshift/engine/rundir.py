"""An output directory of one run: ``log.jsonl`` (a line per batch), the checkpoint ``state.pt`` and the
results. Every batch is logged and checkpointed, so a killed run keeps its results and a resumed run
continues to the same final metrics as an uninterrupted one.

A directory has one writer at a time (an exclusive lock, see :mod:`queryshift.locks`), and what it holds is
never lost by accident: a finished or started run is only replaced with ``--overwrite``, ``--resume``
continues only a run of the same settings, and the old files are removed only once the new run has been
checked and is about to write its first batch.

Only a run folder is used: a new or empty directory, or one a run wrote (its marker ``.queryshift-run``, or
the log, checkpoint or result of a run of an older version). Any other non-empty directory (``--out /``,
a home or a dataset folder) is refused before anything is created in it, so ``--overwrite`` only ever
removes files a run wrote. The checkpoint holds tensors and plain values only and is read with
``weights_only`` (:mod:`queryshift.plainstate`): a ``state.pt`` planted in the folder is refused, never
run. It also records a fingerprint of the data (:meth:`RetrievalDataset.fingerprint`), and ``--resume``
refuses a data file that changed since the run started.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

from .. import plainstate
from ..atomic import open_append, write_text
from ..locks import LOCK_NAME, ExclusiveLock
from ..userfiles import open_regular, parse_json
from .config import RunConfig, settings_changed
from .report import json_line, write_json


class RunDirError(ValueError):
    """An output directory that cannot be used as asked; the message says why and what to do."""


MARKER = ".queryshift-run"
RUN_FILES = ("log.jsonl", "state.pt", "result.json", "table.md")


def atomic_save(obj, path: str) -> None:
    plainstate.save(obj, path)


def _looks_like_a_run(out: str, entries: set[str]) -> bool:
    """Whether a folder without the marker holds a run of an older version (its log, result or checkpoint)."""
    if "state.pt" in entries:
        return True
    try:
        if "log.jsonl" in entries:
            with open_regular(os.path.join(out, "log.jsonl"), encoding="utf-8") as f:
                first = f.readline()
            if not first.strip() or isinstance(json.loads(first).get("batch"), int):
                return True
        if "result.json" in entries:
            with open_regular(os.path.join(out, "result.json"), encoding="utf-8") as f:
                return isinstance(json.load(f).get("config"), dict)
    except (OSError, ValueError, AttributeError, RecursionError):  # a pipe, deep JSON: not a run of ours
        return False
    return False


def check_run_folder(out: str) -> None:
    """Refuse an existing non-empty directory that is not a run folder (see the module's doc)."""
    if not os.path.isdir(out) or os.path.islink(os.path.join(out, MARKER)):
        return
    entries = set(os.listdir(out)) - {LOCK_NAME}
    if entries and MARKER not in entries and not _looks_like_a_run(out, entries):
        shown = ", ".join(sorted(entries)[:3]) + (", ..." if len(entries) > 3 else "")
        raise RunDirError(f"--out {out} is not empty and holds no queryshift run ({len(entries)} entries: "
                          f"{shown}); choose a new or empty folder")


def data_changed(saved: dict, fingerprint: str | None, cfg: RunConfig) -> str | None:
    """Why a checkpoint's data differs from the data now (None: the same, or no fingerprint to compare)."""
    before = saved.get("data_fingerprint")
    if fingerprint is None or before is None or before == fingerprint:
        return None
    return (f"the data of --data {cfg.data} changed since the run started (fingerprint {before} -> "
            f"{fingerprint}): resuming would mix rows of both versions")


def notice(message: str) -> None:
    print(f"queryshift: {message}", file=sys.stderr)


def read_log(path: str, upto_batch: int) -> list[dict]:
    """Log lines of batches < upto_batch (lines past the last checkpoint are dropped on resume)."""
    rows = []
    if os.path.exists(path):
        with open_regular(path, encoding="utf-8", error=RunDirError) as f:
            for line in f:
                try:
                    row = parse_json(lambda line=line: json.loads(line), path, RunDirError)
                except json.JSONDecodeError:  # a line cut by a kill mid-write
                    break
                if not isinstance(row, dict) or not isinstance(row.get("batch"), int):
                    break
                if row["batch"] < upto_batch:
                    rows.append(row)
    return rows


def check_resumable(saved: dict, cfg: RunConfig, out: str = "") -> None:
    diff = settings_changed(saved, cfg)
    if diff:
        where = f" {out}" if out else ""
        raise RunDirError(f"cannot resume{where}: the run's settings changed: " + ", ".join(diff)
                          + "; choose another --out, or --overwrite to replace that run")


class RunDir:
    """Prepares ``out`` for a new, resumed or overwritten run and writes into it.

    Construction locks the directory and refuses, before any model is loaded, what would lose or mix runs;
    :meth:`restore` (once the run is ready to stream) removes what ``--overwrite`` replaces; :meth:`close`
    releases the lock.
    """

    def __init__(self, out: str, resume: bool = False, overwrite: bool = False, cfg: RunConfig | None = None):
        if resume and overwrite:
            raise RunDirError("--resume continues the run in --out and --overwrite discards it: pass only one")
        if os.path.exists(out) and not os.path.isdir(out):
            raise RunDirError(f"--out {out} is a file, not a directory")
        check_run_folder(out)  # before anything is created in it
        self.out, self.resume, self.overwrite = out, resume, overwrite
        os.makedirs(out, exist_ok=True)
        self._lock = ExclusiveLock(out, what=f"output directory {out}").acquire()
        self._log = None
        self._state: dict[str, Any] | None = None
        self._data_fingerprint: str | None = None
        self._start_over = overwrite
        self.log_path = os.path.join(out, "log.jsonl")
        self.state_path = os.path.join(out, "state.pt")
        self.result_path = os.path.join(out, "result.json")
        try:
            check_run_folder(out)  # again under the lock: another process may have filled it meanwhile
            if not os.path.lexists(os.path.join(out, MARKER)):
                write_text(os.path.join(out, MARKER), "a queryshift run folder: --overwrite replaces its "
                                                      "log.jsonl, state.pt, result.json and table.md\n")
            self._check(cfg)
        except BaseException:
            self.close()
            raise

    def _check(self, cfg: RunConfig | None) -> None:
        has_log, has_state, has_result = (os.path.lexists(p) for p in (self.log_path, self.state_path,
                                                                       self.result_path))
        if not (self.resume or self.overwrite):
            if has_log or has_result or has_state:
                held = "log.jsonl" if has_log else "result.json" if has_result else "state.pt"
                raise RunDirError(f"{self.out} already holds a run ({held}); pass --resume to continue it or "
                                  f"--overwrite to replace it")
            return
        if not self.resume:
            return
        if has_state:
            self._state = self._load_state(cfg.device if cfg else "cpu")
            if cfg is not None:
                check_resumable(self._state["config"], cfg, self.out)
        elif has_result:
            saved = self._load_result()
            diff = settings_changed(saved.get("config", {}), cfg) if cfg is not None else []
            if diff:
                raise RunDirError(f"cannot resume {self.out}: it holds a finished run with other settings ("
                                  + ", ".join(diff) + "); its results are kept: choose another --out, or "
                                  "--overwrite to replace it")
            raise RunDirError(f"{self.out} holds a finished run (result.json) but no checkpoint to continue "
                              f"from: nothing to resume, its results are kept; pass --overwrite to run it again")
        elif has_log:
            notice(f"note: {self.out} has no checkpoint (state.pt) to resume from: starting over; its "
                   f"log.jsonl is replaced")
            self._start_over = True

    def _load_state(self, device: str) -> dict[str, Any]:
        try:
            state = plainstate.load(self.state_path, map_location=device)
        except plainstate.UnsafeStateError as err:  # planted, truncated, or written by an older version
            raise RunDirError(f"{err}; pass --overwrite to start the run again") from None
        if not isinstance(state, dict) or not {"config", "method", "batches_done"} <= set(state):
            raise RunDirError(f"{self.state_path}: not a queryshift checkpoint; pass --overwrite to start again")
        return state

    def _load_result(self) -> dict[str, Any]:
        try:
            with open_regular(self.result_path, encoding="utf-8", error=RunDirError) as f:
                saved = parse_json(lambda: json.load(f), self.result_path, RunDirError)
        except RunDirError:
            raise
        except (ValueError, OSError) as err:
            raise RunDirError(f"{self.result_path}: unreadable ({err}); move it away or pass --overwrite") from err
        if not isinstance(saved, dict):
            raise RunDirError(f"{self.result_path}: not a queryshift result; move it away or pass --overwrite")
        return saved

    def restore(self, cfg: RunConfig, weights: str, data_fingerprint: str | None = None
                ) -> tuple[dict[str, Any] | None, list[dict]]:
        """With --resume and a checkpoint: (method state, logged rows so far); otherwise (None, []) after
        removing what --overwrite (or a --resume without checkpoint) replaces. ``data_fingerprint`` (of the
        dataset the run streams) is checked against the checkpoint's and written with every checkpoint."""
        self._data_fingerprint = data_fingerprint
        if self.resume and self._state is None and os.path.lexists(self.state_path):
            self._state = self._load_state(cfg.device if cfg else "cpu")  # a RunDir made without cfg
        if self._state is not None:
            state = self._state
            check_resumable(state["config"], cfg, self.out)
            changed = data_changed(state, data_fingerprint, cfg)
            if changed:
                raise RunDirError(f"cannot resume {self.out}: {changed}; restore the data, choose another --out, "
                                  f"or --overwrite to start the run again")
            if state.get("model_weights", weights) != weights:
                raise RunDirError(f"cannot resume {self.out}: the weights of {cfg.model} changed since the run "
                                  f"started")
            done = state["batches_done"]
            rows = read_log(self.log_path, done)
            if len(rows) != done:
                raise RunDirError(f"{self.log_path} holds {len(rows)} complete batches but the checkpoint "
                                  f"says {done}; pass --overwrite to start the run again")
            write_text(self.log_path, "".join(json_line(r) + "\n" for r in rows))  # drop lines past it
            return state["method"], rows
        if self._start_over:
            for name in RUN_FILES:  # a run folder's own files (check_run_folder), links themselves, not targets
                path = os.path.join(self.out, name)
                if os.path.lexists(path):
                    os.remove(path)
        return None, []

    def append(self, row: dict[str, Any], checkpoint: dict[str, Any]) -> None:
        """Log one batch durably, then checkpoint the state after it."""
        if self._log is None:
            self._log = open_append(self.log_path)
        if self._data_fingerprint is not None:
            checkpoint = {**checkpoint, "data_fingerprint": self._data_fingerprint}
        self._log.write(json_line(row) + "\n")
        self._log.flush()
        os.fsync(self._log.fileno())
        atomic_save(checkpoint, self.state_path)

    def close_log(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None

    def close(self) -> None:
        """Close the log and release the directory."""
        self.close_log()
        self._lock.release()

    def write_result(self, result: dict[str, Any], table: str) -> None:
        write_json(self.result_path, result)
        write_text(os.path.join(self.out, "table.md"), table + "\n")
