"""State files that hold only tensors and plain containers, so that reading one can run no code.

A run's ``state.pt`` and the service's ``snapshot.pt`` are found in folders others may write to; an
ordinary ``torch.load`` unpickles whatever a planted file names, which can run any code. These files are
therefore read with ``torch.load(weights_only=True)`` (tensors, dicts, lists, tuples, numbers, strings)
and written in that vocabulary: a method's helper objects (its queue, subspace, Fisher estimate) become a
tagged dict of their attributes (:func:`to_plain`) and are rebuilt by :func:`from_plain` without calling
any of their code, for classes of :mod:`queryshift.methods` and classes a plug-in allowed by name with
:func:`allow_state_class` (a lab method's helper objects), never for a class a file merely names.
"""

from __future__ import annotations

import collections
import importlib
import pickle
import re
from typing import Any

import torch

from .atomic import save_torch
from .userfiles import open_regular

OBJECT_TAG = "__queryshift_object__"
ALLOWED_PACKAGE = "queryshift.methods"
_SCALARS = (type(None), bool, int, float, str, bytes)
_TORCH_VALUES = (torch.Tensor, torch.Size, torch.dtype, torch.device)


# "module:qualname" -> class: helper classes outside queryshift.methods that a plug-in allowed explicitly
_ALLOWED_CLASSES: dict[str, type] = {}


def allow_state_class(cls: type) -> type:
    """Let state files hold instances of ``cls`` (a plug-in method's helper object); usable as a decorator."""
    if not isinstance(cls, type) or hasattr(cls, "__slots__"):
        raise TypeError(f"{cls!r}: only classes with a __dict__ can be stored in state files")
    _ALLOWED_CLASSES[f"{cls.__module__}:{cls.__qualname__}"] = cls
    return cls


def _class_name(cls: type) -> str:
    return f"{cls.__module__}:{cls.__qualname__}"


class UnsafeStateError(ValueError):
    """A state file that is not one this package wrote (refused, never executed)."""


def to_plain(obj: Any, where: str = "state") -> Any:
    """``obj`` as tensors and plain containers; TypeError (naming the path in ``obj``) for anything else."""
    if type(obj) in _SCALARS or isinstance(obj, _TORCH_VALUES):
        return obj
    if hasattr(obj, "dtype") and hasattr(obj, "item") and getattr(obj, "shape", None) == ():  # a NumPy scalar
        return obj.item()
    if type(obj) in (list, tuple):
        return type(obj)(to_plain(v, f"{where}[{i}]") for i, v in enumerate(obj))
    if type(obj) in (dict, collections.OrderedDict):
        for key in obj:
            if type(key) not in _SCALARS:
                raise TypeError(f"{where}: key {key!r} of type {type(key).__name__} cannot be stored")
        return type(obj)((k, to_plain(v, f"{where}.{k}")) for k, v in obj.items())
    cls = type(obj)
    allowed = cls.__module__.startswith(ALLOWED_PACKAGE + ".") or _ALLOWED_CLASSES.get(_class_name(cls)) is cls
    if allowed and hasattr(obj, "__dict__") and not hasattr(cls, "__slots__"):
        return {OBJECT_TAG: _class_name(cls), "attrs": to_plain(vars(obj), where)}
    raise TypeError(f"{where}: a {cls.__module__}.{cls.__qualname__} cannot be stored in a state file "
                    f"(tensors, plain containers and {ALLOWED_PACKAGE} objects only)")


def _allowed_class(name: Any) -> type:
    if isinstance(name, str) and name in _ALLOWED_CLASSES:  # allowed by a plug-in already imported: no import
        return _ALLOWED_CLASSES[name]
    module_name, _, qualname = str(name).partition(":")
    if not module_name.startswith(ALLOWED_PACKAGE + ".") or not qualname.isidentifier():
        raise UnsafeStateError(f"names the class {name!r}, which is not a {ALLOWED_PACKAGE} class")
    try:
        cls = getattr(importlib.import_module(module_name), qualname)
    except (ImportError, AttributeError) as err:
        raise UnsafeStateError(f"names the unknown class {name!r}") from err
    if not isinstance(cls, type) or cls.__module__ != module_name:
        raise UnsafeStateError(f"names {name!r}, which is not a class of {module_name}")
    return cls


def from_plain(obj: Any) -> Any:
    """The inverse of :func:`to_plain` (objects get their attributes back; no constructor runs)."""
    if type(obj) in (list, tuple):
        return type(obj)(from_plain(v) for v in obj)
    if isinstance(obj, dict):
        if OBJECT_TAG in obj:
            cls = _allowed_class(obj[OBJECT_TAG])
            attrs = obj.get("attrs")
            if not isinstance(attrs, dict) or not all(isinstance(k, str) for k in attrs):
                raise UnsafeStateError(f"holds a {cls.__qualname__} without its attributes")
            instance = object.__new__(cls)
            instance.__dict__.update(from_plain(attrs))
            return instance
        return type(obj)((k, from_plain(v)) for k, v in obj.items())
    return obj


def save(obj: Any, path: str, fsync: bool = False) -> None:
    """Write ``obj`` (see :func:`to_plain`) to ``path`` atomically."""
    save_torch(to_plain(obj), path, fsync)


def load(path: str, map_location: str = "cpu") -> Any:
    """What :func:`save` wrote to ``path``. A file holding anything else (code, other objects, or not a
    torch file at all) raises :class:`UnsafeStateError` naming it; nothing in it is run."""
    try:
        with open_regular(path, "rb", error=UnsafeStateError) as f:  # a pipe planted there must not block
            raw = torch.load(f, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        detail = str(err.__context__ or err)
        found = re.search(r"GLOBAL (\S+)", detail)
        if found or "global" in detail.lower():  # weights_only refused an object: a planted or foreign pickle
            named = f"the Python object {found.group(1)}" if found else "a Python object"
            raise UnsafeStateError(f"{path}: refused: it holds {named}, not only tensors and plain values (a file "
                                   f"planted there, or written by an older queryshift); nothing in it was run"
                                   ) from None
        raise UnsafeStateError(f"{path} is unreadable: corrupt or not a queryshift state file "
                               f"({detail.splitlines()[0][:200] if detail else 'UnpicklingError'})") from None
    except (RuntimeError, EOFError, ValueError, KeyError, AttributeError, TypeError) as err:
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise UnsafeStateError(f"{path} is unreadable: corrupt or not a queryshift state file "
                               f"({first[:200]})") from None
    try:
        return from_plain(raw)
    except UnsafeStateError as err:
        raise UnsafeStateError(f"{path}: refused: it {err}") from None
