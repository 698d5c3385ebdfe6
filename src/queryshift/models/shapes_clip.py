"""The small open_clip CLIPs shipped with the package, trained on the shapes world.

* ``shapes-clip-general``: the general stage (domain styles, paraphrases, typos, photo-like variation);
* ``shapes-clip``: the general model customized to the clean target domain: the default source model.

They let every method run end to end with no download (``--model shapes-clip --data shapes``). The weights
are stored in fp16 to stay small and are cast to fp32 on load; ``queryshift train-source`` rebuilds them
(docs/model-card-shapes-clip.md and docs/model-card-shapes-clip-general.md give the commands).
"""

from __future__ import annotations

import os

from . import openclip
from .base import WeightsNotFoundError

ARCH = "qs-shapes"
ASSETS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "assets")
CHECKPOINT = os.path.join(ASSETS, "shapes-clip.pt")
GENERAL_CHECKPOINT = os.path.join(ASSETS, "shapes-clip-general.pt")
REBUILD = {
    "shapes-clip": "queryshift train-source --stage custom --init {general} (see its model card)",
    "shapes-clip-general": "queryshift train-source --stage general (see its model card)",
}


def load_alias(name: str, device: str = "cpu") -> openclip.OpenCLIPEncoder:
    # module attributes are read at call time, so tests can point them elsewhere
    path = GENERAL_CHECKPOINT if name == "shapes-clip-general" else CHECKPOINT
    if not os.path.isfile(path):
        raise WeightsNotFoundError(
            f"the shipped {name} checkpoint is missing: {path}. Reinstall queryshift, or rebuild it with\n"
            f"  {REBUILD[name].format(general=GENERAL_CHECKPOINT)} --out {path}"
        )
    return openclip.load(f"{ARCH}@{path}", device)
