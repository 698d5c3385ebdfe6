"""Backbone factory, in the spirit of open_clip's ``create_model_and_transforms``.

``load_model("openclip:ViT-B-16/openai")`` -> a :class:`DualEncoder`. A new backbone is one module that
defines ``load(spec: str, device) -> DualEncoder`` plus one line in ``BACKENDS`` (or an ``ALIASES`` entry).
"""

from __future__ import annotations

import importlib

from .base import DualEncoder, WeightsNotFoundError, l2_normalize

# prefix -> module (relative to this package) whose ``load(spec, device)`` builds the model
BACKENDS: dict[str, str] = {
    "openclip": ".openclip",
    "hf-blip": ".hf_blip",
    "hf-clip": ".hf_clip",
}

# bare names -> module whose ``load_alias(name, device)`` builds the model (e.g. the shipped shapes model)
ALIASES: dict[str, str] = {
    "shapes-clip": ".shapes_clip",
    "shapes-clip-general": ".shapes_clip",
    "shapes-cir": ".composed",  # shapes-clip with its shipped combiner (composed queries, --direction c2i)
}


# Learning rates chosen for a backbone on validation shifts only (its model card says how); every other
# backbone uses the protocol defaults of the TCR code (spec §1.4).
PROTOCOL_LR: dict[str, float] = {"shapes-clip": 1e-3}


def spec_default_lr(model: str, text_queries: bool) -> float:
    """The TCR code's learning rate: 3e-4, or 3e-5 for BLIP adapting its text tower (spec §1.4)."""
    return 3e-5 if model.startswith("hf-blip") and text_queries else 3e-4


def protocol_lr(model: str, text_queries: bool) -> float:
    """The learning rate a run uses when none is given: the backbone's chosen one, else the spec's."""
    return PROTOCOL_LR.get(model, spec_default_lr(model, text_queries))


def load_model(name: str, device: str = "cpu") -> DualEncoder:
    """Build a dual encoder from ``<backend>:<spec>`` or a registered alias, in eval mode."""
    if name in ALIASES:
        module = importlib.import_module(ALIASES[name], __package__)
        model = module.load_alias(name, device)
    else:
        backend, sep, spec = name.partition(":")
        if not sep or backend not in BACKENDS:
            known = ", ".join([f"{b}:<spec>" for b in BACKENDS] + list(ALIASES))
            raise ValueError(f"unknown model {name!r}; expected one of: {known}")
        module = importlib.import_module(BACKENDS[backend], __package__)
        model = module.load(spec, device)
    model.name = name
    return model.eval()


__all__ = ["DualEncoder", "WeightsNotFoundError", "l2_normalize", "load_model", "BACKENDS", "ALIASES", "PROTOCOL_LR",
           "protocol_lr", "spec_default_lr"]
