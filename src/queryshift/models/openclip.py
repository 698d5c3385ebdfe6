"""open_clip backbone: ``openclip:<arch>/<pretrained tag>``, ``openclip:<arch>@<checkpoint>``,
``openclip:<arch>/random``.

Preprocessing follows the TCR code (spec §4.1): a square bicubic resize with no crop and CLIP's
normalisation, not open_clip's resize-and-centre-crop.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from .base import CLIP_MEAN, CLIP_STD, DualEncoder, WeightsNotFoundError, l2_normalize, square_transform

CONFIG_DIR = Path(__file__).resolve().parent.parent / "model_configs"
_registered = False


def _open_clip():
    global _registered
    try:
        import open_clip
    except ImportError as err:  # pragma: no cover - depends on the install
        raise ImportError("open_clip backbones need the 'clip' extra: pip install 'queryshift[clip]'") from err
    if not _registered:
        # the project's own architectures (tiny test model, shapes model) live next to the package
        open_clip.add_model_config(CONFIG_DIR)
        _registered = True
    return open_clip


class OpenCLIPEncoder(DualEncoder):
    def __init__(self, model: nn.Module, arch: str, tokenizer, image_size: int, mean, std):
        super().__init__()
        self.model = model
        self.arch = arch
        self._tokenizer = tokenizer
        self.image_size = image_size
        self._transform, self.preprocess_id = square_transform(image_size, mean, std)

    def preprocess(self, image) -> torch.Tensor:
        return self._transform(image.convert("RGB"))

    def tokenize(self, texts: list[str]) -> torch.Tensor:
        return self._tokenizer(list(texts))

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        return l2_normalize(self.model.encode_image(images))

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        return l2_normalize(self.model.encode_text(tokens))

    def tower(self, which: str) -> nn.Module:
        # spec §1.3: CLIP t2i adapts only the LNs inside ``transformer``; ``ln_final`` is opt-in
        return self.model.visual if which == "image" else self.model.transformer

    def extra_adaptable_modules(self, which: str) -> list[tuple[str, nn.Module]]:
        if which == "text" and hasattr(self.model, "ln_final"):
            return [("model.ln_final", self.model.ln_final)]
        return []


def parse_spec(spec: str) -> tuple[str, str | None, str | None]:
    """-> (arch, pretrained tag or None, checkpoint path or None)."""
    if "@" in spec:
        arch, _, path = spec.partition("@")
        return arch, None, path
    arch, _, tag = spec.partition("/")
    if not tag:
        raise ValueError(
            f"openclip model spec {spec!r} needs a pretrained tag or checkpoint: "
            f"'openclip:{arch}/openai', 'openclip:{arch}@/path/to/ckpt.pt' or 'openclip:{arch}/random'"
        )
    return arch, (None if tag == "random" else tag), None


def load(spec: str, device: str = "cpu") -> OpenCLIPEncoder:
    open_clip = _open_clip()
    arch, tag, path = parse_spec(spec)
    if arch not in open_clip.list_models():
        raise ValueError(f"unknown open_clip architecture {arch!r}; see open_clip.list_models()")
    if path is not None and not os.path.isfile(path):
        raise WeightsNotFoundError(
            f"checkpoint not found: {path} (model 'openclip:{spec}'). Pass an existing open_clip state-dict "
            f"file, or use 'openclip:{arch}/<pretrained tag>' on a machine that can download weights."
        )
    if tag is not None and tag not in open_clip.list_pretrained_tags_by_model(arch):
        tags = ", ".join(open_clip.list_pretrained_tags_by_model(arch)) or "none"
        raise ValueError(f"unknown pretrained tag {tag!r} for {arch}; available: {tags}")
    try:
        model = open_clip.create_model(arch, pretrained=path or tag, device=device, precision="fp32")
    except Exception as err:  # network errors surface as many exception types inside hub clients
        if tag is None:
            raise
        raise WeightsNotFoundError(
            f"could not load pretrained weights '{tag}' for {arch}: {type(err).__name__}: {err}\n"
            f"open_clip downloads them from the Hugging Face hub on first use. On a machine with internet run\n"
            f"  python -c \"import open_clip; open_clip.create_model('{arch}', pretrained='{tag}')\"\n"
            f"and copy the hub cache (HF_HOME) here, or download the .bin/.safetensors file and pass\n"
            f"  --model openclip:{arch}@/path/to/open_clip_model.safetensors"
        ) from err
    cfg = open_clip.get_model_config(arch)
    size = cfg["vision_cfg"]["image_size"]
    size = size[0] if isinstance(size, (list, tuple)) else size
    mean = getattr(model.visual, "image_mean", None) or CLIP_MEAN
    std = getattr(model.visual, "image_std", None) or CLIP_STD
    tokenizer = open_clip.get_tokenizer(arch)
    return OpenCLIPEncoder(model, arch, tokenizer, int(size), mean, std).to(device)
