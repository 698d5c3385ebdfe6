"""The continual-stream report: stream R@1, forgetting and segments below source, checked by hand."""

import pytest

from queryshift.bench.continual import continual_summary, continual_table, plot_continual


def _record(method, r1s, forgetting=None, general=None, stream="i2t continual"):
    names = ["gaussian_noise:5", "fog:5", "gaussian_noise:5#2"]
    rec = {"labels": {"method": method, "stream": stream},
           "segments": {n: {"r1": v} for n, v in zip(names, r1s)}, "segment_order": names}
    if forgetting is not None:
        rec["forgetting"] = {"forgetting": forgetting}
    if general is not None:
        rec["forgetting_general"] = {"mean": {"forgetting": general}}
    return rec


RECORDS = [
    _record("source", [10.0, 40.0, 10.0], 0.0, 0.0),
    _record("tcr", [20.0, 30.0, 9.0], -8.0, -1.5),  # below source on fog and on the return of the noise
    _record("rest", [15.0, 41.0, 16.0], -0.5, 0.25),
    _record("tcr", [1.0, 1.0, 1.0], stream="t2i continual"),  # another stream, no source run
    {"labels": {"method": "tcr", "stream": "single"}, "r1": 5.0},  # not a stream: ignored
]


def test_summary_by_hand():
    summary = continual_summary(RECORDS)
    assert set(summary) == {"i2t continual", "t2i continual"}
    rows = {r["method"]: r for r in summary["i2t continual"]}
    assert rows["source"]["stream_r1"] == 20.0 and rows["source"]["below_source"] == 0
    assert rows["tcr"]["stream_r1"] == pytest.approx(59 / 3, abs=0.01)
    assert rows["tcr"]["below_source"] == 2 and rows["tcr"]["forgetting"] == -8.0
    assert rows["tcr"]["forgetting_general"] == -1.5
    assert rows["rest"]["stream_r1"] == 24.0 and rows["rest"]["below_source"] == 0
    assert summary["t2i continual"][0]["below_source"] is None


def test_table_and_plot(tmp_path):
    table = continual_table(continual_summary(RECORDS)["i2t continual"])
    assert "| tcr | 19.67 | -8.00 | -1.50 | 2 of 3 |" in table
    assert "| rest | 24.00 | -0.50 | +0.25 | 0 of 3 |" in table
    path = tmp_path / "c.png"
    plot_continual(RECORDS[:3], "i2t continual", str(path))
    assert path.stat().st_size > 1000
    with pytest.raises(ValueError, match="no run with stream segments"):
        plot_continual(RECORDS[4:], "x", str(tmp_path / "d.png"))


def test_bench_report_adds_a_section_per_stream(tmp_path):
    from queryshift.bench.report import _streams_section

    records = [dict(r, table="t") for r in RECORDS[:3]]
    parts = _streams_section("t", records, str(tmp_path), "")
    text = "\n".join(parts)
    assert "### Along the stream: i2t continual" in text and "| tcr | 19.67 | -8.00 | -1.50 | 2 of 3 |" in text
    assert (tmp_path / "t-along-0.png").stat().st_size > 1000
    assert _streams_section("t", [dict(RECORDS[4], table="t")], str(tmp_path), "") == []
