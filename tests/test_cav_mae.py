"""cav-mae backbone on a tiny random CAV-MAE saved locally in the released state-dict layout (no download)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from queryshift.models import WeightsNotFoundError, load_model
from queryshift.models.cav_mae import CAVMAEConfig, CAVMAEEncoder

pytest.importorskip("kaldi_native_fbank")

TINY = dict(img_size=32, audio_length=32, embed_dim=32, depth=3, modality_specific_depth=2, num_heads=2,
            mlp_ratio=2.0)
EPS = float(np.finfo(np.float32).eps)


def released_state(model: CAVMAEEncoder) -> dict:
    """The encoder as CAV-MAE releases it: saved through nn.DataParallel (``module.``), with the pretraining
    decoder and READ's fused-attention copies beside it."""
    state = {f"module.{k}": v.clone() for k, v in model.net.state_dict().items()}
    dim = model.config.embed_dim
    state["module.decoder_embed.weight"] = torch.zeros(16, dim)
    state["module.mask_token"] = torch.zeros(1, 1, 16)
    state["module.blocks_u.0.attn.q.weight"] = torch.zeros(dim, dim)
    return state


def save_tiny(folder, seed=0) -> CAVMAEEncoder:
    torch.manual_seed(seed)
    model = CAVMAEEncoder(CAVMAEConfig(**TINY)).eval()
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(TINY))
    torch.save(released_state(model), folder / "audio_model.21.pth")
    return model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cavmae") / "tiny"
    return folder, save_tiny(folder)


def _clips(n=4, frames=10):
    rng = np.random.default_rng(1)
    return [rng.integers(0, 255, (frames, 40, 56, 3), dtype=np.uint8) for _ in range(n)]


def _waves(n=4):
    rng = np.random.default_rng(2)
    t = np.arange(8_000) / 16_000
    return [(0.3 * np.sin(2 * np.pi * (300 + 200 * i) * t) + 0.01 * rng.standard_normal(len(t))).astype(np.float32)
            for i in range(n)]


def _encode(model, modality, items):
    with torch.no_grad():
        return model.encode(modality, torch.stack([model.prepare(modality, x) for x in items]))


def test_loaded_model_encodes_and_ranks_as_in_memory(tiny):
    folder, original = tiny
    loaded = load_model(f"cav-mae:{folder}")
    assert loaded.towers == ("video", "audio") and not loaded.training
    video, audio = _encode(loaded, "video", _clips()), _encode(loaded, "audio", _waves())
    assert video.shape == audio.shape == (4, 32) and video.dtype == torch.float32
    torch.testing.assert_close(video.norm(dim=-1), torch.ones(4))
    torch.testing.assert_close(audio.norm(dim=-1), torch.ones(4))
    ref_sim = _encode(original, "video", _clips()) @ _encode(original, "audio", _waves()).T
    torch.testing.assert_close(video @ audio.T, ref_sim, rtol=0, atol=1e-6)
    assert torch.equal((video @ audio.T).argsort(dim=1), ref_sim.argsort(dim=1))
    # another random model ranks differently: the weights really came from the file
    other = CAVMAEEncoder(CAVMAEConfig(**TINY)).eval()
    assert not torch.allclose(_encode(other, "audio", _waves()), audio)


@pytest.mark.parametrize("modality", ["audio", "video"])
def test_features_are_mean_pooled_modality_norm_tokens(tiny, modality):
    """encode = L2(mean over tokens of forward_feat): the modality's blocks, then the shared block with the
    modality's own norms, then its final norm."""
    _, model = tiny
    m = modality[0]
    batch = torch.stack([model.prepare(modality, x) for x in (_waves(2) if m == "a" else _clips(2))])
    net = model.net
    with torch.no_grad():
        if m == "a":
            x = net.patch_embed_a(batch.unsqueeze(1).transpose(2, 3)) + net.pos_embed_a + net.modality_a
        else:
            x = net.patch_embed_v(batch) + net.pos_embed_v + net.modality_v
        for blk in getattr(net, f"blocks_{m}"):
            x = x + blk.attn(blk.norm1(x))
            x = x + blk.mlp(blk.norm2(x))
        for blk in net.blocks_u:
            x = x + blk.attn(getattr(blk, f"norm1_{m}")(x))
            x = x + blk.mlp(getattr(blk, f"norm2_{m}")(x))
        expected = torch.nn.functional.normalize(getattr(net, f"norm_{m}")(x).mean(dim=1), dim=-1)
        torch.testing.assert_close(model.encode(modality, batch), expected)


def kaldi_fbank(wave: np.ndarray, bins: int = 128) -> np.ndarray:
    """torchaudio.compliance.kaldi.fbank as CAV-MAE calls it (hanning, no dither, no energy, htk_compat),
    re-derived in numpy: 25 ms frames every 10 ms, per-frame DC removal, pre-emphasis .97, 512-point power
    spectrum, triangular filters on Kaldi's mel scale from 20 Hz to 8 kHz, log with a float32-eps floor."""
    frames = np.stack([wave[i:i + 400] for i in range(0, len(wave) - 399, 160)]).astype(np.float64)
    frames -= frames.mean(axis=1, keepdims=True)
    frames -= 0.97 * np.concatenate([frames[:, :1], frames[:, :-1]], axis=1)
    frames *= 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(400) / 399)
    power = np.abs(np.fft.rfft(frames, 512)) ** 2
    mel = lambda f: 1127 * np.log(1 + f / 700)  # noqa: E731
    low, step = mel(20), (mel(8000) - mel(20)) / (bins + 1)
    centres = mel(np.arange(256) * 16_000 / 512)
    banks = np.zeros((bins, 257))
    for b in range(bins):
        left, mid, right = low + b * step, low + (b + 1) * step, low + (b + 2) * step
        rising, falling = (centres - left) / (mid - left), (right - centres) / (right - mid)
        banks[b, :256] = np.clip(np.minimum(rising, falling), 0, None)
    return np.log(np.maximum(power @ banks.T, EPS))


def test_fbank_front_end_follows_cav_mae():
    model = CAVMAEEncoder(CAVMAEConfig(**{**TINY, "audio_length": 128}))
    # 0.5 s of silence: 48 fbank frames of log(eps), then zero padding, both normalised by (x + 5.081) / 4.4849
    silence = model.preprocess_audio(np.zeros(8_000, np.float32))
    assert silence.shape == (128, 128)
    torch.testing.assert_close(silence[:48], torch.full((48, 128), (math.log(EPS) + 5.081) / 4.4849))
    torch.testing.assert_close(silence[48:], torch.full((80, 128), 5.081 / 4.4849))
    # a 1 kHz tone peaks in the Kaldi mel bin whose centre is 1 kHz (128 bins from 20 Hz to 8 kHz)
    t = np.arange(16_000) / 16_000
    tone = model.preprocess_audio((0.5 * np.sin(2 * np.pi * 1000 * t)).astype(np.float32))
    mel = lambda f: 1127 * math.log(1 + f / 700)  # noqa: E731
    expected_bin = (mel(1000) - mel(20)) / ((mel(8000) - mel(20)) / 129) - 1
    assert abs(int(tone[50].argmax()) - expected_bin) <= 1
    # the whole front end against a re-derivation of torchaudio's Kaldi fbank, normalised as CAV-MAE does
    noisy = (0.5 * np.sin(2 * np.pi * 440 * t) + 0.05 * np.random.default_rng(0).standard_normal(16_000))
    noisy = noisy.astype(np.float32) + 0.1
    expected = (kaldi_fbank(noisy - noisy.mean()) + 5.081) / 4.4849
    torch.testing.assert_close(model.preprocess_audio(noisy)[:98].double(), torch.from_numpy(expected),
                               atol=2e-3, rtol=0)
    # a DC offset changes nothing (the waveform's mean is removed, and each frame's DC too)
    shifted = model.preprocess_audio((0.5 * np.sin(2 * np.pi * 1000 * t) + 0.2).astype(np.float32))
    torch.testing.assert_close(shifted, tone, atol=1e-3, rtol=0)


def test_video_takes_middle_frame_resized_and_normalised():
    model = CAVMAEEncoder(CAVMAEConfig(**TINY))
    clip = np.stack([np.full((32, 64, 3), 20 * k, np.uint8) for k in range(10)])
    clip[5, :, :16] = 255  # the middle frame's left edge is cropped away by the centre crop
    out = model.preprocess_video(clip)
    assert out.shape == (3, 32, 32)
    for c in range(3):
        torch.testing.assert_close(out[c], torch.full((32, 32), (100 / 255 - (0.485, 0.456, 0.406)[c]) /
                                                      (0.229, 0.224, 0.225)[c]), atol=1e-3, rtol=0)
    with pytest.raises(ValueError, match=r"video must be uint8 frames \[T, H, W, 3\], got shape \(4, 4\)"):
        model.preprocess_video(np.zeros((4, 4), np.uint8))


@pytest.mark.parametrize("which, other", [("audio", "video"), ("video", "audio")])
def test_adaptable_layernorms_are_the_query_path(tiny, which, other):
    _, model = tiny
    m = which[0]
    expected = ({f"net.blocks_{m}.{i}.norm{k}" for i in range(2) for k in (1, 2)}
                | {f"net.blocks_u.0.norm{k}_{m}" for k in (1, 2)} | {f"net.norm_{m}"})
    assert {n for n, _ in model.adaptable_layernorms(which)} == expected
    for p in model.parameters():
        p.requires_grad_(False)
    params = dict(model.adaptable_parameters(which))
    for p in params.values():
        p.requires_grad_(True)
    items = _clips(2) if which == "video" else _waves(2)
    model.encode(which, torch.stack([model.prepare(which, x) for x in items])).sum().backward()
    assert {n for n, p in params.items() if p.grad is not None and p.grad.abs().sum() > 0} == set(params)
    model.zero_grad(set_to_none=True)
    assert not set(params) & {n for n, _ in model.adaptable_parameters(other)}


def test_checkpoint_errors_named(tmp_path, tiny):
    folder, model = tiny
    with pytest.raises(WeightsNotFoundError, match="CAV-MAE checkpoint not found: .*nowhere.pth"):
        load_model(f"cav-mae:{tmp_path / 'nowhere.pth'}")
    with pytest.raises(ValueError, match="cav-mae needs a checkpoint"):
        load_model("cav-mae:")
    # a bare .pth gets CAV-MAE base's config: the tiny file lacks its deeper blocks
    with pytest.raises(ValueError, match=r"missing \d+ key\(s\): blocks_a\.10\.attn\.proj\.bias"):
        load_model(f"cav-mae:{folder / 'audio_model.21.pth'}")
    state = released_state(model)
    del state["module.norm_a.weight"]
    state["module.extra_head.weight"] = torch.zeros(1)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text(json.dumps(TINY))
    torch.save(state, broken / "m.pth")
    with pytest.raises(ValueError, match=r"missing 1 key\(s\): norm_a\.weight; unexpected 1 key\(s\): "
                                         r"extra_head\.weight"):
        load_model(f"cav-mae:{broken}")
    torch.save({"not": "tensors"}, broken / "m.pth")
    with pytest.raises(ValueError, match="not a CAV-MAE state dict"):
        load_model(f"cav-mae:{broken}")
    (broken / "m.pth").write_bytes(b"garbage")
    with pytest.raises(ValueError, match=r"m\.pth: not a PyTorch state dict"):
        load_model(f"cav-mae:{broken}")
    (broken / "config.json").write_text(json.dumps({**TINY, "embed_dims": 3}))
    with pytest.raises(ValueError, match=r"config\.json: unknown setting\(s\) \['embed_dims'\]"):
        load_model(f"cav-mae:{broken}")
    (broken / "config.json").write_text(json.dumps(TINY))
    torch.save(state, broken / "n.pth")
    with pytest.raises(WeightsNotFoundError, match="expected one CAV-MAE checkpoint .* found m.pth, n.pth"):
        load_model(f"cav-mae:{broken}")


@pytest.fixture(scope="module")
def av_clips(tmp_path_factory):
    """Four MP4 clips with their own AAC tracks (each a different tone and grey level) in an av-files index."""
    from tests.test_av_files import write_mp4

    pytest.importorskip("av")
    root = tmp_path_factory.mktemp("avclips")
    rows = [{"video": write_mp4(root / f"clip{i}.mp4", n_frames=10, tone=300.0 + 150 * i)} for i in range(4)]
    (root / "clips.json").write_text(json.dumps(rows))
    return str(root / "clips.json")


def own_clip_r1(model, dataset, query: str, gallery: str) -> float:
    """R@1 (%) of ``query`` items against the ``gallery`` items of the dataset, embedded here by hand."""
    with torch.no_grad():
        q = _encode(model, query, [dataset.load(query, i) for i in range(dataset.count(query))])
        g = _encode(model, gallery, [dataset.load(gallery, i) for i in range(dataset.count(gallery))])
    relevant = dataset.relevance(query, gallery)
    return 100.0 * float(np.mean([int(best) in rel for best, rel in zip((q @ g.T).argmax(dim=1), relevant)]))


@pytest.mark.parametrize("direction, method, shift", [("v2a", "source", None), ("v2a", "tcr", "gaussian_noise:5"),
                                                   ("a2v", "source", None), ("a2v", "tcr", "traffic:5")])
def test_queryshift_run_tiny_cav_mae(tiny, av_clips, tmp_path, direction, method, shift):
    """``queryshift run`` end to end from a local checkpoint folder and an av-files index: without adaptation or
    shift its R@1 is the one the model's own embeddings give; TCR under READ's frame noise (video queries) or
    traffic noise (audio queries) runs to a result."""
    from queryshift.cli import main
    from queryshift.data import load_dataset

    folder, _ = tiny
    out = tmp_path / "out"
    code = main(["run", "--model", f"cav-mae:{folder}", "--data", f"av-files:{av_clips}", "--direction", direction,
                 "--method", method, "--batch-size", "2", "--out", str(out)] + (["--shift", shift] if shift else []))
    assert code == 0
    result = json.loads((out / "result.json").read_text())
    assert result["n_queries"] == result["n_gallery"] == 4 and result["direction"] == direction
    assert all(0.0 <= result[k] <= 100.0 for k in ("r1", "r5", "r10", "r_mean", "map"))
    if shift is None:
        query, gallery = ("video", "audio") if direction == "v2a" else ("audio", "video")
        expected = own_clip_r1(load_model(f"cav-mae:{folder}"), load_dataset(f"av-files:{av_clips}"), query, gallery)
        assert result["r1"] == pytest.approx(expected)
    else:
        assert result["shift"] == shift
