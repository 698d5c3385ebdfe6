"""``rest-design`` at its defaults is the shipped ``rest``; with its additions off it is ``tcr``; its projections
act where they say (moved from tests/test_method_fidelity.py and tests/test_methods.py with the design options)."""

import pytest
import torch
from tests.test_method_fidelity import (  # noqa: F401  (tiny: fixture)
    _move_away_from_source,
    adapted,
    beside_tcr,
    make,
    tiny,
)

import lab  # noqa: F401  (registers rest-design)
from lab import rest_components as RC
from lab.rest_design import RESTDesign
from queryshift.methods.rest import REST


def _trajectory(tiny, name, modality, hparams):  # noqa: F811
    m = make(tiny, name, modality, steps=2, hparams=hparams)
    ranks, logs = [], []
    for x in tiny[2][modality] * 2:  # six batches: the warm-up (2) and four after it
        scores, log = m.step(x)
        ranks.append(scores.argsort(dim=1, descending=True))
        logs.append(log)
    return ranks, logs, adapted(m)


@pytest.mark.parametrize("modality", ["image", "text"])
def test_rest_design_at_its_defaults_is_rest(tiny, modality):  # noqa: F811
    """Same scores' ranks, logs (losses, L_know, angles) and parameters after six batches."""
    assert {k: RESTDesign.defaults[k] for k in REST.defaults} == REST.defaults
    r_rest, l_rest, p_rest = _trajectory(tiny, "rest", modality, {"queue_batches": 2})
    r_design, l_design, p_design = _trajectory(tiny, "rest-design", modality, {"queue_batches": 2})
    assert all(torch.equal(a, b) for a, b in zip(r_rest, r_design))
    assert l_rest == l_design and any("grad_angle" in log for log in l_rest)  # the pull was active
    assert all(torch.equal(p_rest[n], p_design[n]) for n in p_rest)
    assert any(not torch.equal(p_rest[n], tiny[3][n]) for n in p_rest)  # and they did adapt


@pytest.mark.parametrize("modality", ["image", "text"])
def test_rest_design_without_its_additions_is_tcr(tiny, modality):  # noqa: F811
    """rest-design(decouple=off, lambda_k=0, w_con=0, log_angle=False, answers=raw) = tcr: same ranks, losses and
    parameters, also on a batch with an empty reliable selection."""
    as_tcr = {"decouple": "off", "lambda_k": 0.0, "w_con": 0.0, "log_angle": False, "answers": "raw"}
    (r_t, l_t, p_t), (r_r, l_r, p_r) = beside_tcr(tiny, modality, "rest-design", as_tcr)
    assert l_t[1]["empty_selection"] == l_r[1]["empty_selection"] == 1
    assert all(torch.equal(a, b) for a, b in zip(r_t, r_r))
    assert [x["loss"] for x in l_t] == [x["loss"] for x in l_r]
    assert all(torch.equal(p_t[n], p_r[n]) for n in p_t)


def _spy_decouple(monkeypatch):
    calls = []
    real = RC.decouple_gradients

    def spy(g_adapt, g_know, mode="tensor", lambda_k=0.0, **kw):
        out, info = real(g_adapt, g_know, mode, lambda_k, **kw)
        calls.append(([a.clone() for a in g_adapt], [b.clone() for b in g_know], mode, [o.clone() for o in out], info))
        return out, info

    monkeypatch.setattr(RC, "decouple_gradients", spy)
    return calls


@pytest.mark.parametrize("modality", ["image", "text"])
@pytest.mark.parametrize("decouple", ["tensor", "global"])
def test_decoupled_sgd_update_is_minus_the_projected_gradient(tiny, monkeypatch, modality, decouple):  # noqa: F811
    m = make(tiny, "rest-design", modality, steps=1, optimizer="sgd", lr=1.0, momentum=0.0, weight_decay=0.0,
             hparams={"decouple": decouple, "know": "kl", "lambda_k": 0.0})
    x = tiny[2][modality][0]
    _move_away_from_source(m, x)
    calls = _spy_decouple(monkeypatch)
    before = adapted(m)
    _, log = m.step(x)
    assert len(calls) == 1 and "skipped" not in log
    # L_know compares with the *source* predictions (encode_with_source): away from the source it is not 0
    assert log["l_know"] > 1e-7, log
    g_a, g_k, mode, projected, info = calls[0]
    assert mode == decouple and info["conflict_frac"] > 0  # something had to be projected here
    for (n, p), ga, gk, gp in zip(m.named_params, g_a, g_k, projected):
        assert torch.allclose(p.detach() - before[n], -gp, rtol=1e-5, atol=1e-7), n  # lr 1: update = -g'
        if decouple == "tensor":
            assert float((gp * gk).sum()) >= -1e-6 * float(gk.norm() * ga.norm() + 1e-30), n  # no conflict left
    scale = sum(float(gk.norm() * ga.norm()) for ga, gk in zip(g_a, g_k))
    assert sum(float((gp * gk).sum()) for gp, gk in zip(projected, g_k)) >= -1e-6 * scale
    assert any(float((ga * gk).sum()) < 0 for ga, gk in zip(g_a, g_k))


def test_decouple_after_optimizer_makes_the_adamw_update_conflict_free(tiny, monkeypatch):  # noqa: F811
    m = make(tiny, "rest-design", "text", steps=1, lr=1e-2,
             hparams={"decouple_after": "optimizer", "decouple": "tensor", "know": "kl", "lambda_k": 0.0})
    x = tiny[2]["text"][0]
    _move_away_from_source(m, x, n=3)
    calls = _spy_decouple(monkeypatch)
    before = adapted(m)
    _, log = m.step(x)
    assert "skipped" not in log and "update_conflict_frac" in log
    _, g_k, mode, _, _ = calls[0]
    assert mode == "off"  # the gradient goes to AdamW unprojected
    for (n, p), gk in zip(m.named_params, g_k):
        d = p.detach() - before[n]
        assert float((d * gk).sum()) <= 1e-5 * float(d.norm() * gk.norm() + 1e-30), n  # float32 rounding
    with pytest.raises(ValueError, match="decouple_after"):
        make(tiny, "rest-design", "text", hparams={"decouple_after": "later"})


@pytest.mark.parametrize("hp", [
    {"decouple": "global"}, {"decouple": "off", "lambda_k": 0.5}, {"know": "kl", "refine": False},
    {"decouple": "off", "lambda_k": 0.0, "log_angle": False}, {"know": "kl", "decouple": "tensor", "lambda_k": 0.0},
])
def test_rest_design_variants_log_their_diagnostics(tiny, hp):  # noqa: F811
    m = make(tiny, "rest-design", "text", steps=2, hparams={"queue_batches": 1, **hp})
    for x in tiny[2]["text"]:
        scores, log = m.step(x)
    assert torch.isfinite(scores).all() and "skipped" not in log
    for key in ("n_selected", "queue_len", "uniformity", "gap", "consistency", "l_uni", "loss"):
        assert key in log
    assert ("l_know" in log and "conflict_frac" in log) == (hp.get("log_angle", True) is not False)
    with pytest.raises(ValueError, match="decouple"):
        make(tiny, "rest-design", "text", hparams={"decouple": "sideways"})


@pytest.mark.parametrize("modality", ["image", "text"])
def test_refined_answers_without_adaptation_are_tcr_free(tiny, modality):  # noqa: F811
    """answers=refined refines the adapted queries as tcr-free refines the source's: with the update switched
    off (learning rate 0) and tcr-free's tau and queue, rest-design's answers are tcr-free's, batch by batch;
    with answers=raw they are not (the test can fail)."""
    free = make(tiny, "tcr-free", modality, hparams={"queue_batches": 2})
    want = [free.step(x)[0] for x in tiny[2][modality] * 2]
    hp = {"queue_batches": 2, "tau": free.hp["tau"], "answers": "refined", "answer_scale": free.hp["scale"]}
    refined = make(tiny, "rest-design", modality, hparams=hp, optimizer="sgd", lr=0.0, weight_decay=0.0)
    got = [refined.step(x)[0] for x in tiny[2][modality] * 2]
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(want, got))
    raw = make(tiny, "rest-design", modality, hparams={**hp, "answers": "raw"}, optimizer="sgd", lr=0.0,
               weight_decay=0.0)
    assert not all(torch.allclose(a, raw.step(x)[0], atol=1e-5) for a, x in zip(want, tiny[2][modality] * 2))
