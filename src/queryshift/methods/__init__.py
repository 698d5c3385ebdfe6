"""Method registry: ``get("tcr")`` -> the method class.

A method outside the package is added with :func:`register` (a :class:`Method` subclass, or ``"module:Class"``
imported on first use). Modules named in the environment variable ``QUERYSHIFT_PLUGINS`` (comma-separated, e.g.
``QUERYSHIFT_PLUGINS=lab``) are imported before the registry is first read, so that their ``register`` calls
also reach processes the CLI starts (``bench --jobs``, torchrun ranks)::

    from queryshift import methods
    methods.register("my-tent", "my_package.my_tent:MyTent")
"""

from __future__ import annotations

import importlib
import os
import re
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # .base imports torch; the registry alone (``queryshift list``, ``--help``) does not need it
    from .base import AdaptConfig, Method, NonFiniteLossError


def __getattr__(name: str):
    if name in ("AdaptConfig", "Method", "NonFiniteLossError"):
        from . import base

        return getattr(base, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# name -> "module:Class" (imported on first use, so a method's optional dependencies stay optional)
METHODS: dict[str, str | type[Method]] = {
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
_SHIPPED = frozenset(METHODS)

_NAME = re.compile(r"[a-z0-9][a-z0-9_.-]*")
_plugins_loaded = False


def load_plugins() -> None:
    """Import the modules named in ``QUERYSHIFT_PLUGINS`` (once; they register their methods on import)."""
    global _plugins_loaded
    if _plugins_loaded:
        return
    _plugins_loaded = True
    for module in filter(None, (m.strip() for m in os.environ.get("QUERYSHIFT_PLUGINS", "").split(","))):
        try:
            importlib.import_module(module)
        except ImportError as e:
            raise ImportError(f"QUERYSHIFT_PLUGINS: cannot import {module!r}: {e}") from e


def register(name: str, target: str | type[Method], replace: bool = False) -> None:
    """Make ``target`` available as method ``name`` (``--method NAME``, suites, :func:`get`).

    ``target`` is a :class:`Method` subclass or ``"module:Class"`` (absolute module path), imported on first use.
    Registering a name again with the same target does nothing; with another target it is refused unless
    ``replace`` is true.
    """
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise ValueError(f"method name must be lower-case letters, digits, '-', '_' or '.', got {name!r}")
    if isinstance(target, str):
        module, _, cls = target.partition(":")
        if not module or not cls or module.startswith("."):
            raise ValueError(f"method {name!r}: target must be 'package.module:Class', got {target!r}")
    elif not (isinstance(target, type) and issubclass(target, _method_base())):
        raise TypeError(f"method {name!r}: target must be a Method subclass or 'module:Class', got {target!r}")
    current = METHODS.get(name)
    if current is not None and current != target and not replace:
        raise ValueError(f"method {name!r} is already registered ({_describe(current)}); pass replace=True")
    METHODS[name] = target


def unregister(name: str) -> None:
    """Remove a method added with :func:`register` (a test's or a notebook's); a name not registered is ignored,
    and the shipped methods cannot be removed."""
    if name in _SHIPPED:
        raise ValueError(f"method {name!r} ships with queryshift and cannot be unregistered")
    METHODS.pop(name, None)


def _method_base() -> type[Method]:
    from .base import Method

    return Method


def _describe(target: str | type[Method]) -> str:
    return target if isinstance(target, str) else f"{target.__module__}:{target.__qualname__}"


def get(name: str) -> type[Method]:
    load_plugins()
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; available: {', '.join(METHODS)}")
    target = METHODS[name]
    if not isinstance(target, str):
        return target
    module, _, cls = target.partition(":")
    found = getattr(importlib.import_module(module, __package__), cls)
    if not (isinstance(found, type) and issubclass(found, _method_base())):
        raise TypeError(f"method {name!r}: {target} is not a Method subclass")
    return found


def available() -> list[str]:
    load_plugins()
    return list(METHODS)


__all__ = ["AdaptConfig", "Method", "NonFiniteLossError", "METHODS", "get", "available", "register", "unregister",
           "load_plugins"]
