"""Forgetting on the general domains (``--eval-general-after``) and runs that predate a setting."""

import dataclasses
import json

import pytest

from queryshift.bench.tables import metric_slug
from queryshift.cli import main as cli_main
from queryshift.engine import RunConfig, run, settings_changed
from queryshift.engine import report as report_module
from queryshift.engine.rundir import RunDir, RunDirError
from queryshift.engine.runner import check_distributed
from tests.helpers import tiny_run_config

MODEL = "openclip:qs-tiny/random"
STYLES = {"i2t": ["style:outline", "style:dark", "style:texture"], "t2i": ["style:synonyms", "style:templates"]}



_cfg = tiny_run_config


def test_general_styles_are_the_test_styles_of_the_query_modality():
    from queryshift.shifts import shapes_general

    assert report_module.general_domain_styles("image") == STYLES["i2t"]
    assert report_module.general_domain_styles("text") == STYLES["t2i"]  # never style:sketch / style:chatty
    # the styles the general training stage saw
    assert STYLES["i2t"] == [f"style:{s}" for s in shapes_general.IMAGE_STYLES]
    assert set(STYLES["t2i"]) == {f"style:{s}" for s in shapes_general.CAPTION_VARIATION} - {"style:typos"}


@pytest.mark.parametrize("direction", ["i2t", "t2i"])
def test_forgetting_general_holds_every_style_and_their_mean(karpathy, tmp_path, monkeypatch, direction):
    seen = []
    real = report_module.QueryItems

    def spy(dataset, modality, order, shift, *args):
        seen.append((shift.name, list(order)))
        return real(dataset, modality, order, shift, *args)

    monkeypatch.setattr(report_module, "QueryItems", spy)
    out = tmp_path / "out"
    result = run(_cfg(karpathy, tmp_path, direction=direction, method="tent", lr=0.1, batch_size=3, max_queries=6,
                      eval_general_after=True, out=str(out)))
    # every style measured on the stream's own first max_queries queries
    first_six = report_module.query_order(8 if direction == "i2t" else 16, 42, True, 6)
    assert seen == [(style, first_six) for style in STYLES[direction]]
    saved = json.loads((out / "result.json").read_text())["forgetting_general"]
    assert list(saved) == STYLES[direction] + ["mean"]
    assert saved == json.loads(json.dumps(result["forgetting_general"]))
    for f in saved.values():  # each value rounded to 2 decimals on its own
        assert set(f) == {"r1_after", "r1_source", "forgetting"}
        assert f["forgetting"] == pytest.approx(f["r1_after"] - f["r1_source"], abs=0.015)
    styles = [saved[s] for s in STYLES[direction]]
    for key in ("r1_after", "r1_source"):
        assert saved["mean"][key] == pytest.approx(sum(f[key] for f in styles) / len(styles), abs=0.01)
    assert "forgetting" not in result  # the clean measurement is a separate setting


def test_eval_general_after_is_refused_where_it_cannot_be_measured(karpathy, tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="composed queries"):
        _cfg(karpathy, tmp_path, direction="c2i", eval_general_after=True)
    monkeypatch.setattr("queryshift.engine.runner.distributed.world_size", lambda: 2)
    with pytest.raises(ValueError, match="--eval-general-after is not supported with several processes"):
        check_distributed(_cfg(karpathy, tmp_path, eval_general_after=True), 64)
    check_distributed(_cfg(karpathy, tmp_path), 64)  # without it the same run is allowed


def test_a_saved_config_without_the_new_key_counts_as_its_default(karpathy, tmp_path):
    cfg = _cfg(karpathy, tmp_path)
    old = dataclasses.asdict(cfg)
    del old["eval_general_after"]  # a run written before the setting existed
    assert settings_changed(old, cfg) == []
    on = dataclasses.replace(cfg, eval_general_after=True)
    assert settings_changed(old, on) == ["eval_general_after False -> True"]


def test_resume_and_bench_reuse_runs_that_predate_the_setting(karpathy, tmp_path, capsys):
    data, root = karpathy
    out = tmp_path / "bench"
    argv = ["bench", "--model", MODEL, "--data", data, "--image-root", root, "--methods", "source",
            "--directions", "i2t", "--batch-size", "4", "--out", str(out), "--cache-dir", str(tmp_path / "c"),
            "--no-progress"]
    assert cli_main(argv) == 0
    (result_path,) = out.glob("runs/grid/*/result.json")
    result = json.loads(result_path.read_text())
    del result["config"]["eval_general_after"]
    result_path.write_text(json.dumps(result))
    stamp = result_path.stat().st_mtime_ns
    assert cli_main(argv) == 0  # reused, not refused or rerun
    assert result_path.stat().st_mtime_ns == stamp
    # asking for the new measurement is a change of settings: never reported from the old run
    assert cli_main(argv + ["--eval-general-after"]) == 2
    assert "other settings (eval_general_after False -> True)" in capsys.readouterr().err

    # an interrupted run whose checkpoint predates the setting resumes (RunDir reads the config in state.pt)
    import torch

    run_dir = result_path.parent
    state = torch.load(run_dir / "state.pt", weights_only=False)
    del state["config"]["eval_general_after"]
    torch.save(state, run_dir / "state.pt")
    cfg = dataclasses.replace(_cfg(karpathy, tmp_path, batch_size=4, cache_dir=str(tmp_path / "c")),
                              out=str(run_dir), resume=True)
    RunDir(str(run_dir), resume=True, cfg=cfg).close()
    with pytest.raises(RunDirError, match="eval_general_after False -> True"):
        RunDir(str(run_dir), resume=True, cfg=dataclasses.replace(cfg, eval_general_after=True))


def test_bench_table_shows_general_forgetting(karpathy, tmp_path):
    data, root = karpathy
    suite = tmp_path / "forget.yaml"
    suite.write_text(
        f"base: {{model: '{MODEL}', data: '{data}', image_root: '{root}', batch_size: 4, max_queries: 4, lr: 0.1,\n"
        "       eval_clean_after: true, eval_general_after: true}\n"
        "grid: {method: [source, tent], direction: [i2t]}\n"
        "table: {rows: method, columns: direction,\n"
        "        metric: [r1, forgetting.forgetting, forgetting_general.mean.forgetting]}\n")
    out = tmp_path / "bench"
    assert cli_main(["bench", "--suite", str(suite), "--out", str(out), "--cache-dir", str(tmp_path / "c"),
                     "--no-progress"]) == 0
    results = json.loads((out / "results.json").read_text())
    runs = {r["labels"]["method"]: r for r in results["runs"]}
    tent = runs["tent"]["forgetting_general"]["mean"]["forgetting"]
    assert runs["source"]["forgetting_general"]["mean"]["forgetting"] == 0
    tables = results["tables"]
    # two metrics ending in "forgetting" get their own table and PNG, not one overwriting the other
    assert tables["forget-forgetting-forgetting"]["averages"]["tent"] == runs["tent"]["forgetting"]["forgetting"]
    assert tables["forget-forgetting_general-mean-forgetting"]["averages"]["tent"] == pytest.approx(tent)
    md = (out / "results.md").read_text()
    assert f"| tent | {tent:.2f} | {tent:.2f} |" in md
    assert (out / "forget-forgetting_general-mean-forgetting.png").exists()
    assert (out / "forget-forgetting-forgetting.png").exists()
    assert metric_slug("forgetting.forgetting", ["r1", "forgetting.forgetting"]) == "forgetting"


def test_general_forgetting_is_measured_on_the_styled_queries(tmp_path):
    """On the shapes world: zero for ``source``, non-zero after a large-rate Tent run, and the source side of
    each style is exactly what a source run on that style measures."""
    common = dict(model="shapes-clip", data="shapes", direction="i2t", max_queries=32, batch_size=16,
                  progress=False, num_workers=0, cache_dir=str(tmp_path))
    source = run(RunConfig(**common, method="source", eval_general_after=True))["forgetting_general"]
    for f in source.values():
        assert f["forgetting"] == 0 and f["r1_after"] == f["r1_source"]
    tent = run(RunConfig(**common, method="tent", lr=1e-2, eval_general_after=True))["forgetting_general"]
    assert {s: f["r1_source"] for s, f in tent.items()} == {s: f["r1_source"] for s, f in source.items()}
    assert any(tent[s]["forgetting"] != 0 for s in STYLES["i2t"])
    dark = run(RunConfig(**common, method="source", shift="style:dark"))
    assert tent["style:dark"]["r1_source"] == dark["r1"]  # the styled queries, not the clean ones
