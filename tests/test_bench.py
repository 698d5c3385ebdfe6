import json
import os

import pytest

from queryshift.cli import main as cli_main
from queryshift.commands import bench
from tests.helpers import make_karpathy

SUITES = os.path.join(os.path.dirname(__file__), "..", "src", "queryshift", "suites")


@pytest.mark.parametrize("name", sorted(f[:-5] for f in os.listdir(SUITES) if f.endswith(".yaml")))
def test_every_suite_plans(name, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)  # found by name from the package, not from a checkout's folder
    parser = __import__("queryshift.cli", fromlist=["build_parser"]).build_parser()
    args = parser.parse_args(["bench", "--suite", name, "--out", "unused"])
    tables = bench.plan(args)
    assert tables and tables[0]["runs"]
    for _labels, cfg in tables[0]["runs"]:
        assert cfg.method and cfg.direction in ("i2t", "t2i", "c2i", "v2a", "a2v")


def test_bench_grid_writes_tables_and_reuses_runs(tmp_path, capsys):
    data = make_karpathy(tmp_path / "d", n_images=6, captions=2)
    out = tmp_path / "bench"
    argv = ["bench", "--model", "openclip:qs-tiny/random", "--data", data, "--image-root", str(tmp_path / "d"),
            "--methods", "source,tent", "--shifts", "clean,gaussian_noise:5,RandomCharAug_swap:5",
            "--batch-size", "4", "--steps", "1", "--out", str(out), "--cache-dir", str(tmp_path / "c"),
            "--no-progress"]
    assert cli_main(argv) == 0
    md = (out / "results.md").read_text()
    assert "| method | i2t clean | i2t gaussian_noise:5 | t2i clean | t2i RandomCharAug_swap:5 | avg |" in md
    assert "| tent |" in md and (out / "grid.png").stat().st_size > 1000
    results = json.loads((out / "results.json").read_text())
    assert len(results["runs"]) == 8  # image corruptions skip t2i and text corruptions skip i2t
    stamp = {p: p.stat().st_mtime for p in out.glob("runs/grid/*/result.json")}
    assert cli_main(argv) == 0  # a second call reuses every finished run
    assert {p: p.stat().st_mtime for p in out.glob("runs/grid/*/result.json")} == stamp
    # the same grid with other settings must not reuse those results silently
    assert cli_main([a if a != "1" else "2" for a in argv]) == 2  # --steps 2
    assert "holds a finished run with other settings (steps 1 -> 2)" in capsys.readouterr().err
    # nor the results of a source model that was retrained since (same name, other weights)
    first = sorted(stamp)[0]
    result = json.loads(first.read_text())
    assert len(result["model_weights"]) == 16
    first.write_text(json.dumps({**result, "model_weights": "0" * 16}))
    assert cli_main(argv) == 2
    assert "holds a finished run of other openclip:qs-tiny/random weights" in capsys.readouterr().err


def test_parallel_jobs_match_serial(tmp_path):
    data = make_karpathy(tmp_path / "d", n_images=6, captions=2)
    common = ["bench", "--model", "openclip:qs-tiny/random", "--data", data, "--image-root", str(tmp_path / "d"),
              "--methods", "source,tent", "--directions", "i2t", "--batch-size", "4", "--steps", "1",
              "--cache-dir", str(tmp_path / "c"), "--no-progress"]
    assert cli_main(common + ["--out", str(tmp_path / "serial")]) == 0
    assert cli_main(common + ["--out", str(tmp_path / "parallel"), "--jobs", "2"]) == 0
    serial = json.loads((tmp_path / "serial" / "results.json").read_text())["runs"]
    parallel = json.loads((tmp_path / "parallel" / "results.json").read_text())["runs"]
    assert [(r["labels"], r["r1"], r["map"]) for r in serial] == [(r["labels"], r["r1"], r["map"]) for r in parallel]


def test_report_header_names_the_queryshift_command_however_it_was_started():
    from queryshift.commands.bench import invoked_command

    args = ["bench", "--suite", "synthetic", "--title", "a title"]
    expected = "queryshift bench --suite synthetic --title 'a title'"
    for entry in ("/usr/local/bin/queryshift", "/x/src/queryshift/__main__.py", "/x/src/queryshift/cli.py"):
        assert invoked_command([entry, *args]) == expected
    assert invoked_command(["my_script.py", "bench"]) == "my_script.py bench"


# --- refusals before any work (issue 29 items 5 and 6) ---

@pytest.mark.parametrize("flag, value", [("--methods", ""), ("--methods", "source,,tent"), ("--shifts", ""),
                                         ("--shifts", " , "), ("--directions", "")])
def test_bench_refuses_an_empty_list(flag, value, tmp_path, capsys):
    argv = ["bench", "--methods", "source", "--out", str(tmp_path / "b"), flag, value]
    assert cli_main(argv) == 2
    err = capsys.readouterr().err
    assert f"queryshift bench: error: {flag}" in err and "empty" in err
    assert not (tmp_path / "b").exists()


def _suite(tmp_path, text: str) -> str:
    path = tmp_path / "s.yaml"
    path.write_text(text)
    return str(path)


def test_bench_refuses_an_unknown_table_metric_naming_the_valid_ones(tmp_path, capsys):
    suite = _suite(tmp_path, "grid: {method: [source]}\ntable: {rows: method, metric: [r1, R@1]}\n")
    assert cli_main(["bench", "--suite", suite, "--out", str(tmp_path / "b")]) == 2
    err = capsys.readouterr().err
    assert "'R@1'" in err and "r1, r5, r10" in err and "log_means.<key>" in err
    assert not (tmp_path / "b").exists()


def test_known_table_metrics_pass_the_check():
    from queryshift.bench import check_metric

    for metric in ("r1", "map", "forgetting.forgetting", "forgetting_general.mean.forgetting", "log_means.loss"):
        check_metric(metric)
    for metric in ("", "forgetting", "log_means", "r1.x", "recall"):
        with pytest.raises(ValueError, match="valid metrics"):
            check_metric(metric)


def test_bench_counts_a_large_grid_before_building_it(tmp_path, capsys):
    import time

    seeds = ", ".join(str(s) for s in range(100))
    suite = _suite(tmp_path, f"grid: {{method: [source, tent, tcr], seed: [{seeds}], steps: [1, 2, 3, 4, 5, 6, 7]}}\n")
    start = time.perf_counter()
    assert cli_main(["bench", "--suite", suite, "--out", str(tmp_path / "b")]) == 2
    assert time.perf_counter() - start < 5
    err = capsys.readouterr().err
    assert "2100 runs" in err and "--max-runs" in err
    assert not (tmp_path / "b").exists()


def test_max_runs_allows_a_large_grid_and_caps_an_ad_hoc_one(tmp_path):
    from queryshift.cli import build_parser

    seeds = ", ".join(str(s) for s in range(30))
    suite = _suite(tmp_path, f"grid: {{method: [source], seed: [{seeds}]}}\n")
    parser = build_parser()
    tables = bench.plan(parser.parse_args(["bench", "--suite", suite, "--out", "x", "--max-runs", "30"]))
    assert len(tables[0]["runs"]) == 30
    with pytest.raises(ValueError, match=r"30 runs, .*--max-runs 30"):
        bench.plan(parser.parse_args(["bench", "--suite", suite, "--out", "x", "--max-runs", "29"]))
    with pytest.raises(ValueError, match=r"4 runs, .*--max-runs 4"):
        bench.plan(parser.parse_args(["bench", "--methods", "source,tent", "--out", "x", "--max-runs", "3"]))
