"""Command-line frictions a new user hit (issue 28): truthful help, a note when nothing is written, a fast and
short error for hub weights that are not here."""

import os
import re
import subprocess
import sys
import time

import pytest

from queryshift import models
from queryshift.cli import main as cli_main
from queryshift.engine import RunConfig
from tests.helpers import make_karpathy


def _help(capsys, *argv) -> str:
    with pytest.raises(SystemExit):
        cli_main([*argv, "--help"])
    return " ".join(capsys.readouterr().out.split())


@pytest.mark.parametrize("command", ["run", "bench"])
def test_lr_help_states_the_rate_a_run_records(command, capsys):
    text = _help(capsys, command)
    stated = re.search(r"--lr LR\s+learning rate \(default: (.*?)\)", text)
    assert stated, text
    for model in models.PROTOCOL_LR:  # every backbone with a chosen rate is named with the rate it runs at
        rate = RunConfig(model=model).resolved_lr()
        assert f"{rate:g} for {model}" in stated.group(1)
    assert f"{RunConfig(model='openclip:ViT-B-16/openai').resolved_lr():g}" in stated.group(1)
    assert f"{RunConfig(model='hf-blip:x', direction='t2i').resolved_lr():g} for BLIP" in stated.group(1)


def test_a_run_without_out_says_it_wrote_nothing(tmp_path, capsys):
    data = make_karpathy(tmp_path / "d", n_images=4, captions=2)
    argv = ["run", "--model", "openclip:qs-tiny/random", "--data", data, "--image-root", str(tmp_path / "d"),
            "--batch-size", "4", "--cache-dir", str(tmp_path / "c"), "--no-progress"]
    assert cli_main(argv) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert any("nothing was written" in line and "--out" in line for line in err), err
    assert cli_main(argv + ["--out", str(tmp_path / "r")]) == 0
    assert "nothing was written" not in capsys.readouterr().err


def test_absent_hub_weights_fail_fast_in_one_short_line(tmp_path):
    """Offline (no route to the hub) and without the weights in the cache: no minute of retries."""
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "0", "OMP_NUM_THREADS": "1",
           # an address nothing listens on: every download attempt fails at once, as without network
           "HTTPS_PROXY": "http://127.0.0.1:9", "HTTP_PROXY": "http://127.0.0.1:9", "NO_PROXY": ""}
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "queryshift", "run", "--model", "openclip:ViT-B-16/openai",
                           "--data", "shapes", "--max-queries", "4", "--cache-dir", str(tmp_path / "c")],
                          env=env, capture_output=True, text=True, timeout=300)
    seconds = time.perf_counter() - start
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and len(lines[0]) <= 300, done.stderr
    assert "ViT-B-16" in lines[0] and "openai" in lines[0] and "openclip:ViT-B-16@" in lines[0]
    assert seconds < 30, f"took {seconds:.0f} s"


def test_absent_hf_model_fails_fast_in_one_short_line(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from queryshift.models import WeightsNotFoundError, load_model

    start = time.perf_counter()
    with pytest.raises(WeightsNotFoundError) as caught:
        load_model("hf-clip:nobody/no-such-clip")
    message = str(caught.value)
    assert time.perf_counter() - start < 10
    assert "\n" not in message and len(message) <= 300 and "hub cannot be reached" in message
    assert "--model hf-clip:DIR" in message
