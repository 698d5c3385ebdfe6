"""CLAP through Hugging Face transformers (audio-text retrieval): ``hf-clap:<hub id or local directory>``.

E.g. ``hf-clap:laion/clap-htsat-unfused`` or ``hf-clap:/path/to/dir`` (``save_pretrained`` layout of a
``ClapModel`` with its ``ClapProcessor``: feature extractor and RoBERTa tokenizer). Audio arrives as mono 16 kHz
(queryshift's canonical form), is resampled (scipy, polyphase) to the feature extractor's rate (48 kHz for the
LAION checkpoints) and turned into its log-mel input; ``get_audio_features`` -> L2. Text: 77 tokens as
LAION-CLAP tokenises (fewer when the text model has fewer positions), ``get_text_features`` -> L2.

Deviation from the feature extractor's own handling: a clip longer than its ``max_length_s`` (10 s) is cut to
its first ``max_length_s`` seconds here, because the extractor would pick a random window (``rand_trunc``) or
random fusion chunks, and a retrieval run must embed a clip the same way every time; the fusion models therefore
see a clip as not longer (``is_longer`` false). Shorter clips are padded as the extractor does (``repeatpad``).

Audio queries adapt the LayerNorms of ``audio_model`` (the HTS-AT audio encoder); text queries those of
``text_model`` (RoBERTa: embeddings and every layer). The HTS-AT input BatchNorm stays in eval mode.
"""

from __future__ import annotations

import math
import os

import numpy as np
import torch
from torch import nn

from ._hf import from_pretrained
from .base import DualEncoder, WeightsNotFoundError, l2_normalize

SAMPLE_RATE = 16_000  # queryshift's audio items
LAION_TOKENS = 77  # LAION-CLAP pads and truncates every caption to 77 tokens


class HFCLAPEncoder(DualEncoder):
    towers = ("audio", "text")

    def __init__(self, model: nn.Module, tokenizer, feature_extractor):
        super().__init__()
        self.model = model
        self._tokenizer = tokenizer
        self._features = feature_extractor
        # RoBERTa's positions start after the padding index: max_position_embeddings - 2 usable tokens
        self.max_tokens = min(LAION_TOKENS, int(model.config.text_config.max_position_embeddings) - 2)
        self.sampling_rate = int(feature_extractor.sampling_rate)
        self.max_samples = int(feature_extractor.nb_max_samples)
        self.preprocess_id = (f"clap-audio:resample{SAMPLE_RATE}->{self.sampling_rate}-first{self.max_samples}-"
                              f"{type(feature_extractor).__name__}{feature_extractor.feature_size}-"
                              f"{feature_extractor.padding}")

    def preprocess_audio(self, waveform) -> torch.Tensor:
        """Mono float32 waveform at 16 kHz -> the feature extractor's input features [C, T, F]."""
        wave = np.asarray(waveform, dtype=np.float32)
        if wave.ndim != 1 or not len(wave):
            raise ValueError(f"hf-clap: audio must be a non-empty mono waveform (1-D), got shape {wave.shape}")
        if self.sampling_rate != SAMPLE_RATE:
            from scipy.signal import resample_poly

            g = math.gcd(SAMPLE_RATE, self.sampling_rate)
            wave = resample_poly(wave, self.sampling_rate // g, SAMPLE_RATE // g).astype(np.float32)
        wave = wave[: self.max_samples]  # deterministic: never the extractor's random window
        out = self._features(wave, sampling_rate=self.sampling_rate, return_tensors="pt")
        return out["input_features"][0]

    def tokenize(self, texts: list[str]) -> dict[str, torch.Tensor]:
        enc = self._tokenizer(list(texts), padding="max_length", truncation=True, max_length=self.max_tokens,
                              return_tensors="pt")
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}

    def encode_audio(self, features: torch.Tensor) -> torch.Tensor:
        device = self.model.audio_projection.linear1.weight.device
        is_longer = torch.zeros(len(features), 1, dtype=torch.bool, device=device)
        out = self.model.get_audio_features(input_features=features.to(device), is_longer=is_longer)
        return l2_normalize(out.pooler_output)

    def encode_text(self, tokens: dict[str, torch.Tensor]) -> torch.Tensor:
        device = self.model.text_projection.linear1.weight.device
        out = self.model.get_text_features(input_ids=tokens["input_ids"].to(device),
                                           attention_mask=tokens["attention_mask"].to(device))
        return l2_normalize(out.pooler_output)

    def tower(self, which: str) -> nn.Module:
        return self.model.audio_model if which == "audio" else self.model.text_model

    def train(self, mode: bool = True):
        super().train(mode)
        # the audio encoder's input BatchNorm keeps its running statistics (only LayerNorms adapt)
        self.model.audio_model.audio_encoder.batch_norm.eval()
        return self


def load(spec: str, device: str = "cpu") -> HFCLAPEncoder:
    from transformers import AutoFeatureExtractor, ClapModel

    model, tokenizer = from_pretrained(ClapModel, spec, "hf-clap", device)
    path = os.path.expanduser(spec)
    try:
        features = AutoFeatureExtractor.from_pretrained(path if os.path.isdir(path) else spec)
    except OSError as err:
        raise WeightsNotFoundError(f"could not load the CLAP feature extractor of 'hf-clap:{spec}' "
                                   f"(preprocessor_config.json or processor_config.json): {err}") from err
    return HFCLAPEncoder(model, tokenizer, features).to(device).eval()
