"""Image-text and composed runs give the ranks recorded before modalities became plug-ins (issue 27).

The fixture ``fixtures/modality_ranks.json`` was written by this test (``QS_RECORD_RANKS=1``) from the code
before the modality refactor; every query's rank, in stream order, must stay exactly the same. Runs pin one
thread (``RunConfig.threads``), so their numerics do not depend on the machine's cores.
"""

from __future__ import annotations

import json
import os

import pytest

from queryshift.engine import RunConfig, run

FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "modality_ranks.json")
N = 64
CASES = {
    "i2t-source-gaussian_noise": dict(model="shapes-clip", data=f"shapes:test:{N}", direction="i2t",
                                      method="source", shift="gaussian_noise:5"),
    "i2t-tcr-gaussian_noise": dict(model="shapes-clip", data=f"shapes:test:{N}", direction="i2t",
                                   method="tcr", shift="gaussian_noise:5"),
    "t2i-source-char_swap": dict(model="shapes-clip", data=f"shapes:test:{N}", direction="t2i",
                                 method="source", shift="RandomCharAug_swap:5", max_queries=N),
    "t2i-tcr-char_swap": dict(model="shapes-clip", data=f"shapes:test:{N}", direction="t2i",
                              method="tcr", shift="RandomCharAug_swap:5", max_queries=N),
    "c2i-source-gaussian_noise": dict(model="shapes-cir", data=f"shapes-cir:test:{N}", direction="c2i",
                                      method="source", shift="gaussian_noise:3"),
    "c2i-tcr-gaussian_noise+char_swap": dict(model="shapes-cir", data=f"shapes-cir:test:{N}", direction="c2i",
                                             method="tcr", shift="gaussian_noise:3+RandomCharAug_swap:5"),
}


def ranks_of(case: dict, tmp_path) -> dict:
    out = tmp_path / "run"
    run(RunConfig(**case, batch_size=16, steps=1, seed=7, out=str(out), cache_dir=str(tmp_path / "cache"),
                  progress=False, num_workers=0))
    rows = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    return {"queries": [q for row in rows for q in row["queries"]],
            "ranks": [r for row in rows for r in row["ranks"]]}


@pytest.mark.parametrize("name", sorted(CASES))
def test_ranks_match_the_recording(name, tmp_path):
    got = ranks_of(CASES[name], tmp_path)
    if os.environ.get("QS_RECORD_RANKS"):
        recorded = json.load(open(FIXTURE, encoding="utf-8")) if os.path.exists(FIXTURE) else {}
        recorded[name] = got
        with open(FIXTURE, "w", encoding="utf-8") as f:
            json.dump(recorded, f, sort_keys=True)
    with open(FIXTURE, encoding="utf-8") as f:
        expected = json.load(f)[name]
    assert len(got["ranks"]) == N
    assert got["queries"] == expected["queries"]
    assert got["ranks"] == expected["ranks"]
