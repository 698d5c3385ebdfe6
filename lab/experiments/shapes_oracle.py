"""The ceiling of the shapes world: the expected recall of an oracle on the test splits, computed exactly.

The oracle knows every scene and reads every caption exactly (:func:`queryshift.data.shapes.caption_fits`:
whether the caption generator could have written that caption for that scene). It ranks what is true of
the query first and breaks ties at random, so its expected recall is a property of the world alone:

* t2i: a caption's true images tie; the caption's own image is first with probability 1 / (true images),
  among the first k with probability min(1, k / true images);
* i2t: the captions true of the query image tie: its own 5 and every other image's caption that fits it
  (a verbatim copy in another image's captions is a gallery item of its own); one of the own 5 is first
  with probability 5 / (true captions), among the first k with probability 1 - C(t - 5, k) / C(t, k).

    python lab/experiments/shapes_oracle.py [--out lab/experiments/shapes-oracle.json]

No model is involved and nothing is random; about a minute on one core for both splits.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections import Counter
from math import comb

from queryshift.data.shapes import (
    CAPTIONS_PER_IMAGE,
    COLOURS,
    COUNT_WORDS,
    SHAPES,
    SPLITS,
    caption_fits,
    parse_caption,
    sample_scene,
)

HERE = os.path.dirname(os.path.abspath(__file__))
SPLIT_NAMES = {"test": "shapes (1k)", "test5k": "shapes-5k"}
KS = (1, 5, 10)


def fitting_images(scenes: list) -> dict[str, list[int]]:
    """Caption text -> the indices of the scenes it fits, for every caption of ``scenes``.

    Candidates come from an index of the colours and shapes in each scene (a scene lacking a colour or shape
    word of the caption cannot fit); :func:`caption_fits` decides on each candidate.
    """
    index: dict[str, set[int]] = {}
    for i, scene in enumerate(scenes):
        for obj in scene.objects:
            index.setdefault(obj.colour, set()).add(i)
            index.setdefault(obj.shape, set()).add(i)
    every = set(range(len(scenes)))
    out = {}
    for caption in dict.fromkeys(c for s in scenes for c in s.captions):
        named = [w for w in caption.split() if w in COLOURS or w in SHAPES]
        candidates = set.intersection(every, *(index.get(w, set()) for w in named))
        out[caption] = sorted(i for i in candidates if caption_fits(caption, scenes[i]))
    return out


def t2i_recall(n_true: int, k: int) -> float:
    """Expected R@k of one text query whose own image is one of ``n_true`` tied true images."""
    return min(1.0, k / n_true)


def i2t_recall(n_true: int, n_own: int, k: int) -> float:
    """Expected R@k of one image query whose ``n_own`` captions are among ``n_true`` tied true captions."""
    if k > n_true - n_own:  # fewer than k other true captions: an own one is always in the first k
        return 1.0
    return 1.0 - comb(n_true - n_own, k) / comb(n_true, k)


def oracle(split: str, n_images: int | None = None) -> dict:
    """Expected oracle recall (percent) in both directions on the first ``n_images`` scenes of ``split``."""
    n_images = n_images or SPLITS[split][1]
    scenes = [sample_scene(split, i) for i in range(n_images)]
    fits = fitting_images(scenes)
    gallery_copies = Counter(c for s in scenes for c in s.captions)  # one gallery item per caption written
    t2i_true, i2t_true = [], [0] * n_images
    for image, scene in enumerate(scenes):
        for caption in scene.captions:
            if image not in fits[caption]:
                raise AssertionError(f"{split} image {image}: its own caption {caption!r} does not fit it")
            t2i_true.append(len(fits[caption]))
    for caption, images in fits.items():
        for image in images:
            i2t_true[image] += gallery_copies[caption]
    n_captions = len(t2i_true)
    return {
        "images": n_images, "captions": n_captions,
        "t2i": {f"r{k}": round(100 * sum(t2i_recall(t, k) for t in t2i_true) / n_captions, 2) for k in KS},
        "i2t": {f"r{k}": round(100 * sum(i2t_recall(t, CAPTIONS_PER_IMAGE, k) for t in i2t_true) / n_images, 2)
                for k in KS},
        "captions_true_of_several_images": round(100 * sum(t > 1 for t in t2i_true) / n_captions, 2),
        "mean_images_per_caption": round(sum(t2i_true) / n_captions, 3),
        "max_images_per_caption": max(t2i_true),
        "mean_captions_per_image": round(sum(i2t_true) / n_images, 3),
        "captions_shared_verbatim": round(100 * sum(gallery_copies[c] > 1 for s in scenes for c in s.captions)
                                          / n_captions, 2),
        "t2i_r1_by_head": _by_head(scenes, fits),
        "t2i_r1_by_object_count": {
            COUNT_WORDS[n - 1]: round(100 * _mean([1 / len(fits[c]) for s in scenes if len(s.objects) == n
                                                   for c in s.captions]), 2) for n in (1, 2, 3)},
        "i2t_r1_by_object_count": {
            COUNT_WORDS[n - 1]: round(100 * _mean([i2t_recall(t, CAPTIONS_PER_IMAGE, 1) for s, t in
                                                   zip(scenes, i2t_true) if len(s.objects) == n]), 2)
            for n in (1, 2, 3)},
        "images_by_object_count": {COUNT_WORDS[n - 1]: sum(len(s.objects) == n for s in scenes) for n in (1, 2, 3)},
        "r1_if_one_object_captions_named_every_attribute": _pinned_one_object(scenes, t2i_true, i2t_true),
    }


def _pinned_one_object(scenes: list, t2i_true: list[int], i2t_true: list[int]) -> dict[str, float]:
    """The R@1 ceiling had every caption of a one-object scene named colour, shape, size and grid position.

    Exact, not a simulation: a caption names every object of its scene, so only captions of one-object scenes
    can fit one-object scenes and the other scenes' numbers do not change. A fully named single object is
    still shared by every one-object scene with the same four attributes (8 x 6 x 2 x 9 = 864 kinds), which
    tie, whichever of its five captions is the query.
    """
    kind = [(o.colour, o.shape, o.size, o.cell) if len(s.objects) == 1 else None
            for s in scenes for o in s.objects[:1]]
    same = Counter(k for k in kind if k is not None)
    t2i = [1 / same[kind[i]] if kind[i] else 1 / t for i, t in zip(
        (i for i in range(len(scenes)) for _ in range(CAPTIONS_PER_IMAGE)), t2i_true)]
    i2t = [1 / same[kind[i]] if kind[i] else i2t_recall(t, CAPTIONS_PER_IMAGE, 1) for i, t in enumerate(i2t_true)]
    return {"i2t": round(100 * _mean(i2t), 2), "t2i": round(100 * _mean(t2i), 2)}


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def _by_head(scenes: list, fits: dict[str, list[int]]) -> dict[str, float]:
    """t2i oracle R@1 of the captions of each head template (the part that mentions only some attributes)."""
    per: dict[str, list[float]] = {}
    for scene in scenes:
        for caption in scene.captions:
            head = parse_caption(caption)[0].partition("/")[0]
            per.setdefault(head, []).append(1 / len(fits[caption]))
    return {h: round(100 * _mean(v), 2) for h, v in sorted(per.items())}


def markdown(result: dict) -> str:
    lines = ["| split | i2t R@1 | i2t R@5 | i2t R@10 | t2i R@1 | t2i R@5 | t2i R@10 | captions true of 2+ images | "
             "images per caption (mean / max) | true captions per image (mean) |", "|" + "---|" * 10]
    for split, r in result["splits"].items():
        lines.append(f"| {SPLIT_NAMES[split]} | " + " | ".join(f"{r['i2t'][f'r{k}']:.2f}" for k in KS) + " | "
                     + " | ".join(f"{r['t2i'][f'r{k}']:.2f}" for k in KS)
                     + f" | {r['captions_true_of_several_images']:.1f} % | {r['mean_images_per_caption']:.2f} / "
                       f"{r['max_images_per_caption']} | {r['mean_captions_per_image']:.2f} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=os.path.join(HERE, "shapes-oracle.json"))
    args = p.parse_args()
    start = time.time()
    result = {"splits": {split: oracle(split) for split in SPLIT_NAMES}}
    result["seconds"] = round(time.time() - start, 1)
    with open(args.out, "w", encoding="utf-8") as f:
        json.dump(result, f, indent=1)
        f.write("\n")
    print(markdown(result))
    print(f"\nwrote {args.out} ({result['seconds']} s)")


if __name__ == "__main__":
    main()
