"""Reading files a user named, and echoing their values in messages.

Only regular files are opened: a named pipe blocks ``open()`` until some writer comes (forever, if none
does), a device never ends, a folder is not a file. A value echoed in an error message is cut to a couple of
hundred characters, however large (or alias-expanded) the value is.
"""

from __future__ import annotations

import json
import os
import reprlib
import stat
import sys
from collections.abc import Callable
from typing import IO, Any

ECHO_LIMIT = 200

_KINDS = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a named pipe (FIFO)"),
          (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))

_repr = reprlib.Repr()
# reprlib stops at these sizes, so the work is bounded too (a YAML alias bomb shares one list 9**9 times)
_repr.maxlevel, _repr.maxlist, _repr.maxtuple, _repr.maxdict, _repr.maxset = 3, 6, 6, 6, 6
_repr.maxstring, _repr.maxother, _repr.maxlong = ECHO_LIMIT, ECHO_LIMIT, 40


def clip(text: str, limit: int = ECHO_LIMIT) -> str:
    """``text`` cut to at most ``limit`` characters (a trailing '...' marks the cut)."""
    text = str(text)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def short_repr(value: Any, limit: int = ECHO_LIMIT) -> str:
    """A value for an error message, at most ``limit`` characters; None reads as null, as in the files."""
    return "null" if value is None else clip(_repr.repr(value), limit)


def describe(value: Any) -> str:
    """'dict {...}', 'int 5' or 'null': the type the file gave, and the value, bounded."""
    return "null" if value is None else f"{type(value).__name__} {short_repr(value)}"


def special_kind(mode: int) -> str | None:
    """What a non-regular file is ('a named pipe (FIFO)', ...), or None for a regular file."""
    for test, kind in _KINDS:
        if test(mode):
            return kind
    return None if stat.S_ISREG(mode) else "not a regular file"


def open_regular(path: str, mode: str = "r", *, encoding: str | None = None, newline: str | None = None,
                 error: Callable[[str], Exception] = ValueError) -> IO:
    """``open(path, mode)`` for reading, refusing anything but a regular file (``error`` names it).

    The file is opened non-blocking and checked again on the open descriptor, so a pipe swapped in after
    the first check cannot block either. A missing file raises FileNotFoundError, as ``open`` does.
    """
    if any(c in mode for c in "wax+"):
        raise ValueError(f"open_regular reads only, got mode {mode!r}")
    kind = special_kind(os.stat(path).st_mode)
    if kind:
        raise error(f"{path} is {kind}, not a regular file")
    nonblocking = getattr(os, "O_NONBLOCK", 0)  # POSIX; Windows has no FIFOs to block on
    fd = os.open(path, os.O_RDONLY | nonblocking | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_BINARY", 0))
    try:
        kind = special_kind(os.fstat(fd).st_mode)
        if kind:
            raise error(f"{path} is {kind}, not a regular file")
        if nonblocking:
            os.set_blocking(fd, True)
        return os.fdopen(fd, mode, encoding=encoding, newline=newline)
    except BaseException:
        os.close(fd)
        raise


def parse_json(load: Callable[[], Any], where: str, error: Callable[[str], Exception] = ValueError) -> Any:
    """``load()`` (json.load / json.loads of a user's text); what the parser cannot take becomes ``error``
    naming ``where``. JSONDecodeError and UnicodeDecodeError pass through for the caller's own hints."""
    try:
        return load()
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise
    except RecursionError:
        raise error(f"{where}: JSON nested too deeply to read (more than about {sys.getrecursionlimit()} "
                    f"levels)") from None
    except ValueError as err:  # e.g. an integer of more than sys.get_int_max_str_digits() digits
        raise error(f"{where}: not readable as JSON ({clip(str(err))})") from None
