"""The shipped ``rest``: its hyper-parameters, its state, and the knowledge pull ``g_a + lambda_k F (theta -
theta_0)`` with per-tensor Fisher blocks estimated during the queue's warm-up. Expected values by hand."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from queryshift.methods import components as C
from queryshift.methods.rest import REST
from tests.test_method_fidelity import adapted, make, tiny  # noqa: F401  (fixture)


def test_every_method_declares_a_type_and_range_for_every_hyper_parameter():
    from queryshift import methods

    for name in methods.available():
        cls = methods.get(name)
        assert set(cls.hparam_spec) == set(cls.defaults), name
        cls.check_hparams(dict(cls.defaults))  # the defaults themselves are valid


def test_rest_declares_only_what_a_user_tunes_and_keeps_only_the_state_it_uses(tiny):  # noqa: F811
    assert len(REST.defaults) <= 14 and REST.defaults["lambda_k"] == 10.0
    assert REST.state_attrs == ("queue", "fisher")
    m = make(tiny, "rest", "image", steps=1, hparams={"queue_batches": 2})
    extra = m.state_dict()["extra"]
    assert set(extra) == {"queue", "fisher"} and isinstance(extra["fisher"], C.BlockFisher)
    with pytest.raises(ValueError, match="unknown hyper-parameter"):
        make(tiny, "rest", "image", hparams={"decouple": "global"})  # a design option: the lab's rest-design


def test_block_fisher_by_hand():
    rows = [torch.tensor([1.0, 2.0, 3.0]), torch.tensor([0.0, 1.0, -1.0])]  # two tensors: sizes 2 and 1
    params, source = [torch.tensor([2.0, 0.0]), torch.tensor([3.0])], [torch.tensor([1.0, 1.0]), torch.tensor([1.0])]
    d = torch.tensor([1.0, -1.0, 2.0])
    fisher = C.BlockFisher()
    for r in rows:
        fisher.add([r[:2], r[2:]])
    fisher.add([torch.tensor([float("inf"), 0.0]), torch.tensor([0.0])])  # not finite: ignored
    f = sum(torch.outer(r, r) for r in rows) / 2
    f[:2, 2:] = 0  # the per-tensor blocks only
    f[2:, :2] = 0
    grads, value = fisher.knowledge(params, source)
    assert len(fisher) == 2 and grads[0].shape == (2,) and grads[1].shape == (1,)
    assert torch.allclose(torch.cat(grads), f @ d) and math.isclose(value, 0.5 * float(d @ f @ d), rel_tol=1e-6)
    saved = copy.deepcopy(fisher)  # what a checkpoint holds: the rows, not the stacked copy
    assert saved._stacked is None and torch.allclose(torch.cat(saved.knowledge(params, source)[0]), f @ d)


def test_knowledge_pull_adds_lambda_k_times_the_knowledge_gradient_and_reports_the_angle():
    ga, gk = [torch.tensor([1.0, 0.0]), torch.tensor([0.0])], [torch.tensor([-1.0, 1.0]), torch.tensor([0.0])]
    out, info = C.knowledge_pull(ga, gk, 10.0)
    assert torch.equal(out[0], torch.tensor([-9.0, 10.0])) and torch.equal(out[1], torch.tensor([0.0]))
    assert math.isclose(info["grad_angle"], 135.0) and info["conflict_frac"] == 1.0
    assert math.isclose(info["know_norm_ratio"], math.sqrt(2))
    out, info = C.knowledge_pull(ga, [torch.zeros(2), torch.zeros(1)], 10.0)  # at the source: no pull, no angle
    assert all(torch.equal(a, b) for a, b in zip(out, ga)) and "grad_angle" not in info


def _fisher_by_hand(fisher, named_params, source):
    """F (theta - theta_0) from the estimate's rows, per tensor block, written out."""
    deltas = [p.detach() - source[n] for n, p in named_params]
    u, sizes = torch.stack(fisher.rows), [d.numel() for d in deltas]
    return [(ut.T @ (ut @ d.flatten()) / len(u)).view_as(d) for ut, d in zip(u.split(sizes, dim=1), deltas)]


@pytest.mark.parametrize("modality", ["image", "text"])
def test_the_default_pulls_the_update_back_along_the_fisher_by_lambda_k(tiny, monkeypatch, modality):  # noqa: F811
    """With plain SGD the step is exactly ``-lr (g_a + 10 F (theta - theta_0))``, g_a the adaptation gradient
    alone; after the warm-up the Fisher is frozen and a step costs no source forward and one backward."""
    m = make(tiny, "rest", modality, steps=1, optimizer="sgd", lr=1e-2, momentum=0.0, weight_decay=0.0,
             hparams={"queue_batches": 2})
    xs = tiny[2][modality]
    for x in xs[:2]:
        m.step(x)
    collected = len(m.fisher)
    assert collected >= 2  # one score per reliable query of the warm-up batches
    adapt_grads, source_calls, backward_calls = [], [], []
    real_pull, real_src, real_grads = C.knowledge_pull, type(m).encode_with_source, C.grads_of

    def spy(g_adapt, *args, **kwargs):
        adapt_grads.append([g.clone() for g in g_adapt])
        return real_pull(g_adapt, *args, **kwargs)

    monkeypatch.setattr(C, "knowledge_pull", spy)
    monkeypatch.setattr(type(m), "encode_with_source", lambda self, x: source_calls.append(1) or real_src(self, x))
    monkeypatch.setattr(C, "grads_of", lambda *a, **k: backward_calls.append(1) or real_grads(*a, **k))
    source = m._snapshot["params"]
    lr, pulled = 0.3, 0
    for g in m.optimizer.param_groups:
        g["lr"] = lr
    for x in [xs[2], xs[0], xs[1]] * 2:
        adapt_grads.clear()
        backward_calls.clear()
        g_k = _fisher_by_hand(m.fisher, m.named_params, source)
        before = adapted(m)
        _, log = m.step(x)
        assert "skipped" not in log and len(adapt_grads) == 1 and backward_calls == [1] and source_calls == []
        assert len(m.fisher) == collected
        # the logged L_know is the quadratic distance before the step, 0.5 (theta - theta_0)^T F (theta - theta_0)
        assert math.isclose(log["l_know"], 0.5 * sum(float((gk * (before[n] - source[n])).sum())
                                                      for gk, (n, _) in zip(g_k, m.named_params)), rel_tol=1e-4)
        for ga, gk, (n, p) in zip(adapt_grads[0], g_k, m.named_params):
            expected = before[n] - lr * (ga + 10.0 * gk)
            assert torch.allclose(p.detach(), expected, rtol=1e-4, atol=1e-7), n
        pulled += any(float(gk.abs().max()) > 0 for gk in g_k)
    assert pulled >= 5  # the parameters had left the source: the pull was exercised


def test_lambda_k_zero_collects_no_fisher_and_takes_no_extra_backward(tiny, monkeypatch):  # noqa: F811
    m = make(tiny, "rest", "text", steps=1, hparams={"queue_batches": 1, "lambda_k": 0.0})
    grads = []
    real = C.grads_of
    monkeypatch.setattr(C, "grads_of", lambda *a, **k: grads.append(1) or real(*a, **k))
    for x in tiny[2]["text"][:2]:
        _, log = m.step(x)
    assert grads == [] and len(m.fisher) == 0 and "l_know" not in log


def test_fisher_survives_a_checkpoint(tiny):  # noqa: F811
    m = make(tiny, "rest", "image", steps=1, hparams={"queue_batches": 2})
    for x in tiny[2]["image"][:2]:
        m.step(x)
    state = m.state_dict()  # before m2: both share the tiny model, which make() restores to the source
    m2 = make(tiny, "rest", "image", steps=1, hparams={"queue_batches": 2})
    m2.load_state_dict(state)
    source = list(m._snapshot["params"].values())
    a, b = m.fisher.knowledge(m.params, source), m2.fisher.knowledge(m2.params, source)
    assert len(m2.fisher) == len(m.fisher) >= 2 and a[1] == b[1] and a[1] > 0
    assert all(torch.equal(x, y) for x, y in zip(a[0], b[0]))


@pytest.mark.parametrize("modality", ["image", "text"])
def test_rest_answers_with_its_queries_refined_by_hand(tiny, modality):  # noqa: F811
    """Without adaptation (SGD at rate 0) REST's answers are TCR_Untrain's transform of the source queries, written
    out here: ``c + 2 (q - c)`` about the batch centre, moved by ``(1 - Delta_queue / Delta_batch) (mean(G~) - c)``,
    re-normalised; not the raw ``q G^T`` (their ranks differ), nor the transform at another scale or sign."""
    m = make(tiny, "rest", modality, steps=1, optimizer="sgd", lr=0.0, weight_decay=0.0, hparams={"queue_batches": 2})
    gap = lambda q, g: float((F.normalize(q, dim=1).mean(0) - F.normalize(g, dim=1).mean(0)).norm())  # noqa: E731
    for x in tiny[2][modality]:
        with torch.no_grad():
            q = m.encode(x)
        scores, _ = m.step(x)
        g = m.gallery[(q @ m.gallery.T).argmax(1)]
        c, gap_queue = q.mean(0), gap(m.queue.q, m.queue.g)
        assert math.isclose(gap_queue, m.queue.gap, rel_tol=1e-5)
        shift = (1 - gap_queue / gap(q, g)) * (g.mean(0) - c)
        refined = {(scale, sign): F.normalize(c + scale * (q - c) + sign * shift, dim=1) @ m.gallery.T
                   for scale, sign in ((2.0, 1.0), (1.0, 1.0), (2.0, -1.0))}
        assert torch.allclose(scores, refined[2.0, 1.0], atol=1e-5)
        for wrong in (q @ m.gallery.T, refined[1.0, 1.0], refined[2.0, -1.0]):
            assert not torch.equal(scores.argsort(1), wrong.argsort(1))


def _rows_by_loop(tiny, modality, x, hparams, monkeypatch):  # noqa: F811
    """The Fisher rows of a fresh REST's first step on ``x``, written out: the chosen queries and labels again (same
    generator state), each query encoded alone and one backward each."""
    m = make(tiny, "rest", modality, steps=1, hparams=hparams)
    seen = []

    def by_loop(self, query_batch, g, ent, logits, reliable, tapped=None):
        chosen = self._most_reliable(ent, reliable)
        labels = C.draw_labels(logits[chosen], self.generator)
        for i, y in zip(chosen.tolist(), labels):
            z = C.inbatch_logits(self.encode(C.index_batch(query_batch, torch.tensor([i]))), g, self.hp["tau"])
            nll = F.cross_entropy(z, y.view(1))
            seen.append(torch.cat([d.flatten() for d in torch.autograd.grad(nll, self.params)]))
        return []

    with monkeypatch.context() as patch:
        patch.setattr(REST, "_query_scores", by_loop)
        m.step(x)
    return torch.stack(seen)


@pytest.mark.parametrize("modality", ["image", "text"])
def test_fisher_rows_from_the_batchs_forward_equal_one_backward_per_query(tiny, monkeypatch, modality):  # noqa: F811
    """On openclip towers (LayerNorms only) the warm-up's single-query scores come from the step's own forward and
    one backward through LayerNorm taps (no vmap, no backward per query) and equal the scores of one forward and
    backward per query (float32: 1e-5 of the largest): each query's score depends on its own forward only."""
    expected = _rows_by_loop(tiny, modality, tiny[2][modality][0], {"queue_batches": 2}, monkeypatch)
    m = make(tiny, "rest", modality, steps=1, hparams={"queue_batches": 2})
    monkeypatch.setattr(C, "looped_grads", lambda *a: pytest.fail("the per-query loop ran"))
    monkeypatch.setattr(C, "per_sample_grads", lambda *a: pytest.fail("vmap ran"))
    m.step(tiny[2][modality][0])
    rows = torch.stack(m.fisher.rows)
    assert len(rows) >= 2 and float(rows.abs().max()) > 0 and rows.shape == expected.shape
    assert torch.allclose(rows, expected, rtol=0, atol=1e-5 * float(expected.abs().max()))


def test_a_tower_that_couples_the_batchs_queries_gets_its_fisher_rows_from_vmap(tiny, monkeypatch):  # noqa: F811
    """Where a query's embedding depends on the other queries of the batch (here: plus half the batch mean), the
    batch's backward does not give per-query scores: the taps see a gradient on a query not chosen, refuse, and
    the rows come from vmap, equal to the per-query loop's."""
    hp = {"queue_batches": 1, "know_queries": 2}  # two queries chosen, the others must get no gradient
    x = tiny[2]["image"][0]

    def coupled(real):
        return lambda modality, batch: (lambda q: q + 0.5 * q.mean(0, keepdim=True))(real(modality, batch))

    m = make(tiny, "rest", "image", steps=1, hparams=hp)
    real_encode, real_rows, refused, vmapped = m.model.encode, C.LayerNormTaps.rows, [], []
    monkeypatch.setattr(m.model, "encode", coupled(real_encode))
    monkeypatch.setattr(C.LayerNormTaps, "rows", lambda *a: refused.append(real_rows(*a)) or refused[-1])
    real_vmap = C.per_sample_grads
    monkeypatch.setattr(C, "per_sample_grads", lambda *a: vmapped.append(1) or real_vmap(*a))
    m.step(x)
    assert refused == [None] and vmapped == [1]
    rows = torch.stack(m.fisher.rows)
    expected = _rows_by_loop(tiny, "image", x, hp, monkeypatch)  # m.model.encode stays coupled (shared model)
    assert rows.shape == expected.shape == (2, rows.shape[1])
    assert torch.allclose(rows, expected, rtol=0, atol=1e-5 * float(expected.abs().max()))


def test_layernorm_taps_take_only_the_affine_parameters_of_plain_layernorms():
    net = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    assert C.LayerNormTaps.of(net, [("1.weight", net[1].weight), ("1.bias", net[1].bias)]) is not None
    assert C.LayerNormTaps.of(net, [("1.weight", net[1].weight), ("0.weight", net[0].weight)]) is None

    class Scaled(torch.nn.LayerNorm):  # another forward: not x_hat * w + b
        def forward(self, x):
            return 2 * super().forward(x)

    odd = torch.nn.Sequential(Scaled(4))
    assert C.LayerNormTaps.of(odd, [("0.weight", odd[0].weight)]) is None


def test_the_fisher_falls_back_to_one_backward_per_query_where_vmap_cannot_run(tiny, monkeypatch):  # noqa: F811
    """A backbone the taps do not apply to (adapted parameters other than LayerNorms': here the taps are refused)
    and vmap cannot run through (here: ``.item()`` in its forward, data-dependent) gets the same rows from the
    per-query loop, with one warning."""
    fast = make(tiny, "rest", "image", steps=1, hparams={"queue_batches": 1})
    x = tiny[2]["image"][0]
    fast.step(x)
    slow = make(tiny, "rest", "image", steps=1, hparams={"queue_batches": 1})
    monkeypatch.setattr(C.LayerNormTaps, "of", classmethod(lambda cls, model, named_params: None))
    real = slow.model.encode
    monkeypatch.setattr(slow.model, "encode", lambda modality, batch: real(modality, batch) * (
        1.0 if float(batch.abs().sum().item()) >= 0 else 2.0))
    with pytest.warns(RuntimeWarning, match="one backward per query"):
        slow.step(x)
    assert slow._scores_looped and len(slow.fisher) == len(fast.fisher) >= 2
    a, b = torch.stack(fast.fisher.rows), torch.stack(slow.fisher.rows)
    assert torch.allclose(a, b, rtol=0, atol=1e-5 * float(a.abs().max()))


@pytest.mark.parametrize("inplace", [False, True])
def test_layernorm_taps_give_per_sample_rows_and_refuse_an_output_changed_in_place(inplace):
    """The taps' rows are each chosen sample's own gradient of the LayerNorm's weight and bias (autograd's, one
    sample at a time); an op that overwrites the LayerNorm's output in place (here ReLU(inplace=True)) leaves the
    recorded output no longer the one ``x_hat * w + b`` describes, so the taps refuse (None)."""
    torch.manual_seed(0)
    norm = torch.nn.LayerNorm(4)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5), norm.bias.uniform_(-0.5, 0.5)
    net = torch.nn.Sequential(torch.nn.Linear(4, 4), norm, torch.nn.ReLU(inplace=inplace), torch.nn.Linear(4, 2))
    params = [("1.weight", norm.weight), ("1.bias", norm.bias)]
    x, chosen = torch.randn(5, 3, 4), torch.tensor([3, 0])
    taps = C.LayerNormTaps.of(net, params)
    with taps:
        out = net(x)
    rows = taps.rows(out[chosen].pow(2).sum(), chosen, len(x))
    if inplace:
        assert rows is None
        return
    expected = torch.stack([torch.cat([g.flatten() for g in torch.autograd.grad(
        net(x[i:i + 1]).pow(2).sum(), [norm.weight, norm.bias])]) for i in chosen.tolist()])
    assert rows.shape == (2, 8) and float(expected.abs().max()) > 0
    torch.testing.assert_close(rows, expected, rtol=1e-5, atol=1e-6)
