"""Shared method components on small hand-made tensors (values checked against hand computation)."""

import math

import torch

from queryshift.methods import components as C


def close(a, b, tol=1e-6):
    a = a.detach() if torch.is_tensor(a) else a
    return abs(float(a) - float(b)) < tol


# -- entropy and selection --------------------------------------------------------------------------


def test_entropy_natural_log():
    assert close(C.entropy(torch.zeros(5)), math.log(5))
    logits = torch.tensor([[0.0, math.log(3.0)]])  # p = (0.25, 0.75)
    assert close(C.entropy(logits)[0], -(0.25 * math.log(0.25) + 0.75 * math.log(0.75)))
    assert C.entropy(torch.tensor([[0.0, 1000.0]]))[0] < 1e-6  # no NaN at saturation


def test_gallery_logits():
    q, g = torch.tensor([[1.0, 0.0]]), torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    assert torch.allclose(C.gallery_logits(q, g, 0.5), torch.tensor([[2.0, 0.0]]))


VALUES = torch.tensor([0.5, 0.1, 0.9, 0.3, 0.7, 0.2, 0.8, 0.4, 0.6, 1.0])


def test_select_lowest_fraction_non_strict_and_strict():
    mask, thr = C.select_lowest(VALUES, 0.4)  # k = int(0.4 * 10) = 4 -> 4th smallest = 0.4
    assert close(thr, 0.4)
    assert mask.nonzero().flatten().tolist() == [1, 3, 5, 7]  # values 0.1, 0.3, 0.2, 0.4
    mask, thr = C.select_lowest(VALUES, 0.4, strict=True)
    assert mask.sum() == 3 and close(VALUES[mask].max(), 0.3)


def test_select_lowest_k_is_floor_of_fraction_and_zero_selects_nothing():
    v = torch.arange(64.0)
    assert C.select_lowest(v, 0.3)[0].sum() == 19  # int(0.3 * 64)
    assert C.select_lowest(v, 0.4)[0].sum() == 25  # int(0.4 * 64), SAR/EATA
    assert C.select_lowest(v, 0.5, strict=True)[0].sum() == 31  # DeYO: k = 32, strict
    mask, thr = C.select_lowest(VALUES, 0.05)  # k = 0
    assert thr is None and not mask.any()
    assert C.kth_smallest(VALUES, 0.0) is None


def test_select_lowest_ties():
    v = torch.tensor([1.0, 1.0, 1.0, 2.0])
    assert C.select_lowest(v, 0.5)[0].sum() == 3  # all ties of the threshold
    assert C.select_lowest(v, 0.5, strict=True)[0].sum() == 0


def test_index_batch_tensor_and_dict():
    mask = torch.tensor([True, False, True])
    assert C.index_batch(torch.arange(3), mask).tolist() == [0, 2]
    out = C.index_batch({"ids": torch.arange(3), "name": "x"}, mask)
    assert out["ids"].tolist() == [0, 2] and out["name"] == "x"


# -- candidates, refinement, queue --------------------------------------------------------------------


def test_candidates_top1_and_topk_mean():
    gallery = torch.eye(3)
    scores = torch.tensor([[0.1, 0.9, 0.5], [0.8, 0.0, 0.7]])
    g, idx = C.candidates(scores, gallery)
    assert idx.tolist() == [1, 0] and torch.equal(g, gallery[[1, 0]])
    g2, idx2 = C.candidates(scores, gallery, k=2)
    s = 1 / math.sqrt(2)
    assert idx2.tolist() == [1, 0]
    assert torch.allclose(g2, torch.tensor([[0.0, s, s], [s, 0.0, s]]))
    assert not g2.requires_grad


def test_inbatch_logits_and_consistency():
    q = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    g = torch.tensor([[0.6, 0.8], [1.0, 0.0]])
    assert torch.allclose(C.inbatch_logits(q, g, 0.1), torch.tensor([[6.0, 10.0], [8.0, 0.0]]))
    assert torch.allclose(C.consistency(q, g), torch.tensor([0.6, 0.0]))


def test_indicator_and_modality_gap_by_hand():
    q = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    g = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    # gap = (0, sqrt2); c_q = (.5,.5): div_q = sqrt(.5) each; c_g = g[0]: div_g = 0
    expected = torch.tensor([0 - math.sqrt(0.5), 2 * math.sqrt(2) - math.sqrt(0.5)])
    assert torch.allclose(C.source_like_indicator(q, g), expected)
    assert close(C.modality_gap(q, g), math.sqrt(0.5))  # ||(.5,.5) - (1,0)||


def _pairs(n, seed):
    gen = torch.Generator().manual_seed(seed)
    q = torch.nn.functional.normalize(torch.randn(n, 4, generator=gen), dim=1)
    g = torch.nn.functional.normalize(torch.randn(n, 4, generator=gen), dim=1)
    return q, g, torch.rand(n, generator=gen)


def test_queue_adds_most_source_like_fraction_and_truncates_sorted():
    queue = C.SourceLikeQueue(size=4, frac=0.5, warmup=2)
    assert len(queue) == 0 and queue.max_entropy is None and queue.gap is None
    q1, g1, e1 = _pairs(6, 0)
    assert queue.update(q1, g1, e1, batch_index=0, step=0) == 3
    ind1 = C.source_like_indicator(q1, g1)
    best1 = ind1.argsort()[:3]
    assert len(queue) == 3 and torch.allclose(queue.indicator, ind1[best1])
    assert torch.equal(queue.q, q1[best1]) and torch.equal(queue.entropy, e1[best1])
    assert queue.update(q1, g1, e1, batch_index=0, step=1) == 0  # step 0 only
    q2, g2, e2 = _pairs(6, 1)
    queue.update(q2, g2, e2, batch_index=1, step=0)
    ind2 = C.source_like_indicator(q2, g2)
    pool_ind = torch.cat([ind1[best1], ind2[ind2.argsort()[:3]]])
    pool_q = torch.cat([q1[best1], q2[ind2.argsort()[:3]]])
    keep = pool_ind.argsort()[:4]
    assert len(queue) == 4
    assert torch.allclose(queue.indicator, pool_ind[keep]) and torch.equal(queue.q, pool_q[keep])
    assert (queue.indicator[1:] >= queue.indicator[:-1]).all()
    assert queue.update(q2, g2, e2, batch_index=2, step=0) == 0  # past the warm-up batches


def test_queue_statistics_by_hand_and_non_finite_samples_stay_out():
    queue = C.SourceLikeQueue(size=4, frac=1.0, warmup=5)
    q = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    g = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    assert queue.push(q, g, torch.tensor([0.3, 0.7])) == 2
    assert close(queue.max_entropy, 0.7)
    assert close(queue.gap, math.sqrt(0.5))  # ||(.5,.5) - (1,0)||
    assert close(queue.mean_consistency, 0.5)  # (1 + 0) / 2
    # a NaN query makes every indicator NaN (through the batch centre): nothing is added
    assert queue.push(torch.tensor([[float("nan"), 0.0], [0.0, 1.0]]), g, torch.tensor([0.1, 0.1])) == 0
    # a NaN entropy keeps only that sample out
    assert queue.push(q, g, torch.tensor([float("nan"), 0.2])) == 1
    assert len(queue) == 3 and torch.isfinite(queue.entropy).all() and close(queue.max_entropy, 0.7)


def test_queue_zero_fraction_stays_empty():
    queue = C.SourceLikeQueue(size=4, frac=0.1, warmup=2)
    q, g, e = _pairs(5, 0)
    assert queue.update(q, g, e, 0, 0) == 0 and len(queue) == 0 and queue.mean_consistency is None


# -- losses -------------------------------------------------------------------------------------------


def test_rem_by_hand_and_detached_weight():
    h = torch.tensor([0.1, 0.5, 1.0, 2.0], requires_grad=True)
    loss, mask = C.rem_loss(h, 1.0, eps=1e-3)
    w = [1 - x / 1.001 for x in (0.1, 0.5, 1.0)]
    assert mask.tolist() == [True, True, True, False]
    assert close(loss, sum(wi * hi for wi, hi in zip(w, (0.1, 0.5, 1.0))) / 3)
    loss.backward()
    assert torch.allclose(h.grad, torch.tensor([w[0] / 3, w[1] / 3, w[2] / 3, 0.0]))


def test_rem_empty_selection_and_no_threshold_give_none():
    h = torch.tensor([0.5, 0.6])
    loss, mask = C.rem_loss(h, 0.1)
    assert loss is None and not mask.any()
    loss, mask = C.rem_loss(h, None)
    assert loss is None and not mask.any()


def test_uniformity_by_hand():
    q = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    assert close(C.uniformity_loss(q, t=0.1), math.exp(-0.1 * math.sqrt(0.5)))


def test_gap_loss_by_hand_gradient_through_queries_only():
    q = torch.tensor([[1.0, 0.0]], requires_grad=True)
    g = torch.tensor([[0.0, 1.0]], requires_grad=True)
    loss = C.gap_loss(q, g, 1.0)
    assert close(loss, (math.sqrt(2) - 1) ** 2)
    loss.backward()
    assert q.grad is not None and g.grad is None


def test_consistency_loss_by_hand():
    cons = torch.tensor([0.2, 0.9, 0.4])
    mask = torch.tensor([True, True, False])
    assert close(C.consistency_loss(cons, 0.5, mask), (0.3 + 0.0) / 2)
    assert C.consistency_loss(cons, 0.5, torch.zeros(3, dtype=torch.bool)) is None


def test_grads_of_and_surrogate_loss():
    p1 = torch.nn.Parameter(torch.tensor([1.0, 2.0]))
    p2 = torch.nn.Parameter(torch.tensor([3.0]))
    loss = (p1**2).sum()
    grads = C.grads_of(loss, [p1, p2])
    assert torch.equal(grads[0], torch.tensor([2.0, 4.0])) and torch.equal(grads[1], torch.zeros(1))
    target = [torch.tensor([0.5, -1.0]), torch.tensor([7.0])]
    s = C.surrogate_loss(torch.tensor(1.25), [p1, p2], target)
    assert close(s, 1.25)
    s.backward()
    assert torch.equal(p1.grad, target[0]) and torch.equal(p2.grad, target[1])


# -- SAM ---------------------------------------------------------------------------------------------


def test_sam_perturbs_restores_and_steps_like_base():  # exact restore: tests/test_method_fidelity.py
    p = torch.nn.Parameter(torch.tensor([1.0, -2.0]))
    ref = torch.nn.Parameter(p.detach().clone())
    sam = C.SAM([p], torch.optim.AdamW, rho=0.05, lr=0.1, weight_decay=0.0)
    base = torch.optim.AdamW([ref], lr=0.1, weight_decay=0.0)
    p.grad = torch.tensor([3.0, 4.0])  # ||g|| = 5
    sam.step()  # ascent
    assert sam.perturbed and torch.allclose(p.detach(), torch.tensor([1.03, -1.96]))
    sam.zero_grad()
    p.grad = torch.tensor([1.0, 1.0])  # gradient at the perturbed point
    sam.step()  # descent from the original point
    ref.grad = torch.tensor([1.0, 1.0])
    base.step()
    assert not sam.perturbed and torch.equal(p.detach(), ref.detach())
    # abandon a perturbation
    before = p.detach().clone()
    p.grad = torch.tensor([1.0, 0.0])
    sam.first_step()
    sam.unperturb()
    assert torch.equal(p.detach(), before)
    state = sam.state_dict()
    sam.load_state_dict(state)
    assert not sam.perturbed and len(sam.state_dict()["state"]) == 1
