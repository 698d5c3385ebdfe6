"""Pieces shared by the Hugging Face backbones: loading with clear offline errors, TCR preprocessing,
padded tokenisation. Each backbone file only says how its towers embed and which LayerNorms adapt."""

from __future__ import annotations

import os

import torch
from torch import nn

from ._net import hub_url, reachable
from .base import DualEncoder, WeightsNotFoundError, square_transform


def from_pretrained(cls, spec: str, backend: str, device: str):
    """Load ``cls`` and its tokenizer from a local directory or a hub id; missing weights ->
    :class:`WeightsNotFoundError` with download instructions."""
    from transformers import AutoTokenizer

    path = os.path.expanduser(spec)
    local = os.path.isdir(path)
    looks_like_path = os.path.isabs(path) or spec.startswith((".", "~")) or spec.count("/") > 1
    if not local and looks_like_path:
        raise WeightsNotFoundError(f"model directory not found: {path} (model '{backend}:{spec}')")
    if not local and not _cached(spec) and not reachable(hub_url(spec, "config.json")):
        # the hub client would retry for about a minute and then print a page of causes
        raise WeightsNotFoundError(
            f"'{backend}:{spec}' is not in the local Hugging Face cache (HF_HOME) and the hub cannot be reached; "
            f"download it where there is internet (huggingface-cli download {spec} --local-dir DIR) and pass "
            f"--model {backend}:DIR")
    try:
        model = cls.from_pretrained(path if local else spec)
        tokenizer = AutoTokenizer.from_pretrained(path if local else spec)
    except OSError as err:
        where = f"the directory {path} lacks the weights, config or tokenizer files" if local else (
            f"'{spec}' is not in the local Hugging Face cache and could not be downloaded")
        raise WeightsNotFoundError(
            f"could not load '{backend}:{spec}': {where} ({type(err).__name__}: {err}).\n"
            f"On a machine with internet run\n  huggingface-cli download {spec if not local else '<hub id>'}"
            f" --local-dir /path/to/dir\ncopy that directory here and pass --model {backend}:/path/to/dir "
            f"(or copy the hub cache, HF_HOME, and keep --model {backend}:<hub id>)."
        ) from err
    return model.to(device).eval(), tokenizer


def _cached(repo_id: str) -> bool:
    from huggingface_hub import try_to_load_from_cache

    try:
        return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)
    except ValueError:  # not a valid repo id: the loader says so
        return True


class HFDualEncoder(DualEncoder):
    """A transformers model + tokenizer: square-resized images, texts padded to ``max_tokens``."""

    def __init__(self, model: nn.Module, tokenizer, max_tokens: int, image_size: int):
        super().__init__()
        self.model = model
        self._tokenizer = tokenizer
        self.max_tokens = max_tokens
        self.image_size = image_size
        self._transform, self.preprocess_id = square_transform(self.image_size)

    def preprocess(self, image) -> torch.Tensor:
        return self._transform(image.convert("RGB"))

    def tokenize(self, texts: list[str]) -> dict[str, torch.Tensor]:
        enc = self._tokenizer(list(texts), padding="max_length", truncation=True, max_length=self.max_tokens,
                              return_tensors="pt")
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
