"""queryshift: online test-time adaptation of cross-modal retrieval models under query shift.

The Python API in a few names (each imported on first use, so ``import queryshift`` does not import torch)::

    import queryshift

    cfg = queryshift.RunConfig(model="shapes-clip", data="shapes", method="tcr", shift="gaussian_noise:5")
    result = queryshift.run(cfg)          # the result dict: r1, r5, r10, r_mean, map, config, ...

- :class:`RunConfig` / :func:`run` (from :mod:`queryshift.engine`): one online adaptation stream
- :func:`load_model` (from :mod:`queryshift.models`): a backbone, ``shapes-clip`` or ``openclip:ViT-B-16/openai``
- :func:`load_dataset` (from :mod:`queryshift.data`): ``shapes``, a Karpathy JSON, a JSONL/CSV of pairs
- :mod:`queryshift.methods` (``get``, ``available``, ``register``), :mod:`queryshift.models`
  (``register_backbone``), :mod:`queryshift.shifts` (``build``; ``registry.register_shift``) and
  :mod:`queryshift.bench` (grids and tables)
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

# public name -> module that defines it
_API = {
    "RunConfig": "queryshift.engine",
    "run": "queryshift.engine",
    "load_model": "queryshift.models",
    "load_dataset": "queryshift.data",
}
_SUBPACKAGES = ("bench", "data", "engine", "methods", "models", "serve", "shifts")


def __getattr__(name: str):
    if name in _API:
        value = getattr(importlib.import_module(_API[name]), name)
        globals()[name] = value
        return value
    if name in _SUBPACKAGES:
        return importlib.import_module(f"queryshift.{name}")
    raise AttributeError(f"module 'queryshift' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_API, *_SUBPACKAGES])


__all__ = ["__version__", "RunConfig", "run", "load_model", "load_dataset"]
