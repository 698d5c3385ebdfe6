"""Issue 29: files found in output and state folders run no code, nothing is written outside --out or
--state-dir, the service's state directory is locked and validated, and a resume refuses changed data.

A "planted" file is what someone who can write into a run folder, a bench --out or a --state-dir could
leave there: a pickle whose unpickling runs code (here: creates a marker file), or a symbolic link to a
file elsewhere that a careless writer would write through.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess

import pytest
import torch

from queryshift import atomic, plainstate, runinfo
from queryshift.cli import main as cli_main
from queryshift.commands import corrupt
from queryshift.engine.rundir import RunDir, RunDirError
from tests.helpers import TINY_MODEL, make_karpathy


class Planted:
    """Unpickling this creates ``marker``: the stand-in for any code a planted pickle could run."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').write('ran')",)


def plant_pickle(path, marker) -> None:
    torch.save({"config": {}, "method": Planted(str(marker)), "batches_done": 1, "format": 2,
                "weights": "w", "lanes": {}}, str(path))


@pytest.fixture
def argv(karpathy, tmp_path):
    data, root = karpathy
    return ["run", "--model", TINY_MODEL, "--data", data, "--image-root", root, "--cache-dir",
            str(tmp_path / "cache"), "--no-progress", "--batch-size", "4", "--steps", "1"]


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and "internal error" not in err, err
    lines = [x for x in err.splitlines() if "error:" in x]
    assert len(lines) == 1, err
    return lines[0]


# -- 1. no code from planted files -------------------------------------------------------------------------

def test_planted_pickle_as_state_pt_is_refused_on_resume_and_runs_nothing(argv, tmp_path, capsys):
    out, marker = tmp_path / "r", tmp_path / "marker"
    assert cli_main([*argv, "--method", "tent", "--out", str(out)]) == 0
    plant_pickle(out / "state.pt", marker)
    capsys.readouterr()
    assert cli_main([*argv, "--method", "tent", "--out", str(out), "--resume"]) == 2
    line = one_error_line(capsys)
    assert "state.pt" in line and "refused" in line
    assert not marker.exists()


def test_planted_pickle_is_refused_by_a_rundir_without_settings(tmp_path):
    """What bench does when it finds a run folder: RunDir(resume=True) and restore()."""
    out, marker = tmp_path / "r", tmp_path / "marker"
    out.mkdir()
    (out / "log.jsonl").write_text("")
    plant_pickle(out / "state.pt", marker)
    with pytest.raises(RunDirError, match="state.pt"):
        RunDir(str(out), resume=True).restore(None, "w")
    assert not marker.exists()


@pytest.mark.parametrize("method", ["rest", "tcr", "sar", "eata"])
def test_a_stateful_method_resumes_from_a_plain_checkpoint(karpathy, tmp_path, monkeypatch, method):
    """The checkpoint of every method with helper objects is written plain, read back with weights_only,
    and the resumed run ends exactly where an uninterrupted one does."""
    from queryshift.engine import run
    from tests.helpers import tiny_run_config

    kw = dict(method=method, batch_size=2, steps=1, seed=3)
    full = run(tiny_run_config(karpathy, tmp_path, out=str(tmp_path / "full"), **kw))
    out = tmp_path / "killed"
    append = RunDir.append

    def killed_after_two(self, row, checkpoint):
        if row["batch"] == 2:
            raise KeyboardInterrupt
        append(self, row, checkpoint)

    monkeypatch.setattr(RunDir, "append", killed_after_two)
    with pytest.raises(KeyboardInterrupt):
        run(tiny_run_config(karpathy, tmp_path, out=str(out), **kw))
    monkeypatch.setattr(RunDir, "append", append)
    assert torch.load(out / "state.pt", weights_only=True)["batches_done"] == 2  # no object to unpickle
    resumed = run(tiny_run_config(karpathy, tmp_path, out=str(out), resume=True, **kw))
    assert (resumed["r1"], resumed["map"]) == (full["r1"], full["map"])
    ranks = [[json.loads(x)["ranks"] for x in (d / "log.jsonl").read_text().splitlines()]
             for d in (tmp_path / "full", out)]
    assert ranks[0] == ranks[1]


def test_plain_state_round_trips_method_objects_and_refuses_foreign_classes(tmp_path):
    from queryshift.methods import components as C

    queue = C.SourceLikeQueue(8, 0.5, 2)
    queue.q = torch.randn(3, 4)
    state = {"extra": {"queue": queue, "n": 3, "t": (1, 2.5, None)}, "gen": torch.Generator().get_state()}
    path = str(tmp_path / "s.pt")
    plainstate.save(state, path)
    back = plainstate.load(path)
    assert isinstance(back["extra"]["queue"], C.SourceLikeQueue)
    assert torch.equal(back["extra"]["queue"].q, queue.q) and back["extra"]["t"] == (1, 2.5, None)
    with pytest.raises(TypeError, match="extra.bad"):
        plainstate.save({"extra": {"bad": argparse.Namespace()}}, path)
    torch.save({plainstate.OBJECT_TAG: "subprocess:Popen", "attrs": {}}, path)
    with pytest.raises(plainstate.UnsafeStateError, match="not a queryshift.methods class"):
        plainstate.load(path)


def test_planted_pickle_as_snapshot_is_refused_and_runs_nothing(tmp_path):
    from queryshift.serve.snapshots import SnapshotError
    from tests.serve_helpers import service

    state, marker = tmp_path / "state", tmp_path / "marker"
    state.mkdir()
    plant_pickle(state / "snapshot.pt", marker)
    with pytest.raises(SnapshotError, match="snapshot.pt.*refused"):
        service(tmp_path, state_dir=str(state))
    assert not marker.exists()


def test_planted_pickle_as_init_or_combiner_is_refused_clearly(tmp_path, capsys):
    marker = tmp_path / "marker"
    planted = tmp_path / "init.pt"
    plant_pickle(planted, marker)
    assert cli_main(["train-source", "--init", str(planted), "--steps", "1", "--out", str(tmp_path / "m.pt"),
                     "--no-progress"]) == 2
    assert "--init" in one_error_line(capsys)
    assert not marker.exists()
    from queryshift.models.composed import load_combiner

    with pytest.raises(ValueError, match="init.pt"):
        load_combiner(str(planted))
    assert not marker.exists()


@pytest.mark.parametrize("content", [b"not a checkpoint", b"", None])
def test_non_checkpoint_as_init_or_combiner_is_a_clear_error(tmp_path, capsys, content):
    path = tmp_path / "x.pt"
    if content is None:
        torch.save({"some": "dict", "weights": [1, 2]}, str(path))  # a torch file, not a state dict
    else:
        path.write_bytes(content)
    assert cli_main(["train-source", "--arch", "qs-tiny", "--init", str(path), "--steps", "1", "--train-images",
                     "8", "--batch-size", "4", "--out", str(tmp_path / "m.pt"), "--no-progress"]) == 2
    line = one_error_line(capsys)
    assert "--init" in line and "x.pt" in line
    from queryshift.models.composed import load_combiner

    with pytest.raises(ValueError, match="x.pt"):
        load_combiner(str(path))


# -- 2. nothing written outside --out -------------------------------------------------------------------

def test_atomic_writes_never_follow_a_link_at_the_old_temporary_names(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    target = tmp_path / "out" / "result.json"
    target.parent.mkdir()
    for name in (f"{target}.{os.getpid()}.tmp", f"{target}.tmp", f"{target}.part"):
        os.symlink(victim, name)
    atomic.write_text(str(target), "new")
    atomic.save_torch({"x": 1}, str(target))
    assert victim.read_text() == "precious"


def test_a_link_planted_as_the_target_is_replaced_not_written_through(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    target = tmp_path / "table.md"
    os.symlink(victim, target)
    atomic.write_text(str(target), "new")
    assert victim.read_text() == "precious" and not target.is_symlink() and target.read_text() == "new"


def test_a_dangling_link_planted_as_log_jsonl_is_not_written_through(argv, tmp_path, capsys):
    out, victim = tmp_path / "r", tmp_path / "elsewhere.txt"
    out.mkdir()
    os.symlink(victim, out / "log.jsonl")  # dangling: os.path.exists says False
    assert cli_main([*argv, "--out", str(out)]) == 2
    assert "log.jsonl" in one_error_line(capsys)
    assert not victim.exists()


def test_a_link_planted_as_the_lock_file_is_not_truncated(tmp_path):
    from queryshift.locks import ExclusiveLock

    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    folder = tmp_path / "r"
    folder.mkdir()
    os.symlink(victim, folder / ".queryshift.lock")
    with pytest.raises(OSError, match="symbolic link"):
        ExclusiveLock(str(folder)).acquire()
    assert victim.read_text() == "precious"


def _corrupt(argv):
    parser = argparse.ArgumentParser()
    corrupt.add_parser(parser.add_subparsers())
    args = parser.parse_args(["corrupt", *argv])
    return args.func(args)


def test_corrupt_does_not_write_through_a_link_at_a_temporary_name(karpathy, tmp_path):
    data, root = karpathy
    out = tmp_path / "out"
    victim = tmp_path / "victim.jpg"
    victim.write_bytes(b"precious")
    folder = out / "test_IP_gaussian_noise_1" / "img"
    folder.mkdir(parents=True)
    os.symlink(victim, folder / "0.jpg.part")
    annotations = out / "annotation_RandomCharAug_swap" / "1"
    annotations.mkdir(parents=True)
    os.symlink(victim, annotations / "test.json.part")
    assert _corrupt(["--data", data, "--image-root", root, "--shift", "gaussian_noise:1", "--shift",
                     "RandomCharAug_swap:1", "--out", str(out), "--no-progress"]) == 0
    assert victim.read_bytes() == b"precious"
    assert (folder / "0.jpg").stat().st_size > 100 and (annotations / "test.json").exists()


def test_corrupt_into_a_folder_linked_out_of_out_is_refused(karpathy, tmp_path):
    data, root = karpathy
    out, elsewhere = tmp_path / "out", tmp_path / "elsewhere"
    out.mkdir()
    elsewhere.mkdir()
    os.symlink(elsewhere, out / "test_IP_gaussian_noise_1")
    with pytest.raises(ValueError, match="leads outside --out"):
        _corrupt(["--data", data, "--image-root", root, "--shift", "gaussian_noise:1", "--out", str(out),
                  "--no-progress"])
    assert list(elsewhere.iterdir()) == []


@pytest.mark.parametrize("command", ["run", "corrupt"])
@pytest.mark.parametrize("overwrite", [False, True])
def test_a_non_empty_folder_that_is_not_ours_is_refused_as_out(argv, karpathy, tmp_path, capsys, command,
                                                                 overwrite):
    out = tmp_path / "home"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    (out / "table.md").write_text("my own table")
    data, root = karpathy
    args = ([*argv, "--out", str(out)] if command == "run" else
            ["corrupt", "--data", data, "--image-root", root, "--shift", "gaussian_noise:1", "--out", str(out),
             "--no-progress"])
    assert cli_main(args + (["--overwrite"] if overwrite else [])) == 2
    assert "not empty" in one_error_line(capsys)
    assert sorted(os.listdir(out)) == ["notes.txt", "table.md"]  # nothing added, nothing removed
    assert (out / "table.md").read_text() == "my own table"


def test_a_run_folder_is_still_resumed_and_overwritten(argv, tmp_path):
    out = tmp_path / "r"
    assert cli_main([*argv, "--method", "tent", "--out", str(out)]) == 0
    assert cli_main([*argv, "--method", "tent", "--out", str(out), "--overwrite"]) == 0
    (out / "result.json").unlink()
    assert cli_main([*argv, "--method", "tent", "--out", str(out), "--resume"]) == 0


def test_git_status_of_a_run_takes_no_index_lock(tmp_path, monkeypatch):
    repo = tmp_path / "repo"
    (repo / "pkg").mkdir(parents=True)
    git = ["git", "-C", str(repo), "-c", "user.email=a@b", "-c", "user.name=a"]
    subprocess.run(["git", "init", "-q", str(repo)], check=True)
    (repo / "pkg" / "f.py").write_text("x = 1\n")
    subprocess.run([*git, "add", "."], check=True)
    subprocess.run([*git, "commit", "-qm", "c"], check=True)
    os.utime(repo / "pkg" / "f.py", (1, 1))  # stat changed, content not: a plain status rewrites the index
    index = repo / ".git" / "index"
    before = (index.read_bytes(), index.stat().st_mtime_ns)
    monkeypatch.setattr(runinfo, "__file__", str(repo / "pkg" / "runinfo.py"))
    assert runinfo.git_commit() is not None and not runinfo.git_commit().endswith("+dirty")
    assert (index.read_bytes(), index.stat().st_mtime_ns) == before


def test_train_source_refuses_to_overwrite_an_existing_checkpoint(tmp_path, capsys):
    out = tmp_path / "m.pt"
    out.write_bytes(b"an earlier model")
    assert cli_main(["train-source", "--steps", "1", "--out", str(out), "--no-progress"]) == 2
    line = one_error_line(capsys)
    assert "m.pt" in line and "--overwrite" in line
    assert out.read_bytes() == b"an earlier model"


@pytest.mark.parametrize("option,value", [("--steps", "-1"), ("--steps", "0"), ("--batch-size", "0"),
                                          ("--batch-size", "1"), ("--epochs", "-1"), ("--train-images", "0"),
                                          ("--lr", "0"), ("--warmup", "-1"), ("--workers", "0")])
def test_train_source_refuses_bad_numbers_before_any_work(tmp_path, capsys, option, value):
    assert cli_main(["train-source", option, value, "--out", str(tmp_path / "m.pt"), "--no-progress"]) == 2
    line = one_error_line(capsys)
    assert option in line and value in line
    assert not (tmp_path / "m.pt").exists()


def test_corrupt_refuses_two_absolute_images_of_one_basename(tmp_path, capsys):
    a = make_karpathy(tmp_path / "a", n_images=1, captions=1)
    make_karpathy(tmp_path / "b", n_images=1, captions=1)
    entries = [{"image": str(tmp_path / d / "img" / "0.jpg"), "caption": [f"image of {d}"]} for d in "ab"]
    with open(a, "w") as f:
        json.dump(entries, f)
    assert cli_main(["corrupt", "--data", a, "--image-root", str(tmp_path), "--shift", "gaussian_noise:1",
                     "--out", str(tmp_path / "out"), "--no-progress"]) == 2
    line = one_error_line(capsys)
    assert "0.jpg" in line and "same" in line


def test_corrupt_into_its_own_input_is_refused(tmp_path, capsys):
    root = tmp_path / "out" / "test_IP_gaussian_noise_1"  # the images live where the outputs would go
    data = make_karpathy(root, n_images=2, captions=1)
    before = (root / "img" / "0.jpg").read_bytes()
    assert cli_main(["corrupt", "--data", data, "--image-root", str(root), "--shift", "gaussian_noise:1",
                     "--out", str(tmp_path / "out"), "--no-progress"]) == 2
    assert "input" in one_error_line(capsys)
    assert (root / "img" / "0.jpg").read_bytes() == before


def test_corrupt_captions_into_its_own_input_is_refused(tmp_path, capsys):
    out = tmp_path / "out"
    folder = out / "annotation_RandomCharAug_swap" / "1"
    data = make_karpathy(folder, n_images=2, captions=1)
    assert cli_main(["corrupt", "--data", data, "--shift", "RandomCharAug_swap:1", "--out", str(out),
                     "--no-progress"]) == 2
    assert "input" in one_error_line(capsys)


# -- 3. the service's state directory ----------------------------------------------------------------------

def test_second_server_on_one_state_dir_is_refused(tmp_path):
    from queryshift.locks import LockedError
    from tests.serve_helpers import service

    state = str(tmp_path / "state")
    first = service(tmp_path, state_dir=state)
    with pytest.raises(LockedError, match="state"):
        service(tmp_path, state_dir=state)
    first.close()
    service(tmp_path, state_dir=state).close()  # released at close


def test_state_dir_that_is_a_file_is_a_clear_startup_error(tmp_path, capsys):
    from tests.serve_helpers import service

    path = tmp_path / "state"
    path.write_text("a file")
    with pytest.raises(ValueError, match="state-dir.*not a directory"):
        service(tmp_path, state_dir=str(path))
    assert path.read_text() == "a file"


def _adapt(svc, lane: str, n: int = 4) -> None:
    from PIL import Image

    for i in range(n):
        if lane == "text":
            svc.search("text", f"a red circle number {i}")
        else:
            svc.search("image", Image.new("RGB", (64, 64), (40 * i, 0, 0)))
    assert svc.run_pending()


def test_a_restart_serving_fewer_modalities_keeps_the_other_lane(tmp_path):
    from queryshift.serve import snapshots
    from tests.serve_helpers import service

    state = str(tmp_path / "state")
    both = service(tmp_path, state_dir=state)
    _adapt(both, "image")
    _adapt(both, "text")
    both.snapshot()
    image_state = both.lanes["image"].retriever.state_dict()
    both.close()

    text_only = service(tmp_path, state_dir=state, modalities=("text",))
    _adapt(text_only, "text")
    text_only.snapshot()
    text_only.close()
    saved = snapshots.load(state, text_only.weights, "rest", text_only.identity())
    assert set(saved["lanes"]) == {"image", "text"}

    again = service(tmp_path, state_dir=state)
    restored = again.lanes["image"].retriever.state_dict()
    assert all(torch.equal(restored["params"][n], p) for n, p in image_state["params"].items())
    assert again.stats()["lanes"]["image"]["updates"] == 1
    again.close()


def test_a_snapshot_of_another_gallery_is_refused(tmp_path):
    from queryshift.serve.snapshots import SnapshotError
    from tests.serve_helpers import service

    state = str(tmp_path / "state")
    a = service(tmp_path, state_dir=state)
    _adapt(a, "text")
    a.close()
    with pytest.raises(SnapshotError, match="gallery"):
        service(tmp_path, state_dir=state, data="shapes:test:20")
    with pytest.raises(SnapshotError, match="hparams"):
        service(tmp_path, state_dir=state, hparams={"queue_size": 5})
    assert service(tmp_path, state_dir=state).updates == 1  # the snapshot itself was kept


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    from fastapi.testclient import TestClient

    from queryshift.serve.app import create_app
    from tests.serve_helpers import service

    svc = service(tmp_path_factory.mktemp("nan"))
    with TestClient(create_app(svc)) as c:
        yield c


@pytest.mark.parametrize("field", ["text", "image_b64", "k", "adapt"])
@pytest.mark.parametrize("constant", ["NaN", "Infinity", "-Infinity", "1e999"])
def test_non_finite_numbers_in_a_request_body_are_a_4xx(client, field, constant):
    body = {"text": "\"a red circle\"", "k": "3", "adapt": "false"}
    body[field] = constant
    if field == "image_b64":
        body.pop("text")
    raw = "{" + ", ".join(f"\"{k}\": {v}" for k, v in body.items()) + "}"
    r = client.post("/search", content=raw, headers={"content-type": "application/json"})
    assert r.status_code == 422, r.text
    json.loads(r.text, parse_constant=lambda c: pytest.fail(f"non-standard JSON {c}"))


def test_non_finite_numbers_stay_4xx_under_concurrent_requests(client):
    from concurrent.futures import ThreadPoolExecutor

    raw = ["{\"text\": \"a\", \"k\": NaN}", "{\"text\": NaN}", "{\"k\": Infinity, \"image_b64\": \"x\"}",
           "{\"text\": \"a\", \"k\": 2}"] * 10
    with ThreadPoolExecutor(8) as pool:
        codes = list(pool.map(lambda b: client.post("/search", content=b, headers={
            "content-type": "application/json"}).status_code, raw))
    assert codes == [422, 422, 422, 200] * 10


def test_deeply_nested_json_is_a_4xx(client):
    raw = "[" * 100_000 + "]" * 100_000
    r = client.post("/search", content=raw, headers={"content-type": "application/json"})
    assert 400 <= r.status_code < 500


# -- 4. resume after the data changed ----------------------------------------------------------------------

def test_resume_after_the_data_file_changed_is_refused_naming_it(argv, karpathy, tmp_path, capsys):
    data, _ = karpathy
    out = tmp_path / "r"
    assert cli_main([*argv, "--method", "tent", "--out", str(out)]) == 0
    (out / "result.json").unlink()  # as if killed before the end
    entries = json.loads(open(data).read())
    entries[0]["caption"] = ["a caption edited after the run started", entries[0]["caption"][1]]
    with open(data, "w") as f:
        json.dump(entries, f)
    capsys.readouterr()
    assert cli_main([*argv, "--method", "tent", "--out", str(out), "--resume"]) == 2
    line = one_error_line(capsys)
    assert "changed" in line and os.path.basename(data) in line


@pytest.mark.parametrize("command", [["train-source", "--steps", "1"], ["corrupt", "--data", "x.json", "--shift",
                                                                        "gaussian_noise:1"]])
def test_an_empty_out_is_refused_not_taken_as_unset(tmp_path, capsys, monkeypatch, command):
    monkeypatch.chdir(tmp_path)
    assert cli_main([*command, "--out", "", "--overwrite", "--no-progress"]) == 2
    assert "--out is empty" in one_error_line(capsys)
    assert os.listdir(tmp_path) == []


def test_an_empty_state_dir_is_refused():
    from queryshift.serve import ServeConfig

    with pytest.raises(ValueError, match="--state-dir"):
        ServeConfig(state_dir="")
