"""Backbone registry, in the spirit of open_clip's ``create_model_and_transforms``.

``load_model("openclip:ViT-B-16/openai")`` -> a :class:`DualEncoder`. A backbone is a factory
``(spec: str, device: str) -> DualEncoder`` registered under a prefix, so ``--model PREFIX:SPEC`` calls it with
``SPEC`` (a bare ``--model PREFIX`` with ``""``). A new backbone is one file plus one line::

    from queryshift.models import register_backbone
    register_backbone("my-net", "my_package.my_net:load")   # or the function itself

Built-in prefixes name a module of this package whose ``load(spec, device)`` builds the model; bare names in
``ALIASES`` (the shipped shapes models) name a module whose ``load_alias(name, device)`` does.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the classes below import torch; ``import queryshift.models`` alone does not
    from .base import DualEncoder

# prefix -> factory: a module of this package (".openclip", its ``load``), "package.module:function", or a callable
BACKENDS: dict[str, str | Callable[[str, str], Any]] = {
    "openclip": ".openclip",
    "hf-blip": ".hf_blip",
    "hf-clip": ".hf_clip",
    "cav-mae": ".cav_mae",  # CAV-MAE video/audio towers (READ's backbone): cav-mae:<checkpoint .pth or folder>
    "hf-clap": ".hf_clap",  # CLAP audio/text towers via transformers: hf-clap:<hub id or folder>
}
_SHIPPED = frozenset(BACKENDS)
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")

# bare names -> module whose ``load_alias(name, device)`` builds the model (e.g. the shipped shapes model)
ALIASES: dict[str, str] = {
    "shapes-clip": ".shapes_clip",
    "shapes-clip-general": ".shapes_clip",
    "shapes-cir": ".composed",  # shapes-clip with its shipped combiner (composed queries, --direction c2i)
    "shapes-av": ".shapes_av",  # video-audio (--direction v2a / a2v, --data shapes-av)
}


# Learning rates chosen for a backbone on validation shifts only (its model card says how): one common rate for
# every method, and in METHOD_LR each method's own rate, which wins; every other backbone uses the protocol
# defaults of the TCR code.
PROTOCOL_LR: dict[str, float] = {"shapes-clip": 1e-3}
# shapes-clip: lab/reports/validation-rates.md (REST: lab/reports/rest-design-4.md, its refined answers at 3e-3),
# chosen on image and text validation shifts together and used for both directions
METHOD_LR: dict[str, dict[str, float]] = {
    "shapes-clip": {"tent": 3e-4, "eata": 3e-4, "sar": 3e-4, "read": 3e-4, "deyo": 3e-4, "shot": 3e-4,
                    "tcr": 1e-3, "rest": 3e-3},
}


def spec_default_lr(model: str, text_queries: bool) -> float:
    """The TCR code's learning rate: 3e-4, or 3e-5 for BLIP adapting its text tower."""
    return 3e-5 if model.startswith("hf-blip") and text_queries else 3e-4


def protocol_lr(model: str, text_queries: bool, method: str | None = None) -> float:
    """The learning rate a run of ``method`` uses when none is given: the method's own rate chosen for the backbone,
    else the backbone's common one, else the TCR code's."""
    own = METHOD_LR.get(model, {})
    if method in own:
        return own[method]
    return PROTOCOL_LR.get(model, spec_default_lr(model, text_queries))


def register_backbone(prefix: str, factory: str | Callable[[str, str], Any], replace: bool = False) -> None:
    """Make ``--model PREFIX:SPEC`` build ``factory(SPEC, device)``.

    ``factory`` is a callable or ``"package.module:function"`` (imported on first use). Registering a prefix
    again with the same factory does nothing; another factory is refused unless ``replace`` is true.
    """
    if not isinstance(prefix, str) or not _NAME.fullmatch(prefix) or prefix in ALIASES:
        raise ValueError(f"backbone name must be letters, digits, '-', '_' or '.' and not a model alias, "
                         f"got {prefix!r}")
    if isinstance(factory, str):
        module, _, func = factory.partition(":")
        if not module or not func or module.startswith("."):
            raise ValueError(f"backbone {prefix!r}: factory must be 'package.module:function', got {factory!r}")
    elif not callable(factory):
        raise TypeError(f"backbone {prefix!r}: factory must be callable or 'package.module:function', "
                        f"got {factory!r}")
    current = BACKENDS.get(prefix)
    if current is not None and current != factory and not replace:
        raise ValueError(f"backbone {prefix!r} is already registered ({current!r}); pass replace=True")
    BACKENDS[prefix] = factory


def unregister_backbone(prefix: str) -> None:
    """Remove a backbone added with :func:`register_backbone`; an unknown prefix is ignored."""
    if prefix in _SHIPPED:
        raise ValueError(f"backbone {prefix!r} ships with queryshift and cannot be unregistered")
    BACKENDS.pop(prefix, None)


def _factory(prefix: str) -> Callable[[str, str], Any]:
    target = BACKENDS[prefix]
    if callable(target):
        return target
    if target.startswith("."):
        return importlib.import_module(target, __package__).load
    module, _, func = target.partition(":")
    return getattr(importlib.import_module(module), func)


def load_model(name: str, device: str = "cpu") -> DualEncoder:
    """Build a dual encoder from ``<backend>:<spec>``, a registered bare backbone name or an alias, in eval mode."""
    if name in ALIASES:
        module = importlib.import_module(ALIASES[name], __package__)
        model = module.load_alias(name, device)
    else:
        backend, sep, spec = name.partition(":")
        if backend not in BACKENDS or (not sep and backend in _SHIPPED):
            known = ", ".join([f"{b}:<spec>" for b in BACKENDS] + list(ALIASES))
            raise ValueError(f"unknown model {name!r}; expected one of: {known}")
        model = _factory(backend)(spec, device)
    model.name = name
    return model.eval()


def __getattr__(name: str):
    if name in ("DualEncoder", "WeightsNotFoundError", "l2_normalize"):
        from . import base

        return getattr(base, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["DualEncoder", "WeightsNotFoundError", "l2_normalize", "load_model", "register_backbone",
           "unregister_backbone", "BACKENDS", "ALIASES", "PROTOCOL_LR", "METHOD_LR", "protocol_lr",
           "spec_default_lr"]
