"""Atomic snapshots of the adapted state in ``--state-dir``.

A snapshot is written to a temporary file in the same directory, flushed to disk (fsync), then renamed
over ``snapshot.pt`` (``os.replace`` is atomic) and the directory entry is flushed too. A ``kill -9`` at
any moment therefore leaves either the previous snapshot or the new one, never a partial file; a stale
temporary file from such a kill is removed at the next start. A snapshot records the digest of the source
weights it was adapted from, and is refused for any other weights or method.
"""

from __future__ import annotations

import glob
import os
import time
from typing import Any

import torch

FORMAT = 1
NAME = "snapshot.pt"


class SnapshotError(ValueError):
    pass


def snapshot_path(state_dir: str) -> str:
    return os.path.join(state_dir, NAME)


def remove_stale(state_dir: str) -> list[str]:
    """Delete temporary files left by a writer that was killed; returns their paths."""
    stale = glob.glob(os.path.join(state_dir, f".{NAME}.*.tmp"))
    for path in stale:
        os.remove(path)
    return stale


def save(state_dir: str, state: dict[str, Any]) -> str:
    os.makedirs(state_dir, exist_ok=True)
    path = snapshot_path(state_dir)
    tmp = os.path.join(state_dir, f".{NAME}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            torch.save({"format": FORMAT, "time": time.time(), **state}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    fd = os.open(state_dir, os.O_RDONLY)
    try:
        os.fsync(fd)  # the rename itself survives a power loss
    finally:
        os.close(fd)
    return path


def load(state_dir: str, weights: str, method: str) -> dict[str, Any] | None:
    """The snapshot in ``state_dir`` (None when there is none), checked against the source weights."""
    path = snapshot_path(state_dir)
    if not os.path.exists(path):
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:
        raise SnapshotError(f"{path} is unreadable ({type(err).__name__}: {err}); move it away to start "
                            f"from the source parameters") from err
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise SnapshotError(f"{path} is not a queryshift serve snapshot of format {FORMAT}")
    if state.get("weights") != weights:
        raise SnapshotError(
            f"{path} was adapted from source weights {state.get('weights')} (model {state.get('model')!r}); "
            f"this server's model has weights {weights}: use another --state-dir or move the snapshot away")
    if state.get("method") != method:
        raise SnapshotError(f"{path} holds the state of method {state.get('method')!r}, this server runs "
                            f"{method!r}: use another --state-dir or the same --method")
    return state
