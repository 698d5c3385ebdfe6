"""Image corruptions: shapes, determinism, severity ordering and the reproduced generator quirks."""


import numpy as np
import pytest
from PIL import Image

from queryshift.shifts import item_rng
from queryshift.shifts.image import IMAGE_CORRUPTIONS, VALIDATION_CORRUPTIONS, ImageCorruption, corrupt
from queryshift.shifts.registry import build_shift

RANDOM_CORRUPTIONS = ("gaussian_noise", "shot_noise", "impulse_noise", "speckle_noise", "motion_blur", "fog",
                      "snow", "elastic_transform")


def _photo(w, h, seed=0):
    """Smooth gradients plus texture, so blurs and noise both have something to change."""
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([xx * 255 / w, yy * 255 / h, (xx + yy) * 127 / (w + h)], -1)
    texture = np.random.default_rng(seed).normal(0, 25, (h, w, 3))
    return Image.fromarray(np.clip(base + texture, 0, 255).astype(np.uint8))


def _diff(a, b):
    return float(np.abs(np.asarray(a, float) - np.asarray(b, float)).mean())


@pytest.mark.parametrize("size", [(64, 64), (50, 70), (70, 50)])
@pytest.mark.parametrize("name", IMAGE_CORRUPTIONS)
def test_every_severity_keeps_size_and_mode(name, size):
    img = _photo(*size)
    for severity in range(1, 6):
        out = corrupt(img, name, severity, item_rng(0, 3))
        assert out.mode == "RGB" and out.size == img.size, (name, severity)


@pytest.mark.parametrize("name", IMAGE_CORRUPTIONS)
def test_same_seed_and_index_give_identical_images(name):
    img = _photo(64, 64)
    a = corrupt(img, name, 3, item_rng(7, 11))
    b = corrupt(img, name, 3, item_rng(7, 11))
    assert np.array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("name", RANDOM_CORRUPTIONS)
def test_different_index_gives_different_images(name):
    img = _photo(64, 64)
    a = corrupt(img, name, 3, item_rng(7, 11))
    b = corrupt(img, name, 3, item_rng(7, 12))
    assert not np.array_equal(np.asarray(a), np.asarray(b))


def test_corruptions_leave_global_numpy_state_alone():
    state = np.random.get_state()[1].copy()
    for name in IMAGE_CORRUPTIONS:
        corrupt(_photo(64, 64), name, 5, item_rng(0, 1))
    assert np.array_equal(state, np.random.get_state()[1])


@pytest.mark.parametrize("name", ["gaussian_noise", "shot_noise", "impulse_noise", "speckle_noise", "contrast",
                                  "brightness", "defocus_blur", "pixelate"])
def test_damage_grows_with_severity(name):
    img = _photo(64, 64)
    diffs = [_diff(img, corrupt(img, name, s, item_rng(0, 5))) for s in range(1, 6)]
    assert all(a < b for a, b in zip(diffs, diffs[1:])), diffs


@pytest.mark.parametrize("name", ["zoom_blur", "motion_blur", "glass_blur", "jpeg_compression", "snow"])
def test_severity_5_hurts_more_than_1(name):
    # not monotone step by step: e.g. zoom_blur severity 2 averages more layers than 3 (ImageNet-C's table)
    img = _photo(64, 64)
    assert _diff(img, corrupt(img, name, 1, item_rng(0, 5))) < _diff(img, corrupt(img, name, 5, item_rng(0, 5)))


def test_glass_blur_reproduces_the_loop_bug():
    """Only one row gets pixel moves, so two seeds differ only within the blur's reach of that row."""
    img = _photo(64, 48)
    delta = 4  # severity 5
    a = np.asarray(corrupt(img, "glass_blur", 5, item_rng(0, 1)), float)
    b = np.asarray(corrupt(img, "glass_blur", 5, item_rng(0, 2)), float)
    rows = np.nonzero(np.abs(a - b).max(axis=(1, 2)) > 0)[0]
    assert len(rows) > 0
    swap_row = min(48, 224) - delta
    assert rows.min() >= swap_row - delta - 7 and rows.max() <= 47  # sigma 1.5, truncate 4 -> 6 px reach


def test_pixelate_keeps_shape_of_non_square_images():
    img = _photo(300, 240)
    out = corrupt(img, "pixelate", 5, item_rng(0, 0))
    assert out.size == (300, 240)  # the original's cv2 dsize=(h, w) transpose is deliberately not reproduced
    # large images are pixelated on the original's fixed 56x56 grid (224 * 0.25): long runs of equal pixels
    row = np.asarray(out)[120, :, 0].astype(int)
    assert (np.diff(row) == 0).mean() > 0.6


def test_frost_and_fog_cover_images_larger_than_texture_and_map():
    img = _photo(1000, 700)
    for name in ("frost", "fog"):
        out = corrupt(img, name, 5, item_rng(0, 0))
        assert out.size == img.size
        # the effect reaches the far corner too
        assert _diff(img.crop((900, 600, 1000, 700)), out.crop((900, 600, 1000, 700))) > 5


def test_small_images_keep_their_size_at_every_severity():
    # (no wall-clock limit here: on a shared 2-core machine a timing assertion fails for the wrong reason)
    img = _photo(64, 64)
    for name in IMAGE_CORRUPTIONS:
        for severity in range(1, 6):
            assert corrupt(img, name, severity, item_rng(0, severity)).size == (64, 64), (name, severity)


def test_shift_object_and_registry():
    shift = build_shift("gaussian_noise:5", "image", seed=0)
    assert isinstance(shift, ImageCorruption) and shift.name == "gaussian_noise:5"
    assert shift.segment(0, 10) == "gaussian_noise:5"
    out = shift(_photo(64, 64), 0, 0, 1, item_rng(0, 0))
    assert out.size == (64, 64)
    with pytest.raises(ValueError, match="severity"):
        build_shift("fog:6", "image")
    with pytest.raises(ValueError, match="needs a severity"):
        build_shift("fog", "image")
    with pytest.raises(ValueError, match=r"gaussian_noise.*text"):
        build_shift("gaussian_noise:5", "text")
    with pytest.raises(ValueError, match="defocus_blur"):
        build_shift("no_such_blur:3", "image")


# -- validation corruptions ----------------------------------------------------------------------------------

@pytest.mark.parametrize("name", VALIDATION_CORRUPTIONS)
def test_validation_corruptions_are_registered_deterministic_and_change_the_image(name):
    img = _photo(96, 80)
    for severity in range(1, 6):
        shift = build_shift(f"{name}:{severity}", "image")
        a = shift(img, 3, 0, 1, item_rng(0, 3))
        b = shift(img, 3, 0, 1, item_rng(0, 3))
        assert a.size == img.size and a.mode == "RGB"
        assert np.array_equal(np.asarray(a), np.asarray(b)) and _diff(a, img) > 0.2, (name, severity)
    with pytest.raises(ValueError, match="image"):
        build_shift(f"{name}:5", "text")


@pytest.mark.parametrize("name", ["gaussian_blur", "saturate"])
def test_deterministic_validation_corruptions_match_imagenet_c(name):
    reference = pytest.importorskip("imagecorruptions")
    img = _photo(64, 64)
    for severity in (1, 3, 5):
        ours = np.asarray(corrupt(img, name, severity, item_rng(0, 0)), float)
        theirs = np.asarray(reference.corrupt(np.asarray(img), corruption_name=name, severity=severity), float)
        assert np.abs(ours - np.rint(theirs)).max() <= 2, (name, severity)


def test_spatter_is_water_at_low_severity_and_mud_at_high():
    img = Image.new("RGB", (128, 128), (128, 128, 128))
    water = np.asarray(corrupt(img, "spatter", 1, item_rng(0, 1)), float) - 128
    mud = np.asarray(corrupt(img, "spatter", 5, item_rng(0, 1)), float) - 128
    assert water.min() >= 0 and water.max() > 40  # drops only brighten, more in green/blue than red
    assert water[..., 1].sum() > water[..., 0].sum()
    assert mud.max() <= 0 and mud.min() < -60  # mud only darkens, towards brown (red stays highest)
    dark = mud[..., 0] < -30
    assert dark.any() and (mud[dark][:, 0] > mud[dark][:, 2]).all()
