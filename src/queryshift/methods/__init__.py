"""Method registry: ``get("tcr")`` -> the method class. A new method is one file plus one line here."""

from __future__ import annotations

import importlib

from .base import AdaptConfig, Method, NonFiniteLossError

# name -> "module:Class" (imported on first use, so a method's optional dependencies stay optional)
METHODS: dict[str, str] = {
    "source": ".source:Source",
    "tent": ".tent:Tent",
    "eata": ".eata:EATA",
    "sar": ".sar:SAR",
    "read": ".read:READ",
    "deyo": ".deyo:DeYO",
    "shot": ".shot:SHOT",
    "tcr": ".tcr:TCR",
    "tcr-free": ".tcr_free:TCRFree",
    "rest": ".rest:REST",
}


def get(name: str) -> type[Method]:
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; available: {', '.join(METHODS)}")
    module, _, cls = METHODS[name].partition(":")
    return getattr(importlib.import_module(module, __package__), cls)


def available() -> list[str]:
    return list(METHODS)


__all__ = ["AdaptConfig", "Method", "NonFiniteLossError", "METHODS", "get", "available"]
