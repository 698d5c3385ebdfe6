"""bench reads suites, notes and finished runs as it reads any user file: no pipe blocks it, no deep JSON crashes it."""

import json

from queryshift.cli import main as cli_main
from tests.helpers import TINY_MODEL
from tests.test_reliability_inputs import _one_error_line, _within_deadline, fifo  # noqa: F401 (fixture)


def _adhoc(karpathy, tmp_path, *extra):
    data, root = karpathy
    return ["bench", "--methods", "source", "--shifts", "clean", "--directions", "i2t", "--model", TINY_MODEL,
            "--data", data, "--image-root", root, "--cache-dir", str(tmp_path / "c"), "--out", str(tmp_path / "b"),
            "--no-progress", *extra]


def test_a_suite_that_is_a_fifo_is_refused(tmp_path, fifo, capsys):  # noqa: F811
    path = fifo(tmp_path / "suite.yaml")
    box = _within_deadline(cli_main, ["bench", "--suite", path, "--out", str(tmp_path / "o"), "--no-progress"])
    assert box.get("result") == 2, box
    _one_error_line(capsys.readouterr().err, "suite.yaml", "FIFO")


def test_notes_that_are_a_fifo_are_refused(karpathy, tmp_path, fifo, capsys):  # noqa: F811
    notes = fifo(tmp_path / "notes.md")
    box = _within_deadline(cli_main, _adhoc(karpathy, tmp_path, "--notes", notes))
    assert box.get("result") == 2, box
    _one_error_line(capsys.readouterr().err, "notes.md", "FIFO")


def test_a_planted_deeply_nested_result_is_named_not_an_internal_error(karpathy, tmp_path, capsys):
    assert cli_main(_adhoc(karpathy, tmp_path)) == 0
    [result] = list((tmp_path / "b").rglob("result.json"))
    assert json.loads(result.read_text())["method"] == "source"
    result.write_text("[" * 100_000 + "]" * 100_000)
    capsys.readouterr()
    assert cli_main(_adhoc(karpathy, tmp_path)) == 2
    _one_error_line(capsys.readouterr().err, "result.json", "nested too deeply")
