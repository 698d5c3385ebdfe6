"""The demo's figure shows R@1 change against ``source``, per method and shift, not absolute R@1."""

from __future__ import annotations

import math

from queryshift import demo

GRID = {
    "rows": ["source", "tcr", "rest"],
    "cols": ["i2t clean", "i2t gaussian_noise:5"],
    "cell": {("source", "i2t clean"): 46.8, ("source", "i2t gaussian_noise:5"): 6.3,
             ("tcr", "i2t clean"): 47.4, ("tcr", "i2t gaussian_noise:5"): 14.0,
             ("rest", "i2t clean"): 47.4},  # rest's noise run is missing
    "averages": {"source": 26.55, "tcr": 30.7, "rest": None},
    "metric": "r1",
}


def test_gains_are_differences_to_source_with_the_average_last():
    rows, cols, table = demo.gains(GRID)
    assert rows == ["tcr", "rest"]  # source is the reference, not a row
    assert cols == ["i2t clean", "i2t gaussian_noise:5", "avg"]
    assert [round(v, 6) for v in table[0]] == [0.6, 7.7, 4.15]
    assert round(table[1][0], 6) == 0.6
    assert math.isnan(table[1][1]) and math.isnan(table[1][2])  # a missing run is no gain


def test_plot_gains_writes_a_png(tmp_path):
    path = tmp_path / "demo.png"
    demo.plot_gains(GRID, str(path))
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
