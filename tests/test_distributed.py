"""Data-parallel adaptation: 2 gloo processes on CPU give the ranks and final parameters of 1 process."""

import json
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from queryshift import distributed
from queryshift.engine import RunConfig, run
from tests.helpers import make_karpathy


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank, world, port, cfg_dict):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    try:
        run(RunConfig(**cfg_dict))
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def final_params(out):
    return torch.load(os.path.join(out, "state.pt"), weights_only=False)["method"]["params"]


def log_of(out):
    with open(os.path.join(out, "log.jsonl")) as f:
        return [json.loads(line) for line in f]


def one_and_two_processes(tmp_path, method, hparams) -> tuple[str, str]:
    """The same small run (t2i, 15 queries in batches of 5) in one process and over 2 gloo ranks: their out dirs."""
    data = make_karpathy(tmp_path / "data", n_images=8, captions=2)
    # 16 text queries in batches of 5 (the last batch of 1 cannot split: max 15 queries -> 5, 5, 5)
    base = dict(model="openclip:qs-tiny/random", data=data, image_root=str(tmp_path / "data"), direction="t2i",
                method=method, steps=2, batch_size=5, max_queries=15, cache_dir=str(tmp_path / "cache"),
                progress=False, hparams={"queue_batches": 2, **hparams})
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    torch.set_num_threads(1)
    run(RunConfig(**base, out=one))
    mp.spawn(_rank_main, args=(2, free_port(), {**base, "out": two}), nprocs=2, join=True)
    return one, two


@pytest.mark.parametrize("method, hparams, atol", [
    ("tcr", {}, 1e-5),
    ("rest", {"lambda_k": 0.0}, 1e-5),
    # the default's per-tensor Fisher blocks: every rank scores the queries of its own shard one at a time
    # during the warm-up and the scores are gathered, so all ranks pull along the one process's direction
    # (rest-design's projections and full Fisher: lab/tests/test_rest_design_distributed.py)
    ("rest", {}, 1e-5),
])
def test_two_processes_match_one(tmp_path, method, hparams, atol):
    one, two = one_and_two_processes(tmp_path, method, hparams)
    log_one, log_two = log_of(one), log_of(two)
    assert sum("skipped" not in row for row in log_one) >= 2  # the parameters did move
    assert [row["ranks"] for row in log_two] == [row["ranks"] for row in log_one]
    assert [row.get("skipped") for row in log_two] == [row.get("skipped") for row in log_one]
    p1, p2 = final_params(one), final_params(two)
    for k in p1:
        torch.testing.assert_close(p2[k], p1[k], atol=atol, rtol=0)
    result = json.loads(open(os.path.join(two, "result.json")).read())
    assert result["world_size"] == 2


def test_shard_splits_contiguously_in_rank_order():
    items = list(range(7))
    parts = [distributed.shard(items, r, 3) for r in range(3)]
    assert parts == [[0, 1, 2], [3, 4], [5, 6]]
    assert distributed.shard(items) == items  # no process group: everything
    assert [distributed.shard_bounds(7, r, 3) for r in range(3)] == [(0, 3), (3, 5), (5, 7)]
    rows, keys = torch.ones(2, 3), torch.tensor([4, 1])
    assert distributed.all_gather_rows(rows, keys) == (rows, keys)  # one process: the identity
