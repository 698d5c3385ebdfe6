"""``shapes-clip``: the small open_clip CLIP shipped with the package, trained on the shapes world.

It lets every method run end to end with no download (``--model shapes-clip --data shapes``). The weights
are stored in fp16 to stay small and are cast to fp32 on load; ``queryshift train-source`` rebuilds them
(see docs/model-card-shapes-clip.md).
"""

from __future__ import annotations

import os

from . import openclip
from .base import WeightsNotFoundError

ARCH = "qs-shapes"
CHECKPOINT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "assets", "shapes-clip.pt")


def load_alias(name: str, device: str = "cpu") -> openclip.OpenCLIPEncoder:
    if not os.path.isfile(CHECKPOINT):
        raise WeightsNotFoundError(
            f"the shipped {name} checkpoint is missing: {CHECKPOINT}. Reinstall queryshift, or rebuild it with\n"
            f"  queryshift train-source --out {CHECKPOINT}"
        )
    return openclip.load(f"{ARCH}@{CHECKPOINT}", device)
