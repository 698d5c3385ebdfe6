"""``shapes-av``: the small video-audio dual encoder shipped with the package, trained on the shapes-av world.

Two towers in the manner of CAV-MAE's (READ's audio-visual backbone), scaled down for a CPU:

* video: the clip's frames resized to :data:`IMAGE_SIZE` px, cut into space-time patches (``tubelet`` frames x
  ``patch`` x ``patch`` px) by one linear embedding, a learnt position embedding, pre-LayerNorm transformer
  blocks, a final LayerNorm, the mean over tokens and a linear projection;
* audio: a log-mel spectrogram (torch STFT and a mel filterbank computed here, no torchaudio), normalised by
  fixed statistics of the training set as CAV-MAE normalises its fbank features, cut into patches of all mel
  bins x ``audio_patch`` frames, then the same kind of tower.

Both embeddings are L2-normalised. A query tower adapts through its LayerNorms (``tower(m)``). The shipped
weights (``assets/shapes-av.pt``, fp16, config inside) come from ``queryshift train-av``
(docs/model-card-shapes-av.md gives the commands).
"""

from __future__ import annotations

import math
import os

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from .base import CLIP_MEAN, CLIP_STD, DualEncoder, WeightsNotFoundError, l2_normalize

ASSETS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "assets")
CHECKPOINT = os.path.join(ASSETS, "shapes-av.pt")
REBUILD = "queryshift train-av --stage general, then --stage custom (docs/model-card-shapes-av.md has the commands)"
SAMPLE_RATE = 16_000

CONFIG = {
    "frames": 8, "image_size": 64, "patch": 16, "tubelet": 4,
    "sample_rate": SAMPLE_RATE, "seconds": 1.0, "n_fft": 512, "hop": 160, "n_mels": 64, "f_min": 50.0,
    "f_max": 8000.0, "audio_patch": 4,
    # log-mel statistics of the clean training clips (mean and std over every bin), as CAV-MAE's norm_mean/std
    "mel_mean": -10.0, "mel_std": 5.0,
    "width": 96, "heads": 4, "video_layers": 2, "audio_layers": 2, "mlp_ratio": 4.0, "embed_dim": 128,
}


def mel_filterbank(sample_rate: int, n_fft: int, n_mels: int, f_min: float, f_max: float) -> np.ndarray:
    """[n_mels, n_fft // 2 + 1] triangular filters on the HTK mel scale, unnormalised: the same matrix as
    ``librosa.filters.mel(htk=True, norm=None)`` and torchaudio's ``melscale_fbanks`` (neither is a dependency)."""
    def to_mel(hz):
        return 2595.0 * np.log10(1.0 + np.asarray(hz, dtype=np.float64) / 700.0)

    def to_hz(mel):
        return 700.0 * (10.0 ** (np.asarray(mel) / 2595.0) - 1.0)

    edges = to_hz(np.linspace(to_mel(f_min), to_mel(f_max), n_mels + 2))
    bins = np.linspace(0, sample_rate / 2, n_fft // 2 + 1)
    rising = (bins[None, :] - edges[:-2, None]) / (edges[1:-1] - edges[:-2])[:, None]
    falling = (edges[2:, None] - bins[None, :]) / (edges[2:] - edges[1:-1])[:, None]
    return np.maximum(0.0, np.minimum(rising, falling)).astype(np.float32)


class LogMel(nn.Module):
    """Mono 16 kHz waveforms [B, samples] -> normalised log-mel spectrograms [B, n_mels, frames]."""

    def __init__(self, cfg: dict):
        super().__init__()
        self.cfg = cfg
        self.samples = int(round(cfg["seconds"] * cfg["sample_rate"]))
        self.frames = self.samples // cfg["hop"] // cfg["audio_patch"] * cfg["audio_patch"]
        fb = mel_filterbank(cfg["sample_rate"], cfg["n_fft"], cfg["n_mels"], cfg["f_min"], cfg["f_max"])
        # derived from the config, so not saved in the state dict
        self.register_buffer("filters", torch.from_numpy(fb), persistent=False)
        self.register_buffer("window", torch.hann_window(cfg["n_fft"]), persistent=False)

    def forward(self, waveforms: torch.Tensor) -> torch.Tensor:
        x = waveforms.float()
        x = F.pad(x, (0, max(0, self.samples - x.shape[-1])))[..., :self.samples]  # 1 s: pad or cut, as CAV-MAE
        spec = torch.stft(x, self.cfg["n_fft"], self.cfg["hop"], window=self.window, return_complex=True)
        mel = self.filters @ spec.abs().pow(2)
        logmel = torch.log(mel + 1e-6)[..., :self.frames]
        return (logmel - self.cfg["mel_mean"]) / self.cfg["mel_std"]


class Tower(nn.Module):
    """Patch tokens -> pre-LayerNorm transformer blocks -> LayerNorm -> mean over tokens -> projection."""

    def __init__(self, embed: nn.Module, tokens: int, cfg: dict, layers: int):
        super().__init__()
        width = cfg["width"]
        self.embed = embed
        self.position = nn.Parameter(torch.randn(1, tokens, width) * 0.02)
        self.blocks = nn.ModuleList(
            nn.TransformerEncoderLayer(width, cfg["heads"], int(width * cfg["mlp_ratio"]), dropout=0.0,
                                       activation="gelu", batch_first=True, norm_first=True)
            for _ in range(layers))
        self.norm = nn.LayerNorm(width)
        self.proj = nn.Linear(width, cfg["embed_dim"], bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.embed(x).flatten(2).transpose(1, 2) + self.position  # [B, tokens, width]
        for block in self.blocks:
            tokens = block(tokens)
        return self.proj(self.norm(tokens).mean(dim=1))


class VideoPatches(nn.Module):
    """[B, T, 3, H, W] -> [B, width, T', H', W'] with one linear map per space-time patch."""

    def __init__(self, cfg: dict):
        super().__init__()
        t, p = cfg["tubelet"], cfg["patch"]
        self.conv = nn.Conv3d(3, cfg["width"], kernel_size=(t, p, p), stride=(t, p, p))

    def forward(self, clips: torch.Tensor) -> torch.Tensor:
        return self.conv(clips.transpose(1, 2))


class AudioPatches(nn.Module):
    """[B, n_mels, frames] -> [B, width, 1, frames / audio_patch]: each patch spans every mel bin."""

    def __init__(self, cfg: dict):
        super().__init__()
        self.conv = nn.Conv2d(1, cfg["width"], kernel_size=(cfg["n_mels"], cfg["audio_patch"]),
                              stride=(cfg["n_mels"], cfg["audio_patch"]))

    def forward(self, logmels: torch.Tensor) -> torch.Tensor:
        return self.conv(logmels.unsqueeze(1))


class ShapesAVEncoder(DualEncoder):
    name = "shapes-av"
    towers = ("video", "audio")

    def __init__(self, config: dict | None = None):
        super().__init__()
        cfg = {**CONFIG, **(config or {})}
        self.config = cfg
        self.logmel = LogMel(cfg)
        video_tokens = (cfg["frames"] // cfg["tubelet"]) * (cfg["image_size"] // cfg["patch"]) ** 2
        self.video = Tower(VideoPatches(cfg), video_tokens, cfg, cfg["video_layers"])
        self.audio = Tower(AudioPatches(cfg), self.logmel.frames // cfg["audio_patch"], cfg, cfg["audio_layers"])
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
        self.register_buffer("mean", torch.tensor(CLIP_MEAN).view(1, 1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(CLIP_STD).view(1, 1, 3, 1, 1), persistent=False)
        self.preprocess_id = (f"shapes-av:frames{cfg['frames']}-resize{cfg['image_size']}-bilinear-aa;"
                              f"logmel{cfg['n_mels']}-fft{cfg['n_fft']}-hop{cfg['hop']}-{cfg['seconds']}s")

    # -- per item (loader workers) --------------------------------------------------------------

    def video_pixels(self, clip) -> torch.Tensor:
        """A uint8 clip [T, H, W, 3] -> uint8 [frames, 3, size, size]: ``frames`` frames evenly spaced over the
        clip, each resized (bilinear, antialiased) to the model input."""
        clip = np.asarray(clip)
        if clip.ndim != 4 or clip.shape[-1] != 3 or clip.dtype != np.uint8 or len(clip) == 0:
            raise ValueError(f"{self.name}: a video item must be a uint8 array [T, H, W, 3], "
                             f"got {clip.dtype} {clip.shape}")
        pick = np.linspace(0, len(clip) - 1, self.config["frames"]).round().astype(int)
        frames = torch.from_numpy(np.ascontiguousarray(clip[pick])).permute(0, 3, 1, 2)
        size = self.config["image_size"]
        if frames.shape[-2:] == (size, size):
            return frames.contiguous()
        resized = F.interpolate(frames.float(), size=(size, size), mode="bilinear", antialias=True,
                                align_corners=False)
        return resized.round().clamp(0, 255).to(torch.uint8)

    def preprocess_video(self, clip) -> torch.Tensor:
        return self.normalise_video(self.video_pixels(clip).unsqueeze(0))[0]

    def normalise_video(self, pixels: torch.Tensor) -> torch.Tensor:
        """uint8 [B, T, 3, H, W] -> the video tower's float input."""
        return (pixels.float() / 255 - self.mean) / self.std

    def preprocess_audio(self, waveform) -> torch.Tensor:
        """A mono float32 waveform at 16 kHz -> its normalised log-mel spectrogram [n_mels, frames]."""
        x = np.asarray(waveform, dtype=np.float32)
        if x.ndim != 1 or x.size == 0:
            raise ValueError(f"{self.name}: an audio item must be a non-empty mono waveform, got shape {x.shape}")
        with torch.no_grad():
            return self.logmel(torch.from_numpy(x).unsqueeze(0))[0]

    # -- batched --------------------------------------------------------------------------------

    def encode_video(self, clips: torch.Tensor) -> torch.Tensor:
        return l2_normalize(self.video(clips))

    def encode_audio(self, logmels: torch.Tensor) -> torch.Tensor:
        return l2_normalize(self.audio(logmels))

    def tower(self, which: str) -> nn.Module:
        if which not in self.towers:
            raise ValueError(f"{self.name} has no {which!r} tower; its towers are {', '.join(self.towers)}")
        return self.video if which == "video" else self.audio


def save_checkpoint(model: ShapesAVEncoder, path: str) -> None:
    """fp16 weights and the config in one plain file (loadable with ``weights_only``)."""
    from ..atomic import save_torch

    save_torch({"config": dict(model.config),
                "state_dict": {k: v.detach().half() for k, v in model.state_dict().items()}}, path)


def load_checkpoint(path: str, device: str = "cpu") -> ShapesAVEncoder:
    """A checkpoint written by :func:`save_checkpoint` (tensors, numbers and strings only), in fp32."""
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
        model = ShapesAVEncoder(saved["config"])
        model.load_state_dict({k: v.float() for k, v in saved["state_dict"].items()})
    except (OSError, MemoryError):
        raise
    except Exception as err:  # noqa: BLE001 - not a torch file, holding objects (refused), wrong keys or shapes
        first = str(err).splitlines()[0][:200] if str(err) else ""
        raise ValueError(f"{path}: not a shapes-av checkpoint ({type(err).__name__}: {first})") from None
    return model.to(device).eval()


def load_alias(name: str, device: str = "cpu") -> ShapesAVEncoder:
    path = CHECKPOINT  # read at call time, so tests can point it elsewhere
    if not os.path.isfile(path):
        raise WeightsNotFoundError(f"the shipped {name} checkpoint is missing: {path}; reinstall queryshift, or "
                                   f"rebuild it with {REBUILD}")
    return load_checkpoint(path, device)
