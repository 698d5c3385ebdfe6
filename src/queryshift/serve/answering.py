"""The parameters that answer requests, kept apart from the ones the worker is changing.

The worker adapts its own model in place (forward, backward, optimizer step, several times per update),
so a request that used that model could read half-updated parameters or wait for a whole update. Instead
requests use :class:`AnsweringModel`: a copy of the model that owns only the adaptable parameters (a few
LayerNorms) and shares every frozen tensor with the worker's model. After an update the worker
*publishes* the new values into the copy; the lock is held only for one request's forward or for that
copy of the LayerNorm parameters, never for an update. A second such copy keeps the source parameters for
requests that ask not to be adapted.
"""

from __future__ import annotations

import copy
import threading

import torch

from ..models import DualEncoder


def sharing_copy(model: DualEncoder, own: set[str]) -> DualEncoder:
    """A copy of ``model`` whose parameters named in ``own`` are its own; all other tensors are shared."""
    clone = copy.deepcopy(model)
    params, buffers = dict(model.named_parameters()), dict(model.named_buffers())
    for name, p in clone.named_parameters():
        if name not in own:
            p.data = params[name].data
    for name, b in clone.named_buffers():
        b.data = buffers[name].data
    clone.requires_grad_(False)
    return clone.eval()


class AnsweringModel:
    def __init__(self, model: DualEncoder, adaptable: dict[str, list[str]]):
        """``adaptable``: query modality -> names of the parameters adapted for it (in ``model``)."""
        own = {n for names in adaptable.values() for n in names}
        self.current = sharing_copy(model, own)
        self.source = sharing_copy(model, own)  # never changes: needs no lock
        self.lock = threading.Lock()
        self._params = dict(self.current.named_parameters())
        self._source_values = {n: p.detach().clone() for n, p in self.source.named_parameters() if n in own}
        self.adaptable = adaptable
        #: per modality: whether the published parameters differ from the source ones
        self.adapted = {m: False for m in adaptable}

    @torch.inference_mode()
    def encode(self, modality: str, query_input, source: bool = False) -> tuple[torch.Tensor, bool]:
        """Query embeddings and whether adapted parameters produced them."""
        if source:
            return self.source.encode(modality, query_input), False
        with self.lock:
            return self.current.encode(modality, query_input), self.adapted[modality]

    @torch.no_grad()
    def publish(self, modality: str, values: dict[str, torch.Tensor]) -> None:
        """Make ``values`` (name -> tensor, e.g. ``Retriever.adapted_parameters()``) answer from now on."""
        adapted = any(not torch.equal(v, self._source_values[n]) for n, v in values.items())
        with self.lock:
            for name, value in values.items():
                self._params[name].copy_(value)
            self.adapted[modality] = adapted

    def publish_source(self, modality: str) -> None:
        self.publish(modality, {n: self._source_values[n] for n in self.adaptable[modality]})

    def values(self, modality: str) -> dict[str, torch.Tensor]:
        """A copy of the parameters answering ``modality`` queries now."""
        with self.lock:
            return {n: self._params[n].detach().clone() for n in self.adaptable[modality]}
