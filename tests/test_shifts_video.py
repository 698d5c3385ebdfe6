"""Video shifts: one draw per clip, determinism, severity ordering, shape/dtype, temporal shifts, clear errors."""

import numpy as np
import pytest

pytest.importorskip("av")
pytest.importorskip("cv2")

from queryshift.shifts import item_rng  # noqa: E402
from queryshift.shifts.video import (  # noqa: E402
    FRAME_DROP_RATE,
    VIDEO_FRAME_CORRUPTIONS,
    VIDEO_SHIFTS,
    VIDEO_VALIDATION_SHIFTS,
    build_video_shift,
    corrupt_clip,
)

ALL = VIDEO_SHIFTS + VIDEO_VALIDATION_SHIFTS
RANDOM_FRAME_CORRUPTIONS = ("gaussian_noise", "shot_noise", "impulse_noise", "motion_blur", "fog", "snow",
                            "elastic_transform", "spatter")


def _clip(frames=8, h=64, w=64, seed=0):
    """A gradient scene moving 4 px a frame, with fixed texture, uint8 [T, H, W, 3]."""
    yy, xx = np.mgrid[0:h, 0:w]
    texture = np.random.default_rng(seed).normal(0, 20, (h, w, 3))
    clip = [np.stack([(xx + 4 * t) * 255 / w % 256, yy * 255 / h, (xx + yy) * 127 / (w + h)], -1) + texture
            for t in range(frames)]
    return np.clip(clip, 0, 255).astype(np.uint8)


def _apply(name, severity, clip, seed=0, index=0):
    return build_video_shift(name, severity)(clip, index, 0, 1, item_rng(seed, index))


def _diff(a, b):
    return float(np.abs(a.astype(float) - b.astype(float)).mean())


def test_catalogue_has_reads_fifteen_and_at_least_eight_shifts():
    assert len(VIDEO_FRAME_CORRUPTIONS) == 15 and "speckle_noise" not in VIDEO_FRAME_CORRUPTIONS
    assert len(VIDEO_SHIFTS) >= 8
    assert {"frame_drop", "frame_rate", "h264"} <= set(VIDEO_SHIFTS)
    assert not set(VIDEO_SHIFTS) & set(VIDEO_VALIDATION_SHIFTS)


@pytest.mark.parametrize("name", ALL)
def test_every_severity_keeps_shape_and_uint8(name):
    clip = _clip(frames=5, h=33, w=47)  # odd sides: H.264 pads and crops
    for severity in (1, 5):
        out = _apply(name, severity, clip)
        assert out.dtype == np.uint8 and out.shape == clip.shape, (name, severity, out.dtype, out.shape)


@pytest.mark.parametrize("name", ALL)
def test_same_rng_gives_identical_clips(name):
    clip = _clip()
    np.testing.assert_array_equal(_apply(name, 3, clip, seed=2, index=5), _apply(name, 3, clip, seed=2, index=5))


@pytest.mark.parametrize("name", VIDEO_FRAME_CORRUPTIONS + VIDEO_VALIDATION_SHIFTS)
def test_one_draw_per_clip_is_the_same_on_every_frame(name):
    still = np.repeat(_clip(frames=1), 6, axis=0)  # six identical frames must stay identical
    out = _apply(name, 5, still, index=3)
    for frame in out[1:]:
        np.testing.assert_array_equal(frame, out[0], err_msg=name)


@pytest.mark.parametrize("name", RANDOM_FRAME_CORRUPTIONS)
def test_other_clips_get_other_draws(name):
    clip = _clip(frames=2)
    outs = [_apply(name, 5, clip, index=i) for i in range(3)]
    assert any(not np.array_equal(outs[0], other) for other in outs[1:]), name


# ImageNet-C's elastic_transform is not ordered (severities 1-2 use a large affine part), in READ too
@pytest.mark.parametrize("name", [n for n in VIDEO_SHIFTS if n != "elastic_transform"])
def test_severity_five_changes_more_than_severity_one(name):
    clip = _clip(frames=16)
    assert _diff(_apply(name, 5, clip), clip) > _diff(_apply(name, 1, clip), clip), name


def test_frame_drop_freezes_on_the_last_arrived_frame_and_keeps_t():
    clip = np.broadcast_to(np.arange(256, dtype=np.uint8).reshape(256, 1, 1, 1), (256, 2, 2, 3))  # frame t is t
    for severity in (1, 5):
        out = _apply("frame_drop", severity, clip)
        shown = out[:, 0, 0, 0].astype(int)
        assert out.shape == clip.shape and shown[0] == 0 and (shown <= np.arange(256)).all()
        assert (np.diff(shown) >= 0).all()  # frozen on the latest arrived frame, never an older one
        dropped = (shown != np.arange(256)).mean()
        assert dropped == pytest.approx(FRAME_DROP_RATE[severity - 1], abs=0.07), (severity, dropped)


def test_frame_rate_reduction_holds_every_kth_frame():
    clip = _clip(frames=16)
    for severity, k in ((1, 2), (3, 4), (5, 8)):
        out = _apply("frame_rate", severity, clip)
        np.testing.assert_array_equal(out, clip[(np.arange(16) // k) * k])


def test_h264_decodes_every_frame_in_order_and_loses_more_at_severity_five():
    clip = _clip(frames=8)
    mild, harsh = _apply("h264", 1, clip), _apply("h264", 5, clip)
    per_frame = [_diff(mild[t], clip[t]) for t in range(8)]
    wrong_order = [_diff(mild[t], clip[(t + 1) % 8]) for t in range(8)]
    assert all(a < b for a, b in zip(per_frame, wrong_order))
    assert _diff(harsh, clip) > _diff(mild, clip) > 0


def test_bad_name_severity_and_shape_say_what_is_wrong():
    with pytest.raises(ValueError, match="unknown video shift 'speckle_noise'.*frame_drop.*h264"):
        build_video_shift("speckle_noise", 3)
    with pytest.raises(ValueError, match="h264: severity must be one of 1-5, got 0"):
        build_video_shift("h264", 0)
    with pytest.raises(ValueError, match=r"uint8 array \[T, H, W, 3\]"):
        corrupt_clip(np.zeros((8, 64, 64, 3), np.float32), "fog", 1, item_rng(0, 0))


def test_shift_declares_its_name_and_modality():
    shift = build_video_shift("fog", 2)
    assert (shift.name, shift.modality) == ("fog:2", "video")
