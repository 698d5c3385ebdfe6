"""The pre-registered rate rule of lab/experiments/choose_rates.py, on hand-made numbers."""

import json
import os

from lab.experiments.choose_rates import choose, continual_scores, single_scores


def _write(root, method, lr, **result):
    d = os.path.join(root, "runs", f"{method}-{lr}")
    os.makedirs(d)
    with open(os.path.join(d, "result.json"), "w") as f:
        json.dump({"method": method, "lr": lr, **result}, f)


def test_rule_weighs_single_and_continual_and_breaks_ties_low(tmp_path):
    cont, rest, single = str(tmp_path / "c"), str(tmp_path / "r"), str(tmp_path / "s.json")
    _write(cont, "source", 0.001, stream_r1=20.0, forgetting={"forgetting": 0.0})
    _write(cont, "tcr", 0.001, stream_r1=22.0, forgetting={"forgetting": -1.0})   # C 21
    _write(cont, "tcr", 0.003, stream_r1=26.0, forgetting={"forgetting": -6.0})   # C 20
    _write(cont, "rest", 0.001, stream_r1=21.0, forgetting={"forgetting": 0.0})   # C 21
    _write(cont, "rest", 0.003, stream_r1=22.0, forgetting={"forgetting": -0.9})  # C 21.1
    for lr, r1s in ((0.001, [10, 10, 10, 10, 10]), (0.003, [10, 10, 10, 10, 9.9])):
        for i, r1 in enumerate(r1s):
            d = os.path.join(rest, "runs", f"{lr}-{i}")
            os.makedirs(d)
            with open(os.path.join(d, "result.json"), "w") as f:
                json.dump({"method": "rest", "lr": lr, "r1": r1}, f)
    with open(single, "w") as f:  # committed validation-lr numbers; REST's are replaced by its own runs
        json.dump({"mean_r1": {"tcr": {"0.001": 12.0, "0.003": 14.0}, "rest": {"0.001": 99, "0.003": 99}}}, f)
    c = choose(continual_scores(cont), single_scores(rest, single))
    assert c["scores"]["tcr"][0.001]["score"] == 16.5 and c["scores"]["tcr"][0.003]["score"] == 17.0
    assert c["chosen_lr"]["tcr"] == 0.003
    # rest: (10 + 21) / 2 = 15.5 vs (9.98 + 21.1) / 2 = 15.54: within the 0.05 tie, the lower rate
    assert c["scores"]["rest"][0.003]["score"] == 15.54
    assert c["chosen_lr"]["rest"] == 0.001 and "source" not in c["chosen_lr"]
