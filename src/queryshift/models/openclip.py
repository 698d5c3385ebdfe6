"""open_clip backbone: ``openclip:<arch>/<pretrained tag>``, ``openclip:<arch>@<checkpoint>``,
``openclip:<arch>/random``.

Preprocessing follows the TCR code: a square bicubic resize with no crop and CLIP's
normalisation, not open_clip's resize-and-centre-crop.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from ._net import hub_url, reachable
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
        # the TCR code: CLIP t2i adapts only the LNs inside ``transformer``; ``ln_final`` is opt-in
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


def _hub_file(pretrained_cfg: dict) -> tuple[str, list[str]]:
    """(hub repo id, candidate file names) of a pretrained tag, as open_clip's ``download_pretrained`` reads them."""
    from open_clip.pretrained import HF_SAFE_WEIGHTS_NAME, HF_WEIGHTS_NAME

    repo, filename = os.path.split(pretrained_cfg.get("hf_hub", ""))
    return repo, [filename] if filename else [HF_SAFE_WEIGHTS_NAME, HF_WEIGHTS_NAME]


def _weights_cached(pretrained_cfg: dict) -> bool:
    """Whether the weights of a pretrained tag are on disk already (then no network is needed)."""
    if "file" in pretrained_cfg:
        return os.path.isfile(pretrained_cfg["file"])
    if pretrained_cfg.get("hf_hub"):
        from huggingface_hub import try_to_load_from_cache

        repo, names = _hub_file(pretrained_cfg)
        return any(isinstance(try_to_load_from_cache(repo, name), str) for name in names)
    url = pretrained_cfg.get("url", "")
    return bool(url) and os.path.isfile(os.path.join(os.path.expanduser("~/.cache/clip"), os.path.basename(url)))


def _source_url(pretrained_cfg: dict) -> str:
    if pretrained_cfg.get("hf_hub"):
        repo, names = _hub_file(pretrained_cfg)
        return hub_url(repo, names[0])
    return pretrained_cfg.get("url", "")


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
    how = (f"download them where there is internet (they land in the Hugging Face cache, HF_HOME) or give a "
           f"local file: --model openclip:{arch}@/path/to/open_clip_model.safetensors")
    if tag is not None:
        pretrained_cfg = open_clip.get_pretrained_cfg(arch, tag)
        # the hub client retries an unreachable host for about a minute: ask once, quickly, before it does
        if not _weights_cached(pretrained_cfg) and not reachable(_source_url(pretrained_cfg)):
            raise WeightsNotFoundError(f"pretrained weights {arch}/{tag} are not in the local cache and their "
                                       f"server cannot be reached; {how}")
    try:
        model = open_clip.create_model(arch, pretrained=path or tag, device=device, precision="fp32")
    except Exception as err:  # network errors surface as many exception types inside hub clients
        if tag is None:
            raise
        cause = " ".join(f"{type(err).__name__}: {err}".split())
        raise WeightsNotFoundError(f"could not load pretrained weights {arch}/{tag} ({cause[:160]}); {how}") from err
    cfg = open_clip.get_model_config(arch)
    size = cfg["vision_cfg"]["image_size"]
    size = size[0] if isinstance(size, (list, tuple)) else size
    mean = getattr(model.visual, "image_mean", None) or CLIP_MEAN
    std = getattr(model.visual, "image_std", None) or CLIP_STD
    tokenizer = open_clip.get_tokenizer(arch)
    return OpenCLIPEncoder(model, arch, tokenizer, int(size), mean, std).to(device)
