"""Exclusive locks on output directories and cache entries, with ``fcntl.flock``.

A run directory has one writer at a time: a second ``queryshift run`` (or ``bench`` point) on the same
``--out`` fails at once, naming the directory and the holder's pid, instead of both writing the same
checkpoint and log. The kernel drops a flock when its holder exits, even when killed, so a stale lock file
never blocks a rerun; the pid written into it is only for the message.
"""

from __future__ import annotations

import errno
import fcntl
import os

LOCK_NAME = ".queryshift.lock"


class LockedError(RuntimeError):
    """Another process holds the lock."""


class ExclusiveLock:
    """An exclusive lock on ``path``: a directory (through ``<path>/.queryshift.lock``) or a lock file.

    ``wait=False`` makes :meth:`acquire` raise :class:`LockedError` at once when another process (or another
    open of the same file in this one) holds it; ``wait=True`` blocks until it is free. ``what`` names the
    locked thing in the message (default: ``path``). Usable as a context manager.
    """

    def __init__(self, path: str, wait: bool = False, what: str | None = None):
        self.path, self.wait, self.what = path, wait, what or path
        self.lock_path = os.path.join(path, LOCK_NAME) if os.path.isdir(path) else path
        self._fd: int | None = None

    def acquire(self) -> ExclusiveLock:
        try:  # never through a link planted at the lock's name: the pid write would truncate its target
            fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
        except OSError as err:
            if err.errno == errno.ELOOP:
                raise OSError(errno.ELOOP, "is a symbolic link, not a lock file; remove it", self.lock_path) from None
            raise
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if self.wait else fcntl.LOCK_NB))
        except OSError as err:
            holder = _holder(fd)
            os.close(fd)
            if err.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise
            raise LockedError(f"{self.what} is in use by another queryshift process{holder}; wait for it to "
                              f"finish or use another directory") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            try:
                os.ftruncate(fd, 0)  # the pid is stale once released; the file itself may stay
            finally:
                os.close(fd)  # closing releases the flock

    def __enter__(self) -> ExclusiveLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def exclusive_lock(path: str, wait: bool = False, what: str | None = None) -> ExclusiveLock:
    """``with exclusive_lock(out): ...`` holds ``out`` exclusively (see :class:`ExclusiveLock`)."""
    return ExclusiveLock(path, wait, what)


def cache_write_lock(path: str) -> ExclusiveLock:
    """The lock a process holds while it writes the cache entry ``path`` (``<path>.lock``); others wait.

    Whoever gets it second should look for ``path`` again: the first writer has usually just written it.
    """
    return ExclusiveLock(f"{path}.lock", wait=True, what=f"cache entry {path}")


def _holder(fd: int) -> str:
    try:
        pid = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
    except OSError:
        return ""
    return f" (pid {pid})" if pid.isdigit() else ""
