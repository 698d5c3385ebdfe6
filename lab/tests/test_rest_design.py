"""REST's design space (issue 11, method ``rest-design``): knowledge objectives K2/K3/K4/K5, combination rules,
consistency variants, and the step-cost rules (one source forward per batch, no L_know backward when it changes
nothing). Expected values are worked out by hand."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from tests.test_method_fidelity import adapted, make, tiny  # noqa: F401  (fixture)

import lab  # noqa: F401  (registers rest-design)
from lab import rest_components as RC
from queryshift.methods import components as C


def _two_d(a, b):
    return [torch.tensor(a, dtype=torch.float64)], [torch.tensor(b, dtype=torch.float64)]


def test_margin_projects_only_tensors_past_the_margin_angle():
    # g_a = (cos 100, sin 100), g_k = (1, 0): angle 100 degrees
    t = math.radians(100)
    ga, gk = _two_d([math.cos(t), math.sin(t)], [1.0, 0.0])
    out, _ = RC.decouple_gradients(ga, gk, "tensor", margin_deg=110.0)
    assert torch.equal(out[0], ga[0])  # 100 < 110: not a conflict under this margin
    out, _ = RC.decouple_gradients(ga, gk, "tensor", margin_deg=95.0)
    assert torch.allclose(out[0], torch.tensor([0.0, math.sin(t)], dtype=torch.float64))
    out, _ = RC.decouple_gradients(ga, gk, "global", margin_deg=95.0)
    assert torch.allclose(out[0], torch.tensor([0.0, math.sin(t)], dtype=torch.float64))


def test_keep_leaves_that_fraction_of_the_conflicting_component():
    ga, gk = _two_d([-2.0, 1.0], [1.0, 0.0])  # conflicting component: (-2, 0)
    out, _ = RC.decouple_gradients(ga, gk, "tensor", keep=0.25)
    assert torch.allclose(out[0], torch.tensor([-0.5, 1.0], dtype=torch.float64))
    out, _ = RC.decouple_gradients(ga, gk, "tensor", keep=1.0)
    assert torch.allclose(out[0], ga[0])


def test_agreement_and_margin_losses_by_hand():
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0], [5.0, 5.0]])
    mask = torch.tensor([True, True, False])
    expected = (-math.log(math.exp(2) / (math.exp(2) + 1)) - math.log(math.exp(1) / (math.exp(1) + 1))) / 2
    assert math.isclose(float(RC.agreement_loss(logits, torch.tensor([0, 1, 0]), mask)), expected, rel_tol=1e-6)
    scores = torch.tensor([[0.9, 0.5, 0.1], [0.2, 0.3, 0.8], [0.0, 0.0, 0.0]])
    assert math.isclose(float(RC.margin_loss(scores, mask)), -(0.4 + 0.5) / 2, rel_tol=1e-6)
    assert RC.margin_loss(scores, torch.zeros(3, dtype=torch.bool)) is None


def test_anchor_store_keeps_the_most_source_like_raw_inputs_and_freezes():
    store = RC.AnchorStore(size=3, warmup=2)
    gen = torch.Generator().manual_seed(0)
    q = F.normalize(torch.randn(6, 4, generator=gen), dim=1)
    g = F.normalize(q + 0.1 * torch.randn(6, 4, generator=gen), dim=1)
    g[:2] = -q[:2]  # rows 0 and 1: far from their candidates, the least source-like
    inputs = torch.arange(6).float()[:, None].expand(6, 5).clone()
    store.update(inputs, q, g, batch_index=0, step=0)
    ind = C.source_like_indicator(q, g)
    best = torch.argsort(ind)[:3]
    assert sorted(store.inputs[:, 0].long().tolist()) == sorted(best.tolist())
    assert not {0, 1} & set(store.inputs[:, 0].long().tolist())
    frozen = store.inputs.clone()
    store.update(inputs * 0, q, g, batch_index=2, step=0)  # past the warm-up
    store.update(inputs * 0, q, g, batch_index=1, step=1)  # not step 0
    assert torch.equal(store.inputs, frozen)


def test_concat_inputs_pads_token_batches_of_other_widths():
    a = {"input_ids": torch.ones(2, 3, dtype=torch.long), "attention_mask": torch.ones(2, 3, dtype=torch.long)}
    b = {"input_ids": torch.full((1, 5), 7), "attention_mask": torch.ones(1, 5, dtype=torch.long)}
    c = RC.concat_inputs(a, b)
    assert c["input_ids"].shape == (3, 5) and c["input_ids"][0].tolist() == [1, 1, 1, 0, 0]
    assert c["attention_mask"][1].tolist() == [1, 1, 1, 0, 0]


def _take_steps(m, xs):
    for x in xs:
        m.step(x)


@pytest.mark.parametrize("decouple", ["tensor", "global"])
@pytest.mark.parametrize("modality", ["image", "text"])
def test_k2_knowledge_gradient_is_the_anchor_consistency_and_the_sgd_update_respects_it(tiny, monkeypatch,  # noqa: F811
                                                                                         modality, decouple):
    m = make(tiny, "rest-design", modality, steps=1, optimizer="sgd", lr=1.0, momentum=0.0, weight_decay=0.0,
             hparams={"know": "anchors", "n_anchors": 4, "queue_batches": 2, "decouple": decouple,
                      "lambda_k": 0.0})
    xs = tiny[2][modality]
    for g in m.optimizer.param_groups:
        g["lr"] = 1e-2
    _take_steps(m, xs[:2])  # fills the queue and the anchors
    for g in m.optimizer.param_groups:
        g["lr"] = 1.0
    assert len(m.anchors) == 4
    # g_k by hand: the gradient of mean(1 - q_a . g~_a) over the re-encoded anchors
    m.optimizer.zero_grad(set_to_none=True)
    qa = m.encode(m.anchors.inputs)
    (1 - (qa * m.anchors.g).sum(1)).mean().backward()
    g_k = [p.grad.clone() for p in m.params]
    m.optimizer.zero_grad(set_to_none=True)
    before = adapted(m)
    _, log = m.step(xs[2])
    assert "skipped" not in log and "l_know" in log
    # minus the projected gradient has no positive inner product with -g_k: it does not raise L_know,
    # per tensor ("tensor") or over all parameters together ("global")
    dots, norms = [], []
    for (n, p), gk in zip(m.named_params, g_k):
        d = p.detach() - before[n]
        dots.append(float((d * gk).sum()))
        norms.append(float(d.norm() * gk.norm()))
        if decouple == "tensor":
            assert dots[-1] <= 1e-6 * (norms[-1] + 1e-30), n
    assert sum(dots) <= 1e-6 * (sum(norms) + 1e-30)
    if decouple == "global":
        assert any(x > 1e-6 * (nm + 1e-30) for x, nm in zip(dots, norms))  # one projection, not per tensor


def test_k2_anchors_survive_a_checkpoint(tiny):  # noqa: F811
    m = make(tiny, "rest-design", "image", steps=1, hparams={"know": "anchors", "n_anchors": 4, "queue_batches": 2})
    _take_steps(m, tiny[2]["image"][:2])
    state = m.state_dict()
    m2 = make(tiny, "rest-design", "image", steps=1, hparams={"know": "anchors", "n_anchors": 4, "queue_batches": 2})
    m2.load_state_dict(state)
    assert torch.equal(m2.anchors.inputs, m.anchors.inputs) and torch.equal(m2.anchors.g, m.anchors.g)


def test_k3_knowledge_loss_is_the_reliable_queries_consistency(tiny, monkeypatch):  # noqa: F811
    m = make(tiny, "rest-design", "text", steps=1, hparams={"know": "reliable", "queue_batches": 1})
    seen = []
    real = C.grads_of
    monkeypatch.setattr(C, "grads_of", lambda loss, params, retain_graph=False:
                        seen.append(float(loss.detach())) or real(loss, params, retain_graph))
    xs = tiny[2]["text"]
    m.step(xs[0])
    with torch.no_grad():
        q = m.encode(xs[1])
        g, _ = C.candidates(q @ m.gallery.T, m.gallery)
        ent = C.entropy(C.inbatch_logits(q, g, m.hp["tau"]))
        reliable = ent <= m.queue.max_entropy
        expected = float((1 - (q * g).sum(1)[reliable]).mean())
    seen.clear()
    _, log = m.step(xs[1])
    assert reliable.any() and len(seen) == 2  # g_adapt, then g_know
    assert math.isclose(seen[1], expected, rel_tol=1e-5) and math.isclose(log["l_know"], expected, rel_tol=1e-5)


def test_source_forward_once_per_batch_and_no_know_backward_without_decoupling(tiny, monkeypatch):  # noqa: F811
    m = make(tiny, "rest-design", "image", steps=3, hparams={"queue_batches": 1, "know": "kl"})
    calls = []
    real_src = type(m).encode_with_source
    monkeypatch.setattr(type(m), "encode_with_source", lambda self, x: calls.append(1) or real_src(self, x))
    xs = tiny[2]["image"]
    m.step(xs[0])
    m.step(xs[1])
    assert len(calls) == 2  # one source forward per batch, not one per step
    off = make(tiny, "rest-design", "image", steps=1, hparams={"decouple": "off", "lambda_k": 0.0, "queue_batches": 1})
    grads = []
    real = C.grads_of
    monkeypatch.setattr(C, "grads_of", lambda *a, **k: grads.append(1) or real(*a, **k))
    calls.clear()
    off.step(xs[0])
    off.step(xs[1])
    assert grads == [] and calls == []  # decoupling off: no L_know, no source forward, no extra backward


def test_unknown_design_choices_are_refused(tiny):  # noqa: F811
    for key, bad in (("know", "k9"), ("con", "cosine"), ("anchor_loss", "l2")):
        with pytest.raises(ValueError, match=key):
            make(tiny, "rest-design", "image", hparams={key: bad})


def test_gradient_subspace_removes_the_protected_directions_by_hand():
    sub = RC.GradientSubspace(energy=0.99, max_rank=1)
    sub.add([torch.tensor([3.0, 0.0, 0.0])])
    sub.add([torch.tensor([-1.0, 0.0, 0.0])])
    out = sub.project([torch.tensor([2.0, 5.0, -1.0])])
    assert torch.allclose(out[0], torch.tensor([0.0, 5.0, -1.0]), atol=1e-6)
    sub.add([torch.tensor([0.0, 1.0, 0.0])])  # frozen: later gradients change nothing
    assert torch.allclose(sub.project([torch.tensor([1.0, 1.0, 1.0])])[0], torch.tensor([0.0, 1.0, 1.0]), atol=1e-6)


def test_k4_updates_after_the_warm_up_are_orthogonal_to_the_protected_subspace(tiny):  # noqa: F811
    m = make(tiny, "rest-design", "text", steps=1, optimizer="sgd", lr=1e-2, momentum=0.0, weight_decay=0.0,
             hparams={"know": "subspace", "queue_batches": 2, "subspace_rank": 2})
    xs = tiny[2]["text"]
    _take_steps(m, xs[:2])
    assert m.subspace.basis is None and len(m.subspace.rows) >= 1  # collected during the warm-up
    before = adapted(m)
    _, log = m.step(xs[2])
    assert "skipped" not in log and log["subspace_rank"] > 0
    moved = False
    for (n, p), u in zip(m.named_params, m.subspace.basis):
        d = (p.detach() - before[n]).flatten()
        moved |= bool(d.abs().sum() > 0)
        if u.shape[1]:
            assert float((u.T @ d).abs().max()) <= 1e-4 * float(d.norm() + 1e-12), n  # float32 rounding
    assert moved


def test_diagonal_fisher_by_hand():
    fisher = RC.DiagonalFisher()
    fisher.add([torch.tensor([2.0, -4.0])], n=2)  # squares / n: (2, 8)
    fisher.add([torch.tensor([0.0, 2.0])], n=1)  # (0, 4)
    fisher.add([torch.tensor([float("nan"), 1.0])], n=1)  # not finite: ignored
    fisher.add([torch.tensor([5.0, 5.0])], n=0)  # no query: ignored
    assert len(fisher) == 2 and torch.allclose(fisher.weights[0], torch.tensor([1.0, 6.0]))
    grads, value = fisher.knowledge([torch.tensor([3.0, 1.0])], [torch.tensor([1.0, 2.0])])  # delta (2, -1)
    assert torch.allclose(grads[0], torch.tensor([2.0, -6.0]))
    assert math.isclose(value, 0.5 * (1 * 4 + 6 * 1))


def test_diagonal_fisher_estimate_converges_to_the_exact_fisher_of_the_predictions():
    # a linear softmax model z_i = W x_i: the exact diagonal Fisher per query is
    # mean_i sum_y p_i(y) (d/dW -log p_i(y))^2; labels drawn from p_i estimate it without bias
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(6, 3, generator=gen)
    w = torch.randn(4, 3, generator=gen).requires_grad_(True)
    p = (x @ w.T).softmax(-1).detach()
    exact = torch.zeros(4, 3)
    for i in range(6):
        for y in range(4):
            (g,) = torch.autograd.grad(-(x[i] @ w.T).log_softmax(-1)[y], w)
            exact += p[i, y] * g**2 / 6
    fisher = RC.DiagonalFisher()
    for _ in range(4000):
        (g,) = torch.autograd.grad(RC.sampled_nll(x @ w.T, gen), w)
        fisher.add([g], n=6)
    assert torch.allclose(fisher.weights[0], exact, rtol=0.1, atol=1e-3 * float(exact.max()))
    argmax = RC.DiagonalFisher()  # the argmax label instead of a draw: a biased estimate, caught by the test
    (g,) = torch.autograd.grad(F.cross_entropy(x @ w.T, p.argmax(1), reduction="sum"), w)
    argmax.add([g], n=6)
    assert not torch.allclose(argmax.weights[0], exact, rtol=0.1, atol=1e-3 * float(exact.max()))


def test_sampled_fisher_by_hand():
    shapes = [torch.zeros(2), torch.zeros(1)]  # two parameter tensors, P = 3
    rows = [torch.tensor([1.0, 2.0, 3.0]), torch.tensor([0.0, 1.0, -1.0])]
    params, source = [torch.tensor([2.0, 0.0]), torch.tensor([3.0])], [torch.tensor([1.0, 1.0]), torch.tensor([1.0])]
    d = torch.tensor([1.0, -1.0, 2.0])
    for full in (True, False):
        fisher = RC.SampledFisher(full=full)
        for r in rows:
            fisher.add([r[:2], r[2:]])
        fisher.add([torch.tensor([float("inf"), 0.0]), torch.tensor([0.0])])  # not finite: ignored
        assert len(fisher) == 2 and [p.shape for p in shapes] == fisher.shapes
        f = sum(torch.outer(r, r) for r in rows) / 2
        if not full:  # the per-tensor blocks only
            f[:2, 2:] = 0
            f[2:, :2] = 0
        grads, value = fisher.knowledge(params, source)
        assert torch.allclose(torch.cat(grads), f @ d) and grads[0].shape == (2,) and grads[1].shape == (1,)
        assert math.isclose(value, 0.5 * float(d @ f @ d), rel_tol=1e-6)


def test_sampled_fisher_uses_rows_added_after_a_query_and_checkpoints_without_the_stacked_copy():
    params, source = [torch.tensor([2.0, 0.0]), torch.tensor([3.0])], [torch.zeros(2), torch.zeros(1)]
    fisher = RC.SampledFisher(full=True)
    fisher.add([torch.tensor([1.0, 2.0]), torch.tensor([3.0])])
    fisher.knowledge(params, source)  # stacks the one row
    fisher.add([torch.tensor([0.0, 1.0]), torch.tensor([-1.0])])
    rows = torch.stack(fisher.rows)
    d = torch.cat([p - s for p, s in zip(params, source)])
    grads, _ = fisher.knowledge(params, source)  # a stale stack (one row) would give another answer
    assert torch.allclose(torch.cat(grads), rows.T @ (rows @ d) / 2)
    saved = copy.deepcopy(fisher)  # what a checkpoint holds (Method._capture deep-copies state_attrs)
    assert saved._stacked is None and len(saved) == 2
    assert torch.allclose(torch.cat(saved.knowledge(params, source)[0]), torch.cat(grads))
    legacy = RC.SampledFisher.__new__(RC.SampledFisher)  # pickled before the stacked cache existed
    legacy.__setstate__({k: v for k, v in fisher.__dict__.items() if k != "_stacked"})
    assert torch.allclose(torch.cat(legacy.knowledge(params, source)[0]), torch.cat(grads))


def _fisher_by_hand(fisher, named_params, source):
    """F (theta - theta_0) from the estimate's stored statistics, written out."""
    deltas = [p.detach() - source[n] for n, p in named_params]
    if isinstance(fisher, RC.DiagonalFisher):
        return [t / fisher.count * d for t, d in zip(fisher.total, deltas)]
    u, sizes = torch.stack(fisher.rows), [d.numel() for d in deltas]
    if not getattr(fisher, "full", False):  # block: each tensor's own block U_t^T U_t / n
        return [(ut.T @ (ut @ d.flatten()) / len(u)).view_as(d) for ut, d in zip(u.split(sizes, dim=1), deltas)]
    fd = u.T @ (u @ torch.cat([d.flatten() for d in deltas])) / len(u)
    return [t.view_as(d) for t, d in zip(fd.split(sizes), deltas)]


@pytest.mark.parametrize("kind", ["diag", "block", "full"])
@pytest.mark.parametrize("modality", ["image", "text"])
def test_k5_collects_the_fisher_in_the_warm_up_then_protects_it_with_no_extra_pass(tiny, monkeypatch, modality,  # noqa: F811
                                                                                    kind):
    m = make(tiny, "rest-design", modality, steps=1, optimizer="sgd", lr=1e-2, momentum=0.0, weight_decay=0.0,
             hparams={"know": "fisher", "fisher": kind, "queue_batches": 2, "decouple": "global", "lambda_k": 0.0})
    xs = tiny[2][modality]
    _take_steps(m, xs[:2])
    # diag: one estimate per warm-up batch; full: one score per reliable query of the warm-up batches
    assert len(m.fisher) == 2 if kind == "diag" else len(m.fisher) >= 2
    collected = len(m.fisher)
    frozen = copy.deepcopy(vars(m.fisher))
    # after the warm-up: no source forward and one backward (g_adapt) per step; the Fisher stays frozen
    source_calls, backward_calls = [], []
    real_src, real_grads = type(m).encode_with_source, C.grads_of
    monkeypatch.setattr(type(m), "encode_with_source", lambda self, x: source_calls.append(1) or real_src(self, x))
    monkeypatch.setattr(C, "grads_of", lambda *a, **k: backward_calls.append(1) or real_grads(*a, **k))
    for g in m.optimizer.param_groups:
        g["lr"] = 0.3
    source = m._snapshot["params"]
    angles = []
    for x in [xs[2], xs[0], xs[1]] * 2:
        source_calls.clear()
        backward_calls.clear()
        g_k = _fisher_by_hand(m.fisher, m.named_params, source)
        before = adapted(m)
        _, log = m.step(x)
        assert source_calls == [] and backward_calls == [1] and len(m.fisher) == collected
        assert "skipped" not in log and log["l_know"] > 0
        # the logged L_know is the quadratic distance before the step, 0.5 (theta - theta_0)^T F (theta - theta_0)
        assert math.isclose(log["l_know"], 0.5 * sum(float((gk * (before[n] - source[n])).sum())
                                                      for gk, (n, _) in zip(g_k, m.named_params)), rel_tol=1e-4)
        angles.append(log["grad_angle"])
        # the SGD update -g (g the projected gradient) does not move the parameters further out in the
        # Fisher metric to first order: <d, g_k> <= 0 over all tensors together ("global")
        dot = sum(float(((p.detach() - before[n]) * gk).sum()) for gk, (n, p) in zip(g_k, m.named_params))
        norm = sum(float((p.detach() - before[n]).norm() * gk.norm()) for gk, (n, p) in zip(g_k, m.named_params))
        assert dot <= 1e-6 * (norm + 1e-30)
    assert max(angles) > 90  # some step conflicted: the projection was exercised
    same_estimate = copy.deepcopy(vars(m.fisher))
    for key, value in frozen.items():
        a, b = value, same_estimate[key]
        assert (torch.equal(a, b) if torch.is_tensor(a) else
                all(torch.equal(x, y) for x, y in zip(a, b)) if isinstance(a, list) and a and torch.is_tensor(a[0])
                else a == b), key


@pytest.mark.parametrize("kind", ["diag", "block", "full"])
def test_k5_fisher_survives_a_checkpoint(tiny, kind):  # noqa: F811
    hp = {"know": "fisher", "fisher": kind, "queue_batches": 2}
    m = make(tiny, "rest-design", "image", steps=1, hparams=hp)
    _take_steps(m, tiny[2]["image"][:2])
    state = m.state_dict()
    m2 = make(tiny, "rest-design", "image", steps=1, hparams=hp)
    m2.load_state_dict(state)
    assert len(m2.fisher) == len(m.fisher) >= 2
    source = list(m._snapshot["params"].values())
    a, b = m.fisher.knowledge(m.params, source), m2.fisher.knowledge(m2.params, source)
    assert a[1] == b[1] and a[1] > 0 and all(torch.equal(x, y) for x, y in zip(a[0], b[0]))
