"""Files written atomically: a kill or a full disk leaves the old file or the new one, never half of one.

The new content goes to a fresh temporary file next to the target, created with ``O_CREAT | O_EXCL``
(:func:`tempfile.mkstemp`), so a name planted there (a symbolic link to a file elsewhere) is never opened
and written through; the rename then replaces the target's directory entry, a link included, never the
file a link points to.
"""

from __future__ import annotations

import contextlib
import errno
import os
import tempfile
from collections.abc import Iterator
from typing import IO

import torch


def _read_umask() -> int:
    mask = os.umask(0o022)  # the only way to read it; restored at once (at import: one thread)
    os.umask(mask)
    return mask


_UMASK = _read_umask()


def _no_space(path: str) -> bool:
    try:
        return os.statvfs(os.path.dirname(os.path.abspath(path))).f_bavail == 0
    except OSError:
        return False


@contextlib.contextmanager
def atomic_file(path: str, mode: str = "w", fsync: bool = False) -> Iterator[IO]:
    """``with atomic_file(path, "wb") as f: ...`` writes ``f`` to a new temporary file in ``path``'s folder
    and renames it over ``path`` when the block ends without an error (``fsync``: flushed to disk first).

    The file gets the permissions a plain ``open`` would give (mkstemp's own are 0600).
    """
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_UMASK)
        with os.fdopen(fd, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as f:
            yield f
            if fsync:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def save_torch(obj, path: str, fsync: bool = False) -> None:
    """``torch.save`` through a temporary file; a failed write is an OSError naming ``path``.

    torch reports a full disk as a RuntimeError from its zip writer ("unexpected pos ..."); it becomes
    ENOSPC here so the user sees the cause, not an internal error.
    """
    try:
        with atomic_file(path, "wb", fsync) as f:
            torch.save(obj, f)
    except RuntimeError as err:
        code = errno.ENOSPC if _no_space(path) else errno.EIO
        raise OSError(code, f"{os.strerror(code)} (writing failed: {str(err).splitlines()[0]})", path) from err


def write_text(path: str, text: str) -> None:
    with atomic_file(path, "w") as f:
        f.write(text)


def open_append(path: str) -> IO[str]:
    """``path`` opened for appending text, refusing a symbolic link (a planted link is not written through)."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, 0o666)
    except OSError as err:
        if err.errno == errno.ELOOP:
            raise OSError(errno.ELOOP, "is a symbolic link; refusing to write through it", path) from None
        raise
    return os.fdopen(fd, "a", encoding="utf-8")
