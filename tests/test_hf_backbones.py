"""hf-blip / hf-clip backbones on tiny random configs saved locally (no download)."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from queryshift.models import WeightsNotFoundError, load_model

transformers = pytest.importorskip("transformers")

WORDS = ["a", "an", "the", "red", "green", "blue", "yellow", "black", "white", "photo", "picture", "of", "noise",
         "image", "number", "dog", "cat", "on", "grass", "shirt", "man", "woman", "with", "and"]
LAYERS = 2


def save_tiny_blip(path: str) -> str:
    """A 2-layer BLIP retrieval model with a BERT tokenizer over ``WORDS``, saved with save_pretrained."""
    os.makedirs(path, exist_ok=True)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS + [str(i) for i in range(10)]
    vocab_file = os.path.join(path, "vocab.txt")
    with open(vocab_file, "w") as f:
        f.write("\n".join(vocab) + "\n")
    tokenizer = transformers.BertTokenizer.from_pretrained(path)
    os.remove(vocab_file)
    small = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=LAYERS, num_attention_heads=2)
    config = transformers.BlipConfig(
        vision_config=dict(image_size=32, patch_size=16, **small),
        text_config=dict(vocab_size=len(vocab), max_position_embeddings=40, encoder_hidden_size=32,
                         pad_token_id=0, bos_token_id=2, sep_token_id=3, **small),
        image_text_hidden_size=16,
    )
    torch.manual_seed(0)
    transformers.BlipForImageTextRetrieval(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def save_tiny_clip(path: str) -> str:
    """A 2-layer CLIP with a character-level BPE vocabulary (vocab.json + merges.txt), saved locally."""
    os.makedirs(path, exist_ok=True)
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for ch in "abcdefghijklmnopqrstuvwxyz0123456789,.!":
        vocab[ch] = len(vocab)
        vocab[ch + "</w>"] = len(vocab)
    with open(os.path.join(path, "vocab.json"), "w") as f:
        json.dump(vocab, f)
    with open(os.path.join(path, "merges.txt"), "w") as f:
        f.write("#version: 0.2\n")
    tokenizer = transformers.CLIPTokenizer.from_pretrained(path)
    for name in ("vocab.json", "merges.txt"):
        os.remove(os.path.join(path, name))
    small = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=LAYERS, num_attention_heads=2)
    config = transformers.CLIPConfig(
        text_config=dict(vocab_size=len(vocab), max_position_embeddings=24, bos_token_id=0, eos_token_id=1,
                         pad_token_id=1, **small),
        vision_config=dict(image_size=32, patch_size=16, **small),
        projection_dim=16,
    )
    torch.manual_seed(0)
    transformers.CLIPModel(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    return {"hf-blip": save_tiny_blip(str(root / "blip")), "hf-clip": save_tiny_clip(str(root / "clip"))}


def _images(n=3):
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 255, (20 + 4 * i, 28, 3), dtype=np.uint8)) for i in range(n)]


CAPTIONS = ["a red dog on the grass", "the photo of a man with a blue shirt", "noise"]


def _blip_expected(which: str) -> set[str]:
    if which == "image":
        names = [f"model.vision_model.encoder.layers.{i}.layer_norm{k}" for i in range(LAYERS) for k in (1, 2)]
        return set(names + ["model.vision_model.post_layernorm"])
    names = [f"model.text_encoder.encoder.layer.{i}.{m}.LayerNorm" for i in range(LAYERS)
             for m in ("attention.output", "crossattention.output", "output")]
    return set(names + ["model.text_encoder.embeddings.LayerNorm"])


def _clip_expected(which: str) -> set[str]:
    if which == "image":
        names = [f"model.vision_model.encoder.layers.{i}.layer_norm{k}" for i in range(LAYERS) for k in (1, 2)]
        return set(names + ["model.vision_model.pre_layrnorm", "model.vision_model.post_layernorm"])
    return {f"model.text_model.encoder.layers.{i}.layer_norm{k}" for i in range(LAYERS) for k in (1, 2)}


@pytest.mark.parametrize("backend", ["hf-blip", "hf-clip"])
def test_encode_both_modalities(tiny_dirs, backend):
    model = load_model(f"{backend}:{tiny_dirs[backend]}")
    assert not model.training and model.image_size == 32
    images = torch.stack([model.preprocess(im) for im in _images()])
    assert images.shape == (3, 3, 32, 32)
    tokens = model.tokenize(CAPTIONS)
    assert set(tokens) == {"input_ids", "attention_mask"}
    assert tokens["input_ids"].shape == (3, 35 if backend == "hf-blip" else 24)
    for emb in (model.encode_image(images), model.encode_text(tokens)):
        assert emb.shape == (3, 16) and emb.dtype == torch.float32
        assert torch.isfinite(emb).all()
        torch.testing.assert_close(emb.norm(dim=-1), torch.ones(3))
    assert "resize32-bicubic-nocrop" in model.preprocess_id


def test_blip_matches_transformers_itc_path(tiny_dirs):
    """Our embeddings reproduce BlipForImageTextRetrieval(use_itm_head=False)'s similarity."""
    model = load_model(f"hf-blip:{tiny_dirs['hf-blip']}")
    images = torch.stack([model.preprocess(im) for im in _images()])
    tokens = model.tokenize(CAPTIONS)
    with torch.no_grad():
        ours = model.encode_image(images) @ model.encode_text(tokens).T
        ref = model.model(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"],
                          pixel_values=images, use_itm_head=False).itm_score
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("backend", ["hf-blip", "hf-clip"])
@pytest.mark.parametrize("which", ["image", "text"])
def test_adaptable_layernorms_follow_spec(tiny_dirs, backend, which):
    model = load_model(f"{backend}:{tiny_dirs[backend]}")
    expected = (_blip_expected if backend == "hf-blip" else _clip_expected)(which)
    assert {n for n, _ in model.adaptable_layernorms(which)} == expected
    params = {n for n, _ in model.adaptable_parameters(which)}
    assert params == {f"{n}.{p}" for n in expected for p in ("weight", "bias")}
    # only LN affine parameters of the query tower get gradients from the query embedding
    for p in model.parameters():
        p.requires_grad_(False)
    for _, p in model.adaptable_parameters(which):
        p.requires_grad_(True)
    if which == "image":
        out = model.encode_image(torch.stack([model.preprocess(im) for im in _images(2)]))
    else:
        out = model.encode_text(model.tokenize(CAPTIONS[:2]))
    out.sum().backward()
    grads = {n for n, p in model.adaptable_parameters(which) if p.grad is not None and p.grad.abs().sum() > 0}
    # BLIP's cross-attention LNs are collected but get no gradient in the unimodal text pass
    assert grads == {n for n in params if "crossattention" not in n}


def test_clip_final_layer_norm_is_opt_in(tiny_dirs):
    model = load_model(f"hf-clip:{tiny_dirs['hf-clip']}")
    names = {n for n, _ in model.adaptable_layernorms("text", include_final_ln=True)}
    assert names == _clip_expected("text") | {"model.text_model.final_layer_norm"}
    assert {n for n, _ in model.adaptable_layernorms("image", include_final_ln=True)} == _clip_expected("image")


@pytest.mark.parametrize("backend", ["hf-blip", "hf-clip"])
def test_missing_weights_explain_how_to_download(tmp_path, backend):
    with pytest.raises(WeightsNotFoundError, match="not found"):
        load_model(f"{backend}:{tmp_path / 'absent' / 'dir'}")
    with pytest.raises(WeightsNotFoundError, match="huggingface-cli download"):
        load_model(f"{backend}:{tmp_path}")  # exists, but holds no model
    with pytest.raises(WeightsNotFoundError, match="huggingface-cli download nobody/no-such-model"):
        load_model(f"{backend}:nobody/no-such-model")  # HF_HUB_OFFLINE=1 (conftest)
