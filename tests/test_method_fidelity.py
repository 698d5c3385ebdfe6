"""Fidelity of the methods to the TCR code, and tests that fail when a method's behaviour breaks.

Each test names the behaviour it guards: the update direction, checkpoint/resume, the timing of the
recorded scores, gradient decoupling, the NaN guard, the LayerNorm selection and end-to-end ranking.
Expected values are computed by hand or from the TCR code's literal formula, not from the code under test.
"""

import copy
import io
import math

import pytest
import torch
import torch.nn.functional as F

from queryshift import methods
from queryshift.methods import AdaptConfig, NonFiniteLossError
from queryshift.methods import components as C
from queryshift.methods.base import Method
from queryshift.methods.deyo import deyo_weight
from queryshift.methods.tcr import TCR

ADAPTING = ["tent", "eata", "sar", "read", "deyo", "shot", "tcr", "rest"]
STATEFUL = ["tcr", "rest", "eata", "sar", "deyo", "shot", "tcr-free"]
# SAR: no model-recovery reset (it would undo the update under test) and a small rho, so that pass 2
# keeps samples on these 8-query batches
BASE_HP = {"sar": {"reset_constant": 0.0, "rho": 1e-3}}


@pytest.fixture(scope="module")
def tiny():
    from queryshift.models import load_model

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = load_model("openclip:qs-tiny/random")
    gen = torch.Generator().manual_seed(1)
    texts = [[f"{a} {b} {c}" for a in ("a", "two") for b in ("red", "small", "old", "big")]
             for c in ("dogs near water", "cars on a road", "birds in a tree")]
    batches = {"image": [torch.randn(8, 3, 32, 32, generator=gen) for _ in range(3)],
               "text": [model.tokenize(t) for t in texts]}
    # The random model maps every query near one point, so a gallery from the other tower would give all
    # queries the same top-1 candidate (a degenerate in-batch prediction). A gallery of the 24 queries'
    # own source embeddings, perturbed, gives distinct candidates and a non-trivial L_know.
    galleries = {}
    with torch.no_grad():
        for modality, xs in batches.items():
            q = torch.cat([model.encode(modality, x) for x in xs])
            galleries[modality] = F.normalize(q + 0.3 * torch.randn(q.shape, generator=gen) / q.shape[1] ** 0.5, dim=1)
    yield model, galleries, batches, copy.deepcopy(model.state_dict())
    torch.set_num_threads(threads)


def make(tiny, name, modality, hparams=None, **config):
    """``name`` (a registered name or a method class) on the shared model restored to its source weights (one live
    method at a time)."""
    model, galleries, _, source = tiny
    model.load_state_dict(source)
    config.setdefault("lr", 1e-2)
    cfg = AdaptConfig(hparams={**BASE_HP.get(name, {}), **(hparams or {})}, **config)
    cls = name if isinstance(name, type) else methods.get(name)
    return cls(model, galleries[modality], modality, cfg)


def adapted(method):
    return {n: p.detach().clone() for n, p in method.named_params}


def same(a, b, path="state"):
    """Recursive exact equality of checkpoints: tensors bit for bit, objects by their attributes."""
    if torch.is_tensor(a):
        assert torch.is_tensor(b) and a.dtype == b.dtype and torch.equal(a, b), path
    elif isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), (path, sorted(a), sorted(b))
        for k in a:
            same(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            same(x, y, f"{path}[{i}]")
    elif hasattr(a, "__dict__") and not isinstance(a, type):
        assert type(a) is type(b), path
        same(vars(a), vars(b), path)
    else:
        assert a == b, (path, a, b)


def directions(scores, reference):
    """Rows of both score matrices scaled to unit length (methods return cos or cos/tau)."""
    return F.normalize(scores.float(), dim=1), F.normalize(reference.float(), dim=1)


# -- 1. DeYO weight ----------------------------------------------------------------------------------


def test_deyo_weight_is_the_tcr_codes_exp_plpd_plus_one_tenth():
    ent = torch.tensor([0.5, 1.0, 2.0])
    plpd = torch.tensor([0.2, 0.0, -0.3])
    w = deyo_weight(ent, 1.0, plpd)
    # by hand: 1/(e^(H-1) + 0.1) + e^PLPD + 0.1
    # H=.5: 1/(0.606531 + 0.1) = 1.415367, e^.2 = 1.221403 -> 2.736770
    # H=1 : 1/1.1 = 0.909091, e^0 = 1                     -> 2.009091
    # H=2 : 1/(2.718282 + 0.1) = 0.354825, e^-.3 = 0.740818 -> 1.195643
    assert torch.allclose(w, torch.tensor([2.736770, 2.009091, 1.195643]), atol=2e-6)
    # (the old reading 1/(e^-PLPD + 0.1) would give 0.909091 + 0.909091 = 1.818182 for H=1, PLPD=0)


def test_deyo_loss_on_text_queries_uses_that_weight(tiny):
    """Text queries: PLPD = 0, so every kept query's weight is 1/(e^(H-thr) + 0.1) + 1.1."""
    m = make(tiny, "deyo", "text", steps=1)
    x = tiny[2]["text"][0]
    with torch.no_grad():
        logits = m.encode(x) @ m.gallery.T / 0.01
    h = C.entropy(logits)
    k = int(0.5 * len(h))
    kept = h[h < h.kthvalue(k).values]  # strict, k = int(0.5 B)
    thr = kept.kthvalue(int(0.4 * len(kept))).values if int(0.4 * len(kept)) else math.inf
    expected = ((1 / (torch.exp(kept - thr) + 0.1) + 1.1) * kept).mean()
    _, log = m.step(x)
    assert log["n_selected"] == len(kept) > 0
    assert math.isclose(log["loss"], float(expected), rel_tol=1e-5)


# -- 2. TCR empty selection, and REST nesting TCR ------------------------------------------------------


def test_tcr_empty_rem_selection_updates_with_the_tcr_codes_gradient(tiny):
    """Every entropy above E_m: the TCR code's loss is NaN + L_uni + L_gap, whose gradient is that of
    L_uni + L_gap; the method takes exactly that SGD step (and logs it) instead of skipping."""
    m = make(tiny, "tcr", "image", steps=1, optimizer="sgd", momentum=0.0, weight_decay=0.0, lr=0.5,
             hparams={"queue_batches": 1})
    x0, x1 = tiny[2]["image"][:2]
    m.step(x0)  # fills (and freezes) the queue
    m.queue.entropy = torch.full_like(m.queue.entropy, -1.0)  # E_m = -1: no query can be selected
    m.queue._stats = None  # the queue caches its statistics until its next push; this edit bypasses push
    before = adapted(m)
    # the TCR code's literal loss on a copy of the current parameters
    q = m.encode(x1)
    g = m.gallery[(q @ m.gallery.T).argmax(1)]
    h = C.entropy(q @ g.T / 0.02)
    w = (1 - h.detach() / (-1.0 + 1e-3)).clamp_min(0)
    l_rem = (w * h)[h.detach() <= -1.0].mean()
    centre = q.mean(0)
    l_uni = torch.exp(-0.1 * (q - centre).norm(dim=1)).mean()
    gap = (F.normalize(q, dim=1).mean(0) - F.normalize(g, dim=1).mean(0)).norm()
    gap_q = (F.normalize(m.queue.q, dim=1).mean(0) - F.normalize(m.queue.g, dim=1).mean(0)).norm()
    loss = l_rem + l_uni + (gap - gap_q) ** 2
    assert math.isnan(float(loss.detach()))
    grads = torch.autograd.grad(loss, m.params)
    _, log = m.step(x1)
    assert log["empty_selection"] == 1 and log["n_selected"] == 0 and "skipped" not in log
    assert math.isclose(log["loss"], float((l_uni + (gap - gap_q) ** 2).detach()), rel_tol=1e-5)
    for (n, p), gr in zip(m.named_params, grads):
        assert torch.isfinite(gr).all()
        assert torch.allclose(p.detach(), before[n] - 0.5 * gr, atol=1e-6), n
    assert any(not torch.equal(p.detach(), before[n]) for n, p in m.named_params)


def refined_by_hand(q, g, gap_ref, scale=2.0):
    """TCR_Untrain's query transform written out (the order of the operations of ``components.refine_queries``, so
    that equal inputs give equal bits): expansion by ``scale`` about the batch centre ``c``, then the move by
    ``(1 - Delta_ref / Delta_batch) (mean(G~) - c)`` toward the candidates, re-normalised."""
    centre = q.mean(dim=0)
    refined = centre + scale * (q - centre)
    gap_batch = float((F.normalize(q, dim=-1).mean(0) - F.normalize(g, dim=-1).mean(0)).norm())
    if gap_ref is not None:
        refined = refined + (1 - gap_ref / gap_batch) * (g.mean(dim=0) - centre)
    return F.normalize(refined, dim=-1)


class TCRRefinedAnswers(TCR):
    """``tcr`` answering with its queries refined by hand as REST answers (scale 2, its own queue's gap): what ``rest``
    without its knowledge and consistency terms must return."""

    def encode(self, query_batch):
        self.last_queries = super().encode(query_batch)
        return self.last_queries

    def forward_and_adapt(self, query_batch, step):
        scores, info = super().forward_and_adapt(query_batch, step)
        g = self.gallery[scores.argmax(dim=1)]  # TCR's top-1 candidates
        return refined_by_hand(self.last_queries.detach(), g, self.queue.gap) @ self.gallery.T, info


def beside_tcr(tiny, modality, name, hparams, reference="tcr"):
    """(ranks, logs, adapted parameters) of ``reference`` (``tcr``, or a class such as :class:`TCRRefinedAnswers`)
    and of ``name`` with ``hparams`` on the tiny batches, the second batch with E_m below every entropy (an empty
    reliable selection)."""
    runs = []
    for method, hp in ((reference, {"queue_batches": 1}), (name, {"queue_batches": 1, **hparams})):
        m = make(tiny, method, modality, steps=2, hparams=hp)
        logs, ranks = [], []
        for b, x in enumerate(tiny[2][modality]):
            if b == 1:  # this batch: E_m below every entropy
                m.queue.entropy = torch.full_like(m.queue.entropy, -1.0)
                m.queue._stats = None  # cached until the next push, which this edit bypasses
            scores, log = m.step(x)
            ranks.append(scores.argsort(dim=1, descending=True))
            logs.append(log)
        runs.append((ranks, logs, adapted(m)))
    return runs[0], runs[1]


@pytest.mark.parametrize("modality", ["image", "text"])
def test_rest_without_its_additions_is_tcr_with_refined_answers(tiny, modality):
    """rest(lambda_k=0, w_con=0) = tcr whose answers are refined as REST's (scale 2): same ranks, losses and
    parameters, also on a batch with an empty reliable selection. Plain tcr's ranks differ: the refinement acts."""
    (r_t, l_t, p_t), (r_r, l_r, p_r) = beside_tcr(tiny, modality, "rest", {"lambda_k": 0.0, "w_con": 0.0},
                                                  reference=TCRRefinedAnswers)
    assert l_t[1]["empty_selection"] == l_r[1]["empty_selection"] == 1
    assert all(torch.equal(a, b) for a, b in zip(r_t, r_r))
    assert [x["loss"] for x in l_t] == [x["loss"] for x in l_r]
    assert [x["n_selected"] for x in l_t] == [x["n_selected"] for x in l_r]
    assert all(torch.equal(p_t[n], p_r[n]) for n in p_t)
    assert any(not torch.equal(p_t[n], tiny[3][n]) for n in p_t)  # and they did adapt
    (r_plain, _, p_plain), _ = beside_tcr(tiny, modality, "tcr", {})
    assert all(torch.equal(p_plain[n], p_t[n]) for n in p_t)  # the refinement leaves the update alone
    assert not all(torch.equal(a, b) for a, b in zip(r_plain, r_r))  # but changes the answers


# -- 3. SAR recovery keeps the EMA ---------------------------------------------------------------------


def test_sar_reset_keeps_the_ema(tiny):
    m = make(tiny, "sar", "text", steps=1, hparams={"reset_constant": 1e9})
    x0, x1 = tiny[2]["text"][:2]
    _, log0 = m.step(x0)
    assert log0["reset"] == 1 and all(torch.equal(p, tiny[3][n]) for n, p in adapted(m).items())
    assert m.ema == log0["loss2"]  # ema <- L2 the first time, and not forgotten by the reset
    _, log1 = m.step(x1)
    assert log1["reset"] == 1
    assert math.isclose(m.ema, 0.9 * log0["loss2"] + 0.1 * log1["loss2"], rel_tol=1e-9)


# -- 4. EATA empty selection ---------------------------------------------------------------------------


def test_eata_empty_selection_takes_the_zero_gradient_adamw_step(tiny):
    """As the TCR code: zero gradients, AdamW still applies momentum and weight decay."""
    m = make(tiny, "eata", "image", steps=1, lr=0.1, weight_decay=0.5, hparams={"e_margin": 0.0})
    x0, x1 = tiny[2]["image"][:2]
    before = adapted(m)
    _, log = m.step(x0)  # first step, empty selection: Adam's moments are 0, only the decay acts
    assert log["empty_selection"] == 1 and "skipped" not in log and "loss" not in log
    for n, p in adapted(m).items():
        assert torch.allclose(p, before[n] * (1 - 0.1 * 0.5), atol=1e-7), n
    # after a real step, an empty selection keeps moving along the momentum
    m.hp["e_margin"] = 0.4
    m.step(x0)
    ref_params = [p.detach().clone().requires_grad_() for p in m.params]
    ref = torch.optim.AdamW(ref_params, lr=0.1, weight_decay=0.5)
    ref.load_state_dict(copy.deepcopy(m.optimizer.state_dict()))
    for p in ref_params:
        p.grad = torch.zeros_like(p)
    ref.step()
    m.hp["e_margin"] = 0.0
    _, log = m.step(x1)
    assert log["empty_selection"] == 1
    for p, r in zip(m.params, ref_params):
        assert torch.equal(p.detach(), r.detach())


# -- 5. SAM restores the saved weights exactly -----------------------------------------------------


def test_sam_restores_the_saved_weights_bit_for_bit():
    # float32: 1 + 3e-8 rounds to 1, and 1 - 3e-8 rounds to 1 - 2^-24, so "subtract e" would drift
    p = torch.nn.Parameter(torch.tensor([1.0]))
    sam = C.SAM([p], torch.optim.SGD, rho=3e-8, lr=0.5)
    p.grad = torch.tensor([1.0])
    sam.step()  # ascent by e = rho * g/||g|| = 3e-8
    p.grad = torch.tensor([2.0])  # gradient at the perturbed point
    sam.step()  # restore w = 1 exactly, then SGD: 1 - 0.5 * 2 = 0 exactly
    assert p.item() == 0.0
    p.data.fill_(1.0)
    p.grad = torch.tensor([1.0])
    sam.first_step()
    sam.unperturb()
    assert p.item() == 1.0


# -- 6. per-step logs ---------------------------------------------------------------------------------


class _Scripted(Method):
    """Logs a scripted info dict per step (no model needed)."""

    name = "scripted"
    adapts = False
    script: list = []

    def forward_and_adapt(self, query_batch, step):
        return torch.zeros(1, 1), dict(self.script[step])


def test_batch_log_is_the_last_steps_and_counts_skipped_steps():
    m = _Scripted.__new__(_Scripted)
    m.steps, m.batch_index, m.config = 3, 0, AdaptConfig(steps=3)
    m.adapts = True
    m.script = [{"skipped": "empty", "grad_angle": 100.0}, {"loss": 2.0, "grad_angle": 95.0}, {"loss": 1.0}]
    _, log = m.step(None)
    assert log == {"loss": 1.0, "skipped_steps": 1}  # no stale skipped / grad_angle of steps 0 and 1
    m.script = [{"loss": 1.0}, {"loss": 1.0}, {"skipped": "nonfinite", "loss": math.nan}]
    _, log = m.step(None)
    assert log["skipped"] == "nonfinite" and log["skipped_steps"] == 1


def test_sar_pass2_skip_counts_as_a_skipped_update(tiny):
    # k = int(0.125 * 8) = 1: pass 1 keeps the lowest entropy, which the ascent raises above itself (strict <)
    m = make(tiny, "sar", "image", steps=1, hparams={"margin_e0": 0.125, "rho": 0.05})
    _, log = m.step(tiny[2]["image"][0])
    assert log["skipped2"] == "empty" and log["skipped"] == "pass2-empty" and log["skipped_steps"] == 1
    assert all(torch.equal(p, tiny[3][n]) for n, p in adapted(m).items())


# -- 8. REST: a few steps away from the source (the projections themselves: lab/tests/test_rest_design_default.py)


def _move_away_from_source(m, x, lr=1e-2, n=2):
    """L_know has zero gradient at the source parameters: take a few ordinary steps first."""
    lrs = [g["lr"] for g in m.optimizer.param_groups]
    for g in m.optimizer.param_groups:
        g["lr"] = lr
    for _ in range(n):
        m.step(x)
    for g, v in zip(m.optimizer.param_groups, lrs):
        g["lr"] = v


def test_encode_with_source_uses_the_source_and_leaves_the_adapted_parameters(tiny):
    m = make(tiny, "tent", "image", steps=2)
    x0, x1 = tiny[2]["image"][:2]
    with torch.no_grad():
        source_emb = m.encode(x1)
    m.step(x0)
    weights = adapted(m)
    assert any(not torch.equal(weights[n], tiny[3][n]) for n in weights)
    emb = m.encode_with_source(x1)
    assert torch.equal(emb, source_emb)
    assert all(torch.equal(p.detach(), weights[n]) for n, p in m.named_params)


# -- tests that can fail: update direction ---------------------------------------------------------


def _own_loss(m, x):
    """(value, gradient) of the loss the method hands to ``update`` on ``x`` at the current parameters.

    ``update`` is replaced by a recorder (no step, so this does not go through the code under test) and
    the method's own state (queue, EMA, generator) is put back afterwards.
    """
    state = copy.deepcopy({a: getattr(m, a) for a in m.state_attrs})
    generator = m.generator.get_state()
    seen = []

    def record(loss, info=None):
        grads = torch.autograd.grad(loss, m.params, allow_unused=True)
        seen.append((float(loss.detach()), [torch.zeros_like(p) if g is None else g for p, g in zip(m.params, grads)]))
        return False

    m.update = record
    try:
        m.forward_and_adapt(x, 0)
    finally:
        del m.update
        for a, v in state.items():
            setattr(m, a, v)
        m.generator.set_state(generator)
    assert seen, f"{m.name}: no loss on this batch"
    return seen[0]


DIRECTION_HP = {"tcr": {"queue_batches": 1}, "rest": {"queue_batches": 1}, "eata": {"d_margin": 2.0}}
# Methods whose loss has no detached sample weights: the recomputed loss itself must fall. EATA, DeYO, TCR
# and REST weight each sample by a detached function of its entropy; the optimizer descends the weighted
# sum with the weights of the current parameters, and re-evaluating the weights after the step measures
# another function (EATA's exp(-(H - 0.4)) H falls as H grows past 1). For them the check is first order.
LITERAL = {"tent", "read", "shot", "sar"}


@pytest.mark.parametrize("modality", ["image", "text"])
@pytest.mark.parametrize("name", ADAPTING)
def test_sgd_step_lowers_the_methods_own_loss(tiny, name, modality):
    """Plain SGD, one step: the update descends the method's loss (a sign error fails here)."""
    m = make(tiny, name, modality, steps=1, optimizer="sgd", lr=1e-2, momentum=0.0, weight_decay=0.0,
             hparams=DIRECTION_HP.get(name))
    x0, x1 = tiny[2][modality][:2]
    if name in ("tcr", "rest"):
        m.step(x0)  # fills the queue, which is then frozen (queue_batches 1)
        if name == "rest":
            _move_away_from_source(m, x0, n=1)  # so that the knowledge pull acts on the step under test
    before, grads = _own_loss(m, x1)
    start = adapted(m)
    _, log = m.step(x1)
    assert "skipped" not in log, log
    change = [p.detach() - start[n] for n, p in m.named_params]
    slope = sum(float((d * g).sum()) for d, g in zip(change, grads))
    assert slope < 0, slope  # first order: the applied change points down the loss the method computed
    if name in LITERAL:
        after, _ = _own_loss(m, x1)
        assert after < before, (before, after)


# -- tests that can fail: recorded scores ----------------------------------------------------------


def answers_of(m, q):
    """The scores ``m`` returns for queries ``q``: ``q G^T``, or for ``rest`` the refined queries' (by hand, with the
    queue's gap: the queue takes entries at a batch's step 0 only, so after the batch it holds what every step saw)."""
    if m.name != "rest":
        return q @ m.gallery.T
    return refined_by_hand(q, m.gallery[(q @ m.gallery.T).argmax(1)], m.queue.gap) @ m.gallery.T


@pytest.mark.parametrize("name", ADAPTING)
def test_record_first_gives_the_scores_before_the_batchs_updates(tiny, name):
    m = make(tiny, name, "image", steps=3, record="first")
    x0, x1 = tiny[2]["image"][:2]
    with torch.no_grad():
        q_source = m.encode(x0)
    s0, _ = m.step(x0)
    assert torch.allclose(*directions(s0, answers_of(m, q_source)), atol=1e-5)  # batch 0 = the source's answers
    with torch.no_grad():
        q_start = m.encode(x1)  # the parameters after batch 0
        start = q_start @ m.gallery.T
    s1, _ = m.step(x1)
    assert torch.allclose(*directions(s1, answers_of(m, q_start)), atol=1e-5)
    with torch.no_grad():
        end = m.encode(x1) @ m.gallery.T
    assert not torch.allclose(*directions(end, start), atol=1e-5)  # the batch did adapt after recording


@pytest.mark.parametrize("name", ADAPTING)
def test_record_last_gives_the_last_steps_forward(tiny, name):
    x = tiny[2]["image"][0]
    one = make(tiny, name, "image", steps=1)
    with torch.no_grad():
        q_source = one.encode(x)
    s_one, _ = one.step(x)
    source = answers_of(one, q_source)
    assert torch.allclose(*directions(s_one, source), atol=1e-5)  # steps=1: batch 0 = the source's answers
    with torch.no_grad():
        after_one_update = answers_of(one, one.encode(x))
    assert not torch.allclose(*directions(after_one_update, source), atol=1e-5)
    two = make(tiny, name, "image", steps=2, record="last")
    s, _ = two.step(x)
    assert torch.allclose(*directions(s, after_one_update), atol=1e-5)


# -- tests that can fail: NaN guard ----------------------------------------------------------------


def _poison(m):
    """From now on the first query of every batch embeds to NaN."""
    real = m.encode

    def poisoned(batch):
        q = real(batch)
        return torch.cat([q[:1] * float("nan"), q[1:]])

    m.encode = poisoned


@pytest.mark.parametrize("name", ADAPTING)
def test_nan_embedding_skips_the_step_and_the_next_batch_adapts(tiny, name):
    m = make(tiny, name, "image", steps=1)
    x0, x1, x2 = tiny[2]["image"]
    m.step(x0)  # a clean batch first: the queue of TCR/REST is filled, the optimizer has state
    _poison(m)
    params, opt = adapted(m), copy.deepcopy(m.optimizer.state_dict())
    _, log = m.step(x1)
    assert "nonfinite" in log["skipped"], log  # the NaN guard, not an empty selection
    assert all(torch.equal(p, params[n]) for n, p in adapted(m).items())
    same(m.optimizer.state_dict(), opt)
    del m.encode
    _, log = m.step(x2)
    assert "skipped" not in log, log
    assert any(not torch.equal(p, params[n]) for n, p in adapted(m).items())


@pytest.mark.parametrize("name", ADAPTING)
def test_nan_embedding_raises_when_asked(tiny, name):
    m = make(tiny, name, "image", steps=1, on_nonfinite="raise")
    x0, x1 = tiny[2]["image"][:2]
    m.step(x0)
    _poison(m)
    with pytest.raises(NonFiniteLossError):
        m.step(x1)


# -- tests that can fail: checkpoint / resume ------------------------------------------------------


def _roundtrip(state):
    buffer = io.BytesIO()
    torch.save(state, buffer)  # as the engine checkpoints it
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


@pytest.mark.parametrize("name", STATEFUL)
def test_state_dict_resume_equals_the_uninterrupted_run(tiny, name):
    """Parameters, optimizer state, queue/EMA/mean probabilities and generator after a resume."""
    modality = "image"  # DeYO draws its patch shuffles from the generator for image queries only
    xs = tiny[2][modality]
    full = make(tiny, name, modality, steps=2)
    for x in xs:
        full.step(x)
    expected = _roundtrip(full.state_dict())
    first = make(tiny, name, modality, steps=2)
    first.step(xs[0])
    checkpoint = _roundtrip(first.state_dict())
    resumed = make(tiny, name, modality, steps=2)
    resumed.load_state_dict(checkpoint)
    for x in xs[1:]:
        resumed.step(x)
    same(resumed.state_dict(), expected)
    if name == "deyo":  # the generator did advance, so its state is part of what was compared
        assert not torch.equal(expected["generator"], torch.Generator().manual_seed(0).get_state())


# -- the LayerNorm selection of the open_clip backbone -------------------------------------


def test_openclip_layernorm_selection_is_spec_1_3(tiny):
    model = tiny[0]

    def blocks(prefix):  # qs-tiny has 2 residual blocks per tower
        return [f"{prefix}.resblocks.{i}.{ln}.{w}" for i in range(2) for ln in ("ln_1", "ln_2")
                for w in ("weight", "bias")]

    image = [f"model.visual.ln_pre.{w}" for w in ("weight", "bias")] + blocks("model.visual.transformer") + \
        [f"model.visual.ln_post.{w}" for w in ("weight", "bias")]
    assert [n for n, _ in model.adaptable_parameters("image")] == image
    text = blocks("model.transformer")  # ln_final excluded (it lives outside model.transformer)
    assert [n for n, _ in model.adaptable_parameters("text")] == text
    assert [n for n, _ in model.adaptable_parameters("text", include_final_ln=True)] == \
        text + ["model.ln_final.weight", "model.ln_final.bias"]
    m = make(tiny, "tent", "text")
    assert [n for n, _ in m.named_params] == text
    assert {n for n, p in m.model.named_parameters() if p.requires_grad} == set(text)
