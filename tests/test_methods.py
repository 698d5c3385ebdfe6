"""Every adaptation method on a tiny random open_clip model, in both query modalities."""

import copy
import math

import pytest
import torch

from queryshift import methods
from queryshift.methods import AdaptConfig
from queryshift.methods import components as C
from queryshift.methods.deyo import patch_shuffle
from queryshift.methods.read import read_loss
from queryshift.methods.shot import shot_loss
from queryshift.models.base import DualEncoder

NAMES = ["tent", "eata", "sar", "read", "deyo", "shot", "tcr", "tcr-free", "rest"]
# keep the model-recovery rule of SAR from undoing the update under test;
TEST_HP = {"sar": {"reset_constant": 0.0, "rho": 1e-3}}  # a small rho keeps pass 2 non-empty here


@pytest.fixture(scope="module")
def setup():
    from queryshift.models import load_model

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: one thread is ~10x faster on a busy 2-core machine
    torch.manual_seed(0)
    model = load_model("openclip:qs-tiny/random")
    gen = torch.Generator().manual_seed(1)
    texts = [f"a photo of {w}" for w in "cat dog car tree house boat bird road lake hill cup shoe".split()]
    with torch.no_grad():
        galleries = {"image": model.encode_text(model.tokenize(texts)),  # image queries -> text gallery
                     "text": model.encode_image(torch.randn(12, 3, 32, 32, generator=gen))}
    captions = [f"{a} {b} near the water" for a in ("a", "two") for b in ("dogs", "cars", "birds", "boats")]
    queries = {"image": torch.randn(8, 3, 32, 32, generator=gen), "text": model.tokenize(captions)}
    same = {"image": queries["image"][:1].repeat(8, 1, 1, 1), "text": queries["text"][:1].repeat(8, 1)}
    source = copy.deepcopy(model.state_dict())
    yield model, galleries, queries, same, source
    torch.set_num_threads(threads)


def build(setup, name, modality, steps=1, lr=1e-2, **hp):
    """A method on the shared model, first restored to the source weights (cheaper than a deepcopy).

    A test holds one live method at a time: building another one resets the model under the first.
    """
    model, galleries, _, _, source = setup
    model.load_state_dict(source)
    hparams = {**TEST_HP.get(name, {}), **hp}
    config = AdaptConfig(steps=steps, lr=lr, hparams=hparams)
    return methods.get(name)(model, galleries[modality], modality, config)


def params_of(method):
    return {n: p.detach().clone() for n, p in method.model.named_parameters()}


def assert_finite(method):
    for n, p in method.model.named_parameters():
        assert torch.isfinite(p).all(), n


def test_registry():
    for name in NAMES:
        assert methods.get(name).name == name
    with pytest.raises(ValueError):
        methods.get("tent")(None, None, "image", AdaptConfig(hparams={"no_such_knob": 1}))


@pytest.mark.parametrize("modality", ["image", "text"])
@pytest.mark.parametrize("name", NAMES)
def test_step_adapts_only_query_layernorms_and_reset_restores(setup, name, modality):
    method = build(setup, name, modality, steps=2)
    queries = setup[2][modality]
    before = params_of(method)
    adaptable = {n for n, _ in method.model.adaptable_parameters(modality)}
    scores, log = method.step(queries)
    assert scores.shape == (8, 12) and torch.isfinite(scores).all()
    assert all(isinstance(v, (int, float, str)) for v in log.values()), log
    after = params_of(method)
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    assert changed <= adaptable
    if method.adapts:
        assert changed, log  # the default hyper-parameters do update something on this batch
    else:
        assert not changed and method.optimizer is None
    method.reset()
    assert all(torch.equal(before[n], p) for n, p in method.model.named_parameters())
    for attr in method.state_attrs:  # the method's own state is back to its initial value
        value = getattr(method, attr)
        assert value is None or (attr in ("queue", "fisher") and len(value) == 0), (attr, value)


ADVERSARIAL = {  # hyper-parameters under which every selection is empty
    "tent": {}, "read": {}, "shot": {"threshold": 1.1},
    "eata": {"e_margin": 0.0}, "sar": {"margin_e0": 0.0}, "deyo": {"deyo_margin": 0.0},
    "tcr": {"queue_batches": 0}, "tcr-free": {"queue_batches": 0},
    "rest": {"queue_batches": 0, "w_uni": 0.0},
}
SKIPS = {"sar", "deyo", "tcr", "rest"}  # methods whose update must be skipped under ADVERSARIAL


@pytest.mark.parametrize("modality", ["image", "text"])
@pytest.mark.parametrize("name", NAMES)
def test_empty_selection_and_identical_queries_never_nan(setup, name, modality):
    method = build(setup, name, modality, steps=2, **ADVERSARIAL[name])
    before = params_of(method)
    scores, log = method.step(setup[2][modality])
    assert torch.isfinite(scores).all()
    assert_finite(method)
    if name in SKIPS:
        assert log.get("skipped") == "empty", log
        assert all(torch.equal(before[n], p) for n, p in method.model.named_parameters())
    if name == "eata":  # the TCR code's zero-gradient AdamW step instead (tests/test_method_fidelity.py)
        assert log["empty_selection"] == 1 and "skipped" not in log
    # a batch of identical queries under the default hyper-parameters
    method = build(setup, name, modality, steps=2)
    scores, log = method.step(setup[3][modality])
    assert torch.isfinite(scores).all()
    assert_finite(method)


@pytest.mark.parametrize("name", ["tent", "eata", "sar", "read", "deyo", "shot", "tcr", "rest"])
def test_nan_batch_is_skipped(setup, name):
    method = build(setup, name, "image")
    before = params_of(method)
    bad = setup[2]["image"].clone()
    bad[0] = float("nan")
    _, log = method.step(bad)
    assert "skipped" in log and log["skipped_steps"] == 1
    assert all(torch.equal(before[n], p) for n, p in method.model.named_parameters())


# -- method-specific ----------------------------------------------------------------------------------


def test_read_loss_by_hand():
    logits = torch.log(torch.tensor([[0.5, 0.25, 0.25], [0.2, 0.2, 0.6]]))
    loss, l_ra, l_bal = read_loss(logits)
    assert math.isclose(float(l_ra), (-0.5 * math.log(0.5) - 0.6 * math.log(0.6)) / 2, rel_tol=1e-5)
    # column sums (0.7, 0.45, 0.85), then a softmax of them: (0.340063, 0.264841, 0.395096); its entropy
    # 0.340063 * 1.078625 + 0.264841 * 1.328625 + 0.395096 * 0.928625 = 1.085571
    assert math.isclose(float(l_bal), 1.085571, rel_tol=1e-5)
    assert math.isclose(float(loss), 0.326534 - 1.085571, rel_tol=1e-5)  # L_ra - 1 * L_bal


def test_shot_loss_by_hand():
    logits = torch.log(torch.tensor([[0.95, 0.05], [0.5, 0.5]]))
    loss, info = shot_loss(logits, threshold=0.9, clf_coeff=0.1)
    ent = (-(0.95 * math.log(0.95) + 0.05 * math.log(0.05)) + math.log(2)) / 2
    pbar = (0.725, 0.275)
    div = sum(p * math.log(p + 1e-5) for p in pbar)
    ce = -math.log(0.95)  # only the confident query, label 0
    assert info["n_selected"] == 1
    assert math.isclose(float(loss), ent + div + 0.1 * ce, rel_tol=1e-5)
    loss, info = shot_loss(logits, threshold=0.99)
    assert info["n_selected"] == 0 and "l_ce" not in info
    assert math.isclose(float(loss), ent + div, rel_tol=1e-5)


def test_patch_shuffle_permutes_patches_reproducibly():
    x = torch.arange(2 * 1 * 8 * 8, dtype=torch.float).reshape(2, 1, 8, 8)
    y = patch_shuffle(x, 4, torch.Generator().manual_seed(0))
    assert y.shape == x.shape and not torch.equal(x, y)

    def patches(t):  # the 16 2x2 patches of a 1 x 8 x 8 image, as a sorted list
        corners = [(r, c) for r in range(0, 8, 2) for c in range(0, 8, 2)]
        return sorted(tuple(t[0, r:r + 2, c:c + 2].flatten().tolist()) for r, c in corners)

    for i in range(2):
        assert patches(x[i]) == patches(y[i])
    assert torch.equal(y, patch_shuffle(x, 4, torch.Generator().manual_seed(0)))
    assert patch_shuffle(torch.randn(1, 3, 30, 30), 4, torch.Generator()).shape == (1, 3, 30, 30)


class _Identity(DualEncoder):
    """Queries are their own (normalised) embeddings."""

    def encode_image(self, images):
        return torch.nn.functional.normalize(images, dim=-1)

    def tower(self, which):
        return self


def test_tcr_free_transform_by_hand():
    gallery = torch.tensor([[0.8, 0.6], [-0.6, 0.8]])
    cfg = AdaptConfig(hparams={"con_ratio": 0.5})  # queue takes int(0.5 * 2) = 1 sample
    method = methods.get("tcr-free")(_Identity(), gallery, "image", cfg)
    scores, log = method.step(torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
    # candidates: q1 -> (.8,.6), q2 -> (-.6,.8); c_q = (.5,.5), mean G~ = (.1,.7): batch gap sqrt(.2)
    # queue: the pair with the smaller indicator (a tie here; both have ||q - g~|| = sqrt(.4)) -> gap sqrt(.4)
    assert math.isclose(log["gap"], math.sqrt(0.2), rel_tol=1e-6)
    assert math.isclose(log["gap_ref"], math.sqrt(0.4), rel_tol=1e-6)
    # q' = c + 2 (q - c) = (1.5,-.5), (-.5,1.5); + (1 - sqrt(.4)/sqrt(.2)) (mean G~ - c) = + (.165685, -.082843)
    # normalised: (.943884, -.330276), (-.229603, .973284); times G^T:
    expected = torch.tensor([[0.556942, -0.830552], [0.400288, 0.916389]])
    assert torch.allclose(scores, expected, atol=2e-6)
    assert method.steps == 1 and len(method.queue) == 1


def test_tcr_queue_follows_warmup(setup):
    method = build(setup, "tcr", "image", steps=2, queue_batches=2, queue_size=3)
    q = setup[2]["image"]
    lens = [method.step(q)[1]["queue_len"] for _ in range(3)]
    assert lens == [2, 3, 3]  # 2 per batch (step 0 only), truncated to 3, frozen after 2 batches


def test_sar_reset_rule(setup):
    method = build(setup, "sar", "text", reset_constant=1e9)
    before = params_of(method)
    _, log = method.step(setup[2]["text"])
    assert log.get("reset") == 1 and method.ema == log["loss2"]  # the ema survives the reset, as in SAR
    assert all(torch.equal(before[n], p) for n, p in method.model.named_parameters())


@pytest.mark.parametrize("hp", [
    {}, {"lambda_k": 0.5}, {"refine": False}, {"topk": 3}, {"lambda_k": 0.0}, {"w_ent": 0.0, "w_con": 0.0},
])
def test_rest_variants_and_diagnostics(setup, hp):
    method = build(setup, "rest", "text", steps=2, **hp)
    scores, log = method.step(setup[2]["text"])
    assert torch.isfinite(scores).all() and "skipped" not in log
    for key in ("n_selected", "queue_len", "uniformity", "gap", "consistency", "l_uni", "loss"):
        assert key in log
    if hp.get("lambda_k", 1.0):
        assert "l_know" in log and "conflict_frac" in log
    else:
        assert "l_know" not in log
    assert_finite(method)


def test_rest_logs_the_last_steps_grad_angle(setup, monkeypatch):
    method = build(setup, "rest", "text", steps=3)
    seen = []
    real = C.knowledge_pull

    def spy(g_adapt, g_know, *args, **kw):
        seen.append((torch.cat([g.flatten() for g in g_adapt]), torch.cat([g.flatten() for g in g_know])))
        return real(g_adapt, g_know, *args, **kw)

    monkeypatch.setattr(C, "knowledge_pull", spy)
    _, log = method.step(setup[2]["text"])
    ga, gk = seen[-1]  # the last step's gradients (step 0, at the source parameters, has g_k = 0)
    assert float(gk.norm()) > 0
    cos = float(ga @ gk) / float(ga.norm() * gk.norm())
    assert math.isclose(log["grad_angle"], math.degrees(math.acos(cos)), abs_tol=1e-3)
    with pytest.raises(ValueError):
        build(setup, "rest", "text", lambda_k=-1.0)
