"""Issue 12: no silent wrong result, no lost run, no write outside --out, no traceback for expected failures.

Every test drives the CLI (or the engine) the way a user would and checks what is left on disk and what
was printed. Runs use the tiny random open_clip architecture and a generated 8-image dataset.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from queryshift import locks, methods
from queryshift.cli import COMMANDS, build_parser
from queryshift.cli import main as cli_main
from queryshift.commands import corrupt
from queryshift.commands.run import config_from_args
from queryshift.engine import RunConfig, run, write_json
from queryshift.methods.base import Method
from queryshift.methods.hparams import HP, validate_hparams
from tests.helpers import make_karpathy

MODEL = "openclip:qs-tiny/random"
SRC = os.path.join(os.path.dirname(__file__), "..", "src")


def strict_json(text: str):
    """json.loads that refuses NaN/Infinity, as every other JSON parser does."""
    def refuse(name):
        raise ValueError(f"non-standard JSON constant {name}")
    return json.loads(text, parse_constant=refuse)



@pytest.fixture
def argv(karpathy, tmp_path):
    data, root = karpathy
    return ["run", "--model", MODEL, "--data", data, "--image-root", root, "--cache-dir", str(tmp_path / "cache"),
            "--no-progress", "--batch-size", "4", "--steps", "1"]


class AlwaysSkips(Method):
    """Never has a loss (like an in-batch method at batch size 1): every update is skipped."""

    name = "always-skips"
    defaults = {"tau": 0.05}

    def forward_and_adapt(self, query_batch, step):
        scores = self.encode(query_batch) @ self.gallery.T
        info = {}
        self.update(None, info)
        return scores, info


class NanLoss(Method):
    """A loss that is always NaN: its updates are skipped and logged as such."""

    name = "nan-loss"
    defaults = {"tau": 0.05}

    def forward_and_adapt(self, query_batch, step):
        scores = self.encode(query_batch) @ self.gallery.T
        info = {}
        self.update(scores.sum() * float("nan"), info)
        return scores, info


@pytest.fixture
def test_methods():
    methods.register("always-skips", "tests.test_reliability:AlwaysSkips")
    methods.register("nan-loss", "tests.test_reliability:NanLoss")
    yield
    methods.unregister("always-skips")
    methods.unregister("nan-loss")


# -- 1. a finished run is never replaced silently -------------------------------------------------------------

def test_resume_without_checkpoint_refuses_a_finished_run_of_other_settings(argv, tmp_path, capsys):
    out = tmp_path / "r"
    assert cli_main([*argv, "--method", "tcr", "--out", str(out)]) == 0
    before = (out / "result.json").read_text()
    (out / "state.pt").unlink()
    capsys.readouterr()
    assert cli_main([*argv, "--method", "tent", "--out", str(out), "--resume"]) == 2
    err = capsys.readouterr().err
    assert "method 'tcr' -> 'tent'" in err and str(out) in err
    assert (out / "result.json").read_text() == before  # the tcr results are still there


def test_resume_of_a_finished_run_without_checkpoint_keeps_it(argv, tmp_path, capsys):
    out = tmp_path / "r"
    assert cli_main([*argv, "--method", "source", "--out", str(out)]) == 0
    before = (out / "result.json").read_text(), (out / "log.jsonl").read_text()
    (out / "state.pt").unlink()
    capsys.readouterr()
    assert cli_main([*argv, "--method", "source", "--out", str(out), "--resume"]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert ((out / "result.json").read_text(), (out / "log.jsonl").read_text()) == before


def test_resume_without_checkpoint_says_it_starts_over(argv, tmp_path, capsys):
    out = tmp_path / "r"
    out.mkdir()
    (out / "log.jsonl").write_text('{"batch": 0, "n": 4}\n')  # killed before the first checkpoint
    assert cli_main([*argv, "--method", "source", "--out", str(out), "--resume"]) == 0
    assert "starting over" in capsys.readouterr().err
    assert (out / "result.json").exists()


def test_resume_and_overwrite_together_are_refused(argv, tmp_path, capsys):
    assert cli_main([*argv, "--out", str(tmp_path / "r"), "--resume", "--overwrite"]) == 2
    assert cli_main([*argv, "--resume"]) == 2  # without --out there is nothing to resume
    assert "give --out" in capsys.readouterr().err


def test_overwrite_keeps_the_old_run_until_the_new_one_is_valid(argv, tmp_path):
    out = tmp_path / "r"
    assert cli_main([*argv, "--out", str(out)]) == 0
    before = (out / "result.json").read_text()
    assert cli_main([*argv, "--out", str(out), "--overwrite", "--shift", "no_such_shift:3"]) == 2
    assert (out / "result.json").read_text() == before


# -- 2. one writer per output directory ----------------------------------------------------------------------

def test_second_writer_on_one_out_fails_at_once_naming_the_holder(argv, tmp_path, capsys):
    out = tmp_path / "r"
    out.mkdir()
    holder = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(f"""
            import sys, time
            sys.path.insert(0, {SRC!r})
            from queryshift.locks import exclusive_lock
            with exclusive_lock({str(out)!r}):
                print("locked", flush=True)
                sys.stdin.read()
            """)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        assert cli_main([*argv, "--method", "tent", "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert str(out) in err and f"pid {holder.pid}" in err
        assert not (out / "log.jsonl").exists()
    finally:
        holder.communicate("")
    assert cli_main([*argv, "--method", "tent", "--out", str(out)]) == 0  # released with its holder


def test_lock_is_exclusive_within_one_process_too(tmp_path):
    with locks.exclusive_lock(str(tmp_path)):
        with pytest.raises(locks.LockedError, match=f"pid {os.getpid()}"):
            with locks.exclusive_lock(str(tmp_path)):
                pass
    with locks.exclusive_lock(str(tmp_path)):  # released on exit
        pass


def test_gallery_cache_is_written_under_its_lock(karpathy, tmp_path, monkeypatch):
    from queryshift.engine.store import EmbeddingStore

    seen = []
    real_fill = EmbeddingStore.fill

    def fill(self, *a, **kw):  # another writer of the same store must not get in while this one writes
        try:
            with locks.ExclusiveLock(os.path.join(self.path, "lock"), wait=False):
                seen.append("free")
        except locks.LockedError as err:
            seen.append("held" if str(os.getpid()) in str(err) else str(err))
        return real_fill(self, *a, **kw)

    monkeypatch.setattr(EmbeddingStore, "fill", fill)
    data, root = karpathy
    run(RunConfig(model=MODEL, data=data, image_root=root, cache_dir=str(tmp_path / "cache"), progress=False))
    assert seen == ["held"]


# -- 3. corrupt never writes outside --out ------------------------------------------------------------------

def _corrupt(argv):
    parser = argparse.ArgumentParser()
    corrupt.add_parser(parser.add_subparsers())
    args = parser.parse_args(["corrupt", *argv])
    return args.func(args)


def _escaping_dataset(tmp_path):
    root = tmp_path / "ds" / "images"
    data = make_karpathy(root, n_images=2, captions=1)
    victim = tmp_path / "x" / "img.jpg"  # ../../x/img.jpg from the image root
    victim.parent.mkdir()
    victim.write_bytes((root / "img" / "0.jpg").read_bytes())
    entries = json.loads(open(data).read())
    entries.append({"image": "../../x/img.jpg", "caption": ["an image outside the root"]})
    path = tmp_path / "ds" / "test.json"
    path.write_text(json.dumps(entries))
    return str(path), str(root), victim


def test_corrupt_refuses_image_paths_that_escape_out(tmp_path, capsys):
    data, root, victim = _escaping_dataset(tmp_path)
    out = tmp_path / "out" / "inner"
    before = victim.read_bytes()
    _corrupt(["--data", data, "--image-root", root, "--shift", "gaussian_noise:1", "--out", str(out),
              "--overwrite", "--no-progress"])
    written = [os.path.join(d, f) for d, _, fs in os.walk(tmp_path) for f in fs]
    outside = [p for p in written if not os.path.realpath(p).startswith(str(tmp_path / "ds"))
               and not os.path.realpath(p).startswith(str(out))]
    assert outside == [str(victim)] and victim.read_bytes() == before
    assert "../../x/img.jpg" in capsys.readouterr().err
    assert len(list((out / "test_IP_gaussian_noise_1" / "img").iterdir())) == 2  # the others were written


def test_corrupt_never_overwrites_its_input(tmp_path):
    root = tmp_path / "out" / "test_IP_gaussian_noise_1"  # the images live where the outputs would go
    data = make_karpathy(root, n_images=2, captions=1)
    before = (root / "img" / "0.jpg").read_bytes()
    with pytest.raises(ValueError, match="is the input image itself"):
        _corrupt(["--data", data, "--image-root", str(root), "--shift", "gaussian_noise:1",
                  "--out", str(tmp_path / "out"), "--overwrite", "--no-progress"])
    assert (root / "img" / "0.jpg").read_bytes() == before


def test_corrupt_prefix_must_stay_inside_out(tmp_path):
    data = make_karpathy(tmp_path / "d", n_images=2, captions=1)
    with pytest.raises(ValueError, match="--prefix"):
        _corrupt(["--data", data, "--image-root", str(tmp_path / "d"), "--shift", "gaussian_noise:1",
                  "--out", str(tmp_path / "out"), "--prefix", "../escaped"])
    assert not (tmp_path / "escaped_IP_gaussian_noise_1").exists()


# -- 4. method hyper-parameters are validated before anything is written -------------------------------------

@pytest.mark.parametrize("method,value,match", [
    ("tent", "tau=0", "tau.*> 0"),
    ("tcr", "tau=.nan", "tau.*finite"),
    ("tent", "tau=abc", "tau.*number.*'abc'"),
    ("tcr", "con_ratio=1.5", "con_ratio.*<= 1"),
    ("tcr", "queue_size=2.5", "queue_size.*integer"),
    ("rest", "lambda_k=-1", "lambda_k.*>= 0.*-1"),
    ("tent", "nosuch=1", "unknown hyper-parameter"),
])
def test_bad_hparams_fail_before_anything_is_written(argv, tmp_path, capsys, method, value, match):
    out = tmp_path / "r"
    assert cli_main([*argv, "--method", method, "--hparam", value, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    import re
    assert re.search(match, err), err
    assert not out.exists()
    assert cli_main([*argv, "--method", method, "--out", str(out)]) == 0  # nothing blocks the rerun


def test_none_hparam_from_the_command_line():
    deyo = build_parser().parse_args(["run", "--method", "deyo", "--hparam", "plpd_threshold=none"])
    assert config_from_args(deyo).hparams == {"plpd_threshold": None}


@pytest.mark.parametrize("name", methods.available())
def test_every_method_declares_its_hparams(name):
    cls = methods.get(name)
    assert set(cls.hparam_spec) == set(cls.defaults), name
    assert validate_hparams(cls, dict(cls.defaults)) == cls.defaults  # the defaults are valid


def test_hp_spec_checks():
    assert HP(float, gt=0).check("tau", "0.5") == 0.5
    assert HP(int, ge=1).check("k", 3.0) == 3
    with pytest.raises(ValueError, match="> 0"):
        HP(float, gt=0).check("tau", -1)
    with pytest.raises(ValueError, match="true or false"):
        HP(bool).check("flag", "maybe")
    with pytest.raises(ValueError, match="finite"):
        HP(float).check("x", float("inf"))


def test_json_outputs_are_strict(argv, tmp_path, test_methods):
    out = tmp_path / "r"
    assert cli_main([*argv, "--method", "nan-loss", "--out", str(out)]) == 0
    rows = [strict_json(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert rows and all(r["loss"] is None and r["skipped"] == "nonfinite" for r in rows)
    strict_json((out / "result.json").read_text())
    write_json(str(tmp_path / "x.json"), {"a": float("nan"), "b": [float("-inf"), 1.0], "c": torch.tensor(2.0)})
    assert strict_json((tmp_path / "x.json").read_text()) == {"a": None, "b": [None, 1.0], "c": 2.0}


# -- 5. out-of-range options ---------------------------------------------------------------------------------

@pytest.mark.parametrize("option,value", [
    ("--max-queries", "-3"), ("--max-queries", "0"), ("--max-words", "-1"), ("--max-words", "0"),
    ("--batch-size", "0"), ("--steps", "0"), ("--num-workers", "-1"), ("--lr", "-1"), ("--lr", "nan"),
    ("--weight-decay", "-0.1"), ("--weight-decay", "inf"),
])
def test_out_of_range_options_are_rejected(argv, tmp_path, capsys, option, value):
    out = tmp_path / "r"
    assert cli_main([*argv, option, value, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert option.lstrip("-").replace("-", "_") in err and value in err
    assert not out.exists()


def test_max_queries_scores_exactly_that_many(argv, tmp_path):
    assert cli_main([*argv, "--max-queries", "3", "--out", str(tmp_path / "r")]) == 0
    assert json.loads((tmp_path / "r" / "result.json").read_text())["n_queries"] == 3


def test_batch_size_too_small_for_an_in_batch_method_warns_and_is_recorded(argv, tmp_path, capsys):
    out = tmp_path / "r"
    args = [a if a != "4" else "1" for a in argv]  # --batch-size 1
    assert cli_main([*args, "--method", "tcr", "--max-queries", "4", "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert "batch size 1" in err and "con_ratio" in err
    warnings = json.loads((out / "result.json").read_text())["warnings"]
    assert any("batch size 1" in w for w in warnings) and any("skipped" in w for w in warnings)


def test_mostly_skipped_updates_warn_and_are_recorded(argv, tmp_path, capsys, test_methods):
    out = tmp_path / "r"
    assert cli_main([*argv, "--method", "always-skips", "--out", str(out)]) == 0
    assert "skipped 2 of 2 updates" in capsys.readouterr().err
    assert any("skipped 2 of 2" in w for w in json.loads((out / "result.json").read_text())["warnings"])
    bench_out = tmp_path / "b"  # a bench table's results.json carries each point's warnings too
    assert cli_main(["bench", *argv[1:], "--methods", "always-skips", "--directions", "i2t",
                     "--out", str(bench_out)]) == 0
    (record,) = json.loads((bench_out / "results.json").read_text())["runs"]
    assert any("skipped 2 of 2" in w for w in record["warnings"])


def test_no_warning_for_a_healthy_run(argv, tmp_path, capsys):
    assert cli_main([*argv, "--method", "tent", "--out", str(tmp_path / "r")]) == 0
    assert "warning" not in capsys.readouterr().err
    assert "warnings" not in json.loads((tmp_path / "r" / "result.json").read_text())


def test_duplicated_dataset_entries_warn(karpathy, tmp_path, capsys):
    data, root = karpathy
    entries = json.loads(open(data).read())
    (tmp_path / "dup.json").write_text(json.dumps(entries + entries[:2]))
    out = tmp_path / "r"
    assert cli_main(["run", "--model", MODEL, "--data", str(tmp_path / "dup.json"), "--image-root", root,
                     "--cache-dir", str(tmp_path / "cache"), "--no-progress", "--out", str(out)]) == 0
    assert "img/0.jpg" in capsys.readouterr().err
    assert any("duplicate" in w for w in json.loads((out / "result.json").read_text())["warnings"])


# -- should fix: one line instead of a traceback -------------------------------------------------------------

def test_out_under_a_file_is_one_line(argv, tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    assert cli_main([*argv, "--out", str(tmp_path / "file" / "sub")]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1 and str(tmp_path / "file") in err


def test_disk_full_is_one_line(argv, tmp_path, capsys, monkeypatch):
    from queryshift.engine import rundir

    def full(*a, **kw):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp_path / "r" / "state.pt"))

    monkeypatch.setattr(rundir, "atomic_save", full)
    assert cli_main([*argv, "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert "No space left on device" in err and "state.pt" in err and "Traceback" not in err


def test_corrupt_checkpoint_is_one_line_naming_it(argv, tmp_path, capsys):
    out = tmp_path / "r"
    assert cli_main([*argv, "--out", str(out)]) == 0
    (out / "state.pt").write_bytes(b"not a checkpoint")
    capsys.readouterr()
    assert cli_main([*argv, "--out", str(out), "--resume"]) == 2
    err = capsys.readouterr().err
    assert "state.pt" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_debug_shows_the_traceback(argv, tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    with pytest.raises(OSError):
        cli_main([*argv, "--out", str(tmp_path / "file" / "sub"), "--debug"])
    with pytest.raises(OSError):
        cli_main(["--debug", *argv, "--out", str(tmp_path / "file" / "sub")])


def test_unexpected_errors_are_one_line_that_points_to_debug(argv, tmp_path, capsys, monkeypatch):
    from queryshift.engine import runner

    def bug(*a, **kw):
        raise KeyError("oops")

    monkeypatch.setattr(runner, "load_source", bug)
    assert cli_main([*argv, "--out", str(tmp_path / "r")]) == 1
    err = capsys.readouterr().err
    assert "--debug" in err and "Traceback" not in err


@pytest.mark.parametrize("option,value,match", [
    ("--method", "nosuch", "unknown method 'nosuch'"),
    ("--shift", "nosuch:3", "unknown shift 'nosuch:3'"),
    ("--shift", "traffic:3", "audio"),  # an audio shift in i2t: neither the queries' nor the gallery's modality
])
def test_unknown_method_or_shift_fails_before_the_model_loads(argv, tmp_path, capsys, monkeypatch,
                                                               option, value, match):
    from queryshift.engine import runner

    def must_not_load(*a, **kw):
        raise AssertionError("the model was loaded before the settings were checked")

    monkeypatch.setattr(runner, "load_source", must_not_load)
    assert cli_main([*argv, option, value, "--out", str(tmp_path / "r")]) == 2
    assert match in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_bench_validates_the_whole_grid_first(karpathy, tmp_path, capsys):
    data, root = karpathy
    out = tmp_path / "b"
    assert cli_main(["bench", "--model", MODEL, "--data", data, "--image-root", root, "--methods", "source,nosuch",
                     "--directions", "i2t", "--out", str(out), "--no-progress"]) == 2
    assert "unknown method 'nosuch'" in capsys.readouterr().err
    assert not (out / "runs").exists()
    assert cli_main(["bench", "--model", MODEL, "--data", data, "--image-root", root, "--methods", "tent,tcr",
                     "--hparam", "tau=0", "--directions", "i2t", "--out", str(out), "--no-progress"]) == 2
    assert "method 'tent': hyper-parameter tau must be > 0" in capsys.readouterr().err
    assert cli_main(["bench", "--model", MODEL, "--data", data, "--image-root", root, "--methods", "source",
                     "--shifts", "clean,gaussian_noise:7", "--out", str(out), "--no-progress"]) == 2
    assert "severity must be 1-5, got 7" in capsys.readouterr().err
    assert not (out / "runs").exists()


def test_bench_corrupt_result_is_one_line(karpathy, tmp_path, capsys):
    data, root = karpathy
    argv = ["bench", "--model", MODEL, "--data", data, "--image-root", root, "--methods", "source",
            "--directions", "i2t", "--out", str(tmp_path / "b"), "--cache-dir", str(tmp_path / "c"),
            "--no-progress"]
    assert cli_main(argv) == 0
    (result,) = (tmp_path / "b").glob("runs/grid/*/result.json")
    result.write_text("{truncated")
    capsys.readouterr()
    assert cli_main(argv) == 2
    err = capsys.readouterr().err
    assert str(result) in err and "Traceback" not in err


def test_non_utf8_empty_and_wrong_format_data_are_named(tmp_path, capsys):
    (tmp_path / "latin1.json").write_bytes('[{"image": "a.jpg", "caption": ["caf\xe9"]}]'.encode("latin-1"))
    (tmp_path / "empty.json").write_text("[]")
    (tmp_path / "empty.jsonl").write_text("\n")
    (tmp_path / "lines.json").write_text('{"image": "a.jpg", "caption": "x"}\n{"image": "b.jpg", "caption": "y"}\n')
    (tmp_path / "latin1.csv").write_bytes("image,caption\na.jpg,caf\xe9\n".encode("latin-1"))
    (tmp_path / "semicolon.csv").write_text("image;caption\na.jpg;x\n")
    (tmp_path / "folder").mkdir()
    cases = {"latin1.json": "UTF-8", "empty.json": "no entries", "empty.jsonl": "no rows",
             "lines.json": ".jsonl", "latin1.csv": "UTF-8", "semicolon.csv": "comma-separated",
             "folder": "is a folder"}
    for name, match in cases.items():
        assert cli_main(["run", "--model", MODEL, "--data", str(tmp_path / name), "--no-progress"]) == 2
        err = capsys.readouterr().err
        assert name in err and match in err and "Traceback" not in err, (name, err)


def test_non_utf8_config_is_named(tmp_path, capsys):
    (tmp_path / "c.yaml").write_bytes("method: tent\n# caf\xe9\n".encode("latin-1"))
    assert cli_main(["run", "--config", str(tmp_path / "c.yaml"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "c.yaml" in err and "UTF-8" in err


def test_bench_suite_is_found_from_any_directory(tmp_path):
    code = ("from queryshift.cli import build_parser; from queryshift.commands import bench; "
            "args = build_parser().parse_args(['bench', '--suite', 'synthetic', '--out', 'unused']); "
            "print(len(bench.plan(args)[0]['runs']))")
    env = {**os.environ, "PYTHONPATH": os.path.abspath(SRC)}
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert int(done.stdout) > 0


def test_no_progress_hides_every_bar(karpathy, tmp_path, capsys):
    data, root = karpathy
    assert cli_main(["run", "--model", MODEL, "--data", data, "--image-root", root, "--no-progress",
                     "--skip-bad-images", "--eval-clean-after", "--method", "tent", "--batch-size", "4",
                     "--cache-dir", str(tmp_path / "c"), "--out", str(tmp_path / "o")]) == 0
    assert capsys.readouterr().err == ""  # no bar, and no note (--out given)


def test_commands_named_in_help_exist():
    import re

    parser = build_parser()
    texts = [parser.format_help()]
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    texts += [p.format_help() for p in sub.choices.values()]
    named = {m for t in texts for m in re.findall(r"queryshift ([a-z][a-z_-]+)", t)}
    known = {c.replace("_", "-") for c in COMMANDS} | set(sub.choices)
    assert named and named <= known, named - known


@pytest.mark.parametrize("option,value,match", [
    ("--image-root", "/nonexistent/images", "image_root /nonexistent/images: not a directory"),
    ("--device", "nosuchdevice", "device 'nosuchdevice'"),
    ("--device", "cuda", "no CUDA device"),
])
def test_unusable_image_root_or_device_fails_before_the_model_loads(argv, tmp_path, capsys, monkeypatch,
                                                                     option, value, match):
    from queryshift.engine import runner

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(runner, "load_source", lambda *a, **kw: pytest.fail("model loaded before the check"))
    assert cli_main([*argv, option, value, "--out", str(tmp_path / "r")]) == 2  # the last --image-root wins
    assert match in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_second_bench_on_one_out_fails_at_once(karpathy, tmp_path, capsys):
    data, root = karpathy
    out = tmp_path / "b"
    out.mkdir()
    argv = ["bench", "--model", MODEL, "--data", data, "--image-root", root, "--methods", "source",
            "--directions", "i2t", "--out", str(out), "--cache-dir", str(tmp_path / "c"), "--no-progress"]
    with locks.exclusive_lock(str(out)):
        assert cli_main(argv) == 2
    err = capsys.readouterr().err
    assert f"bench output directory {out}" in err and f"pid {os.getpid()}" in err
    assert not (out / "runs").exists()
    assert cli_main([*argv, "--jobs", "0"]) == 2
    assert "--jobs must be >= 1" in capsys.readouterr().err


def test_full_disk_during_a_torch_save_is_enospc_and_leaves_no_temp_file(tmp_path, monkeypatch):
    from queryshift import atomic

    def zip_writer_fails(obj, f, *a, **kw):  # what torch raises when the disk fills mid-write
        f.write(b"PK")
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 64 vs 0")

    monkeypatch.setattr(atomic.torch, "save", zip_writer_fails)
    monkeypatch.setattr(atomic.os, "statvfs", lambda p: argparse.Namespace(f_bavail=0))
    with pytest.raises(OSError) as info:
        atomic.save_torch({"x": 1}, str(tmp_path / "state.pt"))
    assert info.value.errno == errno.ENOSPC and info.value.filename == str(tmp_path / "state.pt")
    assert os.listdir(tmp_path) == []
