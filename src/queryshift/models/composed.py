"""Composed query encoders: a reference image and a modification text -> one query embedding.

:class:`ComposedEncoder` wraps any :class:`DualEncoder` behind the same interface, with one more query
modality, ``"composed"``: ``encode("composed", batch)`` encodes the reference images with the image tower,
the texts with the text tower, and fuses the two embeddings with a composer. Methods never know about
composed queries: they adapt ``adaptable_parameters("composed")``, the LayerNorms of the towers the composer
declares in ``query_towers`` (both, for the composers here), and call ``encode("composed", batch)``.

Composers (``--composer``):

- ``sum``: training-free, the normalised sum of the two normalised embeddings;
- ``combiner:<file>``: a trained :class:`GatedCombiner` (``queryshift train-combiner``), CLIP4Cir-style gated
  fusion on top of the frozen backbone; ``shapes-cir`` names the one shipped for ``shapes-clip``.

A composed batch is a flat dict of tensors (``image`` plus ``text`` or ``text.<key>`` for tokenizers that
return dicts), so the methods' row selection (:func:`queryshift.methods.components.index_batch`) applies.
"""

from __future__ import annotations

import os
import warnings
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..atomic import save_torch
from ..modalities import COMPOSED
from .base import TOWERS, DualEncoder

ASSETS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "assets")
SHIPPED_COMBINERS = {"shapes-cir": ("shapes-clip", os.path.join(ASSETS, "shapes-cir-combiner.pt"))}


class SumComposer(nn.Module):
    """normalize(normalize(image) + normalize(text)): the training-free baseline."""

    kind = "sum"
    query_towers = TOWERS

    def forward(self, image: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        return F.normalize(F.normalize(image, dim=-1) + F.normalize(text, dim=-1), dim=-1)


class GatedCombiner(nn.Module):
    """CLIP4Cir-style gated fusion of two frozen embeddings (Baldrati et al., 2022).

    Both embeddings are projected (linear + ReLU), concatenated and mixed by an MLP into a residual; a scalar
    gate in (0, 1), also computed from the concatenation, weights the text embedding against the image one:
    ``normalize(mlp(p) + g * text + (1 - g) * image)``. The gate lets the combiner fall back on the sum-like
    mixture where its learned residual has nothing to add.
    """

    kind = "combiner"
    query_towers = TOWERS

    def __init__(self, dim: int, proj_dim: int = 256, hidden_dim: int = 512, dropout: float = 0.1):
        super().__init__()
        self.dim, self.proj_dim, self.hidden_dim, self.dropout = dim, proj_dim, hidden_dim, dropout
        self.image_proj = nn.Sequential(nn.Linear(dim, proj_dim), nn.ReLU(), nn.Dropout(dropout))
        self.text_proj = nn.Sequential(nn.Linear(dim, proj_dim), nn.ReLU(), nn.Dropout(dropout))
        self.mix = nn.Sequential(nn.Linear(2 * proj_dim, hidden_dim), nn.ReLU(), nn.Dropout(dropout),
                                 nn.Linear(hidden_dim, dim))
        self.gate = nn.Sequential(nn.Linear(2 * proj_dim, hidden_dim), nn.ReLU(), nn.Dropout(dropout),
                                  nn.Linear(hidden_dim, 1), nn.Sigmoid())

    def forward(self, image: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        image, text = F.normalize(image, dim=-1), F.normalize(text, dim=-1)
        p = torch.cat([self.image_proj(image), self.text_proj(text)], dim=-1)
        g = self.gate(p)
        return F.normalize(self.mix(p) + g * text + (1 - g) * image, dim=-1)

    def hparams(self) -> dict[str, Any]:
        return {"dim": self.dim, "proj_dim": self.proj_dim, "hidden_dim": self.hidden_dim, "dropout": self.dropout}


def save_combiner(combiner: GatedCombiner, path: str, meta: dict[str, Any]) -> None:
    """fp16 weights (small to ship) plus the architecture and ``meta`` (base model, its weights digest, recipe)."""
    state = {k: v.half() for k, v in combiner.state_dict().items()}
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    save_torch({"format": "queryshift-combiner/1", "hparams": combiner.hparams(), "state_dict": state,
                "meta": meta}, path)


def load_combiner(path: str) -> tuple[GatedCombiner, dict[str, Any]]:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"combiner file not found: {path} (train one with 'queryshift train-combiner')")
    try:  # weights_only: a planted or foreign pickle is refused, never run
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - not a torch file, truncated, or holding objects
        raise ValueError(f"{path}: not a combiner written by 'queryshift train-combiner' ({type(err).__name__}: "
                         f"{str(err).splitlines()[0][:200] if str(err) else ''})") from None
    if not isinstance(blob, dict) or blob.get("format") != "queryshift-combiner/1":
        raise ValueError(f"{path}: not a combiner written by 'queryshift train-combiner'")
    try:
        combiner = GatedCombiner(**blob["hparams"])
        combiner.load_state_dict({k: v.float() for k, v in blob["state_dict"].items()})
    except (KeyError, TypeError, AttributeError, ValueError, RuntimeError) as err:  # a tampered or mixed file
        raise ValueError(f"{path}: a damaged combiner file ({type(err).__name__}: "
                         f"{str(err).splitlines()[0][:200] if str(err) else ''})") from None
    meta = blob.get("meta", {})
    return combiner.eval(), meta if isinstance(meta, dict) else {}


class ComposedEncoder(DualEncoder):
    """A backbone plus a composer; image/text encoding is the backbone's, ``"composed"`` is the fusion."""

    def __init__(self, base: DualEncoder, composer: nn.Module, composer_name: str):
        super().__init__()
        if isinstance(base, ComposedEncoder):
            base = base.base
        self.base, self.composer, self.composer_name = base, composer, composer_name
        self.name = f"{base.name}+{composer_name}"
        self.preprocess_id = base.preprocess_id
        self.query_towers = tuple(composer.query_towers)

    # the backbone's interface, unchanged
    def preprocess(self, image) -> torch.Tensor:
        return self.base.preprocess(image)

    def tokenize(self, texts: list[str]) -> Any:
        return self.base.tokenize(texts)

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        return self.base.encode_image(images)

    def encode_text(self, tokens: Any) -> torch.Tensor:
        return self.base.encode_text(tokens)

    def tower(self, which: str) -> nn.Module:
        return self.base.tower(which)

    def extra_adaptable_modules(self, which: str) -> list[tuple[str, nn.Module]]:
        return [(f"base.{n}", m) for n, m in self.base.extra_adaptable_modules(which)]

    # the composed query modality
    def composed_input(self, images: torch.Tensor, texts: list[str], device: str = "cpu") -> dict[str, torch.Tensor]:
        """Preprocessed reference images and raw modification texts -> one flat dict of batch-first tensors."""
        if len(images) != len(texts):
            raise ValueError(f"{len(images)} reference images for {len(texts)} modification texts")
        tokens = self.tokenize(list(texts))
        batch = {"image": images.to(device)}
        if isinstance(tokens, dict):
            batch.update({f"text.{k}": v.to(device) for k, v in tokens.items()})
        else:
            batch["text"] = tokens.to(device)
        return batch

    def encode_composed(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        text = batch["text"] if "text" in batch else {k[5:]: v for k, v in batch.items() if k.startswith("text.")}
        return self.composer(self.base.encode_image(batch["image"]), self.base.encode_text(text)).float()

    def encode(self, modality: str, batch: Any) -> torch.Tensor:
        if modality == COMPOSED:
            return self.encode_composed(batch)
        return super().encode(modality, batch)

    def adaptable_layernorms(self, which: str, include_final_ln: bool = False) -> list[tuple[str, nn.Module]]:
        """For composed queries: the LayerNorms of every tower the composer declares (the query encoder)."""
        if which != COMPOSED:
            return super().adaptable_layernorms(which, include_final_ln)
        own = super().adaptable_layernorms
        return [item for tower in self.query_towers for item in own(tower, include_final_ln)]


def build_composer(spec: str, base: DualEncoder) -> nn.Module:
    """``sum``, ``combiner:<file>`` or a shipped combiner's name (``shapes-cir``) -> a composer module."""
    if spec == "sum":
        return SumComposer()
    if spec in SHIPPED_COMBINERS:
        path = SHIPPED_COMBINERS[spec][1]
    elif spec.startswith("combiner:"):
        path = spec.removeprefix("combiner:")
    else:
        raise ValueError(f"unknown composer {spec!r}; expected 'sum', 'combiner:<file>' or one of "
                         f"{sorted(SHIPPED_COMBINERS)}")
    combiner, meta = load_combiner(path)
    dim = _embed_dim(base)
    if dim is not None and combiner.dim != dim:
        raise ValueError(f"combiner {path} fuses {combiner.dim}-d embeddings but {base.name} has {dim}-d ones")
    from .digest import weights_digest

    trained_on = meta.get("base_weights")
    if trained_on and trained_on != weights_digest(base):
        warnings.warn(f"combiner {path} was trained on {meta.get('base_model')} weights {trained_on}, not on the "
                      f"weights of {base.name} loaded here; retrain it with 'queryshift train-combiner'",
                      stacklevel=2)
    return combiner


def _embed_dim(base: DualEncoder) -> int | None:
    """The joint embedding width: open_clip's ``visual.output_dim`` or transformers' ``projection_dim``."""
    model = getattr(base, "model", None)
    dim = getattr(getattr(model, "visual", None), "output_dim", None)
    if dim is None:
        dim = getattr(getattr(model, "config", None), "projection_dim", None)
    return int(dim) if dim is not None else None


def compose(model: DualEncoder, composer: str | None = None) -> ComposedEncoder:
    """The composed query encoder a ``c2i`` run uses: the model's own composer unless ``composer`` names
    another; a plain backbone gets ``sum``."""
    if isinstance(model, ComposedEncoder) and composer in (None, model.composer_name):
        return model
    base = model.base if isinstance(model, ComposedEncoder) else model
    name = composer or "sum"
    return ComposedEncoder(base, build_composer(name, base), name).eval()


def load_alias(name: str, device: str = "cpu") -> ComposedEncoder:
    """``shapes-cir``: the shipped shapes-clip with its shipped combiner."""
    from . import load_model

    base_name = SHIPPED_COMBINERS[name][0]
    base = load_model(base_name, device)
    return ComposedEncoder(base, build_composer(name, base), name).to(device)
