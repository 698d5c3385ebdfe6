"""The lab through the queryshift CLI: ``python -m lab.cli`` registers rest-design and finds lab/suites by name;
every lab suite loads, validates and plans; rest-design's string choices (``decouple=off``) stay strings."""

import os
import re
import subprocess
import sys

import pytest
from tests.helpers import make_karpathy

from lab import cli as lab_cli
from queryshift.bench import PACKAGE_SUITES
from queryshift.cli import build_parser
from queryshift.commands import bench
from queryshift.commands.run import config_from_args
from queryshift.configs import load_run_config, load_suite, suite_runs
from queryshift.engine import RunConfig

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
LAB_SUITES = sorted(f[:-5] for f in os.listdir(lab_cli.LAB_SUITES) if f.endswith(".yaml"))


@pytest.fixture
def lab_env(monkeypatch):
    """What ``python -m lab.cli`` sets up, undone after the test."""
    import lab  # noqa: F401  (registers rest-design)

    monkeypatch.setenv("QUERYSHIFT_PLUGINS", "lab")
    monkeypatch.setenv("QUERYSHIFT_SUITES", lab_cli.LAB_SUITES)


def test_lab_holds_the_research_suites_and_the_package_the_user_suites():
    assert len(LAB_SUITES) >= 10 and all(("rest" in n or n.startswith("validation-")) for n in LAB_SUITES)
    shipped = {f[:-5] for f in os.listdir(PACKAGE_SUITES) if f.endswith(".yaml")}
    assert not shipped & set(LAB_SUITES) and {"synthetic", "synthetic-cir", "coco-c-i2t-blip-base"} <= shipped


@pytest.mark.parametrize("name", LAB_SUITES)
def test_every_lab_suite_loads_validates_and_plans(name, lab_env, tmp_path, monkeypatch):
    path = os.path.join(lab_cli.LAB_SUITES, f"{name}.yaml")
    _, runs, _ = load_suite(path)
    _, labelled, _, _ = suite_runs(path)
    for _labels, run in labelled:
        RunConfig.from_dict(run, source=path)  # method and hyper-parameters validated (rest-design's too)
    methods = {r["method"] for r in runs}
    # a comparison has its reference; a REST-only suite compares with runs made elsewhere (validation-rates-rest
    # completes validation-lr, round 4 is scored against validation-rates' numbers)
    assert "source" in methods or methods <= {"rest", "rest-design"}
    monkeypatch.chdir(tmp_path)  # found by name through QUERYSHIFT_SUITES
    tables = bench.plan(build_parser().parse_args(["bench", "--suite", name, "--out", "unused"]))
    assert tables and tables[0]["runs"]


def test_design_options_belong_to_rest_design_in_the_lab_suites():
    design = ("decouple", "know", "fisher", "keep", "margin_deg", "con", "anchor_loss", "log_angle")
    for name in LAB_SUITES:
        text = open(os.path.join(lab_cli.LAB_SUITES, f"{name}.yaml"), encoding="utf-8").read()
        for line in text.splitlines():
            if re.search(r"method: rest\b(?!-)", line) and "hparams" in line:
                assert not re.search(r"\b(" + "|".join(design) + r"):", line), (name, line)


def test_string_choices_stay_strings(lab_env, tmp_path):
    args = build_parser().parse_args(["run", "--method", "rest-design", "--hparam", "decouple=off",
                                      "--hparam", "tau=0.05", "--hparam", "refine=false"])
    assert config_from_args(args).hparams == {"decouple": "off", "tau": 0.05, "refine": False}
    (tmp_path / "c.yaml").write_text("method: rest-design\nhparams: {decouple: off}\n")
    assert RunConfig(**load_run_config(str(tmp_path / "c.yaml"))).hparams == {"decouple": "off"}


def test_lab_cli_runs_rest_design_and_refuses_a_bad_choice_in_one_line(tmp_path):
    data = make_karpathy(tmp_path / "d", n_images=6, captions=2)
    argv = [sys.executable, "-m", "lab.cli", "run", "--model", "openclip:qs-tiny/random", "--data", data,
            "--image-root", str(tmp_path / "d"), "--cache-dir", str(tmp_path / "c"), "--no-progress",
            "--batch-size", "4", "--steps", "1", "--method", "rest-design"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("QUERYSHIFT_PLUGINS", None)
    bad = subprocess.run([*argv, "--hparam", "decouple=sideways", "--out", str(tmp_path / "bad")], cwd=ROOT,
                         env=env, capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and re.search(r"error: .*decouple.*tensor.*global.*off", bad.stderr), bad.stderr
    assert "Traceback" not in bad.stderr and not (tmp_path / "bad").exists()
    ok = subprocess.run([*argv, "--hparam", "decouple=global", "--out", str(tmp_path / "ok")], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=300)
    assert ok.returncode == 0, ok.stderr
    assert (tmp_path / "ok" / "result.json").exists()
