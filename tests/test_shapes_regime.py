"""The regime conditions of benchmark v2 (``queryshift.shifts.shapes_regime.check``) on hand-made numbers."""

from queryshift.shifts.shapes_regime import (
    CAPTION_STYLES,
    IMAGE_STYLES,
    IMAGE_TEST_SHIFTS,
    TEXT_TEST_SHIFTS,
    check,
)


def _measurement(image_kept, text_kept, general_bonus=5.0):
    custom = {"clean_i2t": 50.0, "clean_t2i": 40.0}
    custom.update({s: 20.0 for s in IMAGE_STYLES + CAPTION_STYLES})
    general = {k: v + general_bonus for k, v in custom.items()}
    return {
        "clean_5k": {"i2t": 61.0, "t2i": 49.0},
        "custom_styles": custom, "general_styles": general,
        "image_corruptions": {s: 50.0 * k for s, k in zip(IMAGE_TEST_SHIFTS, image_kept)},
        "text_corruptions": {s: 40.0 * k for s, k in zip(TEXT_TEST_SHIFTS, text_kept)},
    }


def _verdicts(m):
    return {condition: met for condition, met, _ in check(m)}


def test_a_recoverable_regime_meets_the_corruption_conditions():
    verdicts = _verdicts(_measurement([0.5] * 14 + [0.05, 0.05], [0.4] * 11))
    family = [v for c, v in verdicts.items() if "corruptions" in c]
    assert len(family) == 4 and all(family)
    assert verdicts["clean i2t R@1 on shapes-5k >= 60"] and not verdicts["clean t2i R@1 on shapes-5k >= 50"]


def test_three_collapsed_shifts_or_a_mean_outside_the_band_fail():
    m = _measurement([0.5] * 13 + [0.05] * 3, [0.9] * 11)
    verdicts = _verdicts(m)
    assert not verdicts["image corruptions (i2t, severity 5): at most 2 below 10% of clean"]
    assert verdicts["image corruptions (i2t, severity 5): mean R@1 between 30% and 75% of clean"]
    assert not verdicts["text corruptions (t2i, level 7): mean R@1 between 30% and 75% of clean"]
    measured = {c: v for c, _, v in check(m)}
    assert measured["image corruptions (i2t, severity 5): at most 2 below 10% of clean"].startswith("3 (")


def test_styles_need_ten_percent_and_a_better_general_model():
    m = _measurement([0.5] * 16, [0.5] * 11, general_bonus=0.0)
    m["custom_styles"]["style:dark"] = 4.0  # 8 % of clean i2t
    verdicts = _verdicts(m)
    assert not verdicts["style:dark keeps >= 10% of clean (customized)"]
    assert verdicts["style:outline keeps >= 10% of clean (customized)"]
    assert not verdicts["style:outline: general model > customized"]  # a tie is not better
    assert verdicts["style:dark: general model > customized"]
