"""BLIP retrieval backbone through Hugging Face transformers: ``hf-blip:<hub id or local directory>``.

E.g. ``hf-blip:Salesforce/blip-itm-base-coco`` (also ``-large-coco``, ``-base-flickr``, ``-large-flickr``) or
``hf-blip:/path/to/dir`` holding a ``save_pretrained`` layout. Embeddings follow the ITC path of
``BlipForImageTextRetrieval(use_itm_head=False)`` and the TCR code (spec §1.2): image = CLS of the vision
model's last hidden state -> ``vision_proj`` -> L2; text = CLS of the unimodal text encoder -> ``text_proj``
-> L2. Texts are padded/truncated to 35 BERT tokens; images are resized to the config's square size
(384 for the released checkpoints) without cropping and normalised with CLIP's mean/std (spec §4.1).
"""

from __future__ import annotations

import os

import torch
from torch import nn
from torchvision import transforms

from .base import DualEncoder, WeightsNotFoundError, l2_normalize

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
BLIP_MAX_TOKENS = 35


def square_transform(size: int):
    """-> (transform, preprocess_id): square bicubic resize, no crop, CLIP normalisation (spec §4.1)."""
    tf = transforms.Compose([
        transforms.Resize((size, size), interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.ToTensor(),
        transforms.Normalize(CLIP_MEAN, CLIP_STD),
    ])
    return tf, f"resize{size}-bicubic-nocrop-mean{CLIP_MEAN}-std{CLIP_STD}"


def from_pretrained(cls, spec: str, backend: str, device: str):
    """Load ``cls`` and its tokenizer from a local directory or a hub id; missing weights ->
    :class:`WeightsNotFoundError` with download instructions."""
    from transformers import AutoTokenizer

    path = os.path.expanduser(spec)
    local = os.path.isdir(path)
    looks_like_path = os.path.isabs(path) or spec.startswith((".", "~")) or spec.count("/") > 1
    if not local and looks_like_path:
        raise WeightsNotFoundError(f"model directory not found: {path} (model '{backend}:{spec}')")
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


class HFBlipEncoder(DualEncoder):
    def __init__(self, model: nn.Module, tokenizer, max_tokens: int = BLIP_MAX_TOKENS):
        super().__init__()
        self.model = model
        self._tokenizer = tokenizer
        self.max_tokens = max_tokens
        self.image_size = int(model.config.vision_config.image_size)
        self._transform, self.preprocess_id = square_transform(self.image_size)

    def preprocess(self, image) -> torch.Tensor:
        return self._transform(image.convert("RGB"))

    def tokenize(self, texts: list[str]) -> dict[str, torch.Tensor]:
        enc = self._tokenizer(list(texts), padding="max_length", truncation=True, max_length=self.max_tokens,
                              return_tensors="pt")
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        hidden = self.model.vision_model(pixel_values=images).last_hidden_state
        return l2_normalize(self.model.vision_proj(hidden[:, 0, :]))

    def encode_text(self, tokens: dict[str, torch.Tensor]) -> torch.Tensor:
        device = self.model.text_proj.weight.device
        hidden = self.model.text_encoder(input_ids=tokens["input_ids"].to(device),
                                         attention_mask=tokens["attention_mask"].to(device)).last_hidden_state
        return l2_normalize(self.model.text_proj(hidden[:, 0, :]))

    def tower(self, which: str) -> nn.Module:
        # spec §1.3: i2t adapts every LN of the ViT (layer_norm1/2 + post_layernorm = BLIP's final `norm`);
        # t2i every LN of the BERT text encoder, including the cross-attention LNs, which get no gradient
        return self.model.vision_model if which == "image" else self.model.text_encoder


def load(spec: str, device: str = "cpu") -> HFBlipEncoder:
    from transformers import BlipForImageTextRetrieval

    model, tokenizer = from_pretrained(BlipForImageTextRetrieval, spec, "hf-blip", device)
    return HFBlipEncoder(model, tokenizer).to(device)
