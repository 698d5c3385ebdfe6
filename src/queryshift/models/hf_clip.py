"""CLIP through Hugging Face transformers: ``hf-clip:<hub id or local directory>``.

E.g. ``hf-clip:openai/clip-vit-base-patch16`` or ``hf-clip:/path/to/dir`` (``save_pretrained`` layout). A second
path to the zero-shot CLIP of the TCR code besides ``openclip:ViT-B-16/openai``: image = pooled (post-LN CLS)
-> ``visual_projection`` -> L2; text = EOT token after ``final_layer_norm`` -> ``text_projection`` -> L2; 77
tokens; square bicubic resize without crop. Text queries adapt only the LNs of
``text_model.encoder`` (TCR's ``transformer``); ``final_layer_norm`` (TCR's ``ln_final``) is opt-in.
"""

from __future__ import annotations

import torch
from torch import nn

from ._hf import HFDualEncoder, from_pretrained
from .base import l2_normalize


class HFCLIPEncoder(HFDualEncoder):
    def __init__(self, model: nn.Module, tokenizer):
        super().__init__(model, tokenizer, int(model.config.text_config.max_position_embeddings),
                         int(model.config.vision_config.image_size))

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        pooled = self.model.vision_model(pixel_values=images).pooler_output
        return l2_normalize(self.model.visual_projection(pooled))

    def encode_text(self, tokens: dict[str, torch.Tensor]) -> torch.Tensor:
        device = self.model.text_projection.weight.device
        pooled = self.model.text_model(input_ids=tokens["input_ids"].to(device),
                                       attention_mask=tokens["attention_mask"].to(device)).pooler_output
        return l2_normalize(self.model.text_projection(pooled))

    def tower(self, which: str) -> nn.Module:
        return self.model.vision_model if which == "image" else self.model.text_model.encoder

    def extra_adaptable_modules(self, which: str) -> list[tuple[str, nn.Module]]:
        if which == "text":
            return [("model.text_model.final_layer_norm", self.model.text_model.final_layer_norm)]
        return []


def load(spec: str, device: str = "cpu") -> HFCLIPEncoder:
    from transformers import CLIPModel

    model, tokenizer = from_pretrained(CLIPModel, spec, "hf-clip", device)
    return HFCLIPEncoder(model, tokenizer).to(device)
