"""CAV-MAE's audio and visual towers (the backbone READ adapts): ``cav-mae:<checkpoint .pth or directory>``.

The architecture of CAV-MAE (Gong et al., ICLR 2023; ``YuanGongND/cav-mae`` ``src/models/cav_mae.py``, also
READ's ``models/cav_mae.py``), written here with the same parameter names so its released state dicts load:

- audio: a Kaldi-style log-mel filterbank (128 bins, 25 ms Hanning windows every 10 ms, no dither, as
  ``torchaudio.compliance.kaldi.fbank`` in their dataloader; computed by ``kaldi-native-fbank``) of the
  mean-removed 16 kHz waveform, zero-padded or cut to 1024 frames, then normalised with their dataset
  constants ``(fbank + 5.081) / 4.4849``; 16x16 patches (``patch_embed_a``), sin-cos position and modality
  embeddings, 11 audio blocks (``blocks_a``);
- video: one frame (the middle one of the clip's frames: READ's ``frame_use`` 5 of 10) resized to 224 px
  (bicubic, shorter side), centre-cropped, normalised with the ImageNet mean/std; 16x16 patches
  (``patch_embed_v``) and 11 visual blocks (``blocks_v``);
- then the shared block(s) ``blocks_u`` with the modality's own LayerNorms (``norm1_a``/``norm2_a`` or
  ``_v``), the modality's final norm (``norm_a`` / ``norm_v``), and the mean over the tokens: CAV-MAE's
  ``forward_feat`` and mean pooling, its retrieval features, L2-normalised.

``load(spec)`` takes a released checkpoint (a state dict saved through ``nn.DataParallel``: the ``module.``
prefix is stripped; the pretraining decoder, the fine-tuning head and READ's fused-attention copies are
ignored; every encoder weight must be there) or a directory holding ``config.json`` (fields of
:class:`CAVMAEConfig`, for other sizes) and one ``.pth`` (or the one ``config.json`` names as ``checkpoint``).
The query tower's adaptable LayerNorms are those its tokens pass: its own blocks' ``norm1``/``norm2``, the
shared blocks' ``norm1_<m>``/``norm2_<m>`` and ``norm_<m>``.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import asdict, dataclass, fields

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from .base import DualEncoder, WeightsNotFoundError, l2_normalize

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
SAMPLE_RATE = 16_000

# released-checkpoint entries that are not part of the two encoders: the MAE decoder of the pretrained models,
# the classification head of the fine-tuned ones, READ's q/k/v copies of the shared blocks' qkv
_NOT_ENCODER = re.compile(r"^(decoder_.*|mask_token|mlp_head\..*|blocks_u\.\d+\.attn\.[qkv]\.(weight|bias))$")


@dataclass(frozen=True)
class CAVMAEConfig:
    """CAV-MAE base by default (ViT-B/16 towers, 11 modality-specific blocks and 1 shared)."""

    img_size: int = 224
    audio_length: int = 1024  # fbank frames (10.24 s)
    mel_bins: int = 128
    patch_size: int = 16
    embed_dim: int = 768
    depth: int = 12  # modality-specific + shared blocks
    modality_specific_depth: int = 11
    num_heads: int = 12
    mlp_ratio: float = 4.0
    audio_mean: float = -5.081  # CAV-MAE's fbank normalisation (AudioSet statistics), also used by READ
    audio_std: float = 4.4849

    @classmethod
    def from_dict(cls, values: dict, where: str) -> CAVMAEConfig:
        if not isinstance(values, dict):
            raise ValueError(f"{where}: expected a JSON object of CAV-MAE settings, got {type(values).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known - {"checkpoint"})
        if unknown:
            raise ValueError(f"{where}: unknown setting(s) {unknown}; known: {sorted(known)}")
        return cls(**{k: v for k, v in values.items() if k in known})


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        return self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, c))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """A pre-norm transformer block with three pairs of LayerNorms: joint (``norm1``), audio (``_a``), visual
    (``_v``); CAV-MAE's shared blocks pick the pair by the modality of the tokens they are given."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float):
        super().__init__()
        self.norm1, self.norm1_a, self.norm1_v = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = Attention(dim, num_heads)
        self.norm2, self.norm2_a, self.norm2_v = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor, modality: str = "") -> torch.Tensor:
        suffix = f"_{modality}" if modality else ""
        x = x + self.attn(getattr(self, "norm1" + suffix)(x))
        return x + self.mlp(getattr(self, "norm2" + suffix)(x))


class PatchEmbed(nn.Module):
    def __init__(self, patch_size: int, in_chans: int, dim: int):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class CAVMAENet(nn.Module):
    """The encoder half of CAV-MAE; parameter names as in the released state dicts."""

    def __init__(self, cfg: CAVMAEConfig):
        super().__init__()
        dim, p = cfg.embed_dim, cfg.patch_size
        if cfg.img_size % p or cfg.audio_length % p or cfg.mel_bins % p:
            raise ValueError(f"CAV-MAE: img_size, audio_length and mel_bins must be multiples of patch_size {p}")
        if not 0 < cfg.modality_specific_depth < cfg.depth:
            raise ValueError("CAV-MAE: modality_specific_depth must be between 1 and depth - 1")
        self.patch_embed_a = PatchEmbed(p, 1, dim)
        self.patch_embed_v = PatchEmbed(p, 3, dim)
        self.modality_a = nn.Parameter(torch.zeros(1, 1, dim))
        self.modality_v = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed_a = nn.Parameter(torch.zeros(1, cfg.audio_length * cfg.mel_bins // p**2, dim))
        self.pos_embed_v = nn.Parameter(torch.zeros(1, (cfg.img_size // p) ** 2, dim))
        specific, shared = cfg.modality_specific_depth, cfg.depth - cfg.modality_specific_depth
        self.blocks_a = nn.ModuleList([Block(dim, cfg.num_heads, cfg.mlp_ratio) for _ in range(specific)])
        self.blocks_v = nn.ModuleList([Block(dim, cfg.num_heads, cfg.mlp_ratio) for _ in range(specific)])
        self.blocks_u = nn.ModuleList([Block(dim, cfg.num_heads, cfg.mlp_ratio) for _ in range(shared)])
        self.norm_a, self.norm_v, self.norm = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)
        for param in (self.modality_a, self.modality_v, self.pos_embed_a, self.pos_embed_v):
            nn.init.normal_(param, std=0.02)  # a checkpoint overwrites these (their sin-cos tables are saved)

    def features(self, modality: str, x: torch.Tensor) -> torch.Tensor:
        """CAV-MAE's ``forward_feat`` for one modality: tokens [B, N, D] after its final norm."""
        if modality == "a":
            x = self.patch_embed_a(x.unsqueeze(1).transpose(2, 3)) + self.pos_embed_a + self.modality_a
        else:
            x = self.patch_embed_v(x) + self.pos_embed_v + self.modality_v
        for blk in self.blocks_a if modality == "a" else self.blocks_v:
            x = blk(x)
        for blk in self.blocks_u:
            x = blk(x, modality)
        return (self.norm_a if modality == "a" else self.norm_v)(x)


class CAVMAEEncoder(DualEncoder):
    towers = ("video", "audio")

    def __init__(self, cfg: CAVMAEConfig | None = None):
        super().__init__()
        self.config = cfg or CAVMAEConfig()
        self.net = CAVMAENet(self.config)
        from torchvision import transforms

        size = self.config.img_size
        self._frame_transform = transforms.Compose([
            transforms.Resize(size, interpolation=transforms.InterpolationMode.BICUBIC),
            transforms.CenterCrop(size),
            transforms.ToTensor(),
            transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ])
        c = self.config
        self.preprocess_id = (f"cav-mae-video:middle-frame-resize{size}-bicubic-centercrop-imagenet;"
                              f"audio:kaldi-fbank{c.mel_bins}-hanning-{c.audio_length}frames-"
                              f"norm({c.audio_mean},{c.audio_std})")

    # -- preprocessing (loader workers) -------------------------------------------------------------------

    def preprocess_video(self, clip) -> torch.Tensor:
        """uint8 frames [T, H, W, 3] (or one frame [H, W, 3]) -> the middle frame as a normalised [3, S, S]."""
        from PIL import Image

        frames = np.asarray(clip)
        if frames.ndim == 3:
            frames = frames[None]
        if frames.ndim != 4 or frames.shape[-1] != 3 or not len(frames):
            raise ValueError(f"cav-mae: a video must be uint8 frames [T, H, W, 3], got shape {frames.shape}")
        # READ evaluates on frame int(total_frame / 2) of the 10 extracted (CAV-MAE's retrieval: frame 5)
        return self._frame_transform(Image.fromarray(np.ascontiguousarray(frames[len(frames) // 2], np.uint8)))

    def preprocess_audio(self, waveform) -> torch.Tensor:
        """Mono float32 waveform at 16 kHz -> the normalised fbank [audio_length, mel_bins]."""
        try:
            import kaldi_native_fbank as knf
        except ImportError as err:
            raise ImportError("cav-mae's audio front end needs kaldi-native-fbank: "
                              "pip install 'queryshift[av]'") from err

        wave = np.asarray(waveform, dtype=np.float32)
        if wave.ndim != 1:
            raise ValueError(f"cav-mae: audio must be a mono waveform (1-D), got shape {wave.shape}")
        opts = knf.FbankOptions()
        opts.frame_opts.samp_freq = SAMPLE_RATE
        opts.frame_opts.dither = 0.0
        opts.frame_opts.window_type = "hanning"
        opts.mel_opts.num_bins = self.config.mel_bins
        opts.use_energy = False
        opts.htk_compat = True
        fbank = knf.OnlineFbank(opts)
        fbank.accept_waveform(SAMPLE_RATE, wave - wave.mean() if len(wave) else wave)
        fbank.input_finished()
        frames = min(fbank.num_frames_ready, self.config.audio_length)
        out = torch.zeros(self.config.audio_length, self.config.mel_bins)  # zero padding, then normalised
        if frames:
            out[:frames] = torch.from_numpy(np.stack([fbank.get_frame(i) for i in range(frames)]))
        return (out - self.config.audio_mean) / self.config.audio_std

    # -- encoders -----------------------------------------------------------------------------------------

    def encode_video(self, frames: torch.Tensor) -> torch.Tensor:
        return l2_normalize(self.net.features("v", frames.to(self.net.pos_embed_v.device)).mean(dim=1))

    def encode_audio(self, fbanks: torch.Tensor) -> torch.Tensor:
        return l2_normalize(self.net.features("a", fbanks.to(self.net.pos_embed_a.device)).mean(dim=1))

    def tower(self, which: str) -> nn.Module:
        return self.net.blocks_a if which == "audio" else self.net.blocks_v

    def adaptable_layernorms(self, which: str, include_final_ln: bool = False) -> list[tuple[str, nn.Module]]:
        """The LayerNorms the ``which`` tokens pass (each block holds all three pairs; only one pair is used)."""
        if which not in self.towers:
            raise ValueError(f"unknown tower {which!r}; expected one of {self.towers}")
        m = "a" if which == "audio" else "v"
        found = []
        for i, blk in enumerate(getattr(self.net, f"blocks_{m}")):
            found += [(f"net.blocks_{m}.{i}.norm1", blk.norm1), (f"net.blocks_{m}.{i}.norm2", blk.norm2)]
        for i, blk in enumerate(self.net.blocks_u):
            found += [(f"net.blocks_u.{i}.norm{k}_{m}", getattr(blk, f"norm{k}_{m}")) for k in (1, 2)]
        return found + [(f"net.norm_{m}", getattr(self.net, f"norm_{m}"))]

    # -- checkpoints --------------------------------------------------------------------------------------

    def load_released(self, state: dict, where: str) -> None:
        """Load a released CAV-MAE state dict (``module.`` prefixes, decoder/head entries allowed); every encoder
        weight must be present with its shape."""
        if isinstance(state, dict) and len(state) == 1 and isinstance(next(iter(state.values())), dict):
            state = next(iter(state.values()))  # {"state_dict": {...}} / {"model": {...}}
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise ValueError(f"{where}: not a CAV-MAE state dict (expected a dict of tensors)")
        state = {k.removeprefix("module."): v for k, v in state.items()}
        expected = self.net.state_dict()
        missing = sorted(set(expected) - set(state))
        unexpected = sorted(k for k in set(state) - set(expected) if not _NOT_ENCODER.match(k))
        if missing or unexpected:
            parts = [f"missing {len(missing)} key(s): {_listing(missing)}" if missing else "",
                     f"unexpected {len(unexpected)} key(s): {_listing(unexpected)}" if unexpected else ""]
            raise ValueError(f"{where}: does not match the CAV-MAE encoder ({'; '.join(p for p in parts if p)}); "
                             f"a checkpoint of another size needs a config.json beside it")
        for key, value in expected.items():
            if state[key].shape != value.shape:
                raise ValueError(f"{where}: {key} has shape {tuple(state[key].shape)}, the model expects "
                                 f"{tuple(value.shape)} (config {asdict(self.config)}); give the matching "
                                 f"config.json")
        self.net.load_state_dict({k: state[k] for k in expected})


def _listing(keys: list[str], limit: int = 8) -> str:
    return ", ".join(keys[:limit]) + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")


def _resolve(spec: str) -> tuple[str, CAVMAEConfig]:
    """``spec`` -> (checkpoint file, config)."""
    path = os.path.expanduser(spec)
    if not spec:
        raise ValueError("cav-mae needs a checkpoint: --model cav-mae:PATH (a released CAV-MAE .pth, or a folder "
                         "with config.json and the .pth)")
    if not os.path.exists(path):
        raise WeightsNotFoundError(
            f"CAV-MAE checkpoint not found: {path} (model 'cav-mae:{spec}'). Weights cannot be downloaded here: "
            f"fetch a released checkpoint (e.g. the pretrained CAV-MAE .pth linked from the CAV-MAE or READ README) "
            f"where there is internet, copy it here and pass --model cav-mae:/path/to/model.pth")
    if not os.path.isdir(path):
        return path, CAVMAEConfig()
    config_file = os.path.join(path, "config.json")
    values = {}
    if os.path.isfile(config_file):
        try:
            with open(config_file, encoding="utf-8") as f:
                values = json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ValueError(f"{config_file}: not valid JSON ({err})") from err
    cfg = CAVMAEConfig.from_dict(values, config_file)
    if isinstance(values.get("checkpoint"), str):
        return os.path.join(path, values["checkpoint"]), cfg
    found = sorted(n for n in os.listdir(path) if n.endswith((".pth", ".pt")))
    if len(found) != 1:
        raise WeightsNotFoundError(
            f"{path}: expected one CAV-MAE checkpoint (.pth) in the folder, found "
            f"{', '.join(found) if found else 'none'}; name it in config.json as \"checkpoint\"")
    return os.path.join(path, found[0]), cfg


def load(spec: str, device: str = "cpu") -> CAVMAEEncoder:
    checkpoint, cfg = _resolve(spec)
    if not os.path.isfile(checkpoint):
        raise WeightsNotFoundError(f"CAV-MAE checkpoint not found: {checkpoint} (model 'cav-mae:{spec}')")
    try:  # weights_only: a state dict of tensors needs no unpickling of arbitrary objects
        state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several types for a file that is not a plain checkpoint
        raise ValueError(f"{checkpoint}: not a PyTorch state dict of tensors ({type(err).__name__}: "
                         f"{str(err).splitlines()[0][:200] if str(err) else ''})") from err
    model = CAVMAEEncoder(cfg)
    model.load_released(state, checkpoint)
    return model.to(device).eval()
