"""The online core that ``run``, ``bench`` and ``serve`` share: a source model, a method and a fixed gallery.

A :class:`Retriever` answers query batches with the current (adapted) parameters and adapts on them; it
knows nothing about where batches come from (a file stream, a server) nor about any particular method.
"""

from __future__ import annotations

from typing import Any

import torch

from .. import methods
from ..models import DualEncoder
from .stream import to_model_input


class Retriever:
    def __init__(self, model: DualEncoder, gallery: torch.Tensor, modality: str, method: str = "source",
                 adapt_config: methods.AdaptConfig | None = None, device: str = "cpu", index=None):
        self.model, self.gallery, self.modality, self.device = model, gallery, modality, device
        self.index = index  # candidate search (engine.gallery_index); None: exact top-k of the full scores
        self.method = methods.get(method)(model, gallery, modality, adapt_config)

    def model_input(self, items):
        """Collated query items (preprocessed image tensors or raw texts) -> the query tower's input."""
        return to_model_input(self.model, self.modality, items, self.device)

    def adapt(self, query_input) -> tuple[torch.Tensor, dict[str, Any]]:
        """Adapt on one batch (the method's steps); returns the recorded scores (B x N) and the log dict."""
        return self.method.step(query_input)

    @torch.no_grad()
    def encode(self, query_input, source: bool = False) -> torch.Tensor:
        """Query embeddings with the current parameters (or the source ones), without adapting."""
        return self.method.encode_with_source(query_input) if source else self.method.encode(query_input)

    @torch.no_grad()
    def scores(self, query_input, source: bool = False) -> torch.Tensor:
        """Scores against the gallery with the current parameters (or the source ones), without adapting."""
        return self.encode(query_input, source) @ self.gallery.T

    @torch.no_grad()
    def search(self, query_input, k: int = 10, source: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-``k`` gallery scores and indices per query (B x k each), highest first."""
        if self.index is not None:
            q = self.method.encode_with_source(query_input) if source else self.method.encode(query_input)
            return self.index.search(q, k)
        scores = self.scores(query_input, source)
        return scores.topk(min(k, scores.shape[1]), dim=1)

    def adapted_parameters(self) -> dict[str, torch.Tensor]:
        """A copy of the parameters the method adapts (qualified names in the model), current values."""
        return {n: p.detach().clone() for n, p in self.method.named_params}

    def state_dict(self) -> dict[str, Any]:
        return self.method.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.method.load_state_dict(state)

    def reset(self) -> None:
        """Back to the source parameters and a fresh method state."""
        self.method.reset()
