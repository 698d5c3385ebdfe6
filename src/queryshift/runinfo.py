"""What every result records next to its numbers: package versions and the git commit."""

from __future__ import annotations

import importlib.metadata
import os
import platform
import subprocess
import sys

_PACKAGES = ("queryshift", "torch", "torchvision", "open_clip_torch", "transformers", "numpy", "nlpaug",
             "imagecorruptions-imaug", "faiss-cpu")


def versions() -> dict[str, str]:
    out = {"python": sys.version.split()[0], "platform": platform.platform()}
    for name in _PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    return out


def git_commit() -> str | None:
    """HEAD of the checkout the package runs from, with '+dirty' for uncommitted changes; None if not git."""
    here = os.path.dirname(os.path.abspath(__file__))
    # a plain `git status` refreshes the index and takes .git/index.lock for it: a run must not write into the
    # checkout it was started from, nor make a concurrent `git commit` there fail on the lock
    env = {**os.environ, "GIT_OPTIONAL_LOCKS": "0"}
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True,
                              timeout=10, check=True, env=env).stdout.strip()
        dirty = subprocess.run(["git", "--no-optional-locks", "status", "--porcelain", "--untracked-files=no"],
                               cwd=here, capture_output=True, text=True, timeout=10, env=env).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return head + ("+dirty" if dirty else "")
