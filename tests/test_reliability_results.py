"""Results that must not change silently (issue 29): a reset method is a new method, the thread count does not
change ranks, a non-finite score is never ranked, and settings that do not apply are refused."""

import copy

import pytest
import torch

from queryshift import methods
from queryshift.methods import AdaptConfig

# warm-ups short enough that the stream runs well past them; SAR keeps its model-recovery rule (it resets)
WARMUP_HP = {"queue_batches": 2, "queue_size": 8}
N_BATCHES = 5


@pytest.fixture(scope="module")
def tiny_stream():
    """The tiny random model, a text and an image gallery, and N_BATCHES distinct query batches per modality."""
    from queryshift.models import load_model

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = load_model("openclip:qs-tiny/random")
    gen = torch.Generator().manual_seed(3)
    words = "cat dog car tree house boat bird road lake hill cup shoe".split()
    with torch.no_grad():
        galleries = {"image": model.encode_text(model.tokenize([f"a photo of a {w}" for w in words])),
                     "text": model.encode_image(torch.randn(12, 3, 32, 32, generator=gen))}
    batches = {
        "image": [torch.randn(8, 3, 32, 32, generator=gen) for _ in range(N_BATCHES)],
        "text": [model.tokenize([f"{words[(b + i) % 12]} and {words[(3 * b + 5 * i) % 12]} near the water"
                                 for i in range(8)]) for b in range(N_BATCHES)],
    }
    source = copy.deepcopy(model.state_dict())
    yield model, galleries, batches, source
    torch.set_num_threads(threads)


def _new_method(tiny_stream, name, modality):
    model, galleries, _, source = tiny_stream
    model.load_state_dict(source)
    cls = methods.get(name)
    hp = {k: v for k, v in WARMUP_HP.items() if k in cls.defaults}
    if name == "rest":
        hp["queue_frac"] = 0.3
    return cls(model, galleries[modality], modality, AdaptConfig(steps=2, lr=1e-2, hparams=hp))


def _play(method, batches):
    """Scores and logs of every batch of the stream."""
    out = []
    for batch in batches:
        scores, log = method.step(batch)
        out.append((scores.clone(), log))
    return out


def _assert_same(got, expected, what):
    for b, ((s_got, log_got), (s_exp, log_exp)) in enumerate(zip(got, expected, strict=True)):
        assert log_got == log_exp, f"{what}: batch {b} logs differ"
        assert torch.equal(s_got, s_exp), f"{what}: batch {b} scores differ"


@pytest.mark.parametrize("modality", ["image", "text"])
@pytest.mark.parametrize("name", methods.available())
def test_a_reset_method_behaves_as_a_new_one(tiny_stream, name, modality):
    batches = tiny_stream[2][modality]
    fresh = _play(_new_method(tiny_stream, name, modality), batches)
    method = _new_method(tiny_stream, name, modality)
    _play(method, batches)  # past the warm-up of every method that has one
    method.reset()
    assert method.batch_index == 0
    _assert_same(_play(method, batches), fresh, f"{name} after reset()")
    method.reset()  # twice: a reset must not depend on what the first reset left behind
    _assert_same(_play(method, batches), fresh, f"{name} after a second reset()")


def test_the_warm_up_restarts_after_a_reset(tiny_stream):
    """The reported case: TCR and REST refill their source-like queue after a reset past the warm-up."""
    batches = tiny_stream[2]["image"]
    for name in ("tcr", "rest", "tcr-free"):
        method = _new_method(tiny_stream, name, "image")
        _play(method, batches)
        method.reset()
        assert len(method.queue) == 0
        method.step(batches[0])
        assert len(method.queue) > 0, name


def _log_rows(run_dir):
    """The per-batch rows of a run's log.jsonl, without their wall-clock times."""
    import json

    with open(run_dir / "log.jsonl", encoding="utf-8") as f:
        return [{k: v for k, v in json.loads(line).items() if k != "seconds"} for line in f]


def test_ranks_and_logs_do_not_depend_on_the_thread_count(karpathy, tmp_path):
    """bench --jobs N runs each point with one torch thread, --jobs 1 with the machine's default: a run pins the
    intra-op threads its numerics use, so both give the same ranks, APs and logged losses, bit for bit."""
    from queryshift.engine import run
    from tests.helpers import tiny_run_config

    threads = torch.get_num_threads()
    rows, results = {}, {}
    try:
        for n in (1, 2):
            torch.set_num_threads(n)  # what bench's job pool (or OMP_NUM_THREADS) leaves a run to start with
            cfg = tiny_run_config(karpathy, tmp_path, method="tcr", batch_size=8, steps=2, out=str(tmp_path / f"t{n}"),
                                  hparams={"queue_batches": 1})
            results[n] = run(cfg)
            assert torch.get_num_threads() == n  # the caller's setting is given back
            rows[n] = _log_rows(tmp_path / f"t{n}")
    finally:
        torch.set_num_threads(threads)
    assert rows[1] == rows[2]
    assert results[1]["config"]["threads"] == results[2]["config"]["threads"] == 1  # recorded with the run


@pytest.mark.parametrize("method", ["tent", "shot"])
def test_non_finite_scores_stop_the_run_naming_the_batch(karpathy, tmp_path, method):
    """A tiny temperature overflows the logits a method records: they cannot be ranked (they used to tie)."""
    from queryshift.engine import run
    from tests.helpers import tiny_run_config

    cfg = tiny_run_config(karpathy, tmp_path, method=method, batch_size=4, steps=1, hparams={"tau": 1e-45})
    with pytest.raises(FloatingPointError, match=rf"{method}: .*scores of batch 0 .*not finite.*tau"):
        run(cfg)


def test_ranking_refuses_scores_it_cannot_order():
    from queryshift.engine.ranking import rank_gallery, rank_scores

    scores = torch.tensor([[0.5, 0.2, 0.1], [0.3, 0.9, 0.0]])
    assert rank_scores(scores, [[1], [1]])[0] == [1, 0]
    for bad in (float("nan"), float("inf")):
        broken = scores.clone()
        broken[1, 2] = bad
        with pytest.raises(FloatingPointError, match="query row 1"):
            rank_scores(broken, [[1], [1]])
    excluded = scores.clone()
    excluded[0, 2] = float("-inf")  # an excluded item (CIRR's reference image) is ranked last, as before
    assert rank_scores(excluded, [[1], [1]])[0] == [1, 0]
    excluded[1, 1] = float("-inf")  # ... but a relevant item at -inf has no place
    with pytest.raises(FloatingPointError, match="query row 1"):
        rank_scores(excluded, [[1], [1]])
    queries = torch.tensor([[1.0, 0.0], [float("nan"), 0.0]])
    with pytest.raises(FloatingPointError, match="query row 1"):
        rank_gallery(queries, torch.eye(2), [[0], [1]])


@pytest.mark.parametrize("spec, modality", [
    ("gaussian_noise:3+filter", "image"), ("RandomCharAug_swap:5+filter", "text"), ("style:outline+filter", "image"),
    ("stream:temporal=clean,fog:5+filter", "image"),
])
def test_a_filter_that_does_not_apply_is_refused(spec, modality):
    from queryshift.shifts import build

    with pytest.raises(ValueError, match=r"\+filter .*does not apply"):
        build(spec, modality)


@pytest.mark.parametrize("spec, problem", [
    ("stream:temporal=clean,,fog:5", "member 2 of the shift list is empty"),
    ("stream:diverse@=fog:5,snow:5", "@ needs a block size"),
])
def test_empty_parts_of_a_stream_spec_are_refused(spec, problem):
    from queryshift.shifts import build

    with pytest.raises(ValueError, match=problem):
        build(spec, "image")


@pytest.mark.parametrize("spec, part, problem", [
    ("gaussian_noise:3+RandomCharAug_swap:9", "RandomCharAug_swap:9", "1-7"),
    ("gaussian_noise:9+RandomCharAug_swap:5", "gaussian_noise:9", "1-5"),
    ("RandomCharAug_swap:5+gaussian_noise:3+filter", "gaussian_noise:3+filter", "does not apply"),
])
def test_a_composed_shift_names_its_bad_part_and_that_parts_problem(spec, part, problem):
    from queryshift.engine.composed import build_composed_shift

    with pytest.raises(ValueError) as err:
        build_composed_shift(spec)
    message = str(err.value)
    assert f"{part!r}" in message and problem in message
    assert "neither" not in message and "queries here are" not in message  # not the other modality's complaint


@pytest.mark.parametrize("field", ["shift", "out", "cache_dir", "image_root", "model", "data", "composer"])
def test_empty_strings_are_refused_not_taken_as_unset(field):
    from queryshift.engine import RunConfig

    extra = {"direction": "c2i"} if field == "composer" else {}
    for empty in ("", "  "):
        with pytest.raises(ValueError, match=rf"^{field} is an empty string"):
            RunConfig(**{field: empty, **extra})


def test_run_cli_refuses_an_empty_out(karpathy, tmp_path, capsys):
    from queryshift.cli import main as cli_main

    data, root = karpathy
    argv = ["run", "--model", "openclip:qs-tiny/random", "--data", data, "--image-root", root,
            "--cache-dir", str(tmp_path / "cache"), "--no-progress"]
    assert cli_main([*argv, "--out", ""]) == 2
    assert "queryshift run: error: out is an empty string" in capsys.readouterr().err
    assert cli_main([*argv, "--shift", ""]) == 2
    assert "queryshift run: error: shift is an empty string" in capsys.readouterr().err
    assert cli_main([*argv, "--config", ""]) == 2
    assert "queryshift run: error: --config is an empty string" in capsys.readouterr().err


@pytest.mark.parametrize("spec, key", [
    ("faiss-ivf:nlist=-1", "nlist"), ("faiss-ivf:nprobe=0", "nprobe"), ("faiss-ivf:nprobe=-3", "nprobe"),
    ("faiss-ivf:train_size=-5", "train_size"), ("faiss-ivf:kmeans_iters=-1", "kmeans_iters"),
    ("faiss-ivf:nprobe=99999999999999999999", "nprobe"), ("faiss-hnsw:M=1", "M"), ("faiss-hnsw:M=-1", "M"),
    ("faiss-hnsw:ef_search=0", "ef_search"), ("faiss-hnsw:ef_construction=0", "ef_construction"),
    ("exact:chunk=0", "chunk"), ("faiss-ivf:nlist=2,nlist=3", "nlist"),
])
def test_bad_gallery_index_options_are_refused_by_name(spec, key):
    """Checked with the settings, before any work: some of these abort the process inside faiss (M=1)."""
    from queryshift.engine import RunConfig

    with pytest.raises(ValueError, match=rf"gallery index {spec!r}: {key} "):
        RunConfig(gallery_index=spec)


def test_an_ivf_with_more_lists_than_the_gallery_has_items_is_refused():
    pytest.importorskip("faiss")
    from queryshift.engine.gallery_index import build_index

    gallery = torch.nn.functional.normalize(torch.randn(20, 8), dim=1)
    with pytest.raises(ValueError, match=r"faiss-ivf: nlist=50 .*20 gallery items"):
        build_index("faiss-ivf:nlist=50", gallery)


def test_the_service_after_a_reset_adapts_as_a_new_one(tmp_path):
    """POST /reset (and the collapse guard) call Retriever.reset(): the lane's REST must warm up again."""
    from tests.serve_helpers import service

    s = service(tmp_path, hparams={"queue_batches": 2})
    lane = s.lanes["text"]

    def rounds():
        points = []
        for r in range(4):  # past the warm-up of 2 updates
            for i in range(4):
                s.search("text", s.dataset.texts[4 * r + i])
            assert s.run_pending()
            points.append({k: v for k, v in lane.last.items() if k not in ("update", "time", "seconds")})
        return points

    fresh = rounds()
    s.reset()
    assert lane.retriever.method.batch_index == 0 and len(lane.retriever.method.queue) == 0
    assert rounds() == fresh
