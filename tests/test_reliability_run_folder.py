"""Files found in a run folder (not named by the user) are read as user files: a pipe there never blocks a
run, deep JSON is named, and nothing of them is executed."""

import pytest

from queryshift.cli import main as cli_main
from tests.helpers import TINY_MODEL
from tests.test_reliability_inputs import _one_error_line, _within_deadline, fifo  # noqa: F401 (fixture)


def _argv(karpathy, tmp_path, *extra):
    data, root = karpathy
    return ["run", "--model", TINY_MODEL, "--data", data, "--image-root", root, "--method", "tent",
            "--batch-size", "4", "--cache-dir", str(tmp_path / "c"), "--out", str(tmp_path / "o"), "--no-progress",
            *extra]


def test_a_pipe_in_a_fresh_out_folder_does_not_block(karpathy, tmp_path, fifo, capsys):  # noqa: F811
    (tmp_path / "o").mkdir()
    fifo(tmp_path / "o" / "result.json")
    box = _within_deadline(cli_main, _argv(karpathy, tmp_path))
    assert box.get("result") == 2, box
    _one_error_line(capsys.readouterr().err, "result.json")


@pytest.mark.parametrize("name", ["result.json", "log.jsonl", "state.pt"])
def test_a_pipe_planted_in_a_run_folder_is_refused_on_resume(karpathy, tmp_path, fifo, capsys, name):  # noqa: F811
    assert cli_main(_argv(karpathy, tmp_path)) == 0
    # what --resume reads: the checkpoint and the log of an unfinished run; a finished run's result when no
    # checkpoint is left
    (tmp_path / "o" / ("state.pt" if name == "result.json" else "result.json")).unlink()
    fifo(tmp_path / "o" / name)
    capsys.readouterr()
    box = _within_deadline(cli_main, _argv(karpathy, tmp_path, "--resume"))
    assert box.get("result") == 2, box
    _one_error_line(capsys.readouterr().err, name, "FIFO")


def test_deep_json_planted_as_a_result_is_named(karpathy, tmp_path, capsys):
    assert cli_main(_argv(karpathy, tmp_path)) == 0
    (tmp_path / "o" / "state.pt").unlink()  # a finished run without checkpoint: --resume reads its result
    (tmp_path / "o" / "result.json").write_text("[" * 100_000 + "]" * 100_000)
    capsys.readouterr()
    assert cli_main(_argv(karpathy, tmp_path, "--resume")) == 2
    _one_error_line(capsys.readouterr().err, "result.json", "nested too deeply")
