"""BLIP retrieval backbone through Hugging Face transformers: ``hf-blip:<hub id or local directory>``.

E.g. ``hf-blip:Salesforce/blip-itm-base-coco`` (also ``-large-coco``, ``-base-flickr``, ``-large-flickr``) or
``hf-blip:/path/to/dir`` holding a ``save_pretrained`` layout. Embeddings follow the ITC path of
``BlipForImageTextRetrieval(use_itm_head=False)`` and the TCR code: image = CLS of the vision
model's last hidden state -> ``vision_proj`` -> L2; text = CLS of the unimodal text encoder -> ``text_proj``
-> L2. Texts are padded/truncated to 35 BERT tokens; images are resized to the config's square size
(384 for the released checkpoints) without cropping and normalised with CLIP's mean/std.
"""

from __future__ import annotations

import torch
from torch import nn

from ._hf import HFDualEncoder, from_pretrained
from .base import l2_normalize

BLIP_MAX_TOKENS = 35


class HFBlipEncoder(HFDualEncoder):
    def __init__(self, model: nn.Module, tokenizer, max_tokens: int = BLIP_MAX_TOKENS):
        super().__init__(model, tokenizer, max_tokens, int(model.config.vision_config.image_size))

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        hidden = self.model.vision_model(pixel_values=images).last_hidden_state
        return l2_normalize(self.model.vision_proj(hidden[:, 0, :]))

    def encode_text(self, tokens: dict[str, torch.Tensor]) -> torch.Tensor:
        device = self.model.text_proj.weight.device
        hidden = self.model.text_encoder(input_ids=tokens["input_ids"].to(device),
                                         attention_mask=tokens["attention_mask"].to(device)).last_hidden_state
        return l2_normalize(self.model.text_proj(hidden[:, 0, :]))

    def tower(self, which: str) -> nn.Module:
        # the TCR code: i2t adapts every LN of the ViT (layer_norm1/2 + post_layernorm = BLIP's final `norm`);
        # t2i every LN of the BERT text encoder, including the cross-attention LNs, which get no gradient
        return self.model.vision_model if which == "image" else self.model.text_encoder


def load(spec: str, device: str = "cpu") -> HFBlipEncoder:
    from transformers import BlipForImageTextRetrieval

    model, tokenizer = from_pretrained(BlipForImageTextRetrieval, spec, "hf-blip", device)
    return HFBlipEncoder(model, tokenizer).to(device)
