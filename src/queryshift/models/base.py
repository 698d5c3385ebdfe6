"""The dual-encoder interface every backbone implements.

Methods and the engine only talk to this interface, so a method never knows which backbone it runs on.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torchvision import transforms

TOWERS = ("image", "text")  # the towers of an image-text model; audio-visual models declare their own
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def square_transform(size: int, mean=CLIP_MEAN, std=CLIP_STD):
    """-> (transform, preprocess_id): square bicubic resize with no crop, then normalisation, as the TCR code
    preprocesses every backbone; the id is part of the gallery cache key."""
    tf = transforms.Compose([
        transforms.Resize((size, size), interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.ToTensor(),
        transforms.Normalize(mean, std),
    ])
    return tf, f"resize{size}-bicubic-nocrop-mean{tuple(mean)}-std{tuple(std)}"


class WeightsNotFoundError(FileNotFoundError):
    """Raised when pretrained weights are neither cached locally nor downloadable."""


class DualEncoder(nn.Module):
    """An image tower and a text tower mapping into one L2-normalised embedding space.

    Subclasses set ``self.name`` and implement the abstract methods below. ``encode_*`` take what
    ``preprocess``/``tokenize`` produce (batched) and return L2-normalised float32 embeddings.
    """

    name: str = "dual-encoder"
    #: the modalities this model encodes; every ``<query>2<gallery>`` pair of two of them is a direction
    towers: tuple[str, ...] = TOWERS
    #: free-form description of the image preprocessing; part of the gallery cache key
    preprocess_id: str = ""

    def preprocess(self, image) -> torch.Tensor:  # PIL.Image -> (3, H, W)
        raise NotImplementedError

    def tokenize(self, texts: list[str]) -> Any:  # -> tensor or dict of tensors, batched
        raise NotImplementedError

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def encode_text(self, tokens: Any) -> torch.Tensor:
        raise NotImplementedError

    def tower(self, which: str) -> nn.Module:
        """The sub-module whose LayerNorms adapt when ``which`` is the query modality."""
        raise NotImplementedError

    def extra_adaptable_modules(self, which: str) -> list[tuple[str, nn.Module]]:
        """LayerNorms outside ``tower(which)`` that a user may opt into (e.g. CLIP's ``ln_final``)."""
        return []

    # -- shared helpers -------------------------------------------------------------------------

    def encode(self, modality: str, batch: Any) -> torch.Tensor:
        """``encode_<modality>(batch)`` for one of :attr:`towers`."""
        if modality not in self.towers:
            raise ValueError(f"{self.name} has no {modality!r} tower; its towers are {', '.join(self.towers)}")
        return getattr(self, f"encode_{modality}")(batch)

    def prepare(self, modality: str, item: Any) -> Any:
        """One raw item -> what a batch stacks (run in loader workers): a PIL image through :meth:`preprocess`,
        a text as it is (tokenised per batch by :meth:`batch_input`), otherwise ``preprocess_<modality>(item)``
        (audio: a mono float32 waveform at 16 kHz; video: a uint8 clip [T, H, W, 3])."""
        if modality == "image":
            return self.preprocess(item)
        if modality == "text":
            return item
        return getattr(self, f"preprocess_{modality}")(item)

    def adaptable_layernorms(self, which: str, include_final_ln: bool = False) -> list[tuple[str, nn.Module]]:
        """(qualified name, module) of every LayerNorm that adapts for query modality ``which``."""
        if which not in self.towers:
            raise ValueError(f"unknown tower {which!r}; expected one of {self.towers}")
        tower = self.tower(which)
        prefix = _qualified_prefix(self, tower)
        found = [(prefix + n, m) for n, m in tower.named_modules() if isinstance(m, nn.LayerNorm)]
        if include_final_ln:
            found += [(n, m) for n, m in self.extra_adaptable_modules(which) if isinstance(m, nn.LayerNorm)]
        return found

    def adaptable_parameters(self, which: str, include_final_ln: bool = False) -> list[tuple[str, nn.Parameter]]:
        """(qualified name, parameter) of the LayerNorm affine parameters of the query tower."""
        params = []
        for module_name, module in self.adaptable_layernorms(which, include_final_ln):
            for pname, p in module.named_parameters(recurse=False):
                if pname in ("weight", "bias"):
                    params.append((f"{module_name}.{pname}", p))
        return params


def _qualified_prefix(root: nn.Module, sub: nn.Module) -> str:
    if sub is root:
        return ""
    for name, module in root.named_modules():
        if module is sub:
            return name + "."
    raise ValueError("tower() must return a sub-module of the model")


def l2_normalize(x: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.normalize(x.float(), dim=-1)
