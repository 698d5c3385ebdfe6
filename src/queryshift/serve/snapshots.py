"""Atomic snapshots of the adapted state in ``--state-dir``.

A snapshot is written to a fresh temporary file in the same directory (never an existing name, so a link
planted there is not written through), flushed to disk (fsync), then renamed over ``snapshot.pt``
(``os.replace`` is atomic) and the directory entry is flushed too. A ``kill -9`` at any moment therefore
leaves either the previous snapshot or the new one, never a partial file; a stale temporary file from such a
kill is removed at the next start (the directory is locked by one server at a time, see
:meth:`OnlineService.__init__`).

A snapshot holds tensors and plain values only and is read with ``weights_only``
(:mod:`queryshift.plainstate`): a planted pickle is refused, never run. It records the digest of the source
weights it was adapted from, the method, and the identity of the setup (the gallery's content fingerprint
and the adaptation settings); it is refused for any other.
"""

from __future__ import annotations

import glob
import os
import time
from typing import Any

import torch

from .. import plainstate
from ..atomic import atomic_file

FORMAT = 2  # 1: pickled method objects (refused now: it could carry code)
NAME = "snapshot.pt"


class SnapshotError(ValueError):
    pass


def snapshot_path(state_dir: str) -> str:
    return os.path.join(state_dir, NAME)


def remove_stale(state_dir: str) -> list[str]:
    """Delete temporary files left by a writer that was killed; returns their paths."""
    stale = glob.glob(os.path.join(state_dir, f".{NAME}.*.tmp"))
    for path in stale:
        os.remove(path)  # a link is removed itself, its target is untouched
    return stale


def save(state_dir: str, state: dict[str, Any]) -> str:
    os.makedirs(state_dir, exist_ok=True)
    path = snapshot_path(state_dir)
    plain = plainstate.to_plain({"format": FORMAT, "time": time.time(), **state})
    with atomic_file(path, "wb", fsync=True) as f:
        torch.save(plain, f)
    fd = os.open(state_dir, os.O_RDONLY)
    try:
        os.fsync(fd)  # the rename itself survives a power loss
    finally:
        os.close(fd)
    return path


def identity_changes(saved: dict[str, Any] | None, now: dict[str, Any]) -> list[str]:
    """What differs between the setup a snapshot was made for and this server's (``key before -> now``)."""
    saved = saved if isinstance(saved, dict) else {}
    return [f"{key} {saved.get(key)!r} -> {now[key]!r}" for key in now if saved.get(key) != now[key]]


def load(state_dir: str, weights: str, method: str, identity: dict[str, Any] | None = None) -> dict[str, Any] | None:
    """The snapshot in ``state_dir`` (None when there is none), checked against the source weights, the
    method and (when given) the identity of the setup (:meth:`OnlineService.identity`)."""
    path = snapshot_path(state_dir)
    if not os.path.lexists(path):
        return None
    try:
        state = plainstate.load(path)
    except plainstate.UnsafeStateError as err:
        raise SnapshotError(f"{err}; move it away to start from the source parameters") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise SnapshotError(f"{path} is not a queryshift serve snapshot of format {FORMAT}; move it away to start "
                            f"from the source parameters")
    if state.get("weights") != weights:
        raise SnapshotError(
            f"{path} was adapted from source weights {state.get('weights')} (model {state.get('model')!r}); "
            f"this server's model has weights {weights}: use another --state-dir or move the snapshot away")
    if state.get("method") != method:
        raise SnapshotError(f"{path} holds the state of method {state.get('method')!r}, this server runs "
                            f"{method!r}: use another --state-dir or the same --method")
    changes = identity_changes(state.get("identity"), identity) if identity is not None else []
    if changes:
        raise SnapshotError(f"{path} was made for another setup ({'; '.join(changes)}): restoring it would adapt "
                            f"from a state that does not belong to this gallery and these settings; use another "
                            f"--state-dir, the same settings, or move the snapshot away")
    return state
