"""``source``: the unadapted model, the baseline every method is compared with."""

from __future__ import annotations

import torch

from .base import Method


class Source(Method):
    name = "source"
    adapts = False

    @torch.no_grad()
    def forward_and_adapt(self, query_batch, step):
        return self.encode(query_batch) @ self.gallery.T, {}
