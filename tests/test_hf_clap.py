"""hf-clap backbone on a tiny random ClapConfig saved locally with save_pretrained (no download)."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from queryshift.models import WeightsNotFoundError, load_model

transformers = pytest.importorskip("transformers")

CAPTIONS = ["a dog barks", "rain falls on a roof", "a car passes by, fast"]


def save_tiny_clap(path: str, rate: int = 48_000) -> str:
    """A 2-layer RoBERTa text tower and a 2-stage HTS-AT audio tower with a character-level byte-BPE vocabulary
    and a 1 s feature extractor (16 mel bins at ``rate``), saved with save_pretrained."""
    os.makedirs(path, exist_ok=True)
    vocab = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3}
    for ch in "abcdefghijklmnopqrstuvwxyz0123456789,.":
        vocab[ch] = len(vocab)
        vocab["\u0120" + ch] = len(vocab)  # byte-level BPE marks a leading space with U+0120
    vocab["<mask>"] = len(vocab)
    with open(os.path.join(path, "vocab.json"), "w") as f:
        json.dump(vocab, f)
    with open(os.path.join(path, "merges.txt"), "w") as f:
        f.write("#version: 0.2\n")
    tokenizer = transformers.RobertaTokenizer.from_pretrained(path)
    for name in ("vocab.json", "merges.txt"):
        os.remove(os.path.join(path, name))
    config = transformers.ClapConfig(
        text_config=dict(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=64, max_position_embeddings=40, projection_dim=16),
        audio_config=dict(spec_size=64, num_mel_bins=16, patch_size=4, patch_stride=(4, 4), window_size=4,
                          depths=[1, 1], num_attention_heads=[1, 2], patch_embeds_hidden_size=16, hidden_size=32,
                          projection_dim=16),
        projection_dim=16,
    )
    torch.manual_seed(0)
    transformers.ClapModel(config).save_pretrained(path)
    features = transformers.ClapFeatureExtractor(feature_size=16, sampling_rate=rate, max_length_s=1,
                                                 truncation="rand_trunc", padding="repeatpad")
    transformers.ClapProcessor(feature_extractor=features, tokenizer=tokenizer).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return save_tiny_clap(str(tmp_path_factory.mktemp("clap") / "clap"))


def _waves(n=3, seconds=0.75):
    rng = np.random.default_rng(0)
    t = np.arange(int(16_000 * seconds)) / 16_000
    return [(0.3 * np.sin(2 * np.pi * (200 + 300 * i) * t) + 0.02 * rng.standard_normal(len(t))).astype(np.float32)
            for i in range(n)]


def test_encode_both_towers_and_match_transformers(tiny_dir):
    model = load_model(f"hf-clap:{tiny_dir}")
    assert model.towers == ("audio", "text") and not model.training and model.max_tokens == 38
    audio = torch.stack([model.prepare("audio", w) for w in _waves()])
    assert audio.shape == (3, 1, 101, 16)  # 1 s at 48 kHz, hop 480 -> 101 frames of 16 mel bins
    tokens = model.tokenize(CAPTIONS)
    assert tokens["input_ids"].shape == (3, 38)
    with torch.no_grad():
        a, t = model.encode("audio", audio), model.encode("text", tokens)
        ref = model.model(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"],
                          input_features=audio, is_longer=torch.zeros(3, 1, dtype=torch.bool))
    assert a.shape == t.shape == (3, 16) and a.dtype == torch.float32
    torch.testing.assert_close(a.norm(dim=-1), torch.ones(3))
    torch.testing.assert_close(a @ t.T, ref.logits_per_audio / model.model.logit_scale_a.exp(), rtol=1e-4, atol=1e-5)


def test_audio_resampled_to_the_extractors_rate_and_cut_deterministically(tiny_dir):
    model = load_model(f"hf-clap:{tiny_dir}")
    wave = _waves(1, seconds=3.0)[0]  # longer than the extractor's 1 s: cut to the first second every time
    first, again = model.prepare("audio", wave), model.prepare("audio", wave)
    assert torch.equal(first, again)
    from scipy.signal import resample_poly

    at_48k = resample_poly(wave, 3, 1).astype(np.float32)[:48_000]
    expected = model._features(at_48k, sampling_rate=48_000, return_tensors="pt")["input_features"][0]
    torch.testing.assert_close(first, expected)
    with pytest.raises(ValueError, match=r"mono waveform \(1-D\), got shape \(2, 10\)"):
        model.prepare("audio", np.zeros((2, 10), np.float32))


@pytest.mark.parametrize("which", ["audio", "text"])
def test_query_tower_layernorms_adapt(tiny_dir, which):
    model = load_model(f"hf-clap:{tiny_dir}")
    prefix = "model.audio_model." if which == "audio" else "model.text_model."
    names = {n for n, _ in model.adaptable_layernorms(which)}
    expected = {prefix + n for n, m in (model.model.audio_model if which == "audio" else model.model.text_model)
                .named_modules() if isinstance(m, torch.nn.LayerNorm)}
    assert names == expected and len(names) >= 5
    for p in model.parameters():
        p.requires_grad_(False)
    params = dict(model.adaptable_parameters(which))
    for p in params.values():
        p.requires_grad_(True)
    model.train()
    assert not model.model.audio_model.audio_encoder.batch_norm.training  # its statistics stay frozen
    batch = (torch.stack([model.prepare("audio", w) for w in _waves(2)]) if which == "audio"
             else model.tokenize(CAPTIONS[:2]))
    model.encode(which, batch).sum().backward()
    assert {n for n, p in params.items() if p.grad is not None and p.grad.abs().sum() > 0} == set(params)


def test_missing_model_named(tmp_path, tiny_dir):
    with pytest.raises(WeightsNotFoundError, match="model directory not found: .*nowhere"):
        load_model(f"hf-clap:{tmp_path / 'nowhere'}")
    partial = tmp_path / "partial"
    partial.mkdir()
    for name in os.listdir(tiny_dir):
        if name != "processor_config.json":
            (partial / name).write_bytes((open(os.path.join(tiny_dir, name), "rb")).read())
    with pytest.raises(WeightsNotFoundError, match="feature extractor of 'hf-clap:"):
        load_model(f"hf-clap:{partial}")


@pytest.fixture(scope="module")
def clotho_files(tmp_path_factory):
    """Four WAV clips (different tones) with five captions each, as a Clotho caption CSV."""
    import csv

    sf = pytest.importorskip("soundfile")
    root = tmp_path_factory.mktemp("clotho")
    with open(root / "clotho_captions_evaluation.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["file_name"] + [f"caption_{k}" for k in range(1, 6)])
        for i, wave in enumerate(_waves(4, seconds=0.5)):
            sf.write(str(root / f"sound{i}.wav"), wave, 16_000)
            w.writerow([f"sound{i}.wav"] + [f"sound {i} take {k}" for k in range(5)])
    return str(root / "clotho_captions_evaluation.csv")


@pytest.mark.parametrize("direction, shift, method", [("a2t", None, "source"), ("t2a", None, "source"),
                                                   ("a2t", "traffic:5", "tcr"), ("t2a", "OcrAug:3", "tcr")])
def test_queryshift_run_tiny_clap(tiny_dir, clotho_files, tmp_path, direction, shift, method):
    """``queryshift run`` end to end from a save_pretrained folder and a Clotho CSV, both directions: without
    adaptation or shift its R@1 is the one the model's own embeddings give (five relevant captions per sound)."""
    from queryshift.cli import main
    from queryshift.data import load_dataset

    out = tmp_path / "out"
    argv = ["run", "--model", f"hf-clap:{tiny_dir}", "--data", f"clotho:{clotho_files}", "--direction", direction,
            "--method", method, "--batch-size", "2", "--out", str(out)] + (["--shift", shift] if shift else [])
    assert main(argv) == 0
    result = json.loads((out / "result.json").read_text())
    assert result["n_queries"] == (4 if direction == "a2t" else 20)
    assert all(0.0 <= result[k] <= 100.0 for k in ("r1", "r5", "r10", "r_mean", "map"))
    if shift is None:
        model, dataset = load_model(f"hf-clap:{tiny_dir}"), load_dataset(f"clotho:{clotho_files}")
        query, gallery = ("audio", "text") if direction == "a2t" else ("text", "audio")
        with torch.no_grad():
            emb = {m: model.encode(m, model.tokenize([dataset.load(m, i) for i in range(dataset.count(m))])
                                   if m == "text" else torch.stack([model.prepare(m, dataset.load(m, i))
                                                                    for i in range(dataset.count(m))]))
                   for m in ("audio", "text")}
        best = (emb[query] @ emb[gallery].T).argmax(dim=1)
        hits = [int(b) in rel for b, rel in zip(best, dataset.relevance(query, gallery))]
        assert result["r1"] == pytest.approx(100.0 * float(np.mean(hits)))
    else:
        assert result["shift"] == shift
