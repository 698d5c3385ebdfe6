"""Where suites are found by name."""

from __future__ import annotations

import math
import os

# the shipped suites are package data (queryshift/suites); a configs/suites under the current directory wins,
# and QUERYSHIFT_SUITES (folders joined by os.pathsep, e.g. the lab's lab/suites) is searched before the package
PACKAGE_SUITES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "suites")


def suite_dirs() -> list[str]:
    extra = [os.path.abspath(d) for d in os.environ.get("QUERYSHIFT_SUITES", "").split(os.pathsep) if d]
    dirs = [os.path.join(os.getcwd(), "configs", "suites"), *extra, PACKAGE_SUITES]
    return [d for i, d in enumerate(dirs) if os.path.isdir(d) and d not in dirs[:i]]


def suite_path(name: str) -> str:
    if os.path.isfile(name) or (os.path.exists(name) and not os.path.isdir(name)):
        return name  # a pipe or device is named by the reader's refusal, not taken for a missing suite
    for folder in suite_dirs():
        path = os.path.join(folder, f"{name}.yaml")
        if os.path.isfile(path):
            return path
    known = sorted({f[:-5] for d in suite_dirs() for f in os.listdir(d) if f.endswith(".yaml")})
    where = " or ".join(suite_dirs()) or "configs/suites"
    raise FileNotFoundError(f"no suite {name!r} (neither a file nor NAME.yaml in {where}); "
                            f"known: {', '.join(known) or 'none'}")


def _read(path: str) -> dict:
    from ..configs import read_yaml  # a pipe, deep nesting or an alias bomb is refused before it is read

    return read_yaml(path)


def grid_size(path: str) -> int:
    """Points of a suite's grid (the product of its axis lengths), read without building a run; 0 when the
    file is not a suite, which the full check then reports."""
    try:
        grid = _read(path).get("grid") or {}
    except (OSError, ValueError, ImportError):
        return 0
    except Exception:  # yaml.YAMLError: reported with its position by the full check
        return 0
    if not isinstance(grid, dict) or not all(isinstance(v, list) for v in grid.values()):
        return 0
    return math.prod(len(v) for v in grid.values())


def description(path: str) -> str:
    return str(_read(path).get("description") or "").strip()
