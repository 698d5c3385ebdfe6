"""Files written atomically: a kill or a full disk leaves the old file or the new one, never half of one."""

from __future__ import annotations

import errno
import os

import torch


def _cleanup(tmp: str) -> None:
    if os.path.exists(tmp):
        os.remove(tmp)


def _no_space(path: str) -> bool:
    try:
        return os.statvfs(os.path.dirname(os.path.abspath(path))).f_bavail == 0
    except OSError:
        return False


def save_torch(obj, path: str) -> None:
    """``torch.save`` through a temporary file; a failed write is an OSError naming ``path``.

    torch reports a full disk as a RuntimeError from its zip writer ("unexpected pos ..."); it becomes
    ENOSPC here so the user sees the cause, not an internal error.
    """
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    except RuntimeError as err:
        code = errno.ENOSPC if _no_space(path) else errno.EIO
        raise OSError(code, f"{os.strerror(code)} (writing failed: {str(err).splitlines()[0]})", path) from err
    finally:
        _cleanup(tmp)


def write_text(path: str, text: str) -> None:
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    finally:
        _cleanup(tmp)
