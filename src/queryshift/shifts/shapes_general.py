"""The general corpus of the shapes world: what web pre-training is to CLIP and BLIP.

The source model is trained in two stages (``queryshift train-source``), the general-to-customized
paradigm REST starts from:

* general: the shapes world as the web shows it: every domain style (``style:outline``, ``style:dark``,
  ``style:texture``; caption paraphrases ``style:templates`` and synonyms ``style:synonyms``), a low rate of
  character edits in captions (as in alt-text), and the variation real photos have, at low strengths: colour
  cast, brightness, contrast, uniform haze, mild sensor noise, slight softness, JPEG and small crops;
* customization: fine-tuning on the target domain only (clean rendering, the base caption templates).

What the general corpus never contains: the 16 test image corruptions at their test strengths (each photo
variation below is weaker than severity 1 of the closest test corruption, or a different operation), the
text corruptions' generators (nlpaug, EDA), and the validation shifts (gaussian_blur, spatter, saturate,
``style:sketch``, ``style:chatty``). Every variation is applied to the native-resolution image, as query
shifts are, and then the backbone's own resize brings it to the model input (:func:`model_input`).
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageFilter

from ..data.shapes import render, sample_scene

# Photo variation, each applied with its probability, strengths drawn uniformly from the range.
# Test severity 1 of the closest corruption, for comparison: gaussian_noise sigma .08, contrast factor .4,
# brightness V + .1, jpeg quality 25, defocus disk radius 3 px; fog adds a plasma map at strength 1.5.
PHOTO_VARIATION = {
    "colour_cast": (0.4, (0.9, 1.1)),  # per-channel gain
    "gain": (0.4, (0.8, 1.15)),  # global multiplicative brightness (not V + c)
    "contrast": (0.4, (0.5, 1.0)),  # towards the image mean, factor
    "haze": (0.3, (0.0, 0.3)),  # blend with a uniform light colour (no plasma map)
    "noise": (0.35, (0.0, 0.06)),  # additive gaussian sigma, in [0, 1] units
    "soften": (0.25, (3, 5)),  # box blur, odd kernel side in native pixels
    "jpeg": (0.3, (30, 95)),  # quality
    "crop": (0.3, (0.94, 1.0)),  # kept side fraction, resized back
}
STYLE_SHARE = 0.45  # fraction of general views in one of the image styles
IMAGE_STYLES = ("outline", "dark", "texture")
CLEAN_SHARE = 0.2  # fraction of general views with no photo variation (styled or not)
TYPO_RATE = 0.05  # per-word probability of one character edit in a noisy caption
CAPTION_VARIATION = {"templates": 0.35, "synonyms": 0.35, "typos": 0.4}  # probabilities, independent
MODEL_INPUT = 64  # the shapes models' input side


def photo_variation(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Mild, photo-like variation of a native-resolution image (see ``PHOTO_VARIATION``)."""
    def draw(name):
        p, (lo, hi) = PHOTO_VARIATION[name]
        return rng.uniform(lo, hi) if rng.random() < p else None

    if (k := draw("soften")) is not None:  # lens softness first, as in a camera
        image = image.filter(ImageFilter.BoxBlur(int(round(k)) // 2))
    x = np.asarray(image, dtype=np.float32) / 255
    h, w = x.shape[:2]

    if (c := draw("crop")) is not None:
        side_h, side_w = int(round(h * c)), int(round(w * c))
        top, left = rng.integers(0, h - side_h + 1), rng.integers(0, w - side_w + 1)
        cropped = Image.fromarray((x[top:top + side_h, left:left + side_w] * 255).round().astype(np.uint8))
        x = np.asarray(cropped.resize((w, h), Image.Resampling.BICUBIC), dtype=np.float32) / 255
    if rng.random() < PHOTO_VARIATION["colour_cast"][0]:
        x = x * rng.uniform(*PHOTO_VARIATION["colour_cast"][1], size=3).astype(np.float32)
    if (g := draw("gain")) is not None:
        x = x * g
    if (c := draw("contrast")) is not None:
        mean = x.mean(axis=(0, 1), keepdims=True)
        x = (x - mean) * c + mean
    if (a := draw("haze")) is not None:
        x = (1 - a) * x + a * rng.uniform(0.7, 1.0)
    if (s := draw("noise")) is not None:
        x = x + rng.normal(scale=s, size=x.shape).astype(np.float32)
    out = Image.fromarray((np.clip(x, 0, 1) * 255).round().astype(np.uint8))
    if (q := draw("jpeg")) is not None:
        buf = io.BytesIO()
        out.save(buf, "JPEG", quality=int(q))
        buf.seek(0)
        with Image.open(buf) as im:
            out = im.convert("RGB")
    return out


def general_image(scene, rng: np.random.Generator) -> Image.Image:
    """One view of a scene from the general corpus: maybe a style, then maybe photo variation."""
    from . import domain

    image = render(scene)
    if rng.random() < STYLE_SHARE:
        image = getattr(domain, IMAGE_STYLES[int(rng.integers(len(IMAGE_STYLES)))])(image, rng)
    if rng.random() >= CLEAN_SHARE:
        image = photo_variation(image, rng)
    return image


_LETTERS = np.array(list("abcdefghijklmnopqrstuvwxyz"))


def typos(caption: str, rng: np.random.Generator, rate: float = TYPO_RATE) -> str:
    """A few natural typing slips: each word of 2+ letters gets, with probability ``rate``, one edit
    (swap two neighbours, drop, double or replace a letter)."""
    words = caption.split()
    for i, word in enumerate(words):
        if len(word) < 2 or rng.random() >= rate:
            continue
        j = int(rng.integers(len(word) - 1))
        kind = int(rng.integers(4))
        if kind == 0:
            word = word[:j] + word[j + 1] + word[j] + word[j + 2:]
        elif kind == 1:
            word = word[:j] + word[j + 1:]
        elif kind == 2:
            word = word[:j] + word[j] + word[j:]
        else:
            word = word[:j] + str(rng.choice(_LETTERS)) + word[j + 1:]
        words[i] = word
    return " ".join(words)


def caption_variant(caption: str, rng: np.random.Generator) -> str:
    """A general-corpus rewording of a base caption: maybe paraphrased, maybe synonyms, maybe typos."""
    from ..data.retrieval import pre_caption
    from . import domain

    text = pre_caption(caption)
    if rng.random() < CAPTION_VARIATION["templates"]:
        text = domain.templates(text, rng)
    if rng.random() < CAPTION_VARIATION["synonyms"]:
        text = domain.synonyms(text, rng)
    if rng.random() < CAPTION_VARIATION["typos"]:
        text = typos(text, rng)
    return text


def model_input(image: Image.Image, size: int = MODEL_INPUT) -> np.ndarray:
    """uint8 HxWx3 of what the backbone's transform feeds the model (square bicubic resize, as
    ``models.base.square_transform``) before normalisation."""
    return np.asarray(image.convert("RGB").resize((size, size), Image.Resampling.BICUBIC))


def view_rng(split: str, index: int, view: int, seed: int) -> np.random.Generator:
    from ..data.shapes import SPLITS

    return np.random.default_rng([SPLITS[split][0], index, view + 1, seed, 7])  # view -1: the captions


def render_views(split: str, start: int, stop: int, views: int, general: bool, seed: int = 0):
    """Model-input pixels (stop - start, views, 64, 64, 3) and captions of images start..stop-1 of ``split``.

    ``general``: each view is :func:`general_image` and each image gets its 5 base captions plus 5
    :func:`caption_variant` of them; otherwise the clean rendering and the 5 base captions. Depends only on
    (split, index, view, seed), so chunks rendered in parallel equal one serial pass.
    """
    from ..data.retrieval import pre_caption

    pixels = np.empty((stop - start, views, MODEL_INPUT, MODEL_INPUT, 3), np.uint8)
    captions = []
    for row, index in enumerate(range(start, stop)):
        scene = sample_scene(split, index)
        for v in range(views):
            rng = view_rng(split, index, v, seed)
            pixels[row, v] = model_input(general_image(scene, rng) if general else render(scene))
        base = [pre_caption(c) for c in scene.captions]
        if general:
            rng = view_rng(split, index, -1, seed)
            base = base + [caption_variant(c, rng) for c in scene.captions]
        captions.append(base)
    return pixels, captions
